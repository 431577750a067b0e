// How many secret bits a reconciled block may yield. Asymptotic for now:
//   m = floor(n (1 - h(e)) - leaked - safety_margin n), clamped at 0, rounded down to a
//   multiple of 8.
// Finite-key bounds (Tomamichel et al. 2012; Lim et al. 2014 for decoys) come in a later
// issue as further functions here, selected by ProtocolParams.
#pragma once

#include <cstdint>

namespace qkd::core {

// Binary entropy h(x) in bits; h(0) = h(1) = 0; x outside [0,1] is clamped.
[[nodiscard]] double binary_entropy(double x);

[[nodiscard]] std::uint64_t secret_key_length(std::uint64_t reconciled_bits, double qber,
                                              std::uint64_t leaked_bits,
                                              double safety_margin);

}  // namespace qkd::core
