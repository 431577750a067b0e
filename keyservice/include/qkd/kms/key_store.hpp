// The key store: the link's key pool, split by direction, and the keys assigned from it.
//
// Pool layout. Both KMEs of a link append the same committed BB84 key bytes in the same
// order, so a byte's position in the pool names the same byte on both ends. The pool is cut
// into fixed 32-byte chunks; even chunks belong to direction kAlice (allocatable only by the
// alice-role KME), odd chunks to kBob. Each direction is read as its own byte stream
// ("direction offset"). A KME allocates enc_keys only from its own direction, strictly in
// order, so two KMEs serving enc_keys at the same time can never hand out the same byte.
// The peer learns each assignment from a notice (KeyAssignment) carried over the link and
// takes the same bytes out of the other direction of its own pool.
//
// Delivered key material is removed and cleansed: a byte leaves the pool when it is
// allocated (own direction) or assigned by a notice (peer direction); a peer-assigned key
// is cleansed when dec_keys delivers it.
//
// Two implementations: the in-memory store (make_memory_key_store) and the durable one
// (make_sqlite_key_store, sqlite_key_store.hpp) which keeps the same state in SQLite and
// additionally the link's session state (epoch, committed blocks, Bob's pending block,
// unacknowledged notices), so that a restarted KME resumes the link where it stopped.
// Every mutating call of the durable store returns only once its change is committed to
// disk; in particular allocate() and take() make the keys' consumption durable before they
// return the key bytes, unless the caller takes that wait over (PendingWrite: the API
// holds the bytes until when_written() reports them durable). All methods are thread-safe.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::kms {

using qkd::core::Error;
using qkd::core::ErrorCode;
using qkd::core::Result;
using qkd::core::Status;

inline constexpr std::size_t kChunkBytes = 32;
// The durable store keeps each direction's chunks in rows of this many consecutive chunks
// (256 bytes): a block commit writes ~34 rows rather than ~265 (storage only; the direction
// split by kChunkBytes, which both ends share, is unchanged).
inline constexpr std::size_t kRowChunks = 8;

enum class Direction : std::uint8_t { kAlice = 0, kBob = 1 };

// Where a key lives in the pool and who may fetch it. Sent to the peer KME as a notice.
struct KeyAssignment {
  std::string key_id;
  Direction direction = Direction::kAlice;
  std::uint64_t offset = 0;  // direction offset, bytes
  std::uint32_t length = 0;  // bytes
  std::string master_sae;
  std::vector<std::string> slave_saes;  // the slave first, then additional slaves
  // A discard instead of a key (keys.max_age_s): the owner of `direction` dropped the
  // expired bytes [offset, offset + length) and the peer drops the same bytes; key_id,
  // master_sae and slave_saes are empty. Travels in the notice stream, in order with the
  // assignments, so both ends drop exactly the same bytes. With a key_id: a prepared key
  // withdrawn (KeyStore::withdraw_prepared) whose bytes are the key's: the peer drops that
  // assigned key (its bytes left both pools with the assignment).
  bool discard = false;
};

struct DeliveredKey {
  std::string key_id;
  qkd::core::SecureBytes key;
};

// Durations of the durable store's transactions since the store was opened: each writes one
// group of units, from BEGIN (or from the checkpoint the writer runs itself first when the
// WAL has reached its bound) to the end of COMMIT (a write into the OS page cache); failed
// ones too, up to the failure. The same histogram serves the syncs that follow them with
// store.synchronous = "full". Upper bounds of the buckets in seconds (+Inf implied), fine
// around the ~1 ms an fsync takes.
struct CommitTimes {
  static constexpr std::array<double, 20> kBuckets = {
      0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.00225,
      0.0025, 0.00275, 0.003,  0.004,   0.005, 0.0075,  0.01,   0.025,   0.1,   1.0};
  std::array<std::uint64_t, kBuckets.size()> buckets{};  // non-cumulative
  std::uint64_t count = 0;                                // with those above the last bound
  double sum_seconds = 0;

  void add(double seconds);
};

struct StoreStats {
  std::uint64_t committed_bytes = 0;        // whole pool since the last reset
  std::uint64_t own_available_bytes = 0;    // allocatable by this KME (enc_keys)
  std::uint64_t peer_available_bytes = 0;   // not yet assigned by the peer
  std::uint64_t assigned_keys_waiting = 0;  // peer-assigned keys not yet delivered (dec_keys)
  // Assigned keys dropped unfetched because their pair held keys.max_unfetched_per_pair
  // (since the store was opened).
  std::uint64_t assigned_keys_evicted = 0;
  std::uint64_t pending_notices = 0;        // notices for bytes not committed yet
  std::uint64_t prepared_keys = 0;          // allocated ahead for enc_keys (set_prepared_keys)
  // assigned_keys_waiting by (master SAE, slave SAE), a multicast key once per slave that
  // has not fetched it; filled only from KeyStore::waiting_by_pair() (for /metrics).
  std::map<std::pair<std::string, std::string>, std::uint64_t> waiting_by_pair;
  // The durable store's transactions (all zero for the memory store): those with only API
  // requests' and notices' writes, and those carrying a write of the link (a block commit,
  // Bob's pending block, a new epoch: larger, and no request waits for them as such).
  CommitTimes request_commits;
  CommitTimes link_commits;
  // With store.synchronous = "full": the syncs of the file that make those durable.
  CommitTimes store_syncs;
};

// Bob's block kept between his ready message and Alice's commit.
struct PendingBlock {
  std::uint64_t block = 0;
  qkd::core::SecureBytes key;
};

// An encoded key-assignment notice waiting for the peer's acknowledgement.
struct StoredNotice {
  std::uint64_t seq = 0;
  std::vector<std::uint8_t> message;
};

// A digest of the pool's history in an epoch: SHA-256 chained over the epoch and every
// committed block (first_pool_digest, next_pool_digest). The two ends compare theirs at the
// session start: equal block counts with different digests mean the pools differ.
using PoolDigest = std::array<std::uint8_t, 32>;
[[nodiscard]] PoolDigest first_pool_digest(std::uint64_t epoch);
[[nodiscard]] PoolDigest next_pool_digest(const PoolDigest& previous, std::uint64_t block,
                                          std::span<const std::uint8_t> block_key);

// The link's session state as found when the store was opened (all defaults for the memory
// store and for a new database).
struct LinkState {
  std::uint64_t epoch = 0;             // 0 = no pool yet
  std::uint64_t blocks = 0;            // committed blocks in this epoch
  std::uint64_t next_seq = 1;          // next own notice number
  std::uint64_t last_applied_seq = 0;  // highest peer notice applied
  std::optional<PendingBlock> pending;
  std::vector<StoredNotice> outbox;  // in seq order
  // After `blocks` blocks; nullopt for a store written before digests were kept (until its
  // next epoch).
  std::optional<PoolDigest> digest;
  // The store discarded the keys the peer had assigned to it (a power loss undid its last
  // deliveries, store.synchronous = "full"): the peer is to drop its prepared keys, whose
  // copies went with them. Until clear_assigned_lost().
  bool assigned_lost = false;
};

// Error codes used by the store (mapped to HTTP statuses in one place, etsi_api.cpp):
//   kInvalidArgument  -> 400 (e.g. key not found)
//   kAuthentication   -> 401 (caller or master does not match the key)
//   kUnavailable      -> 503 (not enough key)
class KeyStore {
 public:
  virtual ~KeyStore() = default;

  // Called with each allocation's assignments while the allocation is still exclusive, so
  // that notices leave in allocation order. Must not call back into the store.
  using AssignmentListener = std::function<void(const std::vector<KeyAssignment>&)>;
  virtual void set_assignment_listener(AssignmentListener listener) = 0;

  // The link service's notice hooks. `encode` is called (like the listener) while the
  // allocation is still exclusive and returns the notice to keep with the allocation (the
  // durable store writes it in the same transaction); `release` is called with its seq once
  // the allocation is durable, i.e. when the notice may leave. Must not call back into the
  // store.
  using NoticeEncoder = std::function<StoredNotice(const std::vector<KeyAssignment>&)>;
  using NoticeRelease = std::function<void(std::uint64_t seq)>;
  virtual void set_notice_hooks(NoticeEncoder encode, NoticeRelease release) = 0;

  // --- link session state (see LinkState); called by the link's runner thread, whose
  // writes the durable store leaves to its committer thread ---
  [[nodiscard]] virtual LinkState link_state() const = 0;
  // commit() of a block together with the link position it leads to; forgets Bob's pending
  // block.
  [[nodiscard]] virtual Status commit_block(std::span<const std::uint8_t> block_key,
                                            std::uint64_t epoch, std::uint64_t blocks) = 0;
  // reset_pool() and a new epoch: no blocks, no notices either way, no pending block.
  [[nodiscard]] virtual Status start_epoch(std::uint64_t epoch) = 0;
  // The pool digest after the blocks committed so far (nullopt: not known, see LinkState).
  [[nodiscard]] virtual std::optional<PoolDigest> pool_digest() const = 0;
  [[nodiscard]] virtual Status set_pending_block(const std::optional<PendingBlock>& pending) = 0;
  // Applies a peer notice (each assignment as apply_peer_assignment; a refused one does not
  // stop the others: the first refusal is returned) and records `seq` as applied.
  [[nodiscard]] virtual Status apply_peer_notice(std::uint64_t seq,
                                                 std::vector<KeyAssignment> assignments) = 0;
  // The same without waiting for the store: the notice is applied in memory and queued for
  // writing; `durable(ticket)` waits until it is written (the ack must wait for that). A key
  // it assigns may be delivered before then: the delivery's own write is ordered after it,
  // and no delivery leaves before its write is durable. `refused` is the first refusal.
  struct QueuedNotice {
    std::uint64_t ticket = 0;
    Status refused = qkd::core::ok_status();
  };
  [[nodiscard]] virtual Result<QueuedNotice> queue_peer_notice(
      std::uint64_t seq, std::vector<KeyAssignment> assignments) = 0;
  [[nodiscard]] virtual Status durable(std::uint64_t ticket) = 0;
  // The peer acknowledged own notices up to `seq`.
  virtual void ack_notices(std::uint64_t seq) = 0;

  // --- link side ---
  // Appends a committed block's key bytes to the pool.
  virtual void commit(std::span<const std::uint8_t> block_key) = 0;
  // Forgets the pool (unassigned bytes and notices waiting for bytes), e.g. when the peer
  // lost its pool. Keys already assigned stay deliverable.
  virtual void reset_pool() = 0;
  // Records the peer's assignment. Bytes not committed yet: kept until they are. An
  // assignment that overlaps bytes already used is refused (kProtocol).
  [[nodiscard]] virtual Status apply_peer_assignment(KeyAssignment assignment) = 0;

  // --- API side ---
  // allocate() and take() given a PendingWrite do not wait for their durable write: they
  // return at once and fill it in, and the caller must not let the returned keys (or the
  // error) leave before when_written() has reported the write durable. Without one (and
  // always for the link's calls) a call returns only once its write is durable.
  struct PendingWrite {
    std::uint64_t ticket = 0;    // 0: nothing to wait for (the memory store)
    std::function<void()> then;  // once durable (e.g. the allocation's notice may leave)
  };
  // Calls `done` once the write is durable (ok; `then` has run) or writing failed
  // (kUnavailable "key store unavailable: ..."): at once when it already is, else on the
  // thread that wrote it, right after the write. `done` must be short and must not call
  // back into the store.
  virtual void when_written(PendingWrite pending, std::function<void(Status)> done) = 0;
  // Blocks until every write so far is durable (or failed) and every when_written()
  // completion has returned: called at shutdown, before what the completions use goes.
  virtual void drain() = 0;

  // enc_keys: exactly `number` keys of `size_bytes` bytes from this KME's direction, each
  // with a fresh random UUID, or an error (kUnavailable when there is not enough key).
  // `slave_saes` are the slaves at the peer KME (the notice names them); `local_slave_saes`
  // are additional slaves served by this KME (multicast at this KME): each key is also kept
  // here, in the same durable write, for each of them to fetch once with take(); the key is
  // removed when the last of them has. Neither list may name `master_sae`.
  [[nodiscard]] virtual Result<std::vector<DeliveredKey>> allocate(
      const std::string& master_sae, const std::vector<std::string>& slave_saes,
      const std::vector<std::string>& local_slave_saes, std::uint32_t number,
      std::uint32_t size_bytes, PendingWrite* pending = nullptr) = 0;
  [[nodiscard]] Result<std::vector<DeliveredKey>> allocate(
      const std::string& master_sae, const std::vector<std::string>& slave_saes,
      std::uint32_t number, std::uint32_t size_bytes) {
    return allocate(master_sae, slave_saes, {}, number, size_bytes);
  }
  // dec_keys: all of `key_ids` or none. Waits up to `wait` for assignments not heard of
  // yet. kInvalidArgument if one is unknown or already delivered to this caller;
  // kAuthentication if the caller is not an allowed slave of every key or `master_sae` is
  // not each key's master. Multicast (additional slaves): each named slave may fetch a key
  // once; the key is removed (and cleansed) when the last of its slaves has fetched it.
  [[nodiscard]] virtual Result<std::vector<DeliveredKey>> take(
      const std::string& caller_sae, const std::string& master_sae,
      const std::vector<std::string>& key_ids, std::chrono::milliseconds wait,
      PendingWrite* pending = nullptr) = 0;
  // Whether take() of `key_ids` would answer without waiting for a notice: each is held
  // here or known to be delivered or expired. (A durable store still writes its commit:
  // see PendingWrite.)
  [[nodiscard]] virtual bool knows_all(const std::vector<std::string>& key_ids) const = 0;
  // Calls `wake` once: when one of `key_ids` arrives here (on the thread adding it, under
  // the store's lock, so `wake` may only hand the work on, e.g. post it), or at once when
  // knows_all(key_ids) holds already. Until the returned handle is gone; after that `wake`
  // is not called. The handle must not outlive the store. For a dec_keys that waits for a
  // notice without holding a thread (then tries again, and registers again if need be).
  [[nodiscard]] virtual std::shared_ptr<void> when_known(const std::vector<std::string>& key_ids,
                                                         std::function<void()> wake) = 0;
  // Whether one of `key_ids` was delivered here already (remembered as used).
  [[nodiscard]] virtual bool delivered_any(const std::vector<std::string>& key_ids) const = 0;

  // Why the store serves no key any more (a durable write failed), or empty while it works.
  [[nodiscard]] virtual std::string failure() const { return {}; }
  [[nodiscard]] virtual StoreStats stats() const = 0;
  // StoreStats::waiting_by_pair (a walk over the waiting keys: for scrapes, not per request).
  [[nodiscard]] virtual std::map<std::pair<std::string, std::string>, std::uint64_t>
  waiting_by_pair() const = 0;

  // --- key age (keys.max_age_s) ---
  // Keys older than `max_age` are discarded (0, the default: never). Own direction: pool
  // bytes whose block this KME committed more than max_age ago are dropped, in pool order,
  // and a discard notice (KeyAssignment::discard) takes the same bytes out of the peer's
  // pool; allocate() applies this before it allocates, so it never hands out an expired
  // byte. Peer direction: dropped only by the peer's discard notices (so both ends drop the
  // same bytes). Peer-assigned keys not fetched within max_age of their notice's arrival
  // are dropped (dec_keys: "not found").
  virtual void set_max_age(std::chrono::seconds max_age) = 0;
  // --- unfetched keys per pair (keys.max_unfetched_per_pair) ---
  // Keys assigned to SAEs here (by the peer, or kept for local slaves) and not fetched yet
  // are kept per (master, slave) up to `keys` (0: no limit; a multicast key counts for
  // each slave that has not fetched it): a further one drops that pair's oldest, which is
  // then "not found" for dec_keys, as an expired key is. Bounds the memory a master's
  // flood of enc_keys for a slave that never fetches can take here.
  virtual void set_max_unfetched(std::uint64_t keys) = 0;
  // --- pool limit (keys.max_key_count) ---
  // The link pauses only once both directions are full, so a direction nobody draws from
  // (SAEs that are masters at one end only, e.g. TLS servers) would grow without bound.
  // With a limit (bytes, 0: none), once the own direction holds twice the limit, its bytes
  // above the limit are discarded, the oldest first, with a discard notice like expired
  // ones: the peer drops the same bytes.
  virtual void set_pool_limit(std::uint64_t own_bytes) = 0;
  // --- prepared keys (store.prepared_keys) ---
  // With depth > 0, allocate() keeps up to `depth` keys ready for each (master SAE, slave
  // SAE, key size) it has served with one slave at the peer and no local slaves: allocated
  // from the own direction, given key_IDs, remembered as used and announced to the peer,
  // all in a durable write made ahead of the request (with the request that first named
  // the pair, or after a hand-out left the reserve half empty). A later enc_keys of that
  // pair for at most that many keys hands them out without a write of its own: their
  // consumption is durable already. Prepared keys live in memory: a clean stop withdraws
  // them (withdraw_prepared); a crash or a new pool epoch drops them here while the peer
  // keeps them as assigned keys that no SAE will fetch (until keys.max_age_s, if set). All reserves together hold at most as many
  // bytes as the pool keeps when they are filled; at most kMaxReserves reserves; with
  // keys.max_age_s a prepared key expires with its bytes' age. 0 (the default): none.
  static constexpr std::size_t kMaxReserves = 64;
  virtual void set_prepared_keys(std::uint32_t depth) = 0;
  // Drops every prepared key and announces it to the peer as withdrawn (a discard notice
  // naming the key: the peer drops its copy, which no SAE can have asked for). Called at a
  // clean stop, once no request can take from the reserves any more; prepares no more
  // keys afterwards; returns once the notice is durable (it leaves now, or with the next
  // session's resend).
  virtual void withdraw_prepared() = 0;
  // Drops every prepared key without a notice (the peer lost its copies: LinkState::
  // assigned_lost); returns how many. Their bytes stay consumed.
  virtual std::uint64_t drop_prepared() = 0;
  // The peer has been told of LinkState::assigned_lost: clears it (durably).
  virtual Status clear_assigned_lost() = 0;
  // Keys of `size_bytes` prepared for enc_keys of (master, slave) (the ETSI status counts
  // them as stored for that pair: they are its keys, not the pool's).
  [[nodiscard]] virtual std::uint64_t prepared_for(const std::string& master_sae,
                                                   const std::string& slave_sae,
                                                   std::uint32_t size_bytes) const = 0;
  // Applies both rules at `now` (called periodically by the link service).
  [[nodiscard]] virtual Status expire(std::chrono::system_clock::time_point now) = 0;
};

// In-memory store for the KME whose allocatable direction is `own`.
[[nodiscard]] std::unique_ptr<KeyStore> make_memory_key_store(Direction own);

// What the durable store does with a file an earlier build wrote (an older store format,
// whose counters and assignments were not all authenticated): refuse it, naming the
// conversion, or convert it (`qkd-kms --convert-store`). Converting unasked would let
// whoever can write a current file, and holds an old file's key check, pass it off as older
// and have edits of it vouched for.
enum class OlderFormat { kRefuse, kConvert };

// The format of the store files this build writes (meta.format; `qkd-kms --version`
// reports it). Files of an earlier format are refused or converted (OlderFormat).
inline constexpr int kStoreFormat = 3;

// Durable store in the SQLite database `db_path` (created if missing; WAL; opened
// exclusively), key bytes sealed with AES-256-GCM under the 32-byte `node_key`. Fails when
// the database belongs to the other direction or was sealed under another node key.
// `synchronous_full`: PRAGMA synchronous=FULL (every commit synced: survives a power loss)
// or NORMAL (synced at checkpoints only: survives a process crash, not a power loss).
[[nodiscard]] Result<std::unique_ptr<KeyStore>> make_sqlite_key_store(
    Direction own, const std::string& db_path, std::span<const std::uint8_t> node_key,
    bool synchronous_full = true, OlderFormat older = OlderFormat::kRefuse);

// Reads a node key file: 32 raw bytes or 64 hex digits. Refuses a file that is not a regular
// file or that is accessible by group or others; the error names the file.
[[nodiscard]] Result<qkd::core::SecureBytes> read_node_key_file(const std::string& path);

// Direction-offset arithmetic, exposed for tests: number of bytes of direction `d` present
// in a pool of `committed` bytes.
[[nodiscard]] std::uint64_t direction_bytes(std::uint64_t committed, Direction d);

}  // namespace qkd::kms
