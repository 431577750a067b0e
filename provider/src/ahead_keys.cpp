#include "ahead_keys.hpp"

#include <unistd.h>

#include <algorithm>
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

AheadKeys::AheadKeys(AheadLimits limits) : limits_(limits), pid_(::getpid()) {}

AheadKeys::~AheadKeys() { shutdown(); }

void AheadKeys::shutdown() {
  std::thread t;
  {
    std::lock_guard lock(mu_);
    check_fork_locked();
    stopping_ = true;
    t = worker_.release();
  }
  if (t.joinable()) {
    t.join();
  }
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
  jobs_.clear();
  client_id_.reset();
  pid_ = now_pid;
}

void AheadKeys::sweep_locked(Clock::time_point now) {
  last_sweep_ = now;
  for (auto it = held_.begin(); it != held_.end();) {
    if (now - it->second.fetched >= limits_.max_age) {
      it = held_.erase(it);
      ++stats_.expired;
    } else {
      ++it;
    }
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
                                           const std::vector<KeyId>& ahead) {
  std::vector<KeyId> out;
  for (std::size_t i = 0; i < ahead.size(); ++i) {
    HeldId h{master, ahead[i]};
    if (held_.count(h) != 0 || in_flight_.count(h) != 0) {
      continue;
    }
    if (held_.size() + in_flight_.size() >= limits_.max_keys) {
      stats_.not_fetched += ahead.size() - i;
      break;
    }
    in_flight_.insert(std::move(h));
    out.push_back(ahead[i]);
  }
  return out;
}

std::optional<SecureBuf> AheadKeys::settle_locked(const std::string& master,
                                                  const std::vector<KeyId>& ids,
                                                  std::size_t key_bytes,
                                                  Result<std::vector<qkd::etsi::Key>>& got,
                                                  const KeyId* wanted, bool included_announced) {
  for (const KeyId& id : ids) {
    in_flight_.erase(HeldId{master, id});
  }
  settled_.notify_all();
  // A clean refusal (ETSI: all or nothing) consumed nothing; anything else may have consumed
  // keys that the server reserved for this client_id without their reaching us.
  const auto lost = [&] {
    if (included_announced) {
      new_client_id_locked();
    }
  };
  if (!got.ok()) {
    if (got.error().code != ErrorCode::kRejected) {
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
      got = make_error(ErrorCode::kProtocol,
                       "bad reply from key service: key_ID \"" + k.key_id.substr(0, 80) +
                           "\" was not asked for");
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
    SecureBuf key((*got)[i].key.span());
    if (wanted != nullptr && parsed[i] == *wanted) {
      out = std::move(key);
    } else if (!stopping_) {
      held_.insert_or_assign(HeldId{master, parsed[i]}, Held{std::move(key), now});
    }
  }
  return out;
}

Result<SecureBuf> AheadKeys::take(const std::string& master, const KeyId& key_id,
                                  const std::vector<KeyId>& ahead, std::size_t key_bytes,
                                  Clock::time_point now, const Fetch& fetch) {
  std::unique_lock lock(mu_);
  check_fork_locked();
  if (now - last_sweep_ >= std::chrono::seconds(1)) {
    sweep_locked(now);
  }
  const HeldId hid{master, key_id};
  if (in_flight_.count(hid) != 0) {
    // Another call is fetching this key (the worker, or a concurrent handshake's call that
    // included it): asking the KME again would be refused, so wait for that call.
    ++stats_.waits;
    const bool settled = settled_.wait_for(lock, limits_.wait,
                                           [&] { return in_flight_.count(hid) == 0; });
    if (!settled) {
      return make_error(ErrorCode::kTimeout,
                        "key_ID " + uuid_format(key_id) + " still being fetched after " +
                            std::to_string(limits_.wait.count()) + " ms");
    }
  }
  if (auto it = held_.find(hid); it != held_.end()) {
    SecureBuf key = std::move(it->second.key);
    held_.erase(it);
    ++stats_.hits;
    std::vector<KeyId> ids = claim_locked(master, ahead);
    if (!ids.empty()) {
      jobs_.push_back(Job{master, ids, key_bytes});
      if (!limits_.background || stopping_ ||
          (!worker_.running() && !worker_.start([this, fetch] { run_jobs(fetch); }))) {
        jobs_.pop_back();  // not fetched: a handshake that uses one fetches it then
        for (const KeyId& id : ids) {
          in_flight_.erase(HeldId{master, id});
        }
        stats_.not_fetched += ids.size();
      }
    }
    return key;
  }
  // Not held: one call for this key and the announced ones.
  std::vector<KeyId> ids{key_id};
  const std::vector<KeyId> extra = claim_locked(master, ahead);
  ids.insert(ids.end(), extra.begin(), extra.end());
  in_flight_.insert(hid);
  lock.unlock();
  auto got = fetch(master, as_text(ids));
  if (!got.ok() && !extra.empty()) {
    // One refused announced key_ID fails the whole ETSI request: ask for this key alone.
    {
      std::lock_guard relock(mu_);
      std::vector<KeyId> announced(ids.begin() + 1, ids.end());
      (void)settle_locked(master, announced, key_bytes, got, nullptr, true);
    }
    ids.resize(1);
    got = fetch(master, as_text(ids));
  }
  lock.lock();
  auto key = settle_locked(master, ids, key_bytes, got, &key_id, ids.size() > 1);
  if (!got.ok()) {
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
    lock.unlock();
    auto got = fetch(job.master, as_text(job.ids));
    lock.lock();
    ++stats_.background_fetches;
    (void)settle_locked(job.master, job.ids, job.key_bytes, got, nullptr, true);
  }
  for (const Job& job : jobs_) {  // stopping: not fetched
    for (const KeyId& id : job.ids) {
      in_flight_.erase(HeldId{job.master, id});
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

}  // namespace qkd::prov
