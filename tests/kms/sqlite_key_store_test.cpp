// Durable key store: node key file checks, state surviving a reopen, sealing at rest,
// concurrent consumption (group commit) without repeats.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <set>
#include <span>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <sstream>

#include "qkd/kms/api.hpp"
#include "qkd/kms/config.hpp"
#include "qkd/kms/key_store.hpp"
#include "qkd/test/kme_config.hpp"
#include "qkd/test/scoped_env.hpp"
#include "qkd/test/scratch_dir.hpp"
#include "qkd/test/store_file.hpp"

namespace {

using namespace std::chrono_literals;
using qkd::core::ErrorCode;
using qkd::kms::Direction;
using qkd::kms::KeyAssignment;
using qkd::kms::KeyStore;
using qkd::kms::OlderFormat;
using qkd::kms::ApiResponse;
using qkd::kms::StoredNotice;

// Pseudo-random test bytes (splitmix64): no two 16-byte windows repeat.
std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  std::uint64_t x = seed;
  for (std::size_t i = 0; i < n; ++i) {
    if (i % 8 == 0) {
      x += 0x9e3779b97f4a7c15ULL;
    }
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    v[i] = static_cast<std::uint8_t>(z >> (8 * (i % 8)));
  }
  return v;
}

// A fresh folder per test, removed at its end.
class TempDir {
 public:
  [[nodiscard]] std::string file(const std::string& name) const { return (dir_ / name).string(); }

 private:
  qkd::test::ScratchDir dir_{"store-test"};
};

void write_file(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, mode);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  ::close(fd);
  ::chmod(path.c_str(), mode);
}

const std::vector<std::uint8_t> kNodeKey(32, 0x42);

std::unique_ptr<KeyStore> open_store(const std::string& db, Direction own = Direction::kAlice,
                                     const std::vector<std::uint8_t>& key = kNodeKey,
                                     OlderFormat older = OlderFormat::kRefuse) {
  auto s = qkd::kms::make_sqlite_key_store(own, db, key, true, older);
  EXPECT_TRUE(s.ok()) << s.error().message;
  return s.ok() ? std::move(s.value()) : nullptr;
}

TEST(NodeKeyFile, OwnerOnlyAndWellFormed) {
  TempDir dir;
  const std::string f = dir.file("node.key");
  write_file(f, std::string(64, 'a') + "\n", 0644);
  auto r = qkd::kms::read_node_key_file(f);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find(f), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("owner only"), std::string::npos) << r.error().message;
  ::chmod(f.c_str(), 0600);
  r = qkd::kms::read_node_key_file(f);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->size(), 32u);
  EXPECT_EQ((*r)[0], 0xaa);
  write_file(f, std::string(32, '\x07'), 0400);  // raw bytes
  r = qkd::kms::read_node_key_file(f);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ((*r)[31], 7);
  write_file(f, "too short", 0600);
  EXPECT_FALSE(qkd::kms::read_node_key_file(f).ok());
  EXPECT_FALSE(qkd::kms::read_node_key_file(dir.file("missing.key")).ok());
}

// AES-256-GCM under kNodeKey as the store seals a row (qkd/test/store_file.hpp); for the
// format-1 test below. Opening a value that does not authenticate fails the test.
std::vector<std::uint8_t> gcm(bool seal, const std::string& aad, std::span<const std::uint8_t> in) {
  auto out = qkd::test::store_gcm(seal, kNodeKey, aad, in);
  EXPECT_TRUE(out.has_value()) << "row " << aad;
  return out.value_or(std::vector<std::uint8_t>{});
}

// Runs `sql` on the closed store file `db` (to damage or age it as a test needs).
void exec_sql(const std::string& db, const std::string& sql) {
  sqlite3* h = nullptr;
  ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
  char* err = nullptr;
  EXPECT_EQ(sqlite3_exec(h, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK)
      << sql << ": " << (err ? err : "");
  sqlite3_free(err);
  sqlite3_close(h);
}

// A new store at `db` whose first block (epoch 1) is `pool`.
std::unique_ptr<KeyStore> store_with_block(const std::string& db,
                                           const std::vector<std::uint8_t>& pool) {
  auto s = open_store(db);
  EXPECT_NE(s, nullptr);
  if (s) {
    EXPECT_TRUE(s->commit_block(pool, 1, 1).ok());
  }
  return s;
}

// Rewrites a closed store file as format 2 left it (qkd/test/store_file.hpp).
void down_to_format_2(const std::string& db) {
  ASSERT_EQ(qkd::test::down_to_format_2(db, kNodeKey), "");
}

// Rewrites a closed store file's pool as format 1 kept it: table chunks, one row per unused
// 32-byte chunk sealed as "qkd-kms/chunk/<dir>/<idx>", meta.format = 1.
void down_to_format_1(const std::string& db) {
  down_to_format_2(db);
  sqlite3* h = nullptr;
  ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
  auto exec = [&](const std::string& sql) {
    char* err = nullptr;
    EXPECT_EQ(sqlite3_exec(h, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK) << (err ? err : "");
    sqlite3_free(err);
  };
  struct Chunk {
    int dir;
    std::uint64_t idx;
    std::vector<std::uint8_t> sealed;
  };
  std::vector<Chunk> chunks;
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(h, "SELECT dir, row, sealed FROM pool", -1, &st, nullptr), SQLITE_OK);
  while (sqlite3_step(st) == SQLITE_ROW) {
    const int dir = sqlite3_column_int(st, 0);
    const auto row = static_cast<std::uint64_t>(sqlite3_column_int64(st, 1));
    const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 2));
    const auto plain = gcm(false, fmt::format("qkd-kms/pool/{}/{}", dir, row),
                           {b, static_cast<std::size_t>(sqlite3_column_bytes(st, 2))});
    for (std::size_t k = 0; k * 32 < plain.size(); ++k) {
      const std::span<const std::uint8_t> c(plain.data() + k * 32, 32);
      if (std::all_of(c.begin(), c.end(), [](std::uint8_t x) { return x == 0; })) {
        continue;  // used up: format 1 had deleted it
      }
      const std::uint64_t idx = row * 8 + k;
      chunks.push_back({dir, idx, gcm(true, fmt::format("qkd-kms/chunk/{}/{}", dir, idx), c)});
    }
  }
  sqlite3_finalize(st);
  exec("BEGIN; DROP TABLE pool; CREATE TABLE chunks(dir INTEGER NOT NULL, idx INTEGER NOT NULL,"
       " sealed BLOB NOT NULL, PRIMARY KEY(dir, idx)) WITHOUT ROWID;"
       " UPDATE meta SET value = 1 WHERE name = 'format'");
  ASSERT_EQ(sqlite3_prepare_v2(h, "INSERT INTO chunks VALUES(?, ?, ?)", -1, &st, nullptr), SQLITE_OK);
  for (const auto& c : chunks) {
    sqlite3_bind_int(st, 1, c.dir);
    sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(c.idx));
    sqlite3_bind_blob(st, 3, c.sealed.data(), static_cast<int>(c.sealed.size()), SQLITE_STATIC);
    EXPECT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_reset(st);
  }
  sqlite3_finalize(st);
  exec("COMMIT");
  sqlite3_close(h);
}

// The pool rows of direction `dir` as stored, opened: row -> plaintext.
std::map<std::uint64_t, std::vector<std::uint8_t>> pool_rows(const std::string& db, int dir) {
  std::map<std::uint64_t, std::vector<std::uint8_t>> out;
  sqlite3* h = nullptr;
  EXPECT_EQ(sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(h, "SELECT row, sealed FROM pool WHERE dir = ?", -1, &st, nullptr),
            SQLITE_OK);
  sqlite3_bind_int(st, 1, dir);
  while (sqlite3_step(st) == SQLITE_ROW) {
    const auto row = static_cast<std::uint64_t>(sqlite3_column_int64(st, 0));
    const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 1));
    out[row] = gcm(false, fmt::format("qkd-kms/pool/{}/{}", dir, row),
                   {b, static_cast<std::size_t>(sqlite3_column_bytes(st, 1))});
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  return out;
}

// meta.format of a closed store file, and whether it still has the format-1 table.
std::pair<int, bool> format_of(const std::string& db) {
  sqlite3* h = nullptr;
  EXPECT_EQ(sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* q = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(h, "SELECT (SELECT value FROM meta WHERE name = 'format'),"
                               " (SELECT COUNT(*) FROM sqlite_master WHERE name = 'chunks')",
                               -1, &q, nullptr),
            SQLITE_OK);
  EXPECT_EQ(sqlite3_step(q), SQLITE_ROW);
  const std::pair<int, bool> r{sqlite3_column_int(q, 0), sqlite3_column_int(q, 1) == 1};
  sqlite3_finalize(q);
  sqlite3_close(h);
  return r;
}

// A file of format 1 (one row per pool chunk) is converted when opened for conversion
// (qkd-kms --convert-store): every unused byte of both directions is still there, in order,
// and the old table is gone. A KME that may not open the file (wrong node key, other end of
// the link) leaves it as it was, and so does one not asked to convert it.
TEST(SqliteKeyStore, AFormat1FileIsConvertedWithItsPoolIntact) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 40, 3);  // 20 chunks per direction: rows of 8, 8 and 4
  {
    auto s = store_with_block(db, pool);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 3, 32).ok());  // alice's chunks 0-2 used
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, 16).ok());  // and half of chunk 3
  }
  down_to_format_1(db);
  EXPECT_FALSE(qkd::kms::make_sqlite_key_store(Direction::kAlice, db,
                                               std::vector<std::uint8_t>(32, 0x43))
                   .ok());
  EXPECT_FALSE(qkd::kms::make_sqlite_key_store(Direction::kBob, db, kNodeKey).ok());
  auto unasked = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey);
  ASSERT_FALSE(unasked.ok()) << "a file of format 1 was converted unasked";
  EXPECT_NE(unasked.error().message.find(db + " is a key store of format 1, an earlier build's: "
                                         "convert it once with `qkd-kms --config <file> "
                                         "--convert-store`"),
            std::string::npos)
      << unasked.error().message;
  EXPECT_EQ(format_of(db), (std::pair<int, bool>{1, true})) << "a refused open changed it";
  auto s = open_store(db, Direction::kAlice, kNodeKey, OlderFormat::kConvert);
  ASSERT_NE(s, nullptr);
  // Alice's direction holds the even chunks of the pool: chunk i of hers is chunk 2i.
  auto half = s->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(half.ok()) << half.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(
      half->front().key.span(),
      std::vector<std::uint8_t>(pool.begin() + 64 * 3 + 16, pool.begin() + 64 * 3 + 32)));
  for (std::size_t i = 4; i < 20; ++i) {
    auto k = s->allocate("alice", {"bob"}, 1, 32);
    ASSERT_TRUE(k.ok()) << k.error().message;
    const std::vector<std::uint8_t> expect(pool.begin() + 64 * i, pool.begin() + 64 * i + 32);
    EXPECT_TRUE(qkd::core::constant_time_equal(k->front().key.span(), expect)) << "chunk " << i;
  }
  // Bob's direction (the odd chunks), all of it as one peer key.
  KeyAssignment a{"11111111-2222-4333-8444-555555555555", Direction::kBob, 0, 20 * 32, "bob",
                  {"alice"}, false};
  ASSERT_TRUE(s->apply_peer_notice(1, {a}).ok());
  auto peer = s->take("alice", "bob", {a.key_id}, 0ms);
  ASSERT_TRUE(peer.ok()) << peer.error().message;
  std::vector<std::uint8_t> odd;
  for (std::size_t c = 1; c < 40; c += 2) {
    odd.insert(odd.end(), pool.begin() + 32 * c, pool.begin() + 32 * c + 32);
  }
  EXPECT_TRUE(qkd::core::constant_time_equal(peer->front().key.span(), odd));
  s.reset();
  EXPECT_EQ(format_of(db), (std::pair<int, bool>{3, false}));
}

// Delivered bytes leave the pool rows with their delivery: no row wholly below the cursor,
// and in the cursor's row every byte below the cursor is zero, whether the cursor stops
// inside a chunk, on a chunk boundary, on a row boundary or at the end of the pool.
TEST(SqliteKeyStore, DeliveredBytesLeaveThePoolRows) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 40, 5);  // alice: 20 chunks, 640 bytes
  std::uint64_t cursor = 0;
  ASSERT_NE(store_with_block(db, pool), nullptr);
  for (const std::uint32_t step : {16u, 16u, 32u * 7, 32u * 9 + 8, 32u * 3 - 8}) {
    {
      auto s = open_store(db);
      ASSERT_NE(s, nullptr);
      ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, step).ok()) << "step " << step;
    }
    cursor += step;  // 16 (in a chunk), 32 (chunk), 256 (row), 552, 640 (the end)
    const auto rows = pool_rows(db, 0);
    for (const auto& [row, bytes] : rows) {
      EXPECT_GE(row, cursor / 256) << "a used row is left, cursor " << cursor;
      for (std::size_t i = 0; i < bytes.size(); ++i) {
        if (row * 256 + i < cursor) {
          EXPECT_EQ(bytes[i], 0) << "used byte " << row * 256 + i << " left, cursor " << cursor;
        }
      }
    }
  }
  EXPECT_TRUE(pool_rows(db, 0).empty()) << "every alice byte used";
  EXPECT_EQ(pool_rows(db, 1).size(), 3u);  // bob's: untouched, rows of 8, 8 and 4 chunks
}

// A pool row deleted from the file (or lost to damage) is refused at open, naming the row,
// instead of being served as zero bytes. Rows below the cursor are gone legitimately.
TEST(SqliteKeyStore, AMissingPoolRowIsRefusedAtOpen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 40, 7);  // 20 chunks per direction: rows of 8, 8 and 4
  {
    auto s = store_with_block(db, pool);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, 32 * 9).ok());  // alice's row 0 dropped
  }
  ASSERT_TRUE(qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey).ok());
  // Alice's last row, and a row in the middle of bob's direction.
  for (const auto& [d, row] : {std::pair{0, 2}, std::pair{1, 1}}) {
    const std::string copy = dir.file(fmt::format("damaged-{}-{}.db", d, row));
    std::filesystem::copy_file(db, copy);
    const auto row_id = static_cast<std::uint64_t>(row);
    ASSERT_TRUE(pool_rows(copy, d).contains(row_id));
    exec_sql(copy, fmt::format("DELETE FROM pool WHERE dir = {} AND row = {}", d, row));
    ASSERT_FALSE(pool_rows(copy, d).contains(row_id));
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, copy, kNodeKey);
    ASSERT_FALSE(s.ok()) << "row " << d << "/" << row << " deleted, yet the store opened";
    EXPECT_NE(s.error().message.find(fmt::format("pool row {}/{} is missing", d, row)),
              std::string::npos)
        << s.error().message;
  }
}

// Every row of a store file is sealed or tagged under the node key with its identity
// (format 3): an edited counter, waiting assignment, unacknowledged notice or commit time
// makes the store refuse to open, naming the file, as an edited key does; so does a file
// passed off as an earlier format. A file of format 2 (counters in the clear) is checked for
// what an edit would make it serve: a cursor edited past its direction's end (or the
// committed end below a cursor) would make the pool look larger than it holds, and one
// edited back would serve used bytes (wiped: zeros) as keys. fuzz/store_file_fuzz.cpp tries
// edits of every column.
TEST(SqliteKeyStore, AnEditedFileIsRefusedAtOpen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 40, 7);  // 640 bytes per direction
  {
    std::uint64_t seq = 0;  // before the store: its hooks refer to it
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    s->set_notice_hooks(
        [&](const std::vector<KeyAssignment>& as) {
          const std::string text = "to bob: " + as.front().key_id;
          return StoredNotice{++seq, std::vector<std::uint8_t>(text.begin(), text.end())};
        },
        [](std::uint64_t) {});
    s->set_max_age(std::chrono::seconds(3600));  // the blocks' commit times are kept
    ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, 32 * 3).ok());  // an unacknowledged notice
    // The peer assigns a key from bytes not committed yet: it waits for them.
    KeyAssignment a;
    a.key_id = "9f0a1b2c-3d4e-4f5a-8b6c-7d8e9f0a1b2c";
    a.direction = Direction::kBob;
    a.offset = 4096;
    a.length = 32;
    a.master_sae = "bob";
    a.slave_saes = {"alice"};
    ASSERT_TRUE(s->apply_peer_notice(1, {a}).ok());
    ASSERT_EQ(s->stats().pending_notices, 1u);
  }
  for (const char* table : {"outbox", "waiting", "settled"}) {
    int rows = 0;
    sqlite3* h = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
    sqlite3_exec(
        h, fmt::format("SELECT COUNT(*) FROM {} WHERE tag IS NOT NULL", table).c_str(),
        [](void* n, int, char** v, char**) {
          *static_cast<int*>(n) = std::atoi(v[0]);
          return 0;
        },
        &rows, nullptr);
    sqlite3_close(h);
    EXPECT_GE(rows, 1) << "no tagged row in " << table << " to edit";
  }
  struct Edit {
    std::string what, sql, error;
  };
  const std::string counters = "its counters (table meta) do not authenticate";
  const std::vector<Edit> edits = {
      {"cursor_0", "UPDATE meta SET value = 672 WHERE name = 'cursor_0'", counters},
      {"cursor_0_by_1", "UPDATE meta SET value = 95 WHERE name = 'cursor_0'", counters},
      {"cursor_1", "INSERT OR REPLACE INTO meta(name, value) VALUES('cursor_1', 100000)",
       counters},
      {"committed", "UPDATE meta SET value = 64 WHERE name = 'committed_bytes'", counters},
      {"as_text", "UPDATE meta SET value = CAST(value AS TEXT) WHERE name = 'epoch'", counters},
      {"tag", "DELETE FROM meta WHERE name = 'meta_tag'", counters},
      {"format_2", "UPDATE meta SET value = 2 WHERE name = 'format'",
       "its format (2) is not the one its key check was sealed for"},
      {"waiting", "UPDATE waiting SET assignment = replace(assignment, 'alice', 'mallory')",
       "the assignment waiting as"},
      {"outbox", "UPDATE outbox SET message = CAST(replace(CAST(message AS TEXT), 'bob', 'eve')"
                 " AS BLOB)",
       "notice 1 does not authenticate"},
      {"settled", "UPDATE settled SET t_ms = t_ms + 86400000", "commit time of pool byte"},
      // Code in the schema: a trigger could undo the store's own writes (here: keep the
      // cursor where it was) inside the transactions whose tags vouch for them.
      {"trigger",
       "CREATE TRIGGER keep_cursor BEFORE UPDATE ON meta WHEN NEW.name = 'cursor_0' "
       "BEGIN SELECT RAISE(IGNORE); END",
       "it holds the trigger 'keep_cursor', which a key store never has"},
      {"view", "CREATE VIEW v AS SELECT 1", "it holds the view 'v'"},
      {"index", "CREATE INDEX i ON used_ids(key_id)", "it holds the index 'i'"},
      // Not a new file either (found by fuzz/store_file_fuzz.cpp: the store tried to create
      // its meta rows again and failed on SQLite's "UNIQUE constraint failed").
      {"format", "DELETE FROM meta WHERE name = 'format'", "its format is not recorded"},
      {"meta", "DELETE FROM meta", "its format is not recorded"},
  };
  // Opened as qkd-kms --convert-store opens it: a file of format 2 is checked, not only
  // refused as older.
  auto refused = [&](const std::string& copy, const std::string& what, const std::string& error) {
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, copy, kNodeKey, true,
                                             OlderFormat::kConvert);
    ASSERT_FALSE(s.ok()) << what << " edited, yet the store opened";
    EXPECT_NE(s.error().message.find(copy), std::string::npos) << s.error().message;
    EXPECT_NE(s.error().message.find(error), std::string::npos) << s.error().message;
  };
  for (const auto& e : edits) {
    const std::string copy = dir.file("edited-" + e.what + ".db");
    std::filesystem::copy_file(db, copy);
    exec_sql(copy, e.sql);
    refused(copy, e.what, e.error);
  }
  // Rows of another pool epoch: the epoch edited and the counters' tag made again over it
  // (qkd/test/store_file.hpp, as the store makes it), as a copy of the file from another
  // epoch would hold it. The waiting assignment, tagged with its own epoch, no longer opens;
  // retagged without an edit, the file opens.
  {
    const std::string copy = dir.file("edited-epoch.db");
    std::filesystem::copy_file(db, copy);
    exec_sql(copy, "UPDATE meta SET value = value + 1 WHERE name = 'epoch'");
    ASSERT_EQ(qkd::test::retag_meta(copy, kNodeKey), "");
    refused(copy, "epoch", "the assignment waiting as");
    const std::string same = dir.file("retagged.db");
    std::filesystem::copy_file(db, same);
    ASSERT_EQ(qkd::test::retag_meta(same, kNodeKey), "");
    EXPECT_NE(open_store(same), nullptr);
  }
  // The file itself still opens, with what was left.
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->stats().own_available_bytes, 640u - 96u);
  }

  // Format 2: the counters in the clear, checked against what the pool rows hold.
  const std::string legacy = dir.file("format-2.db");
  std::filesystem::copy_file(db, legacy);
  down_to_format_2(legacy);
  const std::vector<Edit> legacy_edits = {
      {"cursor_0", "UPDATE meta SET value = 672 WHERE name = 'cursor_0'", "past its end"},
      {"cursor_1", "INSERT OR REPLACE INTO meta(name, value) VALUES('cursor_1', 100000)",
       "past its end"},
      {"committed", "UPDATE meta SET value = 64 WHERE name = 'committed_bytes'",
       "past its end"},
      // Back by one key, and back to the start: the used bytes are still in row 0, wiped.
      {"cursor_0_back", "UPDATE meta SET value = 64 WHERE name = 'cursor_0'",
       "holds used (wiped) bytes at byte 64, past its cursor at byte 64"},
      {"cursor_0_start", "UPDATE meta SET value = 0 WHERE name = 'cursor_0'",
       "holds used (wiped) bytes at byte 0"},
      // Format 3's key check on a file that says format 2.
      {"format_3", "UPDATE meta SET value = 3 WHERE name = 'format'",
       "its format (3) is not the one its key check was sealed for"},
  };
  for (const auto& e : legacy_edits) {
    const std::string copy = dir.file("edited-2-" + e.what + ".db");
    std::filesystem::copy_file(legacy, copy);
    exec_sql(copy, e.sql);
    refused(copy, "format 2, " + e.what, e.error);
  }
  // Unedited, it is refused unless asked to convert it; converted, an edit of its counters
  // is refused.
  {
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, legacy, kNodeKey);
    ASSERT_FALSE(s.ok()) << "a file of format 2 was converted unasked";
    EXPECT_NE(s.error().message.find("is a key store of format 2"), std::string::npos)
        << s.error().message;
  }
  {
    auto s = open_store(legacy, Direction::kAlice, kNodeKey, OlderFormat::kConvert);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->stats().own_available_bytes, 640u - 96u);
    EXPECT_EQ(s->stats().pending_notices, 1u);
  }
  EXPECT_EQ(format_of(legacy).first, 3);
  exec_sql(legacy, "UPDATE meta SET value = 64 WHERE name = 'cursor_0'");
  refused(legacy, "converted, cursor_0", counters);

  // Keys that do not end on a chunk: three of 40 bytes leave the cursor at 120, inside
  // chunk 3. Moved back to 81, the wiped bytes 81-119 span two chunks, neither of them wholly.
  const std::string odd = dir.file("odd.db");
  {
    auto t = store_with_block(odd, pool);
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(t->allocate("alice", {"bob"}, 3, 40).ok());
  }
  down_to_format_2(odd);
  exec_sql(odd, "UPDATE meta SET value = 81 WHERE name = 'cursor_0'");
  refused(odd, "format 2, cursor_0 back by 39 bytes", "holds used (wiped) bytes at byte 81");
}

// The store's view of this host's boot (QKD_KMS_BOOT_ID) for one scope.
qkd::test::ScopedEnv boot_id(const std::string& id) { return {"QKD_KMS_BOOT_ID", id}; }

// What a crash of the KME leaves of the open store `db`: its file and WAL as the page cache
// holds them now.
void copy_open_store(const std::string& db, const std::string& copy) {
  std::filesystem::copy_file(db, copy);
  if (std::filesystem::exists(db + "-wal")) {
    std::filesystem::copy_file(db + "-wal", copy + "-wal");
  }
}

// With store.synchronous = "normal" a store left open (a crash of the KME) is whole when it
// is reopened under the same boot. Under another boot (a power loss or an OS crash may have
// undone its last commits, and with them the record of keys delivered) it discards its pool
// and its undelivered keys, so nothing it held can be served again, and starts without an
// epoch (the link then starts a new pool with the peer). A store closed cleanly, or written
// with FULL, is whole across a reboot.
TEST(SqliteKeyStore, NormalStoreLeftOpenAcrossARebootDiscardsItsPool) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const std::string full_db = dir.file("full.db");
  const std::string id = "6f1c2a0e-55d4-4a43-9c1e-2b7f0c9d4e11";
  const auto pool = pattern(32 * 16, 11);  // 8 chunks per direction
  auto open_normal = [&](const std::string& file) {
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, file, kNodeKey, false);
    EXPECT_TRUE(s.ok()) << s.error().message;
    return s.ok() ? std::move(s.value()) : nullptr;
  };
  {
    const auto boot = boot_id("boot-a");
    auto s = open_normal(db);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, 32).ok());
    ASSERT_TRUE(s->apply_peer_notice(1, {KeyAssignment{id, Direction::kBob, 0, 32, "bob",
                                                       {"alice"}, false}})
                    .ok());
    s->drain();
    copy_open_store(db, dir.file("crash-same-boot.db"));
    copy_open_store(db, dir.file("crash-new-boot.db"));
    auto full = store_with_block(full_db, pool);
    ASSERT_NE(full, nullptr);
    copy_open_store(full_db, dir.file("full-crash.db"));
  }  // both closed cleanly
  auto expect_epoch = [&](const std::string& file, std::uint64_t epoch, const std::string& what) {
    auto s = open_store(file);
    ASSERT_NE(s, nullptr) << what;
    EXPECT_EQ(s->link_state().epoch, epoch) << what;
    EXPECT_EQ(s->stats().committed_bytes, epoch == 0 ? 0 : pool.size()) << what;
  };
  {
    const auto boot = boot_id("boot-a");
    auto s = open_store(dir.file("crash-same-boot.db"));  // FULL from now on
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->link_state().epoch, 1u);
    EXPECT_EQ(s->stats().own_available_bytes, 32u * 8 - 32);
    EXPECT_EQ(s->stats().assigned_keys_waiting, 1u);
  }
  {
    const auto boot = boot_id("boot-b");
    expect_epoch(dir.file("crash-same-boot.db"), 1, "left open, reopened with FULL in its boot");
    expect_epoch(db, 1, "closed cleanly");
    expect_epoch(dir.file("full-crash.db"), 1, "written with FULL, left open");
    // Discarded under another boot, and from then on recorded under this one.
    auto s = open_normal(dir.file("crash-new-boot.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->link_state().epoch, 0u);
    EXPECT_FALSE(s->link_state().digest.has_value());
    const auto st = s->stats();
    EXPECT_EQ(st.committed_bytes, 0u);
    EXPECT_EQ(st.own_available_bytes, 0u);
    EXPECT_EQ(st.peer_available_bytes, 0u);
    EXPECT_EQ(st.assigned_keys_waiting, 0u);
    EXPECT_EQ(s->take("alice", "bob", {id}, 0ms).error().code, ErrorCode::kInvalidArgument);
    EXPECT_TRUE(pool_rows(dir.file("crash-new-boot.db"), 0).empty());
    EXPECT_TRUE(pool_rows(dir.file("crash-new-boot.db"), 1).empty());
    ASSERT_TRUE(s->commit_block(pool, 2, 1).ok());
    copy_open_store(dir.file("crash-new-boot.db"), dir.file("crash-b.db"));
  }
  {
    // Reopened with NORMAL in the boot it was left open in: whole, and still recorded.
    const auto boot = boot_id("boot-b");
    auto s = open_normal(dir.file("crash-b.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->link_state().epoch, 2u);
    copy_open_store(dir.file("crash-b.db"), dir.file("crash-b-again.db"));
  }
  const auto boot = boot_id("boot-c");
  expect_epoch(dir.file("crash-b-again.db"), 0, "left open twice in boot b, opened in boot c");
}

// With store.synchronous = "full" a dec_keys delivery is durable once written to the file
// (a crash of the KME keeps it) and its key's notice synced: it waits for no sync of its
// own. A power loss or an OS crash may undo it, so a store left open under another boot
// discards the keys the peer assigned that it still held (none is served twice; the pool
// and the link are kept). Under the same boot (the KME crashed) nothing is lost.
TEST(SqliteKeyStore, FullDeliveriesWaitForNoSyncAndAReBootDiscardsWaitingKeys) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 16, 12);
  const std::vector<std::string> ids = {"0b6c1f3e-7a2d-4c55-9e1a-4d2f8b3c6a01",
                                        "0b6c1f3e-7a2d-4c55-9e1a-4d2f8b3c6a02",
                                        "0b6c1f3e-7a2d-4c55-9e1a-4d2f8b3c6a03"};
  auto taken = [](KeyStore& s, const std::string& id) {
    return s.take("alice", "bob", {id}, 0ms).ok();
  };
  {
    const auto boot = boot_id("boot-a");
    auto s = open_store(db);  // FULL, the default
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
    std::vector<KeyAssignment> notice;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      notice.push_back(KeyAssignment{ids[i], Direction::kBob, 32 * i, 32, "bob", {"alice"}, false});
    }
    ASSERT_TRUE(s->apply_peer_notice(1, notice).ok());
    const auto syncs = s->stats().store_syncs.count;
    EXPECT_GT(syncs, 0u) << "the notice was not synced";
    const auto writes = s->stats().request_commits.count;
    EXPECT_TRUE(taken(*s, ids[0]));
    EXPECT_TRUE(taken(*s, ids[1]));
    EXPECT_EQ(s->stats().request_commits.count, writes + 2) << "each delivery is written";
    EXPECT_EQ(s->stats().store_syncs.count, syncs) << "a delivery waited for a sync";
    copy_open_store(db, dir.file("crash-same-boot.db"));
    copy_open_store(db, dir.file("crash-new-boot.db"));
  }  // closed cleanly
  {
    const auto boot = boot_id("boot-a");
    auto s = open_store(dir.file("crash-same-boot.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->stats().assigned_keys_waiting, 1u);
    EXPECT_FALSE(taken(*s, ids[0])) << "delivered twice after a crash of the KME";
    EXPECT_FALSE(taken(*s, ids[1])) << "delivered twice after a crash of the KME";
    EXPECT_TRUE(taken(*s, ids[2])) << "lost in a crash of the KME";
  }
  const auto boot = boot_id("boot-b");
  {
    auto s = open_store(dir.file("crash-new-boot.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->link_state().epoch, 1u);
    EXPECT_EQ(s->stats().committed_bytes, pool.size());
    EXPECT_EQ(s->stats().assigned_keys_waiting, 0u);
    for (const auto& id : ids) {
      EXPECT_TRUE(s->delivered_any({id})) << id << ": a dec_keys would wait for it";
      const auto r = s->take("alice", "bob", {id}, 0ms);
      ASSERT_FALSE(r.ok()) << id << " served after a reboot";
      EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
    }
    EXPECT_EQ(s->stats().peer_available_bytes, pool.size() / 2 - 3 * 32);
    EXPECT_TRUE(s->link_state().assigned_lost) << "the peer is not told";
  }
  {
    // Told until the link says the peer knows.
    auto s = open_store(dir.file("crash-new-boot.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_TRUE(s->link_state().assigned_lost);
    ASSERT_TRUE(s->clear_assigned_lost().ok());
  }
  {
    auto s = open_store(dir.file("crash-new-boot.db"));
    ASSERT_NE(s, nullptr);
    EXPECT_FALSE(s->link_state().assigned_lost);
  }
  {
    // Closed cleanly: whole across the reboot.
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->stats().assigned_keys_waiting, 1u);
    EXPECT_FALSE(s->link_state().assigned_lost);
  }
  // A failed sync of the WAL (a write-back error may have dropped the unsynced deliveries
  // from the page cache, which a restart in the same boot would trust) leaves a file beside
  // the store: the next open discards the assigned keys as after a reboot, and removes it.
  std::ofstream(db + ".sync-failed").close();
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->stats().assigned_keys_waiting, 0u);
    EXPECT_FALSE(taken(*s, ids[2]));
    EXPECT_TRUE(s->link_state().assigned_lost);
    EXPECT_EQ(s->link_state().epoch, 1u);
  }
  EXPECT_FALSE(std::filesystem::exists(db + ".sync-failed"));
}

// The store syncs the file at start (a run with "full" syncs what an earlier run left in the
// page cache) through descriptors that keep SQLite's locks: closing a descriptor of the
// database opened for it would drop the SHARED lock the store's WAL-mode connection holds
// on the file for its lifetime, and another process could then take the file out of WAL
// mode (checkpointing and deleting the WAL the store writes to).
TEST(SqliteKeyStore, AnOpenStoreKeepsItsLockOnTheFile) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  auto s = open_store(db);  // full
  ASSERT_NE(s, nullptr);
  // A fresh process (a forked child would share this one's SQLite lock bookkeeping): exits
  // 1 if it could switch the file to journal_mode DELETE.
  const char* script =
      "import sqlite3, sys\n"
      "c = sqlite3.connect(sys.argv[1], timeout=0)\n"
      "try:\n"
      "    mode = c.execute('PRAGMA journal_mode=DELETE').fetchone()[0]\n"
      "except sqlite3.OperationalError:\n"
      "    mode = 'refused'\n"
      "sys.exit(1 if mode == 'delete' else 0)\n";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execlp("python3", "python3", "-c", script, db.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_NE(WEXITSTATUS(status), 127) << "python3 did not run";
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "another process took the open store's file out of WAL mode";
  EXPECT_TRUE(std::filesystem::exists(db + "-wal"));
}

// The pool digest follows the epoch and each committed block, survives a reopen, and is not
// known for a file written before digests were kept (until its next epoch).
TEST(SqliteKeyStore, PoolDigestChainsBlocksAndSurvivesReopen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto b1 = pattern(96, 1);
  const auto b2 = pattern(64, 2);
  auto expect = qkd::kms::next_pool_digest(
      qkd::kms::next_pool_digest(qkd::kms::first_pool_digest(5), 1, b1), 2, b2);
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_FALSE(s->pool_digest().has_value()) << "a new store has no pool yet";
    ASSERT_TRUE(s->start_epoch(5).ok());
    EXPECT_EQ(s->pool_digest(), qkd::kms::first_pool_digest(5));
    ASSERT_TRUE(s->commit_block(b1, 5, 1).ok());
    ASSERT_TRUE(s->commit_block(b2, 5, 2).ok());
    EXPECT_EQ(s->pool_digest(), expect);
  }
  // Other bytes, another block number or another epoch give another digest.
  EXPECT_NE(expect, qkd::kms::next_pool_digest(
                        qkd::kms::next_pool_digest(qkd::kms::first_pool_digest(5), 1, b1), 2, b1));
  EXPECT_NE(expect, qkd::kms::next_pool_digest(
                        qkd::kms::next_pool_digest(qkd::kms::first_pool_digest(5), 1, b1), 3, b2));
  EXPECT_NE(expect, qkd::kms::next_pool_digest(
                        qkd::kms::next_pool_digest(qkd::kms::first_pool_digest(6), 1, b1), 2, b2));
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->pool_digest(), expect);
    EXPECT_EQ(s->link_state().digest, expect);
  }
  // An earlier version went on committing blocks in this file (it leaves pool_digest as it
  // was): the digest is not the pool's any more, so it is not known. (Only a file of format
  // 2 or earlier: they cannot open one of format 3.)
  down_to_format_2(db);
  exec_sql(db, "UPDATE meta SET value = 3 WHERE name = 'blocks'");
  {
    auto s = open_store(db, Direction::kAlice, kNodeKey, OlderFormat::kConvert);
    ASSERT_NE(s, nullptr);
    EXPECT_FALSE(s->pool_digest().has_value()) << "a stale digest was taken for the pool's";
  }
  down_to_format_2(db);
  exec_sql(db, "UPDATE meta SET value = 2 WHERE name = 'blocks'");
  {
    auto s = open_store(db, Direction::kAlice, kNodeKey, OlderFormat::kConvert);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->pool_digest(), expect);
  }
  // A file written before digests were kept has none.
  down_to_format_2(db);
  exec_sql(db, "DELETE FROM meta WHERE name = 'pool_digest'");
  auto s = open_store(db, Direction::kAlice, kNodeKey, OlderFormat::kConvert);
  ASSERT_NE(s, nullptr);
  EXPECT_FALSE(s->pool_digest().has_value());
  ASSERT_TRUE(s->commit_block(b1, 5, 3).ok());
  EXPECT_FALSE(s->pool_digest().has_value()) << "unknown until the next epoch";
  ASSERT_TRUE(s->start_epoch(9).ok());
  EXPECT_EQ(s->pool_digest(), qkd::kms::first_pool_digest(9));
}

TEST(SqliteKeyStore, StateSurvivesReopen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 8, 1);  // 4 chunks per direction
  std::vector<qkd::kms::DeliveredKey> first;
  std::string peer_key_id = "11111111-2222-4333-8444-555555555555";
  {
    std::uint64_t seq = 4;  // before the store: its hooks refer to these
    std::vector<std::uint64_t> released;
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->link_state().epoch, 0u);
    s->set_notice_hooks(
        [&](const std::vector<KeyAssignment>& as) {
          return StoredNotice{++seq, std::vector<std::uint8_t>(as.size(), 9)};
        },
        [&](std::uint64_t n) { released.push_back(n); });
    ASSERT_TRUE(s->start_epoch(77).ok());
    ASSERT_TRUE(s->commit_block(pool, 77, 1).ok());
    auto k = s->allocate("alice", {"bob"}, 2, 24);  // ends inside a chunk
    ASSERT_TRUE(k.ok()) << k.error().message;
    first = std::move(k.value());
    EXPECT_EQ(released, std::vector<std::uint64_t>{5});
    // A peer key (Bob's direction, offset 0) and Bob's pending block.
    KeyAssignment a{peer_key_id, Direction::kBob, 0, 32, "bob", {"alice"}, false};
    ASSERT_TRUE(s->apply_peer_notice(3, {a}).ok());
    ASSERT_TRUE(s->set_pending_block(qkd::kms::PendingBlock{2, qkd::core::SecureBytes(pattern(40, 9))}).ok());
  }
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  const auto ls = s->link_state();
  EXPECT_EQ(ls.epoch, 77u);
  EXPECT_EQ(ls.blocks, 1u);
  EXPECT_EQ(ls.last_applied_seq, 3u);
  EXPECT_EQ(ls.next_seq, 6u);
  ASSERT_EQ(ls.outbox.size(), 1u);
  EXPECT_EQ(ls.outbox[0].seq, 5u);
  ASSERT_TRUE(ls.pending.has_value());
  EXPECT_EQ(ls.pending->block, 2u);
  EXPECT_TRUE(qkd::core::constant_time_equal(ls.pending->key.span(), pattern(40, 9)));
  const auto st = s->stats();
  EXPECT_EQ(st.committed_bytes, pool.size());
  EXPECT_EQ(st.own_available_bytes, 128u - 48u);
  EXPECT_EQ(st.peer_available_bytes, 128u - 32u);
  EXPECT_EQ(st.assigned_keys_waiting, 1u);
  // The next allocation continues after the first (alice's direction = even chunks).
  auto next = s->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(next.ok());
  const std::vector<std::uint8_t> expect(pool.begin() + 64 + 16, pool.begin() + 64 + 32);
  EXPECT_TRUE(qkd::core::constant_time_equal(next->front().key.span(), expect));
  // Keys delivered before the reopen stay delivered, with their owners: 400 to the slave,
  // 401 to anyone else; the peer key is delivered once.
  EXPECT_EQ(s->take("bob", "alice", {first[0].key_id}, 0ms).error().code,
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(s->take("alice", "alice", {first[0].key_id}, 0ms).error().code,
            ErrorCode::kAuthentication);
  auto peer = s->take("alice", "bob", {peer_key_id}, 0ms);
  ASSERT_TRUE(peer.ok()) << peer.error().message;
  const std::vector<std::uint8_t> bob0(pool.begin() + 32, pool.begin() + 64);
  EXPECT_TRUE(qkd::core::constant_time_equal(peer->front().key.span(), bob0));
  s.reset();
  s = open_store(db);
  EXPECT_EQ(s->take("alice", "bob", {peer_key_id}, 0ms).error().code,
            ErrorCode::kInvalidArgument);
  s->ack_notices(5);
  s.reset();
  s = open_store(db);
  EXPECT_TRUE(s->link_state().outbox.empty());
}

// Prepared keys (store.prepared_keys) are consumed on disk when prepared: the write that
// prepares them holds the cursor past them, their key_IDs as used and their notice, so a
// reopened store (a restart, or a crash after some went out) never hands their bytes out
// again and still sends the peer their notice. A hand-out from the reserve writes nothing.
TEST(SqliteKeyStore, PreparedKeysAreConsumedOnDiskAheadOfTheirRequest) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 16, 3);  // 256 bytes per direction: 16 keys of 16 bytes
  std::string handed_out;
  {
    std::uint64_t seq = 0;
    std::vector<std::size_t> notice_sizes;
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    s->set_prepared_keys(4);
    s->set_notice_hooks(
        [&](const std::vector<KeyAssignment>& as) {
          notice_sizes.push_back(as.size());
          return StoredNotice{++seq, std::vector<std::uint8_t>(as.size(), 7)};
        },
        [](std::uint64_t) {});
    ASSERT_TRUE(s->start_epoch(5).ok());
    ASSERT_TRUE(s->commit_block(pool, 5, 1).ok());
    ASSERT_TRUE(s->allocate("alice", {"bob"}, 1, 16).ok());
    EXPECT_EQ(notice_sizes, std::vector<std::size_t>{5});  // the key and the 4 prepared
    const auto commits = s->stats().request_commits.count;
    auto k = s->allocate("alice", {"bob"}, 1, 16);
    ASSERT_TRUE(k.ok()) << k.error().message;
    handed_out = k->front().key_id;
    s->drain();
    EXPECT_EQ(s->stats().request_commits.count, commits) << "a hand-out wrote";
    EXPECT_EQ(s->stats().prepared_keys, 3u);
  }
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  const auto ls = s->link_state();
  ASSERT_EQ(ls.outbox.size(), 1u);
  EXPECT_EQ(ls.outbox[0].message.size(), 5u);  // the notice announcing all five
  EXPECT_EQ(s->stats().prepared_keys, 0u);     // the reserve lived in memory
  EXPECT_EQ(s->stats().own_available_bytes, 256u - 5 * 16);
  // The next key comes after the five: no prepared byte is handed out twice.
  auto next = s->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(next.ok());
  const std::vector<std::uint8_t> sixth(pool.begin() + 5 * 16 + 32 * 2,
                                        pool.begin() + 6 * 16 + 32 * 2);
  EXPECT_TRUE(qkd::core::constant_time_equal(next->front().key.span(), sixth));
  EXPECT_EQ(s->take("bob", "alice", {handed_out}, 0ms).error().code,
            ErrorCode::kInvalidArgument);
}

// A multicast key some of its slaves have fetched keeps that state across a reopen: they
// may not fetch it again, the others still may.
TEST(SqliteKeyStore, MulticastFetchesSurviveReopen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto pool = pattern(32 * 8, 3);
  const std::string id = "21111111-2222-4333-8444-555555555555";
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->start_epoch(5).ok());
    ASSERT_TRUE(s->commit_block(pool, 5, 1).ok());
    KeyAssignment a{id, Direction::kBob, 0, 32, "bob", {"alice", "alice-2", "alice-3"}, false};
    ASSERT_TRUE(s->apply_peer_notice(1, {a}).ok());
    ASSERT_TRUE(s->take("alice-2", "bob", {id}, 0ms).ok());
  }
  const std::vector<std::uint8_t> bob0(pool.begin() + 32, pool.begin() + 64);
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->take("alice-2", "bob", {id}, 0ms).error().code, ErrorCode::kInvalidArgument);
    auto k = s->take("alice", "bob", {id}, 0ms);
    ASSERT_TRUE(k.ok()) << k.error().message;
    EXPECT_TRUE(qkd::core::constant_time_equal(k->front().key.span(), bob0));
  }
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->take("alice", "bob", {id}, 0ms).error().code, ErrorCode::kInvalidArgument);
  auto last = s->take("alice-3", "bob", {id}, 0ms);
  ASSERT_TRUE(last.ok()) << last.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(last->front().key.span(), bob0));
  EXPECT_EQ(s->stats().assigned_keys_waiting, 0u);
  s.reset();
  s = open_store(db);
  EXPECT_EQ(s->take("alice-3", "bob", {id}, 0ms).error().code, ErrorCode::kInvalidArgument);
}

// keys.max_age_s with the durable store: the blocks' commit times survive a reopen, so the
// pool still expires on time afterwards; the discard notice is kept in the outbox.
TEST(SqliteKeyStore, CommitTimesSurviveReopen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  const auto t0 = std::chrono::system_clock::now();
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    s->set_max_age(std::chrono::seconds(60));
    ASSERT_TRUE(s->start_epoch(9).ok());
    ASSERT_TRUE(s->commit_block(pattern(32 * 8, 4), 9, 1).ok());
  }
  std::uint64_t seq = 0;  // before the store: its hooks refer to these
  std::vector<KeyAssignment> sent;
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  s->set_notice_hooks(
      [&](const std::vector<KeyAssignment>& as) {
        sent.insert(sent.end(), as.begin(), as.end());
        return StoredNotice{++seq, std::vector<std::uint8_t>(1, 7)};
      },
      [](std::uint64_t) {});
  s->set_max_age(std::chrono::seconds(60));
  ASSERT_TRUE(s->expire(t0 + std::chrono::seconds(30)).ok());
  EXPECT_EQ(s->stats().own_available_bytes, 128u);  // not old yet
  ASSERT_TRUE(s->expire(t0 + std::chrono::seconds(120)).ok());
  EXPECT_EQ(s->stats().own_available_bytes, 0u);
  EXPECT_EQ(s->stats().peer_available_bytes, 128u);  // the peer's bytes wait for its discard
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_TRUE(sent[0].discard);
  EXPECT_EQ(sent[0].length, 128u);
  s.reset();
  s = open_store(db);
  EXPECT_EQ(s->stats().own_available_bytes, 0u);
  EXPECT_EQ(s->link_state().outbox.size(), 1u);
}

TEST(SqliteKeyStore, RefusesWrongKeyAndWrongDirection) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  ASSERT_NE(open_store(db), nullptr);
  auto other = qkd::kms::make_sqlite_key_store(Direction::kAlice, db,
                                               std::vector<std::uint8_t>(32, 1));
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.error().message.find("different node key"), std::string::npos);
  auto bob = qkd::kms::make_sqlite_key_store(Direction::kBob, db, kNodeKey);
  ASSERT_FALSE(bob.ok());
  EXPECT_NE(bob.error().message.find("other end"), std::string::npos);
}

TEST(SqliteKeyStore, KeyBytesAreSealedAtRest) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  const auto pool = pattern(32 * 64, 5);
  {
    auto s = open_store(db);
    ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
  }
  std::string raw;
  for (const char* suffix : {"", "-wal"}) {
    std::ifstream f(db + suffix, std::ios::binary);
    raw.append(std::istreambuf_iterator<char>(f), {});
  }
  ASSERT_FALSE(raw.empty());
  for (std::size_t off = 0; off + 16 <= pool.size(); off += 16) {
    const std::string needle(reinterpret_cast<const char*>(pool.data() + off), 16);
    ASSERT_EQ(raw.find(needle), std::string::npos) << "pool bytes at " << off << " in clear";
  }
}

// A delivered key leaves nothing of its sealed bytes in the file: the deleted row is zeroed
// (secure_delete), not left in free space for whoever later holds the file and the node key.
TEST(SqliteKeyStore, DeliveredKeysLeaveNoSealedBytesInTheFile) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  std::vector<std::uint8_t> sealed;
  {
    auto s = open_store(db);
    ASSERT_TRUE(s->commit_block(pattern(32 * 64, 8), 1, 1).ok());
    const std::string id = "0b7e3c2a-8f61-4d2e-9a5b-6c1d0e2f3a4b";
    ASSERT_TRUE(
        s->apply_peer_assignment({id, Direction::kBob, 32, 32, "bob", {"alice"}, false}).ok());
    sqlite3* h = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(h, "SELECT sealed FROM assigned", -1, &st, nullptr), SQLITE_OK);
    ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
    const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
    sealed.assign(b, b + sqlite3_column_bytes(st, 0));
    sqlite3_finalize(st);
    sqlite3_close(h);
    ASSERT_GE(sealed.size(), 32u);
    ASSERT_TRUE(s->take("alice", "bob", {id}, 0ms).ok());
  }
  std::string raw;
  for (const char* suffix : {"", "-wal"}) {
    std::ifstream f(db + suffix, std::ios::binary);
    raw.append(std::istreambuf_iterator<char>(f), {});
  }
  ASSERT_FALSE(raw.empty());
  const std::string needle(reinterpret_cast<const char*>(sealed.data()), sealed.size());
  EXPECT_EQ(raw.find(needle), std::string::npos) << "the delivered key's sealed row is still there";
}

// A write that fails (here: the file may not grow, RLIMIT_FSIZE) leaves the store serving
// nothing; failure() says why, and the KME's /health turns 503 "failing" with it.
TEST(SqliteKeyStore, AFailedWriteIsReportedByHealth) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->commit_block(pattern(32 * 64, 2), 1, 1).ok());
  const auto cfg = qkd::test::kme_config("alice-kme", {"alice"}, "bob-kme", {"bob"}, 50);
  qkd::kms::EtsiService api(cfg, *s, nullptr);
  EXPECT_EQ(s->failure(), "");
  EXPECT_EQ(api.health().status, 200u);
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  std::uintmax_t largest = 0;
  for (const char* suffix : {"", "-wal", "-shm"}) {
    std::error_code ec;
    largest = std::max<std::uintmax_t>(largest, std::filesystem::file_size(db + suffix, ec));
  }
  ::signal(SIGXFSZ, SIG_IGN);  // a write past the limit fails (EFBIG) instead of killing us
  rlimit lim = old;
  lim.rlim_cur = static_cast<rlim_t>(largest);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  const auto big = pattern(4 << 20, 3);  // more than any file holds now
  const auto failed = s->commit_block(big, 1, 2);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  EXPECT_FALSE(failed.ok());
  EXPECT_NE(s->failure(), "");
  EXPECT_FALSE(s->allocate("alice", {"bob"}, 1, 32).ok()) << "a failed store serves nothing";
  const ApiResponse health = api.health();
  EXPECT_EQ(health.status, 503u) << health.body;
  const auto j = nlohmann::json::parse(health.body);
  EXPECT_EQ(j.value("status", ""), "failing") << health.body;
  EXPECT_NE(j.value("message", "").find(s->failure()), std::string::npos) << health.body;
}

TEST(SqliteKeyStore, ConcurrentConsumptionNeverRepeats) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  const auto pool = pattern(32 * 2 * 400, 3);  // 400 keys per direction
  std::set<std::vector<std::uint8_t>> seen;
  std::mutex mu;
  std::atomic<int> served{0};
  {
    auto s = open_store(db);
    ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
    std::vector<std::thread> ts;
    for (int t = 0; t < 8; ++t) {
      ts.emplace_back([&]() {
        for (int i = 0; i < 25; ++i) {
          auto k = s->allocate("alice", {"bob"}, 1, 32);
          ASSERT_TRUE(k.ok()) << k.error().message;
          std::lock_guard l(mu);
          EXPECT_TRUE(seen.insert({k->front().key.span().begin(), k->front().key.span().end()})
                          .second);
          ++served;
        }
      });
    }
    for (auto& t : ts) {
      t.join();
    }
  }
  EXPECT_EQ(served.load(), 200);
  auto s = open_store(db);
  EXPECT_EQ(s->stats().own_available_bytes, 200u * 32);
  auto rest = s->allocate("alice", {"bob"}, 100, 32);
  ASSERT_TRUE(rest.ok());
  for (const auto& k : *rest) {
    EXPECT_TRUE(seen.insert({k.key.span().begin(), k.key.span().end()}).second);
  }
}

TEST(StoreConfig, ParsedStrictlyAndOptional) {
  std::ifstream f(std::string(QKD_TEST_SOURCE_DIR) + "/examples/alice-kme.json");
  std::stringstream ss;
  ss << f.rdbuf();
  auto j = nlohmann::json::parse(ss.str());
  auto plain = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_TRUE(plain.ok()) << plain.error().message;
  EXPECT_FALSE(plain->store.enabled);
  j["store"] = {{"path", "a.db"}, {"node_key_file", "/k/node.key"}};
  auto c = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_TRUE(c->store.enabled);
  EXPECT_EQ(c->store.path, std::filesystem::path("/etc/qkd/a.db"));
  EXPECT_EQ(c->store.node_key_file, std::filesystem::path("/k/node.key"));
  EXPECT_TRUE(c->store.synchronous_full);  // default
  j["store"]["synchronous"] = "normal";
  auto normal = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_TRUE(normal.ok()) << normal.error().message;
  EXPECT_FALSE(normal->store.synchronous_full);
  j["store"]["synchronous"] = "full";
  auto full = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_TRUE(full.ok()) << full.error().message;
  EXPECT_TRUE(full->store.synchronous_full);
  // Each of `values` in store.<field> is refused, naming the field; then the field goes.
  auto expect_refused = [&](const std::string& field, const std::vector<nlohmann::json>& values) {
    for (const auto& v : values) {
      j["store"][field] = v;
      auto wrong = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
      ASSERT_FALSE(wrong.ok()) << v.dump();
      EXPECT_NE(wrong.error().message.find("store." + field), std::string::npos)
          << wrong.error().message;
    }
    j["store"].erase(field);
  };
  expect_refused("synchronous", {"off", "FULL", 1});
  EXPECT_EQ(full->store.prepared_keys, 32u);  // default
  j["store"]["prepared_keys"] = 0;
  auto none = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_TRUE(none.ok()) << none.error().message;
  EXPECT_EQ(none->store.prepared_keys, 0u);
  expect_refused("prepared_keys", {4097, -1, "8"});
  j["store"]["bogus"] = 1;
  auto bad = qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("store.bogus"), std::string::npos) << bad.error().message;
  j["store"].erase("bogus");
  j["store"].erase("node_key_file");
  EXPECT_FALSE(qkd::kms::parse_config(j.dump(), "a.json", "/etc/qkd", false).ok());
}


// Multicast at this KME: a key allocated with a local additional slave is kept, in the same
// durable write as the allocation, for that slave only; it survives a reopen, is served to it
// once with the master's bytes, and the notice to the peer names only the peer's slaves.
TEST(SqliteKeyStore, LocalSlaveKeySurvivesReopen) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  std::vector<qkd::kms::DeliveredKey> keys;
  std::vector<KeyAssignment> told;
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    s->set_assignment_listener([&](const std::vector<KeyAssignment>& as) { told = as; });
    ASSERT_TRUE(s->start_epoch(5).ok());
    ASSERT_TRUE(s->commit_block(pattern(32 * 8, 3), 5, 1).ok());
    auto k = s->allocate("alice", {"bob"}, {"alice-2"}, 2, 16);
    ASSERT_TRUE(k.ok()) << k.error().message;
    keys = std::move(k.value());
    // The master cannot fetch its own key again.
    EXPECT_EQ(s->take("alice", "alice", {keys[0].key_id}, 0ms).error().code,
              ErrorCode::kAuthentication);
  }
  ASSERT_EQ(told.size(), 2u);
  EXPECT_EQ(told[0].slave_saes, std::vector<std::string>{"bob"});
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->stats().assigned_keys_waiting, 2u);
  EXPECT_EQ(s->take("bob", "alice", {keys[0].key_id}, 0ms).error().code,
            ErrorCode::kAuthentication);
  auto got = s->take("alice-2", "alice", {keys[0].key_id, keys[1].key_id}, 0ms);
  ASSERT_TRUE(got.ok()) << got.error().message;
  ASSERT_EQ(got->size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ((*got)[i].key_id, keys[i].key_id);
    EXPECT_TRUE(qkd::core::constant_time_equal((*got)[i].key.span(), keys[i].key.span()));
  }
  EXPECT_EQ(s->take("alice-2", "alice", {keys[1].key_id}, 0ms).error().code,
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(s->stats().assigned_keys_waiting, 0u);
}

// An assigned key's owners are sealed with its bytes: an edited master, slave or "fetched"
// list (which would hand the key to another SAE, or to a slave again) does not authenticate
// and the store refuses to open. A row sealed before owners were bound (its key_ID alone as
// additional data, in a file of format 2) still opens, and is sealed with its owners then.
TEST(SqliteKeyStore, AnAssignedKeysOwnersAreSealedWithIt) {
  TempDir dir;
  const std::string db = dir.file("alice.db");
  std::string id;
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->commit_block(pattern(32 * 8, 3), 1, 1).ok());
    auto k = s->allocate("alice", {"bob"}, {"alice-2", "alice-3"}, 1, 16);
    ASSERT_TRUE(k.ok()) << k.error().message;
    id = k->front().key_id;
    ASSERT_TRUE(s->take("alice-2", "alice", {id}, 0ms).ok());  // alice-3 still to fetch
  }
  for (const std::string& sql :
       {std::string("UPDATE assigned SET master = 'mallory'"),
        std::string(R"(UPDATE assigned SET slaves = '{"slaves":["alice-2","mallory"],"fetched":["alice-2"]}')"),
        std::string(R"(UPDATE assigned SET slaves = '{"slaves":["alice-2","alice-3"],"fetched":[]}')")}) {
    const std::string copy = dir.file("edited.db");
    std::filesystem::remove(copy);
    std::filesystem::copy_file(db, copy);
    exec_sql(copy, sql);
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, copy, kNodeKey);
    ASSERT_FALSE(s.ok()) << sql << ", yet the store opened";
    EXPECT_NE(s.error().message.find("does not authenticate"), std::string::npos)
        << s.error().message;
  }
  // The same row sealed as before (additional data "qkd-kms/key/<key_ID>", a file of
  // format 2): opens, and is sealed again with its owners; alice-3 gets the key.
  const auto bytes = pattern(16, 9);
  const auto legacy = gcm(true, "qkd-kms/key/" + id, bytes);
  down_to_format_2(db);
  {
    sqlite3* h = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(h, "UPDATE assigned SET sealed = ?1", -1, &st, nullptr),
              SQLITE_OK);
    sqlite3_bind_blob(st, 1, legacy.data(), static_cast<int>(legacy.size()), SQLITE_STATIC);
    EXPECT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(h);
  }
  open_store(db, Direction::kAlice, kNodeKey, OlderFormat::kConvert).reset();
  const std::string copy = dir.file("edited-converted.db");
  std::filesystem::copy_file(db, copy);
  exec_sql(copy, "UPDATE assigned SET master = 'mallory'");
  auto edited = qkd::kms::make_sqlite_key_store(Direction::kAlice, copy, kNodeKey);
  ASSERT_FALSE(edited.ok()) << "the converted row's owners were edited, yet the store opened";
  EXPECT_NE(edited.error().message.find("does not authenticate"), std::string::npos)
      << edited.error().message;
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  auto got = s->take("alice-3", "alice", {id}, 0ms);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(got->front().key.span(), bytes));
}

// Checkpoints run beside the committer (not inside its commits) and the WAL stays bounded:
// a long run of one-key transactions writes far more WAL pages than the bound (4,000 pages
// of 4 KiB plus one transaction), which holds only if checkpoints keep starting it over.
TEST(SqliteKeyStore, WalStaysBoundedUnderLongLoad) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  constexpr int kKeys = 6000;
  const auto pool = pattern(32 * 2 * kKeys, 11);
  std::uintmax_t wal_max = 0;
  {
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey,
                                             /*synchronous_full=*/false);
    ASSERT_TRUE(s.ok()) << s.error().message;
    ASSERT_TRUE((*s)->commit_block(pool, 1, 1).ok());
    std::set<std::vector<std::uint8_t>> seen;
    for (int i = 0; i < kKeys; ++i) {
      auto k = (*s)->allocate("alice", {"bob"}, 1, 32);
      ASSERT_TRUE(k.ok()) << k.error().message;
      ASSERT_TRUE(seen.insert({k->front().key.span().begin(), k->front().key.span().end()}).second);
      std::error_code ec;
      const auto size = std::filesystem::file_size(db + "-wal", ec);
      ASSERT_FALSE(ec) << "no WAL while the store is open";
      wal_max = std::max(wal_max, size);
    }
  }
  EXPECT_GT(wal_max, 0u);
  EXPECT_LE(wal_max, std::uintmax_t{4200} * (4096 + 24) + 32);
  // Closed cleanly: the WAL was checkpointed and removed, and the store reopens with the
  // pool used up in this direction.
  EXPECT_FALSE(std::filesystem::exists(db + "-wal"));
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->stats().own_available_bytes, 0u);
}

// One KME process per database file: a second store on an open file is refused.
TEST(SqliteKeyStore, SecondStoreOnAnOpenFileIsRefused) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  auto first = open_store(db);
  ASSERT_NE(first, nullptr);
  auto second = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey);
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().message.find("in use"), std::string::npos) << second.error().message;
  first.reset();
  EXPECT_NE(open_store(db), nullptr);  // free again once closed
}

// Rows a transaction puts and deletes again are not written: a peer notice whose key the
// dec_keys in the same transaction delivers leaves no row in `waiting` or `assigned`, costs
// only the pages of the consumption (WAL frames counted), and the state after a reopen is
// the same as when the notice was written on its own before the delivery.
TEST(SqliteKeyStore, KeyNoticedAndDeliveredInOneTransactionWritesNoRowOfIt) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  constexpr int kRounds = 120;
  const auto pool = pattern(32 * 2 * (kRounds + 1), 12);
  auto id = [](int i) { return fmt::format("00000000-0000-4000-8000-{:012d}", i); };
  std::uintmax_t wal_bytes = 0;
  int slow_rounds = 0;  // the notice may have been written alone (kDeferMax is 5 ms)
  {
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey,
                                             /*synchronous_full=*/false);
    ASSERT_TRUE(s.ok()) << s.error().message;
    ASSERT_TRUE((*s)->commit_block(pool, 1, 1).ok());
    const auto wal_before = std::filesystem::file_size(db + "-wal");
    for (int i = 0; i < kRounds; ++i) {
      KeyAssignment a{id(i), Direction::kBob, std::uint64_t(32) * i, 32, "bob", {"alice"}, false};
      const auto t0 = std::chrono::steady_clock::now();
      auto q = (*s)->queue_peer_notice(i + 1, {a});  // deferred: rides with the take below
      ASSERT_TRUE(q.ok() && q->refused.ok());
      auto k = (*s)->take("alice", "bob", {id(i)}, 0ms);
      ASSERT_TRUE(k.ok()) << k.error().message;
      slow_rounds += std::chrono::steady_clock::now() - t0 >= 4ms ? 1 : 0;
    }
    wal_bytes = std::filesystem::file_size(db + "-wal") - wal_before;
    // The last key goes the other way: its notice written alone, delivered afterwards.
    KeyAssignment last{
        id(kRounds), Direction::kBob, std::uint64_t(32) * kRounds, 32, "bob", {"alice"}, false};
    // A deferred unit with no urgent one behind it: the committer thread writes it within
    // kDeferMax (5 ms), woken from its idle wait.
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE((*s)->apply_peer_notice(kRounds + 1, {last}).ok());
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
    ASSERT_TRUE((*s)->take("alice", "bob", {id(kRounds)}, 0ms).ok());
  }
  sqlite3* h = nullptr;
  ASSERT_EQ(sqlite3_open_v2(db.c_str(), &h, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  auto count = [&](const char* table) {
    sqlite3_stmt* st = nullptr;
    const std::string sql = std::string("SELECT COUNT(*) FROM ") + table;
    EXPECT_EQ(sqlite3_prepare_v2(h, sql.c_str(), -1, &st, nullptr), SQLITE_OK);
    EXPECT_EQ(sqlite3_step(st), SQLITE_ROW);
    const auto n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
  };
  EXPECT_EQ(count("waiting"), 0);
  EXPECT_EQ(count("assigned"), 0);
  EXPECT_EQ(count("used_ids"), kRounds + 1);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(h, "PRAGMA page_size", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  const auto frame_bytes = static_cast<std::uintmax_t>(sqlite3_column_int64(st, 0)) + 24;
  sqlite3_finalize(st);
  sqlite3_close(h);
  // Per round: the consumption (cursor in meta, the chunk, used_ids), measured 3.1 frames;
  // with the notice's rows written and deleted it was 6.1 (waiting, assigned and its key_ID
  // index). A round slow enough for the notice to have gone alone may cost 4 more.
  const std::uintmax_t frames = wal_bytes / frame_bytes;
  EXPECT_LE(frames, std::uintmax_t{kRounds} * 4 + std::uintmax_t(slow_rounds) * 4)
      << frames << " WAL frames, " << slow_rounds << " slow rounds";
  auto s = open_store(db);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->stats().assigned_keys_waiting, 0u);
  EXPECT_EQ(s->stats().peer_available_bytes, 0u);
  EXPECT_EQ(s->link_state().last_applied_seq, std::uint64_t{kRounds + 1});
  for (int i : {0, kRounds / 2, kRounds}) {  // delivered once, never again
    EXPECT_EQ(s->take("alice", "bob", {id(i)}, 0ms).error().code, ErrorCode::kInvalidArgument);
  }
}

// A store written before used_ids lost its UNIQUE constraint is rebuilt on open, with the
// delivered key_IDs kept (in order) and still refused.
TEST(SqliteKeyStore, OldUsedIdsIndexIsDroppedOnOpen) {
  TempDir dir;
  const std::string db = dir.file("store.db");
  std::vector<std::string> delivered;
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->commit_block(pattern(32 * 8, 13), 1, 1).ok());
    auto k = s->allocate("alice", {"bob"}, 3, 32);
    ASSERT_TRUE(k.ok()) << k.error().message;
    for (const auto& d : *k) {
      delivered.push_back(d.key_id);
    }
  }
  auto exec = [](sqlite3* h, const char* sql) {
    char* err = nullptr;
    EXPECT_EQ(sqlite3_exec(h, sql, nullptr, nullptr, &err), SQLITE_OK) << (err ? err : "");
    sqlite3_free(err);
  };
  auto table_sql = [](sqlite3* h) {
    sqlite3_stmt* st = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(h, "SELECT sql FROM sqlite_master WHERE name = 'used_ids'", -1,
                                 &st, nullptr),
              SQLITE_OK);
    std::string sql;
    if (sqlite3_step(st) == SQLITE_ROW) {
      sql = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
    }
    sqlite3_finalize(st);
    return sql;
  };
  sqlite3* h = nullptr;
  ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
  exec(h,
       "BEGIN;"
       "CREATE TABLE old_ids(key_id TEXT NOT NULL UNIQUE);"
       "INSERT INTO old_ids(rowid, key_id) SELECT 3 * rowid + 2, key_id FROM used_ids;"
       "DROP TABLE used_ids; ALTER TABLE old_ids RENAME TO used_ids; COMMIT;");
  ASSERT_NE(table_sql(h).find("UNIQUE"), std::string::npos);
  sqlite3_close(h);
  // Refused stores are not touched.
  EXPECT_FALSE(qkd::kms::make_sqlite_key_store(Direction::kBob, db, kNodeKey).ok());
  EXPECT_FALSE(
      qkd::kms::make_sqlite_key_store(Direction::kAlice, db, std::vector<std::uint8_t>(32, 1))
          .ok());
  ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
  EXPECT_NE(table_sql(h).find("UNIQUE"), std::string::npos);
  sqlite3_close(h);
  {
    auto s = open_store(db);
    ASSERT_NE(s, nullptr);
    // Their owners were not kept: "not found" to anyone, even to an SAE that was not
    // their slave (a key delivered from now on answers that SAE 401).
    for (const auto& id : delivered) {
      EXPECT_EQ(s->take("alice", "bob", {id}, 0ms).error().code, ErrorCode::kInvalidArgument);
    }
  }
  ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
  EXPECT_EQ(table_sql(h).find("UNIQUE"), std::string::npos) << table_sql(h);
  EXPECT_NE(table_sql(h).find("owners"), std::string::npos) << table_sql(h);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(
      sqlite3_prepare_v2(h, "SELECT rowid, key_id FROM used_ids ORDER BY rowid", -1, &st, nullptr),
      SQLITE_OK);
  std::vector<std::string> ids;
  std::vector<std::int64_t> rowids;
  while (sqlite3_step(st) == SQLITE_ROW) {
    rowids.push_back(sqlite3_column_int64(st, 0));
    ids.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(st, 1)));
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  EXPECT_EQ(ids, delivered);
  EXPECT_EQ(rowids, (std::vector<std::int64_t>{5, 8, 11}));  // kept, gaps and all
}

// The API's path: allocate() and take() with a PendingWrite return at once, and
// when_written() reports each write once it is durable, from whichever thread wrote it, after
// the allocation's notice was released; nothing is written twice, nothing lost on reopen.
// Both synchronous levels (FULL: the committer thread writes; NORMAL: the caller when no
// transaction is in progress, else the committer thread).
TEST(SqliteKeyStore, DeferredDeliveriesCompleteOnceDurable) {
  for (const bool full : {true, false}) {
    SCOPED_TRACE(full ? "synchronous full" : "synchronous normal");
    TempDir dir;
    const std::string db = dir.file("store.db");
    constexpr int kThreads = 8;
    constexpr int kEach = 40;
    const auto pool = pattern(32 * 2 * (kThreads * kEach + 50), 5);
    std::set<std::vector<std::uint8_t>> seen;
    std::mutex mu;
    std::set<std::uint64_t> released;
    std::atomic<int> completed{0};
    std::atomic<int> failures{0};
    {
      // Declared before the store: its hooks and completions (the committer thread runs
      // some) refer to them until the store is gone.
      std::uint64_t seq = 0;
      std::promise<qkd::core::Status> took;
      auto made = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey, full);
      ASSERT_TRUE(made.ok()) << made.error().message;
      auto& s = *made;
      static thread_local std::uint64_t encoded = 0;  // the calling thread's last notice
      s->set_notice_hooks(
          [&](const std::vector<KeyAssignment>& as) {
            encoded = ++seq;  // called on the allocating thread, under the store's lock
            return StoredNotice{seq, std::vector<std::uint8_t>(as.size(), 1)};
          },
          [&](std::uint64_t n) {
            std::lock_guard l(mu);
            released.insert(n);
          });
      ASSERT_TRUE(s->commit_block(pool, 1, 1).ok());
      // A peer-assigned key for take(): the bob direction's first 32 bytes.
      KeyAssignment peer{"11111111-2222-4333-8444-555555555555", Direction::kBob, 0, 32, "bob",
                         {"alice"}, false};
      ASSERT_TRUE(s->apply_peer_notice(1, {peer}).ok());
      std::vector<std::thread> ts;
      for (int t = 0; t < kThreads; ++t) {
        ts.emplace_back([&]() {
          for (int i = 0; i < kEach; ++i) {
            KeyStore::PendingWrite pending;
            auto k = s->allocate("alice", {"bob"}, {}, 1, 32, &pending);
            ASSERT_TRUE(k.ok()) << k.error().message;
            ASSERT_NE(pending.ticket, 0u);
            const auto bytes =
                std::vector<std::uint8_t>(k->front().key.span().begin(), k->front().key.span().end());
            {
              std::lock_guard l(mu);
              EXPECT_TRUE(seen.insert(bytes).second);
            }
            const std::uint64_t my_seq = encoded;
            {
              std::lock_guard l(mu);
              EXPECT_FALSE(released.contains(my_seq));  // not before the write completes
            }
            s->when_written(std::move(pending), [&, my_seq](const qkd::core::Status& st) {
              if (!st.ok()) {
                ++failures;
              }
              std::lock_guard l(mu);
              EXPECT_TRUE(released.contains(my_seq));  // released first, then completed
              ++completed;
            });
          }
        });
      }
      for (auto& t : ts) {
        t.join();
      }
      KeyStore::PendingWrite pending;
      auto taken = s->take("alice", "bob", {peer.key_id}, 0ms, &pending);
      ASSERT_TRUE(taken.ok()) << taken.error().message;
      s->when_written(std::move(pending), [&](const qkd::core::Status& st) { took.set_value(st); });
      auto fut = took.get_future();
      ASSERT_EQ(fut.wait_for(10s), std::future_status::ready);
      EXPECT_TRUE(fut.get().ok());
      // Every completion arrives (the last ones on the committer thread at the latest).
      for (int i = 0; i < 1000 && completed.load() < kThreads * kEach; ++i) {
        std::this_thread::sleep_for(10ms);
      }
      EXPECT_EQ(completed.load(), kThreads * kEach);
      EXPECT_EQ(failures.load(), 0);
      EXPECT_EQ(released.size(), static_cast<std::size_t>(kThreads * kEach));
      // A write already durable completes at once, on the calling thread.
      KeyStore::PendingWrite again;
      auto k = s->allocate("alice", {"bob"}, {}, 1, 32, &again);
      ASSERT_TRUE(k.ok());
      {
        std::lock_guard l(mu);
        EXPECT_TRUE(seen.insert({k->front().key.span().begin(), k->front().key.span().end()}).second);
      }
      ASSERT_TRUE(s->durable(again.ticket).ok());
      bool now = false;
      s->when_written(std::move(again), [&](const qkd::core::Status& st) { now = st.ok(); });
      EXPECT_TRUE(now);
    }
    // Reopened: every delivered key stays consumed, the taken one too.
    auto s = qkd::kms::make_sqlite_key_store(Direction::kAlice, db, kNodeKey, full);
    ASSERT_TRUE(s.ok()) << s.error().message;
    EXPECT_EQ((*s)->stats().own_available_bytes, 49u * 32);
    EXPECT_FALSE((*s)->knows_all({"00000000-0000-4000-8000-000000000000"}));
    EXPECT_TRUE((*s)->knows_all({"11111111-2222-4333-8444-555555555555"}));  // as delivered
    auto rest = (*s)->allocate("alice", {"bob"}, 49, 32);
    ASSERT_TRUE(rest.ok()) << rest.error().message;
    for (const auto& key : *rest) {
      EXPECT_TRUE(seen.insert({key.key.span().begin(), key.key.span().end()}).second);
    }
    auto taken = (*s)->take("alice", "bob", {"11111111-2222-4333-8444-555555555555"}, 0ms);
    EXPECT_FALSE(taken.ok());  // delivered before the reopen
  }
}

// The memory store has nothing to wait for: no ticket, and when_written completes at once.
TEST(MemoryKeyStore, PendingWriteCompletesAtOnce) {
  auto s = qkd::kms::make_memory_key_store(Direction::kAlice);
  bool released = false;
  s->set_notice_hooks([](const std::vector<KeyAssignment>&) { return StoredNotice{1, {1}}; },
                      [&](std::uint64_t) { released = true; });
  s->commit(pattern(64, 9));
  KeyStore::PendingWrite pending;
  auto k = s->allocate("alice", {"bob"}, {}, 1, 32, &pending);
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_EQ(pending.ticket, 0u);
  EXPECT_TRUE(released);  // at once, as without a PendingWrite
  bool done = false;
  s->when_written(std::move(pending), [&](const qkd::core::Status& st) { done = st.ok(); });
  EXPECT_TRUE(done);
}

}  // namespace
