#include <cmath>
#include <string>

#include "qkd/core/link.hpp"

namespace qkd::core {
namespace {

Error bad(const char* field, const std::string& why) {
  return make_error(ErrorCode::kInvalidArgument, std::string(field) + " " + why);
}

bool in(double v, double lo, double hi) { return std::isfinite(v) && v >= lo && v <= hi; }

}  // namespace

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
  if (!in(p.pulse_rate_hz, 0.0, 1e15) || p.pulse_rate_hz <= 0.0) {
    return bad("pulse_rate_hz", "must be positive");
  }
  return ok_status();
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
  if (p.cascade_passes < 1 || p.cascade_passes > 16) {
    return bad("cascade_passes", "must be in [1, 16]");
  }
  if (p.verify_hash_bits < 32 || p.verify_hash_bits > 256 || p.verify_hash_bits % 8 != 0) {
    return bad("verify_hash_bits", "must be a multiple of 8 in [32, 256]");
  }
  if (!in(p.safety_margin, 0.0, 1.0) || p.safety_margin >= 1.0) {
    return bad("safety_margin", "must be in [0, 1)");
  }
  if (p.message_timeout.count() <= 0) {
    return bad("message_timeout", "must be positive");
  }
  return ok_status();
}

}  // namespace qkd::core
