#include "qkd/core/toeplitz.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <wmmintrin.h>
#define QKD_HAVE_X86_CLMUL 1
#endif

#include "gf2x_fft.hpp"
#include "toeplitz_internal.hpp"

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

Result<BitVector> toeplitz_hash_ntt(const BitVector& seed, const BitVector& input,
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

namespace {

// ---------------------------------------------------------------------------------------
// Carry-less (GF(2)[z]) Toeplitz matrix-vector product.
//
// A square Toeplitz block of H = 64 W bits is given by its defining vector t of 2H - 1
// bits (held in 2W words; the top bit is never read): T[i][j] = t[i - j + H - 1], and
// y = T x is bits H-1 .. 2H-2 of the polynomial product t(z) x(z) (a "middle product").
//
// Split H = 2h: T = [[A, B], [C, A]] with Toeplitz blocks A = t[h, 3h), B = t[0, 2h),
// C = t[2h, 4h). Then, over GF(2),
//   P = A (x0 + x1),  y0 = P + (B + A) x1,  y1 = P + (C + A) x0,
// three half-size products instead of four (the transposed Karatsuba step), so the cost is
// O(H^1.585) word operations. Odd word counts are padded by one zero word.
// ---------------------------------------------------------------------------------------
using Word = std::uint64_t;
using BaseFn = void (*)(const Word* t, const Word* x, Word* y, std::size_t w);

// Base cases up to this many words use a schoolbook middle product.
constexpr std::size_t kBaseWords = 16;
// The 512-bit kernel does four products per instruction, so a larger base case pays.
constexpr std::size_t kWideBaseWords = 64;

// Portable 64 x 64 -> 128 carry-less multiply (one bit of b at a time).
inline void clmul_portable(Word a, Word b, Word& lo, Word& hi) {
  lo = 0;
  hi = 0;
  for (unsigned i = 0; i < 64; ++i) {
    const Word m = Word{0} - ((b >> i) & 1U);
    lo ^= (a << i) & m;
    hi ^= (i == 0 ? 0 : (a >> (64 - i))) & m;
  }
}

// y (W words) = bits 64W-1 .. 128W-2 of t (2W words) * x (W words). Diagonal s collects
// every product t_a x_b with a + b = s; word j of the product is lo(D_j) ^ hi(D_{j-1}).
// Only diagonals W-2 .. 2W-1 reach the needed words.
void base_portable(const Word* t, const Word* x, Word* y, std::size_t w) {
  Word acc[kBaseWords + 2] = {};  // product words w-1 .. 2w
  for (std::size_t b = 0; b < w; ++b) {
    for (std::size_t a = 0; a < 2 * w; ++a) {
      const std::size_t s = a + b;
      if (s + 2 < w || s > 2 * w - 1) {
        continue;
      }
      Word lo = 0;
      Word hi = 0;
      clmul_portable(t[a], x[b], lo, hi);
      if (s + 1 >= w) {
        acc[s + 1 - w] ^= lo;
      }
      if (s + 2 <= 2 * w) {
        acc[s + 2 - w] ^= hi;
      }
    }
  }
  for (std::size_t k = 0; k < w; ++k) {
    y[k] = (acc[k] >> 63) | (acc[k + 1] << 1);
  }
}

#if defined(QKD_HAVE_X86_CLMUL)
__attribute__((target("pclmul,sse4.1"))) void base_pclmul(const Word* t, const Word* x, Word* y,
                                                          std::size_t w) {
  // diag[s - (w - 2)] = XOR of clmul(t_a, x_b), a + b = s, for s in [w-2, 2w-1].
  __m128i diag[kBaseWords + 2];
  __m128i xv[kBaseWords];
  __m128i tv[2 * kBaseWords];
  for (std::size_t b = 0; b < w; ++b) {
    xv[b] = _mm_cvtsi64_si128(static_cast<long long>(x[b]));
  }
  for (std::size_t a = 0; a < 2 * w; ++a) {
    tv[a] = _mm_cvtsi64_si128(static_cast<long long>(t[a]));
  }
  for (std::size_t d = 0; d < w + 2; ++d) {
    const std::size_t s = d + w - 2;  // may wrap for w == 1 (s = -1): no products then
    __m128i acc = _mm_setzero_si128();
    if (w >= 2 || d >= 1) {
      const std::size_t b_lo = s >= 2 * w - 1 ? s - (2 * w - 1) : 0;
      const std::size_t b_hi = std::min(s, w - 1);
      for (std::size_t b = b_lo; b <= b_hi; ++b) {
        acc = _mm_xor_si128(acc, _mm_clmulepi64_si128(tv[s - b], xv[b], 0x00));
      }
    }
    diag[d] = acc;
  }
  // Product word j (j = w-1 .. 2w) = lo(diag for s = j) ^ hi(diag for s = j - 1).
  Word words[kBaseWords + 2];
  for (std::size_t j = 0; j < w + 2; ++j) {  // word index w - 1 + j
    const std::size_t d_lo = j + 1;           // s = w - 1 + j -> d = j + 1
    const Word lo = d_lo < w + 2 ? static_cast<Word>(_mm_cvtsi128_si64(diag[d_lo])) : 0;
    const Word hi = static_cast<Word>(_mm_extract_epi64(diag[j], 1));
    words[j] = lo ^ hi;
  }
  for (std::size_t k = 0; k < w; ++k) {
    y[k] = (words[k] >> 63) | (words[k + 1] << 1);
  }
}

// The same base case on 512-bit VPCLMULQDQ (AVX-512), four carry-less products per
// instruction. For each x word b, the products t[a] x[b] that reach the needed diagonals
// are a = c - 2 - b + j, j = 0 .. c + 1 (diagonal index j): a contiguous window of t, read
// as 8-word vectors; imm 0x00 multiplies the even words of the window (diagonals j even),
// imm 0x01 the odd words. t is copied behind one zero word so that a = -1 (b = c - 1,
// j = 0) reads zero, and zero-padded past 2c so that whole vectors stay in the buffer.
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1"))) void base_vpclmul(
    const Word* t, const Word* x, Word* y, std::size_t w) {
  constexpr std::size_t kVecs = (kWideBaseWords + 2 + 7) / 8;  // 8-word windows over j
  alignas(64) Word tb[kWideBaseWords + 8 * kVecs + 8] = {};
  std::memcpy(tb + 1, t, 2 * w * sizeof(Word));
  const std::size_t nv = (w + 2 + 7) / 8;
  __m512i even[kVecs];
  __m512i odd[kVecs];
  for (std::size_t v = 0; v < kVecs; ++v) {
    even[v] = _mm512_setzero_si512();
    odd[v] = _mm512_setzero_si512();
  }
  for (std::size_t b = 0; b < w; ++b) {
    const __m512i xb = _mm512_set1_epi64(static_cast<long long>(x[b]));
    const Word* win = tb + (w - 1 - b);  // tb[1 + a] = t[a], a = w - 2 - b + j
    for (std::size_t v = 0; v < nv; ++v) {
      const __m512i tv = _mm512_loadu_si512(win + 8 * v);
      even[v] = _mm512_xor_si512(even[v], _mm512_clmulepi64_epi128(tv, xb, 0x00));
      odd[v] = _mm512_xor_si512(odd[v], _mm512_clmulepi64_epi128(tv, xb, 0x01));
    }
  }
  // diag[2 j] = (lo, hi) of diagonal j.
  alignas(64) Word diag[2 * 8 * kVecs];
  for (std::size_t v = 0; v < nv; ++v) {
    alignas(64) Word e[8];
    alignas(64) Word o[8];
    _mm512_store_si512(e, even[v]);
    _mm512_store_si512(o, odd[v]);
    for (std::size_t i = 0; i < 4; ++i) {
      const std::size_t j = 8 * v + 2 * i;
      diag[2 * j] = e[2 * i];
      diag[2 * j + 1] = e[2 * i + 1];
      diag[2 * j + 2] = o[2 * i];
      diag[2 * j + 3] = o[2 * i + 1];
    }
  }
  // Product word w - 1 + j = lo(diagonal j + 1) ^ hi(diagonal j), j = 0 .. w + 1.
  Word words[kWideBaseWords + 2];
  for (std::size_t j = 0; j < w + 2; ++j) {
    const Word lo = j + 1 < w + 2 ? diag[2 * (j + 1)] : 0;
    words[j] = lo ^ diag[2 * j + 1];
  }
  for (std::size_t k = 0; k < w; ++k) {
    y[k] = (words[k] >> 63) | (words[k + 1] << 1);
  }
}
#endif

std::size_t tmvp_scratch_words(std::size_t w, std::size_t cutoff) {
  if (w <= cutoff) {
    return 0;
  }
  if ((w & 1U) != 0) {
    return 4 * w + 4 + tmvp_scratch_words(w + 1, cutoff);
  }
  return 2 * w + tmvp_scratch_words(w / 2, cutoff);
}

// Carry-less word products of the schoolbook base case on c words (pairs (a, b) with
// a < 2c, b < c and a + b in [c - 2, 2c - 1]).
std::uint64_t base_products(std::size_t c) {
  std::uint64_t count = 0;
  for (std::size_t b = 0; b < c; ++b) {
    for (std::size_t a = 0; a < 2 * c; ++a) {
      if (a + b + 2 >= c && a + b <= 2 * c - 1) {
        ++count;
      }
    }
  }
  return count;
}

// The block shape of the Karatsuba recursion for a Toeplitz block of at least w words:
// padded size c 2^k with base-case size c, minimising the modelled cost 3^k base_cost(c).
// Padding once at the top keeps every level even (the recursion still pads odd levels,
// but none occur). Base-case costs, in units of about one 128-bit carry-less product:
//  - 128-bit kernels: base_products(c), for c in (kBaseWords / 2, kBaseWords] (smaller
//    bases save products but the recursion's XOR passes then cost more: measured);
//  - 512-bit kernel: c rows of ceil((c + 2) / 8) pairs of 4-product instructions plus
//    about 2c for the copy-in and extraction, for c in [8, kWideBaseWords].
struct BlockShape {
  std::size_t words;   // c 2^k >= w
  std::size_t cutoff;  // c
};
BlockShape block_shape(std::size_t w, bool wide) {
  const std::size_t max_c = wide ? kWideBaseWords : kBaseWords;
  const std::size_t min_c = wide ? 8 : kBaseWords / 2 + 1;
  if (w <= max_c) {
    return {w, w};
  }
  BlockShape best{0, 0};
  double best_cost = 0;
  double pow3 = 1;
  for (std::size_t k = 0; (w >> k) != 0; ++k, pow3 *= 3) {
    const std::size_t c = ((w - 1) >> k) + 1;  // ceil(w / 2^k)
    if (c > max_c || c < min_c) {
      continue;
    }
    const double base = wide ? static_cast<double>(2 * c * ((c + 2 + 7) / 8) + 2 * c)
                             : static_cast<double>(base_products(c));
    const double cost = pow3 * base;
    if (best.words == 0 || cost < best_cost) {
      best = {c << k, c};
      best_cost = cost;
    }
  }
  return best;
}

void tmvp(BaseFn base, const Word* t, const Word* x, Word* y, std::size_t w, Word* scratch,
          std::size_t cutoff) {
  if (w <= cutoff) {
    base(t, x, y, w);
    return;
  }
  if ((w & 1U) != 0) {
    // T' = T shifted one word down the diagonal: t' = [0, t, 0], x' = [x, 0].
    Word* tp = scratch;
    Word* xp = tp + 2 * w + 2;
    Word* yp = xp + w + 1;
    tp[0] = 0;
    std::memcpy(tp + 1, t, 2 * w * sizeof(Word));
    tp[2 * w + 1] = 0;
    std::memcpy(xp, x, w * sizeof(Word));
    xp[w] = 0;
    tmvp(base, tp, xp, yp, w + 1, yp + w + 1, cutoff);
    std::memcpy(y, yp, w * sizeof(Word));
    return;
  }
  const std::size_t h = w / 2;
  Word* xs = scratch;
  Word* p = xs + h;
  Word* td = p + h;
  Word* rest = td + 2 * h;
  for (std::size_t i = 0; i < h; ++i) {
    xs[i] = x[i] ^ x[h + i];
  }
  tmvp(base, t + h, xs, p, h, rest, cutoff);  // P = A (x0 + x1)
  for (std::size_t i = 0; i < 2 * h; ++i) {
    td[i] = t[i] ^ t[h + i];  // B + A
  }
  tmvp(base, td, x + h, y, h, rest, cutoff);
  for (std::size_t i = 0; i < 2 * h; ++i) {
    td[i] = t[2 * h + i] ^ t[h + i];  // C + A
  }
  tmvp(base, td, x, y + h, h, rest, cutoff);
  for (std::size_t i = 0; i < h; ++i) {
    y[i] ^= p[i];
    y[h + i] ^= p[i];
  }
}

// 64 bits of v starting at bit `pos` (may be negative); bits outside the vector read 0.
Word bits_at(std::span<const Word> v, std::int64_t pos) {
  const auto nw = static_cast<std::int64_t>(v.size());
  if (pos <= -64 || pos >= 64 * nw) {
    return 0;
  }
  if (pos < 0) {
    return v[0] << static_cast<unsigned>(-pos);
  }
  const auto q = static_cast<std::size_t>(pos >> 6);
  const auto sh = static_cast<unsigned>(pos & 63);
  Word r = v[q] >> sh;
  if (sh != 0 && q + 1 < v.size()) {
    r |= v[q + 1] << (64 - sh);
  }
  return r;
}

BaseFn base_vpclmul_or_null() {
#if defined(QKD_HAVE_X86_CLMUL)
  return base_vpclmul;
#else
  return nullptr;
#endif
}

bool cpu_has(detail::ClmulKernel k) {
#if defined(QKD_HAVE_X86_CLMUL)
  static const bool pclmul =
      __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  static const bool vpclmul = pclmul && __builtin_cpu_supports("avx512f") &&
                              __builtin_cpu_supports("vpclmulqdq");
  switch (k) {
    case detail::ClmulKernel::kPortable:
    case detail::ClmulKernel::kBest:
      return true;
    case detail::ClmulKernel::kPclmul:
      return pclmul;
    case detail::ClmulKernel::kVpclmul:
      return vpclmul;
  }
  return false;
#else
  return k == detail::ClmulKernel::kPortable || k == detail::ClmulKernel::kBest;
#endif
}

// The requested kernel, or (kBest) the widest one this CPU runs.
BaseFn select_base(detail::ClmulKernel k) {
#if defined(QKD_HAVE_X86_CLMUL)
  if (k == detail::ClmulKernel::kBest) {
    k = cpu_has(detail::ClmulKernel::kVpclmul)  ? detail::ClmulKernel::kVpclmul
        : cpu_has(detail::ClmulKernel::kPclmul) ? detail::ClmulKernel::kPclmul
                                                : detail::ClmulKernel::kPortable;
  }
  if (k == detail::ClmulKernel::kVpclmul) {
    return base_vpclmul;
  }
  if (k == detail::ClmulKernel::kPclmul) {
    return base_pclmul;
  }
#else
  (void)k;
#endif
  return base_portable;
}

void cleanse_words(std::vector<Word>& v) {
  if (!v.empty()) {
    OPENSSL_cleanse(v.data(), v.size() * sizeof(Word));
  }
}

}  // namespace

namespace detail {

bool clmul_kernel_available(ClmulKernel kernel) { return cpu_has(kernel); }

Result<BitVector> toeplitz_hash_clmul(const BitVector& seed, const BitVector& input,
                                      std::size_t output_bits, bool allow_pclmul) {
  return toeplitz_hash_clmul(seed, input, output_bits,
                             allow_pclmul && cpu_has(ClmulKernel::kPclmul) ? ClmulKernel::kPclmul
                                                                    : ClmulKernel::kPortable);
}

// check_sizes, and the kernel must be one this CPU has.
static Status check_request(const BitVector& seed, const BitVector& input,
                            std::size_t output_bits, ClmulKernel kernel) {
  if (Status s = check_sizes(seed, input, output_bits); !s.ok()) {
    return s;
  }
  if (!cpu_has(kernel)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "Toeplitz hash: the requested carry-less kernel needs a CPU feature "
                      "this machine lacks");
  }
  return qkd::core::ok_status();
}

Result<BitVector> toeplitz_hash_clmul(const BitVector& seed, const BitVector& input,
                                      std::size_t output_bits, ClmulKernel kernel) {
  if (Status s = check_request(seed, input, output_bits, kernel); !s.ok()) {
    return s.error();
  }
  const BaseFn base = select_base(kernel);
  const std::size_t n = input.size();
  const std::size_t m = output_bits;
  // Square blocks of H = 64 w bits, H >= min(n, m): one row of blocks when m <= n,
  // one column when m > n.
  const BlockShape shape =
      block_shape((std::min(n, m) + 63) / 64, base == base_vpclmul_or_null());
  const std::size_t w = shape.words;
  const std::size_t hb = 64 * w;
  const std::size_t rows = (m + hb - 1) / hb;
  const std::size_t cols = (n + hb - 1) / hb;
  std::vector<Word> out(rows * w, 0);
  std::vector<Word> t(2 * w);
  std::vector<Word> x(w);
  std::vector<Word> y(w);
  std::vector<Word> scratch(tmvp_scratch_words(w, shape.cutoff));
  const auto sw = seed.words();
  const auto xw = input.words();
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t c = 0; c < cols; ++c) {
      // Block (r, c): T[i][j] = s[(r H + i) - (c H + j) + n - 1] = t[i - j + H - 1].
      const auto origin = static_cast<std::int64_t>(r * hb) - static_cast<std::int64_t>(c * hb) +
                          static_cast<std::int64_t>(n) - static_cast<std::int64_t>(hb);
      for (std::size_t k = 0; k < 2 * w; ++k) {
        t[k] = bits_at(sw, origin + static_cast<std::int64_t>(64 * k));
      }
      for (std::size_t k = 0; k < w; ++k) {
        const std::size_t src = c * w + k;
        x[k] = src < xw.size() ? xw[src] : 0;  // bits past n are zero (clear tail)
      }
      tmvp(base, t.data(), x.data(), y.data(), w, scratch.data(), shape.cutoff);
      for (std::size_t k = 0; k < w; ++k) {
        out[r * w + k] ^= y[k];
      }
    }
  }
  BitVector result(m);
  const auto rw = result.mutable_words();
  std::copy_n(out.begin(), rw.size(), rw.begin());
  result.clear_tail();
  cleanse_words(out);
  cleanse_words(x);
  cleanse_words(y);
  cleanse_words(scratch);
  return result;
}

// ---------------------------------------------------------------------------------------
// The FFT path. S (n + m - 1 bits) and X (n bits) are cut into 32-bit chunks, the chunk
// sequences multiplied in GF(2^64)[y] by the additive FFT (to the novel basis, evaluate,
// multiply pointwise, interpolate, back to monomials), and output bit i is bit n - 1 + i of
// sum_c P_c z^(32 c) (each P_c has 63 bits, so neighbouring chunks overlap by 31 bits).
// The transform computes P modulo s_k (degree L = 2^k); coefficients below L and at or above
// D - L + 2^imax (D = product length, 2^imax the largest lower term of s_k) are exact, so a
// transform shorter than the full product suffices when the needed chunks lie there.
// ---------------------------------------------------------------------------------------
namespace {

struct FftShape {
  std::size_t chunks_s;  // chunks of S
  std::size_t chunks_x;  // chunks of X
  std::size_t need_lo;   // first chunk that reaches bit n - 1
  std::size_t need_hi;   // last chunk that starts at or below bit n + m - 2
  unsigned lg;           // log2 L
};

FftShape fft_shape(std::size_t n, std::size_t m) {
  FftShape f{};
  f.chunks_s = (n + m - 1 + 31) / 32;
  f.chunks_x = (n + 31) / 32;
  f.need_lo = n - 1 > 62 ? (n - 1 - 62 + 31) / 32 : 0;
  f.need_hi = (n + m - 2) / 32;
  const std::size_t d = f.chunks_s + f.chunks_x - 1;
  for (unsigned k = 0; k < 64; ++k) {
    const std::size_t l = std::size_t{1} << k;
    if (l < f.chunks_s || l < f.chunks_x || f.need_hi >= l) {
      continue;
    }
    if (d <= l) {
      f.lg = k;
      return f;
    }
    if (k >= 1 && f.need_lo + l >= d + (std::size_t{1} << (k & (k - 1)))) {
      f.lg = k;
      return f;
    }
  }
  f.lg = 64;  // unreachable for sizes that fit in memory
  return f;
}

// Largest transform toeplitz_hash uses (2 x 128 MiB); larger inputs take Karatsuba.
constexpr unsigned kFftMaxUsedLog = 24;

// The two transform buffers of one call. Both hold key bits (or their transforms) and are
// cleansed before the call returns. Up to kKeptWords words each (2 x 16 MiB, n + m up to
// about 3e7 bits) they are kept per thread between calls: allocating and faulting in fresh
// pages costs more than the whole transform at 1e5 - 1e6 bits on the benchmark VM (about
// 15 us per 4 KiB page fault). Larger transforms allocate per call.
constexpr std::size_t kKeptWords = std::size_t{1} << 21;

class FftBuffers {
 public:
  explicit FftBuffers(std::size_t len) : len_(len) {
    if (len > kKeptWords) {
      own_a_ = std::make_unique<WordBuffer>(len);
      own_b_ = std::make_unique<WordBuffer>(len);
      a_ = own_a_.get();
      b_ = own_b_.get();
      return;
    }
    thread_local std::unique_ptr<WordBuffer> kept_a;
    thread_local std::unique_ptr<WordBuffer> kept_b;
    if (!kept_a || kept_a->size() < len) {
      kept_a.reset();  // cleansed when freed
      kept_b.reset();
      const std::size_t keep = std::max<std::size_t>(len, 4096);
      kept_a = std::make_unique<WordBuffer>(keep);
      kept_b = std::make_unique<WordBuffer>(keep);
    }
    a_ = kept_a.get();
    b_ = kept_b.get();
    std::memset(a_->data(), 0, len * sizeof(Word));
    std::memset(b_->data(), 0, len * sizeof(Word));
  }
  ~FftBuffers() {
    OPENSSL_cleanse(a_->data(), len_ * sizeof(Word));
    OPENSSL_cleanse(b_->data(), len_ * sizeof(Word));
  }
  FftBuffers(const FftBuffers&) = delete;
  FftBuffers& operator=(const FftBuffers&) = delete;

  [[nodiscard]] std::span<Word> a() { return a_->span().first(len_); }
  [[nodiscard]] std::span<Word> b() { return b_->span().first(len_); }

 private:
  std::size_t len_;
  std::unique_ptr<WordBuffer> own_a_;
  std::unique_ptr<WordBuffer> own_b_;
  WordBuffer* a_ = nullptr;
  WordBuffer* b_ = nullptr;
};

}  // namespace

unsigned toeplitz_fft_log_size(std::size_t n, std::size_t m) {
  if (n == 0 || m == 0) {
    return 0;
  }
  return fft_shape(n, m).lg;
}

Result<BitVector> toeplitz_hash_fft(const BitVector& seed, const BitVector& input,
                                    std::size_t output_bits, ClmulKernel kernel) {
  if (Status s = check_request(seed, input, output_bits, kernel); !s.ok()) {
    return s.error();
  }
  const std::size_t n = input.size();
  const std::size_t m = output_bits;
  const FftShape shape = fft_shape(n, m);
  static_assert(kFftMaxLog == 26, "keep the error message in step");
  if (shape.lg > kFftMaxLog) {
    return make_error(ErrorCode::kInvalidArgument,
                      "Toeplitz hash: input too large for the FFT path (more than 2^26 "
                      "chunks of 32 bits)");
  }
  const AdditiveFft fft(shape.lg, kernel);
  const std::size_t len = fft.size();
  // Chunk c of a bit vector of `bits` bits (bits past the end read as 0).
  const auto chunk = [](std::span<const Word> w, std::size_t bits, std::size_t c) -> Word {
    Word v = (w[c >> 1] >> (32 * (c & 1))) & 0xffffffffULL;
    const std::size_t end = 32 * (c + 1);
    if (end > bits) {
      v &= (Word{1} << (32 - (end - bits))) - 1;
    }
    return v;
  };
  FftBuffers buffers(len);
  const std::span<Word> a = buffers.a();
  const std::span<Word> b = buffers.b();
  const auto sw = seed.words();
  const auto xw = input.words();
  // The change to the novel basis only XORs whole words, so S (low halves) and X (high
  // halves) go through it together in one buffer, and are then split.
  for (std::size_t c = 0; c < shape.chunks_s; ++c) {
    a[c] = chunk(sw, n + m - 1, c);
  }
  for (std::size_t c = 0; c < shape.chunks_x; ++c) {
    a[c] |= chunk(xw, n, c) << 32;
  }
  fft.to_novel(a);
  for (std::size_t i = 0; i < len; ++i) {
    b[i] = a[i] >> 32;
    a[i] &= 0xffffffffULL;
  }
  fft.forward(a);
  fft.forward(b);
  fft.pointwise(a, b);
  fft.inverse(a);
  fft.from_novel(a);
  // Word q of the product (bits 64 q .. 64 q + 63); chunks outside [0, L) read as 0.
  const auto at = [&](std::size_t c) -> Word { return c < len ? a[c] : 0; };
  const auto product_word = [&](std::size_t q) -> Word {
    return at(2 * q) ^ (at(2 * q + 1) << 32) ^ (q > 0 ? at(2 * q - 1) >> 32 : 0);
  };
  BitVector result(m);
  const auto rw = result.mutable_words();
  const std::size_t sh = (n - 1) & 63;
  for (std::size_t w = 0; w < rw.size(); ++w) {
    const std::size_t q = (n - 1 + 64 * w) >> 6;
    Word v = product_word(q) >> sh;
    if (sh != 0) {
      v |= product_word(q + 1) << (64 - sh);
    }
    rw[w] = v;
  }
  result.clear_tail();
  return result;
}

// Modelled cost of the Karatsuba path in units of its base-case cost model (block_shape):
// blocks x 3^k x base(c).
double karatsuba_units(std::size_t n, std::size_t m, bool wide) {
  const BlockShape shape = block_shape((std::min(n, m) + 63) / 64, wide);
  const std::size_t hb = 64 * shape.words;
  const double blocks = static_cast<double>(((m + hb - 1) / hb) * ((n + hb - 1) / hb));
  const std::size_t c = shape.cutoff;
  double levels = 1;
  for (std::size_t w = shape.words; w > c; w /= 2) {
    levels *= 3;
  }
  const double base = wide ? static_cast<double>(2 * c * ((c + 2 + 7) / 8) + 2 * c)
                           : static_cast<double>(base_products(c));
  return blocks * levels * base;
}

// The dispatch: modelled CPU time of each path, fitted to measurements on the benchmark
// machine (VPCLMULQDQ kernels; docs/BENCHMARKS.md): Karatsuba about kKaratsubaNsPerUnit per
// unit of karatsuba_units (which follows its padding steps), the FFT path about 1.2 ns per
// point and level plus 20 us. With m = n / 2 the model takes the FFT from about n = 4e5
// (measured, minimum of 15 calls: FFT ahead at 1e5 and 2e5 by 0.04 and 0.22 ms, even at
// 3e5 and 5e5 where the transform has just doubled, ahead from 7e5 on by 2x and more).
// Short outputs (verification tags) stay on Karatsuba, linear in n there. Other kernels
// use the same model (both paths slow down by similar factors).
bool toeplitz_uses_fft(std::size_t n, std::size_t m) {
  if (n == 0 || m == 0) {
    return false;
  }
  const unsigned lg = fft_shape(n, m).lg;
  if (lg > kFftMaxUsedLog) {
    return false;
  }
  constexpr double kKaratsubaNsPerUnit = 0.85;  // measured 0.67 - 1.4 over 3e4 - 1e7
  const bool wide = cpu_has(ClmulKernel::kVpclmul);
  const double karatsuba_ns = kKaratsubaNsPerUnit * karatsuba_units(n, m, wide);
  const double fft_ns = 1.2 * std::ldexp(1.0, static_cast<int>(lg)) * lg + 2e4;
  return fft_ns < karatsuba_ns;
}

}  // namespace detail

Result<BitVector> toeplitz_hash(const BitVector& seed, const BitVector& input,
                                std::size_t output_bits) {
  if (detail::toeplitz_uses_fft(input.size(), output_bits)) {
    return detail::toeplitz_hash_fft(seed, input, output_bits, detail::ClmulKernel::kBest);
  }
  return detail::toeplitz_hash_clmul(seed, input, output_bits, detail::ClmulKernel::kBest);
}

}  // namespace qkd::core
