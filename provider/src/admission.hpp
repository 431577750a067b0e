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
#include <utility>

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

class Admission;

// One admitted call's slot: released when the ticket goes (a moved-from ticket holds none).
// Only Admission::acquire() makes one, after the slot is taken, and making it cannot throw,
// so no slot is ever taken without a ticket to release it.
class AdmissionTicket {
 public:
  AdmissionTicket(AdmissionTicket&& other) noexcept
      : admission_(std::exchange(other.admission_, nullptr)), sae_(std::move(other.sae_)) {}
  AdmissionTicket(const AdmissionTicket&) = delete;
  AdmissionTicket& operator=(const AdmissionTicket&) = delete;
  AdmissionTicket& operator=(AdmissionTicket&&) = delete;
  ~AdmissionTicket();

 private:
  friend class Admission;
  AdmissionTicket(Admission& admission, std::string&& sae) noexcept
      : admission_(&admission), sae_(std::move(sae)) {}

  Admission* admission_;
  std::string sae_;
};

class Admission final : public ForkGuarded {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Admission(AdmissionLimits limits = {});  // not copyable (ForkGuarded)
  ~Admission();
  void set_limits(const AdmissionLimits& limits);

  // Takes one token and one in-flight slot for `sae`, or fails (kRejected) saying which
  // limit. The slot is released when the ticket goes.
  [[nodiscard]] qkd::core::Result<AdmissionTicket> acquire(std::string_view sae,
                                                           Clock::time_point now);

 private:
  friend class AdmissionTicket;
  void release(const std::string& sae) noexcept;
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

inline AdmissionTicket::~AdmissionTicket() {
  if (admission_ != nullptr) {
    admission_->release(sae_);
  }
}

}  // namespace qkd::prov
