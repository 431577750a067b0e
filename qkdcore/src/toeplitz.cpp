#include "qkd/core/toeplitz.hpp"

#include <openssl/crypto.h>

#include <bit>
#include <string>
#include <utility>
#include <vector>

namespace qkd::core {
namespace {

// NTT-friendly prime 119 * 2^23 + 1 with primitive root 3. Coefficients of the integer
// product are at most min(n, m) < 2^23 < p, so the product is exact and its parity is the
// GF(2) result.
constexpr std::uint32_t kMod = 998244353;
constexpr std::uint32_t kRoot = 3;
constexpr std::size_t kMaxLength = std::size_t{1} << 23;

// Montgomery arithmetic modulo kMod with R = 2^32: a value x is held as x R mod p.
constexpr std::uint32_t montgomery_neg_inverse() {
  std::uint32_t inv = kMod;  // Newton iteration for kMod^-1 mod 2^32
  for (int i = 0; i < 5; ++i) {
    inv *= 2U - kMod * inv;
  }
  return 0U - inv;
}
constexpr std::uint32_t kNegInv = montgomery_neg_inverse();
static_assert(kMod * (0U - kNegInv) == 1U);

inline std::uint32_t reduce(std::uint64_t t) {  // t < p * 2^32
  const std::uint32_t m = static_cast<std::uint32_t>(t) * kNegInv;
  const auto r = static_cast<std::uint32_t>((t + static_cast<std::uint64_t>(m) * kMod) >> 32);
  return r >= kMod ? r - kMod : r;
}
inline std::uint32_t mont_mul(std::uint32_t a, std::uint32_t b) {
  return reduce(static_cast<std::uint64_t>(a) * b);
}
// Plain (non-Montgomery) helpers, for the few table set-up values.
std::uint32_t mul_mod(std::uint32_t a, std::uint32_t b) {
  return static_cast<std::uint32_t>(static_cast<std::uint64_t>(a) * b % kMod);
}
std::uint32_t pow_mod(std::uint32_t base, std::uint64_t e) {
  std::uint32_t r = 1;
  while (e > 0) {
    if ((e & 1) != 0) {
      r = mul_mod(r, base);
    }
    base = mul_mod(base, base);
    e >>= 1;
  }
  return r;
}
std::uint32_t to_mont(std::uint32_t x) {
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(x) << 32) % kMod);
}

// roots[h + j] = w_{2h}^j (Montgomery form) for every power of two h < L, w_{2h} a
// primitive 2h-th root of unity (or its inverse), so a stage of half-length h reads
// roots[h .. 2h).
std::vector<std::uint32_t> make_roots(std::size_t length, bool inverse) {
  std::vector<std::uint32_t> roots(std::max<std::size_t>(length, 2));
  for (std::size_t h = 1; h < length; h <<= 1) {
    std::uint32_t w = pow_mod(kRoot, (kMod - 1) / (2 * h));
    if (inverse) {
      w = pow_mod(w, kMod - 2);
    }
    std::uint32_t cur = 1;
    for (std::size_t j = 0; j < h; ++j) {
      roots[h + j] = to_mont(cur);
      cur = mul_mod(cur, w);
    }
  }
  return roots;
}

// Forward transform, decimation in frequency: natural order in, bit-reversed order out.
void ntt_dif(std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& roots) {
  const std::size_t n = a.size();
  for (std::size_t h = n >> 1; h >= 1; h >>= 1) {
    const std::uint32_t* w = roots.data() + h;
    for (std::size_t i = 0; i < n; i += 2 * h) {
      std::uint32_t* lo = a.data() + i;
      std::uint32_t* hi = lo + h;
      for (std::size_t j = 0; j < h; ++j) {
        const std::uint32_t u = lo[j];
        const std::uint32_t v = hi[j];
        const std::uint32_t s = u + v;
        lo[j] = s >= kMod ? s - kMod : s;
        hi[j] = mont_mul(u >= v ? u - v : u + kMod - v, w[j]);
      }
    }
  }
}

// Inverse transform, decimation in time: bit-reversed order in, natural order out.
void ntt_dit(std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& roots) {
  const std::size_t n = a.size();
  for (std::size_t h = 1; h < n; h <<= 1) {
    const std::uint32_t* w = roots.data() + h;
    for (std::size_t i = 0; i < n; i += 2 * h) {
      std::uint32_t* lo = a.data() + i;
      std::uint32_t* hi = lo + h;
      for (std::size_t j = 0; j < h; ++j) {
        const std::uint32_t u = lo[j];
        const std::uint32_t v = mont_mul(hi[j], w[j]);
        const std::uint32_t s = u + v;
        lo[j] = s >= kMod ? s - kMod : s;
        hi[j] = u >= v ? u - v : u + kMod - v;
      }
    }
  }
}

Status check_sizes(const BitVector& seed, const BitVector& input, std::size_t m) {
  const std::size_t n = input.size();
  if (n == 0 || m == 0) {
    return make_error(ErrorCode::kInvalidArgument, "Toeplitz hash: empty input or output");
  }
  if (seed.size() != n + m - 1) {
    return make_error(ErrorCode::kInvalidArgument,
                      "Toeplitz hash: seed has " + std::to_string(seed.size()) +
                          " bits, needs n + m - 1 = " + std::to_string(n + m - 1));
  }
  return ok_status();
}

// Writes 1 (in Montgomery form) at every set bit.
void fill_bits(std::vector<std::uint32_t>& out, const BitVector& v) {
  const std::uint32_t one = to_mont(1);
  const auto words = v.words();
  for (std::size_t w = 0; w < words.size(); ++w) {
    std::uint64_t x = words[w];
    while (x != 0) {
      const int b = std::countr_zero(x);
      out[w * 64 + static_cast<std::size_t>(b)] = one;
      x &= x - 1;
    }
  }
}

}  // namespace

Result<BitVector> toeplitz_hash(const BitVector& seed, const BitVector& input,
                                std::size_t output_bits) {
  if (Status s = check_sizes(seed, input, output_bits); !s.ok()) {
    return s.error();
  }
  const std::size_t n = input.size();
  const std::size_t need = n + output_bits - 1;
  if (need > kMaxLength) {
    return make_error(ErrorCode::kInvalidArgument,
                      "Toeplitz hash: n + m - 1 exceeds 2^23 bits");
  }
  const std::size_t len = std::bit_ceil(std::max<std::size_t>(need, 2));
  // Cyclic convolution of length len >= n + m - 1: the wrapped terms land below index
  // n - 1, so the coefficients n-1 .. n+m-2 we read are exact.
  std::vector<std::uint32_t> a(len, 0);
  std::vector<std::uint32_t> b(len, 0);
  fill_bits(a, seed);
  fill_bits(b, input);
  const auto fwd = make_roots(len, false);
  ntt_dif(a, fwd);
  ntt_dif(b, fwd);
  for (std::size_t i = 0; i < len; ++i) {  // pointwise, both in bit-reversed order
    a[i] = mont_mul(a[i], b[i]);
  }
  const auto inv = make_roots(len, true);
  ntt_dit(a, inv);
  // mont_mul(x R, len^-1) = x len^-1: leaves Montgomery form and divides by len at once.
  const std::uint32_t len_inv = pow_mod(static_cast<std::uint32_t>(len % kMod), kMod - 2);
  BitVector out(output_bits);
  for (std::size_t i = 0; i < output_bits; ++i) {
    if ((mont_mul(a[i + n - 1], len_inv) & 1U) != 0) {
      out.set(i, true);
    }
  }
  // The transforms of the input are key-dependent: wipe them.
  OPENSSL_cleanse(a.data(), a.size() * sizeof(std::uint32_t));
  OPENSSL_cleanse(b.data(), b.size() * sizeof(std::uint32_t));
  return out;
}

Result<BitVector> toeplitz_hash_naive(const BitVector& seed, const BitVector& input,
                                      std::size_t output_bits) {
  if (Status s = check_sizes(seed, input, output_bits); !s.ok()) {
    return s.error();
  }
  const std::size_t n = input.size();
  BitVector out(output_bits);
  for (std::size_t i = 0; i < output_bits; ++i) {
    bool acc = false;
    for (std::size_t j = 0; j < n; ++j) {
      acc ^= seed.get(i + n - 1 - j) && input.get(j);
    }
    out.set(i, acc);
  }
  return out;
}

}  // namespace qkd::core
