#include "channel.hpp"

#include <algorithm>
#include <cstring>

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
  }
  return "unknown";
}

Result<MacKeys> derive_mac_keys(std::span<const std::uint8_t> psk) {
  if (psk.size() < 16) {
    return short_psk(psk.size());
  }
  auto ab = hkdf_sha256(psk, kSalt, "mac alice->bob", 32);
  auto ba = hkdf_sha256(psk, kSalt, "mac bob->alice", 32);
  if (!ab.ok()) {
    return ab.error();
  }
  if (!ba.ok()) {
    return ba.error();
  }
  return MacKeys{std::move(ab).value(), std::move(ba).value()};
}

AuthSettings auth_settings(const ProtocolParams& p) {
  return AuthSettings{p.auth, p.auth_tag_bits, p.auth_pool_bits, p.auth_key_refresh_blocks};
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
  std::unique_ptr<AuthChannel> ch(new AuthChannel(transport, role, settings));
  if (settings.mode == AuthMode::kHmac) {
    auto keys = derive_mac_keys(psk);
    if (!keys.ok()) {
      return keys.error();
    }
    const bool alice = role == AuthRole::kAlice;
    ch->hmac_send_ = alice ? keys->alice_to_bob : keys->bob_to_alice;
    ch->hmac_recv_ = alice ? keys->bob_to_alice : keys->alice_to_bob;
    return ch;
  }
  if (settings.mode != AuthMode::kWegmanCarter ||
      (settings.tag_bits != 64 && settings.tag_bits != 128) || settings.pool_bits % 8 != 0 ||
      settings.pool_bits < 1024 || settings.refresh_blocks < 1) {
    return make_error(ErrorCode::kInvalidArgument, "invalid authentication settings");
  }
  ch->psk_ = SecureBytes(psk);
  if (Status s = random_bytes(ch->nonce_); !s.ok()) {
    return s.error();
  }
  if (role == AuthRole::kAlice) {
    if (Status s = ch->derive_hello(ch->nonce_); !s.ok()) {
      return s.error();
    }
  }
  return ch;
}

std::string AuthChannel::settings_label() const {
  return "t" + std::to_string(settings_.tag_bits) + " p" + std::to_string(settings_.pool_bits);
}

Status AuthChannel::derive_hello(std::span<const std::uint8_t> nonce_a) {
  return expand(hello_, psk_.span(), "hello " + settings_label() + " " + hex(nonce_a),
                kHashKeyBytes + 2 * settings_.tag_bytes());
}

Status AuthChannel::derive_session(std::span<const std::uint8_t> nonce_a,
                                   std::span<const std::uint8_t> nonce_b) {
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

// The tag of frame `body` (sending: this end's next frame; receiving: the peer's next
// frame). Consumes the pad. Only for Wegman-Carter.
Result<std::vector<std::uint8_t>> AuthChannel::tag_for(bool sending, MsgType type,
                                                       std::span<const std::uint8_t> body) {
  const std::size_t tb = settings_.tag_bytes();
  const bool from_alice = sending == (role_ == AuthRole::kAlice);
  const std::uint64_t seq = sending ? send_seq_ : recv_seq_;
  std::array<std::uint8_t, 16> pad{};
  std::span<const std::uint8_t> key;
  if (from_alice && seq == 0) {
    std::memcpy(pad.data(), hello_.data() + kHashKeyBytes, tb);
    key = hello_.span().first(kHashKeyBytes);
  } else if (!session_ && from_alice && sending && type == MsgType::kAbort && seq == 1) {
    std::memcpy(pad.data(), hello_.data() + kHashKeyBytes + tb, tb);
    key = hello_.span().first(kHashKeyBytes);
  } else {
    if (!session_) {
      return make_error(ErrorCode::kInternal, "Wegman-Carter session keys not yet agreed");
    }
    Direction& d = from_alice ? ab_ : ba_;
    if (!pop_pad(d.pool, tb, pad)) {
      return make_error(ErrorCode::kAuthentication,
                        std::string("one-time-pad pool for ") +
                            (from_alice ? "Alice->Bob" : "Bob->Alice") +
                            " exhausted (aborted blocks did not repay it); start a new session");
    }
    key = d.hash_key.span();
    pad_bytes_used_ += tb;
  }
  auto tag = wc_tag(key, pad, tb, body);
  std::fill(pad.begin(), pad.end(), 0);
  return tag;
}

Status AuthChannel::send(MsgType type, std::uint64_t block_id,
                         std::span<const std::uint8_t> payload) {
  const bool wc = settings_.mode == AuthMode::kWegmanCarter;
  Writer w;
  w.reserve(kHeaderBytes + kNonceBytes + payload.size() + settings_.tag_bytes());
  w.u8(wc ? kWireVersionWc : kWireVersion);
  w.u8(static_cast<std::uint8_t>(type));
  w.u64(block_id);
  w.u64(send_seq_);
  if (wc && send_seq_ == 0) {
    w.bytes(nonce_);
  }
  w.bytes(payload);
  if (!wc) {
    auto tag = hmac_sha256(hmac_send_.span(), w.buffer());
    if (!tag.ok()) {
      return tag.error();
    }
    w.bytes(*tag);
  } else {
    auto tag = tag_for(true, type, w.buffer());
    if (!tag.ok()) {
      return tag.error();
    }
    w.bytes(*tag);
  }
  ++send_seq_;
  return t_.send(w.take());
}

Result<Frame> AuthChannel::receive(std::chrono::milliseconds timeout, MsgType expected,
                                   std::optional<std::uint64_t> block_id) {
  auto msg = t_.receive(timeout);
  if (!msg.ok()) {
    return msg.error();
  }
  const bool wc = settings_.mode == AuthMode::kWegmanCarter;
  const std::size_t tb = settings_.tag_bytes();
  const std::size_t nonce = wc && recv_seq_ == 0 ? kNonceBytes : 0;
  const std::vector<std::uint8_t>& m = *msg;
  if (m.size() < kHeaderBytes + nonce + tb || m.size() > kMaxMessageBytes) {
    return make_error(ErrorCode::kProtocol,
                      "classical message of " + std::to_string(m.size()) + " bytes rejected");
  }
  const std::span<const std::uint8_t> body(m.data(), m.size() - tb);
  const std::span<const std::uint8_t> tag(m.data() + body.size(), tb);
  bool verified = false;
  if (!wc) {
    auto expect = hmac_sha256(hmac_recv_.span(), body);
    if (!expect.ok()) {
      return expect.error();
    }
    verified = constant_time_equal(*expect, tag);
  } else {
    const auto claimed_type = static_cast<MsgType>(m[1]);
    if (recv_seq_ == 0) {
      // The peer's first frame carries its nonce; derive what it is keyed with.
      std::memcpy(peer_nonce_.data(), m.data() + kHeaderBytes, kNonceBytes);
      if (role_ == AuthRole::kBob) {
        if (Status s = derive_hello(peer_nonce_); !s.ok()) {
          return s.error();
        }
        auto expect = tag_for(false, claimed_type, body);
        if (!expect.ok()) {
          return expect.error();
        }
        verified = constant_time_equal(*expect, tag);
        // Bob keys the session even if Alice's frame fails, so that his Abort reaches her
        // authenticated (with pads fresh from his own nonce).
        if (Status s = derive_session(peer_nonce_, nonce_); !s.ok()) {
          return s.error();
        }
        session_ = true;
      } else {
        if (Status s = derive_session(nonce_, peer_nonce_); !s.ok()) {
          return s.error();
        }
        session_ = true;
        auto expect = tag_for(false, claimed_type, body);
        if (!expect.ok()) {
          return expect.error();
        }
        verified = constant_time_equal(*expect, tag);
        if (!verified) {
          // Unknown nonce_B: forget the session; an Abort from here uses the hello pad.
          session_ = false;
        }
      }
    } else {
      auto expect = tag_for(false, claimed_type, body);
      if (!expect.ok()) {
        return expect.error();
      }
      verified = constant_time_equal(*expect, tag);
      if (!verified && role_ == AuthRole::kBob && recv_seq_ == 1 &&
          claimed_type == MsgType::kAbort) {
        // Alice's early Abort (she could not verify Bob's first frame).
        std::array<std::uint8_t, 16> pad{};
        std::memcpy(pad.data(), hello_.data() + kHashKeyBytes + tb, tb);
        verified = constant_time_equal(
            wc_tag(hello_.span().first(kHashKeyBytes), pad, tb, body), tag);
      }
    }
  }
  if (!verified) {
    return make_error(ErrorCode::kAuthentication,
                      std::string("classical message failed ") + (wc ? "Wegman-Carter" : "HMAC") +
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
  if (version != (wc ? kWireVersionWc : kWireVersion)) {
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

std::size_t AuthChannel::settle(std::span<const std::uint8_t> key) {
  if (settings_.mode != AuthMode::kWegmanCarter || !session_) {
    return 0;
  }
  const std::size_t target = settings_.pool_bits / 8;
  std::size_t at = 0;
  for (Direction* d : {&ab_, &ba_}) {
    const std::size_t need = target > d->pool.size() ? target - d->pool.size() : 0;
    const std::size_t take = std::min(need, key.size() - at);
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
