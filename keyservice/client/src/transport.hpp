// One TLS connection to a KME over a non-blocking socket; every operation bounded by a
// deadline (poll). Private to the client library.
#pragma once

#include <openssl/ssl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "qkd/core/result.hpp"
#include "qkd/etsi/client_detail.hpp"

namespace qkd::etsi::internal {

using Clock = std::chrono::steady_clock;

// Errors: kUnavailable (cannot connect / TLS failure; message is the parenthesised cause,
// e.g. "connection refused"), kTimeout (deadline passed), kClosed (the peer closed or reset
// the connection: a kept-alive connection may be retried once).
class Connection {
 public:
  // libssl 3.0 clears the calling thread's whole OpenSSL error queue in the handshake, and
  // again in the first read_some() that meets the KME's session tickets: the client does
  // both on a thread of its own, never on the application's.
  [[nodiscard]] static qkd::core::Result<std::unique_ptr<Connection>> open(
      SSL_CTX* ctx, const detail::Url& url, Clock::time_point deadline);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  [[nodiscard]] qkd::core::Status write_all(std::string_view data, Clock::time_point deadline);
  // Bytes read (> 0), or 0 when the peer closed the connection cleanly.
  [[nodiscard]] qkd::core::Result<std::size_t> read_some(std::span<std::uint8_t> buf,
                                                         Clock::time_point deadline);
  // An idle kept-alive connection that became readable was closed by the peer (or got
  // unsolicited bytes): either way it must not be reused.
  [[nodiscard]] bool usable_when_idle() const;

 private:
  Connection(int fd, SSL* ssl) : fd_(fd), ssl_(ssl) {}
  // Waits for the SSL object's wish (read/write) or the deadline.
  [[nodiscard]] qkd::core::Status wait(int ssl_error, Clock::time_point deadline) const;

  int fd_ = -1;
  SSL* ssl_ = nullptr;
};

}  // namespace qkd::etsi::internal
