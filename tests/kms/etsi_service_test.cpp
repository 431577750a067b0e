// ETSI 014 handlers as pure functions over an in-memory store (no network).
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "qkd/kms/api.hpp"
#include "qkd/kms/util.hpp"
#include "qkd/test/kme_config.hpp"

namespace {

using nlohmann::json;
using qkd::kms::ApiRequest;
using qkd::kms::ApiResponse;
using qkd::kms::Config;
using qkd::kms::Direction;
using qkd::kms::KeyAssignment;

std::size_t decoded_len(const std::string& b64) {
  std::vector<unsigned char> out(b64.size());
  int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(b64.data()),
                          static_cast<int>(b64.size()));
  std::size_t pad = 0;
  if (!b64.empty() && b64.back() == '=') ++pad;
  if (b64.size() > 1 && b64[b64.size() - 2] == '=') ++pad;
  return static_cast<std::size_t>(n) - pad;
}

class EtsiServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    alice_store->set_assignment_listener([this](const std::vector<KeyAssignment>& as) {
      notices.insert(notices.end(), as.begin(), as.end());
    });
    std::vector<std::uint8_t> pool(8192);
    for (std::size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<std::uint8_t>(i * 13);
    alice_store->commit(pool);
    bob_store->commit(pool);
  }
  void forward_notices() {
    for (auto& a : notices) {
      ASSERT_TRUE(bob_store->apply_peer_assignment(a).ok());
    }
    notices.clear();
  }
  ApiResponse at_alice(const std::string& caller, std::string method, std::string target,
                       std::string body = "") {
    return alice.handle(caller, ApiRequest{std::move(method), std::move(target), std::move(body)});
  }
  ApiResponse at_bob(const std::string& caller, std::string method, std::string target,
                     std::string body = "") {
    return bob.handle(caller, ApiRequest{std::move(method), std::move(target), std::move(body)});
  }
  // A GET as the transport runs it on its I/O thread, where the handler may not wait.
  static ApiResponse on_io_thread(qkd::kms::EtsiService& kme, const std::string& caller,
                                  const std::string& target) {
    ApiRequest r{"GET", target, ""};
    r.may_wait = false;
    return kme.handle(caller, r);
  }
  // dec_keys, naming `master`, of a key_ID nobody assigned.
  static std::string unknown_key_target(const std::string& master) {
    return "/api/v1/keys/" + master + "/dec_keys?key_ID=123e4567-e89b-42d3-a456-426614174000";
  }
  // The same on the I/O thread, which answers it there: no wait for a notice.
  ApiResponse unknown_key_at_once(const std::string& caller, const std::string& master) {
    ApiResponse r = on_io_thread(bob, caller, unknown_key_target(master));
    EXPECT_FALSE(r.needs_wait) << master;
    return r;
  }
  static std::string message(const ApiResponse& r) {
    return json::parse(r.body).at("message").get<std::string>();
  }

  Config alice_cfg = qkd::test::kme_config("alice-kme", {"alice"}, "bob-kme", {"bob", "carol"}, 50);
  Config bob_cfg = qkd::test::kme_config("bob-kme", {"bob", "carol", "dave"}, "alice-kme", {"alice"},
                                          50);
  std::unique_ptr<qkd::kms::KeyStore> alice_store =
      qkd::kms::make_memory_key_store(Direction::kAlice);
  std::unique_ptr<qkd::kms::KeyStore> bob_store = qkd::kms::make_memory_key_store(Direction::kBob);
  std::vector<KeyAssignment> notices;
  qkd::kms::EtsiService alice{alice_cfg, *alice_store, [] {
                                qkd::kms::LinkStats s;
                                s.up = true;
                                s.blocks = 7;
                                return s;
                              }};
  qkd::kms::EtsiService bob{bob_cfg, *bob_store, nullptr};
};

// Keys prepared for a pair (store.prepared_keys) are counted as stored for that pair only.
TEST_F(EtsiServiceTest, StatusCountsThePairsPreparedKeys) {
  alice_store->set_prepared_keys(8);
  ASSERT_EQ(at_alice("alice", "GET", "/api/v1/keys/bob/enc_keys").status, 200u);
  ASSERT_EQ(alice_store->stats().prepared_keys, 8u);
  auto stored = [&](const std::string& slave) {
    ApiResponse r = at_alice("alice", "GET", "/api/v1/keys/" + slave + "/status");
    EXPECT_EQ(r.status, 200u) << r.body;
    return json::parse(r.body).at("stored_key_count").get<std::uint64_t>();
  };
  EXPECT_EQ(stored("bob"), 4096u / 32 - 1);
  EXPECT_EQ(stored("carol"), 4096u / 32 - 1 - 8);
}

TEST_F(EtsiServiceTest, UnknownCallerIs401WithoutBody) {
  ApiResponse r = at_alice("mallory", "GET", "/api/v1/keys/bob/status");
  EXPECT_EQ(r.status, 401u);
  EXPECT_TRUE(r.body.empty());
}

TEST_F(EtsiServiceTest, StatusHasEveryField) {
  ApiResponse r = at_alice("alice", "GET", "/api/v1/keys/bob/status");
  ASSERT_EQ(r.status, 200u) << r.body;
  json j = json::parse(r.body);
  EXPECT_EQ(j["source_KME_ID"], "alice-kme");
  EXPECT_EQ(j["target_KME_ID"], "bob-kme");
  EXPECT_EQ(j["master_SAE_ID"], "alice");
  EXPECT_EQ(j["slave_SAE_ID"], "bob");
  EXPECT_EQ(j["key_size"], 256);
  EXPECT_EQ(j["stored_key_count"], 4096 / 32);
  EXPECT_EQ(j["max_key_count"], 100000);
  EXPECT_EQ(j["max_key_per_request"], 128);
  EXPECT_EQ(j["max_key_size"], 8192);
  EXPECT_EQ(j["min_key_size"], 64);
  EXPECT_EQ(j["max_SAE_ID_count"], 1);
  EXPECT_EQ(j["status_extension"]["link"]["state"], "up");
  EXPECT_EQ(j["status_extension"]["link"]["blocks"], 7);
  EXPECT_EQ(at_alice("alice", "GET", "/api/v1/keys/nobody/status").status, 400u);
}

TEST_F(EtsiServiceTest, EncKeysGetAndPost) {
  ApiResponse g = at_alice("alice", "GET", "/api/v1/keys/bob/enc_keys?number=2&size=128");
  ASSERT_EQ(g.status, 200u) << g.body;
  json j = json::parse(g.body);
  ASSERT_EQ(j["keys"].size(), 2u);
  for (const auto& k : j["keys"]) {
    EXPECT_TRUE(qkd::kms::is_uuid(k["key_ID"].get<std::string>()));
    EXPECT_EQ(decoded_len(k["key"].get<std::string>()), 16u);
  }
  ApiResponse p = at_alice("alice", "POST", "/api/v1/keys/bob/enc_keys",
                           R"({"number": 3, "size": 64, "extension_optional": [{"x_y": 1}]})");
  ASSERT_EQ(p.status, 200u) << p.body;
  EXPECT_EQ(json::parse(p.body)["keys"].size(), 3u);
  // The Key container is written by hand (no JSON tree holding keys): byte for byte what a
  // JSON library writes, for one key and several.
  EXPECT_EQ(p.body, json::parse(p.body).dump());
  EXPECT_EQ(g.body, json::parse(g.body).dump());
  // Empty body: one key of the default size.
  ApiResponse e = at_alice("alice", "POST", "/api/v1/keys/bob/enc_keys", "");
  ASSERT_EQ(e.status, 200u) << e.body;
  EXPECT_EQ(decoded_len(json::parse(e.body)["keys"][0]["key"].get<std::string>()), 32u);
}

TEST_F(EtsiServiceTest, EncKeysErrors) {
  auto enc_get = [&](const std::string& q) {
    return at_alice("alice", "GET", "/api/v1/keys/bob/enc_keys" + q);
  };
  auto enc_post = [&](const std::string& body) {
    return at_alice("alice", "POST", "/api/v1/keys/bob/enc_keys", body);
  };
  EXPECT_EQ(message(enc_get("?size=100")), "size shall be a multiple of 8");
  EXPECT_EQ(message(enc_post(R"({"size": 12})")), "size shall be a multiple of 8");
  EXPECT_EQ(enc_get("?size=32").status, 400u);     // below min_key_size
  EXPECT_EQ(enc_get("?size=16384").status, 400u);  // above max_key_size
  EXPECT_EQ(enc_get("?number=129").status, 400u);
  EXPECT_EQ(enc_get("?number=0").status, 400u);
  EXPECT_EQ(enc_get("?number=abc").status, 400u);
  EXPECT_EQ(enc_get("?colour=red").status, 400u);
  EXPECT_EQ(message(enc_post(R"({"extension_mandatory": [{"abc_route_type": "direct"}]})")),
            "not all extension_mandatory parameters are supported");
  EXPECT_EQ(enc_post("{not json").status, 400u);
  EXPECT_EQ(enc_post("[1,2]").status, 400u);
  EXPECT_EQ(enc_post(R"({"number": -1})").status, 400u);
  EXPECT_EQ(enc_post(R"({"number": "2"})").status, 400u);
  EXPECT_EQ(enc_post(R"({"additional_slave_SAE_IDs": "carol"})").status, 400u);
  EXPECT_EQ(enc_post(R"({"additional_slave_SAE_IDs": ["carol", "dave"]})").status, 400u);
  EXPECT_EQ(at_alice("alice", "GET", "/api/v1/keys/alice/enc_keys").status, 400u);
  // Not enough key: 503 with a message; nothing consumed.
  ApiResponse big = enc_post(R"({"number": 128, "size": 8192})");
  EXPECT_EQ(big.status, 503u);
  EXPECT_NE(message(big).find("not enough key"), std::string::npos);
  EXPECT_TRUE(notices.empty());
}

// A body naming a member twice is refused, naming the member: the JSON parser would keep
// the last one silently, while a proxy or a log reading the first would see another
// request than the one served.
TEST_F(EtsiServiceTest, RepeatedBodyMembersAre400) {
  const std::string enc = "/api/v1/keys/bob/enc_keys";
  const std::string dec = "/api/v1/keys/alice/dec_keys";
  ApiResponse number = at_alice("alice", "POST", enc, R"({"number": 2, "number": 1})");
  EXPECT_EQ(number.status, 400u) << number.body;
  EXPECT_NE(message(number).find("\"number\" appears twice"), std::string::npos) << number.body;
  ApiResponse ext =
      at_alice("alice", "POST", enc, R"({"size": 64, "extension_optional": [{"x": 1, "x": 2}]})");
  EXPECT_EQ(ext.status, 400u) << ext.body;
  EXPECT_NE(message(ext).find("\"extension_optional[0].x\" appears twice"), std::string::npos)
      << ext.body;
  EXPECT_TRUE(notices.empty());  // nothing was allocated

  ApiResponse enc_ok = at_alice("alice", "POST", enc, R"({"number": 2})");
  ASSERT_EQ(enc_ok.status, 200u) << enc_ok.body;
  forward_notices();
  const json keys = json::parse(enc_ok.body)["keys"];
  const std::string a = keys[0]["key_ID"], b = keys[1]["key_ID"];
  ApiResponse lists = at_bob("bob", "POST", dec,
                             fmt::format(R"({{"key_IDs": [{{"key_ID": "{}"}}], )"
                                         R"("key_IDs": [{{"key_ID": "{}"}}]}})",
                                         a, b));
  EXPECT_EQ(lists.status, 400u) << lists.body;
  EXPECT_NE(message(lists).find("\"key_IDs\" appears twice"), std::string::npos) << lists.body;
  ApiResponse entry = at_bob("bob", "POST", dec,
                             fmt::format(R"({{"key_IDs": [{{"key_ID": "{}"}}, )"
                                         R"({{"key_ID": "{}", "key_ID": "{}"}}]}})",
                                         a, a, b));
  EXPECT_EQ(entry.status, 400u) << entry.body;
  EXPECT_NE(message(entry).find("\"key_IDs[1].key_ID\" appears twice"), std::string::npos)
      << entry.body;
  // Neither refusal consumed a key: both are still delivered, once.
  ApiResponse got =
      at_bob("bob", "POST", dec, json{{"key_IDs", {{{"key_ID", a}}, {{"key_ID", b}}}}}.dump());
  EXPECT_EQ(got.status, 200u) << got.body;
}

TEST_F(EtsiServiceTest, DecKeysAuthorizationAndOneUse) {
  ApiResponse enc =
      at_alice("alice", "POST", "/api/v1/keys/bob/enc_keys",
               R"({"number": 2, "size": 256, "additional_slave_SAE_IDs": ["carol"]})");
  ASSERT_EQ(enc.status, 200u) << enc.body;
  forward_notices();
  json keys = json::parse(enc.body)["keys"];
  const std::string id0 = keys[0]["key_ID"], id1 = keys[1]["key_ID"];
  // dave is an SAE of bob-kme but not a slave of these keys: 401.
  EXPECT_EQ(at_bob("dave", "GET", "/api/v1/keys/alice/dec_keys?key_ID=" + id0).status, 401u);
  // Wrong master in the path: 401.
  EXPECT_EQ(at_bob("bob", "GET", "/api/v1/keys/carol/dec_keys?key_ID=" + id0).status, 401u);
  // The slave gets it (GET), the additional slave gets the other (POST).
  ApiResponse d0 = at_bob("bob", "GET", "/api/v1/keys/alice/dec_keys?key_ID=" + id0);
  ASSERT_EQ(d0.status, 200u) << d0.body;
  EXPECT_EQ(json::parse(d0.body)["keys"][0]["key"], keys[0]["key"]);
  ApiResponse d1 = at_bob("carol", "POST", "/api/v1/keys/alice/dec_keys",
                          json{{"key_IDs", {{{"key_ID", id1}}}}}.dump());
  ASSERT_EQ(d1.status, 200u) << d1.body;
  EXPECT_EQ(json::parse(d1.body)["keys"][0]["key"], keys[1]["key"]);
  // Second use: 400 not found.
  ApiResponse again = at_bob("bob", "GET", "/api/v1/keys/alice/dec_keys?key_ID=" + id0);
  EXPECT_EQ(again.status, 400u);
  EXPECT_EQ(message(again), "one or more keys specified are not found on KME");
}

// The transport runs a request on its I/O thread (may_wait = false). dec_keys answers there
// when it can; for a key_ID it has not heard of (its notice may be in flight) it asks to be
// run again when it arrives (naming the key_IDs to wait for), and consumes nothing; once the
// wait is over (wait_over) it answers from what it has.
TEST_F(EtsiServiceTest, DecKeysThatMayNotWaitAsksToWaitOnlyForAKeyNotHeardOf) {
  const auto no_wait = [this](const std::string& target) {
    return on_io_thread(bob, "bob", target);
  };
  ApiResponse enc = at_alice("alice", "GET", "/api/v1/keys/bob/enc_keys");
  ASSERT_EQ(enc.status, 200u) << enc.body;
  const std::string id = json::parse(enc.body)["keys"][0]["key_ID"];
  const std::string target = "/api/v1/keys/alice/dec_keys?key_ID=" + id;
  // The notice has not arrived: run me where I may wait.
  ApiResponse early = no_wait(target);
  EXPECT_TRUE(early.needs_wait);
  EXPECT_EQ(early.wait_for, std::vector<std::string>{id});  // what to wait for
  EXPECT_FALSE(bob_store->knows_all({id}));
  // The wait is over (keys.dec_wait_ms passed): answered from what is here, at once.
  ApiRequest over{"GET", target, ""};
  over.may_wait = false;
  over.wait_over = true;
  ApiResponse late = bob.handle("bob", over);
  EXPECT_FALSE(late.needs_wait);
  EXPECT_EQ(late.status, 400u) << late.body;
  EXPECT_FALSE(bob_store->knows_all({id}));  // nothing consumed
  // Malformed requests are answered at once all the same.
  ApiResponse bad = no_wait("/api/v1/keys/alice/dec_keys?key_ID=not-a-uuid");
  EXPECT_FALSE(bad.needs_wait);
  EXPECT_EQ(bad.status, 400u);
  // Notice in: answered on the I/O thread, the same key as the master's.
  forward_notices();
  EXPECT_TRUE(bob_store->knows_all({id}));
  ApiResponse got = no_wait(target);
  ASSERT_FALSE(got.needs_wait);
  ASSERT_EQ(got.status, 200u) << got.body;
  EXPECT_EQ(json::parse(got.body)["keys"][0]["key"], json::parse(enc.body)["keys"][0]["key"]);
  // Delivered: known, so a second request is refused at once, not sent to wait.
  ApiResponse again = no_wait(target);
  EXPECT_FALSE(again.needs_wait);
  EXPECT_EQ(again.status, 400u);
  EXPECT_EQ(message(again), "one or more keys specified are not found on KME");
}

// dec_keys naming a master that is neither an SAE of the peer KME nor of this one: no notice
// can bring its keys, so the answer is the one after the wait (400 "not found" for a key_ID
// not held here), at once and not after keys.dec_wait_ms (5 s here); the I/O thread answers
// it without handing it to a worker.
TEST_F(EtsiServiceTest, DecKeysForAMasterNoKmeServesDoesNotWait) {
  bob_cfg.keys.dec_wait_ms = 5000;
  EXPECT_EQ(unknown_key_at_once("bob", "nobody").status, 400u);
  const auto t0 = std::chrono::steady_clock::now();
  ApiResponse r = at_bob("bob", "GET", unknown_key_target("nobody"));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(r.status, 400u) << r.body;
  EXPECT_EQ(message(r), "one or more keys specified are not found on KME");
  EXPECT_LT(took, std::chrono::milliseconds(2500)) << "waited for a notice that cannot come";
  // A master the peer KME serves still waits (bounded here by a short wait).
  bob_cfg.keys.dec_wait_ms = 300;
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_EQ(at_bob("bob", "GET", unknown_key_target("alice")).status, 400u);
  EXPECT_GE(std::chrono::steady_clock::now() - t1, std::chrono::milliseconds(300));
}

// dec_keys naming a master SAE of this KME: its keys are written here when its enc_keys
// allocates them (the peer's notices never bring them), so an unknown key_ID is "not found"
// at once: no wait for a notice, and not the link-down 503 "may still be on its way".
TEST_F(EtsiServiceTest, DecKeysForALocalMasterNeitherWaitsNorBlamesTheLink) {
  bob_cfg.keys.dec_wait_ms = 5000;
  ApiResponse at_once = unknown_key_at_once("dave", "carol");
  EXPECT_EQ(at_once.status, 400u) << at_once.body;
  EXPECT_EQ(message(at_once), "one or more keys specified are not found on KME");
  qkd::kms::EtsiService link_down{bob_cfg, *bob_store, [] { return qkd::kms::LinkStats{}; }};
  ApiResponse down = link_down.handle("dave", ApiRequest{"GET", unknown_key_target("carol"), ""});
  EXPECT_EQ(down.status, 400u) << down.body;
  EXPECT_EQ(message(down), "one or more keys specified are not found on KME");
  // A master the peer KME serves, link down: its notice may still come, so 503.
  ApiResponse peer_master =
      link_down.handle("bob", ApiRequest{"GET", unknown_key_target("alice"), ""});
  EXPECT_EQ(peer_master.status, 503u) << peer_master.body;
}

TEST_F(EtsiServiceTest, DecKeysBadRequests) {
  const std::string dec = "/api/v1/keys/alice/dec_keys";
  EXPECT_EQ(at_bob("bob", "GET", dec).status, 400u);
  EXPECT_EQ(at_bob("bob", "GET", dec + "?key_ID=a&key_ID=b").status, 400u);
  EXPECT_EQ(message(at_bob("bob", "GET", dec + "?key_ID=not-a-uuid")),
            "one or more keys specified are not found on KME");
  EXPECT_EQ(at_bob("bob", "POST", dec, "{").status, 400u);
  EXPECT_EQ(at_bob("bob", "POST", dec, R"({"key_IDs": []})").status, 400u);
  EXPECT_EQ(at_bob("bob", "POST", dec, R"({"key_IDs": ["x"]})").status, 400u);
  EXPECT_EQ(at_bob("bob", "POST", dec, R"({"key_IDs": [{"key_ID": 5}]})").status, 400u);
  EXPECT_EQ(at_bob("bob", "GET", dec + "?key_ID=123e4567-e89b-42d3-a456-426614174000").status,
            400u);
}

TEST_F(EtsiServiceTest, HealthReportsLinkState) {
  ApiResponse up = at_alice("alice", "GET", "/health");
  ASSERT_EQ(up.status, 200u) << up.body;
  EXPECT_EQ(json::parse(up.body), (json{{"status", "ok"}, {"link", "up"}}));
  // A link without a session: still 200 (the KME works; enc_keys answers 503 meanwhile).
  qkd::kms::EtsiService no_link{alice_cfg, *alice_store, [] { return qkd::kms::LinkStats{}; }};
  ApiResponse down = no_link.health();
  ASSERT_EQ(down.status, 200u) << down.body;
  EXPECT_EQ(json::parse(down.body), (json{{"status", "ok"}, {"link", "down"}}));
  // Same caller check as the ETSI routes; other methods are 400.
  ApiResponse anon = at_alice("mallory", "GET", "/health");
  EXPECT_EQ(anon.status, 401u);
  EXPECT_TRUE(anon.body.empty());
  EXPECT_EQ(at_alice("alice", "POST", "/health").status, 400u);
}

// An SAE ID in the URL that is not UTF-8 gets the client error it deserves, in a body that
// is valid JSON, not a 503 from a JSON serialiser that refused the message quoting it.
TEST_F(EtsiServiceTest, NonUtf8SaeIdIsAClientError) {
  for (const char* target : {"/api/v1/keys/%FF/status", "/api/v1/keys/%C3%28/enc_keys",
                             "/api/v1/keys/%FE%FF/dec_keys?key_ID=x"}) {
    const auto r = at_alice("alice", "GET", target);
    EXPECT_EQ(r.status, 400u) << target << ": " << r.body;
    EXPECT_FALSE(json::parse(r.body, nullptr, false).is_discarded()) << target << ": " << r.body;
  }
}

}  // namespace
