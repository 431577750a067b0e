// qkdprovider against two real qkd-kms daemons (tests/support's KmeNetwork): TLS 1.3
// handshakes in process over a BIO pair, client = SAE alice (alice-kme), server = SAE bob
// (bob-kme), each side in its own OSSL_LIB_CTX loaded from its own provider config.
// One network for the whole suite (run as one ctest test).
#include <gtest/gtest.h>

#include <openssl/err.h>
#include <openssl/evp.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "fake_kme.hpp"
#include "harness.hpp"
#include "qkd/etsi/client.hpp"
#include "qkd/test/kme_network.hpp"

namespace qkd::test_prov {
namespace {

class RealKme : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto net = qkd::test::KmeNetwork::start();
    ASSERT_TRUE(net.ok()) << net.error().message;
    net_ = std::move(net).value().release();
    auto keys = net_->wait_for_keys(16, std::chrono::seconds(90));
    ASSERT_TRUE(keys.ok()) << keys.error().message;
    dir_ = new std::string(make_temp_dir("real"));
  }
  static void TearDownTestSuite() {
    delete net_;
    net_ = nullptr;
    if (dir_ != nullptr) {
      std::filesystem::remove_all(*dir_);
    }
    delete dir_;
  }
  void SetUp() override {
    if (net_ == nullptr) {
      GTEST_SKIP() << "no KME network";
    }
  }

  static std::string cnf(const std::string& tag, const std::string& sae, const std::string& url,
                         std::map<std::string, std::string> extra = {}) {
    const auto id = net_->sae(sae);
    extra["kme_url"] = url;
    extra["cert"] = id.cert_file;
    extra["key"] = id.key_file;
    extra["ca"] = id.ca_file;
    return write_provider_config(*dir_ + "/" + tag + ".cnf", extra);
  }
  static std::string client_cnf() { return cnf("alice", "alice", net_->alice().url); }
  static std::string server_cnf() { return cnf("bob", "bob", net_->bob().url); }

  struct Sides {
    LibCtxPtr client_lib, server_lib;
    SslCtxPtr client, server;
  };
  static Sides sides(const std::string& client_config, const std::string& server_config) {
    Sides s;
    s.client_lib = load_libctx(client_config);
    s.server_lib = load_libctx(server_config);
    EXPECT_TRUE(s.client_lib && s.server_lib) << drain_errors();
    if (!s.client_lib || !s.server_lib) {
      return s;
    }
    const auto bob = net_->sae("bob");
    s.client = make_client_ctx(s.client_lib.get(), "qkd", net_->ca_file().string());
    s.server = make_server_ctx(s.server_lib.get(), "qkd", bob.cert_file, bob.key_file);
    EXPECT_TRUE(s.client && s.server) << drain_errors();
    return s;
  }

  static qkd::test::KmeNetwork* net_;
  static std::string* dir_;
};
qkd::test::KmeNetwork* RealKme::net_ = nullptr;
std::string* RealKme::dir_ = nullptr;

TEST_F(RealKme, EtsiClientTalksToTheRealKme) {
  const auto bob = net_->sae("bob");
  auto client = qkd::etsi::Client::create(
      {net_->bob().url, bob.cert_file, bob.key_file, bob.ca_file, std::chrono::milliseconds(5000)});
  ASSERT_TRUE(client.ok()) << client.error().message;
  auto status = (*client)->status("alice");
  ASSERT_TRUE(status.ok()) << status.error().message;
  EXPECT_EQ(status->slave_sae_id, "alice");
  EXPECT_GT(status->stored_key_count, 0);
}

TEST_F(RealKme, HandshakeNegotiatesQkdWithMatchingSecrets) {
  auto s = sides(client_cnf(), server_cnf());
  ASSERT_TRUE(s.client && s.server);
  for (int i = 0; i < 3; ++i) {
    Handshake h = handshake(s.client.get(), s.server.get());
    ASSERT_TRUE(h.ok) << "client: " << h.client_errors << "\nserver: " << h.server_errors
                      << "\n" << net_->log_tail(net_->bob(), 10);
    const int nid = SSL_get_negotiated_group(h.client.get());
    EXPECT_EQ(nid & 0xFFFF, 0xFE40);
    EXPECT_STREQ(SSL_group_to_name(h.client.get(), nid), "qkd");
    EXPECT_STREQ(SSL_group_to_name(h.server.get(), SSL_get_negotiated_group(h.server.get())), "qkd");
    EXPECT_EQ(SSL_version(h.client.get()), TLS1_3_VERSION);

    // Application data both ways.
    const char ping[] = "ping from alice";
    const char pong[] = "pong from bob";
    char buf[64] = {0};
    ASSERT_EQ(SSL_write(h.client.get(), ping, sizeof ping), static_cast<int>(sizeof ping));
    ASSERT_EQ(SSL_read(h.server.get(), buf, sizeof buf), static_cast<int>(sizeof ping));
    EXPECT_STREQ(buf, ping);
    ASSERT_EQ(SSL_write(h.server.get(), pong, sizeof pong), static_cast<int>(sizeof pong));
    ASSERT_EQ(SSL_read(h.client.get(), buf, sizeof buf), static_cast<int>(sizeof pong));
    EXPECT_STREQ(buf, pong);

    unsigned char a[32], b[32];
    ASSERT_EQ(SSL_export_keying_material(h.client.get(), a, sizeof a, "EXPORTER-qkd-test", 17,
                                         nullptr, 0, 0), 1);
    ASSERT_EQ(SSL_export_keying_material(h.server.get(), b, sizeof b, "EXPORTER-qkd-test", 17,
                                         nullptr, 0, 0), 1);
    EXPECT_EQ(0, std::memcmp(a, b, sizeof a));
  }
}

// The KEM at the EVP level: the secrets match, and a replayed ciphertext finds its key_ID
// already consumed at the client's KME: a clean "key_ID unknown at KME".
TEST_F(RealKme, EvpFlowAndReplayedKeyIdIsUnknown) {
  auto client_lib = load_libctx(client_cnf());
  auto server_lib = load_libctx(server_cnf());
  ASSERT_TRUE(client_lib && server_lib) << drain_errors();

  EVP_PKEY_CTX* kctx = EVP_PKEY_CTX_new_from_name(client_lib.get(), "qkd", nullptr);
  ASSERT_EQ(EVP_PKEY_keygen_init(kctx), 1);
  EVP_PKEY* client_key = nullptr;
  ASSERT_EQ(EVP_PKEY_keygen(kctx, &client_key), 1) << drain_errors();
  EVP_PKEY_CTX_free(kctx);
  unsigned char* share = nullptr;
  const size_t share_len = EVP_PKEY_get1_encoded_public_key(client_key, &share);
  ASSERT_GT(share_len, 0U);
  EXPECT_EQ(share[0], 0x01);
  EXPECT_EQ(share[1], 5);  // "alice"

  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(server_lib.get(), "qkd", nullptr);
  ASSERT_EQ(EVP_PKEY_paramgen_init(pctx), 1);
  EVP_PKEY* peer = nullptr;
  ASSERT_EQ(EVP_PKEY_paramgen(pctx, &peer), 1);
  EVP_PKEY_CTX_free(pctx);
  ASSERT_EQ(EVP_PKEY_set1_encoded_public_key(peer, share, share_len), 1) << drain_errors();
  OPENSSL_free(share);

  EVP_PKEY_CTX* ectx = EVP_PKEY_CTX_new_from_pkey(server_lib.get(), peer, nullptr);
  ASSERT_EQ(EVP_PKEY_encapsulate_init(ectx, nullptr), 1);
  size_t ct_len = 0;
  size_t secret_len = 0;
  ASSERT_EQ(EVP_PKEY_encapsulate(ectx, nullptr, &ct_len, nullptr, &secret_len), 1);
  EXPECT_EQ(secret_len, 32U);
  EXPECT_EQ(ct_len, 2U + 3U + 16U);  // version, "bob", key_ID
  std::vector<unsigned char> ct(ct_len), server_secret(secret_len);
  ASSERT_EQ(EVP_PKEY_encapsulate(ectx, ct.data(), &ct_len, server_secret.data(), &secret_len), 1)
      << drain_errors();
  EVP_PKEY_CTX_free(ectx);

  EVP_PKEY_CTX* dctx = EVP_PKEY_CTX_new_from_pkey(client_lib.get(), client_key, nullptr);
  ASSERT_EQ(EVP_PKEY_decapsulate_init(dctx, nullptr), 1);
  size_t out_len = 0;
  ASSERT_EQ(EVP_PKEY_decapsulate(dctx, nullptr, &out_len, ct.data(), ct.size()), 1);
  ASSERT_EQ(out_len, 32U);
  std::vector<unsigned char> client_secret(out_len);
  ASSERT_EQ(EVP_PKEY_decapsulate(dctx, client_secret.data(), &out_len, ct.data(), ct.size()), 1)
      << drain_errors();
  EXPECT_EQ(client_secret, server_secret);

  // Replay: the KME delivered that key once and forgot it.
  EXPECT_NE(EVP_PKEY_decapsulate(dctx, client_secret.data(), &out_len, ct.data(), ct.size()), 1);
  const std::string errors = drain_errors();
  EXPECT_NE(errors.find("key_ID unknown at KME"), std::string::npos) << errors;
  EXPECT_NE(errors.find("from SAE bob"), std::string::npos) << errors;
  std::cout << "[replay errors] " << errors;

  // Garbage ciphertext: refused before any KME call, no crash.
  const unsigned char garbage[] = {0x01, 0x03, 'b', 'o', 'b', 0x00};
  EXPECT_NE(EVP_PKEY_decapsulate(dctx, client_secret.data(), &out_len, garbage, sizeof garbage), 1);
  EXPECT_NE(drain_errors().find("malformed qkd ciphertext"), std::string::npos);
  EVP_PKEY_CTX_free(dctx);

  // Garbage share at the server: refused, no crash.
  EVP_PKEY_CTX* p2 = EVP_PKEY_CTX_new_from_name(server_lib.get(), "qkd", nullptr);
  ASSERT_EQ(EVP_PKEY_paramgen_init(p2), 1);
  EVP_PKEY* peer2 = nullptr;
  ASSERT_EQ(EVP_PKEY_paramgen(p2, &peer2), 1);
  EVP_PKEY_CTX_free(p2);
  const unsigned char bad_share[] = {0x01, 0x05, 'a', 'l', '/', 'c', 'e'};
  EXPECT_EQ(EVP_PKEY_set1_encoded_public_key(peer2, bad_share, sizeof bad_share), 0);
  EXPECT_NE(drain_errors().find("malformed qkd key share"), std::string::npos);
  EVP_PKEY_free(peer2);
  EVP_PKEY_free(peer);
  EVP_PKEY_free(client_key);
}

TEST_F(RealKme, ServerKmeDownFailsNamingTheUrl) {
  const std::string down = "https://127.0.0.1:" + std::to_string(closed_port());
  auto s = sides(client_cnf(), cnf("bob-down", "bob", down));
  ASSERT_TRUE(s.client && s.server);
  Handshake h = handshake(s.client.get(), s.server.get());
  ASSERT_FALSE(h.ok);
  EXPECT_NE(h.server_errors.find("key service unreachable: " + down + " (connection refused)"),
            std::string::npos)
      << h.server_errors;
}

TEST_F(RealKme, ClientAtTheWrongKmeFailsCleanly) {
  // alice asks bob-kme (which handed the key to bob, not to alice) for the key: refused by
  // the KME, and the handshake fails with a reason instead of a bare number.
  auto s = sides(cnf("alice-wrong", "alice", net_->bob().url), server_cnf());
  ASSERT_TRUE(s.client && s.server);
  Handshake h = handshake(s.client.get(), s.server.get());
  ASSERT_FALSE(h.ok);
  EXPECT_TRUE(h.client_errors.find("key_ID unknown at KME") != std::string::npos ||
              h.client_errors.find("key service refused the request") != std::string::npos)
      << h.client_errors;
  std::cout << "[client errors] " << h.client_errors;
}

}  // namespace
}  // namespace qkd::test_prov
