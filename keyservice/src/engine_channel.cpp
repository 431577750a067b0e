// The BB84 engine's connection to the peer KME (see engine_channel.hpp).
#include "qkd/kms/engine_channel.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <vector>

#include "qkd/kms/tls.hpp"

namespace qkd::kms {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using Clock = std::chrono::steady_clock;
using error_code = boost::system::error_code;

namespace {
constexpr std::size_t kHeaderBytes = 5;
constexpr std::size_t kReadChunk = 64 * 1024;

std::size_t channel_index(Channel ch) { return ch == Channel::kQuantum ? 0 : 1; }

std::uint32_t frame_length(const std::uint8_t* h) {
  return (std::uint32_t{h[1]} << 24) | (std::uint32_t{h[2]} << 16) | (std::uint32_t{h[3]} << 8) |
         std::uint32_t{h[4]};
}

void cleanse(std::vector<std::uint8_t>& v) {
  if (!v.empty()) {
    OPENSSL_cleanse(v.data(), v.size());
  }
}
}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    fd_ = o.release();
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

struct EngineChannel::Impl {
  explicit Impl(asio::ssl::context& tls) : ioc(1), stream(ioc, tls) {}

  ~Impl() {
    error_code ec;
    stream.lowest_layer().close(ec);
    cleanse(in);
    for (auto& q : frames) {
      for (auto& f : q) {
        cleanse(f);
      }
    }
    for (auto& w : writes) {
      cleanse(w);
    }
  }

  asio::io_context ioc;  // run only by the owning thread, inside send() and receive()
  asio::ssl::stream<tcp::socket> stream;
  std::atomic<bool> closed{false};  // close() was called
  std::string failure;              // why the connection failed; empty while it works
  std::string peer;
  // Received bytes; the first in_len hold the start of frames not complete yet.
  std::vector<std::uint8_t> in;
  std::size_t in_len = 0;
  bool reading = false;
  std::array<std::deque<std::vector<std::uint8_t>>, 2> frames;  // complete: quantum, classical
  std::array<std::size_t, 2> queued_bytes{};                    // payload bytes in `frames`
  std::deque<std::vector<std::uint8_t>> writes;                 // encoded frames
  bool writing = false;

  [[nodiscard]] bool failed() const { return closed || !failure.empty(); }

  void fail(std::string why) {
    if (failure.empty()) {
      failure = std::move(why);
    }
    error_code ec;
    stream.lowest_layer().close(ec);  // ends the operations in flight
  }

  [[nodiscard]] qkd::core::Error closed_error() const {
    return make_error(ErrorCode::kClosed,
                      failure.empty() ? std::string("link: engine connection closed")
                                      : fmt::format("link: engine connection: {}", failure));
  }

  // Runs handlers until `done()`; false when the deadline passes or nothing is left to run.
  template <class Done>
  bool run_until(Done done, Clock::time_point deadline) {
    while (!done()) {
      if (closed || Clock::now() >= deadline) {
        return false;
      }
      if (ioc.stopped()) {
        ioc.restart();
      }
      if (ioc.run_one_until(deadline) == 0 && ioc.stopped() && Clock::now() < deadline) {
        return done();  // no operation in flight: nothing can change
      }
    }
    return true;
  }

  // Starts the read that stays in flight (each completion starts the next), into room for at
  // least the rest of the frame being received.
  void start_read() {
    if (reading || failed()) {
      return;
    }
    std::size_t need = kReadChunk;
    if (in_len >= kHeaderBytes) {
      const std::size_t whole = kHeaderBytes + frame_length(in.data());
      need = std::max(need, whole > in_len ? whole - in_len : 0);
    }
    if (in.size() < in_len + need) {
      // Grown by hand so that the old buffer is cleansed, not just freed.
      std::vector<std::uint8_t> bigger(in_len + need);
      if (in_len > 0) {
        std::memcpy(bigger.data(), in.data(), in_len);
      }
      cleanse(in);
      in = std::move(bigger);
    }
    reading = true;
    stream.async_read_some(asio::buffer(in.data() + in_len, in.size() - in_len),
                           [this](const error_code& ec, std::size_t n) {
                             reading = false;
                             if (ec) {
                               fail(ec == asio::error::eof || ec == asio::ssl::error::stream_truncated
                                        ? std::string("the peer closed it")
                                        : ec.message());
                               return;
                             }
                             in_len += n;
                             take_frames();
                             start_read();  // always one in flight while the channel works
                           });
  }

  // Moves the complete frames out of `in`.
  void take_frames() {
    std::size_t pos = 0;
    while (in_len - pos >= kHeaderBytes) {
      const std::uint8_t* h = in.data() + pos;
      const std::uint32_t n = frame_length(h);
      const auto ch = static_cast<Channel>(h[0]);
      if (ch != Channel::kQuantum && ch != Channel::kClassical) {
        fail(fmt::format("frame of unknown channel {}", h[0]));
        return;
      }
      if (n > kMaxFrameBytes) {
        fail(fmt::format("frame of {} bytes is too large", n));
        return;
      }
      if (in_len - pos < kHeaderBytes + n) {
        break;
      }
      auto& q = frames[channel_index(ch)];
      std::size_t& bytes = queued_bytes[channel_index(ch)];
      if (q.size() >= EngineChannel::kMaxQueuedFrames ||
          bytes + n > EngineChannel::kMaxQueuedBytes) {
        fail(fmt::format("the peer sent more than {} frames or {} MiB on the {} channel that "
                         "the engine has not read",
                         EngineChannel::kMaxQueuedFrames, EngineChannel::kMaxQueuedBytes >> 20,
                         ch == Channel::kQuantum ? "quantum" : "classical"));
        return;
      }
      q.emplace_back(h + kHeaderBytes, h + kHeaderBytes + n);
      bytes += n;
      pos += kHeaderBytes + n;
    }
    if (pos > 0) {
      const std::size_t rest = in_len - pos;
      std::memmove(in.data(), in.data() + pos, rest);
      OPENSSL_cleanse(in.data() + rest, in_len - rest);
      in_len = rest;
    }
  }

  void start_write() {
    if (writing || writes.empty() || failed()) {
      return;
    }
    writing = true;
    asio::async_write(stream, asio::buffer(writes.front()),
                      [this](const error_code& ec, std::size_t) {
                        writing = false;
                        cleanse(writes.front());
                        writes.pop_front();
                        if (ec) {
                          fail(ec.message());
                          return;
                        }
                        start_write();
                      });
  }

  qkd::core::Status send(Channel ch, std::vector<std::uint8_t> payload) {
    if (failed()) {
      return closed_error();
    }
    if (payload.size() > kMaxFrameBytes) {
      cleanse(payload);
      return make_error(ErrorCode::kInvalidArgument, "link: engine message too large");
    }
    std::vector<std::uint8_t> f(kHeaderBytes + payload.size());
    const auto n = static_cast<std::uint32_t>(payload.size());
    f[0] = static_cast<std::uint8_t>(ch);
    f[1] = static_cast<std::uint8_t>(n >> 24);
    f[2] = static_cast<std::uint8_t>(n >> 16);
    f[3] = static_cast<std::uint8_t>(n >> 8);
    f[4] = static_cast<std::uint8_t>(n);
    if (!payload.empty()) {
      std::memcpy(f.data() + kHeaderBytes, payload.data(), payload.size());
    }
    cleanse(payload);
    writes.push_back(std::move(f));
    start_write();
    // Written before returning: the peer may wait for this frame before it sends anything,
    // and this thread may wait elsewhere next (the control connection's ready message). A
    // read stays in flight meanwhile, so that two ends writing large frames at once both
    // make progress.
    start_read();
    const bool written = run_until([&] { return !writing || failed(); },
                                   Clock::now() + EngineChannel::kWriteTimeout);
    if (failed()) {
      return closed_error();
    }
    if (!written) {
      fail("write timed out");
      return make_error(ErrorCode::kTimeout, "link: engine message not written within the timeout");
    }
    return qkd::core::ok_status();
  }

  qkd::core::Result<std::vector<std::uint8_t>> receive(Channel ch,
                                                       std::chrono::milliseconds timeout) {
    auto& q = frames[channel_index(ch)];
    const auto deadline = Clock::now() + timeout;
    while (q.empty()) {
      if (failed()) {
        return closed_error();
      }
      start_read();
      if (!run_until([&] { return !q.empty() || failed(); }, deadline)) {
        if (!q.empty()) {
          break;
        }
        return make_error(ErrorCode::kTimeout, "link: no engine message within the timeout");
      }
    }
    auto msg = std::move(q.front());
    q.pop_front();
    queued_bytes[channel_index(ch)] -= msg.size();
    return msg;
  }

  // Handshake (either role) and peer check, within the deadline.
  qkd::core::Status handshake(asio::ssl::stream_base::handshake_type role,
                              const std::string& peer_id, Clock::time_point deadline,
                              const std::string& where) {
    bool done = false;
    error_code result;
    stream.async_handshake(role, [&](const error_code& ec) {
      result = ec;
      done = true;
    });
    if (!run_until([&] { return done; }, deadline)) {
      if (closed) {
        return closed_error();
      }
      fail("handshake timed out");
      return make_error(ErrorCode::kTimeout,
                        fmt::format("link: engine connection {}: TLS handshake timed out", where));
    }
    if (result) {
      fail(result.message());
      return make_error(ErrorCode::kUnavailable,
                        fmt::format("link: engine connection {}: {}", where, result.message()));
    }
    auto cn = peer_common_name(stream.native_handle());
    if (!cn || *cn != peer_id) {
      fail("wrong peer");
      return make_error(ErrorCode::kAuthentication,
                        fmt::format("link: engine connection {}: peer is \"{}\", expected \"{}\"",
                                    where, cn.value_or("?"), peer_id));
    }
    peer = *cn;
    return qkd::core::ok_status();
  }
};

namespace {

class EngineTransport final : public qkd::core::MessageTransport {
 public:
  EngineTransport(std::shared_ptr<EngineChannel> ch, EngineChannel::Impl& im, Channel c)
      : ch_(std::move(ch)), im_(im), c_(c) {}
  qkd::core::Status send(std::vector<std::uint8_t> message) override {
    return im_.send(c_, std::move(message));
  }
  qkd::core::Result<std::vector<std::uint8_t>> receive(std::chrono::milliseconds timeout) override {
    return im_.receive(c_, timeout);
  }
  void close() override { ch_->close(); }

 private:
  std::shared_ptr<EngineChannel> ch_;
  EngineChannel::Impl& im_;
  Channel c_;
};

}  // namespace

EngineChannel::EngineChannel(asio::ssl::context& tls) : impl_(std::make_unique<Impl>(tls)) {}
EngineChannel::~EngineChannel() = default;

void EngineChannel::close() {
  if (impl_->closed.exchange(true)) {
    return;
  }
  // Wakes the owner if it is waiting in the io_context; else it sees `closed` next time.
  asio::post(impl_->ioc, [im = impl_.get()]() {
    error_code ec;
    im->stream.lowest_layer().close(ec);
  });
}

bool EngineChannel::closed() const { return impl_->closed; }

std::unique_ptr<qkd::core::MessageTransport> EngineChannel::transport(Channel ch) {
  if (ch != Channel::kQuantum && ch != Channel::kClassical) {
    throw std::invalid_argument("EngineChannel::transport: quantum or classical only");
  }
  return std::make_unique<EngineTransport>(shared_from_this(), *impl_, ch);
}

qkd::core::Status EngineChannel::connect(const std::string& host, std::uint16_t port,
                                         const std::string& peer_id, const EngineToken& token,
                                         std::chrono::milliseconds timeout) {
  Impl& im = *impl_;
  const auto deadline = Clock::now() + timeout;
  const std::string where = fmt::format("to {}:{}", host, port);
  (void)SSL_set_tlsext_host_name(im.stream.native_handle(), host.c_str());  // a courtesy
  std::array<std::uint8_t, kEnginePreamble.size() + kEngineTokenBytes> hello{};
  std::copy(kEnginePreamble.begin(), kEnginePreamble.end(), hello.begin());
  std::copy(token.begin(), token.end(), hello.begin() + kEnginePreamble.size());
  tcp::resolver resolver(im.ioc);
  bool done = false;
  error_code result;
  resolver.async_resolve(host, std::to_string(port), [&](const error_code& ec,
                                                         const tcp::resolver::results_type& eps) {
    if (ec) {
      result = ec;
      done = true;
      return;
    }
    asio::async_connect(im.stream.lowest_layer(), eps,
                        [&](const error_code& ec2, const tcp::endpoint&) {
                          if (ec2) {
                            result = ec2;
                            done = true;
                            return;
                          }
                          error_code ignored;  // round trips of small messages
                          im.stream.lowest_layer().set_option(tcp::no_delay(true), ignored);
                          asio::async_write(im.stream.next_layer(), asio::buffer(hello),
                                            [&](const error_code& ec3, std::size_t) {
                                              result = ec3;
                                              done = true;
                                            });
                        });
  });
  if (!im.run_until([&] { return done; }, deadline)) {
    resolver.cancel();
    const bool was_closed = im.closed;
    // Failed for good: nothing runs the io_context again, so the handlers above (which
    // refer to this frame) never run; the destructor discards them.
    im.fail("connect did not complete");
    if (was_closed) {
      return im.closed_error();
    }
    return make_error(ErrorCode::kTimeout,
                      fmt::format("link: engine connection {}: connect timed out", where));
  }
  if (result) {
    im.fail(result.message());
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("link: engine connection {}: {}", where, result.message()));
  }
  return im.handshake(asio::ssl::stream_base::client, peer_id, deadline, where);
}

qkd::core::Status EngineChannel::accept(UniqueFd socket, const std::string& peer_id,
                                        std::chrono::milliseconds timeout) {
  Impl& im = *impl_;
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(socket.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("link: engine connection: {}", std::strerror(errno)));
  }
  error_code ec;
  im.stream.next_layer().assign(addr.ss_family == AF_INET6 ? tcp::v6() : tcp::v4(),
                                socket.get(), ec);
  if (ec) {
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("link: engine connection: {}", ec.message()));
  }
  (void)socket.release();  // the stream owns it now
  error_code ignored;
  im.stream.lowest_layer().set_option(tcp::no_delay(true), ignored);
  return im.handshake(asio::ssl::stream_base::server, peer_id, Clock::now() + timeout,
                      "from the peer");
}

}  // namespace qkd::kms
