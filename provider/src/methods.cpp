#include "methods.hpp"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>

namespace qkd::prov {

CryptoMethods::~CryptoMethods() {
  EVP_KDF_free(hkdf_.load());
  EVP_PKEY_free(p256_.load());
}

KdfCtxPtr CryptoMethods::new_hkdf() {
  EVP_KDF* kdf = hkdf_.load(std::memory_order_acquire);
  if (kdf == nullptr) {
    {
      const DropNewErrors drop;  // on failure the caller raises one error with words
      kdf = EVP_KDF_fetch(libctx_, OSSL_KDF_NAME_HKDF, nullptr);
    }
    if (kdf == nullptr) {
      return nullptr;
    }
    EVP_KDF* stored = nullptr;
    if (!hkdf_.compare_exchange_strong(stored, kdf, std::memory_order_acq_rel)) {
      EVP_KDF_free(kdf);  // another call stored one first
      kdf = stored;
    }
  }
  return KdfCtxPtr(EVP_KDF_CTX_new(kdf));
}

EVP_PKEY* CryptoMethods::p256_params() {
  EVP_PKEY* params = p256_.load(std::memory_order_acquire);
  if (params != nullptr) {
    return params;
  }
  const DropNewErrors drop;  // on failure the caller raises one error with words
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(libctx_, "EC", nullptr);
  char group[] = "P-256";
  const OSSL_PARAM set[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
      OSSL_PARAM_construct_end()};
  if (ctx == nullptr || EVP_PKEY_paramgen_init(ctx) != 1 ||
      EVP_PKEY_CTX_set_params(ctx, set) != 1 || EVP_PKEY_paramgen(ctx, &params) != 1) {
    EVP_PKEY_CTX_free(ctx);
    return nullptr;
  }
  EVP_PKEY_CTX_free(ctx);
  EVP_PKEY* stored = nullptr;
  if (!p256_.compare_exchange_strong(stored, params, std::memory_order_acq_rel)) {
    EVP_PKEY_free(params);  // another call stored one first
    params = stored;
  }
  return params;
}

}  // namespace qkd::prov
