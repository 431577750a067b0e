// Server-side prefetch of QKD keys (docs/PROTOCOL.md, "Server-side prefetch").
//
// The server's encapsulation needs one key for the client SAE named in the key share. A
// KME round trip per handshake costs about as much as the rest of the handshake, so the
// server asks its KME for a batch (one enc_keys call, number = n) and hands the keys out to
// the following handshakes for the same client SAE, each key once, removed and cleansed
// when handed out.
//
// Bounds (what a key held here can cost):
//   - per SAE at most `max_batch` keys, over all SAEs at most `max_total`, for at most
//     `max_age` (older keys are cleansed unused: they are lost, as are the keys cached when
//     the process exits or forks);
//   - the batch adapts per SAE: it starts at 1 (no key held), doubles when the previous
//     batch was used up within max_age / 2, and halves whenever keys expire unused; so a
//     rarely seen SAE costs one key per handshake and no key is held for it;
//   - a forked child drops (cleanses) everything it inherited and starts empty: a key is
//     never handed out by two processes.
// Refill ahead (refill_ahead, on in the provider): when a hit leaves max(1, batch / 4) keys
// or fewer, a short-lived thread (one at a time per cache) tops the SAE's cache up to its
// batch, so that a busy SAE's handshakes do not wait for the KME. shutdown() joins it (the
// provider calls it before its ETSI client goes away); a forked child never uses it.
// Keys announced ahead (docs/PROTOCOL.md, "Keys announced ahead"): when a key share carries
// a client_id and the same (client SAE, client_id) comes back, up to `announce` keys move
// from the SAE's cache into a reservation for that client_id; their key_IDs go out in this
// handshake's ciphertext, and the client process fetches them before its next handshakes.
// A reserved key is handed out only to a share with that client_id, oldest first, and only
// within max_age of its fetch (the client keeps announced keys twice as long). A reservation
// holds up to a target that starts at 2 and doubles (up to `announce`) while its keys are
// used within max_age / 2, halving when any expire unused, so that a client process that
// stops (or a client_id copied into someone else's ClientHellos) costs few keys. It is
// topped up when it falls to max(1, target / 4), once the SAE's cache holds at least half
// of what is missing (or at once when it is empty): each announcement costs the client one
// dec_keys call, so announcements come in batches. Announced keys are the cache's freshest,
// none older than max_age / 2.
// Keys live in OpenSSL's secure heap (SecureBuf). Admission (admission.hpp) is checked by
// the caller before take(): a cached key is still one admitted key.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"
#include "fork_guard.hpp"
#include "qkd/etsi/client.hpp"
#include "secure_buf.hpp"
#include "wire.hpp"
#include "worker_thread.hpp"

namespace qkd::prov {

struct KeyCacheLimits {
  std::uint32_t max_batch = 32;                  // setting prefetch_keys; 1 = no prefetch
  std::chrono::milliseconds max_age{30'000};     // setting prefetch_max_age_ms
  std::size_t max_total = 1024;                  // keys held over all SAEs
  std::size_t max_saes = 256;                    // SAEs with keys or history remembered
  bool refill_ahead = false;                     // refill on another thread before empty
  std::uint32_t announce = 16;                   // setting announce_keys; 0 = announce none
  // A refused batch of n caps the SAE's batch at n / 2; after this long without another
  // refusal the cap is lifted (the refusal may have been passing: the KME short of keys, an
  // admission budget spent).
  std::chrono::milliseconds cap_retry{60'000};
};

struct CachedKey {
  KeyId key_id{};
  SecureBuf key;
  bool from_cache = false;  // false: fetched by this call
  std::vector<KeyId> ahead;  // reserved for the share's client_id: announce them
};

struct KeyCacheStats {
  std::uint64_t hits = 0, fetches = 0, keys_fetched = 0, expired = 0, dropped_on_fork = 0,
                background_fetches = 0, announced = 0, reserved_hits = 0;
};

class KeyCache final : public ForkGuarded {
 public:
  using Clock = std::chrono::steady_clock;
  using Deadline = qkd::etsi::Deadline;
  // Asks the KME for `number` keys for the SAE (one enc_keys call), ending by `deadline`:
  // take()'s for a fetch in line, none for a refill on another thread (nobody waits for
  // it). With refill_ahead it may run on another thread after take() returned: capture by
  // value, nothing that dies before shutdown().
  using Fetch = std::function<qkd::core::Result<std::vector<qkd::etsi::Key>>(
      std::uint32_t number, Deadline deadline)>;

  explicit KeyCache(KeyCacheLimits limits = {});  // not copyable (ForkGuarded)
  ~KeyCache();  // shutdown(); SecureBuf cleanses every key held

  // Starts no more refills; does not wait.
  void stop_soon();
  // stop_soon(), then waits for the refill thread (this process's). Idempotent.
  void shutdown();

  // One key of `key_bytes` bytes for client SAE `slave`: one reserved for `client` (the
  // share's client_id, may be null), else a cached one, else from fetch(n); with `client`,
  // the result may carry key_IDs newly reserved for it (CachedKey::ahead).
  // Only one batch fetch per SAE runs at a time; a caller that finds the cache empty while
  // another is fetching fetches a single key for itself. A failed batch fetch (e.g. the KME
  // caps the number, or has fewer keys) is retried once with n = 1; both fetches in line get
  // `deadline` (the handshake operation's), so that the retry does not add a timeout of
  // its own. Errors: fetch's own, or
  // kProtocol for a reply whose key_ID is not a UUID or whose key has the wrong length.
  // A refused batch of n also caps this SAE's batch at n / 2, for limits.cap_retry.
  [[nodiscard]] qkd::core::Result<CachedKey> take(std::string_view slave, const ClientId* client,
                                                  std::size_t key_bytes, Clock::time_point now,
                                                  Deadline deadline, const Fetch& fetch);

  // Observers for tests and documentation.
  [[nodiscard]] std::size_t cached(std::string_view slave, std::size_t key_bytes);
  [[nodiscard]] std::uint32_t batch(std::string_view slave, std::size_t key_bytes);
  [[nodiscard]] std::size_t reserved(std::string_view slave, const ClientId& client,
                                     std::size_t key_bytes);
  [[nodiscard]] KeyCacheStats stats();
  // True when every key held is a secure-heap allocation (and at least one is held).
  [[nodiscard]] bool all_in_secure_heap();
  // Keys held whose bytes are not all zero. Unlike the observers above, it does not first
  // drop what a forked child inherited: it shows what the child's fork handler left.
  [[nodiscard]] std::size_t keys_not_cleansed();

 private:
  struct Slot {
    KeyId key_id{};
    SecureBuf key;
    Clock::time_point fetched{};
  };
  static constexpr std::uint32_t kNoCap = 0xFFFFFFFFu;
  struct Entry {
    std::deque<Slot> keys;
    std::uint32_t batch = 1;
    std::uint32_t cap = kNoCap;  // lowered when the KME refuses a batch of that size
    Clock::time_point capped_at{};  // then
    bool fetching = false;
    Clock::time_point last_fetch{};
    bool fetched_once = false;
  };
  using EntryKey = std::pair<std::string, std::size_t>;  // (slave SAE, key bytes)
  struct Reservation {
    std::deque<Slot> keys;  // announced, not yet handed out
    std::uint32_t seen = 0;  // shares with this client_id
    Clock::time_point last_seen{};
    std::uint32_t target = 0;  // keys to hold for it: 2 at first, doubled while used fast
    bool topped_up_once = false;
    Clock::time_point last_top_up{};
  };
  using ReservationKey = std::pair<EntryKey, ClientId>;

  [[nodiscard]] qkd::core::Result<CachedKey> take_unreserved(const EntryKey& ek,
                                                             Clock::time_point now,
                                                             Deadline deadline,
                                                             const Fetch& fetch);
  // Moves keys from the SAE's cache into `r` when it runs low; their key_IDs go to `ahead`.
  void announce_locked(const EntryKey& ek, Reservation& r, Clock::time_point now,
                       const Fetch& fetch, std::vector<KeyId>* ahead);
  // Cleanses a deque's keys older than max_age; true if any.
  bool expire_keys_locked(std::deque<Slot>& keys, Clock::time_point now);
  // Expires a reservation's keys; when any expire, halves its target and the SAE's batch.
  void expire_reserved_locked(const EntryKey& ek, Reservation& r, Clock::time_point now);

  // ForkGuarded: in the child, cleanses the inherited keys at once (check_fork_locked()
  // drops them at the first call).
  void reset_in_child() override;
  void check_fork_locked();
  // Sweeps at most once a second; then `map`'s entry for `key`, made when the map holds
  // fewer than max_saes entries (after a sweep when it is full); end() when none can be.
  template <typename Map>
  typename Map::iterator find_or_make_locked(Map& map, const typename Map::key_type& key,
                                             Clock::time_point now);
  void expire_locked(Entry& e, Clock::time_point now);
  void sweep_locked(Clock::time_point now);
  // After a hit: starts a background top-up when the SAE runs low (under mu_).
  // e.cap, lifted first if limits_.cap_retry has passed since it was lowered.
  std::uint32_t uncapped_locked(Entry& e, Clock::time_point now) const;
  void maybe_refill_ahead_locked(const EntryKey& ek, Entry& e, Clock::time_point now,
                                 const Fetch& fetch);
  void run_refill(EntryKey ek, std::uint32_t number, Fetch fetch);
  // A fetch's reply as cache slots; a fetch error, a bad reply (kProtocol) or no memory
  // for the keys (kInternal) as an error.
  [[nodiscard]] qkd::core::Result<std::vector<Slot>> convert(
      qkd::core::Result<std::vector<qkd::etsi::Key>> got, std::size_t key_bytes,
      Clock::time_point now) const;
  [[nodiscard]] qkd::core::Result<std::vector<Slot>> convert_keys(
      const std::vector<qkd::etsi::Key>& keys, std::size_t key_bytes, Clock::time_point now) const;

  std::mutex mu_;
  const KeyCacheLimits limits_;
  std::map<EntryKey, Entry> entries_;  // guarded by mu_
  std::map<ReservationKey, Reservation> reservations_;  // guarded by mu_, at most max_saes
  std::size_t total_ = 0;              // keys held, guarded by mu_
  Clock::time_point last_sweep_{};
  pid_t pid_;
  WorkerThread refill_;  // the refill-ahead thread (guarded by mu_)
  bool stopping_ = false;
  KeyCacheStats stats_;
};

}  // namespace qkd::prov
