// Toeplitz hashing over GF(2): the 2-universal family used for privacy amplification and
// (with a short output) for key verification.
//
// For an input x of n bits and a seed s of n + m - 1 bits, the output y has m bits:
//   y_i = XOR_{j=0}^{n-1} s[i + n - 1 - j] * x_j,   0 <= i < m.
// That is the matrix T[i][j] = s[i - j + n - 1] (constant along diagonals) times x, and
// equally bits n-1 .. n+m-2 of the GF(2) polynomial product S(z) X(z).
#pragma once

#include <cstddef>

#include "qkd/core/bit_vector.hpp"
#include "qkd/core/result.hpp"

namespace qkd::core {

// The fast path, bit-equal to toeplitz_hash_naive. Two algorithms, chosen per call by a
// cost model fitted to measurements (detail::toeplitz_uses_fft; with m = n / 2 the FFT is
// taken from about n = 4e5 bits):
//  - a transposed carry-less Karatsuba product, O(H^1.585) word operations per square block
//    of H = min(n, m) bits (max(n, m) / H blocks): small blocks and short outputs such as
//    verification tags;
//  - an additive FFT over GF(2^64) (Cantor basis, Lin-Chung-Han novel polynomial basis) on
//    32-bit chunks, O(N log N) for N = n + m: large square-ish blocks (1e6 - 1e7 bits and up,
//    to 2^24 chunks; beyond that Karatsuba again).
// Both use 512-bit VPCLMULQDQ or 128-bit PCLMULQDQ when the CPU has them (checked at run
// time) and a portable carry-less multiply otherwise (same bits). Buffers that held key bits
// are cleansed. Fails (kInvalidArgument) if seed.size() != n + m - 1, m == 0 or n == 0.
[[nodiscard]] Result<BitVector> toeplitz_hash(const BitVector& seed, const BitVector& input,
                                              std::size_t output_bits);

// The previous fast path, kept for comparison: integer convolution by a number-theoretic
// transform modulo 998244353 over a cyclic length >= n + m - 1, then parity of the needed
// coefficients. Same preconditions, plus n + m - 1 <= 2^23 (the transform length limit).
[[nodiscard]] Result<BitVector> toeplitz_hash_ntt(const BitVector& seed, const BitVector& input,
                                                  std::size_t output_bits);

// The bit-by-bit reference, O(n m); for tests. Same preconditions (without the size cap).
[[nodiscard]] Result<BitVector> toeplitz_hash_naive(const BitVector& seed,
                                                    const BitVector& input,
                                                    std::size_t output_bits);

}  // namespace qkd::core
