#include "qkd/core/cascade.hpp"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "qkd/core/key_length.hpp"
#include "qkd/core/random.hpp"

namespace qkd::core {
namespace {

// Wraps a LocalParityOracle and counts the parities it hands out.
class CountingOracle final : public ParityOracle {
 public:
  explicit CountingOracle(const CascadeResponder& r) : inner_(r) {}
  Result<BitVector> block_parities(std::uint32_t pass) override {
    auto r = inner_.block_parities(pass);
    if (r.ok()) {
      count += r->size();
    }
    return r;
  }
  Result<BitVector> range_parities(std::span<const ParityQuery> q) override {
    auto r = inner_.range_parities(q);
    if (r.ok()) {
      count += r->size();
    }
    return r;
  }
  std::uint64_t count = 0;

 private:
  LocalParityOracle inner_;
};

std::array<std::uint8_t, 32> seed_bytes(Xoshiro256ss& rng) {
  std::array<std::uint8_t, 32> s{};
  for (auto& b : s) {
    b = static_cast<std::uint8_t>(rng.next());
  }
  return s;
}

// Alice's random key of n bits and Bob's copy with i.i.d. errors at rate q (the generator
// advances by the key words, then one Bernoulli draw per bit).
struct NoisyPair {
  BitVector alice;
  BitVector bob;
};
NoisyPair noisy_pair(Xoshiro256ss& rng, std::uint32_t n, double q) {
  NoisyPair p{BitVector(n), BitVector()};
  for (auto& w : p.alice.mutable_words()) {
    w = rng.next();
  }
  p.alice.clear_tail();
  p.bob = p.alice;
  for (std::uint32_t i = 0; i < n; ++i) {
    if (rng.bernoulli(q)) {
      p.bob.flip(i);
    }
  }
  return p;
}

TEST(Cascade, LayoutPermutationsAreBijections) {
  Xoshiro256ss rng(1);
  const auto seed = seed_bytes(rng);
  const CascadeLayout layout(1000, 4, 73, seed);
  EXPECT_EQ(layout.block_size(0), 73U);
  EXPECT_EQ(layout.block_size(3), 584U);
  for (std::uint32_t p = 0; p < 4; ++p) {
    for (std::uint32_t i = 0; i < 1000; ++i) {
      ASSERT_EQ(layout.position(p, layout.original_index(p, i)), i);
    }
  }
  EXPECT_EQ(cascade_first_block_size(0.01, 10000), 73U);
  EXPECT_EQ(cascade_first_block_size(0.5, 10000), 2U);
  EXPECT_EQ(cascade_first_block_size(0.0, 100), 100U);
}

TEST(Cascade, ResponderRejectsOutOfRangeQueries) {
  Xoshiro256ss rng(2);
  const auto seed = seed_bytes(rng);
  const CascadeLayout layout(100, 4, 10, seed);
  const CascadeResponder r(BitVector(100), layout);
  const ParityQuery bad_pass{4, 0, 1};
  const ParityQuery past_end{0, 90, 11};
  const ParityQuery empty{0, 5, 0};
  EXPECT_FALSE(r.range_parities(std::span(&bad_pass, 1)).ok());
  EXPECT_FALSE(r.range_parities(std::span(&past_end, 1)).ok());
  EXPECT_FALSE(r.range_parities(std::span(&empty, 1)).ok());
  EXPECT_FALSE(r.block_parities(4).ok());
}

// 1000 blocks of 10,000 bits at each QBER level 1..5 %: at most 1 block per level may keep
// a residual error (>= 99.9 %). Errors are i.i.d. Bernoulli(QBER); Cascade's first block
// size comes from the true QBER, as it would from a good estimate.
TEST(Cascade, CorrectsTenThousandBitBlocks) {
  constexpr std::uint32_t kBits = 10'000;
  constexpr int kBlocks = 1000;
  Xoshiro256ss rng(2024);
  for (const double q : {0.01, 0.02, 0.03, 0.04, 0.05}) {
    int failures = 0;
    double leaked = 0.0;
    double errors = 0.0;
    std::uint64_t max_round_trips = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int b = 0; b < kBlocks; ++b) {
      auto [alice, bob] = noisy_pair(rng, kBits, q);
      const std::size_t injected = alice.hamming_distance(bob);
      const auto seed = seed_bytes(rng);
      const CascadeLayout layout(kBits, 4, cascade_first_block_size(q, kBits), seed);
      const CascadeResponder responder(alice, layout);
      CountingOracle oracle(responder);
      auto stats = cascade_correct(bob, layout, oracle);
      ASSERT_TRUE(stats.ok()) << stats.error().message;
      ASSERT_EQ(stats->parities_disclosed, oracle.count);  // leakage counted exactly
      if (!(bob == alice)) {
        ++failures;
      } else {
        EXPECT_EQ(stats->errors_corrected, injected);
      }
      leaked += static_cast<double>(stats->parities_disclosed);
      errors += static_cast<double>(injected);
      max_round_trips = std::max(max_round_trips, stats->round_trips);
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double eff = leaked / (kBlocks * kBits * binary_entropy(q));
    std::printf(
        "cascade QBER %.0f %%: %d/%d blocks with residual errors, efficiency f = %.3f, "
        "max round trips %llu, %.1f Mbit/s\n",
        100 * q, failures, kBlocks, eff, static_cast<unsigned long long>(max_round_trips),
        kBlocks * kBits / secs / 1e6);
    EXPECT_LE(failures, 1) << "QBER " << q;
    EXPECT_LT(eff, 1.35);
    (void)errors;
  }
}

TEST(Cascade, NoErrorsDisclosesOnlyBlockParities) {
  Xoshiro256ss rng(3);
  BitVector key(5000);
  for (auto& w : key.mutable_words()) {
    w = rng.next();
  }
  key.clear_tail();
  BitVector bob = key;
  const auto seed = seed_bytes(rng);
  const CascadeLayout layout(5000, 4, 100, seed);
  const CascadeResponder responder(key, layout);
  LocalParityOracle oracle(responder);
  auto stats = cascade_correct(bob, layout, oracle);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->errors_corrected, 0U);
  EXPECT_EQ(stats->parities_disclosed, 50U + 25U + 13U + 7U);
  EXPECT_EQ(stats->round_trips, 4U);
}

// Every variant on the same 16,384-bit blocks (1000 per QBER level 1..5 %): at most one
// block per level may keep a residual error (>= 99.9 %), the disclosed parities are counted
// exactly, and the modern schedule discloses less than the original one.
TEST(Cascade, VariantsCorrectAndModernLeaksLess) {
  constexpr std::uint32_t kBits = 16'384;
  constexpr int kBlocks = 1000;
  const CascadeVariant variants[] = {CascadeVariant::kOriginal, CascadeVariant::kYan,
                                     CascadeVariant::kModern};
  for (const double q : {0.01, 0.02, 0.03, 0.04, 0.05}) {
    double f[3] = {};
    for (int v = 0; v < 3; ++v) {
      Xoshiro256ss rng(77 + static_cast<std::uint64_t>(q * 1000));  // same blocks per variant
      const CascadeVariant variant = variants[v];
      int failures = 0;
      double leaked = 0;
      for (int b = 0; b < kBlocks; ++b) {
        auto [alice, bob] = noisy_pair(rng, kBits, q);
        const std::size_t injected = alice.hamming_distance(bob);
        const auto seed = seed_bytes(rng);
        const CascadeLayout layout(kBits, cascade_default_passes(variant),
                                   cascade_first_block_size(q, kBits, variant), seed, variant);
        const CascadeResponder responder(alice, layout);
        CountingOracle oracle(responder);
        auto stats = cascade_correct(bob, layout, oracle);
        ASSERT_TRUE(stats.ok()) << stats.error().message;
        ASSERT_EQ(stats->parities_disclosed, oracle.count);
        if (!(bob == alice)) {
          ++failures;
        } else {
          EXPECT_EQ(stats->errors_corrected, injected);
        }
        leaked += static_cast<double>(stats->parities_disclosed);
      }
      f[v] = leaked / (kBlocks * kBits * binary_entropy(q));
      std::printf("cascade variant %d QBER %.0f %%: %d/%d residual, f = %.3f\n", v, 100 * q,
                  failures, kBlocks, f[v]);
      EXPECT_LE(failures, 1) << "variant " << v << " QBER " << q;
    }
    EXPECT_LT(f[2], f[0]) << "QBER " << q;
    EXPECT_LT(f[2], 1.10) << "QBER " << q;
  }
}

TEST(Cascade, LayoutOrdersAreBijectionsForEveryVariant) {
  Xoshiro256ss rng(5);
  for (const CascadeVariant v :
       {CascadeVariant::kOriginal, CascadeVariant::kYan, CascadeVariant::kModern}) {
    for (const std::uint32_t n : {1U, 2U, 63U, 64U, 65U, 1000U, 4099U}) {
      const auto seed = seed_bytes(rng);
      // With 2 BICONF rounds: their random halves are checked like every other pass.
      const CascadeLayout layout(n, cascade_default_passes(v), cascade_first_block_size(0.03, n, v),
                                 seed, v, 2);
      ASSERT_EQ(layout.passes(), cascade_default_passes(v) + 2);
      BitVector key(n);
      for (auto& w : key.mutable_words()) {
        w = rng.next();
      }
      key.clear_tail();
      for (std::uint32_t p = 0; p < layout.passes(); ++p) {
        std::vector<bool> seen(n, false);
        const BitVector permuted = layout.permuted(key, p);
        for (std::uint32_t i = 0; i < n; ++i) {
          const std::uint32_t x = layout.original_index(p, i);
          ASSERT_LT(x, n);
          ASSERT_FALSE(seen[x]);
          seen[x] = true;
          ASSERT_EQ(layout.position(p, x), i);
          ASSERT_EQ(permuted.get(i), key.get(x));
        }
        if (layout.order(p) == CascadePassOrder::kSplit) {
          for (int t = 0; t < 50; ++t) {
            const auto a = static_cast<std::uint32_t>(rng.below(n));
            const auto len = static_cast<std::uint32_t>(1 + rng.below(n - a));
            ASSERT_EQ(layout.split_range_parity(key, p, a, len), permuted.parity_range(a, a + len));
          }
        }
      }
    }
  }
}


// --- BICONF rounds ---

struct BiconfRun {
  CascadeStats stats;
  std::uint64_t oracle_count = 0;
  bool residual = false;
};

// One block of n bits with i.i.d. errors at rate q, reconciled with `passes` Cascade passes of
// `variant` plus `biconf` BICONF rounds. The error pattern and the layout seed depend only on
// `rng`'s state, so two calls with equal generators see the same block.
BiconfRun run_block(Xoshiro256ss rng, std::uint32_t n, double q, CascadeVariant variant,
                    std::uint32_t passes, std::uint32_t biconf) {
  auto [alice, bob] = noisy_pair(rng, n, q);
  const auto seed = seed_bytes(rng);
  const CascadeLayout layout(n, passes, cascade_first_block_size(q, n, variant), seed, variant,
                             biconf);
  const CascadeResponder responder(alice, layout);
  CountingOracle oracle(responder);
  auto stats = cascade_correct(bob, layout, oracle);
  EXPECT_TRUE(stats.ok()) << stats.error().message;
  BiconfRun out;
  if (stats.ok()) {
    out.stats = *stats;
  }
  out.oracle_count = oracle.count;
  out.residual = !(bob == alice);
  return out;
}

TEST(Cascade, BiconfRoundsAreRandomHalvesAfterUnchangedPasses) {
  Xoshiro256ss rng(11);
  const auto seed = seed_bytes(rng);
  constexpr std::uint32_t kN = 5001;
  const CascadeLayout plain(kN, 4, 25, seed, CascadeVariant::kOriginal);
  const CascadeLayout with(kN, 4, 25, seed, CascadeVariant::kOriginal, 3);
  ASSERT_EQ(with.passes(), 7U);
  EXPECT_EQ(with.cascade_passes(), 4U);
  EXPECT_EQ(with.biconf_rounds(), 3U);
  for (std::uint32_t p = 0; p < 4; ++p) {  // the Cascade passes do not move
    ASSERT_EQ(with.block_size(p), plain.block_size(p));
    for (std::uint32_t i = 0; i < kN; i += 7) {
      ASSERT_EQ(with.original_index(p, i), plain.original_index(p, i));
    }
  }
  std::vector<std::vector<bool>> halves;
  for (std::uint32_t p = 4; p < 7; ++p) {
    EXPECT_EQ(with.order(p), CascadePassOrder::kSplit);
    EXPECT_EQ(with.block_size(p), (kN + 1) / 2);
    EXPECT_EQ(with.block_count(p), 2U);
    std::vector<bool> in(kN, false);
    for (std::uint32_t i = 0; i < (kN + 1) / 2; ++i) {
      in[with.original_index(p, i)] = true;
    }
    // A random half: about half of the even indices and of the first quarter are in it.
    std::uint32_t even = 0;
    std::uint32_t first = 0;
    for (std::uint32_t i = 0; i < kN; ++i) {
      even += (in[i] && i % 2 == 0) ? 1 : 0;
      first += (in[i] && i < kN / 4) ? 1 : 0;
    }
    EXPECT_NEAR(even, kN / 4.0, 5 * std::sqrt(kN / 16.0));
    EXPECT_NEAR(first, kN / 8.0, 5 * std::sqrt(kN / 32.0));
    halves.push_back(in);
  }
  EXPECT_NE(halves[0], halves[1]);
  EXPECT_NE(halves[1], halves[2]);
}

// With few Cascade passes residual errors are common; BICONF rounds find most of them. The
// Cascade passes disclose exactly what they disclose without BICONF (same block, same seed),
// and every parity the oracle gave out is counted.
TEST(Cascade, BiconfLowersResidualFrameErrorRate) {
  constexpr std::uint32_t kN = 8192;
  constexpr int kBlocks = 300;
  for (const double q : {0.03, 0.04, 0.05}) {
    for (const CascadeVariant v : {CascadeVariant::kOriginal, CascadeVariant::kModern}) {
      Xoshiro256ss rng(900 + static_cast<std::uint64_t>(q * 1000));
      int residual_plain = 0;
      int residual_biconf = 0;
      for (int b = 0; b < kBlocks; ++b) {
        Xoshiro256ss block_rng(rng.next());
        const BiconfRun plain = run_block(block_rng, kN, q, v, 2, 0);
        const BiconfRun bic = run_block(block_rng, kN, q, v, 2, 8);
        residual_plain += plain.residual ? 1 : 0;
        residual_biconf += bic.residual ? 1 : 0;
        ASSERT_EQ(bic.stats.parities_disclosed, bic.oracle_count);
        ASSERT_EQ(plain.stats.biconf_parities, 0U);
        ASSERT_GE(bic.stats.biconf_parities, 8U);  // at least one parity per round
        ASSERT_EQ(bic.stats.parities_disclosed - bic.stats.biconf_parities,
                  plain.stats.parities_disclosed);
        ASSERT_EQ(bic.stats.errors_corrected - bic.stats.biconf_errors_corrected,
                  plain.stats.errors_corrected);
        if (!plain.residual) {  // nothing left to find: one parity per round
          ASSERT_EQ(bic.stats.biconf_parities, 8U);
          ASSERT_EQ(bic.stats.biconf_errors_corrected, 0U);
        }
      }
      std::printf("BICONF %s QBER %.0f %%: residual %d/%d without, %d/%d with 8 rounds\n",
                  cascade_variant_name(v), 100 * q, residual_plain, kBlocks, residual_biconf,
                  kBlocks);
      EXPECT_GE(residual_plain, kBlocks / 10) << "the setting must leave residual errors";
      EXPECT_LE(10 * residual_biconf, residual_plain) << cascade_variant_name(v) << " " << q;
    }
  }
}

// Known answer: one fixed block, modern Cascade cut to 2 passes (which leaves errors the
// BICONF rounds then find) and 4 BICONF rounds.
TEST(Cascade, BiconfKnownAnswer) {
  Xoshiro256ss rng(2024);
  const BiconfRun r = run_block(rng, 4096, 0.05, CascadeVariant::kModern, 2, 4);
  EXPECT_EQ(r.stats.parities_disclosed, 1217U);
  EXPECT_EQ(r.stats.biconf_parities, 26U);
  EXPECT_EQ(r.stats.errors_corrected, 195U);
  EXPECT_EQ(r.stats.biconf_errors_corrected, 2U);  // one pair Cascade missed
  EXPECT_EQ(r.stats.round_trips, 87U);
  EXPECT_FALSE(r.residual);
  // The first members of the first BICONF subset, from the same seed.
  std::vector<std::uint32_t> first;
  {
    Xoshiro256ss g(2024);
    (void)noisy_pair(g, 4096, 0.05);
    const auto seed = seed_bytes(g);
    const CascadeLayout layout(4096, 2,
                               cascade_first_block_size(0.05, 4096, CascadeVariant::kModern), seed,
                               CascadeVariant::kModern, 4);
    for (std::uint32_t i = 0; i < 6; ++i) {
      first.push_back(layout.original_index(2, i));
    }
  }
  EXPECT_EQ(first, (std::vector<std::uint32_t>{0, 2, 3, 5, 6, 7}));
}

}  // namespace
}  // namespace qkd::core
