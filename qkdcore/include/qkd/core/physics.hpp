// The simulated physics of one link: a source (ideal single photons, or weak coherent
// pulses with Poisson photon number and up to three intensity classes: signal, weak decoy,
// vacuum), a lossy fiber with extra insertion loss (or a cut fiber), optional eavesdroppers
// (intercept-resend on a fraction of pulses; photon-number splitting on multi-photon
// pulses) and Bob's detector (efficiency, dark counts, misalignment; optionally dead time
// and afterpulsing: a dead time drops the candidates it covers, an afterpulse is an extra
// event, so the cost still follows detections). Runs on Alice's side
// ("nature"); Bob only ever gets DetectionEvents.
//
// Cost follows detections, not pulses: candidate events are sampled with geometric gaps at
// the largest per-class detection probability Q_max, and each candidate at pulse i is kept
// with probability Q_k(i) / Q_max, where k(i) is the intensity class Alice's PRF chose for
// pulse i (thinning: exact, each pulse is detected independently with probability Q_k).
// The photon number is drawn only for detected pulses, from its law conditioned on the
// detection. Alice's bit, basis and intensity for pulse i come from a keyed PRF (AlicePrf),
// so no loop ever visits an undetected pulse. Deterministic for a given seed and PRF key.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "qkd/core/link.hpp"
#include "qkd/core/random.hpp"

namespace qkd::core {

// Basis 0 = rectilinear (Z), 1 = diagonal (X).
struct AliceState {
  bool bit = false;
  bool basis = false;
  std::uint8_t intensity = 0;  // 0 signal, 1 weak decoy, 2 vacuum
};

// Alice's random choices: basis Z with probability z_basis_prob, intensity class k with
// probability class_prob[k].
struct SourceChoices {
  double z_basis_prob = 0.5;
  std::array<double, 3> class_prob{1.0, 0.0, 0.0};
};
[[nodiscard]] SourceChoices source_choices(const ChannelParams& c, double z_basis_prob);

// Alice's random bit, basis and intensity for pulse i: AES-128 in counter mode as a PRF
// over pulse indices. Unbiased single-class choices: one AES block covers 64 pulses (bits
// from the first half, bases from the second). Otherwise (biased basis or decoys): 64 PRF
// bits per pulse, four AES blocks per 8 pulses in a separate counter domain (bit from bit 0,
// basis from a 24-bit uniform, class from a 32-bit uniform). Bits are key material; the
// PRF key lives only inside this object.
class AlicePrf {
 public:
  explicit AlicePrf(std::span<const std::uint8_t, 16> key);
  AlicePrf(std::span<const std::uint8_t, 16> key, const SourceChoices& choices);
  ~AlicePrf();
  AlicePrf(const AlicePrf&) = delete;
  AlicePrf& operator=(const AlicePrf&) = delete;
  [[nodiscard]] AliceState at(std::uint64_t pulse);
  // The states of many pulses at once (out[i] = at(pulses[i]); pulses non-decreasing,
  // out.size() >= pulses.size()): one AES call for all the counter blocks they need.
  void at_many(std::span<const std::uint64_t> pulses, std::span<AliceState> out);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// What arrives at Bob's detector for one detection event: the photon's state (after the
// channel and any eavesdropper), or "dark" (only a dark count fired; no photon detected).
// Packed into one 64-bit word (8 bytes, not 16: a block at 25 km stores ~3e7 of them).
struct DetectionEvent {
  static constexpr std::uint64_t kMaxPulse = (std::uint64_t{1} << 61) - 1;
  std::uint64_t pulse : 61 = 0;  // pulse index, <= kMaxPulse
  std::uint64_t bit : 1 = 0;     // arriving polarization value (meaningless if dark)
  std::uint64_t basis : 1 = 0;   // arriving polarization basis (meaningless if dark)
  std::uint64_t dark : 1 = 0;    // only a dark count fired
};
static_assert(sizeof(DetectionEvent) == 8);

// Closed-form expectations for a ChannelParams (the theory the simulator must match).
// For a weak coherent source: detection probability of class k
//   Q_k = 1 - (1 - Y0) (1 - C_k),  C_k = sum_n P_k(n) c_n = 1 - exp(-eta mu_k)
// (c_n = 1 - (1 - eta)^n: some photon of n clicks); error rate
//   E_k = [C_k e_ph + (1 - C_k) Y0 / 2] / Q_k,  e_ph = (1 - f) e_det + f (e_det / 2 + 1/4)
// with f the intercept-resend fraction. Under photon-number splitting c_0 = c_1 = 0 and
// c_n = t (1 - (1 - eta_B)^(n - 1)) for n >= 2 (eta_B: Bob's side only), t set so that the
// signal class keeps its expected C.
//
// Detector dead time and afterpulsing (ChannelParams::dead_time_ns, afterpulse_prob; off by
// default, and then every figure below is the formula above, unchanged). The detector is
// a renewal process: after a click it is blind for d = ceil(dead_time * f_rep) pulses; each
// live pulse clicks with probability Q (the live gain above, averaged over classes); with
// probability p_ap a click schedules an afterpulse at live pulse A, uniform in 1..W (W the
// window in pulses), that fires unless a real detection comes first (a tie goes to the
// afterpulse). A cycle lasts on average
//   E[L] = d + (1 - p_ap S / W) / Q,   S = sum_{a=1..W} (1 - Q)^a = (1 - Q)(1 - (1 - Q)^W) / Q
// pulses and ends with an afterpulse with probability a = p_ap (1 - (1 - Q)^W) / (W Q).
// So clicks per pulse gain' = 1 / E[L] (without afterpulses: Q / (1 + Q d), the standard
// non-paralyzable correction), QBER' = (1 - a) E + a / 2 (an afterpulse has a random
// result), and per class k: gain_k' = gain' [(1 - a) Q_k / Q + a].
struct ClassTheory {
  double mu = 0.0;               // mean photon number (single-photon source: exactly 1)
  double prob = 0.0;             // probability Alice picks this class
  double gain = 0.0;             // Q_k: detection probability per pulse of this class
  double qber = 0.0;             // E_k: sifted error rate of this class
  double photon_fraction = 0.0;  // P(a photon clicked | detection)
  // Detection probability of a pulse of this class while the detector is live (= gain
  // without dead time and afterpulses).
  double live_gain = 0.0;
};

struct ChannelTheory {
  double transmittance = 0.0;    // eta = detector_efficiency * 10^-((loss*L + insertion)/10)
  double channel_transmittance = 0.0;  // fiber + insertion loss only (for the PLOB bound)
  double gain = 0.0;             // detection probability per pulse (average over classes)
  double photon_fraction = 0.0;  // P(photon detected | detection), average over classes
  double qber = 0.0;             // expected sifted QBER (average over classes), Eve included
  double sifted_per_pulse = 0.0; // gain / 2 (standard BB84)
  std::array<ClassTheory, 3> classes{};  // per intensity class (unused classes: prob 0)
  double y1 = 0.0;               // single-photon yield (detection prob of a 1-photon pulse)
  double e1 = 0.0;               // single-photon error rate
  double pns_forward = 0.0;      // t: PNS Eve's forwarding probability of multi-photon pulses
  // Dead time and afterpulsing (all 0 / equal to gain when off).
  std::uint64_t dead_pulses = 0;     // d: pulses blinded after each click
  std::uint64_t afterpulse_window_pulses = 0;  // W (0 when afterpulse_prob = 0)
  double live_gain = 0.0;            // Q: detection probability of a live pulse (average)
  double afterpulse_fraction = 0.0;  // a: fraction of clicks that are afterpulses
  // Asymptotic secret fraction of the ideal single-photon source with a reconciliation
  // inefficiency f: max(0, 1 - f h(e) - h(e)) per sifted bit.
  double secret_fraction(double f) const;
};
[[nodiscard]] ChannelTheory channel_theory(const ChannelParams& p);
// ceil(ns * 1e-9 * pulse_rate_hz) (a product within 1e-9 of an integer counts as that integer).
[[nodiscard]] std::uint64_t pulses_in_ns(double ns, double pulse_rate_hz);

// Ground truth the simulator knows and the protocol never sees (for validation).
struct SimulationTruth {
  std::array<std::uint64_t, 3> detections{};         // per intensity class
  std::array<std::uint64_t, 3> single_photon{};      // detections from 1-photon pulses
  std::array<std::uint64_t, 3> photon_clicks{};      // detections where a photon clicked
  // Afterpulse clicks, by the class of the pulse they fell on (not in `detections`).
  std::array<std::uint64_t, 3> afterpulses{};
};

// The channel simulation for one block of pulses.
class ChannelSimulator {
 public:
  ChannelSimulator(const ChannelParams& params, std::uint64_t seed);
  // Appends the detection events for pulses [0, pulses) to `out`, in increasing pulse
  // order, using `prf` for Alice's states (its intensity classes must follow the
  // params' probabilities: build it with source_choices()).
  void run(std::vector<DetectionEvent>& out, AlicePrf& prf, std::uint64_t pulses) {
    run(out, prf, pulses, nullptr);
  }
  // The same, also appending to `alice_states` (when not null) Alice's state of each
  // appended event (prf's output for its pulse, before Eve and misalignment), so that her
  // sifting need not compute them again. Same events, same random draws. The states are
  // secret: the caller cleanses them (OPENSSL_cleanse) when done.
  void run(std::vector<DetectionEvent>& out, AlicePrf& prf, std::uint64_t pulses,
           std::vector<AliceState>* alice_states);
  [[nodiscard]] const SimulationTruth& truth() const { return truth_; }
  [[nodiscard]] const ChannelTheory& theory() const { return theory_; }

 private:
  // Per class: conditional law of the photon number given a detection, and the
  // probability that a photon (not only a dark count) clicked given n and a detection.
  struct ClassTable {
    double accept = 0.0;          // Q_k / Q_max
    std::vector<double> cdf;      // P(n <= i | detection)
    std::vector<double> click;    // P(photon click | n = i, detection)
  };
  ChannelParams params_;
  ChannelTheory theory_;
  std::array<ClassTable, 3> tables_;
  int classes_ = 1;
  double log1m_qmax_ = 0.0;  // log(1 - Q_max), < 0
  std::uint64_t dead_pulses_ = 0;     // pulses blinded after a click
  std::uint64_t ap_window_ = 0;       // afterpulse window [pulses]
  Xoshiro256ss gap_rng_;     // the gaps between candidate detections
  Xoshiro256ss rng_;         // everything else (thinning, photon number, noise, Eve)
  SimulationTruth truth_;
};

}  // namespace qkd::core
