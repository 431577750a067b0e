// Internal entry points of the Toeplitz hash, for tests and benchmarks.
#pragma once

#include <cstddef>

#include "qkd/core/bit_vector.hpp"
#include "qkd/core/result.hpp"

namespace qkd::core::detail {

// The carry-less Karatsuba product behind toeplitz_hash. allow_pclmul = false forces the
// portable 64 x 64 carry-less multiply even where PCLMULQDQ is available (so that the
// tests cover both kernels on any machine).
[[nodiscard]] Result<BitVector> toeplitz_hash_clmul(const BitVector& seed, const BitVector& input,
                                                    std::size_t output_bits, bool allow_pclmul);

}  // namespace qkd::core::detail
