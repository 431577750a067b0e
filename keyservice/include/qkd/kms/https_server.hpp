// The HTTPS transport of the ETSI 014 API (Boost.Beast, asynchronous, mutual TLS).
//
// One session per connection, each on its own strand; a timeout before every operation
// (handshake 10 s, reading a request 30 s, writing 30 s, shutdown 5 s); a 64 KiB body
// limit; keep-alive. The handler runs on the I/O thread that read the request, with
// ApiRequest::may_wait = false and may_defer = true, and must not block: a reply that has
// to wait (for a durable write, for a notice from the peer KME) comes back deferred
// (HttpReply::deferred) and is written when it completes, while the thread goes on with
// other connections. No hand-off to another thread: each wakes a sleeping thread, which
// costs more than the handler itself.
//
// Connections: at most session_limit() open at once (TLS handshake or idle keep-alive
// included); one accepted beyond that is closed at once, with a warning at most once a
// second. The limit keeps clients (authenticated or not: the handshake gives them 10 s) from
// taking all of the process's file descriptors, which the store and the link need too.
//
// Shutdown: stop() closes the listener; in_flight() counts requests read whose response is
// not written yet, so the owner can wait for them before stopping the I/O threads.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

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

// A warning logged at most once per `every`; the ones not logged are counted, and the count
// goes into the next one logged ("... (and 1234 more like it not logged)"). Thread-safe.
class RateLimitedWarning {
 public:
  explicit RateLimitedWarning(std::chrono::steady_clock::duration every = std::chrono::seconds(1))
      : every_(every) {}
  void warn(std::string_view message);

 private:
  std::chrono::steady_clock::duration every_;
  std::mutex mutex_;
  std::optional<std::chrono::steady_clock::time_point> last_;
  std::uint64_t suppressed_ = 0;
};

// A listener's accept loop: accepts until stop(), handing each connection (on its own
// strand) to on_socket. A failed accept (out of file descriptors, buffers or memory; a
// connection reset while in the backlog) is retried after kRetryDelay, never at once: the
// connection that failed stays in the backlog, so an immediate retry fails the same way and
// the loop would spin, a warning each time. That warning ("<what>: accept: <error>") is
// rate-limited (RateLimitedWarning, once a second).
//
// At most `max_open` connections are held at once: each comes with a Slot, and counts until
// the last copy of its Slot is gone. Beyond that a new connection is closed at once (what it
// frees is worth more than what an answer would tell), with a rate-limited warning.
class AcceptLoop : public std::enable_shared_from_this<AcceptLoop> {
 public:
  static constexpr std::chrono::milliseconds kRetryDelay{100};
  using Slot = std::shared_ptr<void>;
  using OnSocket = std::function<void(boost::asio::ip::tcp::socket&&, Slot)>;

  // `what` prefixes the log lines ("api", "metrics", "link").
  AcceptLoop(boost::asio::io_context& ioc, std::string what, std::size_t max_open,
             OnSocket on_socket);
  // open_acceptor(host, port, field), then accepting; returns the bound port.
  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const std::string& host,
                                                        std::uint16_t port,
                                                        const std::string& field);
  // Closes the listener (asynchronously, on its strand); no connection is handed over after.
  void stop();

 private:
  void do_accept();

  boost::asio::io_context& ioc_;
  std::string what_;
  OnSocket on_socket_;
  boost::asio::ip::tcp::acceptor acceptor_;  // on a strand, with retry_
  boost::asio::steady_timer retry_;
  RateLimitedWarning failed_;
  RateLimitedWarning refused_;
  std::size_t max_open_;
  std::shared_ptr<std::atomic<std::size_t>> open_;  // connections whose Slot is alive
  bool stopped_ = false;                            // on the strand
};

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
  // Called on an I/O thread; must not block (see above).
  using Handler = std::function<HttpReply(const std::string& caller, const ApiRequest&)>;

  HttpsServer(boost::asio::io_context& ioc, std::shared_ptr<boost::asio::ssl::context> tls,
              Handler handler);
  ~HttpsServer();
  HttpsServer(const HttpsServer&) = delete;
  HttpsServer& operator=(const HttpsServer&) = delete;

  // Binds and starts accepting; returns the bound port (useful with port 0).
  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const HostPort& where);
  // Stops accepting; requests whose header came before finish and are answered; a request
  // begun from then on gets 503 "the KME is shutting down" and its connection closes.
  void stop();
  // Requests begun (header read) whose response has not been written (or failed) yet.
  [[nodiscard]] std::size_t in_flight() const;

  // Connections open at once (AcceptLoop's max_open): half the soft RLIMIT_NOFILE (read by
  // listen()), at most kMaxSessions.
  static constexpr std::size_t kMaxSessions = 1000;
  [[nodiscard]] static std::size_t session_limit();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// A plain-HTTP listener (no TLS, meant for a loopback address) answering GET /metrics with
// render(), GET /health with health() (its status and JSON body; for probes that hold no SAE
// certificate) and 404 to anything else. Same timeouts and body limit as the HTTPS server;
// at most kMaxConnections connections at once.
class MetricsHttpServer {
 public:
  static constexpr std::size_t kMaxConnections = 32;

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
