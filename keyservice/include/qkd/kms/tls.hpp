// TLS contexts for the ETSI API (server, mutual TLS) and the KME-to-KME link (both ends
// authenticate with the KME certificate). TLS 1.3 only; peers are verified against the CA.
#pragma once

#include <openssl/ssl.h>

#include <boost/asio/ssl/context.hpp>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "qkd/core/result.hpp"
#include "qkd/kms/config.hpp"

namespace qkd::kms {

// kApiServer: the ETSI 014 listener, which also takes TLS 1.2 ("TLS 1.2 or later", for SAEs
// that have no 1.3) with ECDHE and AEAD ciphers only; the KME-to-KME link is 1.3 only.
enum class TlsRole { kServer, kClient, kApiServer };

// A context that presents `api.cert`/`api.key`, requires and verifies the peer's
// certificate against `api.ca` (a peer without a verifiable certificate fails the
// handshake) and allows only TLS 1.3 (kApiServer: also 1.2, see above). An error names the field and its file ("api.key:
// cannot use /etc/qkd-kms/alice.key: ...", also for a key that does not match the
// certificate).
[[nodiscard]] qkd::core::Result<std::shared_ptr<boost::asio::ssl::context>> make_tls_context(
    const ApiConfig& api, TlsRole role);

// The field ("api.cert", "api.key", "api.ca") and the message of the first PEM file that
// make_tls_context could not use, or nullopt when all three are usable.
struct TlsFileError {
  std::string field;
  std::string message;
};
[[nodiscard]] std::optional<TlsFileError> check_tls_files(const ApiConfig& api);

// What the peer KME and the SAEs check of this KME's certificate (`api.cert`, the first in
// its file): its subject CN is `kme_id` (the peer compares it with its link.peer_kme_id;
// an SAE takes the KME's ID from it, ETSI GS QKD 014), and it verifies against `api.ca`
// (with the chain that follows it in the file) as the only trust anchor, as the peer KME
// verifies it against its own. The field and the message of the first failure, or nullopt.
[[nodiscard]] std::optional<TlsFileError> check_kme_certificate(const ApiConfig& api,
                                                                std::string_view kme_id);

// The subject CN of the verified peer certificate, or nullopt if there is none (or it has
// no single CN).
[[nodiscard]] std::optional<std::string> peer_common_name(SSL* ssl);

}  // namespace qkd::kms
