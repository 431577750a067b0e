// The classical half of the hybrid groups x25519_qkd and p256_qkd: ephemeral ECDH through
// EVP in the provider's own library context (a child of the application's, so X25519 and
// P-256 come from whatever provider the application loaded: default, FIPS, ...).
//
// Untrusted bytes enter only through import_peer(), which is strict: exactly the fixed
// length of the group, P-256 only in uncompressed form, and the point must import (be on
// the curve); an X25519 point of small order is caught when derive() yields all zeros.
#pragma once

#include <openssl/evp.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "groups.hpp"
#include "methods.hpp"
#include "qkd/core/result.hpp"

namespace qkd::prov {

struct EvpPkeyDeleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyDeleter>;

// A second owner of the same (immutable) key: EVP_PKEY_up_ref.
[[nodiscard]] PkeyPtr share_pkey(EVP_PKEY* pkey);

// A fresh key pair of the group's classical kind. kInternal on failure. The handshake
// path passes the provider context's CryptoMethods (P-256 from its cached parameters);
// the OSSL_LIB_CTX form makes them for the one call.
[[nodiscard]] qkd::core::Result<PkeyPtr> classical_generate(CryptoMethods& methods,
                                                          Classical kind);
[[nodiscard]] qkd::core::Result<PkeyPtr> classical_generate(OSSL_LIB_CTX* libctx, Classical kind);

// The public key as it goes on the wire: classical_public_length(kind) bytes.
[[nodiscard]] qkd::core::Result<std::vector<std::uint8_t>> classical_public(EVP_PKEY* pkey,
                                                                           Classical kind);

// A peer's public key from the wire. kProtocol (with the fault named) when `bytes` has the
// wrong length, is not an uncompressed P-256 point or is not on the curve.
[[nodiscard]] qkd::core::Result<PkeyPtr> classical_import_peer(CryptoMethods& methods,
                                                             Classical kind,
                                                             std::span<const std::uint8_t> bytes);
[[nodiscard]] qkd::core::Result<PkeyPtr> classical_import_peer(OSSL_LIB_CTX* libctx,
                                                             Classical kind,
                                                             std::span<const std::uint8_t> bytes);

// ECDH of `own` (with private key) and `peer`, both of `kind`, into `out`, which must have
// exactly classical_secret_length(kind) bytes. kProtocol when the peer key gives no secret
// (a small-order X25519 point, a point on another curve); `out` is cleansed on any failure.
// P-256 peers get the partial public-key check (classical.cpp says why), others OpenSSL's.
[[nodiscard]] qkd::core::Status classical_derive(OSSL_LIB_CTX* libctx, Classical kind,
                                                 EVP_PKEY* own, EVP_PKEY* peer,
                                                 std::span<std::uint8_t> out);

}  // namespace qkd::prov
