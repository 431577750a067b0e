#include "channel.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "gf128.hpp"
#include "qkd/core/random.hpp"
#include "wire.hpp"

namespace qkd::core::detail {
namespace {

constexpr std::string_view kSalt = "qkd-tls bb84 classical channel v1";
constexpr std::string_view kWcSalt = "qkd-tls bb84 wegman-carter v1";
constexpr std::size_t kHashKeyBytes = 16;
constexpr std::size_t kHkdfMax = 255 * 32;  // RFC 5869 limit per expansion

Error short_psk(std::size_t n) {
  return make_error(ErrorCode::kInvalidArgument,
                    "pre-shared key must be at least 16 bytes, got " + std::to_string(n));
}

std::string hex(std::span<const std::uint8_t> b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (std::uint8_t v : b) {
    s.push_back(d[v >> 4]);
    s.push_back(d[v & 15]);
  }
  return s;
}

// HKDF output of any length: consecutive expansions labelled "<info> #i".
Status expand(SecureBytes& out, std::span<const std::uint8_t> psk, const std::string& info,
              std::size_t n) {
  out.resize(n);
  std::size_t at = 0;
  for (std::size_t i = 0; at < n; ++i) {
    const std::size_t len = std::min(kHkdfMax, n - at);
    auto part = hkdf_sha256(psk, kWcSalt, info + " #" + std::to_string(i), len);
    if (!part.ok()) {
      return part.error();
    }
    std::memcpy(out.data() + at, part->data(), len);
    at += len;
  }
  return ok_status();
}

// Pops `n` bytes off the top of a pad pool into `pad` (cleansing them in the pool).
bool pop_pad(SecureBytes& pool, std::size_t n, std::array<std::uint8_t, 16>& pad) {
  if (pool.size() < n) {
    return false;
  }
  std::memcpy(pad.data(), pool.data() + pool.size() - n, n);
  pool.resize(pool.size() - n);
  return true;
}

std::vector<std::uint8_t> wc_tag(std::span<const std::uint8_t> hash_key,
                                 std::span<const std::uint8_t, 16> pad, std::size_t tag_bytes,
                                 std::span<const std::uint8_t> body) {
  auto t = wegman_carter_tag(std::span<const std::uint8_t, 16>(hash_key.data(), 16), pad,
                             tag_bytes, body);
  std::vector<std::uint8_t> tag(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(tag_bytes));
  t.fill(0);
  return tag;
}

}  // namespace

const char* msg_type_name(MsgType t) {
  switch (t) {
    case MsgType::kParams: return "Params";
    case MsgType::kParamsAck: return "ParamsAck";
    case MsgType::kDetections: return "Detections";
    case MsgType::kSiftBases: return "SiftBases";
    case MsgType::kSiftMatch: return "SiftMatch";
    case MsgType::kSample: return "Sample";
    case MsgType::kSampleReply: return "SampleReply";
    case MsgType::kCascadeStart: return "CascadeStart";
    case MsgType::kCascadeRequest: return "CascadeRequest";
    case MsgType::kCascadeReply: return "CascadeReply";
    case MsgType::kVerify: return "Verify";
    case MsgType::kVerifyResult: return "VerifyResult";
    case MsgType::kAmplify: return "Amplify";
    case MsgType::kBlockDone: return "BlockDone";
    case MsgType::kAbort: return "Abort";
    case MsgType::kCheckpoint: return "Checkpoint";
  }
  return "unknown";
}

Result<MacKeys> derive_mac_keys(std::span<const std::uint8_t> psk,
                                std::span<const std::uint8_t> nonce_a,
                                std::span<const std::uint8_t> nonce_b) {
  if (psk.size() < 16) {
    return short_psk(psk.size());
  }
  const std::string nonces = hex(nonce_a) + " " + hex(nonce_b);
  auto ab = hkdf_sha256(psk, kSalt, "mac alice->bob " + nonces, 32);
  auto ba = hkdf_sha256(psk, kSalt, "mac bob->alice " + nonces, 32);
  if (!ab.ok()) {
    return ab.error();
  }
  if (!ba.ok()) {
    return ba.error();
  }
  return MacKeys{std::move(ab).value(), std::move(ba).value()};
}

AuthSettings auth_settings(const ProtocolParams& p) {
  return AuthSettings{p.auth, p.auth_tag_bits, p.auth_pool_bits, p.auth_key_refresh_blocks,
                      p.auth_every_message};
}

AuthChannel::AuthChannel(MessageTransport& t, AuthRole role, const AuthSettings& s)
    : t_(t), role_(role), settings_(s) {}

AuthChannel::~AuthChannel() {
  nonce_.fill(0);
  peer_nonce_.fill(0);
}

Result<std::unique_ptr<AuthChannel>> AuthChannel::create(MessageTransport& transport,
                                                         AuthRole role,
                                                         std::span<const std::uint8_t> psk,
                                                         const AuthSettings& settings) {
  if (psk.size() < 16) {
    return short_psk(psk.size());
  }
  const bool hmac = settings.mode == AuthMode::kHmac;
  if ((!hmac && settings.mode != AuthMode::kWegmanCarter) ||
      (settings.tag_bits != 64 && settings.tag_bits != 128) || settings.pool_bits % 8 != 0 ||
      settings.pool_bits < 1024 || settings.refresh_blocks < 1) {
    return make_error(ErrorCode::kInvalidArgument, "invalid authentication settings");
  }
  std::unique_ptr<AuthChannel> ch(new AuthChannel(transport, role, settings));
  ch->psk_ = SecureBytes(psk);
  if (Status s = random_bytes(ch->nonce_); !s.ok()) {
    return s.error();
  }
  if (role == AuthRole::kAlice) {
    if (Status s = ch->derive_hello_a(ch->nonce_); !s.ok()) {
      return s.error();
    }
  }
  return ch;
}

std::string AuthChannel::settings_label() const {
  return "t" + std::to_string(settings_.tag_bits) + " p" + std::to_string(settings_.pool_bits) +
         (settings_.every_message ? " every" : " transcript");
}

// The hello keys do not depend on the settings, so that the first Params can always be
// verified and read (a settings mismatch is then refused by name).
Status AuthChannel::derive_hello_a(std::span<const std::uint8_t> nonce_a) {
  return expand(hello_a_, psk_.span(), "hello a->b " + hex(nonce_a),
                kHashKeyBytes + 2 * kHelloTagBytes);
}

Status AuthChannel::derive_hello_b(std::span<const std::uint8_t> nonce_a,
                                   std::span<const std::uint8_t> nonce_b) {
  return expand(hello_b_, psk_.span(), "hello b->a " + hex(nonce_a) + " " + hex(nonce_b),
                kHashKeyBytes + kHelloTagBytes);
}

Status AuthChannel::derive_session(std::span<const std::uint8_t> nonce_a,
                                   std::span<const std::uint8_t> nonce_b) {
  if (settings_.mode == AuthMode::kHmac) {
    auto keys = derive_mac_keys(psk_.span(), nonce_a, nonce_b);
    if (!keys.ok()) {
      return keys.error();
    }
    const bool alice = role_ == AuthRole::kAlice;
    hmac_send_ = alice ? keys->alice_to_bob : keys->bob_to_alice;
    hmac_recv_ = alice ? keys->bob_to_alice : keys->alice_to_bob;
    return ok_status();
  }
  const std::string label = "session " + settings_label() + " " + hex(nonce_a) + " " + hex(nonce_b);
  const std::size_t pool = settings_.pool_bits / 8;
  if (Status s = expand(ab_.hash_key, psk_.span(), label + " hash a->b", kHashKeyBytes); !s.ok()) {
    return s;
  }
  if (Status s = expand(ba_.hash_key, psk_.span(), label + " hash b->a", kHashKeyBytes); !s.ok()) {
    return s;
  }
  if (Status s = expand(ab_.pool, psk_.span(), label + " pads a->b", pool); !s.ok()) {
    return s;
  }
  return expand(ba_.pool, psk_.span(), label + " pads b->a", pool);
}

std::size_t AuthChannel::send_pool_bytes() const {
  return (role_ == AuthRole::kAlice ? ab_ : ba_).pool.size();
}

std::size_t AuthChannel::recv_pool_bytes() const {
  return (role_ == AuthRole::kAlice ? ba_ : ab_).pool.size();
}

namespace {

// A hello tag (always 128 bits): hello material = H (16) | pads.
std::vector<std::uint8_t> hello_tag(const SecureBytes& hello, std::size_t pad_index,
                                    std::span<const std::uint8_t> body) {
  std::array<std::uint8_t, 16> pad{};
  std::memcpy(pad.data(), hello.data() + kHashKeyBytes + pad_index * kHelloTagBytes,
              kHelloTagBytes);
  auto tag = wc_tag(hello.span().first(kHashKeyBytes), pad, kHelloTagBytes, body);
  pad.fill(0);
  return tag;
}

// Appends one frame (without its tag) to a direction's transcript: u64 length || frame.
void absorb(PolyHasher& h, std::span<const std::uint8_t> key, std::span<const std::uint8_t> body) {
  if (h.bytes() == 0) {
    h.reset(std::span<const std::uint8_t, 16>(key.data(), 16));  // the current hash key
  }
  std::array<std::uint8_t, 8> len{};
  for (std::size_t i = 0; i < 8; ++i) {
    len[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(body.size()) >> (8 * i));
  }
  h.update(len);
  h.update(body);
}

}  // namespace

Result<std::vector<std::uint8_t>> AuthChannel::tag_for(bool sending, bool tagged,
                                                       std::span<const std::uint8_t> body) {
  if (!session_) {
    return make_error(ErrorCode::kInternal, "session keys not yet agreed");
  }
  if (settings_.mode == AuthMode::kHmac) {
    auto t = hmac_sha256((sending ? hmac_send_ : hmac_recv_).span(), body);
    if (!t.ok()) {
      return t.error();
    }
    return std::vector<std::uint8_t>(t->begin(), t->end());
  }
  const std::size_t tb = settings_.tag_bytes();
  const bool from_alice = sending == (role_ == AuthRole::kAlice);
  Direction& d = from_alice ? ab_ : ba_;
  PolyHasher& transcript = from_alice ? ab_transcript_ : ba_transcript_;
  if (settings_.transcript()) {
    absorb(transcript, d.hash_key.span(), body);
    if (!tagged) {
      return std::vector<std::uint8_t>{};
    }
  }
  std::array<std::uint8_t, 16> pad{};
  if (!pop_pad(d.pool, tb, pad)) {
    return make_error(ErrorCode::kAuthentication,
                      std::string(kPadExhausted) + ": the " +
                          (from_alice ? "Alice->Bob" : "Bob->Alice") +
                          " one-time-pad pool is empty (aborted blocks since the last settled "
                          "one used it up); start a new session");
  }
  pad_bytes_used_ += tb;
  std::vector<std::uint8_t> tag;
  if (settings_.transcript()) {
    auto h = transcript.finish();
    tag.assign(h.begin(), h.begin() + static_cast<std::ptrdiff_t>(tb));
    for (std::size_t i = 0; i < tb; ++i) {
      tag[i] ^= pad[i];
    }
    h.fill(0);
    transcript.reset(std::span<const std::uint8_t, 16>(d.hash_key.data(), 16));
  } else {
    tag = wc_tag(d.hash_key.span(), pad, tb, body);
  }
  pad.fill(0);
  return tag;
}

Status AuthChannel::send(MsgType type, std::uint64_t block_id,
                         std::span<const std::uint8_t> payload, bool checkpoint) {
  Writer w;
  w.reserve(kHeaderBytes + kNonceBytes + payload.size() + kMacBytes);
  w.u8(kWireVersionClassical);
  w.u8(static_cast<std::uint8_t>(type));
  w.u64(block_id);
  w.u64(send_seq_);
  if (send_seq_ == 0) {
    w.bytes(nonce_);
  }
  w.bytes(payload);
  const bool alice = role_ == AuthRole::kAlice;
  if (send_seq_ == 0) {
    if (!alice && hello_b_.empty()) {
      return make_error(ErrorCode::kInternal, "Bob cannot speak before Alice's first frame");
    }
    w.bytes(hello_tag(alice ? hello_a_ : hello_b_, 0, w.buffer()));
  } else if (alice && !session_ && type == MsgType::kAbort && send_seq_ == 1) {
    w.bytes(hello_tag(hello_a_, 1, w.buffer()));  // early Abort: nonce_B not verified
  } else {
    const std::size_t tb = settings_.tag_bytes();
    if (settings_.mode == AuthMode::kWegmanCarter && settings_.every_message && session_ &&
        type != MsgType::kAbort && send_pool_bytes() < 2 * tb) {
      return make_error(
          ErrorCode::kAuthentication,
          std::string(kPadExhausted) + ": the " + (alice ? "Alice->Bob" : "Bob->Alice") +
              " one-time-pad pool holds only its Abort frame's tag, in the middle of a block: "
              "per-message authentication (auth_every_message) takes a " +
              std::to_string(settings_.tag_bits) + "-bit tag per frame, ~100-200 per block "
              "with Cascade's round trips, and auth_pool_bits = " +
              std::to_string(settings_.pool_bits) + " holds " +
              std::to_string(settings_.pool_bits / settings_.tag_bits) +
              " per direction (fewer after aborted blocks); raise auth_pool_bits or use "
              "transcript authentication");
    }
    auto tag = tag_for(true, checkpoint || type == MsgType::kAbort, w.buffer());
    if (!tag.ok()) {
      return tag.error();
    }
    w.bytes(*tag);
  }
  ++send_seq_;
  return t_.send(w.take());
}

Result<Frame> AuthChannel::receive(std::chrono::milliseconds timeout, MsgType expected,
                                   std::optional<std::uint64_t> block_id, bool checkpoint) {
  auto msg = t_.receive(timeout);
  if (!msg.ok()) {
    return msg.error();
  }
  const std::vector<std::uint8_t>& m = *msg;
  const bool first = recv_seq_ == 0;
  const std::size_t nonce = first ? kNonceBytes : 0;
  if (m.size() < kHeaderBytes + nonce || m.size() > kMaxMessageBytes) {
    return make_error(ErrorCode::kProtocol,
                      "classical message of " + std::to_string(m.size()) + " bytes rejected");
  }
  const bool claims_abort = m[1] == static_cast<std::uint8_t>(MsgType::kAbort);
  const bool tagged = first || !settings_.transcript() || checkpoint || claims_abort;
  std::size_t tl = 0;
  if (first) {
    tl = kHelloTagBytes;
  } else if (tagged) {
    tl = settings_.tag_bytes();
  }
  if (m.size() < kHeaderBytes + nonce + tl) {
    return make_error(ErrorCode::kProtocol,
                      "classical message of " + std::to_string(m.size()) + " bytes rejected");
  }
  std::span<const std::uint8_t> body(m.data(), m.size() - tl);
  std::span<const std::uint8_t> tag(m.data() + body.size(), tl);
  bool verified = false;
  if (first) {
    std::memcpy(peer_nonce_.data(), m.data() + kHeaderBytes, kNonceBytes);
    if (role_ == AuthRole::kBob) {
      if (Status s = derive_hello_a(peer_nonce_); !s.ok()) {
        return s.error();
      }
      verified = constant_time_equal(hello_tag(hello_a_, 0, body), tag);
      // Bob keys his hello and the session even if Alice's frame fails, so that his Abort
      // reaches her authenticated (with material fresh from his own nonce).
      if (Status s = derive_hello_b(peer_nonce_, nonce_); !s.ok()) {
        return s.error();
      }
      if (Status s = derive_session(peer_nonce_, nonce_); !s.ok()) {
        return s.error();
      }
      session_ = true;
    } else {
      if (Status s = derive_hello_b(nonce_, peer_nonce_); !s.ok()) {
        return s.error();
      }
      verified = constant_time_equal(hello_tag(hello_b_, 0, body), tag);
      if (verified) {
        if (Status s = derive_session(nonce_, peer_nonce_); !s.ok()) {
          return s.error();
        }
        session_ = true;
      }
    }
  } else {
    auto expect = tag_for(false, tagged, body);
    if (!expect.ok()) {
      return expect.error();
    }
    verified = constant_time_equal(*expect, tag);
    if (!verified && role_ == AuthRole::kBob && recv_seq_ == 1 && claims_abort &&
        m.size() >= kHeaderBytes + kHelloTagBytes && !hello_a_.empty()) {
      // Alice's early Abort (she could not verify Bob's first frame).
      const std::span<const std::uint8_t> b2(m.data(), m.size() - kHelloTagBytes);
      const std::span<const std::uint8_t> t2(m.data() + b2.size(), kHelloTagBytes);
      if (constant_time_equal(hello_tag(hello_a_, 1, b2), t2)) {
        verified = true;
        body = b2;
      }
    }
  }
  if (!verified) {
    const char* scheme = first || settings_.mode == AuthMode::kWegmanCarter ? "Wegman-Carter"
                                                                            : "HMAC";
    return make_error(ErrorCode::kAuthentication,
                      std::string("classical message failed ") + scheme +
                          (tagged && !first && settings_.transcript() ? " transcript" : "") +
                          " verification (tampered or wrong key)");
  }
  Reader r(body);
  std::uint8_t version = 0;
  std::uint8_t type = 0;
  std::uint64_t block = 0;
  std::uint64_t seq = 0;
  std::span<const std::uint8_t> skipped;
  if (!r.u8(version) || !r.u8(type) || !r.u64(block) || !r.u64(seq) || !r.bytes(nonce, skipped)) {
    return make_error(ErrorCode::kProtocol, "truncated frame header");
  }
  if (version != kWireVersionClassical) {
    return make_error(ErrorCode::kProtocol, "unsupported wire version " + std::to_string(version));
  }
  if (seq != recv_seq_) {
    return make_error(ErrorCode::kProtocol, "sequence number " + std::to_string(seq) +
                                                " where " + std::to_string(recv_seq_) +
                                                " was expected (replayed or reordered)");
  }
  ++recv_seq_;
  std::span<const std::uint8_t> payload;
  if (!r.bytes(r.remaining(), payload)) {
    return make_error(ErrorCode::kInternal, "frame payload");
  }
  if (type == static_cast<std::uint8_t>(MsgType::kAbort)) {
    Reader pr(payload);
    std::string reason;
    if (!pr.string(reason, 1000) || !pr.done()) {
      reason = "(malformed reason)";
    }
    return make_error(ErrorCode::kRejected, "peer aborted block " + std::to_string(block) +
                                                ": " + reason);
  }
  if (block_id && block != *block_id) {
    return make_error(ErrorCode::kProtocol, "message for block " + std::to_string(block) +
                                                " during block " + std::to_string(*block_id));
  }
  if (type != static_cast<std::uint8_t>(expected)) {
    return make_error(ErrorCode::kProtocol,
                      std::string("unexpected message type ") + std::to_string(type) +
                          ", expected " + msg_type_name(expected));
  }
  return Frame{static_cast<MsgType>(type), block,
               std::vector<std::uint8_t>(payload.begin(), payload.end())};
}

void AuthChannel::send_abort(std::uint64_t block_id, const std::string& reason) {
  Writer w;
  w.string(reason.substr(0, 1000));
  (void)send(MsgType::kAbort, block_id, w.buffer());
}

Status AuthChannel::check_block_reserve() const {
  if (settings_.mode != AuthMode::kWegmanCarter || !session_) {
    return ok_status();
  }
  const std::size_t tb = settings_.tag_bytes();
  const bool every = settings_.every_message;
  const std::array<std::pair<const Direction*, std::uint32_t>, 2> need = {
      std::pair{&ab_, every ? kBlockTagsPerMessage : kBlockTagsAliceToBob},
      std::pair{&ba_, every ? kBlockTagsPerMessage : kBlockTagsBobToAlice}};
  for (const auto& [d, tags] : need) {
    if (d->pool.size() < tags * tb) {
      return make_error(
          ErrorCode::kAuthentication,
          std::string(kPadExhausted) + ": the " + (d == &ab_ ? "Alice->Bob" : "Bob->Alice") +
              " one-time-pad pool holds " + std::to_string(8 * d->pool.size()) +
              " bits, a block may need " + std::to_string(8 * tags * tb) +
              " (aborted blocks since the last settled one used the rest); start a new session");
    }
  }
  return ok_status();
}

std::size_t AuthChannel::settle(std::span<const std::uint8_t> key) {
  if (settings_.mode != AuthMode::kWegmanCarter || !session_) {
    return 0;
  }
  const std::size_t target = settings_.pool_bits / 8;
  std::size_t at = 0;
  for (Direction* d : {&ab_, &ba_}) {
    const std::size_t need = target > d->pool.size() ? target - d->pool.size() : 0;
    const std::size_t take = std::min(need, key.size() - at);
    if (take == 0) {
      continue;  // (memcpy from an empty span's null data() is undefined, even of 0 bytes)
    }
    const std::size_t old = d->pool.size();
    d->pool.resize(old + take);
    std::memcpy(d->pool.data() + old, key.data() + at, take);
    at += take;
  }
  const bool due = !refreshed_ || since_refresh_ + 1 >= settings_.refresh_blocks;
  if (due && key.size() - at >= 2 * kHashKeyBytes) {
    for (Direction* d : {&ab_, &ba_}) {
      std::memcpy(d->hash_key.data(), key.data() + at, kHashKeyBytes);
      at += kHashKeyBytes;
    }
    refreshed_ = true;
    since_refresh_ = 0;
    ++refreshes_;
  } else {
    ++since_refresh_;
  }
  return at;
}

}  // namespace qkd::core::detail
