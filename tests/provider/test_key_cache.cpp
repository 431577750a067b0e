// Unit tests of the server-side key prefetch and reservations (key_cache.hpp), of the
// client's keys announced ahead (ahead_keys.hpp) and of the secure-heap buffer that holds
// the keys (secure_buf.hpp).
#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ahead_keys.hpp"
#include "key_cache.hpp"
#include "secure_buf.hpp"

namespace qkd::prov {
namespace {

using Clock = KeyCache::Clock;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using qkd::core::Result;

// A KME stand-in: every key distinct (its bytes carry its serial number), every call logged.
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
  return [&enc](std::uint32_t n) { return enc(n); };
}

TEST(KeyCache, BatchGrowsUnderLoadAndEveryKeyIsHandedOutOnce) {
  KeyCacheLimits limits;
  limits.max_batch = 16;
  KeyCache cache(limits);
  FakeEnc enc;
  const auto now = Clock::now();
  std::set<std::string> ids;
  int hits = 0;
  for (int i = 0; i < 200; ++i) {
    auto k = cache.take("alice", nullptr, 32, now, fetch_of(enc));
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
  KeyCache cache;
  FakeEnc enc;
  const auto now = Clock::now();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(cache.take("alice", nullptr, 32, now, fetch_of(enc)).ok());
  }
  EXPECT_GT(cache.cached("alice", 32), 0U);
  EXPECT_EQ(cache.cached("carol", 32), 0U);
  const std::size_t before = enc.asked.size();
  auto k = cache.take("carol", nullptr, 32, now, fetch_of(enc));
  ASSERT_TRUE(k.ok());
  EXPECT_FALSE(k->from_cache);  // carol never gets alice's keys
  EXPECT_EQ(enc.asked.size(), before + 1);
  // A key of the wrong length for the caller is a bad reply, not a short secret.
  auto bad = cache.take("dave", nullptr, 64, now, fetch_of(enc));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kProtocol);
  EXPECT_NE(bad.error().message.find("key of 32 bytes, expected 64"), std::string::npos);
}

TEST(KeyCache, RareClientsCostOneKeyPerHandshakeAndNoneIsHeld) {
  KeyCacheLimits limits;
  limits.max_age = std::chrono::seconds(10);
  KeyCache cache(limits);
  FakeEnc enc;
  auto t = Clock::now();
  for (int i = 0; i < 5; ++i) {
    t += std::chrono::seconds(6);  // slower than max_age / 2: the batch never grows
    ASSERT_TRUE(cache.take("alice", nullptr, 32, t, fetch_of(enc)).ok());
  }
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 1, 1, 1, 1}));
  EXPECT_EQ(cache.cached("alice", 32), 0U);
}

TEST(KeyCache, OldKeysExpireUnusedAndTheBatchShrinks) {
  KeyCacheLimits limits;
  limits.max_batch = 8;
  limits.max_age = std::chrono::seconds(10);
  KeyCache cache(limits);
  FakeEnc enc;
  const auto t0 = Clock::now();
  for (int i = 0; i < 9; ++i) {  // 1 + 2 + 4 keys fetched, then a batch of 8
    ASSERT_TRUE(cache.take("alice", nullptr, 32, t0, fetch_of(enc)).ok());
  }
  ASSERT_EQ(cache.batch("alice", 32), 8U);
  const std::size_t held = cache.cached("alice", 32);
  ASSERT_GT(held, 0U);
  auto k = cache.take("alice", nullptr, 32, t0 + std::chrono::seconds(11), fetch_of(enc));
  ASSERT_TRUE(k.ok());
  EXPECT_FALSE(k->from_cache);  // the held keys were too old
  EXPECT_EQ(cache.stats().expired, held);
  EXPECT_LT(cache.batch("alice", 32), 8U);
}

TEST(KeyCache, KmeCappingTheNumberFallsBackToOneKey) {
  KeyCacheLimits limits;
  limits.max_batch = 32;
  KeyCache cache(limits);
  FakeEnc enc;
  enc.cap = 1;
  const auto now = Clock::now();
  for (int i = 0; i < 6; ++i) {
    auto k = cache.take("alice", nullptr, 32, now, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
  }
  // 1, then 2 refused and retried with 1; from then on one key per call, never 2 again.
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 2, 1, 1, 1, 1, 1}));
  EXPECT_EQ(cache.batch("alice", 32), 1U);
}

TEST(KeyCache, FetchErrorsReachTheCaller) {
  KeyCache cache;
  auto k = cache.take("alice", nullptr, 32, Clock::now(), [](std::uint32_t) -> Result<std::vector<qkd::etsi::Key>> {
    return make_error(ErrorCode::kUnavailable, "key service unreachable: https://x");
  });
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.error().code, ErrorCode::kUnavailable);
  auto bad_id = cache.take("alice", nullptr, 32, Clock::now(), [](std::uint32_t) -> Result<std::vector<qkd::etsi::Key>> {
    std::vector<qkd::etsi::Key> keys(1);
    keys[0].key_id = "not-a-uuid";
    keys[0].key = qkd::core::SecureBytes(32);
    return keys;
  });
  ASSERT_FALSE(bad_id.ok());
  EXPECT_EQ(bad_id.error().code, ErrorCode::kProtocol);
}

TEST(KeyCache, TotalHeldIsBounded) {
  KeyCacheLimits limits;
  limits.max_batch = 64;
  limits.max_total = 10;
  KeyCache cache(limits);
  FakeEnc enc;
  const auto now = Clock::now();
  for (const char* sae : {"a", "b", "c"}) {
    for (int i = 0; i < 40; ++i) {
      ASSERT_TRUE(cache.take(sae, nullptr, 32, now, fetch_of(enc)).ok());
      EXPECT_LE(cache.cached("a", 32) + cache.cached("b", 32) + cache.cached("c", 32), 10U);
    }
  }
  EXPECT_EQ(cache.stats().expired, 0U);  // the batch fits the room: no key wasted
}

TEST(KeyCache, ForkedChildDropsInheritedKeys) {
  KeyCache cache;
  FakeEnc enc;
  const auto now = Clock::now();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(cache.take("alice", nullptr, 32, now, fetch_of(enc)).ok());
  }
  ASSERT_GT(cache.cached("alice", 32), 0U);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child must not hand out a key the parent may hand out too: its first take
    // fetches, and nothing inherited is left.
    int bad = cache.cached("alice", 32) == 0 ? 0 : 1;
    FakeEnc child_enc;
    auto k = cache.take("alice", nullptr, 32, now, fetch_of(child_enc));
    bad |= (k.ok() && !k->from_cache && child_enc.asked.size() == 1) ? 0 : 2;
    bad |= cache.stats().dropped_on_fork > 0 ? 0 : 4;
    ::_exit(bad);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_GT(cache.cached("alice", 32), 0U);  // the parent keeps its own
}

TEST(KeyCache, ConcurrentTakersNeverShareAKey) {
  KeyCache cache;
  std::mutex mu;
  std::uint32_t serial = 0;
  std::set<std::string> ids;
  std::atomic<int> dup{0};
  const auto fetch = [&](std::uint32_t n) -> Result<std::vector<qkd::etsi::Key>> {
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
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 250; ++i) {
        auto k = cache.take("alice", nullptr, 32, Clock::now(), fetch);
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
  const auto fetch = [&](std::uint32_t n) -> Result<std::vector<qkd::etsi::Key>> {
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
      auto k = cache.take("alice", nullptr, 32, Clock::now(), fetch);
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
  KeyCache cache(limits);
  FakeEnc enc;
  const auto now = Clock::now();
  const ClientId a = client_id_of(0xA1), b = client_id_of(0xB2);
  std::deque<std::string> announced_a;
  std::set<std::string> all_announced_a, handed;
  int reserved_uses = 0;
  int top_ups = 0;
  for (int i = 0; i < 60; ++i) {
    auto k = cache.take("alice", &a, 32, now, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
    const std::string id = uuid_format(k->key_id);
    EXPECT_TRUE(handed.insert(id).second) << "key handed out twice";
    if (i == 0) {
      EXPECT_TRUE(k->ahead.empty()) << "nothing announced to a client_id seen once";
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
      auto o = cache.take("alice", other, 32, now, fetch_of(enc));
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
  KeyCache cache(limits);
  FakeEnc enc;
  const auto t0 = Clock::now();
  const ClientId a = client_id_of(1);
  std::set<std::string> announced;
  for (int i = 0; i < 6; ++i) {
    auto k = cache.take("alice", &a, 32, t0, fetch_of(enc));
    ASSERT_TRUE(k.ok());
    for (const KeyId& id : k->ahead) {
      announced.insert(uuid_format(id));
    }
  }
  ASSERT_GT(cache.reserved("alice", a, 32), 0U);
  // Past max_age the client may have dropped them: never handed out, cleansed instead.
  auto late = cache.take("alice", &a, 32, t0 + std::chrono::seconds(11), fetch_of(enc));
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(announced.count(uuid_format(late->key_id)), 0U);
  EXPECT_GT(cache.stats().expired, 0U);

  limits.announce = 0;
  KeyCache quiet(limits);
  for (int i = 0; i < 20; ++i) {
    auto k = quiet.take("alice", &a, 32, t0, fetch_of(enc));
    ASSERT_TRUE(k.ok());
    EXPECT_TRUE(k->ahead.empty());
  }
  EXPECT_EQ(quiet.stats().announced, 0U);
}

TEST(KeyCache, ForkedChildHasNoReservation) {
  KeyCacheLimits limits;
  limits.announce = 4;
  KeyCache cache(limits);
  FakeEnc enc;
  const auto now = Clock::now();
  const ClientId a = client_id_of(7);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(cache.take("alice", &a, 32, now, fetch_of(enc)).ok());
  }
  ASSERT_GT(cache.reserved("alice", a, 32), 0U);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::_exit(cache.reserved("alice", a, 32) == 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_GT(cache.reserved("alice", a, 32), 0U);
}

// --- keys announced ahead, client side (ahead_keys.hpp) -----------------------------------

// A client's KME stand-in: hands each key out once, all or nothing per call (ETSI 014).
struct FakeDec {
  std::mutex mu;
  std::map<std::string, std::uint8_t> deliverable;  // key_ID -> first key byte
  std::vector<std::size_t> calls;                    // key_IDs per call
  bool lose_replies = false;  // consume the keys, then fail as a dropped connection would
  std::chrono::milliseconds delay{0};

  KeyId add(std::uint8_t v) {
    char text[40];
    std::snprintf(text, sizeof text, "11111111-0000-4000-8000-%012x", static_cast<unsigned>(v));
    std::lock_guard lock(mu);
    deliverable[text] = v;
    return uuid_parse(text).value();
  }
  Result<std::vector<qkd::etsi::Key>> operator()(const std::string& /*master*/,
                                                std::span<const std::string> ids) {
    std::this_thread::sleep_for(delay);
    std::lock_guard lock(mu);
    calls.push_back(ids.size());
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

AheadKeys::Fetch dec_of(FakeDec& dec) {
  return [&dec](const std::string& m, std::span<const std::string> ids) { return dec(m, ids); };
}

TEST(AheadKeys, AnnouncedKeysComeWithTheFirstCallAndNeedNoneLater) {
  AheadKeys ahead;
  FakeDec dec;
  const KeyId k0 = dec.add(10), k1 = dec.add(11), k2 = dec.add(12), k3 = dec.add(13),
              k4 = dec.add(14), k5 = dec.add(15);
  const auto now = AheadKeys::Clock::now();
  auto first = ahead.take("bob", k0, {k1, k2, k3}, 32, now, dec_of(dec));
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_EQ(first->span()[0], 10);
  ASSERT_EQ(dec.calls, (std::vector<std::size_t>{4}));  // one call for the key and the three
  EXPECT_EQ(ahead.held(), 3U);
  auto second = ahead.take("bob", k1, {}, 32, now, dec_of(dec));
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->span()[0], 11);
  EXPECT_EQ(dec.call_count(), 1U);  // no call
  // A held key whose ciphertext announces more: those are fetched on the worker thread; a
  // take of one of them waits for that call (or finds it held) and makes none of its own.
  auto third = ahead.take("bob", k2, {k4, k5}, 32, now, dec_of(dec));
  ASSERT_TRUE(third.ok());
  auto fourth = ahead.take("bob", k4, {}, 32, now, dec_of(dec));
  ASSERT_TRUE(fourth.ok()) << fourth.error().message;
  EXPECT_EQ(fourth->span()[0], 14);
  ahead.shutdown();
  EXPECT_EQ(dec.call_count(), 2U);
  EXPECT_EQ(ahead.stats().hits, 3U);
  EXPECT_EQ(ahead.stats().background_fetches, 1U);
  // Asked again, a key handed out is the KME's to refuse: never served twice from here.
  EXPECT_FALSE(ahead.take("bob", k1, {}, 32, now, dec_of(dec)).ok());
  (void)k3;
}

TEST(AheadKeys, ARefusedAnnouncementCostsOnlyARetry) {
  AheadKeys ahead;
  FakeDec dec;
  const KeyId k0 = dec.add(1);
  KeyId bogus{};
  bogus.fill(0x42);
  auto id_before = ahead.client_id();
  ASSERT_TRUE(id_before.ok() && id_before->has_value());
  auto k = ahead.take("bob", k0, {bogus}, 32, AheadKeys::Clock::now(), dec_of(dec));
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{2, 1}));  // together, then the key alone
  EXPECT_EQ(ahead.held(), 0U);
  EXPECT_EQ(ahead.client_id().value(), id_before.value());  // a clean refusal consumed nothing
}

TEST(AheadKeys, ALostReplyChangesTheClientId) {
  AheadKeys ahead;
  FakeDec dec;
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  auto id_before = ahead.client_id().value();
  dec.lose_replies = true;
  auto k = ahead.take("bob", k0, {k1}, 32, AheadKeys::Clock::now(), dec_of(dec));
  EXPECT_FALSE(k.ok());
  // k1 may be consumed at the KME without having reached us: the server's reservation for
  // the old client_id must never be used again.
  auto id_after = ahead.client_id().value();
  ASSERT_TRUE(id_after.has_value());
  EXPECT_NE(id_after, id_before);
  EXPECT_EQ(ahead.stats().client_id_changes, 1U);
}

TEST(AheadKeys, ConcurrentTakesOfAKeyInFlightWaitForThatCall) {
  AheadKeys ahead;
  FakeDec dec;
  dec.delay = std::chrono::milliseconds(30);
  const KeyId k0 = dec.add(1), k1 = dec.add(2);
  Result<SecureBuf> r0 = make_error(ErrorCode::kInternal, "not run");
  Result<SecureBuf> r1 = make_error(ErrorCode::kInternal, "not run");
  std::thread t0([&] { r0 = ahead.take("bob", k0, {k1}, 32, AheadKeys::Clock::now(), dec_of(dec)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // likely in flight by now
  std::thread t1([&] { r1 = ahead.take("bob", k1, {}, 32, AheadKeys::Clock::now(), dec_of(dec)); });
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

TEST(AheadKeys, AFullCacheLeavesAnnouncementsToBeFetchedWhenUsed) {
  AheadLimits limits;
  limits.max_keys = 2;
  AheadKeys ahead(limits);
  FakeDec dec;
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3), k3 = dec.add(4);
  const auto now = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2, k3}, 32, now, dec_of(dec)).ok());
  EXPECT_EQ(dec.calls, (std::vector<std::size_t>{3}));  // k0, then room for 2 announced
  EXPECT_EQ(ahead.stats().not_fetched, 1U);
  EXPECT_EQ(ahead.held(), 2U);
  auto k3_key = ahead.take("bob", k3, {}, 32, now, dec_of(dec));  // fetched when used
  ASSERT_TRUE(k3_key.ok());
  EXPECT_EQ(k3_key->span()[0], 4);
  EXPECT_EQ(dec.call_count(), 2U);
  (void)k2;
}

TEST(AheadKeys, HeldKeysExpireAndNoClientIdWhenOff) {
  AheadLimits limits;
  limits.max_age = std::chrono::seconds(10);
  AheadKeys ahead(limits);
  FakeDec dec;
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  const auto t0 = AheadKeys::Clock::now();
  ASSERT_TRUE(ahead.take("bob", k0, {k1}, 32, t0, dec_of(dec)).ok());
  ASSERT_EQ(ahead.held(), 1U);
  ASSERT_TRUE(ahead.take("bob", k2, {}, 32, t0 + std::chrono::seconds(12), dec_of(dec)).ok());
  EXPECT_EQ(ahead.held(), 0U);
  EXPECT_EQ(ahead.stats().expired, 1U);

  limits.max_keys = 0;
  AheadKeys off(limits);
  auto id = off.client_id();
  ASSERT_TRUE(id.ok());
  EXPECT_FALSE(id->has_value());
}

TEST(AheadKeys, ForkedChildDropsHeldKeysAndTakesANewClientId) {
  if (CRYPTO_secure_malloc_initialized() == 0) {
    ASSERT_EQ(CRYPTO_secure_malloc_init(64 * 1024, 32), 1);
  }
  AheadKeys ahead;
  FakeDec dec;
  const KeyId k0 = dec.add(1), k1 = dec.add(2), k2 = dec.add(3);
  ASSERT_TRUE(ahead.take("bob", k0, {k1, k2}, 32, AheadKeys::Clock::now(), dec_of(dec)).ok());
  ASSERT_EQ(ahead.held(), 2U);
  EXPECT_TRUE(ahead.all_in_secure_heap());
  const auto parent_id = ahead.client_id().value();
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int bad = ahead.held() == 0 ? 0 : 1;
    auto child_id = ahead.client_id();
    bad |= (child_id.ok() && child_id->has_value() && *child_id != parent_id) ? 0 : 2;
    ::_exit(bad);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(ahead.held(), 2U);  // the parent keeps its own
  EXPECT_EQ(ahead.client_id().value(), parent_id);
}

// Secure heap: with CRYPTO_secure_malloc_init done (as an application may), the cached keys
// and the handed-out key are secure-heap allocations, and freeing cleanses them.
TEST(SecureHeap, CachedKeysLiveInTheSecureHeapAndAreCleansed) {
  if (CRYPTO_secure_malloc_initialized() == 0) {
    ASSERT_EQ(CRYPTO_secure_malloc_init(64 * 1024, 32), 1) << "no secure heap on this system";
  }
  const std::size_t used_before = CRYPTO_secure_used();
  {
    KeyCache cache;
    FakeEnc enc;
    const auto now = Clock::now();
    std::vector<CachedKey> taken;
    for (int i = 0; i < 4; ++i) {  // fetches of 1, 2 and 4 keys: 3 left in the cache
      auto k = cache.take("alice", nullptr, 32, now, fetch_of(enc));
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
