#include "qkd/test/kme_network.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <openssl/rand.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <vector>

#ifndef QKD_TEST_KMS_BINARY
#error "QKD_TEST_KMS_BINARY must be defined (path to qkd-kms)"
#endif
#ifndef QKD_TEST_SOURCE_DIR
#error "QKD_TEST_SOURCE_DIR must be defined (project source dir)"
#endif

namespace qkd::test {

using json = nlohmann::json;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using namespace std::chrono_literals;

std::string kms_binary() { return QKD_TEST_KMS_BINARY; }

std::pair<int, std::string> run_command(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    return {-1, "popen failed"};
  }
  char buf[512];
  while (std::fgets(buf, sizeof buf, p) != nullptr) {
    out += buf;
  }
  const int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}
std::filesystem::path source_dir() { return QKD_TEST_SOURCE_DIR; }

namespace {

std::string random_hex(std::size_t bytes) {
  std::vector<unsigned char> b(bytes);
  if (RAND_bytes(b.data(), static_cast<int>(b.size())) != 1) {
    throw std::runtime_error("RAND_bytes failed");
  }
  std::string s;
  for (unsigned char c : b) {
    s += fmt::format("{:02x}", c);
  }
  return s;
}

json make_config(const std::string& kme_id, const std::vector<std::string>& saes,
                 const std::string& peer_kme, const std::vector<std::string>& peer_saes,
                 bool alice, const std::string& psk, std::uint16_t alice_link_port,
                 const KmeNetworkOptions& o) {
  json link = {
      {"peer_kme_id", peer_kme},
      {"peer_saes", peer_saes},
      {"role", alice ? "alice" : "bob"},
      {"psk_hex", psk},
      {"channel",
       {{"length_km", o.length_km},
        {"loss_db_per_km", 0.2},
        {"detector_efficiency", 0.1},
        {"dark_count_prob", 1e-6},
        {"misalignment", 0.01},
        {"eve_intercept_fraction", 0},
        {"pulse_rate_hz", 1e9}}},
      {"protocol",
       {{"pulses_per_block", o.pulses_per_block}, {"sample_fraction", 0.1}, {"qber_abort", 0.11}}}};
  if (o.notice_delay_ms != 0) {
    link["notice_delay_ms"] = o.notice_delay_ms;
  }
  if (alice) {
    link["listen"] = "127.0.0.1:0";
  } else {
    link["connect"] = fmt::format("127.0.0.1:{}", alice_link_port);
  }
  json cfg = json{{"kme_id", kme_id},
              {"api",
               {{"listen", "127.0.0.1:0"},
                {"cert", fmt::format("pki/{}.crt", kme_id)},
                {"key", fmt::format("pki/{}.key", kme_id)},
                {"ca", "pki/ca.crt"}}},
              {"saes", saes},
              {"keys",
               {{"key_size", o.key_size},
                {"min_key_size", 64},
                {"max_key_size", 8192},
                {"max_key_per_request", o.max_key_per_request},
                {"max_key_count", o.max_key_count},
                {"dec_wait_ms", o.dec_wait_ms}}},
              {"link", std::move(link)},
              {"log_level", o.log_level}};
  if (o.max_age_s != 0) {
    cfg["keys"]["max_age_s"] = o.max_age_s;
  }
  return cfg;
}

bool write_file(const std::filesystem::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::trunc);
  f << text;
  return static_cast<bool>(f);
}

}  // namespace

qkd::core::Result<std::unique_ptr<KmeNetwork>> KmeNetwork::start(KmeNetworkOptions options) {
  std::unique_ptr<KmeNetwork> net(new KmeNetwork());
  net->options_ = std::move(options);
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = fmt::format("{}/qkd-kms-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
  if (::mkdtemp(templ.data()) == nullptr) {
    return make_error(ErrorCode::kInternal, "mkdtemp failed");
  }
  net->dir_ = templ;
  std::vector<std::string> alice_saes = {"alice"};
  std::vector<std::string> bob_saes = {"bob"};
  alice_saes.insert(alice_saes.end(), net->options_.extra_alice_saes.begin(),
                    net->options_.extra_alice_saes.end());
  bob_saes.insert(bob_saes.end(), net->options_.extra_bob_saes.begin(),
                  net->options_.extra_bob_saes.end());
  std::string names = "alice-kme bob-kme alice bob mallory";
  for (const auto* list : {&net->options_.extra_alice_saes, &net->options_.extra_bob_saes}) {
    for (const auto& n : *list) {
      if (n.find('\'') != std::string::npos || n.find('/') != std::string::npos) {
        return make_error(ErrorCode::kInvalidArgument, "SAE names may not hold ' or /");
      }
      names += fmt::format(" '{}'", n);
    }
  }
  const std::string pki_cmd =
      fmt::format("bash '{}' '{}' {} >'{}' 2>&1", (source_dir() / "examples" / "pki.sh").string(),
                  (net->dir_ / "pki").string(), names, (net->dir_ / "pki.log").string());
  if (std::system(pki_cmd.c_str()) != 0) {
    return make_error(ErrorCode::kInternal, fmt::format("PKI generation failed: see {}",
                                                        (net->dir_ / "pki.log").string()));
  }
  const std::string psk = random_hex(32);

  KmeInfo& a = net->alice_;
  a.kme_id = "alice-kme";
  a.sae_id = "alice";
  a.config_file = net->dir_ / "alice-kme.json";
  a.log_file = net->dir_ / "alice-kme.log";
  KmeInfo& b = net->bob_;
  b.kme_id = "bob-kme";
  b.sae_id = "bob";
  b.config_file = net->dir_ / "bob-kme.json";
  b.log_file = net->dir_ / "bob-kme.log";

  // Bob's connect address is filled in once alice's link port is known (unless the
  // customize hook set its own).
  constexpr const char* kPlaceholder = "127.0.0.1:1";
  json acfg =
      make_config("alice-kme", alice_saes, "bob-kme", bob_saes, true, psk, 0, net->options_);
  json bcfg =
      make_config("bob-kme", bob_saes, "alice-kme", alice_saes, false, psk, 1, net->options_);
  if (net->options_.durable_store) {
    for (const auto& [cfg, id] : {std::pair<json*, const char*>{&acfg, "alice-kme"},
                                  std::pair<json*, const char*>{&bcfg, "bob-kme"}}) {
      const auto key_file = net->dir_ / fmt::format("{}.node.key", id);
      const int fd = ::open(key_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      const std::string hex = random_hex(32) + "\n";
      if (fd < 0 || ::write(fd, hex.data(), hex.size()) != static_cast<ssize_t>(hex.size())) {
        if (fd >= 0) {
          ::close(fd);
        }
        return make_error(ErrorCode::kInternal, "cannot write a node key file");
      }
      ::close(fd);
      (*cfg)["store"] = {{"path", fmt::format("{}.db", id)},
                         {"node_key_file", key_file.filename().string()}};
    }
  }
  if (net->options_.customize) {
    net->options_.customize(acfg, bcfg);
  }
  if (!write_file(a.config_file, acfg.dump(2))) {
    return make_error(ErrorCode::kInternal, "cannot write alice-kme.json");
  }
  if (auto s = net->spawn(a); !s.ok()) {
    return s.error();
  }
  if (bcfg["link"].value("connect", "") == kPlaceholder) {
    bcfg["link"]["connect"] = fmt::format("127.0.0.1:{}", a.link_port);
  }
  if (!write_file(b.config_file, bcfg.dump(2))) {
    return make_error(ErrorCode::kInternal, "cannot write bob-kme.json");
  }
  if (auto s = net->spawn(b); !s.ok()) {
    return s.error();
  }
  return net;
}

qkd::core::Status KmeNetwork::spawn(KmeInfo& kme) {
  const std::filesystem::path ready = dir_ / (kme.kme_id + ".ready");
  std::filesystem::remove(ready);
  const std::string bin = kms_binary();
  std::vector<std::string> args = {bin, "--config", kme.config_file.string(), "--ready-file",
                                   ready.string()};
  std::vector<char*> argv;
  for (auto& s : args) {
    argv.push_back(s.data());
  }
  argv.push_back(nullptr);
  const int log_fd = ::open(kme.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    return make_error(ErrorCode::kInternal, "cannot open log file");
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return make_error(ErrorCode::kInternal, "fork failed");
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) {
      ::_exit(127);
    }
    ::dup2(log_fd, STDOUT_FILENO);
    ::dup2(log_fd, STDERR_FILENO);
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) {
      ::dup2(devnull, STDIN_FILENO);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(log_fd);
  kme.pid = pid;
  const auto deadline = std::chrono::steady_clock::now() + options_.start_timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!running(kme)) {
      return make_error(ErrorCode::kUnavailable, fmt::format("{} exited during start-up; log:\n{}",
                                                             kme.kme_id, log_tail(kme)));
    }
    std::ifstream f(ready);
    if (f) {
      std::stringstream ss;
      ss << f.rdbuf();
      json j = json::parse(ss.str(), nullptr, false);
      if (!j.is_discarded() && j.contains("api_port")) {
        std::lock_guard lock(endpoints_mu_);
        kme.api_port = j.at("api_port").get<std::uint16_t>();
        kme.link_port = j.at("link_port").get<std::uint16_t>();
        kme.url = fmt::format("https://{}:{}", kme.host, kme.api_port);
        return qkd::core::ok_status();
      }
    }
    std::this_thread::sleep_for(20ms);
  }
  return make_error(ErrorCode::kTimeout,
                    fmt::format("{} did not become ready; log:\n{}", kme.kme_id, log_tail(kme)));
}

bool KmeNetwork::running(const KmeInfo& kme) const {
  if (kme.pid <= 0) {
    return false;
  }
  int status = 0;
  const pid_t r = ::waitpid(kme.pid, &status, WNOHANG);
  if (r == kme.pid) {
    const_cast<KmeInfo&>(kme).pid = -1;  // reaped
    return false;
  }
  return r == 0;
}

void KmeNetwork::stop(KmeInfo& kme) {
  if (kme.pid <= 0) {
    return;
  }
  ::kill(kme.pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (::waitpid(kme.pid, &status, WNOHANG) == kme.pid) {
      kme.pid = -1;
      kme.last_exit_status = status;
      return;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::cerr << "qkd::test: " << kme.kme_id << " ignored SIGTERM; killing it\n";
  ::kill(kme.pid, SIGKILL);
  ::waitpid(kme.pid, &status, 0);
  kme.pid = -1;
  kme.last_exit_status = status;
}

qkd::core::Status KmeNetwork::restart_bob() {
  stop(bob_);
  return spawn(bob_);
}

qkd::core::Status KmeNetwork::pin_ports(const KmeInfo& kme) const {
  std::ifstream f(kme.config_file);
  std::stringstream ss;
  ss << f.rdbuf();
  json cfg = json::parse(ss.str(), nullptr, false);
  if (cfg.is_discarded()) {
    return make_error(ErrorCode::kInternal, "cannot read " + kme.config_file.string());
  }
  cfg["api"]["listen"] = fmt::format("{}:{}", kme.host, kme.api_port);
  if (kme.link_port != 0 && cfg["link"].contains("listen")) {
    cfg["link"]["listen"] = fmt::format("{}:{}", kme.host, kme.link_port);
  }
  if (!write_file(kme.config_file, cfg.dump(2))) {
    return make_error(ErrorCode::kInternal, "cannot write " + kme.config_file.string());
  }
  return qkd::core::ok_status();
}

qkd::core::Status KmeNetwork::crash_and_restart(std::string_view kme_id) {
  KmeInfo* k = kme_id == alice_.kme_id ? &alice_ : kme_id == bob_.kme_id ? &bob_ : nullptr;
  if (k == nullptr) {
    return make_error(ErrorCode::kInvalidArgument, fmt::format("no KME {}", kme_id));
  }
  if (auto s = pin_ports(*k); !s.ok()) {
    return s;
  }
  if (k->pid > 0) {
    int status = 0;
    ::kill(k->pid, SIGKILL);
    ::waitpid(k->pid, &status, 0);
    k->pid = -1;
  }
  // The kernel frees the listening sockets with the process; retry briefly if a port is
  // still taken.
  qkd::core::Status s = qkd::core::ok_status();
  for (int attempt = 0; attempt < 20; ++attempt) {
    s = spawn(*k);
    if (s.ok()) {
      return s;
    }
    std::this_thread::sleep_for(250ms);
  }
  return s;
}

void KmeNetwork::stop_kme(std::string_view kme_id) {
  KmeInfo* k = kme_id == alice_.kme_id ? &alice_ : kme_id == bob_.kme_id ? &bob_ : nullptr;
  if (k != nullptr) {
    stop(*k);
  }
}

qkd::core::Status KmeNetwork::start_kme(std::string_view kme_id) {
  KmeInfo* k = kme_id == alice_.kme_id ? &alice_ : kme_id == bob_.kme_id ? &bob_ : nullptr;
  if (k == nullptr) {
    return make_error(ErrorCode::kInvalidArgument, fmt::format("no KME {}", kme_id));
  }
  if (k->pid > 0) {
    return qkd::core::ok_status();
  }
  if (auto s = pin_ports(*k); !s.ok()) {
    return s;
  }
  qkd::core::Status s = qkd::core::ok_status();
  for (int attempt = 0; attempt < 20; ++attempt) {
    s = spawn(*k);
    if (s.ok()) {
      return s;
    }
    std::this_thread::sleep_for(250ms);
  }
  return s;
}

std::unique_ptr<KmeNetwork> start_network_with_keys(KmeNetworkOptions options,
                                                    std::uint64_t keys) {
  auto net = KmeNetwork::start(std::move(options));
  if (!net.ok()) {
    ADD_FAILURE() << "network start: " << net.error().message;
    return nullptr;
  }
  if (auto s = net.value()->wait_for_keys(keys); !s.ok()) {
    ADD_FAILURE() << "waiting for keys: " << s.error().message << "\n--- alice-kme\n"
                  << net.value()->log_tail(net.value()->alice()) << "--- bob-kme\n"
                  << net.value()->log_tail(net.value()->bob());
    return nullptr;
  }
  return std::move(net.value());
}

KmeNetwork::~KmeNetwork() {
  stop(bob_);
  stop(alice_);
  // A failure in the current test, or (for a network shared by a suite and destroyed in
  // TearDownTestSuite) in any test of this process.
  const bool failed =
      ::testing::Test::HasFailure() || ::testing::UnitTest::GetInstance()->failed_test_count() > 0;
  const char* keep = std::getenv("QKD_TEST_KEEP");
  if (failed) {
    std::cerr << "qkd::test: test failed; KME network kept in " << dir_
              << "\n--- alice-kme log tail\n"
              << log_tail(alice_) << "--- bob-kme log tail\n"
              << log_tail(bob_) << "---\n";
  }
  if (failed || (keep != nullptr && std::string(keep) == "1")) {
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

qkd::core::Status KmeNetwork::wait_for_keys(std::uint64_t n,
                                            std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string last;
  for (;;) {
    bool ok = true;
    for (const KmeInfo* k : {&alice_, &bob_}) {
      const KmeInfo& peer = (k == &alice_) ? bob_ : alice_;
      auto r = client(*k, k->sae_id).get(fmt::format("/api/v1/keys/{}/status", peer.sae_id));
      if (!r.ok()) {
        last = r.error().message;
        ok = false;
        break;
      }
      const json j = r->json();
      if (r->status != 200 || j.is_discarded() || !j.contains("stored_key_count")) {
        last = fmt::format("{} status {}: {}", k->kme_id, r->status, r->body);
        ok = false;
        break;
      }
      const auto have = j.at("stored_key_count").get<std::uint64_t>();
      if (have < n) {
        last = fmt::format("{} has {} keys", k->kme_id, have);
        ok = false;
        break;
      }
      // enc_keys is a 503 while the link has no session (a KME restarted with its pool).
      const json link = j.value("status_extension", json::object()).value("link", json::object());
      if (link.value("state", "") != "up") {
        last = fmt::format("{}: the link is not up", k->kme_id);
        ok = false;
        break;
      }
    }
    if (ok) {
      return qkd::core::ok_status();
    }
    if (!running(alice_) || !running(bob_)) {
      return make_error(ErrorCode::kUnavailable, "a KME exited while waiting for keys");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return make_error(ErrorCode::kTimeout,
                        fmt::format("fewer than {} keys after the timeout ({})", n, last));
    }
    std::this_thread::sleep_for(50ms);
  }
}

TlsIdentity KmeNetwork::sae(std::string_view name) const {
  const auto pki = dir_ / "pki";
  return TlsIdentity{(pki / (std::string(name) + ".crt")).string(),
                     (pki / (std::string(name) + ".key")).string(), (pki / "ca.crt").string()};
}

std::filesystem::path KmeNetwork::ca_file() const { return dir_ / "pki" / "ca.crt"; }

HttpsTestClient KmeNetwork::client(const KmeInfo& kme, std::string_view sae_name) const {
  std::uint16_t port = 0;
  {
    std::lock_guard lock(endpoints_mu_);
    port = kme.api_port;
  }
  return HttpsTestClient(kme.host, port, sae(sae_name));
}

std::string KmeNetwork::log_tail(const KmeInfo& kme, std::size_t lines) const {
  std::ifstream f(kme.log_file);
  std::deque<std::string> tail;
  std::string line;
  while (std::getline(f, line)) {
    tail.push_back(line);
    if (tail.size() > lines) {
      tail.pop_front();
    }
  }
  std::string out;
  for (const auto& l : tail) {
    out += l + "\n";
  }
  return out;
}

}  // namespace qkd::test
