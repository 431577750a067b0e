#include "qkd/kms/tls.hpp"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <filesystem>
#include <memory>
#include <utility>

#include "qkd/kms/util.hpp"

namespace qkd::kms {

namespace asio = boost::asio;
using qkd::core::ErrorCode;
using qkd::core::make_error;

namespace {

// Whether `file` holds a PEM block of the kind a field needs at all: a certificate
// (api.cert, api.ca) or a private key (api.key, any of "PRIVATE KEY", "EC PRIVATE KEY",
// "ENCRYPTED PRIVATE KEY" ...). Asked only once OpenSSL has refused the file, to say "not a
// PEM certificate" rather than its "no start line", "unsupported" or "no certificate or crl
// found".
bool holds_pem_block(const std::string& file, bool private_key) {
  std::unique_ptr<BIO, decltype(&BIO_free)> in(BIO_new_file(file.c_str(), "r"), &BIO_free);
  bool found = false;
  char* name = nullptr;
  char* header = nullptr;
  unsigned char* data = nullptr;
  long len = 0;
  while (in && !found && PEM_read_bio(in.get(), &name, &header, &data, &len) == 1) {
    const std::string_view n(name);
    found = private_key
                ? n.ends_with("PRIVATE KEY")
                : (n == "CERTIFICATE" || n == "TRUSTED CERTIFICATE" || n == "X509 CERTIFICATE");
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_clear_free(data, static_cast<std::size_t>(len));
  }
  ERR_clear_error();  // the end of the file
  return found;
}

// Builds the context; on failure sets `failed` to the field whose file could not be used.
std::shared_ptr<asio::ssl::context> build(const ApiConfig& api, TlsRole role,
                                          std::optional<TlsFileError>& failed) {
  auto ctx = std::make_shared<asio::ssl::context>(role == TlsRole::kClient
                                                      ? asio::ssl::context::tls_client
                                                      : asio::ssl::context::tls_server);
  const bool tls12 = role == TlsRole::kApiServer;
  if (SSL_CTX_set_min_proto_version(ctx->native_handle(),
                                    tls12 ? TLS1_2_VERSION : TLS1_3_VERSION) != 1 ||
      (tls12 && SSL_CTX_set_cipher_list(ctx->native_handle(),
                                        "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL") != 1)) {
    failed = TlsFileError{"(TLS)", "cannot set the TLS versions and ciphers"};
    return nullptr;
  }
  ctx->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                   asio::ssl::context::no_sslv3 | asio::ssl::context::single_dh_use);
  // The key is checked against the certificate when it is loaded.
  const std::pair<const char*, const std::filesystem::path*> steps[] = {
      {"api.cert", &api.cert}, {"api.key", &api.key}, {"api.ca", &api.ca}};
  for (const auto& [field, file] : steps) {
    boost::system::error_code ec;
    const std::string f = file->string();
    if (file == &api.cert) {
      ctx->use_certificate_chain_file(f, ec);
    } else if (file == &api.key) {
      ctx->use_private_key_file(f, asio::ssl::context::pem, ec);
    } else {
      ctx->load_verify_file(f, ec);
    }
    if (ec) {
      const bool key = file == &api.key;
      if (!holds_pem_block(f, key)) {
        failed =
            TlsFileError{field, fmt::format("{} is not a PEM {} (OpenSSL: {})", f,
                                            key ? "private key" : "certificate", ec.message())};
      } else {
        failed = TlsFileError{field, fmt::format("cannot use {}: {}", f, ec.message())};
      }
      return nullptr;
    }
  }
  ctx->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
  if (role != TlsRole::kClient) {
    // A server that verifies client certificates must name its session context, or OpenSSL
    // fails every resumption (TLS 1.2 session IDs, 1.3 tickets) with an internal error. A
    // resumed session carries the certificate it was verified with: the caller is the same.
    static constexpr unsigned char kSessionContext[] = "qkd-kms";
    if (SSL_CTX_set_session_id_context(ctx->native_handle(), kSessionContext,
                                       sizeof kSessionContext - 1) != 1) {
      failed = TlsFileError{"(TLS)", "cannot set the session context"};
      return nullptr;
    }
    SSL_CTX_set_options(ctx->native_handle(), SSL_OP_NO_RENEGOTIATION);
  }
  return ctx;
}

}  // namespace

qkd::core::Result<std::shared_ptr<asio::ssl::context>> make_tls_context(const ApiConfig& api,
                                                                        TlsRole role) {
  std::optional<TlsFileError> failed;
  auto ctx = build(api, role, failed);
  if (!ctx) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("{}: {}", failed->field, failed->message));
  }
  return ctx;
}

std::optional<TlsFileError> check_tls_files(const ApiConfig& api) {
  std::optional<TlsFileError> failed;
  (void)build(api, TlsRole::kApiServer, failed);
  return failed;
}

namespace {

// The subject's single CN, as UTF-8; nullopt if it has none, several, or one holding NUL.
std::optional<std::string> common_name(X509* cert) {
  X509_NAME* name = X509_get_subject_name(cert);
  const int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0) {
    return std::nullopt;  // no CN, or more than one
  }
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
  unsigned char* utf8 = nullptr;
  const int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len <= 0) {
    return std::nullopt;
  }
  std::string cn(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(len));
  OPENSSL_free(utf8);
  if (cn.find('\0') != std::string::npos) {
    return std::nullopt;
  }
  return cn;
}

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

}  // namespace

std::optional<std::string> peer_common_name(SSL* ssl) {
  if (ssl == nullptr || SSL_get_verify_result(ssl) != X509_V_OK) {
    return std::nullopt;
  }
  X509Ptr cert(SSL_get1_peer_certificate(ssl));
  if (!cert) {
    return std::nullopt;
  }
  return common_name(cert.get());
}

std::optional<TlsFileError> check_kme_certificate(const ApiConfig& api, std::string_view kme_id) {
  const std::string cert_file = api.cert.string();
  const std::string ca_file = api.ca.string();
  // The certificate and the chain sent with it (use_certificate_chain_file: the rest of
  // the file), as the peer receives them.
  std::unique_ptr<BIO, decltype(&BIO_free)> in(BIO_new_file(cert_file.c_str(), "r"), &BIO_free);
  X509Ptr leaf(in ? PEM_read_bio_X509(in.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!leaf) {
    ERR_clear_error();
    return TlsFileError{"api.cert", fmt::format("cannot read a certificate from {}", cert_file)};
  }
  std::unique_ptr<STACK_OF(X509), void (*)(STACK_OF(X509)*)> chain(
      sk_X509_new_null(), [](STACK_OF(X509) * s) { sk_X509_pop_free(s, X509_free); });
  while (X509* extra = PEM_read_bio_X509(in.get(), nullptr, nullptr, nullptr)) {
    if (!chain || sk_X509_push(chain.get(), extra) <= 0) {
      X509_free(extra);
      return TlsFileError{"(TLS)", "out of memory"};
    }
  }
  ERR_clear_error();  // the end of the file

  const auto cn = common_name(leaf.get());
  if (!cn) {
    return TlsFileError{"api.cert",
                        fmt::format("{} has no single subject CN, and kme_id \"{}\" must be it",
                                    cert_file, kme_id)};
  }
  if (*cn != kme_id) {
    return TlsFileError{
        "api.cert", fmt::format("the CN of {} is \"{}\", not kme_id \"{}\": the peer KME checks it "
                                "against its link.peer_kme_id, and SAEs take the KME's ID from it",
                                cert_file, printable(*cn), kme_id)};
  }

  // Verified as the peer KME verifies it: against a CA (its api.ca, the same PKI as ours).
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(), &X509_STORE_free);
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx(X509_STORE_CTX_new(),
                                                                      &X509_STORE_CTX_free);
  if (!store || !ctx || X509_STORE_load_file(store.get(), ca_file.c_str()) != 1 ||
      X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), chain.get()) != 1) {
    ERR_clear_error();
    return TlsFileError{"api.ca", fmt::format("cannot use {} as a trust anchor", ca_file)};
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    const int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return TlsFileError{
        "api.cert", fmt::format("{} does not verify against api.ca ({}): {}", cert_file, ca_file,
                                X509_verify_cert_error_string(err))};
  }
  return std::nullopt;
}

}  // namespace qkd::kms
