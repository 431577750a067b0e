#include "key_cache.hpp"

#include <unistd.h>

#include <algorithm>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;
using qkd::core::Result;

KeyCache::KeyCache(KeyCacheLimits limits)
    : ForkGuarded(mu_), limits_(limits), pid_(::getpid()) {
  guard_forks();
}

KeyCache::~KeyCache() {
  unguard_forks();
  shutdown();
}

void KeyCache::stop_soon() {
  std::lock_guard lock(mu_);
  check_fork_locked();
  stopping_ = true;
}

void KeyCache::shutdown() {
  stop_soon();
  refill_.join(mu_);
}

std::uint32_t KeyCache::uncapped_locked(Entry& e, Clock::time_point now) const {
  if (e.cap != kNoCap && now - e.capped_at >= limits_.cap_retry) {
    e.cap = kNoCap;  // try larger batches again
  }
  return e.cap;
}

void KeyCache::maybe_refill_ahead_locked(const EntryKey& ek, Entry& e, Clock::time_point now,
                                         const Fetch& fetch) {
  if (!limits_.refill_ahead || stopping_ || refill_.running() || e.fetching ||
      limits_.max_batch <= 1) {
    return;
  }
  if (e.fetched_once && now - e.last_fetch < limits_.max_age / 2) {
    e.batch = std::min({limits_.max_batch, uncapped_locked(e, now), e.batch * 2});
  }
  const std::size_t low_water = std::max<std::size_t>(1, e.batch / 4);
  if (e.keys.size() > low_water || e.keys.size() >= e.batch) {
    return;
  }
  const std::size_t room = limits_.max_total > total_ ? limits_.max_total - total_ : 0;
  const auto number =
      static_cast<std::uint32_t>(std::min<std::size_t>(e.batch - e.keys.size(), room));
  if (number == 0) {
    return;
  }
  if (!refill_.start([this, ek, number, fetch] { run_refill(ek, number, fetch); })) {
    return;  // no thread: the next empty take refills in line
  }
  e.fetching = true;
}

void KeyCache::run_refill(EntryKey ek, std::uint32_t number, Fetch fetch) {
  auto got = caught([&] { return fetch(number, std::nullopt); });
  const auto now = Clock::now();
  const bool refused = !got.ok() && got.error().code == ErrorCode::kRejected;
  Result<std::vector<Slot>> slots = convert(std::move(got), ek.second, now);
  std::lock_guard lock(mu_);
  refill_.done();
  auto it = entries_.find(ek);
  if (::getpid() != pid_ || it == entries_.end()) {
    return;
  }
  Entry& e = it->second;
  e.fetching = false;
  if (refused) {
    e.cap = std::max<std::uint32_t>(1, number / 2);  // as for a batch refused in line
    e.capped_at = now;
    e.batch = e.cap;
  }
  if (!slots.ok()) {
    return;  // the next empty take fetches in line and reports the error
  }
  e.last_fetch = now;
  e.fetched_once = true;
  ++stats_.fetches;
  ++stats_.background_fetches;
  stats_.keys_fetched += slots->size();
  for (auto& slot : *slots) {
    if (total_ >= limits_.max_total || stopping_) {
      ++stats_.expired;  // cleansed unused
      continue;
    }
    e.keys.push_back(std::move(slot));
    ++total_;
  }
}

void KeyCache::reset_in_child() {
  // The parent may hand these keys out: a child that never makes a handshake must not keep
  // them either. Zeroed here, freed at the first call (check_fork_locked()): freeing could
  // wait for the secure heap's lock, which a thread of the parent may have held at fork().
  for (auto& [ek, e] : entries_) {
    for (Slot& slot : e.keys) {
      slot.key.cleanse();
    }
  }
  for (auto& [rk, r] : reservations_) {
    for (Slot& slot : r.keys) {
      slot.key.cleanse();
    }
  }
}

void KeyCache::check_fork_locked() {
  const pid_t now_pid = ::getpid();
  if (now_pid == pid_) {
    return;
  }
  refill_.forget_after_fork();
  // A child of fork(): the parent may hand out the same keys. Forget them all (cleansed by
  // SecureBuf) and start with no history.
  stats_.dropped_on_fork += total_;
  entries_.clear();
  reservations_.clear();
  total_ = 0;
  pid_ = now_pid;
}

bool KeyCache::expire_keys_locked(std::deque<Slot>& keys, Clock::time_point now) {
  bool expired = false;
  while (!keys.empty() && now - keys.front().fetched >= limits_.max_age) {
    keys.pop_front();
    --total_;
    ++stats_.expired;
    expired = true;
  }
  return expired;
}

void KeyCache::expire_locked(Entry& e, Clock::time_point now) {
  if (expire_keys_locked(e.keys, now)) {
    e.batch = std::max<std::uint32_t>(1, e.batch / 2);
  }
}

void KeyCache::sweep_locked(Clock::time_point now) {
  last_sweep_ = now;
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& e = it->second;
    expire_locked(e, now);
    if (e.keys.empty() && !e.fetching && now - e.last_fetch >= limits_.max_age) {
      it = entries_.erase(it);  // nothing held, history stale: forget the SAE
    } else {
      ++it;
    }
  }
  for (auto it = reservations_.begin(); it != reservations_.end();) {
    expire_reserved_locked(it->first.first, it->second, now);
    if (it->second.keys.empty() && now - it->second.last_seen >= limits_.max_age) {
      it = reservations_.erase(it);  // the client process is gone or has a new client_id
    } else {
      ++it;
    }
  }
}

Result<std::vector<KeyCache::Slot>> KeyCache::convert(
    Result<std::vector<qkd::etsi::Key>> got, std::size_t key_bytes, Clock::time_point now) const {
  if (!got.ok()) {
    return got.error();
  }
  try {
    return convert_keys(got.value(), key_bytes, now);
  } catch (const std::bad_alloc&) {  // SecureBuf: a full secure heap
    return make_error(ErrorCode::kInternal, "out of memory for prefetched keys");
  }
}

Result<std::vector<KeyCache::Slot>> KeyCache::convert_keys(const std::vector<qkd::etsi::Key>& keys,
                                                           std::size_t key_bytes,
                                                           Clock::time_point now) const {
  std::vector<Slot> out;
  out.reserve(keys.size());
  for (const auto& k : keys) {
    auto id = uuid_parse(k.key_id);
    if (!id.ok()) {
      return make_error(ErrorCode::kProtocol, "bad reply from key service: " + id.error().message);
    }
    if (k.key.size() != key_bytes) {
      return make_error(ErrorCode::kProtocol, "bad reply from key service: key of " +
                                                  std::to_string(k.key.size()) + " bytes, expected " +
                                                  std::to_string(key_bytes));
    }
    out.push_back(Slot{id.value(), SecureBuf(k.key.span()), now});
  }
  if (out.empty()) {
    return make_error(ErrorCode::kProtocol, "bad reply from key service: no key");
  }
  return out;
}

template <typename Map>
typename Map::iterator KeyCache::find_or_make_locked(Map& map, const typename Map::key_type& key,
                                                     Clock::time_point now) {
  if (now - last_sweep_ >= std::chrono::seconds(1)) {
    sweep_locked(now);
  }
  auto it = map.find(key);
  if (it == map.end() && map.size() >= limits_.max_saes) {
    sweep_locked(now);
  }
  if (it == map.end() && map.size() < limits_.max_saes) {
    it = map.emplace(key, typename Map::mapped_type{}).first;
  }
  return it;
}

Result<CachedKey> KeyCache::take(std::string_view slave, const ClientId* client,
                                 std::size_t key_bytes, Clock::time_point now,
                                 Deadline deadline, const Fetch& fetch) {
  const EntryKey ek{std::string(slave), key_bytes};
  if (client == nullptr || limits_.announce == 0) {
    return take_unreserved(ek, now, deadline, fetch);
  }
  const ReservationKey rk{ek, *client};
  {
    std::lock_guard lock(mu_);
    check_fork_locked();
    auto it = find_or_make_locked(reservations_, rk, now);
    if (it != reservations_.end()) {  // else: too many client_ids; announce nothing to this one
      Reservation& r = it->second;
      ++r.seen;
      r.last_seen = now;
      expire_reserved_locked(ek, r, now);
      if (!r.keys.empty()) {
        Slot slot = std::move(r.keys.front());
        r.keys.pop_front();
        --total_;
        ++stats_.hits;
        ++stats_.reserved_hits;
        CachedKey out{slot.key_id, std::move(slot.key), true, {}};
        announce_locked(ek, r, now, fetch, &out.ahead);
        return out;
      }
    }
  }
  auto out = take_unreserved(ek, now, deadline, fetch);
  if (out.ok()) {
    std::lock_guard lock(mu_);
    check_fork_locked();
    // The first share with a client_id gets nothing announced: a process that makes one
    // handshake (curl) would leave the reserved keys unused.
    if (auto it = reservations_.find(rk); it != reservations_.end() && it->second.seen >= 2) {
      announce_locked(ek, it->second, now, fetch, &out->ahead);
    }
  }
  return out;
}

void KeyCache::expire_reserved_locked(const EntryKey& ek, Reservation& r, Clock::time_point now) {
  if (!expire_keys_locked(r.keys, now)) {
    return;
  }
  // Announced keys went unused: announce fewer to this client_id, fetch fewer for its SAE.
  r.target = std::max<std::uint32_t>(1, r.target / 2);
  if (auto it = entries_.find(ek); it != entries_.end()) {
    it->second.batch = std::max<std::uint32_t>(1, it->second.batch / 2);
  }
}

void KeyCache::announce_locked(const EntryKey& ek, Reservation& r, Clock::time_point now,
                               const Fetch& fetch, std::vector<KeyId>* ahead) {
  const std::uint32_t announce = std::min<std::uint32_t>(limits_.announce, kMaxAhead);
  if (r.target == 0) {
    r.target = std::min<std::uint32_t>(2, announce);  // a client_id earns more by using them
  }
  if (r.keys.size() > std::max<std::size_t>(1, r.target / 4)) {
    return;
  }
  auto it = entries_.find(ek);
  if (it == entries_.end()) {
    return;
  }
  Entry& e = it->second;
  expire_locked(e, now);
  // The reservation ran low: grow it when the last top-up went within max_age / 2.
  const bool grow = r.topped_up_once && now - r.last_top_up < limits_.max_age / 2;
  const std::uint32_t target =
      grow ? std::min<std::uint32_t>(announce, r.target * 2) : r.target;
  // Announce in batches: each announcement costs the client one dec_keys call, so while the
  // reservation still holds keys, wait for the SAE's cache to hold half of what is missing.
  const std::size_t missing = target - std::min<std::size_t>(target, r.keys.size());
  if (!r.keys.empty() && e.keys.size() < std::max<std::size_t>(1, missing / 2)) {
    maybe_refill_ahead_locked(ek, e, now, fetch);
    return;
  }
  // The freshest keys of the cache (its back), so that the client does not fetch a key the
  // server drops soon; none older than max_age / 2.
  std::size_t n = std::min(missing, e.keys.size());
  while (n > 0 && now - e.keys[e.keys.size() - n].fetched >= limits_.max_age / 2) {
    --n;
  }
  if (n > 0) {
    r.target = target;
    r.topped_up_once = true;
    r.last_top_up = now;
  }
  for (auto first = e.keys.end() - static_cast<std::ptrdiff_t>(n); first != e.keys.end(); ++first) {
    ahead->push_back(first->key_id);
    r.keys.push_back(std::move(*first));  // still counted in total_
    ++stats_.announced;
  }
  e.keys.erase(e.keys.end() - static_cast<std::ptrdiff_t>(n), e.keys.end());
  maybe_refill_ahead_locked(ek, e, now, fetch);
}

Result<CachedKey> KeyCache::take_unreserved(const EntryKey& ek, Clock::time_point now,
                                            Deadline deadline, const Fetch& fetch) {
  const std::size_t key_bytes = ek.second;
  std::uint32_t number = 1;
  bool refill = false;       // this call refills the SAE's cache (else: a side fetch of 1)
  bool batch_fetch = false;  // ... with more than one key
  {
    std::lock_guard lock(mu_);
    check_fork_locked();
    auto it = find_or_make_locked(entries_, ek, now);
    if (it != entries_.end()) {  // else: too many SAEs remembered; this one is not cached
      Entry& e = it->second;
      expire_locked(e, now);
      if (!e.keys.empty()) {
        Slot slot = std::move(e.keys.front());
        e.keys.pop_front();
        --total_;
        ++stats_.hits;
        maybe_refill_ahead_locked(ek, e, now, fetch);
        return CachedKey{slot.key_id, std::move(slot.key), true, {}};
      }
      if (!e.fetching && limits_.max_batch > 1) {
        // The cache ran dry: grow the batch when the last one went fast.
        if (e.fetched_once && now - e.last_fetch < limits_.max_age / 2) {
          e.batch = std::min({limits_.max_batch, uncapped_locked(e, now), e.batch * 2});
        }
        const std::size_t room = limits_.max_total > total_ ? limits_.max_total - total_ : 0;
        number = static_cast<std::uint32_t>(std::min<std::size_t>(e.batch, room + 1));
        batch_fetch = number > 1;
        refill = true;
        e.fetching = true;
      }
    }
  }

  auto got = caught([&] { return fetch(number, deadline); });
  bool fell_back = false;
  if (!got.ok() && batch_fetch && got.error().code == ErrorCode::kRejected) {
    // The KME may cap the number or be short of keys. Within the same deadline: a slow
    // refusal followed by a slow retry must not hold the handshake for two timeouts.
    got = caught([&] { return fetch(1, deadline); });
    fell_back = true;
  }
  Result<std::vector<Slot>> slots = convert(std::move(got), key_bytes, now);

  std::lock_guard lock(mu_);
  check_fork_locked();
  auto it = entries_.find(ek);
  Entry* e = it != entries_.end() ? &it->second : nullptr;
  if (e != nullptr && refill) {
    e->fetching = false;
    if (fell_back) {
      e->cap = std::max<std::uint32_t>(1, number / 2);
      e->capped_at = now;
      e->batch = e->cap;
    }
  }
  if (!slots.ok()) {
    return slots.error();
  }
  if (e != nullptr && refill) {
    e->last_fetch = now;
    e->fetched_once = true;
  }
  ++stats_.fetches;
  stats_.keys_fetched += slots->size();
  CachedKey out{slots->front().key_id, std::move(slots->front().key), false, {}};
  for (std::size_t i = 1; i < slots->size(); ++i) {
    if (e == nullptr || total_ >= limits_.max_total) {
      ++stats_.expired;  // no room: cleansed unused (not expected: the batch fits the room)
      continue;
    }
    e->keys.push_back(std::move((*slots)[i]));
    ++total_;
  }
  return out;
}

std::size_t KeyCache::cached(std::string_view slave, std::size_t key_bytes) {
  std::lock_guard lock(mu_);
  check_fork_locked();
  const auto it = entries_.find(EntryKey{std::string(slave), key_bytes});
  return it == entries_.end() ? 0 : it->second.keys.size();
}

std::size_t KeyCache::reserved(std::string_view slave, const ClientId& client,
                               std::size_t key_bytes) {
  std::lock_guard lock(mu_);
  check_fork_locked();
  const auto it = reservations_.find(ReservationKey{{std::string(slave), key_bytes}, client});
  return it == reservations_.end() ? 0 : it->second.keys.size();
}

std::uint32_t KeyCache::batch(std::string_view slave, std::size_t key_bytes) {
  std::lock_guard lock(mu_);
  const auto it = entries_.find(EntryKey{std::string(slave), key_bytes});
  return it == entries_.end() ? 0 : it->second.batch;
}

KeyCacheStats KeyCache::stats() {
  std::lock_guard lock(mu_);
  return stats_;
}

bool KeyCache::all_in_secure_heap() {
  std::lock_guard lock(mu_);
  bool any = false;
  const auto check = [&any](const std::deque<Slot>& keys) {
    for (const auto& s : keys) {
      if (!s.key.in_secure_heap()) {
        return false;
      }
      any = true;
    }
    return true;
  };
  for (const auto& [k, e] : entries_) {
    if (!check(e.keys)) {
      return false;
    }
  }
  for (const auto& [k, r] : reservations_) {
    if (!check(r.keys)) {
      return false;
    }
  }
  return any;
}

std::size_t KeyCache::keys_not_cleansed() {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& [ek, e] : entries_) {
    n += std::count_if(e.keys.begin(), e.keys.end(),
                       [](const Slot& s) { return s.key.any_nonzero(); });
  }
  for (const auto& [rk, r] : reservations_) {
    n += std::count_if(r.keys.begin(), r.keys.end(),
                       [](const Slot& s) { return s.key.any_nonzero(); });
  }
  return n;
}

}  // namespace qkd::prov
