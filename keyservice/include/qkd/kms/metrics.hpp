// Prometheus metrics of one KME (text exposition format 0.0.4).
//
// Counters and histograms are recorded by the API layer (kme.cpp) as requests complete;
// pool and link figures are read from the key store and the link when rendering. Nothing
// here ever sees a key byte: labels are routes, statuses, SAE IDs and KME IDs.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "qkd/kms/api.hpp"
#include "qkd/kms/key_store.hpp"

namespace qkd::kms {

// Escapes a label value: backslash, double quote and line feed (exposition format 0.0.4).
[[nodiscard]] std::string escape_label_value(std::string_view v);

// The qkd_kms_pair_keys_waiting series of a KME serving `saes`, whose peer serves
// `peer_saes`, from the store's `waiting` (KeyStore::waiting_by_pair): every pair whose keys
// can wait here (a peer SAE or another SAE here as master, an SAE here as slave), 0 when none
// waits, and no other (a faulty peer's notices naming other SAEs would add a series per name).
[[nodiscard]] std::map<std::pair<std::string, std::string>, std::uint64_t> pair_waiting_series(
    const std::vector<std::string>& saes, const std::vector<std::string>& peer_saes,
    const std::map<std::pair<std::string, std::string>, std::uint64_t>& waiting);

class Metrics {
 public:
  // Upper bounds (seconds) of the request-duration histogram buckets (+Inf is implied).
  static constexpr std::array<double, 14> kBuckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                      0.005,  0.01,    0.025,  0.05,  0.1,
                                                      0.25,   0.5,     1.0,    2.5};

  Metrics(std::string kme_id, std::string peer_kme_id, std::uint32_t key_size_bits);

  // One API request answered: route (see RequestInfo), HTTP status, handler time.
  void observe_request(std::string_view route, unsigned status, double seconds);
  // Keys handed out by enc_keys (master = caller) or dec_keys (slave = caller).
  void add_keys_delivered(std::string_view route, const std::string& master,
                          const std::string& slave, std::uint64_t keys);
  // An enc_keys request refused by admission control ("sae" or "pair" budget).
  void add_admission_refusal(std::string_view budget, const std::string& master);
  // dec_keys requests waiting for their keys' notice: +1 when one starts, -1 when it ends.
  void add_dec_keys_waiting(std::int64_t delta);

  // Admission budgets left now (keys of key_size): per master SAE, per (master, slave).
  struct BudgetLevels {
    std::vector<std::pair<std::string, double>> sae;
    std::vector<std::pair<std::pair<std::string, std::string>, double>> pair;
  };

  // The whole exposition, with the pool, link and budget figures given.
  [[nodiscard]] std::string render(const StoreStats& store, const LinkStats& link,
                                   const BudgetLevels& budgets = {}) const;

  static constexpr std::string_view kContentType = "text/plain; version=0.0.4; charset=utf-8";

 private:
  struct Histogram {
    std::array<std::uint64_t, kBuckets.size()> buckets{};  // non-cumulative counts
    std::uint64_t count = 0;
    double sum = 0;
  };

  std::string kme_id_;
  std::string peer_kme_id_;
  std::uint32_t key_bytes_;
  mutable std::mutex mu_;
  std::map<std::pair<std::string, unsigned>, Histogram> requests_;
  std::map<std::tuple<std::string, std::string, std::string>, std::uint64_t> delivered_;
  std::map<std::pair<std::string, std::string>, std::uint64_t> refusals_;
  std::atomic<std::int64_t> dec_keys_waiting_{0};
};

}  // namespace qkd::kms
