// handshake_bench: full TLS 1.3 handshakes in one process over a BIO pair, the same server
// certificate (ECDSA P-256, examples/pki.sh) for every group, against two real qkd-kms
// daemons on loopback (tests/support's KmeNetwork). Prints Markdown tables:
//   1. per group: handshakes per second, p50 and p99 latency, rate and p99 relative to X25519;
//   2. the KME round trips alone (ETSI client, keep-alive): enc_keys (the server's cost in
//      encapsulate) and dec_keys (the client's cost in decapsulate).
//
//   handshake_bench [handshakes_per_group=300] [warmup_per_group=20]
//
// Groups run round-robin (one handshake of each in turn), so that drift in machine load
// spreads over all of them. Single thread: the rate is 1 / mean handshake time.
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <strings.h>
#include <string>
#include <vector>

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

}  // namespace

int main(int argc, char** argv) {
  const int count = argc > 1 ? std::atoi(argv[1]) : 300;
  const int warmup = argc > 2 ? std::atoi(argv[2]) : 20;
  if (count <= 0 || warmup < 0) {
    std::fprintf(stderr, "usage: %s [handshakes_per_group] [warmup_per_group]\n", argv[0]);
    return 2;
  }
  const std::vector<std::string> groups = {"X25519", "P-256", "qkd", "x25519_qkd", "p256_qkd"};
  const std::uint64_t qkd_groups = 3;
  // The KMEs must hold a key for every qkd handshake (one key each) plus the round-trip
  // probe below; ask for more up front than the daemons' store keeps by default.
  const std::uint64_t keys_needed =
      qkd_groups * static_cast<std::uint64_t>(count + warmup) +
      static_cast<std::uint64_t>(count + warmup) + 16u;

  qkd::test::KmeNetworkOptions options;
  options.log_level = "warn";
  auto net = qkd::test::KmeNetwork::start(options);
  if (!net.ok()) {
    return fail("cannot start the KMEs: " + net.error().message);
  }
  std::fprintf(stderr, "waiting for %llu keys at both KMEs...\n",
               static_cast<unsigned long long>(keys_needed));
  const auto waited = Clock::now();
  if (auto ready = (*net)->wait_for_keys(keys_needed, std::chrono::minutes(10)); !ready.ok()) {
    return fail("the KMEs hold too few keys: " + ready.error().message);
  }
  std::fprintf(stderr, "keys ready after %.1f s\n",
               std::chrono::duration<double>(Clock::now() - waited).count());

  const auto dir = qkd::test_prov::make_temp_dir("bench");
  // The server's admission limits (default 20 keys/s per client SAE) are lifted: the
  // benchmark is one client SAE on purpose, measuring the handshake, not the limiter.
  const auto cnf = [&](const std::string& sae, const qkd::test::KmeInfo& kme) {
    const auto id = (*net)->sae(sae);
    return qkd::test_prov::write_provider_config(
        dir + "/" + sae + ".cnf",
        {{"kme_url", kme.url}, {"cert", id.cert_file}, {"key", id.key_file}, {"ca", id.ca_file},
         {"admit_rate", "1000000"}, {"admit_burst", "1000000"}});
  };
  auto client_lib = qkd::test_prov::load_libctx(cnf("alice", (*net)->alice()));
  auto server_lib = qkd::test_prov::load_libctx(cnf("bob", (*net)->bob()));
  if (!client_lib || !server_lib) {
    return fail("cannot load the provider configs");
  }
  const auto bob = (*net)->sae("bob");
  struct Pair {
    qkd::test_prov::SslCtxPtr client, server;
  };
  std::map<std::string, Pair> ctx;
  for (const auto& g : groups) {
    Pair p{qkd::test_prov::make_client_ctx(client_lib.get(), g, (*net)->ca_file().string()),
           qkd::test_prov::make_server_ctx(server_lib.get(), g, bob.cert_file, bob.key_file)};
    if (!p.client || !p.server) {
      return fail("cannot make the TLS contexts for " + g);
    }
    SSL_CTX_set_num_tickets(p.server.get(), 0);  // the handshake only
    ctx[g] = std::move(p);
  }

  std::map<std::string, std::vector<double>> ms;
  for (int i = -warmup; i < count; ++i) {
    for (const auto& g : groups) {
      const auto t0 = Clock::now();
      Handshake h = qkd::test_prov::handshake(ctx[g].client.get(), ctx[g].server.get());
      const auto t1 = Clock::now();
      if (!h.ok) {
        std::fprintf(stderr, "%s: client: %s server: %s\n", g.c_str(), h.client_errors.c_str(),
                     h.server_errors.c_str());
        return fail("handshake failed for " + g);
      }
      const char* name =
          SSL_group_to_name(h.client.get(), static_cast<int>(SSL_get_negotiated_group(h.client.get())));
      const std::string expected = g == "P-256" ? "secp256r1" : g;  // libssl's TLS name
      if (name == nullptr || strcasecmp(expected.c_str(), name) != 0) {
        return fail("negotiated " + std::string(name != nullptr ? name : "?") + " instead of " + g);
      }
      if (i >= 0) {
        ms[g].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
    }
  }

  // The KME round trips alone, as the provider makes them (one key of 256 bits).
  std::vector<double> enc_ms, dec_ms;
  {
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
    }
  }
  std::filesystem::remove_all(dir);

  const Stats base = stats_of(ms["X25519"]);
  std::printf("| group | handshakes/s | p50 (ms) | p99 (ms) | rate vs X25519 | p99 - X25519 p99 (ms) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const auto& g : groups) {
    const Stats s = stats_of(ms[g]);
    std::printf("| %s | %.0f | %.3f | %.3f | %.2f | %+.3f |\n", g.c_str(), s.rate, s.p50_ms,
                s.p99_ms, s.rate / base.rate, s.p99_ms - base.p99_ms);
  }
  const Stats enc = stats_of(enc_ms);
  const Stats dec = stats_of(dec_ms);
  std::printf("\n| KME round trip (ETSI 014, keep-alive) | mean (ms) | p50 (ms) | p99 (ms) |\n");
  std::printf("|---|---:|---:|---:|\n");
  std::printf("| enc_keys (server, in encapsulate) | %.3f | %.3f | %.3f |\n", enc.mean_ms,
              enc.p50_ms, enc.p99_ms);
  std::printf("| dec_keys (client, in decapsulate) | %.3f | %.3f | %.3f |\n", dec.mean_ms,
              dec.p50_ms, dec.p99_ms);
  std::printf("\n%d handshakes per group after %d warm-up, round-robin, one thread.\n", count,
              warmup);
  return 0;
}
