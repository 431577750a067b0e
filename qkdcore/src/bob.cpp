// Bob's endpoint: measures the detection events Alice's channel delivers in bases he
// chooses himself, then drives Cascade (asking Alice for parities) and corrects his key.
#include <chrono>
#include <optional>
#include <string>

#include "channel.hpp"
#include "protocol.hpp"
#include "qkd/core/cascade.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/random.hpp"
#include "qkd/core/toeplitz.hpp"

namespace qkd::core {

using detail::AuthChannel;
using detail::malformed;
using detail::MsgType;
using detail::Reader;
using detail::Writer;

namespace {

// Bob's view of Alice for Cascade: one request/reply pair per call.
class RemoteParityOracle final : public ParityOracle {
 public:
  RemoteParityOracle(AuthChannel& ch, std::uint64_t block, std::chrono::milliseconds timeout,
                     std::uint32_t n)
      : ch_(ch), block_(block), timeout_(timeout), n_(n) {}

  Result<BitVector> block_parities(std::uint32_t pass) override {
    Writer w;
    w.u8(static_cast<std::uint8_t>(detail::CascadeRequestKind::kBlockParities));
    w.u32(pass);
    return exchange(w);
  }

  Result<BitVector> range_parities(std::span<const ParityQuery> q) override {
    Writer w;
    w.reserve(5 + 9 * q.size());
    w.u8(static_cast<std::uint8_t>(detail::CascadeRequestKind::kRangeParities));
    w.u32(static_cast<std::uint32_t>(q.size()));
    for (const ParityQuery& x : q) {
      w.u8(static_cast<std::uint8_t>(x.pass));
      w.u32(x.start);
      w.u32(x.length);
    }
    return exchange(w);
  }

 private:
  Result<BitVector> exchange(Writer& w) {
    if (++round_trips_ >= detail::kMaxCascadeRequests) {
      return make_error(ErrorCode::kProtocol,
                        "Cascade: too many parity requests (inconsistent parities: tampered?)");
    }
    if (Status s = ch_.send(MsgType::kCascadeRequest, block_, w.buffer()); !s.ok()) {
      return s.error();
    }
    auto f = ch_.receive(timeout_, MsgType::kCascadeReply, block_);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector bits;
    if (!rd.bits(bits, n_) || !rd.done()) {
      return malformed(MsgType::kCascadeReply);
    }
    return bits;
  }

  AuthChannel& ch_;
  std::uint64_t block_;
  std::chrono::milliseconds timeout_;
  std::uint32_t n_;
  std::uint64_t round_trips_ = 0;
};

}  // namespace

struct BobEndpoint::Impl {
  ProtocolParams protocol;
  MessageTransport& quantum;
  Xoshiro256ss rng;  // Bob's basis choices and random measurement outcomes
  std::unique_ptr<AuthChannel> classical;
  std::optional<Error> init_error;
  std::optional<Error> failed;
  std::optional<std::uint64_t> last_block;

  Impl(ProtocolParams p, std::span<const std::uint8_t> k, std::uint64_t s, MessageTransport& q,
       MessageTransport& cl)
      : protocol(p), quantum(q), rng(s ^ 0xB0B0B0B0B0B0B0B0ULL) {
    auto ch = AuthChannel::create(cl, detail::AuthRole::kBob, k, detail::auth_settings(p));
    if (!ch.ok()) {
      init_error = ch.error();
      return;
    }
    classical = std::move(ch).value();
  }

  Result<detail::Frame> recv(MsgType t, std::uint64_t block, bool checkpoint = false) {
    return classical->receive(protocol.message_timeout, t, block, checkpoint);
  }

  Status run(BlockResult& r, bool& fatal);
};

Status BobEndpoint::Impl::run(BlockResult& r, bool& fatal) {
  const ProtocolParams& P = protocol;
  AuthChannel& ch = *classical;

  // (a) Parameters: the first message of a block. Waiting for it may time out without
  // harm (nothing consumed), so that error is not fatal.
  std::uint64_t block = 0;
  double pulse_rate_hz = 0.0;
  detail::SourceInfo source;
  {
    auto f = ch.receive(P.message_timeout, MsgType::kParams, std::nullopt);
    if (!f.ok()) {
      fatal = f.error().code != ErrorCode::kTimeout;
      return f.error();
    }
    block = f->block_id;
    r.block_id = block;
    if (last_block && block <= *last_block) {
      return make_error(ErrorCode::kProtocol, "block id " + std::to_string(block) +
                                                  " not above the previous " +
                                                  std::to_string(*last_block));
    }
    last_block = block;
    Reader rd(f->payload);
    ProtocolParams theirs = P;
    if (!detail::read_params(rd, theirs, pulse_rate_hz, source) || !(pulse_rate_hz > 0.0)) {
      return malformed(MsgType::kParams);
    }
    const std::string mismatch = detail::params_mismatch(P, theirs);
    Writer w;
    w.u8(mismatch.empty() ? 1 : 0);
    w.string(mismatch);
    if (Status s = ch.send(MsgType::kParamsAck, block, w.buffer()); !s.ok()) {
      return s;
    }
    if (!mismatch.empty()) {
      fatal = false;
      return make_error(ErrorCode::kRejected,
                        "block parameters differ from Alice's: " + mismatch);
    }
  }
  r.pulses = P.pulses_per_block;
  r.simulated_seconds = static_cast<double>(P.pulses_per_block) / pulse_rate_hz;

  // (b) Quantum: measure every arriving state in a random basis of Bob's choosing.
  BitVector bases;
  BitVector raw;
  {
    std::uint64_t next_pulse = 0;
    for (std::uint32_t chunk = 0;; ++chunk) {
      auto m = quantum.receive(P.message_timeout);
      if (!m.ok()) {
        return m.error();
      }
      auto c = detail::decode_detections(*m, block, chunk, next_pulse, P.pulses_per_block);
      if (!c.ok()) {
        return c.error();
      }
      bases.reserve(bases.size() + c->events.size());
      raw.reserve(raw.size() + c->events.size());
      const bool biased = P.z_basis_prob != 0.5;
      for (const DetectionEvent& e : c->events) {
        const bool basis = biased ? !rng.bernoulli(P.z_basis_prob) : rng.bit();
        bool result = false;
        if (e.dark || basis != e.basis) {
          result = rng.bit();  // a dark count, or a measurement in the other basis
        } else {
          result = e.bit;
        }
        bases.push_back(basis);
        raw.push_back(result);
      }
      if (c->last) {
        break;
      }
    }
  }
  r.detections = raw.size();

  // (c) Sifting.
  BitVector sifted;
  detail::SiftedInfo info;
  {
    Writer w;
    w.u64(bases.size());
    w.bits(bases);
    if (Status s = ch.send(MsgType::kSiftBases, block, w.buffer()); !s.ok()) {
      return s;
    }
    auto f = recv(MsgType::kSiftMatch, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector match;
    if (!rd.bits(match, raw.size()) || match.size() != raw.size()) {
      return malformed(MsgType::kSiftMatch);
    }
    const std::size_t matched = match.popcount();
    BitVector class_lo;
    BitVector class_hi;
    if (source.decoys() && (!rd.bits(class_lo, matched) || class_lo.size() != matched ||
                            !rd.bits(class_hi, matched) || class_hi.size() != matched)) {
      return malformed(MsgType::kSiftMatch);
    }
    if (!rd.done()) {
      return malformed(MsgType::kSiftMatch);
    }
    BitVector dropped;
    detail::split_by_mask(raw, match, sifted, dropped);
    detail::split_by_mask(bases, match, info.basis, dropped);
    if (source.decoys()) {
      info.intensity.resize(matched);
      for (std::size_t i = 0; i < matched; ++i) {
        const auto k = static_cast<std::uint8_t>((class_lo.get(i) ? 1 : 0) |
                                                 (class_hi.get(i) ? 2 : 0));
        if (k > 2) {
          return malformed(MsgType::kSiftMatch);
        }
        info.intensity[i] = k;
      }
    }
    raw.clear();
  }
  r.sifted_bits = sifted.size();

  // (d) Parameter estimation.
  BitVector key;
  BlockStatistics block_stats;
  {
    auto f = recv(MsgType::kSample, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector mask;
    BitVector alice_sample;
    if (!rd.bits(mask, sifted.size()) || mask.size() != sifted.size() ||
        !rd.bits(alice_sample, sifted.size()) || !rd.done() ||
        alice_sample.size() != mask.popcount()) {
      return malformed(MsgType::kSample);
    }
    // Every bit that must be disclosed is (decoy classes, X basis when biased).
    const BitVector required = detail::mandatory_disclosure(info, P.z_basis_prob > 0.5);
    for (std::size_t i = 0; i < required.size(); ++i) {
      if (required.get(i) && !mask.get(i)) {
        return malformed(MsgType::kSample);
      }
    }
    BitVector sample;
    detail::split_by_mask(sifted, mask, sample, key);
    sifted.clear();
    Writer w;
    w.bits(sample);
    if (Status s = ch.send(MsgType::kSampleReply, block, w.buffer()); !s.ok()) {
      return s;
    }
    block_stats = detail::gather_statistics(info, mask, alice_sample, sample, P, source,
                                      P.pulses_per_block, r);
    if (auto why = detail::estimation_abort(block_stats.sample_bits, block_stats.sample_errors, key.size(),
                                            P.qber_abort, P.confidence_sd)) {
      r.aborted = true;
      r.abort_reason = *why;
      return detail::close_aborted_block(ch, block, P.message_timeout);
    }
  }
  const auto n = static_cast<std::uint32_t>(key.size());

  // (e) Cascade.
  {
    auto f = recv(MsgType::kCascadeStart, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint32_t n_alice = 0;
    std::uint32_t k1 = 0;
    std::uint32_t passes = 0;
    std::uint8_t variant = 0;
    std::span<const std::uint8_t> seed;
    if (!rd.u32(n_alice) || !rd.u32(k1) || !rd.u32(passes) || !rd.u8(variant) ||
        !rd.bytes(32, seed) || !rd.done() || n_alice != n || k1 < 1 || k1 > n ||
        passes != detail::cascade_passes(P) ||
        variant != static_cast<std::uint8_t>(P.cascade_variant)) {
      return malformed(MsgType::kCascadeStart);
    }
    const CascadeLayout layout(n, passes, k1, std::span<const std::uint8_t, 32>(seed.data(), 32),
                               P.cascade_variant);
    RemoteParityOracle oracle(ch, block, P.message_timeout, n);
    auto stats = cascade_correct(key, layout, oracle);
    if (!stats.ok()) {
      return stats.error();
    }
    r.leaked_bits = stats->parities_disclosed;
    r.cascade_errors_corrected = stats->errors_corrected;
    Writer w;
    w.u8(static_cast<std::uint8_t>(detail::CascadeRequestKind::kDone));
    w.u64(stats->errors_corrected);
    if (Status s = ch.send(MsgType::kCascadeRequest, block, w.buffer()); !s.ok()) {
      return s;
    }
  }

  // (f) Verification.
  {
    const std::uint32_t vb = P.verify_hash_bits;
    auto f = recv(MsgType::kVerify, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector vseed;
    std::span<const std::uint8_t> alice_tag;
    if (!rd.bits(vseed, std::uint64_t{n} + vb - 1) || vseed.size() != std::uint64_t{n} + vb - 1 ||
        !rd.bytes(vb / 8, alice_tag) || !rd.done()) {
      return malformed(MsgType::kVerify);
    }
    auto tag = toeplitz_hash(vseed, key, vb);
    if (!tag.ok()) {
      return tag.error();
    }
    const bool same = constant_time_equal(tag->to_bytes(), alice_tag);
    Writer w;
    w.u8(same ? 1 : 0);
    // Checkpoint: Bob's whole transcript of the block, before Alice reveals the PA seed.
    if (Status s = ch.send(MsgType::kVerifyResult, block, w.buffer(), true); !s.ok()) {
      return s;
    }
    r.leaked_bits += vb;
    if (!same) {
      r.aborted = true;
      r.abort_reason = "verification hash mismatch after Cascade (residual errors)";
      return detail::close_aborted_block(ch, block, P.message_timeout);
    }
  }

  // (g) Privacy amplification.
  {
    const std::uint64_t m = detail::final_key_length(block_stats, r.leaked_bits, r);
    auto f = recv(MsgType::kAmplify, block, true);  // checkpoint: Alice's transcript
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint64_t m_alice = 0;
    BitVector pseed;
    if (!rd.u64(m_alice) || m_alice != m ||
        !rd.bits(pseed, m > 0 ? std::uint64_t{n} + m - 1 : 0) ||
        pseed.size() != (m > 0 ? std::uint64_t{n} + m - 1 : 0) || !rd.done()) {
      return malformed(MsgType::kAmplify);
    }
    SecureBytes gross;
    if (m > 0) {
      auto out = toeplitz_hash(pseed, key, m);
      if (!out.ok()) {
        return out.error();
      }
      gross.resize(out->byte_size());
      out->to_bytes(gross.span());
    }
    // Checkpoint: tells Alice, authenticated, that Bob verified her transcript.
    if (Status s = ch.send(MsgType::kBlockDone, block, {}, true); !s.ok()) {
      return s;
    }
    detail::pay_authentication(ch, gross, m, r);
  }
  return ok_status();
}

BobEndpoint::BobEndpoint(ProtocolParams protocol, std::span<const std::uint8_t> psk,
                         std::uint64_t seed, MessageTransport& quantum,
                         MessageTransport& classical)
    : impl_(std::make_unique<Impl>(protocol, psk, seed, quantum, classical)) {}

BobEndpoint::~BobEndpoint() = default;

Result<BlockResult> BobEndpoint::run_block() {
  if (impl_->init_error) {
    return *impl_->init_error;
  }
  if (impl_->failed) {
    return make_error(impl_->failed->code,
                      "endpoint unusable after an earlier error: " + impl_->failed->message);
  }
  if (Status s = validate(impl_->protocol); !s.ok()) {
    return s.error();
  }
  const auto start = std::chrono::steady_clock::now();
  BlockResult r;
  const std::uint64_t pads_before = impl_->classical->pad_bytes_used();
  bool fatal = true;
  Status st = impl_->run(r, fatal);
  if (!st.ok()) {
    if (fatal) {
      const ErrorCode c = st.error().code;
      if (c != ErrorCode::kRejected && c != ErrorCode::kClosed) {
        impl_->classical->send_abort(r.block_id, st.error().message);
      }
      impl_->failed = st.error();
    }
    return st.error();
  }
  r.auth_pad_bits_used = 8 * (impl_->classical->pad_bytes_used() - pads_before);
  if (r.aborted) {
    r.key.clear();
    r.secret_bits = 0;
    r.auth_bits_consumed = 0;
  }
  r.cpu_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace qkd::core
