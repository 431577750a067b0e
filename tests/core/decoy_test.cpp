// Weak coherent source with decoy states, eavesdroppers and a cut fiber: the simulator
// against the channel formulas, and whole blocks against the decoy-state analysis.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <optional>
#include <thread>

#include "qkd/core/key_length.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/physics.hpp"

namespace qkd::core {
namespace {

const std::vector<std::uint8_t> kPsk(32, 0x42);

ChannelParams decoy_channel(double length_km) {
  ChannelParams c;
  c.length_km = length_km;
  c.source = SourceKind::kWeakCoherent;
  c.mu_signal = 0.5;
  c.mu_decoy = 0.1;
  c.mu_vacuum = 0.0;
  c.prob_decoy = 0.2;
  c.prob_vacuum = 0.1;
  return c;
}

struct ClassObserved {
  std::array<std::uint64_t, 3> detections{};
  std::array<std::uint64_t, 3> sifted{};
  std::array<std::uint64_t, 3> errors{};
};

// Runs the channel and measures as Bob does (random basis; other basis or dark -> random
// bit), sifting against Alice's PRF, per intensity class.
ClassObserved simulate(const ChannelParams& p, std::uint64_t pulses, std::uint64_t seed,
                       SimulationTruth* truth = nullptr) {
  std::array<std::uint8_t, 16> key{};
  key[0] = static_cast<std::uint8_t>(seed);
  AlicePrf prf(key, source_choices(p, 0.5));
  ChannelSimulator sim(p, seed);
  std::vector<DetectionEvent> ev;
  sim.run(ev, prf, pulses);
  Xoshiro256ss bob(seed + 1000);
  ClassObserved o;
  for (const DetectionEvent& e : ev) {
    const bool basis = bob.bit();
    const bool result = (e.dark || basis != e.basis) ? bob.bit() : e.bit;
    const AliceState a = prf.at(e.pulse);
    ++o.detections[a.intensity];
    if (a.basis == basis) {
      ++o.sifted[a.intensity];
      o.errors[a.intensity] += (a.bit != result) ? 1 : 0;
    }
  }
  if (truth != nullptr) {
    *truth = sim.truth();
  }
  return o;
}

void expect_classes_match_theory(const ChannelParams& p, std::uint64_t pulses) {
  const ChannelTheory t = channel_theory(p);
  const ClassObserved o = simulate(p, pulses, 91);
  for (std::size_t k = 0; k < 3; ++k) {
    const ClassTheory& c = t.classes[k];
    const double n = static_cast<double>(pulses) * c.prob;  // pulses of the class (binomial)
    const double mean = n * c.gain;
    // Detections: binomial(pulses, prob * gain).
    const double sd = std::sqrt(static_cast<double>(pulses) * c.prob * c.gain);
    EXPECT_NEAR(static_cast<double>(o.detections[k]), mean, 5.0 * sd + 1.0)
        << "class " << k << " L=" << p.length_km;
    const double s = static_cast<double>(o.sifted[k]);
    if (s > 100) {
      const double e = static_cast<double>(o.errors[k]) / s;
      EXPECT_NEAR(e, c.qber, 5.0 * std::sqrt(c.qber * (1.0 - c.qber) / s) + 1e-9)
          << "class " << k << " L=" << p.length_km;
    }
  }
}

TEST(Decoy, PerClassGainAndQberMatchTheoryOverDistance) {
  for (double l : {0.0, 25.0, 60.0}) {
    ChannelParams p = decoy_channel(l);
    p.dark_count_prob = 2e-5;  // makes the vacuum class and the dark-count term visible
    p.misalignment = 0.02;
    expect_classes_match_theory(p, 100'000'000);
  }
}

TEST(Decoy, TheoryClosedForms) {
  ChannelParams p = decoy_channel(50.0);
  p.insertion_loss_db = 1.0;
  const ChannelTheory t = channel_theory(p);
  const double eta = 0.1 * std::pow(10.0, -1.1);
  EXPECT_NEAR(t.transmittance, eta, 1e-15);
  for (std::size_t k = 0; k < 3; ++k) {
    const double mu = t.classes[k].mu;
    const double clicks = -std::expm1(-eta * mu);
    EXPECT_NEAR(t.classes[k].gain, 1.0 - (1.0 - 1e-6) * (1.0 - clicks), 1e-15);
    EXPECT_NEAR(t.classes[k].qber * t.classes[k].gain, 0.01 * clicks + (1 - clicks) * 0.5e-6,
                1e-15);
  }
  EXPECT_NEAR(t.y1, 1.0 - (1.0 - 1e-6) * (1.0 - eta), 1e-15);
}

TEST(Decoy, PhotonNumberOfDetectedPulsesFollowsPoisson) {
  ChannelParams p = decoy_channel(25.0);
  SimulationTruth truth;
  const std::uint64_t pulses = 50'000'000;
  (void)simulate(p, pulses, 17, &truth);
  const ChannelTheory t = channel_theory(p);
  for (std::size_t k = 0; k < 2; ++k) {
    const double mu = t.classes[k].mu;
    // Single-photon detections of class k: pulses p_k mu e^-mu Y1.
    const double mean = static_cast<double>(pulses) * t.classes[k].prob * mu * std::exp(-mu) * t.y1;
    EXPECT_NEAR(static_cast<double>(truth.single_photon[k]), mean, 5.0 * std::sqrt(mean)) << k;
  }
}

TEST(Decoy, InterceptResendAddsQuarterOfFractionPerClass) {
  ChannelParams p = decoy_channel(10.0);
  p.eve_intercept_fraction = 0.5;
  expect_classes_match_theory(p, 20'000'000);
  const ChannelTheory t = channel_theory(p);
  ChannelParams clean = p;
  clean.eve_intercept_fraction = 0.0;
  const ChannelTheory t0 = channel_theory(clean);
  // Signal class: almost every detection is a photon, so the QBER rises by about p/4.
  EXPECT_NEAR(t.classes[0].qber - t0.classes[0].qber, 0.125 * (1.0 - 2.0 * p.misalignment), 2e-3);
}

TEST(Decoy, PhotonNumberSplittingKeepsSignalGainOnly) {
  ChannelParams p = decoy_channel(40.0);
  const ChannelTheory normal = channel_theory(p);
  p.eve_photon_number_splitting = true;
  const ChannelTheory pns = channel_theory(p);
  EXPECT_GT(pns.pns_forward, 0.0);
  EXPECT_LT(pns.pns_forward, 1.0);
  EXPECT_NEAR(pns.classes[0].gain / normal.classes[0].gain, 1.0, 1e-9);
  EXPECT_LT(pns.classes[1].gain, 0.5 * normal.classes[1].gain);  // the decoys give it away
  EXPECT_NEAR(pns.y1, p.dark_count_prob, 1e-15);                 // single photons blocked
  EXPECT_NEAR(pns.classes[0].qber, normal.classes[0].qber, 0.002);  // no added errors
  expect_classes_match_theory(p, 50'000'000);
}

TEST(Decoy, CutFiberGivesOnlyDarkCounts) {
  ChannelParams p = decoy_channel(20.0);
  p.fiber_cut = true;
  p.dark_count_prob = 1e-4;
  const ChannelTheory t = channel_theory(p);
  EXPECT_EQ(t.transmittance, 0.0);
  EXPECT_NEAR(t.gain, 1e-4, 1e-15);
  EXPECT_NEAR(t.qber, 0.5, 1e-12);
  expect_classes_match_theory(p, 10'000'000);
}

TEST(Decoy, PrfChoicesFollowProbabilities) {
  std::array<std::uint8_t, 16> key{};
  key[3] = 9;
  SourceChoices ch;
  ch.z_basis_prob = 0.9;
  ch.class_prob = {0.7, 0.2, 0.1};
  AlicePrf prf(key, ch);
  const int n = 400'000;
  std::array<int, 3> cls{};
  int z = 0;
  int ones = 0;
  for (int i = 0; i < n; ++i) {
    const AliceState s = prf.at(static_cast<std::uint64_t>(i) * 3);
    ++cls[s.intensity];
    z += s.basis ? 0 : 1;
    ones += s.bit ? 1 : 0;
  }
  auto near = [&](int count, double p) {
    EXPECT_NEAR(count, n * p, 5.0 * std::sqrt(n * p * (1 - p)));
  };
  near(cls[0], 0.7);
  near(cls[1], 0.2);
  near(cls[2], 0.1);
  near(z, 0.9);
  near(ones, 0.5);
}

TEST(Decoy, ChannelDeterministicForSeed) {
  const ChannelParams p = decoy_channel(30.0);
  SimulationTruth a;
  SimulationTruth b;
  const ClassObserved x = simulate(p, 5'000'000, 4, &a);
  const ClassObserved y = simulate(p, 5'000'000, 4, &b);
  EXPECT_EQ(x.detections, y.detections);
  EXPECT_EQ(x.errors, y.errors);
  EXPECT_EQ(a.single_photon, b.single_photon);
}

// ---------------------------------------------------------------------- whole blocks --

struct Pair {
  Result<BlockResult> alice;
  Result<BlockResult> bob;
};

std::vector<Pair> run_blocks(const ChannelParams& ch, const ProtocolParams& pp, int blocks,
                             std::uint64_t seed = 1) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  AliceEndpoint alice(ch, pp, kPsk, seed, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, seed + 1, *q.b, *c.b);
  std::vector<Pair> out;
  for (int b = 0; b < blocks; ++b) {
    std::optional<Result<BlockResult>> rb;
    std::thread t([&] { rb.emplace(bob.run_block()); });
    auto ra = alice.run_block();
    t.join();
    out.push_back(Pair{std::move(ra), std::move(*rb)});
  }
  return out;
}

ProtocolParams decoy_protocol(std::uint64_t pulses, KeyBound bound) {
  ProtocolParams pp;
  pp.pulses_per_block = pulses;
  pp.key_bound = bound;
  pp.message_timeout = std::chrono::milliseconds(20'000);
  return pp;
}

TEST(DecoyLink, BothEndsAgreeAndNameTheBound) {
  const ChannelParams ch = decoy_channel(20.0);
  const ProtocolParams pp = decoy_protocol(4'000'000, KeyBound::kDecoyAsymptotic);
  auto r = run_blocks(ch, pp, 1);
  ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
  ASSERT_TRUE(r[0].bob.ok()) << r[0].bob.error().message;
  const BlockResult& a = *r[0].alice;
  const BlockResult& b = *r[0].bob;
  EXPECT_FALSE(a.aborted) << a.abort_reason;
  EXPECT_EQ(a.secret_bits, b.secret_bits);
  EXPECT_EQ(a.auth_bits_consumed, b.auth_bits_consumed);
  // The privacy-amplification output; at 4e6 decoy pulses most of it repays the block's
  // Wegman-Carter pads (the net key may be 0).
  EXPECT_GT(a.secret_bits + a.auth_bits_consumed, 0U);
  EXPECT_TRUE(constant_time_equal(a.key.span(), b.key.span()));
  EXPECT_EQ(a.key_bound, key_bound_name(KeyBound::kDecoyAsymptotic));
  EXPECT_EQ(a.key_bound, b.key_bound);
  EXPECT_EQ(a.y1_lower, b.y1_lower);
  EXPECT_EQ(a.e1_upper, b.e1_upper);
  for (std::size_t k = 0; k < 3; ++k) {
    EXPECT_EQ(a.intensity[k].sifted, b.intensity[k].sifted);
    EXPECT_EQ(a.intensity[k].errors, b.intensity[k].errors);
  }
  EXPECT_GT(a.intensity[1].sifted, 0U);  // (vacuum: about 0.2 expected at Y0 = 1e-6)
  // Decoy and vacuum classes are disclosed entirely.
  EXPECT_EQ(a.intensity[1].disclosed, a.intensity[1].sifted);
  EXPECT_EQ(a.intensity[2].disclosed, a.intensity[2].sifted);
  // The asymptotic decoy formula applied to one block's counts is an estimate of the
  // single-photon yield, not a bound: it falls on either side of the true Y1 (above it in
  // 8 of 20 blocks of 2e6 pulses in one study), so it is only checked to be near it.
  // FiniteDecoyBoundsHoldInEveryBlock checks the bound that holds.
  const ChannelTheory t = channel_theory(ch);
  EXPECT_LT(a.y1_lower, t.y1 * 1.05);
  EXPECT_GT(a.y1_lower, t.y1 * 0.5);
  EXPECT_GT(a.qber_upper, a.qber);
}

// The finite-key decoy bounds (Lim et al. 2014, failure probability eps_sec = 1e-10 in all)
// hold block by block: in each of 10 blocks of 5e7 pulses at 20 km the single-photon
// yield's lower bound is below the channel's true Y1 and the phase error's upper bound above
// its true e1, where the asymptotic estimate misses in about 4 blocks of 10.
TEST(DecoyLink, FiniteDecoyBoundsHoldInEveryBlock) {
  const ChannelParams ch = decoy_channel(20.0);
  const ChannelTheory t = channel_theory(ch);
  auto r = run_blocks(ch, decoy_protocol(50'000'000, KeyBound::kFiniteDecoy), 10, 7);
  for (std::size_t i = 0; i < r.size(); ++i) {
    ASSERT_TRUE(r[i].alice.ok()) << r[i].alice.error().message;
    const BlockResult& a = *r[i].alice;
    EXPECT_FALSE(a.aborted) << a.abort_reason;
    EXPECT_EQ(a.key_bound, key_bound_name(KeyBound::kFiniteDecoy));
    EXPECT_GT(a.y1_lower, 0.0) << "block " << i;
    EXPECT_LT(a.y1_lower, t.y1) << "block " << i;
    EXPECT_GT(a.e1_upper, t.e1) << "block " << i;
  }
}

TEST(DecoyLink, InterceptResendOnHalfOrMoreAbortsEveryBlock) {
  for (double f : {0.5, 1.0}) {
    ChannelParams ch = decoy_channel(20.0);
    ch.eve_intercept_fraction = f;
    auto r = run_blocks(ch, decoy_protocol(1'000'000, KeyBound::kDecoyAsymptotic), 3);
    for (Pair& p : r) {
      ASSERT_TRUE(p.alice.ok()) << p.alice.error().message;
      EXPECT_TRUE(p.alice->aborted) << "f=" << f;
      EXPECT_NE(p.alice->abort_reason.find("QBER"), std::string::npos);
    }
  }
}

TEST(DecoyLink, PhotonNumberSplittingRevealedByDecoyEstimate) {
  ChannelParams ch = decoy_channel(40.0);
  ch.eve_photon_number_splitting = true;
  auto r = run_blocks(ch, decoy_protocol(20'000'000, KeyBound::kDecoyAsymptotic), 1);
  ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
  const BlockResult& a = *r[0].alice;
  EXPECT_FALSE(a.aborted) << a.abort_reason;  // the QBER alone does not see Eve
  EXPECT_LT(a.qber, 0.03);
  EXPECT_EQ(a.secret_bits, 0U);                 // the decoy estimate does
  const ChannelTheory clean = channel_theory(decoy_channel(40.0));
  EXPECT_LT(a.y1_lower, 0.2 * clean.y1);
  // The signal gain alone would not have shown anything.
  EXPECT_NEAR(a.intensity[0].gain / clean.classes[0].gain, 1.0, 0.05);
}

TEST(DecoyLink, CutFiberAborts) {
  ChannelParams ch = decoy_channel(20.0);
  ch.fiber_cut = true;
  ch.dark_count_prob = 1e-3;
  auto r = run_blocks(ch, decoy_protocol(1'000'000, KeyBound::kDecoyAsymptotic), 1);
  ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
  EXPECT_TRUE(r[0].alice->aborted);
  EXPECT_EQ(r[0].alice->secret_bits, 0U);
}

TEST(DecoyLink, BiasedBasisKeepsMoreBits) {
  ChannelParams ch = decoy_channel(20.0);
  ProtocolParams pp = decoy_protocol(4'000'000, KeyBound::kDecoyAsymptotic);
  pp.z_basis_prob = 0.9;
  auto r = run_blocks(ch, pp, 1);
  ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
  ASSERT_TRUE(r[0].bob.ok()) << r[0].bob.error().message;
  const BlockResult& a = *r[0].alice;
  EXPECT_FALSE(a.aborted) << a.abort_reason;
  const double frac = static_cast<double>(a.sifted_bits) / static_cast<double>(a.detections);
  EXPECT_NEAR(frac, 0.82, 0.01);  // 0.9^2 + 0.1^2
  EXPECT_GT(a.secret_bits + a.auth_bits_consumed, 0U);  // PA output (net may be 0: auth)
  EXPECT_EQ(a.secret_bits, r[0].bob->secret_bits);
}

const char* a_name(KeyBound b) { return key_bound_name(b); }

TEST(DecoyLink, FiniteKeyBoundsGiveLessThanAsymptotic) {
  const ChannelParams ch = decoy_channel(10.0);
  std::uint64_t asym = 0;
  for (KeyBound b : {KeyBound::kDecoyAsymptotic, KeyBound::kFiniteDecoy}) {
    auto r = run_blocks(ch, decoy_protocol(100'000'000, b), 1, 5);
    std::printf("%s: %llu secret bits of %llu, y1_L %.4g, e1_U %.4g\n", a_name(b),
                static_cast<unsigned long long>(r[0].alice.ok() ? r[0].alice->secret_bits : 0),
                static_cast<unsigned long long>(r[0].alice.ok() ? r[0].alice->reconciled_bits : 0),
                r[0].alice.ok() ? r[0].alice->y1_lower : 0.0,
                r[0].alice.ok() ? r[0].alice->e1_upper : 0.0);
    ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
    const BlockResult& a = *r[0].alice;
    EXPECT_EQ(a.key_bound, key_bound_name(b));
    EXPECT_GT(a.secret_bits, 0U) << a.key_bound;
    const std::uint64_t gross = a.secret_bits + a.auth_bits_consumed;
    if (b == KeyBound::kDecoyAsymptotic) {
      asym = gross;
    } else {
      EXPECT_LT(gross, asym);
    }
  }
}

// The simulated key with the measured reconciliation efficiency against the vacuum + weak
// decoy formula evaluated with the same f, at a large block (1e8 pulses): within 5 %, and
// never above the PLOB bound.
TEST(DecoyLink, SimulatedRateWithinFivePercentOfAsymptoticFormula) {
  const ChannelParams ch = decoy_channel(25.0);
  ProtocolParams pp = decoy_protocol(100'000'000, KeyBound::kDecoyAsymptotic);
  pp.safety_margin = 0.0;
  auto r = run_blocks(ch, pp, 1, 11);
  ASSERT_TRUE(r[0].alice.ok()) << r[0].alice.error().message;
  const BlockResult& a = *r[0].alice;
  ASSERT_FALSE(a.aborted) << a.abort_reason;
  const double n = static_cast<double>(a.reconciled_bits);
  const double f = static_cast<double>(a.leaked_bits) / (n * binary_entropy(a.qber));
  LinkModel m = link_model_of(ch, f, 0.5);
  // Per signal pulse, then scaled to this block's signal pulses and key fraction.
  const double rate = rate_vacuum_weak_decoy(m, ch.length_km, ch.mu_signal, ch.mu_decoy);
  const double expected = rate * static_cast<double>(a.pulses) * (1.0 - ch.prob_decoy - ch.prob_vacuum) *
                          (1.0 - pp.sample_fraction);
  // The privacy-amplification output (net key + what Wegman-Carter authentication took back).
  const double measured = static_cast<double>(a.secret_bits + a.auth_bits_consumed);
  std::printf("secret %.0f bits, formula %.0f bits (f = %.3f), ratio %.4f\n", measured,
              expected, f, measured / expected);
  EXPECT_NEAR(measured / expected, 1.0, 0.05);
  EXPECT_LT(measured / static_cast<double>(a.pulses),
            plob_bound(channel_theory(ch).channel_transmittance));
}

}  // namespace
}  // namespace qkd::core
