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

// The fast path: a carry-less Karatsuba product, O(H^1.585) word operations per square
// block of H = min(n, m) bits (max(n, m) / H blocks), using 512-bit VPCLMULQDQ or 128-bit
// PCLMULQDQ when the CPU has them (checked at run time) and a portable 64 x 64 carry-less
// multiply otherwise. Bit-equal to
// toeplitz_hash_naive. Fails (kInvalidArgument) if seed.size() != n + m - 1, m == 0 or
// n == 0.
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
