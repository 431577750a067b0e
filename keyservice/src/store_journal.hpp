// Internal: the write-ahead side of the key store. The store (key_store.cpp) keeps its state
// in memory and records each change in a Journal while it holds its lock, in order; seal()
// closes the changes of one operation into a unit, and wait() returns once that unit (and
// every unit before it) is durable. The SQLite journal (sqlite_key_store.cpp) batches the
// units of concurrent operations into one transaction (group commit).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/kms/key_store.hpp"

namespace qkd::kms::detail {

// Names of the numeric state values.
inline constexpr std::string_view kCommitted = "committed_bytes";
inline constexpr std::string_view kCursorAlice = "cursor_0";
inline constexpr std::string_view kCursorBob = "cursor_1";
inline constexpr std::string_view kEpoch = "epoch";
inline constexpr std::string_view kBlocks = "blocks";
inline constexpr std::string_view kNextSeq = "next_seq";
inline constexpr std::string_view kLastAppliedSeq = "last_applied_seq";
inline constexpr std::string_view kAssignedLost = "assigned_lost";  // LinkState::assigned_lost

struct StoredChunk {
  Direction dir = Direction::kAlice;
  std::uint64_t index = 0;  // chunk index within the direction stream
  qkd::core::SecureBytes bytes;  // kChunkBytes
};

struct StoredKey {
  std::string key_id;
  std::string master;
  std::vector<std::string> slaves;
  qkd::core::SecureBytes key;
  std::vector<std::string> fetched;  // slaves that have fetched the key (multicast)
};

// A delivered key_ID and who could fetch it: its master SAE, then its slaves (empty when
// not recorded: a store from before owners were kept).
struct UsedId {
  std::string key_id;
  std::vector<std::string> owners;
};

// Everything a journal found on disk when it was opened.
struct StoredState {
  std::uint64_t committed = 0;
  std::uint64_t cursor[2] = {0, 0};
  std::vector<StoredChunk> chunks;  // ordered by (dir, index)
  std::vector<StoredKey> assigned;
  std::vector<UsedId> used_ids;  // oldest first
  std::vector<std::pair<std::uint64_t, KeyAssignment>> waiting;  // by ordinal
  // (pool end after a commit, commit time in ms since the Unix epoch), oldest first
  std::vector<std::pair<std::uint64_t, std::uint64_t>> settled;
  LinkState link;
};

class Journal {
 public:
  virtual ~Journal() = default;

  virtual void set_value(std::string_view name, std::uint64_t value) = 0;
  // Row `row` of direction d: chunks [row * kRowChunks, ...), kChunkBytes each (at most
  // kRowChunks; used ones zero).
  virtual void put_row(Direction d, std::uint64_t row, std::span<const std::uint8_t> bytes) = 0;
  virtual void drop_rows_below(Direction d, std::uint64_t row) = 0;
  virtual void put_assigned(const StoredKey& key) = 0;
  virtual void drop_assigned(const std::string& key_id) = 0;
  virtual void add_used(const UsedId& used) = 0;
  virtual void put_waiting(std::uint64_t ordinal, const KeyAssignment& a) = 0;
  virtual void drop_waiting(std::uint64_t ordinal) = 0;
  virtual void clear_pool() = 0;  // chunks, waiting assignments and commit times
  virtual void put_settled(std::uint64_t pool_end, std::uint64_t unix_ms) = 0;
  virtual void drop_settled_upto(std::uint64_t pool_end) = 0;
  virtual void put_notice(const StoredNotice& n) = 0;
  virtual void drop_notices_upto(std::uint64_t seq) = 0;
  virtual void clear_notices() = 0;
  virtual void set_pending_block(const std::optional<PendingBlock>& p) = 0;
  // The digest after `blocks` blocks of `epoch` (kept with them: a digest left by a newer
  // version in a file an older one went on writing must not be taken for the current one).
  virtual void set_pool_digest(const PoolDigest& digest, std::uint64_t epoch,
                               std::uint64_t blocks) = 0;

  // Closes the changes recorded since the last seal into one unit; returns its ticket.
  virtual std::uint64_t seal() = 0;
  // The same for a unit no caller is waiting for at once (a peer notice applied in memory,
  // an ack): it is written with the next seal()ed unit, or after a short delay if none
  // comes, so that it does not take a transaction (and an fsync) of its own in front of a
  // unit that a response waits for. Units stay durable in ticket order.
  virtual std::uint64_t seal_deferred() = 0;
  // The same as seal() for the link's writes (block commits, Bob's pending block, a new
  // epoch), so that commit_times() counts their transactions apart.
  virtual std::uint64_t seal_link() = 0;
  // The same as seal() for the delivery of assigned keys (dec_keys) whose records unit
  // `after` wrote: with store.synchronous = "full" such a unit is durable (wait(),
  // when_durable()) once it is written to the file, where a crash of the process does not
  // lose it, and unit `after` is synced; it waits for no sync of its own. A power loss may
  // then undo the delivery, so a store reopened under another boot discards every assigned
  // key (open_boot_guard() in sqlite_key_store.cpp): none is served twice. Where the boot
  // cannot be told, and with "normal", the same as seal().
  virtual std::uint64_t seal_delivery(std::uint64_t after) = 0;
  // The ticket that the next seal of any kind returns, if a change is recorded before it.
  [[nodiscard]] virtual std::uint64_t next_ticket() const = 0;
  // Blocks until unit `ticket` is durable; an error if writing failed (the store is then
  // unusable: every later wait fails too). `write_here` = false: the committer thread
  // writes it, never the caller (a thread of lower priority, the link's runner: a group it
  // wrote would carry other requests' units, and their completions would run on it). Never
  // from a completion of when_durable(): the committer thread runs those, and would wait
  // for itself.
  [[nodiscard]] virtual Status wait(std::uint64_t ticket, bool write_here = true) = 0;
  // The same without blocking: `done` is called once unit `ticket` (a seal()ed one) is
  // durable or writing failed: at once if it already is, else on the thread that wrote it,
  // right after the write. The calling thread writes the queue itself when it may (as a
  // waiter of wait() would) and no transaction is in progress; otherwise the thread writing
  // now, or the committer thread, does. `done` must be short and must not call back into
  // the journal or the store.
  virtual void when_durable(std::uint64_t ticket, std::function<void(Status)> done) = 0;
  // Blocks until every unit sealed so far is written (or writing failed) and every
  // completion of when_durable() has returned.
  virtual void drain() = 0;
  // The durations of the transactions written so far (for /metrics): those without and
  // those with a unit of seal_link().
  // With "full", also the syncs of the file that make written units durable.
  struct Times {
    CommitTimes requests;
    CommitTimes link;
    CommitTimes syncs;
  };
  [[nodiscard]] virtual Times commit_times() const = 0;
  // Why writing failed (every wait fails from then on), or empty.
  [[nodiscard]] virtual std::string failure() const = 0;
};

// The store core over a journal (nullptr: in memory only) and the state it found.
[[nodiscard]] std::unique_ptr<KeyStore> make_journaled_store(Direction own,
                                                             std::unique_ptr<Journal> journal,
                                                             StoredState state);

}  // namespace qkd::kms::detail
