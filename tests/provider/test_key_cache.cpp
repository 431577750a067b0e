// Unit tests of the server-side key prefetch (key_cache.hpp) and of the secure-heap buffer
// that holds the keys (secure_buf.hpp).
#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

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
    auto k = cache.take("alice", 32, now, fetch_of(enc));
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
    ASSERT_TRUE(cache.take("alice", 32, now, fetch_of(enc)).ok());
  }
  EXPECT_GT(cache.cached("alice", 32), 0U);
  EXPECT_EQ(cache.cached("carol", 32), 0U);
  const std::size_t before = enc.asked.size();
  auto k = cache.take("carol", 32, now, fetch_of(enc));
  ASSERT_TRUE(k.ok());
  EXPECT_FALSE(k->from_cache);  // carol never gets alice's keys
  EXPECT_EQ(enc.asked.size(), before + 1);
  // A key of the wrong length for the caller is a bad reply, not a short secret.
  auto bad = cache.take("dave", 64, now, fetch_of(enc));
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
    ASSERT_TRUE(cache.take("alice", 32, t, fetch_of(enc)).ok());
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
    ASSERT_TRUE(cache.take("alice", 32, t0, fetch_of(enc)).ok());
  }
  ASSERT_EQ(cache.batch("alice", 32), 8U);
  const std::size_t held = cache.cached("alice", 32);
  ASSERT_GT(held, 0U);
  auto k = cache.take("alice", 32, t0 + std::chrono::seconds(11), fetch_of(enc));
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
    auto k = cache.take("alice", 32, now, fetch_of(enc));
    ASSERT_TRUE(k.ok()) << k.error().message;
  }
  // 1, then 2 refused and retried with 1; from then on one key per call, never 2 again.
  EXPECT_EQ(enc.asked, (std::vector<std::uint32_t>{1, 2, 1, 1, 1, 1, 1}));
  EXPECT_EQ(cache.batch("alice", 32), 1U);
}

TEST(KeyCache, FetchErrorsReachTheCaller) {
  KeyCache cache;
  auto k = cache.take("alice", 32, Clock::now(), [](std::uint32_t) -> Result<std::vector<qkd::etsi::Key>> {
    return make_error(ErrorCode::kUnavailable, "key service unreachable: https://x");
  });
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.error().code, ErrorCode::kUnavailable);
  auto bad_id = cache.take("alice", 32, Clock::now(), [](std::uint32_t) -> Result<std::vector<qkd::etsi::Key>> {
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
      ASSERT_TRUE(cache.take(sae, 32, now, fetch_of(enc)).ok());
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
    ASSERT_TRUE(cache.take("alice", 32, now, fetch_of(enc)).ok());
  }
  ASSERT_GT(cache.cached("alice", 32), 0U);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child must not hand out a key the parent may hand out too: its first take
    // fetches, and nothing inherited is left.
    int bad = cache.cached("alice", 32) == 0 ? 0 : 1;
    FakeEnc child_enc;
    auto k = cache.take("alice", 32, now, fetch_of(child_enc));
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
        auto k = cache.take("alice", 32, Clock::now(), fetch);
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
      auto k = cache.take("alice", 32, Clock::now(), fetch);
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
      auto k = cache.take("alice", 32, now, fetch_of(enc));
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
