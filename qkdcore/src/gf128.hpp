// Arithmetic in GF(2^128) and the polynomial-evaluation hash that Wegman-Carter
// authentication uses (internal).
//
// Field: GF(2)[x] / (x^128 + x^7 + x^2 + x + 1). An element is 16 bytes, little-endian in
// both bytes and bits: bit j of byte i is the coefficient of x^(8i + j). (This is the plain
// polynomial convention, not GCM's bit-reflected one, so GHASH vectors do not apply.)
//
// poly_hash(H, m): split m into 16-byte blocks m_1..m_n (the last zero-padded), append the
// length block L (bit length of m as u64 little-endian, then 8 zero bytes) and evaluate
//   h = m_1 H^(n+1) + m_2 H^n + ... + m_n H^2 + L H
// by Horner's rule. For two different messages of at most n blocks, h(m) - h(m') is a
// nonzero polynomial in H of degree <= n + 1 without constant term, so for any fixed
// difference d, Pr_H[h(m) + h(m') = d] <= (n + 1) / 2^128: the family is
// epsilon-almost-XOR-universal. Truncating h to t bits keeps it (n + 1) / 2^t-AXU. XOR-ing
// a fresh uniform pad onto the (truncated) hash gives an epsilon-almost strongly universal
// family (Wegman-Carter 1981; Krawczyk 1994); see channel.hpp.
#pragma once

#include <array>
#include <cstdint>
#include <span>

namespace qkd::core::detail {

struct Gf128 {
  std::uint64_t lo = 0;  // coefficients of x^0 .. x^63
  std::uint64_t hi = 0;  // coefficients of x^64 .. x^127
  friend bool operator==(const Gf128&, const Gf128&) = default;
};

[[nodiscard]] Gf128 gf128_load(std::span<const std::uint8_t, 16> bytes);
void gf128_store(std::span<std::uint8_t, 16> out, Gf128 v);

// Bitwise reference multiplication (constant time: masks, no data-dependent branches).
[[nodiscard]] Gf128 gf128_mul_portable(Gf128 a, Gf128 b);
// Carry-less-multiply (PCLMULQDQ) version. Call only when gf128_has_clmul() is true.
[[nodiscard]] Gf128 gf128_mul_clmul(Gf128 a, Gf128 b);
// Whether this CPU has PCLMULQDQ (checked once at run time; false off x86-64).
[[nodiscard]] bool gf128_has_clmul();
// The fastest available multiplication.
[[nodiscard]] Gf128 gf128_mul(Gf128 a, Gf128 b);

enum class Gf128Impl : std::uint8_t { kAuto, kPortable, kClmul };
// The polynomial hash above. kClmul falls back to kPortable on a CPU without PCLMULQDQ.
[[nodiscard]] std::array<std::uint8_t, 16> poly_hash(std::span<const std::uint8_t, 16> key,
                                                     std::span<const std::uint8_t> message,
                                                     Gf128Impl impl = Gf128Impl::kAuto);

// The Wegman-Carter tag: the first tag_bytes (8 or 16) bytes of poly_hash(hash_key,
// message) XOR pad.
[[nodiscard]] std::array<std::uint8_t, 16> wegman_carter_tag(
    std::span<const std::uint8_t, 16> hash_key, std::span<const std::uint8_t, 16> pad,
    std::size_t tag_bytes, std::span<const std::uint8_t> message,
    Gf128Impl impl = Gf128Impl::kAuto);

// poly_hash evaluated incrementally: after update(a), update(b), ... finish() equals
// poly_hash(key, a || b || ...). Used for the Wegman-Carter transcript tags (channel.hpp):
// a direction's frames are absorbed as they are sent or received, the tag is taken at a
// checkpoint. Key and state are cleansed on destruction and by reset().
class PolyHasher {
 public:
  PolyHasher() = default;
  explicit PolyHasher(std::span<const std::uint8_t, 16> key) { reset(key); }
  ~PolyHasher() { wipe(); }
  PolyHasher(const PolyHasher&) = delete;
  PolyHasher& operator=(const PolyHasher&) = delete;
  void reset(std::span<const std::uint8_t, 16> key);
  void update(std::span<const std::uint8_t> data);
  [[nodiscard]] std::array<std::uint8_t, 16> finish() const;
  [[nodiscard]] std::uint64_t bytes() const { return total_; }

 private:
  void wipe();
  Gf128 h_{};
  std::array<Gf128, 3> h_powers_{};  // h^2, h^3, h^4: four blocks per step (see update)
  Gf128 acc_{};
  std::array<std::uint8_t, 16> buf_{};
  std::size_t buf_len_ = 0;
  std::uint64_t total_ = 0;
};

}  // namespace qkd::core::detail
