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

namespace qkd::core::detail {

// The O(n log n) path: the product S(z) X(z) by an additive FFT over GF(2^64) (gf2x_fft.hpp)
// on 32-bit chunks (a chunk product has degree <= 62, so the field product of two chunks is
// their GF(2)[z] product and the GF(2^64)[y] convolution, overlap-added at 32-bit steps, is
// the GF(2)[z] product). Same preconditions as toeplitz_hash; `kernel` selects the field
// multiply (an unavailable kernel is refused as in toeplitz_hash_clmul). Buffers that held
// key bits are cleansed.
[[nodiscard]] Result<BitVector> toeplitz_hash_fft(const BitVector& seed, const BitVector& input,
                                                  std::size_t output_bits, ClmulKernel kernel);

// log2 of the transform size the FFT path uses for n input and m output bits: the smallest
// 2^k >= the chunk count of the full product, or smaller when the wrap-around modulo the
// subspace polynomial s_k misses the needed coefficients (the middle product). 0 if n or m
// is 0.
[[nodiscard]] unsigned toeplitz_fft_log_size(std::size_t n, std::size_t m);

// Whether toeplitz_hash takes the FFT path for these sizes (else Karatsuba).
[[nodiscard]] bool toeplitz_uses_fft(std::size_t n, std::size_t m);

}  // namespace qkd::core::detail
