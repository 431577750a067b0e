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
#include <ostream>
#include <string>
#include <vector>

#include "app_errors.hpp"
#include "fake_kme.hpp"
#include "harness.hpp"
#include "qkd/etsi/client.hpp"
#include "qkd/test/kme_network.hpp"

namespace qkd::test_prov {
namespace {

// The network, started once for every suite in this process (a global environment: the
// parameterized suite below shares it with RealKme) and always stopped at exit.
class KmeEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    auto net = qkd::test::KmeNetwork::start();
    ASSERT_TRUE(net.ok()) << net.error().message;
    net_ = std::move(net).value();
    // Every test here spends keys: 3 per handshake group, the hostile cases, the EVP flows.
    auto keys = net_->wait_for_keys(24, std::chrono::seconds(90));
    ASSERT_TRUE(keys.ok()) << keys.error().message;
    dir_ = make_temp_dir("real");
  }
  void TearDown() override {
    net_.reset();
    if (!dir_.empty()) {
      std::filesystem::remove_all(dir_);
    }
  }
  static qkd::test::KmeNetwork* net() { return net_.get(); }
  static const std::string& dir() { return dir_; }

 private:
  static std::unique_ptr<qkd::test::KmeNetwork> net_;
  static std::string dir_;
};
std::unique_ptr<qkd::test::KmeNetwork> KmeEnvironment::net_;
std::string KmeEnvironment::dir_;
[[maybe_unused]] const auto* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new KmeEnvironment);

class RealKme : public ::testing::Test {
 protected:
  void SetUp() override {
    net_ = KmeEnvironment::net();
    dir_ = &KmeEnvironment::dir();
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
  static Sides sides(const std::string& client_config, const std::string& server_config,
                     const std::string& groups = "qkd") {
    Sides s;
    s.client_lib = load_libctx(client_config);
    s.server_lib = load_libctx(server_config);
    EXPECT_TRUE(s.client_lib && s.server_lib) << drain_errors();
    if (!s.client_lib || !s.server_lib) {
      return s;
    }
    const auto bob = net_->sae("bob");
    s.client = make_client_ctx(s.client_lib.get(), groups, net_->ca_file().string());
    s.server = make_server_ctx(s.server_lib.get(), groups, bob.cert_file, bob.key_file);
    EXPECT_TRUE(s.client && s.server) << drain_errors();
    return s;
  }

  static qkd::test::KmeNetwork* net_;
  static const std::string* dir_;
};
qkd::test::KmeNetwork* RealKme::net_ = nullptr;
const std::string* RealKme::dir_ = nullptr;

TEST_F(RealKme, EtsiClientTalksToTheRealKme) {
  const auto bob = net_->sae("bob");
  auto client = qkd::etsi::Client::create(
      {net_->bob().url, bob.cert_file, bob.key_file, bob.ca_file, std::chrono::milliseconds(5000)});
  ASSERT_TRUE(client.ok()) << client.error().message;
  // The application's queued errors and marks survive the first call (a new connection:
  // qkd-kms sends TLS 1.3 session tickets, which libssl reads with the first reply) and the
  // next (kept alive): FakeKmeTest.CallsLeaveTheApplicationsErrorsAndMarks, with the real KME.
  for (const char* call : {"the first call, on a new connection", "a call kept alive"}) {
    qkd::test_prov::expect_call_leaves_application_errors(call, [&] {
      auto status = (*client)->status("alice");
      ASSERT_TRUE(status.ok()) << status.error().message;
      EXPECT_EQ(status->slave_sae_id, "alice");
      EXPECT_GT(status->stored_key_count, 0);
    });
  }
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
  EXPECT_EQ(share[0], 0x03);  // wire version 3
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
  // An upper bound: version, "bob", key_ID, count, and up to announce_keys (16) key_IDs
  // announced to the share's client_id.
  EXPECT_EQ(ct_len, 2U + 3U + 16U + 1U + 16U * 16U);
  std::vector<unsigned char> ct(ct_len), server_secret(secret_len);
  ASSERT_EQ(EVP_PKEY_encapsulate(ectx, ct.data(), &ct_len, server_secret.data(), &secret_len), 1)
      << drain_errors();
  EVP_PKEY_CTX_free(ectx);
  EXPECT_EQ(ct_len, 2U + 3U + 16U + 1U);  // a client_id seen once: nothing announced
  ct.resize(ct_len);

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
  const unsigned char garbage[] = {0x03, 0x03, 'b', 'o', 'b', 0x00};
  EXPECT_NE(EVP_PKEY_decapsulate(dctx, client_secret.data(), &out_len, garbage, sizeof garbage), 1);
  EXPECT_NE(drain_errors().find("malformed qkd ciphertext"), std::string::npos);
  EVP_PKEY_CTX_free(dctx);

  // Garbage share at the server: refused, no crash.
  EVP_PKEY_CTX* p2 = EVP_PKEY_CTX_new_from_name(server_lib.get(), "qkd", nullptr);
  ASSERT_EQ(EVP_PKEY_paramgen_init(p2), 1);
  EVP_PKEY* peer2 = nullptr;
  ASSERT_EQ(EVP_PKEY_paramgen(p2, &peer2), 1);
  EVP_PKEY_CTX_free(p2);
  const unsigned char bad_share[] = {0x03, 0x05, 'a', 'l', '/', 'c', 'e'};
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

// Every group the provider advertises (its TLS-GROUP capability, not a list kept here):
// a full TLS 1.3 handshake pinned to that group against the real KMEs, the group seen by
// name on both sides, data both ways and equal exporter secrets.
void PrintTo(const AdvertisedGroup& g, std::ostream* os) { *os << g.name; }

class EveryGroup : public RealKme, public ::testing::WithParamInterface<AdvertisedGroup> {};

TEST_P(EveryGroup, HandshakeNegotiatesTheGroupAndDataCrosses) {
  const AdvertisedGroup& group = GetParam();
  auto s = sides(client_cnf(), server_cnf(), group.name);
  ASSERT_TRUE(s.client && s.server);
  for (int i = 0; i < 2; ++i) {
    Handshake h = handshake(s.client.get(), s.server.get());
    ASSERT_TRUE(h.ok) << group.name << "\nclient: " << h.client_errors
                      << "\nserver: " << h.server_errors << "\n"
                      << net_->log_tail(net_->bob(), 10);
    const int client_nid = static_cast<int>(SSL_get_negotiated_group(h.client.get()));
    const int server_nid = static_cast<int>(SSL_get_negotiated_group(h.server.get()));
    EXPECT_EQ(static_cast<unsigned int>(client_nid & 0xFFFF), group.codepoint);
    EXPECT_STREQ(SSL_group_to_name(h.client.get(), client_nid), group.name.c_str());
    EXPECT_STREQ(SSL_group_to_name(h.server.get(), server_nid), group.name.c_str());
    EXPECT_EQ(SSL_version(h.client.get()), TLS1_3_VERSION);

    const std::string ping = "ping over " + group.name;
    const std::string pong = "pong over " + group.name;
    char buf[64] = {0};
    ASSERT_EQ(SSL_write(h.client.get(), ping.data(), static_cast<int>(ping.size())),
              static_cast<int>(ping.size()));
    ASSERT_EQ(SSL_read(h.server.get(), buf, sizeof buf), static_cast<int>(ping.size()));
    EXPECT_EQ(std::string(buf, ping.size()), ping);
    ASSERT_EQ(SSL_write(h.server.get(), pong.data(), static_cast<int>(pong.size())),
              static_cast<int>(pong.size()));
    ASSERT_EQ(SSL_read(h.client.get(), buf, sizeof buf), static_cast<int>(pong.size()));
    EXPECT_EQ(std::string(buf, pong.size()), pong);

    unsigned char a[32], b[32];
    ASSERT_EQ(SSL_export_keying_material(h.client.get(), a, sizeof a, "EXPORTER-qkd-test", 17,
                                         nullptr, 0, 0), 1);
    ASSERT_EQ(SSL_export_keying_material(h.server.get(), b, sizeof b, "EXPORTER-qkd-test", 17,
                                         nullptr, 0, 0), 1);
    EXPECT_EQ(0, std::memcmp(a, b, sizeof a));
  }
}

INSTANTIATE_TEST_SUITE_P(Advertised, EveryGroup, ::testing::ValuesIn(advertised_groups()),
                         [](const ::testing::TestParamInfo<AdvertisedGroup>& info) {
                           return info.param.name;  // "qkd", "x25519_qkd", "p256_qkd"
                         });

TEST(AdvertisedGroups, AreTheThreeOfTheTable) {
  const auto groups = advertised_groups();
  ASSERT_EQ(groups.size(), 3U);
  EXPECT_EQ(groups[0].name, "qkd");
  EXPECT_EQ(groups[1].name, "x25519_qkd");
  EXPECT_EQ(groups[2].name, "p256_qkd");
}

// Hostile input to the hybrids at the EVP level libssl uses (server: set the peer's share,
// encapsulate; client: decapsulate): each refused with an error that says why, no crash,
// and no key spent at the KME for a bad classical part.
struct HybridCase {
  const char* group;
  std::size_t classical_len;
  friend void PrintTo(const HybridCase& c, std::ostream* os) { *os << c.group; }
};

class HybridHostile : public RealKme, public ::testing::WithParamInterface<HybridCase> {
 protected:
  using Bytes = std::vector<unsigned char>;

  static EVP_PKEY* empty_key(OSSL_LIB_CTX* lib, const char* group) {
    EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(lib, group, nullptr);
    EVP_PKEY* key = nullptr;
    EXPECT_EQ(EVP_PKEY_paramgen_init(pctx), 1);
    EXPECT_EQ(EVP_PKEY_paramgen(pctx, &key), 1);
    EVP_PKEY_CTX_free(pctx);
    return key;
  }
  static EVP_PKEY* own_key(OSSL_LIB_CTX* lib, const char* group) {
    EVP_PKEY_CTX* kctx = EVP_PKEY_CTX_new_from_name(lib, group, nullptr);
    EVP_PKEY* key = nullptr;
    EXPECT_EQ(EVP_PKEY_keygen_init(kctx), 1);
    EXPECT_EQ(EVP_PKEY_keygen(kctx, &key), 1) << drain_errors();
    EVP_PKEY_CTX_free(kctx);
    return key;
  }
  static Bytes share_of(EVP_PKEY* key) {
    unsigned char* raw = nullptr;
    const size_t len = EVP_PKEY_get1_encoded_public_key(key, &raw);
    Bytes out(raw, raw + len);
    OPENSSL_free(raw);
    return out;
  }
  // Sets `share` as the peer's share; returns the error text ("" if accepted).
  static std::string try_share(OSSL_LIB_CTX* lib, const char* group, const Bytes& share) {
    EVP_PKEY* key = empty_key(lib, group);
    const int rc = EVP_PKEY_set1_encoded_public_key(key, share.data(), share.size());
    EVP_PKEY_free(key);
    const std::string errors = drain_errors();
    return rc == 1 ? std::string() : errors + "(refused)";
  }
  static std::string try_ciphertext(OSSL_LIB_CTX* lib, EVP_PKEY* own, const Bytes& ct) {
    EVP_PKEY_CTX* dctx = EVP_PKEY_CTX_new_from_pkey(lib, own, nullptr);
    EXPECT_EQ(EVP_PKEY_decapsulate_init(dctx, nullptr), 1);
    unsigned char secret[64];
    size_t len = sizeof secret;
    const int rc = EVP_PKEY_decapsulate(dctx, secret, &len, ct.data(), ct.size());
    EVP_PKEY_CTX_free(dctx);
    const std::string errors = drain_errors();
    return rc == 1 ? std::string() : errors + "(refused)";
  }
};

TEST_P(HybridHostile, FullEvpFlowThenBadSharesAndCiphertexts) {
  const HybridCase& c = GetParam();
  auto client_lib = load_libctx(client_cnf());
  auto server_lib = load_libctx(server_cnf());
  ASSERT_TRUE(client_lib && server_lib) << drain_errors();

  // The honest flow: share = classical || qkd share, ct = classical || qkd ct, 64-byte secret.
  EVP_PKEY* client_key = own_key(client_lib.get(), c.group);
  ASSERT_NE(client_key, nullptr);
  const Bytes share = share_of(client_key);
  ASSERT_EQ(share.size(), c.classical_len + 2 + 5 + 16 + 1 + 16);  // "alice", a client_id
  EXPECT_EQ(share[c.classical_len], 0x03);  // wire version 3
  if (c.classical_len == 65) {
    EXPECT_EQ(share[0], 0x04);
  }
  EVP_PKEY* peer = empty_key(server_lib.get(), c.group);
  ASSERT_EQ(EVP_PKEY_set1_encoded_public_key(peer, share.data(), share.size()), 1)
      << drain_errors();
  EVP_PKEY_CTX* ectx = EVP_PKEY_CTX_new_from_pkey(server_lib.get(), peer, nullptr);
  ASSERT_EQ(EVP_PKEY_encapsulate_init(ectx, nullptr), 1);
  size_t ct_len = 0;
  size_t secret_len = 0;
  ASSERT_EQ(EVP_PKEY_encapsulate(ectx, nullptr, &ct_len, nullptr, &secret_len), 1);
  EXPECT_EQ(ct_len, c.classical_len + 2 + 3 + 16 + 1 + 16 * 16);  // "bob", up to 16 announced
  EXPECT_EQ(secret_len, 64U);
  Bytes ct(ct_len), server_secret(secret_len);
  ASSERT_EQ(EVP_PKEY_encapsulate(ectx, ct.data(), &ct_len, server_secret.data(), &secret_len), 1)
      << drain_errors();
  EVP_PKEY_CTX_free(ectx);
  ASSERT_EQ(ct_len, c.classical_len + 2 + 3 + 16 + 1);  // nothing announced to a new client_id
  ct.resize(ct_len);
  EVP_PKEY_CTX* dctx = EVP_PKEY_CTX_new_from_pkey(client_lib.get(), client_key, nullptr);
  ASSERT_EQ(EVP_PKEY_decapsulate_init(dctx, nullptr), 1);
  size_t out_len = 64;
  Bytes client_secret(64);
  ASSERT_EQ(EVP_PKEY_decapsulate(dctx, client_secret.data(), &out_len, ct.data(), ct.size()), 1)
      << drain_errors();
  EVP_PKEY_CTX_free(dctx);
  EXPECT_EQ(out_len, 64U);
  EXPECT_EQ(client_secret, server_secret);

  // Hostile shares at the server.
  const Bytes classical(share.begin(), share.begin() + static_cast<long>(c.classical_len));
  const Bytes qkd_part(share.begin() + static_cast<long>(c.classical_len), share.end());
  std::vector<std::pair<std::string, Bytes>> bad_shares = {
      {"empty", {}},
      {"classical part only", classical},
      {"qkd part only", qkd_part},
      {"classical one byte short", Bytes(share.begin() + 1, share.end())},
      {"trailing byte", [&] { Bytes b = share; b.push_back(0); return b; }()},
      {"truncated qkd part", Bytes(share.begin(), share.end() - 1)},
  };
  if (c.classical_len == 65) {
    bad_shares.push_back({"compressed point", [&] { Bytes b = share; b[0] = 0x02; return b; }()});
    bad_shares.push_back({"infinity", [&] { Bytes b = share; b[0] = 0x00; return b; }()});
    bad_shares.push_back({"off the curve", [&] { Bytes b = share; b[64] ^= 1; return b; }()});
  }
  for (const auto& [what, bytes] : bad_shares) {
    const std::string errors = try_share(server_lib.get(), c.group, bytes);
    EXPECT_NE(errors.find("malformed qkd key share"), std::string::npos) << what << ": " << errors;
  }

  // X25519's small-order point imports (any 32 bytes do) but gives no secret: encapsulate
  // fails before the KME is asked for a key.
  if (c.classical_len == 32) {
    Bytes zero_point = share;
    std::fill(zero_point.begin(), zero_point.begin() + 32, 0);
    EVP_PKEY* bad_peer = empty_key(server_lib.get(), c.group);
    ASSERT_EQ(EVP_PKEY_set1_encoded_public_key(bad_peer, zero_point.data(), zero_point.size()), 1);
    EVP_PKEY_CTX* e2 = EVP_PKEY_CTX_new_from_pkey(server_lib.get(), bad_peer, nullptr);
    ASSERT_EQ(EVP_PKEY_encapsulate_init(e2, nullptr), 1);
    Bytes ct2(ct_len + 16 * 16), secret2(64, 0xAA);  // room for announcements
    size_t l1 = ct2.size();
    size_t l2 = secret2.size();
    EXPECT_NE(EVP_PKEY_encapsulate(e2, ct2.data(), &l1, secret2.data(), &l2), 1);
    const std::string errors = drain_errors();
    EXPECT_NE(errors.find("ECDH with the peer's public key failed"), std::string::npos) << errors;
    EXPECT_EQ(secret2, Bytes(64, 0)) << "the partial secret is cleansed";
    EVP_PKEY_CTX_free(e2);
    EVP_PKEY_free(bad_peer);
  }

  // Hostile ciphertexts at the client (all refused before any KME call).
  const Bytes ct_classical(ct.begin(), ct.begin() + static_cast<long>(c.classical_len));
  std::vector<std::pair<std::string, Bytes>> bad_cts = {
      {"empty", {}},
      {"classical part only", ct_classical},
      {"classical one byte short", Bytes(ct.begin() + 1, ct.end())},
      {"trailing byte", [&] { Bytes b = ct; b.push_back(0); return b; }()},
      {"no announcement count", Bytes(ct.begin(), ct.end() - 1)},
      {"truncated key_ID", Bytes(ct.begin(), ct.end() - 2)},
      {"announces a key to a share without client_id... or more than it carries",
       [&] { Bytes b = ct; b.back() = 1; return b; }()},
  };
  if (c.classical_len == 65) {
    bad_cts.push_back({"compressed point", [&] { Bytes b = ct; b[0] = 0x03; return b; }()});
    bad_cts.push_back({"off the curve", [&] { Bytes b = ct; b[64] ^= 1; return b; }()});
  } else {
    bad_cts.push_back({"small-order point", [&] {
                         Bytes b = ct;
                         std::fill(b.begin(), b.begin() + 32, 0);
                         return b;
                       }()});
  }
  for (const auto& [what, bytes] : bad_cts) {
    const std::string errors = try_ciphertext(client_lib.get(), client_key, bytes);
    // An empty input is refused by libcrypto itself (a NULL buffer), before the provider.
    const char* expected = bytes.empty() ? "(refused)" : "malformed qkd ciphertext";
    EXPECT_NE(errors.find(expected), std::string::npos) << what << ": " << errors;
  }
  EVP_PKEY_free(peer);
  EVP_PKEY_free(client_key);
}

INSTANTIATE_TEST_SUITE_P(Hybrids, HybridHostile,
                         ::testing::Values(HybridCase{"x25519_qkd", 32}, HybridCase{"p256_qkd", 65}),
                         [](const ::testing::TestParamInfo<HybridCase>& info) {
                           return std::string(info.param.group);
                         });

}  // namespace
}  // namespace qkd::test_prov
