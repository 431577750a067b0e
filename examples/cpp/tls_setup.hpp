// What the two Beast examples share: loading openssl.cnf, their TLS contexts, and the
// "--flag value" command lines. Nothing here knows of QKD: the key exchange groups (and the
// providers behind them) come from openssl.cnf, as for any OpenSSL application.
#pragma once

#include <boost/asio/ssl.hpp>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include "tls_report.hpp"

namespace example {

namespace ssl = boost::asio::ssl;

// A TLS context for `method` (tls_client or tls_server: never tlsv12, which pins TLS 1.2)
// with TLS 1.3 as the minimum, so that a TLS 1.3-only group such as one from a provider can
// be negotiated. openssl.cnf must be loaded first (init_openssl): libssl applies its
// [system_default] section to every new context.
inline ssl::context tls13_context(ssl::context::method method) {
  if (!init_openssl()) {
    throw std::runtime_error("OpenSSL initialisation (openssl.cnf) failed");
  }
  ssl::context ctx(method);
  if (SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_3_VERSION) != 1) {
    throw std::runtime_error("cannot set TLS 1.3 as the minimum version");
  }
  return ctx;
}

// Client: verifies the server's certificate chain against `cafile` (host name: per stream).
inline ssl::context client_context(const std::string& cafile) {
  ssl::context ctx = tls13_context(ssl::context::tls_client);
  ctx.load_verify_file(cafile);
  ctx.set_verify_mode(ssl::verify_peer);
  return ctx;
}

// Server: presents `cert` (a PEM chain) with `key`.
inline ssl::context server_context(const std::string& cert, const std::string& key) {
  ssl::context ctx = tls13_context(ssl::context::tls_server);
  ctx.use_certificate_chain_file(cert);
  ctx.use_private_key_file(key, ssl::context::pem);
  return ctx;
}

// "--name value" pairs into the strings given; false on an unknown flag or a missing value.
inline bool parse_flags(int argc, char** argv,
                        std::initializer_list<std::pair<std::string_view, std::string*>> flags) {
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) {
      return false;
    }
    bool known = false;
    for (const auto& [name, value] : flags) {
      if (argv[i] == name) {
        *value = argv[i + 1];
        known = true;
      }
    }
    if (!known) {
      return false;
    }
  }
  return true;
}

}  // namespace example
