// Admission control of enc_keys (token buckets per SAE and per SAE pair).
#include "qkd/kms/admission.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "qkd/kms/util.hpp"

namespace qkd::kms {

RequestInfo classify_request(const ApiRequest& req) {
  RequestInfo info;
  const std::string_view target = req.target;
  const std::size_t qmark = target.find('?');
  const std::string_view path = target.substr(0, qmark);
  if (path == "/health") {
    info.route = "health";
    return info;
  }
  if (path == "/metrics") {
    info.route = "metrics";
    return info;
  }
  constexpr std::string_view kPrefix = "/api/v1/keys/";
  if (path.substr(0, kPrefix.size()) != kPrefix) {
    return info;
  }
  const std::string_view rest = path.substr(kPrefix.size());
  const std::size_t slash = rest.find('/');
  if (slash == std::string_view::npos || slash == 0) {
    return info;
  }
  const std::string_view tail = rest.substr(slash + 1);
  if (tail != "enc_keys" && tail != "dec_keys" && tail != "status") {
    return info;
  }
  auto sae = url_decode(rest.substr(0, slash), false);
  if (!sae) {
    return info;
  }
  info.route = tail == "enc_keys" ? "enc_keys" : tail == "dec_keys" ? "dec_keys" : "status";
  info.path_sae = std::move(*sae);
  return info;
}

AdmissionControl::AdmissionControl(const AdmissionConfig& config) : config_(config) {}

void AdmissionControl::refill(Bucket& b, double rate, double capacity, Clock::time_point now) {
  if (!b.primed) {
    b.tokens = capacity;
    b.last = now;
    b.primed = true;
    return;
  }
  if (now > b.last) {
    const double dt = std::chrono::duration<double>(now - b.last).count();
    b.tokens = std::min(capacity, b.tokens + dt * rate);
    b.last = now;
  }
}

std::optional<AdmissionControl::Refusal> AdmissionControl::admit(
    const std::string& master, const std::vector<std::string>& slaves, double keys,
    Clock::time_point now) {
  auto retry_after = [](const Bucket& b, double need, double rate) {
    const double s = std::ceil((need - b.tokens) / rate);
    return static_cast<std::uint32_t>(std::clamp(s, 1.0, 86400.0));
  };
  std::lock_guard lock(mu_);
  const double sae_rate = static_cast<double>(config_.sae_keys_per_s);
  const double sae_cap = static_cast<double>(config_.sae_burst);
  const double pair_cap = static_cast<double>(config_.pair_keys_per_window);
  const double pair_rate = pair_cap / config_.pair_window_s;
  // A request larger than a full bucket (many keys of the largest size) needs a full
  // bucket and empties it, so that every request the API accepts can pass in time.
  const double sae_need = std::min(keys, sae_cap);
  const double pair_need = std::min(keys, pair_cap);
  Bucket* sae = nullptr;
  if (config_.sae_keys_per_s > 0) {
    sae = &sae_[master];
    refill(*sae, sae_rate, sae_cap, now);
    if (sae->tokens < sae_need) {
      Refusal r;
      r.budget = "sae";
      r.retry_after_s = retry_after(*sae, sae_need, sae_rate);
      r.message = fmt::format(
          "admission control: SAE \"{}\" has spent its key budget ({} keys/s, burst {}); "
          "retry after {} s",
          master, config_.sae_keys_per_s, config_.sae_burst, r.retry_after_s);
      return r;
    }
  }
  std::vector<Bucket*> pairs;
  if (config_.pair_keys_per_window > 0) {
    for (const std::string& slave : slaves) {
      Bucket& b = pair_[{master, slave}];
      refill(b, pair_rate, pair_cap, now);
      if (b.tokens < pair_need) {
        Refusal r;
        r.budget = "pair";
        r.slave = slave;
        r.retry_after_s = retry_after(b, pair_need, pair_rate);
        r.message = fmt::format(
            "admission control: the key budget of SAE pair \"{}\" -> \"{}\" is spent ({} keys "
            "per {} s); retry after {} s",
            master, slave, config_.pair_keys_per_window, config_.pair_window_s,
            r.retry_after_s);
        return r;
      }
      pairs.push_back(&b);
    }
  }
  if (sae != nullptr) {
    sae->tokens -= sae_need;
  }
  for (Bucket* b : pairs) {
    b->tokens -= pair_need;
  }
  return std::nullopt;
}

void AdmissionControl::refund(const std::string& master, const std::vector<std::string>& slaves,
                              double keys, Clock::time_point now) {
  const double n = keys;
  std::lock_guard lock(mu_);
  if (config_.sae_keys_per_s > 0) {
    Bucket& b = sae_[master];
    refill(b, static_cast<double>(config_.sae_keys_per_s),
           static_cast<double>(config_.sae_burst), now);
    b.tokens = std::min(static_cast<double>(config_.sae_burst), b.tokens + n);
  }
  if (config_.pair_keys_per_window > 0) {
    for (const std::string& slave : slaves) {
      return_to_pair_locked(master, slave, n, now);
    }
  }
}

std::optional<AdmissionControl::Refusal> AdmissionControl::enter_wait(const std::string& sae) {
  std::lock_guard lock(mu_);
  std::uint32_t& n = waiting_[sae];
  if (config_.sae_waiting_dec_keys > 0 && n >= config_.sae_waiting_dec_keys) {
    Refusal r;
    r.budget = "waiting";
    r.retry_after_s = 1;
    r.message = fmt::format(
        "admission control: SAE \"{}\" already has {} dec_keys requests waiting for their "
        "keys; retry after 1 s",
        sae, n);
    return r;
  }
  ++n;
  return std::nullopt;
}

void AdmissionControl::leave_wait(const std::string& sae) {
  std::lock_guard lock(mu_);
  if (auto it = waiting_.find(sae); it != waiting_.end() && it->second > 0) {
    --it->second;
  }
}

std::optional<double> AdmissionControl::sae_level(const std::string& master,
                                                 Clock::time_point now) {
  if (config_.sae_keys_per_s == 0) {
    return std::nullopt;
  }
  std::lock_guard lock(mu_);
  Bucket& b = sae_[master];
  refill(b, static_cast<double>(config_.sae_keys_per_s), static_cast<double>(config_.sae_burst),
         now);
  return b.tokens;
}

std::optional<double> AdmissionControl::pair_level(const std::string& master,
                                                  const std::string& slave,
                                                  Clock::time_point now) {
  if (config_.pair_keys_per_window == 0) {
    return std::nullopt;
  }
  std::lock_guard lock(mu_);
  const double cap = static_cast<double>(config_.pair_keys_per_window);
  Bucket& b = pair_[{master, slave}];
  refill(b, cap / config_.pair_window_s, cap, now);
  return b.tokens;
}

void AdmissionControl::fetched(const std::string& master, const std::string& slave,
                               double keys, Clock::time_point now) {
  std::lock_guard lock(mu_);
  if (config_.pair_keys_per_window > 0) {
    return_to_pair_locked(master, slave, keys, now);
  }
}

void AdmissionControl::return_to_pair_locked(const std::string& master, const std::string& slave,
                                             double keys, Clock::time_point now) {
  const double cap = static_cast<double>(config_.pair_keys_per_window);
  Bucket& b = pair_[{master, slave}];
  refill(b, cap / config_.pair_window_s, cap, now);
  b.tokens = std::min(cap, b.tokens + keys);
}

}  // namespace qkd::kms
