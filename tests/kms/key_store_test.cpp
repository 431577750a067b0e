// Key store: direction split, conflict-free allocation, notices, one use, authorization.
#include "qkd/kms/key_store.hpp"

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include <limits>
#include <set>
#include <thread>
#include <utility>

#include "qkd/kms/link_service.hpp"

namespace {

using namespace std::chrono_literals;
using qkd::core::ErrorCode;
using qkd::kms::Direction;
using qkd::kms::KeyAssignment;
using qkd::kms::KeyStore;

std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i] = static_cast<std::uint8_t>(seed + i * 7);
  }
  return v;
}

// Two stores fed the same pool, with each side's notices captured for the other.
struct Pair {
  std::unique_ptr<KeyStore> alice = qkd::kms::make_memory_key_store(Direction::kAlice);
  std::unique_ptr<KeyStore> bob = qkd::kms::make_memory_key_store(Direction::kBob);
  std::vector<KeyAssignment> from_alice, from_bob;
  std::mutex mu;
  Pair() {
    alice->set_assignment_listener([this](const std::vector<KeyAssignment>& as) {
      std::lock_guard l(mu);
      from_alice.insert(from_alice.end(), as.begin(), as.end());
    });
    bob->set_assignment_listener([this](const std::vector<KeyAssignment>& as) {
      std::lock_guard l(mu);
      from_bob.insert(from_bob.end(), as.begin(), as.end());
    });
  }
  // A pair whose pool holds `block` on both ends.
  explicit Pair(const std::vector<std::uint8_t>& block) : Pair() { commit(block); }
  void commit(const std::vector<std::uint8_t>& block) {
    alice->commit(block);
    bob->commit(block);
  }
  void deliver_notices() {
    for (auto& a : from_alice) {
      ASSERT_TRUE(bob->apply_peer_assignment(a).ok());
    }
    for (auto& a : from_bob) {
      ASSERT_TRUE(alice->apply_peer_assignment(a).ok());
    }
    from_alice.clear();
    from_bob.clear();
  }
  // `number` keys alice allocates (master SAE "alice") and their notices applied at bob:
  // the keys (none, with a failure recorded, if refused).
  std::vector<qkd::kms::DeliveredKey> allocate_and_notify(const std::vector<std::string>& slaves,
                                                         std::uint32_t number,
                                                         std::uint32_t size_bytes) {
    auto k = alice->allocate("alice", slaves, number, size_bytes);
    EXPECT_TRUE(k.ok()) << k.error().message;
    deliver_notices();
    return k.ok() ? std::move(k.value()) : std::vector<qkd::kms::DeliveredKey>{};
  }
};

std::vector<std::string> ids_of(const std::vector<qkd::kms::DeliveredKey>& keys) {
  std::vector<std::string> ids;
  for (const auto& k : keys) {
    ids.push_back(k.key_id);
  }
  return ids;
}

TEST(DirectionBytes, SplitsChunksByParity) {
  using qkd::kms::direction_bytes;
  EXPECT_EQ(direction_bytes(0, Direction::kAlice), 0u);
  EXPECT_EQ(direction_bytes(10, Direction::kAlice), 10u);
  EXPECT_EQ(direction_bytes(10, Direction::kBob), 0u);
  EXPECT_EQ(direction_bytes(32, Direction::kAlice), 32u);
  EXPECT_EQ(direction_bytes(40, Direction::kBob), 8u);
  EXPECT_EQ(direction_bytes(64, Direction::kBob), 32u);
  EXPECT_EQ(direction_bytes(70, Direction::kAlice), 38u);
  EXPECT_EQ(direction_bytes(70, Direction::kBob), 32u);
  for (std::uint64_t n = 0; n < 1000; ++n) {
    EXPECT_EQ(direction_bytes(n, Direction::kAlice) + direction_bytes(n, Direction::kBob), n);
  }
}

TEST(KeyStore, AllocationIsConflictFreeByDirection) {
  Pair p;
  const auto pool = pattern(4096, 3);
  p.commit(pool);
  // Both sides allocate at the same time, from their own directions.
  std::vector<qkd::kms::DeliveredKey> ka, kb;
  std::thread ta([&] {
    for (int i = 0; i < 20; ++i) {
      auto r = p.alice->allocate("alice", {"bob"}, 2, 24);  // 24 bytes: keys straddle chunks
      ASSERT_TRUE(r.ok()) << r.error().message;
      for (auto& k : r.value()) ka.push_back(std::move(k));
    }
  });
  std::thread tb([&] {
    for (int i = 0; i < 20; ++i) {
      auto r = p.bob->allocate("bob", {"alice"}, 2, 24);
      ASSERT_TRUE(r.ok()) << r.error().message;
      for (auto& k : r.value()) kb.push_back(std::move(k));
    }
  });
  ta.join();
  tb.join();
  // No two assignments overlap in the pool (map direction offsets back to pool positions).
  std::set<std::uint64_t> used;
  auto pool_pos = [](Direction d, std::uint64_t off) {
    const std::uint64_t chunk = off / qkd::kms::kChunkBytes;
    return (2 * chunk + static_cast<std::uint64_t>(d)) * qkd::kms::kChunkBytes +
           off % qkd::kms::kChunkBytes;
  };
  for (const auto* list : {&p.from_alice, &p.from_bob}) {
    for (const auto& a : *list) {
      for (std::uint32_t i = 0; i < a.length; ++i) {
        EXPECT_TRUE(used.insert(pool_pos(a.direction, a.offset + i)).second);
      }
    }
  }
  // The bytes handed out are the pool bytes at those positions.
  for (const auto& a : p.from_alice) {
    const auto it =
        std::find_if(ka.begin(), ka.end(), [&](auto& k) { return k.key_id == a.key_id; });
    ASSERT_NE(it, ka.end());
    for (std::uint32_t i = 0; i < a.length; ++i) {
      EXPECT_EQ(it->key[i], pool[pool_pos(a.direction, a.offset + i)]);
    }
  }
  // The peers take the same bytes.
  p.deliver_notices();
  auto at_bob = p.bob->take("bob", "alice", ids_of(ka), 0ms);
  ASSERT_TRUE(at_bob.ok()) << at_bob.error().message;
  for (std::size_t i = 0; i < ka.size(); ++i) {
    EXPECT_TRUE(qkd::core::constant_time_equal(ka[i].key.span(), at_bob.value()[i].key.span()));
  }
  auto at_alice = p.alice->take("alice", "bob", ids_of(kb), 0ms);
  ASSERT_TRUE(at_alice.ok()) << at_alice.error().message;
  for (std::size_t i = 0; i < kb.size(); ++i) {
    EXPECT_TRUE(qkd::core::constant_time_equal(kb[i].key.span(), at_alice.value()[i].key.span()));
  }
}

TEST(KeyStore, AllOrNothingAndNotEnough) {
  Pair p;
  p.commit(pattern(64, 1));  // 32 bytes per direction
  auto r = p.alice->allocate("alice", {"bob"}, 2, 24);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable);
  EXPECT_TRUE(p.from_alice.empty());
  EXPECT_EQ(p.alice->stats().own_available_bytes, 32u);
  ASSERT_TRUE(p.alice->allocate("alice", {"bob"}, 4, 8).ok());
  EXPECT_EQ(p.alice->stats().own_available_bytes, 0u);
}

TEST(KeyStore, OneUsePerKeyOnEachEnd) {
  Pair p(pattern(256, 9));
  const auto ids = ids_of(p.allocate_and_notify({"bob"}, 1, 32));
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_TRUE(p.bob->take("bob", "alice", ids, 0ms).ok());
  auto again = p.bob->take("bob", "alice", ids, 1000ms);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kInvalidArgument);  // immediate, no wait
  // The allocating end never hands its own key out through take() either.
  EXPECT_FALSE(p.alice->take("alice", "alice", ids, 0ms).ok());
}

// A notice that names a key_ID a notice still waiting for its bytes already assigns is
// refused: when both bytes landed, the second would replace the first's key under the same
// key_ID (and a durable store would write the other bytes over the stored key).
TEST(KeyStore, ASecondAssignmentOfAWaitingKeyIdIsRefused) {
  Pair p;
  const std::string id = "6f1c2a0e-55d4-4a43-9c1e-2b7f0c9d4e11";
  // Alice's direction holds nothing yet: both wait for their bytes.
  ASSERT_TRUE(p.bob->apply_peer_assignment({id, Direction::kAlice, 0, 32, "alice", {"bob"}, false})
                  .ok());
  auto second =
      p.bob->apply_peer_assignment({id, Direction::kAlice, 32, 32, "alice", {"bob"}, false});
  ASSERT_FALSE(second.ok());
  EXPECT_NE(second.error().message.find("duplicate"), std::string::npos)
      << second.error().message;
  const auto pool = pattern(256, 4);
  p.commit(pool);
  auto k = p.bob->take("bob", "alice", {id}, 0ms);
  ASSERT_TRUE(k.ok()) << k.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(
      k->front().key.span(), std::span<const std::uint8_t>(pool.data(), 32)));  // the first's
}

TEST(KeyStore, AuthorizationChecksSlaveAndMaster) {
  Pair p(pattern(256, 5));
  const auto k = p.allocate_and_notify({"bob", "carol"}, 1, 16);
  ASSERT_EQ(k.size(), 1u);
  const auto ids = ids_of(k);
  auto wrong_caller = p.bob->take("mallory", "alice", ids, 0ms);
  ASSERT_FALSE(wrong_caller.ok());
  EXPECT_EQ(wrong_caller.error().code, ErrorCode::kAuthentication);
  auto wrong_master = p.bob->take("bob", "mallory", ids, 0ms);
  ASSERT_FALSE(wrong_master.ok());
  EXPECT_EQ(wrong_master.error().code, ErrorCode::kAuthentication);
  // Refused requests consumed nothing; an additional slave may fetch.
  auto ok = p.bob->take("carol", "alice", ids, 0ms);
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(qkd::core::constant_time_equal(ok.value()[0].key.span(), k[0].key.span()));
}

// "Who may fetch" holds after delivery too: a delivered key is 401 to an SAE that was never
// its slave (and to its master, at either KME), 400 "not found" only to a slave of it.
TEST(KeyStore, ADeliveredKeyIsStill401ToWhoMayNotFetchIt) {
  Pair p(pattern(256, 5));
  const auto ids = ids_of(p.allocate_and_notify({"bob"}, 1, 16));
  ASSERT_EQ(ids.size(), 1u);
  ASSERT_TRUE(p.bob->take("bob", "alice", ids, 0ms).ok());
  auto code = [&](KeyStore& s, const char* caller, const char* master) {
    auto r = s.take(caller, master, ids, 0ms);
    return r.ok() ? ErrorCode::kInternal : r.error().code;
  };
  EXPECT_EQ(code(*p.bob, "bob", "alice"), ErrorCode::kInvalidArgument);  // one use
  EXPECT_EQ(code(*p.bob, "mallory", "alice"), ErrorCode::kAuthentication);
  EXPECT_EQ(code(*p.bob, "bob", "mallory"), ErrorCode::kAuthentication);
  EXPECT_EQ(code(*p.bob, "alice", "alice"), ErrorCode::kAuthentication);
  EXPECT_EQ(code(*p.alice, "alice", "alice"), ErrorCode::kAuthentication);
  EXPECT_EQ(code(*p.alice, "bob", "alice"), ErrorCode::kInvalidArgument);
  // With a key not delivered yet beside it: still 401 (the caller may not have every key).
  const auto k2 = ids_of(p.allocate_and_notify({"carol"}, 1, 16));
  ASSERT_EQ(k2.size(), 1u);
  auto both = p.bob->take("carol", "alice", {ids[0], k2[0]}, 0ms);
  ASSERT_FALSE(both.ok());
  EXPECT_EQ(both.error().code, ErrorCode::kAuthentication);
  EXPECT_TRUE(p.bob->take("carol", "alice", k2, 0ms).ok());  // kept
}

// Multicast: every named slave fetches the key once; a second fetch by the same slave is
// "not found"; once the last slave has it, the key is gone.
TEST(KeyStore, MulticastEachSlaveFetchesOnce) {
  Pair p(pattern(256, 5));
  const auto k = p.allocate_and_notify({"bob", "carol", "dave"}, 2, 16);
  ASSERT_EQ(k.size(), 2u);
  const auto ids = ids_of(k);
  for (const char* slave : {"carol", "bob", "dave"}) {
    SCOPED_TRACE(slave);
    auto got = p.bob->take(slave, "alice", ids, 0ms);
    ASSERT_TRUE(got.ok()) << got.error().message;
    ASSERT_EQ(got->size(), 2u);
    for (std::size_t i = 0; i < 2; ++i) {
      EXPECT_TRUE(qkd::core::constant_time_equal(got.value()[i].key.span(), k[i].key.span()));
    }
    auto again = p.bob->take(slave, "alice", {ids[1]}, 0ms);
    ASSERT_FALSE(again.ok());
    EXPECT_EQ(again.error().code, ErrorCode::kInvalidArgument);
    EXPECT_EQ(p.bob->stats().assigned_keys_waiting, std::string(slave) == "dave" ? 0u : 2u);
  }
  auto gone = p.bob->take("bob", "alice", {ids[0]}, 0ms);
  ASSERT_FALSE(gone.ok());
  EXPECT_EQ(gone.error().code, ErrorCode::kInvalidArgument);
}

// keys.max_age_s: the owner of a direction discards its expired bytes and its discard
// notice takes the same bytes out of the peer's pool; the next key comes after them on both
// ends. A peer-assigned key not fetched in time is "not found".
TEST(KeyStore, ExpiredKeysAreDiscardedOnBothEnds) {
  Pair p;
  p.alice->set_max_age(std::chrono::seconds(10));
  p.bob->set_max_age(std::chrono::seconds(10));
  const auto t0 = std::chrono::system_clock::now();
  p.commit(pattern(256, 9));  // 128 bytes per direction
  auto early = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(early.ok());
  p.deliver_notices();
  EXPECT_TRUE(p.alice->expire(t0 + std::chrono::seconds(5)).ok());  // young: nothing happens
  EXPECT_EQ(p.alice->stats().own_available_bytes, 112u);
  EXPECT_TRUE(p.from_alice.empty());
  // 11 s later: alice's direction is discarded, at alice at once, at bob by the notice.
  ASSERT_TRUE(p.alice->expire(t0 + std::chrono::seconds(11)).ok());
  EXPECT_EQ(p.alice->stats().own_available_bytes, 0u);
  ASSERT_EQ(p.from_alice.size(), 1u);
  EXPECT_TRUE(p.from_alice[0].discard);
  EXPECT_EQ(p.from_alice[0].offset, 16u);
  EXPECT_EQ(p.from_alice[0].length, 112u);
  EXPECT_EQ(p.bob->stats().peer_available_bytes, 112u);
  p.deliver_notices();
  EXPECT_EQ(p.bob->stats().peer_available_bytes, 0u);
  // Bob's direction is untouched until bob expires it himself.
  EXPECT_EQ(p.bob->stats().own_available_bytes, 128u);
  EXPECT_EQ(p.alice->stats().peer_available_bytes, 128u);
  auto short_key = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_FALSE(short_key.ok());
  EXPECT_EQ(short_key.error().code, ErrorCode::kUnavailable);
  // A fresh block: both ends continue in step (same bytes for the same key).
  p.commit(pattern(64, 3));
  auto fresh = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(fresh.ok()) << fresh.error().message;
  p.deliver_notices();
  auto got = p.bob->take("bob", "alice", ids_of(fresh.value()), 0ms);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(got->front().key.span(),
                                             fresh->front().key.span()));
  // The early key waited at bob; 11 s after its notice it is gone.
  ASSERT_TRUE(p.bob->expire(std::chrono::system_clock::now() + std::chrono::seconds(11)).ok());
  auto late = p.bob->take("bob", "alice", ids_of(early.value()), 0ms);
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, ErrorCode::kInvalidArgument);
}

// keys.max_key_count: a direction nobody draws from is kept under twice the limit. Once it
// holds that much its owner discards the oldest bytes above the limit, the peer drops the
// same bytes by the discard notice, and keys allocated afterwards are the same on both ends.
// Less than twice the limit is left alone.
// keys.max_unfetched_per_pair: keys nobody fetches (a flood of enc_keys naming a slave
// that never calls dec_keys) stay bounded per (master, slaves); the oldest go, and are
// "not found", while other pairs and keys fetched in time are untouched.
TEST(KeyStore, UnfetchedKeysAreBoundedPerPair) {
  Pair p(pattern(4096, 3));
  p.bob->set_max_unfetched(3);
  const auto flood = ids_of(p.allocate_and_notify({"bob"}, 5, 16));
  ASSERT_EQ(flood.size(), 5u);
  const auto other = ids_of(p.allocate_and_notify({"carol"}, 2, 16));
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, 5u);  // 3 of the flood, carol's 2
  EXPECT_EQ(p.bob->stats().assigned_keys_evicted, 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    auto gone = p.bob->take("bob", "alice", {flood[i]}, 0ms);
    ASSERT_FALSE(gone.ok());
    EXPECT_EQ(gone.error().code, ErrorCode::kInvalidArgument);
  }
  // A fetched key makes room: the next one drops nothing.
  ASSERT_TRUE(p.bob->take("bob", "alice", {flood[2]}, 0ms).ok());
  const auto next = ids_of(p.allocate_and_notify({"bob"}, 1, 16));
  EXPECT_EQ(p.bob->stats().assigned_keys_evicted, 2u);
  for (const auto& id : {flood[3], flood[4], next[0]}) {
    EXPECT_TRUE(p.bob->take("bob", "alice", {id}, 0ms).ok()) << id;
  }
  EXPECT_TRUE(p.bob->take("carol", "alice", other, 0ms).ok());
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, 0u);
  // Multicast: each slave's keys count once, whatever the order of the slaves.
  for (const auto& slaves : {std::vector<std::string>{"bob", "carol"},
                             std::vector<std::string>{"carol", "bob"},
                             std::vector<std::string>{"bob", "carol", "dave"}}) {
    p.allocate_and_notify(slaves, 3, 16);
  }
  const auto waiting = p.bob->waiting_by_pair();
  EXPECT_EQ(waiting.at({"alice", "bob"}), 3u);
  EXPECT_EQ(waiting.at({"alice", "carol"}), 3u);
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, 3u);
  EXPECT_EQ(p.bob->stats().assigned_keys_evicted, 8u);
  // A slave named twice (only a faulty peer's notice does that) counts once.
  const auto twice = ids_of(p.allocate_and_notify({"erin", "erin"}, 1, 16));
  ASSERT_EQ(twice.size(), 1u);
  ASSERT_TRUE(p.bob->take("erin", "alice", twice, 0ms).ok());
  p.allocate_and_notify({"erin"}, 3, 16);
  EXPECT_EQ(p.bob->stats().assigned_keys_evicted, 8u);
  // 0: no limit.
  p.bob->set_max_unfetched(0);
  const auto before = p.bob->stats().assigned_keys_waiting;
  const auto many = ids_of(p.allocate_and_notify({"bob"}, 8, 16));
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, before + 8);
  EXPECT_EQ(p.bob->stats().assigned_keys_evicted, 8u);
}

TEST(KeyStore, PoolLimitTrimsTheOwnDirectionOnBothEnds) {
  Pair p;
  p.alice->set_pool_limit(64);
  p.bob->set_pool_limit(64);
  const auto pool = pattern(512, 11);  // 256 bytes per direction
  p.commit(pool);
  // Nothing happens before the periodic call (or an allocation).
  EXPECT_EQ(p.bob->stats().own_available_bytes, 256u);
  ASSERT_TRUE(p.bob->expire(std::chrono::system_clock::now()).ok());
  EXPECT_EQ(p.bob->stats().own_available_bytes, 64u);
  ASSERT_EQ(p.from_bob.size(), 1u);
  EXPECT_TRUE(p.from_bob[0].discard);
  EXPECT_EQ(p.from_bob[0].offset, 0u);
  EXPECT_EQ(p.from_bob[0].length, 192u);
  EXPECT_EQ(p.alice->stats().peer_available_bytes, 256u);
  p.deliver_notices();
  EXPECT_EQ(p.alice->stats().peer_available_bytes, 64u);
  // A second call finds nothing above the limit.
  ASSERT_TRUE(p.bob->expire(std::chrono::system_clock::now()).ok());
  EXPECT_TRUE(p.from_bob.empty());
  // Bob's next key is the newest 64 bytes of his direction (chunks 13 and 15 of the pool),
  // the same at alice.
  auto k = p.bob->allocate("bob", {"alice"}, 1, 64);
  ASSERT_TRUE(k.ok()) << k.error().message;
  std::vector<std::uint8_t> newest(pool.begin() + 32 * 13, pool.begin() + 32 * 14);
  newest.insert(newest.end(), pool.begin() + 32 * 15, pool.begin() + 32 * 16);
  EXPECT_TRUE(qkd::core::constant_time_equal(k->front().key.span(), newest));
  p.deliver_notices();
  auto got = p.alice->take("alice", "bob", ids_of(k.value()), 0ms);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(got->front().key.span(), newest));
  // An allocation trims first: alice's 256 bytes become 64, then 32 are handed out.
  auto a = p.alice->allocate("alice", {"bob"}, 1, 32);
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_EQ(p.alice->stats().own_available_bytes, 32u);
  std::vector<std::uint8_t> alice_first_kept(pool.begin() + 32 * 12, pool.begin() + 32 * 13);
  EXPECT_TRUE(qkd::core::constant_time_equal(a->front().key.span(), alice_first_kept));
  // Below twice the limit nothing is cut (a direction in use sits just above the limit
  // after each block); at twice the limit it is cut back to the limit. Bob's direction is
  // empty now; each block of 128 bytes brings it 64.
  p.deliver_notices();
  p.commit(pattern(128, 12));
  ASSERT_TRUE(p.bob->expire(std::chrono::system_clock::now()).ok());
  EXPECT_EQ(p.bob->stats().own_available_bytes, 64u);
  p.commit(pattern(128, 13));
  ASSERT_TRUE(p.bob->expire(std::chrono::system_clock::now()).ok());
  EXPECT_EQ(p.bob->stats().own_available_bytes, 64u);
  ASSERT_EQ(p.from_bob.size(), 1u);
  EXPECT_TRUE(p.from_bob[0].discard);
  EXPECT_EQ(p.from_bob[0].offset, 256u);
  EXPECT_EQ(p.from_bob[0].length, 64u);
  p.deliver_notices();
  EXPECT_EQ(p.alice->stats().peer_available_bytes, 64u);
}

TEST(KeyStore, NoticeAheadOfCommitWaitsForBytes) {
  Pair p;
  p.alice->commit(pattern(128, 2));  // bob has not committed yet
  auto k = p.alice->allocate("alice", {"bob"}, 1, 32);
  ASSERT_TRUE(k.ok());
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(0)).ok());
  EXPECT_EQ(p.bob->stats().pending_notices, 1u);
  std::thread late([&] {
    std::this_thread::sleep_for(100ms);
    p.bob->commit(pattern(128, 2));
  });
  auto got = p.bob->take("bob", "alice", ids_of(k.value()), 2000ms);
  late.join();
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(got.value()[0].key.span(), k.value()[0].key.span()));
}

// In a pair with a committed block, two allocations at alice whose notices are held back
// (p.from_alice): one key, then two.
std::pair<std::vector<qkd::kms::DeliveredKey>, std::vector<qkd::kms::DeliveredKey>>
one_key_then_two(Pair& p) {
  p.commit(pattern(256, 6));
  auto one = p.alice->allocate("alice", {"bob"}, 1, 32);
  auto two = p.alice->allocate("alice", {"bob"}, 2, 32);
  EXPECT_TRUE(one.ok() && two.ok());
  return {one.ok() ? std::move(one).value() : std::vector<qkd::kms::DeliveredKey>{},
          two.ok() ? std::move(two).value() : std::vector<qkd::kms::DeliveredKey>{}};
}

// Waiting take()s are woken by the arrival of their own keys: each gets its key as soon as
// its notice is applied (long before its deadline), whatever else is waiting.
TEST(KeyStore, WaitersAreWokenByTheirOwnKeys) {
  Pair p;
  auto [k1, k2] = one_key_then_two(p);
  ASSERT_EQ(p.from_alice.size(), 3u);
  const auto t0 = std::chrono::steady_clock::now();
  std::chrono::steady_clock::duration dt1{}, dt2{};
  qkd::core::Result<std::vector<qkd::kms::DeliveredKey>> got1 =
      qkd::core::make_error(ErrorCode::kInternal, "not run");
  auto got2 = got1;
  std::thread w1([&] {
    got1 = p.bob->take("bob", "alice", ids_of(k1), 20s);
    dt1 = std::chrono::steady_clock::now() - t0;
  });
  std::thread w2([&] {
    got2 = p.bob->take("bob", "alice", ids_of(k2), 20s);  // two keys, two notices
    dt2 = std::chrono::steady_clock::now() - t0;
  });
  std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(0)).ok());  // k1
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(1)).ok());  // k2's first key
  std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(2)).ok());  // k2's second key
  w1.join();
  w2.join();
  ASSERT_TRUE(got1.ok()) << got1.error().message;
  ASSERT_TRUE(got2.ok()) << got2.error().message;
  EXPECT_EQ(ids_of(got1.value()), ids_of(k1));
  EXPECT_EQ(ids_of(got2.value()), ids_of(k2));
  EXPECT_TRUE(qkd::core::constant_time_equal(got1.value()[0].key.span(), k1[0].key.span()));
  EXPECT_LT(dt1, 10s);  // woken, not timed out
  EXPECT_LT(dt2, 10s);
  EXPECT_GE(dt2, 150ms);  // not before its second key
}

// when_known(): the registration of a dec_keys that waits without a thread. Called once,
// when one of its keys arrives (not for others'); at once when all are known already
// (held, or delivered); never once its handle is gone.
TEST(KeyStore, WhenKnownCallsOnceWhenOneOfItsKeysArrives) {
  Pair p;
  auto [k2, k1] = one_key_then_two(p);  // k1 has two keys here, in notices 1 and 2
  ASSERT_EQ(p.from_alice.size(), 3u);
  int woken1 = 0;
  int woken2 = 0;
  auto h1 = p.bob->when_known(ids_of(k1), [&] { ++woken1; });
  auto h2 = p.bob->when_known(ids_of(k2), [&] { ++woken2; });
  EXPECT_EQ(woken1 + woken2, 0);
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(0)).ok());  // k2's key
  EXPECT_EQ(woken1, 0);
  EXPECT_EQ(woken2, 1);
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(1)).ok());  // k1's first
  EXPECT_EQ(woken1, 1);
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(2)).ok());  // and second
  EXPECT_EQ(woken1, 1);  // once
  // All known already: at once. Delivered ones count as known (the answer is a 400).
  int now_known = 0;
  auto h3 = p.bob->when_known(ids_of(k1), [&] { ++now_known; });
  EXPECT_EQ(now_known, 1);
  ASSERT_TRUE(p.bob->take("bob", "alice", ids_of(k2), 0ms).ok());
  auto h4 = p.bob->when_known(ids_of(k2), [&] { ++now_known; });
  EXPECT_EQ(now_known, 2);
  // Gone before its key arrives: not called.
  auto k3 = p.alice->allocate("alice", {"bob"}, 1, 32);
  ASSERT_TRUE(k3.ok());
  int dropped = 0;
  auto h5 = p.bob->when_known(ids_of(k3.value()), [&] { ++dropped; });
  h5.reset();
  ASSERT_TRUE(p.bob->apply_peer_assignment(p.from_alice.at(3)).ok());
  EXPECT_EQ(dropped, 0);
}

TEST(KeyStore, UnknownKeyWaitsThenNotFound) {
  auto s = qkd::kms::make_memory_key_store(Direction::kBob);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = s->take("bob", "alice", {"123e4567-e89b-42d3-a456-426614174000"}, 150ms);
  const auto dt = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
  EXPECT_GE(dt, 140ms);
  EXPECT_LT(dt, 1000ms);
}

TEST(KeyStore, RejectsOverlappingOrForeignAssignments) {
  Pair p;
  p.commit(pattern(256, 4));
  KeyAssignment own{"id-own", Direction::kBob, 0, 8, "bob", {"alice"}};
  EXPECT_FALSE(p.bob->apply_peer_assignment(own).ok());  // bob's own direction
  KeyAssignment a{"id-1", Direction::kAlice, 8, 8, "alice", {"bob"}, false};
  ASSERT_TRUE(p.bob->apply_peer_assignment(a).ok());
  KeyAssignment overlap{"id-2", Direction::kAlice, 0, 8, "alice", {"bob"}};
  EXPECT_FALSE(p.bob->apply_peer_assignment(overlap).ok());
  KeyAssignment dup{"id-1", Direction::kAlice, 64, 8, "alice", {"bob"}};
  EXPECT_FALSE(p.bob->apply_peer_assignment(dup).ok());
}

// A faulty peer's assignment whose end is past 2^64 (it would wrap around to bytes long
// used, and read outside the pool) or far beyond this end's pool (it would wait for ever at
// the head of the queue, holding up every notice behind it) is refused, a discard as much
// as a key; nothing of it waits, and the next honest assignment lands.
TEST(KeyStore, HostileAssignmentRangesAreRefused) {
  Pair p(pattern(256, 4));
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  const std::vector<KeyAssignment> hostile = {
      {"id-wrap", Direction::kAlice, max - 15, 32, "alice", {"bob"}},
      {"id-end", Direction::kAlice, max - 31, 32, "alice", {"bob"}},  // last byte 2^64 - 1
      {"id-far", Direction::kAlice, std::uint64_t{1} << 40, 32, "alice", {"bob"}},
      {"", Direction::kAlice, max - 7, 16, "", {}, true},  // a discard
  };
  for (const auto& a : hostile) {
    auto st = p.bob->apply_peer_assignment(a);
    ASSERT_FALSE(st.ok()) << a.key_id << " " << a.offset;
    EXPECT_EQ(st.error().code, ErrorCode::kProtocol) << st.error().message;
  }
  EXPECT_EQ(p.bob->stats().pending_notices, 0u);
  auto k = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(k.ok()) << k.error().message;
  p.deliver_notices();
  auto got = p.bob->take("bob", "alice", ids_of(k.value()), 0ms);
  ASSERT_TRUE(got.ok()) << got.error().message;
  EXPECT_TRUE(qkd::core::constant_time_equal(got.value()[0].key.span(), k.value()[0].key.span()));
}

// A notice's assignment as the peer sends it: every number must be a whole non-negative
// one within its field's range. nlohmann's get<> alone would wrap -16 around to 2^64 - 16
// (the wrap-around above), truncate a length of 2^32 and cast a float.
TEST(LinkNotice, AssignmentNumbersAreCheckedStrictly) {
  const nlohmann::json good = {{"id", "k"},       {"dir", 1},        {"off", 64},
                               {"len", 32},       {"master", "bob"}, {"slaves", {"alice"}}};
  const KeyAssignment a = qkd::kms::detail::assignment_from_json(good);
  EXPECT_EQ(a.direction, Direction::kBob);
  EXPECT_EQ(a.offset, 64u);
  EXPECT_EQ(a.length, 32u);
  EXPECT_FALSE(a.discard);
  const std::vector<std::pair<const char*, nlohmann::json>> bad = {
      {"off", -16},   {"off", 1.5},          {"off", "64"},  {"len", std::uint64_t{1} << 32},
      {"len", -1},    {"dir", 2},            {"dir", 256},   {"dir", -1},
      {"dir", 0.0},   {"off", nullptr},      {"len", 1e300}, {"slaves", "alice"}};
  for (const auto& [field, value] : bad) {
    nlohmann::json j = good;
    j[field] = value;
    EXPECT_ANY_THROW((void)qkd::kms::detail::assignment_from_json(j)) << field << " = " << value;
  }
  nlohmann::json missing = good;
  missing.erase("off");
  EXPECT_ANY_THROW((void)qkd::kms::detail::assignment_from_json(missing));
}

TEST(KeyStore, ResetForgetsPoolButKeepsAssignedKeys) {
  Pair p(pattern(256, 6));
  const auto ids = ids_of(p.allocate_and_notify({"bob"}, 1, 16));
  ASSERT_EQ(ids.size(), 1u);
  p.bob->reset_pool();
  EXPECT_EQ(p.bob->stats().own_available_bytes, 0u);
  EXPECT_TRUE(p.bob->take("bob", "alice", ids, 0ms).ok());
}

// store.prepared_keys: the first enc_keys of a pair also prepares the pair's reserve (one
// notice for both); later ones are served from it without a notice until it is half empty,
// then one notice tops it up. The peer holds every prepared key, with the same bytes.
TEST(KeyStore, PreparedKeysAreAnnouncedAheadAndServedInOrder) {
  Pair p;
  p.alice->set_prepared_keys(8);
  p.commit(pattern(2048, 4));  // 1024 bytes per direction: 64 keys of 16 bytes
  auto first = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(first.ok()) << first.error().message;
  ASSERT_EQ(p.from_alice.size(), 9u);  // the key, then the 8 prepared
  EXPECT_EQ(p.alice->stats().prepared_keys, 8u);
  EXPECT_EQ(p.alice->stats().own_available_bytes, 1024u - 9 * 16);
  std::vector<std::string> prepared_ids;
  for (std::size_t i = 1; i < p.from_alice.size(); ++i) {
    EXPECT_EQ(p.from_alice[i].master_sae, "alice");
    EXPECT_EQ(p.from_alice[i].slave_saes, std::vector<std::string>{"bob"});
    EXPECT_EQ(p.from_alice[i].length, 16u);
    prepared_ids.push_back(p.from_alice[i].key_id);
  }
  p.deliver_notices();
  // Five keys from the reserve: no notice (they were announced), in order of preparation.
  std::vector<qkd::kms::DeliveredKey> served;
  for (int i = 0; i < 5; ++i) {
    auto k = p.alice->allocate("alice", {"bob"}, 1, 16);
    ASSERT_TRUE(k.ok()) << k.error().message;
    EXPECT_EQ(k->front().key_id, prepared_ids[static_cast<std::size_t>(i)]);
    if (i < 4) {
      EXPECT_TRUE(p.from_alice.empty()) << "hand-out " << i;
    }
    served.push_back(std::move(k->front()));
  }
  // The fifth left 3 of 8, less than half: one notice of 5 keys tops the reserve up.
  EXPECT_EQ(p.from_alice.size(), 5u);
  EXPECT_EQ(p.alice->stats().prepared_keys, 8u);
  // Two keys at once come from the reserve too.
  auto two = p.alice->allocate("alice", {"bob"}, 2, 16);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->at(0).key_id, prepared_ids[5]);
  EXPECT_EQ(two->at(1).key_id, prepared_ids[6]);
  for (auto& k : *two) {
    served.push_back(std::move(k));
  }
  p.deliver_notices();
  // The peer serves each of them once, with the same bytes.
  for (const auto& k : served) {
    auto got = p.bob->take("bob", "alice", {k.key_id}, 0ms);
    ASSERT_TRUE(got.ok()) << got.error().message;
    EXPECT_TRUE(qkd::core::constant_time_equal(got->front().key.span(), k.key.span()));
    EXPECT_FALSE(p.bob->take("bob", "alice", {k.key_id}, 0ms).ok());
  }
  // Another size, another slave or an additional slave: allocated as before (and a size or
  // single slave gets its own reserve).
  p.from_alice.clear();
  auto other_size = p.alice->allocate("alice", {"bob"}, 1, 32);
  ASSERT_TRUE(other_size.ok());
  EXPECT_EQ(p.from_alice.size(), 1u + 8u);
  p.from_alice.clear();
  auto multi = p.alice->allocate("alice", {"bob", "carol"}, 1, 16);
  ASSERT_TRUE(multi.ok());
  EXPECT_EQ(p.from_alice.size(), 1u);
  EXPECT_EQ(p.alice->stats().prepared_keys, 6u + 8u);  // 16-byte reserve, 32-byte reserve
}

// A reserve takes at most half of the keys available, so a nearly empty pool is not locked
// away in one pair's reserve; a request the reserve cannot cover is allocated from the pool.
TEST(KeyStore, PreparedKeysTakeAtMostHalfThePool) {
  Pair p;
  p.alice->set_prepared_keys(32);
  p.commit(pattern(256, 5));  // 128 bytes per direction: 8 keys of 16 bytes
  auto k = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 3u);  // half of the 7 left
  auto four = p.alice->allocate("alice", {"bob"}, 4, 16);  // more than the reserve holds
  ASSERT_TRUE(four.ok()) << four.error().message;
  EXPECT_EQ(p.alice->stats().own_available_bytes, 0u);
  EXPECT_EQ(p.alice->stats().prepared_keys, 3u);
  auto from_reserve = p.alice->allocate("alice", {"bob"}, 3, 16);
  ASSERT_TRUE(from_reserve.ok()) << from_reserve.error().message;
  EXPECT_EQ(p.alice->stats().prepared_keys, 0u);
  EXPECT_FALSE(p.alice->allocate("alice", {"bob"}, 1, 16).ok());
  // All reserves together: no more than the pool keeps. A second pair finds the first's
  // reserve as large as the pool left, and gets none.
  p.commit(pattern(512, 6));  // 16 more keys of 16 bytes
  ASSERT_TRUE(p.alice->allocate("alice", {"bob"}, 1, 16).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 7u);  // half of the 15 left
  ASSERT_TRUE(p.alice->allocate("alice", {"carol"}, 1, 16).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 7u);
  EXPECT_EQ(p.alice->stats().own_available_bytes, 7u * 16);
}

// Prepared keys expire with keys.max_age_s counted from their preparation, and a pool reset
// drops them (the peer may not have their notice).
TEST(KeyStore, PreparedKeysExpireAndGoWithAPoolReset) {
  Pair p;
  p.alice->set_prepared_keys(4);
  p.alice->set_max_age(std::chrono::seconds(10));
  p.commit(pattern(1024, 6));
  ASSERT_TRUE(p.alice->allocate("alice", {"bob"}, 1, 16).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 4u);
  ASSERT_TRUE(p.alice->expire(std::chrono::system_clock::now() + std::chrono::seconds(5)).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 4u);
  ASSERT_TRUE(p.alice->expire(std::chrono::system_clock::now() + std::chrono::seconds(11)).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 0u);
  p.alice->set_max_age(std::chrono::seconds(0));
  p.commit(pattern(1024, 7));
  ASSERT_TRUE(p.alice->allocate("alice", {"bob"}, 1, 16).ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 4u);
  p.alice->reset_pool();
  EXPECT_EQ(p.alice->stats().prepared_keys, 0u);
}

// At a clean stop the reserve is withdrawn: one discard notice names each prepared key, and
// the peer drops exactly those (a key handed out stays deliverable; the pools are
// untouched: the bytes left both with the assignments).
TEST(KeyStore, WithdrawnPreparedKeysLeaveThePeer) {
  Pair p;
  p.alice->set_prepared_keys(4);
  p.commit(pattern(1024, 8));
  auto k = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(k.ok());
  auto from_reserve = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(from_reserve.ok());
  p.deliver_notices();
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, 5u);
  const auto bob_before = p.bob->stats();
  p.alice->withdraw_prepared();
  EXPECT_EQ(p.alice->stats().prepared_keys, 0u);
  ASSERT_EQ(p.from_alice.size(), 3u);
  // A request still running at the stop gets its key, and no new reserve.
  auto late = p.alice->allocate("alice", {"bob"}, 1, 16);
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(p.alice->stats().prepared_keys, 0u);
  ASSERT_EQ(p.from_alice.size(), 4u);
  p.from_alice.pop_back();
  p.alice->set_prepared_keys(4);  // as a restarted KME
  for (const auto& a : p.from_alice) {
    EXPECT_TRUE(a.discard);
    EXPECT_FALSE(a.key_id.empty());
    EXPECT_NE(a.key_id, from_reserve->front().key_id);
  }
  const auto withdrawn = p.from_alice.front().key_id;
  p.deliver_notices();
  const auto bob_after = p.bob->stats();
  EXPECT_EQ(bob_after.assigned_keys_waiting, 2u);
  EXPECT_EQ(bob_after.peer_available_bytes, bob_before.peer_available_bytes);
  EXPECT_EQ(bob_after.own_available_bytes, bob_before.own_available_bytes);
  EXPECT_EQ(p.bob->take("bob", "alice", {withdrawn}, 0ms).error().code,
            ErrorCode::kInvalidArgument);
  for (const auto* keys : {&k.value(), &from_reserve.value()}) {
    auto got = p.bob->take("bob", "alice", ids_of(*keys), 0ms);
    ASSERT_TRUE(got.ok()) << got.error().message;
    EXPECT_TRUE(qkd::core::constant_time_equal(got->front().key.span(), keys->front().key.span()));
  }
  // A withdrawal naming another master than the key's changes nothing.
  auto other = p.alice->allocate("alice", {"bob"}, 1, 16);  // a new reserve of 4
  ASSERT_TRUE(other.ok());
  p.deliver_notices();
  ASSERT_TRUE(p.bob->take("bob", "alice", ids_of(*other), 0ms).ok());
  const auto waiting = p.bob->stats().assigned_keys_waiting;
  p.alice->withdraw_prepared();
  ASSERT_EQ(p.from_alice.size(), 4u);
  p.from_alice[0].master_sae = "mallory";
  p.deliver_notices();
  EXPECT_EQ(p.bob->stats().assigned_keys_waiting, waiting - 3);
}

}  // namespace
