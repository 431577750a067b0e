// The HTTPS transport of the ETSI 014 API (Boost.Beast, asynchronous, mutual TLS).
//
// One session per connection, each on its own strand; a timeout before every operation
// (handshake 10 s, reading a request 30 s, writing 30 s, shutdown 5 s); a 64 KiB body
// limit; keep-alive. A handler first runs on the I/O thread that read the request, with
// ApiRequest::may_wait = false: most requests are answered there, without a hand-off to
// another thread (each hand-off wakes a sleeping thread, which costs more than the handler
// itself). A handler that would have to wait (dec_keys for a notice from the peer KME)
// returns std::nullopt instead; the request then runs on a separate worker pool with
// may_wait = true, and the response is written back on the session's strand. Requests carry
// ApiRequest::may_defer = true: a reply that has to wait for a durable write comes back
// deferred (HttpReply::deferred) and is written when that completes, while the thread goes
// on with other connections.
//
// Shutdown: stop() closes the listener; in_flight() counts requests read whose response is
// not written yet, so the owner can wait for them before stopping the I/O threads.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "qkd/core/result.hpp"
#include "qkd/kms/api.hpp"
#include "qkd/kms/config.hpp"

namespace qkd::kms {

// Opens, binds (SO_REUSEADDR) and listens on host:port (a numeric address; port 0 = any);
// returns the bound port. `what` names the config field in error messages.
[[nodiscard]] qkd::core::Result<std::uint16_t> open_acceptor(boost::asio::ip::tcp::acceptor& a,
                                                             const std::string& host,
                                                             std::uint16_t port,
                                                             const std::string& what);

// What a handler returns: the API response plus transport details.
struct HttpReply {
  ApiResponse api;
  std::string content_type = "application/json";  // used when the body is not empty
  // Set when the reply may leave only once something completes (the durable write of the
  // keys it carries); the other fields are then not sent. The server calls it once, with
  // `send`, which the handler's side calls once, from any thread, with the reply to write.
  using Send = std::function<void(HttpReply)>;
  std::function<void(Send send)> deferred{};
};

// `reply` held on the heap; its body (key material) is cleansed when the last owner lets go,
// whether or not it was sent.
[[nodiscard]] std::shared_ptr<HttpReply> hold_reply(HttpReply reply);

class HttpsServer {
 public:
  // Returns std::nullopt only when the request's may_wait is false and answering it needs a
  // wait; nothing may have been changed then.
  using Handler =
      std::function<std::optional<HttpReply>(const std::string& caller, const ApiRequest&)>;

  HttpsServer(boost::asio::io_context& ioc, std::shared_ptr<boost::asio::ssl::context> tls,
              boost::asio::thread_pool& workers, Handler handler);
  ~HttpsServer();
  HttpsServer(const HttpsServer&) = delete;
  HttpsServer& operator=(const HttpsServer&) = delete;

  // Binds and starts accepting; returns the bound port (useful with port 0).
  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const HostPort& where);
  // Stops accepting; requests already handed to a handler finish and are answered; a
  // request read from then on gets 503 "the KME is shutting down" and its connection closes.
  void stop();
  // Requests read whose response has not been written (or failed) yet.
  [[nodiscard]] std::size_t in_flight() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// A plain-HTTP listener (no TLS, meant for a loopback address) answering GET /metrics with
// render(), GET /health with health() (its status and JSON body; for probes that hold no SAE
// certificate) and
// 404 to anything else. Same timeouts and body limit as the HTTPS server.
class MetricsHttpServer {
 public:
  MetricsHttpServer(boost::asio::io_context& ioc, std::function<std::string()> render,
                    std::function<ApiResponse()> health);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const HostPort& where);
  void stop();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace qkd::kms
