// Parsers of untrusted bytes: the bounds-checked reader, the quantum frames and the
// authenticated classical frames.
#include <gtest/gtest.h>

#include <optional>

#include "channel.hpp"
#include "protocol.hpp"
#include "wire.hpp"

namespace qkd::core::detail {
namespace {

TEST(Wire, RoundTripAndRejectsTruncation) {
  Writer w;
  w.u8(7);
  w.u32(0xDEADBEEF);
  w.u64(0x0123456789ABCDEFULL);
  w.f64(0.125);
  w.varint(300);
  BitVector v(13);
  v.set(12, true);
  w.bits(v);
  w.string("hi");
  const auto buf = w.take();
  {
    Reader r(buf);
    std::uint8_t a = 0;
    std::uint32_t b = 0;
    std::uint64_t c = 0;
    double d = 0;
    std::uint64_t e = 0;
    BitVector f;
    std::string g;
    ASSERT_TRUE(r.u8(a) && r.u32(b) && r.u64(c) && r.f64(d) && r.varint(e) && r.bits(f, 100) &&
                r.string(g, 10));
    EXPECT_TRUE(r.done());
    EXPECT_EQ(a, 7);
    EXPECT_EQ(b, 0xDEADBEEFU);
    EXPECT_EQ(c, 0x0123456789ABCDEFULL);
    EXPECT_EQ(d, 0.125);
    EXPECT_EQ(e, 300U);
    EXPECT_EQ(f, v);
    EXPECT_EQ(g, "hi");
  }
  // Every truncation fails somewhere and never reads past the end.
  for (std::size_t cut = 0; cut < buf.size(); ++cut) {
    Reader r(std::span<const std::uint8_t>(buf.data(), cut));
    std::uint8_t a = 0;
    std::uint32_t b = 0;
    std::uint64_t c = 0;
    double d = 0;
    std::uint64_t e = 0;
    BitVector f;
    std::string g;
    const bool all = r.u8(a) && r.u32(b) && r.u64(c) && r.f64(d) && r.varint(e) &&
                     r.bits(f, 100) && r.string(g, 10);
    EXPECT_FALSE(all && r.done()) << cut;
  }
}

TEST(Wire, RejectsBadEncodings) {
  {  // bit count above the caller's limit
    Writer w;
    w.bits(BitVector(50));
    const auto b = w.take();
    Reader r(b);
    BitVector v;
    EXPECT_FALSE(r.bits(v, 49));
  }
  {  // non-zero padding bits
    Writer w;
    w.u64(3);
    w.u8(0xFF);
    const auto b = w.take();
    Reader r(b);
    BitVector v;
    EXPECT_FALSE(r.bits(v, 100));
  }
  {  // huge claimed bit count with a short buffer
    Writer w;
    w.u64(~std::uint64_t{0});
    const auto b = w.take();
    Reader r(b);
    BitVector v;
    EXPECT_FALSE(r.bits(v, ~std::uint64_t{0}));
  }
  {  // over-long varint
    const std::vector<std::uint8_t> b(11, 0xFF);
    Reader r(b);
    std::uint64_t v = 0;
    EXPECT_FALSE(r.varint(v));
  }
  {  // trailing bytes are visible
    const std::vector<std::uint8_t> b{1, 2};
    Reader r(b);
    std::uint8_t x = 0;
    ASSERT_TRUE(r.u8(x));
    EXPECT_FALSE(r.done());
  }
}

TEST(Wire, DetectionFramesRoundTripAndRejectGarbage) {
  std::vector<DetectionEvent> ev{{5, true, false, false}, {9, false, true, false},
                                 {1000, false, false, true}};
  const auto msg = encode_detections(3, 0, true, ev, 0);
  std::uint64_t next = 0;
  auto c = decode_detections(msg, 3, 0, next, 2000);
  ASSERT_TRUE(c.ok()) << c.error().message;
  ASSERT_EQ(c->events.size(), 3U);
  EXPECT_EQ(c->events[2].pulse, 1000U);
  EXPECT_TRUE(c->events[2].dark);
  EXPECT_TRUE(c->events[0].bit);
  EXPECT_TRUE(c->events[1].basis);
  EXPECT_EQ(next, 1001U);
  // Wrong block, wrong chunk, past the block end, trailing byte, truncation.
  next = 0;
  EXPECT_EQ(decode_detections(msg, 4, 0, next, 2000).error().code, ErrorCode::kProtocol);
  EXPECT_FALSE(decode_detections(msg, 3, 1, next, 2000).ok());
  EXPECT_FALSE(decode_detections(msg, 3, 0, next, 1000).ok());
  auto longer = msg;
  longer.push_back(0);
  EXPECT_FALSE(decode_detections(longer, 3, 0, next, 2000).ok());
  for (std::size_t cut = 0; cut < msg.size(); ++cut) {
    std::uint64_t nx = 0;
    EXPECT_FALSE(
        decode_detections(std::span<const std::uint8_t>(msg.data(), cut), 3, 0, nx, 2000).ok());
  }
  auto bad_state = msg;
  bad_state.back() = 9;
  EXPECT_FALSE(decode_detections(bad_state, 3, 0, next, 2000).ok());
  // Only the last chunk may be empty, and a block of p pulses has at most
  // p / kMaxEventsPerChunk + 1 chunks (indices 0 .. p / kMaxEventsPerChunk).
  next = 0;
  EXPECT_TRUE(decode_detections(encode_detections(3, 0, true, {}, 0), 3, 0, next, 2000).ok());
  EXPECT_EQ(decode_detections(encode_detections(3, 0, false, {}, 0), 3, 0, next, 2000)
                .error()
                .code,
            ErrorCode::kProtocol);
  const std::uint64_t pulses = 3 * std::uint64_t{kMaxEventsPerChunk};
  const std::vector<DetectionEvent> one{{0, true, false, false}};
  next = 0;
  EXPECT_TRUE(decode_detections(encode_detections(3, 3, true, one, 0), 3, 3, next, pulses).ok());
  next = 0;
  EXPECT_EQ(decode_detections(encode_detections(3, 4, true, one, 0), 3, 4, next, pulses)
                .error()
                .code,
            ErrorCode::kProtocol);
}

// A transport that records what is sent so the test can replay or alter it.
class TapTransport final : public MessageTransport {
 public:
  Status send(std::vector<std::uint8_t> m) override {
    sent.push_back(std::move(m));
    return ok_status();
  }
  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds) override {
    if (inbox.empty()) {
      return make_error(ErrorCode::kTimeout, "empty");
    }
    auto m = std::move(inbox.front());
    inbox.erase(inbox.begin());
    return m;
  }
  void close() override {}
  std::vector<std::vector<std::uint8_t>> sent;
  std::vector<std::vector<std::uint8_t>> inbox;
};

std::unique_ptr<AuthChannel> make_channel(MessageTransport& t, AuthRole role,
                                          std::span<const std::uint8_t> psk,
                                          const AuthSettings& s) {
  auto ch = AuthChannel::create(t, role, psk, s);
  EXPECT_TRUE(ch.ok()) << ch.error().message;
  return std::move(ch).value();
}

// The per-message Wegman-Carter scheme (auth_every_message = true).
AuthSettings per_message() {
  AuthSettings s;
  s.every_message = true;
  return s;
}

AuthSettings hmac_settings() {
  AuthSettings s;
  s.mode = AuthMode::kHmac;
  return s;
}

TEST(AuthChannel, HmacDetectsTamperingReplayTypeAndReflection) {
  const std::vector<std::uint8_t> psk(32, 7);
  TapTransport ta;
  TapTransport tb;
  auto a = make_channel(ta, AuthRole::kAlice, psk, hmac_settings());
  auto b = make_channel(tb, AuthRole::kBob, psk, hmac_settings());
  const std::vector<std::uint8_t> payload{1, 2, 3};
  const std::chrono::milliseconds t{1};
  // The hello frames (their own tags); the HMAC keys come from both nonces.
  ASSERT_TRUE(a->send(MsgType::kParams, 1, payload).ok());
  tb.inbox = {ta.sent[0]};
  auto hello = b->receive(t, MsgType::kParams, 1);
  ASSERT_TRUE(hello.ok()) << hello.error().message;
  EXPECT_EQ(hello->payload, payload);
  ASSERT_TRUE(b->send(MsgType::kParamsAck, 1, payload).ok());
  ta.inbox = {tb.sent[0]};
  ASSERT_TRUE(a->receive(t, MsgType::kParamsAck, 1).ok());
  ASSERT_TRUE(a->send(MsgType::kSample, 1, payload).ok());  // HMAC from here on
  ASSERT_TRUE(a->send(MsgType::kSample, 1, payload).ok());
  const auto m1 = ta.sent[1];
  const auto m2 = ta.sent[2];
  EXPECT_EQ(m1.size(), kHeaderBytes + payload.size() + kMacBytes);

  tb.inbox = {m1};
  auto ok = b->receive(t, MsgType::kSample, 1);
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(ok->payload, payload);

  tb.inbox = {m1};  // replay: the tag verifies, the sequence number does not
  EXPECT_EQ(b->receive(t, MsgType::kSample, 1).error().code, ErrorCode::kProtocol);

  auto flipped = m2;
  flipped[flipped.size() / 2] ^= 0x01;
  tb.inbox = {flipped};
  EXPECT_EQ(b->receive(t, MsgType::kSample, 1).error().code, ErrorCode::kAuthentication);

  tb.inbox = {std::vector<std::uint8_t>(10, 0)};  // too short to be a frame
  EXPECT_EQ(b->receive(t, MsgType::kSample, 1).error().code, ErrorCode::kProtocol);

  // Alice's own message reflected back to her does not verify under the other key.
  ta.inbox = {m2};
  EXPECT_EQ(a->receive(t, MsgType::kSample, 1).error().code, ErrorCode::kAuthentication);

  // Wrong type (the tag and the sequence number verify).
  tb.inbox = {m2};
  EXPECT_EQ(b->receive(t, MsgType::kVerify, 1).error().code, ErrorCode::kProtocol);
  EXPECT_EQ(a->settle(std::vector<std::uint8_t>(100, 1)), 0U);  // HMAC costs no key

  const std::vector<std::uint8_t> nonce(kNonceBytes, 1);
  EXPECT_EQ(derive_mac_keys(std::vector<std::uint8_t>(8, 1), nonce, nonce).error().code,
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(AuthChannel::create(ta, AuthRole::kAlice, std::vector<std::uint8_t>(15, 1),
                                AuthSettings{})
                .error()
                .code,
            ErrorCode::kInvalidArgument);
}

// HMAC keys are bound to the session's nonces, as the Wegman-Carter keys are: a frame
// recorded in one session (here Alice's sequence-1 frame) is refused in a later session
// with the same PSK, where sequence 1 is due again, with kAuthentication. (With keys from
// the PSK alone it was accepted.) Either direction.
TEST(AuthChannel, HmacFrameOfAnEarlierSessionIsRefused) {
  const std::vector<std::uint8_t> psk(32, 8);
  const std::chrono::milliseconds t{1};
  const std::vector<std::uint8_t> payload{4, 5, 6};
  struct Session {
    TapTransport ta;
    TapTransport tb;
    std::unique_ptr<AuthChannel> a;
    std::unique_ptr<AuthChannel> b;
  };
  const auto handshake = [&](Session& s) {
    s.a = make_channel(s.ta, AuthRole::kAlice, psk, hmac_settings());
    s.b = make_channel(s.tb, AuthRole::kBob, psk, hmac_settings());
    ASSERT_TRUE(s.a->send(MsgType::kParams, 0, payload).ok());
    s.tb.inbox = {s.ta.sent.back()};
    ASSERT_TRUE(s.b->receive(t, MsgType::kParams, 0).ok());
    ASSERT_TRUE(s.b->send(MsgType::kParamsAck, 0, payload).ok());
    s.ta.inbox = {s.tb.sent.back()};
    ASSERT_TRUE(s.a->receive(t, MsgType::kParamsAck, 0).ok());
  };
  Session old;
  handshake(old);
  ASSERT_TRUE(old.a->send(MsgType::kSiftMatch, 0, payload).ok());
  ASSERT_TRUE(old.b->send(MsgType::kSiftBases, 0, payload).ok());
  const auto old_from_alice = old.ta.sent.back();
  const auto old_from_bob = old.tb.sent.back();
  old.tb.inbox = {old_from_alice};
  ASSERT_TRUE(old.b->receive(t, MsgType::kSiftMatch, 0).ok());  // genuine in its session

  Session now;
  handshake(now);
  now.tb.inbox = {old_from_alice};
  auto r = now.b->receive(t, MsgType::kSiftMatch, 0);
  ASSERT_FALSE(r.ok()) << "an earlier session's frame was accepted";
  EXPECT_EQ(r.error().code, ErrorCode::kAuthentication) << r.error().message;
  now.ta.inbox = {old_from_bob};
  auto r2 = now.a->receive(t, MsgType::kSiftBases, 0);
  ASSERT_FALSE(r2.ok()) << "an earlier session's frame was accepted";
  EXPECT_EQ(r2.error().code, ErrorCode::kAuthentication) << r2.error().message;
  // The session's own frames still pass.
  ASSERT_TRUE(now.a->send(MsgType::kSiftMatch, 0, payload).ok());
  now.tb.inbox = {now.ta.sent.back()};
  EXPECT_TRUE(now.b->receive(t, MsgType::kSiftMatch, 0).ok());
}

// A Wegman-Carter channel pair after the two-frame handshake (Alice's Params, Bob's Ack).
struct WcPair {
  TapTransport ta;
  TapTransport tb;
  std::unique_ptr<AuthChannel> a;
  std::unique_ptr<AuthChannel> b;
  static constexpr std::chrono::milliseconds kT{1};
  // Delivers Alice's last frame to Bob (or Bob's to Alice) and receives it.
  Result<Frame> to_bob(MsgType type, std::uint64_t block = 0) {
    tb.inbox = {ta.sent.back()};
    return b->receive(kT, type, block);
  }
  Result<Frame> to_alice(MsgType type, std::uint64_t block = 0) {
    ta.inbox = {tb.sent.back()};
    return a->receive(kT, type, block);
  }
};

std::unique_ptr<WcPair> wc_pair(const AuthSettings& s = per_message(), bool handshake = true) {
  static const std::vector<std::uint8_t> psk(32, 9);
  auto p = std::make_unique<WcPair>();
  p->a = make_channel(p->ta, AuthRole::kAlice, psk, s);
  p->b = make_channel(p->tb, AuthRole::kBob, psk, s);
  if (handshake) {
    EXPECT_TRUE(p->a->send(MsgType::kParams, 0, std::vector<std::uint8_t>{1, 2}).ok());
    EXPECT_TRUE(p->to_bob(MsgType::kParams).ok());
    EXPECT_TRUE(p->b->send(MsgType::kParamsAck, 0, std::vector<std::uint8_t>{3}).ok());
    EXPECT_TRUE(p->to_alice(MsgType::kParamsAck).ok());
  }
  return p;
}

TEST(AuthChannel, WegmanCarterRoundTripAndPadAccounting) {
  auto p = wc_pair();
  const std::size_t pool = AuthSettings{}.pool_bits / 8;
  // Frame 0 of each direction uses its hello pad, not the pools.
  EXPECT_EQ(p->a->send_pool_bytes(), pool);
  EXPECT_EQ(p->a->recv_pool_bytes(), pool);
  EXPECT_EQ(p->b->send_pool_bytes(), pool);
  const std::vector<std::uint8_t> payload(1000, 0xA5);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    auto f = p->to_bob(MsgType::kSiftMatch);
    ASSERT_TRUE(f.ok()) << f.error().message;
    EXPECT_EQ(f->payload, payload);
  }
  EXPECT_EQ(p->a->send_pool_bytes(), pool - 5 * 16);
  EXPECT_EQ(p->b->recv_pool_bytes(), p->a->send_pool_bytes());
  EXPECT_EQ(p->a->pad_bytes_used(), p->b->pad_bytes_used());
  // Tag = 128 bits at the end of each frame; frame 0 carries a 16-byte nonce.
  EXPECT_EQ(p->ta.sent[0].size(), kHeaderBytes + kNonceBytes + 2 + 16);
  EXPECT_EQ(p->ta.sent.back().size(), kHeaderBytes + payload.size() + 16);

  // Settling with the same key on both ends refills both pools (deficit first, then the
  // two 128-bit hash keys) and the channel keeps working.
  std::vector<std::uint8_t> key(1000);
  for (std::size_t i = 0; i < key.size(); ++i) {
    key[i] = static_cast<std::uint8_t>(i * 7 + 1);
  }
  const std::size_t deficit = 5 * 16;  // five A->B frames
  EXPECT_EQ(p->a->settle(key), deficit + 32);
  EXPECT_EQ(p->b->settle(key), deficit + 32);
  EXPECT_EQ(p->a->hash_key_refreshes(), 1U);
  EXPECT_EQ(p->a->send_pool_bytes(), pool);
  EXPECT_EQ(p->b->send_pool_bytes(), pool);
  ASSERT_TRUE(p->b->send(MsgType::kBlockDone, 0, {}).ok());
  ASSERT_TRUE(p->to_alice(MsgType::kBlockDone).ok());
  // Next settlement: no refresh due (every 16 blocks), only the one pad.
  EXPECT_EQ(p->a->settle(key), 16U);
  EXPECT_EQ(p->b->settle(key), 16U);
  // A key too short pays what it can; the rest stays owed.
  ASSERT_TRUE(p->a->send(MsgType::kSample, 0, {}).ok());
  ASSERT_TRUE(p->to_bob(MsgType::kSample).ok());
  ASSERT_TRUE(p->b->send(MsgType::kSampleReply, 0, {}).ok());
  ASSERT_TRUE(p->to_alice(MsgType::kSampleReply).ok());
  EXPECT_EQ(p->a->settle(std::span<const std::uint8_t>(key).first(20)), 20U);
  EXPECT_EQ(p->b->settle(std::span<const std::uint8_t>(key).first(20)), 20U);
  EXPECT_EQ(p->a->send_pool_bytes() + p->a->recv_pool_bytes(), 2 * pool - 12);
  ASSERT_TRUE(p->a->send(MsgType::kSample, 0, {}).ok());
  ASSERT_TRUE(p->to_bob(MsgType::kSample).ok());
}

TEST(AuthChannel, WegmanCarterRejectsEveryFlippedByteReplayAndReflection) {
  const std::vector<std::uint8_t> payload{10, 20, 30, 40, 50};
  auto ref = wc_pair();
  ASSERT_TRUE(ref->a->send(MsgType::kSiftMatch, 0, payload).ok());
  const std::size_t size = ref->ta.sent.back().size();
  for (std::size_t pos = 0; pos < size; ++pos) {
    for (const std::uint8_t bit : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      auto p = wc_pair();
      ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
      p->ta.sent.back()[pos] ^= bit;
      EXPECT_EQ(p->to_bob(MsgType::kSiftMatch).error().code, ErrorCode::kAuthentication)
          << "byte " << pos;
    }
  }
  // A truncated or extended frame fails too.
  for (int delta : {-1, 1}) {
    auto p = wc_pair();
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    if (delta < 0) {
      p->ta.sent.back().pop_back();
    } else {
      p->ta.sent.back().push_back(0);
    }
    EXPECT_EQ(p->to_bob(MsgType::kSiftMatch).error().code, ErrorCode::kAuthentication);
  }
  {  // Replay: the pad of the next frame differs.
    auto p = wc_pair();
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    ASSERT_TRUE(p->to_bob(MsgType::kSiftMatch).ok());
    EXPECT_EQ(p->to_bob(MsgType::kSiftMatch).error().code, ErrorCode::kAuthentication);
  }
  {  // Reflection: Alice's frame back to her (the other direction's keys).
    auto p = wc_pair();
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    p->ta.inbox = {p->ta.sent.back()};
    EXPECT_EQ(p->a->receive(WcPair::kT, MsgType::kSiftMatch, 0).error().code,
              ErrorCode::kAuthentication);
  }
  {  // Wrong PSK: Bob fails Alice's first frame.
    TapTransport ta;
    TapTransport tb;
    auto a = make_channel(ta, AuthRole::kAlice, std::vector<std::uint8_t>(32, 1), AuthSettings{});
    auto b = make_channel(tb, AuthRole::kBob, std::vector<std::uint8_t>(32, 2), AuthSettings{});
    ASSERT_TRUE(a->send(MsgType::kParams, 0, payload).ok());
    tb.inbox = {ta.sent.back()};
    EXPECT_EQ(b->receive(WcPair::kT, MsgType::kParams, 0).error().code,
              ErrorCode::kAuthentication);
  }
}

TEST(AuthChannel, WegmanCarterEarlyAbortReachesBob) {
  // Bob's first frame is altered (its nonce): Alice cannot key the session, yet her Abort,
  // sent with the second hello pad, verifies at Bob as an Abort.
  auto p = wc_pair(per_message(), false);
  ASSERT_TRUE(p->a->send(MsgType::kParams, 0, std::vector<std::uint8_t>{1}).ok());
  ASSERT_TRUE(p->to_bob(MsgType::kParams).ok());
  ASSERT_TRUE(p->b->send(MsgType::kParamsAck, 0, std::vector<std::uint8_t>{1}).ok());
  p->tb.sent.back()[kHeaderBytes + 3] ^= 4;
  EXPECT_EQ(p->to_alice(MsgType::kParamsAck).error().code, ErrorCode::kAuthentication);
  p->a->send_abort(0, "bad tag");
  auto r = p->to_bob(MsgType::kSiftBases);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kRejected) << r.error().message;
  EXPECT_NE(r.error().message.find("bad tag"), std::string::npos);
  // The hello pad authenticates nothing but an Abort at that point: a forged SiftMatch in
  // that slot is refused.
  auto q = wc_pair(per_message(), false);
  ASSERT_TRUE(q->a->send(MsgType::kParams, 0, std::vector<std::uint8_t>{1}).ok());
  ASSERT_TRUE(q->to_bob(MsgType::kParams).ok());
  ASSERT_TRUE(q->a->send(MsgType::kAbort, 0, std::vector<std::uint8_t>{0, 0, 0, 0}).ok());
  q->ta.sent.back()[1] = static_cast<std::uint8_t>(MsgType::kSiftMatch);
  EXPECT_EQ(q->to_bob(MsgType::kSiftMatch).error().code, ErrorCode::kAuthentication);
}

TEST(AuthChannel, WegmanCarterSessionsNeverReusePadsAndPoolsRunDry) {
  // The same message in two sessions with the same PSK: different tags (fresh nonces give
  // fresh hello and session keys).
  auto p1 = wc_pair(AuthSettings{}, false);
  auto p2 = wc_pair(AuthSettings{}, false);
  ASSERT_TRUE(p1->a->send(MsgType::kParams, 0, std::vector<std::uint8_t>{1}).ok());
  ASSERT_TRUE(p2->a->send(MsgType::kParams, 0, std::vector<std::uint8_t>{1}).ok());
  const auto& f1 = p1->ta.sent.back();
  const auto& f2 = p2->ta.sent.back();
  ASSERT_EQ(f1.size(), f2.size());
  EXPECT_FALSE(std::equal(f1.end() - 16, f1.end(), f2.end() - 16));
  // A 1024-bit pool holds 8 tags of 128 bits (16 tags of 64 bits here). Per-message mode
  // keeps the last for an Abort: 15 frames, then the 16th is refused and the Abort still
  // reaches Bob; after it the pool is empty.
  AuthSettings s = per_message();
  s.pool_bits = 1024;
  s.tag_bits = 64;
  auto p = wc_pair(s);
  for (int i = 0; i < 15; ++i) {
    ASSERT_TRUE(p->a->send(MsgType::kSample, 0, {}).ok()) << i;
    ASSERT_TRUE(p->to_bob(MsgType::kSample).ok()) << i;
  }
  EXPECT_EQ(p->ta.sent.back().size(), kHeaderBytes + 8);
  const auto st = p->a->send(MsgType::kSample, 0, {});
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kAuthentication);
  EXPECT_EQ(st.error().message.rfind(kPadExhausted, 0), 0U) << st.error().message;
  EXPECT_NE(st.error().message.find("auth_pool_bits = 1024 holds 16"), std::string::npos)
      << st.error().message;
  EXPECT_EQ(p->a->send_pool_bytes(), 8U);
  p->a->send_abort(0, "out of pads");
  auto abort = p->to_bob(MsgType::kSample);
  ASSERT_FALSE(abort.ok());
  EXPECT_EQ(abort.error().code, ErrorCode::kRejected) << abort.error().message;
  EXPECT_EQ(p->a->send_pool_bytes(), 0U);
  const auto dry = p->a->send(MsgType::kAbort, 0, {});
  ASSERT_FALSE(dry.ok());
  EXPECT_EQ(dry.error().code, ErrorCode::kAuthentication);
  EXPECT_NE(dry.error().message.find("exhausted"), std::string::npos);
}

// Transcript mode (the default): frames between checkpoints carry no tag; a checkpoint
// frame's tag covers every frame of its direction since the previous checkpoint.
TEST(AuthChannel, TranscriptTagsOnlyCheckpointsAndAborts) {
  auto p = wc_pair(AuthSettings{});
  const std::size_t pool = AuthSettings{}.pool_bits / 8;
  const std::vector<std::uint8_t> payload(100, 0x5A);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(p->a->send(MsgType::kCascadeReply, 0, payload).ok());
    EXPECT_EQ(p->ta.sent.back().size(), kHeaderBytes + payload.size());  // no tag
    auto f = p->to_bob(MsgType::kCascadeReply);
    ASSERT_TRUE(f.ok()) << f.error().message;
  }
  EXPECT_EQ(p->a->pad_bytes_used(), 0U);
  ASSERT_TRUE(p->a->send(MsgType::kAmplify, 0, payload, true).ok());
  EXPECT_EQ(p->ta.sent.back().size(), kHeaderBytes + payload.size() + 16);
  p->tb.inbox = {p->ta.sent.back()};
  ASSERT_TRUE(p->b->receive(WcPair::kT, MsgType::kAmplify, 0, true).ok());
  auto q = std::move(p);
  EXPECT_EQ(q->a->pad_bytes_used(), 16U);
  EXPECT_EQ(q->b->pad_bytes_used(), 16U);
  EXPECT_EQ(q->a->send_pool_bytes(), pool - 16);
  EXPECT_EQ(q->b->recv_pool_bytes(), pool - 16);
  // A second segment is tagged on its own (a fresh pad).
  ASSERT_TRUE(q->b->send(MsgType::kBlockDone, 0, {}, true).ok());
  q->ta.inbox = {q->tb.sent.back()};
  ASSERT_TRUE(q->a->receive(WcPair::kT, MsgType::kBlockDone, 0, true).ok());
  // An Abort is always tagged and verified over the transcript.
  ASSERT_TRUE(q->a->send(MsgType::kSample, 1, payload).ok());
  ASSERT_TRUE(q->to_bob(MsgType::kSample, 1).ok());
  q->a->send_abort(1, "stop");
  auto ab = q->to_bob(MsgType::kSampleReply, 1);
  ASSERT_FALSE(ab.ok());
  EXPECT_EQ(ab.error().code, ErrorCode::kRejected) << ab.error().message;
}

// Every flipped byte of any frame of a segment is caught: by the checkpoint
// (kAuthentication) or, when it garbles the header, at once (kProtocol). Never accepted.
TEST(AuthChannel, TranscriptCatchesEveryFlippedByteAtTheCheckpoint) {
  const std::vector<std::uint8_t> payload{10, 20, 30, 40, 50};
  const MsgType types[] = {MsgType::kSiftMatch, MsgType::kSample, MsgType::kVerify};
  std::size_t sizes[3] = {};
  {
    auto ref = wc_pair(AuthSettings{});
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(ref->a->send(types[i], 0, payload, i == 2).ok());
      sizes[i] = ref->ta.sent.back().size();
    }
  }
  int auth_failures = 0;
  for (int target = 0; target < 3; ++target) {
    for (std::size_t pos = 0; pos < sizes[target]; ++pos) {
      auto p = wc_pair(AuthSettings{});
      for (int i = 0; i < 3; ++i) {
        ASSERT_TRUE(p->a->send(types[i], 0, payload, i == 2).ok());
      }
      auto frames = std::vector<std::vector<std::uint8_t>>(p->ta.sent.end() - 3, p->ta.sent.end());
      frames[static_cast<std::size_t>(target)][pos] ^= 0x01;
      p->tb.inbox = frames;
      std::optional<Error> err;
      for (int i = 0; i < 3 && !err; ++i) {
        auto f = p->b->receive(WcPair::kT, types[i], 0, i == 2);
        if (!f.ok()) {
          err = f.error();
        }
      }
      ASSERT_TRUE(err.has_value()) << "frame " << target << " byte " << pos << " accepted";
      EXPECT_TRUE(err->code == ErrorCode::kAuthentication || err->code == ErrorCode::kProtocol)
          << err->message;
      if (pos >= kHeaderBytes) {  // payload and tag bytes: the frame parses, the tag fails
        EXPECT_EQ(err->code, ErrorCode::kAuthentication) << "frame " << target << " byte " << pos;
      }
      auth_failures += err->code == ErrorCode::kAuthentication ? 1 : 0;
    }
  }
  EXPECT_GT(auth_failures, 0);
  {  // A dropped frame: sequence error.
    auto p = wc_pair(AuthSettings{});
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    ASSERT_TRUE(p->a->send(MsgType::kVerify, 0, payload, true).ok());
    p->tb.inbox = {p->ta.sent.back()};
    EXPECT_EQ(p->b->receive(WcPair::kT, MsgType::kSiftMatch, 0).error().code,
              ErrorCode::kProtocol);
  }
  {  // A forged frame in the segment (right sequence number, any content): the checkpoint
     // fails.
    auto p = wc_pair(AuthSettings{});
    ASSERT_TRUE(p->a->send(MsgType::kSiftMatch, 0, payload).ok());
    ASSERT_TRUE(p->a->send(MsgType::kVerify, 0, payload, true).ok());
    auto forged = p->ta.sent[p->ta.sent.size() - 2];
    forged.push_back(7);  // one more payload byte
    p->tb.inbox = {forged, p->ta.sent.back()};
    ASSERT_TRUE(p->b->receive(WcPair::kT, MsgType::kSiftMatch, 0).ok());
    EXPECT_EQ(p->b->receive(WcPair::kT, MsgType::kVerify, 0, true).error().code,
              ErrorCode::kAuthentication);
  }
}

TEST(Protocol, SampleMaskHasExactlyK) {
  for (std::uint64_t k : {0ULL, 1ULL, 50ULL, 100ULL}) {
    auto m = random_sample_mask(100, k);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->popcount(), k);
  }
}

TEST(Protocol, ParamsRoundTripAndMismatch) {
  ProtocolParams p;
  Writer w;
  write_params(w, p, 1e9);
  const auto b = w.take();
  Reader r(b);
  ProtocolParams q;
  q.sample_fraction = 0.3;
  double rate = 0;
  ASSERT_TRUE(read_params(r, q, rate));
  EXPECT_EQ(rate, 1e9);
  EXPECT_TRUE(params_mismatch(p, q).empty());
  q.safety_margin = 0.1;
  EXPECT_NE(params_mismatch(p, q).find("safety_margin"), std::string::npos);
}

}  // namespace
}  // namespace qkd::core::detail
