// The simulated physics of one link: an ideal single-photon source, a lossy fiber, an
// optional intercept-resend eavesdropper, and Bob's detector (efficiency, dark counts,
// misalignment). Runs on Alice's side ("nature"); Bob only ever gets DetectionEvents.
//
// Cost follows detections, not pulses: the gaps between detection events are sampled
// geometrically, and Alice's bit and basis for pulse i come from a keyed PRF
// (AlicePrf), so no loop ever visits an undetected pulse.
//
// Decoy-state sources (weak coherent pulses with intensity classes) come in a later issue:
// they slot in as a per-pulse intensity drawn from the same PRF and a per-class detection
// probability, with DetectionEvent gaining an intensity field.
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
};

// Alice's random bit and basis for pulse i: AES-128 in counter mode as a PRF over pulse
// indices (one AES block covers 64 pulses: bits from the first half, bases from the
// second). Bits are key material; the PRF key lives only inside this object.
class AlicePrf {
 public:
  explicit AlicePrf(std::span<const std::uint8_t, 16> key);
  ~AlicePrf();
  AlicePrf(const AlicePrf&) = delete;
  AlicePrf& operator=(const AlicePrf&) = delete;
  [[nodiscard]] AliceState at(std::uint64_t pulse);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// What arrives at Bob's detector for one detection event: the photon's state (after the
// channel and any eavesdropper), or "dark" (only a dark count fired; no photon detected).
struct DetectionEvent {
  std::uint64_t pulse = 0;
  bool bit = false;    // arriving polarization value (meaningless if dark)
  bool basis = false;  // arriving polarization basis (meaningless if dark)
  bool dark = false;
};

// Closed-form expectations for a ChannelParams (the theory the simulator must match).
struct ChannelTheory {
  double transmittance = 0.0;    // eta = detector_efficiency * 10^(-loss*L/10)
  double gain = 0.0;             // detection probability per pulse, 1 - (1-eta)(1-Y0)
  double photon_fraction = 0.0;  // P(photon detected | detection) = eta / gain
  double qber = 0.0;             // expected sifted QBER, eavesdropper included
  double sifted_per_pulse = 0.0; // gain / 2
  // Asymptotic secret fraction of the ideal single-photon source with a reconciliation
  // inefficiency f: max(0, 1 - f h(e) - h(e)) per sifted bit.
  double secret_fraction(double f) const;
};
[[nodiscard]] ChannelTheory channel_theory(const ChannelParams& p);

// The channel simulation for one block of pulses.
class ChannelSimulator {
 public:
  ChannelSimulator(const ChannelParams& params, std::uint64_t seed);
  // Appends the detection events for pulses [0, pulses) to `out`, in increasing pulse
  // order, using `prf` for Alice's states.
  void run(std::vector<DetectionEvent>& out, AlicePrf& prf, std::uint64_t pulses);

 private:
  ChannelParams params_;
  ChannelTheory theory_;
  double log1m_gain_;  // log(1 - gain), < 0
  Xoshiro256ss rng_;
};

}  // namespace qkd::core
