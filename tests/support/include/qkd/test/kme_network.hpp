// Test harness: a two-KME QKD network of real qkd-kms processes in a fresh temp dir.
//
//   auto net = qkd::test::KmeNetwork::start();          // PKI, configs, both daemons
//   ASSERT_TRUE(net.ok()) << net.error().message;
//   ASSERT_TRUE((*net)->wait_for_keys(10).ok());         // both KMEs hold >= 10 keys
//   qkd::test::HttpsTestClient alice((*net)->alice().host, (*net)->alice().api_port,
//                                    (*net)->sae("alice"));
//   ... or with the ETSI client: ClientConfig{(*net)->alice().url, id.cert_file, ...}
//
// start() makes a temp dir (under $TMPDIR or /tmp), generates the demo PKI there with
// examples/pki.sh (CA + CN=alice-kme, bob-kme, alice, bob, mallory), writes both configs
// with port 0 everywhere, starts alice-kme (link role alice, serves SAE "alice"), reads its
// ready file, starts bob-kme (role bob, serves SAE "bob") connecting to alice's link port.
// Each daemon's stdout/stderr goes to <dir>/<kme>.log. The destructor stops both daemons
// (SIGTERM, then SIGKILL after 5 s) — also when a test fails, since it runs on unwind; a
// crashed test process takes the daemons with it (PR_SET_PDEATHSIG). The temp dir is
// removed unless a test (in this process) failed or QKD_TEST_KEEP=1 is set; on failure the path
// and the tail of both logs are printed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/test/https_client.hpp"

namespace qkd::test {

struct KmeNetworkOptions {
  std::uint32_t dec_wait_ms = 2000;  // keys.dec_wait_ms on both KMEs
  std::uint32_t key_size = 256;      // keys.key_size
  std::uint32_t max_key_per_request = 128;
  std::uint64_t max_key_count = 100000;
  std::uint64_t pulses_per_block = 2'000'000;
  double length_km = 20.0;
  std::string log_level = "info";
  // Durable key stores: each KME gets store {path <kme>.db, node_key_file <kme>.node.key}
  // (a fresh random key, mode 0600) in the network's directory.
  bool durable_store = false;
  // Last word on the generated configs (each a JSON object in the documented format).
  std::function<void(nlohmann::json& alice_config, nlohmann::json& bob_config)> customize;
  std::chrono::milliseconds start_timeout{20'000};  // per daemon, until its ready file
  // More SAEs (each gets a certificate with that CN): served by alice-kme / bob-kme (listed
  // in its `saes` and in the other KME's `link.peer_saes`, after "alice" / "bob").
  std::vector<std::string> extra_alice_saes;
  std::vector<std::string> extra_bob_saes;
  std::uint32_t max_age_s = 0;          // keys.max_age_s on both KMEs (0: not written)
  std::uint32_t notice_delay_ms = 0;    // link.notice_delay_ms on both KMEs (0: not written)
};

// One running KME as the tests see it.
struct KmeInfo {
  std::string kme_id;  // "alice-kme" / "bob-kme"
  std::string sae_id;  // the SAE it serves: "alice" / "bob"
  std::string host = "127.0.0.1";
  std::uint16_t api_port = 0;
  std::uint16_t link_port = 0;  // alice's listening port (0 for bob)
  std::string url;              // "https://127.0.0.1:<api_port>"
  std::filesystem::path config_file;
  std::filesystem::path log_file;
  pid_t pid = -1;
  // The waitpid() status of the last stop (SIGTERM, or SIGKILL after 5 s); -1 until then.
  int last_exit_status = -1;
};

class KmeNetwork {
 public:
  [[nodiscard]] static qkd::core::Result<std::unique_ptr<KmeNetwork>> start(
      KmeNetworkOptions options = {});
  ~KmeNetwork();
  KmeNetwork(const KmeNetwork&) = delete;
  KmeNetwork& operator=(const KmeNetwork&) = delete;

  // Polls both KMEs' status until each reports stored_key_count >= n (in keys of key_size)
  // and its link up.
  [[nodiscard]] qkd::core::Status wait_for_keys(
      std::uint64_t n, std::chrono::milliseconds timeout = std::chrono::seconds(60)) const;

  [[nodiscard]] const KmeInfo& alice() const { return alice_; }
  [[nodiscard]] const KmeInfo& bob() const { return bob_; }

  // PEM paths for "alice", "bob", "mallory" (or "alice-kme", "bob-kme"), with the CA.
  [[nodiscard]] TlsIdentity sae(std::string_view name) const;
  [[nodiscard]] std::filesystem::path ca_file() const;
  [[nodiscard]] const std::filesystem::path& dir() const { return dir_; }

  // A raw client for `sae_name` talking to the given KME (safe beside a restart of it on
  // another thread: its port is read under endpoints_mu_).
  [[nodiscard]] HttpsTestClient client(const KmeInfo& kme, std::string_view sae_name) const;

  // Is the daemon still running?
  [[nodiscard]] bool running(const KmeInfo& kme) const;
  // Stops bob-kme (SIGTERM) and starts it again with the same config (link reconnect tests).
  [[nodiscard]] qkd::core::Status restart_bob();
  // Kills the daemon `kme_id` ("alice-kme" / "bob-kme") with SIGKILL (no shutdown at all)
  // and starts it again with the same config, on the ports it had bound before (so the peer
  // and the tests' clients find it again).
  [[nodiscard]] qkd::core::Status crash_and_restart(std::string_view kme_id);

  // Stops a daemon (SIGTERM, then SIGKILL after 5 s) / starts it again with the same config
  // on the ports it had bound before.
  void stop_kme(std::string_view kme_id);
  [[nodiscard]] qkd::core::Status start_kme(std::string_view kme_id);

  // Last `lines` lines of a daemon's log.
  [[nodiscard]] std::string log_tail(const KmeInfo& kme, std::size_t lines = 30) const;

 private:
  KmeNetwork() = default;
  [[nodiscard]] qkd::core::Status spawn(KmeInfo& kme);
  void stop(KmeInfo& kme);
  // Guards each KmeInfo's api_port, link_port and url, which spawn() rewrites at a restart
  // while load threads of a test may be making clients (client()).
  mutable std::mutex endpoints_mu_;
  [[nodiscard]] qkd::core::Status pin_ports(const KmeInfo& kme) const;

  KmeNetworkOptions options_;
  std::filesystem::path dir_;
  KmeInfo alice_;
  KmeInfo bob_;
};

// Starts a network and waits until both KMEs hold `keys` keys; on failure records a test
// failure (with both logs' tails) and returns nullptr.
[[nodiscard]] std::unique_ptr<KmeNetwork> start_network_with_keys(KmeNetworkOptions options,
                                                                  std::uint64_t keys);

// Paths fixed at build time.
[[nodiscard]] std::string kms_binary();            // $<TARGET_FILE:qkd-kms>
// Runs a shell command (e.g. qkd-kms with a one-shot flag); its exit code (-1 when it did
// not exit) and what it wrote to stdout (add 2>&1 for stderr).
[[nodiscard]] std::pair<int, std::string> run_command(const std::string& cmd);
[[nodiscard]] std::filesystem::path source_dir();  // the project's source tree

}  // namespace qkd::test
