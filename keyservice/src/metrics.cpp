// Prometheus text exposition (format 0.0.4) of the KME's counters, pool and link.
#include "qkd/kms/metrics.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <span>
#include <string_view>

namespace qkd::kms {

std::map<std::pair<std::string, std::string>, std::uint64_t> pair_waiting_series(
    const std::vector<std::string>& saes, const std::vector<std::string>& peer_saes,
    const std::map<std::pair<std::string, std::string>, std::uint64_t>& waiting) {
  std::map<std::pair<std::string, std::string>, std::uint64_t> out;
  auto take = [&](const std::string& master, const std::string& slave) {
    const auto it = waiting.find({master, slave});
    out[{master, slave}] = it == waiting.end() ? 0 : it->second;
  };
  for (const auto& slave : saes) {
    for (const auto& master : peer_saes) {
      take(master, slave);
    }
    for (const auto& master : saes) {
      if (master != slave) {
        take(master, slave);
      }
    }
  }
  return out;
}

std::string escape_label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (const char c : v) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

namespace {

// Prometheus float formatting: shortest round-trip representation, +Inf spelled out.
std::string num(double d) {
  if (std::isinf(d)) {
    return d > 0 ? "+Inf" : "-Inf";
  }
  if (std::isnan(d)) {
    return "NaN";
  }
  return fmt::format("{}", d);
}

// The _bucket (cumulative, then +Inf), _sum and _count lines of one histogram series.
// `labels`: empty, or label pairs to put before le.
void histogram_series(std::string& out, std::string_view name, const std::string& labels,
                      std::span<const double> bounds, std::span<const std::uint64_t> counts,
                      std::uint64_t count, double sum) {
  auto o = std::back_inserter(out);
  const std::string sep = labels.empty() ? "" : ",";
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < bounds.size(); ++i) {
    cumulative += counts[i];
    fmt::format_to(o, "{}_bucket{{{}{}le=\"{}\"}} {}\n", name, labels, sep, num(bounds[i]),
                   cumulative);
  }
  fmt::format_to(o, "{}_bucket{{{}{}le=\"+Inf\"}} {}\n", name, labels, sep, count);
  const std::string braces = labels.empty() ? "" : fmt::format("{{{}}}", labels);
  fmt::format_to(o, "{}_sum{} {}\n", name, braces, num(sum));
  fmt::format_to(o, "{}_count{} {}\n", name, braces, count);
}

void header(std::string& out, std::string_view name, std::string_view type,
            std::string_view help) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

}  // namespace

Metrics::Metrics(std::string kme_id, std::string peer_kme_id, std::uint32_t key_size_bits)
    : kme_id_(std::move(kme_id)),
      peer_kme_id_(std::move(peer_kme_id)),
      key_bytes_(std::max<std::uint32_t>(1, key_size_bits / 8)) {}

void Metrics::observe_request(std::string_view route, unsigned status, double seconds) {
  const auto it = std::lower_bound(kBuckets.begin(), kBuckets.end(), seconds);
  std::lock_guard lock(mu_);
  Histogram& h = requests_[{std::string(route), status}];
  if (it != kBuckets.end()) {
    ++h.buckets[static_cast<std::size_t>(it - kBuckets.begin())];
  }
  ++h.count;
  h.sum += seconds;
}

void Metrics::add_keys_delivered(std::string_view route, const std::string& master,
                                 const std::string& slave, std::uint64_t keys) {
  std::lock_guard lock(mu_);
  delivered_[{std::string(route), master, slave}] += keys;
}

void Metrics::add_admission_refusal(std::string_view budget, const std::string& master) {
  std::lock_guard lock(mu_);
  ++refusals_[{std::string(budget), master}];
}

void Metrics::add_dec_keys_waiting(std::int64_t delta) { dec_keys_waiting_.fetch_add(delta); }

std::string Metrics::render(const StoreStats& store, const LinkStats& link,
                            const BudgetLevels& budgets) const {
  std::string out;
  out.reserve(8192);
  auto o = std::back_inserter(out);
  const std::string peer = escape_label_value(peer_kme_id_);

  header(out, "qkd_kms_info", "gauge", "This KME and its link peer (always 1).");
  fmt::format_to(o, "qkd_kms_info{{kme_id=\"{}\",peer_kme_id=\"{}\"}} 1\n",
                 escape_label_value(kme_id_), peer);

  // --- the pool, per direction of the link ---
  header(out, "qkd_kms_pool_keys", "gauge",
         "Keys of keys.key_size in the pool: direction=\"local\" is allocatable here by "
         "enc_keys, \"peer\" by the peer KME (fetched here by dec_keys).");
  fmt::format_to(o, "qkd_kms_pool_keys{{peer_kme_id=\"{}\",direction=\"local\"}} {}\n", peer,
                 store.own_available_bytes / key_bytes_);
  fmt::format_to(o, "qkd_kms_pool_keys{{peer_kme_id=\"{}\",direction=\"peer\"}} {}\n", peer,
                 store.peer_available_bytes / key_bytes_);
  header(out, "qkd_kms_pool_bytes", "gauge", "Bytes in the pool, by direction (see qkd_kms_pool_keys).");
  fmt::format_to(o, "qkd_kms_pool_bytes{{peer_kme_id=\"{}\",direction=\"local\"}} {}\n", peer,
                 store.own_available_bytes);
  fmt::format_to(o, "qkd_kms_pool_bytes{{peer_kme_id=\"{}\",direction=\"peer\"}} {}\n", peer,
                 store.peer_available_bytes);
  header(out, "qkd_kms_pool_committed_bytes", "gauge",
         "Key bytes committed to the pool since its last reset (both directions).");
  fmt::format_to(o, "qkd_kms_pool_committed_bytes{{peer_kme_id=\"{}\"}} {}\n", peer,
                 store.committed_bytes);
  header(out, "qkd_kms_assigned_keys_waiting", "gauge",
         "Keys the peer assigned to SAEs here, not yet fetched by dec_keys.");
  fmt::format_to(o, "qkd_kms_assigned_keys_waiting{{peer_kme_id=\"{}\"}} {}\n", peer,
                 store.assigned_keys_waiting);
  header(out, "qkd_kms_assigned_keys_evicted_total", "counter",
         "Keys assigned to SAEs here and dropped unfetched because their SAE pair held "
         "keys.max_unfetched_per_pair (since the KME started).");
  fmt::format_to(o, "qkd_kms_assigned_keys_evicted_total{{peer_kme_id=\"{}\"}} {}\n", peer,
                 store.assigned_keys_evicted);
  header(out, "qkd_kms_prepared_keys", "gauge",
         "Keys allocated here ahead of enc_keys (store.prepared_keys), announced to the peer "
         "and not yet handed out.");
  fmt::format_to(o, "qkd_kms_prepared_keys{{peer_kme_id=\"{}\"}} {}\n", peer,
                 store.prepared_keys);
  header(out, "qkd_kms_pair_keys_waiting", "gauge",
         "Keys waiting here for their slave SAE's dec_keys, by SAE pair (a multicast key once "
         "per slave that has not fetched it).");
  for (const auto& [pair, n] : store.waiting_by_pair) {
    fmt::format_to(o, "qkd_kms_pair_keys_waiting{{master_sae=\"{}\",slave_sae=\"{}\"}} {}\n",
                   escape_label_value(pair.first), escape_label_value(pair.second), n);
  }
  if (!budgets.sae.empty() || !budgets.pair.empty()) {
    header(out, "qkd_kms_admission_budget_keys", "gauge",
           "Admission tokens left now (keys of keys.key_size): budget=\"sae\" per calling "
           "master SAE, \"pair\" per (master, slave) pair (keys it may still be given before "
           "its slave fetches some).");
    for (const auto& [sae, v] : budgets.sae) {
      fmt::format_to(o, "qkd_kms_admission_budget_keys{{budget=\"sae\",master_sae=\"{}\"}} {}\n",
                     escape_label_value(sae), v);
    }
    for (const auto& [pair, v] : budgets.pair) {
      fmt::format_to(o,
                     "qkd_kms_admission_budget_keys{{budget=\"pair\",master_sae=\"{}\","
                     "slave_sae=\"{}\"}} {}\n",
                     escape_label_value(pair.first), escape_label_value(pair.second), v);
    }
  }
  header(out, "qkd_kms_pending_notices", "gauge",
         "Peer key-assignment notices waiting for key bytes not committed here yet.");
  fmt::format_to(o, "qkd_kms_pending_notices{{peer_kme_id=\"{}\"}} {}\n", peer,
                 store.pending_notices);
  header(out, "qkd_kms_store_commit_duration_seconds", "histogram",
         "Durable store transactions, each one group of writes, by whether it carries a write "
         "of the link (a block commit): the WAL write (into the OS page cache). None with the "
         "memory store.");
  for (const auto& [writes, t] : {std::pair{"requests", &store.request_commits},
                                  std::pair{"link", &store.link_commits}}) {
    histogram_series(out, "qkd_kms_store_commit_duration_seconds",
                     fmt::format("writes=\"{}\"", writes), CommitTimes::kBuckets, t->buckets,
                     t->count, t->sum_seconds);
  }
  header(out, "qkd_kms_store_sync_duration_seconds", "histogram",
         "With store.synchronous \"full\", the syncs (fdatasync) of the store's WAL that make "
         "written transactions durable. None with \"normal\" or the memory store.");
  histogram_series(out, "qkd_kms_store_sync_duration_seconds", "", CommitTimes::kBuckets,
                   store.store_syncs.buckets, store.store_syncs.count,
                   store.store_syncs.sum_seconds);

  // --- the link ---
  header(out, "qkd_kms_link_up", "gauge", "1 while the link to the peer KME has a session.");
  fmt::format_to(o, "qkd_kms_link_up{{peer_kme_id=\"{}\"}} {}\n", peer, link.up ? 1 : 0);
  header(out, "qkd_kms_link_qber", "gauge", "Quantum bit error rate of the last completed block.");
  fmt::format_to(o, "qkd_kms_link_qber{{peer_kme_id=\"{}\"}} {}\n", peer, num(link.qber));
  header(out, "qkd_kms_link_key_rate_bits_per_second", "gauge",
         "Key rates over all blocks, per second of simulated link time: raw, sifted, "
         "secret (net of authentication) and the key spent on authentication.");
  const std::pair<const char*, double> rates[] = {{"raw", link.raw_key_rate_bps},
                                                  {"sifted", link.sifted_key_rate_bps},
                                                  {"secret", link.secret_key_rate_bps},
                                                  {"auth", link.auth_key_rate_bps}};
  for (const auto& [kind, v] : rates) {
    fmt::format_to(o, "qkd_kms_link_key_rate_bits_per_second{{peer_kme_id=\"{}\",kind=\"{}\"}} {}\n",
                   peer, kind, num(v));
  }
  header(out, "qkd_kms_link_blocks_total", "counter",
         "BB84 blocks run on the link since start, by result (settled = key committed or "
         "empty, aborted = discarded).");
  const std::uint64_t aborted = std::min(link.aborted_blocks, link.blocks);
  fmt::format_to(o, "qkd_kms_link_blocks_total{{peer_kme_id=\"{}\",result=\"settled\"}} {}\n",
                 peer, link.blocks - aborted);
  fmt::format_to(o, "qkd_kms_link_blocks_total{{peer_kme_id=\"{}\",result=\"aborted\"}} {}\n",
                 peer, aborted);

  std::lock_guard lock(mu_);
  // --- keys delivered per SAE pair ---
  header(out, "qkd_kms_keys_delivered_total", "counter",
         "Keys handed to SAEs, by route and SAE pair.");
  for (const auto& [k, n] : delivered_) {
    const auto& [route, master, slave] = k;
    fmt::format_to(o, "qkd_kms_keys_delivered_total{{route=\"{}\",master_sae=\"{}\",slave_sae=\"{}\"}} {}\n",
                   escape_label_value(route), escape_label_value(master),
                   escape_label_value(slave), n);
  }
  header(out, "qkd_kms_dec_keys_waiting", "gauge",
         "dec_keys requests waiting now for their keys' notice from the peer KME (each up to "
         "keys.dec_wait_ms; they hold no thread).");
  fmt::format_to(o, "qkd_kms_dec_keys_waiting {}\n", dec_keys_waiting_.load());
  header(out, "qkd_kms_admission_refusals_total", "counter",
         "Requests refused by admission control: enc_keys over a key budget (budget sae, "
         "pair; master_sae the caller), dec_keys over the waiting bound (budget waiting; "
         "master_sae the calling slave SAE).");
  for (const auto& [k, n] : refusals_) {
    fmt::format_to(o, "qkd_kms_admission_refusals_total{{budget=\"{}\",master_sae=\"{}\"}} {}\n",
                   escape_label_value(k.first), escape_label_value(k.second), n);
  }

  // --- requests ---
  header(out, "qkd_kms_http_requests_total", "counter", "API requests answered, by route and status.");
  for (const auto& [k, h] : requests_) {
    fmt::format_to(o, "qkd_kms_http_requests_total{{route=\"{}\",status=\"{}\"}} {}\n",
                   escape_label_value(k.first), k.second, h.count);
  }
  header(out, "qkd_kms_http_request_duration_seconds", "histogram",
         "Time from a request read to its response ready (handler time), by route and status.");
  for (const auto& [k, h] : requests_) {
    histogram_series(
        out, "qkd_kms_http_request_duration_seconds",
        fmt::format("route=\"{}\",status=\"{}\"", escape_label_value(k.first), k.second),
        kBuckets, h.buckets, h.count, h.sum);
  }
  return out;
}

}  // namespace qkd::kms
