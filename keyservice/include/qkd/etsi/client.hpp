// A small, synchronous ETSI GS QKD 014 client (the SAE side of the key delivery API).
//
// Used by the OpenSSL provider, the tests and the tools. It depends only on OpenSSL and
// qkd::base (no Boost types in this header), speaks HTTPS with mutual TLS, and builds its
// TLS context in a private OSSL_LIB_CTX holding only the default provider, so that a
// process that loads qkdprovider through openssl.cnf can never recurse into group `qkd`.
// Calls are thread-safe; connections are kept alive, made lazily, and made again after a
// failure or a fork().
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::etsi {

using qkd::core::Error;
using qkd::core::ErrorCode;
using qkd::core::Result;

// The latest time a call may end, when a caller has one of its own (the provider's one
// deadline per handshake operation); none: the call is bounded by ClientConfig::timeout only.
using Deadline = std::optional<std::chrono::steady_clock::time_point>;

struct ClientConfig {
  std::string kme_url;    // "https://127.0.0.1:8443" (host may be a name or an address)
  std::string cert_file;  // this SAE's client certificate (PEM); its CN is the SAE ID
  std::string key_file;   // its private key (PEM)
  std::string ca_file;    // CA that signed the KME's certificate (PEM)
  std::chrono::milliseconds timeout{5000};  // bound on each whole request
};

struct StatusInfo {
  std::string source_kme_id, target_kme_id, master_sae_id, slave_sae_id;
  std::int64_t key_size = 0, stored_key_count = 0, max_key_count = 0, max_key_per_request = 0,
               max_key_size = 0, min_key_size = 0, max_sae_id_count = 0;
  std::string status_extension_json;  // "" when absent, else the raw JSON object
};

struct Key {
  std::string key_id;          // UUID string
  qkd::core::SecureBytes key;  // decoded from base64
};

// Errors: kUnavailable (cannot connect / TLS failure: the message names the URL),
// kTimeout, kRejected (the KME answered 400/401/503: the message carries the status and
// the KME's "message" field), kProtocol (a reply that is not valid ETSI 014).
class Client {
 public:
  [[nodiscard]] static Result<std::unique_ptr<Client>> create(ClientConfig config);
  virtual ~Client() = default;

  [[nodiscard]] virtual Result<StatusInfo> status(std::string_view slave_sae_id) = 0;
  // POST enc_keys: exactly `number` keys of `size_bits` bits, or an error.
  // Each call ends by the earlier of `deadline` and ClientConfig::timeout from its start
  // (kTimeout); a call whose deadline has passed fails before it sends anything, so that no
  // key is consumed at the KME for a reply nobody would read.
  [[nodiscard]] virtual Result<std::vector<Key>> enc_keys(std::string_view slave_sae_id,
                                                          std::uint32_t number,
                                                          std::uint32_t size_bits,
                                                          Deadline deadline = std::nullopt) = 0;
  // dec_keys (GET for one key_ID, POST for several); `deadline` as for enc_keys.
  [[nodiscard]] virtual Result<std::vector<Key>> dec_keys(
      std::string_view master_sae_id, std::span<const std::string> key_ids,
      Deadline deadline = std::nullopt) = 0;
};

// --- Helpers shared with the provider (additions to the contract above) -------------------

// The HTTP status carried by a kRejected error made by this library (400, 401, 503, ...),
// or 0 for any other error.
[[nodiscard]] int rejected_http_status(const Error& error);

// The common name (CN) of the subject of the first certificate in a PEM file: the SAE ID
// by default. Reads the file; fails with kInvalidArgument naming the path.
[[nodiscard]] Result<std::string> certificate_common_name(const std::string& cert_file);

// Fills `out` from the DRBG of the library's private OSSL_LIB_CTX (default provider only),
// so that it works whatever providers the host process has activated.
[[nodiscard]] qkd::core::Status random_bytes(std::span<std::uint8_t> out);

}  // namespace qkd::etsi
