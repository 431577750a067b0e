#include "qkd/kms/kme.hpp"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/thread_pool.hpp>
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
constexpr int kApiThreads = 2;
constexpr int kWorkerThreads = 64;  // dec_keys handlers waiting for a notice (up to
                                    // keys.dec_wait_ms each); no handler waits for the disk

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
  Config config;
  std::unique_ptr<KeyStore> store;
  asio::io_context api_ioc;
  asio::io_context link_ioc;
  asio::executor_work_guard<asio::io_context::executor_type> api_guard{api_ioc.get_executor()};
  asio::executor_work_guard<asio::io_context::executor_type> link_guard{link_ioc.get_executor()};
  asio::thread_pool workers{kWorkerThreads};
  std::unique_ptr<LinkService> link;
  std::unique_ptr<EtsiService> etsi;
  std::unique_ptr<AdmissionControl> admission;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<HttpsServer> server;
  std::unique_ptr<MetricsHttpServer> metrics_server;
  std::unique_ptr<asio::signal_set> signals;
  std::vector<std::thread> threads;

  // The API entry point: admission control and metrics around the ETSI service;
  // std::nullopt when the request may not wait and has to (HttpsServer::Handler). A reply
  // whose keys are not durable yet comes back deferred until they are.
  std::optional<HttpReply> handle(const std::string& caller, const ApiRequest& req);
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

  std::mutex mu;
  std::condition_variable cv;
  bool stop_requested = false;
  bool stopped = false;
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
  im.server =
      std::make_unique<HttpsServer>(im.api_ioc, api_tls.value(), im.workers,
                                    [impl](const std::string& caller, const ApiRequest& req) {
                                      return impl->handle(caller, req);
                                    });
  if (c.metrics.plain_listener) {
    im.metrics_server = std::make_unique<MetricsHttpServer>(
        im.api_ioc, [impl]() { return impl->render_metrics(); },
        [impl]() { return impl->etsi->health(); });
  }
  return kme;
}

std::optional<HttpReply> Kme::Impl::handle(const std::string& caller, const ApiRequest& req) {
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
    if (reply.api.needs_wait) {
      return std::nullopt;
    }
  } else if (info.route == "dec_keys" && known_caller && req.may_wait) {
    // Run again on a worker, to wait for a notice in flight: one of the caller's places.
    if (auto refusal = admission->enter_wait(caller)) {
      metrics->add_admission_refusal(refusal->budget, caller);
      spdlog::debug("api: {}: {}", caller, refusal->message);
      reply.api = error_response(503, refusal->message);
      reply.api.retry_after_s = refusal->retry_after_s;
    } else {
      struct Leave {  // the place comes back however the handler ends
        AdmissionControl& a;
        const std::string& sae;
        ~Leave() { a.leave_wait(sae); }
      } leave{*admission, caller};
      reply.api = etsi->handle(caller, req);
    }
  } else {
    reply.api = etsi->handle(caller, req);
    if (reply.api.needs_wait) {
      return std::nullopt;  // dec_keys of a key whose notice is still in flight
    }
  }
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
  im.signals = std::make_unique<asio::signal_set>(im.api_ioc, SIGINT, SIGTERM);
  im.signals->async_wait([this](const boost::system::error_code& ec, int sig) {
    if (ec) {
      return;
    }
    spdlog::info("signal {}: shutting down", sig);
    std::lock_guard lock(impl_->mu);
    impl_->stop_requested = true;
    impl_->cv.notify_all();
  });
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
  spdlog::info("{}: ETSI 014 API on {}:{}, link role {} {}", im.config.kme_id,
               im.config.api.listen.host, ports.api_port,
               im.config.link.role == LinkRole::kAlice ? "alice" : "bob",
               im.config.link.role == LinkRole::kAlice
                   ? fmt::format("listening on port {}", ports.link_port)
                   : fmt::format("connecting to {}", im.config.link.connect.to_string()));
  return ports;
}

void Kme::wait() {
  std::unique_lock lock(impl_->mu);
  impl_->cv.wait(lock, [&] { return impl_->stop_requested; });
}

void Kme::stop() {
  Impl& im = *impl_;
  {
    std::lock_guard lock(im.mu);
    if (im.stopped) {
      return;
    }
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
  // then stop the link, the workers and the I/O. The link runs until then: a dec_keys
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
  im.workers.join();
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
  // No handler runs any more. Replies still deferred (only if the drain above timed out)
  // complete now, while the link, the metrics and the sessions they use are still there
  // (their writes are dropped with the stopped I/O context).
  if (im.store) {
    im.store->drain();
  }
  spdlog::info("{}: stopped", im.config.kme_id);
}

}  // namespace qkd::kms
