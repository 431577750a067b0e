// Framed, channel-tagged messages over one TLS 1.3 connection between two KMEs.
#include "qkd/kms/link_connection.hpp"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <algorithm>
#include <atomic>
#include <future>

#include "qkd/kms/engine_channel.hpp"
#include "qkd/kms/https_server.hpp"
#include "qkd/kms/tls.hpp"

namespace qkd::kms {

namespace asio = boost::asio;
namespace beast = boost::beast;
using tcp = asio::ip::tcp;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using Stream = beast::ssl_stream<beast::tcp_stream>;

namespace {
constexpr auto kIdleTimeout = std::chrono::seconds(30);
constexpr auto kPingInterval = std::chrono::seconds(5);
constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
}  // namespace

// --- MessageQueue ---

bool MessageQueue::push(std::vector<std::uint8_t> msg) {
  {
    std::lock_guard lock(mu_);
    if (closed_) {
      return true;
    }
    if (q_.size() >= kMaxQueued) {
      return false;
    }
    q_.push_back(std::move(msg));
  }
  cv_.notify_one();
  return true;
}

qkd::core::Result<std::vector<std::uint8_t>> MessageQueue::pop(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return closed_ || !q_.empty(); })) {
    return make_error(ErrorCode::kTimeout, "link: no message within the timeout");
  }
  if (closed_) {
    return make_error(ErrorCode::kClosed, "link: connection closed");
  }
  auto msg = std::move(q_.front());
  q_.pop_front();
  return msg;
}

void MessageQueue::close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    q_.clear();
  }
  cv_.notify_all();
}

bool MessageQueue::closed() const {
  std::lock_guard lock(mu_);
  return closed_;
}

// --- LinkConnection ---

struct LinkConnection::Impl {
  Impl(Stream&& s, std::string peer_name)
      : stream(std::move(s)), peer(std::move(peer_name)), ping_timer(stream.get_executor()) {}

  Stream stream;
  std::string peer;
  ControlHandler on_control;
  std::mutex close_mu;
  std::function<void()> on_close;
  std::deque<std::vector<std::uint8_t>> writes;  // encoded frames; strand only
  bool writing = false;                          // strand only
  // Bytes of frames sent and not written (or dropped) yet, from send() on (queued_cost).
  std::atomic<std::size_t> queued_bytes{0};
  std::atomic<bool> closed{false};
  std::array<std::uint8_t, 5> header{};
  std::vector<std::uint8_t> body;
  asio::steady_timer ping_timer;
};

namespace {

std::vector<std::uint8_t> encode_frame(Channel ch, std::vector<std::uint8_t> payload) {
  std::vector<std::uint8_t> f;
  f.reserve(payload.size() + 5);
  f.push_back(static_cast<std::uint8_t>(ch));
  const auto n = static_cast<std::uint32_t>(payload.size());
  f.push_back(static_cast<std::uint8_t>(n >> 24));
  f.push_back(static_cast<std::uint8_t>(n >> 16));
  f.push_back(static_cast<std::uint8_t>(n >> 8));
  f.push_back(static_cast<std::uint8_t>(n));
  f.insert(f.end(), payload.begin(), payload.end());
  std::fill(payload.begin(), payload.end(), 0);
  return f;
}

// What an encoded frame counts against LinkConnection::kMaxQueuedBytes.
std::size_t queued_cost(const std::vector<std::uint8_t>& frame) {
  return frame.size() + LinkConnection::kQueuedFrameOverhead;
}

// Cleanses a frame that leaves the queue (written or dropped) and uncounts it.
void release_frame(LinkConnection::Impl& im, std::vector<std::uint8_t>& frame) {
  im.queued_bytes -= queued_cost(frame);
  std::fill(frame.begin(), frame.end(), 0);
}

// Read loop and write queue, as free functions over the shared connection.
void do_read_header(const std::shared_ptr<LinkConnection>& self, LinkConnection::Impl& im);

void do_read_body(const std::shared_ptr<LinkConnection>& self, LinkConnection::Impl& im) {
  beast::get_lowest_layer(im.stream).expires_after(kIdleTimeout);
  asio::async_read(im.stream, asio::buffer(im.body),
                   [self, &im](beast::error_code ec, std::size_t) {
                     if (ec) {
                       spdlog::info("link: read from {}: {}", im.peer, ec.message());
                       self->close();
                       return;
                     }
                     if (im.closed) {
                       return;  // a message read before close(): not for the next session
                     }
                     const auto ch = static_cast<Channel>(im.header[0]);
                     std::vector<std::uint8_t> msg = std::move(im.body);
                     im.body.clear();
                     switch (ch) {
                       case Channel::kControl:
                         if (im.on_control && !im.on_control(std::move(msg))) {
                           self->close();
                           return;
                         }
                         break;
                       case Channel::kPing:
                         break;
                       default:
                         spdlog::warn("link: unknown channel {} from {}", im.header[0], im.peer);
                         self->close();
                         return;
                     }
                     do_read_header(self, im);
                   });
}

void do_read_header(const std::shared_ptr<LinkConnection>& self, LinkConnection::Impl& im) {
  if (im.closed) {
    return;
  }
  beast::get_lowest_layer(im.stream).expires_after(kIdleTimeout);
  asio::async_read(
      im.stream, asio::buffer(im.header), [self, &im](beast::error_code ec, std::size_t) {
        if (ec) {
          spdlog::info("link: read from {}: {}", im.peer, ec.message());
          self->close();
          return;
        }
        const std::uint32_t n = (std::uint32_t{im.header[1]} << 24) |
                                (std::uint32_t{im.header[2]} << 16) |
                                (std::uint32_t{im.header[3]} << 8) | std::uint32_t{im.header[4]};
        if (n > kMaxFrameBytes) {
          spdlog::warn("link: frame of {} bytes from {} is too large", n, im.peer);
          self->close();
          return;
        }
        im.body.assign(n, 0);
        do_read_body(self, im);
      });
}

void do_write(const std::shared_ptr<LinkConnection>& self, LinkConnection::Impl& im) {
  if (im.writes.empty() || im.closed) {
    im.writing = false;
    return;
  }
  im.writing = true;
  asio::async_write(im.stream, asio::buffer(im.writes.front()),
                    [self, &im](beast::error_code ec, std::size_t) {
                      if (ec || im.closed) {
                        // The write is over, so its buffer may go now (close() leaves
                        // the buffer of a write in flight alone).
                        if (ec && !im.closed) {
                          spdlog::info("link: write to {}: {}", im.peer, ec.message());
                        }
                        for (auto& w : im.writes) {
                          release_frame(im, w);
                        }
                        im.writes.clear();
                        im.writing = false;
                        self->close();
                        return;
                      }
                      release_frame(im, im.writes.front());
                      im.writes.pop_front();
                      do_write(self, im);
                    });
}

void schedule_ping(const std::shared_ptr<LinkConnection>& self, LinkConnection::Impl& im) {
  im.ping_timer.expires_after(kPingInterval);
  im.ping_timer.async_wait([self, &im](beast::error_code ec) {
    if (ec || im.closed) {
      return;
    }
    (void)self->send(Channel::kPing, {});
    schedule_ping(self, im);
  });
}

}  // namespace

LinkConnection::LinkConnection(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LinkConnection::~LinkConnection() = default;

const std::string& LinkConnection::peer() const { return impl_->peer; }
bool LinkConnection::closed() const { return impl_->closed; }

void LinkConnection::start(ControlHandler on_control, std::function<void()> on_close) {
  {
    std::lock_guard lock(impl_->close_mu);
    impl_->on_close = std::move(on_close);
  }
  if (impl_->closed) {
    std::lock_guard lock(impl_->close_mu);
    if (impl_->on_close) {
      impl_->on_close();
    }
  }
  auto self = shared_from_this();
  asio::post(impl_->stream.get_executor(), [self, h = std::move(on_control)]() mutable {
    self->impl_->on_control = std::move(h);
    do_read_header(self, *self->impl_);
    schedule_ping(self, *self->impl_);
  });
}

qkd::core::Status LinkConnection::send(Channel ch, std::vector<std::uint8_t> payload) {
  if (impl_->closed) {
    return make_error(ErrorCode::kClosed, "link: connection closed");
  }
  if (payload.size() > kMaxFrameBytes) {
    return make_error(ErrorCode::kInvalidArgument, "link: message too large");
  }
  auto frame = encode_frame(ch, std::move(payload));
  const std::size_t cost = queued_cost(frame);
  if (impl_->queued_bytes.fetch_add(cost) + cost > kMaxQueuedBytes) {
    impl_->queued_bytes -= cost;
    std::fill(frame.begin(), frame.end(), 0);
    spdlog::warn("link: {} has not read {} bytes sent to it (at most {}): closing the connection",
                 impl_->peer, impl_->queued_bytes.load(), kMaxQueuedBytes);
    close();
    return make_error(ErrorCode::kClosed,
                      "link: connection closed: the peer does not read what is sent to it");
  }
  asio::post(impl_->stream.get_executor(),
             [self = shared_from_this(), frame = std::move(frame)]() mutable {
               Impl& im = *self->impl_;
               if (im.closed) {
                 release_frame(im, frame);
                 return;
               }
               im.writes.push_back(std::move(frame));
               if (!im.writing) {
                 do_write(self, im);
               }
             });
  return qkd::core::ok_status();
}

void LinkConnection::close() {
  if (impl_->closed.exchange(true)) {
    return;
  }
  {
    std::lock_guard lock(impl_->close_mu);
    if (impl_->on_close) {
      impl_->on_close();
    }
  }
  asio::post(impl_->stream.get_executor(), [self = shared_from_this()]() {
    Impl& im = *self->impl_;
    im.ping_timer.cancel();
    beast::error_code ec;
    beast::get_lowest_layer(im.stream).socket().shutdown(tcp::socket::shutdown_both, ec);
    beast::get_lowest_layer(im.stream).close();
    // An async_write in flight still reads writes.front(): its handler frees that buffer.
    auto first = im.writes.begin();
    if (im.writing && first != im.writes.end()) {
      ++first;
    }
    for (auto it = first; it != im.writes.end(); ++it) {
      release_frame(im, *it);
    }
    im.writes.erase(first, im.writes.end());
    im.on_control = nullptr;
  });
}

qkd::core::Result<std::shared_ptr<LinkConnection>> LinkConnection::connect(
    asio::io_context& ioc, asio::ssl::context& tls, const std::string& host, std::uint16_t port,
    const std::string& peer_id, std::chrono::milliseconds timeout) {
  auto stream = std::make_shared<Stream>(asio::make_strand(ioc), tls);
  if (!SSL_set_tlsext_host_name(stream->native_handle(), host.c_str())) {
    // SNI is only a courtesy; continue without it.
  }
  auto done = std::make_shared<std::promise<beast::error_code>>();
  auto fut = done->get_future();
  auto resolver = std::make_shared<tcp::resolver>(ioc);
  beast::get_lowest_layer(*stream).expires_after(timeout);
  resolver->async_resolve(
      host, std::to_string(port),
      [stream, done, resolver](beast::error_code ec, const tcp::resolver::results_type& eps) {
        if (ec) {
          done->set_value(ec);
          return;
        }
        beast::get_lowest_layer(*stream).async_connect(
            eps, [stream, done](beast::error_code ec2, const tcp::endpoint&) {
              if (ec2) {
                done->set_value(ec2);
                return;
              }
              beast::error_code nodelay_ec;  // notices are small and latency-bound
              beast::get_lowest_layer(*stream).socket().set_option(tcp::no_delay(true),
                                                                   nodelay_ec);
              beast::get_lowest_layer(*stream).expires_after(kHandshakeTimeout);
              stream->async_handshake(asio::ssl::stream_base::client,
                                      [done](beast::error_code ec3) { done->set_value(ec3); });
            });
      });
  // The io_context runs on another thread; bound the wait in case it never answers.
  if (fut.wait_for(timeout + kHandshakeTimeout + std::chrono::seconds(1)) !=
      std::future_status::ready) {
    asio::post(stream->get_executor(), [stream]() { beast::get_lowest_layer(*stream).close(); });
    return make_error(ErrorCode::kTimeout,
                      fmt::format("link: connect to {}:{} timed out", host, port));
  }
  const beast::error_code ec = fut.get();
  if (ec) {
    // A TLS error (the peer's certificate not from api.ca, say) is a configuration to fix,
    // not a peer that is down.
    const bool tls_error = ec.category() == asio::error::get_ssl_category();
    return make_error(tls_error ? ErrorCode::kAuthentication : ErrorCode::kUnavailable,
                      fmt::format("link: connect to {}:{}: {}{}", host, port, ec.message(),
                                  tls_error ? " (TLS handshake)" : ""));
  }
  auto cn = peer_common_name(stream->native_handle());
  if (!cn || *cn != peer_id) {
    asio::post(stream->get_executor(), [stream]() { beast::get_lowest_layer(*stream).close(); });
    return make_error(ErrorCode::kAuthentication,
                      fmt::format("link: peer at {}:{} is \"{}\", expected \"{}\"", host, port,
                                  cn.value_or("?"), peer_id));
  }
  beast::get_lowest_layer(*stream).expires_never();
  auto impl = std::make_unique<Impl>(std::move(*stream), *cn);
  return std::make_shared<LinkConnection>(std::move(impl));
}

// --- LinkAcceptor ---

struct LinkAcceptor::Impl : std::enable_shared_from_this<LinkAcceptor::Impl> {
  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> ctx, std::string id,
       OnConnection cb, OnEngineSocket eng)
      : ioc(io),
        tls(std::move(ctx)),
        peer_id(std::move(id)),
        on_connection(std::move(cb)),
        on_engine(std::move(eng)) {}

  void on_socket(tcp::socket&& s, AcceptLoop::Slot slot) {
    beast::error_code nodelay_ec;  // notices are small and latency-bound
    s.set_option(tcp::no_delay(true), nodelay_ec);
    classify(std::make_shared<tcp::socket>(std::move(s)), std::move(slot));
  }

  // Peeks at the first byte: a TLS record starts a control connection, kEnginePreamble an
  // engine connection. `slot` is held until the connection is handed on or closed.
  void classify(const std::shared_ptr<tcp::socket>& s, AcceptLoop::Slot slot) {
    auto timer = std::make_shared<asio::steady_timer>(s->get_executor());
    timer->expires_after(kHandshakeTimeout);
    timer->async_wait([s](beast::error_code ec) {
      if (!ec) {
        beast::error_code ignored;
        s->close(ignored);  // said nothing in time
      }
    });
    auto first =
        std::make_shared<std::array<std::uint8_t, kEnginePreamble.size() + kEngineTokenBytes>>();
    s->async_receive(
        asio::buffer(first->data(), 1), tcp::socket::message_peek,
        [self = shared_from_this(), s, timer, first, slot](beast::error_code ec, std::size_t n) {
          if (ec || n == 0) {
            timer->cancel();
            return;
          }
          if ((*first)[0] != kEnginePreamble[0]) {
            timer->cancel();
            self->handshake(std::move(*s), slot);
            return;
          }
          asio::async_read(*s, asio::buffer(*first),
                           [self, s, timer, first, slot](beast::error_code ec2, std::size_t) {
                             timer->cancel();
                             if (ec2 || !std::equal(kEnginePreamble.begin(),
                                                    kEnginePreamble.end(), first->begin())) {
                               spdlog::warn("link: an incoming connection sent neither TLS nor "
                                            "the engine preamble: closed");
                               beast::error_code ignored;
                               s->close(ignored);
                               return;
                             }
                             beast::error_code rec;
                             const int fd = s->release(rec);
                             if (rec) {
                               spdlog::warn("link: engine connection: {}", rec.message());
                               return;
                             }
                             EngineToken token{};
                             std::copy(first->begin() + kEnginePreamble.size(), first->end(),
                                       token.begin());
                             self->on_engine(fd, token);
                           });
        });
  }

  void handshake(tcp::socket s, AcceptLoop::Slot slot) {
    auto stream = std::make_shared<Stream>(std::move(s), *tls);
    beast::get_lowest_layer(*stream).expires_after(kHandshakeTimeout);
    stream->async_handshake(
        asio::ssl::stream_base::server,
        [self = shared_from_this(), stream, slot = std::move(slot)](beast::error_code ec) {
          if (ec) {
            spdlog::warn("link: handshake with an incoming peer failed: {}", ec.message());
            return;
          }
          auto cn = peer_common_name(stream->native_handle());
          if (!cn || *cn != self->peer_id) {
            spdlog::warn("link: refused incoming peer \"{}\" (expected \"{}\")",
                         cn.value_or("?"), self->peer_id);
            beast::get_lowest_layer(*stream).close();
            return;
          }
          beast::get_lowest_layer(*stream).expires_never();
          auto impl = std::make_unique<LinkConnection::Impl>(std::move(*stream), *cn);
          self->on_connection(std::make_shared<LinkConnection>(std::move(impl)));
        });
  }

  asio::io_context& ioc;
  std::shared_ptr<asio::ssl::context> tls;
  std::string peer_id;
  OnConnection on_connection;
  OnEngineSocket on_engine;
  std::shared_ptr<AcceptLoop> accept;
};

LinkAcceptor::LinkAcceptor(asio::io_context& ioc, std::shared_ptr<asio::ssl::context> tls,
                           std::string peer_id, OnConnection on_connection,
                           OnEngineSocket on_engine)
    : impl_(std::make_shared<Impl>(ioc, std::move(tls), std::move(peer_id),
                                   std::move(on_connection), std::move(on_engine))) {}

LinkAcceptor::~LinkAcceptor() { stop(); }

qkd::core::Result<std::uint16_t> LinkAcceptor::listen(const std::string& host, std::uint16_t port) {
  impl_->accept = std::make_shared<AcceptLoop>(
      impl_->ioc, "link", kMaxUnidentified,
      [weak = std::weak_ptr<Impl>(impl_)](tcp::socket&& s, AcceptLoop::Slot slot) {
        if (auto impl = weak.lock()) {
          impl->on_socket(std::move(s), std::move(slot));
        }
      });
  return impl_->accept->listen(host, port, "link.listen");
}

void LinkAcceptor::stop() {
  if (impl_->accept) {
    impl_->accept->stop();
  }
}

}  // namespace qkd::kms
