// EngineChannel: the BB84 engine's own TLS connection between two KMEs, opened through the
// link acceptor (preamble), over loopback with a real PKI (examples/pki.sh).
#include "qkd/kms/engine_channel.hpp"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "qkd/kms/link_connection.hpp"
#include "qkd/kms/tls.hpp"
#include "qkd/test/unit_pki.hpp"

namespace qkd::kms {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using qkd::core::ErrorCode;

const fs::path& pki_dir() { return qkd::test::unit_pki_dir(); }

std::shared_ptr<boost::asio::ssl::context> context(const std::string& name, TlsRole role) {
  ApiConfig api;
  api.cert = pki_dir() / (name + ".crt");
  api.key = pki_dir() / (name + ".key");
  api.ca = pki_dir() / "ca.crt";
  auto c = make_tls_context(api, role);
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message);
  return c.ok() ? c.value() : nullptr;
}

// The alice end: a LinkAcceptor on loopback whose engine sockets are handed to the test.
class AliceEnd {
 public:
  AliceEnd() : tls_(context("alice-kme", TlsRole::kServer)) {
    acceptor_ = std::make_unique<LinkAcceptor>(
        ioc_, tls_, "bob-kme", [](std::shared_ptr<LinkConnection> c) { c->close(); },
        [this](int fd, const EngineToken& token) {
          std::lock_guard lock(mu_);
          fds_.emplace_back(fd);
          tokens_.push_back(token);
          cv_.notify_all();
        });
    auto p = acceptor_->listen("127.0.0.1", 0);
    EXPECT_TRUE(p.ok());
    port_ = p.ok() ? p.value() : 0;
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~AliceEnd() {
    acceptor_->stop();
    work_.reset();
    ioc_.stop();
    thread_.join();
  }
  AliceEnd(const AliceEnd&) = delete;
  AliceEnd& operator=(const AliceEnd&) = delete;

  [[nodiscard]] std::uint16_t port() const { return port_; }
  [[nodiscard]] boost::asio::ssl::context& tls() { return *tls_; }

  // The next engine socket the acceptor hands over, with the token it came with (invalid
  // if none within `timeout`).
  UniqueFd next_socket(std::chrono::milliseconds timeout, EngineToken* token = nullptr) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return !fds_.empty(); })) {
      return UniqueFd();
    }
    UniqueFd fd = std::move(fds_.front());
    fds_.erase(fds_.begin());
    if (token != nullptr) {
      *token = tokens_.front();
    }
    tokens_.erase(tokens_.begin());
    return fd;
  }

  // Accepts the next engine connection (TLS handshake, CN check against `peer`); checks
  // that it came with kToken.
  qkd::core::Result<std::shared_ptr<EngineChannel>> accept(const std::string& peer = "bob-kme") {
    EngineToken token{};
    UniqueFd fd = next_socket(5s, &token);
    if (!fd.valid()) {
      return qkd::core::make_error(ErrorCode::kTimeout, "no engine socket");
    }
    EXPECT_EQ(token, kToken);
    auto ch = std::make_shared<EngineChannel>(*tls_);
    if (auto s = ch->accept(std::move(fd), peer, 5s); !s.ok()) {
      return s.error();
    }
    return ch;
  }

  static constexpr EngineToken kToken = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

 private:
  boost::asio::io_context ioc_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{
      boost::asio::make_work_guard(ioc_)};
  std::shared_ptr<boost::asio::ssl::context> tls_;
  std::unique_ptr<LinkAcceptor> acceptor_;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<UniqueFd> fds_;
  std::vector<EngineToken> tokens_;
};

// Bob's end: connects with kToken.
qkd::core::Result<std::shared_ptr<EngineChannel>> connect_bob(boost::asio::ssl::context& tls,
                                                              std::uint16_t port,
                                                              const std::string& expect) {
  auto ch = std::make_shared<EngineChannel>(tls);
  if (auto s = ch->connect("127.0.0.1", port, expect, AliceEnd::kToken, 5s); !s.ok()) {
    return s.error();
  }
  return ch;
}

struct Pair {
  std::shared_ptr<EngineChannel> alice;
  std::shared_ptr<EngineChannel> bob;
};

Pair connect_pair(AliceEnd& a, const std::string& bob_name = "bob-kme") {
  auto bob_tls = context(bob_name, TlsRole::kClient);
  auto bob = std::async(std::launch::async,
                        [&] { return connect_bob(*bob_tls, a.port(), "alice-kme"); });
  auto alice = a.accept();
  auto b = bob.get();
  Pair p;
  if (alice.ok()) {
    p.alice = alice.value();
  }
  if (b.ok()) {
    p.bob = b.value();
  }
  return p;
}

std::vector<std::uint8_t> pattern(std::size_t n, std::uint32_t seed) {
  std::vector<std::uint8_t> v(n);
  std::mt19937 g(seed);
  for (auto& x : v) {
    x = static_cast<std::uint8_t>(g());
  }
  return v;
}

// A connected pair: the alice end's channel and bob's, set up before each test.
class EngineChannelPair : public ::testing::Test {
 protected:
  void SetUp() override {
    p_ = connect_pair(a_);
    ASSERT_TRUE(p_.alice && p_.bob);
  }
  AliceEnd a_;
  Pair p_;
};

// The control messages queued for the link's runner thread are bounded: a peer running
// further ahead of the lock-step protocol is refused (its connection is then closed) rather
// than let grow the queue without end. What was queued still comes out, in order.
TEST(MessageQueue, HoldsAtMostItsBound) {
  MessageQueue q;
  for (std::size_t i = 0; i < MessageQueue::kMaxQueued; ++i) {
    ASSERT_TRUE(q.push({static_cast<std::uint8_t>(i)})) << i;
  }
  EXPECT_FALSE(q.push({0xff}));
  for (std::size_t i = 0; i < MessageQueue::kMaxQueued; ++i) {
    auto m = q.pop(0ms);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->front(), static_cast<std::uint8_t>(i));
  }
  EXPECT_EQ(q.pop(0ms).error().code, ErrorCode::kTimeout);
  EXPECT_TRUE(q.push({1}));
  q.close();
  EXPECT_TRUE(q.push({2})) << "a message after close is dropped, not refused";
  EXPECT_EQ(q.pop(0ms).error().code, ErrorCode::kClosed);
}

TEST_F(EngineChannelPair, CarriesBothChannelsInOrderAndLargeFramesBothWaysAtOnce) {
  Pair& p = p_;
  auto aq = p.alice->transport(Channel::kQuantum);
  auto ac = p.alice->transport(Channel::kClassical);
  auto bq = p.bob->transport(Channel::kQuantum);
  auto bc = p.bob->transport(Channel::kClassical);
  // Interleaved channels, an empty frame, then a frame larger than any socket buffer sent by
  // both ends at the same time (each send returns only once written: both must keep reading).
  ASSERT_TRUE(ac->send(pattern(100, 1)).ok());
  ASSERT_TRUE(aq->send(pattern(3000, 2)).ok());
  ASSERT_TRUE(ac->send({}).ok());
  EXPECT_EQ(bq->receive(5s).value(), pattern(3000, 2));  // the quantum one, past a classical
  EXPECT_EQ(bc->receive(5s).value(), pattern(100, 1));
  EXPECT_EQ(bc->receive(5s).value(), std::vector<std::uint8_t>{});
  const std::size_t big = 6u << 20;
  // Each end goes on reading after its send (a send needs the peer to read; engines do).
  auto from_bob = std::async(std::launch::async, [&] {
    const bool sent = bq->send(pattern(big, 4)).ok();
    auto got = bq->receive(30s);
    return sent && got.ok() && got.value() == pattern(big, 3);
  });
  ASSERT_TRUE(aq->send(pattern(big, 3)).ok());
  EXPECT_EQ(aq->receive(30s).value(), pattern(big, 4));
  EXPECT_TRUE(from_bob.get());
  // Many small round trips, as Cascade does.
  for (std::uint32_t i = 0; i < 500; ++i) {
    ASSERT_TRUE(bc->send(pattern(40, i)).ok());
    ASSERT_EQ(ac->receive(5s).value(), pattern(40, i));
    ASSERT_TRUE(ac->send(pattern(24, i + 1000)).ok());
    ASSERT_EQ(bc->receive(5s).value(), pattern(24, i + 1000));
  }
}

// A peer that keeps sending on a channel the engine is not reading (here 1 MiB quantum
// frames while the alice end waits on the classical channel) fails the connection once
// kMaxQueuedFrames frames wait, instead of being buffered without end; the classical frame
// sent after them is never delivered.
TEST_F(EngineChannelPair, UnreadFramesBeyondTheBoundFailTheConnection) {
  Pair& p = p_;
  static_assert(EngineChannel::kMaxQueuedFrames < 100);
  auto flood = std::async(std::launch::async, [&] {
    auto bq = p.bob->transport(Channel::kQuantum);
    auto bc = p.bob->transport(Channel::kClassical);
    const std::vector<std::uint8_t> mib = pattern(1u << 20, 5);
    int sent = 0;
    for (; sent < 100; ++sent) {
      if (!bq->send(mib).ok()) {
        return sent;
      }
    }
    (void)bc->send(pattern(10, 6));
    return sent;
  });
  auto ac = p.alice->transport(Channel::kClassical);
  auto r = ac->receive(60s);
  const int sent = flood.get();
  ASSERT_FALSE(r.ok()) << "the classical frame arrived after " << sent
                       << " unread 1 MiB quantum frames";
  EXPECT_EQ(r.error().code, ErrorCode::kClosed) << r.error().message;
  EXPECT_NE(r.error().message.find("not read"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("quantum"), std::string::npos) << r.error().message;
  EXPECT_GE(sent, static_cast<int>(EngineChannel::kMaxQueuedFrames));
  EXPECT_LT(sent, 100) << "the sender never noticed";
}

TEST_F(EngineChannelPair, ReceiveTimesOutThenStillWorks) {
  Pair& p = p_;
  auto ac = p.alice->transport(Channel::kClassical);
  auto bc = p.bob->transport(Channel::kClassical);
  auto r = ac->receive(50ms);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kTimeout);
  ASSERT_TRUE(bc->send(pattern(10, 9)).ok());
  EXPECT_EQ(ac->receive(5s).value(), pattern(10, 9));
}

TEST_F(EngineChannelPair, CloseFromAnotherThreadWakesABlockedReceive) {
  Pair& p = p_;
  auto bc = p.bob->transport(Channel::kClassical);
  const auto t0 = std::chrono::steady_clock::now();
  std::thread closer([&] {
    std::this_thread::sleep_for(100ms);
    p.bob->close();
  });
  auto r = bc->receive(30s);
  closer.join();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);  // woken, not timed out
  EXPECT_FALSE(bc->send(pattern(4, 1)).ok());
  // The other end sees the connection go.
  auto ac = p.alice->transport(Channel::kClassical);
  auto r2 = ac->receive(10s);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, ErrorCode::kClosed) << r2.error().message;
}

TEST(EngineChannel, CloseCutsAConnectShort) {
  AliceEnd a;  // hands the socket over, and nobody runs the TLS handshake on it
  auto bob_tls = context("bob-kme", TlsRole::kClient);
  auto ch = std::make_shared<EngineChannel>(*bob_tls);
  std::thread closer([&] {
    // Held open until after close(): closing it first would reset the connection, and the
    // connect could fail on that before it sees the close.
    const UniqueFd held = a.next_socket(5s);
    ASSERT_TRUE(held.valid());
    ch->close();
  });
  const auto t0 = std::chrono::steady_clock::now();
  auto s = ch->connect("127.0.0.1", a.port(), "alice-kme", AliceEnd::kToken, 30s);
  closer.join();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, ErrorCode::kClosed) << s.error().message;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);
}

TEST(EngineChannel, WrongPeerIsRefusedOnBothSides) {
  AliceEnd a;
  // mallory's certificate is from the same CA, but the alice end expects bob-kme.
  auto mallory_tls = context("mallory", TlsRole::kClient);
  auto mallory = std::async(std::launch::async,
                            [&] { return connect_bob(*mallory_tls, a.port(), "alice-kme"); });
  auto alice = a.accept();
  ASSERT_FALSE(alice.ok());
  EXPECT_EQ(alice.error().code, ErrorCode::kAuthentication) << alice.error().message;
  (void)mallory.get();
  // bob-kme expecting someone else at that address refuses alice-kme.
  auto bob_tls = context("bob-kme", TlsRole::kClient);
  auto wrong = std::async(std::launch::async,
                          [&] { return connect_bob(*bob_tls, a.port(), "carol-kme"); });
  (void)a.accept();  // the alice end's check passes: bob-kme is its peer
  auto w = wrong.get();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code, ErrorCode::kAuthentication) << w.error().message;
  // The genuine peer still gets through.
  Pair p = connect_pair(a);
  EXPECT_TRUE(p.alice && p.bob);
}

// Writes `bytes` on a plain TCP connection to the acceptor and returns whether the acceptor
// closed it (reads EOF within 15 s).
bool acceptor_closes(std::uint16_t port, const std::string& bytes) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket s(io);
  boost::system::error_code ec;
  s.connect({boost::asio::ip::make_address("127.0.0.1"), port}, ec);
  if (ec) {
    return false;
  }
  boost::asio::write(s, boost::asio::buffer(bytes), ec);
  timeval tv{15, 0};
  ::setsockopt(s.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char c = 0;
  const auto n = ::recv(s.native_handle(), &c, 1, 0);
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

TEST(EngineChannel, AcceptorClosesBadPreamblesAndHandsOverOnlyGoodOnes) {
  AliceEnd a;
  EXPECT_TRUE(acceptor_closes(a.port(), "QKDX and more than twenty bytes"));
  EXPECT_TRUE(acceptor_closes(a.port(), std::string(24, 'Q')));
  EXPECT_FALSE(a.next_socket(200ms).valid());
  // The preamble, a token and then no TLS: handed over with its token, and the handshake
  // fails in time.
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket s(io);
  s.connect({boost::asio::ip::make_address("127.0.0.1"), a.port()});
  boost::asio::write(s, boost::asio::buffer(kEnginePreamble));
  const EngineToken other = {9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9};
  boost::asio::write(s, boost::asio::buffer(other));
  boost::asio::write(s, boost::asio::buffer(std::string(64, 'x')));
  EngineToken got{};
  auto fd = a.next_socket(5s, &got);
  ASSERT_TRUE(fd.valid());
  EXPECT_EQ(got, other);
  EngineChannel ch(a.tls());
  ASSERT_FALSE(ch.accept(std::move(fd), "bob-kme", 2s).ok());
}

// A peer that speaks TLS with the right certificate but sends frames the engine channel does
// not take: a blocking OpenSSL client on a plain socket, writing raw frame bytes.
class RawPeer {
 public:
  RawPeer(std::uint16_t port, boost::asio::ssl::context& tls) : s_(io_) {
    s_.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    boost::asio::write(s_, boost::asio::buffer(kEnginePreamble));
    boost::asio::write(s_, boost::asio::buffer(AliceEnd::kToken));
    ssl_ = SSL_new(tls.native_handle());
    SSL_set_fd(ssl_, s_.native_handle());
    ok_ = SSL_connect(ssl_) == 1;
  }
  ~RawPeer() { SSL_free(ssl_); }
  RawPeer(const RawPeer&) = delete;
  RawPeer& operator=(const RawPeer&) = delete;
  [[nodiscard]] bool ok() const { return ok_; }
  bool write(const std::vector<std::uint8_t>& bytes) {
    return SSL_write(ssl_, bytes.data(), static_cast<int>(bytes.size())) ==
           static_cast<int>(bytes.size());
  }

 private:
  boost::asio::io_context io_;
  boost::asio::ip::tcp::socket s_;
  SSL* ssl_ = nullptr;
  bool ok_ = false;
};

// A RawPeer connected to the alice end, and the alice end's channel (both null on failure).
struct RawPair {
  std::unique_ptr<RawPeer> peer;
  std::shared_ptr<EngineChannel> alice;
};

RawPair connect_raw(AliceEnd& a, boost::asio::ssl::context& tls) {
  RawPair p;
  auto connected = std::async(std::launch::async, [&] {
    p.peer = std::make_unique<RawPeer>(a.port(), tls);
    return p.peer->ok();
  });
  auto alice = a.accept();
  if (!connected.get() || !alice.ok()) {
    return RawPair{};
  }
  p.alice = alice.value();
  return p;
}

TEST(EngineChannel, FramesOfAnotherChannelOrTooLargeFailTheConnection) {
  AliceEnd a;
  auto bob_tls = context("bob-kme", TlsRole::kClient);
  const std::uint32_t too_large = kMaxFrameBytes + 1;
  const std::vector<std::vector<std::uint8_t>> bad = {
      {static_cast<std::uint8_t>(Channel::kControl), 0, 0, 0, 2, '{', '}'},
      {9, 0, 0, 0, 0},
      {static_cast<std::uint8_t>(Channel::kClassical), static_cast<std::uint8_t>(too_large >> 24),
       static_cast<std::uint8_t>(too_large >> 16), static_cast<std::uint8_t>(too_large >> 8),
       static_cast<std::uint8_t>(too_large)}};
  // A good frame whose header and body arrive in pieces (one TLS record each).
  {
    RawPair p = connect_raw(a, *bob_tls);
    ASSERT_TRUE(p.peer && p.alice);
    auto classical = p.alice->transport(Channel::kClassical);
    const std::uint8_t ch = static_cast<std::uint8_t>(Channel::kClassical);
    for (const std::vector<std::uint8_t>& piece :
         {std::vector<std::uint8_t>{ch, 0}, {0, 0}, {3, 'a'}, {'b'}, {'c'}}) {
      ASSERT_TRUE(p.peer->write(piece));
      std::this_thread::sleep_for(5ms);
    }
    EXPECT_EQ(classical->receive(5s).value(), (std::vector<std::uint8_t>{'a', 'b', 'c'}));
  }
  for (const auto& frame : bad) {
    RawPair p = connect_raw(a, *bob_tls);
    ASSERT_TRUE(p.peer && p.alice);
    ASSERT_TRUE(p.peer->write(frame));
    auto got = p.alice->transport(Channel::kClassical)->receive(5s);
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.error().code, ErrorCode::kClosed) << got.error().message;
    EXPECT_TRUE(got.error().message.find("channel") != std::string::npos ||
                got.error().message.find("too large") != std::string::npos)
        << got.error().message;
  }
}

}  // namespace
}  // namespace qkd::kms
