// Alice's endpoint: source + channel simulation, then the classical post-processing, in
// which she is the reference (Bob corrects towards her key) and the one who draws every
// public random seed.
#include <openssl/crypto.h>

#include <algorithm>
#include <array>
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

struct AliceEndpoint::Impl final : detail::EndpointCore {
  ChannelParams channel;
  SecureBytes psk;
  std::uint64_t seed;
  std::uint64_t next_block = 0;
  // Detection events of the current block; the capacity is kept between blocks (up to
  // kKeepEventCapacity) so that each block does not fault in fresh pages.
  std::vector<DetectionEvent> events_buffer;
  static constexpr std::size_t kKeepEventCapacity = std::size_t{1} << 24;  // 128 MB
  // Alice's state of each detection event (from the simulation, reused by sifting): secret,
  // cleansed by StatesGuard when a block's sifting ends or the block fails.
  std::vector<AliceState> states_buffer;
  struct StatesGuard {
    std::vector<AliceState>& v;
    explicit StatesGuard(std::vector<AliceState>& b) : v(b) {}
    StatesGuard(const StatesGuard&) = delete;
    StatesGuard& operator=(const StatesGuard&) = delete;
    ~StatesGuard() { release(); }
    void release() {
      if (!v.empty()) {
        OPENSSL_cleanse(v.data(), v.size() * sizeof(AliceState));
      }
      v.clear();
      if (v.capacity() > kKeepEventCapacity) {
        v.shrink_to_fit();
      }
    }
  };

  Impl(ChannelParams c, const ProtocolParams& p, std::span<const std::uint8_t> k,
       std::uint64_t s, MessageTransport& q, MessageTransport& cl)
      : EndpointCore(p, detail::AuthRole::kAlice, k, q, cl), channel(c), psk(k), seed(s) {}

  Status run(BlockResult& r, bool& fatal) override;
  Status validate_settings() const override {
    if (Status s = validate(channel); !s.ok()) {
      return s;
    }
    return validate(protocol);
  }
  // Also stops a Bob still waiting for detections.
  void tell_peer(std::uint64_t block, const Error& e) override {
    EndpointCore::tell_peer(block, e);
    (void)quantum.send(detail::encode_quantum_abort(block));
  }
};

Status AliceEndpoint::Impl::run(BlockResult& r, bool& fatal) {
  const ProtocolParams& P = protocol;
  r.block_id = next_block++;
  const std::uint64_t block = r.block_id;
  AuthChannel& ch = *classical;

  // (a) Parameters.
  {
    Writer w;
    detail::write_params(w, P, channel.pulse_rate_hz, detail::source_info(channel));
    auto f = exchange(MsgType::kParams, block, w.buffer(), MsgType::kParamsAck);
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
  std::vector<AliceState>& states = states_buffer;
  StatesGuard states_guard(states);
  states.clear();
  {
    ChannelSimulator sim(channel, seed ^ (0x5DEECE66DULL * (block + 1)));
    sim.run(events, prf, P.pulses_per_block, &states);
  }
  if (states.size() != events.size()) {
    return make_error(ErrorCode::kInternal, "simulation returned inconsistent states");
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
    info.basis.reserve(count / 2 + 64);
    BitVector class_lo;
    BitVector class_hi;
    // The states come from the simulation (states_buffer, cleansed after sifting).
    // The kept bits gathered 64 at a time and appended a word at a time.
    std::uint64_t bit_word = 0;
    std::uint64_t basis_word = 0;
    std::uint64_t lo_word = 0;
    std::uint64_t hi_word = 0;
    unsigned filled = 0;
    const auto flush = [&] {
      sifted.append_bits(bit_word, filled);
      info.basis.append_bits(basis_word, filled);
      if (source.decoys()) {
        class_lo.append_bits(lo_word, filled);
        class_hi.append_bits(hi_word, filled);
      }
      bit_word = basis_word = lo_word = hi_word = 0;
      filled = 0;
    };
    // Without a branch per detection (a basis match is a coin flip, a branch on it was
    // mispredicted half the time): every state is added with a 0/1 weight. The match mask
    // is written a word at a time.
    const bool decoys = source.decoys();
    const auto bob_words = bob_bases.words();
    auto match_words = match.mutable_words();
    for (std::size_t w = 0; w < match_words.size(); ++w) {
      const std::size_t begin = 64 * w;
      const std::size_t end = std::min<std::size_t>(count, begin + 64);
      const std::uint64_t bob_word = bob_words[w];
      std::uint64_t match_word = 0;
      for (std::size_t i = begin; i < end; ++i) {
        const AliceState& s = states[i];
        const unsigned at = static_cast<unsigned>(i - begin);
        const std::uint64_t m =
            std::uint64_t{s.basis == (((bob_word >> at) & 1U) != 0) ? 1U : 0U};
        match_word |= m << at;
        bit_word |= (std::uint64_t{s.bit ? 1U : 0U} & m) << filled;
        basis_word |= (std::uint64_t{s.basis ? 1U : 0U} & m) << filled;
        if (decoys) {
          lo_word |= (std::uint64_t{s.intensity & 1U} & m) << filled;
          hi_word |= (std::uint64_t{(s.intensity >> 1) & 1U} & m) << filled;
        }
        filled += static_cast<unsigned>(m);
        if (filled == 64) {
          flush();
        }
      }
      match_words[w] = match_word;
    }
    flush();
    if (decoys) {
      // The class of each kept bit, from the two bit planes just built.
      info.intensity.resize(class_lo.size());
      const auto lo = class_lo.words();
      const auto hi = class_hi.words();
      for (std::size_t i = 0; i < info.intensity.size(); ++i) {
        info.intensity[i] = static_cast<std::uint8_t>(((lo[i >> 6] >> (i & 63)) & 1U) |
                                                      (((hi[i >> 6] >> (i & 63)) & 1U) << 1));
      }
    }
    states_guard.release();
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
    auto f = exchange(MsgType::kSample, block, w.buffer(), MsgType::kSampleReply);
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
    if (auto why = detail::estimation_abort(block_stats, key.size(), P)) {
      return abort_block(r, block, *why);
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
    w.u32(P.cascade_biconf_rounds);
    if (Status s = ch.send(MsgType::kCascadeStart, block, w.buffer()); !s.ok()) {
      return s;
    }
    // The responder needs no index -> position tables.
    const CascadeLayout layout(n, passes, k1, std::span<const std::uint8_t, 32>(shuffle),
                               P.cascade_variant, P.cascade_biconf_rounds,
                               /*inverse_tables=*/false);
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
      // Every parity answered is leakage: once n have been disclosed the block can no longer
      // yield key, so a Bob asking for more is misbehaving (an honest Bob stops first:
      // RemoteParityOracle). Also bounds the work a request stream can cost.
      if (kind != static_cast<std::uint8_t>(detail::CascadeRequestKind::kDone) &&
          r.leaked_bits >= n) {
        return make_error(ErrorCode::kProtocol,
                          "Cascade: " + std::to_string(r.leaked_bits) + " parities of the " +
                              std::to_string(n) +
                              "-bit key already disclosed; the block can yield no key");
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
        std::uint64_t total = 0;  // bits the answer reads: its cost is O(count + total / 64)
        for (auto& q : queries) {
          std::uint8_t pass = 0;
          if (!rd.u8(pass) || !rd.u32(q.start) || !rd.u32(q.length)) {
            return malformed(MsgType::kCascadeRequest);
          }
          q.pass = pass;
          total += q.length;
        }
        if (!rd.done()) {
          return malformed(MsgType::kCascadeRequest);
        }
        if (total > detail::kMaxCascadeRequestBits * std::uint64_t{n}) {
          return make_error(ErrorCode::kProtocol,
                            "Cascade: parity request covering " + std::to_string(total) +
                                " bits of the " + std::to_string(n) + "-bit key refused");
        }
        answer = responder.range_parities(queries);
      } else if (kind == static_cast<std::uint8_t>(detail::CascadeRequestKind::kDone)) {
        std::uint64_t corrected = 0;
        if (!rd.u64(corrected) || corrected > n) {
          return malformed(MsgType::kCascadeRequest);
        }
        std::uint64_t biconf = 0;
        if (!rd.u64(biconf) || !rd.done() || biconf > r.leaked_bits) {
          return malformed(MsgType::kCascadeRequest);
        }
        r.cascade_errors_corrected = corrected;
        r.biconf_parities = biconf;
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

  // (f) Verification: a t-bit Toeplitz hash, t from epsilon_cor (verify_tag_bits).
  {
    const std::uint32_t vb = verify_tag_bits(P);
    r.verify_tag_bits = vb;
    r.epsilon_cor = P.epsilon_cor;
    auto vseed = detail::random_bits(std::size_t{n} + vb - 1);
    if (!vseed.ok()) {
      return vseed.error();
    }
    auto tag = detail::verification_tag(*vseed, key, vb);
    if (!tag.ok()) {
      return tag.error();
    }
    Writer w;
    w.bits(*vseed);
    w.bytes(*tag);
    r.leaked_bits += vb;
    // Checkpoint: Bob's transcript.
    auto f = exchange(MsgType::kVerify, block, w.buffer(), MsgType::kVerifyResult, false, true);
    if (!f.ok()) {
      return f.error();
    }
    Reader rd(f->payload);
    std::uint8_t same = 0;
    if (!rd.u8(same) || !rd.done() || same > 1) {
      return malformed(MsgType::kVerifyResult);
    }
    if (same == 0) {
      return abort_block(r, block, std::string(detail::kVerificationMismatch));
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

Result<BlockResult> AliceEndpoint::run_block() { return impl_->run_block(); }

}  // namespace qkd::core
