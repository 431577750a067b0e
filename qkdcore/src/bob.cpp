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
    detail::write_range_parities(w, q);
    return exchange(w);
  }

 private:
  Result<BitVector> exchange(Writer& w) {
    if (++round_trips_ >= detail::kMaxCascadeRequests) {
      return make_error(ErrorCode::kProtocol,
                        "Cascade: too many parity requests (inconsistent parities: tampered?)");
    }
    // Alice refuses requests once n parities are out (the block can yield no key): stop
    // here first, with the reason, rather than be refused.
    if (disclosed_ >= n_) {
      return make_error(ErrorCode::kProtocol,
                        "Cascade: " + std::to_string(disclosed_) + " parities of the " +
                            std::to_string(n_) +
                            "-bit key already disclosed; the block can yield no key");
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
    disclosed_ += bits.size();
    return bits;
  }

  AuthChannel& ch_;
  std::uint64_t block_;
  std::chrono::milliseconds timeout_;
  std::uint32_t n_;
  std::uint64_t round_trips_ = 0;
  std::uint64_t disclosed_ = 0;  // parity bits Alice has answered (her leaked_bits so far)
};

}  // namespace

struct BobEndpoint::Impl final : detail::EndpointCore {
  Xoshiro256ss rng;  // Bob's basis choices and random measurement outcomes
  std::optional<std::uint64_t> last_block;

  Impl(const ProtocolParams& p, std::span<const std::uint8_t> k, std::uint64_t s,
       MessageTransport& q, MessageTransport& cl)
      : EndpointCore(p, detail::AuthRole::kBob, k, q, cl), rng(s ^ 0xB0B0B0B0B0B0B0B0ULL) {}

  Status run(BlockResult& r, bool& fatal) override;
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
    // The rate range validate(ChannelParams) gives Alice: anything else (+Inf, a subnormal)
    // would make simulated_seconds, and the rates computed from it, infinite or NaN.
    if (!detail::read_params(rd, theirs, pulse_rate_hz, source) ||
        !(pulse_rate_hz >= kMinPulseRateHz && pulse_rate_hz <= kMaxPulseRateHz)) {
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
      // Bases and results gathered 64 at a time, appended a word at a time.
      std::uint64_t basis_word = 0;
      std::uint64_t result_word = 0;
      unsigned filled = 0;
      // The generator as a local during the loop (kept in registers, not stored back to
      // the endpoint after every draw), written back after the chunk.
      Xoshiro256ss gen = rng;
      for (const DetectionEvent& e : c->events) {
        const bool basis = biased ? !gen.bernoulli(P.z_basis_prob) : gen.bit();
        // A dark count, or a measurement in the other basis: a random result (one more
        // draw), else the arriving bit. Without a branch (it would be mispredicted half the
        // time): the draw is computed always and taken only when needed (next_if), so the
        // random stream is the one of a conditional rng.bit().
        const bool random_result = e.dark != 0 || basis != (e.basis != 0);
        const std::uint64_t draw = gen.next_if(random_result) >> 63;
        const std::uint64_t pick = std::uint64_t{0} - std::uint64_t{random_result};
        const std::uint64_t result = (draw & pick) | (std::uint64_t{e.bit} & ~pick);
        basis_word |= std::uint64_t{basis ? 1U : 0U} << filled;
        result_word |= result << filled;
        if (++filled == 64) {
          bases.append_bits(basis_word, 64);
          raw.append_bits(result_word, 64);
          basis_word = 0;
          result_word = 0;
          filled = 0;
        }
      }
      rng = gen;
      bases.append_bits(basis_word, filled);
      raw.append_bits(result_word, filled);
      result_word = 0;
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
    auto f = exchange(MsgType::kSiftBases, block, w.buffer(), MsgType::kSiftMatch);
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
    if (required.size() != mask.size()) {
      return malformed(MsgType::kSample);
    }
    for (std::size_t w = 0; w < required.word_count(); ++w) {  // word-wise: required & ~mask
      if ((required.words()[w] & ~mask.words()[w]) != 0) {
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
    if (auto why = detail::estimation_abort(block_stats, key.size(), P)) {
      return abort_block(r, block, *why);
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
    std::uint32_t biconf = 0;
    if (!rd.u32(n_alice) || !rd.u32(k1) || !rd.u32(passes) || !rd.u8(variant) ||
        !rd.bytes(32, seed) || !rd.u32(biconf) || !rd.done() || n_alice != n || k1 < 1 ||
        k1 > n || passes != detail::cascade_passes(P) ||
        variant != static_cast<std::uint8_t>(P.cascade_variant) ||
        biconf != P.cascade_biconf_rounds) {
      return malformed(MsgType::kCascadeStart);
    }
    const CascadeLayout layout(n, passes, k1, std::span<const std::uint8_t, 32>(seed.data(), 32),
                               P.cascade_variant, biconf);
    RemoteParityOracle oracle(ch, block, P.message_timeout, n);
    auto stats = cascade_correct(key, layout, oracle);
    if (!stats.ok()) {
      return stats.error();
    }
    r.leaked_bits = stats->parities_disclosed;
    r.cascade_errors_corrected = stats->errors_corrected;
    r.biconf_parities = stats->biconf_parities;
    Writer w;
    w.u8(static_cast<std::uint8_t>(detail::CascadeRequestKind::kDone));
    w.u64(stats->errors_corrected);
    w.u64(stats->biconf_parities);
    if (Status s = ch.send(MsgType::kCascadeRequest, block, w.buffer()); !s.ok()) {
      return s;
    }
  }

  // (f) Verification.
  {
    const std::uint32_t vb = verify_tag_bits(P);
    r.verify_tag_bits = vb;
    r.epsilon_cor = P.epsilon_cor;
    auto f = recv(MsgType::kVerify, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector vseed;
    std::span<const std::uint8_t> alice_tag;
    if (!rd.bits(vseed, std::uint64_t{n} + vb - 1) || vseed.size() != std::uint64_t{n} + vb - 1 ||
        !rd.bytes((vb + 7) / 8, alice_tag) || !rd.done()) {
      return malformed(MsgType::kVerify);
    }
    auto tag = detail::verification_tag(vseed, key, vb);
    if (!tag.ok()) {
      return tag.error();
    }
    const bool same = constant_time_equal(*tag, alice_tag);
    Writer w;
    w.u8(same ? 1 : 0);
    // Checkpoint: Bob's whole transcript of the block, before Alice reveals the PA seed.
    if (Status s = ch.send(MsgType::kVerifyResult, block, w.buffer(), true); !s.ok()) {
      return s;
    }
    r.leaked_bits += vb;
    if (!same) {
      return abort_block(r, block, std::string(detail::kVerificationMismatch));
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

Result<BlockResult> BobEndpoint::run_block() { return impl_->run_block(); }

}  // namespace qkd::core
