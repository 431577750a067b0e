#include "ahead_keys.hpp"

#include <unistd.h>

#include <algorithm>
#include <new>
#include <thread>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;
using qkd::core::Result;

namespace {

std::vector<std::string> as_text(const std::vector<KeyId>& ids) {
  std::vector<std::string> out;
  out.reserve(ids.size());
  for (const KeyId& id : ids) {
    out.push_back(uuid_format(id));
  }
  return out;
}

}  // namespace

AheadKeys::AheadKeys(AheadLimits limits)
    : ForkGuarded(mu_), limits_(limits), pid_(::getpid()) {
  guard_forks();
}

AheadKeys::~AheadKeys() {
  unguard_forks();
  shutdown();
}

void AheadKeys::reset_in_child() {
  // Threads waiting on settled_ in the parent do not exist here, but the condition
  // variable still counts them, and a notify could wait for them for ever: start afresh
  // (the old one owns no resource to free).
  new (&settled_) std::condition_variable();
  // The parent may use these keys: a child that never makes a handshake must not keep them
  // either. Zeroed here, freed at the first call (check_fork_locked()): freeing could wait
  // for the secure heap's lock, which a thread of the parent may have held at fork().
  for (auto& [id, h] : held_) {
    h.key.cleanse();
  }
}

void AheadKeys::stop_soon() {
  std::lock_guard lock(mu_);
  check_fork_locked();
  stopping_ = true;
}

void AheadKeys::shutdown() {
  stop_soon();
  worker_.join(mu_);
}

void AheadKeys::check_fork_locked() {
  const pid_t now_pid = ::getpid();
  if (now_pid == pid_) {
    return;
  }
  worker_.forget_after_fork();
  // The parent holds the same keys and may use them: drop ours (cleansed by SecureBuf) and
  // take a new client_id, for which no server has reserved anything.
  stats_.dropped_on_fork += held_.size();
  held_.clear();
  in_flight_.clear();
  queued_.clear();
  jobs_.clear();
  client_id_.reset();
  pid_ = now_pid;
}

void AheadKeys::sweep_locked(Clock::time_point now) {
  last_sweep_ = now;
  bool own_expired = false;
  for (auto it = held_.begin(); it != held_.end();) {
    if (now - it->second.fetched >= limits_.max_age) {
      own_expired |= client_id_ && it->second.owner == *client_id_;
      it = held_.erase(it);
      ++stats_.expired;
    } else {
      ++it;
    }
  }
  if (own_expired) {
    // A server that keeps reservations longer than this client keeps keys could still hand
    // that key out: make sure it never will.
    new_client_id_locked();
  }
}

void AheadKeys::new_client_id_locked() {
  if (client_id_) {
    client_id_.reset();  // the next key share gets a fresh one
    ++stats_.client_id_changes;
  }
}

Result<std::optional<ClientId>> AheadKeys::client_id() {
  std::lock_guard lock(mu_);
  check_fork_locked();
  if (limits_.max_keys == 0) {
    return std::optional<ClientId>();
  }
  const auto now = Clock::now();
  if (now - last_sweep_ >= std::chrono::seconds(1)) {
    sweep_locked(now);
  }
  if (!client_id_) {
    ClientId id{};
    if (auto rnd = qkd::etsi::random_bytes(id); !rnd.ok()) {
      return rnd.error();
    }
    client_id_ = id;
  }
  return client_id_;
}

std::vector<KeyId> AheadKeys::claim_locked(const std::string& master,
                                           const std::vector<KeyId>& ahead, std::size_t limit) {
  std::vector<KeyId> out;
  for (std::size_t i = 0; i < ahead.size(); ++i) {
    const HeldId h{master, ahead[i]};
    if (held_.count(h) != 0 || in_flight_.count(h) != 0 || queued_.count(h) != 0) {
      continue;
    }
    if (out.size() >= limit ||
        held_.size() + in_flight_.size() + queued_.size() + out.size() >= limits_.max_keys) {
      stats_.not_fetched += ahead.size() - i;
      break;
    }
    out.push_back(ahead[i]);
  }
  return out;
}

void AheadKeys::enqueue_locked(const std::string& master, const std::vector<KeyId>& ahead,
                               std::size_t key_bytes, const Fetch& fetch) {
  if (stopping_ || !limits_.background || !client_id_) {
    stats_.not_fetched += ahead.size();
    return;
  }
  std::vector<KeyId> ids = claim_locked(master, ahead, max_per_call_);
  if (ids.empty()) {
    return;
  }
  if (!worker_.running() && !worker_.start([this, fetch] { run_jobs(fetch); })) {
    stats_.not_fetched += ids.size();  // no thread: a handshake that uses one fetches it then
    return;
  }
  for (const KeyId& id : ids) {
    queued_.insert(HeldId{master, id});
  }
  jobs_.push_back(Job{master, std::move(ids), key_bytes, *client_id_});
}

void AheadKeys::unqueue_locked(const HeldId& id) {
  queued_.erase(id);
  for (Job& job : jobs_) {
    if (job.master == id.first) {
      std::erase(job.ids, id.second);
    }
  }
  ++stats_.taken_from_queue;
}

std::optional<SecureBuf> AheadKeys::settle_locked(const std::string& master,
                                                  const std::vector<KeyId>& ids,
                                                  std::size_t key_bytes, KemResult& got,
                                                  const KeyId* wanted, const ClientId* owner) {
  for (const KeyId& id : ids) {
    in_flight_.erase(HeldId{master, id});
  }
  settled_.notify_all();
  const bool announced = owner != nullptr && ids.size() > (wanted != nullptr ? 1U : 0U);
  // Keys the server reserved for the current client_id may have been consumed at the KME
  // without reaching us: make sure the server never hands them out again.
  const auto lost = [&] {
    if (announced && client_id_ && *owner == *client_id_) {
      new_client_id_locked();
    }
  };
  if (!got.ok()) {
    if (got.error().code == ErrorCode::kRejected) {
      // ETSI 014 requests are all or nothing: nothing was consumed. A KME may refuse this
      // many key_IDs in one call (max_key_per_request): ask for fewer from now on.
      if (ids.size() > 1) {
        max_per_call_ = std::max<std::size_t>(1, std::min(max_per_call_, ids.size()) / 2);
        capped_at_ = Clock::now();
      }
    } else {
      lost();
    }
    return std::nullopt;
  }
  ++stats_.fetches;
  stats_.keys_fetched += got->size();
  // Check the whole reply before keeping any of it.
  std::vector<KeyId> parsed;
  for (const auto& k : *got) {
    auto id = uuid_parse(k.key_id);
    if (!id.ok() || std::find(ids.begin(), ids.end(), id.value()) == ids.end() ||
        std::find(parsed.begin(), parsed.end(), id.value()) != parsed.end()) {
      lost();
      got = make_error(ErrorCode::kProtocol, "bad reply from key service: key_ID \"" +
                                                 k.key_id.substr(0, 80) + "\" was not asked for");
      return std::nullopt;
    }
    if (k.key.size() != key_bytes) {
      lost();
      got = make_error(ErrorCode::kProtocol, "bad reply from key service: key " + k.key_id +
                                                 " has " + std::to_string(k.key.size()) +
                                                 " bytes, expected " + std::to_string(key_bytes));
      return std::nullopt;
    }
    parsed.push_back(id.value());
  }
  if (parsed.size() != ids.size()) {
    lost();
  }
  std::optional<SecureBuf> out;
  const auto now = Clock::now();
  for (std::size_t i = 0; i < parsed.size(); ++i) {
    const bool is_wanted = wanted != nullptr && parsed[i] == *wanted;
    if (!is_wanted && (stopping_ || owner == nullptr)) {
      continue;  // unloading: cleansed unused
    }
    try {
      SecureBuf key((*got)[i].key.span());
      if (is_wanted) {
        out = std::move(key);
      } else {
        held_.insert_or_assign(HeldId{master, parsed[i]}, Held{std::move(key), now, *owner});
      }
    } catch (const std::bad_alloc&) {
      // A full secure heap: this key is delivered and lost.
      if (is_wanted) {
        got = make_error(ErrorCode::kInternal, "out of memory for key " + (*got)[i].key_id);
      } else {
        ++stats_.not_fetched;
        lost();
      }
    }
  }
  return out;
}

Result<SecureBuf> AheadKeys::take(const std::string& master, const KeyId& key_id,
                                  const std::vector<KeyId>& ahead,
                                  const std::optional<ClientId>& share_client_id,
                                  std::size_t key_bytes, Clock::time_point now,
                                  Deadline deadline, const Fetch& fetch) {
  std::unique_lock lock(mu_);
  check_fork_locked();
  if (now - last_sweep_ >= std::chrono::seconds(1)) {
    sweep_locked(now);
  }
  if (max_per_call_ < 1 + kMaxAhead && now - capped_at_ >= limits_.cap_retry) {
    max_per_call_ = 1 + kMaxAhead;  // try the full number again
  }
  // Announcements to an earlier client_id (replaced since this key share was made, or the
  // parent's in a forked child) are left alone: the server keeps them for that client_id.
  const bool current = share_client_id && client_id_ && *share_client_id == *client_id_;
  const std::vector<KeyId> no_ahead;
  const std::vector<KeyId>& announced = current ? ahead : no_ahead;
  const ClientId owner = current ? *client_id_ : ClientId{};
  const HeldId hid{master, key_id};
  if (queued_.count(hid) != 0) {
    unqueue_locked(hid);  // its batch has not started: fetch it now rather than wait
  } else if (in_flight_.count(hid) != 0) {
    // A running call is fetching this key: asking the KME again would be refused. The wait
    // counts against the operation's deadline: a call of our own after it gets what is left.
    ++stats_.waits;
    const auto started = Clock::now();
    auto until = started + limits_.wait;
    if (deadline) {
      until = std::min(until, *deadline);
    }
    const bool settled = settled_.wait_until(lock, until,
                                             [&] { return in_flight_.count(hid) == 0; });
    if (!settled) {
      const auto waited =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started);
      return make_error(ErrorCode::kTimeout, "key_ID " + uuid_format(key_id) +
                                                 " still being fetched after " +
                                                 std::to_string(waited.count()) + " ms");
    }
  }
  if (auto it = held_.find(hid); it != held_.end()) {
    SecureBuf key = std::move(it->second.key);
    held_.erase(it);
    ++stats_.hits;
    if (key.size() != key_bytes) {
      return make_error(ErrorCode::kProtocol, "key " + uuid_format(key_id) + " has " +
                                                  std::to_string(key.size()) + " bytes, expected " +
                                                  std::to_string(key_bytes));
    }
    if (!announced.empty()) {
      enqueue_locked(master, announced, key_bytes, fetch);
    }
    return key;
  }
  // Not held. With the operation's time already spent (on the wait above), no call is made:
  // its keys would be consumed at the KME with no one to read the reply, and the announced
  // ones taken for lost. They go to the worker instead, which has no deadline.
  if (deadline && Clock::now() >= *deadline) {
    if (!announced.empty()) {
      enqueue_locked(master, announced, key_bytes, fetch);
    }
    return make_error(ErrorCode::kTimeout,
                      "key_ID " + uuid_format(key_id) + ": no time left to fetch it");
  }
  // One call for this key and the announced ones.
  std::vector<KeyId> ids{key_id};
  const std::vector<KeyId> extra = claim_locked(master, announced, max_per_call_ - 1);
  ids.insert(ids.end(), extra.begin(), extra.end());
  for (const KeyId& id : ids) {
    in_flight_.insert(HeldId{master, id});
  }
  lock.unlock();
  auto got = caught([&] { return fetch(master, as_text(ids), deadline); });
  if (!got.ok() && got.error().code == ErrorCode::kRejected && !extra.empty()) {
    // One refused key_ID fails a whole ETSI request (and nothing was consumed): ask for
    // this key alone.
    {
      std::lock_guard relock(mu_);
      std::vector<KeyId> both = ids;
      (void)settle_locked(master, both, key_bytes, got, nullptr, &owner);
      in_flight_.insert(hid);
    }
    ids.resize(1);
    got = caught([&] { return fetch(master, as_text(ids), deadline); });  // same deadline
  }
  lock.lock();
  auto key = settle_locked(master, ids, key_bytes, got, &key_id, extra.empty() ? nullptr : &owner);
  if (!got.ok()) {
    if (got.error().code == ErrorCode::kRejected && current) {
      // The KME refused a key the server gave this client_id: another process may have
      // consumed it (a party that can alter a ServerHello can name announced key_IDs).
      // The server's reservation for this client_id is no longer to be trusted.
      new_client_id_locked();
    }
    return got.error();
  }
  if (!key) {
    return make_error(ErrorCode::kProtocol, "bad reply from key service: no key for key_ID " +
                                                uuid_format(key_id));
  }
  return std::move(*key);
}

void AheadKeys::run_jobs(Fetch fetch) {
  std::unique_lock lock(mu_);
  while (!jobs_.empty() && !stopping_) {
    Job job = std::move(jobs_.front());
    jobs_.pop_front();
    if (job.ids.empty()) {
      continue;  // every key_ID was taken out by handshakes
    }
    for (const KeyId& id : job.ids) {
      queued_.erase(HeldId{job.master, id});
      in_flight_.insert(HeldId{job.master, id});
    }
    lock.unlock();
    auto got = caught([&] { return fetch(job.master, as_text(job.ids), std::nullopt); });
    lock.lock();
    ++stats_.background_fetches;
    (void)settle_locked(job.master, job.ids, job.key_bytes, got, nullptr, &job.owner);
  }
  for (const Job& job : jobs_) {  // stopping: not fetched
    for (const KeyId& id : job.ids) {
      queued_.erase(HeldId{job.master, id});
    }
  }
  jobs_.clear();
  settled_.notify_all();
  worker_.done();
}

std::size_t AheadKeys::held() {
  std::lock_guard lock(mu_);
  check_fork_locked();
  return held_.size();
}

AheadStats AheadKeys::stats() {
  std::lock_guard lock(mu_);
  return stats_;
}

bool AheadKeys::all_in_secure_heap() {
  std::lock_guard lock(mu_);
  bool any = false;
  for (const auto& [id, h] : held_) {
    if (!h.key.in_secure_heap()) {
      return false;
    }
    any = true;
  }
  return any;
}

std::size_t AheadKeys::keys_not_cleansed() {
  std::lock_guard lock(mu_);
  return static_cast<std::size_t>(std::count_if(
      held_.begin(), held_.end(), [](const auto& held) { return held.second.key.any_nonzero(); }));
}

}  // namespace qkd::prov
