// Unit tests of the server-side key prefetch and reservations (key_cache.hpp), of the
// client's keys announced ahead (ahead_keys.hpp) and of the secure-heap buffer that holds
// the keys (secure_buf.hpp).
#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "admission.hpp"
#include "admission_helpers.hpp"
#include "ahead_keys.hpp"
#include "key_cache.hpp"
#include "prov.hpp"
#include "secure_buf.hpp"

namespace qkd::prov {
namespace {

using Clock = KeyCache::Clock;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using qkd::core::Result;

// Takes with no deadline of their own (the fakes answer at once); tests of the deadline
// pass one.
const KeyCache::Deadline kNoDeadline = std::nullopt;

// A KME stand-in: every key distinct (its bytes carry its serial number), every call logged.
// Each test declares its fakes (and what its fetch functions refer to) before its caches:
// a cache's worker thread may call them until the cache's destructor has joined it.
struct FakeEnc {
  std::vector<std::uint32_t> asked;  // `number` of each call
  std::uint32_t serial = 0;
  std::uint32_t cap = 1024;  // more than this per call: rejected like a KME's 400

  Result<std::vector<qkd::etsi::Key>> operator()(std::uint32_t number) {
    asked.push_back(number);
    if (number > cap) {
      return make_error(ErrorCode::kRejected, "key service answered HTTP 400: number too large");
    }
    std::vector<qkd::etsi::Key> keys;
    for (std::uint32_t i = 0; i < number; ++i) {
      ++serial;
      char id[40];
      std::snprintf(id, sizeof id, "00000000-0000-4000-8000-%012x", serial);
      qkd::etsi::Key k;
      k.key_id = id;
      k.key = qkd::core::SecureBytes(32);
      for (std::size_t b = 0; b < 32; ++b) {
        k.key[b] = static_cast<std::uint8_t>(serial + b);
      }
      keys.push_back(std::move(k));
    }
    return keys;
  }
};

KeyCache::Fetch fetch_of(FakeEnc& enc) {
  return [&enc](std::uint32_t n, KeyCache::Deadline) { return enc(n); };
}

TEST(KeyCache, BatchGrowsUnderLoadAndEveryKeyIsHandedOutOnce) {
  KeyCacheLimits limits;
  limits.max_batch = 16;
  FakeEnc enc;
  KeyCache cache(limits);
  const auto now = Clock::now();
  std::set<std::string> ids;
  int hits = 0;
  for (int i = 0; i < 200; ++i) {
    auto k = cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
    ASSERT_EQ(k->key.size(), 32U);
    EXPECT_TRUE(ids.insert(uuid_format(k->key_id)).second) << "key handed out twice";
    hits += k->from_cache ? 1 : 0;
  }
  // 1, 2, 4, 8, then 16 per call: far fewer KME calls than handshakes.
  ASSERT_GE(enc.asked.size(), 5U);
  EXPECT_EQ(enc.asked[0], 1U);
  EXPECT_EQ(enc.asked[1], 2U);
  EXPECT_EQ(enc.asked[2], 4U);
  EXPECT_EQ(enc.asked[3], 8U);
  EXPECT_EQ(enc.asked[4], 16U);
  EXPECT_LE(enc.asked.size(), 17U);
  EXPECT_EQ(cache.batch("alice", 32), 16U);
  EXPECT_EQ(static_cast<std::size_t>(hits) + enc.asked.size(), 200U);
  EXPECT_EQ(ids.size() + cache.cached("alice", 32), enc.serial);  // nothing lost, nothing twice
}

TEST(KeyCache, SaesAndKeySizesAreKeptApart) {
  FakeEnc enc;
  KeyCache cache;
  const auto now = Clock::now();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc)).ok());
  }
  EXPECT_GT(cache.cached("alice", 32), 0U);
  EXPECT_EQ(cache.cached("carol", 32), 0U);
  const std::size_t before = enc.asked.size();
  auto k = cache.take("carol", nullptr, 32, now, kNoDeadline, fetch_of(enc));
  ASSERT_TRUE(k.ok());
  EXPECT_FALSE(k->from_cache);  // carol never gets alice's keys
  EXPECT_EQ(enc.asked.size(), before + 1);
  // A key of the wrong length for the caller is a bad reply, not a short secret.
  auto bad = cache.take("dave", nullptr, 64, now, kNoDeadline, fetch_of(enc));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kProtocol);
  EXPECT_NE(bad.error().message.find("key of 32 bytes, expected 64"), std::string::npos);
}

TEST(KeyCache, RareClientsCostOneKeyPerHandshakeAndNoneIsHeld) {
  KeyCacheLimits limits;
  limits.max_age = std::chrono::seconds(10);
  FakeEnc enc;
  KeyCache cache(limits);
  auto t = Clock::now();
  for (int i = 0; i < 5; ++i) {
    t += std::chrono::seconds(6);  // slower than max_age / 2: the batch never grows
    ASSERT_TRUE(cache.take("alice", nullptr, 32, t, kNoDeadline, fetch_of(enc)).ok());
  }
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 1, 1, 1, 1}));
  EXPECT_EQ(cache.cached("alice", 32), 0U);
}

TEST(KeyCache, OldKeysExpireUnusedAndTheBatchShrinks) {
  KeyCacheLimits limits;
  limits.max_batch = 8;
  limits.max_age = std::chrono::seconds(10);
  FakeEnc enc;
  KeyCache cache(limits);
  const auto t0 = Clock::now();
  for (int i = 0; i < 9; ++i) {  // 1 + 2 + 4 keys fetched, then a batch of 8
    ASSERT_TRUE(cache.take("alice", nullptr, 32, t0, kNoDeadline, fetch_of(enc)).ok());
  }
  ASSERT_EQ(cache.batch("alice", 32), 8U);
  const std::size_t held = cache.cached("alice", 32);
  ASSERT_GT(held, 0U);
  auto k = cache.take("alice", nullptr, 32, t0 + std::chrono::seconds(11), kNoDeadline, fetch_of(enc));
  ASSERT_TRUE(k.ok());
  EXPECT_FALSE(k->from_cache);  // the held keys were too old
  EXPECT_EQ(cache.stats().expired, held);
  EXPECT_LT(cache.batch("alice", 32), 8U);
}

TEST(KeyCache, KmeCappingTheNumberFallsBackToOneKey) {
  KeyCacheLimits limits;
  limits.max_batch = 32;
  limits.cap_retry = std::chrono::seconds(5);
  FakeEnc enc;
  KeyCache cache(limits);
  enc.cap = 1;
  const auto now = Clock::now();
  for (int i = 0; i < 6; ++i) {
    auto k = cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
  }
  // 1, then 2 refused and retried with 1; from then on one key per call, not 2 again...
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 2, 1, 1, 1, 1, 1}));
  EXPECT_EQ(cache.batch("alice", 32), 1U);
  // ... for limits.cap_retry (60 s by default, 5 s here), while the SAE stays in use: the
  // refusal may have been passing (the KME short of keys). Then larger batches are tried
  // again: here the KME takes 4 by now, and the batch doubles again, to 2 then 4.
  enc.cap = 4;
  const auto later = now + std::chrono::seconds(6);
  for (int i = 0; i < 3; ++i) {
    auto k = cache.take("alice", nullptr, 32, later, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
  }
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 2, 1, 1, 1, 1, 1, 2, 4}));
  EXPECT_EQ(cache.batch("alice", 32), 4U);
}

TEST(KeyCache, FetchErrorsReachTheCaller) {
  KeyCache cache;
  auto k = cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, [](std::uint32_t, KeyCache::Deadline) -> Result<std::vector<qkd::etsi::Key>> {
    return make_error(ErrorCode::kUnavailable, "key service unreachable: https://x");
  });
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.error().code, ErrorCode::kUnavailable);
  auto bad_id = cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, [](std::uint32_t, KeyCache::Deadline) -> Result<std::vector<qkd::etsi::Key>> {
    std::vector<qkd::etsi::Key> keys(1);
    keys[0].key_id = "not-a-uuid";
    keys[0].key = qkd::core::SecureBytes(32);
    return keys;
  });
  ASSERT_FALSE(bad_id.ok());
  EXPECT_EQ(bad_id.error().code, ErrorCode::kProtocol);
}

// One deadline per handshake operation: the retry after a refused batch gets the take's
// deadline, not a timeout of its own (a slow refusal then a slow retry would hold the
// handshake for two timeouts); a refill on another thread, which nobody waits for, none.
TEST(KeyCache, FetchesInLineEndByTheTakesDeadlineRefillsHaveNone) {
  KeyCacheLimits limits;
  limits.refill_ahead = true;
  std::mutex mu;
  FakeEnc enc;
  enc.cap = 1;  // a batch is refused: the take retries with one key
  std::vector<std::pair<std::uint32_t, KeyCache::Deadline>> in_line, elsewhere;
  const auto me = std::this_thread::get_id();
  const KeyCache::Fetch fetch = [&](std::uint32_t n, KeyCache::Deadline d) {
    std::lock_guard lock(mu);
    (std::this_thread::get_id() == me ? in_line : elsewhere).emplace_back(n, d);
    return enc(n);
  };
  KeyCache cache(limits);
  const auto now = Clock::now();
  const auto d1 = now + std::chrono::milliseconds(500);
  const auto d2 = now + std::chrono::milliseconds(700);
  ASSERT_TRUE(cache.take("alice", nullptr, 32, now, d1, fetch).ok());
  ASSERT_TRUE(cache.take("alice", nullptr, 32, now, d2, fetch).ok());  // 2 refused, then 1
  const std::vector<std::pair<std::uint32_t, KeyCache::Deadline>> want{{1, d1}, {2, d2}, {1, d2}};
  EXPECT_EQ(in_line, want);
  // Another SAE, whose KME takes batches: its third take is a hit that leaves it low and
  // starts a refill on another thread.
  enc.cap = 1024;
  const auto d3 = now + std::chrono::milliseconds(900);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(cache.take("bob", nullptr, 32, now, d3, fetch).ok());
  }
  cache.shutdown();
  std::lock_guard lock(mu);
  for (std::size_t i = want.size(); i < in_line.size(); ++i) {
    EXPECT_EQ(in_line[i].second, d3);
  }
  ASSERT_FALSE(elsewhere.empty());
  for (const auto& [n, d] : elsewhere) {
    EXPECT_FALSE(d.has_value()) << "a refill of " << n << " got a deadline";
  }
}

TEST(KeyCache, TotalHeldIsBounded) {
  KeyCacheLimits limits;
  limits.max_batch = 64;
  limits.max_total = 10;
  FakeEnc enc;
  KeyCache cache(limits);
  const auto now = Clock::now();
  for (const char* sae : {"a", "b", "c"}) {
    for (int i = 0; i < 40; ++i) {
      ASSERT_TRUE(cache.take(sae, nullptr, 32, now, kNoDeadline, fetch_of(enc)).ok());
      EXPECT_LE(cache.cached("a", 32) + cache.cached("b", 32) + cache.cached("c", 32), 10U);
    }
  }
  EXPECT_EQ(cache.stats().expired, 0U);  // the batch fits the room: no key wasted
}

// Runs `child` in a forked child under a 5 s alarm: its result (0-255), or -1 when the
// child did not exit by itself (killed by the alarm: blocked), -2 when fork() failed.
int in_child(const std::function<int()>& child) {
  const pid_t pid = ::fork();
  if (pid < 0) {
    return -2;
  }
  if (pid == 0) {
    ::alarm(5);
    ::_exit(child());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(KeyCache, ForkedChildDropsInheritedKeys) {
  FakeEnc enc;
  KeyCache cache;
  const auto now = Clock::now();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc)).ok());
  }
  ASSERT_GT(cache.cached("alice", 32), 0U);
  EXPECT_EQ(in_child([&] {
              // The child must not hand out a key the parent may hand out too: its first
              // take fetches, and nothing inherited is left.
              int bad = cache.cached("alice", 32) == 0 ? 0 : 1;
              FakeEnc child_enc;
              auto k = cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(child_enc));
              bad |= (k.ok() && !k->from_cache && child_enc.asked.size() == 1) ? 0 : 2;
              bad |= cache.stats().dropped_on_fork > 0 ? 0 : 4;
              return bad;
            }),
            0);
  EXPECT_GT(cache.cached("alice", 32), 0U);  // the parent keeps its own
}

TEST(KeyCache, ConcurrentTakersNeverShareAKey) {
  std::mutex mu;
  std::uint32_t serial = 0;
  std::set<std::string> ids;
  std::atomic<int> dup{0};
  const auto fetch = [&](std::uint32_t n, KeyCache::Deadline) -> Result<std::vector<qkd::etsi::Key>> {
    std::vector<qkd::etsi::Key> keys(n);
    std::lock_guard lock(mu);
    for (auto& k : keys) {
      char id[40];
      std::snprintf(id, sizeof id, "00000000-0000-4000-8000-%012x", ++serial);
      k.key_id = id;
      k.key = qkd::core::SecureBytes(32);
    }
    return keys;
  };
  KeyCache cache;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 250; ++i) {
        auto k = cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, fetch);
        if (!k.ok()) {
          ++dup;
          continue;
        }
        std::lock_guard lock(mu);
        if (!ids.insert(uuid_format(k->key_id)).second) {
          ++dup;
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(dup.load(), 0);
  EXPECT_EQ(ids.size(), 1000U);
  EXPECT_EQ(ids.size() + cache.cached("alice", 32), serial);
}

// Refill ahead: once a batch runs low, another thread tops the cache up, so the SAE's next
// takes are hits; shutdown() waits for that thread; keys stay distinct.
TEST(KeyCache, RefillAheadTopsUpOnAnotherThread) {
  KeyCacheLimits limits;
  limits.max_batch = 8;
  limits.refill_ahead = true;
  std::mutex mu;
  std::uint32_t serial = 0;
  std::set<std::thread::id> fetch_threads;
  const auto fetch = [&](std::uint32_t n, KeyCache::Deadline) -> Result<std::vector<qkd::etsi::Key>> {
    std::lock_guard lock(mu);
    fetch_threads.insert(std::this_thread::get_id());
    std::vector<qkd::etsi::Key> keys(n);
    for (auto& k : keys) {
      char id[40];
      std::snprintf(id, sizeof id, "00000000-0000-4000-8000-%012x", ++serial);
      k.key_id = id;
      k.key = qkd::core::SecureBytes(32);
    }
    return keys;
  };
  std::set<std::string> ids;
  int misses = 0;
  {
    KeyCache cache(limits);
    for (int i = 0; i < 200; ++i) {
      auto k = cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, fetch);
      ASSERT_TRUE(k.ok());
      EXPECT_TRUE(ids.insert(uuid_format(k->key_id)).second);
      misses += k->from_cache ? 0 : 1;
      if (i % 4 == 3) {
        // Let the refill thread run (no timing assertion: the count below holds whatever
        // the interleaving; this only makes refills ahead likely).
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    }
    // The third take is a hit that leaves the cache empty: a refill thread starts then at
    // the latest. shutdown() joins it, so its fetch is counted below whatever the timing.
    cache.shutdown();  // idempotent with the destructor
    EXPECT_GT(cache.stats().background_fetches, 0U);
    std::lock_guard lock(mu);
    // Every key fetched was handed out once, is still held, or was cleansed unused (a
    // refill that lands after shutdown() began is dropped: the keys lost at unload).
    EXPECT_EQ(ids.size() + cache.cached("alice", 32) + cache.stats().expired, serial);
  }
  EXPECT_GT(fetch_threads.size(), 1U);  // fetched on the caller's thread and another one
  EXPECT_LT(misses, 200);
}

// --- keys announced ahead, server side: reservations per client_id ------------------------

ClientId client_id_of(std::uint8_t v) {
  ClientId id{};
  id.fill(v);
  return id;
}

// A client_id seen twice gets key_IDs announced; its later takes are served from them, in
// order; nobody else (another client_id, a share without one) ever gets an announced key.
TEST(KeyCache, ReservedKeysGoOnlyToTheirClientIdInTheOrderAnnounced) {
  KeyCacheLimits limits;
  limits.max_batch = 16;
  limits.announce = 8;
  FakeEnc enc;
  KeyCache cache(limits);
  const auto now = Clock::now();
  const ClientId a = client_id_of(0xA1), b = client_id_of(0xB2);
  std::deque<std::string> announced_a;
  std::set<std::string> all_announced_a, handed;
  int reserved_uses = 0;
  int top_ups = 0;
  for (int i = 0; i < 60; ++i) {
    auto k = cache.take("alice", &a, 32, now, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
    const std::string id = uuid_format(k->key_id);
    EXPECT_TRUE(handed.insert(id).second) << "key handed out twice";
    if (i == 0) {
      EXPECT_TRUE(k->ahead.empty()) << "nothing announced to a client_id seen once";
    }
    if (all_announced_a.empty() && !k->ahead.empty()) {
      EXPECT_LE(k->ahead.size(), 2U) << "a new client_id earns more by using what it got";
    }
    if (!announced_a.empty()) {
      EXPECT_EQ(id, announced_a.front()) << "reserved keys go out in the order announced";
      announced_a.pop_front();
      ++reserved_uses;
    }
    if (!k->ahead.empty() && !announced_a.empty()) {
      // A top-up while keys are still reserved comes in a batch (each costs the client a
      // call): at least half of what was missing.
      EXPECT_GE(k->ahead.size(), (8 - announced_a.size()) / 2);
      ++top_ups;
    }
    for (const KeyId& next : k->ahead) {
      announced_a.push_back(uuid_format(next));
      all_announced_a.insert(uuid_format(next));
    }
    EXPECT_LE(announced_a.size(), 8U);
    // Others in between: never a key announced to a.
    for (const ClientId* other : {&b, static_cast<const ClientId*>(nullptr)}) {
      auto o = cache.take("alice", other, 32, now, kNoDeadline, fetch_of(enc));
      ASSERT_TRUE(o.ok());
      EXPECT_EQ(all_announced_a.count(uuid_format(o->key_id)), 0U);
      EXPECT_TRUE(handed.insert(uuid_format(o->key_id)).second);
    }
  }
  EXPECT_GT(reserved_uses, 40);
  EXPECT_LT(top_ups, 60 / 4);  // batches, not a key or two per handshake
  EXPECT_EQ(cache.reserved("alice", a, 32), announced_a.size());
  // b's own reservation serves b too.
  EXPECT_GE(cache.stats().reserved_hits, static_cast<std::uint64_t>(reserved_uses));
  EXPECT_GT(cache.stats().announced, 0U);
}

TEST(KeyCache, ReservedKeysExpireAndAnnounceZeroAnnouncesNothing) {
  KeyCacheLimits limits;
  limits.max_batch = 8;
  limits.announce = 4;
  limits.max_age = std::chrono::seconds(10);
  FakeEnc enc;
  KeyCache cache(limits);
  const auto t0 = Clock::now();
  const ClientId a = client_id_of(1);
  std::set<std::string> announced;
  for (int i = 0; i < 6; ++i) {
    auto k = cache.take("alice", &a, 32, t0, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok());
    for (const KeyId& id : k->ahead) {
      announced.insert(uuid_format(id));
    }
  }
  ASSERT_GT(cache.reserved("alice", a, 32), 0U);
  // Past max_age the client may have dropped them: never handed out, cleansed instead.
  auto late = cache.take("alice", &a, 32, t0 + std::chrono::seconds(11), kNoDeadline, fetch_of(enc));
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(announced.count(uuid_format(late->key_id)), 0U);
  EXPECT_GT(cache.stats().expired, 0U);

  limits.announce = 0;
  KeyCache quiet(limits);
  for (int i = 0; i < 20; ++i) {
    auto k = quiet.take("alice", &a, 32, t0, kNoDeadline, fetch_of(enc));
    ASSERT_TRUE(k.ok());
    EXPECT_TRUE(k->ahead.empty());
  }
  EXPECT_EQ(quiet.stats().announced, 0U);
}

TEST(KeyCache, ForkedChildHasNoReservation) {
  KeyCacheLimits limits;
  limits.announce = 4;
  FakeEnc enc;
  KeyCache cache(limits);
  const auto now = Clock::now();
  const ClientId a = client_id_of(7);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(cache.take("alice", &a, 32, now, kNoDeadline, fetch_of(enc)).ok());
  }
  ASSERT_GT(cache.reserved("alice", a, 32), 0U);
  EXPECT_EQ(in_child([&] { return cache.reserved("alice", a, 32) == 0 ? 0 : 1; }), 0);
  EXPECT_GT(cache.reserved("alice", a, 32), 0U);
}

// --- keys announced ahead, client side (ahead_keys.hpp) -----------------------------------

// A client's KME stand-in: hands each key out once, all or nothing per call (ETSI 014).
struct FakeDec {
  std::mutex mu;
  std::map<std::string, std::uint8_t> deliverable;  // key_ID -> first key byte
  std::vector<std::size_t> calls;                    // key_IDs per call
  bool lose_replies = false;  // consume the keys, then fail as a dropped connection would
  bool throw_bad_alloc = false;
  std::chrono::milliseconds delay{0};
  std::size_t slow_size = 0;         // 0: every call waits `delay`; else calls of this size
  std::size_t max_per_request = 0;   // 0: no cap; else larger calls are refused (400)

  KeyId add(std::uint8_t v) {
    char text[40];
    std::snprintf(text, sizeof text, "11111111-0000-4000-8000-%012x", static_cast<unsigned>(v));
    std::lock_guard lock(mu);
    deliverable[text] = v;
    return uuid_parse(text).value();
  }
  Result<std::vector<qkd::etsi::Key>> operator()(const std::string& /*master*/,
                                                std::span<const std::string> ids) {
    if (slow_size == 0 || ids.size() == slow_size) {
      std::this_thread::sleep_for(delay);
    }
    if (throw_bad_alloc) {
      throw std::bad_alloc();
    }
    std::lock_guard lock(mu);
    calls.push_back(ids.size());
    if (max_per_request != 0 && ids.size() > max_per_request) {
      return make_error(ErrorCode::kRejected, "key service answered HTTP 400: too many keys");
    }
    for (const auto& id : ids) {
      if (deliverable.count(id) == 0) {
        return make_error(ErrorCode::kRejected, "key service answered HTTP 400: key not found");
      }
    }
    std::vector<qkd::etsi::Key> out;
    for (const auto& id : ids) {
      qkd::etsi::Key k;
      k.key_id = id;
      k.key = qkd::core::SecureBytes(32);
      k.key[0] = deliverable[id];
      deliverable.erase(id);
      out.push_back(std::move(k));
    }
    if (lose_replies) {
      return make_error(ErrorCode::kUnavailable, "connection closed by the KME");
    }
    return out;
  }
  std::size_t call_count() {
    std::lock_guard lock(mu);
    return calls.size();
  }
};

// Polls `done` for up to 10 s (no timing is asserted: a loaded machine only waits longer).
template <typename F>
bool wait_until(F done) {
  for (int i = 0; i < 10'000; ++i) {
    if (done()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

AheadKeys::Fetch dec_of(FakeDec& dec) {
  return [&dec](const std::string& m, std::span<const std::string> ids, AheadKeys::Deadline) {
    return dec(m, ids);
  };
}

TEST(AheadKeys, AnnouncedKeysComeWithTheFirstCallAndNeedNoneLater) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(10), k1 = dec.add(11), k2 = dec.add(12), k3 = dec.add(13),
              k4 = dec.add(14), k5 = dec.add(15);
  const auto now = AheadKeys::Clock::now();
  auto first = ahead.take("bob", k0, {k1, k2, k3}, me, 32, now, kNoDeadline, dec_of(dec));
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_EQ(first->span()[0], 10);
  ASSERT_EQ(dec.calls, (std::vector<std::size_t>{4}));  // one call for the key and the three
  EXPECT_EQ(ahead.held(), 3U);
  auto second = ahead.take("bob", k1, {}, me, 32, now, kNoDeadline, dec_of(dec));
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->span()[0], 11);
  EXPECT_EQ(dec.call_count(), 1U);  // no call
  // A held key whose ciphertext announces more: those are fetched on the worker thread.
  auto third = ahead.take("bob", k2, {k4, k5}, me, 32, now, kNoDeadline, dec_of(dec));
  ASSERT_TRUE(third.ok());
  ASSERT_TRUE(wait_until([&] { return ahead.stats().background_fetches == 1; }));
  EXPECT_EQ(ahead.held(), 3U);  // k3, k4, k5
  auto fourth = ahead.take("bob", k4, {}, me, 32, now, kNoDeadline, dec_of(dec));
  ASSERT_TRUE(fourth.ok()) << fourth.error().message;
  EXPECT_EQ(fourth->span()[0], 14);
  ahead.shutdown();
  EXPECT_EQ(dec.call_count(), 2U);
  EXPECT_EQ(ahead.stats().hits, 3U);
  // Asked again, a key handed out is the KME's to refuse: never served twice from here.
  EXPECT_FALSE(ahead.take("bob", k1, {}, me, 32, now, kNoDeadline, dec_of(dec)).ok());
  (void)k3;
}

TEST(AheadKeys, ARefusedAnnouncementCostsOnlyARetry) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1);
  KeyId bogus{};
  bogus.fill(0x42);
  auto id_before = ahead.client_id();
  ASSERT_TRUE(id_before.ok() && id_before->has_value());
  auto k = ahead.take("bob", k0, {bogus}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{2, 1}));  // together, then the key alone
  EXPECT_EQ(ahead.held(), 0U);
  EXPECT_EQ(ahead.client_id().value(), id_before.value());  // a clean refusal consumed nothing
}

TEST(AheadKeys, ALostReplyChangesTheClientId) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  auto id_before = ahead.client_id().value();
  dec.lose_replies = true;
  auto k = ahead.take("bob", k0, {k1}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
  EXPECT_FALSE(k.ok());
  // k1 may be consumed at the KME without having reached us: the server's reservation for
  // the old client_id must never be used again.
  auto id_after = ahead.client_id().value();
  ASSERT_TRUE(id_after.has_value());
  EXPECT_NE(id_after, id_before);
  EXPECT_EQ(ahead.stats().client_id_changes, 1U);
}

TEST(AheadKeys, ConcurrentTakesOfAKeyInFlightWaitForThatCall) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  dec.delay = std::chrono::milliseconds(30);
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  Result<SecureBuf> r0 = make_error(ErrorCode::kInternal, "not run");
  Result<SecureBuf> r1 = make_error(ErrorCode::kInternal, "not run");
  std::thread t0([&] { r0 = ahead.take("bob", k0, {k1}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // likely in flight by now
  std::thread t1([&] { r1 = ahead.take("bob", k1, {}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec)); });
  t0.join();
  t1.join();
  // Whatever the interleaving (t1 waits for the call, or finds k1 held, or runs first and
  // fetches k1 itself), every key is delivered once and both takes succeed.
  ASSERT_TRUE(r0.ok()) << r0.error().message;
  ASSERT_TRUE(r1.ok()) << r1.error().message;
  EXPECT_EQ(r0->span()[0], 1);
  EXPECT_EQ(r1->span()[0], 2);
  EXPECT_LE(dec.call_count(), 2U);
}

// One deadline per handshake operation: the call for a key and announced ones, and the
// retry of the key alone after a refusal, get the take's deadline; the worker's calls,
// which nobody waits for, none.
TEST(AheadKeys, CallsInLineEndByTheTakesDeadlineTheWorkersHaveNone) {
  FakeDec dec;
  std::mutex mu;
  std::vector<std::pair<std::size_t, AheadKeys::Deadline>> in_line, elsewhere;
  const auto me_thread = std::this_thread::get_id();
  const AheadKeys::Fetch fetch = [&](const std::string& m, std::span<const std::string> ids,
                                     AheadKeys::Deadline d) {
    {
      std::lock_guard lock(mu);
      (std::this_thread::get_id() == me_thread ? in_line : elsewhere).emplace_back(ids.size(), d);
    }
    return dec(m, ids);
  };
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  KeyId bogus{};
  bogus.fill(0x42);
  const auto now = AheadKeys::Clock::now();
  const auto d = now + std::chrono::milliseconds(800);
  ASSERT_TRUE(ahead.take("bob", k1, {k2}, me, 32, now, d, fetch).ok());
  // k2 is held now: its take needs no call, and the key_ID it announces goes to the worker.
  const KeyId k3 = dec.add(4);
  ASSERT_TRUE(ahead.take("bob", k2, {k3}, me, 32, now, d, fetch).ok());
  ASSERT_TRUE(wait_until([&] { return ahead.stats().background_fetches == 1; }));
  ASSERT_TRUE(ahead.take("bob", k0, {bogus}, me, 32, now, d, fetch).ok());  // refused, retried
  ahead.shutdown();
  std::lock_guard lock(mu);
  const std::vector<std::pair<std::size_t, AheadKeys::Deadline>> want{{2, d}, {2, d}, {1, d}};
  EXPECT_EQ(in_line, want);
  ASSERT_EQ(elsewhere.size(), 1U);
  EXPECT_FALSE(elsewhere[0].second.has_value());
}

// A take whose operation has no time left (spent waiting for another call) makes no call of
// its own: keys fetched now would be consumed at the KME unread, and the announced ones
// taken for lost. The announced key goes to the worker, which fetches it without a deadline.
TEST(AheadKeys, NoCallOnceTheDeadlineHasPassed) {
  FakeDec dec;
  std::mutex mu;
  std::vector<AheadKeys::Deadline> calls;
  const AheadKeys::Fetch fetch = [&](const std::string& m, std::span<const std::string> ids,
                                     AheadKeys::Deadline d) {
    {
      std::lock_guard lock(mu);
      calls.push_back(d);
    }
    return dec(m, ids);
  };
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k1 = dec.add(1), k2 = dec.add(2);
  const auto now = AheadKeys::Clock::now();
  auto got = ahead.take("bob", k1, {k2}, me, 32, now, now - std::chrono::milliseconds(1), fetch);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.error().code, ErrorCode::kTimeout) << got.error().message;
  ASSERT_TRUE(wait_until([&] { return ahead.held() == 1; })) << "the announced key was not fetched";
  ahead.shutdown();
  std::lock_guard lock(mu);
  ASSERT_EQ(calls.size(), 1U) << "a call was made after the deadline";
  EXPECT_FALSE(calls[0].has_value()) << "the announced key was fetched in line";
  EXPECT_EQ(ahead.client_id().value(), me) << "the client_id was replaced";
}

// A take whose key another call is fetching waits for that call only until the operation's
// deadline (it used to wait the full timeout, then make a call of its own with another).
TEST(AheadKeys, AWaitForACallInFlightEndsByTheDeadline) {
  FakeDec dec;
  std::atomic<bool> entered{false};
  const AheadKeys::Fetch slow = [&](const std::string& m, std::span<const std::string> ids,
                                    AheadKeys::Deadline) {
    entered = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    return dec(m, ids);
  };
  AheadLimits limits;
  limits.wait = std::chrono::milliseconds(5000);
  AheadKeys ahead(limits);
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  Result<SecureBuf> r0 = make_error(ErrorCode::kInternal, "not run");
  std::thread t0([&] {
    r0 = ahead.take("bob", k0, {k1}, me, 32, AheadKeys::Clock::now(), kNoDeadline, slow);
  });
  ASSERT_TRUE(wait_until([&] { return entered.load(); }));  // k1 is in flight
  const auto t = AheadKeys::Clock::now();
  auto r1 = ahead.take("bob", k1, {}, me, 32, t, t + std::chrono::milliseconds(200), dec_of(dec));
  const auto took = AheadKeys::Clock::now() - t;
  t0.join();
  ASSERT_FALSE(r1.ok());
  EXPECT_EQ(r1.error().code, ErrorCode::kTimeout) << r1.error().message;
  // Not a timing assertion: the call in flight takes 1500 ms, so a wait that ignored the
  // deadline would end no sooner than that.
  EXPECT_LT(took, std::chrono::milliseconds(1200));
  EXPECT_EQ(dec.call_count(), 1U);  // no call of its own after the deadline
  ASSERT_TRUE(r0.ok()) << r0.error().message;
}

TEST(AheadKeys, AFullCacheLeavesAnnouncementsToBeFetchedWhenUsed) {
  AheadLimits limits;
  limits.max_keys = 2;
  FakeDec dec;
  AheadKeys ahead(limits);
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3), k3 = dec.add(4);
  const auto now = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2, k3}, me, 32, now, kNoDeadline, dec_of(dec)).ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{3}));  // k0, then room for 2 announced
  EXPECT_EQ(ahead.stats().not_fetched, 1U);
  EXPECT_EQ(ahead.held(), 2U);
  auto k3_key = ahead.take("bob", k3, {}, me, 32, now, kNoDeadline, dec_of(dec));  // fetched when used
  ASSERT_TRUE(k3_key.ok());
  EXPECT_EQ(k3_key->span()[0], 4);
  EXPECT_EQ(dec.call_count(), 2U);
  (void)k2;
}

TEST(AheadKeys, HeldKeysExpireAndNoClientIdWhenOff) {
  AheadLimits limits;
  limits.max_age = std::chrono::seconds(10);
  FakeDec dec;
  AheadKeys ahead(limits);
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  const auto t0 = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1}, me, 32, t0, kNoDeadline, dec_of(dec)).ok());
  ASSERT_EQ(ahead.held(), 1U);
  ASSERT_TRUE(ahead.take("bob", k2, {}, me, 32, t0 + std::chrono::seconds(12), kNoDeadline, dec_of(dec)).ok());
  EXPECT_EQ(ahead.held(), 0U);
  EXPECT_EQ(ahead.stats().expired, 1U);
  // A server keeping reservations longer than this client keeps keys could still hand that
  // key out: the client_id is replaced so that it never will.
  EXPECT_EQ(ahead.stats().client_id_changes, 1U);
  EXPECT_NE(ahead.client_id().value(), me);

  limits.max_keys = 0;
  AheadKeys off(limits);
  auto id = off.client_id();
  ASSERT_TRUE(id.ok());
  EXPECT_FALSE(id->has_value());
}

// A handshake whose key sits in a batch that has not started is not held up behind the
// batches before it: the key is taken out and fetched at once.
TEST(AheadKeys, AKeyInAQueuedBatchIsFetchedAtOnce) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  dec.delay = std::chrono::milliseconds(1000);
  dec.slow_size = 3;  // the first background batch (3 key_IDs) takes a second
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  const KeyId a1 = dec.add(11), a2 = dec.add(12), a3 = dec.add(13);
  const KeyId b1 = dec.add(21), b2 = dec.add(22), b3 = dec.add(23), b4 = dec.add(24);
  const auto now = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2}, me, 32, now, kNoDeadline, dec_of(dec)).ok());  // 3 ids: slow
  ASSERT_TRUE(ahead.take("bob", k1, {a1, a2, a3}, me, 32, now, kNoDeadline, dec_of(dec)).ok());  // job 1
  ASSERT_TRUE(ahead.take("bob", k2, {b1, b2, b3, b4}, me, 32, now, kNoDeadline, dec_of(dec)).ok());  // job 2
  auto k = ahead.take("bob", b2, {}, me, 32, now, kNoDeadline, dec_of(dec));  // behind job 1
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_EQ(k->span()[0], 22);
  EXPECT_EQ(ahead.stats().taken_from_queue, 1U);
  ahead.shutdown();
  // b2 was fetched alone, once; the rest of job 2 (3 key_IDs) by the worker, or not at all
  // if shutdown came first.
  std::lock_guard lock(dec.mu);
  EXPECT_EQ(std::count(dec.calls.begin(), dec.calls.end(), 1U), 1);
  EXPECT_EQ(dec.deliverable.count(uuid_format(b2)), 0U);
  (void)b1, (void)b3, (void)b4;
}

// Announcements made to a key share with an earlier client_id (replaced since, or a forked
// parent's) are left to that client_id: the key is fetched, the announced ones are not.
TEST(AheadKeys, AnnouncementsToAnotherClientIdAreNotFetched) {
  FakeDec dec;
  AheadKeys ahead;
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  ClientId someone_else{};
  someone_else.fill(0x5A);
  auto k = ahead.take("bob", k0, {k1}, someone_else, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{1}));
  EXPECT_EQ(ahead.held(), 0U);
  auto none = ahead.take("bob", k1, {}, std::nullopt, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
  ASSERT_TRUE(none.ok());  // fetched when used
}

// A KME that caps the key_IDs per request: the combined call is refused, the key is asked
// for alone, and later calls ask for fewer.
TEST(AheadKeys, AKmeCapOnKeysPerRequestIsLearned) {
  FakeDec dec;
  AheadLimits limits;
  limits.cap_retry = std::chrono::seconds(5);
  AheadKeys ahead(limits);
  const auto me = ahead.client_id().value();
  dec.max_per_request = 4;
  std::vector<KeyId> ids;
  for (std::uint8_t i = 0; i < 40; ++i) {
    ids.push_back(dec.add(i));
  }
  const std::vector<KeyId> announced(ids.begin() + 1, ids.begin() + 33);
  auto k = ahead.take("bob", ids[0], announced, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{33, 1}));
  EXPECT_EQ(ahead.client_id().value(), me);  // a clean refusal consumed nothing
  // Now at most 16 per call; a refusal of 7 halves that to 3: the key and 2 announced.
  const std::vector<KeyId> six(ids.begin() + 34, ids.end());
  ASSERT_TRUE(ahead.take("bob", ids[33], six, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec)).ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{33, 1, 7, 1}));
  const std::vector<KeyId> three(ids.begin() + 35, ids.begin() + 38);
  ASSERT_TRUE(ahead.take("bob", ids[34], three, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec)).ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{33, 1, 7, 1, 3}));
  // For limits.cap_retry (60 s by default, 5 s here): the refusal may have been passing (a
  // spent admission budget, key_IDs a peer made up). Then the full number is tried again.
  dec.max_per_request = 64;
  std::vector<KeyId> more;
  for (std::uint8_t i = 100; i < 110; ++i) {
    more.push_back(dec.add(i));
  }
  const std::vector<KeyId> nine(more.begin() + 1, more.end());
  ASSERT_TRUE(ahead.take("bob", more[0], nine, me, 32,
                         AheadKeys::Clock::now() + std::chrono::seconds(6), kNoDeadline,
                         dec_of(dec))
                  .ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{33, 1, 7, 1, 3, 10}));
}

// An exception in a KME call (a full secure heap, say) neither kills the process from the
// worker thread nor leaves key_IDs marked in flight.
TEST(AheadKeys, AnExceptionInAFetchIsAnError) {
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3), k3 = dec.add(4);
  const auto now = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1}, me, 32, now, kNoDeadline, dec_of(dec)).ok());
  dec.throw_bad_alloc = true;
  ASSERT_TRUE(ahead.take("bob", k1, {k2, k3}, me, 32, now, kNoDeadline, dec_of(dec)).ok());  // held: worker
  ASSERT_TRUE(wait_until([&] { return ahead.stats().background_fetches == 1; }));
  ahead.shutdown();  // the worker's call threw; it ended cleanly
  EXPECT_EQ(ahead.stats().client_id_changes, 1U);  // the batch may be lost: new client_id
  auto k = ahead.take("bob", k2, {}, std::nullopt, 32, now, kNoDeadline, dec_of(dec));
  ASSERT_FALSE(k.ok());
  EXPECT_NE(k.error().message.find("KME call failed"), std::string::npos) << k.error().message;
  dec.throw_bad_alloc = false;
  EXPECT_TRUE(ahead.take("bob", k2, {}, std::nullopt, 32, now, kNoDeadline, dec_of(dec)).ok());  // not stuck
}

TEST(AheadKeys, ForkedChildDropsHeldKeysAndTakesANewClientId) {
  if (CRYPTO_secure_malloc_initialized() == 0) {
    ASSERT_EQ(CRYPTO_secure_malloc_init(64 * 1024, 32), 1);
  }
  FakeDec dec;
  AheadKeys ahead;
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec)).ok());
  ASSERT_EQ(ahead.held(), 2U);
  EXPECT_TRUE(ahead.all_in_secure_heap());
  const auto parent_id = ahead.client_id().value();
  EXPECT_EQ(in_child([&] {
              int bad = ahead.held() == 0 ? 0 : 1;
              auto child_id = ahead.client_id();
              bad |= (child_id.ok() && child_id->has_value() && *child_id != parent_id) ? 0 : 2;
              return bad;
            }),
            0);
  EXPECT_EQ(ahead.held(), 2U);  // the parent keeps its own
  EXPECT_EQ(ahead.client_id().value(), parent_id);
}

// Forks `children` children one after another (while the caller's threads go on), each
// running `child` under a 5 s alarm; returns how many failed or were killed by the alarm
// (blocked). Stops at the first such child, so that a failing test ends within seconds.
int children_that_fail(const std::function<bool()>& child, int children = 40) {
  for (int i = 0; i < children; ++i) {
    if (in_child([&] { return child() ? 0 : 1; }) != 0) {
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return 0;
}

// fork() while other threads hold the caches' locks (or wait on the client's condition
// variable): the child's first use must not block (pthread_atfork handlers take the locks
// around fork()). Each child uses both caches under a 5 s alarm and reports (without the
// handlers, children block and are killed by the alarm).
TEST(ForkGuard, ChildrenForkedUnderLoadUseTheCachesWithoutBlocking) {
  // OpenSSL's secure heap has a lock of its own that no fork handler takes: a child forked
  // while another thread is inside OPENSSL_secure_zalloc/free blocks at its first use of
  // it (docs/SECURITY.md). That is OpenSSL's, not the caches', so this test runs without a
  // secure heap (earlier tests in this binary made one and freed all they took).
  if (CRYPTO_secure_malloc_initialized() != 0) {
    ASSERT_EQ(CRYPTO_secure_malloc_done(), 1) << "the secure heap is still in use";
  }
  std::mutex enc_mu;
  FakeEnc enc;
  const KeyCache::Fetch fetch = [&](std::uint32_t n, KeyCache::Deadline) {
    std::lock_guard lock(enc_mu);
    return enc(n);
  };
  FakeDec dec;
  KeyCacheLimits limits;
  limits.refill_ahead = true;
  KeyCache cache(limits);
  AheadKeys ahead;
  std::atomic<bool> stop{false};
  std::vector<std::thread> load;
  load.emplace_back([&] {
    while (!stop) {
      (void)cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, fetch);
    }
  });
  load.emplace_back([&] {
    for (std::uint8_t i = 0; !stop; ++i) {
      const auto me = ahead.client_id().value();
      const KeyId k = dec.add(i), a = dec.add(static_cast<std::uint8_t>(i + 128));
      (void)ahead.take("bob", k, {a}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
      (void)ahead.take("bob", a, {}, me, 32, AheadKeys::Clock::now(), kNoDeadline, dec_of(dec));
    }
  });
  const int bad = children_that_fail([&] {
    FakeEnc child_enc;
    return cache.take("alice", nullptr, 32, Clock::now(), kNoDeadline, fetch_of(child_enc)).ok() &&
           ahead.held() == 0 && ahead.client_id().ok();
  });
  stop = true;
  for (auto& t : load) {
    t.join();
  }
  EXPECT_EQ(bad, 0) << "children that blocked (killed by the alarm) or failed";
}

// fork() while another thread is in the provider context's first use (the ETSI client
// made from its files, which fail here so that every call makes it again): a child's use
// of the context must not block on its lock (held across that file I/O before, and taken
// around fork() now). The child uses nothing of OpenSSL's, whose own locks no fork handler
// takes (docs/SECURITY.md).
TEST(ForkGuard, ChildrenForkedWhileTheProviderContextIsMadeDoNotBlock) {
  Settings settings;
  settings.sae_id = "bob";
  settings.kme_url = "https://127.0.0.1:1";
  settings.cert = "/nonexistent/qkd-test/cert.pem";
  settings.key = "/nonexistent/qkd-test/key.pem";
  settings.ca = "/nonexistent/qkd-test/ca.pem";
  ProvCtx prov(nullptr, CoreUpcalls{}, settings);
  std::atomic<bool> stop{false};
  std::thread load([&] {
    while (!stop) {
      Failure failure;
      (void)prov.client(&failure);
    }
  });
  const int bad = children_that_fail([&] {
    Failure failure;
    auto id = prov.own_sae_id(&failure);
    return id.ok() && id.value() == "bob";
  });
  stop = true;
  load.join();
  EXPECT_EQ(bad, 0) << "children that blocked (killed by the alarm) or failed";
}

// fork() while other threads are admitting handshakes (Admission's lock held most of the
// time): a child's first encapsulation must not block on that lock (taken around fork() by
// the fork guard). Without it, children block and are killed by the alarm.
TEST(ForkGuard, ChildrenForkedWhileAdmittingAreAdmittedWithoutBlocking) {
  AdmissionLimits limits;
  limits.rate_per_second = 1e9;
  limits.burst = 1e9;
  limits.max_outstanding = 1'000'000;
  limits.max_outstanding_total = 1'000'000;
  Admission admission(limits);
  std::atomic<bool> stop{false};
  std::vector<std::thread> load;
  for (int i = 0; i < 2; ++i) {
    load.emplace_back([&] {
      while (!stop) {
        (void)admission.acquire("alice", Admission::Clock::now());  // released at once
      }
    });
  }
  const int bad = children_that_fail(
      [&] { return admission.acquire("alice", Admission::Clock::now()).ok(); });
  stop = true;
  for (auto& t : load) {
    t.join();
  }
  EXPECT_EQ(bad, 0) << "children that blocked (killed by the alarm) or were refused";
}

// Encapsulations in flight on the parent's threads when it forks never end in the child:
// their slots must not count there, or a child forked at a busy moment refuses that SAE
// (and, at the global cap, every SAE) for its whole life. The parent keeps its own.
TEST(ForkGuard, AdmissionSlotsInFlightInTheParentAreFreeInTheChild) {
  Admission admission(test::in_flight_caps(2, 3));
  const auto now = Admission::Clock::now();
  // Tickets the parent holds, as its threads in mid-encapsulation would.
  const auto held = test::hold(admission, {"alice", "alice", "bob"}, now);
  ASSERT_EQ(held.size(), 3U);
  ASSERT_FALSE(admission.acquire("alice", now).ok());  // per-SAE cap
  ASSERT_FALSE(admission.acquire("carol", now).ok());  // global cap
  EXPECT_EQ(in_child([&] {
              auto a1 = admission.acquire("alice", now);
              auto a2 = admission.acquire("alice", now);
              auto c = admission.acquire("carol", now);
              int bad = a1.ok() ? 0 : 1;
              bad |= a2.ok() ? 0 : 2;
              bad |= c.ok() ? 0 : 4;
              bad |= admission.acquire("alice", now).ok() ? 8 : 0;  // its own two in flight
              return bad;
            }),
            0)
      << "-1: the child was killed (blocked); 1/2: it refused alice; 4: the global cap; 8: "
         "it did not count its own slots";
  EXPECT_FALSE(admission.acquire("alice", now).ok());  // the parent's slots are still taken
}

// A forked child holds no usable copy of a key it inherited even if it never touches the
// caches: the fork handler cleanses them in the child (the parent may hand them out), before
// any call; the child's first call then drops them (ForkedChildDrops... above).
TEST(ForkGuard, AForkedChildCleansesInheritedKeysBeforeAnyCall) {
  FakeEnc enc;
  FakeDec dec;
  KeyCache cache;
  AheadKeys ahead;
  const auto now = Clock::now();
  for (int i = 0; i < 4; ++i) {  // fetches of 1, 2 and 4 keys: 3 left in the cache
    ASSERT_TRUE(cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc)).ok());
  }
  const auto me = ahead.client_id().value();
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2}, me, 32, AheadKeys::Clock::now(), kNoDeadline,
                         dec_of(dec)).ok());
  const std::size_t cached = cache.keys_not_cleansed();
  ASSERT_GT(cached, 0U);
  ASSERT_EQ(ahead.keys_not_cleansed(), 2U);
  EXPECT_EQ(in_child([&] {
              int bad = cache.keys_not_cleansed() == 0 ? 0 : 1;
              bad |= ahead.keys_not_cleansed() == 0 ? 0 : 2;
              return bad;
            }),
            0)
      << "-1: the child was killed (blocked); 1: the key cache's keys, 2: the keys held "
         "ahead, were still in the child";
  EXPECT_EQ(cache.keys_not_cleansed(), cached);  // the parent keeps its own
  EXPECT_EQ(ahead.keys_not_cleansed(), 2U);
}

// Secure heap: with CRYPTO_secure_malloc_init done (as an application may), the cached keys
// and the handed-out key are secure-heap allocations, and freeing cleanses them.
TEST(SecureHeap, CachedKeysLiveInTheSecureHeapAndAreCleansed) {
  if (CRYPTO_secure_malloc_initialized() == 0) {
    ASSERT_EQ(CRYPTO_secure_malloc_init(64 * 1024, 32), 1) << "no secure heap on this system";
  }
  const std::size_t used_before = CRYPTO_secure_used();
  {
    FakeEnc enc;
    KeyCache cache;
    const auto now = Clock::now();
    std::vector<CachedKey> taken;
    for (int i = 0; i < 4; ++i) {  // fetches of 1, 2 and 4 keys: 3 left in the cache
      auto k = cache.take("alice", nullptr, 32, now, kNoDeadline, fetch_of(enc));
      ASSERT_TRUE(k.ok());
      EXPECT_TRUE(k->key.in_secure_heap());
      taken.push_back(std::move(k).value());
    }
    ASSERT_GT(cache.cached("alice", 32), 0U);
    EXPECT_TRUE(cache.all_in_secure_heap());
    EXPECT_GT(CRYPTO_secure_used(), used_before);
  }
  EXPECT_EQ(CRYPTO_secure_used(), used_before);  // every key freed with the cache

  // Cleansing: the secure heap stays mapped, so the freed block can be inspected. Its
  // allocator reuses the first bytes for its free list; the rest must be zero.
  SecureBuf buf(128);
  ASSERT_TRUE(buf.in_secure_heap());
  for (std::size_t i = 0; i < buf.size(); ++i) {
    buf.data()[i] = 0xA5;
  }
  const volatile std::uint8_t* raw = buf.data();
  buf.reset();
  EXPECT_TRUE(buf.empty());
  int left = 0;
  for (std::size_t i = 32; i < 128; ++i) {
    left += raw[i] == 0xA5 ? 1 : 0;
  }
  EXPECT_EQ(left, 0) << "secret bytes survived the free";
}

TEST(SecureHeap, WithoutASecureHeapTheFallbackStillWorks) {
  // OPENSSL_secure_zalloc falls back to the ordinary heap when no secure heap exists (this
  // test may share a process with the one above, so only the contract is checked).
  SecureBuf buf(32);
  ASSERT_EQ(buf.size(), 32U);
  for (std::size_t i = 0; i < 32; ++i) {
    EXPECT_EQ(buf.data()[i], 0);  // zeroed
  }
  SecureBuf moved(std::move(buf));
  EXPECT_TRUE(buf.empty());  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(moved.size(), 32U);
}

}  // namespace
}  // namespace qkd::prov
