// Wire version 2: the QKD part of the shared secret is bound to the handshake's own
// values (docs/PROTOCOL.md, "Secret derivation"):
//
//   K' = HKDF-SHA256(salt = "qkdprovider/2", IKM = K,
//                    info = u8 len(group) || group || u8 len(client SAE) || client SAE ||
//                           nonce (16) || u8 len(server SAE) || server SAE || key_ID (16))
//
// K is the 32-byte key from the KMEs. A key share replayed or altered on the way (another
// nonce or SAE ID), a ciphertext with another key_ID or server SAE ID, or the same KME key
// met under another group gives another K', so the TLS handshake fails at Finished.
#pragma once

#include <openssl/types.h>

#include <cstdint>
#include <span>
#include <string_view>

#include "methods.hpp"
#include "qkd/core/result.hpp"
#include "wire.hpp"

namespace qkd::prov {

struct Binding {
  std::string_view group;       // TLS group name ("qkd", "x25519_qkd", ...)
  std::string_view client_sae;  // from the key share (ETSI slave)
  const Nonce* nonce = nullptr; // from the key share
  std::string_view server_sae;  // from the ciphertext (ETSI master)
  const KeyId* key_id = nullptr;
};

inline constexpr std::string_view kBindingSalt = "qkdprovider/2";

// Writes K' (out.size() bytes, 32 in every group) derived from `key`. HKDF and SHA-256
// come from `methods` (the provider context's, fetched once) or from `libctx` (fetched for
// the one call); fails with kInternal when the KDF is missing.
[[nodiscard]] qkd::core::Status derive_bound_key(CryptoMethods& methods,
                                                 std::span<std::uint8_t> out,
                                                 std::span<const std::uint8_t> key,
                                                 const Binding& binding);
[[nodiscard]] qkd::core::Status derive_bound_key(OSSL_LIB_CTX* libctx, std::span<std::uint8_t> out,
                                                 std::span<const std::uint8_t> key,
                                                 const Binding& binding);

}  // namespace qkd::prov
