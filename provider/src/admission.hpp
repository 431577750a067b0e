// Server-side admission limits (DESIGN decision 1). A ClientHello is unauthenticated and
// names the SAE for which the server will draw a key from its KME; these limits bound what
// a flood of ClientHellos can drain: per claimed SAE a token bucket (keys per second with a
// burst) and a cap on enc_keys calls in flight, plus a global in-flight cap.
//
// Fork: the lock is taken around fork() (ForkGuarded), and a child starts with no call in
// flight (those of the parent's threads never end there, so their slots would never be
// released); the token buckets are kept (keys drawn before the fork were drawn).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "fork_guard.hpp"
#include "qkd/core/result.hpp"

namespace qkd::prov {

struct AdmissionLimits {
  double rate_per_second = 20.0;        // sustained keys per second per claimed SAE
  double burst = 40.0;                  // bucket size
  std::uint32_t max_outstanding = 8;    // enc_keys calls in flight per claimed SAE
  std::uint32_t max_outstanding_total = 64;
  std::size_t max_tracked = 4096;       // distinct SAE IDs remembered (idle ones evicted)
};

class Admission final : public ForkGuarded {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Admission(AdmissionLimits limits = {});  // not copyable (ForkGuarded)
  ~Admission();
  void set_limits(const AdmissionLimits& limits);

  // Takes one token and one in-flight slot for `sae`, or fails (kRejected) saying which
  // limit. Every success must be paired with release(sae).
  [[nodiscard]] qkd::core::Status acquire(std::string_view sae, Clock::time_point now);
  void release(std::string_view sae);

 private:
  struct Bucket {
    double tokens = 0;
    Clock::time_point last{};
    std::uint32_t outstanding = 0;
  };
  // ForkGuarded: the child has no call in flight.
  void reset_in_child() override;
  void refill(Bucket& b, Clock::time_point now) const;
  void evict_idle(Clock::time_point now);

  std::mutex mu_;
  AdmissionLimits limits_;
  std::unordered_map<std::string, Bucket> buckets_;
  std::uint32_t outstanding_total_ = 0;
};

// RAII: releases the slot when the encapsulation is over.
class AdmissionTicket {
 public:
  AdmissionTicket(Admission& admission, std::string sae)
      : admission_(&admission), sae_(std::move(sae)) {}
  AdmissionTicket(const AdmissionTicket&) = delete;
  AdmissionTicket& operator=(const AdmissionTicket&) = delete;
  ~AdmissionTicket() { admission_->release(sae_); }

 private:
  Admission* admission_;
  std::string sae_;
};

}  // namespace qkd::prov
