// The ETSI 014 client: a private TLS context, a small keep-alive pool, the three routes.
#include "qkd/etsi/client.hpp"

#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <system_error>
#include <thread>
#include <vector>

#include "internal.hpp"
#include "qkd/etsi/client_detail.hpp"
#include "transport.hpp"

namespace qkd::etsi {

using qkd::core::make_error;

namespace {

using internal::Clock;
using internal::Connection;

struct SslCtxDeleter {
  void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxDeleter>;

// The KME's TLS: a client context in the library's private OSSL_LIB_CTX (default provider
// only), TLS 1.2 or later, classical groups pinned, the KME verified against ca_file.
Result<SslCtxPtr> make_tls_context(const ClientConfig& config) {
  internal::ErrorMark mark;
  const auto fail = [&](std::string why) {
    const std::string ossl = mark.pop();
    return make_error(ErrorCode::kInvalidArgument, ossl.empty() ? why : why + ": " + ossl);
  };
  OSSL_LIB_CTX* libctx = internal::private_libctx();
  if (libctx == nullptr) {
    return fail("cannot make the private OpenSSL library context");
  }
  SslCtxPtr ctx(SSL_CTX_new_ex(libctx, nullptr, TLS_client_method()));
  if (!ctx) {
    return fail("cannot make a TLS context");
  }
  // libssl applies the host's openssl.cnf system_default section to every new SSL_CTX;
  // whatever it said (e.g. "Groups = qkd:X25519"), pin what matters here.
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(ctx.get(), 0) != 1 ||
      SSL_CTX_set1_groups_list(ctx.get(), "X25519:P-256") != 1) {
    return fail("cannot pin the TLS version and groups");
  }
  // CLEANSE_PLAINTEXT: libssl's read buffers hold the replies' JSON, keys in base64; they
  // are to be cleansed when freed, as our own copies are.
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                                     SSL_OP_CLEANSE_PLAINTEXT);
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (config.ca_file.empty()) {
    return fail("no CA file for the KME certificate");
  }
  if (SSL_CTX_load_verify_locations(ctx.get(), config.ca_file.c_str(), nullptr) != 1) {
    return fail("cannot load the CA file " + config.ca_file);
  }
  if (config.cert_file.empty() || config.key_file.empty()) {
    return fail("no client certificate or key (the KME identifies the SAE by it)");
  }
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), config.cert_file.c_str()) != 1) {
    return fail("cannot load the certificate " + config.cert_file);
  }
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), config.key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    return fail("cannot load the private key " + config.key_file);
  }
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return fail("the key " + config.key_file + " does not match the certificate " +
                config.cert_file);
  }
  return ctx;
}

// detail::set_new_connection_hook(), detail::set_pool_locked_hook(): tests only.
std::atomic<void (*)()> new_connection_hook{nullptr};
std::atomic<void (*)()> pool_locked_hook{nullptr};

// Runs `work` on a short-lived thread of its own and joins it: libssl 3.0's handshake
// state machine clears the whole OpenSSL error queue of the thread it runs on (at every
// SSL_connect step, and again when SSL_read meets the session tickets a TLS 1.3 server
// sends after the handshake), and the calling thread's queue is the host application's,
// entries and marks. An exception thrown by `work` is thrown again here. When no thread
// can be made, `work` runs on the calling thread (the call still works; the queue is lost).
template <typename F>
void run_on_own_thread(F& work) {
  std::exception_ptr thrown;
  std::thread thread;
  try {
    thread = std::thread([&work, &thrown]() noexcept {
      try {
        work();
      } catch (...) {
        thrown = std::current_exception();
      }
    });
  } catch (const std::system_error&) {
    work();
    return;
  }
  thread.join();
  if (thrown) {
    std::rethrow_exception(thrown);
  }
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           const auto lo = [](char c) {
             return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
           };
           return lo(x) == lo(y);
         });
}

// fork() while another thread is inside take_idle() or give_back(): the child would inherit
// that client's pool lock held by a thread that does not exist there, and block for ever at
// its first call. pthread_atfork handlers (installed once, by the first client) take every
// client's pool lock before fork() and release it after, in the parent and in the child, as
// the provider's fork guard does for its own locks (provider/src/fork_guard.hpp). A pool
// lock is a leaf: no other lock is taken while it is held, and none is held when it is
// taken (the registry's lock is taken only to add or remove a client, never under a pool
// lock). So neither these handlers nor the provider's can wait for a thread that waits for
// them, whichever were installed first. The connections a child inherits are dropped by
// its first call (take_idle()), not in the handler: freeing libssl objects may take
// OpenSSL's own locks, which no fork handler holds across fork().
class PoolLocks {
 public:
  static void add(std::mutex* pool) {
    static std::once_flag installed;
    std::call_once(installed, [] { (void)pthread_atfork(&prepare, &parent, &child); });
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    r.pools.push_back(pool);
  }
  static void remove(std::mutex* pool) noexcept {
    Registry& r = registry();
    std::lock_guard lock(r.mu);
    std::erase(r.pools, pool);
  }

 private:
  struct Registry {
    std::mutex mu;
    std::vector<std::mutex*> pools;
  };
  static Registry& registry() {
    static auto* r = new Registry;  // never destroyed: the handlers may run during exit
    return *r;
  }
  static void prepare() {
    Registry& r = registry();
    r.mu.lock();  // held across fork(): no client comes or goes meanwhile
    for (std::mutex* pool : r.pools) {
      pool->lock();
    }
  }
  static void release() {
    Registry& r = registry();
    for (auto it = r.pools.rbegin(); it != r.pools.rend(); ++it) {
      (*it)->unlock();
    }
    r.mu.unlock();
  }
  static void parent() { release(); }
  static void child() { release(); }
};

class ClientImpl final : public Client {
 public:
  ClientImpl(ClientConfig config, detail::Url url, SslCtxPtr ctx)
      : config_(std::move(config)), url_(std::move(url)), ctx_(std::move(ctx)), pid_(::getpid()) {
    PoolLocks::add(&mu_);
  }
  ~ClientImpl() override { PoolLocks::remove(&mu_); }
  ClientImpl(const ClientImpl&) = delete;
  ClientImpl& operator=(const ClientImpl&) = delete;

  Result<StatusInfo> status(std::string_view slave_sae_id) override;
  Result<std::vector<Key>> enc_keys(std::string_view slave_sae_id, std::uint32_t number,
                                    std::uint32_t size_bits, Deadline deadline) override;
  Result<std::vector<Key>> dec_keys(std::string_view master_sae_id,
                                    std::span<const std::string> key_ids,
                                    Deadline deadline) override;

 private:
  struct Reply {
    int status = 0;
    std::string body;
    Reply() = default;
    Reply(const Reply&) = delete;
    Reply& operator=(const Reply&) = delete;
    Reply(Reply&&) = default;
    Reply& operator=(Reply&&) = default;
    ~Reply() { OPENSSL_cleanse(body.data(), body.size()); }
  };
  static constexpr std::size_t kMaxIdle = 4;

  // One request/response with a 200 answer; anything else becomes the documented Error.
  // Bounded by the earlier of `deadline` and the configured timeout.
  Result<Reply> call(std::string_view method, const std::string& target,
                     const std::string& body, Deadline deadline = std::nullopt);
  Result<Reply> exchange(Connection& conn, const std::string& request,
                         Clock::time_point deadline, bool* keep_alive);
  // A new connection and the request on it, on a thread of their own (run_on_own_thread):
  // the handshake and the first reply, which carries the KME's session tickets, are where
  // libssl clears the queue. `*conn` is set when the reply says keep-alive.
  Result<Reply> open_and_exchange(const std::string& request, Clock::time_point deadline,
                                  std::unique_ptr<Connection>* conn, bool* keep_alive);
  std::unique_ptr<Connection> take_idle();
  void give_back(std::unique_ptr<Connection> conn);
  std::string route(std::string_view sae_id, std::string_view leaf) const {
    return url_.path_prefix + "/api/v1/keys/" + detail::percent_encode(sae_id) + "/" +
           std::string(leaf);
  }
  Error unreachable(const std::string& why) const {
    return make_error(ErrorCode::kUnavailable, "key service unreachable: " + url_.text + " (" + why + ")");
  }
  Error timed_out() const {
    return make_error(ErrorCode::kTimeout, "key service timed out: " + url_.text + " (no reply within " +
                                               std::to_string(config_.timeout.count()) + " ms)");
  }
  Error bad_reply(const std::string& why) const {
    return make_error(ErrorCode::kProtocol, "bad reply from key service " + url_.text + ": " + why);
  }

  const ClientConfig config_;
  const detail::Url url_;
  const SslCtxPtr ctx_;
  std::mutex mu_;  // the pool's lock: taken around fork() (PoolLocks)
  std::vector<std::unique_ptr<Connection>> idle_;  // guarded by mu_
  pid_t pid_;                                      // guarded by mu_
};

std::unique_ptr<Connection> ClientImpl::take_idle() {
  std::vector<std::unique_ptr<Connection>> drop;  // destroyed outside the lock
  std::unique_ptr<Connection> out;
  {
    std::lock_guard lock(mu_);
    if (auto* hook = pool_locked_hook.load()) {
      hook();
    }
    if (::getpid() != pid_) {
      // We are a child of fork(): the sockets are shared with the parent. Forget them
      // without a word on the wire.
      drop.swap(idle_);
      pid_ = ::getpid();
    }
    while (!idle_.empty()) {
      auto conn = std::move(idle_.back());
      idle_.pop_back();
      if (conn->usable_when_idle()) {
        out = std::move(conn);
        break;
      }
      drop.push_back(std::move(conn));
    }
  }
  return out;
}

void ClientImpl::give_back(std::unique_ptr<Connection> conn) {
  std::lock_guard lock(mu_);
  if (::getpid() == pid_ && idle_.size() < kMaxIdle) {
    idle_.push_back(std::move(conn));
  }
}

Result<ClientImpl::Reply> ClientImpl::exchange(Connection& conn, const std::string& request,
                                               Clock::time_point deadline, bool* keep_alive) {
  auto sent = conn.write_all(request, deadline);
  if (!sent.ok()) {
    return sent.error();
  }
  detail::ResponseParser parser;
  // Not zeroed: only the bytes read are used, and those (up to `dirty`) are cleansed. A
  // one-key reply is a few hundred bytes; larger ones take a few reads from libssl's buffer.
  std::array<std::uint8_t, 4096> buf;  // NOLINT(cppcoreguidelines-pro-type-member-init)
  std::size_t dirty = 0;
  while (parser.state() == detail::ResponseParser::State::kNeedMore) {
    auto n = conn.read_some(buf, deadline);
    if (!n.ok()) {
      OPENSSL_cleanse(buf.data(), dirty);
      if (n.error().code == ErrorCode::kClosed && parser.received_anything()) {
        return make_error(ErrorCode::kProtocol, n.error().message);  // no retry mid-reply
      }
      return n.error();
    }
    if (*n == 0) {
      if (!parser.received_anything()) {
        return make_error(ErrorCode::kClosed, "connection closed before any response");
      }
      parser.feed_eof();
    } else {
      dirty = std::max(dirty, *n);
      parser.feed(std::span<const std::uint8_t>(buf.data(), *n));
    }
  }
  OPENSSL_cleanse(buf.data(), dirty);
  if (parser.state() == detail::ResponseParser::State::kError) {
    return make_error(ErrorCode::kProtocol, "malformed HTTP response: " + parser.error());
  }
  *keep_alive = parser.keep_alive();
  Reply reply;
  reply.status = parser.status();
  reply.body = std::move(parser.body());
  return reply;
}

Result<ClientImpl::Reply> ClientImpl::open_and_exchange(const std::string& request,
                                                        Clock::time_point deadline,
                                                        std::unique_ptr<Connection>* conn,
                                                        bool* keep_alive) {
  Result<Reply> reply = make_error(ErrorCode::kInternal, "no reply");
  auto work = [&] {
    auto opened = Connection::open(ctx_.get(), url_, deadline);
    if (!opened.ok()) {
      reply = opened.error();
      return;
    }
    std::unique_ptr<Connection> fresh = std::move(opened).value();
    if (auto* hook = new_connection_hook.load()) {
      hook();
    }
    if (Clock::now() >= deadline) {
      // Opening the connection took what time was left. The connection goes too: its
      // tickets are unread, and reading them later would be on the caller's thread.
      reply = make_error(ErrorCode::kTimeout, "timed out");
      return;
    }
    reply = exchange(*fresh, request, deadline, keep_alive);
    if (reply.ok() && *keep_alive) {
      *conn = std::move(fresh);
    }
  };
  run_on_own_thread(work);
  return reply;
}

Result<ClientImpl::Reply> ClientImpl::call(std::string_view method, const std::string& target,
                                           const std::string& body, Deadline caller_deadline) {
  const auto start = Clock::now();
  const auto deadline = caller_deadline ? std::min(*caller_deadline, start + config_.timeout)
                                        : start + config_.timeout;
  if (start >= deadline) {
    // The caller's time is up: an enc_keys sent now would consume keys at the KME whose
    // reply nobody reads.
    return timed_out();
  }
  std::string request;
  request.reserve(256 + body.size());
  request.append(method).append(" ").append(target).append(" HTTP/1.1\r\n");
  request.append("Host: ").append(url_.authority()).append("\r\n");
  request.append("Accept: application/json\r\nUser-Agent: qkd-etsi-client/0.1\r\n");
  if (method == "POST") {
    request.append("Content-Type: application/json\r\nContent-Length: ")
        .append(std::to_string(body.size()))
        .append("\r\n");
  }
  request.append("\r\n").append(body);

  // A kept-alive connection may have been closed by the KME just before we used it: then
  // (and only when the KME sent nothing back) the request is made again on a new one.
  for (int attempt = 0;; ++attempt) {
    std::unique_ptr<Connection> conn = attempt == 0 ? take_idle() : nullptr;
    const bool reused = conn != nullptr;
    bool keep_alive = false;
    Result<Reply> reply = make_error(ErrorCode::kInternal, "no reply");
    if (reused) {
      // On the caller's thread: the connection's session tickets were read with its first
      // reply, on the thread that opened it, so libssl's handshake code has nothing left
      // to do (a KME's later post-handshake message, a KeyUpdate, would still run it; one
      // sent while the connection was idle makes take_idle() drop it).
      if (Clock::now() >= deadline) {
        give_back(std::move(conn));
        return timed_out();
      }
      reply = exchange(*conn, request, deadline, &keep_alive);
    } else {
      reply = open_and_exchange(request, deadline, &conn, &keep_alive);
    }
    if (!reply.ok()) {
      const Error& e = reply.error();
      if (e.code == ErrorCode::kClosed && reused && attempt == 0) {
        continue;
      }
      if (e.code == ErrorCode::kTimeout) {
        return timed_out();
      }
      if (e.code == ErrorCode::kProtocol) {
        return bad_reply(e.message);
      }
      return unreachable(e.message);
    }
    if (keep_alive && conn) {
      give_back(std::move(conn));
    }
    if (reply->status != 200) {
      std::string message = detail::parse_error_message(reply->body);
      if (message.empty()) {
        message = reply->status == 401 ? "unauthorized (the KME did not accept this SAE)"
                                       : "no message";
      }
      return make_error(ErrorCode::kRejected, "key service " + url_.text + " answered HTTP " +
                                                  std::to_string(reply->status) + ": " + message);
    }
    return reply;
  }
}

Result<StatusInfo> ClientImpl::status(std::string_view slave_sae_id) {
  try {
    auto reply = call("GET", route(slave_sae_id, "status"), "");
    if (!reply.ok()) {
      return reply.error();
    }
    auto parsed = detail::parse_status(reply->body);
    if (!parsed.ok()) {
      return bad_reply(parsed.error().message);
    }
    return parsed;
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInternal, std::string("ETSI client: ") + e.what());
  }
}

Result<std::vector<Key>> ClientImpl::enc_keys(std::string_view slave_sae_id, std::uint32_t number,
                                              std::uint32_t size_bits, Deadline deadline) {
  try {
    if (number == 0 || number > 1024) {
      return make_error(ErrorCode::kInvalidArgument, "enc_keys: number must be 1..1024");
    }
    if (size_bits == 0 || size_bits % 8 != 0) {
      return make_error(ErrorCode::kInvalidArgument,
                        "enc_keys: size must be a positive multiple of 8 bits");
    }
    const nlohmann::json request = {{"number", number}, {"size", size_bits}};
    auto reply = call("POST", route(slave_sae_id, "enc_keys"), request.dump(), deadline);
    if (!reply.ok()) {
      return reply.error();
    }
    auto keys = detail::parse_key_container(reply->body, number, size_bits / 8);
    if (!keys.ok()) {
      return bad_reply(keys.error().message);
    }
    return keys;
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInternal, std::string("ETSI client: ") + e.what());
  }
}

Result<std::vector<Key>> ClientImpl::dec_keys(std::string_view master_sae_id,
                                              std::span<const std::string> key_ids,
                                              Deadline deadline) {
  try {
    if (key_ids.empty() || key_ids.size() > 1024) {
      return make_error(ErrorCode::kInvalidArgument, "dec_keys: 1..1024 key_IDs");
    }
    Result<Reply> reply = make_error(ErrorCode::kInternal, "unset");
    if (key_ids.size() == 1) {
      reply = call("GET", route(master_sae_id, "dec_keys") + "?key_ID=" +
                              detail::percent_encode(key_ids[0]), "", deadline);
    } else {
      nlohmann::json ids = nlohmann::json::array();
      for (const auto& id : key_ids) {
        ids.push_back({{"key_ID", id}});
      }
      reply = call("POST", route(master_sae_id, "dec_keys"), nlohmann::json{{"key_IDs", ids}}.dump(),
                   deadline);
    }
    if (!reply.ok()) {
      return reply.error();
    }
    auto keys = detail::parse_key_container(reply->body, key_ids.size(), 0);
    if (!keys.ok()) {
      return bad_reply(keys.error().message);
    }
    // Answer in the order asked; every key_ID asked must be there (UUIDs: any case).
    std::vector<Key> ordered;
    ordered.reserve(key_ids.size());
    for (const auto& id : key_ids) {
      auto it = std::find_if(keys->begin(), keys->end(),
                             [&](const Key& k) { return iequals(k.key_id, id); });
      if (it == keys->end()) {
        return bad_reply("key_ID " + id + " asked for but not returned");
      }
      ordered.push_back(std::move(*it));
      keys->erase(it);
    }
    return ordered;
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInternal, std::string("ETSI client: ") + e.what());
  }
}

}  // namespace

namespace detail {

void set_new_connection_hook(void (*hook)()) { new_connection_hook.store(hook); }
void set_pool_locked_hook(void (*hook)()) { pool_locked_hook.store(hook); }

}  // namespace detail

Result<std::unique_ptr<Client>> Client::create(ClientConfig config) {
  try {
    auto url = detail::parse_url(config.kme_url);
    if (!url.ok()) {
      return url.error();
    }
    if (config.timeout.count() <= 0) {
      return make_error(ErrorCode::kInvalidArgument, "timeout must be positive");
    }
    auto ctx = make_tls_context(config);
    if (!ctx.ok()) {
      return ctx.error();
    }
    return std::unique_ptr<Client>(
        new ClientImpl(std::move(config), std::move(url).value(), std::move(ctx).value()));
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInternal, std::string("ETSI client: ") + e.what());
  }
}

}  // namespace qkd::etsi
