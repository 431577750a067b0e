// A tiny synchronous HTTPS client for raw protocol tests against qkd-kms.
//
// Sends any method/target/body with a chosen client certificate (or none) and returns the
// status and body as they came, so tests can check malformed requests and exact errors.
// One TLS connection per request; every request is bounded by `timeout`. No Boost types
// in this header.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"

namespace qkd::test {

// PEM file paths. An empty cert_file means "present no client certificate".
struct TlsIdentity {
  std::string cert_file;
  std::string key_file;
  std::string ca_file;  // CA that must have signed the server's certificate
};

struct HttpResponse {
  unsigned status = 0;
  std::string body;
  std::string content_type;
  std::string retry_after;  // the Retry-After header, if any
  // The body parsed as JSON; a discarded value (is_discarded()) if it is not JSON.
  [[nodiscard]] nlohmann::json json() const;
};

class HttpsTestClient {
 public:
  HttpsTestClient(std::string host, std::uint16_t port, TlsIdentity identity,
                  std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // Fails (kUnavailable) when the connection or the TLS handshake fails, e.g. when the
  // server refuses a client without a certificate; kTimeout when the bound is hit.
  [[nodiscard]] qkd::core::Result<HttpResponse> request(
      std::string_view method, std::string_view target, std::string_view body = {},
      std::string_view content_type = "application/json") const;
  [[nodiscard]] qkd::core::Result<HttpResponse> get(std::string_view target) const {
    return request("GET", target);
  }
  [[nodiscard]] qkd::core::Result<HttpResponse> post(std::string_view target,
                                                     std::string_view body) const {
    return request("POST", target, body);
  }
  // A raw exchange over one TLS connection, for what request() cannot say: for each step,
  // sends `send` as it is, then reads until what came back so far contains `until` (the
  // last step may leave it empty: until the server closes), then runs `then` if set (on
  // the client's thread, before the next step). Everything read; kTimeout with what came so
  // far when the bound (for the whole exchange) is hit first.
  struct Step {
    std::string send;
    std::string until;
    std::function<void()> then = {};
  };
  [[nodiscard]] qkd::core::Result<std::string> converse(const std::vector<Step>& steps) const;

  // Offer TLS 1.2 at most (an SAE without TLS 1.3); the default offers what OpenSSL does.
  HttpsTestClient& tls12_only() {
    tls12_only_ = true;
    return *this;
  }

 private:
  std::string host_;
  std::uint16_t port_;
  TlsIdentity identity_;
  std::chrono::milliseconds timeout_;
  bool tls12_only_ = false;
};

}  // namespace qkd::test
