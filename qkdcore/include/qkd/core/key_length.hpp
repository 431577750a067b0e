// How many secret bits a block may yield, and the analytic rate calculator.
//
// Two parts:
//  1. The analytic calculator (per-pulse asymptotic rates, for theory curves, sweeps and
//     validation): GLLP with infinite decoys, vacuum + weak decoy (Ma, Qi, Zhao, Lo 2005),
//     no decoys (GLLP), an ideal single-photon source, and the PLOB repeaterless bound;
//     optimal mean photon number and the largest distance with positive key.
//  2. The block bounds (block_key_length): from what both ends know after sifting and
//     disclosure, the key length under the selected KeyBound, which is named in the result.
// Formulas: /work/shared/reference/QKD_PHYSICS.md and docs/VALIDATION.md.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "qkd/core/link.hpp"

namespace qkd::core {

// Binary entropy h(x) in bits; h(0) = h(1) = 0; x outside [0,1] is clamped.
[[nodiscard]] double binary_entropy(double x);

// The earlier asymptotic formula (kept for its users):
//   m = floor(n (1 - h(e)) - leaked - safety_margin n), clamped at 0, multiple of 8.
[[nodiscard]] std::uint64_t secret_key_length(std::uint64_t reconciled_bits, double qber,
                                              std::uint64_t leaked_bits,
                                              double safety_margin);

// ---------------------------------------------------------------- analytic calculator --

// The link as the textbook formulas see it. Defaults: the standard parameter set of
// Gobby, Yuan, Shields 2004 (as used by Lo-Ma-Chen 2005 and Ma-Qi-Zhao-Lo 2005).
struct LinkModel {
  double loss_db_per_km = 0.21;
  double eta_bob = 0.045;          // detector efficiency and Bob's optics
  double insertion_loss_db = 0.0;  // extra loss [dB]
  double y0 = 1.7e-6;              // background (dark-count) yield per pulse
  double e_det = 0.033;            // misalignment error
  double f = 1.22;                 // reconciliation inefficiency
  double q = 0.5;                  // sifting factor
  [[nodiscard]] double eta(double length_km) const;          // total transmittance
  [[nodiscard]] double line_eta(double length_km) const;     // fiber + insertion only
};
// The model of a ChannelParams (detector efficiency, losses, dark counts, misalignment).
[[nodiscard]] LinkModel link_model_of(const ChannelParams& c, double f, double q);

enum class TheoryCurve : std::uint8_t {
  kInfiniteDecoy = 0,    // GLLP with infinite decoys (exact Y1, e1)
  kVacuumWeakDecoy = 1,  // vacuum + one weak decoy nu
  kNoDecoy = 2,          // GLLP without decoys (all multi-photon pulses tagged)
  kSinglePhoton = 3,     // ideal single-photon source
};
[[nodiscard]] const char* theory_curve_name(TheoryCurve c);

// Secret bits per pulse (negative when no key; the callers clamp).
[[nodiscard]] double rate_infinite_decoy(const LinkModel& m, double length_km, double mu);
[[nodiscard]] double rate_vacuum_weak_decoy(const LinkModel& m, double length_km, double mu,
                                            double nu);
[[nodiscard]] double rate_no_decoy(const LinkModel& m, double length_km, double mu);
[[nodiscard]] double rate_single_photon(const LinkModel& m, double length_km);
// PLOB: -log2(1 - eta) secret bits per channel use for a pure-loss channel of
// transmittance eta.
[[nodiscard]] double plob_bound(double eta);

struct OptimalRate {
  double rate = 0.0;  // secret bits per pulse, >= 0
  double mu = 0.0;    // mean photon number that achieves it (1 for single photons)
};
// Best rate over mu (log-spaced search then golden-section refinement); nu is the weak
// decoy of kVacuumWeakDecoy (mu > nu is enforced).
[[nodiscard]] OptimalRate optimal_rate(const LinkModel& m, TheoryCurve c, double length_km,
                                       double nu = 0.05);
// Largest length [km] with a positive optimal rate (bisection to 0.01 km).
[[nodiscard]] double max_distance(const LinkModel& m, TheoryCurve c, double nu = 0.05);
// QBER at which 1 - f h(e) - h(e) reaches zero (f = 1: Shor-Preskill 11.0 %).
[[nodiscard]] double qber_threshold(double f);

// ---------------------------------------------------------------------- block bounds --

// What both ends know once sifting and disclosure are done. Sets:
//  - key basis: Z when the basis choice is biased (z_basis_prob > 0.5), both bases else;
//  - test set (phase-error estimation): the X basis when biased, all sifted bits else;
//  - the key: signal-class bits in the key basis minus the random QBER sample; every
//    sifted bit of the decoy and vacuum classes (and of the X basis when biased) is
//    disclosed.
struct BlockStatistics {
  KeyBound bound = KeyBound::kAsymptotic;
  SourceKind source = SourceKind::kSinglePhoton;
  std::uint64_t pulses = 0;
  std::array<double, 3> mu{};    // intensities (signal, weak decoy, vacuum)
  std::array<double, 3> prob{};  // class probabilities
  double z_basis_prob = 0.5;
  std::array<std::uint64_t, 3> key_basis_sifted{};  // sifted per class, key basis (bases)
  std::array<std::uint64_t, 3> test_sifted{};       // sifted per class, test set
  std::array<std::uint64_t, 3> test_errors{};       // errors per class in the test set
                                                    // (class 0 unbiased: sample estimate)
  std::uint64_t key_bits = 0;       // n: bits entering reconciliation
  std::uint64_t sample_bits = 0;    // k: signal key-basis bits disclosed for the QBER
  std::uint64_t sample_errors = 0;
  std::uint64_t leaked_bits = 0;    // reconciliation parities + verification tag
  double safety_margin = 0.0;
  double epsilon_sec = 1e-10;
  double epsilon_cor = 1e-15;
  double confidence_sd = 5.0;
};

struct KeyLengthResult {
  std::uint64_t bits = 0;   // multiple of 8
  std::string bound;        // key_bound_name() of the bound used
  std::string note;         // why the key is zero when a bound does not apply, else empty
  double qber = 0.0;        // sample estimate
  double qber_upper = 0.0;  // upper confidence bound (Clopper-Pearson, tail of c sd)
  double y1_lower = 0.0;    // decoy bounds only
  double e1_upper = 0.0;    // decoy bounds: single-photon phase error; others: bound used
  double single_photon_bits_lower = 0.0;
};

// Upper confidence bound of an error rate from `errors` of `k`, exact (Clopper-Pearson) at
// the one-sided tail of a normal distribution beyond c standard deviations.
[[nodiscard]] double qber_upper_bound(std::uint64_t k, std::uint64_t errors, double c);

// Decoy-state estimate over one set of detections (Lim et al. 2014, eqs. for s0, s1, v1;
// eps = 0 gives the asymptotic vacuum + weak decoy estimate of Ma-Qi-Zhao-Lo 2005).
struct DecoyEstimate {
  bool valid = false;   // needs three classes with mu1 > mu2 + mu3, mu2 > mu3 >= 0
  double s0 = 0.0;      // lower bound, vacuum detections in the set
  double s1 = 0.0;      // lower bound, single-photon detections in the set
  double v1 = 0.0;      // upper bound, single-photon errors in the set
  double y1 = 0.0;      // s1 / (tau1 * pulses_in_set)
};
[[nodiscard]] DecoyEstimate decoy_estimate(const std::array<double, 3>& mu,
                                           const std::array<double, 3>& prob,
                                           const std::array<std::uint64_t, 3>& detections,
                                           const std::array<std::uint64_t, 3>& errors,
                                           double pulses_in_set, double eps);

// The phase-error rate of a block's key as its test set measures it: the QBER sample when
// both bases give key; the signal class's X-basis bits (all disclosed) when the basis
// choice is biased, since an attack on Z alone does not raise Z's error rate. Used by every
// bound but the decoy ones (which estimate the single-photon phase error from the same
// set) and by the abort test.
struct PhaseErrorEstimate {
  double bits = 0.0;           // size of the set it was measured on
  std::uint64_t errors = 0;
  double rate = 0.0;           // errors / bits (0 when the set is empty)
  double upper = 0.0;          // upper confidence bound (confidence_sd standard deviations)
};
[[nodiscard]] PhaseErrorEstimate phase_error(const BlockStatistics& s);

// The key length of a block under s.bound. Both ends call it with the same numbers.
[[nodiscard]] KeyLengthResult block_key_length(const BlockStatistics& s);

// Defense functions of the DARPA network (seed paper), per bit:
// Slutsky et al. 1998: tau(e) = 1 + log2(1 - (1/2)((1 - 3e)/(1 - e))^2), e < 1/3 (1 beyond).
[[nodiscard]] double slutsky_tau(double e);

}  // namespace qkd::core
