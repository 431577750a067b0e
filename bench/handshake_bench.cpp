// handshake_bench: full TLS 1.3 handshakes in one process over a BIO pair, the same server
// certificate (ECDSA P-256, examples/pki.sh) for every group, against two real qkd-kms
// daemons on loopback (tests/support's KmeNetwork). Prints Markdown tables:
//   1. serial: per group, handshakes per second (1 / mean time), p50 and p99 latency, rate
//      and p99 relative to X25519; the qkd groups three times: as configured by default
//      (server prefetch, keys announced ahead to the client), with no keys announced
//      (announce_keys = 0: the client makes one dec_keys call per handshake) and with the
//      prefetch off too (prefetch_keys = 1: one enc_keys call per handshake as well);
//   2. per side, from the same handshakes: the time inside each side's own OpenSSL calls
//      (SSL_new, SSL_do_handshake), i.e. what a handshake costs a server process and a
//      client process running apart;
//   3. concurrent: `threads` threads each running whole handshakes (client and server
//      side) for the same group at once, as a busy server does: aggregate handshakes/s;
//   4. the KME round trips alone (ETSI client, keep-alive): enc_keys for 1 and for 32 keys
//      (the server's cost in encapsulate, without and with prefetch) and dec_keys (the
//      client's cost in decapsulate); then dec_keys of keys from the 32-key batches, one at
//      a time as a client fetches prefetched keys: right after another request, after
//      0.7 ms of busy work, and right after an X25519 handshake in this thread (what the
//      client has just done when it decapsulates); beside them, in the same three
//      conditions, the floor under any KME round trip on this machine: 64 bytes echoed by
//      another process over loopback TCP, no TLS, no HTTP, no KME;
//   5. a hybrid server's crypto outside libssl (import, ephemeral key, ECDH, HKDF) with the
//      EVP methods looked up by name in every call, as before, and made once per provider
//      context (qkd::prov::CryptoMethods), alternating in blocks;
//   6. one P-256 ECDH (a derive with a peer key) as libssl 3.0 runs it for its own P-256
//      group (EVP_PKEY_derive_set_peer: OpenSSL's full public-key check, a second scalar
//      multiplication) and as the provider runs it for p256_qkd (the partial check, enough
//      on a cofactor-1 curve: provider/src/classical.cpp), alternating in blocks.
//
//   handshake_bench [handshakes_per_group=300] [warmup_per_group=20] [threads=4] [groups]
//                   [variants=yes]
//
// `groups` (optional, comma-separated, e.g. "qkd,p256_qkd") limits the run to X25519 (the
// baseline, always run) and the groups listed, for profiling one of them; `variants` = no
// leaves out the "no keys announced" and "prefetch off" rows (profiling the default path).
//
// Groups run in rounds (one handshake of each per round, in a new random order each round;
// in the concurrent table one batch of each in turn, three rounds), so that drift in
// machine load, and work that recurs every n qkd handshakes, spread over all of them.
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/ssl.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "binding.hpp"
#include "classical.hpp"
#include "harness.hpp"
#include "qkd/etsi/client.hpp"
#include "qkd/test/kme_network.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using qkd::test_prov::Handshake;

struct Stats {
  double rate = 0;  // per second
  double p50_ms = 0, p99_ms = 0, mean_ms = 0;
};

Stats stats_of(std::vector<double> ms) {
  Stats s;
  if (ms.empty()) {
    return s;
  }
  std::sort(ms.begin(), ms.end());
  double sum = 0;
  for (double v : ms) {
    sum += v;
  }
  s.mean_ms = sum / static_cast<double>(ms.size());
  s.rate = 1000.0 / s.mean_ms;
  const auto at = [&](double q) {
    const auto i = static_cast<std::size_t>(q * static_cast<double>(ms.size() - 1) + 0.5);
    return ms[std::min(i, ms.size() - 1)];
  };
  s.p50_ms = at(0.50);
  s.p99_ms = at(0.99);
  return s;
}

int fail(const std::string& what) {
  std::fprintf(stderr, "handshake_bench: %s\n%s", what.c_str(),
               qkd::test_prov::drain_errors().c_str());
  return 1;
}

// One row of the tables: a TLS group with a client and a server context.
struct Row {
  std::string label;  // as printed
  std::string group;  // TLS group name
  qkd::test_prov::SslCtxPtr client, server;
};

// One handshake; false (after printing why) when it fails or negotiates another group.
struct Times {
  double total = 0, server = 0, client = 0;  // ms
  // Where the wall time of the handshake went, for the tail table: this thread on a CPU, and
  // waiting on a run queue (preempted or woken but not yet running); the rest it slept
  // (blocked on a lock, a socket or a condition). Context switches: voluntary (it blocked)
  // and involuntary (it was preempted).
  double cpu = 0, queued = 0;  // ms
  long voluntary = 0, involuntary = 0;
};

// This thread's CPU time and run-queue wait so far (ns; the wait is schedstat's second field) and
// its context switches.
struct ThreadClock {
  std::uint64_t cpu_ns = 0, queued_ns = 0;
  long voluntary = 0, involuntary = 0;
  bool schedstat = false;  // false: the kernel keeps no run-queue times (no sched_info)
  // The CPU clock is read last before a handshake and first after it (`before`), so that
  // the /proc read and getrusage stay outside the CPU window as they are outside the wall
  // clock's.
  static ThreadClock now(bool before) {
    ThreadClock c;
    if (!before) {
      c.cpu_ns = cpu_now();
    }
    if (std::FILE* f = std::fopen("/proc/thread-self/schedstat", "r")) {
      unsigned long long run = 0, wait = 0;
      if (std::fscanf(f, "%llu %llu", &run, &wait) == 2 && run != 0) {
        c.queued_ns = wait;
        c.schedstat = true;
      }
      std::fclose(f);
    }
    rusage u{};
    if (::getrusage(RUSAGE_THREAD, &u) == 0) {
      c.voluntary = u.ru_nvcsw;
      c.involuntary = u.ru_nivcsw;
    }
    if (before) {
      c.cpu_ns = cpu_now();
    }
    return c;
  }
  static std::uint64_t cpu_now() {  // schedstat's own run time lags; this one is exact
    timespec ts{};
    if (::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) {
      return 0;
    }
    return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000ULL +
           static_cast<std::uint64_t>(ts.tv_nsec);
  }
};

// True until a reading finds no run-queue times; the tail table then prints n/a for them.
bool g_schedstat = true;

// `detailed`: also where the time went (Times::cpu...), for the serial table only: the
// readings cost about 20 us a handshake.
bool run_one(const Row& row, Times* times, bool detailed = false) {
  const ThreadClock c0 = detailed ? ThreadClock::now(true) : ThreadClock{};
  const auto t0 = Clock::now();
  Handshake h = qkd::test_prov::handshake(row.client.get(), row.server.get());
  const auto t1 = Clock::now();
  const ThreadClock c1 = detailed ? ThreadClock::now(false) : ThreadClock{};
  if (!h.ok) {
    std::fprintf(stderr, "%s: client: %s server: %s\n", row.label.c_str(),
                 h.client_errors.c_str(), h.server_errors.c_str());
    return false;
  }
  const char* name = SSL_group_to_name(
      h.client.get(), static_cast<int>(SSL_get_negotiated_group(h.client.get())));
  const std::string expected = row.group == "P-256" ? "secp256r1" : row.group;  // libssl's name
  if (name == nullptr || strcasecmp(expected.c_str(), name) != 0) {
    std::fprintf(stderr, "%s: negotiated %s\n", row.label.c_str(), name != nullptr ? name : "?");
    return false;
  }
  times->total = std::chrono::duration<double, std::milli>(t1 - t0).count();
  times->server = h.server_ms;
  times->client = h.client_ms;
  if (!detailed) {
    return true;
  }
  g_schedstat = g_schedstat && c0.schedstat && c1.schedstat;
  times->cpu = static_cast<double>(c1.cpu_ns - c0.cpu_ns) / 1e6;
  times->queued = static_cast<double>(c1.queued_ns - c0.queued_ns) / 1e6;
  times->voluntary = c1.voluntary - c0.voluntary;
  times->involuntary = c1.involuntary - c0.involuntary;
  return true;
}

// Table 5: a hybrid server's crypto outside libssl in one encapsulate (import the client's
// classical public key, an ephemeral key pair, its public key, ECDH, HKDF), in the default
// library context. "by name" is the code before the methods were made once per provider
// context (reproduced here: EVP_PKEY_Q_keygen, EVP_PKEY_fromdata with the curve name, an
// HKDF fetch per call); "cached" is the provider's path now (qkd::prov::CryptoMethods).
using qkd::prov::Classical;

bool by_name_import(Classical kind, std::span<const std::uint8_t> pub, qkd::prov::PkeyPtr* out) {
  EVP_PKEY* raw = nullptr;
  if (kind == Classical::kX25519) {
    raw = EVP_PKEY_new_raw_public_key_ex(nullptr, "X25519", nullptr, pub.data(), pub.size());
  } else {
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr);
    char group[] = "P-256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group - 1),
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, const_cast<std::uint8_t*>(pub.data()),
                                pub.size()),
        OSSL_PARAM_END};
    if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
      raw = nullptr;
    }
    EVP_PKEY_CTX_free(ctx);
  }
  out->reset(raw);
  return raw != nullptr;
}

bool by_name_hkdf(std::span<std::uint8_t> out, std::span<const std::uint8_t> key) {
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, OSSL_KDF_NAME_HKDF, nullptr);
  EVP_KDF_CTX* ctx = kdf != nullptr ? EVP_KDF_CTX_new(kdf) : nullptr;
  char digest[] = "SHA256";
  std::uint8_t info[64] = {};
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::uint8_t*>(key.data()),
                                        key.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT,
                                        const_cast<char*>(qkd::prov::kBindingSalt.data()),
                                        qkd::prov::kBindingSalt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info, 48),
      OSSL_PARAM_construct_end()};
  const bool ok = ctx != nullptr && EVP_KDF_derive(ctx, out.data(), out.size(), params) == 1;
  EVP_KDF_CTX_free(ctx);
  EVP_KDF_free(kdf);
  return ok;
}

// One server-side pass; `cached` null = by name. False when a step fails.
bool server_crypto(qkd::prov::CryptoMethods* cached, Classical kind,
                   std::span<const std::uint8_t> client_pub) {
  qkd::prov::PkeyPtr peer;
  if (cached != nullptr) {
    auto p = qkd::prov::classical_import_peer(*cached, kind, client_pub);
    if (!p.ok()) {
      return false;
    }
    peer = std::move(p).value();
  } else if (!by_name_import(kind, client_pub, &peer)) {
    return false;
  }
  qkd::prov::PkeyPtr eph;
  if (cached != nullptr) {
    auto e = qkd::prov::classical_generate(*cached, kind);
    if (!e.ok()) {
      return false;
    }
    eph = std::move(e).value();
  } else {
    eph.reset(kind == Classical::kX25519 ? EVP_PKEY_Q_keygen(nullptr, nullptr, "X25519")
                                         : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
    if (!eph) {
      return false;
    }
  }
  std::array<std::uint8_t, 32> secret{};
  std::array<std::uint8_t, 32> key{};
  key.fill(0x5a);
  if (!qkd::prov::classical_public(eph.get(), kind).ok() ||
      !qkd::prov::classical_derive(nullptr, kind, eph.get(), peer.get(), secret).ok()) {
    return false;
  }
  if (cached != nullptr) {
    const qkd::prov::Nonce nonce{};
    const qkd::prov::KeyId key_id{};
    const qkd::prov::Binding b{"p256_qkd", "alice", &nonce, "bob", &key_id};
    return qkd::prov::derive_bound_key(*cached, secret, key, b).ok();
  }
  return by_name_hkdf(secret, key);
}

}  // namespace

// The floor under any round trip to a local KME: a 64-byte message echoed by another
// process over loopback TCP (TCP_NODELAY), without TLS, HTTP or a key store. Waking the
// other process (and being woken by its answer) is most of it.
class LoopbackEcho {
 public:
  LoopbackEcho() {
    const int ls = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (ls < 0 || ::bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::listen(ls, 1) != 0 || ::getsockname(ls, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (ls >= 0) {
        ::close(ls);
      }
      return;
    }
    child_ = ::fork();
    if (child_ == 0) {  // only async-signal-safe calls here: the parent has threads
      const int c = ::accept(ls, nullptr, nullptr);
      const int one = 1;
      ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      char buf[kBytes];
      ssize_t n = 0;
      while ((n = ::read(c, buf, sizeof buf)) > 0) {
        if (::write(c, buf, static_cast<std::size_t>(n)) != n) {
          break;
        }
      }
      ::_exit(0);
    }
    ::close(ls);
    if (child_ < 0) {
      return;
    }
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    const int one = 1;
    if (fd_ < 0 || ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
      stop();
    }
  }
  LoopbackEcho(const LoopbackEcho&) = delete;
  LoopbackEcho& operator=(const LoopbackEcho&) = delete;
  ~LoopbackEcho() { stop(); }

  [[nodiscard]] bool ok() const { return fd_ >= 0; }
  // One round trip [ms], or a negative value if the echo failed.
  double round_trip_ms() {
    char buf[kBytes] = {};
    const auto t0 = Clock::now();
    if (::write(fd_, buf, kBytes) != static_cast<ssize_t>(kBytes)) {
      return -1;
    }
    std::size_t got = 0;
    while (got < kBytes) {
      const ssize_t n = ::read(fd_, buf + got, kBytes - got);
      if (n <= 0) {
        return -1;
      }
      got += static_cast<std::size_t>(n);
    }
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  }

 private:
  static constexpr std::size_t kBytes = 64;
  void stop() {
    if (fd_ >= 0) {
      ::close(fd_);  // the child reads EOF and exits
      fd_ = -1;
    }
    if (child_ > 0) {
      ::waitpid(child_, nullptr, 0);
      child_ = -1;
    }
  }
  pid_t child_ = -1;
  int fd_ = -1;
};

int main(int argc, char** argv) {
  const int count = argc > 1 ? std::atoi(argv[1]) : 300;
  const int warmup = argc > 2 ? std::atoi(argv[2]) : 20;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 4;
  if (count <= 0 || warmup < 0 || threads <= 0 || threads > 64) {
    std::fprintf(stderr,
                 "usage: %s [handshakes_per_group] [warmup_per_group] [threads] [groups] "
                 "[variants=yes|no]\n",
                 argv[0]);
    return 2;
  }
  std::vector<std::string> groups = {"X25519", "P-256", "qkd", "x25519_qkd", "p256_qkd"};
  std::vector<std::string> qkd_groups = {"qkd", "x25519_qkd", "p256_qkd"};
  if (argc > 4) {
    // Only these groups (comma-separated), X25519 always first as the baseline: for
    // profiling one group.
    const std::string only = std::string(",") + argv[4] + ",";
    const auto listed = [&](const std::string& g) {
      return only.find("," + g + ",") != std::string::npos;
    };
    std::erase_if(groups, [&](const std::string& g) { return g != "X25519" && !listed(g); });
    std::erase_if(qkd_groups, [&](const std::string& g) { return !listed(g); });
  }
  constexpr std::uint64_t kPrefetch = 32;
  constexpr int kRounds = 3;  // concurrent table
  const int per_thread = std::max(1, count / threads / kRounds);
  // Every qkd handshake spends one key; the prefetch may leave up to kPrefetch unused per
  // group configuration; the round-trip probe spends 2 * (count + warmup) + 32 * count/8.
  const auto n = static_cast<std::uint64_t>(count + warmup);
  const std::uint64_t keys_needed =
      3 * qkd_groups.size() * n +                                              // serial
      3 * qkd_groups.size() * static_cast<std::uint64_t>(kRounds * threads * per_thread + warmup) +
      2 * n + kPrefetch * static_cast<std::uint64_t>(count / 8 + 1) +         // probe
      kPrefetch * 2 + 64;

  qkd::test::KmeNetworkOptions options;
  options.log_level = "warn";
  options.max_key_per_request = 128;
  // The pool limit is what the run needs: the links fill it before the timed runs and then
  // only top it up as handshakes spend keys, as a deployed link at its limit does. With the
  // default limit (100,000) they would still be filling at full speed during the runs, the
  // simulated engines and their link I/O taking most of both CPUs away from every group.
  options.max_key_count = keys_needed;
  auto net = qkd::test::KmeNetwork::start(options);
  if (!net.ok()) {
    return fail("cannot start the KMEs: " + net.error().message);
  }
  std::fprintf(stderr, "waiting for %llu keys at both KMEs...\n",
               static_cast<unsigned long long>(keys_needed));
  const auto waited = Clock::now();
  if (auto ready = (*net)->wait_for_keys(keys_needed, std::chrono::minutes(15)); !ready.ok()) {
    return fail("the KMEs hold too few keys: " + ready.error().message);
  }
  std::fprintf(stderr, "keys ready after %.1f s\n",
               std::chrono::duration<double>(Clock::now() - waited).count());

  const auto dir = qkd::test_prov::make_temp_dir("bench");
  // The server's admission limits (default 20 keys/s per client SAE) are lifted: the
  // benchmark is one client SAE on purpose, measuring the handshake, not the limiter.
  const auto cnf = [&](const std::string& file, const std::string& sae,
                       const qkd::test::KmeInfo& kme, const std::string& prefetch,
                       const std::string& announce) {
    const auto id = (*net)->sae(sae);
    return qkd::test_prov::write_provider_config(
        dir + "/" + file + ".cnf",
        {{"kme_url", kme.url}, {"cert", id.cert_file}, {"key", id.key_file}, {"ca", id.ca_file},
         {"admit_rate", "1000000"}, {"admit_burst", "1000000"},
         {"admit_outstanding", "1000"}, {"admit_outstanding_total", "1000"},
         {"prefetch_keys", prefetch}, {"announce_keys", announce}});
  };
  auto client_lib = qkd::test_prov::load_libctx(cnf("alice", "alice", (*net)->alice(), "1", "0"));
  auto server_lib = qkd::test_prov::load_libctx(
      cnf("bob", "bob", (*net)->bob(), std::to_string(kPrefetch), "16"));
  auto server_lib_quiet = qkd::test_prov::load_libctx(
      cnf("bob-quiet", "bob", (*net)->bob(), std::to_string(kPrefetch), "0"));
  auto server_lib_off =
      qkd::test_prov::load_libctx(cnf("bob-off", "bob", (*net)->bob(), "1", "0"));
  if (!client_lib || !server_lib || !server_lib_quiet || !server_lib_off) {
    return fail("cannot load the provider configs");
  }
  const auto bob = (*net)->sae("bob");
  std::vector<Row> rows;
  const auto add_row = [&](const std::string& label, const std::string& g, OSSL_LIB_CTX* srv) {
    Row r{label, g,
          qkd::test_prov::make_client_ctx(client_lib.get(), g, (*net)->ca_file().string()),
          qkd::test_prov::make_server_ctx(srv, g, bob.cert_file, bob.key_file)};
    if (!r.client || !r.server) {
      return false;
    }
    SSL_CTX_set_num_tickets(r.server.get(), 0);  // the handshake only
    rows.push_back(std::move(r));
    return true;
  };
  for (const auto& g : groups) {
    if (!add_row(g, g, server_lib.get())) {
      return fail("cannot make the TLS contexts for " + g);
    }
  }
  const bool variants = argc <= 5 || std::string(argv[5]) != "no";
  for (const auto& g : variants ? qkd_groups : std::vector<std::string>{}) {
    if (!add_row(g + ", no keys announced", g, server_lib_quiet.get())) {
      return fail("cannot make the TLS contexts for " + g);
    }
  }
  for (const auto& g : variants ? qkd_groups : std::vector<std::string>{}) {
    if (!add_row(g + ", prefetch off", g, server_lib_off.get())) {
      return fail("cannot make the TLS contexts for " + g);
    }
  }

  // 1. Serial.
  std::vector<std::vector<double>> ms(rows.size()), server_ms(rows.size()),
      client_ms(rows.size());
  std::vector<std::vector<Times>> all_times(rows.size());
  // Each round runs the rows in a new order (a fixed seed): work that recurs every n
  // handshakes of the qkd groups (a prefetch refill, a batch of announced keys fetched on
  // another thread, slowing the handshake that runs beside it) would otherwise land on the
  // same group every time.
  std::mt19937 shuffle_rng(20261123);
  std::vector<std::size_t> order(rows.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  for (int i = -warmup; i < count; ++i) {
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (const std::size_t r : order) {
      Times t;
      if (!run_one(rows[r], &t, /*detailed=*/true)) {
        return fail("handshake failed for " + rows[r].label);
      }
      if (i >= 0) {
        ms[r].push_back(t.total);
        server_ms[r].push_back(t.server);
        client_ms[r].push_back(t.client);
        all_times[r].push_back(t);
      }
    }
  }

  // 2. Concurrent: `threads` threads, each per_thread handshakes of one row, rows in turn.
  std::vector<double> busy_s(rows.size(), 0.0);
  std::vector<int> done(rows.size(), 0);
  for (int round = 0; round < kRounds; ++round) {
    for (std::size_t r = 0; r < rows.size(); ++r) {
      std::atomic<bool> failed{false};
      const auto t0 = Clock::now();
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, r] {
          for (int i = 0; i < per_thread && !failed; ++i) {
            Times unused;
            if (!run_one(rows[r], &unused)) {
              failed = true;
            }
          }
        });
      }
      for (auto& t : pool) {
        t.join();
      }
      if (failed) {
        return fail("concurrent handshake failed for " + rows[r].label);
      }
      busy_s[r] += std::chrono::duration<double>(Clock::now() - t0).count();
      done[r] += threads * per_thread;
    }
  }

  // 3. The KME round trips alone, as the provider makes them (keys of 256 bits).
  // Besides the pair enc_keys(1) + dec_keys, the keys of the 32-key batches are fetched at
  // alice one at a time, as the client does for prefetched keys: right after another
  // request, after 0.7 ms of busy work (about a handshake's own work between two of its
  // dec_keys calls), and right after an X25519 handshake, to show what the same round trip
  // costs when the KME has been idle and when this thread has just run a handshake.
  std::vector<double> enc_ms, enc32_ms, dec_ms, dec_batch_ms, dec_busy_ms, dec_after_hs_ms;
  std::vector<double> echo_ms, echo_busy_ms, echo_after_hs_ms;  // the floor, same conditions
  std::deque<std::string> batch_ids;
  {
    LoopbackEcho echo;
    if (!echo.ok()) {
      return fail("cannot start the loopback echo process");
    }
    const auto alice = (*net)->sae("alice");
    auto bob_client = qkd::etsi::Client::create(
        {(*net)->bob().url, bob.cert_file, bob.key_file, bob.ca_file, std::chrono::seconds(5)});
    auto alice_client = qkd::etsi::Client::create({(*net)->alice().url, alice.cert_file,
                                                   alice.key_file, alice.ca_file,
                                                   std::chrono::seconds(5)});
    if (!bob_client.ok() || !alice_client.ok()) {
      return fail("cannot make the ETSI clients");
    }
    for (int i = -warmup; i < count; ++i) {
      const auto t0 = Clock::now();
      auto keys = (*bob_client)->enc_keys("alice", 1, 256);
      const auto t1 = Clock::now();
      if (!keys.ok()) {
        return fail("enc_keys: " + keys.error().message);
      }
      const std::string ids[] = {keys->at(0).key_id};
      auto got = (*alice_client)->dec_keys("bob", ids);
      const auto t2 = Clock::now();
      if (!got.ok()) {
        return fail("dec_keys: " + got.error().message);
      }
      if (i >= 0) {
        enc_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        dec_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
      }
      if (i >= 0 && i % 8 == 0) {
        const auto t3 = Clock::now();
        auto batch = (*bob_client)->enc_keys("alice", kPrefetch, 256);
        if (!batch.ok()) {
          return fail("enc_keys(32): " + batch.error().message);
        }
        enc32_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t3).count());
        for (const auto& k : *batch) {
          batch_ids.push_back(k.key_id);
        }
      }
      // The probes' three conditions: right after the previous request, after 0.7 ms of
      // busy work, right after an X25519 handshake in this thread.
      const auto prepare = [&](int condition) {
        if (condition == 1) {
          const auto until = Clock::now() + std::chrono::microseconds(700);
          while (Clock::now() < until) {
          }
        }
        Times unused;
        return condition != 2 || run_one(rows[0], &unused);
      };
      std::vector<double>* const dec_into[] = {&dec_batch_ms, &dec_busy_ms, &dec_after_hs_ms};
      for (int condition = 0; condition < 3; ++condition) {
        std::vector<double>* into = dec_into[condition];
        if (batch_ids.size() < 2) {
          break;
        }
        if (!prepare(condition)) {
          return fail("handshake failed for " + rows[0].label);
        }
        const std::string one[] = {batch_ids.front()};
        batch_ids.pop_front();
        const auto t4 = Clock::now();
        auto got_one = (*alice_client)->dec_keys("bob", one);
        if (!got_one.ok()) {
          return fail("dec_keys (batch): " + got_one.error().message);
        }
        into->push_back(std::chrono::duration<double, std::milli>(Clock::now() - t4).count());
      }
      std::vector<double>* const echo_into[] = {&echo_ms, &echo_busy_ms, &echo_after_hs_ms};
      for (int condition = 0; condition < 3; ++condition) {
        if (!prepare(condition)) {
          return fail("handshake failed for " + rows[0].label);
        }
        const double rt = echo.round_trip_ms();
        if (rt < 0) {
          return fail("the loopback echo failed");
        }
        echo_into[condition]->push_back(rt);
      }
    }
  }
  std::filesystem::remove_all(dir);

  // 5. The hybrids' server-side crypto alone, by name vs cached, alternating in blocks.
  struct CryptoRow {
    const char* label;
    Classical kind;
    std::vector<double> by_name_us, cached_us;
  };
  std::vector<CryptoRow> crypto_rows = {{"x25519_qkd", Classical::kX25519, {}, {}},
                                        {"p256_qkd", Classical::kP256, {}, {}}};
  {
    qkd::prov::CryptoMethods methods(nullptr);
    for (auto& row : crypto_rows) {
      auto client = qkd::prov::classical_generate(nullptr, row.kind);
      if (!client.ok()) {
        return fail("cannot make a client key for table 5");
      }
      const auto client_pub = qkd::prov::classical_public(client->get(), row.kind).value();
      for (int block = 0; block < 20; ++block) {
        for (auto* into : {&row.by_name_us, &row.cached_us}) {
          for (int i = 0; i < std::max(1, count / 10); ++i) {
            const auto t0 = Clock::now();
            if (!server_crypto(into == &row.cached_us ? &methods : nullptr, row.kind,
                               client_pub)) {
              return fail(std::string("table 5: server crypto failed for ") + row.label);
            }
            into->push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
          }
        }
      }
    }
  }

  // 6. One P-256 derive: libssl's full peer check against the provider's partial one.
  std::vector<double> full_us, partial_us;
  {
    auto own = qkd::prov::classical_generate(nullptr, Classical::kP256);
    auto other = qkd::prov::classical_generate(nullptr, Classical::kP256);
    if (!own.ok() || !other.ok()) {
      return fail("cannot make P-256 keys for table 6");
    }
    const auto other_pub = qkd::prov::classical_public(other->get(), Classical::kP256).value();
    auto peer = qkd::prov::classical_import_peer(nullptr, Classical::kP256, other_pub);
    if (!peer.ok()) {
      return fail("cannot import a P-256 key for table 6");
    }
    std::array<std::uint8_t, 32> a{}, b{};
    for (int block = 0; block < 20; ++block) {
      for (auto* into : {&full_us, &partial_us}) {
        for (int i = 0; i < std::max(1, count / 10); ++i) {
          const auto t0 = Clock::now();
          const bool ok = into == &full_us
                              ? qkd::test_prov::openssl_full_check_derive(
                                    own->get(), peer->get(), a.data(), a.size())
                              : qkd::prov::classical_derive(nullptr, Classical::kP256, own->get(),
                                                            peer->get(), b)
                                    .ok();
          if (!ok) {
            return fail("table 6: derive failed");
          }
          into->push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
      }
    }
    if (a != b) {
      return fail("table 6: the two derives disagree");
    }
  }

  const Stats base = stats_of(ms[0]);
  std::printf("Serial (one thread, round-robin):\n\n");
  std::printf("| group | handshakes/s | p50 (ms) | p99 (ms) | rate vs X25519 | p99 - X25519 p99 (ms) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const Stats s = stats_of(ms[r]);
    std::printf("| %s | %.0f | %.3f | %.3f | %.2f | %+.3f |\n", rows[r].label.c_str(), s.rate,
                s.p50_ms, s.p99_ms, s.rate / base.rate, s.p99_ms - base.p99_ms);
  }
  const Stats base_server = stats_of(server_ms[0]);
  const Stats base_client = stats_of(client_ms[0]);
  std::printf("\nPer side (same serial run): time inside each side's own OpenSSL calls, i.e. "
              "the cost of a handshake to a server process and to a client process running "
              "apart:\n\n");
  std::printf("| group | server ms/handshake | server p50 (ms) | server p99 (ms) | server "
              "handshakes/s | server rate vs X25519 | client ms/handshake | client p50 (ms) | "
              "client p99 (ms) | client rate vs X25519 |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const Stats sv = stats_of(server_ms[r]);
    const Stats cl = stats_of(client_ms[r]);
    std::printf("| %s | %.3f | %.3f | %.3f | %.0f | %.2f | %.3f | %.3f | %.3f | %.2f |\n",
                rows[r].label.c_str(), sv.mean_ms, sv.p50_ms, sv.p99_ms, sv.rate,
                sv.rate / base_server.rate, cl.mean_ms, cl.p50_ms, cl.p99_ms,
                cl.rate / base_client.rate);
  }
  // Where the time of the slowest handshakes went: the tail's cause is on the CPU (more
  // work), on a run queue (other threads and processes took the CPUs) or asleep (waiting for
  // a lock or a reply), against the same means over all handshakes of the group.
  std::printf("\nSerial tail: the slowest 2 %% of each group's handshakes (%zu of %d) against "
              "all of them (means; ms; switches per handshake). cpu = this thread on a CPU, "
              "queued = runnable but waiting for a CPU%s, asleep = the rest (blocked; the "
              "mean of wall - cpu - queued):\n\n",
              std::max<std::size_t>(1, static_cast<std::size_t>(count) / 50), count,
              g_schedstat ? "" : " (n/a: no run-queue times in /proc/thread-self/schedstat; "
                                 "asleep then includes them)");
  std::printf("| group | all: wall | cpu | queued | asleep | slowest 2 %%: wall | cpu | queued | "
              "asleep | voluntary switches | involuntary switches |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (std::size_t r = 0; r < rows.size(); ++r) {
    std::vector<Times> t = all_times[r];
    std::sort(t.begin(), t.end(), [](const Times& a, const Times& b) { return a.total > b.total; });
    const auto mean_of = [](const std::vector<Times>& v, std::size_t first, auto field) {
      double sum = 0;
      for (std::size_t i = 0; i < first; ++i) {
        sum += field(v[i]);
      }
      return first == 0 ? 0.0 : sum / static_cast<double>(first);
    };
    const auto wall = [](const Times& x) { return x.total; };
    const auto cpu = [](const Times& x) { return x.cpu; };
    const auto queued = [](const Times& x) { return x.queued; };
    const auto asleep = [](const Times& x) { return x.total - x.cpu - x.queued; };
    const auto vol = [](const Times& x) { return static_cast<double>(x.voluntary); };
    const auto invol = [](const Times& x) { return static_cast<double>(x.involuntary); };
    const std::size_t tail = std::max<std::size_t>(1, t.size() / 50);
    std::printf("| %s | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f | %.1f |\n",
                rows[r].label.c_str(), mean_of(t, t.size(), wall), mean_of(t, t.size(), cpu),
                mean_of(t, t.size(), queued), mean_of(t, t.size(), asleep),
                mean_of(t, tail, wall), mean_of(t, tail, cpu), mean_of(t, tail, queued),
                mean_of(t, tail, asleep), mean_of(t, tail, vol), mean_of(t, tail, invol));
  }
  std::printf("\nConcurrent (%d threads, each whole handshakes, %d rounds of %d per thread):\n\n",
              threads, kRounds, per_thread);
  std::printf("| group | handshakes/s | rate vs X25519 |\n|---|---:|---:|\n");
  const double base_rate = done[0] / busy_s[0];
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const double rate = done[r] / busy_s[r];
    std::printf("| %s | %.0f | %.2f |\n", rows[r].label.c_str(), rate, rate / base_rate);
  }
  const Stats enc = stats_of(enc_ms);
  const Stats enc32 = stats_of(enc32_ms);
  const Stats dec = stats_of(dec_ms);
  std::printf("\n| KME round trip (ETSI 014, keep-alive) | mean (ms) | p50 (ms) | p99 (ms) |\n");
  std::printf("|---|---:|---:|---:|\n");
  std::printf("| enc_keys, 1 key (server, prefetch off) | %.3f | %.3f | %.3f |\n", enc.mean_ms,
              enc.p50_ms, enc.p99_ms);
  std::printf("| enc_keys, %llu keys (server, one prefetch batch) | %.3f | %.3f | %.3f |\n",
              static_cast<unsigned long long>(kPrefetch), enc32.mean_ms, enc32.p50_ms,
              enc32.p99_ms);
  std::printf("| dec_keys, 1 key (client, in decapsulate) | %.3f | %.3f | %.3f |\n", dec.mean_ms,
              dec.p50_ms, dec.p99_ms);
  const Stats dec_batch = stats_of(dec_batch_ms);
  const Stats dec_busy = stats_of(dec_busy_ms);
  std::printf("| dec_keys, 1 key of an earlier batch, right after another request | %.3f | %.3f "
              "| %.3f |\n", dec_batch.mean_ms, dec_batch.p50_ms, dec_batch.p99_ms);
  std::printf("| dec_keys, 1 key of an earlier batch, after 0.7 ms of busy work | %.3f | %.3f "
              "| %.3f |\n", dec_busy.mean_ms, dec_busy.p50_ms, dec_busy.p99_ms);
  const Stats dec_after_hs = stats_of(dec_after_hs_ms);
  std::printf("| dec_keys, 1 key of an earlier batch, right after an %s handshake | %.3f | %.3f "
              "| %.3f |\n", rows[0].label.c_str(), dec_after_hs.mean_ms, dec_after_hs.p50_ms,
              dec_after_hs.p99_ms);
  const char* floor_label =
      "floor: 64 bytes echoed by another process over loopback TCP (no TLS, HTTP or KME)";
  const Stats echo_s = stats_of(echo_ms);
  const Stats echo_busy = stats_of(echo_busy_ms);
  const Stats echo_after_hs = stats_of(echo_after_hs_ms);
  std::printf("| %s, right after another | %.3f | %.3f | %.3f |\n", floor_label, echo_s.mean_ms,
              echo_s.p50_ms, echo_s.p99_ms);
  std::printf("| %s, after 0.7 ms of busy work | %.3f | %.3f | %.3f |\n", floor_label,
              echo_busy.mean_ms, echo_busy.p50_ms, echo_busy.p99_ms);
  std::printf("| %s, right after an %s handshake | %.3f | %.3f | %.3f |\n", floor_label,
              rows[0].label.c_str(), echo_after_hs.mean_ms, echo_after_hs.p50_ms,
              echo_after_hs.p99_ms);
  // A serial client+server thread that adds one such round trip to each X25519 handshake
  // (and nothing else) reaches at most this share of X25519's rate.
  std::printf("\nCeiling for a group that adds one local round trip to an %s handshake (the "
              "floor right after a handshake, mean): %.2f of its serial rate.\n",
              rows[0].label.c_str(), base.mean_ms / (base.mean_ms + echo_after_hs.mean_ms));
  std::printf("\nA hybrid server's crypto outside libssl per encapsulate (import the client's "
              "public key, ephemeral key pair, ECDH, HKDF; default library context):\n\n");
  std::printf("| group | methods looked up by name per call: mean (us) | p50 (us) | made once "
              "per provider context: mean (us) | p50 (us) | saved at p50 (us) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const auto& row : crypto_rows) {
    // stats_of works in ms units of its input; here the input is in us.
    const Stats by_name = stats_of(row.by_name_us);
    const Stats cached = stats_of(row.cached_us);
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %.1f |\n", row.label, by_name.mean_ms,
                by_name.p50_ms, cached.mean_ms, cached.p50_ms, by_name.p50_ms - cached.p50_ms);
  }
  {
    const Stats full = stats_of(full_us);
    const Stats partial = stats_of(partial_us);
    std::printf("\nOne P-256 ECDH derive (context, peer check, derive; us):\n\n");
    std::printf("| peer check | mean (us) | p50 (us) |\n|---|---:|---:|\n");
    std::printf("| full (EVP_PKEY_derive_set_peer, as libssl 3.0 does for P-256) | %.1f | %.1f |\n",
                full.mean_ms, full.p50_ms);
    std::printf("| partial (the provider, for p256_qkd) | %.1f | %.1f |\n", partial.mean_ms,
                partial.p50_ms);
  }
  std::printf("\n%d handshakes per group after %d warm-up, round-robin, one thread; then %d "
              "threads.\n", count, warmup, threads);
  return 0;
}
