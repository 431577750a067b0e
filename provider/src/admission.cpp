#include "admission.hpp"

#include <algorithm>
#include <cstdio>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;

Admission::Admission(AdmissionLimits limits) : ForkGuarded(mu_), limits_(limits) { guard_forks(); }

Admission::~Admission() { unguard_forks(); }

void Admission::reset_in_child() {
  // The calls in flight ran on the parent's threads, which do not exist here: nothing will
  // release their slots. Frees no memory (no lock of the allocator's is needed here).
  for (auto& [sae, b] : buckets_) {
    b.outstanding = 0;
  }
  outstanding_total_ = 0;
}

void Admission::set_limits(const AdmissionLimits& limits) {
  std::lock_guard lock(mu_);
  limits_ = limits;
}

void Admission::refill(Bucket& b, Clock::time_point now) const {
  const double elapsed = std::chrono::duration<double>(now - b.last).count();
  if (elapsed > 0) {
    b.tokens = std::min(limits_.burst, b.tokens + elapsed * limits_.rate_per_second);
    b.last = now;
  }
}

void Admission::evict_idle(Clock::time_point now) {
  for (auto it = buckets_.begin(); it != buckets_.end();) {
    refill(it->second, now);
    if (it->second.outstanding == 0 && it->second.tokens >= limits_.burst) {
      it = buckets_.erase(it);  // indistinguishable from a fresh bucket
    } else {
      ++it;
    }
  }
}

qkd::core::Result<AdmissionTicket> Admission::acquire(std::string_view sae, Clock::time_point now) {
  // What may throw (the ticket's copy of the name, a new bucket) comes before the slot is
  // counted; after it, only the ticket is made, which cannot throw.
  std::string name(sae);
  std::lock_guard lock(mu_);
  const auto refuse = [&](const std::string& why) {
    return make_error(ErrorCode::kRejected, "admission limit for SAE " + std::string(sae) + ": " + why);
  };
  if (outstanding_total_ >= limits_.max_outstanding_total) {
    return refuse(std::to_string(limits_.max_outstanding_total) +
                  " key requests already in flight in this process");
  }
  auto it = buckets_.find(name);
  if (it == buckets_.end()) {
    if (buckets_.size() >= limits_.max_tracked) {
      evict_idle(now);
      if (buckets_.size() >= limits_.max_tracked) {
        return refuse("too many distinct SAE IDs are being served");
      }
    }
    it = buckets_.emplace(name, Bucket{limits_.burst, now, 0}).first;
  }
  Bucket& b = it->second;
  refill(b, now);
  if (b.outstanding >= limits_.max_outstanding) {
    return refuse(std::to_string(b.outstanding) + " key requests already in flight");
  }
  if (b.tokens < 1.0) {
    char rate[32];
    std::snprintf(rate, sizeof rate, "%g", limits_.rate_per_second);
    return refuse(std::string("more than ") + rate + " keys per second");
  }
  b.tokens -= 1.0;
  ++b.outstanding;
  ++outstanding_total_;
  return AdmissionTicket(*this, std::move(name));
}

void Admission::release(const std::string& sae) noexcept {
  std::lock_guard lock(mu_);
  auto it = buckets_.find(sae);  // no copy of the name: nothing here may throw
  if (it != buckets_.end() && it->second.outstanding > 0) {
    --it->second.outstanding;
  }
  if (outstanding_total_ > 0) {
    --outstanding_total_;
  }
}

}  // namespace qkd::prov
