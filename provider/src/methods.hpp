// What every handshake needs from libcrypto, made once per provider context instead of
// once per call: the HKDF method and P-256's group parameters (a key object holding only
// the group, from which ephemeral key pairs are generated and peer points imported without
// looking the curve up by name each time).
//
// Made at first use from `libctx` (the provider's child library context, whose providers
// may not all be active yet while qkdprovider itself is being loaded); a failure is not
// remembered, so the next call tries again. No lock: a lock held across the fetch would
// block a child forked meanwhile, so two first calls may both make an object, and the one
// stored second is freed. Thread-safe: once made, the objects are only
// read (EVP_KDF_CTX_new, EVP_PKEY_CTX_new_from_pkey and EVP_PKEY_copy_parameters leave
// their source unchanged) and live until the provider context goes. (OpenSSL 3.0's HKDF
// cannot be duplicated, so each derivation still sets the digest by name.)
#pragma once

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <atomic>
#include <memory>

namespace qkd::prov {

// Drops the OpenSSL errors raised during its life, and only those: the provider runs on
// the application's thread, inside its TLS handshake, and raises one error with words
// instead of libcrypto's; what the application had queued (errors, ERR_set_mark marks)
// stays. (ERR_clear_error() would wipe the application's too.)
class DropNewErrors {
 public:
  DropNewErrors() { ERR_set_mark(); }
  ~DropNewErrors() { ERR_pop_to_mark(); }
  DropNewErrors(const DropNewErrors&) = delete;
  DropNewErrors& operator=(const DropNewErrors&) = delete;
};

struct KdfCtxDeleter {
  void operator()(EVP_KDF_CTX* c) const { EVP_KDF_CTX_free(c); }
};
using KdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, KdfCtxDeleter>;

class CryptoMethods {
 public:
  // `libctx` may be null (the default library context) and must outlive this object.
  explicit CryptoMethods(OSSL_LIB_CTX* libctx) : libctx_(libctx) {}
  ~CryptoMethods();
  CryptoMethods(const CryptoMethods&) = delete;
  CryptoMethods& operator=(const CryptoMethods&) = delete;

  [[nodiscard]] OSSL_LIB_CTX* libctx() const { return libctx_; }
  // A fresh HKDF context; null when HKDF is not available.
  [[nodiscard]] KdfCtxPtr new_hkdf();
  // P-256's parameters (no key; owned here); null when EC is not available.
  [[nodiscard]] EVP_PKEY* p256_params();

 private:
  OSSL_LIB_CTX* const libctx_;
  std::atomic<EVP_KDF*> hkdf_{nullptr};
  std::atomic<EVP_PKEY*> p256_{nullptr};
};

}  // namespace qkd::prov
