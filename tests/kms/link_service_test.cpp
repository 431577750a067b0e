// LinkService against a scripted peer KME over loopback, with a real PKI (examples/pki.sh):
// what a faulty or hostile peer holding the link's credentials can send at a session start
// and in its notices, and what this KME keeps of it. The scripted peer speaks the control
// protocol (link_service.hpp) on a LinkConnection and runs no BB84 block.
#include "qkd/kms/link_service.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "qkd/kms/engine_channel.hpp"
#include "qkd/kms/link_connection.hpp"
#include "qkd/kms/tls.hpp"
#include "qkd/test/scratch_dir.hpp"
#include "qkd/test/unit_pki.hpp"

namespace qkd::kms {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using json = nlohmann::json;
using qkd::core::ErrorCode;
using qkd::core::Result;
using qkd::core::Status;

const fs::path& pki_dir() { return qkd::test::unit_pki_dir(); }

ApiConfig api_of(const std::string& kme) {
  ApiConfig api;
  api.cert = pki_dir() / (kme + ".crt");
  api.key = pki_dir() / (kme + ".key");
  api.ca = pki_dir() / "ca.crt";
  return api;
}

std::shared_ptr<boost::asio::ssl::context> context(const std::string& kme, TlsRole role) {
  auto c = make_tls_context(api_of(kme), role);
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message);
  return c.ok() ? c.value() : nullptr;
}

// The KME under test: SAEs alice and alice2 at alice-kme, bob and bob2 at bob-kme.
Config kme_config(LinkRole role, std::uint16_t connect_port = 0) {
  const bool alice = role == LinkRole::kAlice;
  Config c;
  c.source = "link_service_test";
  c.kme_id = alice ? "alice-kme" : "bob-kme";
  c.api = api_of(c.kme_id);
  c.saes = alice ? std::vector<std::string>{"alice", "alice2"}
                 : std::vector<std::string>{"bob", "bob2"};
  c.link.peer_kme_id = alice ? "bob-kme" : "alice-kme";
  c.link.peer_saes = alice ? std::vector<std::string>{"bob", "bob2"}
                           : std::vector<std::string>{"alice", "alice2"};
  c.link.role = role;
  if (alice) {
    c.link.listen = HostPort{"127.0.0.1", 0};
  } else {
    c.link.connect = HostPort{"127.0.0.1", connect_port};
  }
  c.link.psk = qkd::core::SecureBytes(32);
  for (std::size_t i = 0; i < 32; ++i) {
    c.link.psk.data()[i] = static_cast<std::uint8_t>(i + 1);
  }
  c.link.engine_nice = 0;
  return c;
}

std::string hex(std::span<const std::uint8_t> b) { return fmt::format("{:02x}", fmt::join(b, "")); }

// An io_context running on its own thread until destroyed.
struct IoThread {
  boost::asio::io_context ioc;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work{
      boost::asio::make_work_guard(ioc)};
  std::thread thread{[this] { ioc.run(); }};
  ~IoThread() {
    work.reset();
    ioc.stop();
    thread.join();
  }
};

// The scripted peer's end of a control connection: what it received, by type.
class Peer {
 public:
  explicit Peer(std::shared_ptr<LinkConnection> conn) : conn_(std::move(conn)) {
    auto in = in_;
    conn_->start(
        [in](std::vector<std::uint8_t> bytes) {
          json j = json::parse(bytes.begin(), bytes.end(), nullptr, false);
          std::lock_guard lock(in->mu);
          in->messages.push_back(std::move(j));
          in->cv.notify_all();
          return true;
        },
        [in]() {
          std::lock_guard lock(in->mu);
          in->closed = true;
          in->cv.notify_all();
        });
  }
  ~Peer() { conn_->close(); }
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  void send(const json& j) {
    const std::string s = j.dump();
    (void)conn_->send(Channel::kControl, std::vector<std::uint8_t>(s.begin(), s.end()));
  }

  // The next message of type `type` (others are dropped), nullopt when none comes within
  // `timeout` or the connection closes first.
  std::optional<json> next(const std::string& type, std::chrono::milliseconds timeout) {
    std::unique_lock lock(in_->mu);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      while (!in_->messages.empty()) {
        json j = std::move(in_->messages.front());
        in_->messages.pop_front();
        if (j.is_object() && j.value("t", "") == type) {
          return j;
        }
      }
      if (in_->closed ||
          !in_->cv.wait_until(lock, deadline, [&] { return in_->closed || !in_->messages.empty(); })) {
        return std::nullopt;
      }
    }
  }

  // Whether the other end closed the connection within `timeout`.
  bool closed_within(std::chrono::milliseconds timeout) {
    std::unique_lock lock(in_->mu);
    return in_->cv.wait_for(lock, timeout, [&] { return in_->closed; });
  }

 private:
  struct Inbox {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<json> messages;
    bool closed = false;
  };
  std::shared_ptr<Inbox> in_ = std::make_shared<Inbox>();
  std::shared_ptr<LinkConnection> conn_;
};

// alice-kme under test (a LinkService on `store`), and sessions with it as a scripted
// bob-kme that runs no block: each session ends when the test drops it or alice closes it.
class AliceUnderTest {
 public:
  explicit AliceUnderTest(KeyStore& store)
      : config_(kme_config(LinkRole::kAlice)),
        service_(config_, store, io_.ioc, context("alice-kme", TlsRole::kServer)),
        bob_tls_(context("bob-kme", TlsRole::kClient)) {
    auto p = service_.start();
    EXPECT_TRUE(p.ok()) << (p.ok() ? "" : p.error().message);
    port_ = p.ok() ? p.value() : 0;
  }
  ~AliceUnderTest() { service_.stop(); }

  struct Session {
    std::unique_ptr<Peer> peer;
    json hello;        // alice's
    std::string mode;  // the decision's: "resume" or "reset" ("" if none came)
  };

  // Connects, and answers alice's hello with an honest bob's state (the same epoch and
  // blocks, the pool digest of an epoch without blocks, next own notice `next_seq`), edited
  // by `edit`.
  Session start_session(std::uint64_t next_seq, const std::function<void(json&)>& edit = {}) {
    Session s;
    auto c = LinkConnection::connect(io_.ioc, *bob_tls_, "127.0.0.1", port_, "alice-kme", 5s);
    EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message);
    if (!c.ok()) {
      return s;
    }
    s.peer = std::make_unique<Peer>(c.value());
    auto hello = s.peer->next("hello", 5s);
    EXPECT_TRUE(hello) << "no hello";
    if (!hello) {
      return s;
    }
    s.hello = *hello;
    const auto epoch = hello->at("epoch").get<std::uint64_t>();
    EXPECT_EQ(hello->at("blocks").get<std::uint64_t>(), 0u);
    json state = {{"t", "state"},     {"epoch", epoch},       {"blocks", 0},
                  {"pending", false}, {"applied", 0},         {"next_seq", next_seq},
                  {"fetched", true},  {"digest", hex(first_pool_digest(epoch))}};
    if (edit) {
      edit(state);
    }
    s.peer->send(state);
    auto decision = s.peer->next("decision", 5s);
    EXPECT_TRUE(decision) << "no decision";
    if (decision) {
      s.mode = decision->value("mode", "");
    }
    return s;
  }

 private:
  IoThread io_;
  Config config_;
  LinkService service_;
  std::shared_ptr<boost::asio::ssl::context> bob_tls_;
  std::uint16_t port_ = 0;
};

const char* const kKeyId = "0b6ad1f4-6f3c-4c8e-9a52-3f0d2f1e6a10";

// An honest key of 32 bytes from bob-kme's direction, master bob, slave alice.
json honest_key() {
  return {{"id", kKeyId}, {"dir", 1},          {"off", 0},
          {"len", 32},    {"master", "bob"},   {"slaves", {"alice"}}};
}

json notice(std::uint64_t seq, const json& key) {
  return {{"t", "notice"}, {"seq", seq}, {"keys", json::array({key})}};
}

// A notice that no honest peer KME can send, whatever the two configurations (a key_ID that
// is no UUID, no slave or one named twice, a discard of expired bytes naming SAEs), closes
// the session, is not acked, and leaves nothing here. One naming SAEs or key sizes this
// KME's configuration does not have (a 1 MiB master, SAEs configured nowhere or on the
// other side, keys outside min..max_key_size) may come from an honest peer whose notice was
// queued before both configurations changed: it is acked, only its bytes are dropped, and
// no key, SAE name or string of it is kept. Before, such notices were kept in memory and in
// the store (a 30 MB master SAE came back after a restart); refused instead, one would come
// back at every session and hold up every later notice. An honest notice (multicast to
// both SAEs here, with a discard of expired bytes) is acked and kept.
TEST(LinkService, NoticesNoHonestPeerCanSendCloseTheSession) {
  auto store = make_memory_key_store(Direction::kAlice);
  AliceUnderTest alice(*store);
  auto with = [](const char* field, json value) {
    json k = honest_key();
    k[field] = std::move(value);
    return k;
  };
  const std::vector<std::pair<std::string, json>> hostile = {
      {"a slave SAE named twice", with("slaves", {"alice", "alice"})},
      {"no slave SAE", with("slaves", json::array())},
      {"a key_ID that is no UUID", with("id", std::string(100, 'k'))},
      {"a discard of expired bytes naming SAEs",
       json{{"id", ""}, {"dir", 1}, {"off", 0}, {"len", 32}, {"master", "bob"},
            {"slaves", {"alice"}}, {"discard", true}}},
  };
  std::uint64_t seq = 1;
  for (const auto& [what, key] : hostile) {
    auto s = alice.start_session(seq + 1);
    ASSERT_TRUE(s.peer) << what;
    EXPECT_EQ(s.mode, "resume") << what;
    s.peer->send(notice(seq, key));
    EXPECT_TRUE(s.peer->closed_within(3s)) << what << ": the session went on";
    EXPECT_FALSE(s.peer->next("ack", 0ms)) << what << ": acked";
    const StoreStats st = store->stats();
    EXPECT_EQ(st.pending_notices + st.assigned_keys_waiting, 0u) << what << ": kept";
    ++seq;
  }
  json withdrawn = honest_key();  // a withdrawn prepared key names its owners
  withdrawn["discard"] = true;
  withdrawn["master"] = "nobody";
  const std::vector<std::pair<std::string, json>> not_configured = {
      {"a 1 MiB master SAE", with("master", std::string(1u << 20, 'M'))},
      {"a master SAE of this KME", with("master", "alice")},
      {"a slave SAE configured nowhere", with("slaves", {"nobody-configured"})},
      {"a slave SAE of the peer", with("slaves", {"bob2"})},
      {"a 1-byte key", with("len", 1)},
      {"a key above max_key_size", with("len", 8192 / 8 + 1)},
      {"a withdrawn key with a master configured nowhere", withdrawn},
  };
  auto s = alice.start_session(seq + 1);
  ASSERT_TRUE(s.peer);
  std::uint64_t waiting = 0;  // bytes-only discards waiting for their bytes (none committed)
  for (const auto& [what, key] : not_configured) {
    s.peer->send(notice(seq, key));
    auto ack = s.peer->next("ack", 5s);
    ASSERT_TRUE(ack) << what << ": not acked";
    EXPECT_EQ(ack->at("seq").get<std::uint64_t>(), seq) << what;
    const StoreStats st = store->stats();
    EXPECT_EQ(st.assigned_keys_waiting, 0u) << what << ": a key was kept";
    EXPECT_EQ(st.pending_notices, ++waiting) << what << ": its bytes are not accounted for";
    ++seq;
  }
  // What an honest peer sends is still taken, on the same session.
  json multicast = honest_key();
  multicast["slaves"] = {"alice", "alice2"};
  multicast["off"] = 4096;
  const json expired = {{"id", ""}, {"dir", 1},       {"off", 4096 + 32},
                        {"len", 64}, {"master", ""}, {"slaves", json::array()},
                        {"discard", true}};
  s.peer->send(json{{"t", "notice"}, {"seq", seq}, {"keys", {multicast, expired}}});
  auto ack = s.peer->next("ack", 5s);
  ASSERT_TRUE(ack) << "the honest notice was not acked";
  EXPECT_EQ(ack->at("seq").get<std::uint64_t>(), seq);
  EXPECT_EQ(store->stats().pending_notices, waiting + 2);  // waiting for their bytes
}

// A session start whose state carries no pool digest, while this end has one, is a reset:
// before, digests_agree() took a missing digest for agreement, so a peer that left it out
// always got a resume whatever its pool held.
TEST(LinkService, AStateWithoutAPoolDigestIsAReset) {
  auto store = make_memory_key_store(Direction::kAlice);
  AliceUnderTest alice(*store);
  {
    auto s = alice.start_session(1);
    ASSERT_TRUE(s.peer);
    EXPECT_EQ(s.mode, "resume");  // the same epoch, blocks and digest
  }
  auto s = alice.start_session(1, [](json& state) { state.erase("digest"); });
  ASSERT_TRUE(s.peer);
  EXPECT_EQ(s.mode, "reset");
  s = alice.start_session(1, [](json& state) { state["digest"] = std::string(64, '0'); });
  ASSERT_TRUE(s.peer);
  EXPECT_EQ(s.mode, "reset");  // another digest, as before
}

// A KME whose store lost the keys the peer assigned it (LinkState::assigned_lost: a power
// loss or a failed sync may have undone deliveries) says so in its hello until a peer that
// acts on it (drops_prepared in its state: it drops the keys it prepared for enc_keys,
// whose copies are gone) has had it. A peer of an earlier version, which would go on
// handing out those prepared keys, is told again at its next session.
TEST(LinkService, AssignedLostIsToldUntilAPeerThatDropsPreparedKeysHasHadIt) {
  const qkd::test::ScratchDir dir("link-assigned-lost");
  const std::string db = (dir.path() / "alice.db").string();
  const std::vector<std::uint8_t> node_key(32, 7);
  ASSERT_TRUE(make_sqlite_key_store(Direction::kAlice, db, node_key).ok());
  std::ofstream(db + ".sync-failed").close();  // as the syncer leaves it
  auto opened = make_sqlite_key_store(Direction::kAlice, db, node_key);
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  KeyStore& store = **opened;
  ASSERT_TRUE(store.link_state().assigned_lost);
  AliceUnderTest alice(store);
  {
    auto s = alice.start_session(1);  // an earlier version's state: no drops_prepared
    ASSERT_TRUE(s.peer);
    EXPECT_TRUE(s.hello.value("assigned_lost", false)) << s.hello.dump();
    EXPECT_TRUE(s.hello.value("drops_prepared", false)) << s.hello.dump();
    EXPECT_FALSE(s.mode.empty());
  }
  EXPECT_TRUE(store.link_state().assigned_lost) << "cleared by a peer that ignores it";
  {
    auto s = alice.start_session(1, [](json& state) { state["drops_prepared"] = true; });
    ASSERT_TRUE(s.peer);
    EXPECT_TRUE(s.hello.value("assigned_lost", false)) << s.hello.dump();
    for (int i = 0; i < 200 && store.link_state().assigned_lost; ++i) {
      std::this_thread::sleep_for(10ms);
    }
    EXPECT_FALSE(store.link_state().assigned_lost) << "not cleared once the peer had it";
  }
  auto s = alice.start_session(1);
  ASSERT_TRUE(s.peer);
  EXPECT_FALSE(s.hello.contains("assigned_lost")) << s.hello.dump();
}

// A store that forwards to another and refuses the first queue_peer_notice (as the durable
// store does once a write has failed).
class RefusesFirstNotice : public KeyStore {
 public:
  explicit RefusesFirstNotice(KeyStore& s) : s_(s) {}
  void set_assignment_listener(AssignmentListener l) override { s_.set_assignment_listener(std::move(l)); }
  void set_notice_hooks(NoticeEncoder e, NoticeRelease r) override {
    s_.set_notice_hooks(std::move(e), std::move(r));
  }
  LinkState link_state() const override { return s_.link_state(); }
  std::uint64_t drop_prepared() override { return s_.drop_prepared(); }
  Status clear_assigned_lost() override { return s_.clear_assigned_lost(); }
  Status commit_block(std::span<const std::uint8_t> k, std::uint64_t e, std::uint64_t b) override {
    return s_.commit_block(k, e, b);
  }
  Status start_epoch(std::uint64_t e) override { return s_.start_epoch(e); }
  std::optional<PoolDigest> pool_digest() const override { return s_.pool_digest(); }
  Status set_pending_block(const std::optional<PendingBlock>& p) override {
    return s_.set_pending_block(p);
  }
  Status apply_peer_notice(std::uint64_t seq, std::vector<KeyAssignment> as) override {
    return s_.apply_peer_notice(seq, std::move(as));
  }
  Result<QueuedNotice> queue_peer_notice(std::uint64_t seq, std::vector<KeyAssignment> as) override {
    if (!refused_.exchange(true)) {
      return qkd::core::make_error(ErrorCode::kUnavailable, "key store unavailable: test");
    }
    return s_.queue_peer_notice(seq, std::move(as));
  }
  Status durable(std::uint64_t t) override { return s_.durable(t); }
  void ack_notices(std::uint64_t seq) override { s_.ack_notices(seq); }
  void commit(std::span<const std::uint8_t> k) override { s_.commit(k); }
  void reset_pool() override { s_.reset_pool(); }
  Status apply_peer_assignment(KeyAssignment a) override { return s_.apply_peer_assignment(std::move(a)); }
  void when_written(PendingWrite p, std::function<void(Status)> done) override {
    s_.when_written(std::move(p), std::move(done));
  }
  void drain() override { s_.drain(); }
  Result<std::vector<DeliveredKey>> allocate(const std::string& m, const std::vector<std::string>& s,
                                             const std::vector<std::string>& l, std::uint32_t n,
                                             std::uint32_t b, PendingWrite* p) override {
    return s_.allocate(m, s, l, n, b, p);
  }
  Result<std::vector<DeliveredKey>> take(const std::string& c, const std::string& m,
                                         const std::vector<std::string>& ids,
                                         std::chrono::milliseconds w, PendingWrite* p) override {
    return s_.take(c, m, ids, w, p);
  }
  bool knows_all(const std::vector<std::string>& ids) const override { return s_.knows_all(ids); }
  std::shared_ptr<void> when_known(const std::vector<std::string>& ids,
                                   std::function<void()> wake) override {
    return s_.when_known(ids, std::move(wake));
  }
  bool delivered_any(const std::vector<std::string>& ids) const override {
    return s_.delivered_any(ids);
  }
  StoreStats stats() const override { return s_.stats(); }
  std::map<std::pair<std::string, std::string>, std::uint64_t> waiting_by_pair() const override {
    return s_.waiting_by_pair();
  }
  void set_max_age(std::chrono::seconds a) override { s_.set_max_age(a); }
  void set_max_unfetched(std::uint64_t k) override { s_.set_max_unfetched(k); }
  void set_pool_limit(std::uint64_t b) override { s_.set_pool_limit(b); }
  void set_prepared_keys(std::uint32_t d) override { s_.set_prepared_keys(d); }
  void withdraw_prepared() override { s_.withdraw_prepared(); }
  std::uint64_t prepared_for(const std::string& m, const std::string& s,
                             std::uint32_t b) const override {
    return s_.prepared_for(m, s, b);
  }
  Status expire(std::chrono::system_clock::time_point now) override { return s_.expire(now); }

 private:
  KeyStore& s_;
  std::atomic<bool> refused_{false};
};

// A notice the store could not take (no ack, the session closed) is applied when the peer
// resends it in the next session. Before, its seq counted as applied before the store was
// asked, so the resent copy was taken for a duplicate and acked, and its key never held here.
TEST(LinkService, ANoticeTheStoreRefusedIsAppliedWhenResent) {
  auto memory = make_memory_key_store(Direction::kAlice);
  RefusesFirstNotice store(*memory);
  AliceUnderTest alice(store);
  {
    auto s = alice.start_session(2);
    ASSERT_TRUE(s.peer);
    EXPECT_EQ(s.mode, "resume");
    s.peer->send(notice(1, honest_key()));
    EXPECT_TRUE(s.peer->closed_within(3s)) << "a notice the store refused ended no session";
    EXPECT_FALSE(s.peer->next("ack", 0ms)) << "a notice the store refused was acked";
  }
  auto s = alice.start_session(2);
  ASSERT_TRUE(s.peer);
  EXPECT_EQ(s.mode, "resume");
  s.peer->send(notice(1, honest_key()));  // resent, as the outbox does
  auto ack = s.peer->next("ack", 5s);
  ASSERT_TRUE(ack);
  EXPECT_EQ(ack->at("seq").get<std::uint64_t>(), 1u);
  EXPECT_EQ(memory->stats().pending_notices, 1u) << "acked, but the key is not held";
}

// bob-kme under test with a durable store holding a pending block (ready sent, alice's
// commit not received). A session start that resumes without committing it (alice never
// committed that block) drops it from the store too: before, only from memory, so after a
// crash the store reported the stale block as pending again.
TEST(LinkService, AResumeWithoutCommitDropsThePendingBlockFromTheStore) {
  const fs::path dir = pki_dir() / "pending";
  fs::create_directories(dir);
  const std::string db = (dir / "bob.db").string();
  const std::vector<std::uint8_t> node_key(32, 0x42);
  constexpr std::uint64_t kEpoch = 0x5eed1;
  auto open = [&] {
    auto s = make_sqlite_key_store(Direction::kBob, db, node_key);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().message);
    return s.ok() ? std::move(s.value()) : nullptr;
  };
  {
    auto store = open();
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->start_epoch(kEpoch).ok());
    qkd::core::SecureBytes key(64);
    ASSERT_TRUE(store->set_pending_block(PendingBlock{1, std::move(key)}).ok());
  }
  // Scripted alice: an acceptor that hands the test bob's connections and notes his engine
  // connection (opened once he has handled the decision).
  IoThread io;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<LinkConnection>> conns;
  bool engine_opened = false;
  LinkAcceptor acceptor(
      io.ioc, context("alice-kme", TlsRole::kServer), "bob-kme",
      [&](std::shared_ptr<LinkConnection> c) {
        std::lock_guard lock(mu);
        conns.push_back(std::move(c));
        cv.notify_all();
      },
      [&](int fd, const EngineToken&) {
        UniqueFd closed_here(fd);
        std::lock_guard lock(mu);
        engine_opened = true;
        cv.notify_all();
      });
  auto port = acceptor.listen("127.0.0.1", 0);
  ASSERT_TRUE(port.ok());
  {
    auto store = open();
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->link_state().pending);
    const Config config = kme_config(LinkRole::kBob, port.value());
    LinkService bob(config, *store, io.ioc, context("bob-kme", TlsRole::kClient));
    ASSERT_TRUE(bob.start().ok());
    std::shared_ptr<LinkConnection> conn;
    {
      std::unique_lock lock(mu);
      ASSERT_TRUE(cv.wait_for(lock, 5s, [&] { return !conns.empty(); })) << "bob never connected";
      conn = conns.front();
    }
    Peer peer(conn);
    peer.send(json{{"t", "hello"}, {"epoch", kEpoch}, {"blocks", 0}, {"fetched", true}});
    auto state = peer.next("state", 5s);
    ASSERT_TRUE(state);
    EXPECT_TRUE(state->at("pending").get<bool>());
    peer.send(json{{"t", "decision"},
                   {"mode", "resume"},
                   {"epoch", kEpoch},
                   {"commit_pending", false},
                   {"engine", std::string(32, 'a')}});
    {
      std::unique_lock lock(mu);
      EXPECT_TRUE(cv.wait_for(lock, 5s, [&] { return engine_opened; }))
          << "bob opened no engine connection after the decision";
    }
    bob.stop();
    std::lock_guard lock(mu);
    for (auto& c : conns) {
      c->close();
    }
  }
  acceptor.stop();
  auto store = open();  // as after a crash: what the store holds
  ASSERT_TRUE(store);
  EXPECT_FALSE(store->link_state().pending) << "the dropped block is still pending in the store";
  EXPECT_EQ(store->link_state().blocks, 0u);
}

// A peer that reads nothing of what is sent to it (its pings could keep the connection open
// meanwhile) closes the connection once kMaxQueuedBytes wait to be written, instead of
// growing the queue without end. Before, every send() was queued.
TEST(LinkConnection, APeerThatDoesNotReadIsClosedPastTheQueueBound) {
  IoThread io;
  std::mutex mu;
  std::condition_variable cv;
  std::shared_ptr<LinkConnection> accepted;
  LinkAcceptor acceptor(
      io.ioc, context("alice-kme", TlsRole::kServer), "bob-kme",
      [&](std::shared_ptr<LinkConnection> c) {
        std::lock_guard lock(mu);
        accepted = std::move(c);
        cv.notify_all();
      },
      [](int fd, const EngineToken&) { UniqueFd closed_here(fd); });
  auto port = acceptor.listen("127.0.0.1", 0);
  ASSERT_TRUE(port.ok());
  auto bob_tls = context("bob-kme", TlsRole::kClient);
  // Bob connects and never starts reading.
  auto bob = LinkConnection::connect(io.ioc, *bob_tls, "127.0.0.1", port.value(), "alice-kme", 5s);
  ASSERT_TRUE(bob.ok()) << bob.error().message;
  {
    std::unique_lock lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 5s, [&] { return accepted != nullptr; }));
  }
  auto closed = std::make_shared<std::atomic<bool>>(false);
  accepted->start([](std::vector<std::uint8_t>) { return true; }, [closed] { *closed = true; });
  constexpr std::size_t kMiB = 1u << 20;
  constexpr int kMaxSends = static_cast<int>(LinkConnection::kMaxQueuedBytes / kMiB) + 32;
  int sent = 0;
  for (; sent < kMaxSends; ++sent) {
    if (!accepted->send(Channel::kControl, std::vector<std::uint8_t>(kMiB, 0x5a)).ok()) {
      break;
    }
  }
  EXPECT_LT(sent, kMaxSends) << "every frame was queued for a peer that reads nothing";
  EXPECT_GE(sent, static_cast<int>(LinkConnection::kMaxQueuedBytes / (kMiB + 69)));
  EXPECT_TRUE(accepted->closed());
  EXPECT_TRUE(*closed);
  accepted->close();
  bob.value()->close();
  acceptor.stop();
}

}  // namespace
}  // namespace qkd::kms
