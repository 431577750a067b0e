// Link runner: sessions, BB84 block loop, commit handshake, notices (see link_service.hpp).
#include "qkd/kms/link_service.hpp"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <thread>

#include "qkd/core/link.hpp"
#include "qkd/core/random.hpp"
#include "qkd/kms/engine_channel.hpp"
#include "qkd/kms/link_connection.hpp"
#include "qkd/kms/util.hpp"

namespace qkd::kms {

using json = nlohmann::json;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto kConnectTimeout = std::chrono::milliseconds(5000);
constexpr auto kSessionStartTimeout = std::chrono::milliseconds(10000);
constexpr auto kBackoffMin = std::chrono::milliseconds(100);
constexpr auto kBackoffMax = std::chrono::milliseconds(5000);

// The runner thread's name (it runs the BB84 engine).
constexpr const char* kEngineThreadName = "qkd-link";

// link.engine_nice: the calling thread (the runner, which runs the BB84 engine) runs this
// many nice levels above the process's own (at most 19), so that the API and link I/O
// threads win the CPU over key generation. Linux nice is per thread (setpriority on the
// thread id); raising it needs no privilege. Relative, so that a KME started under
// `nice -n 19` never gets an engine thread of higher priority than itself. Threads the
// runner creates inherit it (e.g. Asio's resolver thread on the bob end).
void lower_engine_priority(std::uint32_t levels) {
  if (levels == 0) {
    return;
  }
  const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  errno = 0;
  const int current = ::getpriority(PRIO_PROCESS, tid);
  if (current == -1 && errno != 0) {
    spdlog::warn("link: cannot read the engine thread's nice value: {}", std::strerror(errno));
    return;
  }
  const int target = std::min(19, current + static_cast<int>(levels));
  if (target <= current) {
    return;
  }
  if (::setpriority(PRIO_PROCESS, tid, target) != 0) {
    spdlog::warn("link: cannot set the engine thread's nice value to {}: {}", target,
                 std::strerror(errno));
    return;
  }
  spdlog::debug("link: engine thread runs at nice {}", target);
}

std::vector<std::uint8_t> to_bytes(const json& j) {
  const std::string s = j.dump();
  return {s.begin(), s.end()};
}

// An unsigned integer field of a control message, within T; throws (the caller takes the
// message for malformed) on anything else: nlohmann's get<> would wrap a negative number
// around, truncate a larger one and cast a float.
template <typename T = std::uint64_t>
T uint_field(const json& j, const char* name) {
  const json& v = j.at(name);
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) ||
      v.get<std::uint64_t>() > std::numeric_limits<T>::max()) {
    throw std::runtime_error(fmt::format("field {} is not an integer in [0, {}]", name,
                                         std::numeric_limits<T>::max()));
  }
  return static_cast<T>(v.get<std::uint64_t>());
}

std::optional<json> parse_control(const std::vector<std::uint8_t>& b) {
  json j = json::parse(b.begin(), b.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("t") || !j.at("t").is_string()) {
    return std::nullopt;
  }
  return j;
}

json assignment_to_json(const KeyAssignment& a) {
  json j{{"id", a.key_id},         {"dir", static_cast<int>(a.direction)},
         {"off", a.offset},        {"len", a.length},
         {"master", a.master_sae}, {"slaves", a.slave_saes}};
  if (a.discard) {
    j["discard"] = true;  // expired bytes (keys.max_age_s), not a key
  }
  return j;
}

struct OutboxEntry {
  std::uint64_t seq = 0;
  std::vector<std::uint8_t> message;  // encoded notice
};

}  // namespace

// Throws on a malformed entry (caught by the caller).
KeyAssignment detail::assignment_from_json(const json& j) {
  KeyAssignment a;
  a.key_id = j.at("id").get<std::string>();
  const auto dir = uint_field<std::uint8_t>(j, "dir");
  if (dir > 1) {
    throw std::runtime_error("bad direction");
  }
  a.direction = static_cast<Direction>(dir);
  a.offset = uint_field(j, "off");
  a.length = uint_field<std::uint32_t>(j, "len");
  a.master_sae = j.at("master").get<std::string>();
  a.slave_saes = j.at("slaves").get<std::vector<std::string>>();
  a.discard = j.value("discard", false);
  return a;
}

// What an honest peer's enc_keys can name (etsi_api.cpp): the caller, one of its SAEs, as
// master; the slave and any additional slaves it sends in the notice are SAEs of this KME
// (additional slaves at its own KME stay there), each once, so at most config.saes of them
// (no more than 1 + max_SAE_ID_count); a key of min_key_size..max_key_size bits; a UUID.
// A discard of expired bytes names nothing; one withdrawing a prepared key names that key.
detail::AssignmentCheck detail::check_assignment(const KeyAssignment& a, const Config& config) {
  using V = AssignmentCheck::Verdict;
  if (a.discard && a.key_id.empty()) {
    if (!a.master_sae.empty() || !a.slave_saes.empty()) {
      return {V::kClose, "a discard of expired bytes names SAEs"};
    }
    return {};
  }
  if (!is_uuid(a.key_id)) {
    return {V::kClose, fmt::format("key_ID \"{}\" is not a UUID", printable(a.key_id))};
  }
  if (a.slave_saes.empty()) {
    return {V::kClose, fmt::format("key {}: no slave SAE", a.key_id)};
  }
  for (std::size_t i = 0; i < a.slave_saes.size(); ++i) {
    const auto before = a.slave_saes.begin() + static_cast<std::ptrdiff_t>(i);
    if (std::find(a.slave_saes.begin(), before, a.slave_saes[i]) != before) {
      return {V::kClose,
              fmt::format("key {}: slave SAE \"{}\" named twice", a.key_id,
                          printable(a.slave_saes[i]))};
    }
  }
  auto among = [](const std::vector<std::string>& list, const std::string& s) {
    return std::find(list.begin(), list.end(), s) != list.end();
  };
  if (!among(config.link.peer_saes, a.master_sae)) {
    return {V::kBytesOnly, fmt::format("key {}: master SAE \"{}\" is not one of link.peer_saes",
                                       a.key_id, printable(a.master_sae))};
  }
  for (const std::string& slave : a.slave_saes) {
    if (!among(config.saes, slave)) {
      return {V::kBytesOnly, fmt::format("key {}: slave SAE \"{}\" is not one of this KME's saes",
                                         a.key_id, printable(slave))};
    }
  }
  const std::uint64_t bits = std::uint64_t{a.length} * 8;
  if (bits < config.keys.min_key_size || bits > config.keys.max_key_size) {
    return {V::kBytesOnly,
            fmt::format("key {}: {} bytes, outside keys.min_key_size..max_key_size ({}..{} bits)",
                        a.key_id, a.length, config.keys.min_key_size, config.keys.max_key_size)};
  }
  return {};
}

struct LinkService::Impl {
  Impl(const Config& c, KeyStore& s, boost::asio::io_context& io,
       std::shared_ptr<boost::asio::ssl::context> t)
      : config(c), store(s), ioc(io), tls(std::move(t)), alice(c.link.role == LinkRole::kAlice) {}

  const Config& config;
  KeyStore& store;
  boost::asio::io_context& ioc;
  std::shared_ptr<boost::asio::ssl::context> tls;
  const bool alice;

  std::unique_ptr<LinkAcceptor> acceptor;
  std::thread runner;
  std::thread expirer;  // discards expired keys and the pool's surplus periodically
  std::thread acker;    // acks peer notices once they are durable (see run_acks)
  std::atomic<bool> stopping{false};

  // Connection hand-over (alice) and the current connection.
  std::mutex conn_mu;
  std::condition_variable conn_cv;
  std::shared_ptr<LinkConnection> incoming;  // alice: newest accepted, not yet running
  std::shared_ptr<LinkConnection> current;
  // Alice: the engine connection bob opened with this session start's token, not yet taken.
  // Connections arrive only while a session start wants one (from before its decision
  // leaves until open_engine is done) and only with its token; others are closed at once.
  UniqueFd incoming_engine;
  bool engine_wanted = false;
  EngineToken engine_token{};

  // The current session's engine connection, set up and used by the runner; closed from
  // any thread with the session's control connection (its on_close, which must not take
  // conn_mu: LinkConnection::close is called under it). One per session, so that a late
  // on_close of an old session cannot close the next session's connection.
  struct EngineSlot {
    std::mutex mu;
    std::shared_ptr<EngineChannel> channel;
    bool closed = false;
    void close() {
      std::lock_guard lock(mu);
      closed = true;
      if (channel) {
        channel->close();
      }
    }
    // Holds `c` for close(); closes it at once if the session is already over.
    void hold(const std::shared_ptr<EngineChannel>& c) {
      std::lock_guard lock(mu);
      channel = c;
      if (closed) {
        channel->close();
      }
    }
  };
  std::shared_ptr<EngineSlot> session_engine;  // runner only

  // Pool agreement state.
  std::mutex state_mu;
  std::uint64_t epoch = 0;              // 0 = none yet (bob before his first session)
  std::uint64_t blocks = 0;             // committed blocks in this epoch
  std::optional<PendingBlock> pending;  // bob only

  // Notices.
  std::mutex out_mu;
  std::deque<OutboxEntry> outbox;
  std::uint64_t next_seq = 1;
  std::uint64_t sent_seq = 0;                   // highest seq handed to the current connection
  std::uint64_t due_seq = 0;                    // highest seq whose notice delay has passed
  std::uint64_t last_applied_seq = 0;           // of the peer's notices
  std::shared_ptr<LinkConnection> notice_conn;  // set while the session is established

  // Acks of peer notices, sent by the acker thread once the store holds them durably, so
  // that the link's strand never waits for a disk write: notices arriving meanwhile join
  // the same group commit and are acked together (an ack covers every seq up to it).
  struct PendingAck {
    std::uint64_t seq = 0;
    std::uint64_t ticket = 0;
    std::weak_ptr<LinkConnection> conn;
  };
  std::mutex ack_mu;
  std::condition_variable ack_cv;
  std::deque<PendingAck> acks;
  std::uint64_t last_notice_ticket = 0;  // of the newest applied notice (under ack_mu)
  // Fetch reports waiting for the acker thread (under ack_mu): (master, slave) -> keys.
  // Fetch reports gathered for the peer: (master, slave) -> (keys, bits).
  using FetchReports =
      std::map<std::pair<std::string, std::string>, std::pair<std::uint64_t, std::uint64_t>>;
  FetchReports fetched;
  std::atomic<bool> peer_takes_fetched{false};  // announced in the peer's hello/state
  // The peer acts on assigned_lost (drops its prepared keys): announced in its hello/state
  // ("drops_prepared"); a peer of an earlier version is told again at each session start.
  std::atomic<bool> peer_drops_prepared{false};
  LinkService::FetchListener fetch_listener;    // set before start()

  // Statistics.
  mutable std::mutex stats_mu;
  LinkStats st;
  double sim_seconds = 0, raw_bits = 0, sifted_bits = 0, secret_bits = 0, auth_bits = 0;

  // --- helpers ---
  // Queues the notice of an allocation (called by the store while the allocation is
  // exclusive); it leaves in on_durable once the store has the allocation on disk.
  StoredNotice on_assignments(const std::vector<KeyAssignment>& as) {
    json keys = json::array();
    for (const auto& a : as) {
      keys.push_back(assignment_to_json(a));
    }
    std::lock_guard lock(out_mu);
    OutboxEntry e{next_seq++, {}};
    e.message = to_bytes(json{{"t", "notice"}, {"seq", e.seq}, {"keys", std::move(keys)}});
    outbox.push_back(e);
    return StoredNotice{e.seq, std::move(e.message)};
  }

  void on_durable(std::uint64_t seq) {
    std::lock_guard lock(out_mu);
    if (config.link.notice_delay_ms == 0) {
      send_outbox_locked(seq);
      return;
    }
    auto timer = std::make_shared<boost::asio::steady_timer>(ioc);
    timer->expires_after(std::chrono::milliseconds(config.link.notice_delay_ms));
    timer->async_wait([this, timer, seq](const boost::system::error_code& ec) {
      if (!ec) {
        std::lock_guard l(out_mu);
        send_outbox_locked(seq);
      }
    });
  }

  // Marks notices up to `up_to` as due and sends the due ones not sent yet (under out_mu).
  void send_outbox_locked(std::uint64_t up_to) {
    due_seq = std::max(due_seq, up_to);
    if (!notice_conn) {
      return;  // sent when the next session is established
    }
    for (const auto& e : outbox) {
      if (e.seq > sent_seq && e.seq <= due_seq) {
        (void)notice_conn->send(Channel::kControl, e.message);
      }
    }
    sent_seq = due_seq;
  }

  void establish(const std::shared_ptr<LinkConnection>& conn) {
    std::lock_guard lock(out_mu);
    notice_conn = conn;
    // Resend every due notice the peer has not acknowledged.
    sent_seq = 0;
    send_outbox_locked(due_seq);
    std::lock_guard slock(stats_mu);
    st.up = true;
  }

  void disestablish() {
    {
      std::lock_guard lock(out_mu);
      notice_conn.reset();
    }
    std::lock_guard slock(stats_mu);
    st.up = false;
  }

  // Forget the pool and all notice state (under state_mu).
  void reset_locked(std::uint64_t new_epoch) {
    if (auto s = store.start_epoch(new_epoch); !s.ok()) {
      spdlog::error("link: {}", s.error().message);
    }
    epoch = new_epoch;
    blocks = 0;
    pending.reset();
    std::lock_guard lock(out_mu);
    outbox.clear();
    // next_seq goes on counting: an allocation of the old epoch whose write completes after
    // this reset still calls on_durable(seq) (a store completion runs on whichever thread
    // wrote it), and that seq must not name a notice of the new epoch (it would then leave
    // before its own write is durable). The peer takes any seq above its last applied one.
    sent_seq = 0;
    due_seq = 0;
    last_applied_seq = 0;
  }

  void record_block(const qkd::core::BlockResult& r) {
    std::lock_guard lock(stats_mu);
    ++st.blocks;
    sim_seconds += r.simulated_seconds;
    raw_bits += static_cast<double>(r.detections);
    sifted_bits += static_cast<double>(r.sifted_bits);
    if (r.aborted) {
      ++st.aborted_blocks;
      st.last_abort_reason = r.abort_reason;
    } else {
      secret_bits += static_cast<double>(r.secret_bits);
      auth_bits += static_cast<double>(r.auth_bits_consumed);
      st.key_bound = r.key_bound;
    }
    st.qber = r.qber;
    if (sim_seconds > 0) {
      st.raw_key_rate_bps = raw_bits / sim_seconds;
      st.sifted_key_rate_bps = sifted_bits / sim_seconds;
      st.secret_key_rate_bps = secret_bits / sim_seconds;
      st.auth_key_rate_bps = auth_bits / sim_seconds;
    }
  }

  void record_failure(const std::string& why) {
    std::lock_guard lock(stats_mu);
    st.last_abort_reason = why;
  }

  // The peer's fetch report (either side). Returns false on a malformed message.
  // A hello or state saying the peer lost the keys assigned to it (LinkState::assigned_lost):
  // the keys this end prepared for enc_keys are among them, and no SAE could fetch them there.
  void drop_prepared_if_peer_lost_them(const json& j) {
    if (!j.value("assigned_lost", false)) {
      return;
    }
    const std::uint64_t n = store.drop_prepared();
    spdlog::warn("link: the peer lost the keys assigned to it (a power loss): dropping the {} "
                 "keys prepared here for enc_keys",
                 n);
  }

  bool handle_fetched(const json& j) {
    try {
      for (const json& p : j.at("pairs")) {
        const auto master = p.at("master").get<std::string>();
        const auto slave = p.at("slave").get<std::string>();
        const auto n = uint_field(p, "n");
        const auto bits = p.contains("bits") ? uint_field(p, "bits") : 0;  // not from older versions
        if (fetch_listener) {
          fetch_listener(master, slave, n, bits);
        }
      }
      return true;
    } catch (const std::exception& e) {
      spdlog::warn("link: malformed fetched message: {}", e.what());
      return false;
    }
  }

  // Handles a notice or an ack (either side). Returns false on a malformed message.
  bool handle_notice_or_ack(const json& j, LinkConnection& conn) {
    const std::string t = j.at("t").get<std::string>();
    try {
      if (t == "ack") {
        const auto seq = uint_field(j, "seq");
        {
          std::lock_guard lock(out_mu);
          while (!outbox.empty() && outbox.front().seq <= seq) {
            outbox.pop_front();
          }
        }
        store.ack_notices(seq);  // not under out_mu: the store calls on_assignments under its lock
        return true;
      }
      const auto seq = uint_field(j, "seq");
      std::vector<KeyAssignment> as;
      for (const json& k : j.at("keys")) {
        as.push_back(detail::assignment_from_json(k));
      }
      // Nothing of a notice an honest peer cannot send is kept: its strings and keys would
      // take memory and disk here, and come back after a restart. One naming SAEs or sizes
      // this configuration does not have keeps only its place in the pool.
      for (auto& a : as) {
        const detail::AssignmentCheck check = detail::check_assignment(a, config);
        if (check.verdict == detail::AssignmentCheck::kClose) {
          spdlog::error("link: notice {} from {} cannot come from an honest peer KME ({}): "
                        "closing the session",
                        seq, conn.peer(), check.why);
          return false;
        }
        if (check.verdict == detail::AssignmentCheck::kBytesOnly) {
          spdlog::error("link: notice {} from {}: {}; its bytes are dropped, no key is kept "
                        "(do both KMEs' saes, link.peer_saes and key sizes match?)",
                        seq, conn.peer(), check.why);
          a = KeyAssignment{"", a.direction, a.offset, a.length, "", {}, true};
        }
      }
      // Keeps tickets in seq order, and a notice from being applied twice (a connection
      // being replaced may still deliver one while the next does).
      std::lock_guard ack_lock(ack_mu);
      bool fresh = false;
      {
        std::lock_guard lock(out_mu);
        fresh = seq > last_applied_seq;
      }
      if (fresh) {
        const std::size_t n = as.size();
        // Not under out_mu: the store calls on_assignments under its own lock.
        auto q = store.queue_peer_notice(seq, std::move(as));
        if (!q.ok()) {
          spdlog::error("link: notice {}: {}", seq, q.error().message);
          return false;  // not stored: no ack; the peer resends it next session
        }
        {
          // Only now: a notice the store did not take is applied when the peer resends it,
          // not taken for a duplicate and acked.
          std::lock_guard lock(out_mu);
          last_applied_seq = std::max(last_applied_seq, seq);
        }
        if (!q->refused.ok()) {
          spdlog::error("link: notice {}: {}", seq, q->refused.error().message);
        }
        last_notice_ticket = q->ticket;
        spdlog::debug("link: applied notice {} ({} keys)", seq, n);
      }
      // A resent notice is acked once everything applied so far is durable.
      acks.push_back(PendingAck{seq, last_notice_ticket, conn.weak_from_this()});
      ack_cv.notify_one();
      return true;
    } catch (const std::exception& e) {
      spdlog::warn("link: malformed {} message: {}", t, e.what());
      return false;
    }
  }

  // Hands a control message to the runner thread; false (the connection is closed) when the
  // peer runs that far ahead of the lock-step protocol.
  static bool queued(MessageQueue& queue, std::vector<std::uint8_t> bytes,
                     const LinkConnection& conn) {
    if (!queue.push(std::move(bytes))) {
      spdlog::warn("link: {} sent more than {} control messages ahead of the protocol",
                   conn.peer(), MessageQueue::kMaxQueued);
      return false;
    }
    return true;
  }

  // Control frames, on the connection's strand. `queue` feeds the runner thread.
  bool on_control(LinkConnection& conn, MessageQueue& queue, std::vector<std::uint8_t> bytes) {
    auto j = parse_control(bytes);
    if (!j) {
      spdlog::warn("link: malformed control message from {}", conn.peer());
      return false;
    }
    const std::string t = j->at("t").get<std::string>();
    if (t == "notice" || t == "ack") {
      return handle_notice_or_ack(*j, conn);
    }
    if (t == "fetched") {
      return handle_fetched(*j);
    }
    try {
      if (alice) {
        if (t == "state" || t == "ready") {
          return queued(queue, std::move(bytes), conn);
        }
      } else if (t == "hello") {
        peer_takes_fetched = j->value("fetched", false);
        peer_drops_prepared = j->value("drops_prepared", false);
        drop_prepared_if_peer_lost_them(*j);
        std::lock_guard lock(state_mu);
        json reply = {{"t", "state"},  {"epoch", epoch},  {"blocks", blocks},
                      {"pending", pending.has_value()}, {"fetched", true},
                      {"drops_prepared", true}};
        if (store.link_state().assigned_lost) {
          reply["assigned_lost"] = true;
        }
        {
          std::lock_guard out_lock(out_mu);
          reply["applied"] = last_applied_seq;  // of alice's notices
          reply["next_seq"] = next_seq;         // of his own
        }
        // The pool digest, and the one the pending block would lead to (compared when alice
        // has committed it), so that alice can tell equal counts over different pools.
        if (const auto d = store.pool_digest()) {
          reply["digest"] = to_hex(*d);
          if (pending) {
            reply["digest_pending"] =
                to_hex(qkd::kms::next_pool_digest(*d, blocks + 1, pending->key.span()));
          }
        }
        return conn.send(Channel::kControl, to_bytes(reply)).ok();
      } else if (t == "decision") {
        {
          std::lock_guard lock(state_mu);
          const auto e = uint_field(*j, "epoch");
          if (j->at("mode").get<std::string>() == "reset") {
            reset_locked(e);
            spdlog::info("link: pool reset by the peer (new epoch)");
          } else {
            if (e != epoch) {
              return false;
            }
            if (j->at("commit_pending").get<bool>() && pending) {
              if (!store.commit_block(pending->key.span(), epoch, blocks + 1).ok()) {
                return false;
              }
              ++blocks;
              spdlog::info("link: committed pending block {} at session start", pending->block);
            } else if (pending) {
              // Alice did not commit it: gone from the store too, or a restart after a
              // crash would report it as pending again.
              if (auto s = store.set_pending_block(std::nullopt); !s.ok()) {
                spdlog::error("link: {}", s.error().message);
                return false;
              }
            }
            pending.reset();
          }
        }
        // Alice has had this end's state (assigned_lost) before deciding.
        if (auto s = peer_drops_prepared ? store.clear_assigned_lost() : qkd::core::ok_status();
            !s.ok()) {
          spdlog::error("link: {}", s.error().message);
          return false;
        }
        return queued(queue, std::move(bytes), conn);
      } else if (t == "start") {
        return queued(queue, std::move(bytes), conn);
      } else if (t == "commit") {
        std::lock_guard lock(state_mu);
        const auto b = uint_field(*j, "block");
        if (!pending || pending->block != b) {
          spdlog::warn("link: commit for block {} that is not pending", b);
          return false;
        }
        if (auto s = store.commit_block(pending->key.span(), epoch, blocks + 1); !s.ok()) {
          spdlog::error("link: {}", s.error().message);
          return false;
        }
        ++blocks;
        pending.reset();
        return true;
      }
    } catch (const std::exception& e) {
      spdlog::warn("link: malformed {} message: {}", t, e.what());
      return false;
    }
    spdlog::warn("link: unexpected control message \"{}\"", t);
    return false;
  }

  // Waits for a control message of type `type` on `queue`.
  qkd::core::Result<json> expect(MessageQueue& queue, const std::string& type,
                                 std::chrono::milliseconds timeout) {
    auto m = queue.pop(timeout);
    if (!m.ok()) {
      return m.error();
    }
    auto j = parse_control(m.value());
    if (!j || j->at("t").get<std::string>() != type) {
      return make_error(ErrorCode::kProtocol, fmt::format("expected {} message", type));
    }
    return *j;
  }

  bool pool_full() const {
    const StoreStats s = store.stats();
    const std::uint64_t cap =
        config.keys.max_key_count * static_cast<std::uint64_t>(config.keys.key_size / 8);
    return std::min(s.own_available_bytes, s.peer_available_bytes) >= cap;
  }

  std::uint64_t fresh_seed() {
    auto r = random_u64();
    return r.ok() ? r.value() : static_cast<std::uint64_t>(Clock::now().time_since_epoch().count());
  }

  // The session's engine connection: bob opens it with the token from the decision, alice
  // takes it (the acceptor has checked the token). Registered with the session first, so
  // that the control connection closing, or stop(), cuts a connect or handshake short.
  qkd::core::Result<std::shared_ptr<EngineChannel>> open_engine(const EngineToken& token) {
    auto ch = std::make_shared<EngineChannel>(*tls);
    session_engine->hold(ch);
    qkd::core::Status s = qkd::core::ok_status();
    if (alice) {
      s = accept_engine(*ch);
      std::lock_guard lock(conn_mu);
      engine_wanted = false;
      incoming_engine = UniqueFd();
    } else {
      const HostPort& hp = config.link.connect;
      s = ch->connect(hp.host, hp.port, config.link.peer_kme_id, token, kConnectTimeout);
    }
    if (!s.ok()) {
      return s.error();
    }
    return ch;
  }

  qkd::core::Status accept_engine(EngineChannel& ch) {
    const auto deadline = Clock::now() + kSessionStartTimeout;
    UniqueFd fd;
    {
      std::unique_lock lock(conn_mu);
      // In slices: the control connection closing does not notify conn_cv.
      while (!stopping && !incoming_engine.valid() && !ch.closed()) {
        if (Clock::now() >= deadline) {
          return make_error(ErrorCode::kTimeout,
                            "link: the peer opened no engine connection in time");
        }
        conn_cv.wait_for(lock, std::chrono::milliseconds(100));
      }
      if (stopping || ch.closed()) {
        return make_error(ErrorCode::kClosed, "link: connection closed");
      }
      fd = std::move(incoming_engine);
    }
    return ch.accept(std::move(fd), config.link.peer_kme_id,
                     std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::max(deadline - Clock::now(), Clock::duration(0))));
  }

  static std::string to_hex(std::span<const std::uint8_t> bytes) {
    return fmt::format("{:02x}", fmt::join(bytes, ""));
  }

  // --- sessions ---
  qkd::core::Status run_alice_session(const std::shared_ptr<LinkConnection>& conn,
                                      MessageQueue& queue) {
    EngineToken token{};
    if (auto s = qkd::core::random_bytes(token); !s.ok()) {
      return s;
    }
    {
      std::lock_guard lock(conn_mu);
      incoming_engine = UniqueFd();
      engine_token = token;  // bob opens the engine connection with it after the decision
      engine_wanted = true;
    }
    std::uint64_t my_epoch = 0;
    std::uint64_t my_blocks = 0;
    {
      std::lock_guard lock(state_mu);
      if (epoch == 0) {
        reset_locked(fresh_seed() | 1);
      }
      my_epoch = epoch;
      my_blocks = blocks;
    }
    json hello = {{"t", "hello"},     {"epoch", my_epoch},       {"blocks", my_blocks},
                  {"fetched", true}, {"drops_prepared", true}};
    if (store.link_state().assigned_lost) {
      hello["assigned_lost"] = true;
    }
    if (auto s = conn->send(Channel::kControl, to_bytes(hello)); !s.ok()) {
      return s;
    }
    auto state = expect(queue, "state", kSessionStartTimeout);
    if (!state.ok()) {
      return state.error();
    }
    json decision;
    try {
      const auto e = uint_field(*state, "epoch");
      const auto b = uint_field(*state, "blocks");
      const bool p = state->at("pending").get<bool>();
      peer_takes_fetched = state->value("fetched", false);
      peer_drops_prepared = state->value("drops_prepared", false);
      drop_prepared_if_peer_lost_them(*state);
      std::lock_guard lock(state_mu);
      // Same epoch and count: the pools must also have the same digest (a store from before
      // digests compares from its next epoch on: both ends start one together). The peer's
      // pending block counts when this end committed it. When this end has a digest the
      // peer, running this same code, has one too: a state without it is no resume.
      const auto mine = store.pool_digest();
      const bool digest_missing = mine && !state->contains("digest");
      auto digests_agree = [&](const char* field) {
        if (!mine) {
          return true;
        }
        if (!state->contains(field)) {
          return false;
        }
        // A digest of key bytes: compared in constant time, as every secret-derived value.
        const auto theirs = state->at(field).get<std::string>();
        const auto ours = to_hex(*mine);
        auto bytes = [](const std::string& s) {
          return std::span(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
        };
        return qkd::core::constant_time_equal(bytes(theirs), bytes(ours));
      };
      // Neither end may have applied a notice the other has no record of sending: that end's
      // store lost writes (a restored copy, say; a power loss with store.synchronous =
      // "normal" the store itself detects at open), and it would hand out again bytes the
      // peer has already assigned.
      std::string lost_notices;
      if (e == epoch && state->contains("applied") && state->contains("next_seq")) {
        const auto peer_applied = uint_field(*state, "applied");
        const auto peer_next = uint_field(*state, "next_seq");
        std::lock_guard out_lock(out_mu);
        if (peer_applied >= next_seq) {
          lost_notices = fmt::format("the peer applied notice {}, this KME's next is {}",
                                     peer_applied, next_seq);
        } else if (last_applied_seq >= peer_next) {
          lost_notices = fmt::format("this KME applied the peer's notice {}, its next is {}",
                                     last_applied_seq, peer_next);
        }
      }
      const bool resume_now = e == epoch && b == blocks && lost_notices.empty();
      const bool resume_pending = e == epoch && p && b + 1 == blocks && lost_notices.empty();
      if (resume_now && digests_agree("digest")) {
        decision = {
            {"t", "decision"}, {"mode", "resume"}, {"epoch", epoch}, {"commit_pending", false}};
      } else if (resume_pending && digests_agree("digest_pending")) {
        decision = {
            {"t", "decision"}, {"mode", "resume"}, {"epoch", epoch}, {"commit_pending", true}};
      } else {
        if (e == 0) {
          spdlog::info("link: the peer starts without a pool: starting a new pool epoch");
        } else if (!lost_notices.empty()) {
          spdlog::warn("link: key-assignment notices were lost ({}): a store lost writes; "
                       "discarding both pools",
                       lost_notices);
        } else if (digest_missing && (resume_now || resume_pending)) {
          spdlog::warn("link: the peer sent no pool digest (epoch {:x}, {} blocks): "
                       "discarding both pools",
                       e, b);
        } else if (resume_now || resume_pending) {
          spdlog::warn(
              "link: the peer's pool differs (epoch {:x}, {} blocks, but another pool digest): "
              "discarding both pools",
              e, b);
        } else {
          spdlog::warn(
              "link: the peer's pool differs (epoch {:x} vs {:x}, {} vs {} blocks): "
              "discarding both pools",
              e, epoch, b, blocks);
        }
        reset_locked(fresh_seed() | 1);
        decision = {
            {"t", "decision"}, {"mode", "reset"}, {"epoch", epoch}, {"commit_pending", false}};
      }
    } catch (const std::exception& ex) {
      return make_error(ErrorCode::kProtocol, fmt::format("bad state message: {}", ex.what()));
    }
    decision["engine"] = to_hex(token);
    if (auto s = conn->send(Channel::kControl, to_bytes(decision)); !s.ok()) {
      return s;
    }
    if (peer_drops_prepared) {  // bob has had the hello, and acted on it
      if (auto s = store.clear_assigned_lost(); !s.ok()) {
        return s;
      }
    }
    establish(conn);
    spdlog::info("link: session with {} established ({})", conn->peer(),
                 decision.at("mode").get<std::string>());

    auto engine_ch = open_engine(token);
    if (!engine_ch.ok()) {
      return engine_ch.error();
    }
    auto quantum = (*engine_ch)->transport(Channel::kQuantum);
    auto classical = (*engine_ch)->transport(Channel::kClassical);
    qkd::core::AliceEndpoint endpoint(config.link.channel, config.link.protocol,
                                      config.link.psk.span(), fresh_seed(), *quantum, *classical);
    const auto ready_timeout = config.link.protocol.message_timeout + std::chrono::seconds(5);
    while (!stopping && !conn->closed()) {
      if (pool_full()) {
        std::unique_lock lock(conn_mu);
        conn_cv.wait_for(lock, std::chrono::milliseconds(200));
        continue;
      }
      std::uint64_t block = 0;
      {
        std::lock_guard lock(state_mu);
        block = blocks + 1;
      }
      if (auto s = conn->send(Channel::kControl, to_bytes(json{{"t", "start"}, {"block", block}}));
          !s.ok()) {
        return s;
      }
      auto r = endpoint.run_block();
      if (!r.ok()) {
        return r.error();
      }
      record_block(r.value());
      const std::uint64_t bytes = r->aborted ? 0 : r->secret_bits / 8;
      if (r->aborted) {
        spdlog::warn("link: block {} aborted: {}", block, r->abort_reason);
      }
      auto ready = expect(queue, "ready", ready_timeout);
      if (!ready.ok()) {
        return ready.error();
      }
      std::uint64_t peer_block = 0;
      std::uint64_t peer_bytes = 0;
      try {
        peer_block = uint_field(*ready, "block");
        peer_bytes = uint_field(*ready, "bytes");
      } catch (const std::exception& ex) {
        return make_error(ErrorCode::kProtocol, fmt::format("bad ready message: {}", ex.what()));
      }
      if (peer_block != block || peer_bytes != bytes) {
        return make_error(ErrorCode::kProtocol,
                          fmt::format("block {}: peer reports block {} with {} bytes, we have {}",
                                      block, peer_block, peer_bytes, bytes));
      }
      if (bytes == 0) {
        continue;
      }
      {
        std::lock_guard lock(state_mu);
        // On disk before Bob hears of the commit.
        if (auto s = store.commit_block(r->key.span().first(bytes), epoch, blocks + 1); !s.ok()) {
          return s;
        }
        ++blocks;
      }
      (void)conn->send(Channel::kControl, to_bytes(json{{"t", "commit"}, {"block", block}}));
      spdlog::debug("link: committed block {} ({} bytes, QBER {:.4f})", block, bytes, r->qber);
    }
    return qkd::core::ok_status();
  }

  qkd::core::Status run_bob_session(const std::shared_ptr<LinkConnection>& conn,
                                    MessageQueue& queue) {
    auto decision = expect(queue, "decision", kSessionStartTimeout);
    if (!decision.ok()) {
      return decision.error();
    }
    EngineToken token{};
    {
      const auto hex = hex_decode(decision->value("engine", std::string()));
      if (!hex || hex->size() != token.size()) {
        return make_error(ErrorCode::kProtocol, "decision without a valid engine token");
      }
      std::copy(hex->span().begin(), hex->span().end(), token.begin());
    }
    establish(conn);
    spdlog::info("link: session with {} established ({})", conn->peer(),
                 decision->value("mode", std::string("?")));
    auto engine_ch = open_engine(token);
    if (!engine_ch.ok()) {
      return engine_ch.error();
    }
    auto quantum = (*engine_ch)->transport(Channel::kQuantum);
    auto classical = (*engine_ch)->transport(Channel::kClassical);
    qkd::core::BobEndpoint endpoint(config.link.protocol, config.link.psk.span(), fresh_seed(),
                                    *quantum, *classical);
    while (!stopping && !conn->closed()) {
      auto m = queue.pop(std::chrono::milliseconds(500));
      if (!m.ok()) {
        if (m.error().code == ErrorCode::kTimeout) {
          continue;
        }
        return m.error();
      }
      auto j = parse_control(m.value());
      if (!j || j->at("t").get<std::string>() != "start") {
        return make_error(ErrorCode::kProtocol, "expected start message");
      }
      std::uint64_t block = 0;
      try {
        block = uint_field(*j, "block");
      } catch (const std::exception& ex) {
        return make_error(ErrorCode::kProtocol, ex.what());
      }
      {
        std::lock_guard lock(state_mu);
        if (pending) {
          pending.reset();
          if (auto s = store.set_pending_block(std::nullopt); !s.ok()) {
            return s;
          }
        }
      }
      auto r = endpoint.run_block();
      if (!r.ok()) {
        return r.error();
      }
      record_block(r.value());
      const std::uint64_t bytes = r->aborted ? 0 : r->secret_bits / 8;
      if (r->aborted) {
        spdlog::warn("link: block {} aborted: {}", block, r->abort_reason);
      }
      if (bytes > 0) {
        std::lock_guard lock(state_mu);
        pending = PendingBlock{block, qkd::core::SecureBytes(r->key.span().first(bytes))};
        // On disk before ready: Alice may commit it as soon as she has ready.
        if (auto s = store.set_pending_block(pending); !s.ok()) {
          return s;
        }
      }
      if (auto s = conn->send(Channel::kControl,
                              to_bytes(json{{"t", "ready"}, {"block", block}, {"bytes", bytes}}));
          !s.ok()) {
        return s;
      }
    }
    return qkd::core::ok_status();
  }

  void run_session(const std::shared_ptr<LinkConnection>& conn) {
    auto queue = std::make_shared<MessageQueue>();
    {
      std::lock_guard lock(conn_mu);
      current = conn;
    }
    LinkConnection* raw = conn.get();
    auto slot = std::make_shared<EngineSlot>();
    session_engine = slot;
    conn->start([this, raw, queue](
                    std::vector<std::uint8_t> b) { return on_control(*raw, *queue, std::move(b)); },
                [queue, slot]() {
                  queue->close();
                  slot->close();
                });
    qkd::core::Status s = qkd::core::ok_status();
    try {
      s = alice ? run_alice_session(conn, *queue) : run_bob_session(conn, *queue);
    } catch (const std::exception& e) {
      s = make_error(ErrorCode::kInternal, e.what());
    }
    disestablish();
    conn->close();
    queue->close();
    slot->close();
    session_engine.reset();
    if (alice) {  // a session that ended before its engine connection wants none any more
      std::lock_guard lock(conn_mu);
      engine_wanted = false;
      incoming_engine = UniqueFd();
    }
    {
      std::lock_guard lock(conn_mu);
      current.reset();
    }
    if (!s.ok() && !stopping) {
      spdlog::warn("link: session with {} ended: {}", conn->peer(), s.error().message);
      record_failure(s.error().message);
    } else {
      spdlog::info("link: session with {} ended", conn->peer());
    }
  }

  void send_fetched(const FetchReports& reports) {
    if (reports.empty() || !peer_takes_fetched) {
      return;
    }
    std::shared_ptr<LinkConnection> c;
    {
      std::lock_guard lock(out_mu);
      c = notice_conn;
    }
    if (!c) {
      return;  // the link is down: the peer's budgets refill with time instead
    }
    json pairs = json::array();
    for (const auto& [pair, count] : reports) {
      pairs.push_back({{"master", pair.first},
                       {"slave", pair.second},
                       {"n", count.first},
                       {"bits", count.second}});
    }
    (void)c->send(Channel::kControl, to_bytes(json{{"t", "fetched"}, {"pairs", std::move(pairs)}}));
  }

  void sleep_unless_stopping(std::chrono::milliseconds d) {
    std::unique_lock lock(conn_mu);
    conn_cv.wait_for(lock, d, [&] { return stopping.load(); });
  }

  // Sends the acks of peer notices once the store has written them (one wait per group),
  // and the fetch reports gathered meanwhile.
  void run_acks() {
    std::unique_lock lock(ack_mu);
    for (;;) {
      ack_cv.wait(lock, [&] { return stopping.load() || !acks.empty() || !fetched.empty(); });
      if (acks.empty() && fetched.empty()) {
        return;
      }
      std::deque<PendingAck> batch = std::move(acks);
      acks.clear();
      auto reports = std::move(fetched);
      fetched.clear();
      lock.unlock();
      send_fetched(reports);
      std::uint64_t ticket = 0;
      for (const auto& a : batch) {
        ticket = std::max(ticket, a.ticket);
      }
      const bool written = store.durable(ticket).ok();  // on failure: no ack, peer resends
      // One ack per connection, for the highest seq it sent (acks are cumulative).
      for (std::size_t i = 0; written && i < batch.size(); ++i) {
        const bool last_of_conn =
            i + 1 == batch.size() || batch[i + 1].conn.lock() != batch[i].conn.lock();
        if (auto c = batch[i].conn.lock(); c && last_of_conn) {
          std::uint64_t seq = 0;
          for (std::size_t k = 0; k <= i; ++k) {
            if (batch[k].conn.lock() == c) {
              seq = std::max(seq, batch[k].seq);
            }
          }
          (void)c->send(Channel::kControl, to_bytes(json{{"t", "ack"}, {"seq", seq}}));
        }
      }
      lock.lock();
    }
  }

  // Every quarter of keys.max_age_s (100 ms .. 1 s; 1 s without a max age), discards what
  // expired and the own direction's bytes above keys.max_key_count.
  void run_expiry() {
    const auto period =
        config.keys.max_age_s == 0
            ? std::chrono::milliseconds(1000)
            : std::clamp(std::chrono::milliseconds(config.keys.max_age_s * 250),
                         std::chrono::milliseconds(100), std::chrono::milliseconds(1000));
    while (!stopping) {
      sleep_unless_stopping(period);
      if (stopping) {
        break;
      }
      if (auto s = store.expire(std::chrono::system_clock::now()); !s.ok()) {
        spdlog::error("link: key expiry: {}", s.error().message);
      }
    }
  }

  void run() {
    auto backoff = kBackoffMin;
    while (!stopping) {
      std::shared_ptr<LinkConnection> conn;
      if (alice) {
        std::unique_lock lock(conn_mu);
        conn_cv.wait(lock, [&] { return stopping || incoming != nullptr; });
        if (stopping) {
          break;
        }
        conn = std::move(incoming);
        incoming.reset();
      } else {
        const HostPort& hp = config.link.connect;
        auto c = LinkConnection::connect(ioc, *tls, hp.host, hp.port, config.link.peer_kme_id,
                                         kConnectTimeout);
        if (!c.ok()) {
          // A peer that is down is routine (info); one that is up but not the configured
          // peer, or fails TLS, needs the operator (warning).
          const auto level = c.error().code == qkd::core::ErrorCode::kAuthentication
                                 ? spdlog::level::warn
                                 : spdlog::level::info;
          spdlog::log(level, "{} (retry in {} ms)", c.error().message, backoff.count());
          sleep_unless_stopping(backoff);
          backoff = std::min(backoff * 2, kBackoffMax);
          continue;
        }
        backoff = kBackoffMin;
        conn = c.value();
      }
      spdlog::info("link: connected to {}", conn->peer());
      run_session(conn);
      if (!alice && !stopping) {
        sleep_unless_stopping(kBackoffMin);
      }
    }
  }
};

LinkService::LinkService(const Config& config, KeyStore& store, boost::asio::io_context& ioc,
                         std::shared_ptr<boost::asio::ssl::context> tls)
    : impl_(std::make_unique<Impl>(config, store, ioc, std::move(tls))) {
  Impl* im = impl_.get();
  // Resume from the state the store kept (all defaults for a new or in-memory store).
  LinkState ls = store.link_state();
  im->epoch = ls.epoch;
  im->blocks = ls.blocks;
  im->pending = std::move(ls.pending);
  im->next_seq = ls.next_seq;
  im->last_applied_seq = ls.last_applied_seq;
  for (auto& n : ls.outbox) {
    im->next_seq = std::max(im->next_seq, n.seq + 1);
    im->due_seq = std::max(im->due_seq, n.seq);
    im->outbox.push_back(OutboxEntry{n.seq, std::move(n.message)});
  }
  if (ls.epoch != 0) {
    spdlog::info("link: stored pool epoch {:x} with {} blocks, {} notices unacknowledged",
                 ls.epoch, ls.blocks, im->outbox.size());
  }
  store.set_notice_hooks(
      [im](const std::vector<KeyAssignment>& as) { return im->on_assignments(as); },
      [im](std::uint64_t seq) { im->on_durable(seq); });
  store.set_max_age(std::chrono::seconds(config.keys.max_age_s));
  store.set_max_unfetched(config.keys.max_unfetched_per_pair);
  store.set_pool_limit(config.keys.max_key_count * (config.keys.key_size / 8));
}

LinkService::~LinkService() {
  stop();
  impl_->store.set_notice_hooks(nullptr, nullptr);
}

qkd::core::Result<std::uint16_t> LinkService::start() {
  std::uint16_t port = 0;
  Impl* im = impl_.get();
  if (im->alice) {
    im->acceptor = std::make_unique<LinkAcceptor>(
        im->ioc, im->tls, im->config.link.peer_kme_id, [im](std::shared_ptr<LinkConnection> c) {
          std::lock_guard lock(im->conn_mu);
          if (im->stopping) {
            c->close();
            return;
          }
          if (im->incoming) {
            im->incoming->close();
          }
          if (im->current) {
            spdlog::info("link: a new connection from the peer replaces the current one");
            im->current->close();
          }
          im->incoming = std::move(c);
          im->conn_cv.notify_all();
        },
        [im](int fd, const EngineToken& token) {
          UniqueFd owned(fd);  // closed here unless a session start waits for it
          std::lock_guard lock(im->conn_mu);
          if (!im->stopping && im->engine_wanted &&
              CRYPTO_memcmp(token.data(), im->engine_token.data(), token.size()) == 0) {
            im->incoming_engine = std::move(owned);
            im->conn_cv.notify_all();
          } else {
            spdlog::debug("link: closed an engine connection no session start waits for");
          }
        });
    auto p = im->acceptor->listen(im->config.link.listen.host, im->config.link.listen.port);
    if (!p.ok()) {
      return p.error();
    }
    port = p.value();
  }
  im->expirer = std::thread([im]() {
    name_this_thread("kms-expiry");
    im->run_expiry();
  });
  im->acker = std::thread([im]() {
    name_this_thread("kms-ack");
    im->run_acks();
  });
  im->runner = std::thread([im]() {
    name_this_thread(kEngineThreadName);
    lower_engine_priority(im->config.link.engine_nice);
    try {
      im->run();
    } catch (const std::exception& e) {
      spdlog::critical("link: runner stopped: {}", e.what());
    }
  });
  return port;
}

void LinkService::stop() {
  Impl* im = impl_.get();
  {
    std::lock_guard lock(im->conn_mu);
    if (im->stopping.exchange(true) && !im->runner.joinable() && !im->expirer.joinable() &&
        !im->acker.joinable()) {
      return;
    }
    if (im->current) {
      im->current->close();
    }
    if (im->incoming) {
      im->incoming->close();
      im->incoming.reset();
    }
    im->conn_cv.notify_all();
  }
  if (im->acceptor) {
    im->acceptor->stop();
  }
  if (im->runner.joinable()) {
    im->runner.join();
  }
  if (im->expirer.joinable()) {
    im->expirer.join();
  }
  {
    std::lock_guard lock(im->ack_mu);  // wakes the acker (stopping is set)
    im->ack_cv.notify_all();
  }
  if (im->acker.joinable()) {
    im->acker.join();
  }
}

void LinkService::report_fetched(const std::string& master, const std::string& slave,
                                 std::uint64_t n, std::uint64_t bits) {
  if (n == 0) {
    return;
  }
  std::lock_guard lock(impl_->ack_mu);
  auto& count = impl_->fetched[{master, slave}];
  count.first += n;
  count.second += bits;
  impl_->ack_cv.notify_one();
}

void LinkService::set_fetch_listener(FetchListener listener) {
  impl_->fetch_listener = std::move(listener);
}

LinkStats LinkService::stats() const {
  std::lock_guard lock(impl_->stats_mu);
  return impl_->st;
}

}  // namespace qkd::kms
