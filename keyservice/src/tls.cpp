#include "qkd/kms/tls.hpp"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/x509.h>

namespace qkd::kms {

namespace asio = boost::asio;
using qkd::core::ErrorCode;
using qkd::core::make_error;

qkd::core::Result<std::shared_ptr<asio::ssl::context>> make_tls_context(const ApiConfig& api,
                                                                        TlsRole role) {
  try {
    auto ctx = std::make_shared<asio::ssl::context>(
        role == TlsRole::kServer ? asio::ssl::context::tls_server : asio::ssl::context::tls_client);
    if (SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION) != 1) {
      return make_error(ErrorCode::kInternal, "cannot require TLS 1.3");
    }
    ctx->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                     asio::ssl::context::no_sslv3 | asio::ssl::context::single_dh_use);
    ctx->use_certificate_chain_file(api.cert.string());
    ctx->use_private_key_file(api.key.string(), asio::ssl::context::pem);
    ctx->load_verify_file(api.ca.string());
    ctx->set_verify_mode(asio::ssl::verify_peer | asio::ssl::verify_fail_if_no_peer_cert);
    return ctx;
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("TLS setup with {} / {} / {}: {}", api.cert.string(),
                                  api.key.string(), api.ca.string(), e.what()));
  }
}

std::optional<std::string> peer_common_name(SSL* ssl) {
  if (ssl == nullptr || SSL_get_verify_result(ssl) != X509_V_OK) {
    return std::nullopt;
  }
  std::unique_ptr<X509, decltype(&X509_free)> cert(SSL_get1_peer_certificate(ssl), &X509_free);
  if (!cert) {
    return std::nullopt;
  }
  X509_NAME* name = X509_get_subject_name(cert.get());
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

}  // namespace qkd::kms
