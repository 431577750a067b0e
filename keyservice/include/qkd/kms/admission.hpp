// Admission control of enc_keys: per-SAE and per-(master, slave) key budgets.
//
// A TLS server is the master SAE and calls enc_keys for whatever slave SAE a ClientHello
// names, so an unauthenticated flood of ClientHellos could drain the pool that every SAE at
// this KME shares. Two token buckets bound that:
//   - per calling (master) SAE: admission.sae_keys_per_s, up to admission.sae_burst keys;
//   - per (master, slave) pair, keys outstanding: admission.pair_keys_per_window keys
//     delivered to the master and not fetched by the slave, per admission.pair_window_s
//     seconds. A key's token comes back when its slave fetches it (dec_keys here, or at
//     the peer KME, which reports fetches over the link: LinkService::report_fetched), and
//     otherwise with the bucket's even refill over the window (so a key never fetched
//     holds its token for at most one window).
// Budgets count keys of keys.key_size bits: a key of S bits takes S / key_size tokens, so
// that asking for larger keys does not stretch a budget (with the defaults, one 8192-bit
// key is 32 keys). A request of N keys (with additional slaves: N keys charged to each
// pair) takes their tokens from every bucket concerned, or from none (one that costs more
// than a full bucket takes a full bucket): a refused request consumes nothing, neither
// tokens nor pool keys. Tokens of an admitted request that delivered no key (400, 503) are
// given back.
//
// A refusal becomes 503 with {"message": ...} naming the budget, and a Retry-After header:
// the whole seconds until the bucket holds enough tokens for the same request.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qkd/kms/api.hpp"
#include "qkd/kms/config.hpp"

namespace qkd::kms {

// What the transport layer needs to know about a request before the ETSI handlers see it
// (the handlers validate the rest, then call ApiRequest::admit).
struct RequestInfo {
  std::string_view route = "other";  // enc_keys, dec_keys, status, health, metrics, other
  std::string path_sae;              // the SAE in the path (slave of enc_keys, master of dec_keys)
};

// Classifies a request by its route.
[[nodiscard]] RequestInfo classify_request(const ApiRequest& req);

class AdmissionControl {
 public:
  using Clock = std::chrono::steady_clock;

  struct Refusal {
    std::string budget;  // "sae" or "pair"
    std::string slave;   // the pair's slave when budget == "pair"
    std::string message;
    std::uint32_t retry_after_s = 1;
  };

  explicit AdmissionControl(const AdmissionConfig& config);

  [[nodiscard]] bool enabled() const {
    return config_.sae_keys_per_s > 0 || config_.pair_keys_per_window > 0;
  }

  // `keys` below are keys of keys.key_size bits (fractional for smaller keys).
  // Takes `keys` tokens from the master's bucket and from each (master, slave) bucket, or
  // none of them and returns why. Callers must have checked that master and slaves are
  // known SAEs (the number of buckets is bounded by the configuration).
  [[nodiscard]] std::optional<Refusal> admit(const std::string& master,
                                             const std::vector<std::string>& slaves,
                                             double keys, Clock::time_point now);
  // Returns the tokens of an admitted request that delivered no key.
  void refund(const std::string& master, const std::vector<std::string>& slaves,
              double keys, Clock::time_point now);
  // A dec_keys of `sae` that has to wait for its keys' notice takes one of the SAE's
  // admission.sae_waiting_dec_keys places, or is refused; leave_wait() gives it back.
  [[nodiscard]] std::optional<Refusal> enter_wait(const std::string& sae);
  void leave_wait(const std::string& sae);
  // The tokens (keys) a bucket holds now, for /metrics; nullopt when that budget is off.
  [[nodiscard]] std::optional<double> sae_level(const std::string& master, Clock::time_point now);
  [[nodiscard]] std::optional<double> pair_level(const std::string& master,
                                                 const std::string& slave, Clock::time_point now);
  // Returns `keys` tokens to the (master, slave) bucket only: the slave has fetched them.
  void fetched(const std::string& master, const std::string& slave, double keys,
               Clock::time_point now);

 private:
  struct Bucket {
    double tokens = 0;
    Clock::time_point last{};
    bool primed = false;
  };
  static void refill(Bucket& b, double rate, double capacity, Clock::time_point now);
  void return_to_pair_locked(const std::string& master, const std::string& slave, double keys,
                             Clock::time_point now);

  AdmissionConfig config_;
  std::mutex mu_;
  std::map<std::string, Bucket> sae_;
  std::map<std::pair<std::string, std::string>, Bucket> pair_;
  std::map<std::string, std::uint32_t> waiting_;  // dec_keys waiting, per SAE
};

}  // namespace qkd::kms
