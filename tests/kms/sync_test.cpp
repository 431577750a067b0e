// Synchronisation test ("Two ends, one truth"): thousands of concurrent enc_keys from SAEs on
// both sides (three SAE identities per KME, one thread and one keep-alive ETSI client each),
// then dec_keys of every key at the other side. For every key_ID: delivered once by enc_keys
// and once by dec_keys (a second dec_keys is "not found"), with identical bytes on both
// sides; no key_ID twice; every 200 response holds exactly `number` keys. A variant delays
// every key-assignment notice (link.notice_delay_ms) so that dec_keys arrives before the
// notice and has to wait for it.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "qkd/etsi/client.hpp"
#include "qkd/test/kme_network.hpp"

namespace {

using qkd::test::KmeInfo;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;

using Bytes = std::vector<std::uint8_t>;

constexpr std::uint32_t kKeyBits = 256;

const std::vector<std::string> kAliceSaes = {"alice", "alice-2", "alice-3"};
const std::vector<std::string> kBobSaes = {"bob", "bob-2", "bob-3"};

std::unique_ptr<qkd::etsi::Client> make_client(const KmeNetwork& net, const KmeInfo& kme,
                                               const std::string& sae) {
  const qkd::test::TlsIdentity id = net.sae(sae);
  auto c = qkd::etsi::Client::create(qkd::etsi::ClientConfig{
      kme.url, id.cert_file, id.key_file, id.ca_file, std::chrono::milliseconds(15000)});
  EXPECT_TRUE(c.ok()) << c.error().message;
  return c.ok() ? std::move(c.value()) : nullptr;
}

Bytes bytes_of(const qkd::etsi::Key& k) { return Bytes(k.key.span().begin(), k.key.span().end()); }

struct Delivered {
  std::string master, slave;
  bool master_at_alice = true;
  Bytes bytes;
};

// Everything the test saw, shared by its threads.
struct Ledger {
  std::mutex mu;
  std::map<std::string, Delivered> enc;  // key_ID -> what enc_keys delivered
  std::map<std::string, int> dec_count;  // key_ID -> deliveries by dec_keys
  std::vector<std::string> violations;
  std::atomic<std::uint64_t> enc_requests{0}, dec_requests{0};

  void violation(std::string v) {
    std::lock_guard l(mu);
    if (violations.size() < 50) {
      violations.push_back(std::move(v));
    }
  }

  // Records an enc_keys response for `number` keys.
  void record_enc(const std::string& master, const std::string& slave, bool at_alice,
                  std::uint32_t number, const std::vector<qkd::etsi::Key>& keys) {
    if (keys.size() != number) {
      violation(fmt::format("enc_keys for {} returned {} keys", number, keys.size()));
    }
    std::lock_guard l(mu);
    for (const auto& k : keys) {
      if (k.key.size() != kKeyBits / 8) {
        violations.push_back(fmt::format("{}: {} bytes", k.key_id, k.key.size()));
      }
      if (!enc.emplace(k.key_id, Delivered{master, slave, at_alice, bytes_of(k)}).second) {
        violations.push_back(fmt::format("key_ID {} delivered twice by enc_keys", k.key_id));
      }
    }
  }

  // Records a dec_keys response and compares it with what enc_keys delivered.
  void record_dec(const std::vector<std::string>& asked, const std::vector<qkd::etsi::Key>& keys) {
    std::lock_guard l(mu);
    if (keys.size() != asked.size()) {
      violations.push_back(fmt::format("dec_keys for {} returned {}", asked.size(), keys.size()));
      return;
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const auto& k = keys[i];
      if (k.key_id != asked[i]) {
        violations.push_back(fmt::format("dec_keys returned {} for {}", k.key_id, asked[i]));
      }
      if (++dec_count[k.key_id] > 1) {
        violations.push_back(fmt::format("key_ID {} delivered twice by dec_keys", k.key_id));
      }
      auto it = enc.find(k.key_id);
      if (it == enc.end()) {
        violations.push_back(fmt::format("dec_keys delivered {} never enc'd", k.key_id));
      } else if (!qkd::core::constant_time_equal(k.key.span(), it->second.bytes)) {
        violations.push_back(fmt::format("key_ID {}: the two ends' bytes differ", k.key_id));
      }
    }
  }
};

KmeNetworkOptions sync_options() {
  KmeNetworkOptions o;
  o.extra_alice_saes = {kAliceSaes[1], kAliceSaes[2]};
  o.extra_bob_saes = {kBobSaes[1], kBobSaes[2]};
  o.key_size = kKeyBits;
  o.length_km = 5.0;  // a short fiber: the pools fill within seconds
  return o;
}

// Phase 1: every SAE of both KMEs runs `requests` enc_keys (number 1..3) for the peer's
// SAEs in turn, all at once, over `conns` connections (threads) per SAE. With
// `dec_at_once`, each thread fetches each batch at the peer right away (the notice may
// still be in flight).
void run_enc(const KmeNetwork& net, Ledger& ledger, int requests, bool dec_at_once, int conns = 1) {
  std::vector<std::thread> threads;
  for (int side = 0; side < 2; ++side) {
    const bool at_alice = side == 0;
    const auto& masters = at_alice ? kAliceSaes : kBobSaes;
    const auto& slaves = at_alice ? kBobSaes : kAliceSaes;
    for (std::size_t m = 0; m < masters.size(); ++m) {
      for (int conn = 0; conn < conns; ++conn) {
        threads.emplace_back([&, at_alice, m, conn] {
          const std::string master = masters[m];
          auto client = make_client(net, at_alice ? net.alice() : net.bob(), master);
          std::map<std::string, std::unique_ptr<qkd::etsi::Client>> slave_clients;
          if (client == nullptr) {
            ledger.violation("no client");
            return;
          }
          for (int i = conn; i < requests; i += conns) {
            const std::string& slave = slaves[(static_cast<std::size_t>(i) + m) % slaves.size()];
            const auto number = static_cast<std::uint32_t>(1 + (i + m) % 3);
            auto keys = client->enc_keys(slave, number, kKeyBits);
            ++ledger.enc_requests;
            if (!keys.ok()) {
              ledger.violation(
                  fmt::format("enc_keys by {} for {}: {}", master, slave, keys.error().message));
              continue;
            }
            ledger.record_enc(master, slave, at_alice, number, keys.value());
            if (!dec_at_once) {
              continue;
            }
            auto& sc = slave_clients[slave];
            if (!sc) {
              sc = make_client(net, at_alice ? net.bob() : net.alice(), slave);
            }
            std::vector<std::string> ids;
            for (const auto& k : keys.value()) {
              ids.push_back(k.key_id);
            }
            auto got = sc->dec_keys(master, ids);
            ++ledger.dec_requests;
            if (!got.ok()) {
              ledger.violation(fmt::format("dec_keys by {}: {}", slave, got.error().message));
              continue;
            }
            ledger.record_dec(ids, got.value());
          }
        });
      }
    }
  }
  for (auto& t : threads) {
    t.join();
  }
}

// Phase 2: every slave SAE fetches its keys at its KME in batches (several threads at
// once), then asks for every batch again, which must be "not found" (400).
void run_dec(const KmeNetwork& net, Ledger& ledger, bool fetch) {
  // (slave at alice?, slave, master) -> key_IDs
  std::map<std::tuple<bool, std::string, std::string>, std::vector<std::string>> groups;
  for (const auto& [id, d] : ledger.enc) {
    groups[{!d.master_at_alice, d.slave, d.master}].push_back(id);
  }
  std::vector<std::thread> threads;
  std::vector<std::pair<std::string, bool>> slaves;  // (SAE, served by alice-kme?)
  for (const auto& s : kAliceSaes) {
    slaves.emplace_back(s, true);
  }
  for (const auto& s : kBobSaes) {
    slaves.emplace_back(s, false);
  }
  for (const auto& [slave_sae, at_alice] : slaves) {
    {
      const std::string slave = slave_sae;
      const bool slave_at_alice = at_alice;
      threads.emplace_back([&, slave, slave_at_alice] {
        auto client = make_client(net, slave_at_alice ? net.alice() : net.bob(), slave);
        if (client == nullptr) {
          ledger.violation("no client");
          return;
        }
        for (const auto& [key, ids] : groups) {
          if (std::get<0>(key) != slave_at_alice || std::get<1>(key) != slave) {
            continue;
          }
          const std::string& master = std::get<2>(key);
          for (std::size_t i = 0; i < ids.size(); i += 40) {
            const std::vector<std::string> batch(
                ids.begin() + static_cast<std::ptrdiff_t>(i),
                ids.begin() + static_cast<std::ptrdiff_t>(std::min(ids.size(), i + 40)));
            if (fetch) {
              auto got = client->dec_keys(master, batch);
              ++ledger.dec_requests;
              if (!got.ok()) {
                ledger.violation(fmt::format("dec_keys by {}: {}", slave, got.error().message));
                continue;
              }
              ledger.record_dec(batch, got.value());
            }
            auto again = client->dec_keys(master, batch);  // each a second time
            if (again.ok() || qkd::etsi::rejected_http_status(again.error()) != 400) {
              ledger.violation(
                  fmt::format("second dec_keys by {}: {}", slave,
                              again.ok() ? std::string("200") : again.error().message));
            }
          }
        }
      });
    }
  }
  for (auto& t : threads) {
    t.join();
  }
}

void check(Ledger& ledger, std::size_t min_keys) {
  for (const auto& v : ledger.violations) {
    ADD_FAILURE() << v;
  }
  EXPECT_GE(ledger.enc.size(), min_keys);
  // Every key delivered once at each side, and no key bytes twice.
  std::set<std::string> distinct;
  std::size_t per_side[2] = {0, 0};
  for (const auto& [id, d] : ledger.enc) {
    auto it = ledger.dec_count.find(id);
    EXPECT_TRUE(it != ledger.dec_count.end() && it->second == 1) << id << " not fetched once";
    EXPECT_TRUE(distinct.insert(std::string(d.bytes.begin(), d.bytes.end())).second)
        << id << ": bytes repeated";
    ++per_side[d.master_at_alice ? 0 : 1];
  }
  EXPECT_GT(per_side[0], 0u);
  EXPECT_GT(per_side[1], 0u);
  std::cout << "sync: " << ledger.enc_requests << " enc_keys, " << ledger.dec_requests
            << " dec_keys requests; " << per_side[0] << " keys alice->bob, " << per_side[1]
            << " keys bob->alice\n";
}

// 3 SAEs x 2 KMEs x 400 requests = 2,400 enc_keys (about 4,800 keys) over 48 connections
// at once (8 per SAE), then their dec_keys.
TEST(KmsSync, ThousandsOfConcurrentEncKeysFromBothSides) {
  constexpr int kRequests = 400;
  constexpr int kConnsPerSae = 8;
  KmeNetworkOptions o = sync_options();
  o.max_key_count = 3000;  // per direction: more than the 2,400 keys each side draws
  auto net = qkd::test::start_network_with_keys(o, 2600);  // full pools first
  ASSERT_NE(net, nullptr);
  Ledger ledger;
  run_enc(*net, ledger, kRequests, false, kConnsPerSae);
  run_dec(*net, ledger, true);
  check(ledger, static_cast<std::size_t>(6 * kRequests));
}

// The same with every notice held 150 ms: each dec_keys is sent right after its enc_keys,
// before the notice can have arrived, and has to wait for it.
TEST(KmsSync, LateNoticesMakeDecKeysWait) {
  constexpr int kRequests = 40;
  KmeNetworkOptions o = sync_options();
  o.notice_delay_ms = 150;
  o.dec_wait_ms = 5000;
  o.max_key_count = 1000;
  auto net = qkd::test::start_network_with_keys(o, 300);
  ASSERT_NE(net, nullptr);
  Ledger ledger;
  run_enc(*net, ledger, kRequests, true);
  run_dec(*net, ledger, false);  // only the second fetch: each must be "not found"
  check(ledger, static_cast<std::size_t>(6 * kRequests));
}

}  // namespace
