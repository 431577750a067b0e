// The durable key store: the store core (key_store.cpp) over a SQLite journal.
//
// Database (WAL, synchronous=FULL or NORMAL (store.synchronous); one KME process per file,
// held by an flock() on the database file):
//   meta(name, value)              numeric state (store_journal.hpp names), format, direction,
//                                  key_check (sealed constant: detects a wrong node key)
//   pool(dir, row, sealed)         each direction stream's unused chunks, kRowChunks per row
//                                  (row r: chunks 8r..8r+7; used ones zero; format 2;
//                                  format 1 had a row per chunk, converted at open)
//   assigned(key_id, master, slaves, sealed)   peer-assigned keys not delivered yet (slaves:
//                                  a JSON array, or {"slaves", "fetched"} once some of
//                                  a multicast key's slaves have fetched it)
//   used_ids(key_id, owners)       delivered key_IDs, oldest first (rowid), bounded; no
//                                  index (the store holds the set in memory); owners: a
//                                  JSON array, master SAE then slaves (NULL: not kept)
//   waiting(ord, assignment)       peer assignments whose bytes are not committed yet
//   outbox(seq, message)           own notices the peer has not acknowledged
//   pending_block(id=1, block, sealed)   Bob's block between ready and commit
//   settled(pool_end, t_ms)        commit time of each block not yet expired (max_age_s)
//
// Sealed = nonce(12) || AES-256-GCM ciphertext || tag(16) under the node key, with a fresh
// random nonce per write and the row's identity ("pool/<dir>/<row>", "pending/<block>"; for
// an assigned key its key_ID, master and slaves column: key_aad()) as additional data, so a
// row moved to another identity, or given other owners, fails to open.
//
// Group commit: the store records each operation's changes as a unit (under its lock, in
// order); one thread at a time takes every unit queued so far and writes them in one
// transaction. A commit is a write into the OS page cache (~0.1 ms; SQLite's synchronous
// is NORMAL on the writing connection at either level), so the first caller waiting for a
// queued unit writes the queue itself when no transaction is in progress (no hand-off to
// the committer thread and back), and the committer thread writes only what no caller
// waits for (deferred units, below; the rest at shutdown). No waiting window: units that
// arrive while a transaction is being written form the next group.
// With store.synchronous = "full" a unit is durable once synced: a syncer thread
// fdatasync()s the WAL after each transaction that holds such a unit, outside SQLite's
// write lock, so the next group is written during the sync and the next sync covers it: a
// lone operation pays one fsync, and a busy store batches as much as the disk's sync time
// lets through. The exception is a delivery of assigned keys (dec_keys, seal_delivery()):
// it is durable once written and the unit that recorded its keys synced, so it waits for
// no sync of its own; a power loss that undoes it makes the next start discard every
// assigned key (open_boot_guard()). With "normal" a unit is durable once written.
// A row a transaction puts and deletes again is not written (write()): the common case is a
// peer notice's key, delivered by the dec_keys whose transaction carries the notice.
// Deferred units (peer notices, acks: no response waits for them) do not start a
// transaction alone before kDeferMax; they ride with the next unit a response waits for, so
// that a dec_keys right after its notice costs one fsync, not two (docs/KMS.md, "Commit
// path"). Not with lazy deliveries: a delivery then needs its notice synced, not a sync of
// its own to share, so a deferred unit is written at once.
//
// Checkpoints run off the commit path: the committing connection (db_) does not checkpoint
// (no wal_autocheckpoint); its WAL hook wakes a checkpointer thread with a second connection
// once the WAL holds kCheckpointPages, which copies the WAL into the database with a PASSIVE
// checkpoint (it never takes the writer's lock, so commits go on meanwhile). The committer's
// next transaction after a complete checkpoint starts the WAL over. Should that not happen
// before the WAL holds kWalHardPages (commits landing in every checkpoint's window), the
// committer checkpoints itself between two transactions, which bounds the WAL.
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "qkd/kms/key_store.hpp"
#include "qkd/kms/util.hpp"
#include "store_journal.hpp"

namespace qkd::kms {

using json = nlohmann::json;
using qkd::core::make_error;

namespace {

// 1: one pool row per chunk (table chunks). 2: counters, waiting assignments, notices and
// commit times in the clear. 3: those authenticated too (tags, below).
constexpr int kFormat = kStoreFormat;
static_assert(kFormat == 3, "a new format needs its conversion (OlderFormat) and key check");
constexpr std::size_t kNonceBytes = 12;
constexpr std::size_t kTagBytes = 16;
// A deferred unit (Journal::seal_deferred) waits at most this long for a unit that a
// response waits for to share its transaction.
constexpr auto kDeferMax = std::chrono::milliseconds(5);
constexpr std::int64_t kMaxUsedIds = 1 << 20;  // as the in-memory bound
constexpr std::uint64_t kPruneEvery = 512;      // transactions between used_ids pruning
// WAL pages (frames) at which the checkpointer thread is woken, and at which the committer
// checkpoints itself before its next transaction (the bound on the WAL: ~16 MB).
constexpr int kCheckpointPages = 1000;
constexpr int kWalHardPages = 4000;
// The key check's additional data names the format from 3 on, so that a file of format 3
// cannot be passed off as an older one, whose rows were not all authenticated.
constexpr std::string_view kKeyCheckAad2 = "qkd-kms/key-check";
constexpr std::string_view kKeyCheckAad = "qkd-kms/key-check/3";
// meta name of the boot under which a run has unsynced commits in the file (text; absent
// when every commit in the file is synced): "<boot>" with NORMAL, "<boot>/deliveries" with
// FULL (only deliveries unsynced). See open_boot_guard().
constexpr std::string_view kUnsyncedBoot = "unsynced_boot";
constexpr std::string_view kDeliveriesMark = "/deliveries";
// Beside the database: a sync of its WAL failed after deliveries were answered unsynced
// (record_failed_sync()); the next open discards the assigned keys.
constexpr std::string_view kFailedSyncSuffix = ".sync-failed";
constexpr std::string_view kKeyCheckText = "qkd-kms node key check v1";
// meta name of the tag over every other meta row (format 3): see meta_aad().
constexpr std::string_view kMetaTag = "meta_tag";


// Thrown only inside this file, caught where a transaction or the opening ends.
struct DbError {
  std::string what;
};

// The boot this host runs: Linux's boot_id, new at every boot, so a page cache that held
// unsynced commits is gone exactly when it changed. QKD_KMS_BOOT_ID replaces it (tests: a
// restart "after a power loss"). Empty if it cannot be read.
std::string current_boot_id() {
  if (const char* forced = std::getenv("QKD_KMS_BOOT_ID"); forced != nullptr && *forced != 0) {
    return forced;
  }
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

// The folder that holds the file `path`.
std::string folder_of(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// fsync()s the file or directory `path` if it exists (what another process wrote there
// with NORMAL, and the directory entries of its files). Never the open database itself:
// closing the descriptor would drop SQLite's locks on it (FileLock::sync).
void sync_existing_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return;
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    throw DbError{fmt::format("{}: fsync failed: {}", path, std::strerror(err))};
  }
}

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

std::string chunk_aad(Direction d, std::uint64_t idx) {  // format 1
  return fmt::format("qkd-kms/chunk/{}/{}", static_cast<int>(d), idx);
}
std::string row_aad(Direction d, std::uint64_t row) {
  return fmt::format("qkd-kms/pool/{}/{}", static_cast<int>(d), row);
}
// An assigned key's additional data binds its owners too: the master and the `slaves` column
// as stored (its slaves, and which of them fetched it), so that an edited owner does not
// authenticate; a JSON array, so that no two (key_ID, master, slaves) give the same text
// whatever characters the SAE IDs hold. Rows written before owners were bound used
// key_aad_v1.
std::string key_aad(const std::string& id, const std::string& master,
                    const std::string& slaves_column) {
  return json::array({"qkd-kms/key2", id, master, slaves_column}).dump();
}
std::string key_aad_v1(const std::string& id) { return fmt::format("qkd-kms/key/{}", id); }
std::string pending_aad(std::uint64_t block) { return fmt::format("qkd-kms/pending/{}", block); }
// Rows that hold no secret carry a tag (a seal of nothing) over their identity and content,
// and the pool epoch they belong to: ordinals, notice numbers and pool offsets start over in
// each epoch, so a row of an earlier epoch (from an older copy of the file) does not pass
// for one of this epoch's.
std::string waiting_aad(std::uint64_t epoch, std::uint64_t ord, const std::string& assignment) {
  return fmt::format("qkd-kms/waiting/{}/{}/", epoch, ord) + assignment;
}
std::string outbox_aad(std::uint64_t epoch, std::uint64_t seq,
                       std::span<const std::uint8_t> message) {
  std::string aad = fmt::format("qkd-kms/outbox/{}/{}/", epoch, seq);
  aad.append(message.begin(), message.end());
  return aad;
}
std::string settled_aad(std::uint64_t epoch, std::uint64_t pool_end, std::uint64_t t_ms) {
  return fmt::format("qkd-kms/settled/{}/{}/{}", epoch, pool_end, t_ms);
}

// AES-256-GCM under the node key; throws DbError on a library failure. The key schedule is
// done once: a fresh cipher context per value cost ~4 us (the cipher fetch, the key
// schedule, the GCM key), which was most of a link block commit's time under the store's
// lock when each of its ~265 chunks was a row. Nonces: 96 random bits each, drawn from
// RAND_bytes 64 at a time. Thread-safe.
class Sealer {
 public:
  explicit Sealer(std::span<const std::uint8_t> key) : ctx_(EVP_CIPHER_CTX_new()) {
    if (!ctx_ || EVP_EncryptInit_ex(ctx_.get(), EVP_aes_256_gcm(), nullptr, key.data(),
                                    nullptr) != 1) {
      throw DbError{"AES-256-GCM setup failed"};
    }
  }

  std::vector<std::uint8_t> seal(std::string_view aad, std::span<const std::uint8_t> plain) {
    std::vector<std::uint8_t> out(kNonceBytes + plain.size() + kTagBytes);
    std::lock_guard lock(mu_);
    if (next_ == nonces_.size()) {
      if (RAND_bytes(nonces_.data(), static_cast<int>(nonces_.size())) != 1) {
        throw DbError{"RAND_bytes failed"};
      }
      next_ = 0;
    }
    std::memcpy(out.data(), nonces_.data() + next_, kNonceBytes);
    next_ += kNonceBytes;
    int len = 0;
    EVP_CIPHER_CTX* c = ctx_.get();
    if (EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, out.data()) != 1 ||
        EVP_EncryptUpdate(c, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                          static_cast<int>(aad.size())) != 1 ||
        EVP_EncryptUpdate(c, out.data() + kNonceBytes, &len, plain.data(),
                          static_cast<int>(plain.size())) != 1 ||
        EVP_EncryptFinal_ex(c, out.data() + kNonceBytes + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes),
                            out.data() + kNonceBytes + plain.size()) != 1) {
      throw DbError{"AES-256-GCM encryption failed"};
    }
    return out;
  }

 private:
  std::mutex mu_;
  CipherCtx ctx_;
  std::array<std::uint8_t, kNonceBytes * 64> nonces_{};
  std::size_t next_ = nonces_.size();
};

// Opens a sealed value; nullopt when it does not authenticate.
std::optional<qkd::core::SecureBytes> open_sealed(std::span<const std::uint8_t> key,
                                                  std::string_view aad,
                                                  std::span<const std::uint8_t> sealed) {
  if (sealed.size() < kNonceBytes + kTagBytes) {
    return std::nullopt;
  }
  const std::size_t n = sealed.size() - kNonceBytes - kTagBytes;
  qkd::core::SecureBytes plain(n);
  std::uint8_t tag[kTagBytes];
  std::memcpy(tag, sealed.data() + kNonceBytes + n, kTagBytes);
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  if (!ctx ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), sealed.data()) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), plain.data(), &len, sealed.data() + kNonceBytes,
                        static_cast<int>(n)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), plain.data() + len, &len) != 1) {
    return std::nullopt;
  }
  return plain;
}

json assignment_json(const KeyAssignment& a) {
  json j{{"id", a.key_id},         {"dir", static_cast<int>(a.direction)},
         {"off", a.offset},        {"len", a.length},
         {"master", a.master_sae}, {"slaves", a.slave_saes}};
  if (a.discard) {
    j["discard"] = true;
  }
  return j;
}

// A blob or text column bound by value.
using Blob = std::vector<std::uint8_t>;

// The SQLite connection with a statement cache. Throws DbError.
class Db {
 public:
  Db() = default;
  ~Db() {
    for (auto& [_, st] : cache_) {
      sqlite3_finalize(st);
    }
    if (h_ != nullptr) {
      sqlite3_close_v2(h_);
    }
  }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;

  void open(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &h_,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        nullptr) != SQLITE_OK) {
      throw DbError{fmt::format("cannot open {}: {}", path,
                                h_ != nullptr ? sqlite3_errmsg(h_) : "out of memory")};
    }
  }

  // A PASSIVE checkpoint: copies what it can of the WAL into the database without taking the
  // writer's lock. Returns an SQLite error text, empty when it ran (or found another
  // checkpoint running: SQLITE_BUSY).
  std::string checkpoint() {
    int log = 0;
    int done = 0;
    const int rc = sqlite3_wal_checkpoint_v2(h_, nullptr, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
    return rc == SQLITE_OK || rc == SQLITE_BUSY ? std::string() : std::string(sqlite3_errmsg(h_));
  }

  // Calls `hook(pages)` after each commit on this connection with the WAL's size in pages
  // (replaces SQLite's automatic checkpoints).
  void on_commit(std::function<void(int)> hook) {
    commit_hook_ = std::move(hook);
    sqlite3_wal_hook(
        h_,
        [](void* self, sqlite3*, const char*, int pages) {
          static_cast<Db*>(self)->commit_hook_(pages);
          return SQLITE_OK;
        },
        this);
  }

  void busy_timeout(int ms) { sqlite3_busy_timeout(h_, ms); }

  // The file's schema runs no code of its own: no trigger fires and no view is read (a
  // trigger added to the file could otherwise undo the store's writes, a cursor's or a
  // delivered key's, inside the very transactions whose tags vouch for the result), and
  // SQLite's defensive mode refuses writes to the schema itself.
  void refuse_schema_code() {
    int off = -1;
    check(sqlite3_db_config(h_, SQLITE_DBCONFIG_ENABLE_TRIGGER, 0, &off));
    check(sqlite3_db_config(h_, SQLITE_DBCONFIG_ENABLE_VIEW, 0, &off));
    check(sqlite3_db_config(h_, SQLITE_DBCONFIG_DEFENSIVE, 1, &off));
    exec("PRAGMA trusted_schema=OFF");
  }

  void exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(h_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err != nullptr ? err : sqlite3_errmsg(h_);
      sqlite3_free(err);
      throw DbError{msg};
    }
  }

  // Runs a statement to completion; `row` sees each result row.
  template <typename... Args>
  void run(const char* sql, const std::function<void(sqlite3_stmt*)>& row, const Args&... args) {
    sqlite3_stmt* st = prepare(sql);
    int i = 0;
    (bind(st, ++i, args), ...);
    for (;;) {
      const int rc = sqlite3_step(st);
      if (rc == SQLITE_ROW) {
        if (row) {
          row(st);
        }
        continue;
      }
      sqlite3_reset(st);
      sqlite3_clear_bindings(st);
      if (rc != SQLITE_DONE) {
        throw DbError{sqlite3_errmsg(h_)};
      }
      return;
    }
  }
  template <typename... Args>
  void write(const char* sql, const Args&... args) {
    run(sql, nullptr, args...);
  }

 private:
  sqlite3_stmt* prepare(const char* sql) {
    auto it = cache_.find(sql);
    if (it != cache_.end()) {
      return it->second;
    }
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(h_, sql, -1, &st, nullptr) != SQLITE_OK) {
      throw DbError{sqlite3_errmsg(h_)};
    }
    cache_.emplace(sql, st);
    return st;
  }
  static void check(int rc) {
    if (rc != SQLITE_OK) {
      throw DbError{sqlite3_errstr(rc)};
    }
  }
  static void bind(sqlite3_stmt* st, int i, std::uint64_t v) {
    check(sqlite3_bind_int64(st, i, static_cast<sqlite3_int64>(v)));  // bit pattern kept
  }
  static void bind(sqlite3_stmt* st, int i, int v) { check(sqlite3_bind_int(st, i, v)); }
  static void bind(sqlite3_stmt* st, int i, const std::string& v) {
    check(sqlite3_bind_text(st, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }
  static void bind(sqlite3_stmt* st, int i, const Blob& v) {
    check(sqlite3_bind_blob(st, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }

  sqlite3* h_ = nullptr;
  std::unordered_map<std::string, sqlite3_stmt*> cache_;
  std::function<void(int)> commit_hook_;
};

// An exclusive flock() on the database file for the store's lifetime: a second KME process
// on the same file fails to start. (flock and SQLite's fcntl locks are independent on a local
// file system; the descriptor is closed only after both connections, since closing any
// descriptor of the file drops the process's fcntl locks on it.)
class FileLock {
 public:
  FileLock() = default;
  ~FileLock() {
    if (fd_ >= 0) {
      ::close(fd_);
    }
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

  void acquire(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, S_IRUSR | S_IWUSR);
    if (fd_ < 0) {
      throw DbError{fmt::format("cannot open {}: {}", path, std::strerror(errno))};
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      throw DbError{errno == EWOULDBLOCK
                        ? fmt::format("{} is in use by another key store (another qkd-kms?)", path)
                        : fmt::format("cannot lock {}: {}", path, std::strerror(errno))};
    }
  }

  // fsync()s the file through this descriptor: one opened and closed for it would drop the
  // fcntl locks SQLite's connections hold on the file (a WAL-mode connection keeps a SHARED
  // lock on the database for its lifetime).
  void sync(const std::string& path) const {
    if (::fsync(fd_) != 0) {
      throw DbError{fmt::format("{}: fsync failed: {}", path, std::strerror(errno))};
    }
  }

 private:
  int fd_ = -1;
};

std::uint64_t col_u64(sqlite3_stmt* st, int i) {
  return static_cast<std::uint64_t>(sqlite3_column_int64(st, i));
}
std::string col_text(sqlite3_stmt* st, int i) {
  const auto* p = sqlite3_column_text(st, i);
  return p != nullptr ? std::string(reinterpret_cast<const char*>(p),
                                    static_cast<std::size_t>(sqlite3_column_bytes(st, i)))
                      : std::string();
}
Blob col_blob(sqlite3_stmt* st, int i) {
  const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, i));
  return p != nullptr ? Blob(p, p + sqlite3_column_bytes(st, i)) : Blob();
}

// One write of a unit. `row` names the row a put (INSERT OR REPLACE) or a keyed delete
// writes ("a/<key_ID>" in assigned, "w/<ordinal>" in waiting; empty for other writes), so
// that write() can skip a put whose row a later delete of the same transaction removes.
struct Op {
  std::function<void(Db&)> run;
  std::string row;
  bool put = false;
  bool skip = false;  // set by write(): a later delete of its transaction removes the row
  bool meta = false;  // writes a meta row: the transaction rewrites the meta tag
};

struct Unit {
  std::uint64_t ticket = 0;
  std::vector<Op> ops;
  std::chrono::steady_clock::time_point sealed_at{};
  bool link = false;  // Journal::seal_link (counted apart in commit_times())
  // Durable only once synced (with FULL; NORMAL never syncs). A delivery of Journal::
  // seal_delivery() is not, where the boot can be told (lazy_deliveries_).
  bool needs_sync = true;
};

enum class Seal { kNow, kDeferred, kLink, kDelivery };

class SqliteJournal final : public detail::Journal {
 public:
  SqliteJournal(std::string path, std::span<const std::uint8_t> node_key, bool synchronous_full,
                OlderFormat older)
      : path_(std::move(path)), key_(node_key), synchronous_full_(synchronous_full),
        older_(older) {}

  ~SqliteJournal() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    work_cv_.notify_all();
    if (committer_.joinable()) {
      committer_.join();
    }
    {
      std::lock_guard lock(mu_);
      sync_stopping_ = true;  // the syncer syncs what is written, then ends
    }
    sync_cv_.notify_all();
    if (syncer_.joinable()) {
      syncer_.join();
    }
    {
      // Another thread may still be running completions of its last transaction.
      std::unique_lock lock(mu_);
      done_cv_.wait(lock, [&] { return running_callbacks_ == 0; });
    }
    if (wal_fd_ >= 0) {
      ::close(wal_fd_);  // (SQLite holds no lock on the WAL file itself)
    }
    {
      std::lock_guard lock(ckpt_state_mu_);
      ckpt_stopping_ = true;
    }
    ckpt_cv_.notify_all();
    if (checkpointer_.joinable()) {
      checkpointer_.join();
    }
    if (marked_ && !failed_) {
      // A clean close: one synced commit makes every earlier one durable, and takes the
      // record of this boot with it (open_boot_guard()).
      try {
        db_.exec("PRAGMA synchronous=FULL");
        meta_transaction(
            [&] { db_.write("DELETE FROM meta WHERE name = ?", std::string(kUnsyncedBoot)); });
      } catch (const DbError& e) {
        spdlog::warn("key store: {}: closing: {}", path_, e.what);
      }
    }
    // Members close the checkpointer's connection, then the committer's (the last one
    // checkpoints the WAL and removes it), then release the file lock.
  }
  SqliteJournal(const SqliteJournal&) = delete;
  SqliteJournal& operator=(const SqliteJournal&) = delete;

  // Opens (creating if needed) and reads the stored state. Throws DbError.
  detail::StoredState open(Direction own) {
    lock_.acquire(path_);
    db_.open(path_);
    db_.refuse_schema_code();
    ::chmod(path_.c_str(), S_IRUSR | S_IWUSR);
    // Normal (not exclusive) locking: the checkpointer's connection works beside the
    // committer's. A second process is kept out by lock_.
    db_.busy_timeout(10'000);  // the WAL's own short locks, shared with the checkpointer
    db_.exec("PRAGMA journal_mode=WAL");
    // Deleted rows (a delivered key, a consumed pool row) are overwritten with zeros in their
    // pages, not left in free space for whoever later holds the file and the node key (the
    // default of some builds only). Old page images in the WAL go as it is overwritten.
    db_.exec("PRAGMA secure_delete=ON");
    // The opening's writes are synced at every commit (SQLite's FULL). After it, the writing
    // connection commits with NORMAL: a commit is then in the OS page cache, which survives
    // the process's crash (kill -9) but not a power loss; with store.synchronous = "full"
    // the syncer thread syncs after it (run_syncer()). That starts once open_boot_guard()
    // has recorded this boot.
    db_.exec("PRAGMA synchronous=FULL");
    db_.exec(
        "BEGIN IMMEDIATE;"
        "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID;"
        "CREATE TABLE IF NOT EXISTS pool(dir INTEGER NOT NULL, row INTEGER NOT NULL,"
        "  sealed BLOB NOT NULL, PRIMARY KEY(dir, row)) WITHOUT ROWID;"
        "CREATE TABLE IF NOT EXISTS assigned(key_id TEXT PRIMARY KEY, master TEXT NOT NULL,"
        "  slaves TEXT NOT NULL, sealed BLOB NOT NULL);"
        // No UNIQUE on key_id: the store keeps the set in memory and inserts each ID once;
        // an index would cost every delivery a write to a random page of it.
        "CREATE TABLE IF NOT EXISTS used_ids(key_id TEXT NOT NULL, owners TEXT);"
        "CREATE TABLE IF NOT EXISTS waiting(ord INTEGER PRIMARY KEY, assignment TEXT NOT NULL,"
        "  tag BLOB);"
        "CREATE TABLE IF NOT EXISTS outbox(seq INTEGER PRIMARY KEY, message BLOB NOT NULL,"
        "  tag BLOB);"
        "CREATE TABLE IF NOT EXISTS pending_block(id INTEGER PRIMARY KEY CHECK(id = 1),"
        "  block INTEGER NOT NULL, sealed BLOB NOT NULL);"
        "CREATE TABLE IF NOT EXISTS settled(pool_end INTEGER PRIMARY KEY, t_ms INTEGER NOT NULL,"
        "  tag BLOB);"
        "COMMIT;");
    // Code in the schema (disabled above) is refused outright: a key store never holds any.
    db_.run("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view') OR "
            "(type = 'index' AND name NOT LIKE 'sqlite_autoindex_%')",
            [&](sqlite3_stmt* st) {
              throw damaged(fmt::format("it holds the {} '{}', which a key store never has",
                                        printable(col_text(st, 0)), printable(col_text(st, 1))));
            });
    // Files of format 2 and earlier: the tag columns.
    add_column("waiting", "tag", "BLOB");
    add_column("outbox", "tag", "BLOB");
    add_column("settled", "tag", "BLOB");
    std::unordered_map<std::string, std::uint64_t> meta;
    Blob key_check;
    Blob meta_tag;
    Blob pool_digest;  // absent in a file written before digests were kept
    std::string unsynced_boot;
    db_.run("SELECT name, value FROM meta", [&](sqlite3_stmt* st) {
      const std::string name = col_text(st, 0);
      if (name == "key_check") {
        key_check = col_blob(st, 1);
      } else if (name == kMetaTag) {
        meta_tag = col_blob(st, 1);
      } else if (name == "pool_digest") {
        pool_digest = col_blob(st, 1);
      } else if (name == kUnsyncedBoot) {
        unsynced_boot = col_text(st, 1);
      } else {
        meta[name] = col_u64(st, 1);
      }
    });
    const std::string kc_text(kKeyCheckText);
    const std::span<const std::uint8_t> kc(reinterpret_cast<const std::uint8_t*>(kc_text.data()),
                                           kc_text.size());
    if (!meta.contains("format")) {
      // A new file has no row at all (its tables were created just now, or by a start that
      // stopped before writing its first rows).
      bool rows = !meta.empty() || !key_check.empty() || !meta_tag.empty() ||
                  !pool_digest.empty() || !unsynced_boot.empty();
      db_.run("SELECT EXISTS(SELECT 1 FROM pool UNION ALL SELECT 1 FROM assigned UNION ALL "
              "SELECT 1 FROM used_ids UNION ALL SELECT 1 FROM waiting UNION ALL SELECT 1 FROM "
              "outbox UNION ALL SELECT 1 FROM pending_block UNION ALL SELECT 1 FROM settled)",
              [&](sqlite3_stmt* st) { rows = rows || sqlite3_column_int(st, 0) != 0; });
      if (rows) {
        throw DbError{fmt::format("{}: its format is not recorded: the file was damaged or "
                                  "edited, or is not a key store",
                                  path_)};
      }
      meta_transaction([&] {
        db_.write("INSERT INTO meta(name, value) VALUES('format', ?)", kFormat);
        db_.write("INSERT INTO meta(name, value) VALUES('direction', ?)", static_cast<int>(own));
        db_.write("INSERT INTO meta(name, value) VALUES('key_check', ?)",
                  sealer_.seal(kKeyCheckAad, kc));
      });
      spdlog::info("key store: created {}", path_);
    } else {
      const std::uint64_t format = meta["format"];
      if (format < 1 || format > kFormat) {
        throw DbError{fmt::format("{}: unsupported store format {}", path_, format)};
      }
      if (meta["direction"] != static_cast<std::uint64_t>(own)) {
        throw DbError{fmt::format("{} belongs to the other end of the link (link.role differs)",
                                  path_)};
      }
      auto opens = [&](std::string_view aad) {
        auto check = open_sealed(key_.span(), aad, key_check);
        return check && qkd::core::constant_time_equal(check->span(), kc);
      };
      const bool current = opens(kKeyCheckAad);
      if (!current && !opens(kKeyCheckAad2)) {
        throw DbError{fmt::format("{} was sealed under a different node key", path_)};
      }
      // The format row is in the clear; the key check says which it is.
      if (current != (format == kFormat)) {
        throw damaged(fmt::format("its format ({}) is not the one its key check was sealed for",
                                  format));
      }
      if (current && !tag_opens(meta_tag, meta_aad())) {
        throw damaged("its counters (table meta) do not authenticate");
      }
      if (!current && older_ == OlderFormat::kRefuse) {
        throw DbError{fmt::format(
            "{} is a key store of format {}, an earlier build's: convert it once with "
            "`qkd-kms --config <file> --convert-store` while the KME is stopped (the conversion "
            "cannot be undone: keep a copy of the database to go back). A file found in an "
            "older format after its conversion was tampered with",
            path_, format)};
      }
      if (format == 1) {
        migrate_from_format_1();  // only a file this KME may open
      }
      if (!current) {
        const auto e = meta.find(std::string(detail::kEpoch));
        migrate_to_format_3(kc, e == meta.end() ? 0 : e->second);
      }
    }
    drop_used_ids_index();  // also on a file an older version created but never filled
    // A store made before used_ids kept the key's owners (master and slaves, a JSON array,
    // so that a dec_keys of a delivered key by another SAE is a 401): NULL (not known) in
    // the rows already there.
    add_column("used_ids", "owners", "TEXT");
    open_boot_guard(meta, pool_digest, unsynced_boot);
    detail::StoredState s;
    auto value = [&](std::string_view n, std::uint64_t def) {
      auto it = meta.find(std::string(n));
      return it == meta.end() ? def : it->second;
    };
    s.committed = value(detail::kCommitted, 0);
    s.cursor[0] = value(detail::kCursorAlice, 0);
    s.cursor[1] = value(detail::kCursorBob, 0);
    s.link.epoch = value(detail::kEpoch, 0);
    epoch_ = s.link.epoch;
    s.link.blocks = value(detail::kBlocks, 0);
    s.link.next_seq = value(detail::kNextSeq, 1);
    s.link.last_applied_seq = value(detail::kLastAppliedSeq, 0);
    s.link.assigned_lost = value(detail::kAssignedLost, 0) != 0;
    // Only a digest of the epoch and block count the file is at: one left behind by a newer
    // version, in a file an older version went on writing, is not the pool's.
    constexpr std::size_t kDigestBytes = std::tuple_size_v<PoolDigest>;
    if (pool_digest.size() == kDigestBytes + 16) {
      auto u64_at = [&](std::size_t at) {
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < 8; ++i) {
          v = (v << 8) | pool_digest[at + i];
        }
        return v;
      };
      if (u64_at(kDigestBytes) == s.link.epoch && u64_at(kDigestBytes + 8) == s.link.blocks) {
        s.link.digest.emplace();
        std::copy_n(pool_digest.begin(), kDigestBytes, s.link.digest->begin());
      }
    }
    db_.run("SELECT dir, row, sealed FROM pool ORDER BY dir, row", [&](sqlite3_stmt* st) {
      const auto d = static_cast<Direction>(col_u64(st, 0) & 1);
      const std::uint64_t row = col_u64(st, 1);
      auto plain = open_sealed(key_.span(), row_aad(d, row), col_blob(st, 2));
      if (!plain || plain->size() % kChunkBytes != 0 ||
          plain->size() > kRowChunks * kChunkBytes) {
        throw DbError{fmt::format("{}: pool row {}/{} does not authenticate", path_,
                                  static_cast<int>(d), row)};
      }
      for (std::size_t k = 0; k * kChunkBytes < plain->size(); ++k) {
        s.chunks.push_back(detail::StoredChunk{
            d, row * kRowChunks + k,
            qkd::core::SecureBytes(plain->span().subspan(k * kChunkBytes, kChunkBytes))});
      }
    });
    check_pool_complete(s);
    db_.run("SELECT key_id, master, slaves, sealed FROM assigned", [&](sqlite3_stmt* st) {
      detail::StoredKey k;
      k.key_id = col_text(st, 0);
      k.master = col_text(st, 1);
      // An array of slaves, or (a multicast key some slaves have fetched) an object
      // {"slaves": [...], "fetched": [...]}.
      const std::string slaves = col_text(st, 2);
      auto plain = open_sealed(key_.span(), key_aad(k.key_id, k.master, slaves), col_blob(st, 3));
      if (!plain) {
        throw DbError{fmt::format("{}: key {} does not authenticate", path_, printable(k.key_id))};
      }
      k.key = std::move(*plain);
      const json sl = json::parse(slaves);
      if (sl.is_object()) {
        k.slaves = sl.at("slaves").get<std::vector<std::string>>();
        k.fetched = sl.at("fetched").get<std::vector<std::string>>();
      } else {
        k.slaves = sl.get<std::vector<std::string>>();
      }
      s.assigned.push_back(std::move(k));
    });
    db_.run("SELECT key_id, owners FROM used_ids ORDER BY rowid", [&](sqlite3_stmt* st) {
      detail::UsedId u{col_text(st, 0), {}};
      if (sqlite3_column_type(st, 1) != SQLITE_NULL) {
        u.owners = json::parse(col_text(st, 1)).get<std::vector<std::string>>();
      }
      s.used_ids.push_back(std::move(u));
    });
    db_.run("SELECT ord, assignment, tag FROM waiting ORDER BY ord", [&](sqlite3_stmt* st) {
      const std::string text = col_text(st, 1);
      if (!tag_opens(col_blob(st, 2), waiting_aad(s.link.epoch, col_u64(st, 0), text))) {
        throw damaged(fmt::format("the assignment waiting as {} does not authenticate",
                                  col_u64(st, 0)));
      }
      const json j = json::parse(text);
      KeyAssignment a;
      a.key_id = j.at("id").get<std::string>();
      a.direction = static_cast<Direction>(j.at("dir").get<int>() & 1);
      a.offset = j.at("off").get<std::uint64_t>();
      a.length = j.at("len").get<std::uint32_t>();
      a.master_sae = j.at("master").get<std::string>();
      a.slave_saes = j.at("slaves").get<std::vector<std::string>>();
      a.discard = j.value("discard", false);
      s.waiting.emplace_back(col_u64(st, 0), std::move(a));
    });
    db_.run("SELECT pool_end, t_ms, tag FROM settled ORDER BY pool_end", [&](sqlite3_stmt* st) {
      if (!tag_opens(col_blob(st, 2), settled_aad(s.link.epoch, col_u64(st, 0), col_u64(st, 1)))) {
        throw damaged(fmt::format("the commit time of pool byte {} does not authenticate",
                                  col_u64(st, 0)));
      }
      s.settled.emplace_back(col_u64(st, 0), col_u64(st, 1));
    });
    db_.run("SELECT seq, message, tag FROM outbox ORDER BY seq", [&](sqlite3_stmt* st) {
      Blob message = col_blob(st, 1);
      if (!tag_opens(col_blob(st, 2), outbox_aad(s.link.epoch, col_u64(st, 0), message))) {
        throw damaged(fmt::format("notice {} does not authenticate", col_u64(st, 0)));
      }
      s.link.outbox.push_back(StoredNotice{col_u64(st, 0), std::move(message)});
    });
    db_.run("SELECT block, sealed FROM pending_block WHERE id = 1", [&](sqlite3_stmt* st) {
      const std::uint64_t block = col_u64(st, 0);
      auto plain = open_sealed(key_.span(), pending_aad(block), col_blob(st, 1));
      if (!plain) {
        throw DbError{fmt::format("{}: pending block does not authenticate", path_)};
      }
      s.link.pending = PendingBlock{block, std::move(*plain)};
    });
    // Commits are writes into the OS page cache from now on, with either level: with FULL
    // the syncer thread syncs the WAL after them (run_syncer()), outside SQLite's write lock,
    // so that the next transaction is written meanwhile, and a unit that needs no sync (a
    // delivery, lazy_deliveries_) waits for none.
    db_.exec("PRAGMA synchronous=NORMAL");
    if (synchronous_full_) {
      wal_fd_ = ::open((path_ + "-wal").c_str(), O_RDONLY | O_CLOEXEC);
      if (wal_fd_ < 0) {
        throw DbError{fmt::format("{}-wal: cannot open: {}", path_, std::strerror(errno))};
      }
    }
    // The checkpointer's connection (NORMAL syncs the WAL before a checkpoint and the
    // database after it).
    ckpt_db_.open(path_);
    ckpt_db_.refuse_schema_code();
    ckpt_db_.busy_timeout(10'000);
    ckpt_db_.exec("PRAGMA synchronous=NORMAL");
    db_.on_commit([this](int pages) { wal_committed(pages); });
    checkpointer_ = std::thread([this]() {
      name_this_thread("kms-checkpoint");
      run_checkpointer();
    });
    committer_ = std::thread([this]() {
      name_this_thread("kms-commit");
      run_committer();
    });
    if (synchronous_full_) {
      syncer_ = std::thread([this]() {
        name_this_thread("kms-sync");
        run_syncer();
      });
    }
    return s;
  }

  // --- recording (under the store's lock) ---
  void set_value(std::string_view name, std::uint64_t value) override {
    if (name == detail::kEpoch) {
      epoch_ = value;  // the epoch the rows recorded from now on are tagged with
    }
    add_meta([n = std::string(name), value](Db& db) {
      db.write("INSERT INTO meta(name, value) VALUES(?, ?) "
               "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
               n, value);
    });
  }
  void put_row(Direction d, std::uint64_t row, std::span<const std::uint8_t> bytes) override {
    Blob sealed = sealer_.seal(row_aad(d, row), bytes);
    add([d, row, sealed = std::move(sealed)](Db& db) {
      db.write("INSERT OR REPLACE INTO pool(dir, row, sealed) VALUES(?, ?, ?)",
               static_cast<int>(d), row, sealed);
    });
  }
  void drop_rows_below(Direction d, std::uint64_t row) override {
    add([d, row](Db& db) {
      db.write("DELETE FROM pool WHERE dir = ? AND row < ?", static_cast<int>(d), row);
    });
  }
  void put_assigned(const detail::StoredKey& k) override {
    json sl =
        k.fetched.empty() ? json(k.slaves) : json{{"slaves", k.slaves}, {"fetched", k.fetched}};
    std::string slaves = sl.dump();
    Blob sealed = sealer_.seal(key_aad(k.key_id, k.master, slaves), k.key.span());
    add(
        [id = k.key_id, master = k.master, slaves = std::move(slaves),
         sealed = std::move(sealed)](Db& db) {
          db.write(
              "INSERT OR REPLACE INTO assigned(key_id, master, slaves, sealed) VALUES(?,?,?,?)", id,
              master, slaves, sealed);
        },
        "a/" + k.key_id, /*put=*/true);
  }
  void drop_assigned(const std::string& key_id) override {
    add([key_id](Db& db) { db.write("DELETE FROM assigned WHERE key_id = ?", key_id); },
        "a/" + key_id);
  }
  void add_used(const detail::UsedId& used) override {
    add([key_id = used.key_id, owners = json(used.owners).dump()](Db& db) {
      db.write("INSERT INTO used_ids(key_id, owners) VALUES(?, ?)", key_id, owners);
    });
  }
  void put_waiting(std::uint64_t ordinal, const KeyAssignment& a) override {
    std::string text = assignment_json(a).dump();
    Blob tag = sealer_.seal(waiting_aad(epoch_, ordinal, text), {});
    add(
        [ordinal, text = std::move(text), tag = std::move(tag)](Db& db) {
          db.write("INSERT OR REPLACE INTO waiting(ord, assignment, tag) VALUES(?, ?, ?)", ordinal,
                   text, tag);
        },
        "w/" + std::to_string(ordinal), /*put=*/true);
  }
  void drop_waiting(std::uint64_t ordinal) override {
    add([ordinal](Db& db) { db.write("DELETE FROM waiting WHERE ord = ?", ordinal); },
        "w/" + std::to_string(ordinal));
  }
  void clear_pool() override {
    add([](Db& db) {
      db.write("DELETE FROM pool");
      db.write("DELETE FROM waiting");
      db.write("DELETE FROM settled");
    });
  }
  void put_settled(std::uint64_t pool_end, std::uint64_t unix_ms) override {
    add([pool_end, unix_ms, tag = sealer_.seal(settled_aad(epoch_, pool_end, unix_ms), {})](
            Db& db) {
      db.write("INSERT OR REPLACE INTO settled(pool_end, t_ms, tag) VALUES(?, ?, ?)", pool_end,
               unix_ms, tag);
    });
  }
  void drop_settled_upto(std::uint64_t pool_end) override {
    add([pool_end](Db& db) { db.write("DELETE FROM settled WHERE pool_end <= ?", pool_end); });
  }
  void put_notice(const StoredNotice& n) override {
    add([seq = n.seq, msg = n.message,
         tag = sealer_.seal(outbox_aad(epoch_, n.seq, n.message), {})](Db& db) {
      db.write("INSERT OR REPLACE INTO outbox(seq, message, tag) VALUES(?, ?, ?)", seq, msg, tag);
    });
  }
  void drop_notices_upto(std::uint64_t seq) override {
    add([seq](Db& db) { db.write("DELETE FROM outbox WHERE seq <= ?", seq); });
  }
  void clear_notices() override {
    add([](Db& db) { db.write("DELETE FROM outbox"); });
  }
  void set_pending_block(const std::optional<PendingBlock>& p) override {
    if (!p) {
      add([](Db& db) { db.write("DELETE FROM pending_block"); });
      return;
    }
    Blob sealed = sealer_.seal(pending_aad(p->block), p->key.span());
    add([block = p->block, sealed = std::move(sealed)](Db& db) {
      db.write("INSERT OR REPLACE INTO pending_block(id, block, sealed) VALUES(1, ?, ?)", block,
               sealed);
    });
  }

  void set_pool_digest(const PoolDigest& digest, std::uint64_t epoch,
                       std::uint64_t blocks) override {
    Blob d(digest.begin(), digest.end());  // digest, then epoch and blocks (big-endian)
    for (const std::uint64_t v : {epoch, blocks}) {
      for (int shift = 56; shift >= 0; shift -= 8) {
        d.push_back(static_cast<std::uint8_t>(v >> shift));
      }
    }
    add_meta([d = std::move(d)](Db& db) {
      db.write("INSERT INTO meta(name, value) VALUES('pool_digest', ?) "
               "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
               d);
    });
  }

  // A commit that only reached the OS page cache survives a crash of the KME but maybe not a
  // power loss or an OS crash, which would leave the file in an older state. With NORMAL that
  // is any commit: keys already delivered (enc_keys' bytes, dec_keys' keys) would be
  // unconsumed again. With FULL it is the deliveries of assigned keys (seal_delivery()):
  // their keys would be waiting again. So while a run has such commits in the file it
  // records its boot (synced): "<boot>" with NORMAL, "<boot>/deliveries" with FULL, and
  // removes the record when it closes the file cleanly (after a synced commit,
  // ~SqliteJournal). At open, a record from another boot means that run's last commits may
  // be gone. NORMAL's: the pool, the undelivered keys, Bob's pending block and the
  // unacknowledged notices are discarded, so that nothing of them is served again, and
  // epoch 0 makes the link start a new pool with the peer. FULL's: the assigned keys are
  // discarded (their notices were synced before they were acknowledged, so the peer does not
  // send them again). A record from this boot (the KME crashed): its commits are in the page
  // cache, and a run with FULL syncs them. With FULL where the boot cannot be read,
  // deliveries are synced as everything else, and no record is kept.
  void open_boot_guard(std::unordered_map<std::string, std::uint64_t>& meta, Blob& pool_digest,
                       const std::string& unsynced_boot) {
    const std::string boot = current_boot_id();
    const std::string mark = boot.empty() ? "unknown" : boot;  // "unknown" matches no boot
    if (boot.empty()) {
      spdlog::warn(
          synchronous_full_
              ? "key store: cannot read this host's boot id (/proc/sys/kernel/random/boot_id): "
                "every dec_keys waits for a sync of the store (slower); give the KME /proc"
              : "key store: cannot read this host's boot id (/proc/sys/kernel/random/boot_id): "
                "with store.synchronous = \"normal\" any restart after a crash of this KME "
                "discards its pool; use \"full\" or give the KME /proc");
    } else if (std::getenv("QKD_KMS_BOOT_ID") != nullptr) {
      spdlog::warn("key store: QKD_KMS_BOOT_ID is set: taking \"{}\" for this host's boot (a "
                   "test setting: a fixed value hides reboots)",
                   boot);
    }
    const bool full_record = unsynced_boot.ends_with(kDeliveriesMark);
    const std::string recorded_boot =
        full_record ? unsynced_boot.substr(0, unsynced_boot.size() - kDeliveriesMark.size())
                    : unsynced_boot;
    const std::string failed_sync = path_ + std::string(kFailedSyncSuffix);
    const bool sync_failed = std::filesystem::exists(failed_sync);
    const bool rebooted = !unsynced_boot.empty() && recorded_boot != boot;
    if ((rebooted && full_record) || (sync_failed && !rebooted)) {
      discard_assigned(rebooted ? fmt::format("it was left open by a KME under boot {}, and the "
                                              "host has restarted since (boot {})",
                                              printable(recorded_boot), mark)
                                : fmt::format("a sync of its WAL failed in an earlier run ({} "
                                              "exists)",
                                              failed_sync),
                       meta);
    } else if (rebooted) {
      const std::vector<std::string_view> reset = {detail::kCommitted, detail::kCursorAlice,
                                                   detail::kCursorBob,  detail::kEpoch,
                                                   detail::kBlocks,     "pool_digest"};
      std::string names;
      for (const auto n : reset) {
        names += fmt::format("{}'{}'", names.empty() ? "" : ", ", n);
        meta.erase(std::string(n));
      }
      pool_digest.clear();
      meta_transaction([&] {
        db_.exec(fmt::format("DELETE FROM pool; DELETE FROM assigned; DELETE FROM waiting;"
                             "DELETE FROM outbox; DELETE FROM pending_block; DELETE FROM settled;"
                             "DELETE FROM meta WHERE name IN ({});",
                             names)
                     .c_str());
      });
      spdlog::warn(
          "key store: {} was left open by a KME with store.synchronous = \"normal\" under boot "
          "{}, and the host has restarted since (boot {}): its last commits may be lost, and "
          "with them the record of keys already delivered; discarding its pool and undelivered "
          "keys (the link starts a new pool with the peer)",
          path_, printable(unsynced_boot), mark);
    } else if (synchronous_full_) {
      // What an earlier run left in the page cache (a crash of the KME; with a record of
      // this boot, its unsynced deliveries) is synced before anything is served.
      sync_existing_file(path_ + "-wal");
      lock_.sync(path_);
      sync_existing_file(folder_of(path_));
    }
    if (sync_failed) {  // handled above: the discard is synced
      std::filesystem::remove(failed_sync);
      sync_existing_file(folder_of(path_));
    }
    std::string record;  // what this run keeps recorded
    if (!synchronous_full_) {
      record = mark;
    } else if (!boot.empty()) {
      record = boot + std::string(kDeliveriesMark);
      lazy_deliveries_ = true;
    }
    if (record != unsynced_boot) {
      meta_transaction([&] {
        if (record.empty()) {
          db_.write("DELETE FROM meta WHERE name = ?", std::string(kUnsyncedBoot));
        } else {
          db_.write("INSERT INTO meta(name, value) VALUES(?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    std::string(kUnsyncedBoot), record);
        }
      });
    }
    marked_ = !record.empty();
  }

  // open_boot_guard(): the keys assigned here that the last run may have delivered without
  // a durable record (its deliveries were not synced) go, and their key_IDs count as used
  // (a dec_keys of one is a 400 at once; owners not kept); meta.assigned_lost tells the peer.
  void discard_assigned(const std::string& why,
                        std::unordered_map<std::string, std::uint64_t>& meta) {
    std::uint64_t keys = 0;
    db_.run("SELECT COUNT(*) FROM assigned", [&](sqlite3_stmt* st) { keys = col_u64(st, 0); });
    meta_transaction([&] {
      db_.exec("INSERT INTO used_ids(key_id, owners) SELECT key_id, NULL FROM assigned;"
               "DELETE FROM assigned;");
      db_.write("INSERT INTO meta(name, value) VALUES(?, 1) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                std::string(detail::kAssignedLost));
    });
    meta[std::string(detail::kAssignedLost)] = 1;
    spdlog::warn("key store: {}: {}: the record of its last dec_keys deliveries may be lost; "
                 "discarding the {} assigned keys it held for SAEs (none is served twice)",
                 path_, why, keys);
  }

  // The syncer thread, after a failed sync: the written deliveries it was to make durable may
  // be lost from the page cache too (a failed write-back), while a restart in this boot would
  // trust it. A file beside the store makes the next open discard the assigned keys.
  void record_failed_sync() {
    const std::string marker = path_ + std::string(kFailedSyncSuffix);
    const int fd = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, S_IRUSR | S_IWUSR);
    if (fd < 0 || ::fsync(fd) != 0) {
      spdlog::critical("key store: cannot record the failed sync in {}: {}; discard the file's "
                       "assigned keys before the next start",
                       marker, std::strerror(errno));
    }
    if (fd >= 0) {
      ::close(fd);
    }
    try {
      sync_existing_file(folder_of(path_));
    } catch (const DbError& e) {
      spdlog::critical("key store: {}", e.what);
    }
  }

  // Every chunk a direction still holds, from its cursor to the committed end, must have
  // been read: a row missing (deleted from the file, or a damaged page SQLite skipped) would
  // otherwise be served as zero bytes. Rows are sealed one by one, so this is the check that
  // catches a deletion. The counters are stored in the clear, so the cursors are checked
  // too: one past its direction's end would make the pool look larger than it is, and one
  // moved back would serve bytes already used, which the rows hold as zeros (a used byte is
  // wiped, and 16 zero bytes in a row are not key: 2^-128). So is a committed end moved
  // into the zeros after a block's last byte. A move by less than 16 bytes is not seen.
  void check_pool_complete(const detail::StoredState& s) const {
    for (int d = 0; d < 2; ++d) {
      const auto dir = static_cast<Direction>(d);
      const std::uint64_t end_byte = direction_bytes(s.committed, dir);
      const std::uint64_t cursor = s.cursor[d];
      if (cursor > end_byte) {
        throw damaged(fmt::format("direction {} is consumed up to byte {}, past its end at "
                                  "byte {}",
                                  d, cursor, end_byte));
      }
      const std::uint64_t end = (end_byte + kChunkBytes - 1) / kChunkBytes;
      std::uint64_t next = cursor / kChunkBytes;  // chunks arrive in order (ORDER BY)
      std::uint64_t zeros = 0;                     // the run of zero bytes so far, across chunks
      for (const auto& c : s.chunks) {
        if (c.dir != dir || c.index != next || next >= end) {
          continue;
        }
        // The part of this chunk in [cursor, end_byte).
        const std::uint64_t at = next * kChunkBytes;
        const std::uint64_t from = std::max(at, cursor) - at;
        const std::uint64_t to = std::min<std::uint64_t>(at + kChunkBytes, end_byte) - at;
        for (std::uint64_t i = from; i < to; ++i) {
          zeros = c.bytes[i] == 0 ? zeros + 1 : 0;
          if (zeros == 16) {
            throw damaged(fmt::format("direction {} holds used (wiped) bytes at byte {}, past "
                                      "its cursor at byte {}",
                                      d, at + i + 1 - zeros, cursor));
          }
        }
        ++next;
      }
      if (next < end) {
        throw damaged(fmt::format("pool row {}/{} is missing (direction {} holds bytes {} to {})",
                                  d, next / kRowChunks, d, cursor, end_byte));
      }
    }
  }

  // Format 1 kept one pool row per chunk (table chunks, sealed as "chunk/<dir>/<idx>"):
  // moves them into rows of kRowChunks (used chunks before the first one kept stay zero) and
  // drops the old table, in one transaction.
  void migrate_from_format_1() {
    std::map<std::pair<int, std::uint64_t>, qkd::core::SecureBytes> rows;  // (dir, row)
    std::size_t chunks = 0;
    meta_transaction([&] {
      db_.run("SELECT dir, idx, sealed FROM chunks ORDER BY dir, idx", [&](sqlite3_stmt* st) {
        const auto d = static_cast<Direction>(col_u64(st, 0) & 1);
        const std::uint64_t idx = col_u64(st, 1);
        auto plain = open_sealed(key_.span(), chunk_aad(d, idx), col_blob(st, 2));
        if (!plain || plain->size() != kChunkBytes) {
          throw DbError{fmt::format("{}: pool chunk {}/{} does not authenticate", path_,
                                    static_cast<int>(d), idx)};
        }
        auto& row = rows[{static_cast<int>(d), idx / kRowChunks}];
        const std::size_t at = (idx % kRowChunks) * kChunkBytes;
        if (row.size() < at + kChunkBytes) {
          row.resize(at + kChunkBytes);
        }
        std::memcpy(row.data() + at, plain->data(), kChunkBytes);
        ++chunks;
      });
      for (const auto& [at, bytes] : rows) {
        const auto d = static_cast<Direction>(at.first);
        db_.write("INSERT OR REPLACE INTO pool(dir, row, sealed) VALUES(?, ?, ?)", at.first,
                  at.second, sealer_.seal(row_aad(d, at.second), bytes.span()));
      }
      db_.exec("DROP TABLE chunks");
      db_.write("UPDATE meta SET value = 2 WHERE name = 'format'");
    });
    spdlog::info("key store: {}: converted to format 2 ({} pool chunks in {} rows)", path_,
                 chunks, rows.size());
  }

  // Adds a column that files of an earlier format lack (NULL in the rows already there).
  void add_column(const std::string& table, const std::string& column, const char* type) {
    bool has = false;
    db_.run(
        "SELECT name FROM pragma_table_info(?)",
        [&](sqlite3_stmt* st) { has = has || col_text(st, 0) == column; }, table);
    if (!has) {
      db_.exec(fmt::format("ALTER TABLE {} ADD COLUMN {} {}", table, column, type).c_str());
    }
  }

  // The refusal of a file whose content does not hold together.
  [[nodiscard]] DbError damaged(const std::string& what) const {
    return DbError{fmt::format("{}: {}: the file was damaged or edited; move it away to start "
                               "this KME with an empty pool (the link then resets its pool)",
                               path_, what)};
  }

  // Whether `tag` (a seal of nothing) authenticates `aad`.
  bool tag_opens(std::span<const std::uint8_t> tag, std::string_view aad) const {
    auto plain = open_sealed(key_.span(), aad, tag);
    return plain && plain->empty();
  }

  // The additional data of the meta tag: every meta row but the tag itself, in name order,
  // each as its name, SQLite type and value (hex, so that no value can pass for another).
  // The counters (cursors, committed bytes, epoch, blocks, notice numbers), the pool digest,
  // the format, the direction, the key check and the boot record are thereby bound together:
  // an edited, added or deleted row fails the tag.
  std::string meta_aad() {
    std::string aad = "qkd-kms/meta";
    auto hex = [&](const void* p, int n) {
      static constexpr char kDigits[] = "0123456789abcdef";
      const auto* b = static_cast<const std::uint8_t*>(p);
      for (int i = 0; i < n; ++i) {
        aad += kDigits[b[i] >> 4];
        aad += kDigits[b[i] & 15];
      }
    };
    db_.run("SELECT name, value FROM meta WHERE name != ? ORDER BY name",
            [&](sqlite3_stmt* st) {
              aad += ';';
              const void* name = sqlite3_column_blob(st, 0);  // before its size (SQLite's rule)
              hex(name, sqlite3_column_bytes(st, 0));
              aad += fmt::format(":{}:", sqlite3_column_type(st, 1));  // before any conversion
              const void* value = sqlite3_column_blob(st, 1);
              hex(value, sqlite3_column_bytes(st, 1));
            },
            std::string(kMetaTag));
    return aad;
  }

  // Rewrites the meta tag, inside the transaction that changed meta rows.
  void write_meta_tag() {
    db_.write("INSERT INTO meta(name, value) VALUES(?, ?) "
              "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
              std::string(kMetaTag), sealer_.seal(meta_aad(), {}));
  }

  // Runs `writes` (meta rows written at open or close, outside the units) and the tag's
  // rewrite in one transaction.
  template <typename F>
  void meta_transaction(F&& writes) {
    db_.exec("BEGIN IMMEDIATE");
    try {
      writes();
      write_meta_tag();
      db_.exec("COMMIT");
    } catch (const DbError&) {
      try {
        db_.exec("ROLLBACK");
      } catch (const DbError&) {
      }
      throw;
    }
  }

  // Format 2 (and 1, converted to 2 first) left counters, waiting assignments, unacknowledged
  // notices and commit times in the clear, and sealed an assigned key with its key_ID alone
  // as additional data (key_aad_v1): every such row is tagged or sealed again as format 3
  // does, and the key check sealed for format 3, in one transaction. What the file held was
  // not authenticated before: this makes it so from now on, as it is.
  void migrate_to_format_3(std::span<const std::uint8_t> key_check_text, std::uint64_t epoch) {
    std::size_t keys = 0;
    meta_transaction([&] {
      struct Resealed {
        std::string id;
        Blob sealed;
      };
      std::vector<Resealed> resealed;
      db_.run("SELECT key_id, master, slaves, sealed FROM assigned", [&](sqlite3_stmt* st) {
        const std::string id = col_text(st, 0);
        const std::string aad = key_aad(id, col_text(st, 1), col_text(st, 2));
        const Blob sealed = col_blob(st, 3);
        if (open_sealed(key_.span(), aad, sealed)) {
          return;
        }
        auto plain = open_sealed(key_.span(), key_aad_v1(id), sealed);
        if (!plain) {
          throw DbError{fmt::format("{}: key {} does not authenticate", path_, printable(id))};
        }
        resealed.push_back(Resealed{id, sealer_.seal(aad, plain->span())});
      });
      for (const auto& r : resealed) {
        db_.write("UPDATE assigned SET sealed = ? WHERE key_id = ?", r.sealed, r.id);
      }
      keys = resealed.size();
      // Each row of `select` (its key first) tagged over `aad` of it, written by `update`.
      auto tag_rows = [&](const char* select, const char* update,
                          const std::function<std::string(sqlite3_stmt*)>& aad) {
        std::vector<std::pair<std::uint64_t, Blob>> tags;
        db_.run(select, [&](sqlite3_stmt* st) {
          tags.emplace_back(col_u64(st, 0), sealer_.seal(aad(st), {}));
        });
        for (const auto& [row, tag] : tags) {
          db_.write(update, tag, row);
        }
      };
      tag_rows("SELECT ord, assignment FROM waiting", "UPDATE waiting SET tag = ? WHERE ord = ?",
               [&](sqlite3_stmt* st) { return waiting_aad(epoch, col_u64(st, 0), col_text(st, 1)); });
      tag_rows("SELECT seq, message FROM outbox", "UPDATE outbox SET tag = ? WHERE seq = ?",
               [&](sqlite3_stmt* st) { return outbox_aad(epoch, col_u64(st, 0), col_blob(st, 1)); });
      tag_rows("SELECT pool_end, t_ms FROM settled",
               "UPDATE settled SET tag = ? WHERE pool_end = ?", [&](sqlite3_stmt* st) {
                 return settled_aad(epoch, col_u64(st, 0), col_u64(st, 1));
               });
      db_.write("UPDATE meta SET value = ? WHERE name = 'format'", kFormat);
      db_.write("UPDATE meta SET value = ? WHERE name = 'key_check'",
                sealer_.seal(kKeyCheckAad, key_check_text));
    });
    spdlog::info("key store: {}: converted to format {} (counters, waiting assignments, notices "
                 "and commit times tagged; {} keys sealed with their owners)",
                 path_, kFormat, keys);
  }

  // A store made before used_ids lost its UNIQUE constraint: rebuilt once without it (the
  // constraint's index cannot be dropped on its own), rowids kept (pruning goes by them).
  void drop_used_ids_index() {
    std::string sql;
    db_.run("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'used_ids'",
            [&](sqlite3_stmt* st) { sql = col_text(st, 0); });
    if (sql.find("UNIQUE") == std::string::npos) {
      return;
    }
    db_.exec(
        "BEGIN IMMEDIATE;"
        "CREATE TABLE used_ids_new(key_id TEXT NOT NULL);"
        "INSERT INTO used_ids_new(rowid, key_id) SELECT rowid, key_id FROM used_ids;"
        "DROP TABLE used_ids;"
        "ALTER TABLE used_ids_new RENAME TO used_ids;"
        "COMMIT;");
    // The rebuild went through the WAL (up to ~12,000 pages for 2^20 IDs) before the WAL hook
    // counts pages: copy it into the database and empty it now, while no one else writes.
    db_.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    spdlog::info("key store: {}: used_ids rebuilt without its unique index", path_);
  }

  std::uint64_t seal() override { return seal_unit(Seal::kNow); }
  std::uint64_t seal_deferred() override { return seal_unit(Seal::kDeferred); }
  std::uint64_t seal_link() override { return seal_unit(Seal::kLink); }
  std::uint64_t seal_delivery(std::uint64_t after) override {
    return seal_unit(Seal::kDelivery, after);
  }
  std::uint64_t next_ticket() const override {
    std::lock_guard lock(mu_);
    return last_ticket_ + 1;
  }

  // A caller whose unit is queued writes the queue itself when no transaction is being
  // written (no hand-off to the committer thread and back); otherwise it waits for the one
  // in progress, and then writes the next group if its unit is in it. With FULL it then
  // waits for the syncer, unless its unit needs no sync.
  Status wait(std::uint64_t ticket, bool write_here) override {
    std::unique_lock lock(mu_);
    const bool counted = !write_here && written_ticket_ < ticket && !failed_;
    if (counted) {
      ++committer_writes_for_;
      work_cv_.notify_one();
    }
    while (!done_locked(ticket) && !failed_) {
      if (write_here && !committing_ && urgent_queued_ > 0) {
        commit_queue(lock);
        continue;
      }
      done_cv_.wait(lock);
    }
    if (counted) {
      --committer_writes_for_;
    }
    return status_locked(ticket);
  }

  void when_durable(std::uint64_t ticket, std::function<void(Status)> done) override {
    std::unique_lock lock(mu_);
    if (done_locked(ticket) || failed_) {
      const Status st = status_locked(ticket);
      lock.unlock();
      done(st);
      return;
    }
    // Its unit is in queue_, or in the transaction being written (committing_): that
    // thread runs `done` after it, and hands the rest of the queue on.
    callbacks_.push_back(Callback{ticket, std::move(done)});
    if (committing_) {
      return;
    }
    if (!commit_may_block()) {
      commit_queue(lock);  // a commit is a page-cache write; no hand-off
    } else {
      work_cv_.notify_one();  // a checkpoint may be due: the committer thread writes it
    }
  }

  // Everything sealed so far written and (FULL) synced.
  void drain() override {
    std::unique_lock lock(mu_);
    const std::uint64_t target = last_ticket_;
    ++drainers_;
    sync_cv_.notify_one();
    while (durable_ticket_ < target && !failed_) {
      if (!committing_ && !queue_.empty()) {
        commit_queue(lock);  // at shutdown any thread may wait for the disk
        continue;
      }
      done_cv_.wait(lock);
    }
    --drainers_;
    done_cv_.wait(lock, [&] { return running_callbacks_ == 0; });
  }

 private:
  // Whether writing the queue may last a checkpoint (a commit is otherwise a write into the
  // OS page cache, ~0.1 ms): while the WAL nears the bound at which the writer checkpoints
  // itself. Then when_durable() leaves the write to the committer thread rather than
  // blocking its caller (an API I/O thread).
  bool commit_may_block() const {
    return wal_pages_.load(std::memory_order_relaxed) >= kWalHardPages / 2;
  }

  // Whether unit `ticket` is durable: synced (with NORMAL: written), or a delivery that
  // needs no sync written and the unit it depends on synced.
  bool done_locked(std::uint64_t ticket) const {
    if (durable_ticket_ >= ticket) {
      return true;
    }
    if (written_ticket_ < ticket) {
      return false;
    }
    const auto d = deliveries_.find(ticket);
    return d != deliveries_.end() && durable_ticket_ >= d->second;
  }

  Status status_locked(std::uint64_t ticket) const {
    if (done_locked(ticket)) {
      return qkd::core::ok_status();
    }
    return make_error(ErrorCode::kInternal, failure_);
  }

  // Whether a queued unit must be written now by the committer thread: a completion waits
  // for it with no caller to write it.
  bool urgent_for_committer() const {
    return urgent_queued_ > 0 && (!callbacks_.empty() || committer_writes_for_ > 0);
  }

  void add(std::function<void(Db&)> run, std::string row = {}, bool put = false) {
    std::lock_guard lock(mu_);
    current_.push_back(Op{std::move(run), std::move(row), put});
  }
  void add_meta(std::function<void(Db&)> run) {
    std::lock_guard lock(mu_);
    current_.push_back(Op{std::move(run), {}, false, false, /*meta=*/true});
  }

  std::uint64_t seal_unit(Seal kind, std::uint64_t after = 0) {
    const bool deferred = kind == Seal::kDeferred;
    std::lock_guard lock(mu_);
    if (!current_.empty()) {
      // (A delivery whose keys this very unit recorded would depend on itself: synced.)
      const bool lazy = kind == Seal::kDelivery && lazy_deliveries_ && after <= last_ticket_;
      queue_.push_back(Unit{++last_ticket_, std::move(current_), std::chrono::steady_clock::now(),
                            kind == Seal::kLink, !lazy});
      current_.clear();
      if (lazy) {
        deliveries_.emplace(last_ticket_, after);
      }
      if (!deferred) {
        ++urgent_queued_;
      }
      // The committer thread needs a wake-up for a unit only when it is idle (nothing was
      // queued: a deferred unit starts its timer). Otherwise it is already waiting for the
      // first deferred unit's deadline or writing, and a wake-up would only be a context
      // switch that finds nothing to do; a caller writes its own unit (wait()).
      if (deferred && committer_idle_) {
        work_cv_.notify_one();
      }
    }
    return last_ticket_;
  }

  // Writes what nobody waits for: deferred units after kDeferMax (unless a caller's unit takes
  // them along first), and everything left at shutdown.
  void run_committer() {
    std::unique_lock lock(mu_);
    for (;;) {
      committer_idle_ = true;
      work_cv_.wait(lock, [&] { return !committing_ && (stopping_ || !queue_.empty()); });
      committer_idle_ = false;
      if (queue_.empty()) {
        return;  // stopping, all written
      }
      // With lazy deliveries a deferred unit would gain nothing by waiting: no delivery
      // needs a sync of its own to share, and a delivery of its keys waits for its sync.
      if (!stopping_ && !urgent_for_committer() && !lazy_deliveries_) {
        const auto due = queue_.front().sealed_at + kDeferMax;
        if (std::chrono::steady_clock::now() < due) {
          work_cv_.wait_until(lock, due, [&] { return stopping_ || urgent_for_committer(); });
          continue;  // a caller may have written them meanwhile
        }
      }
      commit_queue(lock);
    }
  }

  // FULL: syncs the WAL once a written unit needs it (or drain(), or at the end), outside
  // SQLite's write lock: the frames of every transaction written before the sync started are
  // durable when it returns (those a checkpoint has copied meanwhile are in the database,
  // which the checkpoint synced). Transactions written during a sync wait for the next.
  void run_syncer() {
    std::unique_lock lock(mu_);
    for (;;) {
      sync_cv_.wait(lock, [&] {
        return failed_ || sync_wanted_ > durable_ticket_ ||
               ((drainers_ > 0 || sync_stopping_) && written_ticket_ > durable_ticket_) ||
               sync_stopping_;
      });
      if (failed_ || written_ticket_ <= durable_ticket_) {
        if (sync_stopping_ || failed_) {
          return;
        }
        continue;
      }
      const std::uint64_t target = written_ticket_;
      lock.unlock();
      const auto t0 = std::chrono::steady_clock::now();
      const int rc = ::fdatasync(wal_fd_);
      const int err = errno;
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - t0;
      {
        std::lock_guard times(times_mu_);
        times_.syncs.add(took.count());
      }
      lock.lock();
      if (rc != 0) {
        fail_locked(fmt::format("syncing {}-wal failed: {}", path_, std::strerror(err)));
        if (lazy_deliveries_) {
          lock.unlock();
          record_failed_sync();
          lock.lock();
        }
      } else {
        durable_ticket_ = target;
        deliveries_.erase(deliveries_.begin(), deliveries_.upper_bound(target));
      }
      // A delivery of the units just synced completes here (so may any unit written since,
      // if its delivery's dependency is now synced).
      complete_due(lock);
    }
  }

  // Everything queued so far is one transaction; what arrives while it is written is the next
  // one. Called with mu_ held and no transaction in progress; one thread at a time writes.
  // Runs the completions (when_durable) this transaction made due, without mu_.
  void commit_queue(std::unique_lock<std::mutex>& lock) {
    if (queue_.empty()) {
      return;
    }
    committing_ = true;
    std::deque<Unit> units = std::move(queue_);
    queue_.clear();
    urgent_queued_ = 0;
    const std::uint64_t last = units.back().ticket;
    const bool needs_sync =
        std::any_of(units.begin(), units.end(), [](const Unit& u) { return u.needs_sync; });
    if (!failed_) {  // else the waiters see the failure
      lock.unlock();
      std::string error = write(units);
      units.clear();
      lock.lock();
      if (error.empty()) {
        written_ticket_ = last;
        if (!synchronous_full_) {
          durable_ticket_ = last;
        } else {
          if (needs_sync) {
            sync_wanted_ = last;
          }
          if (needs_sync || drainers_ > 0 || stopping_) {
            sync_cv_.notify_one();
          }
        }
      } else {
        fail_locked(fmt::format("writing {} failed: {}", path_, error));
      }
    }
    committing_ = false;
    // What is left: with completions waiting and no caller to write their units, the
    // committer thread writes it now; deferred units alone wait for a caller.
    if (stopping_ || (!queue_.empty() && (urgent_for_committer() ||
                                          (urgent_queued_ == 0 && committer_idle_)))) {
      work_cv_.notify_one();  // the committer thread's turn
    }
    complete_due(lock);
  }

  void fail_locked(std::string failure) {
    failed_ = true;
    failure_ = std::move(failure);
    spdlog::critical("key store: {}; no key is served from now on", failure_);
  }

  // Wakes the waiters and runs the completions (when_durable) that are due now, without mu_.
  void complete_due(std::unique_lock<std::mutex>& lock) {
    std::vector<std::pair<Status, std::function<void(Status)>>> due;
    std::erase_if(callbacks_, [&](Callback& c) {
      if (!done_locked(c.ticket) && !failed_) {
        return false;
      }
      due.emplace_back(status_locked(c.ticket), std::move(c.done));
      return true;
    });
    done_cv_.notify_all();
    if (!due.empty()) {
      ++running_callbacks_;
      lock.unlock();
      for (auto& [status, done] : due) {
        try {
          done(status);
        } catch (const std::exception& e) {  // one failing completion must not drop the rest
          spdlog::error("key store: a write's completion failed: {}", e.what());
        }
      }
      lock.lock();
      if (--running_callbacks_ == 0) {
        done_cv_.notify_all();  // drain(), the destructor
      }
    }
  }

  [[nodiscard]] std::string failure() const override {
    std::lock_guard lock(mu_);
    return failed_ ? failure_ : std::string();
  }

  [[nodiscard]] Times commit_times() const override {
    std::lock_guard lock(times_mu_);
    return times_;
  }

  // One transaction, timed (commit_times()) whether it succeeds or not; returns the error,
  // empty on success.
  std::string write(std::deque<Unit>& units) {
    const auto t0 = std::chrono::steady_clock::now();
    const bool link = std::any_of(units.begin(), units.end(), [](const Unit& u) { return u.link; });
    std::string error = transact(units);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - t0;
    std::lock_guard lock(times_mu_);
    (link ? times_.link : times_.requests).add(took.count());
    return error;
  }

  // write() without the timing.
  std::string transact(std::deque<Unit>& units) {
    try {
      if (wal_pages_ >= kWalHardPages) {
        checkpoint_here();
      }
      db_.exec("BEGIN IMMEDIATE");
      try {
        // A row put and then deleted within this transaction is not written at all (the
        // delete alone leaves the same state): typically a peer notice's key, put in
        // `waiting` and `assigned` and delivered by the dec_keys this transaction carries.
        // The insert and the delete would each dirty a page of the table and of its index.
        std::unordered_set<std::string_view> deleted_later;
        for (auto u = units.rbegin(); u != units.rend(); ++u) {
          for (auto op = u->ops.rbegin(); op != u->ops.rend(); ++op) {
            if (!op->row.empty() && !op->put) {
              deleted_later.insert(op->row);
            } else if (!op->row.empty()) {
              op->skip = deleted_later.contains(op->row);
            }
          }
        }
        bool meta = false;
        for (const auto& u : units) {
          for (const auto& op : u.ops) {
            if (!op.skip) {
              op.run(db_);
              meta = meta || op.meta;
            }
          }
        }
        if (meta) {
          write_meta_tag();
        }
        if (++transactions_ % kPruneEvery == 0) {
          db_.write("DELETE FROM used_ids WHERE rowid <= (SELECT MAX(rowid) FROM used_ids) - ?",
                    static_cast<std::uint64_t>(kMaxUsedIds));
        }
        db_.exec("COMMIT");  // a write into the page cache (run_syncer() syncs it with FULL)
      } catch (const DbError&) {
        try {
          db_.exec("ROLLBACK");
        } catch (const DbError&) {
        }
        throw;
      }
    } catch (const DbError& e) {
      return e.what;
    }
    return {};
  }

  // The writing thread, from the WAL hook after each commit.
  void wal_committed(int pages) {
    wal_pages_ = pages;
    if (pages >= kCheckpointPages) {
      {
        std::lock_guard lock(ckpt_state_mu_);
        ckpt_wanted_ = true;
      }
      ckpt_cv_.notify_one();
    }
  }

  // The writing thread, between transactions, when the checkpointer has not let the WAL start
  // over: waits for a checkpoint in progress, then checkpoints on the committer's connection
  // (no writer now, so it copies the whole WAL and the next transaction starts it over).
  void checkpoint_here() {
    std::lock_guard lock(ckpt_mu_);
    if (std::string e = db_.checkpoint(); !e.empty()) {
      spdlog::warn("key store: checkpoint of {} failed: {}", path_, e);
    }
    wal_pages_ = 0;  // until the next commit reports it
  }

  void run_checkpointer() {
    std::unique_lock lock(ckpt_state_mu_);
    for (;;) {
      ckpt_cv_.wait(lock, [&] { return ckpt_stopping_ || ckpt_wanted_; });
      if (ckpt_stopping_) {
        return;
      }
      ckpt_wanted_ = false;
      lock.unlock();
      std::string e;
      {
        std::lock_guard ck(ckpt_mu_);
        e = ckpt_db_.checkpoint();
      }
      if (!e.empty()) {
        spdlog::warn("key store: checkpoint of {} failed: {}", path_, e);
      }
      lock.lock();
    }
  }

  const std::string path_;
  const qkd::core::SecureBytes key_;
  Sealer sealer_{key_.span()};
  const bool synchronous_full_;
  const OlderFormat older_;
  // The pool epoch as recorded so far (set_value; at open, the file's): the tags of waiting,
  // outbox and settled rows bind it. Under the store's lock, as every recording call.
  std::uint64_t epoch_ = 0;
  // Destroyed in reverse order: ckpt_db_, db_, then lock_.
  FileLock lock_;
  Db db_;       // after open(): the writing thread's (committing_)
  Db ckpt_db_;  // the checkpointer's
  std::thread committer_;
  std::thread checkpointer_;
  // The writing thread: the WAL's size after the last commit (read by commit_may_block()).
  std::atomic<int> wal_pages_{0};

  std::mutex ckpt_mu_;  // held for a checkpoint call, by either thread
  std::mutex ckpt_state_mu_;
  std::condition_variable ckpt_cv_;
  bool ckpt_wanted_ = false;
  bool ckpt_stopping_ = false;

  std::uint64_t transactions_ = 0;
  mutable std::mutex times_mu_;
  Times times_;  // the writing thread adds, stats() reads

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::vector<Op> current_;
  std::deque<Unit> queue_;
  std::size_t urgent_queued_ = 0;  // units in queue_ sealed by seal()
  // Completions (when_durable) of units not yet durable, in registration order.
  struct Callback {
    std::uint64_t ticket = 0;
    std::function<void(Status)> done;
  };
  std::vector<Callback> callbacks_;
  int running_callbacks_ = 0;  // threads running completions outside mu_
  bool committing_ = false;        // a thread is writing a transaction (db_ is its)
  // The committer thread is in its untimed wait: for a unit, or for the transaction a caller
  // is writing to end (commit_queue() then wakes it if deferred units are left).
  bool committer_idle_ = false;
  int committer_writes_for_ = 0;  // callers of wait(ticket, false) waiting: the committer writes
  std::uint64_t last_ticket_ = 0;
  std::uint64_t written_ticket_ = 0;  // every unit up to it is written (committed)
  std::uint64_t durable_ticket_ = 0;  // ... and synced (NORMAL: = written_ticket_)
  // FULL: the syncer thread (syncer_) syncs the WAL through wal_fd_ once a unit that needs
  // it is written (sync_wanted_: the last such transaction's last unit).
  std::thread syncer_;
  int wal_fd_ = -1;
  std::condition_variable sync_cv_;
  std::uint64_t sync_wanted_ = 0;
  int drainers_ = 0;  // drain() calls waiting: everything written is synced
  bool sync_stopping_ = false;
  // FULL with a known boot: deliveries (seal_delivery()) are durable once written and their
  // dependency synced; by ticket, the unit each depends on, until synced.
  bool lazy_deliveries_ = false;
  std::map<std::uint64_t, std::uint64_t> deliveries_;
  bool failed_ = false;
  std::string failure_;
  bool stopping_ = false;
  bool marked_ = false;  // this run recorded its boot: open_boot_guard()
};

}  // namespace

Result<std::unique_ptr<KeyStore>> make_sqlite_key_store(Direction own, const std::string& db_path,
                                                        std::span<const std::uint8_t> node_key,
                                                        bool synchronous_full, OlderFormat older) {
  if (node_key.size() != 32) {
    return make_error(ErrorCode::kInvalidArgument, "the node key must be 32 bytes");
  }
  std::unique_ptr<SqliteJournal> journal;
  detail::StoredState state;
  try {
    journal = std::make_unique<SqliteJournal>(db_path, node_key, synchronous_full, older);
    state = journal->open(own);
  } catch (const DbError& e) {
    // Most errors name the file already; SQLite's own do not.
    return make_error(ErrorCode::kUnavailable,
                      e.what.find(db_path) == std::string::npos
                          ? fmt::format("key store: {}: {}", db_path, e.what)
                          : fmt::format("key store: {}", e.what));
  } catch (const std::exception& e) {  // malformed JSON in a row
    return make_error(ErrorCode::kUnavailable,
                      fmt::format("key store: {}: corrupt row: {}", db_path, e.what()));
  }
  spdlog::info(
      "key store: {} opened (epoch {:x}, {} blocks, {} pool bytes, {} keys waiting, {} notices "
      "unacknowledged)",
      db_path, state.link.epoch, state.link.blocks, state.committed, state.assigned.size(),
      state.link.outbox.size());
  return detail::make_journaled_store(own, std::move(journal), std::move(state));
}

Result<qkd::core::SecureBytes> read_node_key_file(const std::string& path) {
  // Checked and read through one descriptor: the file checked is the file read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("node key file {}: {}", path, std::strerror(errno)));
  }
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("node key file {}: {}", path, std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("node key file {} is not a regular file", path));
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("node key file {} must be accessible by its owner only "
                                  "(chmod 600), its mode is {:o}",
                                  path, st.st_mode & 07777));
  }
  qkd::core::SecureBytes raw(65);
  std::size_t got = 0;
  while (got < raw.size()) {
    const ssize_t n = ::read(fd, raw.data() + got, raw.size() - got);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      return make_error(ErrorCode::kInvalidArgument,
                        fmt::format("node key file {}: cannot read: {}", path, std::strerror(errno)));
    }
    if (n == 0) {
      break;
    }
    got += static_cast<std::size_t>(n);
  }
  raw.resize(got);
  if (raw.size() == 32) {
    return raw;
  }
  // 64 hex digits, optionally followed by a newline.
  std::size_t n = raw.size();
  while (n > 0 && (raw[n - 1] == '\n' || raw[n - 1] == '\r')) {
    --n;
  }
  if (n == 64) {
    std::string text(reinterpret_cast<const char*>(raw.data()), n);
    auto key = hex_decode(text);
    OPENSSL_cleanse(text.data(), text.size());
    if (key && key->size() == 32) {
      return std::move(*key);
    }
  }
  return make_error(ErrorCode::kInvalidArgument,
                    fmt::format("node key file {} must hold 32 bytes (raw, or 64 hex digits)", path));
}

}  // namespace qkd::kms
