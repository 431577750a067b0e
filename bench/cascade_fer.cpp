// Cascade reconciliation study: efficiency f, frame error rate and throughput per variant,
// block size and QBER, with a local oracle (Alice's and Bob's compute on one thread, no
// network). Prints a Markdown table.
//
//   build/bin/cascade_fer [--blocks N] [--sizes 16384,65536] [--qbers 1,2,3,4,5]
//                         [--variants legacy,original,yan,modern] [--passes P] [--seed S]
//                         [--biconf 0,2,4]
//
// Errors are i.i.d. Bernoulli(QBER) bits; Cascade's first block size comes from the true
// QBER. --biconf lists BICONF round counts to compare (default 0: none; every count runs
// on the same blocks). f = parities disclosed / (n h(QBER)) over all blocks; "FER" =
// blocks with residual errors after Cascade (before verification) / blocks; Mbit/s =
// reconciled bits / time spent in layout + responder + cascade_correct, measured as this
// thread's CPU time (error generation is not timed; CPU time keeps the figure meaningful on
// a shared machine).
#include <time.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "legacy_cascade.hpp"
#include "qkd/core/cascade.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/random.hpp"

namespace {

using namespace qkd::core;

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

struct Variant {
  std::string name;
  bool legacy = false;
  CascadeVariant variant = CascadeVariant::kOriginal;
};

std::vector<std::string> split_list(std::string_view s) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::size_t end = comma == std::string_view::npos ? s.size() : comma;
    if (end > pos) {
      out.emplace_back(s.substr(pos, end - pos));
    }
    pos = end + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int blocks = 1000;
  std::vector<std::string> sizes = {"16384", "65536"};
  std::vector<std::string> qbers = {"1", "2", "3", "4", "5"};
  std::vector<std::string> names = {"legacy", "original", "yan", "modern"};
  std::uint32_t passes_override = 0;
  std::uint64_t seed = 7;
  std::vector<std::string> biconf_list = {"0"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    const std::string_view value = argv[i + 1];
    if (flag == "--blocks") {
      blocks = std::atoi(argv[i + 1]);
    } else if (flag == "--sizes") {
      sizes = split_list(value);
    } else if (flag == "--qbers") {
      qbers = split_list(value);
    } else if (flag == "--variants") {
      names = split_list(value);
    } else if (flag == "--passes") {
      passes_override = static_cast<std::uint32_t>(std::atoi(argv[i + 1]));
    } else if (flag == "--biconf") {
      biconf_list = split_list(value);
    } else if (flag == "--seed") {
      seed = std::strtoull(argv[i + 1], nullptr, 10);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  std::vector<Variant> variants;
  for (const auto& nm : names) {
    if (nm == "legacy") {
      variants.push_back({"legacy (before)", true, CascadeVariant::kOriginal});
    } else if (nm == "original") {
      variants.push_back({"original", false, CascadeVariant::kOriginal});
    } else if (nm == "yan") {
      variants.push_back({"yan", false, CascadeVariant::kYan});
    } else if (nm == "modern") {
      variants.push_back({"modern", false, CascadeVariant::kModern});
    } else {
      std::fprintf(stderr, "unknown variant %s\n", nm.c_str());
      return 2;
    }
  }
  std::printf("| variant | n | QBER %% | passes | BICONF | k1 | f | FER (residual/blocks) | "
              "max round trips | Mbit/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& size_s : sizes) {
    const auto n = static_cast<std::uint32_t>(std::stoul(size_s));
    for (const auto& q_s : qbers) {
      const double q = std::stod(q_s) / 100.0;
      for (const Variant& v : variants) {
        for (const auto& biconf_s : biconf_list) {
          const auto biconf = static_cast<std::uint32_t>(std::stoul(biconf_s));
          // Same blocks for every variant and BICONF count: the errors depend only on the seed.
          Xoshiro256ss rng(seed + n + static_cast<std::uint64_t>(q * 1e6));
          const std::uint32_t passes =
              passes_override != 0 ? passes_override : cascade_default_passes(v.variant);
          const std::uint32_t k1 = cascade_first_block_size(q, n, v.variant);
          double leaked = 0;
          double secs = 0;
          int failures = 0;
          std::uint64_t max_rt = 0;
          for (int b = 0; b < blocks; ++b) {
            BitVector alice(n);
            for (auto& w : alice.mutable_words()) {
              w = rng.next();
            }
            alice.clear_tail();
            BitVector bob = alice;
            for (std::uint32_t i = 0; i < n; ++i) {
              if (rng.bernoulli(q)) {
                bob.flip(i);
              }
            }
            std::array<std::uint8_t, 32> shuffle{};
            for (auto& byte : shuffle) {
              byte = static_cast<std::uint8_t>(rng.next());
            }
            const double t0 = thread_cpu_seconds();
            Result<CascadeStats> stats = CascadeStats{};
            if (v.legacy) {
              const CascadeLayout layout(n, passes, k1, shuffle, v.variant, biconf);
              const qkd::bench_legacy::LegacyResponder responder(alice, layout);
              qkd::bench_legacy::LegacyOracle oracle(responder);
              stats = qkd::bench_legacy::legacy_cascade_correct(bob, layout, oracle);
            } else {
              const CascadeLayout layout(n, passes, k1, shuffle, v.variant, biconf);
              const CascadeResponder responder(alice, layout);
              LocalParityOracle oracle(responder);
              stats = cascade_correct(bob, layout, oracle);
            }
            secs += thread_cpu_seconds() - t0;
            if (!stats.ok()) {
              std::fprintf(stderr, "cascade failed: %s\n", stats.error().message.c_str());
              return 1;
            }
            leaked += static_cast<double>(stats->parities_disclosed);
            max_rt = std::max(max_rt, stats->round_trips);
            if (!(bob == alice)) {
              ++failures;
            }
          }
          const double f = leaked / (static_cast<double>(blocks) * n * binary_entropy(q));
          std::printf("| %s | %u | %s | %u | %u | %u | %.4f | %d/%d | %llu | %.1f |\n",
                      v.name.c_str(), n, q_s.c_str(), passes, biconf, k1, f, failures, blocks,
                      static_cast<unsigned long long>(max_rt),
                      static_cast<double>(blocks) * n / secs / 1e6);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}
