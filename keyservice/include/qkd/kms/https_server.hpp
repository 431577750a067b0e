// The HTTPS transport of the ETSI 014 API (Boost.Beast, asynchronous, mutual TLS).
//
// One session per connection, each on its own strand; a timeout before every operation
// (handshake 10 s, reading a request 30 s, writing 30 s, shutdown 5 s); a 64 KiB body
// limit; keep-alive. Handlers run on a separate worker pool (dec_keys may wait for a
// notice from the peer KME), and the response is written back on the session's strand.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <functional>
#include <memory>
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

class HttpsServer {
 public:
  using Handler = std::function<ApiResponse(const std::string& caller, const ApiRequest&)>;

  HttpsServer(boost::asio::io_context& ioc, std::shared_ptr<boost::asio::ssl::context> tls,
              boost::asio::thread_pool& workers, Handler handler);
  ~HttpsServer();
  HttpsServer(const HttpsServer&) = delete;
  HttpsServer& operator=(const HttpsServer&) = delete;

  // Binds and starts accepting; returns the bound port (useful with port 0).
  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const HostPort& where);
  // Stops accepting; sessions in progress finish on their own timeouts.
  void stop();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace qkd::kms
