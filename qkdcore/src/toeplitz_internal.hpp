// Internal entry points of the Toeplitz hash, for tests and benchmarks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qkd/core/bit_vector.hpp"
#include "qkd/core/result.hpp"

namespace qkd::core::detail {

// The base-case kernels of the carry-less Karatsuba product: the portable 64 x 64
// multiply, 128-bit PCLMULQDQ, 512-bit VPCLMULQDQ (AVX-512), or the widest the CPU has.
enum class ClmulKernel : std::uint8_t { kPortable, kPclmul, kVpclmul, kBest };

// Whether this CPU runs `kernel` (checked once at run time; kPortable and kBest always).
[[nodiscard]] bool clmul_kernel_available(ClmulKernel kernel);

// The carry-less Karatsuba product behind toeplitz_hash (which uses kBest), with a chosen
// base-case kernel so that tests cover every kernel the machine has. Fails
// (kInvalidArgument) on the size errors of toeplitz_hash or an unavailable kernel.
[[nodiscard]] Result<BitVector> toeplitz_hash_clmul(const BitVector& seed, const BitVector& input,
                                                    std::size_t output_bits, ClmulKernel kernel);

// Compatibility form: allow_pclmul = true selects kPclmul where available (else the
// portable kernel), false the portable kernel.
[[nodiscard]] Result<BitVector> toeplitz_hash_clmul(const BitVector& seed, const BitVector& input,
                                                    std::size_t output_bits, bool allow_pclmul);

}  // namespace qkd::core::detail
