// Additive FFT over GF(2^64) for long GF(2)[z] products (the O(n log n) layer of the
// Toeplitz hash). Internal: reachable by tests and benchmarks through qkd::core_internal.
//
// Field: GF(2^64) = GF(2)[x] / (x^64 + x^4 + x^3 + x + 1), an element held as the 64 bits of
// its polynomial. Evaluation points: the span of a Cantor basis beta_0 = 1,
// beta_i^2 + beta_i = beta_{i-1}; the point with index t is omega_t = XOR of beta_i over the
// set bits i of t. With this basis the subspace polynomials s_j (vanishing on
// span(beta_0 .. beta_{j-1})) have coefficients in GF(2): s_j(y) = sum over the bit-subsets
// i of j of y^(2^i), and s_j(beta_i) = beta_{i-j}.
//
// Transform (Lin-Chung-Han, "novel polynomial basis", FOCS 2014, specialised to the Cantor
// basis): a polynomial of degree < 2^k is first written in the basis
// X_i(y) = prod_j s_j(y)^(bit j of i) (a GF(2)-linear change of basis: repeated division by
// the sparse s_j, XORs only), then evaluated at omega_0 .. omega_(2^k - 1) by k levels of
// butterflies with (2^k / 2) k field multiplications in all. The inverse runs the same steps
// backwards. Each twiddle is c(B) = XOR of beta_(i+1) over the set bits i of the block
// index B (the same at every level), read from four byte tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "toeplitz_internal.hpp"

namespace qkd::core::detail {

// Largest transform: 2^26 points (512 MiB per operand); toeplitz_hash never goes near it
// (it caps the FFT path at 2^24 points, see toeplitz.cpp).
inline constexpr unsigned kFftMaxLog = 26;

// Product in GF(2^64), portable (reference for the carry-less kernels).
[[nodiscard]] std::uint64_t gf64_mul(std::uint64_t a, std::uint64_t b);

// beta_i of the Cantor basis, i < 64 (computed once, on first use).
[[nodiscard]] std::uint64_t gf64_cantor_beta(unsigned i);

struct Twiddles;  // byte tables for the twiddles (gf2x_fft.cpp)

// One additive-FFT engine for transforms of 2^lg points with a given carry-less kernel
// (kBest = the widest this CPU runs; an unavailable kernel falls back to the portable one,
// which gives the same bits). Holds no key material.
class AdditiveFft {
 public:
  AdditiveFft(unsigned lg, ClmulKernel kernel);

  [[nodiscard]] unsigned log_size() const { return lg_; }
  [[nodiscard]] std::size_t size() const { return std::size_t{1} << lg_; }

  // Monomial coefficients -> coefficients in the novel basis X_i, in place (and back).
  void to_novel(std::span<std::uint64_t> a) const;
  void from_novel(std::span<std::uint64_t> a) const;
  // Novel-basis coefficients -> values at omega_0 .. omega_(2^lg - 1), in place (and back).
  void forward(std::span<std::uint64_t> a) const;
  void inverse(std::span<std::uint64_t> a) const;
  // a[i] = a[i] * b[i] in GF(2^64).
  void pointwise(std::span<std::uint64_t> a, std::span<const std::uint64_t> b) const;

  struct Kernels;  // the level and pointwise functions of one carry-less kernel

 private:
  unsigned lg_;
  const Kernels* kern_;
  const Twiddles* tw_;
};

// A zero-initialised buffer of words for transforms, cleansed (OPENSSL_cleanse) when freed.
// Buffers from 256 KiB up are 2 MiB-aligned (size rounded up) and offered to the kernel for transparent huge pages
// (Linux madvise): with 4 KiB pages, faulting in 16 MiB costs tens of milliseconds on a VM,
// more than the transform. Throws std::bad_alloc like std::vector.
class WordBuffer {
 public:
  explicit WordBuffer(std::size_t words);
  ~WordBuffer();
  WordBuffer(const WordBuffer&) = delete;
  WordBuffer& operator=(const WordBuffer&) = delete;

  [[nodiscard]] std::span<std::uint64_t> span() { return {data_, words_}; }
  [[nodiscard]] std::uint64_t* data() { return data_; }
  [[nodiscard]] std::size_t size() const { return words_; }

 private:
  std::uint64_t* data_ = nullptr;
  std::size_t words_ = 0;
  std::size_t bytes_ = 0;
};

}  // namespace qkd::core::detail
