#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>

#include "qkd/core/link.hpp"

namespace qkd::core {
namespace {

Error bad(const char* field, const std::string& why) {
  return make_error(ErrorCode::kInvalidArgument, std::string(field) + " " + why);
}

bool in(double v, double lo, double hi) { return std::isfinite(v) && v >= lo && v <= hi; }

constexpr std::uint32_t kMaxBiconfRounds = 64;
const double kMinEpsilonCor = std::ldexp(1.0, -256);

// ceil(log2(1 / eps)) for eps in [2^-256, 0.5] (log2 is exact at powers of two, so
// eps = 2^-k gives k).
std::uint32_t min_tag_bits(double eps) {
  if (!(eps > 0.0)) {
    return 256;
  }
  const double t = std::ceil(-std::log2(eps));
  return static_cast<std::uint32_t>(std::clamp(t, 1.0, 256.0));
}

}  // namespace

std::uint32_t verify_tag_bits(const ProtocolParams& p) {
  return std::max(min_tag_bits(p.epsilon_cor), p.verify_hash_bits);
}

Status validate(const ChannelParams& p) {
  if (!in(p.length_km, 0.0, 1e5)) {
    return bad("length_km", "must be in [0, 1e5]");
  }
  if (!in(p.loss_db_per_km, 0.0, 100.0)) {
    return bad("loss_db_per_km", "must be in [0, 100]");
  }
  if (!in(p.detector_efficiency, 0.0, 1.0) || p.detector_efficiency <= 0.0) {
    return bad("detector_efficiency", "must be in (0, 1]");
  }
  if (!in(p.dark_count_prob, 0.0, 0.5)) {
    return bad("dark_count_prob", "must be in [0, 0.5]");
  }
  if (!in(p.misalignment, 0.0, 0.5)) {
    return bad("misalignment", "must be in [0, 0.5]");
  }
  if (!in(p.eve_intercept_fraction, 0.0, 1.0)) {
    return bad("eve_intercept_fraction", "must be in [0, 1]");
  }
  if (!in(p.eve_z_basis_prob, 0.0, 1.0)) {
    return bad("eve_z_basis_prob", "must be in [0, 1]");
  }
  if (!in(p.pulse_rate_hz, kMinPulseRateHz, kMaxPulseRateHz)) {
    return bad("pulse_rate_hz", "must be in [1, 1e15]");
  }
  if (p.source != SourceKind::kSinglePhoton && p.source != SourceKind::kWeakCoherent) {
    return bad("source", "must be single_photon or weak_coherent");
  }
  if (!in(p.mu_signal, 0.0, 20.0) || p.mu_signal <= 0.0) {
    return bad("mu_signal", "must be in (0, 20]");
  }
  if (!in(p.mu_decoy, 0.0, 20.0) || p.mu_decoy >= p.mu_signal) {
    return bad("mu_decoy", "must be in [0, mu_signal)");
  }
  if (!in(p.mu_vacuum, 0.0, 20.0) || (p.mu_vacuum >= p.mu_decoy && p.mu_vacuum > 0.0)) {
    return bad("mu_vacuum", "must be in [0, mu_decoy)");
  }
  if (!in(p.prob_decoy, 0.0, 1.0) || !in(p.prob_vacuum, 0.0, 1.0) ||
      p.prob_decoy + p.prob_vacuum >= 1.0) {
    return bad(in(p.prob_decoy, 0.0, 1.0) ? "prob_vacuum" : "prob_decoy",
               "must be in [0, 1) with prob_decoy + prob_vacuum < 1");
  }
  if (p.source == SourceKind::kSinglePhoton && (p.prob_decoy > 0.0 || p.prob_vacuum > 0.0)) {
    return bad("prob_decoy", "decoy classes need source = weak_coherent");
  }
  if (!in(p.insertion_loss_db, 0.0, 200.0)) {
    return bad("insertion_loss_db", "must be in [0, 200]");
  }
  // Dead time and afterpulse window in pulses must stay below 2^31 (1e6 ns at 1 GHz is 1e6).
  if (!in(p.dead_time_ns, 0.0, 1e9) || p.dead_time_ns * 1e-9 * p.pulse_rate_hz > 2e9) {
    return bad("dead_time_ns", "must be in [0, 1e9] and below 2e9 pulses");
  }
  if (!in(p.afterpulse_prob, 0.0, 0.5)) {
    return bad("afterpulse_prob", "must be in [0, 0.5]");
  }
  if (!in(p.afterpulse_window_ns, 0.0, 1e9) ||
      p.afterpulse_window_ns * 1e-9 * p.pulse_rate_hz > 2e9 ||
      (p.afterpulse_prob > 0.0 && p.afterpulse_window_ns <= 0.0)) {
    return bad("afterpulse_window_ns", "must be in (0, 1e9] and below 2e9 pulses");
  }
  return ok_status();
}

const char* key_bound_name(KeyBound b) {
  switch (b) {
    case KeyBound::kAsymptotic:
      return "GLLP asymptotic";
    case KeyBound::kDecoyAsymptotic:
      return "vacuum+weak decoy asymptotic (Ma-Qi-Zhao-Lo 2005)";
    case KeyBound::kFiniteSingle:
      return "finite-key single photon (Tomamichel-Lim-Gisin-Renner 2012)";
    case KeyBound::kFiniteDecoy:
      return "finite-key two-decoy Hoeffding (Lim-Curty-Walenta-Xu-Zbinden 2014)";
    case KeyBound::kBennett92:
      return "BBBSS92 defense function";
    case KeyBound::kSlutsky98:
      return "Slutsky98 defense function";
  }
  return "unknown";
}

std::optional<KeyBound> parse_key_bound(std::string_view name) {
  if (name == "asymptotic" || name == "gllp") {
    return KeyBound::kAsymptotic;
  }
  if (name == "decoy" || name == "decoy-asymptotic") {
    return KeyBound::kDecoyAsymptotic;
  }
  if (name == "finite" || name == "finite-single") {
    return KeyBound::kFiniteSingle;
  }
  if (name == "finite-decoy" || name == "lim2014") {
    return KeyBound::kFiniteDecoy;
  }
  if (name == "bbbss92" || name == "bennett92") {
    return KeyBound::kBennett92;
  }
  if (name == "slutsky98" || name == "slutsky") {
    return KeyBound::kSlutsky98;
  }
  return std::nullopt;
}

const char* auth_mode_name(AuthMode m) {
  switch (m) {
    case AuthMode::kWegmanCarter:
      return "Wegman-Carter (GF(2^128) polynomial hash, one-time-pad tags)";
    case AuthMode::kHmac:
      return "HMAC-SHA256";
  }
  return "unknown";
}

std::optional<AuthMode> parse_auth_mode(std::string_view name) {
  if (name == "wegman-carter" || name == "wc") {
    return AuthMode::kWegmanCarter;
  }
  if (name == "hmac") {
    return AuthMode::kHmac;
  }
  return std::nullopt;
}

Status validate(const ProtocolParams& p) {
  if (p.pulses_per_block < 1000 || p.pulses_per_block > (std::uint64_t{1} << 32)) {
    return bad("pulses_per_block", "must be in [1000, 2^32]");
  }
  if (!in(p.sample_fraction, 0.0, 1.0) || p.sample_fraction <= 0.0 || p.sample_fraction >= 1.0) {
    return bad("sample_fraction", "must be in (0, 1)");
  }
  if (!in(p.qber_abort, 0.0, 0.5) || p.qber_abort <= 0.0) {
    return bad("qber_abort", "must be in (0, 0.5]");
  }
  if (p.cascade_passes > 16) {
    return bad("cascade_passes", "must be in [1, 16] (0 = the variant's default)");
  }
  if (p.cascade_variant != CascadeVariant::kOriginal && p.cascade_variant != CascadeVariant::kYan &&
      p.cascade_variant != CascadeVariant::kModern) {
    return bad("cascade_variant", "must be original, yan or modern");
  }
  if (p.cascade_biconf_rounds > kMaxBiconfRounds) {
    return bad("cascade_biconf_rounds", "must be in [0, 64]");
  }
  if (!in(p.safety_margin, 0.0, 1.0) || p.safety_margin >= 1.0) {
    return bad("safety_margin", "must be in [0, 1)");
  }
  if (p.message_timeout.count() <= 0) {
    return bad("message_timeout", "must be positive");
  }
  if (!in(p.z_basis_prob, 0.0, 1.0) || p.z_basis_prob < 0.5 || p.z_basis_prob >= 1.0) {
    return bad("z_basis_prob", "must be in [0.5, 1)");
  }
  if (static_cast<unsigned>(p.key_bound) > static_cast<unsigned>(KeyBound::kSlutsky98)) {
    return bad("key_bound", "unknown bound");
  }
  if (!in(p.epsilon_sec, 0.0, 0.5) || p.epsilon_sec <= 0.0) {
    return bad("epsilon_sec", "must be in (0, 0.5]");
  }
  if (!in(p.epsilon_cor, 0.0, 0.5) || p.epsilon_cor < kMinEpsilonCor) {
    return bad("epsilon_cor", "must be in [2^-256, 0.5] (the tag has at most 256 bits)");
  }
  // After epsilon_cor: the bound below depends on it.
  if (p.verify_hash_bits != 0 &&
      (p.verify_hash_bits > 256 || p.verify_hash_bits < min_tag_bits(p.epsilon_cor))) {
    return bad("verify_hash_bits",
               "must be 0 (follow epsilon_cor) or in [ceil(log2(1/epsilon_cor)) = " +
                   std::to_string(min_tag_bits(p.epsilon_cor)) + ", 256]");
  }
  if (!in(p.confidence_sd, 0.0, 50.0)) {
    return bad("confidence_sd", "must be in [0, 50]");
  }
  if (p.auth != AuthMode::kWegmanCarter && p.auth != AuthMode::kHmac) {
    return bad("auth", "must be wegman-carter or hmac");
  }
  if (p.auth_tag_bits != 64 && p.auth_tag_bits != 128) {
    return bad("auth_tag_bits", "must be 64 or 128");
  }
  if (p.auth_pool_bits < 1024 || p.auth_pool_bits > (1U << 24) || p.auth_pool_bits % 8 != 0) {
    return bad("auth_pool_bits", "must be a multiple of 8 in [1024, 2^24]");
  }
  if (p.auth_key_refresh_blocks < 1) {
    return bad("auth_key_refresh_blocks", "must be at least 1");
  }
  return ok_status();
}

}  // namespace qkd::core
