// KME configuration: one JSON file per KME (see examples/alice-kme.json).
//
// Parsing is strict: an unknown key at any level, a wrong type or a bad value is an error
// whose message names the file and the field ("alice.json: keys.max_key_size: ...").
// Relative paths are resolved against the config file's directory.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/link.hpp"
#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::kms {

struct HostPort {
  std::string host;        // numeric address or name
  std::uint16_t port = 0;  // 0 = any free port (listen addresses only)
  [[nodiscard]] std::string to_string() const;
};

struct ApiConfig {
  HostPort listen;
  std::filesystem::path cert;  // this KME's certificate (PEM), also used on the link
  std::filesystem::path key;   // its private key
  std::filesystem::path ca;    // CA for SAE client certificates and the peer KME
};

struct KeysConfig {
  std::uint32_t key_size = 256;  // bits, default size of enc_keys
  std::uint32_t min_key_size = 64;
  std::uint32_t max_key_size = 8192;
  std::uint32_t max_key_per_request = 128;
  std::uint64_t max_key_count = 100000;  // in keys of key_size; the link pauses above it
  std::uint32_t dec_wait_ms = 2000;      // how long dec_keys waits for a peer's notice
  // Keys older than this (seconds since their block was committed here; for a key assigned
  // by the peer, since its notice arrived) are discarded on both ends. 0 = never.
  std::uint32_t max_age_s = 0;
  // Keys assigned to SAEs here and not fetched yet, per (master, slave): beyond it the
  // oldest go (KeyStore::set_max_unfetched). 0 = no limit; else at least 4096 + 2 *
  // max_key_per_request (the default is raised to that).
  std::uint64_t max_unfetched_per_pair = 100000;
};

// Durable key store (optional; without it keys live in memory and a restart loses them).
struct StoreConfig {
  bool enabled = false;
  std::filesystem::path path;           // SQLite database, created if missing
  std::filesystem::path node_key_file;  // 32 bytes (raw or 64 hex digits), mode 0600
  // store.synchronous: "full" (default) syncs the WAL at every commit, so a delivered key's
  // consumption survives a power loss; "normal" syncs only at checkpoints: it survives a
  // crash or kill -9 of the process but a power loss may undo the last commits.
  bool synchronous_full = true;
  // store.prepared_keys: keys kept ready per (master, slave, size), their consumption made
  // durable ahead of the request, so that enc_keys waits for no fsync (KeyStore::
  // set_prepared_keys). 0 = none.
  std::uint32_t prepared_keys = 32;
};

// Admission control of enc_keys (see admission.hpp). 0 switches a budget off.
struct AdmissionConfig {
  // Per calling (master) SAE: a token bucket of keys, refilled at sae_keys_per_s up to
  // sae_burst keys.
  std::uint64_t sae_keys_per_s = 5000;
  std::uint64_t sae_burst = 10000;
  // Per (master, slave) pair: at most pair_keys_per_window keys outstanding (not fetched by
  // the slave yet) per pair_window_s seconds (a token bucket of that capacity refilled
  // evenly over the window; a fetched key gives its token back).
  std::uint64_t pair_keys_per_window = 2500;
  double pair_window_s = 1.0;
  // dec_keys requests of one SAE waiting for their keys' notice at once (each for up to
  // keys.dec_wait_ms; they hold no thread, only their connection), 0-1000; 0 = no limit.
  // Off by default: a busy slave legitimately has many waiting when the notices lag
  // (kms_load, 64 connections of one SAE: ~8 % of requests refused at 32).
  std::uint32_t sae_waiting_dec_keys = 0;
};

// Prometheus metrics: GET /metrics on the API listener (mutual TLS, like /health), and
// optionally on a plain-HTTP listener restricted to a loopback address.
struct MetricsConfig {
  bool plain_listener = false;
  HostPort listen;  // loopback only
};

enum class LinkRole { kAlice, kBob };

struct LinkConfig {
  std::string peer_kme_id;             // CN the peer KME's certificate must carry
  std::vector<std::string> peer_saes;  // SAEs served by the peer KME (valid slaves)
  LinkRole role = LinkRole::kAlice;
  HostPort listen;             // role alice
  HostPort connect;            // role bob
  qkd::core::SecureBytes psk;  // >= 32 bytes, from psk_hex or psk_file
  bool psk_in_config = false;  // given as link.psk_hex
  qkd::core::ChannelParams channel;
  qkd::core::ProtocolParams protocol;
  // Testing aid: hold each outgoing key-assignment notice this long before sending it
  // (order is kept). 0 (the default) sends at once.
  std::uint32_t notice_delay_ms = 0;
  // The thread running the BB84 engine runs this many nice levels (0-19) below the
  // process's priority (capped at nice 19), so that key generation yields the CPU to the API
  // and link I/O threads. 0 = same priority as the rest (Linux per-thread nice).
  std::uint32_t engine_nice = 10;
};

struct Config {
  std::string source;  // file name, for messages
  std::string kme_id;
  ApiConfig api;
  std::vector<std::string> saes;  // SAEs served by this KME (valid callers)
  KeysConfig keys;
  LinkConfig link;
  StoreConfig store;
  std::string log_level = "info";
  std::string log_format = "text";  // "text" or "json" (qkd/kms/logging.hpp)
  // Lock the process's memory (mlockall) so that no key reaches swap; the KME refuses to
  // start when it cannot (RLIMIT_MEMLOCK, CAP_IPC_LOCK).
  bool lock_memory = false;
  AdmissionConfig admission;
  MetricsConfig metrics;
  // What is allowed but unwise (load_config): logged at start, printed by --check-config.
  std::vector<std::string> warnings;
};

// Parses `text` (the content of `source_name`); relative paths resolve against `base_dir`.
// An object naming a member twice is an error, and so is an ID (kme_id, link.peer_kme_id,
// saes, link.peer_saes) that is empty, longer than 64 bytes or holds a control character.
// When `check_files` is set, the files are checked as the KME will use them: the
// certificate, key and CA readable PEM files of their kind, the key the certificate's, its
// CN kme_id and the certificate verifying against the CA; the node key file owner-only; the
// folder of store.path writable. (link.psk_file is read in any case.)
[[nodiscard]] qkd::core::Result<Config> parse_config(std::string_view text,
                                                     std::string_view source_name,
                                                     const std::filesystem::path& base_dir,
                                                     bool check_files = true);

// Reads and parses a config file. Errors name the file (and the field).
[[nodiscard]] qkd::core::Result<Config> load_config(const std::filesystem::path& file);

}  // namespace qkd::kms
