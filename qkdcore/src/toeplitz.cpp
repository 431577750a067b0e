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

// roots[h + j] = w_{2h}^j for every power of two h < L (w_{2h} a primitive 2h-th root),
// so the butterflies of a stage with half-length h read roots[h .. 2h).
std::vector<std::uint32_t> make_roots(std::size_t length, bool inverse) {
  std::vector<std::uint32_t> roots(std::max<std::size_t>(length, 2));
  roots[1] = 1;
  for (std::size_t h = 1; h < length; h <<= 1) {
    std::uint32_t w = pow_mod(kRoot, (kMod - 1) / (2 * h));
    if (inverse) {
      w = pow_mod(w, kMod - 2);
    }
    std::uint32_t cur = 1;
    for (std::size_t j = 0; j < h; ++j) {
      roots[h + j] = cur;
      cur = mul_mod(cur, w);
    }
  }
  return roots;
}

void ntt(std::vector<std::uint32_t>& a, const std::vector<std::uint32_t>& roots) {
  const std::size_t n = a.size();
  for (std::size_t i = 1, j = 0; i < n; ++i) {  // bit-reversal permutation
    std::size_t bit = n >> 1;
    for (; (j & bit) != 0; bit >>= 1) {
      j ^= bit;
    }
    j ^= bit;
    if (i < j) {
      std::swap(a[i], a[j]);
    }
  }
  for (std::size_t h = 1; h < n; h <<= 1) {
    const std::uint32_t* w = roots.data() + h;
    for (std::size_t i = 0; i < n; i += 2 * h) {
      std::uint32_t* lo = a.data() + i;
      std::uint32_t* hi = lo + h;
      for (std::size_t j = 0; j < h; ++j) {
        const std::uint32_t u = lo[j];
        const std::uint32_t v = mul_mod(hi[j], w[j]);
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

void fill_bits(std::vector<std::uint32_t>& out, const BitVector& v) {
  const auto words = v.words();
  for (std::size_t w = 0; w < words.size(); ++w) {
    std::uint64_t x = words[w];
    while (x != 0) {
      const int b = std::countr_zero(x);
      out[w * 64 + static_cast<std::size_t>(b)] = 1;
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
  ntt(a, fwd);
  ntt(b, fwd);
  for (std::size_t i = 0; i < len; ++i) {
    a[i] = mul_mod(a[i], b[i]);
  }
  const auto inv = make_roots(len, true);
  ntt(a, inv);
  const std::uint32_t len_inv = pow_mod(static_cast<std::uint32_t>(len % kMod), kMod - 2);
  BitVector out(output_bits);
  for (std::size_t i = 0; i < output_bits; ++i) {
    if ((mul_mod(a[i + n - 1], len_inv) & 1U) != 0) {
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
