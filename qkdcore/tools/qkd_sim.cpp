// qkd-sim: runs an in-process Alice/Bob pair over memory transports and reports what the
// link produced beside what theory expects.
//
//   qkd-sim --blocks 5 --length-km 20
//   qkd-sim --eve-fraction 0.5 --json
//   qkd-sim --sweep-distance 0:100:10 --blocks 2
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "qkd/core/key_length.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/physics.hpp"

namespace {

using qkd::core::BlockResult;
using qkd::core::ChannelParams;
using qkd::core::ProtocolParams;
using qkd::core::Result;

struct Totals {
  std::uint64_t blocks = 0;
  std::uint64_t aborted = 0;
  std::uint64_t pulses = 0;
  std::uint64_t detections = 0;
  std::uint64_t sifted = 0;
  std::uint64_t sample = 0;
  double qber_weighted = 0.0;
  std::uint64_t reconciled = 0;
  std::uint64_t leaked = 0;
  std::uint64_t corrected = 0;
  std::uint64_t secret = 0;
  double simulated_seconds = 0.0;
  double cpu_alice = 0.0;
  double cpu_bob = 0.0;
};

nlohmann::json block_json(const BlockResult& r, double cpu_bob) {
  return {{"block", r.block_id},
          {"aborted", r.aborted},
          {"abort_reason", r.abort_reason},
          {"pulses", r.pulses},
          {"detections", r.detections},
          {"sifted_bits", r.sifted_bits},
          {"sample_bits", r.sample_bits},
          {"qber", r.qber},
          {"reconciled_bits", r.reconciled_bits},
          {"leaked_bits", r.leaked_bits},
          {"cascade_errors_corrected", r.cascade_errors_corrected},
          {"secret_bits", r.secret_bits},
          {"simulated_seconds", r.simulated_seconds},
          {"cpu_seconds_alice", r.cpu_seconds},
          {"cpu_seconds_bob", cpu_bob}};
}

// Runs `blocks` blocks; prints per-block lines unless quiet; returns totals, or an error
// message if an endpoint failed.
Result<Totals> run_link(const ChannelParams& ch, const ProtocolParams& pp, std::uint64_t seed,
                        std::uint64_t blocks, bool print_blocks, nlohmann::json* json_blocks) {
  const std::vector<std::uint8_t> psk(32, 0x5A);  // a simulation: both ends in one process
  auto quantum = qkd::core::make_memory_transport_pair();
  auto classical = qkd::core::make_memory_transport_pair();
  qkd::core::AliceEndpoint alice(ch, pp, psk, seed, *quantum.a, *classical.a);
  qkd::core::BobEndpoint bob(pp, psk, seed + 1, *quantum.b, *classical.b);
  Totals t;
  if (print_blocks) {
    std::printf("%6s %10s %9s %8s %7s %7s %8s %8s %8s  %s\n", "block", "pulses", "detect",
                "sifted", "QBER%", "fixed", "leaked", "secret", "cpu_ms", "note");
  }
  for (std::uint64_t b = 0; b < blocks; ++b) {
    std::optional<Result<BlockResult>> rb;
    std::thread th([&] { rb.emplace(bob.run_block()); });
    auto ra = alice.run_block();
    th.join();
    if (!ra.ok()) {
      return ra.error();
    }
    if (!rb->ok()) {
      return rb->error();
    }
    const BlockResult& r = *ra;
    const double cpu_bob = (*rb)->cpu_seconds;
    ++t.blocks;
    t.aborted += r.aborted ? 1 : 0;
    t.pulses += r.pulses;
    t.detections += r.detections;
    t.sifted += r.sifted_bits;
    t.sample += r.sample_bits;
    t.qber_weighted += r.qber * static_cast<double>(r.sample_bits);
    t.reconciled += r.aborted ? 0 : r.reconciled_bits;
    t.leaked += r.leaked_bits;
    t.corrected += r.aborted ? 0 : r.cascade_errors_corrected;
    t.secret += r.secret_bits;
    t.simulated_seconds += r.simulated_seconds;
    t.cpu_alice += r.cpu_seconds;
    t.cpu_bob += cpu_bob;
    if (print_blocks) {
      std::printf("%6llu %10llu %9llu %8llu %7.3f %7llu %8llu %8llu %8.1f  %s\n",
                  static_cast<unsigned long long>(r.block_id),
                  static_cast<unsigned long long>(r.pulses),
                  static_cast<unsigned long long>(r.detections),
                  static_cast<unsigned long long>(r.sifted_bits), 100.0 * r.qber,
                  static_cast<unsigned long long>(r.cascade_errors_corrected),
                  static_cast<unsigned long long>(r.leaked_bits),
                  static_cast<unsigned long long>(r.secret_bits),
                  1e3 * std::max(r.cpu_seconds, cpu_bob),
                  r.aborted ? ("ABORTED: " + r.abort_reason).c_str() : "");
    }
    if (json_blocks != nullptr) {
      json_blocks->push_back(block_json(r, cpu_bob));
    }
  }
  return t;
}

struct Summary {
  double qber = 0.0;
  double raw_rate = 0.0;
  double sifted_rate = 0.0;
  double secret_rate = 0.0;
  // Cascade leakage (without the verification tags) / n h(e), e = the error rate Cascade
  // actually corrected (the sample estimate is too noisy for this).
  double efficiency = 0.0;
};

Summary summarize(const Totals& t, const ProtocolParams& pp) {
  Summary s;
  s.qber = t.sample > 0 ? t.qber_weighted / static_cast<double>(t.sample) : 0.0;
  if (t.simulated_seconds > 0.0) {
    s.raw_rate = static_cast<double>(t.detections) / t.simulated_seconds;
    s.sifted_rate = static_cast<double>(t.sifted) / t.simulated_seconds;
    s.secret_rate = static_cast<double>(t.secret) / t.simulated_seconds;
  }
  const std::uint64_t good = t.blocks - t.aborted;
  const double h = t.reconciled > 0 ? qkd::core::binary_entropy(
                                         static_cast<double>(t.corrected) /
                                         static_cast<double>(t.reconciled))
                                   : 0.0;
  if (t.reconciled > 0 && h > 0.0 && good > 0) {
    const double cascade_leak =
        static_cast<double>(t.leaked) - static_cast<double>(good * pp.verify_hash_bits);
    s.efficiency = cascade_leak / (static_cast<double>(t.reconciled) * h);
  }
  return s;
}

nlohmann::json theory_json(const qkd::core::ChannelTheory& th, const ChannelParams& ch) {
  return {{"transmittance", th.transmittance},
          {"gain", th.gain},
          {"qber", th.qber},
          {"raw_rate_per_s", th.gain * ch.pulse_rate_hz},
          {"sifted_rate_per_s", th.sifted_per_pulse * ch.pulse_rate_hz},
          {"asymptotic_secret_rate_per_s_f1.16",
           th.sifted_per_pulse * th.secret_fraction(1.16) * ch.pulse_rate_hz}};
}

bool parse_sweep(const std::string& spec, double& a, double& b, double& step) {
  return std::sscanf(spec.c_str(), "%lf:%lf:%lf", &a, &b, &step) == 3 && step > 0.0 && b >= a;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qkd-sim: simulate a BB84 link (single-photon source) and compare with theory"};
  ChannelParams ch;
  ProtocolParams pp;
  std::uint64_t blocks = 5;
  std::uint64_t seed = 1;
  std::int64_t timeout_ms = pp.message_timeout.count();
  bool json = false;
  std::string sweep;
  app.add_option("-n,--blocks", blocks, "number of blocks to run")->capture_default_str();
  app.add_option("--seed", seed, "simulation seed (deterministic channel for a given seed)")
      ->capture_default_str();
  app.add_option("--length-km", ch.length_km, "fiber length [km]")->capture_default_str();
  app.add_option("--loss-db-per-km", ch.loss_db_per_km, "fiber attenuation [dB/km]")
      ->capture_default_str();
  app.add_option("--detector-efficiency", ch.detector_efficiency,
                 "Bob's detector and optics efficiency [0..1]")
      ->capture_default_str();
  app.add_option("--dark-count-prob", ch.dark_count_prob,
                 "dark-count probability per pulse Y0 [0..0.5]")
      ->capture_default_str();
  app.add_option("--misalignment", ch.misalignment, "optical error e_det [0..0.5]")
      ->capture_default_str();
  app.add_option("--eve-fraction", ch.eve_intercept_fraction,
                 "intercept-resend on this fraction of pulses [0..1]")
      ->capture_default_str();
  app.add_option("--pulse-rate-hz", ch.pulse_rate_hz, "source repetition rate [Hz]")
      ->capture_default_str();
  app.add_option("--pulses", pp.pulses_per_block, "pulses per block")->capture_default_str();
  app.add_option("--sample-fraction", pp.sample_fraction,
                 "fraction of sifted bits disclosed for QBER estimation (0..1)")
      ->capture_default_str();
  app.add_option("--qber-abort", pp.qber_abort, "abort a block above this QBER (0..0.5]")
      ->capture_default_str();
  app.add_option("--cascade-passes", pp.cascade_passes, "Cascade passes [1..16]")
      ->capture_default_str();
  app.add_option("--verify-hash-bits", pp.verify_hash_bits,
                 "verification tag length [bits, multiple of 8, 32..256]")
      ->capture_default_str();
  app.add_option("--safety-margin", pp.safety_margin,
                 "extra fraction of the reconciled length removed [0..1)")
      ->capture_default_str();
  app.add_option("--timeout-ms", timeout_ms, "per-message timeout [ms]")->capture_default_str();
  app.add_option("--sweep-distance", sweep,
                 "run --blocks blocks at each length a:b:step [km] and print one row each");
  app.add_flag("--json", json, "machine-readable output (JSON on stdout)");
  CLI11_PARSE(app, argc, argv);
  pp.message_timeout = std::chrono::milliseconds(timeout_ms);

  if (auto s = qkd::core::validate(ch); !s.ok()) {
    std::fprintf(stderr, "qkd-sim: %s\n", s.error().message.c_str());
    return 2;
  }
  if (auto s = qkd::core::validate(pp); !s.ok()) {
    std::fprintf(stderr, "qkd-sim: %s\n", s.error().message.c_str());
    return 2;
  }

  std::vector<double> lengths;
  if (!sweep.empty()) {
    double a = 0;
    double b = 0;
    double step = 0;
    if (!parse_sweep(sweep, a, b, step)) {
      std::fprintf(stderr, "qkd-sim: --sweep-distance wants a:b:step with step > 0, b >= a\n");
      return 2;
    }
    for (double l = a; l <= b + 1e-9; l += step) {
      lengths.push_back(l);
    }
  } else {
    lengths.push_back(ch.length_km);
  }

  nlohmann::json out = nlohmann::json::array();
  if (!json && !sweep.empty()) {
    std::printf("%8s %7s %7s %7s %12s %12s %12s %12s %12s\n", "L_km", "QBER%", "theory%",
                "aborted", "raw/s", "theory_raw/s", "sifted/s", "secret/s", "theory_sec/s");
  }
  for (const double length : lengths) {
    ch.length_km = length;
    const qkd::core::ChannelTheory th = qkd::core::channel_theory(ch);
    nlohmann::json jblocks = nlohmann::json::array();
    const bool print_blocks = !json && sweep.empty();
    auto totals = run_link(ch, pp, seed, blocks, print_blocks, json ? &jblocks : nullptr);
    if (!totals.ok()) {
      std::fprintf(stderr, "qkd-sim: link failed at %.1f km: %s\n", length,
                   totals.error().message.c_str());
      return 1;
    }
    const Totals& t = *totals;
    const Summary s = summarize(t, pp);
    const double th_secret = th.sifted_per_pulse * th.secret_fraction(1.16) * ch.pulse_rate_hz;
    if (json) {
      out.push_back({{"length_km", length},
                     {"channel",
                      {{"loss_db_per_km", ch.loss_db_per_km},
                       {"detector_efficiency", ch.detector_efficiency},
                       {"dark_count_prob", ch.dark_count_prob},
                       {"misalignment", ch.misalignment},
                       {"eve_intercept_fraction", ch.eve_intercept_fraction},
                       {"pulse_rate_hz", ch.pulse_rate_hz}}},
                     {"blocks", jblocks},
                     {"total",
                      {{"blocks", t.blocks},
                       {"aborted", t.aborted},
                       {"pulses", t.pulses},
                       {"detections", t.detections},
                       {"sifted_bits", t.sifted},
                       {"qber", s.qber},
                       {"leaked_bits", t.leaked},
                       {"secret_bits", t.secret},
                       {"simulated_seconds", t.simulated_seconds},
                       {"raw_rate_per_s", s.raw_rate},
                       {"sifted_rate_per_s", s.sifted_rate},
                       {"secret_rate_per_s", s.secret_rate},
                       {"cascade_efficiency", s.efficiency},
                       {"cpu_seconds_alice", t.cpu_alice},
                       {"cpu_seconds_bob", t.cpu_bob}}},
                     {"theory", theory_json(th, ch)}});
    } else if (!sweep.empty()) {
      std::printf("%8.1f %7.3f %7.3f %7llu %12.4g %12.4g %12.4g %12.4g %12.4g\n", length,
                  100 * s.qber, 100 * th.qber, static_cast<unsigned long long>(t.aborted),
                  s.raw_rate, th.gain * ch.pulse_rate_hz, s.sifted_rate, s.secret_rate,
                  th_secret);
    } else {
      std::printf("\ntotal: %llu blocks (%llu aborted), %llu pulses, %llu detections, %llu sifted, "
                  "%llu leaked, %llu secret bits, %.4g s simulated, cpu %.3f s Alice / %.3f s Bob\n",
                  static_cast<unsigned long long>(t.blocks),
                  static_cast<unsigned long long>(t.aborted),
                  static_cast<unsigned long long>(t.pulses),
                  static_cast<unsigned long long>(t.detections),
                  static_cast<unsigned long long>(t.sifted),
                  static_cast<unsigned long long>(t.leaked),
                  static_cast<unsigned long long>(t.secret), t.simulated_seconds, t.cpu_alice,
                  t.cpu_bob);
      std::printf("%-28s %14s %14s\n", "", "measured", "theory");
      std::printf("%-28s %14.6g %14.6g\n", "gain (detections/pulse)",
                  t.pulses ? static_cast<double>(t.detections) / static_cast<double>(t.pulses) : 0.0,
                  th.gain);
      std::printf("%-28s %14.4f %14.4f\n", "QBER [%]", 100 * s.qber, 100 * th.qber);
      std::printf("%-28s %14.6g %14.6g\n", "raw key rate [bit/s]", s.raw_rate,
                  th.gain * ch.pulse_rate_hz);
      std::printf("%-28s %14.6g %14.6g\n", "sifted key rate [bit/s]", s.sifted_rate,
                  th.sifted_per_pulse * ch.pulse_rate_hz);
      std::printf("%-28s %14.6g %14.6g\n", "secret key rate [bit/s]", s.secret_rate, th_secret);
      std::printf("%-28s %14.4f %14s\n", "Cascade efficiency f", s.efficiency, "1.16 (assumed)");
      std::printf("(theory secret rate: ideal single-photon source, asymptotic, "
                  "q/2 * gain * (1 - f h(e) - h(e)) with f = 1.16; the measured rate also\n"
                  " removes the safety margin %.3g and the verification tag.)\n",
                  pp.safety_margin);
    }
  }
  if (json) {
    std::printf("%s\n", (sweep.empty() ? out[0] : out).dump(2).c_str());
  }
  return 0;
}
