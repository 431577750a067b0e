#include "qkd/core/physics.hpp"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <vector>

#include "qkd/core/key_length.hpp"

namespace qkd::core {
namespace {

struct Observed {
  std::uint64_t detections = 0;
  std::uint64_t sifted = 0;
  std::uint64_t errors = 0;
};

// Runs the channel for `pulses` and measures as Bob does (random basis; other basis or
// dark -> random bit), sifting against Alice's PRF.
Observed simulate(const ChannelParams& p, std::uint64_t pulses, std::uint64_t seed) {
  std::array<std::uint8_t, 16> key{};
  key[0] = static_cast<std::uint8_t>(seed);
  AlicePrf prf(key);
  ChannelSimulator sim(p, seed);
  std::vector<DetectionEvent> ev;
  sim.run(ev, prf, pulses);
  Xoshiro256ss bob(seed + 1000);
  Observed o;
  o.detections = ev.size();
  std::uint64_t last = 0;
  for (std::size_t i = 0; i < ev.size(); ++i) {
    const DetectionEvent& e = ev[i];
    EXPECT_LT(e.pulse, pulses);
    if (i > 0) {
      EXPECT_GT(e.pulse, last);
    }
    last = e.pulse;
    const bool basis = bob.bit();
    const bool result = (e.dark || basis != e.basis) ? bob.bit() : e.bit;
    const AliceState a = prf.at(e.pulse);
    if (a.basis == basis) {
      ++o.sifted;
      o.errors += (a.bit != result) ? 1 : 0;
    }
  }
  return o;
}

void expect_matches_theory(const ChannelParams& p, std::uint64_t pulses) {
  const ChannelTheory t = channel_theory(p);
  const Observed o = simulate(p, pulses, 77);
  const double n = static_cast<double>(pulses);
  const double mean = n * t.gain;
  const double sd = std::sqrt(n * t.gain * (1.0 - t.gain));
  EXPECT_NEAR(static_cast<double>(o.detections), mean, 5.0 * sd) << "L=" << p.length_km;
  // Sifting keeps half: binomial(detections, 1/2).
  const double d = static_cast<double>(o.detections);
  EXPECT_NEAR(static_cast<double>(o.sifted), d / 2.0, 5.0 * std::sqrt(d / 4.0));
  const double s = static_cast<double>(o.sifted);
  const double qber = static_cast<double>(o.errors) / s;
  EXPECT_NEAR(qber, t.qber, 5.0 * std::sqrt(t.qber * (1.0 - t.qber) / s) + 1e-9)
      << "L=" << p.length_km;
}

TEST(Physics, TheoryFormulas) {
  ChannelParams p;
  p.length_km = 50.0;
  const ChannelTheory t = channel_theory(p);
  EXPECT_NEAR(t.transmittance, 0.1 * 0.1, 1e-12);  // 0.2 dB/km * 50 km = 10 dB
  EXPECT_NEAR(t.gain, 1.0 - (1.0 - 0.01) * (1.0 - 1e-6), 1e-15);
  EXPECT_NEAR(t.qber, (0.01 * 0.01 + 0.99 * 1e-6 * 0.5) / t.gain, 1e-12);
  EXPECT_NEAR(binary_entropy(0.11), 0.4999, 1e-3);
  EXPECT_EQ(binary_entropy(0.0), 0.0);
}

TEST(Physics, DetectionRateAndQberMatchTheoryAt0km) {
  ChannelParams p;
  p.length_km = 0.0;
  expect_matches_theory(p, 4'000'000);
}

TEST(Physics, DetectionRateAndQberMatchTheoryAt50km) {
  ChannelParams p;
  p.length_km = 50.0;
  p.misalignment = 0.02;
  p.dark_count_prob = 1e-5;  // makes the dark-count term visible
  expect_matches_theory(p, 40'000'000);
}

TEST(Physics, InterceptResendAddsQuarterOfFraction) {
  ChannelParams p;
  p.length_km = 10.0;
  const Observed clean = simulate(p, 4'000'000, 5);
  p.eve_intercept_fraction = 0.5;
  const Observed eve = simulate(p, 4'000'000, 5);
  const double q0 = static_cast<double>(clean.errors) / static_cast<double>(clean.sifted);
  const double q1 = static_cast<double>(eve.errors) / static_cast<double>(eve.sifted);
  // f/4 = 12.5 %, slightly less because an intercepted photon's misalignment error only
  // counts when Eve chose Alice's basis: exact theory (f/4)(1 - 2 e_det).
  EXPECT_NEAR(q1 - q0, 0.125 * (1.0 - 2.0 * p.misalignment), 0.005);
  EXPECT_NEAR(q1, channel_theory(p).qber, 0.004);
  // Eve's resent states do not change the detection statistics.
  EXPECT_NEAR(static_cast<double>(eve.detections), static_cast<double>(clean.detections),
              0.01 * static_cast<double>(clean.detections));
}

TEST(Physics, TwoBillionPulsesAtLongDistance) {
  // 2e9 pulses at 150 km (eta = 0.1 * 10^-3): ~2e5 detections. Walking every pulse would
  // take seconds; sampling the gaps between detections takes milliseconds.
  ChannelParams p;
  p.length_km = 150.0;
  std::array<std::uint8_t, 16> key{};
  AlicePrf prf(key);
  ChannelSimulator sim(p, 9);
  std::vector<DetectionEvent> ev;
  const auto t0 = std::chrono::steady_clock::now();
  sim.run(ev, prf, 2'000'000'000);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ChannelTheory t = channel_theory(p);
  EXPECT_NEAR(static_cast<double>(ev.size()), 2e9 * t.gain, 5.0 * std::sqrt(2e9 * t.gain));
  // No timing assertion here (speed is measured in bench/); the time is printed for the log.
  std::printf("2e9 pulses at 150 km simulated in %.3f s\n", s);
}

TEST(Physics, BatchedPrfEqualsSingleLookups) {
  std::array<std::uint8_t, 16> key{};
  key[3] = 9;
  ChannelParams decoy;
  decoy.source = SourceKind::kWeakCoherent;
  decoy.prob_decoy = 0.2;
  decoy.prob_vacuum = 0.1;
  for (const SourceChoices& c :
       {SourceChoices{}, source_choices(decoy, 0.5), source_choices(ChannelParams{}, 0.9)}) {
    AlicePrf batch(key, c);
    AlicePrf single(key, c);
    Xoshiro256ss rng(5);
    std::vector<std::uint64_t> pulses;
    std::uint64_t p = 0;
    for (int i = 0; i < 5000; ++i) {
      p += rng.below(i % 3 == 0 ? 2 : 200);  // repeats, same block, far apart
      pulses.push_back(p);
    }
    std::vector<AliceState> out(pulses.size());
    batch.at_many(pulses, out);
    for (std::size_t i = 0; i < pulses.size(); ++i) {
      const AliceState s = single.at(pulses[i]);
      ASSERT_EQ(out[i].bit, s.bit) << i;
      ASSERT_EQ(out[i].basis, s.basis) << i;
      ASSERT_EQ(out[i].intensity, s.intensity) << i;
    }
  }
  EXPECT_EQ(sizeof(DetectionEvent), 8U);
}

TEST(Physics, DeterministicForSeed) {
  ChannelParams p;
  const Observed a = simulate(p, 200'000, 3);
  const Observed b = simulate(p, 200'000, 3);
  EXPECT_EQ(a.detections, b.detections);
  EXPECT_EQ(a.errors, b.errors);
}

TEST(Physics, ValidateNamesTheBadField) {
  ChannelParams p;
  EXPECT_TRUE(validate(p).ok());
  p.misalignment = 0.7;
  auto s = validate(p);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("misalignment"), std::string::npos);
  ProtocolParams q;
  EXPECT_TRUE(validate(q).ok());
  q.verify_hash_bits = 12;
  ASSERT_FALSE(validate(q).ok());
  EXPECT_NE(validate(q).error().message.find("verify_hash_bits"), std::string::npos);
}

// --- Detector dead time and afterpulsing ---

// FNV-1a over the packed events: a fingerprint of a whole run.
std::uint64_t fingerprint(const std::vector<DetectionEvent>& ev) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (const DetectionEvent& e : ev) {
    std::uint64_t w = 0;
    std::memcpy(&w, &e, sizeof(w));
    for (int b = 0; b < 8; ++b) {
      h = (h ^ ((w >> (8 * b)) & 0xFF)) * 0x100000001b3ULL;
    }
  }
  return h ^ ev.size();
}

std::vector<DetectionEvent> run_events(const ChannelParams& p, std::uint64_t pulses,
                                       std::uint64_t seed, SimulationTruth* truth = nullptr) {
  std::array<std::uint8_t, 16> key{};
  key[0] = static_cast<std::uint8_t>(seed);
  AlicePrf prf(key, source_choices(p, 0.5));
  ChannelSimulator sim(p, seed);
  std::vector<DetectionEvent> ev;
  sim.run(ev, prf, pulses);
  if (truth != nullptr) {
    *truth = sim.truth();
  }
  return ev;
}

ChannelParams decoy_at(double km) {
  ChannelParams p;
  p.length_km = km;
  p.source = SourceKind::kWeakCoherent;
  p.prob_decoy = 0.2;
  p.prob_vacuum = 0.1;
  return p;
}

TEST(Physics, DetectorOffIsBitIdenticalToTheIdealDetector) {
  // Fingerprints recorded with the simulator as it was before dead time and afterpulsing
  // existed (same seeds): the default-off parameters must not change one event.
  ChannelParams single;
  single.length_km = 10.0;
  EXPECT_EQ(fingerprint(run_events(single, 2'000'000, 11)), 0x667dfe4af12e809cULL);
  EXPECT_EQ(fingerprint(run_events(decoy_at(10.0), 2'000'000, 12)), 0x1585d13ec3e45fceULL);
  // A window without a probability, or a zero dead time, is still off.
  single.afterpulse_window_ns = 500.0;
  single.dead_time_ns = 0.0;
  EXPECT_EQ(fingerprint(run_events(single, 2'000'000, 11)), 0x667dfe4af12e809cULL);
  const ChannelTheory t = channel_theory(single);
  EXPECT_EQ(t.dead_pulses, 0U);
  EXPECT_EQ(t.gain, t.live_gain);
  EXPECT_EQ(t.afterpulse_fraction, 0.0);
}

TEST(Physics, DeadTimePulsesRoundUp) {
  EXPECT_EQ(pulses_in_ns(50.0, 1e9), 50U);   // exactly 50, despite 50e-9 * 1e9 rounding
  EXPECT_EQ(pulses_in_ns(50.0, 1e8), 5U);
  EXPECT_EQ(pulses_in_ns(45.0, 1e8), 5U);    // 4.5 -> 5
  EXPECT_EQ(pulses_in_ns(10.1, 1e8), 2U);    // 1.01 -> 2
  EXPECT_EQ(pulses_in_ns(0.0, 1e9), 0U);
}

// Simulated gain and QBER with dead time against the non-paralyzable correction
// gain' = Q / (1 + Q d); the QBER does not change (a blinded pulse is just lost).
void expect_dead_time_matches(double pulse_rate_hz, std::uint64_t expect_dead) {
  ChannelParams p;
  p.length_km = 10.0;
  p.dead_time_ns = 50.0;
  p.pulse_rate_hz = pulse_rate_hz;
  const ChannelTheory t = channel_theory(p);
  ChannelParams ideal = p;
  ideal.dead_time_ns = 0.0;
  const ChannelTheory t0 = channel_theory(ideal);
  ASSERT_EQ(t.dead_pulses, expect_dead);
  const double d = static_cast<double>(expect_dead);
  EXPECT_NEAR(t.gain, t0.gain / (1.0 + t0.gain * d), 1e-15);
  EXPECT_NEAR(t.qber, t0.qber, 1e-15);
  const std::uint64_t pulses = 20'000'000;
  const std::vector<DetectionEvent> ev = run_events(p, pulses, 21);
  for (std::size_t i = 1; i < ev.size(); ++i) {
    ASSERT_GT(ev[i].pulse, ev[i - 1].pulse + expect_dead) << i;  // nothing in a dead time
  }
  const Observed o = simulate(p, pulses, 21);
  const double n = static_cast<double>(pulses);
  // A renewal count varies less than a binomial one: the binomial sd is an upper bound.
  EXPECT_NEAR(static_cast<double>(o.detections), n * t.gain,
              5.0 * std::sqrt(n * t.gain * (1.0 - t.gain)));
  // Far below the ideal detector's count: the effect is large, not a rounding.
  EXPECT_LT(static_cast<double>(o.detections), 0.9 * n * t0.gain);
  const double s = static_cast<double>(o.sifted);
  EXPECT_NEAR(static_cast<double>(o.errors) / s, t.qber,
              5.0 * std::sqrt(t.qber * (1.0 - t.qber) / s));
}

TEST(Physics, DeadTimeGainMatchesNonParalyzableFormulaAt1GHz) {
  expect_dead_time_matches(1e9, 50);
}

TEST(Physics, DeadTimeGainMatchesNonParalyzableFormulaAt100MHz) {
  expect_dead_time_matches(1e8, 5);
}

TEST(Physics, DeadTimePerIntensityClassWithDecoys) {
  // Each class keeps its share of the live gain: gain_k' = gain' Q_k / Q.
  ChannelParams p = decoy_at(10.0);
  p.dead_time_ns = 20.0;
  const ChannelTheory t = channel_theory(p);
  SimulationTruth truth;
  const std::uint64_t pulses = 20'000'000;
  (void)run_events(p, pulses, 31, &truth);
  for (std::size_t k = 0; k < 3; ++k) {
    const ClassTheory& c = t.classes[k];
    EXPECT_NEAR(c.gain, t.gain * c.live_gain / t.live_gain, 1e-15);
    const double n = static_cast<double>(pulses) * c.prob;
    EXPECT_NEAR(static_cast<double>(truth.detections[k]), n * c.gain,
                5.0 * std::sqrt(n * c.gain) + 5.0)
        << "class " << k;
  }
  // A class that never clicks (true vacuum, no dark counts) stays at 0, not NaN.
  p.dark_count_prob = 0.0;
  p.afterpulse_prob = 0.01;
  const ChannelTheory v = channel_theory(p);
  EXPECT_GT(v.classes[2].gain, 0.0);  // afterpulses land on vacuum pulses too
  EXPECT_TRUE(std::isfinite(v.classes[2].qber));
  EXPECT_NEAR(v.classes[2].qber, 0.5, 1e-12);  // and only they do
  p.afterpulse_prob = 0.0;
  const ChannelTheory z = channel_theory(p);
  EXPECT_EQ(z.classes[2].gain, 0.0);
  EXPECT_EQ(z.classes[2].qber, 0.0);
}

TEST(Physics, AfterpulsingMatchesTheory) {
  // 10 km at 1 GHz, 20 ns dead time, 5 % afterpulses within 50 ns after it.
  ChannelParams p;
  p.length_km = 10.0;
  p.dead_time_ns = 20.0;
  p.afterpulse_prob = 0.05;
  p.afterpulse_window_ns = 50.0;
  const ChannelTheory t = channel_theory(p);
  ChannelParams no_ap = p;
  no_ap.afterpulse_prob = 0.0;
  const ChannelTheory t0 = channel_theory(no_ap);
  ASSERT_EQ(t.afterpulse_window_pulses, 50U);
  // a = p_ap (1 - (1 - Q)^W) / (W Q): most scheduled afterpulses lose the race at 10 km.
  const double q = t.live_gain;
  const double a = 0.05 * (1.0 - std::pow(1.0 - q, 50.0)) / (50.0 * q);
  EXPECT_NEAR(t.afterpulse_fraction, a, 1e-12);
  EXPECT_NEAR(t.qber, (1.0 - a) * t0.qber + a / 2.0, 1e-12);  // ~ +a/2
  EXPECT_GT(t.gain, t0.gain);  // afterpulses come sooner than the next real detection
  const std::uint64_t pulses = 40'000'000;
  SimulationTruth truth;
  (void)run_events(p, pulses, 41, &truth);
  const double ap = static_cast<double>(truth.afterpulses[0]);
  const double clicks = ap + static_cast<double>(truth.detections[0]);
  EXPECT_NEAR(ap / clicks, a, 5.0 * std::sqrt(a * (1.0 - a) / clicks));
  const Observed o = simulate(p, pulses, 41);
  const double n = static_cast<double>(pulses);
  EXPECT_NEAR(static_cast<double>(o.detections), n * t.gain,
              5.0 * std::sqrt(n * t.gain * (1.0 - t.gain)));
  const double s = static_cast<double>(o.sifted);
  const double qber = static_cast<double>(o.errors) / s;
  EXPECT_NEAR(qber, t.qber, 5.0 * std::sqrt(t.qber * (1.0 - t.qber) / s));
  EXPECT_GT(qber, t0.qber + 5.0 * std::sqrt(t0.qber * (1.0 - t0.qber) / s));  // visible
}

TEST(Physics, AfterpulsingWithoutDeadTimeAndDeterministic) {
  // No dead time, 2 % afterpulses in the next 10 pulses, at 0 km (a large Q: the race
  // with real detections matters) and at 50 km (almost every afterpulse fires).
  for (const double km : {0.0, 50.0}) {
    ChannelParams p;
    p.length_km = km;
    p.afterpulse_prob = 0.02;
    p.afterpulse_window_ns = 10.0;
    const ChannelTheory t = channel_theory(p);
    const std::uint64_t pulses = km == 0.0 ? 4'000'000 : 200'000'000;
    SimulationTruth truth;
    const std::vector<DetectionEvent> ev = run_events(p, pulses, 51, &truth);
    const double n = static_cast<double>(pulses);
    EXPECT_NEAR(static_cast<double>(ev.size()), n * t.gain,
                5.0 * std::sqrt(n * t.gain * (1.0 - t.gain)))
        << km;
    const double a = t.afterpulse_fraction;
    const double clicks = static_cast<double>(ev.size());
    EXPECT_NEAR(static_cast<double>(truth.afterpulses[0]) / clicks, a,
                5.0 * std::sqrt(a * (1.0 - a) / clicks))
        << km;
    EXPECT_EQ(fingerprint(run_events(p, pulses, 51)), fingerprint(ev));  // same seed
    EXPECT_NE(fingerprint(run_events(p, pulses, 52)), fingerprint(ev));
  }
}

TEST(Physics, ValidateDetectorFields) {
  ChannelParams p;
  p.dead_time_ns = -1.0;
  ASSERT_FALSE(validate(p).ok());
  EXPECT_NE(validate(p).error().message.find("dead_time_ns"), std::string::npos);
  p = ChannelParams{};
  p.afterpulse_prob = 0.7;
  ASSERT_FALSE(validate(p).ok());
  EXPECT_NE(validate(p).error().message.find("afterpulse_prob"), std::string::npos);
  p = ChannelParams{};
  p.afterpulse_prob = 0.1;
  p.afterpulse_window_ns = 0.0;
  ASSERT_FALSE(validate(p).ok());
  EXPECT_NE(validate(p).error().message.find("afterpulse_window_ns"), std::string::npos);
  p.afterpulse_window_ns = std::nan("");
  EXPECT_FALSE(validate(p).ok());
  p = ChannelParams{};
  p.dead_time_ns = 100.0;
  p.afterpulse_prob = 0.1;
  EXPECT_TRUE(validate(p).ok());
}

TEST(Physics, SimulationStatesEqualThePrfAndChangeNoEvent) {
  // run() with an AliceState output (what Alice's sifting reuses) must give the same events
  // and truth as without it, and each state must be the PRF's state of its event's pulse:
  // decoys, dead time and afterpulses (whose states are looked up separately), and the
  // single-photon source without decoys.
  ChannelParams decoy = decoy_at(10.0);
  decoy.dead_time_ns = 20.0;
  decoy.afterpulse_prob = 0.05;
  decoy.afterpulse_window_ns = 50.0;
  ChannelParams single;
  single.length_km = 5.0;
  single.afterpulse_prob = 0.05;
  single.afterpulse_window_ns = 50.0;
  for (const ChannelParams& p : {decoy, single}) {
    SimulationTruth truth;
    const std::vector<DetectionEvent> plain = run_events(p, 3'000'000, 41, &truth);
    std::array<std::uint8_t, 16> key{};
    key[0] = 41;
    AlicePrf prf(key, source_choices(p, 0.5));
    ChannelSimulator sim(p, 41);
    std::vector<DetectionEvent> ev;
    std::vector<AliceState> states;
    sim.run(ev, prf, 3'000'000, &states);
    ASSERT_GT(ev.size(), 1000U);
    EXPECT_EQ(fingerprint(ev), fingerprint(plain));
    EXPECT_EQ(sim.truth().afterpulses, truth.afterpulses);
    EXPECT_GT(sim.truth().afterpulses[0] + sim.truth().afterpulses[1] +
                  sim.truth().afterpulses[2],
              0U);
    ASSERT_EQ(states.size(), ev.size());
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < ev.size(); ++i) {
      const AliceState a = prf.at(ev[i].pulse);
      mismatches += (a.bit != states[i].bit || a.basis != states[i].basis ||
                     a.intensity != states[i].intensity)
                        ? 1
                        : 0;
    }
    EXPECT_EQ(mismatches, 0U);
  }
}

TEST(KeyLength, Formula) {
  // n = 10000, e = 0.01, leak = 1000, margin 0.05: 10000 (1 - h) - 1000 - 500.
  const double h = binary_entropy(0.01);
  const auto expect = static_cast<std::uint64_t>(std::floor(10000.0 * (1.0 - h) - 1500.0));
  EXPECT_EQ(secret_key_length(10000, 0.01, 1000, 0.05), expect - expect % 8);
  EXPECT_EQ(secret_key_length(10000, 0.3, 1000, 0.05), 0U);  // h(0.3) = 0.881
  EXPECT_EQ(secret_key_length(0, 0.0, 0, 0.0), 0U);
}

}  // namespace
}  // namespace qkd::core
