// Provider loading in a fresh OSSL_LIB_CTX: the KEM and keymgmt `qkd`, and the TLS-GROUP
// capability enumerating the group table with its codepoints.
#include <gtest/gtest.h>

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>

#include <filesystem>
#include <string>
#include <vector>

#include "groups.hpp"
#include "harness.hpp"

namespace qkd::test_prov {
namespace {

struct GroupSeen {
  std::string name, internal, alg;
  unsigned int id = 0, secbits = 0, is_kem = 0;
  int min_tls = 0, max_tls = 0, min_dtls = 0, max_dtls = 0;
};

int collect_group(const OSSL_PARAM params[], void* arg) {
  GroupSeen g;
  const char* s = nullptr;
  if (const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_NAME);
      p != nullptr && OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
    g.name = s;
  }
  if (const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_NAME_INTERNAL);
      p != nullptr && OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
    g.internal = s;
  }
  if (const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_ALG);
      p != nullptr && OSSL_PARAM_get_utf8_string_ptr(p, &s)) {
    g.alg = s;
  }
  OSSL_PARAM_get_uint(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_ID), &g.id);
  OSSL_PARAM_get_uint(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_SECURITY_BITS), &g.secbits);
  OSSL_PARAM_get_uint(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_IS_KEM), &g.is_kem);
  OSSL_PARAM_get_int(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_MIN_TLS), &g.min_tls);
  OSSL_PARAM_get_int(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_MAX_TLS), &g.max_tls);
  OSSL_PARAM_get_int(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_MIN_DTLS), &g.min_dtls);
  OSSL_PARAM_get_int(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_MAX_DTLS), &g.max_dtls);
  static_cast<std::vector<GroupSeen>*>(arg)->push_back(g);
  return 1;
}

class ProviderLoad : public ::testing::Test {
 protected:
  void SetUp() override {
    libctx_.reset(OSSL_LIB_CTX_new());
    ASSERT_TRUE(libctx_);
    ASSERT_EQ(OSSL_PROVIDER_set_default_search_path(libctx_.get(), QKD_MODULE_DIR), 1);
    prov_ = OSSL_PROVIDER_load(libctx_.get(), "qkdprovider");
    ASSERT_NE(prov_, nullptr) << drain_errors();
    def_ = OSSL_PROVIDER_load(libctx_.get(), "default");
    ASSERT_NE(def_, nullptr);
  }
  void TearDown() override {
    if (prov_ != nullptr) {
      OSSL_PROVIDER_unload(prov_);
    }
    if (def_ != nullptr) {
      OSSL_PROVIDER_unload(def_);
    }
  }
  LibCtxPtr libctx_;
  OSSL_PROVIDER* prov_ = nullptr;
  OSSL_PROVIDER* def_ = nullptr;
};

TEST_F(ProviderLoad, KemAndKeymgmtAreFetchable) {
  for (const auto& g : qkd::prov::kGroups) {
    const std::string alg(g.algorithm);
    EVP_KEM* kem = EVP_KEM_fetch(libctx_.get(), alg.c_str(), "provider=qkdprovider");
    ASSERT_NE(kem, nullptr) << alg;
    EXPECT_EQ(EVP_KEM_get0_provider(kem), prov_);
    EVP_KEM_free(kem);
    EVP_KEYMGMT* km = EVP_KEYMGMT_fetch(libctx_.get(), alg.c_str(), nullptr);
    ASSERT_NE(km, nullptr) << alg;
    EVP_KEYMGMT_free(km);
  }
}

TEST_F(ProviderLoad, TlsGroupCapabilityMatchesTheTable) {
  std::vector<GroupSeen> seen;
  ASSERT_EQ(OSSL_PROVIDER_get_capabilities(prov_, "TLS-GROUP", collect_group, &seen), 1);
  ASSERT_EQ(seen.size(), qkd::prov::kGroups.size());
  for (std::size_t i = 0; i < seen.size(); ++i) {
    const auto& g = qkd::prov::kGroups[i];
    EXPECT_EQ(seen[i].name, g.tls_name);
    EXPECT_EQ(seen[i].internal, g.internal_name);
    EXPECT_EQ(seen[i].alg, g.algorithm);
    EXPECT_EQ(seen[i].id, g.default_codepoint);
    EXPECT_EQ(seen[i].secbits, g.security_bits);
    EXPECT_EQ(seen[i].is_kem, 1U);
    EXPECT_EQ(seen[i].min_tls, TLS1_3_VERSION);
    EXPECT_EQ(seen[i].max_tls, 0);
    EXPECT_EQ(seen[i].min_dtls, -1);
    EXPECT_EQ(seen[i].max_dtls, -1);
  }
  EXPECT_EQ(seen[0].name, "qkd");
  EXPECT_EQ(seen[0].id, 0xFE40U);
  EXPECT_EQ(seen[1].name, "x25519_qkd");
  EXPECT_EQ(seen[1].id, 0xFE41U);
  EXPECT_EQ(seen[2].name, "p256_qkd");
  EXPECT_EQ(seen[2].id, 0xFE42U);
}

TEST_F(ProviderLoad, LibsslAcceptsTheGroupName) {
  SslCtxPtr ctx(SSL_CTX_new_ex(libctx_.get(), nullptr, TLS_method()));
  ASSERT_TRUE(ctx);
  EXPECT_EQ(SSL_CTX_set1_groups_list(ctx.get(), "qkd"), 1);
  EXPECT_EQ(SSL_CTX_set1_groups_list(ctx.get(), "qkd:X25519"), 1);
  EXPECT_EQ(SSL_CTX_set1_groups_list(ctx.get(), "x25519_qkd:p256_qkd:qkd"), 1);
  EXPECT_NE(SSL_CTX_set1_groups_list(ctx.get(), "QKD"), 1) << "names are case-sensitive";
  drain_errors();
}

TEST_F(ProviderLoad, ParameterGenerationDoesNoWorkAndGarbageSharesAreRefused) {
  // Unconfigured provider: parameter generation (the server's first step) must succeed
  // without any setting, and a garbage share must be refused with a reason, not a crash.
  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(libctx_.get(), "qkd", nullptr);
  ASSERT_NE(pctx, nullptr);
  ASSERT_EQ(EVP_PKEY_paramgen_init(pctx), 1);
  ASSERT_EQ(EVP_PKEY_CTX_set_group_name(pctx, "qkd"), 1);
  EVP_PKEY* pkey = nullptr;
  ASSERT_EQ(EVP_PKEY_paramgen(pctx, &pkey), 1) << drain_errors();
  EVP_PKEY_CTX_free(pctx);
  const unsigned char garbage[] = {0x02, 0x05, 'a', 'l', 'i', 'c', 'e', 0xff};
  EXPECT_EQ(EVP_PKEY_set1_encoded_public_key(pkey, garbage, sizeof garbage), 0);
  const std::string errors = drain_errors();
  EXPECT_NE(errors.find("malformed qkd key share"), std::string::npos) << errors;
  const unsigned char empty[1] = {0};
  EXPECT_EQ(EVP_PKEY_set1_encoded_public_key(pkey, empty, 0), 0);
  drain_errors();
  EVP_PKEY_free(pkey);
}

TEST_F(ProviderLoad, KeygenWithoutSettingsNamesTheMissingSetting) {
  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(libctx_.get(), "qkd", nullptr);
  ASSERT_NE(pctx, nullptr);
  ASSERT_EQ(EVP_PKEY_keygen_init(pctx), 1);
  EVP_PKEY* pkey = nullptr;
  if (std::getenv("QKD_CERT") == nullptr && std::getenv("QKD_SAE_ID") == nullptr) {
    EXPECT_NE(EVP_PKEY_keygen(pctx, &pkey), 1);
    const std::string errors = drain_errors();
    EXPECT_NE(errors.find("missing setting cert"), std::string::npos) << errors;
  }
  EVP_PKEY_free(pkey);
  EVP_PKEY_CTX_free(pctx);
}

TEST(ProviderConfig, CodepointOverrideAndBadCodepoint) {
  const std::string dir = make_temp_dir("cfg");
  {
    auto lib = load_libctx(write_provider_config(
        dir + "/ok.cnf", {{"qkd_codepoint", "0xFE50"}, {"p256_qkd_codepoint", "0xFE52"}}));
    ASSERT_TRUE(lib) << drain_errors();
    OSSL_PROVIDER* p = OSSL_PROVIDER_load(lib.get(), "qkdprovider");
    ASSERT_NE(p, nullptr);
    std::vector<GroupSeen> seen;
    OSSL_PROVIDER_get_capabilities(p, "TLS-GROUP", collect_group, &seen);
    ASSERT_EQ(seen.size(), qkd::prov::kGroups.size());
    EXPECT_EQ(seen[0].id, 0xFE50U);
    EXPECT_EQ(seen[1].id, 0xFE41U);
    EXPECT_EQ(seen[2].id, 0xFE52U);
    OSSL_PROVIDER_unload(p);
  }
  {
    // A bad codepoint must not make the provider silently absent: it loads, and the first
    // use fails naming the setting.
    auto lib = load_libctx(write_provider_config(
        dir + "/bad.cnf", {{"qkd_codepoint", "0x1D"}, {"sae_id", "alice"}}));
    ASSERT_TRUE(lib) << drain_errors();
    EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(lib.get(), "qkd", nullptr);
    ASSERT_NE(pctx, nullptr);
    ASSERT_EQ(EVP_PKEY_keygen_init(pctx), 1);
    EVP_PKEY* pkey = nullptr;
    EXPECT_NE(EVP_PKEY_keygen(pctx, &pkey), 1);
    const std::string errors = drain_errors();
    EXPECT_NE(errors.find("invalid setting qkd_codepoint = \"0x1D\""), std::string::npos) << errors;
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(pctx);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qkd::test_prov
