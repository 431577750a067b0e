// Fuzz target: the durable store opening a damaged or edited file (make_sqlite_key_store).
// A store file with every kind of row (pool rows of both directions, keys delivered and
// remembered with their owners, keys the peer assigned, a multicast key one slave fetched,
// an assignment waiting for its bytes, commit times, unacknowledged notices, a pending
// block) is made once, and a copy of it rewritten as format 2 left it (counters and the
// like in the clear, checked against the pool rows at open); each input edits a copy of one
// of the two through SQLite (any value of any type in any column, rows deleted or added,
// bytes of sealed blobs flipped), then opens it and, when it opens, serves from it: stats,
// enc_keys, dec_keys of every key it held, a peer notice, expiry.
//
// Checks: nothing crashes (ASan, UBSan); an edited file either refuses to open with an
// error that names it, or serves only what it holds: every key handed out is made of pool
// bytes (the template's pool has no run of 16 zero bytes, while used bytes are wiped to
// zeros, so a key with such a run is a used byte served again), no SAE gets a key_ID twice,
// and the keys slaves fetched before the edit (one of them multicast) are not handed to
// them again. Keys and the block end off the 32-byte chunks, as real ones do.
//
// Input: one byte for how many keys each enc_keys asks (modulo 3) and which file is edited
// (format 3 or 2: the quotient by 3, even or odd), then edits, each an opcode byte and
// its argument bytes (see apply()); the input ends them. The files live in /dev/shm when it
// exists (no disk syncs per run).
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qkd/kms/key_store.hpp"
#include "qkd/test/store_file.hpp"

namespace {

using qkd::kms::Direction;
using qkd::kms::KeyAssignment;
namespace fs = std::filesystem;

const std::vector<std::uint8_t> kNodeKey(32, 0x5c);

// Each table's columns (the store's schema, sqlite_key_store.cpp).
struct Table {
  const char* name;
  std::vector<const char*> columns;
};
const std::array<Table, 8> kTables = {{
    {"meta", {"name", "value"}},
    {"pool", {"dir", "row", "sealed"}},
    {"assigned", {"key_id", "master", "slaves", "sealed"}},
    {"used_ids", {"key_id", "owners"}},
    {"waiting", {"ord", "assignment", "tag"}},
    {"outbox", {"seq", "message", "tag"}},
    {"pending_block", {"id", "block", "sealed"}},
    {"settled", {"pool_end", "t_ms", "tag"}},
}};
const std::array<const char*, 12> kMetaNames = {
    "committed_bytes", "cursor_0", "cursor_1",      "epoch",         "blocks",   "next_seq",
    "last_applied_seq", "format",  "unsynced_boot", "pool_digest",   "meta_tag", "key_check"};
const std::array<std::string, 4> kSaes = {"alice-app", "bob-app", "carol-app", "dave-app"};

// Pool bytes with no run of 16 zero bytes (each 8-byte group has a non-zero byte).
std::vector<std::uint8_t> pool_bytes(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  std::uint64_t x = 0x243F6A8885A308D3ULL;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    v[i] = static_cast<std::uint8_t>((x >> 33) | (i % 8 == 0 ? 1 : 0));
  }
  return v;
}

bool has_zero_run(std::span<const std::uint8_t> key) {
  std::size_t run = 0;
  for (const std::uint8_t b : key) {
    run = b == 0 ? run + 1 : 0;
    if (run >= 16) {
      return true;
    }
  }
  return false;
}

void remove_db(const std::string& path) {
  for (const char* suffix : {"", "-wal", "-shm"}) {
    ::unlink((path + suffix).c_str());
  }
}

// Removes the template directories of fuzzing processes that are gone: a run that ends in
// a crash, an abort or libFuzzer's own exit leaves its directory behind. Only directories
// of this user, named with a process ID that no longer runs, are touched.
void remove_stale_dirs(const fs::path& base, const std::string& prefix) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(base, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0) {
      continue;
    }
    const std::string rest = name.substr(prefix.size());
    const auto dash = rest.find('-');
    if (dash == 0 || dash == std::string::npos ||
        !std::all_of(rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(dash),
                     [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    const long pid = std::strtol(rest.substr(0, dash).c_str(), nullptr, 10);
    const bool gone = pid > 0 && ::kill(static_cast<pid_t>(pid), 0) == -1 && errno == ESRCH;
    struct stat st {};
    if (!gone || ::lstat(e.path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
        st.st_uid != ::getuid()) {
      continue;  // its process still runs, or not a directory of ours
    }
    fs::remove_all(e.path(), ec);
  }
}

// The template file, and the key_IDs it holds for a slave here (peer-assigned); its
// directory is removed at exit, and by a later run if this one ends without exiting.
struct Template {
  Template();
  Template(const Template&) = delete;
  Template& operator=(const Template&) = delete;
  ~Template() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string dir;
  std::string path;         // format 3, as the store writes it
  std::string legacy_path;  // the same as format 2 left it
  std::vector<std::pair<std::string, std::string>> held;     // (slave, key_ID)
  std::vector<std::pair<std::string, std::string>> fetched;  // (slave, key_ID): never again
};

Template::Template() {
  spdlog::set_level(spdlog::level::off);  // the store logs each refusal and discard
  Template& t = *this;
  const fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
  const std::string prefix = "qkd-store-file-fuzz-";
  remove_stale_dirs(base, prefix);
  std::string d = (base / fmt::format("{}{}-XXXXXX", prefix, ::getpid())).string();
  if (::mkdtemp(d.data()) == nullptr) {
    std::perror("mkdtemp");
    std::abort();
  }
  t.dir = d;
  t.path = d + "/template.db";
  auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, t.path, kNodeKey);
  if (!s.ok()) {
    std::fprintf(stderr, "template: %s\n", s.error().message.c_str());
    std::abort();
  }
  auto& store = *s.value();
  // 32 chunks and 20 bytes: alice's direction ends 20 bytes into its last chunk.
  const auto pool = pool_bytes(32 * 64 + 20);
  bool ok = store.start_epoch(7).ok() && store.commit_block(pool, 7, 1).ok();
  // Own keys delivered (alice's direction): used bytes up to 120, inside chunk 3; used_ids
  // with owners.
  for (int i = 0; ok && i < 3; ++i) {
    ok = store.allocate(kSaes[0], {kSaes[1]}, 1, 40).ok();
  }
  // Keys the peer assigned from bob's direction for slaves here: one plain, one multicast
  // that one of its slaves fetched, one fetched (delivered), one waiting for its bytes.
  auto assign = [](std::string id, std::uint64_t off, std::vector<std::string> slaves) {
    KeyAssignment a;
    a.key_id = std::move(id);
    a.direction = Direction::kBob;
    a.offset = off;
    a.length = 40;
    a.master_sae = kSaes[1];
    a.slave_saes = std::move(slaves);
    return a;
  };
  const std::string plain = "3f2d6c1e-8a4b-4c5d-9e6f-7a8b9c0d1e2f";
  const std::string multi = "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e";
  const std::string done = "7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a";
  const std::string waits = "9f0a1b2c-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
  ok = ok && store.apply_peer_notice(1, {assign(plain, 0, {kSaes[0]}),
                                         assign(multi, 40, {kSaes[0], kSaes[2]}),
                                         assign(done, 80, {kSaes[0]}),
                                         assign(waits, 4096, {kSaes[0]})})
                 .ok();
  ok = ok && store.take(kSaes[2], kSaes[1], {multi}, std::chrono::milliseconds(0)).ok() &&
       store.take(kSaes[0], kSaes[1], {done}, std::chrono::milliseconds(0)).ok();
  ok = ok && store.set_pending_block(qkd::kms::PendingBlock{2, qkd::core::SecureBytes(
                                                                   std::span(pool).first(64))})
                 .ok();
  if (!ok) {
    std::fprintf(stderr, "template: cannot fill the store\n");
    std::abort();
  }
  t.held = {{kSaes[0], plain}, {kSaes[0], multi}, {kSaes[0], waits}};
  t.fetched = {{kSaes[0], done}, {kSaes[2], multi}};
  s.value().reset();  // closed: checkpointed into one file
  t.legacy_path = d + "/template-2.db";
  fs::copy_file(t.path, t.legacy_path);
  if (const std::string e = qkd::test::down_to_format_2(t.legacy_path, kNodeKey); !e.empty()) {
    std::fprintf(stderr, "template: %s\n", e.c_str());
    std::abort();
  }
}

const Template& the_template() {
  static const Template t;
  return t;
}

class Run {
 public:
  Run(std::span<const std::uint8_t> in, const Template& t) : in_(in), t_(t) {}

  void run() {
    const std::string path = t_.dir + "/edited.db";
    remove_db(path);
    const std::uint8_t first = next();
    keys_per_request_ = 1 + first % 3;
    fs::copy_file((first / 3) % 2 == 0 ? t_.path : t_.legacy_path, path);
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
      std::abort();
    }
    while (pos_ < in_.size()) {
      apply();
    }
    sqlite3_close(db_);
    db_ = nullptr;
    serve(path);
    remove_db(path);
  }

 private:
  std::uint8_t next() { return pos_ < in_.size() ? in_[pos_++] : 0; }
  std::uint64_t next64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) {
      v = v << 8 | next();
    }
    return v;
  }
  std::string text(std::size_t max) {
    const std::size_t n = std::min<std::size_t>(next() % (max + 1), in_.size() - pos_);
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return s;
  }

  // Binds a value of the type the input picks: integer (small or any), text, blob, null.
  void bind_value(sqlite3_stmt* st, int i) {
    switch (next() % 6) {
      case 0:
        sqlite3_bind_int64(st, i, static_cast<sqlite3_int64>(next()) - 128);
        break;
      case 1:
        sqlite3_bind_int64(st, i, static_cast<sqlite3_int64>(next64()));
        break;
      case 2: {
        const std::string s = text(48);
        sqlite3_bind_text(st, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
        break;
      }
      case 3: {  // JSON-looking text, the shape the store's text columns hold
        static const std::array<const char*, 8> kJson = {
            R"(["alice-app"])", R"({"slaves":["alice-app","carol-app"],"fetched":[]})",
            R"({"slaves":[],"fetched":[1]})", R"([])", R"({"id":"x","dir":1,"off":18446744073709551615,"len":4294967295,"master":"bob-app","slaves":["alice-app"]})",
            R"({"id":"y","dir":0,"off":0,"len":32,"master":"","slaves":[]})", R"([1,2,3])", R"(null)"};
        const char* s = kJson[next() % kJson.size()];
        sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
        break;
      }
      case 4: {
        const std::string s = text(96);
        sqlite3_bind_blob(st, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
        break;
      }
      default:
        sqlite3_bind_null(st, i);
    }
  }

  void exec(const std::string& sql, bool bind_one) {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK) {
      return;
    }
    const int params = sqlite3_bind_parameter_count(st);
    for (int i = 1; i <= params && (bind_one || i == 1); ++i) {
      bind_value(st, i);
    }
    (void)sqlite3_step(st);  // constraint violations and the like: the edit is skipped
    sqlite3_finalize(st);
  }

  // One edit: 0 a meta value, 1 a column of a row, 2 a row deleted, 3 a row added, 4 a byte
  // of a sealed blob flipped. Rows are picked by their position in the table.
  void apply() {
    const std::uint8_t op = next() % 5;
    const Table& t = kTables[next() % kTables.size()];
    const unsigned k = next() % 8;
    const std::string nth = "(SELECT rowid FROM " + std::string(t.name) + " LIMIT 1 OFFSET " +
                            std::to_string(k) + ")";
    // meta and pool are WITHOUT ROWID: picked by their key instead.
    const bool no_rowid = t.name == std::string("meta") || t.name == std::string("pool");
    const std::string where =
        no_rowid ? (t.name == std::string("meta")
                        ? "name = (SELECT name FROM meta ORDER BY name LIMIT 1 OFFSET " +
                              std::to_string(k) + ")"
                        : "(dir, row) = (SELECT dir, row FROM pool ORDER BY dir, row LIMIT 1 "
                          "OFFSET " + std::to_string(k) + ")")
                 : "rowid = " + nth;
    switch (op) {
      case 0: {
        const std::string name = kMetaNames[next() % kMetaNames.size()];
        exec("INSERT OR REPLACE INTO meta(name, value) VALUES('" + name + "', ?1)", false);
        break;
      }
      case 1: {
        const char* col = t.columns[next() % t.columns.size()];
        exec("UPDATE " + std::string(t.name) + " SET " + col + " = ?1 WHERE " + where, false);
        break;
      }
      case 2:
        exec("DELETE FROM " + std::string(t.name) + " WHERE " + where, false);
        break;
      case 3: {
        std::string cols;
        std::string params;
        for (std::size_t i = 0; i < t.columns.size(); ++i) {
          cols += (i ? ", " : "") + std::string(t.columns[i]);
          params += (i ? ", ?" : "?") + std::to_string(i + 1);
        }
        exec("INSERT INTO " + std::string(t.name) + "(" + cols + ") VALUES(" + params + ")", true);
        break;
      }
      default: {
        // A byte of a sealed (or message) column xored with a non-zero value.
        const char* col = t.name == std::string("outbox") ? "message" : "sealed";
        if (std::find_if(t.columns.begin(), t.columns.end(), [&](const char* c) {
              return std::string(c) == col;
            }) == t.columns.end()) {
          break;
        }
        const unsigned at = next();
        const auto x = static_cast<std::uint8_t>(next() | 1);
        flip(std::string("SELECT ") + col + " FROM " + t.name + " WHERE " + where,
             std::string("UPDATE ") + t.name + " SET " + col + " = ?1 WHERE " + where, at, x);
      }
    }
  }

  // Reads one blob with `select`, xors its byte `at` (modulo its size) with `x`, writes it
  // back with `update`.
  void flip(const std::string& select, const std::string& update, unsigned at, std::uint8_t x) {
    std::vector<std::uint8_t> blob;
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db_, select.c_str(), -1, &st, nullptr) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
      const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
      blob.assign(b, b + sqlite3_column_bytes(st, 0));
    }
    sqlite3_finalize(st);
    if (blob.empty()) {
      return;
    }
    blob[at % blob.size()] ^= x;
    if (sqlite3_prepare_v2(db_, update.c_str(), -1, &st, nullptr) == SQLITE_OK) {
      sqlite3_bind_blob(st, 1, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
      (void)sqlite3_step(st);
    }
    sqlite3_finalize(st);
  }

  // Opens the edited file and serves from it; checks what it hands out.
  void serve(const std::string& path) {
    // As qkd-kms --convert-store opens it, so that a file of format 2 is checked and served,
    // not only refused as older (a format-3 file opens the same either way).
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, path, kNodeKey, true,
                                             qkd::kms::OlderFormat::kConvert);
    if (!s.ok()) {
      if (s.error().message.find(path) == std::string::npos) {
        std::fprintf(stderr, "refusal without the file's name: %s\n", s.error().message.c_str());
        std::abort();
      }
      return;
    }
    auto& store = *s.value();
    (void)store.stats();
    (void)store.pool_digest();
    (void)store.link_state();
    for (int i = 0; i < 4; ++i) {
      auto k = store.allocate(kSaes[0], {kSaes[1]}, keys_per_request_, 40);
      if (k.ok()) {
        for (const auto& key : k.value()) {
          handed_out(kSaes[0], key);
        }
      }
    }
    for (const auto& [slave, id] : t_.held) {
      auto k = store.take(slave, kSaes[1], {id}, std::chrono::milliseconds(0));
      if (k.ok()) {
        for (const auto& key : k.value()) {
          handed_out(slave, key);
        }
      }
    }
    for (const auto& [slave, id] : t_.fetched) {  // fetched before the edit: never again
      if (store.take(slave, kSaes[1], {id}, std::chrono::milliseconds(0)).ok()) {
        std::abort();
      }
    }
    KeyAssignment a;
    a.key_id = "0c1d2e3f-4a5b-4c6d-8e7f-8a9b0c1d2e3f";
    a.direction = Direction::kBob;
    a.offset = 120;
    a.length = 40;
    a.master_sae = kSaes[1];
    a.slave_saes = {kSaes[3]};
    (void)store.apply_peer_notice(2, {a});
    if (auto k = store.take(kSaes[3], kSaes[1], {a.key_id}, std::chrono::milliseconds(0));
        k.ok()) {
      for (const auto& key : k.value()) {
        handed_out(kSaes[3], key);
      }
    }
    (void)store.expire(std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
  }

  void handed_out(const std::string& sae, const qkd::kms::DeliveredKey& k) {
    if (!given_.emplace(sae, k.key_id).second) {
      std::abort();  // the same key_ID twice to one SAE
    }
    if (has_zero_run(k.key.span())) {
      std::abort();  // used (wiped) bytes served as a key
    }
  }

  std::span<const std::uint8_t> in_;
  std::size_t pos_ = 0;
  const Template& t_;
  sqlite3* db_ = nullptr;
  std::uint32_t keys_per_request_ = 1;
  std::set<std::pair<std::string, std::string>> given_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 2048) {
    return 0;
  }
  Run(std::span<const std::uint8_t>(data, size), the_template()).run();
  return 0;
}
