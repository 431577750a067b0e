// Operations of a real qkd-kms: Prometheus /metrics (over mutual TLS and on the plain
// loopback listener), graceful shutdown on SIGTERM during requests with a restart that
// serves on from the durable store, and no key in any log line.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "prometheus_text.hpp"
#include "qkd/test/etsi_helpers.hpp"
#include "qkd/test/kme_network.hpp"
#include "qkd/test/store_file.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using qkd::test::HttpResponse;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A TCP connection to 127.0.0.1:port whose reads give up after 10 s; -1 if none.
int connect_loopback(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) {
    return -1;
  }
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// A plain HTTP/1.1 GET over TCP (Connection: close); returns "<status>\n<body>" or "".
std::pair<int, std::string> plain_get(std::uint16_t port, const std::string& target) {
  const int fd = connect_loopback(port);
  if (fd < 0) {
    return {-1, ""};
  }
  const std::string req =
      fmt::format("GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", target);
  if (::send(fd, req.data(), req.size(), 0) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return {-1, ""};
  }
  std::string resp;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      break;
    }
    resp.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  int status = -1;
  if (resp.rfind("HTTP/1.1 ", 0) == 0) {
    status = std::stoi(resp.substr(9, 3));
  }
  const auto body = resp.find("\r\n\r\n");
  return {status, body == std::string::npos ? "" : resp.substr(body + 4)};
}

// GET /metrics by client `c`, parsed (a failed request or an invalid exposition is a test
// failure, and gives an empty exposition).
qkd::test::Exposition scrape(const qkd::test::HttpsTestClient& c) {
  auto s = c.get("/metrics");
  EXPECT_TRUE(s.ok()) << s.error().message;
  auto e = qkd::test::parse_exposition(s.ok() ? s->body : "");
  EXPECT_EQ(e.error, "") << (s.ok() ? s->body : "");
  return e;
}

double at(const qkd::test::Exposition& e, const std::string& key) {
  auto it = e.samples.find(key);
  return it == e.samples.end() ? -1.0 : it->second;
}

// Every histogram series: cumulative buckets, +Inf bucket == _count.
void check_histograms(const qkd::test::Exposition& e) {
  const std::string prefix = "qkd_kms_http_request_duration_seconds_count{";
  int series = 0;
  for (const auto& [key, count] : e.samples) {
    if (key.rfind(prefix, 0) != 0) {
      continue;
    }
    ++series;
    const std::string labels = key.substr(prefix.size(), key.size() - prefix.size() - 1);
    double last = 0;
    int buckets = 0;
    for (const auto& [k, v] : e.samples) {
      if (k.rfind("qkd_kms_http_request_duration_seconds_bucket{" + labels + ",le=", 0) == 0) {
        ++buckets;
        if (k.find("le=\"+Inf\"") != std::string::npos) {
          EXPECT_EQ(v, count) << k;
        }
      }
    }
    // Buckets in the map are sorted by le as text; check monotony in le order instead.
    for (const double le : {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                            0.1, 0.25, 0.5, 1.0, 2.5}) {
      const double v = at(e, fmt::format("qkd_kms_http_request_duration_seconds_bucket{{{},le=\"{}\"}}",
                                         labels, le));
      EXPECT_GE(v, last) << labels << " le=" << le;
      last = v;
    }
    EXPECT_LE(last, count);
    EXPECT_EQ(buckets, 15) << labels;
  }
  EXPECT_GT(series, 0);
}

TEST(OpsTest, MetricsScrapeIsValidAndCountersMove) {
  KmeNetworkOptions o;
  o.customize = [](json& alice, json&) { alice["metrics"] = {{"listen", "127.0.0.1:0"}}; };
  auto net = qkd::test::start_network_with_keys(o, 40);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto bob = net->client(net->bob(), "bob");

  std::vector<std::string> key_texts;  // base64 keys handed out: never in a scrape
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys?number=4");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_EQ(r->status, 200u) << r->body;
    const json body_json = r->json();
    for (const auto& k : body_json.at("keys")) {
      ids.push_back(k.at("key_ID").get<std::string>());
      key_texts.push_back(k.at("key").get<std::string>());
    }
  }
  auto bad = alice.get("/api/v1/keys/bob/enc_keys?size=7");
  ASSERT_TRUE(bad.ok());
  ASSERT_EQ(bad->status, 400u);
  auto d = bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body(ids));
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->status, 200u) << d->body;

  auto s1 = alice.get("/metrics");
  ASSERT_TRUE(s1.ok()) << s1.error().message;
  ASSERT_EQ(s1->status, 200u) << s1->body;
  EXPECT_EQ(s1->content_type.rfind("text/plain; version=0.0.4", 0), 0u) << s1->content_type;
  const auto e1 = qkd::test::parse_exposition(s1->body);
  ASSERT_EQ(e1.error, "") << s1->body;
  for (const auto& k : key_texts) {
    EXPECT_EQ(s1->body.find(k), std::string::npos) << "a key appears in /metrics";
  }
  EXPECT_EQ(e1.types.at("qkd_kms_http_requests_total"), "counter");
  EXPECT_EQ(e1.types.at("qkd_kms_http_request_duration_seconds"), "histogram");
  EXPECT_EQ(e1.types.at("qkd_kms_pool_keys"), "gauge");
  const std::string enc200 = "qkd_kms_http_requests_total{route=\"enc_keys\",status=\"200\"}";
  const std::string enc400 = "qkd_kms_http_requests_total{route=\"enc_keys\",status=\"400\"}";
  const std::string delivered =
      "qkd_kms_keys_delivered_total{route=\"enc_keys\",master_sae=\"alice\",slave_sae=\"bob\"}";
  EXPECT_EQ(at(e1, enc200), 3.0);
  EXPECT_EQ(at(e1, enc400), 1.0);
  EXPECT_EQ(at(e1, delivered), 12.0);
  EXPECT_EQ(at(e1, "qkd_kms_link_up{peer_kme_id=\"bob-kme\"}"), 1.0);
  EXPECT_GE(at(e1, "qkd_kms_link_blocks_total{peer_kme_id=\"bob-kme\",result=\"settled\"}"), 1.0);
  const double qber = at(e1, "qkd_kms_link_qber{peer_kme_id=\"bob-kme\"}");
  EXPECT_GE(qber, 0.0);
  EXPECT_LT(qber, 0.11);
  EXPECT_GT(at(e1, "qkd_kms_link_key_rate_bits_per_second{peer_kme_id=\"bob-kme\",kind=\"secret\"}"),
            0.0);
  EXPECT_GE(at(e1, "qkd_kms_pool_keys{peer_kme_id=\"bob-kme\",direction=\"local\"}"), 0.0);
  EXPECT_GE(at(e1, "qkd_kms_pool_keys{peer_kme_id=\"bob-kme\",direction=\"peer\"}"), 0.0);
  EXPECT_EQ(at(e1, "qkd_kms_store_commit_duration_seconds_count{writes=\"requests\"}"), 0.0)
      << "memory store";
  check_histograms(e1);

  // Counters move.
  for (int i = 0; i < 2; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys");
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(r->status, 200u) << r->body;
  }
  auto s2 = alice.get("/metrics");
  ASSERT_TRUE(s2.ok());
  const auto e2 = qkd::test::parse_exposition(s2->body);
  ASSERT_EQ(e2.error, "");
  EXPECT_EQ(at(e2, enc200), 5.0);
  EXPECT_EQ(at(e2, delivered), 14.0);
  EXPECT_EQ(at(e2, "qkd_kms_http_requests_total{route=\"metrics\",status=\"200\"}"), 1.0)
      << "the first scrape is counted once it has been answered";
  check_histograms(e2);

  // The peer counts the dec_keys side.
  auto sb = bob.get("/metrics");
  ASSERT_TRUE(sb.ok());
  const auto eb = qkd::test::parse_exposition(sb->body);
  ASSERT_EQ(eb.error, "");
  EXPECT_EQ(at(eb, "qkd_kms_keys_delivered_total{route=\"dec_keys\",master_sae=\"alice\","
                   "slave_sae=\"bob\"}"),
            12.0);
  // The two keys alice took since wait at bob-kme for bob, by SAE pair (once their notices
  // have arrived).
  const std::string pair_waiting = "qkd_kms_pair_keys_waiting{master_sae=\"alice\",slave_sae=\"bob\"}";
  double waiting = at(eb, pair_waiting);
  for (int i = 0; i < 40 && waiting != 2.0; ++i) {
    std::this_thread::sleep_for(50ms);
    auto again = bob.get("/metrics");
    ASSERT_TRUE(again.ok());
    waiting = at(qkd::test::parse_exposition(again->body), pair_waiting);
  }
  EXPECT_EQ(waiting, 2.0);
  // Every pair that can have keys waiting has its series, 0 while none does.
  EXPECT_EQ(at(e2, "qkd_kms_pair_keys_waiting{master_sae=\"bob\",slave_sae=\"alice\"}"), 0.0);
  // Admission budgets left, per master SAE and per pair (defaults: burst 10000, pair 2500).
  const double sae_left = at(e2, "qkd_kms_admission_budget_keys{budget=\"sae\",master_sae=\"alice\"}");
  EXPECT_GE(sae_left, 0.0);
  EXPECT_LE(sae_left, 10000.0);
  const double pair_left = at(e2,
      "qkd_kms_admission_budget_keys{budget=\"pair\",master_sae=\"alice\",slave_sae=\"bob\"}");
  EXPECT_GE(pair_left, 0.0);
  EXPECT_LE(pair_left, 2500.0);

  // A certificate whose CN is not one of the KME's SAEs: 401, as for /health.
  auto m = net->client(net->alice(), "mallory").get("/metrics");
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_EQ(m->status, 401u);

  // The plain loopback listener (port in the ready file) serves the same exposition.
  const json ready = json::parse(read_file(net->dir() / "alice-kme.ready"));
  ASSERT_TRUE(ready.contains("metrics_port")) << ready.dump();
  const auto port = ready.at("metrics_port").get<std::uint16_t>();
  auto [status, body] = plain_get(port, "/metrics");
  EXPECT_EQ(status, 200);
  const auto ep = qkd::test::parse_exposition(body);
  ASSERT_EQ(ep.error, "") << body;
  EXPECT_GE(at(ep, enc200), 5.0);
  EXPECT_EQ(plain_get(port, "/api/v1/keys/bob/status").first, 404);
  // And /health, for probes without an SAE certificate (systemd, a load balancer).
  auto [hstatus, hbody] = plain_get(port, "/health");
  EXPECT_EQ(hstatus, 200);
  EXPECT_EQ(json::parse(hbody, nullptr, false), json({{"status", "ok"}, {"link", "up"}})) << hbody;
}

// The plain listener answers HEAD with the header of the GET and no body (RFC 9110 9.3.2),
// so a request pipelined after it on the same connection gets its own, intact response.
TEST(OpsTest, HeadOnThePlainListenerSendsNoBody) {
  KmeNetworkOptions o;
  o.customize = [](json& alice, json&) { alice["metrics"] = {{"listen", "127.0.0.1:0"}}; };
  auto net = KmeNetwork::start(o);
  ASSERT_TRUE(net.ok()) << net.error().message;
  ASSERT_TRUE((*net)->wait_for_keys(1).ok());  // the link up: /health's body stays the same
  const json ready = json::parse(read_file((*net)->dir() / "alice-kme.ready"));
  const auto port = ready.at("metrics_port").get<std::uint16_t>();
  const int fd = connect_loopback(port);
  ASSERT_GE(fd, 0);
  const std::string both =
      "HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
      "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  ASSERT_EQ(::send(fd, both.data(), both.size(), 0), static_cast<ssize_t>(both.size()));
  std::string resp;
  char buf[4096];
  for (ssize_t n = 0; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) {
    resp.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  // HEAD: status line and header, with the GET's Content-Length, then nothing.
  ASSERT_EQ(resp.rfind("HTTP/1.1 200", 0), 0u) << resp;
  const auto head_end = resp.find("\r\n\r\n");
  ASSERT_NE(head_end, std::string::npos) << resp;
  const std::string head = resp.substr(0, head_end);
  const std::regex length("\r\nContent-Length: (\\d+)", std::regex::icase);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(head, m, length)) << head;
  const std::string get = resp.substr(head_end + 4);
  // GET: the next bytes are its own status line, and its body is that many bytes.
  ASSERT_EQ(get.rfind("HTTP/1.1 200", 0), 0u) << "after the HEAD response: " << resp;
  const auto get_end = get.find("\r\n\r\n");
  ASSERT_NE(get_end, std::string::npos) << get;
  EXPECT_EQ(get.size() - get_end - 4, std::stoul(m[1].str())) << get;
  EXPECT_EQ(json::parse(get.substr(get_end + 4), nullptr, false).value("status", ""), "ok")
      << get;
}

// The durable store's transactions are timed: every enc_keys (alice) and dec_keys (bob)
// waits for one, so both KMEs count at least as many transactions more as they answered
// (a request's write may share a transaction with a block commit of the link, still
// topping the pool up: then it counts as writes="link"), in valid buckets and in seconds
// (under 100 ms each, not in +Inf).
TEST(OpsTest, DurableStoreCommitsAreTimed) {
  KmeNetworkOptions o;
  o.durable_store = true;
  // Every enc_keys writes (no reserve serving them without a write of their own).
  o.customize = [](json& alice, json&) { alice["store"]["prepared_keys"] = 0; };
  auto net = qkd::test::start_network_with_keys(o, 20);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto bob = net->client(net->bob(), "bob");
  const std::string name = "qkd_kms_store_commit_duration_seconds";
  const std::string req = "{writes=\"requests\"";
  const std::string link = "{writes=\"link\"}";
  auto total = [&](const qkd::test::Exposition& e) {
    const double r = at(e, name + "_count" + req + "}");
    const double l = at(e, name + "_count" + link);
    return r < 0 || l < 0 ? -1.0 : r + l;
  };
  const double alice_before = total(scrape(alice));
  const double bob_before = total(scrape(bob));
  ASSERT_GE(alice_before, 0.0);
  ASSERT_GE(bob_before, 0.0);
  for (int i = 0; i < 5; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_EQ(r->status, 200u) << r->body;
    const std::string id = r->json().at("keys").at(0).at("key_ID").get<std::string>();
    auto d = bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body({id}));
    ASSERT_TRUE(d.ok()) << d.error().message;
    ASSERT_EQ(d->status, 200u) << d->body;
  }
  for (const auto& [c, before] : {std::pair{&alice, alice_before}, std::pair{&bob, bob_before}}) {
    const auto e = scrape(*c);
    EXPECT_GE(total(e) - before, 5.0);
    const double count = at(e, name + "_count" + req + "}");
    EXPECT_EQ(at(e, name + "_bucket" + req + ",le=\"+Inf\"}"), count);
    EXPECT_GT(at(e, name + "_bucket" + req + ",le=\"0.1\"}"), 0.0) << "not in seconds?";
    EXPECT_GT(at(e, name + "_sum" + req + "}"), 0.0);
    EXPECT_GE(at(e, name + "_count" + link), 1.0) << "the pool's block commits";
    double last = 0;
    for (const double le : {0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175,
                            0.002, 0.00225, 0.0025, 0.00275, 0.003, 0.004, 0.005, 0.0075, 0.01,
                            0.025, 0.1, 1.0}) {
      const double v = at(e, fmt::format("{}_bucket{},le=\"{}\"}}", name, req, le));
      EXPECT_GE(v, last) << "le=" << le;
      EXPECT_LE(v, count) << "le=" << le;
      last = v;
    }
  }
}

// log_format "json": every line the daemon writes is one JSON object with its time (UTC),
// KME, level, thread and message, at every level used (debug here), and no key is in it.
// lock_memory: the KME locks its pages (mlockall) before it starts, so no key reaches swap;
// a KME without it locks nothing. Where it could not keep every later page locked (a
// bounded RLIMIT_MEMLOCK and no CAP_IPC_LOCK) it refuses to start.
TEST(OpsTest, LockMemoryLocksTheKmesPages) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The sanitizers' runtimes make mlockall() a no-op (locking their shadow memory would
  // lock terabytes), so the daemon built with them locks nothing.
  GTEST_SKIP() << "mlockall() is a no-op under AddressSanitizer and ThreadSanitizer";
#endif
  rlimit lim{};
  ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &lim), 0);
  if (lim.rlim_cur != RLIM_INFINITY && ::geteuid() != 0) {
    GTEST_SKIP() << "RLIMIT_MEMLOCK is bounded and the tests do not run as root";
  }
  KmeNetworkOptions o;
  o.customize = [](json& alice, json&) { alice["lock_memory"] = true; };
  auto net = qkd::test::start_network_with_keys(o, 4);
  ASSERT_TRUE(net);
  auto locked_kb = [](pid_t pid) -> long {
    std::ifstream f(fmt::format("/proc/{}/status", pid));
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("VmLck:", 0) == 0) {
        return std::stol(line.substr(6));
      }
    }
    return -1;
  };
  EXPECT_GT(locked_kb(net->alice().pid), 0) << "alice-kme locked nothing";
  EXPECT_EQ(locked_kb(net->bob().pid), 0);

  // The same config under a bounded limit and without CAP_IPC_LOCK: refused at start.
  if (std::system("command -v setpriv >/dev/null && command -v prlimit >/dev/null") != 0) {
    GTEST_SKIP() << "no setpriv/prlimit (util-linux) to drop CAP_IPC_LOCK";
  }
  const std::string cmd = fmt::format(
      "setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock prlimit --memlock=65536 '{}' "
      "--config '{}' 2>&1",
      qkd::test::kms_binary(), net->alice().config_file.string());
  const auto [exit_code, out] = qkd::test::run_command(cmd);
  EXPECT_EQ(exit_code, 1) << out;
  EXPECT_NE(out.find("lock_memory: RLIMIT_MEMLOCK is bounded"), std::string::npos) << out;
}

// An error found only at start-up names the config file and the field: here alice-kme's
// node key file was replaced, so its database no longer opens (and nothing is touched).
TEST(OpsTest, AStoreUnderAnotherNodeKeyIsRefusedNamingFileAndField) {
  KmeNetworkOptions o;
  o.durable_store = true;
  auto net = qkd::test::start_network_with_keys(o, 4);
  ASSERT_TRUE(net);
  net->stop_kme("alice-kme");
  {
    std::ofstream key(net->dir() / "alice-kme.node.key", std::ios::trunc);
    key << std::string(64, 'c') << "\n";
  }
  auto started = net->start_kme("alice-kme");
  ASSERT_FALSE(started.ok()) << "alice-kme started with another node key";
  const std::string log = net->log_tail(net->alice(), 50);
  EXPECT_NE(log.find(net->alice().config_file.string() + ": store.path:"), std::string::npos)
      << log;
  EXPECT_NE(log.find("different node key"), std::string::npos) << log;
}

// A store file of an earlier format (counters and assignments not all authenticated) is
// not converted unasked: the KME refuses to start, naming the conversion; `qkd-kms
// --convert-store` converts it, and the KME then starts and serves the keys it held.
TEST(OpsTest, AStoreOfAnEarlierFormatIsConvertedOnlyWhenAsked) {
  KmeNetworkOptions o;
  o.durable_store = true;
  auto net = qkd::test::start_network_with_keys(o, 4);
  ASSERT_TRUE(net);
  auto alice = net->client(net->alice(), "alice");
  auto r = alice.get("/api/v1/keys/bob/enc_keys?number=2");
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_EQ(r->status, 200u) << r->body;
  const std::vector<std::string> ids = qkd::test::key_ids(*r);
  ASSERT_EQ(ids.size(), 2u);
  net->stop_kme("alice-kme");
  {
    std::ifstream key_file(net->dir() / "alice-kme.node.key");
    std::string hex;
    key_file >> hex;
    const auto key = qkd::test::node_key_from_hex(hex);
    ASSERT_EQ(key.size(), 32u);
    ASSERT_EQ(qkd::test::down_to_format_2((net->dir() / "alice-kme.db").string(), key), "");
  }
  auto started = net->start_kme("alice-kme");
  ASSERT_FALSE(started.ok()) << "alice-kme converted its store unasked";
  const std::string log = net->log_tail(net->alice(), 50);
  EXPECT_NE(log.find(net->alice().config_file.string() + ": store.path:"), std::string::npos)
      << log;
  EXPECT_NE(log.find("is a key store of format 2, an earlier build's: convert it once with "
                     "`qkd-kms --config <file> --convert-store`"),
            std::string::npos)
      << log;

  const std::string cmd = fmt::format("'{}' --config '{}' --convert-store 2>&1",
                                      qkd::test::kms_binary(),
                                      net->alice().config_file.string());
  const auto [exit_code, out] = qkd::test::run_command(cmd);
  EXPECT_EQ(exit_code, 0) << out;
  EXPECT_NE(out.find("converted to format 3"), std::string::npos) << out;
  EXPECT_NE(out.find("is in the current format"), std::string::npos) << out;

  ASSERT_TRUE(net->start_kme("alice-kme").ok()) << net->log_tail(net->alice(), 30);
  // Each request again until it succeeds while the link's session comes back (10 s).
  auto until_ok = [](const std::function<qkd::core::Result<HttpResponse>()>& call) {
    HttpResponse last;
    for (int i = 0; i < 100; ++i) {
      auto got = call();
      if (!got.ok()) {
        last.body = got.error().message;
        break;
      }
      last = *got;
      if (last.status == 200u) {
        break;
      }
      std::this_thread::sleep_for(100ms);
    }
    return last;
  };
  auto bob = net->client(net->bob(), "bob");
  const HttpResponse d =
      until_ok([&] { return bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body(ids)); });
  EXPECT_EQ(d.status, 200u) << d.body;
  alice = net->client(net->alice(), "alice");
  const HttpResponse again = until_ok([&] { return alice.get("/api/v1/keys/bob/enc_keys?number=1"); });
  EXPECT_EQ(again.status, 200u) << again.body;
  // The converted pool is the one bob-kme holds: the link resumed it.
  EXPECT_NE(net->log_tail(net->alice(), 50).find("established (resume)"), std::string::npos)
      << net->log_tail(net->alice(), 50);
}

TEST(OpsTest, JsonLogLinesAreObjects) {
  KmeNetworkOptions o;
  o.log_level = "debug";
  o.customize = [](json& alice, json&) { alice["log_format"] = "json"; };
  auto net = qkd::test::start_network_with_keys(o, 8);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  std::vector<std::string> keys;
  for (int i = 0; i < 3; ++i) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys?number=2");
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_EQ(r->status, 200u) << r->body;
    const json j = r->json();
    for (const auto& k : j.at("keys")) {
      keys.push_back(k.at("key").get<std::string>());
    }
  }
  net->stop_kme("alice-kme");
  const std::string log = read_file(net->alice().log_file);
  std::istringstream in(log);
  std::string line;
  std::size_t lines = 0;
  std::set<std::string> levels;
  bool session = false;
  const std::regex utc("\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}\\.\\d{3}Z");
  while (std::getline(in, line)) {
    ++lines;
    const json j = json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "not a JSON object: " << line;
    ASSERT_TRUE(j.contains("time") && j.at("time").is_string()) << line;
    EXPECT_TRUE(std::regex_match(j.at("time").get<std::string>(), utc)) << line;
    EXPECT_EQ(j.value("kme", ""), "alice-kme") << line;
    ASSERT_TRUE(j.contains("level") && j.at("level").is_string()) << line;
    EXPECT_TRUE(j.at("thread").is_number_unsigned()) << line;
    ASSERT_TRUE(j.contains("message") && j.at("message").is_string()) << line;
    levels.insert(j.at("level").get<std::string>());
    session = session || j.at("message").get<std::string>().find("established") != std::string::npos;
  }
  EXPECT_GT(lines, 5u);
  EXPECT_TRUE(levels.contains("info") && levels.contains("debug"))
      << "levels seen: " << levels.size();
  EXPECT_TRUE(session) << "no link session logged";
  for (const auto& k : keys) {
    EXPECT_EQ(log.find(k), std::string::npos) << "a key is in the log";
  }
}

// keys.max_key_count holds for a direction nobody draws from: with SAEs drawing at alice's
// KME only (as TLS servers there would), the link keeps running for alice's direction, and
// bob's direction, owned by bob's KME, stays under twice the limit at both ends instead of
// growing with every block. Keys still flow from bob's side, the same at both ends.
TEST(OpsTest, PoolLimitHoldsTheDirectionNobodyDrawsFrom) {
  KmeNetworkOptions o;
  o.max_key_count = 100;  // 3,200 bytes per direction (256-bit keys)
  constexpr double kCap = 3200;
  auto net = qkd::test::start_network_with_keys(o, 20);
  ASSERT_TRUE(net);
  const auto alice = net->client(net->alice(), "alice");
  const auto bob = net->client(net->bob(), "bob");
  const std::string committed = "qkd_kms_pool_committed_bytes{peer_kme_id=\"bob-kme\"}";
  auto pool = [&](const qkd::test::Exposition& e, const char* peer, const char* dir) {
    return at(e, fmt::format("qkd_kms_pool_bytes{{peer_kme_id=\"{}\",direction=\"{}\"}}", peer,
                             dir));
  };
  const double committed_before = at(scrape(alice), committed);
  // Alice's SAE draws until the link has committed 20 times the limit (bob's direction
  // gets half of that, ten times its limit): her direction never fills, so the link does
  // not pause. Bounded by a deadline far above the 3-4 s this takes on an idle machine.
  double committed_after = committed_before;
  const auto until = std::chrono::steady_clock::now() + 60s;
  while (committed_after - committed_before <= 20 * kCap &&
         std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 20; ++i) {
      auto r = alice.get("/api/v1/keys/bob/enc_keys?number=50");
      ASSERT_TRUE(r.ok()) << r.error().message;
      ASSERT_TRUE(r->status == 200 || r->status == 503) << r->status << " " << r->body;
      if (r->status == 503) {
        std::this_thread::sleep_for(20ms);
      }
    }
    committed_after = at(scrape(alice), committed);
  }
  EXPECT_GT(committed_after - committed_before, 20 * kCap) << "the link did not run";
  // Once alice's direction refills, the link pauses; within a trim period or two both ends
  // hold bob's direction at the limit, and agree on it.
  double bob_local = -1;
  double alice_peer = -1;
  double alice_local = -1;
  for (int i = 0; i < 40; ++i) {
    std::this_thread::sleep_for(250ms);
    bob_local = pool(scrape(bob), "alice-kme", "local");
    const auto ea = scrape(alice);
    alice_peer = pool(ea, "bob-kme", "peer");
    alice_local = pool(ea, "bob-kme", "local");
    if (bob_local < 2 * kCap && alice_peer == bob_local && alice_local < 2 * kCap) {
      break;
    }
  }
  EXPECT_LT(bob_local, 2 * kCap);
  EXPECT_GT(bob_local, 0);
  EXPECT_EQ(alice_peer, bob_local) << "the two ends disagree on bob's direction";
  EXPECT_LT(alice_local, 2 * kCap);
  // Bob's side still gets keys, the same at alice's KME.
  auto enc = bob.get("/api/v1/keys/alice/enc_keys?number=10");
  ASSERT_TRUE(enc.ok()) << enc.error().message;
  ASSERT_EQ(enc->status, 200u) << enc->body;
  const std::vector<std::string> ids = qkd::test::key_ids(*enc);
  ASSERT_EQ(ids.size(), 10u);
  auto dec = alice.post("/api/v1/keys/bob/dec_keys", qkd::test::dec_body(ids));
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  auto by_id = [](const HttpResponse& r) {
    std::map<std::string, std::string> m;  // key_ID -> base64 key
    const json j = r.json();
    for (const auto& k : j.at("keys")) {
      m[k.at("key_ID").get<std::string>()] = k.at("key").get<std::string>();
    }
    return m;
  };
  EXPECT_EQ(by_id(*dec), by_id(*enc));
  EXPECT_EQ(by_id(*dec).size(), 10u);
}

// A link peer that answers but is not the configured one (its certificate's CN is not
// link.peer_kme_id) is a configuration to fix, not a peer that is down: a warning that
// names both, seen at log_level "warn" (it was info, with its "link: " prefix doubled).
TEST(OpsTest, ALinkPeerWithAnotherNameIsAWarning) {
  KmeNetworkOptions o;
  o.log_level = "warn";
  o.customize = [](json&, json& bob) { bob["link"]["peer_kme_id"] = "carol-kme"; };
  auto net = KmeNetwork::start(o);
  ASSERT_TRUE(net.ok()) << net.error().message;
  const std::string log_file = (*net)->bob().log_file;
  const std::string expected = R"(is "alice-kme", expected "carol-kme")";
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (read_file(log_file).find(expected) == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  const std::string log = read_file(log_file);
  EXPECT_NE(log.find(expected), std::string::npos) << log;
  EXPECT_EQ(log.find("link: link:"), std::string::npos) << log;
}

// SIGHUP (a terminal hang-up, or an operator expecting a reload) used to end the KME at
// once, as a kill would: no drain, store left open. It is logged and the KME serves on;
// SIGTERM still stops it cleanly.
TEST(OpsTest, SighupIsLoggedAndTheKmeServesOn) {
  KmeNetworkOptions o;
  o.durable_store = true;
  auto net = KmeNetwork::start(o);
  ASSERT_TRUE(net.ok()) << net.error().message;
  ASSERT_EQ(::kill((*net)->alice().pid, SIGHUP), 0);
  const std::string log_file = (*net)->alice().log_file;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (read_file(log_file).find("SIGHUP") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_NE(read_file(log_file).find("does not reload its configuration"), std::string::npos)
      << (*net)->log_tail((*net)->alice());
  auto status = (*net)->client((*net)->alice(), "alice").get("/api/v1/keys/bob/status");
  ASSERT_TRUE(status.ok()) << "the KME is gone after SIGHUP: " << status.error().message;
  EXPECT_EQ(status->status, 200u) << status->body;
  (*net)->stop_kme("alice-kme");
  const int st = (*net)->alice().last_exit_status;
  ASSERT_TRUE(WIFEXITED(st)) << "status " << st;
  EXPECT_EQ(WEXITSTATUS(st), 0);
}

// SIGTERM while requests are in progress: exit code 0, every answered request complete;
// the restarted KME (same durable store) serves on and the peer still delivers every key
// handed out before, with identical bytes. No key ever appears in either log.
TEST(OpsTest, SigtermDuringRequestsExitsCleanlyAndRestartServesOn) {
  KmeNetworkOptions o;
  o.durable_store = true;
  o.log_level = "debug";
  auto net = qkd::test::start_network_with_keys(o, 200);
  ASSERT_TRUE(net);

  std::mutex mu;
  std::map<std::string, std::string> handed_out;  // key_ID -> base64 key
  std::atomic<int> ok{0};
  std::atomic<int> failures{0};  // connection-level failures (expected once it stops)
  std::atomic<bool> stop{false};
  std::vector<std::string> bad;
  std::vector<std::thread> threads;
  const auto kme = net->alice();
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t]() {
      const auto c = net->client(kme, "alice");
      while (!stop.load()) {
        auto r = c.get(t % 2 == 0 ? "/api/v1/keys/bob/enc_keys?number=2"
                                  : "/api/v1/keys/bob/enc_keys");
        if (!r.ok()) {
          ++failures;
          std::this_thread::sleep_for(20ms);
          continue;
        }
        std::lock_guard lock(mu);
        if (r->status == 503 && qkd::test::message_of(*r) == "the KME is shutting down") {
          continue;  // read after SIGTERM: a complete, well-formed refusal
        }
        if (r->status != 200) {
          bad.push_back(fmt::format("{} {}", r->status, r->body));
          continue;
        }
        const json j = r->json();
        if (j.is_discarded() || !j.contains("keys")) {
          bad.push_back("truncated 200: " + r->body);
          continue;
        }
        for (const auto& k : j.at("keys")) {
          handed_out[k.at("key_ID").get<std::string>()] = k.at("key").get<std::string>();
        }
        ++ok;
      }
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (ok.load() < 40 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  // A request in progress at SIGTERM: a dec_keys waiting (keys.dec_wait_ms, 2 s) for a
  // key_ID nobody assigned. It must get its complete answer, not a cut connection.
  std::optional<qkd::core::Result<HttpResponse>> waiting;
  std::thread waiter([&] {
    waiting = net->client(kme, "alice")
                  .get("/api/v1/keys/bob/dec_keys?key_ID=00000000-0000-4000-8000-00000000abcd");
  });
  std::this_thread::sleep_for(300ms);
  net->stop_kme("alice-kme");  // SIGTERM while the four clients keep asking
  const int st = net->alice().last_exit_status;
  std::this_thread::sleep_for(200ms);
  stop = true;
  for (auto& t : threads) {
    t.join();
  }
  waiter.join();
  ASSERT_TRUE(waiting.has_value());
  ASSERT_TRUE(waiting->ok()) << "the waiting request was cut: " << waiting->error().message;
  EXPECT_EQ((*waiting)->status, 400u) << (*waiting)->body;
  EXPECT_EQ(qkd::test::message_of(**waiting), "one or more keys specified are not found on KME");
  // The store was closed cleanly: its last connection checkpointed and removed the WAL.
  EXPECT_TRUE(std::filesystem::exists(net->dir() / "alice-kme.db"));
  EXPECT_FALSE(std::filesystem::exists(net->dir() / "alice-kme.db-wal"))
      << "the WAL is left: the store was not closed";
  EXPECT_GE(ok.load(), 40);
  ASSERT_TRUE(WIFEXITED(st)) << "qkd-kms did not exit by itself on SIGTERM (status " << st << ")";
  EXPECT_EQ(WEXITSTATUS(st), 0);
  EXPECT_TRUE(bad.empty()) << bad.size() << " bad answers, first: " << bad.front();
  const std::string alice_log = read_file(net->alice().log_file);
  EXPECT_NE(alice_log.find("shutting down"), std::string::npos);
  EXPECT_NE(alice_log.find("alice-kme: stopped"), std::string::npos);
  EXPECT_EQ(alice_log.find("critical"), std::string::npos);

  // Restart with the same store: it serves on.
  ASSERT_TRUE(net->start_kme("alice-kme").ok());
  const auto alice = net->client(net->alice(), "alice");
  bool served = false;
  const auto until = std::chrono::steady_clock::now() + 60s;
  while (!served && std::chrono::steady_clock::now() < until) {
    auto r = alice.get("/api/v1/keys/bob/enc_keys");
    ASSERT_TRUE(r.ok()) << r.error().message;
    if (r->status == 200) {
      served = true;
      const auto k = r->json().at("keys").at(0);
      handed_out[k.at("key_ID").get<std::string>()] = k.at("key").get<std::string>();
    } else {
      std::this_thread::sleep_for(100ms);
    }
  }
  ASSERT_TRUE(served) << "the restarted KME never served enc_keys";

  // Bob delivers every key alice handed out, before and after the restart, identically.
  const auto bob = net->client(net->bob(), "bob");
  std::vector<std::string> ids;
  for (const auto& [id, _] : handed_out) {
    ids.push_back(id);
  }
  std::size_t matched = 0;
  for (std::size_t i = 0; i < ids.size(); i += 100) {
    const std::vector<std::string> part(ids.begin() + static_cast<std::ptrdiff_t>(i),
                                        ids.begin() + static_cast<std::ptrdiff_t>(
                                                          std::min(ids.size(), i + 100)));
    auto d = bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body(part));
    ASSERT_TRUE(d.ok()) << d.error().message;
    ASSERT_EQ(d->status, 200u) << d->body;
    const json body_json = d->json();
    for (const auto& k : body_json.at("keys")) {
      EXPECT_EQ(k.at("key").get<std::string>(), handed_out.at(k.at("key_ID").get<std::string>()));
      ++matched;
    }
  }
  EXPECT_EQ(matched, ids.size());

  // No key, in base64 or hex, in either log (debug level).
  net->stop_kme("alice-kme");
  net->stop_kme("bob-kme");
  const std::string logs = read_file(net->alice().log_file) + read_file(net->bob().log_file);
  ASSERT_FALSE(logs.empty());
  for (const auto& [id, b64] : handed_out) {
    ASSERT_EQ(logs.find(b64), std::string::npos) << "key " << id << " logged";
    std::string hex;
    for (auto byte : qkd::test::b64decode(b64)) {
      hex += fmt::format("{:02x}", byte);
    }
    ASSERT_EQ(logs.find(hex), std::string::npos) << "key " << id << " logged in hex";
  }
}

// SIGTERM between a request's header and its body (the client waits for "100 Continue"
// and is slow to send the rest): the request began before the stop, so the KME reads it
// to its end and answers it before exiting, and the keys it hands out are the peer's too.
TEST(OpsTest, SigtermWaitsForARequestWhoseBodyIsStillComing) {
  KmeNetworkOptions o;
  o.durable_store = true;
  auto net = qkd::test::start_network_with_keys(o, 20);
  ASSERT_TRUE(net);
  const pid_t pid = net->alice().pid;
  const std::string body = R"({"number": 2})";
  const std::string head = fmt::format(
      "POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
      body.size());
  const auto sigterm_then_wait = [pid] {
    ::kill(pid, SIGTERM);
    std::this_thread::sleep_for(300ms);  // the KME is stopping by now
  };
  auto got = net->client(net->alice(), "alice")
                 .converse({{head, "HTTP/1.1 100", sigterm_then_wait}, {body, ""}});
  ASSERT_TRUE(got.ok()) << got.error().message;
  const auto final_at = got->find("HTTP/1.1 200");
  ASSERT_NE(final_at, std::string::npos) << *got;
  const auto body_at = got->find("\r\n\r\n", final_at);
  ASSERT_NE(body_at, std::string::npos) << *got;
  const json keys = json::parse(got->substr(body_at + 4), nullptr, false);
  ASSERT_FALSE(keys.is_discarded()) << *got;
  ASSERT_EQ(keys.at("keys").size(), 2u) << *got;

  net->stop_kme("alice-kme");  // reaps it
  const int st = net->alice().last_exit_status;
  ASSERT_TRUE(WIFEXITED(st)) << "status " << st;
  EXPECT_EQ(WEXITSTATUS(st), 0);
  // Restarted, alice tells bob what it handed out (if the stop came before the notice).
  ASSERT_TRUE(net->start_kme("alice-kme").ok());
  std::vector<std::string> ids;
  for (const auto& k : keys.at("keys")) {
    ids.push_back(k.at("key_ID").get<std::string>());
  }
  // Until the link is back (503 meanwhile).
  const auto bob = net->client(net->bob(), "bob");
  auto dec = bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body(ids));
  for (const auto until = std::chrono::steady_clock::now() + 30s;
       dec.ok() && dec->status == 503 && std::chrono::steady_clock::now() < until;) {
    std::this_thread::sleep_for(100ms);
    dec = bob.post("/api/v1/keys/alice/dec_keys", qkd::test::dec_body(ids));
  }
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  const auto by_id = [](const json& j) {
    std::map<std::string, std::string> m;  // key_ID -> base64 key
    for (const auto& k : j.at("keys")) {
      m[k.at("key_ID").get<std::string>()] = k.at("key").get<std::string>();
    }
    return m;
  };
  EXPECT_EQ(by_id(dec->json()), by_id(keys));
}

// Both KMEs reconfigured the same way (keys.max_key_size lowered) while a notice is still
// queued at one of them: at its stop, alice withdraws its prepared keys of 1024 bytes, and
// that notice reaches bob only at the next session, under the new configuration. It is
// taken (its bytes dropped, nothing kept), not refused: refused, it came back at every
// session and held up every later notice, so that keys alice handed out could not be
// fetched at bob (503, "peer KME unreachable") until the configuration was rolled back.
TEST(OpsTest, ANoticeQueuedBeforeBothConfigurationsChangedDoesNotStallTheLink) {
  KmeNetworkOptions o;
  o.durable_store = true;
  auto net = qkd::test::start_network_with_keys(o, 200);
  ASSERT_TRUE(net);
  auto big = net->client(net->alice(), "alice").get("/api/v1/keys/bob/enc_keys?size=8192");
  ASSERT_TRUE(big.ok()) << big.error().message;
  ASSERT_EQ(big->status, 200u) << big->body;
  net->stop_kme("alice-kme");  // withdraws the 1024-byte reserve: a notice for next time
  net->stop_kme("bob-kme");
  for (const auto* kme : {&net->alice(), &net->bob()}) {
    json cfg = json::parse(read_file(kme->config_file));
    cfg["keys"]["max_key_size"] = 4096;
    std::ofstream(kme->config_file, std::ios::trunc) << cfg.dump(2);
  }
  ASSERT_TRUE(net->start_kme("bob-kme").ok());
  ASSERT_TRUE(net->start_kme("alice-kme").ok());
  // A key handed out now is fetched at bob (503 only until the link is up).
  std::optional<HttpResponse> enc;
  for (const auto until = std::chrono::steady_clock::now() + 30s;
       std::chrono::steady_clock::now() < until;) {
    auto r = net->client(net->alice(), "alice").get("/api/v1/keys/bob/enc_keys");
    ASSERT_TRUE(r.ok()) << r.error().message;
    if (r->status == 200) {
      enc = *r;
      break;
    }
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(enc) << "alice never served enc_keys again";
  const json key = enc->json().at("keys").at(0);
  const std::string target =
      "/api/v1/keys/alice/dec_keys?key_ID=" + key.at("key_ID").get<std::string>();
  auto dec = net->client(net->bob(), "bob").get(target);
  for (const auto until = std::chrono::steady_clock::now() + 15s;
       dec.ok() && dec->status == 503 && std::chrono::steady_clock::now() < until;) {
    std::this_thread::sleep_for(200ms);
    dec = net->client(net->bob(), "bob").get(target);
  }
  ASSERT_TRUE(dec.ok()) << dec.error().message;
  ASSERT_EQ(dec->status, 200u) << dec->body;
  EXPECT_EQ(dec->json().at("keys").at(0).at("key"), key.at("key"));
  EXPECT_NE(read_file(net->bob().log_file).find("its bytes are dropped, no key is kept"),
            std::string::npos)
      << "the withdrawal did not name what this configuration lacks";
}


// `n` plain TCP connections to 127.0.0.1:port that say nothing (as many as connect).
std::vector<int> idle_connections(std::uint16_t port, int n) {
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) {
    const int fd = connect_loopback(port);
    if (fd < 0) {
      break;
    }
    fds.push_back(fd);
  }
  return fds;
}

void close_all(std::vector<int>& fds) {
  for (const int fd : fds) {
    ::close(fd);
  }
  fds.clear();
}

// How many of `fds` the server closed within `wait` (readable with end of stream or reset).
int closed_by_server(const std::vector<int>& fds, std::chrono::milliseconds wait) {
  std::set<int> closed;
  const auto deadline = std::chrono::steady_clock::now() + wait;
  while (std::chrono::steady_clock::now() < deadline && closed.size() < fds.size()) {
    std::vector<pollfd> p;
    for (const int fd : fds) {
      if (!closed.contains(fd)) {
        p.push_back({fd, POLLIN, 0});
      }
    }
    if (::poll(p.data(), p.size(), 200) <= 0) {
      continue;
    }
    for (const auto& q : p) {
      char c = 0;
      if (q.revents != 0 && ::recv(q.fd, &c, 1, MSG_DONTWAIT) <= 0) {
        closed.insert(q.fd);
      }
    }
  }
  return static_cast<int>(closed.size());
}

std::size_t count_of(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

// Waits (generously) for /health on the plain listener and a status request on the API.
void expect_serving(const KmeNetwork& net, std::uint16_t metrics_port) {
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  int health = -1;
  unsigned api = 0;
  while (std::chrono::steady_clock::now() < deadline && (health != 200 || api != 200)) {
    health = plain_get(metrics_port, "/health").first;
    auto r = net.client(net.alice(), "alice").get("/api/v1/keys/bob/status");
    api = r.ok() ? r->status : 0;
    if (health != 200 || api != 200) {
      std::this_thread::sleep_for(200ms);
    }
  }
  EXPECT_EQ(health, 200);
  EXPECT_EQ(api, 200u);
}

// Idle connections cannot take a KME's file descriptors. (1) The API holds at most half the
// descriptor limit in connections: beyond that a new one is closed at once (here 128 of a
// soft limit of 256), so the plain listener keeps serving meanwhile; the plain and link
// listeners hold at most 32 each. (2) Out of descriptors
// all the same (the limit lowered under the running daemon), the accept loop waits before
// retrying instead of spinning: a few rate-limited "accept:" warnings, not one per retry
// (hundreds of thousands in seconds before), and both listeners serve again once the
// connections close.
TEST(OpsTest, IdleConnectionsCannotExhaustFileDescriptors) {
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_GE(saved.rlim_max, 1024u) << "the test needs 1024 descriptors";
  rlimit low = saved;
  low.rlim_cur = 256;  // inherited by the daemons started now
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  KmeNetworkOptions o;
  o.customize = [](json& alice, json&) { alice["metrics"] = {{"listen", "127.0.0.1:0"}}; };
  auto started = KmeNetwork::start(o);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_TRUE(started.ok()) << started.error().message;
  auto& net = *started;
  ASSERT_TRUE(net->wait_for_keys(1).ok());
  const json ready = json::parse(read_file(net->dir() / "alice-kme.ready"));
  const auto metrics_port = ready.at("metrics_port").get<std::uint16_t>();
  const auto api_port = net->alice().api_port;

  // (1) 200 idle connections against a limit of 128.
  auto held = idle_connections(api_port, 200);
  ASSERT_EQ(held.size(), 200u);
  EXPECT_GE(closed_by_server(held, 5s), 50) << "connections beyond the limit stay open";
  EXPECT_EQ(plain_get(metrics_port, "/health").first, 200);
  close_all(held);
  expect_serving(*net, metrics_port);

  // (1b) The plain listener and the link listener have limits of their own (32 each; on the
  // link, connections whose peer is not known yet): idle connections to one of them are
  // closed beyond it, and the API serves meanwhile.
  for (const std::uint16_t port : {metrics_port, net->alice().link_port}) {
    held = idle_connections(port, 200);
    ASSERT_EQ(held.size(), 200u);
    EXPECT_GE(closed_by_server(held, 5s), 150) << "port " << port << ": connections beyond "
                                               << "the limit stay open";
    auto status = net->client(net->alice(), "alice").get("/api/v1/keys/bob/status");
    ASSERT_TRUE(status.ok()) << status.error().message;
    EXPECT_EQ(status->status, 200u);
    close_all(held);
  }
  expect_serving(*net, metrics_port);
  const std::string log = read_file(net->alice().log_file);
  EXPECT_NE(log.find("metrics: 32 connections open, the limit"), std::string::npos);
  EXPECT_NE(log.find("link: 32 connections open, the limit"), std::string::npos);

  // (2) The daemon's limit lowered to 20 descriptors more than it has open.
  std::size_t open = 0;
  for ([[maybe_unused]] const auto& e :
       std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", net->alice().pid))) {
    ++open;
  }
  const rlimit tight{open + 20, open + 20};
  ASSERT_EQ(::prlimit(net->alice().pid, RLIMIT_NOFILE, &tight, nullptr), 0);
  const std::size_t before = count_of(read_file(net->alice().log_file), "accept:");
  held = idle_connections(api_port, 200);
  EXPECT_GT(held.size(), 100u);
  std::this_thread::sleep_for(2s);
  const std::size_t accept_lines = count_of(read_file(net->alice().log_file), "accept:") - before;
  close_all(held);
  EXPECT_GE(accept_lines, 1u) << "the descriptors never ran out";
  EXPECT_LT(accept_lines, 50u) << "the accept loop spins on its error";
  expect_serving(*net, metrics_port);
}

}  // namespace
