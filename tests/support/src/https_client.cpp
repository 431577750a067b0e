#include "qkd/test/https_client.hpp"

#include <fmt/format.h>
#include <openssl/ssl.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <array>
#include <functional>
#include <memory>
#include <optional>

namespace qkd::test {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using qkd::core::ErrorCode;
using qkd::core::make_error;

nlohmann::json HttpResponse::json() const { return nlohmann::json::parse(body, nullptr, false); }

namespace {

// The client side of the TLS context: the identity's CA, certificate and key.
qkd::core::Status setup(asio::ssl::context& ctx, const TlsIdentity& identity_, bool tls12_only_) {
  if (tls12_only_) {
    SSL_CTX_set_max_proto_version(ctx.native_handle(), TLS1_2_VERSION);
  }
  try {
    if (!identity_.ca_file.empty()) {
      ctx.load_verify_file(identity_.ca_file);
      ctx.set_verify_mode(asio::ssl::verify_peer);
    }
    if (!identity_.cert_file.empty()) {
      ctx.use_certificate_chain_file(identity_.cert_file);
      ctx.use_private_key_file(identity_.key_file, asio::ssl::context::pem);
    }
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInvalidArgument, fmt::format("client TLS setup: {}", e.what()));
  }
  return qkd::core::ok_status();
}

// One connection's I/O context, TLS context (the client's identity) and stream, with SNI
// set; the stream refers to the context, so they live together.
struct ClientTls {
  asio::io_context ioc;
  asio::ssl::context ctx{asio::ssl::context::tls_client};
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream;
};

qkd::core::Result<std::unique_ptr<ClientTls>> client_tls(const TlsIdentity& identity,
                                                         bool tls12_only,
                                                         const std::string& host) {
  auto tls = std::make_unique<ClientTls>();
  if (auto s = setup(tls->ctx, identity, tls12_only); !s.ok()) {
    return s.error();
  }
  tls->stream.emplace(tls->ioc, tls->ctx);
  SSL_set_tlsext_host_name(tls->stream->native_handle(), host.c_str());
  return tls;
}

}  // namespace

HttpsTestClient::HttpsTestClient(std::string host, std::uint16_t port, TlsIdentity identity,
                                 std::chrono::milliseconds timeout)
    : host_(std::move(host)), port_(port), identity_(std::move(identity)), timeout_(timeout) {}

qkd::core::Result<HttpResponse> HttpsTestClient::request(std::string_view method,
                                                         std::string_view target,
                                                         std::string_view body,
                                                         std::string_view content_type) const {
  auto tls = client_tls(identity_, tls12_only_, host_);
  if (!tls.ok()) {
    return tls.error();
  }
  asio::io_context& ioc = (*tls)->ioc;
  beast::ssl_stream<beast::tcp_stream>& stream = *(*tls)->stream;

  const std::string method_s(method);
  http::request<http::string_body> req;
  req.version(11);
  req.target(std::string(target));
  if (const http::verb v = http::string_to_verb(method_s); v != http::verb::unknown) {
    req.method(v);
  } else {
    req.method_string(method_s);
  }
  req.set(http::field::host, host_);
  req.set(http::field::user_agent, "qkd-test");
  if (!body.empty() || method == "POST") {
    req.set(http::field::content_type, std::string(content_type));
    req.body() = std::string(body);
  }
  req.keep_alive(false);
  req.prepare_payload();

  beast::error_code result = asio::error::would_block;
  std::string stage = "connect";
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  tcp::resolver resolver(ioc);
  beast::get_lowest_layer(stream).expires_after(timeout_);
  resolver.async_resolve(
      host_, std::to_string(port_), [&](beast::error_code ec, tcp::resolver::results_type eps) {
        if (ec) {
          result = ec;
          return;
        }
        beast::get_lowest_layer(stream).async_connect(
            eps, [&](beast::error_code ec2, const tcp::endpoint&) {
              if (ec2) {
                result = ec2;
                return;
              }
              stage = "TLS handshake";
              stream.async_handshake(asio::ssl::stream_base::client, [&](beast::error_code ec3) {
                if (ec3) {
                  result = ec3;
                  return;
                }
                stage = "write";
                http::async_write(stream, req, [&](beast::error_code ec4, std::size_t) {
                  if (ec4) {
                    result = ec4;
                    return;
                  }
                  stage = "read";
                  http::async_read(stream, buffer, res,
                                   [&](beast::error_code ec5, std::size_t) { result = ec5; });
                });
              });
            });
      });
  ioc.run_for(timeout_ + std::chrono::seconds(1));
  if (result == asio::error::would_block) {
    return make_error(ErrorCode::kTimeout, fmt::format("{} {}: timed out", method, target));
  }
  if (result) {
    return make_error(
        result == beast::error::timeout ? ErrorCode::kTimeout : ErrorCode::kUnavailable,
        fmt::format("{} {} ({}): {}", method, target, stage, result.message()));
  }
  HttpResponse out;
  out.status = res.result_int();
  out.body = std::move(res.body());
  if (auto it = res.find(http::field::content_type); it != res.end()) {
    out.content_type = std::string(it->value());
  }
  if (auto it = res.find(http::field::retry_after); it != res.end()) {
    out.retry_after = std::string(it->value());
  }
  return out;
}

qkd::core::Result<std::string> HttpsTestClient::converse(const std::vector<Step>& steps) const {
  auto tls = client_tls(identity_, tls12_only_, host_);
  if (!tls.ok()) {
    return tls.error();
  }
  asio::io_context& ioc = (*tls)->ioc;
  beast::ssl_stream<beast::tcp_stream>& stream = *(*tls)->stream;
  beast::error_code result = asio::error::would_block;
  std::string received;
  std::size_t step = 0;
  std::array<char, 4096> chunk{};
  // Sends steps[step].send, then reads until `until` is in what came back.
  std::function<void()> send;
  std::function<void()> read = [&]() {
    const std::string& until = steps[step].until;
    if (!until.empty() && received.find(until) != std::string::npos) {
      if (steps[step].then) {
        steps[step].then();
      }
      if (++step == steps.size()) {
        result = {};
        return;
      }
      send();
      return;
    }
    stream.async_read_some(asio::buffer(chunk), [&](beast::error_code ec, std::size_t n) {
      received.append(chunk.data(), n);
      if (ec) {
        const bool closed = ec == asio::error::eof || ec == asio::ssl::error::stream_truncated;
        result = closed && until.empty() && step + 1 == steps.size() ? beast::error_code{} : ec;
        return;
      }
      read();
    });
  };
  send = [&]() {
    asio::async_write(stream, asio::buffer(steps[step].send),
                      [&](beast::error_code ec, std::size_t) {
                        if (ec) {
                          result = ec;
                          return;
                        }
                        read();
                      });
  };
  beast::get_lowest_layer(stream).expires_after(timeout_);
  beast::get_lowest_layer(stream).async_connect(
      tcp::endpoint(asio::ip::make_address(host_), port_), [&](beast::error_code ec) {
        if (ec) {
          result = ec;
          return;
        }
        stream.async_handshake(asio::ssl::stream_base::client, [&](beast::error_code ec2) {
          if (ec2) {
            result = ec2;
            return;
          }
          if (steps.empty()) {
            result = {};
            return;
          }
          send();
        });
      });
  ioc.run_for(timeout_ + std::chrono::seconds(1));
  if (result == asio::error::would_block || result == beast::error::timeout) {
    return make_error(ErrorCode::kTimeout,
                      fmt::format("step {}: timed out; received so far: {}", step, received));
  }
  if (result) {
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("step {}: {}; received so far: {}", step, result.message(),
                                  received));
  }
  return received;
}

}  // namespace qkd::test
