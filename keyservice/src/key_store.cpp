// In-memory key store (see key_store.hpp for the pool layout).
#include "qkd/kms/key_store.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "qkd/kms/util.hpp"

namespace qkd::kms {

std::uint64_t direction_bytes(std::uint64_t committed, Direction d) {
  const std::uint64_t full = committed / kChunkBytes;
  const std::uint64_t rem = committed % kChunkBytes;
  const auto parity = static_cast<std::uint64_t>(d);
  // Complete chunks of parity d among [0, full).
  const std::uint64_t chunks = (full + (parity == 0 ? 1 : 0)) / 2;
  const std::uint64_t partial = (full % 2 == parity) ? rem : 0;
  return chunks * kChunkBytes + partial;
}

namespace {

constexpr std::size_t kMaxRememberedIds = 1u << 20;
const char* const kNotFound = "one or more keys specified are not found on KME";

// One direction of the pool: a byte stream stored in 32-byte chunks. Bytes below `cursor`
// have been used (and cleansed); chunks wholly below it are dropped.
class DirectionStream {
 public:
  ~DirectionStream() { clear(); }

  void put(std::uint64_t chunk_index, std::size_t pos, std::uint8_t byte) {
    while (front_chunk_ + chunks_.size() <= chunk_index) {
      chunks_.emplace_back();
      chunks_.back().fill(0);
    }
    chunks_[chunk_index - front_chunk_][pos] = byte;
  }

  [[nodiscard]] std::uint64_t cursor() const { return cursor_; }

  // Copies [offset, offset+len) out, then cleanses everything below offset+len.
  // Precondition: cursor <= offset and offset+len is committed.
  void take(std::uint64_t offset, std::uint32_t len, qkd::core::SecureBytes& out) {
    out.resize(len);
    for (std::uint32_t i = 0; i < len; ++i) {
      out[i] = byte_at(offset + i);
    }
    advance(offset + len);
  }

  void advance(std::uint64_t new_cursor) {
    for (std::uint64_t p = cursor_; p < new_cursor; ++p) {
      byte_ref(p) = 0;
    }
    cursor_ = new_cursor;
    while (!chunks_.empty() && (front_chunk_ + 1) * kChunkBytes <= cursor_) {
      OPENSSL_cleanse(chunks_.front().data(), kChunkBytes);
      chunks_.pop_front();
      ++front_chunk_;
    }
  }

  void clear() {
    for (auto& c : chunks_) {
      OPENSSL_cleanse(c.data(), kChunkBytes);
    }
    chunks_.clear();
    front_chunk_ = 0;
    cursor_ = 0;
  }

 private:
  std::uint8_t& byte_ref(std::uint64_t p) {
    return chunks_[p / kChunkBytes - front_chunk_][p % kChunkBytes];
  }
  std::uint8_t byte_at(std::uint64_t p) { return byte_ref(p); }

  std::deque<std::array<std::uint8_t, kChunkBytes>> chunks_;
  std::uint64_t front_chunk_ = 0;
  std::uint64_t cursor_ = 0;
};

struct AssignedKey {
  qkd::core::SecureBytes key;
  std::string master;
  std::vector<std::string> slaves;
};

class MemoryKeyStore final : public KeyStore {
 public:
  explicit MemoryKeyStore(Direction own) : own_(own) {}

  void set_assignment_listener(AssignmentListener listener) override {
    std::lock_guard lock(mu_);
    listener_ = std::move(listener);
  }

  void commit(std::span<const std::uint8_t> block_key) override {
    std::lock_guard lock(mu_);
    for (std::uint8_t b : block_key) {
      const std::uint64_t chunk = committed_ / kChunkBytes;
      const auto pos = static_cast<std::size_t>(committed_ % kChunkBytes);
      streams_[chunk % 2].put(chunk / 2, pos, b);
      ++committed_;
    }
    (void)drain_pending_locked();  // overlapping notices are dropped
    cv_.notify_all();
  }

  void reset_pool() override {
    std::lock_guard lock(mu_);
    streams_[0].clear();
    streams_[1].clear();
    committed_ = 0;
    pending_.clear();
  }

  Status apply_peer_assignment(KeyAssignment a) override {
    std::lock_guard lock(mu_);
    if (a.direction == own_) {
      return qkd::core::make_error(ErrorCode::kProtocol,
                                   "peer assigned a key from this KME's direction");
    }
    if (a.length == 0 || a.key_id.empty() || records_.contains(a.key_id) ||
        used_ids_.contains(a.key_id)) {
      return qkd::core::make_error(ErrorCode::kProtocol,
                                   fmt::format("bad or duplicate assignment {}", a.key_id));
    }
    pending_.push_back(std::move(a));
    Status st = drain_pending_locked();
    cv_.notify_all();
    return st;
  }

  Result<std::vector<DeliveredKey>> allocate(const std::string& master_sae,
                                             const std::vector<std::string>& slave_saes,
                                             std::uint32_t number,
                                             std::uint32_t size_bytes) override {
    if (number == 0 || size_bytes == 0) {
      return qkd::core::make_error(ErrorCode::kInvalidArgument, "empty key request");
    }
    std::vector<std::string> ids;
    ids.reserve(number);
    for (std::uint32_t i = 0; i < number; ++i) {
      auto id = random_uuid_v4();
      if (!id.ok()) {
        return id.error();
      }
      ids.push_back(std::move(id.value()));
    }
    std::lock_guard lock(mu_);
    DirectionStream& s = own_stream();
    const std::uint64_t need = std::uint64_t{number} * size_bytes;
    const std::uint64_t avail = direction_bytes(committed_, own_) - s.cursor();
    if (need > avail) {
      return qkd::core::make_error(
          ErrorCode::kUnavailable,
          fmt::format("not enough key material: {} bits requested, {} bits available", need * 8,
                      avail * 8));
    }
    std::vector<DeliveredKey> keys;
    std::vector<KeyAssignment> assignments;
    keys.reserve(number);
    assignments.reserve(number);
    for (std::uint32_t i = 0; i < number; ++i) {
      KeyAssignment a{ids[i], own_, s.cursor(), size_bytes, master_sae, slave_saes};
      DeliveredKey k{ids[i], {}};
      s.take(a.offset, a.length, k.key);
      remember_used_locked(ids[i]);
      keys.push_back(std::move(k));
      assignments.push_back(std::move(a));
    }
    if (listener_) {
      listener_(assignments);
    }
    return keys;
  }

  Result<std::vector<DeliveredKey>> take(const std::string& caller_sae,
                                         const std::string& master_sae,
                                         const std::vector<std::string>& key_ids,
                                         std::chrono::milliseconds wait) override {
    if (key_ids.empty()) {
      return qkd::core::make_error(ErrorCode::kInvalidArgument, "no key_ID given");
    }
    {
      std::unordered_set<std::string> seen;
      for (const auto& id : key_ids) {
        if (!seen.insert(id).second) {
          return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
        }
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + wait;
    std::unique_lock lock(mu_);
    for (;;) {
      bool all_present = true;
      for (const auto& id : key_ids) {
        if (used_ids_.contains(id)) {
          return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
        }
        if (!records_.contains(id)) {
          all_present = false;
        }
      }
      if (all_present) {
        break;
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        // One last look after the deadline, then give up.
        bool present = std::all_of(key_ids.begin(), key_ids.end(),
                                   [&](const std::string& id) { return records_.contains(id); });
        if (!present) {
          return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
        }
        break;
      }
    }
    for (const auto& id : key_ids) {
      const AssignedKey& r = records_.at(id);
      const bool slave_ok =
          std::find(r.slaves.begin(), r.slaves.end(), caller_sae) != r.slaves.end();
      if (!slave_ok || r.master != master_sae) {
        return qkd::core::make_error(ErrorCode::kAuthentication,
                                     "caller is not an allowed slave of every key, or the "
                                     "master SAE does not match");
      }
    }
    std::vector<DeliveredKey> out;
    out.reserve(key_ids.size());
    for (const auto& id : key_ids) {
      auto node = records_.extract(id);
      out.push_back(DeliveredKey{id, std::move(node.mapped().key)});
      remember_used_locked(id);
    }
    return out;
  }

  StoreStats stats() const override {
    std::lock_guard lock(mu_);
    StoreStats st;
    st.committed_bytes = committed_;
    st.own_available_bytes =
        direction_bytes(committed_, own_) - streams_[static_cast<int>(own_)].cursor();
    const Direction peer = own_ == Direction::kAlice ? Direction::kBob : Direction::kAlice;
    st.peer_available_bytes =
        direction_bytes(committed_, peer) - streams_[static_cast<int>(peer)].cursor();
    st.assigned_keys_waiting = records_.size();
    st.pending_notices = pending_.size();
    return st;
  }

 private:
  DirectionStream& own_stream() { return streams_[static_cast<int>(own_)]; }

  Status drain_pending_locked() {
    Status result = qkd::core::ok_status();
    while (!pending_.empty()) {
      KeyAssignment& a = pending_.front();
      DirectionStream& s = streams_[static_cast<int>(a.direction)];
      if (a.offset < s.cursor()) {
        result = qkd::core::make_error(
            ErrorCode::kProtocol,
            fmt::format("assignment {} overlaps bytes already used", a.key_id));
        pending_.pop_front();
        continue;
      }
      if (a.offset + a.length > direction_bytes(committed_, a.direction)) {
        break;  // bytes not committed yet on this end
      }
      AssignedKey rec;
      s.take(a.offset, a.length, rec.key);
      rec.master = std::move(a.master_sae);
      rec.slaves = std::move(a.slave_saes);
      records_.emplace(std::move(a.key_id), std::move(rec));
      pending_.pop_front();
    }
    return result;
  }

  void remember_used_locked(const std::string& id) {
    if (used_ids_.insert(id).second) {
      used_order_.push_back(id);
      if (used_order_.size() > kMaxRememberedIds) {
        used_ids_.erase(used_order_.front());
        used_order_.pop_front();
      }
    }
  }

  const Direction own_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  AssignmentListener listener_;
  std::array<DirectionStream, 2> streams_;
  std::uint64_t committed_ = 0;
  std::deque<KeyAssignment> pending_;
  std::unordered_map<std::string, AssignedKey> records_;
  std::unordered_set<std::string> used_ids_;
  std::deque<std::string> used_order_;
};

}  // namespace

std::unique_ptr<KeyStore> make_memory_key_store(Direction own) {
  return std::make_unique<MemoryKeyStore>(own);
}

}  // namespace qkd::kms
