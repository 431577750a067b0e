// Wegman-Carter building blocks: GF(2^128) multiplication (portable and PCLMULQDQ), the
// polynomial hash and the tag, against known-answer vectors. The vectors were computed once
// with the portable implementation, cross-checked with the carry-less-multiply one, and the
// simplest ones by hand (x^127 * x = x^7 + x^2 + x + 1; x^254 reduced).
#include <gtest/gtest.h>

#include <array>
#include <string>
#include <vector>

#include "gf128.hpp"
#include "qkd/core/random.hpp"

namespace qkd::core::detail {
namespace {

std::string hex(std::span<const std::uint8_t> b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (std::uint8_t v : b) {
    s.push_back(d[v >> 4]);
    s.push_back(d[v & 15]);
  }
  return s;
}

struct MulVector {
  Gf128 a;
  Gf128 b;
  Gf128 product;
};

constexpr MulVector kMulVectors[] = {
    // x^127 * x = x^128 = x^7 + x^2 + x + 1
    {{0, 1ULL << 63}, {2, 0}, {0x87, 0}},
    // x^127 * x^127 = x^254 = x^127 + x^126 + x^12 + x^6 + x^5 + x^2 + x + 1
    {{0, 1ULL << 63}, {0, 1ULL << 63}, {0x1067, 0xc000000000000000ULL}},
    {{1, 0}, {0x0123456789abcdefULL, 0xfedcba9876543210ULL},
     {0x0123456789abcdefULL, 0xfedcba9876543210ULL}},
    {{0x0123456789abcdefULL, 0xfedcba9876543210ULL},
     {0x0f1e2d3c4b5a6978ULL, 0x8796a5b4c3d2e1f0ULL},
     {0x82d4790a796b9da5ULL, 0x8675e60f4afd2a95ULL}},
    {{~0ULL, ~0ULL}, {~0ULL, ~0ULL}, {0x555555555555402fULL, 0x5555555555555555ULL}},
};

TEST(Gf128, MultiplicationKnownAnswers) {
  for (const MulVector& v : kMulVectors) {
    EXPECT_EQ(gf128_mul_portable(v.a, v.b), v.product);
    EXPECT_EQ(gf128_mul_portable(v.b, v.a), v.product);
    EXPECT_EQ(gf128_mul_clmul(v.a, v.b), v.product);  // portable fallback without PCLMUL
    EXPECT_EQ(gf128_mul(v.a, v.b), v.product);
  }
}

TEST(Gf128, ClmulMatchesPortableAndFieldLaws) {
  if (!gf128_has_clmul()) {
    GTEST_LOG_(INFO) << "no PCLMULQDQ on this CPU: only the portable multiplication is tested";
  }
  Xoshiro256ss rng(2024);
  for (int i = 0; i < 2000; ++i) {
    const Gf128 a{rng.next(), rng.next()};
    const Gf128 b{rng.next(), rng.next()};
    const Gf128 c{rng.next(), rng.next()};
    const Gf128 ab = gf128_mul_portable(a, b);
    EXPECT_EQ(gf128_mul_clmul(a, b), ab);
    EXPECT_EQ(gf128_mul_portable(b, a), ab);
    // (a b) c = a (b c); a (b + c) = a b + a c
    EXPECT_EQ(gf128_mul(ab, c), gf128_mul(a, gf128_mul(b, c)));
    const Gf128 bc{b.lo ^ c.lo, b.hi ^ c.hi};
    const Gf128 ac = gf128_mul(a, c);
    EXPECT_EQ(gf128_mul(a, bc), (Gf128{ab.lo ^ ac.lo, ab.hi ^ ac.hi}));
  }
}

std::array<std::uint8_t, 16> key_0_to_15() {
  std::array<std::uint8_t, 16> k{};
  for (std::size_t i = 0; i < 16; ++i) {
    k[i] = static_cast<std::uint8_t>(i);
  }
  return k;
}

std::vector<std::uint8_t> message(std::size_t n) {
  std::vector<std::uint8_t> m(n);
  for (std::size_t i = 0; i < n; ++i) {
    m[i] = static_cast<std::uint8_t>(i * 37 + 11);
  }
  return m;
}

TEST(PolyHash, KnownAnswers) {
  const auto key = key_0_to_15();
  const std::pair<std::size_t, const char*> vectors[] = {
      {0, "00000000000000000000000000000000"},  // only the zero length block: 0 * H
      {1, "c764eb7189522347a17f0b6a6949c35c"},
      {15, "1e65aa5b7cf27abb58fe836b252997a6"},
      {16, "ac72228f1d03714afa344c610306db89"},
      {17, "088cf7483ea4814a655cc350263b28be"},
      {33, "bb5425e36fb437d5c89d20c1185b1090"},
      {100, "eacab81438961115765acab37501e6c6"},
  };
  for (const auto& [n, expected] : vectors) {
    const auto m = message(n);
    EXPECT_EQ(hex(poly_hash(key, m, Gf128Impl::kPortable)), expected) << n << " bytes";
    EXPECT_EQ(hex(poly_hash(key, m, Gf128Impl::kClmul)), expected) << n << " bytes";
    EXPECT_EQ(hex(poly_hash(key, m)), expected) << n << " bytes";
  }
  // One zero block: h = 0 * H^2 + L * H with L = 128 = x^7, i.e. H shifted by 7 bits.
  const std::vector<std::uint8_t> zeros(16, 0);
  const Gf128 h = gf128_load(key);
  std::array<std::uint8_t, 16> expect{};
  gf128_store(expect, gf128_mul_portable(h, Gf128{0x80, 0}));
  EXPECT_EQ(poly_hash(key, zeros), expect);
}

TEST(PolyHash, LengthAndPaddingAreBound) {
  // Zero padding alone would make m and m || 0 collide; the length block separates them.
  const auto key = key_0_to_15();
  const std::vector<std::uint8_t> a{1, 2, 3};
  const std::vector<std::uint8_t> b{1, 2, 3, 0};
  EXPECT_NE(poly_hash(key, a), poly_hash(key, b));
  // Every single-bit change of a 40-byte message changes the hash (for this key).
  const auto m = message(40);
  const auto h = poly_hash(key, m);
  for (std::size_t i = 0; i < m.size() * 8; ++i) {
    auto x = m;
    x[i / 8] ^= static_cast<std::uint8_t>(1U << (i % 8));
    EXPECT_NE(poly_hash(key, x), h) << "bit " << i;
  }
}

TEST(WegmanCarterTag, KnownAnswersAndTruncation) {
  const auto key = key_0_to_15();
  std::array<std::uint8_t, 16> pad{};
  for (std::size_t i = 0; i < 16; ++i) {
    pad[i] = static_cast<std::uint8_t>(0xF0 + i / 2);
  }
  const auto m = message(100);
  const auto t128 = wegman_carter_tag(key, pad, 16, m, Gf128Impl::kPortable);
  const auto t64 = wegman_carter_tag(key, pad, 8, m, Gf128Impl::kPortable);
  EXPECT_EQ(hex(t128), "1a3a49e5ca64e2e682ae3f4683f71131");
  EXPECT_EQ(hex(t64), "1a3a49e5ca64e2e60000000000000000");
  EXPECT_EQ(wegman_carter_tag(key, pad, 16, m, Gf128Impl::kClmul), t128);
  // tag = hash XOR pad.
  const auto h = poly_hash(key, m);
  for (std::size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(t128[i], h[i] ^ pad[i]);
  }
}

TEST(PolyHash, IncrementalEqualsOneShot) {
  // The transcript hash: any split of the data into updates gives poly_hash of the whole.
  Xoshiro256ss rng(77);
  std::array<std::uint8_t, 16> key{};
  for (auto& b : key) {
    b = static_cast<std::uint8_t>(rng.next());
  }
  for (std::size_t n : {0UL, 1UL, 15UL, 16UL, 17UL, 100UL, 1000UL}) {
    const auto m = message(n);
    for (int trial = 0; trial < 20; ++trial) {
      PolyHasher h(key);
      std::size_t at = 0;
      while (at < n) {
        const std::size_t len = std::min<std::size_t>(n - at, rng.below(40));
        h.update(std::span<const std::uint8_t>(m).subspan(at, len));
        at += len;
      }
      EXPECT_EQ(h.finish(), poly_hash(key, m)) << n << " bytes, trial " << trial;
      EXPECT_EQ(h.bytes(), n);
    }
  }
  PolyHasher h(key);
  h.update(message(33));
  h.reset(key_0_to_15());
  EXPECT_EQ(hex(h.finish()), "00000000000000000000000000000000");
  h.update(message(100));
  EXPECT_EQ(hex(h.finish()), "eacab81438961115765acab37501e6c6");
}

}  // namespace
}  // namespace qkd::core::detail
