// Beast async HTTPS server: listener -> session per connection (on a strand).
#include "qkd/kms/https_server.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>
#include <optional>

#include "qkd/kms/tls.hpp"

namespace qkd::kms {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using qkd::core::ErrorCode;
using qkd::core::make_error;

namespace {

constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
constexpr auto kReadTimeout = std::chrono::seconds(30);
constexpr auto kWriteTimeout = std::chrono::seconds(30);
constexpr auto kShutdownTimeout = std::chrono::seconds(5);
constexpr std::uint64_t kBodyLimit = 64 * 1024;
// After an answer sent before its request was read to the end: what the client still sends
// is read and dropped for at most this long, and this much (see drain_then_close()).
constexpr auto kDrainTimeout = std::chrono::seconds(2);
constexpr std::size_t kDrainLimit = 1024 * 1024;

// The answer to a HEAD: the header of the GET, without its body (RFC 9110 9.3.2). Sent, the
// body would be read as the start of the next response on this connection.
void drop_body_of_head(http::response<http::string_body>& res) {
  const std::size_t length = res.body().size();
  OPENSSL_cleanse(res.body().data(), length);
  res.body().clear();
  res.content_length(length);
}

// What the sessions of one server share with it.
struct ServerState {
  std::atomic<std::size_t> in_flight{0};  // HttpsServer::in_flight()
  std::atomic<bool> stopping{false};      // HttpsServer::stop() was called
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, asio::ssl::context& ctx, const HttpsServer::Handler& handler,
          std::shared_ptr<ServerState> state, AcceptLoop::Slot slot)
      : stream_(std::move(socket), ctx),
        handler_(handler),
        state_(std::move(state)),
        slot_(std::move(slot)) {
    beast::error_code ec;
    auto ep = beast::get_lowest_layer(stream_).socket().remote_endpoint(ec);
    peer_ = ec ? std::string("?") : fmt::format("{}:{}", ep.address().to_string(), ep.port());
  }

  ~Session() { uncount_request(); }  // a request whose answer can no longer be written
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void run() {
    asio::dispatch(stream_.get_executor(),
                   beast::bind_front_handler(&Session::on_run, shared_from_this()));
  }

 private:
  void on_run() {
    beast::get_lowest_layer(stream_).expires_after(kHandshakeTimeout);
    stream_.async_handshake(asio::ssl::stream_base::server,
                            beast::bind_front_handler(&Session::on_handshake, shared_from_this()));
  }

  void on_handshake(beast::error_code ec) {
    if (ec) {
      spdlog::info("api: TLS handshake with {} failed: {}", peer_, ec.message());
      return;  // the socket closes when the session dies
    }
    auto cn = peer_common_name(stream_.native_handle());
    if (!cn) {
      spdlog::warn("api: {} presented no usable certificate CN; closing", peer_);
      do_close();
      return;
    }
    caller_ = std::move(*cn);
    spdlog::debug("api: {} authenticated as SAE \"{}\"", peer_, caller_);
    do_read();
  }

  // The header first: a client that sent "Expect: 100-continue" waits for an interim
  // "100 Continue" before it sends the body (curl for a second, others for good).
  void do_read() {
    head_ = false;
    parser_.emplace();
    parser_->body_limit(kBodyLimit);
    beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&Session::on_header, shared_from_this()));
  }

  void on_header(beast::error_code ec, std::size_t) {
    if (!ec) {
      // A request has begun: from here it counts as in flight, so a shutdown waits for its
      // body and answers it. One whose header comes after the stop is refused (503).
      count_request();
      after_stop_ = state_->stopping.load();
      head_ = parser_->get().method() == http::verb::head;
    }
    if (ec || parser_->is_done()) {
      on_read(ec, 0);
      return;
    }
    const auto& header = parser_->get();
    if (header.version() < 11 || !beast::iequals(header[http::field::expect], "100-continue")) {
      read_body();
      return;
    }
    auto cont = std::make_shared<http::response<http::empty_body>>(http::status::continue_, 11);
    http::async_write(stream_, *cont,
                      [self = shared_from_this(), cont](beast::error_code wec, std::size_t) {
                        if (wec) {
                          spdlog::debug("api: write 100 Continue: {}", wec.message());
                          self->uncount_request();
                          return;
                        }
                        self->read_body();
                      });
  }

  void read_body() {
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&Session::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream) {
      uncount_request();
      do_close();
      return;
    }
    if (ec == http::error::body_limit) {
      count_request();
      unread_request_ = true;
      write(HttpReply{error_response(400, "request body too large")}, false);
      return;
    }
    if (ec) {
      if (ec != beast::error::timeout && ec != asio::ssl::error::stream_truncated) {
        spdlog::debug("api: read from {}: {}", peer_, ec.message());
      }
      if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
        count_request();
        unread_request_ = true;
        write(HttpReply{error_response(400, "malformed HTTP request")}, false);
        return;
      }
      uncount_request();  // cut off, timed out: nobody to answer
      return;
    }
    http::request<http::string_body> req = parser_->release();
    ApiRequest api{std::string(req.method_string()), std::string(req.target()),
                   std::move(req.body())};
    const bool keep_alive = req.keep_alive();
    spdlog::debug("api: {} {} {}", caller_, api.method, api.target);
    count_request();
    if (after_stop_) {
      // Begun after the stop: answered here, and the connection closed.
      write(HttpReply{error_response(503, "the KME is shutting down")}, false);
      return;
    }
    // On this I/O thread, where the handler may not block: what has to wait comes back
    // deferred.
    api.may_wait = false;
    api.may_defer = true;
    respond(call_handler(api), keep_alive);
  }

  // Writes the reply on our strand (at once when called on it), from any thread; a
  // deferred one once it completes.
  void respond(HttpReply reply, bool keep_alive) {
    if (reply.deferred) {
      auto deferred = std::move(reply.deferred);
      deferred([self = shared_from_this(), keep_alive](HttpReply done) {
        done.deferred = nullptr;  // a reply is deferred once
        self->respond(std::move(done), keep_alive);
      });
      return;
    }
    // Held so that a reply whose handler never runs (the I/O context stopped at shutdown)
    // is cleansed all the same.
    auto held = hold_reply(std::move(reply));
    asio::dispatch(stream_.get_executor(), [self = shared_from_this(), held, keep_alive]() {
      self->write(std::move(*held), keep_alive);
    });
  }

  HttpReply call_handler(const ApiRequest& api) {
    try {
      return handler_(caller_, api);
    } catch (const std::exception& e) {
      return HttpReply{error_response(503, fmt::format("internal error: {}", e.what()))};
    }
  }

  // Writes the reply of one request counted in in_flight (decremented once written).
  void write(HttpReply reply, bool keep_alive) {
    // Responses may carry key material: cleansed before freed, written or not.
    std::shared_ptr<http::response<http::string_body>> res(
        new http::response<http::string_body>(), [](http::response<http::string_body>* r) {
          OPENSSL_cleanse(r->body().data(), r->body().size());
          delete r;
        });
    res->version(11);
    res->result(reply.api.status);
    res->set(http::field::server, "qkd-kms");
    if (!reply.api.body.empty()) {
      res->set(http::field::content_type, reply.content_type);
    }
    if (reply.api.retry_after_s > 0) {
      res->set(http::field::retry_after, std::to_string(reply.api.retry_after_s));
    }
    res->body() = std::move(reply.api.body);
    res->keep_alive(keep_alive);
    res->prepare_payload();
    if (head_) {
      drop_body_of_head(*res);
    }
    spdlog::debug("api: {} <- {}", caller_.empty() ? peer_ : caller_, reply.api.status);
    beast::get_lowest_layer(stream_).expires_after(kWriteTimeout);
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, std::size_t) {
                        self->uncount_request();
                        if (ec) {
                          spdlog::debug("api: write: {}", ec.message());
                          return;
                        }
                        if (!res->keep_alive()) {
                          if (self->unread_request_) {
                            self->drain_then_close();
                          } else {
                            self->do_close();
                          }
                          return;
                        }
                        self->do_read();
                      });
  }

  // in_flight counts requests from their header to their answer's last byte, so that a
  // shutdown lets them finish (Kme::stop()). Called on the session's own chain only.
  void count_request() {
    if (!counted_) {
      counted_ = true;
      state_->in_flight.fetch_add(1);
    }
  }
  void uncount_request() {
    if (counted_) {
      counted_ = false;
      state_->in_flight.fetch_sub(1);
    }
  }

  void do_close() {
    beast::get_lowest_layer(stream_).expires_after(kShutdownTimeout);
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) {});
  }

  // A lingering close: the answer went out before the request was read to its end (a body
  // over the limit, a malformed request), so the client may still be sending it. Closing
  // now would make the kernel reset the connection, and a client still writing would meet
  // the reset ("broken pipe") instead of reading the answer. So what it sends is read and
  // dropped until it closes, for at most kDrainTimeout and kDrainLimit bytes, then closed.
  void drain_then_close(std::size_t drained = 0) {
    if (drained == 0) {
      beast::get_lowest_layer(stream_).expires_after(kDrainTimeout);
      drain_.resize(16 * 1024);
    }
    if (drained >= kDrainLimit) {
      do_close();
      return;
    }
    stream_.async_read_some(asio::buffer(drain_),
                            [self = shared_from_this(), drained](beast::error_code ec,
                                                                 std::size_t n) {
                              if (ec) {  // the client closed, or the time is up
                                self->do_close();
                                return;
                              }
                              self->drain_then_close(drained + n);
                            });
  }

  beast::ssl_stream<beast::tcp_stream> stream_;
  HttpsServer::Handler handler_;
  std::shared_ptr<ServerState> state_;  // shared: a session may outlive the server
  AcceptLoop::Slot slot_;  // counts this connection against the listener's limit
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string peer_;
  std::string caller_;
  bool unread_request_ = false;  // answered before the request was read to its end
  bool counted_ = false;         // the request in progress is counted in in_flight
  bool after_stop_ = false;      // its header came after HttpsServer::stop()
  bool head_ = false;            // the request being answered is a HEAD
  std::vector<char> drain_;      // what drain_then_close() drops
};

}  // namespace

std::shared_ptr<HttpReply> hold_reply(HttpReply reply) {
  return {new HttpReply(std::move(reply)), [](HttpReply* r) {
            OPENSSL_cleanse(r->api.body.data(), r->api.body.size());
            delete r;
          }};
}

struct HttpsServer::Impl : std::enable_shared_from_this<HttpsServer::Impl> {
  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> ctx, Handler h)
      : ioc(io), tls(std::move(ctx)), handler(std::move(h)) {}

  void on_socket(tcp::socket&& s, AcceptLoop::Slot slot) {
    // Responses are small and latency-bound: without TCP_NODELAY a response written
    // in two TLS records can wait for the client's delayed ACK (40 ms on Linux).
    beast::error_code nodelay_ec;
    s.set_option(tcp::no_delay(true), nodelay_ec);
    std::make_shared<Session>(std::move(s), *tls, handler, state, std::move(slot))
        ->run();
  }

  asio::io_context& ioc;
  std::shared_ptr<asio::ssl::context> tls;
  Handler handler;
  std::shared_ptr<AcceptLoop> accept;
  std::shared_ptr<ServerState> state = std::make_shared<ServerState>();
};
HttpsServer::HttpsServer(asio::io_context& ioc, std::shared_ptr<asio::ssl::context> tls,
                         Handler handler)
    : impl_(std::make_shared<Impl>(ioc, std::move(tls), std::move(handler))) {}

HttpsServer::~HttpsServer() { stop(); }

qkd::core::Result<std::uint16_t> open_acceptor(tcp::acceptor& a, const std::string& host,
                                               std::uint16_t port, const std::string& what) {
  beast::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("{}: bad address \"{}\": {}", what, host, ec.message()));
  }
  const tcp::endpoint ep(addr, port);
  a.open(ep.protocol(), ec);
  if (!ec) {
    a.set_option(asio::socket_base::reuse_address(true), ec);
  }
  if (!ec) {
    a.bind(ep, ec);
  }
  if (!ec) {
    a.listen(asio::socket_base::max_listen_connections, ec);
  }
  if (ec) {
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("{} {}:{}: {}", what, host, port, ec.message()));
  }
  return a.local_endpoint().port();
}

void RateLimitedWarning::warn(std::string_view message) {
  std::uint64_t suppressed = 0;
  {
    const std::lock_guard lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    if (last_ && now - *last_ < every_) {
      ++suppressed_;
      return;
    }
    last_ = now;
    suppressed = std::exchange(suppressed_, 0);
  }
  if (suppressed == 0) {
    spdlog::warn("{}", message);
  } else {
    spdlog::warn("{} (and {} more like it not logged)", message, suppressed);
  }
}

AcceptLoop::AcceptLoop(asio::io_context& ioc, std::string what, std::size_t max_open,
                       OnSocket on_socket)
    : ioc_(ioc),
      what_(std::move(what)),
      on_socket_(std::move(on_socket)),
      acceptor_(asio::make_strand(ioc)),
      retry_(acceptor_.get_executor()),
      max_open_(max_open),
      open_(std::make_shared<std::atomic<std::size_t>>(0)) {}

qkd::core::Result<std::uint16_t> AcceptLoop::listen(const std::string& host, std::uint16_t port,
                                                    const std::string& field) {
  auto bound = open_acceptor(acceptor_, host, port, field);
  if (bound.ok()) {
    asio::dispatch(acceptor_.get_executor(), [self = shared_from_this()]() { self->do_accept(); });
  }
  return bound;
}

void AcceptLoop::stop() {
  asio::dispatch(acceptor_.get_executor(), [self = shared_from_this()]() {
    self->stopped_ = true;
    beast::error_code ignored;
    self->acceptor_.close(ignored);
    self->retry_.cancel();
  });
}

void AcceptLoop::do_accept() {
  acceptor_.async_accept(
      asio::make_strand(ioc_), [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
        if (self->stopped_ || ec == asio::error::operation_aborted) {
          return;
        }
        if (ec) {
          self->failed_.warn(fmt::format("{}: accept: {} (retrying every {} ms)", self->what_,
                                         ec.message(), kRetryDelay.count()));
          self->retry_.expires_after(kRetryDelay);
          self->retry_.async_wait([self](beast::error_code tec) {
            if (!tec && !self->stopped_) {
              self->do_accept();
            }
          });
          return;
        }
        if (self->open_->load() >= self->max_open_) {
          self->refused_.warn(fmt::format(
              "{}: {} connections open, the limit: new ones are closed at once", self->what_,
              self->max_open_));
          beast::error_code ignored;
          s.close(ignored);
        } else {
          // Counts from its making to the last copy's end.
          class Counted {
           public:
            explicit Counted(std::shared_ptr<std::atomic<std::size_t>> open)
                : open_(std::move(open)) {
              open_->fetch_add(1);
            }
            ~Counted() { open_->fetch_sub(1); }
            Counted(const Counted&) = delete;
            Counted& operator=(const Counted&) = delete;

           private:
            std::shared_ptr<std::atomic<std::size_t>> open_;
          };
          self->on_socket_(std::move(s), std::make_shared<Counted>(self->open_));
        }
        self->do_accept();
      });
}

qkd::core::Result<std::uint16_t> HttpsServer::listen(const HostPort& where) {
  impl_->accept = std::make_shared<AcceptLoop>(
      impl_->ioc, "api", session_limit(),
      [weak = std::weak_ptr<Impl>(impl_)](tcp::socket&& s, AcceptLoop::Slot slot) {
        if (auto impl = weak.lock()) {
          impl->on_socket(std::move(s), std::move(slot));
        }
      });
  return impl_->accept->listen(where.host, where.port, "api.listen");
}

void HttpsServer::stop() {
  impl_->state->stopping.store(true);
  if (impl_->accept) {
    impl_->accept->stop();
  }
}

std::size_t HttpsServer::session_limit() {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) {
    return kMaxSessions;
  }
  return std::clamp<std::size_t>(static_cast<std::size_t>(lim.rlim_cur / 2), 1, kMaxSessions);
}

std::size_t HttpsServer::in_flight() const { return impl_->state->in_flight.load(); }

// --- the plain-HTTP metrics listener ---

namespace {

class PlainSession : public std::enable_shared_from_this<PlainSession> {
 public:
  PlainSession(tcp::socket&& socket, AcceptLoop::Slot slot, std::function<std::string()> render,
               std::function<ApiResponse()> health)
      : stream_(std::move(socket)),
        slot_(std::move(slot)),
        render_(std::move(render)),
        health_(std::move(health)) {}

  void run() {
    asio::dispatch(stream_.get_executor(),
                   beast::bind_front_handler(&PlainSession::do_read, shared_from_this()));
  }

 private:
  void do_read() {
    parser_.emplace();
    parser_->body_limit(kBodyLimit);
    stream_.expires_after(kReadTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&PlainSession::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec) {
      beast::error_code ignored;
      stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
      return;
    }
    const auto& req = parser_->get();
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(11);
    res->set(http::field::server, "qkd-kms");
    const std::string_view target(req.target().data(), req.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    if (path != "/metrics" && path != "/health") {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain");
      res->body() = "not found (only GET /metrics and GET /health here)\n";
    } else if (req.method() != http::verb::get && req.method() != http::verb::head) {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET, HEAD");
      res->set(http::field::content_type, "text/plain");
      res->body() = "only GET\n";
    } else if (path == "/health") {
      ApiResponse h = health_();
      res->result(static_cast<http::status>(h.status));
      res->set(http::field::content_type, "application/json");
      res->body() = std::move(h.body);
    } else {
      res->result(http::status::ok);
      res->set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res->body() = render_();
    }
    res->keep_alive(req.keep_alive());
    res->prepare_payload();
    if (req.method() == http::verb::head) {
      drop_body_of_head(*res);
    }
    stream_.expires_after(kWriteTimeout);
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code wec, std::size_t) {
                        if (wec || !res->keep_alive()) {
                          beast::error_code ignored;
                          self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                          return;
                        }
                        self->do_read();
                      });
  }

  beast::tcp_stream stream_;
  AcceptLoop::Slot slot_;  // counts this connection against the listener's limit
  std::function<std::string()> render_;
  std::function<ApiResponse()> health_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
};

}  // namespace

struct MetricsHttpServer::Impl {
  Impl(asio::io_context& io, std::function<std::string()> r, std::function<ApiResponse()> h)
      : ioc(io), render(std::move(r)), health(std::move(h)) {}

  asio::io_context& ioc;
  std::function<std::string()> render;
  std::function<ApiResponse()> health;
  std::shared_ptr<AcceptLoop> accept;
};
MetricsHttpServer::MetricsHttpServer(asio::io_context& ioc, std::function<std::string()> render,
                                     std::function<ApiResponse()> health)
    : impl_(std::make_shared<Impl>(ioc, std::move(render), std::move(health))) {}

MetricsHttpServer::~MetricsHttpServer() { stop(); }

qkd::core::Result<std::uint16_t> MetricsHttpServer::listen(const HostPort& where) {
  impl_->accept = std::make_shared<AcceptLoop>(
      impl_->ioc, "metrics", kMaxConnections,
      [weak = std::weak_ptr<Impl>(impl_)](tcp::socket&& s, AcceptLoop::Slot slot) {
        if (auto impl = weak.lock()) {
          std::make_shared<PlainSession>(std::move(s), std::move(slot), impl->render,
                                         impl->health)
              ->run();
        }
      });
  return impl_->accept->listen(where.host, where.port, "metrics.listen");
}

void MetricsHttpServer::stop() {
  if (impl_->accept) {
    impl_->accept->stop();
  }
}

}  // namespace qkd::kms
