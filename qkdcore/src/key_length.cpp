#include "qkd/core/key_length.hpp"

#include <boost/math/distributions/binomial.hpp>

#include <algorithm>
#include <cmath>
#include <numbers>

namespace qkd::core {

double binary_entropy(double x) {
  if (!(x > 0.0) || !(x < 1.0)) {
    return 0.0;
  }
  return -x * std::log2(x) - (1.0 - x) * std::log2(1.0 - x);
}

std::uint64_t secret_key_length(std::uint64_t reconciled_bits, double qber,
                                std::uint64_t leaked_bits, double safety_margin) {
  const double n = static_cast<double>(reconciled_bits);
  const double m = std::floor(n * (1.0 - binary_entropy(qber)) -
                              static_cast<double>(leaked_bits) - safety_margin * n);
  if (!(m > 0.0)) {
    return 0;
  }
  const auto bits = static_cast<std::uint64_t>(m);
  return bits - (bits % 8);
}

// ------------------------------------------------------------------ analytic calculator --

namespace {
constexpr double kE0 = 0.5;  // error rate of a background (dark-count) detection
}  // namespace

double LinkModel::eta(double length_km) const {
  return eta_bob * line_eta(length_km);
}

double LinkModel::line_eta(double length_km) const {
  return std::pow(10.0, -(loss_db_per_km * length_km + insertion_loss_db) / 10.0);
}

LinkModel link_model_of(const ChannelParams& c, double f, double q) {
  LinkModel m;
  m.loss_db_per_km = c.loss_db_per_km;
  m.eta_bob = c.detector_efficiency;
  m.insertion_loss_db = c.insertion_loss_db;
  m.y0 = c.dark_count_prob;
  m.e_det = c.misalignment;
  m.f = f;
  m.q = q;
  return m;
}

const char* theory_curve_name(TheoryCurve c) {
  switch (c) {
    case TheoryCurve::kInfiniteDecoy:
      return "GLLP infinite decoys";
    case TheoryCurve::kVacuumWeakDecoy:
      return "vacuum + weak decoy";
    case TheoryCurve::kNoDecoy:
      return "GLLP no decoys";
    case TheoryCurve::kSinglePhoton:
      return "ideal single photons";
  }
  return "unknown";
}

namespace {

struct Gain {
  double q = 0.0;  // Q_mu = Y0 + 1 - exp(-eta mu)
  double e = 0.0;  // E_mu
};

Gain gain_of(const LinkModel& m, double eta, double mu) {
  Gain g;
  const double clicks = -std::expm1(-eta * mu);
  g.q = m.y0 + clicks;
  g.e = g.q > 0.0 ? (kE0 * m.y0 + m.e_det * clicks) / g.q : 0.0;
  return g;
}

}  // namespace

double rate_infinite_decoy(const LinkModel& m, double length_km, double mu) {
  const double eta = m.eta(length_km);
  const Gain g = gain_of(m, eta, mu);
  const double y1 = m.y0 + eta;
  const double e1 = (kE0 * m.y0 + m.e_det * eta) / y1;
  const double q1 = y1 * mu * std::exp(-mu);
  return m.q * (-g.q * m.f * binary_entropy(g.e) + q1 * (1.0 - binary_entropy(e1)));
}

double rate_vacuum_weak_decoy(const LinkModel& m, double length_km, double mu, double nu) {
  if (!(mu > nu) || !(nu > 0.0)) {
    return -1.0;
  }
  const double eta = m.eta(length_km);
  const Gain gm = gain_of(m, eta, mu);
  const Gain gn = gain_of(m, eta, nu);
  const double y1 = mu / (mu * nu - nu * nu) *
                    (gn.q * std::exp(nu) - gm.q * std::exp(mu) * nu * nu / (mu * mu) -
                     (mu * mu - nu * nu) / (mu * mu) * m.y0);
  if (!(y1 > 0.0)) {
    return -1.0;
  }
  const double e1 = std::min(0.5, (gn.e * gn.q * std::exp(nu) - kE0 * m.y0) / (y1 * nu));
  const double q1 = y1 * mu * std::exp(-mu);
  return m.q * (-gm.q * m.f * binary_entropy(gm.e) + q1 * (1.0 - binary_entropy(e1)));
}

double rate_no_decoy(const LinkModel& m, double length_km, double mu) {
  const double eta = m.eta(length_km);
  const Gain g = gain_of(m, eta, mu);
  const double delta = (1.0 - (1.0 + mu) * std::exp(-mu)) / g.q;
  if (!(delta < 1.0)) {
    return -1.0;
  }
  const double e = g.e / (1.0 - delta);
  return m.q * g.q *
         (-m.f * binary_entropy(g.e) +
          (1.0 - delta) * (1.0 - (e < 0.5 ? binary_entropy(e) : 1.0)));
}

double rate_single_photon(const LinkModel& m, double length_km) {
  const double eta = m.eta(length_km);
  const double y1 = m.y0 + eta;
  const double e1 = (kE0 * m.y0 + m.e_det * eta) / y1;
  return m.q * y1 * (1.0 - m.f * binary_entropy(e1) - binary_entropy(e1));
}

double plob_bound(double eta) {
  if (!(eta > 0.0)) {
    return 0.0;
  }
  if (eta >= 1.0) {
    return INFINITY;
  }
  return -std::log2(1.0 - eta);
}

namespace {

double curve_rate(const LinkModel& m, TheoryCurve c, double length_km, double mu, double nu) {
  switch (c) {
    case TheoryCurve::kInfiniteDecoy:
      return rate_infinite_decoy(m, length_km, mu);
    case TheoryCurve::kVacuumWeakDecoy:
      return rate_vacuum_weak_decoy(m, length_km, mu, nu);
    case TheoryCurve::kNoDecoy:
      return rate_no_decoy(m, length_km, mu);
    case TheoryCurve::kSinglePhoton:
      return rate_single_photon(m, length_km);
  }
  return -1.0;
}

}  // namespace

OptimalRate optimal_rate(const LinkModel& m, TheoryCurve c, double length_km, double nu) {
  if (c == TheoryCurve::kSinglePhoton) {
    return {std::max(0.0, rate_single_photon(m, length_km)), 1.0};
  }
  // Coarse log grid over [1e-5, 2], then golden-section search around the best point.
  constexpr int kGrid = 240;
  const double lo_exp = std::log(1e-5);
  const double hi_exp = std::log(2.0);
  double best_mu = 0.0;
  double best = -INFINITY;
  int best_i = 0;
  for (int i = 0; i <= kGrid; ++i) {
    const double mu = std::exp(lo_exp + (hi_exp - lo_exp) * i / kGrid);
    const double r = curve_rate(m, c, length_km, mu, nu);
    if (r > best) {
      best = r;
      best_mu = mu;
      best_i = i;
    }
  }
  double a = std::exp(lo_exp + (hi_exp - lo_exp) * std::max(0, best_i - 1) / kGrid);
  double b = std::exp(lo_exp + (hi_exp - lo_exp) * std::min(kGrid, best_i + 1) / kGrid);
  const double g = (std::sqrt(5.0) - 1.0) / 2.0;
  for (int it = 0; it < 60; ++it) {
    const double x1 = b - g * (b - a);
    const double x2 = a + g * (b - a);
    if (curve_rate(m, c, length_km, x1, nu) > curve_rate(m, c, length_km, x2, nu)) {
      b = x2;
    } else {
      a = x1;
    }
  }
  const double mid = 0.5 * (a + b);
  const double r = curve_rate(m, c, length_km, mid, nu);
  if (r > best) {
    best = r;
    best_mu = mid;
  }
  return {std::max(0.0, best), best_mu};
}

double max_distance(const LinkModel& m, TheoryCurve c, double nu) {
  double lo = 0.0;
  double hi = 1000.0;
  if (!(optimal_rate(m, c, lo, nu).rate > 0.0)) {
    return 0.0;
  }
  while (hi - lo > 0.01) {
    const double mid = 0.5 * (lo + hi);
    if (optimal_rate(m, c, mid, nu).rate > 0.0) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

double qber_threshold(double f) {
  double lo = 1e-9;
  double hi = 0.5;
  for (int i = 0; i < 100; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (1.0 - (1.0 + f) * binary_entropy(mid) > 0.0) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ------------------------------------------------------------------------- block bounds --

double qber_upper_bound(std::uint64_t k, std::uint64_t errors, double c) {
  if (k == 0 || errors >= k) {
    return 1.0;
  }
  // Clopper-Pearson: the largest rate p at which `errors` or fewer of `k` still has
  // probability alpha, alpha being the normal tail beyond c (c = 5: 2.9e-7). Exact for any
  // k, where a normal approximation around the estimate is too low for a small sample or
  // few errors (1,000 bits, none wrong: 1.50 %, not 0.50 %).
  const double alpha = 0.5 * std::erfc(c / std::numbers::sqrt2);
  if (!(alpha > 0.0)) {
    return 1.0;  // c beyond double's range: no bound
  }
  return boost::math::binomial_distribution<double>::find_upper_bound_on_p(
      static_cast<double>(k), static_cast<double>(errors), alpha);
}

double slutsky_tau(double e) {
  if (!(e < 1.0 / 3.0)) {
    return 1.0;
  }
  const double r = (1.0 - 3.0 * std::max(0.0, e)) / (1.0 - std::max(0.0, e));
  return std::clamp(1.0 + std::log2(1.0 - 0.5 * r * r), 0.0, 1.0);
}

namespace {

// Hoeffding deviation sqrt(n/2 ln(1/eps)); 0 when eps = 0 (asymptotic).
double hoeffding(double n, double eps) {
  if (!(eps > 0.0) || !(n > 0.0)) {
    return 0.0;
  }
  return std::sqrt(n / 2.0 * std::log(1.0 / eps));
}

double tau_n(const std::array<double, 3>& mu, const std::array<double, 3>& prob, int n) {
  double t = 0.0;
  for (std::size_t k = 0; k < 3; ++k) {
    t += prob[k] * std::exp(-mu[k]) * std::pow(mu[k], n) / std::tgamma(n + 1.0);
  }
  return t;
}

// Lim et al. 2014, eq. (B?) gamma: statistical correction from the test set's phase error
// to the key set's: sqrt((c + d)(1 - b) b / (c d ln 2) log2((c + d) / (c d (1 - b) b a^2))).
double lim_gamma(double a, double b, double c, double d) {
  if (!(c > 0.0) || !(d > 0.0) || !(b > 0.0) || !(b < 1.0)) {
    return b > 0.0 ? 0.5 : 0.0;
  }
  const double arg = (c + d) / (c * d * (1.0 - b) * b) / (a * a);
  if (!(arg > 1.0)) {
    return 0.0;
  }
  return std::sqrt((c + d) * (1.0 - b) * b / (c * d * std::log(2.0)) * std::log2(arg));
}

std::uint64_t floor8(double l) {
  if (!(l > 0.0)) {
    return 0;
  }
  const auto bits = static_cast<std::uint64_t>(std::floor(l));
  return bits - bits % 8;
}

}  // namespace

DecoyEstimate decoy_estimate(const std::array<double, 3>& mu, const std::array<double, 3>& prob,
                             const std::array<std::uint64_t, 3>& detections,
                             const std::array<std::uint64_t, 3>& errors, double pulses_in_set,
                             double eps) {
  DecoyEstimate d;
  const double m1 = mu[0];
  const double m2 = mu[1];
  const double m3 = mu[2];
  if (!(prob[0] > 0.0 && prob[1] > 0.0 && prob[2] > 0.0) || !(m1 > m2 + m3) || !(m2 > m3) ||
      !(m3 >= 0.0)) {
    return d;
  }
  const double tau0 = tau_n(mu, prob, 0);
  const double tau1 = tau_n(mu, prob, 1);
  double n_total = 0.0;
  double m_total = 0.0;
  for (std::size_t k = 0; k < 3; ++k) {
    n_total += static_cast<double>(detections[k]);
    m_total += static_cast<double>(errors[k]);
  }
  const double dn = hoeffding(n_total, eps);
  const double dm = hoeffding(m_total, eps);
  // Counts cannot be negative: a lower bound below zero is replaced by zero (still valid).
  auto scaled = [&](std::size_t k, double count, double delta) {
    return std::exp(mu[k]) / prob[k] * std::max(0.0, count + delta);
  };
  const auto n = [&](std::size_t k) { return static_cast<double>(detections[k]); };
  const auto e = [&](std::size_t k) { return static_cast<double>(errors[k]); };
  const double n1p = scaled(0, n(0), dn);
  const double n2m = scaled(1, n(1), -dn);
  const double n2p = scaled(1, n(1), dn);
  const double n3m = scaled(2, n(2), -dn);
  const double n3p = scaled(2, n(2), dn);
  d.s0 = std::max(0.0, tau0 * (m2 * n3m - m3 * n2p) / (m2 - m3));
  d.s1 = std::max(0.0, tau1 * m1 *
                           (n2m - n3p - (m2 * m2 - m3 * m3) / (m1 * m1) * (n1p - d.s0 / tau0)) /
                           (m1 * (m2 - m3) - m2 * m2 + m3 * m3));
  const double e2p = scaled(1, e(1), dm);
  const double e3m = scaled(2, e(2), -dm);
  d.v1 = std::max(0.0, tau1 * (e2p - e3m) / (m2 - m3));
  d.y1 = pulses_in_set > 0.0 ? d.s1 / (tau1 * pulses_in_set) : 0.0;
  d.valid = true;
  return d;
}

PhaseErrorEstimate phase_error(const BlockStatistics& s) {
  PhaseErrorEstimate e;
  if (s.z_basis_prob > 0.5) {
    e.bits = static_cast<double>(s.test_sifted[0]);
    e.errors = s.test_errors[0];
    if (s.test_sifted[0] > 0) {
      e.rate = static_cast<double>(s.test_errors[0]) / e.bits;
      e.upper = qber_upper_bound(s.test_sifted[0], s.test_errors[0], s.confidence_sd);
    }
  } else {
    e.bits = static_cast<double>(s.sample_bits);
    e.errors = s.sample_errors;
    if (s.sample_bits > 0) {
      e.rate = static_cast<double>(s.sample_errors) / e.bits;
      e.upper = qber_upper_bound(s.sample_bits, s.sample_errors, s.confidence_sd);
    }
  }
  return e;
}

KeyLengthResult block_key_length(const BlockStatistics& s) {
  KeyLengthResult r;
  r.bound = key_bound_name(s.bound);
  const double n = static_cast<double>(s.key_bits);
  const double k = static_cast<double>(s.sample_bits);
  r.qber = s.sample_bits > 0 ? static_cast<double>(s.sample_errors) / k : 0.0;
  r.qber_upper = qber_upper_bound(s.sample_bits, s.sample_errors, s.confidence_sd);
  const double leaked = static_cast<double>(s.leaked_bits);
  const double margin = s.safety_margin * n;
  if (s.key_bits == 0 || s.sample_bits == 0) {
    r.note = "no bits to distil";
    return r;
  }
  const bool wcp = s.source == SourceKind::kWeakCoherent;
  const bool biased = s.z_basis_prob > 0.5;
  // The phase-error rate, which sets what privacy amplification must remove. With both
  // bases in the key it is the bit-error rate in expectation, and the sample measures it.
  // With a biased choice the key is Z alone, and an attack on Z alone (measure in Z,
  // resend) leaves Z's error rate as it was: only the X basis, disclosed whole as the test
  // set, shows it (what the decoy bounds below already use).
  const auto phase = phase_error(s);
  if (biased && s.test_sifted[0] == 0) {
    r.note = "no X-basis bits of the signal class to estimate the phase error";
    return r;
  }
  const double pz = s.z_basis_prob;
  const double q_key = biased ? pz * pz : pz * pz + (1.0 - pz) * (1.0 - pz);
  const double q_test = biased ? (1.0 - pz) * (1.0 - pz) : q_key;
  const double pulses = static_cast<double>(s.pulses);
  // GLLP tagging for a weak coherent source without decoys: the multi-photon fraction of
  // the signal detections is at most Delta = P(n >= 2) / Q_signal.
  double delta = 0.0;
  double p_multi_given_nonvacuum = 0.0;
  if (wcp) {
    const double mu = s.mu[0];
    const double q_sig = static_cast<double>(s.key_basis_sifted[0]) / (pulses * s.prob[0] * q_key);
    delta = q_sig > 0.0 ? (1.0 - (1.0 + mu) * std::exp(-mu)) / q_sig : 1.0;
    p_multi_given_nonvacuum = (1.0 - std::exp(-mu) - mu * std::exp(-mu)) / -std::expm1(-mu);
  }
  auto tagged = [&](double e) {  // n (1 - Delta)(1 - h(e / (1 - Delta)))
    if (!(delta < 1.0)) {
      return -1.0;
    }
    const double et = e / (1.0 - delta);
    return n * (1.0 - delta) * (1.0 - (et < 0.5 ? binary_entropy(et) : 1.0));
  };
  double l = 0.0;
  switch (s.bound) {
    case KeyBound::kAsymptotic: {
      r.e1_upper = phase.rate;
      l = tagged(phase.rate) - leaked - margin;
      if (!(delta < 1.0)) {
        r.note = "multi-photon pulses may account for every detection (GLLP)";
      }
      break;
    }
    case KeyBound::kFiniteSingle: {
      const double kp = phase.bits;
      const double mus =
          std::sqrt((n + kp) / (n * kp) * (kp + 1.0) / kp * std::log(2.0 / s.epsilon_sec));
      r.e1_upper = phase.rate + mus;
      l = tagged(phase.rate + mus) - leaked -
          std::log2(2.0 / (s.epsilon_sec * s.epsilon_sec * s.epsilon_cor)) - margin;
      if (wcp) {
        r.note = "weak coherent source: multi-photon pulses tagged (GLLP)";
      }
      break;
    }
    case KeyBound::kDecoyAsymptotic:
    case KeyBound::kFiniteDecoy: {
      const bool finite = s.bound == KeyBound::kFiniteDecoy;
      if (!wcp) {
        r.note = "decoy bound needs a weak coherent source with decoys";
        return r;
      }
      // Failure probabilities: Lim's 21 terms plus two of our own, the Hoeffding bounds on
      // the signal share of the single-photon events and on the key's part of the signal
      // class (s1_signal and s1_key below): eps1 = eps/23.
      constexpr double kEpsTerms = 23.0;
      const double eps1 = finite ? s.epsilon_sec / kEpsTerms : 0.0;
      const std::array<std::uint64_t, 3> none{};
      const DecoyEstimate key_set =
          decoy_estimate(s.mu, s.prob, s.key_basis_sifted, none, pulses * q_key, eps1);
      const DecoyEstimate test_set =
          decoy_estimate(s.mu, s.prob, s.test_sifted, s.test_errors, pulses * q_test, eps1);
      if (!key_set.valid || !test_set.valid) {
        r.note = "decoy bound needs signal, weak decoy and vacuum classes (mu1 > mu2 + mu3)";
        return r;
      }
      r.y1_lower = key_set.y1;
      const double e1 = test_set.s1 > 0.0 ? std::min(0.5, test_set.v1 / test_set.s1) : 0.5;
      // Single-photon detections of the key basis fall into the signal class with
      // probability p1 mu1 exp(-mu1) / tau1; the key is a random part of those.
      const double tau1 = tau_n(s.mu, s.prob, 1);
      const double share = s.prob[0] * s.mu[0] * std::exp(-s.mu[0]) / tau1;
      double s1_signal = share * key_set.s1 - hoeffding(key_set.s1, eps1);
      const double n_sig = static_cast<double>(s.key_basis_sifted[0]);
      double s1_key = n_sig > 0.0 ? s1_signal * (n / n_sig) - hoeffding(n, eps1) : 0.0;
      s1_key = std::clamp(s1_key, 0.0, n);
      r.single_photon_bits_lower = s1_key;
      double phi = e1;
      if (finite) {
        phi = std::min(0.5, e1 + lim_gamma(eps1, e1, test_set.s1, s1_key));
      }
      r.e1_upper = phi;
      l = s1_key * (1.0 - binary_entropy(phi)) - leaked - margin;
      if (finite) {
        l -= 6.0 * std::log2(kEpsTerms / s.epsilon_sec) + std::log2(2.0 / s.epsilon_cor);
      }
      if (!(s1_key > 0.0) || phi >= 0.5) {
        r.note = "decoy estimate leaves no single-photon bits with a phase error below 1/2";
        l = 0.0;
      }
      break;
    }
    case KeyBound::kBennett92:
    case KeyBound::kSlutsky98: {
      const double c = s.confidence_sd;
      // Beam splitting: each multi-photon pulse may give Eve the bit.
      const double i_bs = n * p_multi_given_nonvacuum;
      const double var_bs = n * p_multi_given_nonvacuum * (1.0 - p_multi_given_nonvacuum);
      double t = 0.0;
      if (s.bound == KeyBound::kBennett92) {
        // Intercept-resend: (4 / sqrt 2) bits per error, variance (4 + 2 sqrt 2) per error.
        const double errors = std::max(r.qber, phase.rate) * n;
        const double i_ir = 4.0 / std::numbers::sqrt2 * errors;
        const double var_ir = (4.0 + 2.0 * std::numbers::sqrt2) * errors;
        t = i_ir + i_bs + c * std::sqrt(var_ir + var_bs);
        r.e1_upper = std::max(r.qber, phase.rate);
      } else {
        // Renyi information per bit at the error rate's upper bound (c sd).
        r.e1_upper = std::max(r.qber_upper, phase.upper);
        t = n * slutsky_tau(r.e1_upper) + i_bs + c * std::sqrt(var_bs);
      }
      l = n - t - leaked - margin;
      break;
    }
  }
  r.bits = std::min<std::uint64_t>(floor8(l), s.key_bits - s.key_bits % 8);
  return r;
}

}  // namespace qkd::core
