// Alice's endpoint: source + channel simulation, then the classical post-processing, in
// which she is the reference (Bob corrects towards her key) and the one who draws every
// public random seed.
#include <chrono>
#include <cmath>
#include <optional>
#include <string>

#include "channel.hpp"
#include "protocol.hpp"
#include "qkd/core/cascade.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/physics.hpp"
#include "qkd/core/random.hpp"
#include "qkd/core/toeplitz.hpp"

namespace qkd::core {

using detail::AuthChannel;
using detail::malformed;
using detail::MsgType;
using detail::Reader;
using detail::Writer;

namespace {

// Alice's PRF key for one block: HKDF(psk || seed) labelled with the block id, so the key
// is unpredictable without the PSK yet reproducible for a given (psk, seed).
Result<SecureBytes> alice_prf_key(std::span<const std::uint8_t> psk, std::uint64_t seed,
                                  std::uint64_t block) {
  SecureBytes ikm(psk.size() + 8);
  std::copy(psk.begin(), psk.end(), ikm.data());
  for (int b = 0; b < 8; ++b) {
    ikm[psk.size() + static_cast<std::size_t>(b)] = static_cast<std::uint8_t>(seed >> (8 * b));
  }
  return detail::hkdf_sha256(ikm.span(), "qkd-tls bb84 alice prf v1",
                             "block " + std::to_string(block), 16);
}

}  // namespace

struct AliceEndpoint::Impl {
  ChannelParams channel;
  ProtocolParams protocol;
  SecureBytes psk;
  std::uint64_t seed;
  MessageTransport& quantum;
  std::unique_ptr<AuthChannel> classical;
  std::optional<Error> init_error;
  std::optional<Error> failed;  // set by a fatal error; the endpoint refuses further blocks
  std::uint64_t next_block = 0;
  // Detection events of the current block; the capacity is kept between blocks (up to
  // kKeepEventCapacity) so that each block does not fault in fresh pages.
  std::vector<DetectionEvent> events_buffer;
  static constexpr std::size_t kKeepEventCapacity = std::size_t{1} << 24;  // 128 MB

  Impl(ChannelParams c, ProtocolParams p, std::span<const std::uint8_t> k, std::uint64_t s,
       MessageTransport& q, MessageTransport& cl)
      : channel(c), protocol(p), psk(k), seed(s), quantum(q) {
    auto ch = AuthChannel::create(cl, detail::AuthRole::kAlice, k, detail::auth_settings(p));
    if (!ch.ok()) {
      init_error = ch.error();
      return;
    }
    classical = std::move(ch).value();
  }

  // Receives a classical message of the given type for this block.
  Result<detail::Frame> recv(MsgType t, std::uint64_t block, bool checkpoint = false) {
    return classical->receive(protocol.message_timeout, t, block, checkpoint);
  }

  // Runs one block. Returns an error (with `fatal` telling whether the channel state is
  // lost) or fills `r`.
  Status run(BlockResult& r, bool& fatal);
};

Status AliceEndpoint::Impl::run(BlockResult& r, bool& fatal) {
  const ProtocolParams& P = protocol;
  const std::uint64_t block = r.block_id;
  AuthChannel& ch = *classical;

  // (a) Parameters.
  {
    Writer w;
    detail::write_params(w, P, channel.pulse_rate_hz, detail::source_info(channel));
    if (Status s = ch.send(MsgType::kParams, block, w.buffer()); !s.ok()) {
      return s;
    }
    auto f = recv(MsgType::kParamsAck, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint8_t accepted = 0;
    std::string reason;
    if (!rd.u8(accepted) || !rd.string(reason, 1000) || !rd.done() || accepted > 1) {
      return malformed(MsgType::kParamsAck);
    }
    if (accepted == 0) {
      fatal = false;
      return make_error(ErrorCode::kRejected, "Bob refused the block parameters: " + reason);
    }
  }
  r.pulses = P.pulses_per_block;
  r.simulated_seconds = static_cast<double>(P.pulses_per_block) / channel.pulse_rate_hz;

  // (b) Quantum transmission.
  auto prf_key = alice_prf_key(psk.span(), seed, block);
  if (!prf_key.ok()) {
    return prf_key.error();
  }
  AlicePrf prf(std::span<const std::uint8_t, 16>(prf_key->data(), 16),
               source_choices(channel, P.z_basis_prob));
  const detail::SourceInfo source = detail::source_info(channel);
  std::vector<DetectionEvent>& events = events_buffer;
  events.clear();
  {
    ChannelSimulator sim(channel, seed ^ (0x5DEECE66DULL * (block + 1)));
    sim.run(events, prf, P.pulses_per_block);
  }
  r.detections = events.size();
  {
    std::uint32_t chunk = 0;
    std::size_t at = 0;
    std::uint64_t base = 0;
    do {
      const std::size_t n = std::min<std::size_t>(events.size() - at, detail::kMaxEventsPerChunk);
      const bool last = at + n == events.size();
      auto msg = detail::encode_detections(
          block, chunk, last, std::span<const DetectionEvent>(events.data() + at, n), base);
      if (n > 0) {
        base = events[at + n - 1].pulse + 1;
      }
      if (Status s = quantum.send(std::move(msg)); !s.ok()) {
        return s;
      }
      at += n;
      ++chunk;
    } while (at < events.size());
  }

  // (c) Sifting (and, with decoys, the intensity class of each matching detection).
  BitVector sifted;
  detail::SiftedInfo info;
  {
    auto f = recv(MsgType::kSiftBases, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint64_t count = 0;
    BitVector bob_bases;
    if (!rd.u64(count) || !rd.bits(bob_bases, events.size()) || !rd.done() ||
        count != events.size() || bob_bases.size() != count) {
      return malformed(MsgType::kSiftBases);
    }
    BitVector match(count);
    sifted.reserve(count / 2 + 64);
    BitVector class_lo;
    BitVector class_hi;
    for (std::size_t i = 0; i < count; ++i) {
      const AliceState s = prf.at(events[i].pulse);
      if (s.basis == bob_bases.get(i)) {
        match.set(i, true);
        sifted.push_back(s.bit);
        info.basis.push_back(s.basis);
        if (source.decoys()) {
          info.intensity.push_back(s.intensity);
          class_lo.push_back((s.intensity & 1U) != 0);
          class_hi.push_back((s.intensity & 2U) != 0);
        }
      }
    }
    events.clear();
    if (events.capacity() > kKeepEventCapacity) {
      events.shrink_to_fit();
    }
    Writer w;
    w.bits(match);
    if (source.decoys()) {
      w.bits(class_lo);
      w.bits(class_hi);
    }
    if (Status s = ch.send(MsgType::kSiftMatch, block, w.buffer()); !s.ok()) {
      return s;
    }
  }
  r.sifted_bits = sifted.size();

  // (d) Parameter estimation: every decoy-class bit (and, with a biased basis choice, every
  // X-basis bit) plus a random sample of the rest, disclosed and discarded.
  const bool biased = P.z_basis_prob > 0.5;
  auto mask = detail::choose_disclosure(info, biased, P.sample_fraction);
  if (!mask.ok()) {
    return mask.error();
  }
  BitVector sample;
  BitVector key;
  BlockStatistics block_stats;
  detail::split_by_mask(sifted, *mask, sample, key);
  sifted.clear();
  {
    Writer w;
    w.bits(*mask);
    w.bits(sample);
    if (Status s = ch.send(MsgType::kSample, block, w.buffer()); !s.ok()) {
      return s;
    }
    auto f = recv(MsgType::kSampleReply, block);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    BitVector bob_sample;
    if (!rd.bits(bob_sample, sample.size()) || !rd.done() || bob_sample.size() != sample.size()) {
      return malformed(MsgType::kSampleReply);
    }
    block_stats = detail::gather_statistics(info, *mask, sample, bob_sample, P, source,
                                      P.pulses_per_block, r);
    if (auto why = detail::estimation_abort(block_stats.sample_bits, block_stats.sample_errors, key.size(),
                                            P.qber_abort, P.confidence_sd)) {
      r.aborted = true;
      r.abort_reason = *why;
      return detail::close_aborted_block(ch, block, P.message_timeout);
    }
  }
  const auto n = static_cast<std::uint32_t>(key.size());

  // (e) Cascade: Alice answers Bob's parity requests.
  {
    const std::uint32_t k1 = cascade_first_block_size(r.qber, n, P.cascade_variant);
    const std::uint32_t passes = detail::cascade_passes(P);
    std::array<std::uint8_t, 32> shuffle{};
    if (Status s = random_bytes(shuffle); !s.ok()) {
      return s;
    }
    Writer w;
    w.u32(n);
    w.u32(k1);
    w.u32(passes);
    w.u8(static_cast<std::uint8_t>(P.cascade_variant));
    w.bytes(shuffle);
    if (Status s = ch.send(MsgType::kCascadeStart, block, w.buffer()); !s.ok()) {
      return s;
    }
    const CascadeLayout layout(n, passes, k1, std::span<const std::uint8_t, 32>(shuffle),
                               P.cascade_variant);
    const CascadeResponder responder(key, layout);
    std::vector<ParityQuery> queries;
    for (std::uint64_t req = 0;; ++req) {
      if (req >= detail::kMaxCascadeRequests) {
        return make_error(ErrorCode::kProtocol, "Cascade: too many parity requests");
      }
      auto f = recv(MsgType::kCascadeRequest, block);
      if (!f.ok()) {
        return f.error();
      }
      Reader rd(f->payload);
      std::uint8_t kind = 0;
      if (!rd.u8(kind)) {
        return malformed(MsgType::kCascadeRequest);
      }
      Result<BitVector> answer = BitVector{};
      if (kind == static_cast<std::uint8_t>(detail::CascadeRequestKind::kBlockParities)) {
        std::uint32_t pass = 0;
        if (!rd.u32(pass) || !rd.done()) {
          return malformed(MsgType::kCascadeRequest);
        }
        answer = responder.block_parities(pass);
      } else if (kind == static_cast<std::uint8_t>(detail::CascadeRequestKind::kRangeParities)) {
        std::uint32_t count = 0;
        if (!rd.u32(count) || count > n || count > rd.remaining() / 9) {
          return malformed(MsgType::kCascadeRequest);
        }
        queries.resize(count);
        for (auto& q : queries) {
          std::uint8_t pass = 0;
          if (!rd.u8(pass) || !rd.u32(q.start) || !rd.u32(q.length)) {
            return malformed(MsgType::kCascadeRequest);
          }
          q.pass = pass;
        }
        if (!rd.done()) {
          return malformed(MsgType::kCascadeRequest);
        }
        answer = responder.range_parities(queries);
      } else if (kind == static_cast<std::uint8_t>(detail::CascadeRequestKind::kDone)) {
        std::uint64_t corrected = 0;
        if (!rd.u64(corrected) || !rd.done() || corrected > n) {
          return malformed(MsgType::kCascadeRequest);
        }
        r.cascade_errors_corrected = corrected;
        break;
      } else {
        return malformed(MsgType::kCascadeRequest);
      }
      if (!answer.ok()) {
        return answer.error();
      }
      r.leaked_bits += answer->size();
      Writer rw;
      rw.bits(*answer);
      if (Status s = ch.send(MsgType::kCascadeReply, block, rw.buffer()); !s.ok()) {
        return s;
      }
    }
  }

  // (f) Verification: a Toeplitz hash of verify_hash_bits bits (2-universal).
  {
    const std::uint32_t vb = P.verify_hash_bits;
    auto vseed = detail::random_bits(n + vb - 1);
    if (!vseed.ok()) {
      return vseed.error();
    }
    auto tag = toeplitz_hash(*vseed, key, vb);
    if (!tag.ok()) {
      return tag.error();
    }
    Writer w;
    w.bits(*vseed);
    w.bytes(tag->to_bytes());
    if (Status s = ch.send(MsgType::kVerify, block, w.buffer()); !s.ok()) {
      return s;
    }
    r.leaked_bits += vb;
    auto f = recv(MsgType::kVerifyResult, block, true);  // checkpoint: Bob's transcript
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint8_t same = 0;
    if (!rd.u8(same) || !rd.done() || same > 1) {
      return malformed(MsgType::kVerifyResult);
    }
    if (same == 0) {
      r.aborted = true;
      r.abort_reason = "verification hash mismatch after Cascade (residual errors)";
      return detail::close_aborted_block(ch, block, P.message_timeout);
    }
  }

  // (g) Privacy amplification.
  {
    const std::uint64_t m = detail::final_key_length(block_stats, r.leaked_bits, r);
    BitVector pseed;
    if (m > 0) {
      auto s = detail::random_bits(n + m - 1);
      if (!s.ok()) {
        return s.error();
      }
      pseed = std::move(s).value();
    }
    Writer w;
    w.u64(m);
    w.bits(pseed);
    // Checkpoint: Alice's transcript (sent only after Bob's verified).
    if (Status s = ch.send(MsgType::kAmplify, block, w.buffer(), true); !s.ok()) {
      return s;
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
    auto f = recv(MsgType::kBlockDone, block, true);  // checkpoint: Bob verified Amplify
    if (!f.ok()) {
      return f.error();
    }
    if (!f->payload.empty()) {
      return malformed(MsgType::kBlockDone);
    }
    detail::pay_authentication(ch, gross, m, r);
  }
  return ok_status();
}

AliceEndpoint::AliceEndpoint(ChannelParams channel, ProtocolParams protocol,
                             std::span<const std::uint8_t> psk, std::uint64_t seed,
                             MessageTransport& quantum, MessageTransport& classical)
    : impl_(std::make_unique<Impl>(channel, protocol, psk, seed, quantum, classical)) {}

AliceEndpoint::~AliceEndpoint() = default;

Result<BlockResult> AliceEndpoint::run_block() {
  if (impl_->init_error) {
    return *impl_->init_error;
  }
  if (impl_->failed) {
    return make_error(impl_->failed->code,
                      "endpoint unusable after an earlier error: " + impl_->failed->message);
  }
  if (Status s = validate(impl_->channel); !s.ok()) {
    return s.error();
  }
  if (Status s = validate(impl_->protocol); !s.ok()) {
    return s.error();
  }
  const auto start = std::chrono::steady_clock::now();
  BlockResult r;
  const std::uint64_t pads_before = impl_->classical->pad_bytes_used();
  r.block_id = impl_->next_block++;
  bool fatal = true;
  Status st = impl_->run(r, fatal);
  if (!st.ok()) {
    if (fatal) {
      // Tell Bob (best effort) unless the error came from him or the pipe is gone.
      const ErrorCode c = st.error().code;
      if (c != ErrorCode::kRejected && c != ErrorCode::kClosed) {
        impl_->classical->send_abort(r.block_id, st.error().message);
        (void)impl_->quantum.send(detail::encode_quantum_abort(r.block_id));
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
