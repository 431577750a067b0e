#include "gf2x_fft.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <new>

#include <openssl/crypto.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about the deliberately undefined registers inside its AVX-512 shift
// intrinsics (-Wmaybe-uninitialized at -O2); the warning concerns the header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <wmmintrin.h>
#define QKD_FFT_X86 1
#endif

namespace qkd::core::detail {
namespace {

using Word = std::uint64_t;

// ---------------------------------------------------------------------------------------
// GF(2^64) arithmetic. A 128-bit carry-less product (hi, lo) reduces as
//   hi x^64 = hi (x^4 + x^3 + x + 1) = F(hi) + x^64 (hi >> 63 ^ hi >> 61 ^ hi >> 60),
// with F(z) = z ^ z << 1 ^ z << 3 ^ z << 4 (64-bit shifts); the overflow o has 4 bits and
// F(o) no longer overflows, so r = lo ^ F(hi ^ o) (F is linear).
// ---------------------------------------------------------------------------------------
inline Word reduce_scalar(Word lo, Word hi) {
  const Word x = hi ^ (hi >> 63) ^ (hi >> 61) ^ (hi >> 60);
  return lo ^ x ^ (x << 1) ^ (x << 3) ^ (x << 4);
}

inline Word mul_portable(Word a, Word b) {
  Word lo = 0;
  Word hi = 0;
  for (unsigned i = 0; i < 64; ++i) {
    const Word m = Word{0} - ((b >> i) & 1U);
    lo ^= (a << i) & m;
    hi ^= (i == 0 ? 0 : (a >> (64 - i))) & m;
  }
  return reduce_scalar(lo, hi);
}

// Cantor basis: beta_0 = 1, beta_i = a root of y^2 + y = beta_(i-1). The map y -> y^2 + y is
// GF(2)-linear (kernel {0, 1}); each step solves it by elimination over the 64 images of
// x^0 .. x^63. A root exists for every i < 64 because the field has 2^64 = 2^(2^6) elements.
struct CantorBasis {
  std::array<Word, 64> beta{};
  CantorBasis() {
    std::array<Word, 64> piv_vec{};   // reduced image with leading bit b
    std::array<Word, 64> piv_comb{};  // which x^i combine to it
    for (unsigned i = 0; i < 64; ++i) {
      const Word e = Word{1} << i;
      Word vec = mul_portable(e, e) ^ e;
      Word comb = e;
      while (vec != 0) {
        const unsigned b = 63U - static_cast<unsigned>(std::countl_zero(vec));
        if (piv_vec[b] == 0) {
          piv_vec[b] = vec;
          piv_comb[b] = comb;
          break;
        }
        vec ^= piv_vec[b];
        comb ^= piv_comb[b];
      }
    }
    beta[0] = 1;
    for (unsigned i = 1; i < 64; ++i) {
      Word v = beta[i - 1];
      Word root = 0;
      while (v != 0) {
        const unsigned b = 63U - static_cast<unsigned>(std::countl_zero(v));
        if (piv_vec[b] == 0) {
          std::abort();  // cannot happen in GF(2^64) (trace of beta_(i-1) is 0)
        }
        v ^= piv_vec[b];
        root ^= piv_comb[b];
      }
      beta[i] = root;
    }
  }
};

const CantorBasis& cantor() {
  static const CantorBasis basis;
  return basis;
}

}  // namespace

// The twiddle of block B, c(B) = XOR of beta_(i+1) over the set bits i of B, from four
// byte tables (B < 2^32); c is GF(2)-linear in B, so c(B0 + e) = c(B0) ^ c(e) when B0 and e
// share no bits.
struct Twiddles {
  std::array<std::array<Word, 256>, 4> t{};
  Twiddles() {
    const auto& beta = cantor().beta;
    for (unsigned k = 0; k < 4; ++k) {
      for (unsigned v = 1; v < 256; ++v) {
        const unsigned low = static_cast<unsigned>(std::countr_zero(v));
        t[k][v] = t[k][v & (v - 1)] ^ beta[8 * k + low + 1];
      }
    }
  }
  [[nodiscard]] Word at(std::size_t b) const {
    return t[0][b & 255] ^ t[1][(b >> 8) & 255] ^ t[2][(b >> 16) & 255] ^ t[3][(b >> 24) & 255];
  }
};

namespace {

const Twiddles& twiddles() {
  static const Twiddles tables;
  return tables;
}

// ---------------------------------------------------------------------------------------
// Butterfly levels. Level j works on blocks of 2^(j+1) words: lo = first half, hi = second,
// block B (global index at that level) has twiddle c(B) = tw.at(B).
//   forward: lo ^= c hi; hi ^= lo        inverse: hi ^= lo; lo ^= c hi
// `count` words starting at a cover whole blocks; `first` is the global index of the first.
// ---------------------------------------------------------------------------------------
using LevelFn = void (*)(Word* a, std::size_t count, unsigned j, std::size_t first,
                         const Twiddles& tw);
using PointwiseFn = void (*)(Word* a, const Word* b, std::size_t count);

void fwd_level_portable(Word* a, std::size_t count, unsigned j, std::size_t first,
                        const Twiddles& tw) {
  const std::size_t h = std::size_t{1} << j;
  for (std::size_t b = 0; b * 2 * h < count; ++b) {
    Word* lo = a + 2 * h * b;
    Word* hi = lo + h;
    const Word c = tw.at(first + b);
    for (std::size_t i = 0; i < h; ++i) {
      lo[i] ^= mul_portable(c, hi[i]);
      hi[i] ^= lo[i];
    }
  }
}

void inv_level_portable(Word* a, std::size_t count, unsigned j, std::size_t first,
                        const Twiddles& tw) {
  const std::size_t h = std::size_t{1} << j;
  for (std::size_t b = 0; b * 2 * h < count; ++b) {
    Word* lo = a + 2 * h * b;
    Word* hi = lo + h;
    const Word c = tw.at(first + b);
    for (std::size_t i = 0; i < h; ++i) {
      hi[i] ^= lo[i];
      lo[i] ^= mul_portable(c, hi[i]);
    }
  }
}

void pointwise_portable(Word* a, const Word* b, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    a[i] = mul_portable(a[i], b[i]);
  }
}

#if defined(QKD_FFT_X86)
// 128-bit PCLMULQDQ: two field elements per vector.
#define QKD_T128 __attribute__((target("pclmul,sse4.1")))

QKD_T128 inline __m128i reduce128(__m128i lo, __m128i hi) {
  __m128i x = _mm_xor_si128(hi, _mm_srli_epi64(hi, 63));
  x = _mm_xor_si128(x, _mm_xor_si128(_mm_srli_epi64(hi, 61), _mm_srli_epi64(hi, 60)));
  const __m128i r = _mm_xor_si128(lo, _mm_xor_si128(x, _mm_slli_epi64(x, 1)));
  return _mm_xor_si128(r, _mm_xor_si128(_mm_slli_epi64(x, 3), _mm_slli_epi64(x, 4)));
}
// Both words of v times the low word of c.
QKD_T128 inline __m128i mulc128(__m128i v, __m128i c) {
  const __m128i p0 = _mm_clmulepi64_si128(v, c, 0x00);
  const __m128i p1 = _mm_clmulepi64_si128(v, c, 0x01);
  return reduce128(_mm_unpacklo_epi64(p0, p1), _mm_unpackhi_epi64(p0, p1));
}
// Word-wise product of v and w.
QKD_T128 inline __m128i mulv128(__m128i v, __m128i w) {
  const __m128i p0 = _mm_clmulepi64_si128(v, w, 0x00);
  const __m128i p1 = _mm_clmulepi64_si128(v, w, 0x11);
  return reduce128(_mm_unpacklo_epi64(p0, p1), _mm_unpackhi_epi64(p0, p1));
}
// Low word: c * (high word of v); high word: zero.
QKD_T128 inline __m128i mul_high_word128(__m128i v, __m128i c) {
  const __m128i p = _mm_clmulepi64_si128(v, c, 0x01);
  return _mm_move_epi64(reduce128(p, _mm_srli_si128(p, 8)));
}

QKD_T128 void fwd_level_128(Word* a, std::size_t count, unsigned j, std::size_t first,
                            const Twiddles& tw) {
  const std::size_t h = std::size_t{1} << j;
  if (h == 1) {
    for (std::size_t b = 0; 2 * b < count; ++b) {
      auto* p = reinterpret_cast<__m128i*>(a + 2 * b);
      __m128i v = _mm_loadu_si128(p);
      v = _mm_xor_si128(v, mul_high_word128(v, _mm_cvtsi64_si128(static_cast<long long>(
                                                       tw.at(first + b)))));
      v = _mm_xor_si128(v, _mm_slli_si128(v, 8));
      _mm_storeu_si128(p, v);
    }
    return;
  }
  for (std::size_t b = 0; b * 2 * h < count; ++b) {
    Word* lo = a + 2 * h * b;
    Word* hi = lo + h;
    const __m128i c = _mm_cvtsi64_si128(static_cast<long long>(tw.at(first + b)));
    for (std::size_t i = 0; i < h; i += 2) {
      auto* pl = reinterpret_cast<__m128i*>(lo + i);
      auto* ph = reinterpret_cast<__m128i*>(hi + i);
      __m128i l = _mm_loadu_si128(pl);
      __m128i u = _mm_loadu_si128(ph);
      l = _mm_xor_si128(l, mulc128(u, c));
      u = _mm_xor_si128(u, l);
      _mm_storeu_si128(pl, l);
      _mm_storeu_si128(ph, u);
    }
  }
}

QKD_T128 void inv_level_128(Word* a, std::size_t count, unsigned j, std::size_t first,
                            const Twiddles& tw) {
  const std::size_t h = std::size_t{1} << j;
  if (h == 1) {
    for (std::size_t b = 0; 2 * b < count; ++b) {
      auto* p = reinterpret_cast<__m128i*>(a + 2 * b);
      __m128i v = _mm_loadu_si128(p);
      v = _mm_xor_si128(v, _mm_slli_si128(v, 8));
      v = _mm_xor_si128(v, mul_high_word128(v, _mm_cvtsi64_si128(static_cast<long long>(
                                                       tw.at(first + b)))));
      _mm_storeu_si128(p, v);
    }
    return;
  }
  for (std::size_t b = 0; b * 2 * h < count; ++b) {
    Word* lo = a + 2 * h * b;
    Word* hi = lo + h;
    const __m128i c = _mm_cvtsi64_si128(static_cast<long long>(tw.at(first + b)));
    for (std::size_t i = 0; i < h; i += 2) {
      auto* pl = reinterpret_cast<__m128i*>(lo + i);
      auto* ph = reinterpret_cast<__m128i*>(hi + i);
      __m128i l = _mm_loadu_si128(pl);
      __m128i u = _mm_loadu_si128(ph);
      u = _mm_xor_si128(u, l);
      l = _mm_xor_si128(l, mulc128(u, c));
      _mm_storeu_si128(pl, l);
      _mm_storeu_si128(ph, u);
    }
  }
}

QKD_T128 void pointwise_128(Word* a, const Word* b, std::size_t count) {
  std::size_t i = 0;
  for (; i + 2 <= count; i += 2) {
    auto* pa = reinterpret_cast<__m128i*>(a + i);
    const __m128i v = _mm_loadu_si128(pa);
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    _mm_storeu_si128(pa, mulv128(v, w));
  }
  for (; i < count; ++i) {
    a[i] = mul_portable(a[i], b[i]);
  }
}

// 512-bit VPCLMULQDQ (AVX-512): eight field elements per vector, four products per
// instruction. Levels with blocks of 2, 4 or 8 words gather the lo and hi halves of
// 16 / (2h) blocks into two vectors (vpermt2q), with one twiddle per block.
#define QKD_T512 __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))

QKD_T512 inline __m512i reduce512(__m512i lo, __m512i hi) {
  __m512i x = _mm512_ternarylogic_epi64(hi, _mm512_srli_epi64(hi, 63), _mm512_srli_epi64(hi, 61),
                                        0x96);
  x = _mm512_xor_si512(x, _mm512_srli_epi64(hi, 60));
  const __m512i r = _mm512_ternarylogic_epi64(lo, x, _mm512_slli_epi64(x, 1), 0x96);
  return _mm512_ternarylogic_epi64(r, _mm512_slli_epi64(x, 3), _mm512_slli_epi64(x, 4), 0x96);
}
QKD_T512 inline __m512i mulc512(__m512i v, __m512i c) {  // c broadcast
  const __m512i p0 = _mm512_clmulepi64_epi128(v, c, 0x00);
  const __m512i p1 = _mm512_clmulepi64_epi128(v, c, 0x01);
  return reduce512(_mm512_unpacklo_epi64(p0, p1), _mm512_unpackhi_epi64(p0, p1));
}
QKD_T512 inline __m512i mulv512(__m512i v, __m512i w) {
  const __m512i p0 = _mm512_clmulepi64_epi128(v, w, 0x00);
  const __m512i p1 = _mm512_clmulepi64_epi128(v, w, 0x11);
  return reduce512(_mm512_unpacklo_epi64(p0, p1), _mm512_unpackhi_epi64(p0, p1));
}

// Index vectors for the small levels (h = 1, 2, 4): split 16 words into lo/hi halves of
// their blocks, the inverse interleave, and the spread of per-block twiddles to words.
struct SmallLevel {
  long long lo[8], hi[8], out0[8], out1[8], spread[8];
  unsigned blocks;  // blocks per 16 words
};
constexpr SmallLevel kSmall[3] = {
    {{0, 2, 4, 6, 8, 10, 12, 14},
     {1, 3, 5, 7, 9, 11, 13, 15},
     {0, 8, 1, 9, 2, 10, 3, 11},
     {4, 12, 5, 13, 6, 14, 7, 15},
     {0, 1, 2, 3, 4, 5, 6, 7},
     8},
    {{0, 1, 4, 5, 8, 9, 12, 13},
     {2, 3, 6, 7, 10, 11, 14, 15},
     {0, 1, 8, 9, 2, 3, 10, 11},
     {4, 5, 12, 13, 6, 7, 14, 15},
     {0, 0, 1, 1, 2, 2, 3, 3},
     4},
    {{0, 1, 2, 3, 8, 9, 10, 11},
     {4, 5, 6, 7, 12, 13, 14, 15},
     {0, 1, 2, 3, 8, 9, 10, 11},
     {4, 5, 6, 7, 12, 13, 14, 15},
     {0, 0, 0, 0, 1, 1, 1, 1},
     2},
};

template <bool kForward>
QKD_T512 void level_512(Word* a, std::size_t count, unsigned j, std::size_t first,
                        const Twiddles& tw) {
  if (count < 16) {
    if constexpr (kForward) {
      fwd_level_128(a, count, j, first, tw);
    } else {
      inv_level_128(a, count, j, first, tw);
    }
    return;
  }
  const std::size_t h = std::size_t{1} << j;
  if (h >= 8) {
    for (std::size_t b = 0; b * 2 * h < count; ++b) {
      Word* lo = a + 2 * h * b;
      Word* hi = lo + h;
      const __m512i c = _mm512_set1_epi64(static_cast<long long>(tw.at(first + b)));
      for (std::size_t i = 0; i < h; i += 8) {
        __m512i l = _mm512_loadu_si512(lo + i);
        __m512i u = _mm512_loadu_si512(hi + i);
        if constexpr (kForward) {
          l = _mm512_xor_si512(l, mulc512(u, c));
          u = _mm512_xor_si512(u, l);
        } else {
          u = _mm512_xor_si512(u, l);
          l = _mm512_xor_si512(l, mulc512(u, c));
        }
        _mm512_storeu_si512(lo + i, l);
        _mm512_storeu_si512(hi + i, u);
      }
    }
    return;
  }
  const SmallLevel& s = kSmall[j];
  const __m512i ilo = _mm512_loadu_si512(s.lo);
  const __m512i ihi = _mm512_loadu_si512(s.hi);
  const __m512i iout0 = _mm512_loadu_si512(s.out0);
  const __m512i iout1 = _mm512_loadu_si512(s.out1);
  const __m512i ispread = _mm512_loadu_si512(s.spread);
  // Twiddles of blocks b .. b + blocks - 1 (b a multiple of `blocks`): c(b) ^ c(e), e < blocks.
  alignas(64) long long local[8] = {};
  for (unsigned e = 0; e < s.blocks; ++e) {
    local[e] = static_cast<long long>(tw.at(e));
  }
  const __m512i spread_local = _mm512_permutexvar_epi64(ispread, _mm512_load_si512(local));
  for (std::size_t i = 0, b = first; i < count; i += 16, b += s.blocks) {
    const __m512i v0 = _mm512_loadu_si512(a + i);
    const __m512i v1 = _mm512_loadu_si512(a + i + 8);
    __m512i l = _mm512_permutex2var_epi64(v0, ilo, v1);
    __m512i u = _mm512_permutex2var_epi64(v0, ihi, v1);
    const __m512i c = _mm512_xor_si512(
        spread_local, _mm512_set1_epi64(static_cast<long long>(tw.at(b))));
    if constexpr (kForward) {
      l = _mm512_xor_si512(l, mulv512(u, c));
      u = _mm512_xor_si512(u, l);
    } else {
      u = _mm512_xor_si512(u, l);
      l = _mm512_xor_si512(l, mulv512(u, c));
    }
    _mm512_storeu_si512(a + i, _mm512_permutex2var_epi64(l, iout0, u));
    _mm512_storeu_si512(a + i + 8, _mm512_permutex2var_epi64(l, iout1, u));
  }
}

QKD_T512 void fwd_level_512(Word* a, std::size_t count, unsigned j, std::size_t first,
                            const Twiddles& tw) {
  level_512<true>(a, count, j, first, tw);
}
QKD_T512 void inv_level_512(Word* a, std::size_t count, unsigned j, std::size_t first,
                            const Twiddles& tw) {
  level_512<false>(a, count, j, first, tw);
}

QKD_T512 void pointwise_512(Word* a, const Word* b, std::size_t count) {
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512i v = _mm512_loadu_si512(a + i);
    const __m512i w = _mm512_loadu_si512(b + i);
    _mm512_storeu_si512(a + i, mulv512(v, w));
  }
  pointwise_128(a + i, b + i, count - i);
}
#endif  // QKD_FFT_X86

// ---------------------------------------------------------------------------------------
// Change of basis, XORs only. A block of 2^(j+1) words holding f (monomials) becomes
// r + s_j q with q in the upper half, r in the lower: long division by the monic
// s_j(y) = y^(2^j) + sum over proper bit-subsets i of j of y^(2^i), from the top down.
// The term y^(2^i) sends word d to d - (2^j - 2^i); the nearest reach is 2^j - 2^imax
// (imax = j without its lowest set bit), so segments of that length can run as whole
// vector loops. The multiplication (novel -> monomial) is the same loop bottom-up.
// ---------------------------------------------------------------------------------------
struct SubsetOffsets {
  std::array<std::size_t, 32> off{};  // 2^i for the proper subsets i of j
  unsigned count = 0;
  std::size_t seg = 0;  // 2^j - 2^imax
};

constexpr SubsetOffsets subset_offsets(unsigned j) {
  SubsetOffsets s;
  if (j == 0) {
    return s;  // s_0(y) = y: nothing to divide
  }
  // Enumerate the proper subsets of the bit mask j.
  for (unsigned i = (j - 1) & j;; i = (i - 1) & j) {
    s.off[s.count++] = std::size_t{1} << i;
    if (i == 0) {
      break;
    }
  }
  s.seg = (std::size_t{1} << j) - (std::size_t{1} << (j & (j - 1)));
  return s;
}

inline void xor_into_scalar(Word* __restrict dst, const Word* __restrict src,
                            std::size_t len) {
  for (std::size_t k = 0; k < len; ++k) {
    dst[k] ^= src[k];
  }
}

#if defined(QKD_FFT_X86)
// The same on 512-bit vectors (the build targets baseline x86-64, i.e. 128-bit SSE2).
__attribute__((target("avx512f"))) void xor_into_512(Word* __restrict dst,
                                                     const Word* __restrict src,
                                                     std::size_t len) {
  std::size_t k = 0;
  for (; k + 8 <= len; k += 8) {
    _mm512_storeu_si512(dst + k,
                        _mm512_xor_si512(_mm512_loadu_si512(dst + k), _mm512_loadu_si512(src + k)));
  }
  if (k < len) {
    const auto mask = static_cast<__mmask8>((1U << (len - k)) - 1U);
    const __m512i d = _mm512_maskz_loadu_epi64(mask, dst + k);
    const __m512i v = _mm512_maskz_loadu_epi64(mask, src + k);
    _mm512_mask_storeu_epi64(dst + k, mask, _mm512_xor_si512(d, v));
  }
}

bool wide_xor() {
  static const bool wide = __builtin_cpu_supports("avx512f");
  return wide;
}
#endif

// Short runs inline (the low levels), long ones on the widest vectors the CPU has.
inline void xor_into(Word* __restrict dst, const Word* __restrict src, std::size_t len) {
#if defined(QKD_FFT_X86)
  if (len >= 16 && wide_xor()) {
    xor_into_512(dst, src, len);
    return;
  }
#endif
  xor_into_scalar(dst, src, len);
}

// Divide every block of 2^(j+1) words in a[0, count) by s_j (j >= 1), or (kDivide false)
// multiply back. Small j get a compile-time copy (J > 0) so that the short loops unroll.
template <bool kDivide, unsigned J>
void basis_level(Word* a, std::size_t count, unsigned j_dyn) {
  const unsigned j = J > 0 ? J : j_dyn;
  const SubsetOffsets s = J > 0 ? subset_offsets(J) : subset_offsets(j_dyn);
  const std::size_t hh = std::size_t{1} << j;
  for (std::size_t base = 0; base < count; base += 2 * hh) {
    Word* blk = a + base;
    if constexpr (kDivide) {
#pragma GCC unroll 8
      for (std::size_t top = 2 * hh; top > hh;) {
        const std::size_t lo = top - std::min(s.seg, top - hh);
#pragma GCC unroll 8
        for (unsigned t = 0; t < s.count; ++t) {
          xor_into(blk + lo - hh + s.off[t], blk + lo, top - lo);
        }
        top = lo;
      }
    } else {
#pragma GCC unroll 8
      for (std::size_t lo = hh; lo < 2 * hh;) {
        const std::size_t top = lo + std::min(s.seg, 2 * hh - lo);
#pragma GCC unroll 8
        for (unsigned t = 0; t < s.count; ++t) {
          xor_into(blk + lo - hh + s.off[t], blk + lo, top - lo);
        }
        lo = top;
      }
    }
  }
}

template <bool kDivide>
void basis_level_any(Word* a, std::size_t count, unsigned j) {
  switch (j) {
    case 0:
      return;
    case 1:
      return basis_level<kDivide, 1>(a, count, j);
    case 2:
      return basis_level<kDivide, 2>(a, count, j);
    case 3:
      return basis_level<kDivide, 3>(a, count, j);
    case 4:
      return basis_level<kDivide, 4>(a, count, j);
    case 5:
      return basis_level<kDivide, 5>(a, count, j);
    case 6:
      return basis_level<kDivide, 6>(a, count, j);
    default:
      return basis_level<kDivide, 0>(a, count, j);
  }
}

void divide_level(Word* a, std::size_t count, unsigned j) {
  basis_level_any<true>(a, count, j);
}
void multiply_level(Word* a, std::size_t count, unsigned j) {
  basis_level_any<false>(a, count, j);
}

// Blocks of up to 2^kCacheLog words (64 KiB) run all their remaining levels in one go;
// larger ones recurse, so every level of a block runs while the block is in cache.
constexpr unsigned kCacheLog = 13;

void to_novel_rec(Word* a, unsigned lg) {
  if (lg <= kCacheLog) {
    for (unsigned j = lg; j-- > 1;) {
      divide_level(a, std::size_t{1} << lg, j);
    }
    return;
  }
  divide_level(a, std::size_t{1} << lg, lg - 1);
  to_novel_rec(a, lg - 1);
  to_novel_rec(a + (std::size_t{1} << (lg - 1)), lg - 1);
}

void from_novel_rec(Word* a, unsigned lg) {
  if (lg <= kCacheLog) {
    for (unsigned j = 1; j < lg; ++j) {
      multiply_level(a, std::size_t{1} << lg, j);
    }
    return;
  }
  from_novel_rec(a, lg - 1);
  from_novel_rec(a + (std::size_t{1} << (lg - 1)), lg - 1);
  multiply_level(a, std::size_t{1} << lg, lg - 1);
}

// Block a of 2^lg words, index B among blocks of that size.
void forward_rec(LevelFn fwd, const Twiddles& tw, Word* a, unsigned lg, std::size_t block) {
  if (lg <= kCacheLog) {
    for (unsigned j = lg; j-- > 0;) {
      fwd(a, std::size_t{1} << lg, j, block << (lg - 1 - j), tw);
    }
    return;
  }
  fwd(a, std::size_t{1} << lg, lg - 1, block, tw);
  forward_rec(fwd, tw, a, lg - 1, 2 * block);
  forward_rec(fwd, tw, a + (std::size_t{1} << (lg - 1)), lg - 1, 2 * block + 1);
}

void inverse_rec(LevelFn inv, const Twiddles& tw, Word* a, unsigned lg, std::size_t block) {
  if (lg <= kCacheLog) {
    for (unsigned j = 0; j < lg; ++j) {
      inv(a, std::size_t{1} << lg, j, block << (lg - 1 - j), tw);
    }
    return;
  }
  inverse_rec(inv, tw, a, lg - 1, 2 * block);
  inverse_rec(inv, tw, a + (std::size_t{1} << (lg - 1)), lg - 1, 2 * block + 1);
  inv(a, std::size_t{1} << lg, lg - 1, block, tw);
}

}  // namespace

struct AdditiveFft::Kernels {
  LevelFn fwd;
  LevelFn inv;
  PointwiseFn pointwise;
};

namespace {
constexpr AdditiveFft::Kernels kPortableKernels{fwd_level_portable, inv_level_portable,
                                                pointwise_portable};
#if defined(QKD_FFT_X86)
constexpr AdditiveFft::Kernels kPclmulKernels{fwd_level_128, inv_level_128, pointwise_128};
constexpr AdditiveFft::Kernels kVpclmulKernels{fwd_level_512, inv_level_512, pointwise_512};
#endif

const AdditiveFft::Kernels* select_kernels(ClmulKernel k) {
  if (k == ClmulKernel::kBest) {
    k = clmul_kernel_available(ClmulKernel::kVpclmul)  ? ClmulKernel::kVpclmul
        : clmul_kernel_available(ClmulKernel::kPclmul) ? ClmulKernel::kPclmul
                                                       : ClmulKernel::kPortable;
  }
  if (!clmul_kernel_available(k)) {
    k = ClmulKernel::kPortable;
  }
#if defined(QKD_FFT_X86)
  if (k == ClmulKernel::kVpclmul) {
    return &kVpclmulKernels;
  }
  if (k == ClmulKernel::kPclmul) {
    return &kPclmulKernels;
  }
#endif
  return &kPortableKernels;
}
}  // namespace

std::uint64_t gf64_mul(std::uint64_t a, std::uint64_t b) { return mul_portable(a, b); }

WordBuffer::WordBuffer(std::size_t words) : words_(words) {
  if (words == 0) {
    return;
  }
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  // From 256 KiB up (64 pages), a huge page is cheaper than the faults, even rounded up.
  constexpr std::size_t kHugeFrom = std::size_t{256} << 10;
  bytes_ = words * sizeof(Word);
  if (bytes_ >= kHugeFrom) {
    bytes_ = (bytes_ + kHuge - 1) / kHuge * kHuge;  // aligned_alloc wants a multiple
    data_ = static_cast<Word*>(std::aligned_alloc(kHuge, bytes_));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (data_ != nullptr) {
      (void)madvise(data_, bytes_, MADV_HUGEPAGE);  // a hint; failure only costs speed
    }
#endif
  } else {
    bytes_ = (bytes_ + 63) / 64 * 64;
    data_ = static_cast<Word*>(std::aligned_alloc(64, bytes_));
  }
  if (data_ == nullptr) {
    throw std::bad_alloc();
  }
  std::memset(data_, 0, words_ * sizeof(Word));  // the rounding past it is never touched
}

WordBuffer::~WordBuffer() {
  if (data_ != nullptr) {
    OPENSSL_cleanse(data_, words_ * sizeof(Word));
    std::free(data_);
  }
}

std::uint64_t gf64_cantor_beta(unsigned i) { return cantor().beta.at(i); }

AdditiveFft::AdditiveFft(unsigned lg, ClmulKernel kernel)
    : lg_(std::min(lg, kFftMaxLog)), kern_(select_kernels(kernel)), tw_(&twiddles()) {}

void AdditiveFft::to_novel(std::span<std::uint64_t> a) const {
  if (a.size() == size()) {
    to_novel_rec(a.data(), lg_);
  }
}

void AdditiveFft::from_novel(std::span<std::uint64_t> a) const {
  if (a.size() == size()) {
    from_novel_rec(a.data(), lg_);
  }
}

void AdditiveFft::forward(std::span<std::uint64_t> a) const {
  if (a.size() == size()) {
    forward_rec(kern_->fwd, *tw_, a.data(), lg_, 0);
  }
}

void AdditiveFft::inverse(std::span<std::uint64_t> a) const {
  if (a.size() == size()) {
    inverse_rec(kern_->inv, *tw_, a.data(), lg_, 0);
  }
}

void AdditiveFft::pointwise(std::span<std::uint64_t> a, std::span<const std::uint64_t> b) const {
  kern_->pointwise(a.data(), b.data(), std::min(a.size(), b.size()));
}

}  // namespace qkd::core::detail
