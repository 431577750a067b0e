#include "classical.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include <cstdio>
#include <string>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;

namespace {

struct EvpPkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, EvpPkeyCtxDeleter>;

// libcrypto's own errors from a failed step stay out of the queue (each function below
// drops what it raised: DropNewErrors): the provider raises one error with words instead.
qkd::core::Error fail(ErrorCode code, std::string message) { return {code, std::move(message)}; }

}  // namespace

PkeyPtr share_pkey(EVP_PKEY* pkey) {
  if (pkey == nullptr || EVP_PKEY_up_ref(pkey) != 1) {
    return nullptr;
  }
  return PkeyPtr(pkey);
}

qkd::core::Result<PkeyPtr> classical_generate(CryptoMethods& methods, Classical kind) {
  const DropNewErrors drop;
  EVP_PKEY* raw = nullptr;
  switch (kind) {
    case Classical::kX25519:
      raw = EVP_PKEY_Q_keygen(methods.libctx(), nullptr, "X25519");
      break;
    case Classical::kP256: {
      // From the cached group parameters: no curve lookup by name per key.
      EVP_PKEY* params = methods.p256_params();
      PkeyCtxPtr ctx(params != nullptr ? EVP_PKEY_CTX_new_from_pkey(methods.libctx(), params,
                                                                    nullptr)
                                       : nullptr);
      if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1 ||
          EVP_PKEY_keygen(ctx.get(), &raw) != 1) {
        EVP_PKEY_free(raw);
        raw = nullptr;
      }
      break;
    }
    case Classical::kNone:
      return fail(ErrorCode::kInternal, "no classical part in this group");
  }
  if (raw == nullptr) {
    return fail(ErrorCode::kInternal, std::string("cannot generate an ") + classical_name(kind) +
                                          " key (is the default provider loaded?)");
  }
  return PkeyPtr(raw);
}

qkd::core::Result<PkeyPtr> classical_generate(OSSL_LIB_CTX* libctx, Classical kind) {
  CryptoMethods methods(libctx);
  return classical_generate(methods, kind);
}

qkd::core::Result<std::vector<std::uint8_t>> classical_public(EVP_PKEY* pkey, Classical kind) {
  const DropNewErrors drop;
  const std::size_t want = classical_public_length(kind);
  std::vector<std::uint8_t> out(kClassicalPublicMax);
  std::size_t len = 0;
  // X25519: the raw 32 bytes; EC: the point in the key's form, uncompressed by default
  // (checked below: the wire allows nothing else).
  if (want == 0 || EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                                    out.data(), out.size(), &len) != 1 ||
      len != want || (kind == Classical::kP256 && out[0] != 0x04)) {
    return fail(ErrorCode::kInternal, std::string("cannot encode the ") + classical_name(kind) +
                                          " public key");
  }
  out.resize(len);
  return out;
}

qkd::core::Result<PkeyPtr> classical_import_peer(CryptoMethods& methods, Classical kind,
                                                 std::span<const std::uint8_t> bytes) {
  const DropNewErrors drop;
  const std::size_t want = classical_public_length(kind);
  const std::string name = kind == Classical::kNone ? "?" : classical_name(kind);
  if (want == 0) {
    return fail(ErrorCode::kInternal, "no classical part in this group");
  }
  if (bytes.size() != want) {
    return fail(ErrorCode::kProtocol, name + " public key of " + std::to_string(bytes.size()) +
                                          " bytes, must be " + std::to_string(want));
  }
  if (kind == Classical::kX25519) {
    EVP_PKEY* raw = EVP_PKEY_new_raw_public_key_ex(methods.libctx(), "X25519", nullptr,
                                                   bytes.data(), bytes.size());
    if (raw == nullptr) {
      return fail(ErrorCode::kInternal, "cannot import an X25519 public key");
    }
    return PkeyPtr(raw);
  }
  if (bytes[0] != 0x04) {
    char first[8];
    std::snprintf(first, sizeof first, "0x%02x", bytes[0]);
    return fail(ErrorCode::kProtocol,
                std::string("P-256 point is not in uncompressed form (first byte ") + first + ")");
  }
  // A key with the cached group, then the point: libssl's own way of taking a peer's
  // share. The EC import decodes the point and refuses one that is not on the curve.
  EVP_PKEY* params = methods.p256_params();
  if (params == nullptr) {
    return fail(ErrorCode::kInternal, "cannot make P-256 parameters (is the default provider "
                                      "loaded?)");
  }
  PkeyPtr key(EVP_PKEY_new());
  if (!key || EVP_PKEY_copy_parameters(key.get(), params) != 1) {
    return fail(ErrorCode::kInternal, "cannot make a P-256 key");
  }
  if (EVP_PKEY_set1_encoded_public_key(key.get(), bytes.data(), bytes.size()) != 1) {
    return fail(ErrorCode::kProtocol, "P-256 public key is not a point on the curve");
  }
  return key;
}

qkd::core::Result<PkeyPtr> classical_import_peer(OSSL_LIB_CTX* libctx, Classical kind,
                                                 std::span<const std::uint8_t> bytes) {
  CryptoMethods methods(libctx);
  return classical_import_peer(methods, kind, bytes);
}

qkd::core::Status classical_derive(OSSL_LIB_CTX* libctx, Classical kind, EVP_PKEY* own,
                                   EVP_PKEY* peer, std::span<std::uint8_t> out) {
  const DropNewErrors drop;
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(libctx, own, nullptr));
  std::size_t len = out.size();
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1) {
    OPENSSL_cleanse(out.data(), out.size());
    return fail(ErrorCode::kInternal, "cannot start ECDH");
  }
  // P-256: OpenSSL 3.0's EVP_PKEY_derive_set_peer runs the full public-key check, whose
  // last step (n * Q is the point at infinity) is a second scalar multiplication, as costly
  // as the ECDH itself. P-256 has cofactor 1: every point on the curve but infinity has
  // order n, so that step cannot fail for a point that passes the partial check (SP 800-56A
  // rev. 3, 5.6.2.3.4: coordinates in range, on the curve, not infinity), which is what we
  // run instead; classical_import_peer has already refused off-curve points. The ECDH
  // refuses a peer on another curve than `own` (a P-256 key from classical_generate).
  // For X25519 OpenSSL refuses an all-zero result (a small-order peer point, RFC 7748 6.1).
  const bool p256 = kind == Classical::kP256;
  if (p256) {
    PkeyCtxPtr check(EVP_PKEY_CTX_new_from_pkey(libctx, peer, nullptr));
    if (!check || EVP_PKEY_public_check_quick(check.get()) != 1) {
      OPENSSL_cleanse(out.data(), out.size());
      return fail(ErrorCode::kProtocol, "ECDH: the peer's P-256 public key is not valid");
    }
  }
  if (EVP_PKEY_derive_set_peer_ex(ctx.get(), peer, p256 ? 0 : 1) != 1 ||
      EVP_PKEY_derive(ctx.get(), out.data(), &len) != 1 || len != out.size()) {
    OPENSSL_cleanse(out.data(), out.size());
    return fail(ErrorCode::kProtocol, "ECDH with the peer's public key failed (invalid point)");
  }
  return qkd::core::ok_status();
}

}  // namespace qkd::prov
