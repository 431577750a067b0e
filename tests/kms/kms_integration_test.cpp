// Integration tests: two real qkd-kms processes (alice-kme, bob-kme) over a simulated
// 20 km BB84 link, driven through the ETSI 014 API with raw HTTPS requests.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "qkd/test/etsi_helpers.hpp"
#include "qkd/test/config_json.hpp"
#include "qkd/test/kme_network.hpp"
#include "qkd/test/network_suite.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using qkd::test::HttpResponse;
using qkd::test::HttpsTestClient;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;

constexpr const char* kNotFound = "one or more keys specified are not found on KME";

// Shared helpers (tests/support): Key containers, Error bodies, Key IDs bodies, the network.
std::map<std::string, std::vector<std::uint8_t>> keys_of(const HttpResponse& r) {
  return qkd::test::key_map(r);
}
using qkd::test::dec_body;
using qkd::test::message_of;

std::unique_ptr<KmeNetwork> start_network(KmeNetworkOptions o, std::uint64_t keys) {
  return qkd::test::start_network_with_keys(std::move(o), keys);
}

// Clients of SAE alice at alice-kme and of SAE bob at bob-kme.
std::pair<HttpsTestClient, HttpsTestClient> clients_of(const KmeNetwork& net) {
  return {net.client(net.alice(), "alice"), net.client(net.bob(), "bob")};
}

// GET `target` with `c`, which must be answered 200: the response in `out`.
void get_200(const HttpsTestClient& c, const std::string& target, HttpResponse& out) {
  auto r = c.get(target);
  ASSERT_TRUE(r.ok()) << target << ": " << r.error().message;
  ASSERT_EQ(r->status, 200u) << target << ": " << r->body;
  out = *r;
}

// Connects over plain TCP, writes `bytes`, reads until the peer closes (or 3 s pass).
void send_raw(std::uint16_t port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{3, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    (void)!::write(fd, bytes.data(), bytes.size());
    char buf[512];
    while (::read(fd, buf, sizeof buf) > 0) {
    }
  }
  ::close(fd);
}

// --- one network shared by the tests that do not need special settings ---
class KmsNetwork : public qkd::test::SharedNetworkSuite<KmsNetwork> {
 protected:
  static void SetUpTestSuite() { start(start_network({}, 64), 16); }
  static HttpsTestClient alice() { return net_->client(net_->alice(), "alice"); }
  static HttpsTestClient bob() { return net_->client(net_->bob(), "bob"); }
};

TEST_F(KmsNetwork, StatusReportsEveryField) {
  for (bool at_alice : {true, false}) {
    auto r =
        at_alice ? alice().get("/api/v1/keys/bob/status") : bob().get("/api/v1/keys/alice/status");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_EQ(r->status, 200u) << r->body;
    EXPECT_NE(r->content_type.find("application/json"), std::string::npos);
    const json j = r->json();
    EXPECT_EQ(j["source_KME_ID"], at_alice ? "alice-kme" : "bob-kme");
    EXPECT_EQ(j["target_KME_ID"], at_alice ? "bob-kme" : "alice-kme");
    EXPECT_EQ(j["master_SAE_ID"], at_alice ? "alice" : "bob");
    EXPECT_EQ(j["slave_SAE_ID"], at_alice ? "bob" : "alice");
    EXPECT_EQ(j["key_size"], 256);
    EXPECT_GE(j["stored_key_count"].get<std::int64_t>(), 64);
    EXPECT_EQ(j["max_key_count"], 100000);
    EXPECT_EQ(j["max_key_per_request"], 128);
    EXPECT_EQ(j["max_key_size"], 8192);
    EXPECT_EQ(j["min_key_size"], 64);
    EXPECT_EQ(j["max_SAE_ID_count"], 0);
    const json& link = j["status_extension"]["link"];
    EXPECT_EQ(link["state"], "up");
    EXPECT_GT(link["qber"].get<double>(), 0.0);
    EXPECT_LT(link["qber"].get<double>(), 0.05);
    EXPECT_GT(link["raw_key_rate_bps"].get<double>(), link["sifted_key_rate_bps"].get<double>());
    EXPECT_GT(link["sifted_key_rate_bps"].get<double>(), link["secret_key_rate_bps"].get<double>());
    EXPECT_GT(link["secret_key_rate_bps"].get<double>(), 0.0);
    EXPECT_GE(link["blocks"].get<std::int64_t>(), 1);
    EXPECT_TRUE(link["aborted_blocks"].is_number_integer());
    EXPECT_TRUE(link["last_abort_reason"].is_string());
  }
  // Status for an SAE that the peer KME does not serve.
  auto r = alice().get("/api/v1/keys/mallory/status");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 400u);
}

// (name, nice value) of every thread of process `pid` (/proc/<pid>/task/<tid>/stat: the
// name in parentheses, the nice value in field 19).
std::vector<std::pair<std::string, int>> thread_nice_values(pid_t pid) {
  std::vector<std::pair<std::string, int>> out;
  const std::filesystem::path task = fmt::format("/proc/{}/task", pid);
  for (const auto& e : std::filesystem::directory_iterator(task)) {
    std::ifstream f(e.path() / "stat");
    std::string line;
    if (!std::getline(f, line)) {
      continue;  // the thread ended meanwhile
    }
    const auto open = line.find('(');
    const auto close = line.rfind(')');
    std::istringstream rest(line.substr(close + 1));
    std::string field;
    for (int i = 3; i <= 19 && rest >> field; ++i) {
    }
    out.emplace_back(line.substr(open + 1, close - open - 1), std::stoi(field));
  }
  return out;
}

// link.engine_nice (default 10): the BB84 runner thread ("qkd-link") runs 10 nice levels
// below the process (capped at 19); the API threads keep the process's priority, and no
// thread ever gets a higher priority than the process itself.
TEST_F(KmsNetwork, EngineThreadRunsAtLowerPriority) {
  errno = 0;
  const int base = ::getpriority(PRIO_PROCESS, 0);  // the daemons inherit the test's nice
  ASSERT_EQ(errno, 0);
  const int engine = std::min(19, base + 10);
  for (const auto* kme : {&net_->alice(), &net_->bob()}) {
    SCOPED_TRACE(kme->kme_id);
    const auto threads = thread_nice_values(kme->pid);
    int runners = 0;
    int at_base = 0;
    for (const auto& [name, nice] : threads) {
      EXPECT_TRUE(nice == base || nice == engine) << "thread " << name << " at nice " << nice;
      if (name == "qkd-link") {
        ++runners;
        EXPECT_EQ(nice, engine);
      }
      at_base += nice == base ? 1 : 0;
    }
    EXPECT_GE(runners, 1);  // threads the runner starts inherit its name and nice value
    EXPECT_GE(at_base, 2);  // the API's I/O threads at least
  }
}

TEST_F(KmsNetwork, EncKeysGetThenDecKeysGetGiveIdenticalBytes) {
  auto enc = alice().get("/api/v1/keys/bob/enc_keys?number=3&size=512");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const auto keys = keys_of(*enc);
  ASSERT_EQ(keys.size(), 3u);
  for (const auto& [id, key] : keys) {
    EXPECT_EQ(id.size(), 36u);
    EXPECT_EQ(id[14], '4');  // UUID version 4
    ASSERT_EQ(key.size(), 64u);
    auto dec = bob().get("/api/v1/keys/alice/dec_keys?key_ID=" + id);
    ASSERT_TRUE(dec.ok()) << dec.error().message;
    ASSERT_EQ(dec->status, 200u) << dec->body;
    const auto got = keys_of(*dec);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got.at(id), key);
  }
}

TEST_F(KmsNetwork, EncKeysPostThenDecKeysPostGiveIdenticalBytes) {
  auto enc = alice().post("/api/v1/keys/bob/enc_keys",
                          R"({"number": 4, "size": 1024, "additional_slave_SAE_IDs": [],
                              "extension_optional": [{"abc_route_type": "direct"}]})");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const auto keys = keys_of(*enc);
  ASSERT_EQ(keys.size(), 4u);
  std::vector<std::string> ids;
  for (const auto& [id, key] : keys) {
    EXPECT_EQ(key.size(), 128u);
    ids.push_back(id);
  }
  auto dec = bob().post("/api/v1/keys/alice/dec_keys", dec_body(ids));
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys);
}

TEST_F(KmsNetwork, BobAsMasterAliceAsSlave) {
  auto enc = bob().post("/api/v1/keys/alice/enc_keys", R"({"number": 2})");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const auto keys = keys_of(*enc);
  std::vector<std::string> ids;
  for (const auto& [id, key] : keys) {
    EXPECT_EQ(key.size(), 32u);  // default key_size 256
    ids.push_back(id);
  }
  auto dec = alice().post("/api/v1/keys/bob/dec_keys", dec_body(ids));
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys);
}

TEST_F(KmsNetwork, WrongSaeGets401) {
  auto mallory_alice = net_->client(net_->alice(), "mallory");
  auto mallory_bob = net_->client(net_->bob(), "mallory");
  auto alice_at_bob = net_->client(net_->bob(), "alice");
  auto st = mallory_alice.get("/api/v1/keys/bob/status");
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_EQ(st->status, 401u);
  EXPECT_EQ(mallory_alice.get("/api/v1/keys/bob/enc_keys")->status, 401u);

  auto enc = alice().get("/api/v1/keys/bob/enc_keys");
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const std::string id = keys_of(*enc).begin()->first;
  const std::string target = "/api/v1/keys/alice/dec_keys?key_ID=" + id;
  EXPECT_EQ(mallory_bob.get(target)->status, 401u);   // not an SAE of bob-kme
  EXPECT_EQ(alice_at_bob.get(target)->status, 401u);  // alice asking for bob's key
  EXPECT_EQ(bob().get("/api/v1/keys/mallory/dec_keys?key_ID=" + id)->status,
            401u);  // wrong master in the path
  // None of the refused requests consumed the key.
  auto dec = bob().get(target);
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys_of(*enc));
}

TEST_F(KmsNetwork, SecondDecKeysOfSameKeyIs400) {
  auto enc = alice().get("/api/v1/keys/bob/enc_keys");
  ASSERT_EQ(enc->status, 200u);
  const std::string target = "/api/v1/keys/alice/dec_keys?key_ID=" + keys_of(*enc).begin()->first;
  ASSERT_EQ(bob().get(target)->status, 200u);
  auto again = bob().get(target);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->status, 400u);
  EXPECT_EQ(message_of(*again), kNotFound);
  // The allocating KME does not hand the key out a second time either: its master is not a
  // slave of it (401).
  auto at_alice =
      alice().post("/api/v1/keys/bob/dec_keys", dec_body({keys_of(*enc).begin()->first}));
  EXPECT_EQ(at_alice->status, 401u);
}

TEST_F(KmsNetwork, SizeNotMultipleOf8Is400) {
  auto g = alice().get("/api/v1/keys/bob/enc_keys?number=1&size=130");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->status, 400u);
  EXPECT_EQ(message_of(*g), "size shall be a multiple of 8");
  auto p = alice().post("/api/v1/keys/bob/enc_keys", R"({"size": 257})");
  EXPECT_EQ(p->status, 400u);
  EXPECT_EQ(message_of(*p), "size shall be a multiple of 8");
}

TEST_F(KmsNetwork, LimitsAre400WithAMessage) {
  auto many = alice().get("/api/v1/keys/bob/enc_keys?number=129");
  EXPECT_EQ(many->status, 400u);
  EXPECT_NE(message_of(*many).find("max_key_per_request"), std::string::npos) << many->body;
  auto small = alice().get("/api/v1/keys/bob/enc_keys?size=56");
  EXPECT_EQ(small->status, 400u);
  EXPECT_NE(message_of(*small).find("min_key_size"), std::string::npos) << small->body;
  auto large = alice().post("/api/v1/keys/bob/enc_keys", R"({"size": 8200})");
  EXPECT_EQ(large->status, 400u);
  EXPECT_NE(message_of(*large).find("max_key_size"), std::string::npos) << large->body;
  auto ext = alice().post("/api/v1/keys/bob/enc_keys",
                          R"({"extension_mandatory": [{"abc_route_type": "direct"}]})");
  EXPECT_EQ(ext->status, 400u);
  EXPECT_EQ(message_of(*ext), "not all extension_mandatory parameters are supported");
  auto multicast =
      alice().post("/api/v1/keys/bob/enc_keys", R"({"additional_slave_SAE_IDs": ["mallory"]})");
  EXPECT_EQ(multicast->status, 400u);
}

TEST_F(KmsNetwork, MalformedRequestsAre400AndServiceKeepsServing) {
  for (const char* body : {"{", "{\"number\": }", "\xff\xfe", "[]", "\"x\"", "{\"number\": 1.5}",
                           "{\"number\": \"3\"}", "{\"size\": null}"}) {
    auto r = alice().post("/api/v1/keys/bob/enc_keys", body);
    ASSERT_TRUE(r.ok()) << body << ": " << r.error().message;
    EXPECT_EQ(r->status, 400u) << body;
    EXPECT_FALSE(message_of(*r).empty()) << body;
  }
  for (const char* body : {"", "{", "{\"key_IDs\": {}}", "{\"key_IDs\": [{\"key_ID\": 1}]}"}) {
    auto r = bob().post("/api/v1/keys/alice/dec_keys", body);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->status, 400u) << body;
  }
  auto big = alice().post("/api/v1/keys/bob/enc_keys", std::string(200 * 1024, ' '));
  if (big.ok()) {
    EXPECT_EQ(big->status, 400u);
  }
  auto two = bob().get("/api/v1/keys/alice/dec_keys?key_ID=a&key_ID=b");
  EXPECT_EQ(two->status, 400u);
  auto status = alice().get("/api/v1/keys/bob/status");
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->status, 200u);
  auto enc = alice().get("/api/v1/keys/bob/enc_keys");
  EXPECT_EQ(enc->status, 200u);
}

TEST_F(KmsNetwork, UnknownRouteAndWrongMethodAre400) {
  auto r = alice().get("/api/v1/keys/bob/nothing");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 400u);
  EXPECT_FALSE(message_of(*r).empty());
  auto m = alice().request("DELETE", "/api/v1/keys/bob/status");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->status, 400u);
}

TEST_F(KmsNetwork, HealthNeedsAnSaeCertificateAndReportsTheLink) {
  // The link is up in this network; poll (bounded) in case it is reconnecting right now.
  json j;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  do {
    auto r = alice().get("/health");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_EQ(r->status, 200u) << r->body;
    EXPECT_NE(r->content_type.find("application/json"), std::string::npos);
    j = r->json();
    ASSERT_FALSE(j.is_discarded()) << r->body;
    EXPECT_EQ(j.value("status", ""), "ok");
    ASSERT_TRUE(j.value("link", "") == "up" || j.value("link", "") == "down") << r->body;
    if (j["link"] == "up") {
      break;
    }
    std::this_thread::sleep_for(100ms);
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(j.value("link", ""), "up");
  // mTLS like the ETSI routes: another KME's SAE gets 401, no certificate no connection.
  auto other = net_->client(net_->alice(), "bob").get("/health");
  ASSERT_TRUE(other.ok()) << other.error().message;
  EXPECT_EQ(other->status, 401u);
  qkd::test::TlsIdentity anon = net_->sae("alice");
  anon.cert_file.clear();
  anon.key_file.clear();
  EXPECT_FALSE(
      HttpsTestClient(net_->alice().host, net_->alice().api_port, anon).get("/health").ok());
}

TEST_F(KmsNetwork, ConnectionWithoutClientCertificateIsRefused) {
  qkd::test::TlsIdentity anon = net_->sae("alice");
  anon.cert_file.clear();
  anon.key_file.clear();
  HttpsTestClient c(net_->alice().host, net_->alice().api_port, anon);
  auto r = c.get("/api/v1/keys/bob/status");
  EXPECT_FALSE(r.ok()) << "got HTTP " << r->status;
  EXPECT_EQ(alice().get("/api/v1/keys/bob/status")->status, 200u);
}

TEST_F(KmsNetwork, ConcurrentEncKeysFromBothSidesNeverCollide) {
  constexpr int kThreads = 3, kRequests = 8, kPer = 4;
  // Enough key in both directions for every request (all or nothing would 503 otherwise).
  ASSERT_TRUE(net_->wait_for_keys(kThreads * kRequests * kPer + 8).ok());
  std::mutex mu;
  std::map<std::string, std::vector<std::uint8_t>> from_alice, from_bob;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int side = 0; side < 2; ++side) {
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, side] {
        auto c = side == 0 ? alice() : bob();
        const std::string target =
            side == 0 ? "/api/v1/keys/bob/enc_keys" : "/api/v1/keys/alice/enc_keys";
        for (int i = 0; i < kRequests; ++i) {
          auto r = c.post(target, fmt::format(R"({{"number": {}, "size": 256}})", kPer));
          if (!r.ok() || r->status != 200) {
            ++failures;
            continue;
          }
          std::lock_guard l(mu);
          for (auto& [id, key] : keys_of(*r)) {
            (side == 0 ? from_alice : from_bob).emplace(id, key);
          }
        }
      });
    }
  }
  for (auto& t : threads) {
    t.join();
  }
  ASSERT_EQ(failures.load(), 0);
  ASSERT_EQ(from_alice.size(), static_cast<std::size_t>(kThreads * kRequests * kPer));
  ASSERT_EQ(from_bob.size(), static_cast<std::size_t>(kThreads * kRequests * kPer));
  // No key material handed out twice (a collision would repeat 32 random bytes).
  std::set<std::vector<std::uint8_t>> distinct;
  for (const auto* m : {&from_alice, &from_bob}) {
    for (const auto& [id, key] : *m) {
      EXPECT_TRUE(distinct.insert(key).second) << "key bytes repeated";
    }
  }
  // Each peer returns identical bytes.
  auto fetch_all = [](HttpsTestClient c, const std::string& target,
                      const std::map<std::string, std::vector<std::uint8_t>>& expect) {
    std::vector<std::string> ids;
    for (const auto& [id, _] : expect) {
      ids.push_back(id);
    }
    for (std::size_t i = 0; i < ids.size(); i += 32) {
      std::vector<std::string> batch(
          ids.begin() + static_cast<std::ptrdiff_t>(i),
          ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), i + 32)));
      auto r = c.post(target, dec_body(batch));
      ASSERT_TRUE(r.ok()) << r.error().message;
      ASSERT_EQ(r->status, 200u) << r->body;
      for (const auto& [id, key] : keys_of(*r)) {
        EXPECT_EQ(key, expect.at(id));
      }
    }
  };
  fetch_all(bob(), "/api/v1/keys/alice/dec_keys", from_alice);
  fetch_all(alice(), "/api/v1/keys/bob/dec_keys", from_bob);
}

// --- tests with their own network ---

TEST(KmsNetworkSpecial, DecKeysWaitsForANoticeStillInFlight) {
  KmeNetworkOptions o;
  o.dec_wait_ms = 3000;
  o.customize = [](json& a, json&) { a["link"]["notice_delay_ms"] = 600; };
  auto net = start_network(o, 8);
  ASSERT_NE(net, nullptr);
  auto enc = net->client(net->alice(), "alice").get("/api/v1/keys/bob/enc_keys?number=2");
  ASSERT_EQ(enc->status, 200u) << enc->body;
  std::vector<std::string> ids;
  for (const auto& [id, _] : keys_of(*enc)) {
    ids.push_back(id);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto dec = net->client(net->bob(), "bob").post("/api/v1/keys/alice/dec_keys", dec_body(ids));
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys_of(*enc));
  EXPECT_GE(waited, 400ms);  // it really waited for the notice
}

// A network whose alice-kme sends its notices `delay_ms` late, and one key enc_keys gave
// alice: `enc` and the dec_keys target for it at bob-kme.
struct LateNotice {
  std::unique_ptr<KmeNetwork> net;
  HttpResponse enc;
  std::string target;
};
void start_with_a_late_notice(std::uint32_t dec_wait_ms, int delay_ms, LateNotice& out) {
  KmeNetworkOptions o;
  o.dec_wait_ms = dec_wait_ms;
  o.customize = [delay_ms](json& a, json&) { a["link"]["notice_delay_ms"] = delay_ms; };
  out.net = start_network(o, 8);
  ASSERT_NE(out.net, nullptr);
  auto enc = out.net->client(out.net->alice(), "alice").get("/api/v1/keys/bob/enc_keys");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  out.enc = *enc;
  out.target = "/api/v1/keys/alice/dec_keys?key_ID=" + keys_of(out.enc).begin()->first;
}

// A dec_keys waiting for its key's notice when its KME is told to stop (SIGTERM) still gets
// the key: the link runs on until the requests in progress are answered.
TEST(KmsNetworkSpecial, DecKeysWaitingAtSigtermStillGetsItsNotice) {
  LateNotice ln;
  ASSERT_NO_FATAL_FAILURE(start_with_a_late_notice(6000, 2000, ln));
  std::optional<qkd::core::Result<HttpResponse>> dec;
  const auto t0 = std::chrono::steady_clock::now();
  std::chrono::steady_clock::duration took{};
  std::thread waiter([&] {
    dec = ln.net->client(ln.net->bob(), "bob").get(ln.target);
    took = std::chrono::steady_clock::now() - t0;
  });
  std::this_thread::sleep_for(700ms);  // the dec_keys waits for the notice (2 s)
  const auto stopping_at = std::chrono::steady_clock::now() - t0;
  ln.net->stop_kme("bob-kme");
  waiter.join();
  EXPECT_GT(took, stopping_at) << "the dec_keys was answered before the stop began";
  ASSERT_TRUE(dec.has_value());
  ASSERT_TRUE(dec->ok()) << dec->error().message;
  EXPECT_EQ((*dec)->status, 200u) << (*dec)->body;
  EXPECT_EQ(keys_of(**dec), keys_of(ln.enc));
}

TEST(KmsNetworkSpecial, DecKeysWaitIsBounded) {
  LateNotice ln;
  ASSERT_NO_FATAL_FAILURE(start_with_a_late_notice(200, 1500, ln));
  auto bob = ln.net->client(ln.net->bob(), "bob");
  const auto t0 = std::chrono::steady_clock::now();
  auto early = bob.get(ln.target);
  const auto waited = std::chrono::steady_clock::now() - t0;
  ASSERT_TRUE(early.ok());
  EXPECT_EQ(early->status, 400u);
  EXPECT_EQ(message_of(*early), kNotFound);
  EXPECT_GE(waited, 150ms);
  EXPECT_LT(waited, 1200ms);
  // Once the notice has arrived the key is there (the early miss consumed nothing).
  std::this_thread::sleep_for(1600ms);
  auto late = bob.get(ln.target);
  ASSERT_EQ(late->status, 200u) << late->body;
  EXPECT_EQ(keys_of(*late), keys_of(ln.enc));
}

TEST(KmsNetworkSpecial, MoreKeyThanStoredIs503) {
  KmeNetworkOptions o;
  o.max_key_count = 4;  // the link pauses once both directions hold 4 keys
  auto net = start_network(o, 4);
  ASSERT_NE(net, nullptr);
  auto alice = net->client(net->alice(), "alice");
  auto st = alice.get("/api/v1/keys/bob/status");
  ASSERT_EQ(st->status, 200u);
  EXPECT_LE(st->json()["stored_key_count"].get<std::int64_t>(), 4);
  auto r = alice.post("/api/v1/keys/bob/enc_keys", R"({"number": 128, "size": 8192})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 503u);
  EXPECT_NE(message_of(*r).find("not enough key"), std::string::npos) << r->body;
  // All or nothing: what is stored is still there.
  EXPECT_EQ(alice.get("/api/v1/keys/bob/enc_keys?number=2")->status, 200u);
}

TEST(KmsNetworkSpecial, LinkRecoversAfterPeerRestart) {
  auto net = start_network({}, 4);
  ASSERT_NE(net, nullptr);
  ASSERT_TRUE(net->restart_bob().ok());
  ASSERT_TRUE(net->wait_for_keys(4).ok()) << net->log_tail(net->alice());
  auto enc = net->client(net->alice(), "alice").get("/api/v1/keys/bob/enc_keys");
  ASSERT_EQ(enc->status, 200u) << enc->body;
  auto dec = net->client(net->bob(), "bob")
                 .get("/api/v1/keys/alice/dec_keys?key_ID=" + keys_of(*enc).begin()->first);
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys_of(*enc));
}

// The link block count alice reports (status extension), or nullopt if status fails.
std::optional<std::uint64_t> link_blocks(const KmeNetwork& net, bool* up = nullptr) {
  auto st = net.client(net.alice(), "alice").get("/api/v1/keys/bob/status");
  if (!st.ok() || st->status != 200u) {
    return std::nullopt;
  }
  const json j = st->json();
  if (j.is_discarded()) {
    return std::nullopt;
  }
  const json l = j.value("status_extension", json::object()).value("link", json::object());
  if (up != nullptr) {
    *up = l.value("state", "") == "up";
  }
  return l.value("blocks", std::uint64_t{0});
}

TEST(KmsNetworkSpecial, GarbageAndForeignPeersDoNotHurt) {
  // The fake peer below replaces (and so drops) the real link session; the bob end then
  // reconnects with backoff (up to 5 s). Under load that can take longer than the default
  // 2 s dec_keys wait for a notice, so dec_keys here may wait as long as the link needs
  // (the assertion that the key arrives, identical, is unchanged).
  KmeNetworkOptions o;
  o.dec_wait_ms = 60'000;
  auto net = start_network(o, 4);
  ASSERT_NE(net, nullptr);
  const std::uint16_t api = net->alice().api_port;
  const std::uint16_t link = net->alice().link_port;
  std::string junk(4096, '\0');
  for (std::size_t i = 0; i < junk.size(); ++i) {
    junk[i] = static_cast<char>((i * 131 + 7) & 0xff);
  }
  send_raw(api, "GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: x\r\n\r\n");  // no TLS
  send_raw(api, junk);
  send_raw(link, junk);
  send_raw(link, std::string("\x16\x03\x01\x00\x05hello", 10));
  // Engine connections (preamble "QKDE", engine_channel.hpp) that never do TLS.
  send_raw(link, "QKDE" + junk);
  send_raw(link, "QKDE");
  // TLS peers on the link port that are not the peer KME are refused.
  for (const char* who : {"mallory", "alice", "alice-kme"}) {
    HttpsTestClient c(net->alice().host, link, net->sae(who), std::chrono::seconds(3));
    auto r = c.get("/");
    EXPECT_FALSE(r.ok()) << who << " was served on the link port";
  }
  // Someone holding the peer KME's certificate but speaking HTTP: dropped, link recovers.
  HttpsTestClient fake_bob(net->alice().host, link, net->sae("bob-kme"), std::chrono::seconds(3));
  EXPECT_FALSE(fake_bob.get("/").ok());
  // A client certificate from another CA is refused on the API.
  ASSERT_EQ(std::system(fmt::format("bash '{}' '{}' eve >/dev/null 2>&1",
                                    (qkd::test::source_dir() / "examples" / "pki.sh").string(),
                                    (net->dir() / "other-pki").string())
                            .c_str()),
            0);
  qkd::test::TlsIdentity eve{(net->dir() / "other-pki" / "eve.crt").string(),
                             (net->dir() / "other-pki" / "eve.key").string(),
                             net->ca_file().string()};
  EXPECT_FALSE(HttpsTestClient(net->alice().host, api, eve).get("/api/v1/keys/bob/status").ok());

  ASSERT_TRUE(net->running(net->alice()));
  ASSERT_TRUE(net->running(net->bob()));
  // The link recovers: wait (bounded generously, no timing assertion) until it is up and
  // has run two more blocks than when the attacks ended (the first could still have been
  // under way on the session the fake peer replaced).
  const auto after_attacks = link_blocks(*net);
  ASSERT_TRUE(after_attacks.has_value());
  const auto deadline = std::chrono::steady_clock::now() + 90s;
  bool recovered = false;
  while (!recovered && std::chrono::steady_clock::now() < deadline) {
    bool up = false;
    const auto b = link_blocks(*net, &up);
    recovered = up && b.has_value() && *b >= *after_attacks + 2;
    if (!recovered) {
      std::this_thread::sleep_for(100ms);
    }
  }
  ASSERT_TRUE(recovered) << "the link did not recover\n--- alice-kme\n"
                         << net->log_tail(net->alice()) << "--- bob-kme\n"
                         << net->log_tail(net->bob());
  ASSERT_TRUE(net->wait_for_keys(4).ok());
  auto enc = net->client(net->alice(), "alice").get("/api/v1/keys/bob/enc_keys");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  // dec_keys may wait for the notice (dec_wait_ms above): give the client more time.
  HttpsTestClient bob(net->bob().host, net->bob().api_port, net->sae("bob"), 90s);
  auto dec = bob.get("/api/v1/keys/alice/dec_keys?key_ID=" + keys_of(*enc).begin()->first);
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(keys_of(*dec), keys_of(*enc));
}

// The standard's "peer KME unreachable": while the link has no session, enc_keys is a 503
// with Retry-After that consumes nothing, and a dec_keys naming a key_ID not known here is a
// 503 too (its notice may be on its way), not "not found". Keys this KME holds already are
// still served, and enc_keys works again once the link is back.
TEST(KmsNetworkSpecial, PeerKmeUnreachableIs503) {
  KmeNetworkOptions o;
  o.dec_wait_ms = 5000;  // not waited for while the link is down: no notice can come
  auto net = start_network(o, 8);
  ASSERT_NE(net, nullptr);
  auto [alice, bob] = clients_of(*net);
  // Two keys for alice from bob; fetching the first makes sure the notice arrived.
  HttpResponse held;
  ASSERT_NO_FATAL_FAILURE(get_200(bob, "/api/v1/keys/alice/enc_keys?number=2", held));
  const auto ids = keys_of(held);
  ASSERT_EQ(ids.size(), 2u);
  auto first = alice.get("/api/v1/keys/bob/dec_keys?key_ID=" + ids.begin()->first);
  ASSERT_EQ(first->status, 200u) << first->body;
  auto stored = [&] {
    return alice.get("/api/v1/keys/bob/status")->json().at("stored_key_count").get<int>();
  };
  net->stop_kme("bob-kme");
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (alice.get("/health")->json().value("link", "") != "down" &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  const int before = stored();
  auto enc = alice.get("/api/v1/keys/bob/enc_keys?number=2");
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ(enc->status, 503u) << enc->body;
  EXPECT_NE(message_of(*enc).find("peer KME unreachable"), std::string::npos) << enc->body;
  EXPECT_EQ(enc->retry_after, "1");
  EXPECT_EQ(stored(), before);  // nothing consumed
  const std::string unknown_id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
  const auto t0 = std::chrono::steady_clock::now();
  auto unknown = alice.get("/api/v1/keys/bob/dec_keys?key_ID=" + unknown_id);
  ASSERT_TRUE(unknown.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2500ms) << "it waited for a notice";
  EXPECT_EQ(unknown->status, 503u) << unknown->body;
  EXPECT_NE(message_of(*unknown).find("peer KME unreachable"), std::string::npos);
  // With a key_ID delivered already among them: 400, whatever the link.
  auto mixed = alice.post("/api/v1/keys/bob/dec_keys", dec_body({ids.begin()->first, unknown_id}));
  ASSERT_TRUE(mixed.ok());
  EXPECT_EQ(mixed->status, 400u) << mixed->body;
  // Known here: served (the second key), or still one use (the first).
  HttpResponse second;
  EXPECT_NO_FATAL_FAILURE(
      get_200(alice, "/api/v1/keys/bob/dec_keys?key_ID=" + std::next(ids.begin())->first, second));
  auto again = alice.get("/api/v1/keys/bob/dec_keys?key_ID=" + ids.begin()->first);
  EXPECT_EQ(again->status, 400u) << again->body;
  ASSERT_TRUE(net->start_kme("bob-kme").ok());
  ASSERT_TRUE(net->wait_for_keys(2).ok());
  HttpResponse back;
  EXPECT_NO_FATAL_FAILURE(get_200(alice, "/api/v1/keys/bob/enc_keys", back));
}

// keys.max_age_s: keys older than the max age are discarded on both ends. A key bob-kme
// holds for bob but bob does not fetch in time is gone; fresh keys still flow; with the link
// down no key is fresh, so enc_keys is a 503; once the link is back (durable stores: it
// resumes, and the discards made meanwhile reach the peer), both ends agree again.
TEST(KmsNetworkSpecial, ExpiredKeysAreDiscardedOnBothEnds) {
  KmeNetworkOptions o;
  o.max_age_s = 2;
  o.durable_store = true;
  o.dec_wait_ms = 500;
  auto net = start_network(o, 8);
  ASSERT_NE(net, nullptr);
  auto [alice, bob] = clients_of(*net);
  HttpResponse old_key;
  ASSERT_NO_FATAL_FAILURE(get_200(alice, "/api/v1/keys/bob/enc_keys", old_key));
  std::this_thread::sleep_for(3s);  // longer than the max age
  auto expired = bob.get("/api/v1/keys/alice/dec_keys?key_ID=" + keys_of(old_key).begin()->first);
  ASSERT_TRUE(expired.ok());
  EXPECT_EQ(expired->status, 400u);
  EXPECT_EQ(message_of(*expired), kNotFound);
  // Fresh keys flow, with the same bytes on both ends.
  auto check_flow = [&] {
    for (bool from_alice : {true, false}) {
      auto& master = from_alice ? alice : bob;
      auto& slave = from_alice ? bob : alice;
      HttpResponse enc;
      ASSERT_NO_FATAL_FAILURE(get_200(
          master,
          fmt::format("/api/v1/keys/{}/enc_keys?number=2", from_alice ? "bob" : "alice"), enc));
      std::vector<std::string> ids;
      for (const auto& [id, _] : keys_of(enc)) {
        ids.push_back(id);
      }
      auto dec = slave.post(
          fmt::format("/api/v1/keys/{}/dec_keys", from_alice ? "alice" : "bob"), dec_body(ids));
      ASSERT_TRUE(dec.ok());
      ASSERT_EQ(dec->status, 200u) << dec->body;
      EXPECT_EQ(keys_of(*dec), keys_of(enc));
    }
  };
  check_flow();
  // The link goes down: nothing is fresh after the max age (and enc_keys is a 503).
  net->stop_kme("bob-kme");
  std::this_thread::sleep_for(3s);
  auto none = alice.get("/api/v1/keys/bob/enc_keys");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->status, 503u) << none->body;
  auto st = alice.get("/api/v1/keys/bob/status");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->json().at("stored_key_count"), 0);
  // Bob's KME returns with its pool (resume); both ends drop what expired and agree.
  ASSERT_TRUE(net->start_kme("bob-kme").ok());
  ASSERT_TRUE(net->wait_for_keys(4).ok());
  check_flow();
  EXPECT_NE(net->log_tail(net->alice(), 100000).find("established (resume)"), std::string::npos);
}

// --- the daemon's command line, run by hand (no network) ---

// A fresh folder holding a PKI for alice-kme (examples/pki.sh) and the means to run
// qkd-kms on a config written there; removed at the end.
class KmsCommandLine : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = fmt::format("{}/qkd-kms-cli-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
    ASSERT_EQ(std::system(fmt::format("bash '{}' '{}' alice-kme >/dev/null 2>&1",
                                      (qkd::test::source_dir() / "examples" / "pki.sh").string(),
                                      (dir_ / "pki").string())
                              .c_str()),
              0);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A valid config of alice-kme, every port 0.
  [[nodiscard]] static json config() {
    return qkd::test::kme_config_json("alice-kme", "bob-kme", "pki/alice-kme.crt",
                                      "pki/alice-kme.key", "pki/ca.crt");
  }
  // Runs qkd-kms with `args` (the config written as kme.json, if given): exit code, output.
  std::pair<int, std::string> run(const std::string& args, const std::optional<json>& cfg) {
    if (cfg) {
      std::ofstream(dir_ / "kme.json", std::ios::trunc) << cfg->dump(2);
    }
    return qkd::test::run_command(fmt::format("'{}' {} 2>&1", qkd::test::kms_binary(), args));
  }
  [[nodiscard]] std::string config_arg() const {
    return fmt::format("--config '{}'", (dir_ / "kme.json").string());
  }

  std::filesystem::path dir_;
};

// A KME that cannot start logs the reason first: "stopped" came before it when the KME
// failed while being made (here: the store file is not a database), which read as a clean
// stop followed by an unrelated error.
TEST_F(KmsCommandLine, AStartFailureIsLoggedBeforeStopped) {
  json cfg = config();
  cfg["store"] = {{"path", "kme.db"}, {"node_key_file", "node.key"}};
  std::ofstream(dir_ / "kme.db") << std::string(4096, 'x');
  std::ofstream(dir_ / "node.key") << std::string(64, 'b') << "\n";
  std::filesystem::permissions(
      dir_ / "node.key", std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  auto [code, out] = run(config_arg(), cfg);
  EXPECT_EQ(code, 1) << out;
  auto reason = out.find("critical");
  ASSERT_NE(reason, std::string::npos) << out;
  EXPECT_NE(out.find("store.path:", reason), std::string::npos) << out;
  auto stopped = out.find("stopped");
  EXPECT_TRUE(stopped == std::string::npos || stopped > reason) << out;

  // Failing once started (api.listen's port is taken): the reason first as well.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  cfg = config();
  cfg["api"]["listen"] = fmt::format("127.0.0.1:{}", ntohs(addr.sin_port));
  std::tie(code, out) = run(config_arg(), cfg);
  ::close(fd);
  EXPECT_EQ(code, 1) << out;
  reason = out.find("critical");
  ASSERT_NE(reason, std::string::npos) << out;
  EXPECT_NE(out.find("api.listen", reason), std::string::npos) << out;
  stopped = out.find("stopped");
  EXPECT_TRUE(stopped == std::string::npos || stopped > reason) << out;
}

// qkd-kms --version: the version and the store format it writes, exit 0 (no --config).
TEST_F(KmsCommandLine, VersionPrintsTheVersionAndTheStoreFormat) {
  auto [code, out] = run("--version", std::nullopt);
  EXPECT_EQ(code, 0) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex(R"(^qkd-kms [0-9]+\.[0-9]+\.[0-9]+ )"))) << out;
  EXPECT_TRUE(std::regex_search(out, std::regex(R"(key store format [0-9]+)"))) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}

}  // namespace
