// Client side of the keys announced ahead (docs/PROTOCOL.md, "Keys announced ahead").
//
// A client process puts a random client_id in its key shares. A server that sees it twice
// reserves keys for it and announces their key_IDs in the ciphertext; this class fetches
// announced keys from the client's own KME (one dec_keys call for all of them, on a worker
// thread) and holds them until a later handshake's ciphertext names one, so that the
// handshake needs no KME round trip.
//
// Rules that keep a key from being lost or used twice:
//   - a key_ID is fetched by one call at a time: a handshake whose key a running call is
//     fetching (the worker's, or another handshake's) waits for that call, bounded by the
//     timeout and by its operation's deadline, instead of asking the KME again (which would refuse a key already
//     delivered); a key whose batch is only queued is taken out of it and fetched at once;
//   - each held key is handed out once, removed and cleansed (SecureBuf, secure heap);
//   - announcements are fetched only for the current client_id, and not at all when the
//     client cannot hold them (max_keys reached): a handshake that later uses one fetches
//     it then, as without announcements;
//   - a failed call that included announced keys may have consumed them at the KME without
//     delivering them here, a refused key may mean that another process consumed it, and a
//     held key that expires may still be handed out by a server configured to keep keys
//     longer: in each case the client_id is replaced, so that the server's reservation for
//     the old one is never used again;
//   - a call asks for at most max_per_call key_IDs, halved when a KME refuses a larger call
//     (its max_key_per_request); only a clean refusal is retried with the key alone;
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
#include "fork_guard.hpp"
#include "secure_buf.hpp"
#include "wire.hpp"
#include "worker_thread.hpp"

namespace qkd::prov {

struct AheadLimits {
  std::size_t max_keys = 256;                 // setting fetch_ahead_keys; 0 = no client_id
  std::chrono::milliseconds max_age{60'000};  // 2 x prefetch_max_age_ms
  std::chrono::milliseconds wait{5'000};      // setting timeout_ms: longest wait for a fetch
  bool background = true;                     // fetch announced keys on a worker thread
  // A KME that refused a call of n key_IDs gets at most n / 2 per call; after this long
  // without another refusal, the full number is tried again (the refusal may have been
  // passing: keys short, an admission budget spent, key_IDs a peer made up).
  std::chrono::milliseconds cap_retry{60'000};
};

struct AheadStats {
  std::uint64_t hits = 0, fetches = 0, keys_fetched = 0, background_fetches = 0, waits = 0,
                taken_from_queue = 0, expired = 0, not_fetched = 0, client_id_changes = 0,
                dropped_on_fork = 0;
};

class AheadKeys final : public ForkGuarded {
 public:
  using Clock = std::chrono::steady_clock;
  using Deadline = qkd::etsi::Deadline;
  // One dec_keys call at the client's KME, ending by `deadline`: take()'s for a call in
  // line, none on the worker thread (nobody waits for it). May run on the worker thread
  // after take() returned: capture by value, nothing that dies before shutdown().
  using Fetch = std::function<qkd::core::Result<std::vector<qkd::etsi::Key>>(
      const std::string& master, std::span<const std::string> key_ids, Deadline deadline)>;

  explicit AheadKeys(AheadLimits limits = {});  // not copyable (ForkGuarded)
  ~AheadKeys();  // shutdown(); SecureBuf cleanses every key held

  // Starts no more work; the worker stops after its current call. Does not wait.
  void stop_soon();
  // stop_soon(), then waits for the worker thread (this process's). Idempotent.
  void shutdown();

  // The client_id for a new key share; none when max_keys is 0.
  [[nodiscard]] qkd::core::Result<std::optional<ClientId>> client_id();

  // The key of `key_bytes` bytes for (master, key_id): a held one, or the one a running
  // call brings, else fetched now in one call together with the `ahead` key_IDs (those of
  // the same ciphertext, announced to `share_client_id`: fetched only when that is the
  // current client_id). When the key needs no call, `ahead` is fetched on the worker
  // thread. Everything take() waits for (a running call for the key, its own calls, the
  // retry of a refused one) ends by `deadline` (the handshake operation's), so that one
  // operation never waits for more than one timeout. Errors: fetch's own; kTimeout when a
  // running call for the key does not end within the wait (and the deadline); kProtocol for
  // a reply without the key or with the wrong length.
  [[nodiscard]] qkd::core::Result<SecureBuf> take(const std::string& master, const KeyId& key_id,
                                                  const std::vector<KeyId>& ahead,
                                                  const std::optional<ClientId>& share_client_id,
                                                  std::size_t key_bytes, Clock::time_point now,
                                                  Deadline deadline, const Fetch& fetch);

  // Observers for tests and documentation.
  [[nodiscard]] std::size_t held();
  [[nodiscard]] AheadStats stats();
  [[nodiscard]] bool all_in_secure_heap();
  // Keys held whose bytes are not all zero. Unlike held(), it does not first drop what a
  // forked child inherited: it shows what the child's fork handler left.
  [[nodiscard]] std::size_t keys_not_cleansed();

 private:
  // ForkGuarded: the child gets a fresh condition variable, and the inherited keys are
  // cleansed at once (check_fork_locked() drops them at the first call).
  void reset_in_child() override;

  using HeldId = std::pair<std::string, KeyId>;  // (master SAE, key_ID)
  struct Held {
    SecureBuf key;
    Clock::time_point fetched{};
    ClientId owner{};  // the client_id the key was announced to
  };
  struct Job {
    std::string master;
    std::vector<KeyId> ids;
    std::size_t key_bytes = 0;
    ClientId owner{};
  };
  using KemResult = qkd::core::Result<std::vector<qkd::etsi::Key>>;

  void check_fork_locked();
  void sweep_locked(Clock::time_point now);
  void new_client_id_locked();
  // The announced key_IDs worth fetching (not held, queued or in flight; room left), at
  // most `limit`.
  std::vector<KeyId> claim_locked(const std::string& master, const std::vector<KeyId>& ahead,
                                  std::size_t limit);
  // Queues announced key_IDs for the worker thread (started if needed).
  void enqueue_locked(const std::string& master, const std::vector<KeyId>& ahead,
                      std::size_t key_bytes, const Fetch& fetch);
  // Removes a queued key_ID from its job (the caller fetches it itself).
  void unqueue_locked(const HeldId& id);
  // Ends a call: releases its key_IDs from in_flight_, keeps what it brought (owner:
  // `owner`), and replaces the client_id when announced keys may be lost. Returns the key
  // for `wanted` when given and brought; on a bad reply turns `got` into the error.
  std::optional<SecureBuf> settle_locked(const std::string& master, const std::vector<KeyId>& ids,
                                         std::size_t key_bytes, KemResult& got,
                                         const KeyId* wanted, const ClientId* owner);
  void run_jobs(Fetch fetch);

  std::mutex mu_;
  std::condition_variable settled_;  // a call ended: its key_IDs left in_flight_
  const AheadLimits limits_;
  std::map<HeldId, Held> held_;    // guarded by mu_
  std::set<HeldId> in_flight_;     // key_IDs a running call is fetching (guarded by mu_)
  std::set<HeldId> queued_;        // key_IDs in jobs_ (guarded by mu_)
  std::deque<Job> jobs_;           // guarded by mu_
  std::size_t max_per_call_ = 1 + kMaxAhead;
  Clock::time_point capped_at_{};  // when a refusal last lowered max_per_call_
  std::optional<ClientId> client_id_;
  Clock::time_point last_sweep_{};
  pid_t pid_;
  WorkerThread worker_;
  bool stopping_ = false;
  AheadStats stats_;
};

}  // namespace qkd::prov
