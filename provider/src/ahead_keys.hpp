// Client side of the keys announced ahead (docs/PROTOCOL.md, "Keys announced ahead").
//
// A client process puts a random client_id in its key shares. A server that sees it twice
// reserves keys for it and announces their key_IDs in the ciphertext; this class fetches
// announced keys from the client's own KME (one dec_keys call for all of them, on a worker
// thread) and holds them until a later handshake's ciphertext names one, so that the
// handshake needs no KME round trip.
//
// Rules that keep a key from being lost or used twice:
//   - a key_ID is fetched by one call at a time: a handshake whose key is being fetched
//     (by the worker, or by another handshake's call) waits for that call, bounded by the
//     timeout, instead of asking the KME again (which would refuse a key already delivered);
//   - each held key is handed out once, removed and cleansed (SecureBuf, secure heap);
//   - announcements the client cannot hold (max_keys reached) are not fetched: a handshake
//     that later uses one fetches it then, as without announcements;
//   - a failed call that included announced keys may have consumed them at the KME without
//     delivering them here; the client_id is then replaced, so that the server's reservation
//     for the old one (which may name those keys) is never used again;
//   - keys held longer than max_age (twice the server's reservation age) are cleansed unused;
//   - after fork() the child drops every key it inherited and takes a new client_id, so
//     that parent and child never hold the same key.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/etsi/client.hpp"
#include "secure_buf.hpp"
#include "wire.hpp"
#include "worker_thread.hpp"

namespace qkd::prov {

struct AheadLimits {
  std::size_t max_keys = 256;                 // setting fetch_ahead_keys; 0 = no client_id
  std::chrono::milliseconds max_age{60'000};  // 2 x prefetch_max_age_ms
  std::chrono::milliseconds wait{5'000};      // setting timeout_ms: longest wait for a fetch
  bool background = true;                     // fetch announced keys on a worker thread
};

struct AheadStats {
  std::uint64_t hits = 0, fetches = 0, keys_fetched = 0, background_fetches = 0, waits = 0,
                expired = 0, not_fetched = 0, client_id_changes = 0, dropped_on_fork = 0;
};

class AheadKeys {
 public:
  using Clock = std::chrono::steady_clock;
  // One dec_keys call at the client's KME. May run on the worker thread after take()
  // returned: capture by value, nothing that dies before shutdown().
  using Fetch = std::function<qkd::core::Result<std::vector<qkd::etsi::Key>>(
      const std::string& master, std::span<const std::string> key_ids)>;

  explicit AheadKeys(AheadLimits limits = {});
  AheadKeys(const AheadKeys&) = delete;
  AheadKeys& operator=(const AheadKeys&) = delete;
  ~AheadKeys();  // shutdown(); SecureBuf cleanses every key held

  // Waits for the worker thread (this process's) and starts no more. Idempotent.
  void shutdown();

  // The client_id for a new key share; none when max_keys is 0.
  [[nodiscard]] qkd::core::Result<std::optional<ClientId>> client_id();

  // The key of `key_bytes` bytes for (master, key_id): a held one, or the one a call in
  // flight brings, else fetched now in one call together with the `ahead` key_IDs (those
  // of the same ciphertext). When the key needs no call, `ahead` is fetched on the worker
  // thread. Errors: fetch's own; kTimeout when a call in flight for the key does not end
  // within the wait; kProtocol for a reply without the key or with the wrong length.
  [[nodiscard]] qkd::core::Result<SecureBuf> take(const std::string& master, const KeyId& key_id,
                                                  const std::vector<KeyId>& ahead,
                                                  std::size_t key_bytes, Clock::time_point now,
                                                  const Fetch& fetch);

  // Observers for tests and documentation.
  [[nodiscard]] std::size_t held();
  [[nodiscard]] AheadStats stats();
  [[nodiscard]] bool all_in_secure_heap();

 private:
  using HeldId = std::pair<std::string, KeyId>;  // (master SAE, key_ID)
  struct Held {
    SecureBuf key;
    Clock::time_point fetched{};
  };
  struct Job {
    std::string master;
    std::vector<KeyId> ids;
    std::size_t key_bytes = 0;
  };

  void check_fork_locked();
  void sweep_locked(Clock::time_point now);
  void new_client_id_locked();
  // The announced key_IDs worth fetching (not held, not in flight, room left), marked in
  // flight.
  std::vector<KeyId> claim_locked(const std::string& master, const std::vector<KeyId>& ahead);
  // Stores what a call brought (or, on failure, changes the client_id) and releases its
  // key_IDs from `in_flight_`. Returns the key for `wanted` when given and present.
  std::optional<SecureBuf> settle_locked(const std::string& master, const std::vector<KeyId>& ids,
                                         std::size_t key_bytes,
                                         qkd::core::Result<std::vector<qkd::etsi::Key>>& got,
                                         const KeyId* wanted, bool included_announced);
  void run_jobs(Fetch fetch);

  std::mutex mu_;
  std::condition_variable settled_;  // a call ended: its key_IDs left in_flight_
  const AheadLimits limits_;
  std::map<HeldId, Held> held_;    // guarded by mu_
  std::set<HeldId> in_flight_;     // key_IDs a call is fetching now (guarded by mu_)
  std::deque<Job> jobs_;           // guarded by mu_
  std::optional<ClientId> client_id_;
  Clock::time_point last_sweep_{};
  pid_t pid_;
  WorkerThread worker_;
  bool stopping_ = false;
  AheadStats stats_;
};

}  // namespace qkd::prov
