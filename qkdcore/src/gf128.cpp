#include "gf128.hpp"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QKD_HAVE_X86 1
#else
#define QKD_HAVE_X86 0
#endif

namespace qkd::core::detail {
namespace {

constexpr std::uint64_t kReduce = 0x87;  // x^128 = x^7 + x^2 + x + 1

std::uint64_t load64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) {
    v = (v << 8) | p[i];
  }
  return v;
}

// One message block (up to 16 bytes, zero-padded) as a field element.
Gf128 load_partial(const std::uint8_t* p, std::size_t n) {
  std::uint8_t b[16] = {};
  std::memcpy(b, p, n);
  return Gf128{load64(b), load64(b + 8)};
}

Gf128 length_block(std::size_t bytes) {
  return Gf128{static_cast<std::uint64_t>(bytes) * 8U, 0};
}

template <typename Mul>
Gf128 horner(Gf128 h, std::span<const std::uint8_t> m, Mul mul) {
  Gf128 acc{};
  std::size_t i = 0;
  for (; i + 16 <= m.size(); i += 16) {
    acc.lo ^= load64(m.data() + i);
    acc.hi ^= load64(m.data() + i + 8);
    acc = mul(acc, h);
  }
  if (i < m.size()) {
    const Gf128 last = load_partial(m.data() + i, m.size() - i);
    acc.lo ^= last.lo;
    acc.hi ^= last.hi;
    acc = mul(acc, h);
  }
  const Gf128 len = length_block(m.size());
  acc.lo ^= len.lo;
  acc.hi ^= len.hi;
  return mul(acc, h);
}

#if QKD_HAVE_X86
__attribute__((target("pclmul,sse2"))) inline Gf128 clmul_mul(Gf128 a, Gf128 b) {
  const __m128i x = _mm_set_epi64x(static_cast<long long>(a.hi), static_cast<long long>(a.lo));
  const __m128i y = _mm_set_epi64x(static_cast<long long>(b.hi), static_cast<long long>(b.lo));
  const __m128i lo = _mm_clmulepi64_si128(x, y, 0x00);
  const __m128i hi = _mm_clmulepi64_si128(x, y, 0x11);
  const __m128i mid =
      _mm_xor_si128(_mm_clmulepi64_si128(x, y, 0x10), _mm_clmulepi64_si128(x, y, 0x01));
  alignas(16) std::uint64_t l[2];
  alignas(16) std::uint64_t h[2];
  alignas(16) std::uint64_t m[2];
  _mm_store_si128(reinterpret_cast<__m128i*>(l), lo);
  _mm_store_si128(reinterpret_cast<__m128i*>(h), hi);
  _mm_store_si128(reinterpret_cast<__m128i*>(m), mid);
  // 256-bit product p0 + p1 x^64 + p2 x^128 + p3 x^192.
  const std::uint64_t p0 = l[0];
  const std::uint64_t p1 = l[1] ^ m[0];
  const std::uint64_t p2 = h[0] ^ m[1];
  const std::uint64_t p3 = h[1];
  // (p2 + p3 x^64) x^128 = (p2 + p3 x^64) * 0x87; p3 * 0x87 overflows by <= 7 bits.
  const __m128i r = _mm_set_epi64x(0, static_cast<long long>(kReduce));
  const __m128i t = _mm_clmulepi64_si128(_mm_set_epi64x(0, static_cast<long long>(p2)), r, 0x00);
  const __m128i u = _mm_clmulepi64_si128(_mm_set_epi64x(0, static_cast<long long>(p3)), r, 0x00);
  alignas(16) std::uint64_t tt[2];
  alignas(16) std::uint64_t uu[2];
  _mm_store_si128(reinterpret_cast<__m128i*>(tt), t);
  _mm_store_si128(reinterpret_cast<__m128i*>(uu), u);
  const __m128i v = _mm_clmulepi64_si128(_mm_set_epi64x(0, static_cast<long long>(uu[1])), r, 0x00);
  const auto v0 = static_cast<std::uint64_t>(_mm_cvtsi128_si64(v));
  return Gf128{p0 ^ tt[0] ^ v0, p1 ^ tt[1] ^ uu[0]};
}

// acc <- Horner over `blocks` 16-byte blocks of p, four at a time: (acc + m0) h^4 + m1 h^3 +
// m2 h^2 + m3 h is the same field element as four Horner steps, but its four products are
// independent (they overlap in the pipeline; the Horner chain waits for each product).
// hp = {h^2, h^3, h^4}. Returns the blocks consumed (a multiple of 4).
__attribute__((target("pclmul,sse2"))) std::size_t horner4_clmul(Gf128& acc, const Gf128& h,
                                                                const std::array<Gf128, 3>& hp,
                                                                const std::uint8_t* p,
                                                                std::size_t blocks) {
  std::size_t b = 0;
  for (; b + 4 <= blocks; b += 4, p += 64) {
    const Gf128 m0{acc.lo ^ load64(p), acc.hi ^ load64(p + 8)};
    const Gf128 m1{load64(p + 16), load64(p + 24)};
    const Gf128 m2{load64(p + 32), load64(p + 40)};
    const Gf128 m3{load64(p + 48), load64(p + 56)};
    const Gf128 a = clmul_mul(m0, hp[2]);
    const Gf128 c = clmul_mul(m1, hp[1]);
    const Gf128 d = clmul_mul(m2, hp[0]);
    const Gf128 e = clmul_mul(m3, h);
    acc = Gf128{a.lo ^ c.lo ^ d.lo ^ e.lo, a.hi ^ c.hi ^ d.hi ^ e.hi};
  }
  return b;
}

__attribute__((target("pclmul,sse2"))) Gf128 horner_clmul(Gf128 h,
                                                          std::span<const std::uint8_t> m) {
  return horner(h, m, [](Gf128 a, Gf128 b) { return clmul_mul(a, b); });
}
#endif

}  // namespace

Gf128 gf128_load(std::span<const std::uint8_t, 16> bytes) {
  return Gf128{load64(bytes.data()), load64(bytes.data() + 8)};
}

void gf128_store(std::span<std::uint8_t, 16> out, Gf128 v) {
  for (std::size_t i = 0; i < 8; ++i) {
    out[i] = static_cast<std::uint8_t>(v.lo >> (8 * i));
    out[8 + i] = static_cast<std::uint8_t>(v.hi >> (8 * i));
  }
}

Gf128 gf128_mul_portable(Gf128 a, Gf128 b) {
  Gf128 r{};
  Gf128 v = a;
  for (int i = 0; i < 128; ++i) {
    const std::uint64_t word = i < 64 ? b.lo : b.hi;
    const std::uint64_t mask = 0 - ((word >> (i & 63)) & 1U);
    r.lo ^= v.lo & mask;
    r.hi ^= v.hi & mask;
    const std::uint64_t carry = 0 - (v.hi >> 63);
    v.hi = (v.hi << 1) | (v.lo >> 63);
    v.lo = (v.lo << 1) ^ (kReduce & carry);
  }
  return r;
}

bool gf128_has_clmul() {
#if QKD_HAVE_X86
  static const bool has = __builtin_cpu_supports("pclmul") != 0;
  return has;
#else
  return false;
#endif
}

Gf128 gf128_mul_clmul(Gf128 a, Gf128 b) {
#if QKD_HAVE_X86
  if (gf128_has_clmul()) {
    return clmul_mul(a, b);
  }
#endif
  return gf128_mul_portable(a, b);
}

Gf128 gf128_mul(Gf128 a, Gf128 b) {
  return gf128_has_clmul() ? gf128_mul_clmul(a, b) : gf128_mul_portable(a, b);
}

std::array<std::uint8_t, 16> poly_hash(std::span<const std::uint8_t, 16> key,
                                       std::span<const std::uint8_t> message, Gf128Impl impl) {
  const Gf128 h = gf128_load(key);
  Gf128 acc{};
#if QKD_HAVE_X86
  if (impl != Gf128Impl::kPortable && gf128_has_clmul()) {
    acc = horner_clmul(h, message);
  } else {
    acc = horner(h, message, gf128_mul_portable);
  }
#else
  (void)impl;
  acc = horner(h, message, gf128_mul_portable);
#endif
  std::array<std::uint8_t, 16> out{};
  gf128_store(out, acc);
  return out;
}

std::array<std::uint8_t, 16> wegman_carter_tag(std::span<const std::uint8_t, 16> hash_key,
                                               std::span<const std::uint8_t, 16> pad,
                                               std::size_t tag_bytes,
                                               std::span<const std::uint8_t> message,
                                               Gf128Impl impl) {
  std::array<std::uint8_t, 16> tag = poly_hash(hash_key, message, impl);
  for (std::size_t i = 0; i < tag.size(); ++i) {
    tag[i] = i < tag_bytes ? static_cast<std::uint8_t>(tag[i] ^ pad[i]) : 0;
  }
  return tag;
}

void PolyHasher::wipe() {
  volatile std::uint8_t* b = buf_.data();
  for (std::size_t i = 0; i < buf_.size(); ++i) {
    b[i] = 0;
  }
  volatile std::uint64_t* w[] = {&h_.lo,
                                 &h_.hi,
                                 &acc_.lo,
                                 &acc_.hi,
                                 &h_powers_[0].lo,
                                 &h_powers_[0].hi,
                                 &h_powers_[1].lo,
                                 &h_powers_[1].hi,
                                 &h_powers_[2].lo,
                                 &h_powers_[2].hi};
  for (volatile std::uint64_t* x : w) {
    *x = 0;
  }
  buf_len_ = 0;
  total_ = 0;
}

void PolyHasher::reset(std::span<const std::uint8_t, 16> key) {
  wipe();
  h_ = gf128_load(key);
  h_powers_[0] = gf128_mul(h_, h_);
  h_powers_[1] = gf128_mul(h_powers_[0], h_);
  h_powers_[2] = gf128_mul(h_powers_[1], h_);
}

void PolyHasher::update(std::span<const std::uint8_t> data) {
  total_ += data.size();
  std::size_t i = 0;
  if (buf_len_ > 0) {
    const std::size_t take = std::min<std::size_t>(16 - buf_len_, data.size());
    std::memcpy(buf_.data() + buf_len_, data.data(), take);
    buf_len_ += take;
    i = take;
    if (buf_len_ < 16) {
      return;
    }
    acc_.lo ^= load64(buf_.data());
    acc_.hi ^= load64(buf_.data() + 8);
    acc_ = gf128_mul(acc_, h_);
    buf_len_ = 0;
  }
#if QKD_HAVE_X86
  if (gf128_has_clmul() && data.size() - i >= 64) {
    i += 16 * horner4_clmul(acc_, h_, h_powers_, data.data() + i, (data.size() - i) / 16);
  }
#endif
  for (; i + 16 <= data.size(); i += 16) {
    acc_.lo ^= load64(data.data() + i);
    acc_.hi ^= load64(data.data() + i + 8);
    acc_ = gf128_mul(acc_, h_);
  }
  if (i < data.size()) {
    buf_len_ = data.size() - i;
    std::memcpy(buf_.data(), data.data() + i, buf_len_);
  }
}

std::array<std::uint8_t, 16> PolyHasher::finish() const {
  Gf128 acc = acc_;
  if (buf_len_ > 0) {
    const Gf128 last = load_partial(buf_.data(), buf_len_);
    acc.lo ^= last.lo;
    acc.hi ^= last.hi;
    acc = gf128_mul(acc, h_);
  }
  const Gf128 len = length_block(static_cast<std::size_t>(total_));
  acc.lo ^= len.lo;
  acc.hi ^= len.hi;
  acc = gf128_mul(acc, h_);
  std::array<std::uint8_t, 16> out{};
  gf128_store(out, acc);
  return out;
}

}  // namespace qkd::core::detail
