// Admission control against real qkd-kms processes: a flooding SAE (or a flood naming one
// slave SAE) gets 503 + Retry-After while the others are still served; budgets refill;
// a refused request consumes nothing; bad admission settings are refused by name.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "qkd/test/etsi_helpers.hpp"
#include "qkd/test/kme_network.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using qkd::test::HttpResponse;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;

using qkd::test::dec_body;
using qkd::test::message_of;

std::size_t key_count(const HttpResponse& r) {
  const json j = r.json();
  return (j.is_discarded() || !j.contains("keys")) ? 0 : j.at("keys").size();
}

// One value of a metric sample line "name{labels} value" in a /metrics scrape (-1 if absent).
double sample(const std::string& scrape, const std::string& name_and_labels) {
  std::istringstream in(scrape);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name_and_labels + " ", 0) == 0) {
      return std::stod(line.substr(name_and_labels.size() + 1));
    }
  }
  return -1;
}

std::string scrape(const KmeNetwork& net) {
  auto r = net.client(net.alice(), "alice").get("/metrics");
  if (!r.ok() || r->status != 200) {
    ADD_FAILURE() << "scrape failed: " << (r.ok() ? r->body : r.error().message);
    return {};
  }
  return r->body;
}

// Runs `qkd-kms --check-config` on `cfg` (written next to the network's configs); returns
// the exit code and the output.
std::pair<int, std::string> check_config(const KmeNetwork& net, const json& cfg) {
  const auto path = net.dir() / "check.json";
  {
    std::ofstream f(path, std::ios::trunc);
    f << cfg.dump(2);
  }
  return qkd::test::run_command(fmt::format("'{}' --check-config --config '{}' 2>&1",
                                            qkd::test::kms_binary(), path.string()));
}

json read_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}

// Options with alice-kme's per-pair budget only: `keys` keys outstanding per pair over a
// window of an hour (no refill within a test), 10 keys per request at most.
KmeNetworkOptions pair_budget_only(int keys) {
  KmeNetworkOptions o;
  o.max_key_per_request = 10;
  o.customize = [keys](json& alice, json&) {
    alice["admission"] = {
        {"sae_keys_per_s", 0}, {"pair_keys_per_window", keys}, {"pair_window_s", 3600}};
  };
  return o;
}

// Asks `enc` again (every 100 ms, for 5 s) until it is served, as once a fetch report gave
// budget back; every other answer must be the budget's 503. The served response, if any.
std::optional<HttpResponse> served_once_budget_is_back(const std::function<HttpResponse()>& enc) {
  for (int i = 0; i < 50; ++i) {
    std::this_thread::sleep_for(100ms);
    HttpResponse r = enc();
    if (r.status == 200) {
      return r;
    }
    EXPECT_EQ(r.status, 503u) << r.body;
  }
  return std::nullopt;
}

// Per-SAE budget: alice floods, carol (another SAE at the same KME) is still served; the
// refusal is 503 + Retry-After + a message naming the budget, and takes nothing from the
// pool; the budget refills; tokens of a request that delivered nothing come back.
TEST(AdmissionTest, FloodingSaeIsRefusedWhileAnotherSaeIsServed) {
  KmeNetworkOptions o;
  o.extra_alice_saes = {"carol"};
  o.max_key_per_request = 10;
  // A small pool: once it is full again the link pauses, so that two scrapes can be
  // compared without a block (one every ~10 ms otherwise) landing between them.
  o.max_key_count = 100;
  o.customize = [](json& alice, json&) {
    alice["admission"] = {{"sae_keys_per_s", 2}, {"sae_burst", 20}, {"pair_keys_per_window", 0}};
  };
  auto net = qkd::test::start_network_with_keys(o, 60);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto carol = net->client(net->alice(), "carol");

  // Tokens of requests that the ETSI handlers refuse (400) are given back: three bad
  // requests of 10 keys and then two good ones fit in the burst of 20.
  for (int i = 0; i < 3; ++i) {
    auto bad = alice.get("/api/v1/keys/bob/enc_keys?number=10&size=7");
    ASSERT_TRUE(bad.ok()) << bad.error().message;
    EXPECT_EQ(bad->status, 400u) << bad->body;
  }
  std::vector<std::string> delivered_ids;
  std::optional<HttpResponse> refused;
  for (int i = 0; i < 40 && !refused; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys?number=10");
    ASSERT_TRUE(r.ok()) << r.error().message;
    if (r->status == 503) {
      refused = *r;
    } else {
      ASSERT_EQ(r->status, 200u) << r->body;
      EXPECT_EQ(key_count(*r), 10u);
      for (auto& id : qkd::test::key_ids(*r)) {
        delivered_ids.push_back(std::move(id));
      }
      EXPECT_LE(i, 3) << "the budget (burst 20, 2 keys/s) should be spent after a few requests";
    }
  }
  ASSERT_TRUE(refused) << "the flooding SAE was never refused";
  EXPECT_GE(delivered_ids.size(), 20u) << "the refunds of the 400s were lost: " << refused->body;
  EXPECT_NE(message_of(*refused).find("admission control"), std::string::npos) << refused->body;
  EXPECT_NE(message_of(*refused).find("\"alice\""), std::string::npos) << refused->body;
  EXPECT_NE(message_of(*refused).find("keys/s"), std::string::npos) << refused->body;
  ASSERT_FALSE(refused->retry_after.empty()) << "no Retry-After header";
  EXPECT_TRUE(std::regex_match(refused->retry_after, std::regex("[1-9][0-9]*")))
      << refused->retry_after;

  // No starvation: another SAE at the same KME is served at once.
  auto c = carol.get("/api/v1/keys/bob/enc_keys?number=5");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->status, 200u) << c->body;
  EXPECT_EQ(key_count(*c), 5u);

  // A refused request takes nothing from the pool: between two scrapes with no block
  // committed in between, refusals leave the pool as it was.
  bool compared = false;
  for (int attempt = 0; attempt < 20 && !compared; ++attempt) {
    const std::string before = scrape(*net);
    for (int i = 0; i < 5; ++i) {
      auto r = alice.get("/api/v1/keys/bob/enc_keys?number=10");
      ASSERT_TRUE(r.ok()) << r.error().message;
      if (r->status == 200) {
        for (auto& id : qkd::test::key_ids(*r)) {
          delivered_ids.push_back(std::move(id));
        }
      }
    }
    const std::string after = scrape(*net);
    const std::string committed = "qkd_kms_pool_committed_bytes{peer_kme_id=\"bob-kme\"}";
    const std::string local = "qkd_kms_pool_bytes{peer_kme_id=\"bob-kme\",direction=\"local\"}";
    const std::string refusals =
        "qkd_kms_admission_refusals_total{budget=\"sae\",master_sae=\"alice\"}";
    const double served_before = sample(before, "qkd_kms_keys_delivered_total{route=\"enc_keys\","
                                                "master_sae=\"alice\",slave_sae=\"bob\"}");
    const double served_after = sample(after, "qkd_kms_keys_delivered_total{route=\"enc_keys\","
                                              "master_sae=\"alice\",slave_sae=\"bob\"}");
    if (sample(before, committed) != sample(after, committed) || served_before != served_after) {
      continue;  // a block landed or a request was admitted meanwhile: compare again
    }
    EXPECT_EQ(sample(before, local), sample(after, local));
    EXPECT_EQ(sample(after, refusals), sample(before, refusals) + 5);
    compared = true;
  }
  EXPECT_TRUE(compared) << "never found two scrapes without a block or an admitted request";

  // The budget refills: alice is served again (waiting as long as it takes, up to 60 s).
  bool served_again = false;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (!served_again && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(500ms);
    auto r = alice.get("/api/v1/keys/bob/enc_keys?number=2");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_TRUE(r->status == 200 || r->status == 503) << r->status << " " << r->body;
    if (r->status == 200) {
      served_again = true;
      for (auto& id : qkd::test::key_ids(*r)) {
        delivered_ids.push_back(std::move(id));
      }
    }
  }
  EXPECT_TRUE(served_again) << "the per-SAE budget never refilled";

  // Every key alice was given is still fetchable by bob (dec_keys is not rate-limited).
  const auto bob = net->client(net->bob(), "bob");
  for (std::size_t i = 0; i < delivered_ids.size(); i += 10) {
    json ids = json::array();
    for (std::size_t j = i; j < std::min(delivered_ids.size(), i + 10); ++j) {
      ids.push_back({{"key_ID", delivered_ids[j]}});
    }
    auto d = bob.post("/api/v1/keys/alice/dec_keys", json{{"key_IDs", ids}}.dump());
    ASSERT_TRUE(d.ok()) << d.error().message;
    EXPECT_EQ(d->status, 200u) << d->body;
  }
}

// Per-pair budget: a flood of enc_keys naming slave "bob" (as from ClientHellos naming it)
// spends the (alice, bob) budget, but alice still gets keys for slave "dave".
TEST(AdmissionTest, FloodNamingOneSlaveDoesNotStarveAnother) {
  KmeNetworkOptions o;
  o.extra_bob_saes = {"dave"};
  o.max_key_per_request = 10;
  o.customize = [](json& alice, json&) {
    alice["admission"] = {{"sae_keys_per_s", 0},
                          {"pair_keys_per_window", 20},
                          {"pair_window_s", 3600}};
  };
  auto net = qkd::test::start_network_with_keys(o, 60);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  int ok = 0;
  std::optional<HttpResponse> refused;
  for (int i = 0; i < 10 && !refused; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys?number=10");
    ASSERT_TRUE(r.ok()) << r.error().message;
    if (r->status == 503) {
      refused = *r;
    } else {
      ASSERT_EQ(r->status, 200u) << r->body;
      ++ok;
    }
  }
  EXPECT_EQ(ok, 2) << "20 keys per window, 10 per request";
  ASSERT_TRUE(refused);
  EXPECT_NE(message_of(*refused).find("\"alice\" -> \"bob\""), std::string::npos)
      << refused->body;
  ASSERT_FALSE(refused->retry_after.empty());
  EXPECT_GE(std::stoul(refused->retry_after), 1u);

  // Another slave of the same master is not affected.
  auto d = alice.get("/api/v1/keys/dave/enc_keys?number=10");
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->status, 200u) << d->body;
  // A request with an additional slave is charged to both pairs: refused because of bob.
  auto multi = alice.post("/api/v1/keys/dave/enc_keys",
                          json{{"number", 1}, {"additional_slave_SAE_IDs", {"bob"}}}.dump());
  ASSERT_TRUE(multi.ok()) << multi.error().message;
  EXPECT_EQ(multi->status, 503u) << multi->body;

  const std::string m = scrape(*net);
  EXPECT_GE(sample(m, "qkd_kms_admission_refusals_total{budget=\"pair\",master_sae=\"alice\"}"),
            2.0);

  // The daemon refuses bad admission settings and names the field.
  json cfg = read_json(net->alice().config_file);
  cfg["admission"] = {{"sae_keys_per_s", 100}, {"sae_burst", 5}};
  auto [code, out] = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("admission.sae_burst"), std::string::npos) << out;
  cfg["admission"] = {{"pair_window_s", "1"}};
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("admission.pair_window_s"), std::string::npos) << out;
  cfg["admission"] = {{"sae_keys_per_second", 1}};
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("admission.sae_keys_per_second: unknown key"), std::string::npos) << out;
  cfg["admission"] = {{"sae_keys_per_s", 0}, {"pair_keys_per_window", 0}};
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 0) << out;
}

// Admission comes after validation: with the budget spent, a request the ETSI handlers
// refuse anyway gets that 400 and its standard message (not 503 + Retry-After, which
// would have the SAE retry a request that can never succeed), and charges nothing.
TEST(AdmissionTest, InvalidRequestIs400EvenWithTheBudgetSpent) {
  auto net = qkd::test::start_network_with_keys(pair_budget_only(10), 20);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  auto spent = alice.get("/api/v1/keys/bob/enc_keys?number=10");
  ASSERT_TRUE(spent.ok()) << spent.error().message;
  ASSERT_EQ(spent->status, 200u) << spent->body;
  auto refused = alice.get("/api/v1/keys/bob/enc_keys");
  ASSERT_TRUE(refused.ok()) << refused.error().message;
  ASSERT_EQ(refused->status, 503u) << "the budget is not spent: " << refused->body;

  const struct {
    const char* body;
    const char* message;
  } invalid[] = {
      {R"({"size": 7})", "size shall be a multiple of 8"},
      {R"({"size": 32})", "size 32 is below min_key_size (64)"},
      {R"({"extension_mandatory": [{"vendor_x": true}]})",
       "not all extension_mandatory parameters are supported"},
  };
  for (const auto& c : invalid) {
    auto r = alice.post("/api/v1/keys/bob/enc_keys", c.body);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 400u) << c.body << ": " << r->body;
    EXPECT_EQ(message_of(*r), c.message) << c.body;
    EXPECT_TRUE(r->retry_after.empty()) << c.body;
  }
  // A valid request is still refused: the budget stays spent.
  auto again = alice.get("/api/v1/keys/bob/enc_keys");
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(again->status, 503u) << again->body;
}

// The pair budget counts keys outstanding: keys the slave fetched give their tokens back,
// whether the slave fetches at the peer KME (reported over the link) or at this one
// (multicast to a slave of the master's KME); keys nobody fetches keep the pair refused.
TEST(AdmissionTest, FetchedKeysGiveTheirPairBudgetBack) {
  KmeNetworkOptions o = pair_budget_only(20);
  o.extra_alice_saes = {"carol"};
  o.extra_bob_saes = {"dave"};
  auto net = qkd::test::start_network_with_keys(o, 100);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto bob = net->client(net->bob(), "bob");
  const auto carol = net->client(net->alice(), "carol");
  auto enc = [&](const std::string& body) {
    auto r = alice.post("/api/v1/keys/bob/enc_keys", body);
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? *r : HttpResponse{};
  };
  // Spend the alice -> bob budget (and alice -> carol's, with carol as additional slave).
  const std::string both = json{{"number", 10}, {"additional_slave_SAE_IDs", {"carol"}}}.dump();
  const HttpResponse first = enc(both);
  ASSERT_EQ(first.status, 200u) << first.body;
  const HttpResponse second = enc(both);
  ASSERT_EQ(second.status, 200u) << second.body;
  ASSERT_EQ(enc(R"({"number": 10})").status, 503u) << "the pair budget is 20";
  std::this_thread::sleep_for(300ms);
  ASSERT_EQ(enc(R"({"number": 10})").status, 503u) << "nothing fetched, nothing given back";

  // Bob fetches 10 keys at his KME: 10 tokens come back to alice -> bob, and no more.
  auto d = bob.post("/api/v1/keys/alice/dec_keys", dec_body(qkd::test::key_ids(first)));
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->status, 200u) << d->body;
  const auto again = served_once_budget_is_back([&] { return enc(R"({"number": 10})"); });
  ASSERT_TRUE(again) << "bob's fetch gave no budget back";
  EXPECT_EQ(enc(R"({"number": 10})").status, 503u) << "more came back than was fetched";

  // Carol, a slave at alice's own KME, fetches hers: alice -> carol gets its tokens back
  // (dave, at bob's KME, has a budget of his own), while alice -> bob stays spent.
  auto dave_and_carol = [&] {
    auto r = alice.post("/api/v1/keys/dave/enc_keys", both);
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? *r : HttpResponse{};
  };
  const HttpResponse before = dave_and_carol();
  ASSERT_EQ(before.status, 503u) << before.body;
  EXPECT_NE(message_of(before).find("\"alice\" -> \"carol\""), std::string::npos) << before.body;
  auto c = carol.post("/api/v1/keys/alice/dec_keys", dec_body(qkd::test::key_ids(first)));
  ASSERT_TRUE(c.ok()) << c.error().message;
  ASSERT_EQ(c->status, 200u) << c->body;
  const HttpResponse after = dave_and_carol();
  EXPECT_EQ(after.status, 200u) << after.body;
  EXPECT_EQ(enc(R"({"number": 10})").status, 503u);
}

// Budgets count keys of keys.key_size bits (256 here): a larger key takes more tokens, and
// its fetch at the peer KME gives back as many (the fetch report carries bits). (The pair
// budget, with a window of an hour, refills too slowly to make the test depend on time.)
TEST(AdmissionTest, LargerKeysCostTheirSizeAndTheirFetchGivesItBack) {
  auto net = qkd::test::start_network_with_keys(pair_budget_only(16), 100);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto bob = net->client(net->bob(), "bob");
  auto enc = [&](const std::string& query) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys" + query);
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? *r : HttpResponse{};
  };
  const HttpResponse big = enc("?number=2&size=2048");  // 16 tokens: the whole budget
  ASSERT_EQ(big.status, 200u) << big.body;
  const HttpResponse small = enc("?number=1");
  ASSERT_EQ(small.status, 503u) << "two 2048-bit keys cost 2 tokens only: " << small.body;
  EXPECT_NE(message_of(small).find("\"alice\" -> \"bob\""), std::string::npos) << small.body;
  // Bob fetches one 2048-bit key: 8 tokens come back (not 1).
  const json j = big.json();
  const std::string id = j.at("keys").at(0).at("key_ID").get<std::string>();
  auto d = bob.get("/api/v1/keys/alice/dec_keys?key_ID=" + id);
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->status, 200u) << d->body;
  const auto again = served_once_budget_is_back([&] { return enc("?number=8"); });
  ASSERT_TRUE(again) << "bob's fetch of a 2048-bit key did not give 8 keys' budget back";
  EXPECT_EQ(enc("?number=1").status, 503u) << "more came back than was fetched";
}

// dec_keys that must wait for their keys' notice hold a worker each: one SAE may hold at
// most admission.sae_waiting_dec_keys of them; beyond that it gets 503 + Retry-After at
// once, and another SAE at the same KME still waits (and is answered) as usual.
TEST(AdmissionTest, WaitingDecKeysOfOneSaeAreBounded) {
  KmeNetworkOptions o;
  o.extra_bob_saes = {"dave"};
  o.dec_wait_ms = 2500;
  o.customize = [](json&, json& bob) { bob["admission"] = {{"sae_waiting_dec_keys", 2}}; };
  auto net = qkd::test::start_network_with_keys(o, 4);
  ASSERT_TRUE(net);
  // Key_IDs nobody assigned: each dec_keys waits the full dec_wait_ms, then is a 400.
  auto unknown = [](int i) { return fmt::format("00000000-0000-4000-8000-{:012d}", i); };
  std::vector<std::optional<HttpResponse>> bob_replies(5);
  std::optional<HttpResponse> dave_reply;
  std::vector<std::thread> threads;
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&, i] {
      auto r = net->client(net->bob(), "bob")
                   .get("/api/v1/keys/alice/dec_keys?key_ID=" + unknown(i));
      if (r.ok()) {
        bob_replies[static_cast<std::size_t>(i)] = *r;
      }
    });
  }
  std::this_thread::sleep_for(300ms);  // bob's first two are waiting by now
  threads.emplace_back([&] {
    auto r = net->client(net->bob(), "dave").get("/api/v1/keys/alice/dec_keys?key_ID=" +
                                                 unknown(99));
    if (r.ok()) {
      dave_reply = *r;
    }
  });
  for (auto& t : threads) {
    t.join();
  }
  int waited = 0;
  int refused = 0;
  for (const auto& r : bob_replies) {
    ASSERT_TRUE(r);
    if (r->status == 400) {
      ++waited;
      EXPECT_EQ(message_of(*r), "one or more keys specified are not found on KME");
    } else {
      ASSERT_EQ(r->status, 503u) << r->body;
      ++refused;
      EXPECT_NE(message_of(*r).find("dec_keys requests waiting"), std::string::npos) << r->body;
      EXPECT_EQ(r->retry_after, "1");
    }
  }
  EXPECT_EQ(waited, 2);
  EXPECT_EQ(refused, 3);
  ASSERT_TRUE(dave_reply);
  EXPECT_EQ(dave_reply->status, 400u) << "dave waited and was answered: " << dave_reply->body;
  // The places are given back: bob may wait again.
  auto again = net->client(net->bob(), "bob").get("/api/v1/keys/alice/dec_keys?key_ID=" +
                                                  unknown(100));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->status, 400u) << again->body;

  // More places than the API's connections is refused, naming the field.
  json cfg = read_json(net->bob().config_file);
  cfg["admission"] = {{"sae_waiting_dec_keys", 1001}};
  auto [code, out] = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("admission.sae_waiting_dec_keys"), std::string::npos) << out;
}

// A dec_keys waiting for its keys' notice holds no thread, only its connection: 150 of one
// SAE wait at once (more than the 64 worker threads that used to hold them, one each, so
// that one SAE could keep every other's waits queued), are counted in
// qkd_kms_dec_keys_waiting, and are answered when keys.dec_wait_ms is up; another SAE's
// keys are delivered meanwhile.
TEST(AdmissionTest, WaitingDecKeysHoldNoThread) {
  KmeNetworkOptions o;
  o.extra_bob_saes = {"dave"};
  o.dec_wait_ms = 6000;
  auto net = qkd::test::start_network_with_keys(o, 4);
  ASSERT_TRUE(net);
  constexpr int kWaiting = 150;
  auto unknown = [](int i) { return fmt::format("00000000-0000-4000-8000-{:012d}", i); };
  std::vector<std::optional<HttpResponse>> replies(kWaiting);
  std::vector<std::thread> threads;
  for (int i = 0; i < kWaiting; ++i) {
    threads.emplace_back([&, i] {
      auto r = net->client(net->bob(), "bob")
                   .get("/api/v1/keys/alice/dec_keys?key_ID=" + unknown(i));
      if (r.ok()) {
        replies[static_cast<std::size_t>(i)] = *r;
      }
    });
  }
  const auto waiting_now = [&] {
    auto r = net->client(net->bob(), "bob").get("/metrics");
    return r.ok() && r->status == 200 ? sample(r->body, "qkd_kms_dec_keys_waiting") : -1.0;
  };
  double most = -1;
  for (const auto until = std::chrono::steady_clock::now() + 5s;
       most < kWaiting && std::chrono::steady_clock::now() < until;) {
    most = std::max(most, waiting_now());
    std::this_thread::sleep_for(50ms);
  }
  // Meanwhile: alice -> dave, delivered at bob.
  auto enc = net->client(net->alice(), "alice").get("/api/v1/keys/dave/enc_keys");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const json k = enc->json().at("keys").at(0);
  auto dec = net->client(net->bob(), "dave")
                 .get("/api/v1/keys/alice/dec_keys?key_ID=" + k.at("key_ID").get<std::string>());
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(most, kWaiting) << "not every dec_keys could wait at once";
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(dec->json().at("keys").at(0).at("key"), k.at("key"));
  for (int i = 0; i < kWaiting; ++i) {
    const auto& r = replies[static_cast<std::size_t>(i)];
    ASSERT_TRUE(r) << "request " << i << " got no answer";
    EXPECT_EQ(r->status, 400u) << r->body;
    EXPECT_EQ(message_of(*r), "one or more keys specified are not found on KME");
  }
  EXPECT_EQ(waiting_now(), 0.0);
}

// --check-config (and the start) load the PEM files as the KME will: a file that is
// readable but not a certificate, or a key of another certificate, is refused naming the
// field and the file (and, for the first, what it is not).
// link.psk_hex in a configuration file others may read is allowed (a demo's is) but said,
// by --check-config and at start; an owner-only file, or psk_file, is silent.
TEST(ConfigCheck, APskInAFileOthersMayReadIsAWarning) {
  auto net = qkd::test::start_network_with_keys({}, 0);
  ASSERT_TRUE(net);
  const json alice = read_json(net->alice().config_file);
  ASSERT_TRUE(alice.at("link").contains("psk_hex"));
  const auto path = net->dir() / "check.json";
  auto [code, out] = check_config(*net, alice);  // written with the default umask
  std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::group_read |
                                         std::filesystem::perms::others_read);
  std::tie(code, out) = qkd::test::run_command(fmt::format(
      "'{}' --check-config --config '{}' 2>&1", qkd::test::kms_binary(), path.string()));
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("warning: " + path.string() +
                     ": link.psk_hex: the file is readable by others (mode 0444)"),
            std::string::npos)
      << out;
  std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  std::tie(code, out) = qkd::test::run_command(fmt::format(
      "'{}' --check-config --config '{}' 2>&1", qkd::test::kms_binary(), path.string()));
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.find("warning"), std::string::npos) << out;
}

TEST(ConfigCheck, TlsFilesMustBeUsable) {
  auto net = qkd::test::start_network_with_keys({}, 0);
  ASSERT_TRUE(net);
  const json alice = read_json(net->alice().config_file);
  const json bob = read_json(net->bob().config_file);
  auto [code, out] = check_config(*net, alice);
  EXPECT_EQ(code, 0) << out;

  json cfg = alice;
  cfg["api"]["key"] = bob.at("api").at("key");  // bob-kme's key, alice-kme's certificate
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("check.json: api.key: cannot use"), std::string::npos) << out;

  cfg = alice;
  cfg["api"]["cert"] = net->alice().config_file.filename().string();  // readable, not PEM
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(
      out.find("api.cert: " + net->alice().config_file.string() + " is not a PEM certificate"),
      std::string::npos)
      << out;

  cfg = alice;
  cfg["api"]["ca"] = alice.at("api").at("key");  // a key where the CA should be
  std::tie(code, out) = check_config(*net, cfg);
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("api.ca: "), std::string::npos) << out;
  EXPECT_NE(out.find("alice-kme.key is not a PEM certificate"), std::string::npos) << out;
}

}  // namespace
