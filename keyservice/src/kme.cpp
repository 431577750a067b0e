#include "qkd/kms/kme.hpp"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <thread>

#include "qkd/kms/admission.hpp"
#include "qkd/kms/api.hpp"
#include "qkd/kms/https_server.hpp"
#include "qkd/kms/key_store.hpp"
#include "qkd/kms/link_service.hpp"
#include "qkd/kms/metrics.hpp"
#include "qkd/kms/tls.hpp"
#include "qkd/kms/util.hpp"

namespace qkd::kms {

namespace asio = boost::asio;

namespace {
constexpr int kApiThreads = 2;  // no handler blocks: not on a notice, not on the disk

constexpr auto kDrainTimeout = std::chrono::seconds(2);  // + keys.dec_wait_ms: responses due

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

std::uint64_t count_keys(const std::string& body) {
  std::uint64_t n = 0;
  for (std::size_t pos = body.find("\"key_ID\""); pos != std::string::npos;
       pos = body.find("\"key_ID\"", pos + 8)) {
    ++n;
  }
  return n;
}

// The bits of all keys in a Key container body as etsi_api.cpp writes it ("key":"<base64>").
std::uint64_t delivered_bits(const std::string& body) {
  constexpr std::string_view kKey = "\"key\":\"";
  std::uint64_t bits = 0;
  for (std::size_t pos = body.find(kKey); pos != std::string::npos; pos = body.find(kKey, pos)) {
    pos += kKey.size();
    const std::size_t end = body.find('"', pos);
    if (end == std::string::npos) {
      break;
    }
    const std::size_t len = end - pos;
    std::size_t pad = 0;
    while (pad < 2 && pad < len && body[end - 1 - pad] == '=') {
      ++pad;
    }
    bits += (len / 4 * 3 - std::min(pad, len / 4 * 3)) * 8;
    pos = end;
  }
  return bits;
}

void run_io(asio::io_context& ioc, const char* name) {
  for (;;) {
    try {
      ioc.run();
      return;
    } catch (const std::exception& e) {  // the edge of an I/O thread
      spdlog::error("{} I/O thread: {}", name, e.what());
    }
  }
}
}  // namespace

struct Kme::Impl {
  class DecWait;

  Config config;
  std::unique_ptr<KeyStore> store;
  asio::io_context api_ioc;
  asio::io_context link_ioc;
  asio::executor_work_guard<asio::io_context::executor_type> api_guard{api_ioc.get_executor()};
  asio::executor_work_guard<asio::io_context::executor_type> link_guard{link_ioc.get_executor()};
  std::unique_ptr<LinkService> link;
  std::unique_ptr<EtsiService> etsi;
  std::unique_ptr<AdmissionControl> admission;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<HttpsServer> server;
  std::unique_ptr<MetricsHttpServer> metrics_server;
  std::unique_ptr<asio::signal_set> signals;
  std::vector<std::thread> threads;

  // The API entry point: admission control and metrics around the ETSI service
  // (HttpsServer::Handler). A reply whose keys are not durable yet comes back deferred
  // until they are; so does a dec_keys waiting for its keys' notice (wait_for_notice).
  HttpReply handle(const std::string& caller, const ApiRequest& req);
  // The reply as it leaves: recorded in the metrics, at once or, when its keys are not
  // durable yet, deferred until they are (a 503 if the write fails, `refund` then called).
  HttpReply finish(HttpReply reply, std::function<void()> refund, const std::string& caller,
                   const RequestInfo& info, bool known_caller,
                   std::chrono::steady_clock::time_point t0);
  // A dec_keys whose keys' notice has not come: deferred, it waits without a thread (see
  // DecWait) and is answered when its keys are here or keys.dec_wait_ms has passed.
  HttpReply wait_for_notice(const std::string& caller, const ApiRequest& req,
                            const RequestInfo& info, std::chrono::steady_clock::time_point t0,
                            std::vector<std::string> key_ids);
  // The request's metrics, once its reply is final.
  void record(const std::string& caller, const RequestInfo& info, bool known_caller,
              const HttpReply& reply, std::chrono::steady_clock::time_point t0);
  // Admission budgets count keys of keys.key_size bits (admission.hpp): what one key of
  // `size` bits (0: not given, the default size) counts as.
  double budget_keys(std::uint64_t size) const {
    return size == 0 ? 1.0 : static_cast<double>(size) / config.keys.key_size;
  }
  // `n` keys fetched, `bits` in all (0: not reported, by an older peer: default-size keys).
  double fetched_keys(std::uint64_t n, std::uint64_t bits) const {
    return bits == 0 ? static_cast<double>(n) : static_cast<double>(bits) / config.keys.key_size;
  }
  std::string render_metrics() const {
    StoreStats st = store->stats();
    st.waiting_by_pair =
        pair_waiting_series(config.saes, config.link.peer_saes, store->waiting_by_pair());
    Metrics::BudgetLevels budgets;
    const auto now = std::chrono::steady_clock::now();
    for (const auto& master : config.saes) {
      if (auto v = admission->sae_level(master, now)) {
        budgets.sae.emplace_back(master, *v);
      }
      auto pair = [&](const std::string& slave) {
        if (auto v = admission->pair_level(master, slave, now)) {
          budgets.pair.push_back({{master, slave}, *v});
        }
      };
      std::for_each(config.link.peer_saes.begin(), config.link.peer_saes.end(), pair);
      for (const auto& slave : config.saes) {
        if (slave != master) {
          pair(slave);
        }
      }
    }
    return metrics->render(st, link->stats(), budgets);
  }

  // SIGINT and SIGTERM ask for the graceful stop; SIGHUP (no reload: the configuration is
  // read at start) is logged and waited past.
  void wait_for_signal() {
    signals->async_wait([this](const boost::system::error_code& ec, int sig) {
      if (ec) {
        return;
      }
      if (sig == SIGHUP) {
        spdlog::warn("SIGHUP: qkd-kms does not reload its configuration; restart it to apply a "
                     "change (SIGTERM stops it gracefully)");
        wait_for_signal();
        return;
      }
      spdlog::info("signal {}: shutting down", sig);
      std::lock_guard lock(mu);
      stop_requested = true;
      cv.notify_all();
    });
  }

  std::mutex mu;
  std::condition_variable cv;
  bool stop_requested = false;
  bool stopped = false;
  // start() was called: only such a KME reports "stopped". One that failed while being made
  // (Kme::create) says nothing as it goes, so the caller's reason is the first line logged.
  bool started = false;

  std::mutex waits_mu;
  std::vector<std::weak_ptr<DecWait>> waits;  // abandoned at stop if still waiting
};

// One dec_keys waiting for its keys' notice, on a strand of the API's I/O: registered with
// the store (KeyStore::when_known) and a timer for keys.dec_wait_ms. When a key it names
// arrives it tries again (registering again while keys are missing); when the time is up
// it answers from what is here. No thread is held meanwhile, so waiting requests take
// nothing from the others' (before, each held one of 64 worker threads for up to
// keys.dec_wait_ms, and one SAE could hold them all). While it waits it holds one of its
// SAE's admission.sae_waiting_dec_keys places and counts in qkd_kms_dec_keys_waiting.
class Kme::Impl::DecWait : public std::enable_shared_from_this<DecWait> {
 public:
  DecWait(Impl& im, std::string caller, ApiRequest req, RequestInfo info,
          std::chrono::steady_clock::time_point t0, HttpReply::Send send)
      : im_(im),
        strand_(asio::make_strand(im.api_ioc)),
        timer_(strand_),
        caller_(std::move(caller)),
        req_(std::move(req)),
        info_(std::move(info)),
        t0_(t0),
        send_(std::move(send)) {
    im_.metrics->add_dec_keys_waiting(1);
  }
  DecWait(const DecWait&) = delete;
  DecWait& operator=(const DecWait&) = delete;
  ~DecWait() { abandon(); }

  void start(std::vector<std::string> key_ids) {
    asio::dispatch(strand_, [self = shared_from_this(), ids = std::move(key_ids)]() {
      self->timer_.expires_at(self->t0_ +
                              std::chrono::milliseconds(self->im_.config.keys.dec_wait_ms));
      self->timer_.async_wait([self](const boost::system::error_code& ec) {
        if (!ec) {
          self->attempt(true);
        }
      });
      self->arm(ids);
    });
  }

  // Lets go of the store, the admission place and the gauge, answering nothing: at stop,
  // once no thread runs the I/O (no reply could be written any more), and when answered.
  void abandon() {
    if (done_) {
      return;
    }
    done_ = true;
    registration_.reset();
    im_.admission->leave_wait(caller_);
    im_.metrics->add_dec_keys_waiting(-1);
  }

 private:
  void arm(const std::vector<std::string>& key_ids) {
    registration_ = im_.store->when_known(key_ids, [weak = weak_from_this(), ex = strand_]() {
      asio::post(ex, [weak]() {
        if (auto self = weak.lock()) {
          self->attempt(false);
        }
      });
    });
  }

  // On the strand. `wait_over`: the timer's call, the last.
  void attempt(bool wait_over) {
    if (done_) {
      return;
    }
    ApiRequest r = req_;
    r.may_wait = false;
    r.may_defer = true;
    r.wait_over = wait_over;
    HttpReply out;
    try {
      HttpReply reply{im_.etsi->handle(caller_, r)};
      if (reply.api.needs_wait) {  // a key came, not all of them: wait on for the others
        arm(reply.api.wait_for);
        return;
      }
      abandon();
      timer_.cancel();
      out = im_.finish(std::move(reply), nullptr, caller_, info_, true, t0_);
    } catch (const std::exception& e) {  // out of memory, say: an answer all the same
      abandon();
      timer_.cancel();
      out = HttpReply{error_response(503, fmt::format("internal error: {}", e.what()))};
    }
    if (out.deferred) {
      auto deferred = std::move(out.deferred);
      deferred(send_);
    } else {
      send_(std::move(out));
    }
  }

  Impl& im_;
  asio::strand<asio::io_context::executor_type> strand_;
  asio::steady_timer timer_;
  std::string caller_;
  ApiRequest req_;
  RequestInfo info_;
  std::chrono::steady_clock::time_point t0_;
  HttpReply::Send send_;
  std::shared_ptr<void> registration_;  // KeyStore::when_known
  bool done_ = false;
};

Kme::Kme() : impl_(std::make_unique<Impl>()) {}

Kme::~Kme() { stop(); }

qkd::core::Status convert_store(const Config& c) {
  if (!c.store.enabled) {
    return qkd::core::Error{qkd::core::ErrorCode::kInvalidArgument,
                            "store: the configuration has no store to convert"};
  }
  auto node_key = read_node_key_file(c.store.node_key_file.string());
  if (!node_key.ok()) {
    return qkd::core::Error{node_key.error().code,
                            "store.node_key_file: " + node_key.error().message};
  }
  const Direction own = c.link.role == LinkRole::kAlice ? Direction::kAlice : Direction::kBob;
  auto store = make_sqlite_key_store(own, c.store.path.string(), node_key->span(),
                                     c.store.synchronous_full, OlderFormat::kConvert);
  if (!store.ok()) {
    return qkd::core::Error{store.error().code, "store.path: " + store.error().message};
  }
  return qkd::core::ok_status();
}

qkd::core::Result<std::unique_ptr<Kme>> Kme::create(Config config) {
  std::unique_ptr<Kme> kme(new Kme());
  Impl& im = *kme->impl_;
  im.config = std::move(config);
  const Config& c = im.config;
  const Direction own = c.link.role == LinkRole::kAlice ? Direction::kAlice : Direction::kBob;
  if (c.store.enabled) {
    auto node_key = read_node_key_file(c.store.node_key_file.string());
    if (!node_key.ok()) {
      return qkd::core::Error{node_key.error().code,
                              "store.node_key_file: " + node_key.error().message};
    }
    auto store = make_sqlite_key_store(own, c.store.path.string(), node_key->span(),
                                       c.store.synchronous_full);
    if (!store.ok()) {
      return qkd::core::Error{store.error().code, "store.path: " + store.error().message};
    }
    im.store = std::move(store.value());
    im.store->set_prepared_keys(c.store.prepared_keys);
  } else {
    im.store = make_memory_key_store(own);
  }
  auto api_tls = make_tls_context(c.api, TlsRole::kApiServer);
  if (!api_tls.ok()) {
    return api_tls.error();
  }
  auto link_tls = make_tls_context(
      c.api, c.link.role == LinkRole::kAlice ? TlsRole::kServer : TlsRole::kClient);
  if (!link_tls.ok()) {
    return link_tls.error();
  }
  im.link = std::make_unique<LinkService>(c, *im.store, im.link_ioc, link_tls.value());
  LinkService* link = im.link.get();
  im.etsi = std::make_unique<EtsiService>(c, *im.store, [link]() { return link->stats(); });
  im.admission = std::make_unique<AdmissionControl>(c.admission);
  // Keys of our masters fetched at the peer give their pair budget back. The pair is
  // charged only for SAEs of this KME (masters) and of the peer (slaves): others are ignored.
  im.link->set_fetch_listener([&im](const std::string& master, const std::string& slave,
                                    std::uint64_t n, std::uint64_t bits) {
    if (contains(im.config.saes, master) && contains(im.config.link.peer_saes, slave)) {
      im.admission->fetched(master, slave, im.fetched_keys(n, bits),
                            std::chrono::steady_clock::now());
    }
  });
  im.metrics = std::make_unique<Metrics>(c.kme_id, c.link.peer_kme_id, c.keys.key_size);
  Impl* impl = &im;
  im.server = std::make_unique<HttpsServer>(
      im.api_ioc, api_tls.value(),
      [impl](const std::string& caller, const ApiRequest& req) { return impl->handle(caller, req); });
  if (c.metrics.plain_listener) {
    im.metrics_server = std::make_unique<MetricsHttpServer>(
        im.api_ioc, [impl]() { return impl->render_metrics(); },
        [impl]() { return impl->etsi->health(); });
  }
  return kme;
}

HttpReply Kme::Impl::handle(const std::string& caller, const ApiRequest& req) {
  const auto t0 = std::chrono::steady_clock::now();
  const RequestInfo info = classify_request(req);
  HttpReply reply;
  std::function<void()> refund;  // gives admission tokens back if a deferred write fails
  const bool known_caller = contains(config.saes, caller);
  if (info.route == "metrics" && req.method == "GET") {
    if (!known_caller) {
      reply.api = error_response(401, "");
    } else {
      reply.api = ApiResponse{200, render_metrics()};
      reply.content_type = std::string(Metrics::kContentType);
    }
  } else if (info.route == "enc_keys" && known_caller && admission->enabled()) {
    // The ETSI handler charges the budgets once it has found the request valid (an invalid
    // one gets its 400 whatever the budgets) and before it takes keys (nothing is taken
    // from the pool when they refuse); the tokens come back if no key was delivered.
    ApiRequest admitted = req;
    std::optional<std::pair<std::vector<std::string>, double>> charged;  // slaves, keys
    admitted.admit = [&](const std::vector<std::string>& slaves, std::uint32_t number,
                         std::uint32_t size_bits) -> std::optional<ApiResponse> {
      const double keys = static_cast<double>(number) * budget_keys(size_bits);
      if (auto refusal = admission->admit(caller, slaves, keys, t0)) {
        metrics->add_admission_refusal(refusal->budget, caller);
        spdlog::debug("api: {}: {}", caller, refusal->message);
        ApiResponse refused = error_response(503, refusal->message);
        refused.retry_after_s = refusal->retry_after_s;
        return refused;
      }
      charged.emplace(slaves, keys);
      return std::nullopt;
    };
    reply.api = etsi->handle(caller, admitted);
    if (charged) {
      refund = [this, caller, slaves = charged->first, keys = charged->second]() {
        admission->refund(caller, slaves, keys, std::chrono::steady_clock::now());
      };
      if (reply.api.status != 200) {
        refund();
        refund = nullptr;
      }
    }
  } else {
    reply.api = etsi->handle(caller, req);
    if (reply.api.needs_wait) {  // dec_keys of a key whose notice is still in flight
      return wait_for_notice(caller, req, info, t0, std::move(reply.api.wait_for));
    }
  }
  return finish(std::move(reply), std::move(refund), caller, info, known_caller, t0);
}

HttpReply Kme::Impl::wait_for_notice(const std::string& caller, const ApiRequest& req,
                                     const RequestInfo& info,
                                     std::chrono::steady_clock::time_point t0,
                                     std::vector<std::string> key_ids) {
  // Only an SAE of this KME gets this far (the others are 401 before any wait).
  if (auto refusal = admission->enter_wait(caller)) {
    metrics->add_admission_refusal(refusal->budget, caller);
    spdlog::debug("api: {}: {}", caller, refusal->message);
    HttpReply refused{error_response(503, refusal->message)};
    refused.api.retry_after_s = refusal->retry_after_s;
    return finish(std::move(refused), nullptr, caller, info, true, t0);
  }
  HttpReply reply;
  reply.deferred = [this, caller, req, info, t0,
                    key_ids = std::move(key_ids)](const HttpReply::Send& send) mutable {
    auto wait = std::make_shared<DecWait>(*this, caller, std::move(req), info, t0, send);
    {
      std::lock_guard lock(waits_mu);
      std::erase_if(waits, [](const std::weak_ptr<DecWait>& w) { return w.expired(); });
      waits.push_back(wait);
    }
    wait->start(std::move(key_ids));
  };
  return reply;
}

HttpReply Kme::Impl::finish(HttpReply reply, std::function<void()> refund,
                            const std::string& caller, const RequestInfo& info,
                            bool known_caller, std::chrono::steady_clock::time_point t0) {
  if (reply.api.pending.ticket == 0) {
    record(caller, info, known_caller, reply, t0);
    return reply;
  }
  // The keys (or an allocation's discards) are not durable yet: the reply leaves when they
  // are, or becomes a 503 if the write failed. Held once, cleansed however it ends.
  KeyStore::PendingWrite pending = std::move(reply.api.pending);
  reply.api.pending = {};
  std::shared_ptr<HttpReply> held = hold_reply(std::move(reply));
  HttpReply deferred;
  deferred.deferred = [this, pending = std::move(pending), held, refund, caller, info,
                       known_caller, t0](const HttpReply::Send& send) mutable {
    store->when_written(std::move(pending), [this, held, refund, send, caller, info,
                                             known_caller, t0](const Status& written) {
      if (!written.ok()) {
        OPENSSL_cleanse(held->api.body.data(), held->api.body.size());
        *held = HttpReply{error_response(written.error())};
        if (refund) {
          refund();  // no key was delivered
        }
      }
      record(caller, info, known_caller, *held, t0);
      send(std::move(*held));
    });
  };
  return deferred;
}

void Kme::Impl::record(const std::string& caller, const RequestInfo& info, bool known_caller,
                       const HttpReply& reply, std::chrono::steady_clock::time_point t0) {
  if (reply.api.status == 200 && (info.route == "enc_keys" || info.route == "dec_keys")) {
    const std::uint64_t n = count_keys(reply.api.body);
    if (info.route == "enc_keys") {
      metrics->add_keys_delivered(info.route, caller, info.path_sae, n);
    } else {
      metrics->add_keys_delivered(info.route, info.path_sae, caller, n);
      // The master's pair budget counts keys not fetched yet (admission.hpp), by size.
      const std::uint64_t bits = delivered_bits(reply.api.body);
      if (contains(config.link.peer_saes, info.path_sae)) {
        link->report_fetched(info.path_sae, caller, n, bits);
      } else if (contains(config.saes, info.path_sae)) {
        admission->fetched(info.path_sae, caller, fetched_keys(n, bits),
                           std::chrono::steady_clock::now());
      }
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  metrics->observe_request(known_caller ? info.route : std::string_view("unauthorised"),
                           reply.api.status, seconds);
}

qkd::core::Result<BoundPorts> Kme::start() {
  Impl& im = *impl_;
  {
    std::lock_guard lock(im.mu);
    im.started = true;
  }
  BoundPorts ports;
  auto api = im.server->listen(im.config.api.listen);
  if (!api.ok()) {
    return api.error();
  }
  ports.api_port = api.value();
  auto link = im.link->start();
  if (!link.ok()) {
    return link.error();
  }
  ports.link_port = link.value();
  if (im.metrics_server) {
    auto mport = im.metrics_server->listen(im.config.metrics.listen);
    if (!mport.ok()) {
      return mport.error();
    }
    ports.metrics_port = mport.value();
  }
  // SIGHUP, which by default would end the process at once (no drain, the store left
  // open, prepared keys stranded at the peer), is caught and only logged: the configuration
  // is read at start only.
  im.signals = std::make_unique<asio::signal_set>(im.api_ioc, SIGINT, SIGTERM, SIGHUP);
  im.wait_for_signal();
  for (int i = 0; i < kApiThreads; ++i) {
    im.threads.emplace_back([&im]() {
      name_this_thread("kms-api");
      run_io(im.api_ioc, "api");
    });
  }
  im.threads.emplace_back([&im]() {
    name_this_thread("kms-link-io");
    run_io(im.link_ioc, "link");
  });
  const Config& c = im.config;
  spdlog::info(
      "{}: ETSI 014 API on {}, link role {} {}, metrics {}, keys {}", c.kme_id,
      HostPort{c.api.listen.host, ports.api_port}.to_string(),
      c.link.role == LinkRole::kAlice ? "alice" : "bob",
      c.link.role == LinkRole::kAlice
          ? fmt::format("listening on port {}", ports.link_port)
          : fmt::format("connecting to {}", c.link.connect.to_string()),
      c.metrics.plain_listener
          ? fmt::format("also on {} (plain HTTP)",
                        HostPort{c.metrics.listen.host, ports.metrics_port}.to_string())
          : std::string("on the API only"),
      c.store.enabled ? fmt::format("stored in {} (synchronous {})", c.store.path.string(),
                                    c.store.synchronous_full ? "full" : "normal")
                      : std::string("in memory only (lost at stop)"));
  return ports;
}

void Kme::wait() {
  std::unique_lock lock(impl_->mu);
  impl_->cv.wait(lock, [&] { return impl_->stop_requested; });
}

void Kme::stop() {
  Impl& im = *impl_;
  bool started = false;
  {
    std::lock_guard lock(im.mu);
    if (im.stopped) {
      return;
    }
    started = im.started;
    im.stopped = true;
    im.stop_requested = true;
    im.cv.notify_all();
  }
  if (im.server) {
    im.server->stop();
  }
  if (im.metrics_server) {
    im.metrics_server->stop();
  }
  // Let requests in progress (their header came before the stop; the body may still be on
  // its way) be read, handled (a dec_keys waits at most keys.dec_wait_ms) and answered,
  // then stop the link and the I/O. The link runs until then: a dec_keys
  // waiting for its key's notice still gets it.
  const auto drain_deadline = std::chrono::steady_clock::now() + kDrainTimeout +
                              std::chrono::milliseconds(im.config.keys.dec_wait_ms);
  while (im.server && im.server->in_flight() > 0 &&
         std::chrono::steady_clock::now() < drain_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (im.server && im.server->in_flight() > 0) {
    spdlog::warn("{}: {} responses not written at shutdown", im.config.kme_id,
                 im.server->in_flight());
  }
  if (im.link) {
    im.link->stop();
  }
  // Keys prepared for enc_keys and not handed out: the peer drops its copies when the
  // notice arrives (at the next session, the link being stopped) instead of keeping them.
  if (im.store) {
    im.store->withdraw_prepared();
  }
  im.api_guard.reset();
  im.link_guard.reset();
  if (im.signals) {
    asio::post(im.api_ioc, [&im]() {
      boost::system::error_code ec;
      im.signals->cancel(ec);
    });
  }

  im.api_ioc.stop();
  im.link_ioc.stop();
  for (auto& t : im.threads) {
    if (t.joinable()) {
      t.join();
    }
  }
  // No handler runs any more. dec_keys still waiting for a notice (only if the drain above
  // timed out) let go of what they hold while the store, admission and metrics are here.
  {
    std::lock_guard lock(im.waits_mu);
    for (const auto& w : im.waits) {
      if (auto wait = w.lock()) {
        wait->abandon();
      }
    }
    im.waits.clear();
  }
  // Replies still deferred (only if the drain above timed out)
  // complete now, while the link, the metrics and the sessions they use are still there
  // (their writes are dropped with the stopped I/O context).
  if (im.store) {
    im.store->drain();
  }
  if (started) {
    spdlog::info("{}: stopped", im.config.kme_id);
  }
}

}  // namespace qkd::kms
