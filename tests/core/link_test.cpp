// Both endpoints over memory transports: full blocks, aborts, and hostile classical traffic.
#include "qkd/core/link.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <thread>

#include "channel.hpp"
#include "protocol.hpp"
#include "qkd/core/random.hpp"
#include "wire.hpp"

namespace qkd::core {
namespace {

const std::vector<std::uint8_t> kPsk(32, 0x42);

ProtocolParams small_params() {
  ProtocolParams p;
  p.pulses_per_block = 400'000;  // ~16k detections at 20 km: quick but still a real block
  p.message_timeout = std::chrono::milliseconds(5'000);
  return p;
}

struct BlockPair {
  Result<BlockResult> alice;
  Result<BlockResult> bob;
};

// Runs one block: Bob on a thread, Alice on the caller's.
BlockPair run_pair(AliceEndpoint& alice, BobEndpoint& bob) {
  std::optional<Result<BlockResult>> rb;
  std::thread t([&] { rb.emplace(bob.run_block()); });
  auto ra = alice.run_block();
  t.join();
  return BlockPair{std::move(ra), std::move(*rb)};
}

void expect_same_result(const BlockResult& a, const BlockResult& b) {
  EXPECT_EQ(a.block_id, b.block_id);
  EXPECT_EQ(a.aborted, b.aborted);
  EXPECT_EQ(a.abort_reason, b.abort_reason);
  EXPECT_EQ(a.pulses, b.pulses);
  EXPECT_EQ(a.detections, b.detections);
  EXPECT_EQ(a.sifted_bits, b.sifted_bits);
  EXPECT_EQ(a.sample_bits, b.sample_bits);
  EXPECT_EQ(a.qber, b.qber);
  EXPECT_EQ(a.reconciled_bits, b.reconciled_bits);
  EXPECT_EQ(a.leaked_bits, b.leaked_bits);
  EXPECT_EQ(a.cascade_errors_corrected, b.cascade_errors_corrected);
  EXPECT_EQ(a.secret_bits, b.secret_bits);
  EXPECT_EQ(a.simulated_seconds, b.simulated_seconds);
  EXPECT_EQ(a.key.size(), b.key.size());
  EXPECT_TRUE(constant_time_equal(a.key.span(), b.key.span()));
  EXPECT_EQ(a.auth_bits_consumed, b.auth_bits_consumed);
  EXPECT_EQ(a.auth_pad_bits_used, b.auth_pad_bits_used);
  EXPECT_EQ(a.verify_tag_bits, b.verify_tag_bits);
  EXPECT_EQ(a.epsilon_cor, b.epsilon_cor);
  EXPECT_EQ(a.biconf_parities, b.biconf_parities);
  EXPECT_EQ(a.auth_pool_bits_left, b.auth_pool_bits_left);
}

// One block that both ends complete with the same result: Alice's, or nothing (the
// failure recorded).
std::optional<BlockResult> agreed_block(AliceEndpoint& alice, BobEndpoint& bob) {
  auto r = run_pair(alice, bob);
  if (!r.alice.ok() || !r.bob.ok()) {
    ADD_FAILURE() << (r.alice.ok() ? "" : r.alice.error().message) << " / "
                  << (r.bob.ok() ? "" : r.bob.error().message);
    return std::nullopt;
  }
  expect_same_result(*r.alice, *r.bob);
  return std::move(*r.alice);
}

// Runs blocks that abort (QBER) until both ends fail for want of authentication pads, at
// most `limit`: the number that aborted first. Both failures must be pad exhaustion and
// name `why`.
int aborted_blocks_until_pads_run_out(AliceEndpoint& alice, BobEndpoint& bob, int limit,
                                      const std::string& why) {
  for (int aborted = 0; aborted < limit; ++aborted) {
    auto r = run_pair(alice, bob);
    if (!r.alice.ok() || !r.bob.ok()) {
      EXPECT_FALSE(r.alice.ok());
      EXPECT_FALSE(r.bob.ok());
      for (const auto* end : {&r.alice, &r.bob}) {
        if (end->ok()) {
          continue;
        }
        const Error& e = end->error();
        EXPECT_EQ(e.code, ErrorCode::kAuthentication) << e.message;
        EXPECT_EQ(e.message.rfind(detail::kPadExhausted, 0), 0U) << e.message;
        EXPECT_NE(e.message.find(why), std::string::npos) << e.message;
      }
      return aborted;
    }
    expect_same_result(*r.alice, *r.bob);
    EXPECT_TRUE(r.alice->aborted);
  }
  return limit;
}

TEST(Link, FullBlocksGiveIdenticalKeys) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ChannelParams ch;
  ProtocolParams pp;  // defaults: 2e6 pulses at 20 km
  AliceEndpoint alice(ch, pp, kPsk, 1, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
  std::vector<std::uint8_t> previous;
  for (std::uint64_t i = 0; i < 4; ++i) {
    auto r = run_pair(alice, bob);
    ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
    ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
    const BlockResult& a = *r.alice;
    const BlockResult& b = *r.bob;
    expect_same_result(a, b);
    EXPECT_EQ(a.block_id, i);
    EXPECT_FALSE(a.aborted) << a.abort_reason;
    EXPECT_EQ(a.pulses, pp.pulses_per_block);
    const auto det = static_cast<double>(a.detections);
    EXPECT_NEAR(static_cast<double>(a.sifted_bits), det / 2.0, 5 * std::sqrt(det / 4.0));
    EXPECT_NEAR(static_cast<double>(a.sample_bits),
                pp.sample_fraction * static_cast<double>(a.sifted_bits), 1.0);
    EXPECT_EQ(a.reconciled_bits, a.sifted_bits - a.sample_bits);
    EXPECT_EQ(a.verify_tag_bits, 50U);  // epsilon_cor 1e-15
    EXPECT_GE(a.leaked_bits, a.verify_tag_bits + pp.cascade_biconf_rounds);
    EXPECT_GE(a.biconf_parities, pp.cascade_biconf_rounds);
    // The privacy-amplification output; the net key (secret_bits) is what Wegman-Carter
    // authentication leaves of it, and can be 0 for a block with many Cascade round trips.
    EXPECT_GT(a.secret_bits + a.auth_bits_consumed, 0U);
    EXPECT_GT(a.auth_bits_consumed, 0U);
    EXPECT_EQ(a.secret_bits % 8, 0U);
    EXPECT_EQ(a.key.size() * 8, a.secret_bits);
    EXPECT_NEAR(a.qber, 0.01, 0.01);
    EXPECT_GT(a.cpu_seconds, 0.0);
    const std::vector<std::uint8_t> key(a.key.span().begin(), a.key.span().end());
    if (!key.empty()) {
      EXPECT_NE(key, previous);
    }
    previous = key;
  }
}

// Wegman-Carter (the default): every block repays the one-time pads its messages used
// (plus new hash keys at the first block and every auth_key_refresh_blocks), so the net key
// is smaller than the privacy-amplification output by exactly that. Transcript mode (the
// default) uses 3 tags per settled block; per-message mode one per frame.
TEST(Link, WegmanCarterNetKeyIsGrossMinusAuthenticationCost) {
  for (const bool every : {false, true}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    ProtocolParams pp;  // defaults (20 km, 128-bit tags) but 4e6 pulses: at 2e6 a block
    pp.pulses_per_block = 4'000'000;  // with per-message tags can cost all its key
    pp.auth_key_refresh_blocks = 2;
    pp.auth_every_message = every;
    if (every) {
      // Per-message tags with the 16-pass modern Cascade need more pad than one block
      // yields (and than the 65,536-bit pool holds): compare with the 4-pass original.
      pp.cascade_variant = CascadeVariant::kOriginal;
    }
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 11, *q.a, *c.a);
    BobEndpoint bob(pp, kPsk, 12, *q.b, *c.b);
    std::uint64_t gross = 0;
    std::uint64_t net = 0;
    const std::uint64_t blocks = every ? 2 : 4;
    for (std::uint64_t i = 0; i < blocks; ++i) {
      auto r = run_pair(alice, bob);
      ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
      ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
      expect_same_result(*r.alice, *r.bob);
      const BlockResult& a = *r.alice;
      ASSERT_FALSE(a.aborted) << a.abort_reason;
      if (every) {
        // Every classical frame but each direction's first (hello keys) takes 128 pad bits.
        EXPECT_GT(a.auth_pad_bits_used, 10U * 128U);
        EXPECT_EQ(a.auth_pad_bits_used % 128, 0U);
      } else {
        // VerifyResult, Amplify, BlockDone.
        EXPECT_EQ(a.auth_pad_bits_used, 3U * 128U);
      }
      // Plus both 128-bit hash keys at blocks 0 and 2 (the hello pads are not repaid: they
      // are not from a pool).
      const std::uint64_t refresh = (i % 2 == 0) ? 256 : 0;
      EXPECT_EQ(a.auth_bits_consumed, a.auth_pad_bits_used + refresh) << "block " << i;
      EXPECT_GT(a.secret_bits, 0U);
      EXPECT_EQ(a.key.size() * 8, a.secret_bits);
      gross += a.secret_bits + a.auth_bits_consumed;
      net += a.secret_bits;
      std::printf("%s block %llu: gross %llu, authentication %llu (pads %llu), net %llu bits\n",
                  every ? "per-message" : "transcript", static_cast<unsigned long long>(i),
                  static_cast<unsigned long long>(a.secret_bits + a.auth_bits_consumed),
                  static_cast<unsigned long long>(a.auth_bits_consumed),
                  static_cast<unsigned long long>(a.auth_pad_bits_used),
                  static_cast<unsigned long long>(a.secret_bits));
    }
    EXPECT_LT(net, gross);
    EXPECT_GT(net, 0U);
    if (!every) {
      EXPECT_GT(net, gross - blocks * 640);  // transcript: at most 640 bits per block
    }
  }
}

// Every Cascade variant gives identical keys at both ends (and key at the defaults).
TEST(Link, EveryCascadeVariantGivesIdenticalKeys) {
  for (const CascadeVariant v :
       {CascadeVariant::kOriginal, CascadeVariant::kYan, CascadeVariant::kModern}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    ProtocolParams pp = small_params();
    pp.cascade_variant = v;
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 21, *q.a, *c.a);
    BobEndpoint bob(pp, kPsk, 22, *q.b, *c.b);
    auto r = run_pair(alice, bob);
    ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
    ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
    expect_same_result(*r.alice, *r.bob);
    EXPECT_FALSE(r.alice->aborted) << cascade_variant_name(v) << ": " << r.alice->abort_reason;
    EXPECT_GT(r.alice->secret_bits, 0U) << cascade_variant_name(v);
  }
  EXPECT_EQ(parse_cascade_variant("modern"), CascadeVariant::kModern);
  EXPECT_FALSE(parse_cascade_variant("new").has_value());
}

TEST(Link, HmacOptionCostsNoKey) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.auth = AuthMode::kHmac;
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
  auto r = run_pair(alice, bob);
  ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
  ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
  expect_same_result(*r.alice, *r.bob);
  EXPECT_EQ(r.alice->auth_bits_consumed, 0U);
  EXPECT_EQ(r.alice->auth_pad_bits_used, 0U);
  EXPECT_GT(r.alice->secret_bits, 0U);
  EXPECT_EQ(parse_auth_mode("hmac"), AuthMode::kHmac);
  EXPECT_EQ(parse_auth_mode("wc"), AuthMode::kWegmanCarter);
  EXPECT_FALSE(parse_auth_mode("none").has_value());
}

TEST(Link, InterceptResendMakesEveryBlockAbort) {
  for (const double f : {0.5, 1.0}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    ChannelParams ch;
    ch.eve_intercept_fraction = f;
    // QBER ~13.3 % at f = 0.5 against the 11 % threshold: 4e6 pulses give ~8000 sample
    // bits (standard deviation 0.4 %), so the abort is a 6-sigma certainty.
    ProtocolParams pp = small_params();
    pp.pulses_per_block = 4'000'000;
    AliceEndpoint alice(ch, pp, kPsk, 3, *q.a, *c.a);
    BobEndpoint bob(pp, kPsk, 4, *q.b, *c.b);
    for (int i = 0; i < 4; ++i) {
      const auto a = agreed_block(alice, bob);
      ASSERT_TRUE(a);
      EXPECT_TRUE(a->aborted);
      EXPECT_NE(a->abort_reason.find("QBER"), std::string::npos) << a->abort_reason;
      EXPECT_GT(a->qber, pp.qber_abort);
      EXPECT_TRUE(a->key.empty());
      EXPECT_EQ(a->secret_bits, 0U);
    }
  }
}

// Efficient BB84 (Z chosen with probability 0.9, key from Z alone) against an Eve who
// measures every photon in Z and resends what she saw: the Z basis keeps its ~1 % error
// rate and Eve knows every Z bit; only the X basis (the test set) shows her, at ~50 %.
// Every block must abort on it, under the default (asymptotic) bound as under the others.
TEST(Link, InterceptResendInZAloneIsCaughtByTheXBasis) {
  for (const double eve_z : {1.0, 0.5}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    ChannelParams ch;
    ch.eve_intercept_fraction = 1.0;
    ch.eve_z_basis_prob = eve_z;
    ProtocolParams pp = small_params();
    pp.pulses_per_block = 4'000'000;  // ~1,600 X-basis bits, Z sample ~15,000
    pp.z_basis_prob = 0.9;
    AliceEndpoint alice(ch, pp, kPsk, 7, *q.a, *c.a);
    BobEndpoint bob(pp, kPsk, 8, *q.b, *c.b);
    for (int i = 0; i < 2; ++i) {
      const auto a = agreed_block(alice, bob);
      ASSERT_TRUE(a);
      EXPECT_TRUE(a->aborted) << "eve_z " << eve_z << ", QBER " << a->qber;
      if (eve_z == 1.0) {
        EXPECT_LT(a->qber, pp.qber_abort) << "the key basis does not show Eve";
        EXPECT_NE(a->abort_reason.find("X-basis"), std::string::npos) << a->abort_reason;
      }
      EXPECT_EQ(a->secret_bits, 0U);
      EXPECT_TRUE(a->key.empty());
    }
  }
  // Without Eve the same link gives key.
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.pulses_per_block = 4'000'000;
  pp.z_basis_prob = 0.9;
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 9, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 10, *q.b, *c.b);
  const auto a = agreed_block(alice, bob);
  ASSERT_TRUE(a);
  EXPECT_FALSE(a->aborted) << a->abort_reason;
  EXPECT_GT(a->secret_bits, 0U);
}

TEST(Link, TooFewDetectionsAbortsCleanly) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ChannelParams ch;
  ch.length_km = 250.0;  // eta ~ 1e-6: a handful of detections
  ProtocolParams pp = small_params();
  AliceEndpoint alice(ch, pp, kPsk, 5, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 6, *q.b, *c.b);
  auto r = run_pair(alice, bob);
  ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
  ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
  expect_same_result(*r.alice, *r.bob);
  EXPECT_TRUE(r.alice->aborted);
  EXPECT_NE(r.alice->abort_reason.find("too few"), std::string::npos);
}

TEST(Link, MismatchedParamsAreRefusedByBoth) {
  // Authentication settings included: the first frame of each direction is authenticated
  // independently of them, so the mismatch is refused by name rather than failing as a tag.
  const std::vector<std::pair<std::string, std::function<void(ProtocolParams&)>>> changes = {
      {"sample_fraction", [](ProtocolParams& p) { p.sample_fraction = 0.2; }},
      {"cascade_variant", [](ProtocolParams& p) { p.cascade_variant = CascadeVariant::kYan; }},
      {"cascade_biconf_rounds", [](ProtocolParams& p) { p.cascade_biconf_rounds = 9; }},
      {"epsilon_cor", [](ProtocolParams& p) { p.epsilon_cor = 1e-9; }},
      {"auth ", [](ProtocolParams& p) { p.auth = AuthMode::kHmac; }},
      {"auth_tag_bits", [](ProtocolParams& p) { p.auth_tag_bits = 64; }},
      {"auth_every_message", [](ProtocolParams& p) { p.auth_every_message = true; }},
      {"auth_pool_bits", [](ProtocolParams& p) { p.auth_pool_bits = 1U << 15; }},
      {"auth_key_refresh_blocks", [](ProtocolParams& p) { p.auth_key_refresh_blocks = 3; }},
  };
  for (const auto& [field, change] : changes) {
    for (const bool alice_differs : {false, true}) {
      auto q = make_memory_transport_pair();
      auto c = make_memory_transport_pair();
      ProtocolParams pa = small_params();
      ProtocolParams pb = pa;
      change(alice_differs ? pa : pb);
      AliceEndpoint alice(ChannelParams{}, pa, kPsk, 1, *q.a, *c.a);
      BobEndpoint bob(pb, kPsk, 2, *q.b, *c.b);
      auto r = run_pair(alice, bob);
      ASSERT_FALSE(r.alice.ok()) << field;
      ASSERT_FALSE(r.bob.ok()) << field;
      EXPECT_EQ(r.alice.error().code, ErrorCode::kRejected) << field << ": " << r.alice.error().message;
      EXPECT_EQ(r.bob.error().code, ErrorCode::kRejected) << field << ": " << r.bob.error().message;
      EXPECT_NE(r.bob.error().message.find(field), std::string::npos) << r.bob.error().message;
      EXPECT_NE(r.alice.error().message.find(field), std::string::npos) << r.alice.error().message;
    }
  }
}

// Wraps a transport and lets the test alter the n-th message it sends.
class TamperingTransport final : public MessageTransport {
 public:
  TamperingTransport(MessageTransport& inner, int target,
                     std::function<void(std::vector<std::uint8_t>&)> edit)
      : inner_(inner), target_(target), edit_(std::move(edit)) {}
  Status send(std::vector<std::uint8_t> m) override {
    if (count_++ == target_) {
      edit_(m);
    }
    return inner_.send(std::move(m));
  }
  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds t) override {
    return inner_.receive(t);
  }
  void close() override { inner_.close(); }

 private:
  MessageTransport& inner_;
  int target_;
  std::function<void(std::vector<std::uint8_t>&)> edit_;
  std::atomic<int> count_{0};
};

// Alters the k-th classical frame of a given message type that a transport sends (the
// frame count of a block varies with Cascade's random shuffles; the types do not).
class TypeTamperingTransport final : public MessageTransport {
 public:
  TypeTamperingTransport(MessageTransport& inner, detail::MsgType type, int occurrence,
                         bool last_byte)
      : inner_(inner), type_(type), occurrence_(occurrence), last_byte_(last_byte) {}
  Status send(std::vector<std::uint8_t> m) override {
    if (m.size() > 1 && m[1] == static_cast<std::uint8_t>(type_) && seen_++ == occurrence_) {
      m[last_byte_ ? m.size() - 1 : m.size() / 2] ^= 0x20;
      edited = true;
    }
    return inner_.send(std::move(m));
  }
  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds t) override {
    return inner_.receive(t);
  }
  void close() override { inner_.close(); }
  std::atomic<bool> edited{false};

 private:
  MessageTransport& inner_;
  detail::MsgType type_;
  int occurrence_;
  bool last_byte_;
  std::atomic<int> seen_{0};
};

TEST(Link, TamperedClassicalMessageFailsTheBlock) {
  // A flipped byte in any classical message of either direction fails the block and never
  // yields key. Under transcript authentication (the default) most frames carry no tag:
  // the receiver detects the change at the next checkpoint (kAuthentication) or, if the
  // change garbles a header or a message's structure, earlier (kProtocol). The other end
  // then learns that its peer gave up (kRejected), or, if its own checkpoint had already
  // passed on an aborted block, returns that block aborted (no key) and fails the next.
  // Tag bytes (each direction's first frame, the checkpoints) fail as kAuthentication.
  using detail::MsgType;
  const ProtocolParams pp = small_params();
  struct Target {
    bool from_bob;
    MsgType type;
    int occurrence;
    bool tagged;  // carries a tag in transcript mode
  };
  const Target targets[] = {
      {true, MsgType::kParamsAck, 0, true},       {true, MsgType::kSiftBases, 0, false},
      {true, MsgType::kSampleReply, 0, false},    {true, MsgType::kCascadeRequest, 0, false},
      {true, MsgType::kCascadeRequest, 10, false}, {true, MsgType::kVerifyResult, 0, true},
      {true, MsgType::kBlockDone, 0, true},       {false, MsgType::kParams, 0, true},
      {false, MsgType::kSiftMatch, 0, false},     {false, MsgType::kSample, 0, false},
      {false, MsgType::kCascadeStart, 0, false},  {false, MsgType::kCascadeReply, 0, false},
      {false, MsgType::kCascadeReply, 10, false}, {false, MsgType::kVerify, 0, false},
      {false, MsgType::kAmplify, 0, true},
  };
  int auth_errors = 0;
  for (const Target& t : targets) {
    for (const bool last_byte : {true, false}) {
      auto q = make_memory_transport_pair();
      auto c = make_memory_transport_pair();
      TypeTamperingTransport ta(*c.a, t.from_bob ? MsgType::kAbort : t.type,
                                t.from_bob ? 1000 : t.occurrence, last_byte);
      TypeTamperingTransport tb(*c.b, t.from_bob ? t.type : MsgType::kAbort,
                                t.from_bob ? t.occurrence : 1000, last_byte);
      AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, ta);
      BobEndpoint bob(pp, kPsk, 2, *q.b, tb);
      auto r = run_pair(alice, bob);
      const std::string where = std::string(t.from_bob ? "Bob's " : "Alice's ") +
                                detail::msg_type_name(t.type) + " #" +
                                std::to_string(t.occurrence) +
                                (last_byte ? " last" : " middle") + " byte";
      ASSERT_TRUE((t.from_bob ? tb : ta).edited) << where << ": no such frame";
      // The receiver of the tampered direction fails.
      const Result<BlockResult>& rx = t.from_bob ? r.alice : r.bob;
      const Result<BlockResult>& tx = t.from_bob ? r.bob : r.alice;
      ASSERT_FALSE(rx.ok()) << where;
      const ErrorCode code = rx.error().code;
      EXPECT_TRUE(code == ErrorCode::kAuthentication || code == ErrorCode::kProtocol)
          << where << ": " << rx.error().message;
      auth_errors += code == ErrorCode::kAuthentication ? 1 : 0;
      // The sender yields no key: an error, or an aborted block. Exception: BlockDone, the
      // block's last frame. Bob sends it after verifying both transcripts (his key is sound)
      // and cannot learn that it was altered: only Alice fails. (The same held with a tag
      // on every frame: the last message of a protocol cannot be acknowledged.)
      if (t.type == MsgType::kBlockDone) {
        ASSERT_TRUE(tx.ok()) << where << ": " << tx.error().message;
        EXPECT_FALSE(tx->aborted);
      } else if (tx.ok()) {
        EXPECT_TRUE(tx->aborted) << where;
        EXPECT_TRUE(tx->key.empty()) << where;
      } else {
        EXPECT_TRUE(tx.error().code == ErrorCode::kRejected ||
                    tx.error().code == ErrorCode::kAuthentication ||
                    tx.error().code == ErrorCode::kProtocol)
            << where << ": " << tx.error().message;
      }
      if (t.tagged && last_byte) {  // a tag byte
        EXPECT_EQ(code, ErrorCode::kAuthentication) << where << ": " << rx.error().message;
      }
      if (t.occurrence == 0 && (t.type == MsgType::kParams || t.type == MsgType::kParamsAck)) {
        ASSERT_FALSE(tx.ok()) << where;  // the peer learns it through the (early) Abort
        EXPECT_EQ(tx.error().code, ErrorCode::kRejected) << where << ": " << tx.error().message;
      }
      // The failed endpoint stays failed.
      EXPECT_FALSE((t.from_bob ? alice.run_block() : bob.run_block()).ok()) << where;
    }
  }
  std::printf("%d of %zu tamperings surfaced as kAuthentication, the rest as kProtocol\n",
              auth_errors, 2 * std::size(targets));
  EXPECT_GT(auth_errors, 12);
}

TEST(Link, WrongPskIsAnAuthenticationError) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  const ProtocolParams pp = small_params();
  const std::vector<std::uint8_t> other(32, 0x43);
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
  BobEndpoint bob(pp, other, 2, *q.b, *c.b);
  auto r = run_pair(alice, bob);
  ASSERT_FALSE(r.bob.ok());
  EXPECT_EQ(r.bob.error().code, ErrorCode::kAuthentication);
  ASSERT_FALSE(r.alice.ok());
}

// A fake Alice speaking to the real Bob with correctly authenticated but malformed
// messages, and a fake Bob speaking to the real Alice likewise.
TEST(Link, MalformedAuthenticatedMessagesAreProtocolErrors) {
  const ProtocolParams pp = small_params();
  const auto fake = [&](MessageTransport& t, detail::AuthRole role) {
    auto ch = detail::AuthChannel::create(t, role, kPsk, detail::auth_settings(pp));
    EXPECT_TRUE(ch.ok());
    return std::move(ch).value();
  };
  const std::chrono::milliseconds t{2000};
  {  // Bob receives Params with a trailing byte.
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
    auto fake_alice = fake(*c.a, detail::AuthRole::kAlice);
    detail::Writer w;
    detail::write_params(w, pp, 1e9);
    w.u8(0);
    ASSERT_TRUE(fake_alice->send(detail::MsgType::kParams, 0, w.buffer()).ok());
    auto r = bob.run_block();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kProtocol) << r.error().message;
    auto abort = fake_alice->receive(t, detail::MsgType::kParamsAck, 0);
    EXPECT_EQ(abort.error().code, ErrorCode::kRejected);  // Bob told us why he stopped
  }
  {  // Bob receives garbage on the quantum transport.
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
    auto fake_alice = fake(*c.a, detail::AuthRole::kAlice);
    detail::Writer w;
    detail::write_params(w, pp, 1e9);
    ASSERT_TRUE(fake_alice->send(detail::MsgType::kParams, 0, w.buffer()).ok());
    ASSERT_TRUE(q.a->send({1, 3, 0, 0, 0}).ok());
    auto r = bob.run_block();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kProtocol) << r.error().message;
  }
  {  // Alice receives a SiftBases whose count does not match her detections.
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
    auto fake_bob = fake(*c.b, detail::AuthRole::kBob);
    std::optional<Result<BlockResult>> ra;
    std::thread th([&] { ra.emplace(alice.run_block()); });
    ASSERT_TRUE(fake_bob->receive(t, detail::MsgType::kParams, 0).ok());
    detail::Writer ack;
    ack.u8(1);
    ack.string("");
    ASSERT_TRUE(fake_bob->send(detail::MsgType::kParamsAck, 0, ack.buffer()).ok());
    detail::Writer w;
    w.u64(3);
    w.bits(BitVector(3));
    ASSERT_TRUE(fake_bob->send(detail::MsgType::kSiftBases, 0, w.buffer()).ok());
    th.join();
    ASSERT_FALSE(ra->ok());
    EXPECT_EQ(ra->error().code, ErrorCode::kProtocol) << ra->error().message;
  }
  {  // Alice receives a message of the wrong type.
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
    auto fake_bob = fake(*c.b, detail::AuthRole::kBob);
    std::optional<Result<BlockResult>> ra;
    std::thread th([&] { ra.emplace(alice.run_block()); });
    ASSERT_TRUE(fake_bob->receive(t, detail::MsgType::kParams, 0).ok());
    ASSERT_TRUE(fake_bob->send(detail::MsgType::kVerifyResult, 0, std::vector<std::uint8_t>{1}).ok());
    th.join();
    ASSERT_FALSE(ra->ok());
    EXPECT_EQ(ra->error().code, ErrorCode::kProtocol) << ra->error().message;
  }
}

TEST(Link, CloseWakesAWaitingEndpoint) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.message_timeout = std::chrono::milliseconds(30'000);
  BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
  std::optional<Result<BlockResult>> rb;
  std::thread th([&] { rb.emplace(bob.run_block()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  c.a->close();
  th.join();
  ASSERT_FALSE(rb->ok());
  EXPECT_EQ(rb->error().code, ErrorCode::kClosed);
}

TEST(Link, BobTimeoutBeforeABlockIsNotFatal) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.message_timeout = std::chrono::milliseconds(50);
  BobEndpoint bob(pp, kPsk, 2, *q.b, *c.b);
  auto r = bob.run_block();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  pp.message_timeout = std::chrono::milliseconds(5000);
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
  // Bob's endpoint keeps its 50 ms timeout; start him right after Alice's first message.
  std::optional<Result<BlockResult>> ra;
  std::thread th([&] { ra.emplace(alice.run_block()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto rb = bob.run_block();
  th.join();
  // Bob's short timeout may expire mid-block on a slow machine; then both fail cleanly.
  if (rb.ok()) {
    ASSERT_TRUE(ra->ok()) << ra->error().message;
    EXPECT_TRUE(constant_time_equal(rb->key.span(), (*ra)->key.span()));
  } else {
    EXPECT_FALSE(ra->ok());
  }
}

TEST(Link, InvalidParamsAndShortPsk) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.qber_abort = 0.9;
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 1, *q.a, *c.a);
  EXPECT_EQ(alice.run_block().error().code, ErrorCode::kInvalidArgument);
  const std::vector<std::uint8_t> short_psk(8, 1);
  BobEndpoint bob(small_params(), short_psk, 2, *q.b, *c.b);
  EXPECT_EQ(bob.run_block().error().code, ErrorCode::kInvalidArgument);
}


// Counts the parity bits Alice sends in CascadeReply frames (transcript mode: untagged).
class ParityCountingTransport final : public MessageTransport {
 public:
  explicit ParityCountingTransport(MessageTransport& inner) : inner_(inner) {}
  Status send(std::vector<std::uint8_t> m) override {
    if (m.size() > detail::kHeaderBytes &&
        m[1] == static_cast<std::uint8_t>(detail::MsgType::kCascadeReply)) {
      detail::Reader rd(std::span<const std::uint8_t>(m).subspan(detail::kHeaderBytes));
      BitVector bits;
      if (rd.bits(bits, 1U << 30) && rd.done()) {
        parities += bits.size();
      } else {
        ++unparsed;
      }
    }
    return inner_.send(std::move(m));
  }
  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds t) override {
    return inner_.receive(t);
  }
  void close() override { inner_.close(); }
  std::atomic<std::uint64_t> parities{0};
  std::atomic<int> unparsed{0};

 private:
  MessageTransport& inner_;
};

// BICONF rounds and the verification tag are counted exactly in leaked_bits, identically at
// both ends: leaked = every parity bit that crossed the wire + t, t = ceil(log2(1/eps_cor)).
TEST(Link, LeakCountsEveryParityAndTheEpsCorTag) {
  for (const auto& [eps, t, biconf] :
       {std::tuple{1e-9, 30U, 6U}, std::tuple{1e-15, 50U, 0U}, std::tuple{0x1p-64, 64U, 4U}}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    ParityCountingTransport counting(*c.a);
    ProtocolParams pp = small_params();
    pp.epsilon_cor = eps;
    pp.cascade_biconf_rounds = biconf;
    EXPECT_EQ(verify_tag_bits(pp), t);
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 31, *q.a, counting);
    BobEndpoint bob(pp, kPsk, 32, *q.b, *c.b);
    auto r = run_pair(alice, bob);
    ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
    ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
    expect_same_result(*r.alice, *r.bob);
    const BlockResult& a = *r.alice;
    ASSERT_FALSE(a.aborted) << a.abort_reason;
    EXPECT_EQ(counting.unparsed.load(), 0);
    EXPECT_EQ(a.verify_tag_bits, t);
    EXPECT_EQ(a.epsilon_cor, eps);
    EXPECT_EQ(a.leaked_bits, counting.parities.load() + t);
    EXPECT_GE(a.biconf_parities, biconf);
    EXPECT_LE(a.biconf_parities, counting.parities.load());
    if (biconf == 0) {
      EXPECT_EQ(a.biconf_parities, 0U);
    }
  }
  // A longer tag than eps_cor asks for is allowed, a shorter one refused by name.
  ProtocolParams pp;
  pp.epsilon_cor = 1e-9;
  pp.verify_hash_bits = 64;
  EXPECT_TRUE(validate(pp).ok());
  EXPECT_EQ(verify_tag_bits(pp), 64U);
  pp.verify_hash_bits = 29;
  ASSERT_FALSE(validate(pp).ok());
  EXPECT_NE(validate(pp).error().message.find("verify_hash_bits"), std::string::npos);
  pp.verify_hash_bits = 0;
  pp.epsilon_cor = 1e-80;  // would need more than 256 bits
  ASSERT_FALSE(validate(pp).ok());
  EXPECT_NE(validate(pp).error().message.find("epsilon_cor"), std::string::npos);
  pp.epsilon_cor = 0.5;
  EXPECT_EQ(verify_tag_bits(pp), 1U);
  pp.epsilon_cor = 0x1p-20;  // a power of two: exactly 20
  EXPECT_EQ(verify_tag_bits(pp), 20U);
  pp.cascade_biconf_rounds = 65;
  ASSERT_FALSE(validate(pp).ok());
  EXPECT_NE(validate(pp).error().message.find("cascade_biconf_rounds"), std::string::npos);
}

// The verification tag tells keys apart: every single-bit and a burst corruption of a key
// changes it (fixed seed), and a link whose Cascade is cut to one pass (which leaves the
// errors of every even block) aborts the block at verification with no key at either end.
TEST(Link, VerificationCatchesACorruptedKey) {
  Xoshiro256ss rng(41);
  constexpr std::uint32_t kN = 3000;
  constexpr std::uint32_t kT = 30;
  BitVector key(kN);
  for (auto& w : key.mutable_words()) {
    w = rng.next();
  }
  key.clear_tail();
  BitVector seed(kN + kT - 1);
  for (auto& w : seed.mutable_words()) {
    w = rng.next();
  }
  seed.clear_tail();
  auto tag = detail::verification_tag(seed, key, kT);
  ASSERT_TRUE(tag.ok()) << tag.error().message;
  ASSERT_EQ(tag->size(), 4U);
  EXPECT_EQ((*tag)[3] >> 6, 0);  // bits past t are zero
  for (std::uint32_t i = 0; i < kN; ++i) {
    BitVector bad = key;
    bad.flip(i);
    auto other = detail::verification_tag(seed, bad, kT);
    ASSERT_TRUE(other.ok());
    ASSERT_NE(*other, *tag) << "flip at " << i;
  }
  BitVector burst = key;
  for (std::uint32_t i = 100; i < 140; ++i) {
    burst.flip(i);
  }
  auto burst_tag = detail::verification_tag(seed, burst, kT);
  ASSERT_TRUE(burst_tag.ok());
  EXPECT_NE(*burst_tag, *tag);
  EXPECT_FALSE(detail::verification_tag(seed, key, kT + 1).ok());  // seed of the wrong size

  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.cascade_variant = CascadeVariant::kOriginal;
  pp.cascade_passes = 1;
  pp.cascade_biconf_rounds = 0;
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 43, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 44, *q.b, *c.b);
  auto r = run_pair(alice, bob);
  ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
  ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
  expect_same_result(*r.alice, *r.bob);
  EXPECT_TRUE(r.alice->aborted);
  EXPECT_NE(r.alice->abort_reason.find("verification"), std::string::npos)
      << r.alice->abort_reason;
  EXPECT_TRUE(r.alice->key.empty());
  EXPECT_TRUE(r.bob->key.empty());
}

// Models an attack on the quantum channel for the first `bad_blocks` blocks: every
// detected state's bit is inverted in flight, so those blocks abort on their QBER.
class FlippingQuantumTransport final : public MessageTransport {
 public:
  FlippingQuantumTransport(MessageTransport& inner, std::uint64_t pulses, std::uint64_t bad_blocks)
      : inner_(inner), pulses_(pulses), bad_blocks_(bad_blocks) {}
  Status send(std::vector<std::uint8_t> m) override {
    if (m.size() >= 15 && m[1] == static_cast<std::uint8_t>(detail::MsgType::kDetections)) {
      detail::Reader rd(m);
      std::uint8_t version = 0;
      std::uint8_t type = 0;
      std::uint64_t block = 0;
      std::uint32_t chunk = 0;
      if (rd.u8(version) && rd.u8(type) && rd.u64(block) && rd.u32(chunk) &&
          block < bad_blocks_) {
        if (chunk == 0) {
          next_pulse_ = 0;
        }
        const std::uint64_t base = next_pulse_;
        auto c = detail::decode_detections(m, block, chunk, next_pulse_, pulses_);
        if (c.ok()) {
          for (auto& e : c->events) {
            e.bit = !e.bit;
          }
          m = detail::encode_detections(block, chunk, c->last, c->events, base);
          ++flipped;
        }
      }
    }
    return inner_.send(std::move(m));
  }
  Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds t) override {
    return inner_.receive(t);
  }
  void close() override { inner_.close(); }
  int flipped = 0;

 private:
  MessageTransport& inner_;
  std::uint64_t pulses_;
  std::uint64_t bad_blocks_;
  std::uint64_t next_pulse_ = 0;
};

// Aborted blocks use pads (one checkpoint tag each way) that only a settled block can
// repay: the first settled block after a run of aborts pays all of it back, so both pools
// are full again, and its auth_bits_consumed is exactly the pads of the aborted blocks,
// its own, and the first hash-key refresh.
TEST(Link, SettledBlockRepaysThePadsOfAbortedBlocks) {
  constexpr std::uint64_t kAborts = 5;
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  FlippingQuantumTransport flipping(*q.a, pp.pulses_per_block, kAborts);
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 51, flipping, *c.a);
  BobEndpoint bob(pp, kPsk, 52, *q.b, *c.b);
  std::uint64_t aborted_pads = 0;
  for (std::uint64_t i = 0; i < kAborts; ++i) {
    auto r = run_pair(alice, bob);
    ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
    ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
    expect_same_result(*r.alice, *r.bob);
    ASSERT_TRUE(r.alice->aborted);
    EXPECT_NE(r.alice->abort_reason.find("QBER"), std::string::npos) << r.alice->abort_reason;
    EXPECT_EQ(r.alice->auth_pad_bits_used, 2U * pp.auth_tag_bits);
    aborted_pads += r.alice->auth_pad_bits_used;
    const std::uint64_t per_dir = (i + 1) * pp.auth_tag_bits;
    EXPECT_EQ(r.alice->auth_pool_bits_left[0], pp.auth_pool_bits - per_dir);
    EXPECT_EQ(r.alice->auth_pool_bits_left[1], pp.auth_pool_bits - per_dir);
  }
  EXPECT_GT(flipping.flipped, 0);
  auto r = run_pair(alice, bob);
  ASSERT_TRUE(r.alice.ok()) << r.alice.error().message;
  ASSERT_TRUE(r.bob.ok()) << r.bob.error().message;
  expect_same_result(*r.alice, *r.bob);
  const BlockResult& a = *r.alice;
  ASSERT_FALSE(a.aborted) << a.abort_reason;
  EXPECT_EQ(a.auth_pad_bits_used, 3U * pp.auth_tag_bits);
  EXPECT_EQ(a.auth_bits_consumed, aborted_pads + a.auth_pad_bits_used + 256U);
  EXPECT_EQ(a.auth_pool_bits_left, (std::array<std::uint64_t, 2>{pp.auth_pool_bits,
                                                                 pp.auth_pool_bits}));
  EXPECT_GT(a.secret_bits, 0U);
}

// A long run of aborts drains the pools: the endpoints then stop between blocks with the
// named kPadExhausted error (kAuthentication), both alike, without sending a frame or
// waiting for one, and refuse further blocks.
TEST(Link, LongRunOfAbortsFailsWithPadExhausted) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.auth_pool_bits = 1024;  // 8 tags of 128 bits per direction
  ChannelParams ch;
  ch.eve_intercept_fraction = 1.0;  // every block aborts (QBER ~25 %)
  AliceEndpoint alice(ch, pp, kPsk, 61, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 62, *q.b, *c.b);
  const int aborted = aborted_blocks_until_pads_run_out(alice, bob, 20, "Bob->Alice");
  // Bob->Alice needs 3 tags per block: 8 - 6 aborted blocks = 2 left.
  EXPECT_EQ(aborted, 6);
  auto again = run_pair(alice, bob);
  ASSERT_FALSE(again.alice.ok());
  ASSERT_FALSE(again.bob.ok());
  EXPECT_NE(again.alice.error().message.find("unusable"), std::string::npos);
  EXPECT_NE(again.bob.error().message.find(detail::kPadExhausted), std::string::npos);
}


// A scripted Bob that follows the protocol with a real Alice up to CascadeStart (it
// echoes Alice's sample bits, so the QBER is 0) and then sends whatever the test asks.
class ScriptedBob {
 public:
  ScriptedBob(const ProtocolParams& pp, MessageTransport& quantum, MessageTransport& classical)
      : pp_(pp), quantum_(quantum) {
    auto ch = detail::AuthChannel::create(classical, detail::AuthRole::kBob, kPsk,
                                          detail::auth_settings(pp));
    EXPECT_TRUE(ch.ok());
    ch_ = std::move(ch).value();
  }
  // Runs block 0 up to Alice's CascadeStart; returns n (0 on failure).
  std::uint32_t reach_cascade() {
    using detail::MsgType;
    const std::chrono::milliseconds t = pp_.message_timeout;
    if (!ch_->receive(t, MsgType::kParams, 0).ok()) {
      return 0;
    }
    detail::Writer ack;
    ack.u8(1);
    ack.string("");
    if (!ch_->send(MsgType::kParamsAck, 0, ack.buffer()).ok()) {
      return 0;
    }
    std::uint64_t next = 0;
    std::uint64_t detections = 0;
    for (std::uint32_t chunk = 0;; ++chunk) {
      auto m = quantum_.receive(t);
      if (!m.ok()) {
        return 0;
      }
      auto c = detail::decode_detections(*m, 0, chunk, next, pp_.pulses_per_block);
      if (!c.ok()) {
        return 0;
      }
      detections += c->events.size();
      if (c->last) {
        break;
      }
    }
    detail::Writer bases;
    bases.u64(detections);
    bases.bits(BitVector(detections));  // all Z
    if (!ch_->send(MsgType::kSiftBases, 0, bases.buffer()).ok()) {
      return 0;
    }
    auto match = ch_->receive(t, MsgType::kSiftMatch, 0);
    auto sample = ch_->receive(t, MsgType::kSample, 0);
    if (!match.ok() || !sample.ok()) {
      return 0;
    }
    detail::Reader rd(sample->payload);
    BitVector mask;
    BitVector alice_sample;
    if (!rd.bits(mask, detections) || !rd.bits(alice_sample, detections) || !rd.done()) {
      return 0;
    }
    detail::Writer reply;
    reply.bits(alice_sample);
    if (!ch_->send(MsgType::kSampleReply, 0, reply.buffer()).ok()) {
      return 0;
    }
    auto start = ch_->receive(t, MsgType::kCascadeStart, 0);
    if (!start.ok()) {
      return 0;
    }
    detail::Reader sr(start->payload);
    std::uint32_t n = 0;
    return sr.u32(n) ? n : 0;
  }
  // Sends a range-parity request of `queries` and returns Alice's answer (or her Abort).
  Result<detail::Frame> ask(std::span<const ParityQuery> queries) {
    detail::Writer w;
    detail::write_range_parities(w, queries);
    if (Status s = ch_->send(detail::MsgType::kCascadeRequest, 0, w.buffer()); !s.ok()) {
      return s.error();
    }
    return ch_->receive(pp_.message_timeout, detail::MsgType::kCascadeReply, 0);
  }

 private:
  ProtocolParams pp_;
  MessageTransport& quantum_;
  std::unique_ptr<detail::AuthChannel> ch_;
};

// A hostile Bob cannot make Alice's Cascade responder work for hours. A request's ranges
// may cover at most 2n bits (an honest one covers at most n: disjoint sub-blocks of one
// pass), so n full-key ranges are refused before any parity is computed; and once n
// parities are out (the block can yield no key) every further request is refused. Both
// end the block with kProtocol, and Bob learns why through Alice's Abort.
TEST(Link, AliceRefusesCascadeRequestsThatCostOrLeakTooMuch) {
  for (const bool whole_key_ranges : {true, false}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    const ProtocolParams pp = small_params();
    AliceEndpoint alice(ChannelParams{}, pp, kPsk, 71, *q.a, *c.a);
    std::optional<Result<BlockResult>> ra;
    std::thread th([&] { ra.emplace(alice.run_block()); });
    ScriptedBob bob(pp, *q.b, *c.b);
    const std::uint32_t n = bob.reach_cascade();
    ASSERT_GT(n, 0U);
    Result<detail::Frame> answer = make_error(ErrorCode::kInternal, "not asked");
    if (whole_key_ranges) {
      // The attack of the review: count = n, each query the whole key (3.6 MB and seconds
      // of Alice's CPU per request at n = 4e5, 5,000 requests per block).
      const std::vector<ParityQuery> queries(n, ParityQuery{0, 0, n});
      answer = bob.ask(queries);
    } else {
      // Within the per-request bound but every bit of the key, one parity each: answered
      // (it is Bob's own block that stops yielding key), and nothing more after it.
      std::vector<ParityQuery> queries(n);
      for (std::uint32_t i = 0; i < n; ++i) {
        queries[i] = ParityQuery{0, i, 1};
      }
      auto first = bob.ask(queries);
      ASSERT_TRUE(first.ok()) << first.error().message;
      const std::vector<ParityQuery> one{ParityQuery{0, 0, 2}};
      answer = bob.ask(one);
    }
    th.join();
    ASSERT_FALSE(answer.ok()) << "Alice answered";
    EXPECT_EQ(answer.error().code, ErrorCode::kRejected) << answer.error().message;
    ASSERT_FALSE(ra->ok());
    EXPECT_EQ(ra->error().code, ErrorCode::kProtocol) << ra->error().message;
    EXPECT_NE(ra->error().message.find("Cascade"), std::string::npos) << ra->error().message;
    EXPECT_NE(answer.error().message.find(ra->error().message), std::string::npos)
        << answer.error().message;
  }
}


// A fake Alice that has sent Params and received Bob's ParamsAck (block 0): what the
// Bob-side tests below then feed him.
struct FakeAlice {
  explicit FakeAlice(const ProtocolParams& pp, MessageTransport& classical,
                     double pulse_rate_hz = 1e9) {
    auto c = detail::AuthChannel::create(classical, detail::AuthRole::kAlice, kPsk,
                                         detail::auth_settings(pp));
    EXPECT_TRUE(c.ok());
    ch = std::move(c).value();
    detail::Writer w;
    detail::write_params(w, pp, pulse_rate_hz);
    EXPECT_TRUE(ch->send(detail::MsgType::kParams, 0, w.buffer()).ok());
  }
  std::unique_ptr<detail::AuthChannel> ch;
};

// Empty detection chunks that are not the last, or more chunks than the block's pulses
// need, fail Bob at once (kProtocol) instead of holding him in the quantum phase, where he
// reads no classical frame (so not even Alice's Abort) until the message timeout.
TEST(Link, BobRefusesEmptyOrSurplusDetectionChunks) {
  ProtocolParams pp = small_params();  // 400,000 pulses: chunks 0 and 1 at most
  pp.message_timeout = std::chrono::milliseconds(5'000);
  for (const bool empty : {true, false}) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    BobEndpoint bob(pp, kPsk, 81, *q.b, *c.b);
    std::optional<Result<BlockResult>> rb;
    std::thread th([&] { rb.emplace(bob.run_block()); });
    FakeAlice alice(pp, *c.a);
    ASSERT_TRUE(alice.ch->receive(pp.message_timeout, detail::MsgType::kParamsAck, 0).ok());
    std::uint64_t pulse = 0;
    for (std::uint32_t chunk = 0; chunk < 3; ++chunk) {
      std::vector<DetectionEvent> ev;
      if (!empty) {
        DetectionEvent e;
        e.pulse = pulse++ & DetectionEvent::kMaxPulse;
        ev.push_back(e);
      }
      const std::uint64_t base = pulse - ev.size();
      ASSERT_TRUE(q.a->send(detail::encode_detections(0, chunk, false, ev, base)).ok());
      if (empty) {
        break;  // the first one must do
      }
    }
    // Bob gives up and says so on the classical channel.
    auto heard = alice.ch->receive(pp.message_timeout, detail::MsgType::kSiftBases, 0);
    q.a->close();  // wakes a Bob still waiting for detections (only without the check)
    th.join();
    ASSERT_FALSE(rb->ok());
    EXPECT_EQ(rb->error().code, ErrorCode::kProtocol) << rb->error().message;
    EXPECT_NE(rb->error().message.find(empty ? "empty detection chunk" : "chunk 2"),
              std::string::npos)
        << rb->error().message;
    ASSERT_FALSE(heard.ok());
    EXPECT_EQ(heard.error().code, ErrorCode::kRejected) << heard.error().message;
  }
}


// Bob takes the pulse rate Alice announces only in the range validate(ChannelParams) gives
// her, [1, 1e15] Hz: +Inf or a subnormal rate made simulated_seconds 0 or infinite (and the
// KME's rate metrics Inf or NaN).
TEST(Link, BobRefusesAnImplausiblePulseRate) {
  ProtocolParams pp = small_params();
  const double rates[] = {1e9, std::numeric_limits<double>::infinity(),
                          std::numeric_limits<double>::denorm_min(), 0.5, 2e15,
                          std::numeric_limits<double>::quiet_NaN()};
  for (const double rate : rates) {
    auto q = make_memory_transport_pair();
    auto c = make_memory_transport_pair();
    BobEndpoint bob(pp, kPsk, 91, *q.b, *c.b);
    std::optional<Result<BlockResult>> rb;
    std::thread th([&] { rb.emplace(bob.run_block()); });
    FakeAlice alice(pp, *c.a, rate);
    auto ack = alice.ch->receive(pp.message_timeout, detail::MsgType::kParamsAck, 0);
    q.a->close();  // wakes a Bob waiting for detections
    th.join();
    if (rate == 1e9) {
      EXPECT_TRUE(ack.ok()) << ack.error().message;
      continue;
    }
    ASSERT_FALSE(ack.ok()) << rate << " accepted";
    EXPECT_EQ(ack.error().code, ErrorCode::kRejected) << ack.error().message;
    ASSERT_FALSE(rb->ok());
    EXPECT_EQ(rb->error().code, ErrorCode::kProtocol) << rb->error().message;
    EXPECT_NE(rb->error().message.find("Params"), std::string::npos) << rb->error().message;
  }
  // Alice's own settings: the same range.
  ChannelParams ch;
  for (const double rate : rates) {
    ch.pulse_rate_hz = rate;
    EXPECT_EQ(validate(ch).ok(), rate == 1e9) << rate;
  }
  for (const double rate : {kMinPulseRateHz, kMaxPulseRateHz}) {
    ch.pulse_rate_hz = rate;
    EXPECT_TRUE(validate(ch).ok()) << rate;
  }
}


// Per-message authentication takes a tag per frame, ~100-200 per block with Cascade's
// round trips: a 4096-bit pool (32 tags of 128 bits) runs out in the middle of the first
// block. The end that runs out keeps the last tag for its Abort and fails with a
// kPadExhausted error that names the pool size and the way out; the peer gets that reason
// at once (kRejected) instead of waiting for the message timeout.
TEST(Link, PerMessagePoolTooSmallForABlockFailsClearlyAtBothEnds) {
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ProtocolParams pp = small_params();
  pp.auth_every_message = true;
  pp.auth_pool_bits = 4096;
  pp.message_timeout = std::chrono::milliseconds(10'000);
  AliceEndpoint alice(ChannelParams{}, pp, kPsk, 101, *q.a, *c.a);
  BobEndpoint bob(pp, kPsk, 102, *q.b, *c.b);
  auto r = run_pair(alice, bob);
  ASSERT_FALSE(r.alice.ok());
  ASSERT_FALSE(r.bob.ok());
  const Error& a = r.alice.error();
  const Error& b = r.bob.error();
  // Either direction may run out first (Alice->Bob does at these settings).
  const Error& ran_out = a.code == ErrorCode::kAuthentication ? a : b;
  const Error& told = a.code == ErrorCode::kAuthentication ? b : a;
  EXPECT_EQ(ran_out.code, ErrorCode::kAuthentication) << ran_out.message;
  EXPECT_EQ(ran_out.message.rfind(detail::kPadExhausted, 0), 0U) << ran_out.message;
  EXPECT_NE(ran_out.message.find("per-message"), std::string::npos) << ran_out.message;
  EXPECT_NE(ran_out.message.find("auth_pool_bits = 4096"), std::string::npos) << ran_out.message;
  EXPECT_EQ(told.code, ErrorCode::kRejected) << told.message;
  EXPECT_NE(told.message.find(ran_out.message), std::string::npos) << told.message;
  std::printf("ran out: %s\ntold: %s\n", ran_out.message.c_str(), told.message.c_str());

  // Between blocks, both ends check that each pool holds the tags of a block's fixed frames
  // (kBlockTagsPerMessage, 7): a first block aborted on its QBER (2 tags each way) leaves 6
  // of a 1024-bit pool's 8, and the second stops before it starts, at both ends alike.
  auto q2 = make_memory_transport_pair();
  auto c2 = make_memory_transport_pair();
  pp.auth_pool_bits = 1024;
  ChannelParams eve;
  eve.eve_intercept_fraction = 1.0;  // every block aborts (QBER ~25 %)
  AliceEndpoint alice2(eve, pp, kPsk, 103, *q2.a, *c2.a);
  BobEndpoint bob2(pp, kPsk, 104, *q2.b, *c2.b);
  EXPECT_EQ(aborted_blocks_until_pads_run_out(alice2, bob2, 10, "a block may need 896"), 1);
}

}  // namespace
}  // namespace qkd::core
