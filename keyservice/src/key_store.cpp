// The key store (see key_store.hpp for the pool layout): state in memory, changes recorded
// in an optional journal (store_journal.hpp) that makes them durable.
#include "qkd/kms/key_store.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "qkd/kms/util.hpp"
#include "store_journal.hpp"

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
constexpr std::string_view kDigestLabel = "qkd-kms pool digest v1";

void put_u64(EVP_MD_CTX* ctx, std::uint64_t v) {
  std::array<std::uint8_t, 8> be{};
  for (int i = 7; i >= 0; --i, v >>= 8) {
    be[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(v);
  }
  EVP_DigestUpdate(ctx, be.data(), be.size());
}

// SHA-256 over `parts` (the label first). OpenSSL's digest only fails on allocation; the
// result is then all zero, which no real chain produces, so the ends find a mismatch.
template <typename F>
PoolDigest sha256_of(F&& parts) {
  PoolDigest out{};
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx != nullptr && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1) {
    EVP_DigestUpdate(ctx, kDigestLabel.data(), kDigestLabel.size());
    parts(ctx);
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(ctx, out.data(), &n) != 1) {
      out.fill(0);
    }
  }
  EVP_MD_CTX_free(ctx);
  return out;
}
}  // namespace

PoolDigest first_pool_digest(std::uint64_t epoch) {
  return sha256_of([&](EVP_MD_CTX* ctx) { put_u64(ctx, epoch); });
}

PoolDigest next_pool_digest(const PoolDigest& previous, std::uint64_t block,
                            std::span<const std::uint8_t> block_key) {
  return sha256_of([&](EVP_MD_CTX* ctx) {
    EVP_DigestUpdate(ctx, previous.data(), previous.size());
    put_u64(ctx, block);
    put_u64(ctx, block_key.size());
    EVP_DigestUpdate(ctx, block_key.data(), block_key.size());
  });
}

void CommitTimes::add(double seconds) {
  const auto* b = std::lower_bound(kBuckets.begin(), kBuckets.end(), seconds);
  if (b != kBuckets.end()) {
    ++buckets[static_cast<std::size_t>(b - kBuckets.begin())];
  }
  ++count;
  sum_seconds += seconds;
}

namespace {

// commit_block, start_epoch and set_pending_block are called by the link's runner thread,
// which runs at a lower priority (link.engine_nice): their writes are left to the journal's
// committer thread. Written by the runner, a group would carry API requests' units too, and
// their completions would run on it; preempted by the requests it competes with, it would
// hold them all back.
constexpr bool kLinkRunnerWrites = false;

constexpr std::size_t kMaxRememberedIds = 1u << 20;
const char* const kNotFound = "one or more keys specified are not found on KME";
const char* const kNotAllowed =
    "caller is not an allowed slave of every key, or the master SAE does not match";
// Distinct (master, slaves) sets whose delivered keys answer 401 to other SAEs (SAE pairs of
// a network: a few; past the bound a delivered key answers 400 to anyone).
constexpr std::size_t kMaxOwnerSets = 1u << 16;
// A peer's assignments waiting for their bytes: at most this many, ending at most this far
// beyond this end's committed bytes in their direction (range_fault_locked()). An honest
// peer is a block or two ahead; a block is far smaller, and holds far fewer keys.
constexpr std::uint64_t kMaxLeadBytes = std::uint64_t{1} << 32;
constexpr std::size_t kMaxPending = 1u << 20;

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

  // The stored chunk `chunk_index` (bytes below the cursor are zero). Precondition: held.
  [[nodiscard]] std::span<const std::uint8_t> chunk(std::uint64_t chunk_index) const {
    return chunks_[chunk_index - front_chunk_];
  }
  [[nodiscard]] bool holds(std::uint64_t chunk_index) const {
    return chunk_index >= front_chunk_ && chunk_index < front_chunk_ + chunks_.size();
  }

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

  // Empties the stream and places its cursor at `cursor` (restoring a stored stream: the
  // chunks from cursor / kChunkBytes on are put() next).
  void restore(std::uint64_t cursor) {
    clear();
    cursor_ = cursor;
    front_chunk_ = cursor / kChunkBytes;
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
  std::vector<std::string> fetched;  // slaves that have fetched it (multicast)
  std::chrono::system_clock::time_point received{};  // when its notice was applied here
  // The journal unit that recorded it (0: loaded at open); a delivery waits for its sync
  // (Journal::seal_delivery).
  std::uint64_t unit = 0;
};

std::uint64_t unix_ms(std::chrono::system_clock::time_point t) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch());
  return ms.count() > 0 ? static_cast<std::uint64_t>(ms.count()) : 0;
}

std::string_view cursor_name(Direction d) {
  return d == Direction::kAlice ? detail::kCursorAlice : detail::kCursorBob;
}

Error store_failure(const Error& e) {
  return Error{ErrorCode::kUnavailable, fmt::format("key store unavailable: {}", e.message)};
}

// The store: state in memory, every change also recorded in the journal (when there is one)
// and made durable before the call returns.
class JournaledStore final : public KeyStore {
 public:
  JournaledStore(Direction own, std::unique_ptr<detail::Journal> journal, detail::StoredState st)
      : own_(own), journal_(std::move(journal)), link_(std::move(st.link)), digest_(link_.digest) {
    committed_ = st.committed;
    for (int d = 0; d < 2; ++d) {
      streams_[d].restore(st.cursor[d]);
    }
    for (const auto& c : st.chunks) {
      DirectionStream& s = streams_[static_cast<int>(c.dir)];
      if (c.index < s.cursor() / kChunkBytes || c.bytes.size() != kChunkBytes) {
        continue;
      }
      for (std::size_t i = 0; i < kChunkBytes; ++i) {
        s.put(c.index, i, c.bytes[i]);
      }
    }
    // Keys assigned before a restart: their age counts from the restart.
    const auto now = std::chrono::system_clock::now();
    for (auto& k : st.assigned) {
      record_times_.emplace_back(now, k.key_id);
      add_record_locked(k.key_id, AssignedKey{std::move(k.key), std::move(k.master),
                                              std::move(k.slaves), std::move(k.fetched), now});
    }
    settle_.assign(st.settled.begin(), st.settled.end());
    for (auto& u : st.used_ids) {
      if (used_ids_.emplace(u.key_id, intern_owners_locked(std::move(u.owners))).second) {
        used_order_.push_back(std::move(u.key_id));
      }
    }
    for (auto& [ord, a] : st.waiting) {
      next_ordinal_ = std::max(next_ordinal_, ord + 1);
      // Stored by an earlier build, which took any offset a faulty peer sent.
      if (const char* fault = range_fault_locked(a)) {
        spdlog::error("key store: dropping the peer's assignment {} waiting for its bytes: {}",
                      printable(a.key_id), fault);
        if (journal_) {
          journal_->drop_waiting(ord);
        }
        continue;
      }
      if (!a.discard) {
        pending_ids_.insert(a.key_id);
      }
      pending_.emplace_back(ord, std::move(a));
    }
  }

  void set_assignment_listener(AssignmentListener listener) override {
    std::lock_guard lock(mu_);
    listener_ = std::move(listener);
  }

  void set_notice_hooks(NoticeEncoder encode, NoticeRelease release) override {
    std::lock_guard lock(mu_);
    encoder_ = std::move(encode);
    release_ = std::move(release);
  }

  LinkState link_state() const override {
    std::lock_guard lock(mu_);
    return link_;
  }

  void commit(std::span<const std::uint8_t> block_key) override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      commit_locked(block_key);
      ticket = seal_locked();
    }
    if (auto s = durable(ticket); !s.ok()) {
      spdlog::error("{}", s.error().message);
    }
  }

  Status commit_block(std::span<const std::uint8_t> block_key, std::uint64_t epoch,
                      std::uint64_t blocks) override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      if (journal_) {
        // First: the rows the commit records (commit times) are the epoch's.
        journal_->set_value(detail::kEpoch, epoch);
      }
      commit_locked(block_key);
      if (digest_) {
        digest_ = next_pool_digest(*digest_, blocks, block_key);
      }
      if (journal_) {
        journal_->set_value(detail::kBlocks, blocks);
        journal_->set_pending_block(std::nullopt);
        if (digest_) {
          journal_->set_pool_digest(*digest_, epoch, blocks);
        }
      }
      ticket = seal_link_locked();
    }
    return durable(ticket, kLinkRunnerWrites);
  }

  void reset_pool() override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      reset_pool_locked();
      ticket = seal_locked();
    }
    if (auto s = durable(ticket); !s.ok()) {
      spdlog::error("{}", s.error().message);
    }
  }

  Status start_epoch(std::uint64_t epoch) override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      reset_pool_locked();
      digest_ = first_pool_digest(epoch);
      if (journal_) {
        journal_->set_pool_digest(*digest_, epoch, 0);
        journal_->set_value(detail::kEpoch, epoch);
        journal_->set_value(detail::kBlocks, 0);
        journal_->set_value(detail::kNextSeq, 1);
        journal_->set_value(detail::kLastAppliedSeq, 0);
        journal_->clear_notices();
        journal_->set_pending_block(std::nullopt);
      }
      ticket = seal_link_locked();
    }
    return durable(ticket, kLinkRunnerWrites);
  }

  std::optional<PoolDigest> pool_digest() const override {
    std::lock_guard lock(mu_);
    return digest_;
  }

  Status set_pending_block(const std::optional<PendingBlock>& pending) override {
    if (!journal_) {
      return qkd::core::ok_status();
    }
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      journal_->set_pending_block(pending);
      ticket = seal_link_locked();
    }
    return durable(ticket, kLinkRunnerWrites);
  }

  Status apply_peer_assignment(KeyAssignment a) override {
    std::uint64_t ticket = 0;
    Status st = qkd::core::ok_status();
    {
      std::lock_guard lock(mu_);
      st = enqueue_peer_assignment_locked(std::move(a));
      if (Status d = drain_pending_locked(); st.ok() && !d.ok()) {
        st = d;
      }
      ticket = seal_locked();
    }
    if (auto d = durable(ticket); !d.ok()) {
      return d;
    }
    return st;
  }

  Status apply_peer_notice(std::uint64_t seq, std::vector<KeyAssignment> as) override {
    auto q = queue_peer_notice(seq, std::move(as));
    if (!q.ok()) {
      return q.error();
    }
    if (auto d = durable(q->ticket); !d.ok()) {
      return d;
    }
    return q->refused;
  }

  Result<QueuedNotice> queue_peer_notice(std::uint64_t seq,
                                         std::vector<KeyAssignment> as) override {
    QueuedNotice q;
    {
      std::lock_guard lock(mu_);
      for (auto& a : as) {
        if (Status s = enqueue_peer_assignment_locked(std::move(a)); q.refused.ok() && !s.ok()) {
          q.refused = s;
        }
      }
      if (Status d = drain_pending_locked(); q.refused.ok() && !d.ok()) {
        q.refused = d;
      }
      if (journal_) {
        journal_->set_value(detail::kLastAppliedSeq, seq);
      }
      // Written with the next unit a response waits for (typically the dec_keys of the keys
      // this notice assigns), not in a transaction of its own in front of it.
      q.ticket = seal_deferred_locked();
    }
    return q;
  }

  Status durable(std::uint64_t ticket) override { return durable(ticket, /*write_here=*/true); }

  Status durable(std::uint64_t ticket, bool write_here) {
    if (!journal_) {
      return qkd::core::ok_status();
    }
    if (auto s = journal_->wait(ticket, write_here); !s.ok()) {
      return store_failure(s.error());
    }
    return qkd::core::ok_status();
  }

  void ack_notices(std::uint64_t seq) override {
    if (!journal_) {
      return;
    }
    std::lock_guard lock(mu_);
    journal_->drop_notices_upto(seq);
    (void)seal_deferred_locked();  // no need to wait: a lost ack only resends a notice
  }

  using KeyStore::allocate;
  Result<std::vector<DeliveredKey>> allocate(const std::string& master_sae,
                                             const std::vector<std::string>& slave_saes,
                                             const std::vector<std::string>& local_slave_saes,
                                             std::uint32_t number, std::uint32_t size_bytes,
                                             PendingWrite* pending) override {
    if (number == 0 || size_bytes == 0) {
      return qkd::core::make_error(ErrorCode::kInvalidArgument, "empty key request");
    }
    // A reserve serves one slave at the peer and no local slaves (set_prepared_keys).
    std::optional<ReserveId> reserve;
    if (slave_saes.size() == 1 && local_slave_saes.empty()) {
      reserve = ReserveId{master_sae, slave_saes.front(), size_bytes};
    }
    if (reserve) {
      if (auto served = take_prepared(*reserve, number, pending)) {
        return std::move(*served);
      }
    }
    auto ids = random_uuids(number);
    if (!ids.ok()) {
      return ids.error();
    }
    std::vector<DeliveredKey> keys;
    std::optional<std::uint64_t> notice_seq;
    NoticeRelease release;
    std::uint64_t ticket = 0;
    std::optional<Error> short_of_key;
    {
      std::lock_guard lock(mu_);
      // Expired bytes go first (their discard leads this allocation's notice).
      std::vector<KeyAssignment> assignments;
      expire_locked(std::chrono::system_clock::now(), assignments);
      DirectionStream& s = own_stream();
      const std::uint64_t need = std::uint64_t{number} * size_bytes;
      const std::uint64_t avail = direction_bytes(committed_, own_) - s.cursor();
      std::size_t prepared = 0;
      if (need > avail) {
        short_of_key = Error{
            ErrorCode::kUnavailable,
            fmt::format("not enough key material: {} bits requested, {} bits available",
                        need * 8, avail * 8)};
        if (assignments.empty()) {
          return *short_of_key;
        }
      } else {
        keys.reserve(number);
        assignments.reserve(assignments.size() + number);
        for (std::uint32_t i = 0; i < number; ++i) {
          KeyAssignment a{(*ids)[i], own_, s.cursor(), size_bytes, master_sae, slave_saes, false};
          DeliveredKey k{(*ids)[i], {}};
          s.take(a.offset, a.length, k.key);
          if (local_slave_saes.empty()) {
            remember_used_locked((*ids)[i], master_sae, slave_saes);
          } else {
            // Multicast at this KME: kept for the local slaves (see take()); the key_ID is
            // remembered as used when the last of them has fetched it.
            keep_for_local_slaves_locked((*ids)[i], master_sae, local_slave_saes, k.key);
          }
          keys.push_back(std::move(k));
          assignments.push_back(std::move(a));
        }
        if (reserve) {
          // The pair's reserve, filled in the same write: no transaction of its own.
          prepared = prepare_locked(*reserve, assignments);
        }
        sync_cursor_locked(own_);
      }
      notice_seq = notify_locked(assignments);
      release = release_;
      ticket = seal_locked();
      if (prepared > 0) {
        date_prepared_locked(*reserve, prepared, ticket);
      }
    }
    std::function<void()> then;
    if (notice_seq && release) {
      then = [release, seq = *notice_seq]() { release(seq); };
    }
    if (pending != nullptr && ticket != 0) {
      *pending = PendingWrite{ticket, std::move(then)};  // the caller waits (when_written)
    } else {
      // The keys are consumed durably before their bytes leave the store.
      if (auto d = durable(ticket); !d.ok()) {
        return d.error();
      }
      if (then) {
        then();
      }
    }
    if (short_of_key) {
      return *short_of_key;
    }
    return keys;
  }

  void withdraw_prepared() override {
    std::optional<std::uint64_t> notice_seq;
    NoticeRelease release;
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      std::vector<KeyAssignment> withdrawn;
      for (const auto& [id, r] : reserves_) {
        for (const auto& p : r) {
          withdrawn.push_back(KeyAssignment{p.key.key_id, own_, p.offset, id.size, id.master,
                                            {id.slave}, true});
        }
      }
      reserves_.clear();  // SecureBytes cleanses the keys
      prepared_depth_ = 0;  // a request still running at the stop prepares none afresh
      notice_seq = notify_locked(withdrawn);
      release = release_;
      ticket = seal_locked();
    }
    if (auto d = durable(ticket); !d.ok()) {
      spdlog::error("{}", d.error().message);
      return;
    }
    if (notice_seq && release) {
      release(*notice_seq);
    }
  }

  std::uint64_t drop_prepared() override {
    std::lock_guard lock(mu_);
    std::uint64_t n = 0;
    for (const auto& [id, r] : reserves_) {
      n += r.size();
    }
    reserves_.clear();  // SecureBytes cleanses the keys
    return n;
  }

  Status clear_assigned_lost() override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      if (!link_.assigned_lost) {
        return qkd::core::ok_status();
      }
      link_.assigned_lost = false;
      if (journal_) {
        journal_->set_value(detail::kAssignedLost, 0);
      }
      ticket = seal_locked();
    }
    return durable(ticket);
  }

  std::uint64_t prepared_for(const std::string& master_sae, const std::string& slave_sae,
                             std::uint32_t size_bytes) const override {
    std::lock_guard lock(mu_);
    auto it = reserves_.find(ReserveId{master_sae, slave_sae, size_bytes});
    if (it == reserves_.end()) {
      return 0;
    }
    const auto now = std::chrono::system_clock::now();  // expired ones are not stored keys
    return static_cast<std::uint64_t>(
        std::count_if(it->second.begin(), it->second.end(),
                      [&](const PreparedKey& p) { return p.expires > now; }));
  }

  void set_prepared_keys(std::uint32_t depth) override {
    std::lock_guard lock(mu_);
    prepared_depth_ = depth;
    if (depth == 0) {
      reserves_.clear();
    }
  }

  void set_max_age(std::chrono::seconds max_age) override {
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      max_age_ = max_age;
      if (max_age_.count() <= 0) {
        record_times_.clear();
        settle_.clear();
      }
      if (max_age_.count() > 0 && settle_.empty() && committed_ > 0) {
        // A pool committed without times (max_age_s was 0): its age counts from now.
        settle_.emplace_back(committed_, unix_ms(std::chrono::system_clock::now()));
        if (journal_) {
          journal_->put_settled(committed_, settle_.back().second);
        }
      }
      ticket = seal_locked();
    }
    (void)durable(ticket);
  }

  void set_max_unfetched(std::uint64_t keys) override {
    std::lock_guard lock(mu_);
    max_unfetched_ = keys;
  }

  void set_pool_limit(std::uint64_t own_bytes) override {
    std::lock_guard lock(mu_);
    pool_limit_ = own_bytes;
  }

  Status expire(std::chrono::system_clock::time_point now) override {
    std::optional<std::uint64_t> notice_seq;
    NoticeRelease release;
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(mu_);
      std::vector<KeyAssignment> discards;
      expire_locked(now, discards);
      for (auto it = reserves_.begin(); it != reserves_.end();) {
        drop_stale_prepared_locked(it->second, now);
        it = it->second.empty() ? reserves_.erase(it) : std::next(it);
      }
      notice_seq = notify_locked(discards);
      release = release_;
      ticket = seal_locked();
    }
    if (auto d = durable(ticket); !d.ok()) {
      return d;
    }
    if (notice_seq && release) {
      release(*notice_seq);
    }
    return qkd::core::ok_status();
  }

  Result<std::vector<DeliveredKey>> take(const std::string& caller_sae,
                                         const std::string& master_sae,
                                         const std::vector<std::string>& key_ids,
                                         std::chrono::milliseconds wait,
                                         PendingWrite* pending) override {
    if (key_ids.empty()) {
      return qkd::core::make_error(ErrorCode::kInvalidArgument, "no key_ID given");
    }
    {
      std::unordered_set<std::string> seen;
      for (const auto& id : key_ids) {
        if (!seen.insert(id).second) {
          // Not "not found": the key may well be here, and the SAE is to learn why.
          return qkd::core::make_error(
              ErrorCode::kInvalidArgument,
              fmt::format("key_ID {} is named more than once in the request", id));
        }
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + wait;
    std::vector<DeliveredKey> out;
    std::uint64_t ticket = 0;
    {
      std::unique_lock lock(mu_);
      expire_records_locked(std::chrono::system_clock::now());
      std::condition_variable cv;
      std::optional<Waiter> waiter;  // registered on the first wait, until we return
      for (;;) {
        // 401 when the caller may not have one of the keys, delivered or not (the standard's
        // rule), before 400 for one delivered already (to this caller: one use).
        bool all_present = true;
        bool forbidden = false;
        bool delivered = false;
        for (const auto& id : key_ids) {
          if (auto u = used_ids_.find(id); u != used_ids_.end()) {
            const std::vector<std::string>& o = owner_sets_[u->second];
            if (!o.empty() && (o.front() != master_sae ||
                               std::find(o.begin() + 1, o.end(), caller_sae) == o.end())) {
              forbidden = true;
            }
            delivered = true;
          } else if (auto r = records_.find(id); r == records_.end()) {
            all_present = false;
          } else if (!may_fetch(r->second, caller_sae, master_sae)) {
            forbidden = true;
          }
        }
        if (forbidden) {
          return qkd::core::make_error(ErrorCode::kAuthentication, kNotAllowed);
        }
        if (delivered) {
          return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
        }
        if (all_present) {
          break;
        }
        if (!waiter) {
          waiter.emplace(*this, key_ids, [&cv]() { cv.notify_one(); });
        }
        if (cv.wait_until(lock, deadline) == std::cv_status::timeout) {
          // One last look after the deadline, then give up.
          bool present = std::all_of(key_ids.begin(), key_ids.end(), [&](const std::string& id) {
            return records_.contains(id);
          });
          if (!present) {
            return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
          }
          break;
        }
      }
      bool fetched_before = false;
      for (const auto& id : key_ids) {
        const AssignedKey& r = records_.at(id);
        if (!may_fetch(r, caller_sae, master_sae)) {
          return qkd::core::make_error(ErrorCode::kAuthentication, kNotAllowed);
        }
        fetched_before = fetched_before || std::find(r.fetched.begin(), r.fetched.end(),
                                                     caller_sae) != r.fetched.end();
      }
      if (fetched_before) {  // one use per slave: delivered to this caller already
        return qkd::core::make_error(ErrorCode::kInvalidArgument, kNotFound);
      }
      out.reserve(key_ids.size());
      std::uint64_t recorded_in = 0;  // the last unit that recorded one of the keys
      for (const auto& id : key_ids) {
        auto it = records_.find(id);
        AssignedKey& r = it->second;
        recorded_in = std::max(recorded_in, r.unit);
        count_fetch_locked(r, caller_sae);
        r.fetched.push_back(caller_sae);
        if (r.fetched.size() < r.slaves.size()) {
          // Other slaves still to fetch it (multicast): deliver a copy, keep the record.
          out.push_back(DeliveredKey{id, qkd::core::SecureBytes(r.key.span())});
          if (journal_) {
            journal_->put_assigned(detail::StoredKey{id, r.master, r.slaves, r.key, r.fetched});
          }
          continue;
        }
        auto node = records_.extract(it);
        out.push_back(DeliveredKey{id, std::move(node.mapped().key)});
        if (journal_) {
          journal_->drop_assigned(id);
        }
        remember_used_locked(id, node.mapped().master, node.mapped().slaves);
      }
      ticket = journal_ ? journal_->seal_delivery(recorded_in) : 0;
    }
    if (pending != nullptr && ticket != 0) {
      pending->ticket = ticket;  // the caller waits (when_written)
      return out;
    }
    // Consumed before the bytes leave the store: written, the records' units synced
    // (Journal::seal_delivery).
    if (auto d = durable(ticket); !d.ok()) {
      return d.error();
    }
    return out;
  }

  void when_written(PendingWrite pending, std::function<void(Status)> done) override {
    auto finish = [then = std::move(pending.then), done = std::move(done)](Status s) {
      if (!s.ok()) {
        done(store_failure(s.error()));
        return;
      }
      if (then) {
        then();
      }
      done(qkd::core::ok_status());
    };
    if (!journal_ || pending.ticket == 0) {
      finish(qkd::core::ok_status());
      return;
    }
    journal_->when_durable(pending.ticket, std::move(finish));
  }

  void drain() override {
    if (journal_) {
      journal_->drain();
    }
  }

  bool delivered_any(const std::vector<std::string>& key_ids) const override {
    std::lock_guard lock(mu_);
    return std::any_of(key_ids.begin(), key_ids.end(),
                       [&](const std::string& id) { return used_ids_.contains(id); });
  }

  bool knows_all(const std::vector<std::string>& key_ids) const override {
    std::lock_guard lock(mu_);
    return knows_all_locked(key_ids);
  }

  std::shared_ptr<void> when_known(const std::vector<std::string>& key_ids,
                                   std::function<void()> wake) override {
    // Its Waiter goes under mu_ (the registration is never the last thing freed under it:
    // wake() may only hand the work on).
    class Registration {
     public:
      explicit Registration(JournaledStore& store) : store_(store) {}
      Registration(const Registration&) = delete;
      Registration& operator=(const Registration&) = delete;
      ~Registration() {
        std::lock_guard lock(store_.mu_);
        waiter.reset();
      }
      std::optional<Waiter> waiter;

     private:
      JournaledStore& store_;
    };
    auto registration = std::make_shared<Registration>(*this);
    std::lock_guard lock(mu_);
    if (knows_all_locked(key_ids)) {
      wake();
      return registration;
    }
    registration->waiter.emplace(*this, key_ids,
                                 [fired = false, wake = std::move(wake)]() mutable {
                                   if (!fired) {  // once, under mu_
                                     fired = true;
                                     wake();
                                   }
                                 });
    return registration;
  }

  std::string failure() const override { return journal_ ? journal_->failure() : std::string(); }

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
    st.assigned_keys_evicted = evicted_;
    st.pending_notices = pending_.size();
    for (const auto& [id, r] : reserves_) {
      st.prepared_keys += r.size();
    }
    if (journal_) {
      auto times = journal_->commit_times();
      st.request_commits = times.requests;
      st.store_syncs = times.syncs;
      st.link_commits = times.link;
    }
    return st;
  }

  std::map<std::pair<std::string, std::string>, std::uint64_t> waiting_by_pair() const override {
    std::lock_guard lock(mu_);
    std::map<std::pair<std::string, std::string>, std::uint64_t> out;
    for (const auto& [id, k] : records_) {
      for (const auto& slave : k.slaves) {
        if (std::find(k.fetched.begin(), k.fetched.end(), slave) == k.fetched.end()) {
          ++out[{k.master, slave}];
        }
      }
    }
    return out;
  }

 private:
  // --- prepared keys (set_prepared_keys) ---
  struct ReserveId {
    std::string master;
    std::string slave;
    std::uint32_t size = 0;
    auto operator<=>(const ReserveId&) const = default;
  };
  struct PreparedKey {
    DeliveredKey key;
    std::uint64_t offset = 0;  // direction offset of its bytes
    std::uint64_t ticket = 0;  // the write that made its consumption durable
    // keys.max_age_s after the commit of the block its first byte came from (the bytes'
    // age, as for pool bytes); max() without max_age_s.
    std::chrono::system_clock::time_point expires = std::chrono::system_clock::time_point::max();
  };

  // enc_keys from the pair's reserve, if it holds `number` keys: they leave once the write
  // that prepared them is durable (already, unless that write is still in progress). A
  // reserve left half empty is refilled in a write of its own, which no response waits
  // for. nullopt: not served from the reserve (allocate() goes on).
  std::optional<Result<std::vector<DeliveredKey>>> take_prepared(const ReserveId& id,
                                                                 std::uint32_t number,
                                                                 PendingWrite* pending) {
    std::vector<DeliveredKey> keys;
    std::uint64_t ticket = 0;
    std::optional<std::uint64_t> refill_seq;
    std::uint64_t refill_ticket = 0;
    NoticeRelease release;
    {
      std::lock_guard lock(mu_);
      if (prepared_depth_ == 0) {
        return std::nullopt;
      }
      auto it = reserves_.find(id);
      if (it == reserves_.end()) {
        return std::nullopt;
      }
      std::deque<PreparedKey>& r = it->second;
      const auto now = std::chrono::system_clock::now();
      drop_stale_prepared_locked(r, now);
      if (r.size() < number) {
        return std::nullopt;
      }
      keys.reserve(number);
      for (std::uint32_t i = 0; i < number; ++i) {
        ticket = std::max(ticket, r.front().ticket);
        keys.push_back(std::move(r.front().key));
        r.pop_front();
      }
      // Expired pool bytes go first, as in allocate(): a refill never prepares them.
      std::vector<KeyAssignment> assignments;
      expire_locked(now, assignments);
      const std::size_t n = prepare_locked(id, assignments);
      if (n > 0) {
        sync_cursor_locked(own_);
      }
      if (!assignments.empty()) {
        refill_seq = notify_locked(assignments);
        refill_ticket = seal_locked();
      }
      if (n > 0) {
        date_prepared_locked(id, n, refill_ticket);
      }
      release = release_;
    }
    if (refill_seq && release) {
      // The refill's notice leaves once the refill is durable.
      if (journal_ && refill_ticket != 0) {
        journal_->when_durable(refill_ticket, [release, seq = *refill_seq](Status s) {
          if (s.ok()) {
            release(seq);
          }
        });
      } else {
        release(*refill_seq);
      }
    }
    if (pending != nullptr && ticket != 0) {
      *pending = PendingWrite{ticket, nullptr};  // the caller waits (when_written)
    } else if (auto d = durable(ticket); !d.ok()) {
      return Result<std::vector<DeliveredKey>>(d.error());
    }
    return Result<std::vector<DeliveredKey>>(std::move(keys));
  }

  // Tops the reserve `id` up to prepared_depth_ keys if it holds less than half of that
  // (or does not exist yet): allocates them from the own direction, appending their
  // assignments; returns how many (date_prepared_locked() stamps them once sealed). All
  // reserves together hold at most as many bytes as the pool keeps available, so that
  // requests the reserves do not serve (other pairs, sizes, more keys, multicast) still
  // find at least half of the key. The caller syncs the cursor, notifies and seals.
  std::size_t prepare_locked(const ReserveId& id, std::vector<KeyAssignment>& assignments) {
    if (prepared_depth_ == 0) {
      return 0;
    }
    auto it = reserves_.find(id);
    if (it == reserves_.end() && reserves_.size() >= kMaxReserves) {
      return 0;
    }
    const std::size_t have = it == reserves_.end() ? 0 : it->second.size();
    if (have * 2 >= prepared_depth_) {
      return 0;
    }
    DirectionStream& s = own_stream();
    const std::uint64_t avail = direction_bytes(committed_, own_) - s.cursor();
    const std::uint64_t reserved = prepared_bytes_locked();
    const std::uint64_t spare_keys = avail > reserved ? (avail - reserved) / 2 / id.size : 0;
    const auto n =
        static_cast<std::size_t>(std::min<std::uint64_t>(prepared_depth_ - have, spare_keys));
    if (n == 0) {
      return 0;
    }
    auto ids = random_uuids(static_cast<std::uint32_t>(n));
    if (!ids.ok()) {
      return 0;  // the request itself is served; the reserve waits for the next one
    }
    std::deque<PreparedKey>& r = it == reserves_.end() ? reserves_[id] : it->second;
    for (auto& key_id : *ids) {
      KeyAssignment a{key_id, own_, s.cursor(), id.size, id.master, {id.slave}, false};
      PreparedKey p{DeliveredKey{key_id, {}}, a.offset, 0, expiry_locked(a.offset)};
      s.take(a.offset, a.length, p.key.key);
      remember_used_locked(key_id, id.master, {id.slave});
      r.push_back(std::move(p));
      assignments.push_back(std::move(a));
    }
    return n;
  }

  // Stamps the last `n` keys of reserve `id` with the write that prepared them.
  void date_prepared_locked(const ReserveId& id, std::size_t n, std::uint64_t ticket) {
    std::deque<PreparedKey>& r = reserves_.at(id);
    for (auto it = r.end() - static_cast<std::ptrdiff_t>(n); it != r.end(); ++it) {
      it->ticket = ticket;
    }
  }

  std::uint64_t prepared_bytes_locked() const {
    std::uint64_t bytes = 0;
    for (const auto& [rid, r] : reserves_) {
      bytes += r.size() * rid.size;
    }
    return bytes;
  }

  // When the own-direction byte at `offset` expires (keys.max_age_s after its block was
  // committed here): max() without max_age_s.
  std::chrono::system_clock::time_point expiry_locked(std::uint64_t offset) const {
    if (max_age_.count() <= 0 || settle_.empty()) {
      return std::chrono::system_clock::time_point::max();
    }
    // The byte's position in the pool (chunks alternate between the directions).
    const std::uint64_t pos =
        (offset / kChunkBytes * 2 + static_cast<std::uint64_t>(own_)) * kChunkBytes +
        offset % kChunkBytes;
    const auto block = std::upper_bound(
        settle_.begin(), settle_.end(), pos,
        [](std::uint64_t p, const std::pair<std::uint64_t, std::uint64_t>& e) {
          return p < e.first;
        });
    const std::uint64_t committed_ms = block == settle_.end() ? settle_.back().second
                                                              : block->second;
    return std::chrono::system_clock::time_point(std::chrono::milliseconds(committed_ms)) +
           max_age_;
  }

  // Prepared keys whose bytes are older than keys.max_age_s are dropped, as pool bytes are
  // (the peer drops its copies max_age_s after their notice arrived, which is later).
  void drop_stale_prepared_locked(std::deque<PreparedKey>& r,
                                  std::chrono::system_clock::time_point now) {
    while (!r.empty() && r.front().expires <= now) {
      r.pop_front();  // SecureBytes cleanses the key
    }
  }

  static Result<std::vector<std::string>> random_uuids(std::uint32_t n) {
    std::vector<std::string> ids;
    ids.reserve(n);
    for (std::uint32_t i = 0; i < n; ++i) {
      auto id = random_uuid_v4();
      if (!id.ok()) {
        return id.error();
      }
      ids.push_back(std::move(id.value()));
    }
    return ids;
  }

  DirectionStream& own_stream() { return streams_[static_cast<int>(own_)]; }

  std::uint64_t seal_locked() { return journal_ ? journal_->seal() : 0; }
  std::uint64_t seal_deferred_locked() { return journal_ ? journal_->seal_deferred() : 0; }
  std::uint64_t seal_link_locked() { return journal_ ? journal_->seal_link() : 0; }


  void commit_locked(std::span<const std::uint8_t> block_key) {
    const std::uint64_t first = committed_;
    for (std::uint8_t b : block_key) {
      const std::uint64_t chunk = committed_ / kChunkBytes;
      const auto pos = static_cast<std::size_t>(committed_ % kChunkBytes);
      streams_[chunk % 2].put(chunk / 2, pos, b);
      ++committed_;
    }
    if (journal_ && committed_ > first) {
      // Each row the new bytes touched, once (a direction's rows come in order).
      std::array<std::optional<std::uint64_t>, 2> last_row;
      for (std::uint64_t c = first / kChunkBytes; c <= (committed_ - 1) / kChunkBytes; ++c) {
        const std::uint64_t row = c / 2 / kRowChunks;
        if (last_row[c % 2] != row) {
          (void)put_row_locked(static_cast<Direction>(c % 2), row);
          last_row[c % 2] = row;
        }
      }
      journal_->set_value(detail::kCommitted, committed_);
    }
    if (max_age_.count() > 0 && committed_ > first) {
      settle_.emplace_back(committed_, unix_ms(std::chrono::system_clock::now()));
      if (journal_) {
        journal_->put_settled(committed_, settle_.back().second);
      }
    }
    (void)drain_pending_locked();  // overlapping notices are dropped
  }

  void reset_pool_locked() {
    // Prepared keys whose notice the peer may not have yet: a new pool, a new start.
    reserves_.clear();
    streams_[0].clear();
    streams_[1].clear();
    committed_ = 0;
    pending_.clear();
    pending_ids_.clear();
    settle_.clear();
    if (journal_) {
      journal_->clear_pool();
      journal_->set_value(detail::kCommitted, 0);
      journal_->set_value(detail::kCursorAlice, 0);
      journal_->set_value(detail::kCursorBob, 0);
    }
  }

  // Writes row `row` of direction d as the stream holds it (used bytes are zero in memory);
  // false if it holds nothing of that row.
  bool put_row_locked(Direction d, std::uint64_t row) {
    const DirectionStream& s = streams_[static_cast<int>(d)];
    std::size_t n = 0;  // the row's chunks up to the last one held
    for (std::size_t k = 0; k < kRowChunks; ++k) {
      if (s.holds(row * kRowChunks + k)) {
        n = k + 1;
      }
    }
    if (n == 0) {
      return false;
    }
    qkd::core::SecureBytes bytes(n * kChunkBytes);  // zero where a chunk is used up
    for (std::size_t k = 0; k < n; ++k) {
      if (s.holds(row * kRowChunks + k)) {
        std::memcpy(bytes.data() + k * kChunkBytes, s.chunk(row * kRowChunks + k).data(),
                    kChunkBytes);
      }
    }
    journal_->put_row(d, row, bytes.span());
    return true;
  }

  // Records direction d's cursor: drops wholly used rows and rewrites a partly used one with
  // its used bytes zero, so that a delivered key leaves the disk with its delivery.
  void sync_cursor_locked(Direction d) {
    if (!journal_) {
      return;
    }
    const DirectionStream& s = streams_[static_cast<int>(d)];
    const std::uint64_t row = s.cursor() / kChunkBytes / kRowChunks;
    journal_->drop_rows_below(d, row);
    if (s.cursor() % (kChunkBytes * kRowChunks) != 0 && !put_row_locked(d, row)) {
      journal_->drop_rows_below(d, row + 1);  // nothing left in it
    }
    journal_->set_value(cursor_name(d), s.cursor());
  }

  Status enqueue_peer_assignment_locked(KeyAssignment a) {
    if (a.direction == own_) {
      return qkd::core::make_error(ErrorCode::kProtocol,
                                   "peer assigned a key from this KME's direction");
    }
    // A second assignment of a key_ID waiting for its bytes would replace the first's bytes
    // when both land.
    if (a.discard ? a.length == 0
                  : (a.length == 0 || a.key_id.empty() || records_.contains(a.key_id) ||
                     used_ids_.contains(a.key_id) || pending_ids_.contains(a.key_id))) {
      return qkd::core::make_error(ErrorCode::kProtocol,
                                   fmt::format("bad or duplicate assignment {}",
                                               printable(a.key_id)));
    }
    if (const char* fault = range_fault_locked(a)) {
      return qkd::core::make_error(
          ErrorCode::kProtocol, fmt::format("assignment {}: {}", printable(a.key_id), fault));
    }
    if (pending_.size() >= kMaxPending) {
      return qkd::core::make_error(
          ErrorCode::kProtocol,
          fmt::format("assignment {}: {} assignments already wait for their bytes",
                      printable(a.key_id), pending_.size()));
    }
    const std::uint64_t ord = next_ordinal_++;
    if (journal_) {
      journal_->put_waiting(ord, a);
    }
    if (!a.discard) {
      pending_ids_.insert(a.key_id);
    }
    pending_.emplace_back(ord, std::move(a));
    return qkd::core::ok_status();
  }

  // Why a peer's assignment cannot be honest whatever this end holds, or nullptr: its end
  // past 2^64 (it would wrap around and pass for bytes long used), or further beyond this
  // end's committed bytes in its direction than an honest peer ever is (a block or two
  // ahead): such an assignment would wait for ever at the head of the queue, and hold up
  // every notice behind it.
  const char* range_fault_locked(const KeyAssignment& a) const {
    if (a.offset > std::numeric_limits<std::uint64_t>::max() - a.length) {
      return "its end is past 2^64 bytes";
    }
    const std::uint64_t committed = direction_bytes(committed_, a.direction);
    if (a.offset + a.length > committed && a.offset + a.length - committed > kMaxLeadBytes) {
      return "it ends more than 2^32 bytes beyond this end's pool";
    }
    return nullptr;
  }

  Status drain_pending_locked() {
    Status result = qkd::core::ok_status();
    bool moved[2] = {false, false};
    while (!pending_.empty()) {
      auto& [ord, a] = pending_.front();
      DirectionStream& s = streams_[static_cast<int>(a.direction)];
      if (a.discard) {  // the peer's expired bytes: drop the same bytes here
        const std::uint64_t end = a.offset + a.length;
        if (end > direction_bytes(committed_, a.direction)) {
          break;  // not committed yet on this end
        }
        if (end > s.cursor()) {
          s.advance(end);
          moved[static_cast<int>(a.direction)] = true;
        }
        if (!a.key_id.empty()) {
          withdraw_record_locked(a);
        }
        if (journal_) {
          journal_->drop_waiting(ord);
        }
        pending_.pop_front();
        continue;
      }
      if (a.offset < s.cursor()) {
        result = qkd::core::make_error(
            ErrorCode::kProtocol,
            fmt::format("assignment {} overlaps bytes already used", printable(a.key_id)));
        if (journal_) {
          journal_->drop_waiting(ord);
        }
        pending_ids_.erase(a.key_id);
        pending_.pop_front();
        continue;
      }
      if (a.offset + a.length > direction_bytes(committed_, a.direction)) {
        break;  // bytes not committed yet on this end
      }
      AssignedKey rec;
      s.take(a.offset, a.length, rec.key);
      moved[static_cast<int>(a.direction)] = true;
      rec.master = std::move(a.master_sae);
      rec.slaves = std::move(a.slave_saes);
      rec.received = std::chrono::system_clock::now();
      if (max_age_.count() > 0) {
        record_times_.emplace_back(rec.received, a.key_id);
      }
      if (journal_) {
        journal_->put_assigned(detail::StoredKey{a.key_id, rec.master, rec.slaves, rec.key, {}});
        journal_->drop_waiting(ord);
        rec.unit = journal_->next_ticket();
      }
      wake_waiters_locked(a.key_id);
      pending_ids_.erase(a.key_id);
      add_record_locked(std::move(a.key_id), std::move(rec));
      pending_.pop_front();
    }
    for (int d = 0; d < 2; ++d) {
      if (moved[d]) {
        sync_cursor_locked(static_cast<Direction>(d));
      }
    }
    return result;
  }

  // A prepared key the peer withdrew (KeyStore::withdraw_prepared): no SAE was given it,
  // so its record goes, like an expired key's. Only a record of the same master and slave
  // that nobody has fetched.
  void withdraw_record_locked(const KeyAssignment& a) {
    auto it = records_.find(a.key_id);
    if (it == records_.end() || it->second.master != a.master_sae ||
        it->second.slaves != a.slave_saes || !it->second.fetched.empty()) {
      return;
    }
    forget_record_locked(it->second);
    records_.erase(it);  // SecureBytes cleanses the key
    if (journal_) {
      journal_->drop_assigned(a.key_id);
    }
    remember_used_locked(a.key_id, a.master_sae, a.slave_saes);
  }

  // An allocated key also kept for slaves of this KME: recorded like a peer-assigned key
  // (same durable write as the allocation), so take() serves it once to each of them.
  void keep_for_local_slaves_locked(const std::string& id, const std::string& master,
                                    const std::vector<std::string>& local_slaves,
                                    const qkd::core::SecureBytes& key) {
    AssignedKey rec;
    rec.key = qkd::core::SecureBytes(key.span());
    rec.master = master;
    rec.slaves = local_slaves;
    rec.received = std::chrono::system_clock::now();
    if (max_age_.count() > 0) {
      record_times_.emplace_back(rec.received, id);
    }
    if (journal_) {
      journal_->put_assigned(detail::StoredKey{id, rec.master, rec.slaves, rec.key, {}});
      rec.unit = journal_->next_ticket();
    }
    wake_waiters_locked(id);
    add_record_locked(id, std::move(rec));
  }

  // Hands an allocation's (or expiry's) assignments to the listener and the notice encoder;
  // the notice's seq, if there is an encoder. Nothing to do for an empty list.
  std::optional<std::uint64_t> notify_locked(const std::vector<KeyAssignment>& as) {
    if (as.empty()) {
      return std::nullopt;
    }
    if (listener_) {
      listener_(as);
    }
    if (!encoder_) {
      return std::nullopt;
    }
    StoredNotice n = encoder_(as);
    if (journal_) {
      journal_->put_notice(n);
      journal_->set_value(detail::kNextSeq, n.seq + 1);
    }
    return n.seq;
  }

  // Discards own-direction bytes up to `upto` (appending discards for the peer).
  void discard_own_locked(std::uint64_t upto, std::vector<KeyAssignment>& discards,
                          std::string_view why) {
    DirectionStream& s = own_stream();
    upto = std::min(upto, direction_bytes(committed_, own_));
    if (upto <= s.cursor()) {
      return;
    }
    const std::uint64_t first = s.cursor();
    for (std::uint64_t from = first; from < upto;) {
      const auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(upto - from, 1u << 30));
      discards.push_back(KeyAssignment{"", own_, from, len, "", {}, true});
      from += len;
    }
    s.advance(upto);
    sync_cursor_locked(own_);
    spdlog::debug("key store: {} {} bytes discarded", upto - first, why);
  }

  // keys.max_age_s at `now`: drops own-direction bytes of blocks committed before the
  // cutoff (appending a discard for the peer to `discards`) and expired peer-assigned keys;
  // then, once the own direction holds twice the pool limit, the bytes above the limit, the
  // oldest first. (Not at once above the limit: a direction in use sits just above it after
  // each block, and trimming that surplus would only make the link run again sooner.)
  void expire_locked(std::chrono::system_clock::time_point now,
                     std::vector<KeyAssignment>& discards) {
    expire_aged_locked(now, discards);
    const std::uint64_t end = direction_bytes(committed_, own_);
    if (pool_limit_ > 0 && end - own_stream().cursor() >= 2 * pool_limit_) {
      discard_own_locked(end - pool_limit_, discards, "surplus (keys.max_key_count)");
    }
  }

  void expire_aged_locked(std::chrono::system_clock::time_point now,
                          std::vector<KeyAssignment>& discards) {
    if (max_age_.count() <= 0) {
      return;
    }
    const std::uint64_t cutoff = unix_ms(now - max_age_);
    std::optional<std::uint64_t> expired_end;
    while (!settle_.empty() && settle_.front().second <= cutoff) {
      expired_end = settle_.front().first;
      settle_.pop_front();
    }
    if (expired_end) {
      if (journal_) {
        journal_->drop_settled_upto(*expired_end);
      }
      discard_own_locked(direction_bytes(*expired_end, own_), discards, "expired");
    }
    expire_records_locked(now);
  }

  // Drops peer-assigned keys whose notice arrived more than max_age before `now`.
  void expire_records_locked(std::chrono::system_clock::time_point now) {
    if (max_age_.count() <= 0) {
      return;
    }
    const auto cutoff = now - max_age_;
    while (!record_times_.empty() && record_times_.front().first <= cutoff) {
      const auto& [t, id] = record_times_.front();
      auto it = records_.find(id);
      if (it != records_.end() && it->second.received == t) {
        remember_used_locked(id, it->second.master, it->second.slaves);
        forget_record_locked(it->second);
        records_.erase(it);  // SecureBytes cleanses the key
        if (journal_) {
          journal_->drop_assigned(id);
        }
      }
      record_times_.pop_front();
    }
  }

  // A take() or a when_known() waiting for key_IDs not heard of yet: woken (wake(), called
  // under mu_) only when one of them arrives, so a notice wakes the requests it concerns,
  // not every waiting request. Constructed and destroyed under mu_.
  struct Waiter {
    Waiter(JournaledStore& store, const std::vector<std::string>& ids, std::function<void()> w)
        : wake(std::move(w)), store_(store), ids_(ids) {
      for (const auto& id : ids_) {
        store_.waiting_.emplace(id, this);
      }
    }
    Waiter(const Waiter&) = delete;
    Waiter& operator=(const Waiter&) = delete;
    ~Waiter() {
      for (const auto& id : ids_) {
        auto [first, last] = store_.waiting_.equal_range(id);
        for (auto it = first; it != last; ++it) {
          if (it->second == this) {
            store_.waiting_.erase(it);
            break;
          }
        }
      }
    }
    std::function<void()> wake;

   private:
    JournaledStore& store_;
    std::vector<std::string> ids_;
  };

  void wake_waiters_locked(const std::string& id) {
    auto [first, last] = waiting_.equal_range(id);
    for (auto it = first; it != last; ++it) {
      it->second->wake();
    }
  }

  bool knows_all_locked(const std::vector<std::string>& key_ids) const {
    return std::all_of(key_ids.begin(), key_ids.end(), [&](const std::string& id) {
      return records_.contains(id) || used_ids_.contains(id);
    });
  }

  static bool may_fetch(const AssignedKey& r, const std::string& caller,
                        const std::string& master) {
    return r.master == master &&
           std::find(r.slaves.begin(), r.slaves.end(), caller) != r.slaves.end();
  }

  // The index of owners (master SAE, then slaves) in owner_sets_, added if new; 0 (not
  // known) when empty or when the table is full (a delivered key then answers 400 to
  // anyone, as before owners were kept).
  std::uint32_t intern_owners_locked(std::vector<std::string> owners) {
    if (owners.empty()) {
      return 0;
    }
    // The slaves as a set: the same slaves named in another order are one entry.
    std::sort(owners.begin() + 1, owners.end());
    if (auto it = owner_index_.find(owners); it != owner_index_.end()) {
      return it->second;
    }
    if (owner_sets_.size() >= kMaxOwnerSets) {
      return 0;
    }
    const auto idx = static_cast<std::uint32_t>(owner_sets_.size());
    owner_sets_.push_back(owners);
    owner_index_.emplace(std::move(owners), idx);
    return idx;
  }

  // --- keys.max_unfetched_per_pair ---
  // Counted per (master, slave): a multicast key counts once for each slave that has not
  // fetched it, so neither the order of a request's slaves nor adding slaves to it makes
  // another budget.
  static std::string pair_key(const std::string& master, const std::string& slave) {
    std::string k = master;
    k += '\0';
    k += slave;
    return k;
  }
  static bool unfetched_by(const AssignedKey& r, const std::string& slave) {
    return std::find(r.slaves.begin(), r.slaves.end(), slave) != r.slaves.end() &&
           std::find(r.fetched.begin(), r.fetched.end(), slave) == r.fetched.end();
  }

  // Every record of records_ is made here and counted for each slave that has yet to fetch
  // it; once such a (master, slave) holds more than max_unfetched_ keys, its oldest go (as
  // expired ones do).
  void add_record_locked(std::string id, AssignedKey rec) {
    std::vector<std::string> pairs;
    for (const auto& slave : rec.slaves) {
      // (A slave named twice, which only a faulty peer's notice can do, counts once.)
      if (unfetched_by(rec, slave) &&
          std::find(pairs.begin(), pairs.end(), slave) == pairs.end()) {
        pairs.push_back(slave);
        PairRecords& p = pair_records_[pair_key(rec.master, slave)];
        p.order.push_back(id);
        ++p.live;
      }
    }
    const std::string master = rec.master;
    records_.emplace(std::move(id), std::move(rec));
    for (const auto& slave : pairs) {
      trim_pair_locked(master, slave);
    }
    // Arrival times of keys gone since (fetched, withdrawn, evicted) until max_age_ passes.
    if (record_times_.size() > 2 * records_.size() + 1024) {
      std::erase_if(record_times_, [&](const auto& t) {
        auto it = records_.find(t.second);
        return it == records_.end() || it->second.received != t.first;
      });
    }
  }

  void trim_pair_locked(const std::string& master, const std::string& slave) {
    auto found = pair_records_.find(pair_key(master, slave));
    if (found == pair_records_.end()) {
      return;
    }
    PairRecords& p = found->second;
    const auto counted = [&](const std::string& id) {
      auto it = records_.find(id);
      return it != records_.end() && it->second.master == master && unfetched_by(it->second, slave);
    };
    while (!p.order.empty() && max_unfetched_ > 0 && p.live > max_unfetched_) {
      const std::string id = std::move(p.order.front());
      p.order.pop_front();
      if (!counted(id)) {
        continue;  // gone since (fetched, expired, withdrawn, evicted)
      }
      auto it = records_.find(id);
      remember_used_locked(id, it->second.master, it->second.slaves);
      if (journal_) {
        journal_->drop_assigned(id);
      }
      forget_record_locked(it->second);  // this pair stays: its count was above the cap
      records_.erase(it);  // SecureBytes cleanses the key
      ++evicted_;
    }
    // Entries of keys gone since that sit behind an old one still here.
    if (p.order.size() > 2 * p.live + 1024) {
      std::erase_if(p.order, [&](const std::string& id) { return !counted(id); });
    }
  }

  // `slave` fetched `r` (r.fetched not updated yet).
  void count_fetch_locked(const AssignedKey& r, const std::string& slave) {
    if (!unfetched_by(r, slave)) {
      return;
    }
    auto p = pair_records_.find(pair_key(r.master, slave));
    if (p != pair_records_.end() && --p->second.live == 0) {
      pair_records_.erase(p);
    }
  }

  // Every record leaves records_ after this (the record itself still in place).
  void forget_record_locked(const AssignedKey& r) {
    for (auto it = r.slaves.begin(); it != r.slaves.end(); ++it) {
      if (std::find(r.slaves.begin(), it, *it) == it) {  // each slave once
        count_fetch_locked(r, *it);
      }
    }
  }

  void remember_used_locked(const std::string& id, const std::string& master,
                            const std::vector<std::string>& slaves) {
    std::vector<std::string> owners;
    owners.reserve(1 + slaves.size());
    owners.push_back(master);
    owners.insert(owners.end(), slaves.begin(), slaves.end());
    if (used_ids_.emplace(id, intern_owners_locked(owners)).second) {
      if (journal_) {
        journal_->add_used(detail::UsedId{id, std::move(owners)});
      }
      used_order_.push_back(id);
      if (used_order_.size() > kMaxRememberedIds) {
        used_ids_.erase(used_order_.front());
        used_order_.pop_front();
      }
    }
  }

  const Direction own_;
  std::unique_ptr<detail::Journal> journal_;
  mutable std::mutex mu_;
  std::unordered_multimap<std::string, Waiter*> waiting_;  // key_ID -> take(), when_known()
  AssignmentListener listener_;
  NoticeEncoder encoder_;
  NoticeRelease release_;
  LinkState link_;  // as found when opened
  std::array<DirectionStream, 2> streams_;
  std::uint64_t committed_ = 0;
  std::deque<std::pair<std::uint64_t, KeyAssignment>> pending_;  // (ordinal, assignment)
  std::unordered_set<std::string> pending_ids_;  // key_IDs in pending_ (not discards)
  std::uint64_t next_ordinal_ = 1;
  std::unordered_map<std::string, AssignedKey> records_;
  // Delivered key_IDs -> their owners (an index into owner_sets_; 0: not known).
  std::unordered_map<std::string, std::uint32_t> used_ids_;
  std::vector<std::vector<std::string>> owner_sets_{std::vector<std::string>{}};
  std::map<std::vector<std::string>, std::uint32_t> owner_index_;
  std::deque<std::string> used_order_;
  std::chrono::seconds max_age_{0};
  std::uint64_t pool_limit_ = 0;  // own-direction bytes kept at most (0: no limit)
  std::uint32_t prepared_depth_ = 0;  // set_prepared_keys
  std::map<ReserveId, std::deque<PreparedKey>> reserves_;
  std::optional<PoolDigest> digest_;  // after the blocks of commit_block() (LinkState::digest)
  // (pool end, commit time in Unix ms) of each block not expired yet; only with max_age_.
  std::deque<std::pair<std::uint64_t, std::uint64_t>> settle_;
  // (arrival, key_ID) of peer-assigned keys, in arrival order (entries of keys fetched
  // meanwhile are skipped).
  std::deque<std::pair<std::chrono::system_clock::time_point, std::string>> record_times_;
  // Per (master, slaves) of records_ (pair_key): their key_IDs in the order they were made
  // (entries of records gone since are skipped) and how many exist (set_max_unfetched).
  struct PairRecords {
    std::deque<std::string> order;
    std::uint64_t live = 0;
  };
  std::unordered_map<std::string, PairRecords> pair_records_;
  std::uint64_t max_unfetched_ = 0;
  std::uint64_t evicted_ = 0;  // records dropped by max_unfetched_
};

}  // namespace

std::unique_ptr<KeyStore> make_memory_key_store(Direction own) {
  return std::make_unique<JournaledStore>(own, nullptr, detail::StoredState{});
}

namespace detail {
std::unique_ptr<KeyStore> make_journaled_store(Direction own, std::unique_ptr<Journal> journal,
                                               StoredState state) {
  return std::make_unique<JournaledStore>(own, std::move(journal), std::move(state));
}
}  // namespace detail

}  // namespace qkd::kms
