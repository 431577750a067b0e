// Crash test: both KMEs with durable stores, SAEs drawing keys in both directions, one KME
// killed with SIGKILL mid-load and restarted (bob-kme, then alice-kme). Afterwards: no
// key_ID and no key bytes delivered twice by any KME, every key that enc_keys delivered is
// fetchable exactly once at the peer (or was fetched already), and both ends always agree on
// the bytes. A dec_keys whose response was lost to the crash may have consumed its keys:
// only those keys may be "not found" afterwards.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sqlite3.h>
#include <set>
#include <thread>

#include "qkd/test/etsi_helpers.hpp"
#include "qkd/test/kme_network.hpp"
#include "qkd/test/scoped_env.hpp"
#include "qkd/test/store_file.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using qkd::test::HttpResponse;
using qkd::test::KmeInfo;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;

using Bytes = std::vector<std::uint8_t>;

// The (key_ID, bytes) pairs of a Key container (shared helper, tests/support).
std::vector<std::pair<std::string, Bytes>> keys_of(const HttpResponse& r) {
  return qkd::test::key_list(r);
}

// enc_keys of `number` keys for bob at alice-kme: the (key_ID, bytes) pairs; none, with a
// failure recorded, unless it was answered with 200.
std::vector<std::pair<std::string, Bytes>> enc_at_alice(const KmeNetwork& net, int number) {
  auto enc = net.client(net.alice(), "alice")
                 .get(fmt::format("/api/v1/keys/bob/enc_keys?number={}", number));
  if (!enc.ok() || enc->status != 200) {
    ADD_FAILURE() << "enc_keys at alice-kme: " << (enc.ok() ? enc->body : enc.error().message);
    return {};
  }
  return keys_of(*enc);
}

// dec_keys of `id` (master alice) at bob-kme: the status (0: no answer) and, with 200, the
// key's bytes.
std::pair<unsigned, Bytes> dec_at_bob(const KmeNetwork& net, const std::string& id) {
  auto dec = net.client(net.bob(), "bob").get("/api/v1/keys/alice/dec_keys?key_ID=" + id);
  if (!dec.ok()) {
    return {0, {}};
  }
  if (dec->status != 200) {
    return {dec->status, {}};
  }
  const auto keys = keys_of(*dec);
  return {200, keys.empty() ? Bytes{} : keys.front().second};
}

// Everything one direction of traffic saw: master SAE at `enc` KME, slave at `dec` KME.
struct Flow {
  std::string name;
  std::mutex mu;
  std::map<std::string, Bytes> enc;        // delivered by enc_keys
  std::map<std::string, Bytes> dec;        // delivered by dec_keys
  std::deque<std::string> to_fetch;        // enc'd, not yet fetched
  std::set<std::string> uncertain;         // a dec_keys for it failed in transport
  std::vector<std::string> violations;     // a key_ID or bytes delivered twice, mismatch
  std::atomic<int> enc_errors{0}, dec_errors{0};
};

// Records a delivery, checking it is the first of its key_ID at that KME.
void record(Flow& f, std::map<std::string, Bytes>& where, const char* what,
            const std::string& id, Bytes key) {
  if (!where.emplace(id, std::move(key)).second) {
    f.violations.push_back(fmt::format("{}: {} delivered {} twice", f.name, what, id));
  }
}

void enc_loop(const KmeNetwork& net, const KmeInfo& (KmeNetwork::*enc_kme)() const,
              const std::string& master, const std::string& slave, Flow& f,
              const std::atomic<bool>& stop) {
  while (!stop) {
    auto r = net.client((net.*enc_kme)(), master)
                 .get(fmt::format("/api/v1/keys/{}/enc_keys?number=4", slave));
    if (!r.ok() || r->status != 200) {
      ++f.enc_errors;  // the KME is down, or not enough key right now
      std::this_thread::sleep_for(20ms);
      continue;
    }
    std::lock_guard l(f.mu);
    for (auto& [id, key] : keys_of(*r)) {
      record(f, f.enc, "enc_keys", id, key);
      f.to_fetch.push_back(id);
    }
    std::this_thread::sleep_for(5ms);
  }
}

// Fetches key_IDs with dec_keys; a transport failure after the request may have reached the
// KME makes them "uncertain" (excused if lost); every failure is retried.
// Returns when `stop` is set (or, with drain, when nothing is left).
void dec_loop(const KmeNetwork& net, const KmeInfo& (KmeNetwork::*dec_kme)() const,
              const std::string& slave, const std::string& master, Flow& f,
              const std::atomic<bool>& stop, bool drain) {
  for (;;) {
    std::string id;
    {
      std::lock_guard l(f.mu);
      if (!f.to_fetch.empty()) {
        id = f.to_fetch.front();
        f.to_fetch.pop_front();
      }
    }
    if (id.empty()) {
      if (drain || stop) {
        return;
      }
      std::this_thread::sleep_for(5ms);
      continue;
    }
    auto r = net.client((net.*dec_kme)(), slave)
                 .get(fmt::format("/api/v1/keys/{}/dec_keys?key_ID={}", master, id));
    if (!r.ok()) {
      // Only a request that may have reached the KME can have been served before the crash:
      // one refused at connect or in the TLS handshake (the KME down) was not.
      const std::string& e = r.error().message;
      {
        std::lock_guard l(f.mu);
        ++f.dec_errors;
        if (e.find("(connect)") == std::string::npos &&
            e.find("(TLS handshake)") == std::string::npos) {
          f.uncertain.insert(id);
        }
        f.to_fetch.push_back(id);
      }
      std::this_thread::sleep_for(20ms);  // the KME is down or restarting
      continue;
    }
    std::lock_guard l(f.mu);
    if (r->status == 200) {
      for (auto& [kid, key] : keys_of(*r)) {
        record(f, f.dec, "dec_keys", kid, key);
      }
    } else if (r->status == 503) {
      ++f.dec_errors;
      f.to_fetch.push_back(id);
    } else if (!drain) {
      f.to_fetch.push_back(id);  // e.g. its notice waits for the restarted peer: try later
    } else if (!f.uncertain.contains(id)) {
      f.violations.push_back(fmt::format("{}: dec_keys {}: {} {}", f.name, id, r->status, r->body));
    }
    if (stop && !drain) {
      return;
    }
  }
}

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) {
    ++n;
  }
  return n;
}

// Waits (up to 30 s) until the KME's log holds `what` at least `n` times.
bool wait_for_log(const KmeNetwork& net, const KmeInfo& kme, const std::string& what,
                  std::size_t n) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (count(net.log_tail(kme, 1000000), what) < n) {
    if (std::chrono::steady_clock::now() > deadline) {
      return false;
    }
    std::this_thread::sleep_for(50ms);
  }
  return true;
}

// `synchronous`: the KMEs' store.synchronous ("" = not written, the default full).
void kill_nine_mid_load(const std::string& synchronous) {
  KmeNetworkOptions o;
  o.durable_store = true;
  o.dec_wait_ms = 3000;
  if (!synchronous.empty()) {
    o.customize = [synchronous](nlohmann::json& a, nlohmann::json& b) {
      a["store"]["synchronous"] = synchronous;
      b["store"]["synchronous"] = synchronous;
    };
  }
  auto started = qkd::test::start_network_with_keys(o, 40);
  ASSERT_NE(started, nullptr);
  KmeNetwork& net = *started;

  Flow ab, ba;  // alice -> bob keys, bob -> alice keys
  ab.name = "alice->bob";
  ba.name = "bob->alice";
  std::atomic<bool> stop{false};
  std::vector<std::thread> load;
  load.emplace_back([&] { enc_loop(net, &KmeNetwork::alice, "alice", "bob", ab, stop); });
  load.emplace_back([&] { dec_loop(net, &KmeNetwork::bob, "bob", "alice", ab, stop, false); });
  load.emplace_back([&] { enc_loop(net, &KmeNetwork::bob, "bob", "alice", ba, stop); });
  load.emplace_back([&] { dec_loop(net, &KmeNetwork::alice, "alice", "bob", ba, stop, false); });

  std::this_thread::sleep_for(1500ms);
  ASSERT_TRUE(net.crash_and_restart("bob-kme").ok());
  std::this_thread::sleep_for(1500ms);
  ASSERT_TRUE(net.crash_and_restart("alice-kme").ok());
  std::this_thread::sleep_for(1500ms);
  stop = true;
  for (auto& t : load) {
    t.join();
  }
  // Every key enc_keys delivered is fetchable at the peer now (unless a lost response
  // consumed it), once the link is back and has resent its notices.
  ASSERT_TRUE(net.wait_for_keys(1).ok());
  dec_loop(net, &KmeNetwork::bob, "bob", "alice", ab, stop, true);
  dec_loop(net, &KmeNetwork::alice, "alice", "bob", ba, stop, true);

  for (Flow* f : {&ab, &ba}) {
    SCOPED_TRACE(f->name);
    for (const auto& v : f->violations) {
      ADD_FAILURE() << v;
    }
    EXPECT_GT(f->enc.size(), 20u);
    EXPECT_TRUE(f->to_fetch.empty());
    std::size_t fetched = 0;
    for (const auto& [id, key] : f->enc) {
      auto it = f->dec.find(id);
      if (it == f->dec.end()) {
        EXPECT_TRUE(f->uncertain.contains(id)) << id << " delivered by enc_keys is lost";
        continue;
      }
      ++fetched;
      EXPECT_EQ(it->second, key) << id << ": the two ends disagree";
    }
    for (const auto& [id, _] : f->dec) {
      EXPECT_TRUE(f->enc.contains(id)) << id << " delivered by dec_keys was never enc'd";
    }
    EXPECT_GE(fetched + f->uncertain.size(), f->enc.size());
    std::cout << f->name << ": " << f->enc.size() << " keys, " << fetched << " fetched, "
              << f->uncertain.size() << " uncertain, " << f->enc_errors << "/" << f->dec_errors
              << " enc/dec errors\n";
  }
  // No key bytes handed out twice (e.g. a pool replayed after the crash).
  std::set<Bytes> all;
  for (Flow* f : {&ab, &ba}) {
    for (const auto& [id, key] : f->enc) {
      EXPECT_TRUE(all.insert(key).second) << id << ": bytes delivered under two key_IDs";
    }
  }
  // Nothing was lost, so the link resumed after each crash instead of starting new pools.
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 2));
  EXPECT_EQ(count(net.log_tail(net.alice(), 1000000), "discarding both pools"), 0u);
}

TEST(KmsCrash, KillNineMidLoadLosesAndRepeatsNothing) { kill_nine_mid_load(""); }

// store.synchronous = "normal" leaves commits in the OS page cache until a checkpoint: that
// survives the process's kill -9 (not a power loss), so the same guarantees hold.
TEST(KmsCrash, KillNineMidLoadLosesAndRepeatsNothingSynchronousNormal) {
  kill_nine_mid_load("normal");
}

// Two KMEs with durable stores and a pool of 50 keys, full: the link pauses, so the pools
// stay as they are across a restart. `synchronous`: as kill_nine_mid_load's.
std::unique_ptr<KmeNetwork> durable_network_with_a_full_pool(const std::string& synchronous = "") {
  KmeNetworkOptions o;
  o.durable_store = true;
  o.max_key_count = 50;
  if (!synchronous.empty()) {
    o.customize = [synchronous](nlohmann::json& a, nlohmann::json& b) {
      a["store"]["synchronous"] = synchronous;
      b["store"]["synchronous"] = synchronous;
    };
  }
  return qkd::test::start_network_with_keys(o, 50);
}

// A durable network with a full pool (durable_network_with_a_full_pool), and the three
// keys enc_keys then gave alice.
void start_with_three_keys_at_alice(std::unique_ptr<KmeNetwork>& net,
                                    std::vector<std::pair<std::string, Bytes>>& keys) {
  net = durable_network_with_a_full_pool();
  ASSERT_NE(net, nullptr);
  keys = enc_at_alice(*net, 3);
  ASSERT_EQ(keys.size(), 3u);
}

// Bob's dec_keys serves each of `keys` with alice's bytes.
void expect_bob_serves(const KmeNetwork& net,
                       const std::vector<std::pair<std::string, Bytes>>& keys) {
  for (const auto& [id, key] : keys) {
    EXPECT_EQ(dec_at_bob(net, id), std::make_pair(200u, key)) << id;
  }
}

TEST(KmsCrash, GracefulRestartResumesWithThePool) {
  std::unique_ptr<KmeNetwork> started;
  std::vector<std::pair<std::string, Bytes>> keys;
  ASSERT_NO_FATAL_FAILURE(start_with_three_keys_at_alice(started, keys));
  KmeNetwork& net = *started;
  ASSERT_TRUE(net.restart_bob().ok());
  ASSERT_TRUE(net.wait_for_keys(40).ok());
  expect_bob_serves(net, keys);
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 1));
  EXPECT_EQ(count(net.log_tail(net.alice(), 1000000), "discarding both pools"), 0u);
}

// Bob's qkd_kms_assigned_keys_waiting (keys assigned by alice, not fetched), -1 if the
// scrape fails.
double waiting_at_bob(const KmeNetwork& net) {
  auto r = net.client(net.bob(), "bob").get("/metrics");
  if (!r.ok() || r->status != 200) {
    return -1;
  }
  const std::string name = "qkd_kms_assigned_keys_waiting{";
  const auto at = r->body.find("\n" + name);
  if (at == std::string::npos) {
    return -1;
  }
  const auto end = r->body.find('\n', at + 1);
  const std::string line = r->body.substr(at + 1, end - at - 1);
  return std::stod(line.substr(line.rfind(' ') + 1));
}

// Polls until `pred(waiting_at_bob)` holds, up to 15 s; the last value.
template <typename Pred>
double wait_waiting_at_bob(const KmeNetwork& net, Pred pred) {
  double v = -1;
  for (int i = 0; i < 150; ++i) {
    v = waiting_at_bob(net);
    if (pred(v)) {
      break;
    }
    std::this_thread::sleep_for(100ms);
  }
  return v;
}

// store.prepared_keys at a clean stop: alice withdraws the keys she prepared and did not
// hand out, and bob, told at the next session, drops them instead of keeping them for ever
// (no SAE was given their key_IDs). The keys alice did hand out stay fetchable.
TEST(KmsCrash, GracefulStopWithdrawsPreparedKeys) {
  std::unique_ptr<KmeNetwork> started;
  std::vector<std::pair<std::string, Bytes>> keys;
  ASSERT_NO_FATAL_FAILURE(start_with_three_keys_at_alice(started, keys));
  KmeNetwork& net = *started;
  // The first request prepared the reserve; the next two came from it. Bob holds them all.
  const double before = wait_waiting_at_bob(net, [](double v) { return v > 3; });
  ASSERT_GT(before, 3.0) << "no prepared keys announced";
  net.stop_kme("alice-kme");
  ASSERT_TRUE(net.start_kme("alice-kme").ok());
  EXPECT_EQ(wait_waiting_at_bob(net, [](double v) { return v == 3; }), 3.0);
  expect_bob_serves(net, keys);
  EXPECT_EQ(waiting_at_bob(net), 0.0);
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 1));
}

// After a reset at the session start: both ends hold keys again, and a key enc_keys hands
// alice is the one bob's dec_keys gives.
void expect_keys_flow_after_reset(const KmeNetwork& net) {
  // The network's first session was a reset too (no pool yet): this is the second.
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (reset)", 2));
  ASSERT_TRUE(net.wait_for_keys(10).ok());
  const auto keys = enc_at_alice(net, 3);
  ASSERT_EQ(keys.size(), 3u);
  expect_bob_serves(net, keys);
}

// After a test altered the stopped KME `kme`'s counters as a diverged or restored file would
// hold them: the meta tag made over them, as the store makes it (an edit alone is refused
// at open: SqliteKeyStore.AnEditedFileIsRefusedAtOpen).
void retag_store(const KmeNetwork& net, const std::string& kme) {
  std::ifstream key_file(net.dir() / (kme + ".node.key"));
  std::string hex;
  key_file >> hex;
  const auto key = qkd::test::node_key_from_hex(hex);
  ASSERT_EQ(key.size(), 32u) << "no node key for " << kme;
  ASSERT_EQ(qkd::test::retag_meta((net.dir() / (kme + ".db")).string(), key), "");
}

// Equal epochs and block counts do not make equal pools: the session start also compares
// the pools' digests. Bob's stored digest is altered while his KME is down (as if his pool
// had diverged with the same count); alice's KME must then reset both pools rather than
// resume, and keys flow again with the same bytes on both ends.
TEST(KmsCrash, PoolsWithEqualCountsButDifferentDigestsAreReset) {
  auto started = durable_network_with_a_full_pool();
  ASSERT_NE(started, nullptr);
  KmeNetwork& net = *started;
  net.stop_kme("bob-kme");
  {
    const auto db = (net.dir() / "bob-kme.db").string();
    // The stored value is the digest followed by its epoch and block count: flip a bit of
    // the digest only.
    sqlite3* h = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(h, "SELECT value FROM meta WHERE name = 'pool_digest'", -1, &st,
                                 nullptr),
              SQLITE_OK);
    ASSERT_EQ(sqlite3_step(st), SQLITE_ROW) << "no pool digest stored in " << db;
    const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
    std::vector<std::uint8_t> value(b, b + sqlite3_column_bytes(st, 0));
    sqlite3_finalize(st);
    ASSERT_GT(value.size(), 32u);
    value[0] ^= 1;
    ASSERT_EQ(sqlite3_prepare_v2(h, "UPDATE meta SET value = ? WHERE name = 'pool_digest'", -1,
                                 &st, nullptr),
              SQLITE_OK);
    sqlite3_bind_blob(st, 1, value.data(), static_cast<int>(value.size()), SQLITE_STATIC);
    EXPECT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(h);
  }
  retag_store(net, "bob-kme");
  ASSERT_TRUE(net.start_kme("bob-kme").ok());
  EXPECT_TRUE(wait_for_log(net, net.alice(), "another pool digest", 1))
      << net.log_tail(net.alice());
  expect_keys_flow_after_reset(net);
}

// The notices' numbers are compared too: here alice-kme's store "forgets" the notices it
// sent (its next notice number and outbox rolled back, as a restored copy of its file could
// leave it) while bob-kme has applied them. Resuming
// would let alice hand out again bytes bob has assigned; the link resets instead.
TEST(KmsCrash, NoticesTheOtherEndAppliedButThisEndForgotReset) {
  auto started = durable_network_with_a_full_pool();
  ASSERT_NE(started, nullptr);
  KmeNetwork& net = *started;
  for (int i = 0; i < 3; ++i) {
    const auto keys = enc_at_alice(net, 1);
    ASSERT_EQ(keys.size(), 1u);
    ASSERT_EQ(dec_at_bob(net, keys.front().first).first, 200u);  // bob applied its notice
  }
  net.stop_kme("alice-kme");
  {
    const auto db = (net.dir() / "alice-kme.db").string();
    sqlite3* h = nullptr;
    ASSERT_EQ(sqlite3_open(db.c_str(), &h), SQLITE_OK);
    EXPECT_EQ(sqlite3_exec(h,
                           "UPDATE meta SET value = 1 WHERE name = 'next_seq';"
                           "DELETE FROM outbox;",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(h);
  }
  retag_store(net, "alice-kme");
  ASSERT_TRUE(net.start_kme("alice-kme").ok());
  EXPECT_TRUE(wait_for_log(net, net.alice(), "notices were lost", 1))
      << net.log_tail(net.alice());
  expect_keys_flow_after_reset(net);
}

// With store.synchronous = "normal" a power loss or an OS crash may undo a KME's last
// commits, and with them the record of keys it delivered, so a store left open under
// another boot of the host is not trusted. bob-kme is killed and restarted as after a reboot
// (QKD_KMS_BOOT_ID, the store's view of the boot): it discards its pool, the link starts a
// new pool with alice-kme, none of the keys from before is served again, and keys flow. A
// store closed cleanly (alice-kme's, by SIGTERM) is whole across a reboot: the link resumes.
TEST(KmsCrash, NormalStoreLeftOpenAcrossARebootStartsANewPool) {
  auto started = durable_network_with_a_full_pool("normal");
  ASSERT_NE(started, nullptr);
  KmeNetwork& net = *started;
  const auto before = enc_at_alice(net, 3);
  ASSERT_EQ(before.size(), 3u);
  // Delivered; the other two wait at bob.
  ASSERT_EQ(dec_at_bob(net, before.front().first), std::make_pair(200u, before.front().second));
  {
    const qkd::test::ScopedEnv boot("QKD_KMS_BOOT_ID", "a-later-boot");
    net.stop_kme("alice-kme");
    ASSERT_TRUE(net.start_kme("alice-kme").ok());
    EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 1))
        << net.log_tail(net.alice());
    ASSERT_TRUE(net.crash_and_restart("bob-kme").ok());
  }
  EXPECT_TRUE(wait_for_log(net, net.bob(), "discarding its pool", 1)) << net.log_tail(net.bob());
  // The network's first session started without a pool too: this is the second.
  EXPECT_TRUE(wait_for_log(net, net.alice(), "the peer starts without a pool", 2))
      << net.log_tail(net.alice());
  expect_keys_flow_after_reset(net);
  for (const auto& [id, key] : before) {
    EXPECT_EQ(dec_at_bob(net, id).first, 400u) << id;
  }
}

// With store.synchronous = "full" a dec_keys delivery is written but not synced, so a power
// loss may undo it. bob-kme is killed and restarted as after a reboot (QKD_KMS_BOOT_ID): it
// discards the keys alice assigned it (fetched or not, none is served again) but keeps its
// pool, so the link resumes; alice, told at the session start, drops the keys she had
// prepared for enc_keys (their copies at bob are gone), and the keys she hands out from
// then on are served by bob.
TEST(KmsCrash, FullStoreLeftOpenAcrossARebootDiscardsTheKeysItHeld) {
  auto started = durable_network_with_a_full_pool();
  ASSERT_NE(started, nullptr);
  KmeNetwork& net = *started;
  const auto before = enc_at_alice(net, 3);
  ASSERT_EQ(before.size(), 3u);
  ASSERT_EQ(dec_at_bob(net, before.front().first), std::make_pair(200u, before.front().second));
  ASSERT_GT(wait_waiting_at_bob(net, [](double v) { return v > 2; }), 2.0)
      << "no prepared keys announced";
  {
    const qkd::test::ScopedEnv boot("QKD_KMS_BOOT_ID", "a-later-boot");
    ASSERT_TRUE(net.crash_and_restart("bob-kme").ok());
  }
  EXPECT_TRUE(wait_for_log(net, net.bob(), "the record of its last dec_keys deliveries may be lost", 1))
      << net.log_tail(net.bob());
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 1))
      << net.log_tail(net.alice());
  EXPECT_TRUE(wait_for_log(net, net.alice(), "the peer lost the keys assigned to it", 1))
      << net.log_tail(net.alice());
  EXPECT_EQ(count(net.log_tail(net.alice(), 1000000), "discarding both pools"), 0u);
  for (const auto& [id, key] : before) {
    EXPECT_EQ(dec_at_bob(net, id).first, 400u) << id;
  }
  const auto after = enc_at_alice(net, 3);
  ASSERT_EQ(after.size(), 3u);
  expect_bob_serves(net, after);
  // Told once: a later restart of bob (under the same boot) resumes without it.
  ASSERT_TRUE(net.restart_bob().ok());
  EXPECT_TRUE(wait_for_log(net, net.alice(), "established (resume)", 2))
      << net.log_tail(net.alice());
  EXPECT_EQ(count(net.log_tail(net.alice(), 1000000), "the peer lost the keys assigned to it"),
            1u);
}

}  // namespace
