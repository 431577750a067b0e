#include "protocol.hpp"

#include <array>
#include <cstdio>

#include "qkd/core/random.hpp"

namespace qkd::core::detail {

void write_params(Writer& w, const ProtocolParams& p, double pulse_rate_hz) {
  w.u64(p.pulses_per_block);
  w.f64(p.sample_fraction);
  w.f64(p.qber_abort);
  w.u32(p.cascade_passes);
  w.u32(p.verify_hash_bits);
  w.f64(p.safety_margin);
  w.f64(pulse_rate_hz);
}

bool read_params(Reader& r, ProtocolParams& p, double& pulse_rate_hz) {
  return r.u64(p.pulses_per_block) && r.f64(p.sample_fraction) && r.f64(p.qber_abort) &&
         r.u32(p.cascade_passes) && r.u32(p.verify_hash_bits) && r.f64(p.safety_margin) &&
         r.f64(pulse_rate_hz) && r.done();
}

std::string params_mismatch(const ProtocolParams& mine, const ProtocolParams& theirs) {
  auto num = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    return std::string(buf);
  };
  if (mine.pulses_per_block != theirs.pulses_per_block) {
    return "pulses_per_block " + std::to_string(theirs.pulses_per_block) + " != " +
           std::to_string(mine.pulses_per_block);
  }
  if (mine.sample_fraction != theirs.sample_fraction) {
    return "sample_fraction " + num(theirs.sample_fraction) + " != " + num(mine.sample_fraction);
  }
  if (mine.qber_abort != theirs.qber_abort) {
    return "qber_abort " + num(theirs.qber_abort) + " != " + num(mine.qber_abort);
  }
  if (mine.cascade_passes != theirs.cascade_passes) {
    return "cascade_passes " + std::to_string(theirs.cascade_passes) + " != " +
           std::to_string(mine.cascade_passes);
  }
  if (mine.verify_hash_bits != theirs.verify_hash_bits) {
    return "verify_hash_bits " + std::to_string(theirs.verify_hash_bits) + " != " +
           std::to_string(mine.verify_hash_bits);
  }
  if (mine.safety_margin != theirs.safety_margin) {
    return "safety_margin " + num(theirs.safety_margin) + " != " + num(mine.safety_margin);
  }
  return {};
}

std::optional<std::string> estimation_abort(std::uint64_t sample_bits,
                                            std::uint64_t sample_errors,
                                            std::uint64_t reconciled_bits, double qber_abort) {
  if (sample_bits < kMinSampleBits) {
    return "too few sifted bits: " + std::to_string(sample_bits) +
           " sample bits cannot estimate the QBER (need " + std::to_string(kMinSampleBits) + ")";
  }
  if (reconciled_bits < kMinReconciledBits) {
    return "too few sifted bits: " + std::to_string(reconciled_bits) +
           " left to reconcile (need " + std::to_string(kMinReconciledBits) + ")";
  }
  const double qber = static_cast<double>(sample_errors) / static_cast<double>(sample_bits);
  if (qber > qber_abort) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "QBER %.2f %% above %.2f %%", 100.0 * qber,
                  100.0 * qber_abort);
    return std::string(buf);
  }
  return std::nullopt;
}

Result<BitVector> random_bits(std::size_t nbits) {
  std::vector<std::uint8_t> bytes((nbits + 7) / 8);
  if (Status s = random_bytes(bytes); !s.ok()) {
    return s.error();
  }
  return BitVector::from_bytes(bytes, nbits);
}

Result<BitVector> random_sample_mask(std::uint64_t n, std::uint64_t k) {
  std::array<std::uint8_t, 32> seed{};
  if (Status s = random_bytes(seed); !s.ok()) {
    return s.error();
  }
  Xoshiro256ss rng{std::span<const std::uint8_t, 32>(seed)};
  BitVector mask(n);
  std::uint64_t need = std::min(k, n);
  for (std::uint64_t i = 0; i < n && need > 0; ++i) {
    if (rng.below(n - i) < need) {  // select with probability need / (n - i)
      mask.set(i, true);
      --need;
    }
  }
  return mask;
}

void split_by_mask(const BitVector& key, const BitVector& mask, BitVector& selected,
                   BitVector& rest) {
  selected.clear();
  rest.clear();
  const std::size_t k = mask.popcount();
  selected.reserve(k);
  rest.reserve(key.size() - k);
  for (std::size_t i = 0; i < key.size(); ++i) {
    if (mask.get(i)) {
      selected.push_back(key.get(i));
    } else {
      rest.push_back(key.get(i));
    }
  }
}

std::vector<std::uint8_t> encode_detections(std::uint64_t block_id, std::uint32_t chunk,
                                            bool last, std::span<const DetectionEvent> ev,
                                            std::uint64_t first_pulse_base) {
  Writer w;
  w.reserve(kHeaderBytes + 10 + ev.size() * 5);
  w.u8(kWireVersion);
  w.u8(static_cast<std::uint8_t>(MsgType::kDetections));
  w.u64(block_id);
  w.u32(chunk);
  w.u8(last ? 1 : 0);
  w.u32(static_cast<std::uint32_t>(ev.size()));
  std::uint64_t next = first_pulse_base;
  for (const DetectionEvent& e : ev) {
    w.varint(e.pulse - next);
    next = e.pulse + 1;
    std::uint8_t state = 0;
    if (e.dark) {
      state = 4;
    } else {
      state = static_cast<std::uint8_t>((e.bit ? 1 : 0) | (e.basis ? 2 : 0));
    }
    w.u8(state);
  }
  return w.take();
}

std::vector<std::uint8_t> encode_quantum_abort(std::uint64_t block_id) {
  Writer w;
  w.u8(kWireVersion);
  w.u8(static_cast<std::uint8_t>(MsgType::kAbort));
  w.u64(block_id);
  return w.take();
}

Result<DetectionChunk> decode_detections(std::span<const std::uint8_t> msg,
                                         std::uint64_t block_id, std::uint32_t chunk,
                                         std::uint64_t& next_pulse, std::uint64_t pulses) {
  Reader r(msg);
  std::uint8_t version = 0;
  std::uint8_t type = 0;
  std::uint64_t block = 0;
  std::uint32_t index = 0;
  std::uint8_t last = 0;
  std::uint32_t count = 0;
  if (!r.u8(version) || !r.u8(type) || !r.u64(block)) {
    return malformed(MsgType::kDetections);
  }
  if (version == kWireVersion && type == static_cast<std::uint8_t>(MsgType::kAbort) &&
      block == block_id && r.done()) {
    return make_error(ErrorCode::kRejected, "Alice aborted block " + std::to_string(block) +
                                                " during the quantum transmission");
  }
  if (!r.u32(index) || !r.u8(last) || !r.u32(count)) {
    return malformed(MsgType::kDetections);
  }
  if (version != kWireVersion || type != static_cast<std::uint8_t>(MsgType::kDetections) ||
      last > 1) {
    return malformed(MsgType::kDetections);
  }
  if (block != block_id || index != chunk) {
    return make_error(ErrorCode::kProtocol, "quantum frame for block " + std::to_string(block) +
                                                " chunk " + std::to_string(index) +
                                                " out of order");
  }
  if (count > kMaxEventsPerChunk || count > r.remaining() / 2) {
    return malformed(MsgType::kDetections);
  }
  DetectionChunk out;
  out.last = last == 1;
  out.events.resize(count);
  std::uint64_t next = next_pulse;
  for (std::uint32_t i = 0; i < count; ++i) {
    std::uint64_t delta = 0;
    std::uint8_t state = 0;
    if (!r.varint(delta) || !r.u8(state) || state > 4) {
      return malformed(MsgType::kDetections);
    }
    if (delta >= pulses || next + delta >= pulses) {
      return make_error(ErrorCode::kProtocol, "detection event past the end of the block");
    }
    DetectionEvent& e = out.events[i];
    e.pulse = next + delta;
    e.dark = state == 4;
    e.bit = (state & 1) != 0;
    e.basis = (state & 2) != 0;
    next = e.pulse + 1;
  }
  if (!r.done()) {
    return malformed(MsgType::kDetections);
  }
  next_pulse = next;
  return out;
}

}  // namespace qkd::core::detail
