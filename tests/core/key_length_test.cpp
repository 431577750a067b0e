// The analytic calculator against the published figures (standard parameter set of Gobby,
// Yuan, Shields 2004) and the block bounds against their formulas.
#include "qkd/core/key_length.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <utility>

#include "qkd/core/link.hpp"

namespace qkd::core {
namespace {

TEST(Theory, ShorPreskillThresholds) {
  EXPECT_NEAR(qber_threshold(1.0), 0.110, 0.0005);   // 1 - 2 h(e) = 0
  EXPECT_NEAR(qber_threshold(1.22), 0.094, 0.0010);  // 1 - 2.22 h(e) = 0
}

TEST(Theory, GobbyYuanShieldsLargestDistances) {
  const LinkModel gys;  // alpha 0.21 dB/km, e_det 3.3 %, Y0 1.7e-6, eta_Bob 4.5 %, f 1.22
  // mu optimised at every length; the headline figures of Lo-Ma-Chen 2005, Ma et al. 2005.
  EXPECT_NEAR(max_distance(gys, TheoryCurve::kInfiniteDecoy), 142.0, 2.0);
  EXPECT_NEAR(max_distance(gys, TheoryCurve::kVacuumWeakDecoy, 0.05), 141.0, 2.0);
  EXPECT_NEAR(max_distance(gys, TheoryCurve::kNoDecoy), 40.0, 3.0);
  EXPECT_NEAR(max_distance(gys, TheoryCurve::kSinglePhoton), 171.0, 3.0);
  // The optimal signal intensity with infinite decoys is about 0.48.
  EXPECT_NEAR(optimal_rate(gys, TheoryCurve::kInfiniteDecoy, 100.0).mu, 0.48, 0.05);
  // Without decoys the optimum is of the order of the transmittance.
  EXPECT_LT(optimal_rate(gys, TheoryCurve::kNoDecoy, 20.0).mu, 0.05);
}

TEST(Theory, RatesOrderedAndBelowPlob) {
  const LinkModel gys;
  for (double l = 0.0; l <= 200.0; l += 5.0) {
    const double plob = plob_bound(gys.line_eta(l));
    const double inf = optimal_rate(gys, TheoryCurve::kInfiniteDecoy, l).rate;
    const double vw = optimal_rate(gys, TheoryCurve::kVacuumWeakDecoy, l, 0.05).rate;
    const double nd = optimal_rate(gys, TheoryCurve::kNoDecoy, l).rate;
    const double sp = optimal_rate(gys, TheoryCurve::kSinglePhoton, l).rate;
    EXPECT_LE(inf, plob) << l;
    EXPECT_LE(sp, plob) << l;
    EXPECT_LE(vw, inf * (1 + 1e-9) + 1e-18) << l;
    EXPECT_LE(nd, vw + 1e-18) << l;
  }
  EXPECT_NEAR(plob_bound(0.5), 1.0, 1e-12);
  EXPECT_EQ(plob_bound(0.0), 0.0);
}

TEST(Theory, ModelOfChannelParams) {
  ChannelParams c;
  c.length_km = 50.0;
  c.insertion_loss_db = 3.0;
  const LinkModel m = link_model_of(c, 1.16, 0.5);
  EXPECT_NEAR(m.eta(50.0), 0.1 * std::pow(10.0, -1.3), 1e-15);
  EXPECT_NEAR(m.line_eta(50.0), std::pow(10.0, -1.3), 1e-15);
}

// Expected counts of a channel fed to the decoy estimator reproduce the closed-form
// vacuum + weak decoy bound (eps = 0) and never exceed the true single-photon yield.
TEST(Decoy, AsymptoticEstimateMatchesClosedForm) {
  const LinkModel m;
  const double L = 60.0;
  const double eta = m.eta(L);
  const std::array<double, 3> mu{0.5, 0.1, 0.0};
  const std::array<double, 3> p{0.7, 0.2, 0.1};
  const double pulses = 1e12;
  std::array<std::uint64_t, 3> det{};
  std::array<std::uint64_t, 3> err{};
  for (std::size_t k = 0; k < 3; ++k) {
    const double clicks = -std::expm1(-eta * mu[k]);
    const double q = m.y0 + clicks;
    det[k] = static_cast<std::uint64_t>(std::llround(pulses * p[k] * q));
    err[k] = static_cast<std::uint64_t>(std::llround(pulses * p[k] * (0.5 * m.y0 + m.e_det * clicks)));
  }
  const DecoyEstimate d = decoy_estimate(mu, p, det, err, pulses, 0.0);
  ASSERT_TRUE(d.valid);
  const double qmu = m.y0 - std::expm1(-eta * 0.5);
  const double qnu = m.y0 - std::expm1(-eta * 0.1);
  const double y1 = 0.5 / (0.5 * 0.1 - 0.01) *
                    (qnu * std::exp(0.1) - qmu * std::exp(0.5) * 0.01 / 0.25 - (0.25 - 0.01) / 0.25 * m.y0);
  EXPECT_NEAR(d.y1 / y1, 1.0, 1e-4);
  EXPECT_LE(d.y1, m.y0 + eta);
  EXPECT_GT(d.y1, 0.9 * (m.y0 + eta));
  const double e1 = d.v1 / d.s1;
  EXPECT_GE(e1, (0.5 * m.y0 + m.e_det * eta) / (m.y0 + eta) - 1e-4);
  // Finite statistics: Hoeffding bounds lower s1.
  const DecoyEstimate f = decoy_estimate(mu, p, det, err, pulses, 1e-10 / 22);
  EXPECT_LT(f.s1, d.s1);
  EXPECT_GT(f.v1, d.v1);
  // Two classes only: not applicable.
  EXPECT_FALSE(decoy_estimate({0.5, 0.1, 0.0}, {0.8, 0.2, 0.0}, det, err, pulses, 0.0).valid);
}

TEST(Defense, SlutskyTau) {
  EXPECT_NEAR(slutsky_tau(0.0), 0.0, 1e-12);
  EXPECT_EQ(slutsky_tau(1.0 / 3.0), 1.0);
  double prev = 0.0;
  for (double e = 0.01; e < 0.33; e += 0.01) {
    EXPECT_GT(slutsky_tau(e), prev);
    prev = slutsky_tau(e);
  }
}

BlockStatistics single_photon_block(KeyBound b) {
  BlockStatistics s;
  s.bound = b;
  s.pulses = 10'000'000;
  s.mu = {1.0, 0.0, 0.0};
  s.prob = {1.0, 0.0, 0.0};
  s.key_basis_sifted = {200'000, 0, 0};
  s.test_sifted = {200'000, 0, 0};
  s.key_bits = 180'000;
  s.sample_bits = 20'000;
  s.sample_errors = 400;  // 2 %
  s.leaked_bits = 180'000 / 5;
  s.safety_margin = 0.0;
  return s;
}

// The QBER's upper bound (the abort test, and the defense functions' input) is exact: at
// the bound, `errors` or fewer of `k` has probability alpha = the normal tail beyond c
// (c = 5: 2.87e-7), checked against a binomial sum written here and the closed form for no
// error, 1 - alpha^(1/k). A normal approximation around the estimate gave 0.50 % for 1,000
// bits with none wrong, where the exact bound is 1.50 %.
TEST(BlockBounds, QberUpperBoundIsExact) {
  const double alpha = 0.5 * std::erfc(5.0 / std::sqrt(2.0));
  EXPECT_NEAR(qber_upper_bound(1000, 0, 5.0), 1.0 - std::pow(alpha, 1.0 / 1000), 1e-9);
  EXPECT_NEAR(qber_upper_bound(1000, 0, 5.0), 0.01495, 5e-5);
  const auto binomial_cdf = [](int k, int errors, double p) {
    double sum = 0.0;
    for (int i = 0; i <= errors; ++i) {
      sum += std::exp(std::lgamma(k + 1.0) - std::lgamma(i + 1.0) - std::lgamma(k - i + 1.0) +
                      i * std::log(p) + (k - i) * std::log1p(-p));
    }
    return sum;
  };
  for (const auto& [k, errors] : {std::pair{40, 4}, std::pair{4000, 4}, std::pair{4000, 400}}) {
    const double upper = qber_upper_bound(k, errors, 5.0);
    EXPECT_GT(upper, static_cast<double>(errors) / k);
    EXPECT_NEAR(binomial_cdf(k, errors, upper) / alpha, 1.0, 1e-6) << k << " " << errors;
  }
  EXPECT_EQ(qber_upper_bound(0, 0, 5.0), 1.0);     // no sample: no bound
  EXPECT_EQ(qber_upper_bound(10, 10, 5.0), 1.0);   // all wrong
  EXPECT_EQ(qber_upper_bound(1000, 10, 50.0), 1.0);  // a tail below double's range
}

TEST(BlockBounds, AsymptoticEqualsEarlierFormulaForSinglePhotons) {
  const BlockStatistics s = single_photon_block(KeyBound::kAsymptotic);
  const KeyLengthResult r = block_key_length(s);
  EXPECT_EQ(r.bits, secret_key_length(180'000, 0.02, 36'000, 0.0));
  EXPECT_EQ(r.bound, key_bound_name(KeyBound::kAsymptotic));
  EXPECT_NEAR(r.qber, 0.02, 1e-12);
  EXPECT_GT(r.qber_upper, 0.02);
}

TEST(BlockBounds, TomamichelFormula) {
  const BlockStatistics s = single_photon_block(KeyBound::kFiniteSingle);
  const double n = 180'000;
  const double k = 20'000;
  const double mus = std::sqrt((n + k) / (n * k) * (k + 1) / k * std::log(2.0 / 1e-10));
  const double l = n * (1 - binary_entropy(0.02 + mus)) - 36'000 -
                   std::log2(2.0 / (1e-20 * 1e-15));
  const auto expect = static_cast<std::uint64_t>(std::floor(l));
  const KeyLengthResult r = block_key_length(s);
  EXPECT_EQ(r.bits, expect - expect % 8);
  EXPECT_LT(r.bits, block_key_length(single_photon_block(KeyBound::kAsymptotic)).bits);
  EXPECT_NE(r.bound.find("Tomamichel"), std::string::npos);
}

TEST(BlockBounds, DefenseFunctionsNamedAndOrdered) {
  const KeyLengthResult b = block_key_length(single_photon_block(KeyBound::kBennett92));
  const KeyLengthResult sl = block_key_length(single_photon_block(KeyBound::kSlutsky98));
  EXPECT_NE(b.bound.find("BBBSS92"), std::string::npos);
  EXPECT_NE(sl.bound.find("Slutsky98"), std::string::npos);
  EXPECT_GT(b.bits, 0U);
  EXPECT_GT(sl.bits, 0U);
  // A larger c removes more.
  BlockStatistics s = single_photon_block(KeyBound::kSlutsky98);
  s.confidence_sd = 10.0;
  EXPECT_LT(block_key_length(s).bits, sl.bits);
  s = single_photon_block(KeyBound::kBennett92);
  s.confidence_sd = 10.0;
  EXPECT_LT(block_key_length(s).bits, b.bits);
}

// Biased basis choice: the key is Z alone, so the phase error comes from the X basis (the
// test set). Z at 1 % with X at 50 % (Eve measuring in Z) leaves no key under any bound;
// X at 1 % as well leaves the key Z's 1 % allows.
TEST(BlockBounds, BiasedBasisTakesThePhaseErrorFromTheXBasis) {
  for (const KeyBound b : {KeyBound::kAsymptotic, KeyBound::kFiniteSingle, KeyBound::kBennett92,
                           KeyBound::kSlutsky98}) {
    BlockStatistics s = single_photon_block(b);
    s.z_basis_prob = 0.9;
    s.sample_bits = 100'000;
    s.sample_errors = 1'000;
    s.key_bits = 900'000;
    s.leaked_bits = 100'000;
    s.key_basis_sifted = {1'000'000, 0, 0};
    s.test_sifted = {12'345, 0, 0};
    s.test_errors = {6'172, 0, 0};
    const PhaseErrorEstimate phase = phase_error(s);
    EXPECT_DOUBLE_EQ(phase.bits, 12'345.0);
    EXPECT_NEAR(phase.rate, 0.5, 1e-3);
    EXPECT_EQ(block_key_length(s).bits, 0U) << key_bound_name(b);
    EXPECT_GE(block_key_length(s).e1_upper, 0.49) << key_bound_name(b);

    s.test_errors = {123, 0, 0};
    EXPECT_GT(block_key_length(s).bits, 100'000U) << key_bound_name(b);
    s.test_sifted = {0, 0, 0};
    s.test_errors = {0, 0, 0};
    EXPECT_EQ(block_key_length(s).bits, 0U) << key_bound_name(b);
    EXPECT_FALSE(block_key_length(s).note.empty());
  }
}

TEST(BlockBounds, DecoyBoundNeedsDecoys) {
  const KeyLengthResult r = block_key_length(single_photon_block(KeyBound::kDecoyAsymptotic));
  EXPECT_EQ(r.bits, 0U);
  EXPECT_FALSE(r.note.empty());
}

TEST(BlockBounds, KeyBoundNamesParse) {
  for (const char* n : {"asymptotic", "decoy", "finite", "finite-decoy", "bbbss92", "slutsky98"}) {
    const auto b = parse_key_bound(n);
    ASSERT_TRUE(b.has_value()) << n;
    EXPECT_STRNE(key_bound_name(*b), "unknown");
  }
  EXPECT_FALSE(parse_key_bound("nonsense").has_value());
}

}  // namespace
}  // namespace qkd::core
