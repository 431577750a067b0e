// Test helpers: a demo PKI, provider config files, one OSSL_LIB_CTX per TLS side, an
// in-process TLS handshake over a BIO pair, and error-queue capture.
#pragma once

#include <openssl/ssl.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace qkd::test_prov {

struct LibCtxDeleter {
  void operator()(OSSL_LIB_CTX* c) const { OSSL_LIB_CTX_free(c); }
};
struct SslCtxDeleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslDeleter {
  void operator()(SSL* s) const { SSL_free(s); }
};
using LibCtxPtr = std::unique_ptr<OSSL_LIB_CTX, LibCtxDeleter>;
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxDeleter>;
using SslPtr = std::unique_ptr<SSL, SslDeleter>;

// A fresh directory under the build tree's temp area.
std::string make_temp_dir(const std::string& tag);

// Runs examples/pki.sh into `dir` (names: alice-kme bob-kme alice bob mallory). Returns
// false when it fails.
bool make_pki(const std::string& dir);

// Writes an openssl.cnf that activates the default provider and qkdprovider (built
// module path) with the given settings. Returns the path.
std::string write_provider_config(const std::string& path,
                                  const std::map<std::string, std::string>& settings);

// A library context loaded from `config` (nullptr on failure; errors stay queued).
LibCtxPtr load_libctx(const std::string& config);

// TLS 1.3 contexts in `libctx` with groups pinned to `groups`. The server uses
// cert/key; the client verifies against ca.
SslCtxPtr make_server_ctx(OSSL_LIB_CTX* libctx, const std::string& groups,
                          const std::string& cert, const std::string& key);
SslCtxPtr make_client_ctx(OSSL_LIB_CTX* libctx, const std::string& groups,
                          const std::string& ca);

struct Handshake {
  bool ok = false;
  std::string client_errors;  // ERR text raised while the client side ran
  std::string server_errors;
  SslPtr client, server;
  // Time spent in each side's own calls (SSL_new and SSL_do_handshake), in ms: what the
  // handshake costs a client process and a server process when they run apart.
  double client_ms = 0;
  double server_ms = 0;
};
// Drives both sides over a BIO pair until both finish or one fails.
Handshake handshake(SSL_CTX* client_ctx, SSL_CTX* server_ctx);

// The TLS groups qkdprovider advertises (its TLS-GROUP capability, read from the built
// module in a fresh library context), in the provider's order. Empty if it cannot load.
struct AdvertisedGroup {
  std::string name;
  unsigned int codepoint = 0;
};
std::vector<AdvertisedGroup> advertised_groups();

// ECDH of `own` and `peer` into `out` as libssl 3.0 does it for its own groups:
// EVP_PKEY_derive_set_peer, i.e. with OpenSSL's full check of the peer key. The reference
// for the provider's classical_derive (a test and handshake_bench's table 6).
bool openssl_full_check_derive(EVP_PKEY* own, EVP_PKEY* peer, unsigned char* out,
                               std::size_t len);

// Pops the whole OpenSSL error queue into lines "lib:reason:data".
std::string drain_errors();

}  // namespace qkd::test_prov
