// Parsers of untrusted bytes: the bounds-checked reader, the quantum frames and the
// authenticated classical frames.
#include <gtest/gtest.h>

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

TEST(AuthChannel, DetectsTamperingReplayTypeAndReflection) {
  const std::vector<std::uint8_t> psk(32, 7);
  auto keys = derive_mac_keys(psk);
  ASSERT_TRUE(keys.ok());
  TapTransport ta;
  TapTransport tb;
  AuthChannel a(ta, keys->alice_to_bob, keys->bob_to_alice);
  AuthChannel b(tb, keys->bob_to_alice, keys->alice_to_bob);
  const std::vector<std::uint8_t> payload{1, 2, 3};
  ASSERT_TRUE(a.send(MsgType::kSiftMatch, 1, payload).ok());
  ASSERT_TRUE(a.send(MsgType::kSample, 1, payload).ok());
  const auto m0 = ta.sent[0];
  const auto m1 = ta.sent[1];
  const std::chrono::milliseconds t{1};

  tb.inbox = {m0};
  auto ok = b.receive(t, MsgType::kSiftMatch, 1);
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(ok->payload, payload);

  tb.inbox = {m0};  // replay
  EXPECT_EQ(b.receive(t, MsgType::kSample, 1).error().code, ErrorCode::kProtocol);

  auto flipped = m1;
  flipped[flipped.size() / 2] ^= 0x01;
  tb.inbox = {flipped};
  EXPECT_EQ(b.receive(t, MsgType::kSample, 1).error().code, ErrorCode::kAuthentication);

  tb.inbox = {std::vector<std::uint8_t>(10, 0)};  // too short to be a frame
  EXPECT_EQ(b.receive(t, MsgType::kSample, 1).error().code, ErrorCode::kProtocol);

  // Alice's own message reflected back to her does not verify under the other key.
  ta.inbox = {m1};
  EXPECT_EQ(a.receive(t, MsgType::kSample, 1).error().code, ErrorCode::kAuthentication);

  // Wrong type and wrong block (a fresh receiver at sequence 1).
  AuthChannel b2(tb, keys->bob_to_alice, keys->alice_to_bob);
  tb.inbox = {m0, m1};
  ASSERT_TRUE(b2.receive(t, MsgType::kSiftMatch, 1).ok());
  EXPECT_EQ(b2.receive(t, MsgType::kVerify, 1).error().code, ErrorCode::kProtocol);

  EXPECT_EQ(derive_mac_keys(std::vector<std::uint8_t>(8, 1)).error().code,
            ErrorCode::kInvalidArgument);
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
