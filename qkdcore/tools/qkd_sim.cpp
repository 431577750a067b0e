// qkd-sim: runs an in-process Alice/Bob pair over memory transports and reports what the
// link produced beside what theory expects.
//
//   qkd-sim --blocks 5 --length-km 20
//   qkd-sim --eve-fraction 0.5 --json
//   qkd-sim --source wcp --p-decoy 0.2 --p-vacuum 0.1 --bound decoy --duration 1
//   qkd-sim --sweep distance=0:100:10 --blocks 2 --csv rate.csv --plot rate.svg
//   qkd-sim --sweep eve=0:1:0.1 --csv qber.csv --plot qber.png
//   qkd-sim --theory --gys            (analytic calculator: thresholds, largest distances)
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
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
  std::uint64_t secret = 0;  // privacy-amplification output (what the bounds give)
  std::uint64_t auth = 0;    // of which paid back to Wegman-Carter authentication
  std::uint64_t net = 0;     // secret - auth: the key handed to users
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
          {"pa_output_bits", r.secret_bits + r.auth_bits_consumed},
          {"auth_bits_consumed", r.auth_bits_consumed},
          {"auth_pad_bits_used", r.auth_pad_bits_used},
          {"simulated_seconds", r.simulated_seconds},
          {"cpu_seconds_alice", r.cpu_seconds},
          {"cpu_seconds_bob", cpu_bob},
          {"key_bound", r.key_bound},
          {"qber_upper", r.qber_upper},
          {"y1_lower", r.y1_lower},
          {"e1_upper", r.e1_upper},
          {"single_photon_bits_lower", r.single_photon_bits_lower},
          {"intensity",
           {{{"sifted", r.intensity[0].sifted}, {"errors", r.intensity[0].errors},
             {"disclosed", r.intensity[0].disclosed}, {"gain", r.intensity[0].gain}},
            {{"sifted", r.intensity[1].sifted}, {"errors", r.intensity[1].errors},
             {"disclosed", r.intensity[1].disclosed}, {"gain", r.intensity[1].gain}},
            {{"sifted", r.intensity[2].sifted}, {"errors", r.intensity[2].errors},
             {"disclosed", r.intensity[2].disclosed}, {"gain", r.intensity[2].gain}}}}};
}

// Runs `blocks` blocks; prints per-block lines unless quiet; returns totals, or an error
// message if an endpoint failed.
// Progress bar on stderr (only when stderr is a terminal).
struct Progress {
  bool enabled = false;
  std::uint64_t total = 0;
  std::uint64_t done = 0;
  std::string label;
  void step() {
    ++done;
    if (!enabled || total < 2) {
      return;
    }
    const int width = 40;
    const int fill = static_cast<int>(static_cast<double>(done) / static_cast<double>(total) * width);
    std::fprintf(stderr, "\r%-16s [%s%s] %llu/%llu", label.c_str(), std::string(fill, '#').c_str(),
                 std::string(width - fill, '.').c_str(), static_cast<unsigned long long>(done),
                 static_cast<unsigned long long>(total));
    if (done == total) {
      std::fprintf(stderr, "\n");
    }
    std::fflush(stderr);
  }
};

struct BlockExtra {  // decoy estimates summed over the non-aborted blocks
  double y1_lower = 0.0;
  double e1_upper = 0.0;
  std::uint64_t good = 0;
  std::string bound;
};

Result<Totals> run_link(const ChannelParams& ch, const ProtocolParams& pp, std::uint64_t seed,
                        std::uint64_t blocks, bool print_blocks, nlohmann::json* json_blocks,
                        Progress* progress = nullptr, BlockExtra* extra = nullptr) {
  const std::vector<std::uint8_t> psk(32, 0x5A);  // a simulation: both ends in one process
  auto quantum = qkd::core::make_memory_transport_pair();
  auto classical = qkd::core::make_memory_transport_pair();
  qkd::core::AliceEndpoint alice(ch, pp, psk, seed, *quantum.a, *classical.a);
  qkd::core::BobEndpoint bob(pp, psk, seed + 1, *quantum.b, *classical.b);
  Totals t;
  if (print_blocks) {
    std::printf("%6s %10s %9s %8s %7s %7s %8s %8s %7s %8s %8s  %s\n", "block", "pulses",
                "detect", "sifted", "QBER%", "fixed", "leaked", "secret", "auth", "net",
                "cpu_ms", "note");
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
    t.secret += r.secret_bits + r.auth_bits_consumed;
    t.auth += r.auth_bits_consumed;
    t.net += r.secret_bits;
    t.simulated_seconds += r.simulated_seconds;
    t.cpu_alice += r.cpu_seconds;
    t.cpu_bob += cpu_bob;
    if (print_blocks) {
      std::printf("%6llu %10llu %9llu %8llu %7.3f %7llu %8llu %8llu %7llu %8llu %8.1f  %s\n",
                  static_cast<unsigned long long>(r.block_id),
                  static_cast<unsigned long long>(r.pulses),
                  static_cast<unsigned long long>(r.detections),
                  static_cast<unsigned long long>(r.sifted_bits), 100.0 * r.qber,
                  static_cast<unsigned long long>(r.cascade_errors_corrected),
                  static_cast<unsigned long long>(r.leaked_bits),
                  static_cast<unsigned long long>(r.secret_bits + r.auth_bits_consumed),
                  static_cast<unsigned long long>(r.auth_bits_consumed),
                  static_cast<unsigned long long>(r.secret_bits),
                  1e3 * std::max(r.cpu_seconds, cpu_bob),
                  r.aborted ? ("ABORTED: " + r.abort_reason).c_str() : "");
    }
    if (json_blocks != nullptr) {
      json_blocks->push_back(block_json(r, cpu_bob));
    }
    if (extra != nullptr) {
      extra->bound = r.key_bound;
      if (!r.aborted) {
        extra->y1_lower += r.y1_lower;
        extra->e1_upper += r.e1_upper;
        ++extra->good;
      }
    }
    if (progress != nullptr) {
      progress->step();
    }
  }
  if (extra != nullptr && extra->good > 0) {
    extra->y1_lower /= static_cast<double>(extra->good);
    extra->e1_upper /= static_cast<double>(extra->good);
  }
  return t;
}

struct Summary {
  double qber = 0.0;
  double raw_rate = 0.0;
  double sifted_rate = 0.0;
  double secret_rate = 0.0;      // privacy-amplification output per simulated second
  double net_secret_rate = 0.0;  // after authentication
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
    s.net_secret_rate = static_cast<double>(t.net) / t.simulated_seconds;
  }
  const std::uint64_t good = t.blocks - t.aborted;
  const double h = t.reconciled > 0 ? qkd::core::binary_entropy(
                                         static_cast<double>(t.corrected) /
                                         static_cast<double>(t.reconciled))
                                   : 0.0;
  if (t.reconciled > 0 && h > 0.0 && good > 0) {
    const double cascade_leak = static_cast<double>(t.leaked) -
                                static_cast<double>(good * qkd::core::verify_tag_bits(pp));
    s.efficiency = cascade_leak / (static_cast<double>(t.reconciled) * h);
  }
  return s;
}

// The theoretical secret rate per pulse matching the configured source (asymptotic,
// reconciliation inefficiency f), and its name.
struct MatchingTheory {
  double rate = 0.0;
  const char* name = "";
};
MatchingTheory matching_theory_ideal_detector(const ChannelParams& ch, double f, double z);
// With dead time or afterpulsing the asymptotic formulas (which know neither) are scaled by
// the fraction of real detections that survive, (1 - a) gain' / Q (channel_theory); the
// afterpulses' extra errors are not in them (the measured QBER shows them).
MatchingTheory matching_theory(const ChannelParams& ch, double f, double z) {
  MatchingTheory mt = matching_theory_ideal_detector(ch, f, z);
  const qkd::core::ChannelTheory t = qkd::core::channel_theory(ch);
  if ((t.dead_pulses > 0 || t.afterpulse_window_pulses > 0) && t.live_gain > 0.0) {
    mt.rate *= (1.0 - t.afterpulse_fraction) * t.gain / t.live_gain;
    if (ch.source == qkd::core::SourceKind::kSinglePhoton) {
      mt.name = "single photons x detector duty";
    } else if (ch.prob_decoy > 0.0 && ch.prob_vacuum > 0.0) {
      mt.name = "vacuum+weak decoy x detector duty";
    } else {
      mt.name = "GLLP no decoys x detector duty";
    }
  }
  return mt;
}
// Sifted bits per detection: both ends chose the same basis, Z with probability z.
double sifting_factor(double z) { return z * z + (1.0 - z) * (1.0 - z); }

// `z` is Alice's and Bob's probability of the Z basis: above 0.5 the key is the Z-Z
// detections only (z^2 of them), else all matching ones (1/2). An intercept-resend Eve on a
// fraction p of the pulses (guessing her basis evenly) adds p (1 - 2 e_det) / 4 to every
// error rate the formulas use: her wrong guesses, half of her pulses, give Bob a random
// bit. (An Eve favouring Z, eve_z_basis_prob, is not modelled here.)
MatchingTheory matching_theory_ideal_detector(const ChannelParams& ch, double f, double z) {
  qkd::core::LinkModel m = qkd::core::link_model_of(ch, f, z > 0.5 ? z * z : 0.5);
  m.e_det += ch.eve_intercept_fraction * (1.0 - 2.0 * m.e_det) / 4.0;
  if (ch.source == qkd::core::SourceKind::kSinglePhoton) {
    return {std::max(0.0, qkd::core::rate_single_photon(m, ch.length_km)), "single photons"};
  }
  const double p_signal = 1.0 - ch.prob_decoy - ch.prob_vacuum;
  if (ch.prob_decoy > 0.0 && ch.prob_vacuum > 0.0) {
    return {p_signal * std::max(0.0, qkd::core::rate_vacuum_weak_decoy(m, ch.length_km,
                                                                       ch.mu_signal, ch.mu_decoy)),
            "vacuum+weak decoy"};
  }
  return {p_signal * std::max(0.0, qkd::core::rate_no_decoy(m, ch.length_km, ch.mu_signal)),
          "GLLP no decoys"};
}

struct SweepSpec {
  std::string param;  // distance, eve, dark, mu
  double a = 0.0;
  double b = 0.0;
  double step = 0.0;
};

bool parse_sweep(const std::string& spec, SweepSpec& out) {
  const auto eq = spec.find('=');
  std::string range = spec;
  out.param = "distance";
  if (eq != std::string::npos) {
    out.param = spec.substr(0, eq);
    range = spec.substr(eq + 1);
  }
  if (out.param != "distance" && out.param != "eve" && out.param != "dark" && out.param != "mu") {
    return false;
  }
  return std::sscanf(range.c_str(), "%lf:%lf:%lf", &out.a, &out.b, &out.step) == 3 &&
         out.step > 0.0 && out.b >= out.a;
}

void apply_sweep(ChannelParams& ch, const std::string& param, double v) {
  if (param == "distance") {
    ch.length_km = v;
  } else if (param == "eve") {
    ch.eve_intercept_fraction = v;
  } else if (param == "dark") {
    ch.dark_count_prob = v;
  } else if (param == "mu") {
    ch.mu_signal = v;
  }
}

const char* kCsvHeader =
    "param,value,blocks,aborted,pulses,qber,qber_theory,gain,gain_theory,secret_bits,"
    "secret_per_pulse,theory_per_pulse,infinite_decoy_per_pulse,single_photon_per_pulse,"
    "plob_per_pulse,secret_rate_per_s,y1_lower,e1_upper,f,bound";

// Runs gnuplot on `script`; returns false (with a message) when gnuplot is missing.
bool run_gnuplot(const std::string& script) {
  FILE* gp = popen("gnuplot 2>&1", "w");
  if (gp == nullptr) {
    std::fprintf(stderr, "qkd-sim: cannot start gnuplot (install gnuplot-nox)\n");
    return false;
  }
  std::fputs(script.c_str(), gp);
  const int rc = pclose(gp);
  if (rc != 0) {
    std::fprintf(stderr, "qkd-sim: gnuplot failed (exit %d); is gnuplot-nox installed?\n", rc);
    return false;
  }
  return true;
}

std::string terminal_for(const std::string& file) {
  if (file.size() > 4 && file.substr(file.size() - 4) == ".png") {
    return "set terminal pngcairo size 1000,650 noenhanced\n";
  }
  return "set terminal svg size 1000,650 dynamic noenhanced\n";
}

bool plot_sweep(const std::string& csv, const std::string& out, const std::string& param) {
  std::string sc = terminal_for(out) + "set output '" + out + "'\nset datafile separator ','\n"
                   "set key outside right top\nset grid\n";
  if (param == "eve") {
    sc += "set xlabel \"Eve's intercept-resend fraction\"\nset ylabel 'QBER [%]'\n"
          "set title 'QBER against the intercept-resend fraction'\n"
          "plot '" + csv + "' skip 1 using 2:($6*100) with points pt 7 title 'simulated', '' "
          "skip 1 using 2:($7*100) with lines lw 2 title 'theory (+p/4)', 11 with lines dt 2 "
          "title 'Shor-Preskill 11 %'\n";
  } else {
    const std::string xl = param == "distance" ? "fiber length [km]"
                           : param == "dark"   ? "dark-count probability per pulse"
                                               : "signal mean photon number mu";
    sc += "set xlabel '" + xl + "'\nset ylabel 'secret bits per pulse'\nset logscale y\n"
          "set format y '%.0e'\nset title 'Secret key rate'\n"
          "plot '" + csv + "' skip 1 using 2:($11>0?$11:1/0) with points pt 7 title 'simulated', "
          "'' skip 1 using 2:($12>0?$12:1/0) with lines lw 2 title 'matching asymptotic formula', "
          "'' skip 1 using 2:($13>0?$13:1/0) with lines dt 2 title 'infinite decoys', "
          "'' skip 1 using 2:($14>0?$14:1/0) with lines dt 3 title 'ideal single photons', "
          "'' skip 1 using 2:($15>0?$15:1/0) with lines lw 2 dt 4 title 'PLOB bound'\n";
  }
  return run_gnuplot(sc);
}

// --theory: the analytic calculator for the configured link (or --gys).
int run_theory(const ChannelParams& ch, double f, double nu, const std::string& csv_path,
               const std::string& plot_path, bool json) {
  const qkd::core::LinkModel m = qkd::core::link_model_of(ch, f, 0.5);
  using qkd::core::TheoryCurve;
  const TheoryCurve curves[] = {TheoryCurve::kInfiniteDecoy, TheoryCurve::kVacuumWeakDecoy,
                                TheoryCurve::kNoDecoy, TheoryCurve::kSinglePhoton};
  nlohmann::json j;
  j["model"] = {{"loss_db_per_km", m.loss_db_per_km}, {"eta_bob", m.eta_bob},
                {"insertion_loss_db", m.insertion_loss_db}, {"y0", m.y0},
                {"e_det", m.e_det}, {"f", m.f}, {"q", m.q}, {"nu", nu}};
  j["qber_threshold_shor_preskill"] = qkd::core::qber_threshold(1.0);
  j["qber_threshold_f"] = qkd::core::qber_threshold(m.f);
  double longest = 0.0;
  for (TheoryCurve c : curves) {
    const double d = qkd::core::max_distance(m, c, nu);
    longest = std::max(longest, d);
    const double mid = 0.5 * d;
    j["max_distance_km"][qkd::core::theory_curve_name(c)] = d;
    j["optimal_mu_at_half_max"][qkd::core::theory_curve_name(c)] =
        qkd::core::optimal_rate(m, c, mid, nu).mu;
  }
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("model: alpha %.3g dB/km, eta_Bob %.3g, insertion %.3g dB, Y0 %.3g, e_det %.3g, "
                "f %.3g, q %.3g, weak decoy nu %.3g\n",
                m.loss_db_per_km, m.eta_bob, m.insertion_loss_db, m.y0, m.e_det, m.f, m.q, nu);
    std::printf("QBER threshold: %.2f %% (Shor-Preskill, f = 1), %.2f %% (f = %.3g)\n",
                100 * qkd::core::qber_threshold(1.0), 100 * qkd::core::qber_threshold(m.f), m.f);
    std::printf("%-26s %16s %22s\n", "curve (mu optimised)", "largest dist km", "optimal mu at half");
    for (TheoryCurve c : curves) {
      std::printf("%-26s %16.1f %22.4g\n", qkd::core::theory_curve_name(c),
                  j["max_distance_km"][qkd::core::theory_curve_name(c)].get<double>(),
                  j["optimal_mu_at_half_max"][qkd::core::theory_curve_name(c)].get<double>());
    }
  }
  if (!csv_path.empty()) {
    std::ofstream out(csv_path);
    out << "length_km,infinite_decoy,vacuum_weak_decoy,no_decoy,single_photon,plob,mu_infinite\n";
    for (double l = 0.0; l <= longest * 1.1 + 1e-9; l += std::max(1.0, longest / 100.0)) {
      const auto inf = qkd::core::optimal_rate(m, TheoryCurve::kInfiniteDecoy, l, nu);
      out << l << ',' << inf.rate << ','
          << qkd::core::optimal_rate(m, TheoryCurve::kVacuumWeakDecoy, l, nu).rate << ','
          << qkd::core::optimal_rate(m, TheoryCurve::kNoDecoy, l, nu).rate << ','
          << qkd::core::optimal_rate(m, TheoryCurve::kSinglePhoton, l, nu).rate << ','
          << qkd::core::plob_bound(m.line_eta(l)) << ',' << inf.mu << '\n';
    }
    out.close();
    if (!out) {
      std::fprintf(stderr, "qkd-sim: cannot write %s\n", csv_path.c_str());
      return 1;
    }
    if (!plot_path.empty()) {
      const std::string d = "'" + csv_path + "' skip 1 using 1:";
      const std::string sc =
          terminal_for(plot_path) + "set output '" + plot_path +
          "'\nset datafile separator ','\nset key outside right top\nset grid\nset logscale y\n"
          "set format y '%.0e'\nset xlabel 'fiber length [km]'\n"
          "set ylabel 'secret bits per pulse'\nset title 'Asymptotic key rates (mu optimised)'\n"
          "plot " + d + "($2>0?$2:1/0) with lines lw 2 title 'GLLP infinite decoys', " + d +
          "($3>0?$3:1/0) with lines lw 2 title 'vacuum + weak decoy', " + d +
          "($4>0?$4:1/0) with lines lw 2 title 'GLLP no decoys', " + d +
          "($5>0?$5:1/0) with lines lw 2 title 'ideal single photons', " + d +
          "($6>0?$6:1/0) with lines lw 2 dt 4 title 'PLOB bound'\n";
      if (!run_gnuplot(sc)) {
        return 1;
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qkd-sim: simulate a BB84 link (single-photon or weak coherent source with decoy "
               "states, eavesdroppers) and compare with theory"};
  ChannelParams ch;
  ProtocolParams pp;
  std::uint64_t blocks = 5;
  std::uint64_t seed = 1;
  std::int64_t timeout_ms = pp.message_timeout.count();
  bool json = false;
  std::string sweep_distance;
  std::string sweep;
  std::string source = "single";
  std::string bound = "asymptotic";
  double duration_s = 0.0;
  double total_pulses = 0.0;
  std::string csv_path;
  std::string plot_path;
  bool theory = false;
  bool gys = false;
  double theory_f = 1.22;
  bool no_progress = false;
  app.add_option("-n,--blocks", blocks, "number of blocks to run")->capture_default_str();
  app.add_option("--seed", seed, "simulation seed (deterministic channel for a given seed)")
      ->capture_default_str();
  app.add_option("--duration", duration_s,
                 "run for this much simulated time [s] instead of --blocks (blocks of --pulses)");
  app.add_option("--total-pulses", total_pulses,
                 "run this many pulses in total instead of --blocks (rounded up to blocks)");
  app.add_option("--length-km", ch.length_km, "fiber length [km]")->capture_default_str();
  app.add_option("--loss-db-per-km", ch.loss_db_per_km, "fiber attenuation [dB/km]")
      ->capture_default_str();
  app.add_option("--insertion-loss-db", ch.insertion_loss_db,
                 "extra insertion loss at Bob (connectors, optics) [dB]")
      ->capture_default_str();
  app.add_option("--detector-efficiency", ch.detector_efficiency,
                 "Bob's detector and optics efficiency [0..1]")
      ->capture_default_str();
  app.add_option("--dark-count-prob", ch.dark_count_prob,
                 "dark-count probability per pulse Y0 [0..0.5]")
      ->capture_default_str();
  app.add_option("--misalignment", ch.misalignment, "optical error e_det [0..0.5]")
      ->capture_default_str();
  app.add_option("--source", source,
                 "photon source: 'single' (ideal single photons) or 'wcp' (weak coherent "
                 "pulses, Poisson photon number, optional decoys); the KME configuration's "
                 "'single_photon' and 'weak_coherent' are taken too")
      ->capture_default_str();
  app.add_option("--mu", ch.mu_signal, "signal mean photon number per pulse (wcp) [photons]")
      ->capture_default_str();
  app.add_option("--nu", ch.mu_decoy, "weak decoy mean photon number (wcp) [photons]")
      ->capture_default_str();
  app.add_option("--mu-vacuum", ch.mu_vacuum,
                 "vacuum decoy mean photon number (wcp; 0 = true vacuum) [photons]")
      ->capture_default_str();
  app.add_option("--p-decoy", ch.prob_decoy, "probability of a weak decoy pulse [0..1)")
      ->capture_default_str();
  app.add_option("--p-vacuum", ch.prob_vacuum, "probability of a vacuum pulse [0..1)")
      ->capture_default_str();
  app.add_option("--eve-fraction", ch.eve_intercept_fraction,
                 "intercept-resend on this fraction of pulses [0..1]")
      ->capture_default_str();
  app.add_option("--eve-z-basis-prob", ch.eve_z_basis_prob,
                 "probability that Eve measures an intercepted photon in Z [0..1] (0.5: "
                 "either basis; 1: the attack on a biased basis choice)")
      ->capture_default_str();
  app.add_flag("--eve-pns", ch.eve_photon_number_splitting,
               "photon-number-splitting eavesdropper on multi-photon pulses (wcp)");
  app.add_flag("--fiber-cut", ch.fiber_cut, "the fiber is cut: only dark counts reach Bob");
  app.add_option("--pulse-rate-hz", ch.pulse_rate_hz, "source repetition rate [Hz]")
      ->capture_default_str();
  app.add_option("--dead-time-ns", ch.dead_time_ns,
                 "detector dead time after each click [ns]; blinds ceil(dead time x pulse "
                 "rate) pulses (non-paralyzable); 0 = none")
      ->capture_default_str();
  app.add_option("--afterpulse-prob", ch.afterpulse_prob,
                 "probability that a click causes an afterpulse (a false click with a random "
                 "result) [0..0.5]; 0 = none")
      ->capture_default_str();
  app.add_option("--afterpulse-window-ns", ch.afterpulse_window_ns,
                 "afterpulses fall uniformly within this window after the dead time [ns]")
      ->capture_default_str();
  app.add_option("--pulses", pp.pulses_per_block, "pulses per block")->capture_default_str();
  app.add_option("--sample-fraction", pp.sample_fraction,
                 "fraction of the signal key-basis sifted bits disclosed for QBER estimation (0..1)")
      ->capture_default_str();
  app.add_option("--qber-abort", pp.qber_abort,
                 "abort a block when the QBER's upper confidence bound is above this (0..0.5]")
      ->capture_default_str();
  app.add_option("--z-basis-prob", pp.z_basis_prob,
                 "probability of the Z basis for Alice and Bob [0.5..1) (0.5 = standard BB84; "
                 "above: efficient BB84, key from Z)")
      ->capture_default_str();
  app.add_option("--bound", bound,
                 "key-length bound: asymptotic (GLLP), decoy (vacuum+weak, asymptotic), finite "
                 "(Tomamichel 2012), finite-decoy (Lim 2014), bbbss92, slutsky98")
      ->capture_default_str();
  app.add_option("--eps-sec", pp.epsilon_sec, "secrecy parameter of the finite-key bounds")
      ->capture_default_str();
  app.add_option("--eps-cor", pp.epsilon_cor, "correctness parameter of the finite-key bounds")
      ->capture_default_str();
  app.add_option("--confidence-sd", pp.confidence_sd,
                 "c: standard deviations for the QBER upper bound (abort) and the BBBSS92 / "
                 "Slutsky98 defense functions [sd]")
      ->capture_default_str();
  app.add_option("--cascade-passes", pp.cascade_passes,
                 "Cascade passes [1..16]; 0 = the variant's default (original 4, yan/modern 16)")
      ->capture_default_str();
  std::string cascade = qkd::core::cascade_variant_name(pp.cascade_variant);
  app.add_option("--cascade", cascade,
                 "Cascade block schedule: original (Brassard-Salvail), yan, modern "
                 "(Martinez-Mateo et al. 2015)")
      ->capture_default_str();
  app.add_option("--biconf", pp.cascade_biconf_rounds,
                 "BICONF rounds after the Cascade passes [0..64]: each compares the parity "
                 "of a random half of the key and bisects on a mismatch")
      ->capture_default_str();
  app.add_option("--verify-hash-bits", pp.verify_hash_bits,
                 "verification tag length [bits]; 0 = ceil(log2(1/eps-cor)), else at least "
                 "that, <= 256")
      ->capture_default_str();
  app.add_option("--safety-margin", pp.safety_margin,
                 "extra fraction of the reconciled length removed [0..1)")
      ->capture_default_str();
  app.add_option("--timeout-ms", timeout_ms, "per-message timeout [ms]")->capture_default_str();
  std::string auth = "wegman-carter";
  app.add_option("--auth", auth,
                 "classical-message authentication: wegman-carter (one-time-pad tags paid from "
                 "the key; 'secret' columns are the privacy-amplification output, 'net' what "
                 "remains) or hmac (no key cost, computational)")
      ->capture_default_str();
  app.add_option("--auth-tag-bits", pp.auth_tag_bits, "Wegman-Carter tag length [64 or 128 bits]")
      ->capture_default_str();
  app.add_flag("--auth-every-message", pp.auth_every_message,
               "Wegman-Carter: tag every classical message (the earlier scheme) instead of "
               "the transcript at 3 checkpoints per block");
  app.add_option("--auth-refresh-blocks", pp.auth_key_refresh_blocks,
                 "renew the Wegman-Carter hash keys from the key every this many blocks")
      ->capture_default_str();
  app.add_option("--sweep", sweep,
                 "sweep PARAM=a:b:step, PARAM one of distance [km], eve [fraction], dark "
                 "[probability per pulse], mu [photons]; one row per value");
  app.add_option("--sweep-distance", sweep_distance, "same as --sweep distance=a:b:step [km]");
  app.add_option("--csv", csv_path, "write the sweep (or --theory curves) as CSV to this file");
  app.add_option("--plot", plot_path,
                 "draw the sweep or --theory curves with gnuplot to this .svg or .png file "
                 "(needs --csv; distance/mu/dark sweeps: key rate beside the theory and PLOB; "
                 "eve sweep: QBER)");
  app.add_flag("--theory", theory,
               "print the analytic calculator (QBER thresholds, largest distances with "
               "optimised mu) for this link and exit");
  app.add_flag("--gys", gys,
               "use the standard parameter set of Gobby-Yuan-Shields 2004 (0.21 dB/km, "
               "eta_Bob 4.5 %, Y0 1.7e-6, e_det 3.3 %)");
  app.add_option("--theory-f", theory_f, "reconciliation inefficiency f for --theory")
      ->capture_default_str();
  app.add_option("--theory-nu", ch.mu_decoy, "weak decoy nu for --theory [photons] (default 0.05)");
  app.add_flag("--no-progress", no_progress, "no progress bar on stderr");
  app.add_flag("--json", json, "machine-readable output (JSON on stdout)");
  CLI11_PARSE(app, argc, argv);
  pp.message_timeout = std::chrono::milliseconds(timeout_ms);

  if (gys) {
    ch.loss_db_per_km = 0.21;
    ch.detector_efficiency = 0.045;
    ch.dark_count_prob = 1.7e-6;
    ch.misalignment = 0.033;
  }
  if (theory) {
    // The headline vacuum + weak decoy figure uses nu = 0.05 unless told otherwise.
    const bool nu_given = app.count("--nu") + app.count("--theory-nu") > 0;
    return run_theory(ch, theory_f, nu_given ? ch.mu_decoy : 0.05, csv_path, plot_path, json);
  }
  if (source == "wcp" || source == "weak_coherent") {
    ch.source = qkd::core::SourceKind::kWeakCoherent;
  } else if (source != "single" && source != "single_photon") {
    std::fprintf(stderr, "qkd-sim: --source must be 'single' or 'wcp'\n");
    return 2;
  }
  if (auto b = qkd::core::parse_key_bound(bound)) {
    pp.key_bound = *b;
  } else {
    std::fprintf(stderr, "qkd-sim: unknown --bound '%s'\n", bound.c_str());
    return 2;
  }
  if (auto v = qkd::core::parse_cascade_variant(cascade)) {
    pp.cascade_variant = *v;
  } else {
    std::fprintf(stderr, "qkd-sim: unknown --cascade '%s' (original, yan or modern)\n",
                 cascade.c_str());
    return 2;
  }
  if (auto a = qkd::core::parse_auth_mode(auth)) {
    pp.auth = *a;
  } else {
    std::fprintf(stderr, "qkd-sim: unknown --auth '%s' (wegman-carter or hmac)\n", auth.c_str());
    return 2;
  }
  if (auto s = qkd::core::validate(ch); !s.ok()) {
    std::fprintf(stderr, "qkd-sim: %s\n", s.error().message.c_str());
    return 2;
  }
  if (auto s = qkd::core::validate(pp); !s.ok()) {
    std::fprintf(stderr, "qkd-sim: %s\n", s.error().message.c_str());
    return 2;
  }
  if (duration_s > 0.0) {
    total_pulses = duration_s * ch.pulse_rate_hz;
  }
  if (total_pulses > 0.0) {
    blocks = static_cast<std::uint64_t>(
        std::ceil(total_pulses / static_cast<double>(pp.pulses_per_block)));
  }
  if (!plot_path.empty() && csv_path.empty()) {
    std::fprintf(stderr, "qkd-sim: --plot needs --csv FILE (the data it draws)\n");
    return 2;
  }

  SweepSpec sp;
  const bool sweeping = !sweep.empty() || !sweep_distance.empty();
  std::vector<double> values;
  if (sweeping) {
    const std::string spec = sweep.empty() ? "distance=" + sweep_distance : sweep;
    if (!parse_sweep(spec, sp)) {
      std::fprintf(stderr, "qkd-sim: --sweep wants PARAM=a:b:step (PARAM: distance, eve, dark, "
                           "mu) with step > 0, b >= a\n");
      return 2;
    }
    for (double v = sp.a; v <= sp.b + 1e-9 * std::max(1.0, std::fabs(sp.b)); v += sp.step) {
      values.push_back(v);
    }
  } else {
    sp.param = "distance";
    values.push_back(ch.length_km);
  }

  std::ofstream csv;
  if (!csv_path.empty()) {
    csv.open(csv_path);
    if (!csv) {
      std::fprintf(stderr, "qkd-sim: cannot write %s\n", csv_path.c_str());
      return 1;
    }
    csv << kCsvHeader << '\n';
  }
  Progress progress;
  progress.enabled = !no_progress && !json && isatty(STDERR_FILENO) != 0;
  progress.total = blocks * values.size();
  progress.label = "qkd-sim";

  nlohmann::json out = nlohmann::json::array();
  if (!json && sweeping) {
    std::printf("%10s %7s %7s %7s %12s %12s %12s %12s %12s %12s\n", sp.param.c_str(), "QBER%",
                "theory%", "aborted", "raw/s", "theory_raw/s", "secret/s", "sec/pulse",
                "theory/pulse", "PLOB/pulse");
  }
  for (const double value : values) {
    apply_sweep(ch, sp.param, value);
    if (auto s = qkd::core::validate(ch); !s.ok()) {
      std::fprintf(stderr, "qkd-sim: %s\n", s.error().message.c_str());
      return 2;
    }
    const qkd::core::ChannelTheory th = qkd::core::channel_theory(ch);
    nlohmann::json jblocks = nlohmann::json::array();
    const bool print_blocks = !json && !sweeping;
    BlockExtra extra;
    auto totals = run_link(ch, pp, seed, blocks, print_blocks, json ? &jblocks : nullptr,
                           &progress, &extra);
    if (!totals.ok()) {
      std::fprintf(stderr, "qkd-sim: link failed at %s = %g: %s\n", sp.param.c_str(), value,
                   totals.error().message.c_str());
      return 1;
    }
    const Totals& t = *totals;
    const Summary s = summarize(t, pp);
    const double f_used = s.efficiency > 0.0 ? s.efficiency : 1.16;
    const MatchingTheory mt = matching_theory(ch, f_used, pp.z_basis_prob);
    // channel_theory's sifted rate assumes an even basis choice (1/2 of the detections).
    const double th_sifted_per_pulse = th.gain * sifting_factor(pp.z_basis_prob);
    const double key_fraction = 1.0 - pp.sample_fraction;  // the random sample is discarded
    const double theory_per_pulse = mt.rate * key_fraction;
    const double th_secret = theory_per_pulse * ch.pulse_rate_hz;
    const qkd::core::LinkModel lm = qkd::core::link_model_of(ch, f_used, 0.5);
    const double inf_rate =
        qkd::core::optimal_rate(lm, qkd::core::TheoryCurve::kInfiniteDecoy, ch.length_km).rate;
    const double sp_rate = std::max(0.0, qkd::core::rate_single_photon(lm, ch.length_km));
    const double plob = qkd::core::plob_bound(th.channel_transmittance);
    const double secret_per_pulse =
        t.pulses > 0 ? static_cast<double>(t.secret) / static_cast<double>(t.pulses) : 0.0;
    const double gain =
        t.pulses ? static_cast<double>(t.detections) / static_cast<double>(t.pulses) : 0.0;
    if (csv.is_open()) {
      csv << fmt::format("{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{},{:.6g},{:.6g},{:.6g},"
                         "{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.4f},\"{}\"\n",
                         sp.param, value, t.blocks, t.aborted, t.pulses, s.qber, th.qber, gain,
                         th.gain, t.secret, secret_per_pulse, theory_per_pulse, inf_rate,
                         sp_rate, plob, s.secret_rate, extra.y1_lower, extra.e1_upper, f_used,
                         extra.bound);
    }
    if (json) {
      out.push_back({{sp.param, value},
                     {"length_km", ch.length_km},
                     {"channel",
                      {{"loss_db_per_km", ch.loss_db_per_km},
                       {"insertion_loss_db", ch.insertion_loss_db},
                       {"detector_efficiency", ch.detector_efficiency},
                       {"dark_count_prob", ch.dark_count_prob},
                       {"misalignment", ch.misalignment},
                       {"source", ch.source == qkd::core::SourceKind::kSinglePhoton ? "single" : "wcp"},
                       {"mu", {ch.mu_signal, ch.mu_decoy, ch.mu_vacuum}},
                       {"prob_decoy", ch.prob_decoy},
                       {"prob_vacuum", ch.prob_vacuum},
                       {"eve_intercept_fraction", ch.eve_intercept_fraction},
                       {"eve_z_basis_prob", ch.eve_z_basis_prob},
                       {"eve_pns", ch.eve_photon_number_splitting},
                       {"fiber_cut", ch.fiber_cut},
                       {"pulse_rate_hz", ch.pulse_rate_hz},
                       {"dead_time_ns", ch.dead_time_ns},
                       {"afterpulse_prob", ch.afterpulse_prob},
                       {"afterpulse_window_ns", ch.afterpulse_window_ns}}},
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
                       {"auth_bits", t.auth},
                       {"net_secret_bits", t.net},
                       {"net_secret_rate_per_s", s.net_secret_rate},
                       {"key_bound", extra.bound},
                       {"y1_lower", extra.y1_lower},
                       {"e1_upper", extra.e1_upper},
                       {"simulated_seconds", t.simulated_seconds},
                       {"raw_rate_per_s", s.raw_rate},
                       {"sifted_rate_per_s", s.sifted_rate},
                       {"secret_rate_per_s", s.secret_rate},
                       {"secret_per_pulse", secret_per_pulse},
                       {"cascade_efficiency", s.efficiency},
                       {"cpu_seconds_alice", t.cpu_alice},
                       {"cpu_seconds_bob", t.cpu_bob}}},
                     {"theory",
                      {{"transmittance", th.transmittance},
                       {"gain", th.gain},
                       {"qber", th.qber},
                       {"sifted_per_pulse", th_sifted_per_pulse},
                       {"y1", th.y1},
                       {"e1", th.e1},
                       {"matching_formula", mt.name},
                       {"secret_per_pulse", theory_per_pulse},
                       {"infinite_decoy_per_pulse", inf_rate},
                       {"plob_per_pulse", plob}}}});
    } else if (sweeping) {
      std::printf("%10.4g %7.3f %7.3f %7llu %12.4g %12.4g %12.4g %12.4g %12.4g %12.4g\n", value,
                  100 * s.qber, 100 * th.qber, static_cast<unsigned long long>(t.aborted),
                  s.raw_rate, th.gain * ch.pulse_rate_hz, s.secret_rate, secret_per_pulse,
                  theory_per_pulse, plob);
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
      std::printf("key length bound: %s\n", extra.bound.c_str());
      std::printf("%-28s %14s %14s\n", "", "measured", "theory");
      std::printf("%-28s %14.6g %14.6g\n", "gain (detections/pulse)", gain, th.gain);
      std::printf("%-28s %14.4f %14.4f\n", "QBER [%]", 100 * s.qber, 100 * th.qber);
      std::printf("%-28s %14.6g %14.6g\n", "raw key rate [bit/s]", s.raw_rate,
                  th.gain * ch.pulse_rate_hz);
      std::printf("%-28s %14.6g %14.6g\n", "sifted key rate [bit/s]", s.sifted_rate,
                  th_sifted_per_pulse * ch.pulse_rate_hz);
      std::printf("%-28s %14.6g %14.6g\n", "secret key rate [bit/s]", s.secret_rate, th_secret);
      std::printf("%-28s %14.6g %14.6g\n", "secret bits per pulse", secret_per_pulse,
                  theory_per_pulse);
      std::printf("%-28s %14.6g %14s\n", "net rate after auth [bit/s]", s.net_secret_rate,
                  "");
      std::printf("%-28s %14.6g %14s\n", "auth cost [bit/block]",
                  t.blocks > 0 ? static_cast<double>(t.auth) / static_cast<double>(t.blocks)
                               : 0.0,
                  "");
      std::printf("%-28s %14s %14.6g\n", "PLOB bound [bit/pulse]", "", plob);
      if (ch.source == qkd::core::SourceKind::kWeakCoherent) {
        std::printf("%-28s %14.6g %14.6g\n", "single-photon yield Y1", extra.y1_lower, th.y1);
        std::printf("%-28s %14.4f %14.4f\n", "single-photon error e1 [%]", 100 * extra.e1_upper,
                    100 * th.e1);
      }
      std::printf("%-28s %14.4f %14s\n", "Cascade efficiency f", s.efficiency, "");
      std::printf("(theory secret rate: %s, asymptotic, with the measured f = %.3f, times the "
                  "kept fraction %.3g;\n the measured rate also removes the safety margin %.3g "
                  "and the verification tag. Y1/e1 measured = decoy bounds.)\n",
                  mt.name, f_used, key_fraction, pp.safety_margin);
    }
  }
  if (json) {
    std::printf("%s\n", (sweeping ? out : out[0]).dump(2).c_str());
  }
  if (csv.is_open()) {
    csv.close();
    if (!plot_path.empty()) {
      if (!plot_sweep(csv_path, plot_path, sp.param)) {
        return 1;
      }
      if (!json) {
        std::printf("plot written to %s\n", plot_path.c_str());
      }
    }
  }
  return 0;
}
