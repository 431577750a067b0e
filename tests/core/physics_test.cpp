#include "qkd/core/physics.hpp"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cmath>

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
