#include "qkd/kms/kme.hpp"

#include <spdlog/spdlog.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/thread_pool.hpp>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <thread>

#include "qkd/kms/api.hpp"
#include "qkd/kms/https_server.hpp"
#include "qkd/kms/key_store.hpp"
#include "qkd/kms/link_service.hpp"
#include "qkd/kms/tls.hpp"

namespace qkd::kms {

namespace asio = boost::asio;

namespace {
constexpr int kApiThreads = 2;
constexpr int kWorkerThreads = 8;  // handlers; dec_keys may block up to keys.dec_wait_ms

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
  std::unique_ptr<HttpsServer> server;
  std::unique_ptr<asio::signal_set> signals;
  std::vector<std::thread> threads;

  std::mutex mu;
  std::condition_variable cv;
  bool stop_requested = false;
  bool stopped = false;
};

Kme::Kme() : impl_(std::make_unique<Impl>()) {}

Kme::~Kme() { stop(); }

qkd::core::Result<std::unique_ptr<Kme>> Kme::create(Config config) {
  std::unique_ptr<Kme> kme(new Kme());
  Impl& im = *kme->impl_;
  im.config = std::move(config);
  const Config& c = im.config;
  const Direction own = c.link.role == LinkRole::kAlice ? Direction::kAlice : Direction::kBob;
  if (c.store.enabled) {
    auto node_key = read_node_key_file(c.store.node_key_file.string());
    if (!node_key.ok()) {
      return node_key.error();
    }
    auto store = make_sqlite_key_store(own, c.store.path.string(), node_key->span());
    if (!store.ok()) {
      return store.error();
    }
    im.store = std::move(store.value());
  } else {
    im.store = make_memory_key_store(own);
  }
  auto api_tls = make_tls_context(c.api, TlsRole::kServer);
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
  EtsiService* etsi = im.etsi.get();
  im.server =
      std::make_unique<HttpsServer>(im.api_ioc, api_tls.value(), im.workers,
                                    [etsi](const std::string& caller, const ApiRequest& req) {
                                      return etsi->handle(caller, req);
                                    });
  return kme;
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
    im.threads.emplace_back([&im]() { run_io(im.api_ioc, "api"); });
  }
  im.threads.emplace_back([&im]() { run_io(im.link_ioc, "link"); });
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
  if (im.link) {
    im.link->stop();
  }
  // Let handlers in progress finish (bounded by keys.dec_wait_ms), then stop the I/O.
  im.workers.join();
  im.api_guard.reset();
  im.link_guard.reset();
  if (im.signals) {
    asio::post(im.api_ioc, [&im]() {
      boost::system::error_code ec;
      im.signals->cancel(ec);
    });
  }
  // Give sessions a moment to write their last responses, then stop.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  im.api_ioc.stop();
  im.link_ioc.stop();
  for (auto& t : im.threads) {
    if (t.joinable()) {
      t.join();
    }
  }
  spdlog::info("{}: stopped", im.config.kme_id);
}

}  // namespace qkd::kms
