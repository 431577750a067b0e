// Admission set-ups shared by the provider's unit and cache tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "admission.hpp"

namespace qkd::prov::test {

// At most `per_sae` calls in flight per SAE and `total` in all; a rate no test reaches.
inline AdmissionLimits in_flight_caps(std::uint32_t per_sae, std::uint32_t total) {
  AdmissionLimits limits;
  limits.rate_per_second = 1000;
  limits.burst = 1000;
  limits.max_outstanding = per_sae;
  limits.max_outstanding_total = total;
  return limits;
}

// Tickets for `saes` (one each, in order), as calls in flight would hold them; a failure
// is reported and the tickets taken so far are returned.
inline std::vector<AdmissionTicket> hold(Admission& admission,
                                         std::initializer_list<const char*> saes,
                                         Admission::Clock::time_point now) {
  std::vector<AdmissionTicket> held;
  held.reserve(saes.size());
  for (const char* sae : saes) {
    auto ticket = admission.acquire(sae, now);
    if (!ticket.ok()) {
      ADD_FAILURE() << "no ticket for " << sae << ": " << ticket.error().message;
      break;
    }
    held.push_back(std::move(ticket).value());
  }
  return held;
}

}  // namespace qkd::prov::test
