// qkd-kms: one key management entity (ETSI GS QKD 014 API + one QKD link).
//
//   qkd-kms --config FILE [--ready-file PATH]   run (until SIGINT/SIGTERM)
//   qkd-kms --config FILE --check-config        validate and exit 0 (valid) or 1
//   qkd-kms --config FILE --convert-store       convert the store file of an earlier build
//                                               (KME stopped) and exit 0, or 1
//   qkd-kms --version                           print the version and the store format
//
// Exit codes: 0 clean shutdown or valid config; 1 bad config or start-up failure (the
// message names the file and the field); 2 unexpected fatal error. Logs go to stderr.
// Config format: see examples/alice-kme.json and qkd/kms/config.hpp.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#ifndef QKD_KMS_VERSION
#error "QKD_KMS_VERSION must be defined (the CMake project version)"
#endif

#include "qkd/kms/config.hpp"
#include "qkd/kms/key_store.hpp"
#include "qkd/kms/kme.hpp"
#include "qkd/kms/logging.hpp"

namespace {

// Whether the effective capabilities hold CAP_IPC_LOCK (bit 14 of CapEff in
// /proc/self/status), which lifts RLIMIT_MEMLOCK.
bool has_cap_ipc_lock() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("CapEff:", 0) == 0) {
      const std::uint64_t caps = std::stoull(line.substr(7), nullptr, 16);
      return (caps >> 14) & 1u;
    }
  }
  return false;
}

// Writes `text` to `path` atomically (temporary file in the same directory, then rename).
bool write_atomically(const std::filesystem::path& path, const std::string& text) {
  const std::filesystem::path tmp = path.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (!f) {
      return false;
    }
    f << text;
    f.flush();
    if (!f) {
      return false;
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  return !ec;
}

int run(int argc, char** argv) {
  CLI::App app{"qkd-kms: a QKD key management entity serving the ETSI GS QKD 014 API"};
  // Parsed before the other options (no --config needed): prints one line and exits 0.
  app.set_version_flag("--version",
                       fmt::format("qkd-kms {} (writes key store format {})", QKD_KMS_VERSION,
                                   qkd::kms::kStoreFormat),
                       "print the version and the key store format it writes, and exit");
  std::string config_file;
  std::string ready_file;
  bool check_only = false;
  bool convert = false;
  app.add_option("--config", config_file, "KME configuration file (JSON)")->required();
  app.add_flag("--check-config", check_only, "validate the configuration and exit (0 = valid)");
  app.add_flag("--convert-store", convert,
               "convert the store file of an earlier build to the current format (with the KME "
               "stopped; cannot be undone: keep a copy to go back) and exit (0 = converted or "
               "already current)");
  app.add_option("--ready-file", ready_file,
                 "once the listeners are bound, write {\"api_port\":N,\"link_port\":N} here "
                 "(link_port 0 at the bob end, which connects and does not listen; and "
                 "\"metrics_port\":N with metrics.listen)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  auto config = qkd::kms::load_config(config_file);
  if (!config.ok()) {
    std::cerr << "qkd-kms: invalid configuration: " << config.error().message << "\n";
    return 1;
  }
  if (check_only) {
    for (const auto& w : config->warnings) {
      std::cerr << "qkd-kms: warning: " << w << "\n";
    }
    std::cout << config_file << ": OK\n";
    return 0;
  }

  qkd::kms::setup_logging(config.value());
  for (const auto& w : config->warnings) {
    spdlog::warn("{}", w);
  }
  if (convert) {
    if (auto st = qkd::kms::convert_store(config.value()); !st.ok()) {
      std::cerr << "qkd-kms: " << config_file << ": " << st.error().message << "\n";
      return 1;
    }
    std::cout << config_file << ": store " << config.value().store.path.string()
              << " is in the current format\n";
    return 0;
  }
  // Before the KME starts (the link's PSK is the only secret in memory yet): every page the
  // process has or maps later stays in RAM, locked as it is first touched. Every later
  // mapping counts in full against RLIMIT_MEMLOCK, so a finite limit would make thread or
  // arena creation fail mid-run: refused unless the limit is unbounded or CAP_IPC_LOCK
  // lifts it.
  if (config->lock_memory) {
    rlimit lim{};
    const bool unbounded =
        (::getrlimit(RLIMIT_MEMLOCK, &lim) == 0 && lim.rlim_cur == RLIM_INFINITY) ||
        has_cap_ipc_lock();
    if (!unbounded) {
      spdlog::critical("{}: lock_memory: RLIMIT_MEMLOCK is bounded and the process lacks "
                       "CAP_IPC_LOCK (set LimitMEMLOCK=infinity, or grant CAP_IPC_LOCK)",
                       config->source);
      return 1;
    }
    if (::mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0) {
      spdlog::critical("{}: lock_memory: cannot lock the process's memory: {}", config->source,
                       std::strerror(errno));
      return 1;
    }
  }

  // Errors found only now (a database sealed under another node key, a port in use) name
  // the field; the file is the config's.
  auto kme = qkd::kms::Kme::create(std::move(config.value()));
  if (!kme.ok()) {
    spdlog::critical("{}: {}", config_file, kme.error().message);
    return 1;
  }
  auto ports = kme.value()->start();
  if (!ports.ok()) {
    spdlog::critical("{}: {}", config_file, ports.error().message);
    kme.value()->stop();
    return 1;
  }
  if (!ready_file.empty()) {
    nlohmann::json j = {{"api_port", ports->api_port}, {"link_port", ports->link_port}};
    if (ports->metrics_port != 0) {
      j["metrics_port"] = ports->metrics_port;
    }
    if (!write_atomically(ready_file, j.dump())) {
      spdlog::critical("cannot write ready file {}", ready_file);
      kme.value()->stop();
      return 1;
    }
  }
  kme.value()->wait();
  kme.value()->stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "qkd-kms: fatal: " << e.what() << "\n";
    return 2;
  }
}
