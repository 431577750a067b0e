#include "binding.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include <memory>
#include <vector>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;

namespace {

void append_labelled(std::vector<std::uint8_t>& info, std::string_view text) {
  info.push_back(static_cast<std::uint8_t>(text.size()));
  info.insert(info.end(), text.begin(), text.end());
}

}  // namespace

qkd::core::Status derive_bound_key(CryptoMethods& methods, std::span<std::uint8_t> out,
                                   std::span<const std::uint8_t> key, const Binding& b) {
  if (b.nonce == nullptr || b.key_id == nullptr || out.empty() || key.empty() ||
      b.group.size() > 255 || b.client_sae.size() > kMaxSaeIdLength ||
      b.server_sae.size() > kMaxSaeIdLength) {
    return make_error(ErrorCode::kInvalidArgument, "incomplete binding for the QKD key");
  }
  std::vector<std::uint8_t> info;
  info.reserve(3 + b.group.size() + b.client_sae.size() + b.server_sae.size() + kNonceLength +
               kKeyIdLength);
  append_labelled(info, b.group);
  append_labelled(info, b.client_sae);
  info.insert(info.end(), b.nonce->begin(), b.nonce->end());
  append_labelled(info, b.server_sae);
  info.insert(info.end(), b.key_id->begin(), b.key_id->end());

  KdfCtxPtr ctx = methods.new_hkdf();
  if (!ctx) {
    return make_error(ErrorCode::kInternal, "HKDF is not available (is the default provider active?)");
  }
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::uint8_t*>(key.data()),
                                        key.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT,
                                        const_cast<char*>(kBindingSalt.data()), kBindingSalt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info.data(), info.size()),
      OSSL_PARAM_construct_end()};
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) {
    OPENSSL_cleanse(out.data(), out.size());
    return make_error(ErrorCode::kInternal, "HKDF failed");
  }
  return qkd::core::ok_status();
}

qkd::core::Status derive_bound_key(OSSL_LIB_CTX* libctx, std::span<std::uint8_t> out,
                                   std::span<const std::uint8_t> key, const Binding& b) {
  CryptoMethods methods(libctx);
  return derive_bound_key(methods, out, key, b);
}

}  // namespace qkd::prov
