// Beast async HTTPS server: listener -> session per connection (on a strand).
#include "qkd/kms/https_server.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

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

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, asio::ssl::context& ctx, asio::thread_pool& workers,
          const HttpsServer::Handler& handler)
      : stream_(std::move(socket), ctx), workers_(workers), handler_(handler) {
    beast::error_code ec;
    auto ep = beast::get_lowest_layer(stream_).socket().remote_endpoint(ec);
    peer_ = ec ? std::string("?") : fmt::format("{}:{}", ep.address().to_string(), ep.port());
  }

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

  void do_read() {
    parser_.emplace();
    parser_->body_limit(kBodyLimit);
    beast::get_lowest_layer(stream_).expires_after(kReadTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&Session::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream) {
      do_close();
      return;
    }
    if (ec == http::error::body_limit) {
      write(error_response(400, "request body too large"), false);
      return;
    }
    if (ec) {
      if (ec != beast::error::timeout && ec != asio::ssl::error::stream_truncated) {
        spdlog::debug("api: read from {}: {}", peer_, ec.message());
      }
      if (ec == beast::error::timeout || ec == asio::ssl::error::stream_truncated ||
          ec == asio::error::eof || ec == asio::error::connection_reset) {
        return;
      }
      if (ec.category() == http::make_error_code(http::error::bad_target).category()) {
        write(error_response(400, "malformed HTTP request"), false);
      }
      return;
    }
    http::request<http::string_body> req = parser_->release();
    ApiRequest api{std::string(req.method_string()), std::string(req.target()),
                   std::move(req.body())};
    const bool keep_alive = req.keep_alive();
    spdlog::info("api: {} {} {}", caller_, api.method, api.target);
    // Run the handler on the worker pool (it may wait), then write on our strand.
    asio::post(workers_, [self = shared_from_this(), api = std::move(api), keep_alive]() {
      ApiResponse resp;
      try {
        resp = self->handler_(self->caller_, api);
      } catch (const std::exception& e) {
        resp = error_response(503, fmt::format("internal error: {}", e.what()));
      }
      asio::post(self->stream_.get_executor(),
                 [self, resp = std::move(resp), keep_alive]() mutable {
                   self->write(std::move(resp), keep_alive);
                 });
    });
  }

  void write(ApiResponse resp, bool keep_alive) {
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(11);
    res->result(resp.status);
    res->set(http::field::server, "qkd-kms");
    if (!resp.body.empty()) {
      res->set(http::field::content_type, "application/json");
    }
    res->body() = std::move(resp.body);
    res->keep_alive(keep_alive);
    res->prepare_payload();
    spdlog::info("api: {} <- {}", caller_.empty() ? peer_ : caller_, resp.status);
    beast::get_lowest_layer(stream_).expires_after(kWriteTimeout);
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, std::size_t) {
                        // Responses may carry key material: cleanse before freeing.
                        OPENSSL_cleanse(res->body().data(), res->body().size());
                        if (ec) {
                          spdlog::debug("api: write: {}", ec.message());
                          return;
                        }
                        if (!res->keep_alive()) {
                          self->do_close();
                          return;
                        }
                        self->do_read();
                      });
  }

  void do_close() {
    beast::get_lowest_layer(stream_).expires_after(kShutdownTimeout);
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) {});
  }

  beast::ssl_stream<beast::tcp_stream> stream_;
  asio::thread_pool& workers_;
  HttpsServer::Handler handler_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string peer_;
  std::string caller_;
};

}  // namespace

struct HttpsServer::Impl : std::enable_shared_from_this<HttpsServer::Impl> {
  Impl(asio::io_context& io, std::shared_ptr<asio::ssl::context> ctx, asio::thread_pool& w,
       Handler h)
      : ioc(io), tls(std::move(ctx)), workers(w), handler(std::move(h)), acceptor(io) {}

  void do_accept() {
    acceptor.async_accept(
        asio::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
          if (ec) {
            if (ec != asio::error::operation_aborted) {
              spdlog::warn("api: accept: {}", ec.message());
              self->do_accept();
            }
            return;
          }
          std::make_shared<Session>(std::move(s), *self->tls, self->workers, self->handler)->run();
          self->do_accept();
        });
  }

  asio::io_context& ioc;
  std::shared_ptr<asio::ssl::context> tls;
  asio::thread_pool& workers;
  Handler handler;
  tcp::acceptor acceptor;
};

HttpsServer::HttpsServer(asio::io_context& ioc, std::shared_ptr<asio::ssl::context> tls,
                         asio::thread_pool& workers, Handler handler)
    : impl_(std::make_shared<Impl>(ioc, std::move(tls), workers, std::move(handler))) {}

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

qkd::core::Result<std::uint16_t> HttpsServer::listen(const HostPort& where) {
  auto port = open_acceptor(impl_->acceptor, where.host, where.port, "api.listen");
  if (port.ok()) {
    impl_->do_accept();
  }
  return port;
}

void HttpsServer::stop() {
  asio::post(impl_->ioc, [impl = impl_]() {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

}  // namespace qkd::kms
