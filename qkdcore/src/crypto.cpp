#include "crypto.hpp"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include <memory>

namespace qkd::core::detail {
namespace {

struct KdfDeleter {
  void operator()(EVP_KDF* p) const { EVP_KDF_free(p); }
};
struct KdfCtxDeleter {
  void operator()(EVP_KDF_CTX* p) const { EVP_KDF_CTX_free(p); }
};

}  // namespace

Result<MacTag> hmac_sha256(std::span<const std::uint8_t> key,
                           std::span<const std::uint8_t> data) {
  MacTag tag{};
  unsigned int len = 0;
  static const std::uint8_t kEmpty = 0;
  const std::uint8_t* d = data.empty() ? &kEmpty : data.data();
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), d, data.size(), tag.data(),
           &len) == nullptr ||
      len != kMacBytes) {
    return make_error(ErrorCode::kInternal, "HMAC-SHA256 failed");
  }
  return tag;
}

Result<SecureBytes> hkdf_sha256(std::span<const std::uint8_t> ikm, std::string_view salt,
                                std::string_view info, std::size_t out_len) {
  std::unique_ptr<EVP_KDF, KdfDeleter> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr));
  if (!kdf) {
    return make_error(ErrorCode::kInternal, "HKDF unavailable");
  }
  std::unique_ptr<EVP_KDF_CTX, KdfCtxDeleter> ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) {
    return make_error(ErrorCode::kInternal, "HKDF context allocation failed");
  }
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
                                        const_cast<std::uint8_t*>(ikm.data()), ikm.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<char*>(salt.data()),
                                        salt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()),
                                        info.size()),
      OSSL_PARAM_construct_end()};
  SecureBytes out(out_len);
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) {
    return make_error(ErrorCode::kInternal, "HKDF derive failed");
  }
  return out;
}

}  // namespace qkd::core::detail
