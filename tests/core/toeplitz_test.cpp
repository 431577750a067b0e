#include "qkd/core/toeplitz.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "qkd/core/random.hpp"
#include "toeplitz_internal.hpp"

namespace qkd::core {
namespace {

BitVector random_vector(Xoshiro256ss& rng, std::size_t n) {
  BitVector v(n);
  for (auto& w : v.mutable_words()) {
    w = rng.next();
  }
  v.clear_tail();
  return v;
}

std::string hex(const BitVector& v) {
  std::string s;
  for (const std::uint8_t b : v.to_bytes()) {
    char buf[3];
    std::snprintf(buf, sizeof(buf), "%02x", b);
    s += buf;
  }
  return s;
}

TEST(Toeplitz, FastEqualsNaiveOnRandomSizes) {
  Xoshiro256ss rng(11);
  for (int t = 0; t < 60; ++t) {
    const std::size_t n = 1 + rng.below(t < 30 ? 70 : 3000);
    const std::size_t m = 1 + rng.below(t < 30 ? 70 : 1500);
    const BitVector seed = random_vector(rng, n + m - 1);
    const BitVector x = random_vector(rng, n);
    auto fast = toeplitz_hash(seed, x, m);
    auto slow = toeplitz_hash_naive(seed, x, m);
    ASSERT_TRUE(fast.ok()) << fast.error().message;
    ASSERT_TRUE(slow.ok());
    ASSERT_EQ(*fast, *slow) << "n=" << n << " m=" << m;
  }
}

// Sizes on and around word boundaries and around the Karatsuba base case (8 words) and its
// odd-size padding, for both kernels (PCLMULQDQ where available, and the portable one),
// plus the NTT path; all must equal the bit-by-bit definition.
TEST(Toeplitz, ClmulEqualsNaiveOnEdgeSizes) {
  Xoshiro256ss rng(21);
  const std::size_t sizes[] = {1,   2,   63,  64,  65,  127, 128, 129, 511, 512, 513,
                               575, 576, 577, 640, 1023, 1024, 1025, 1087, 1153, 2049};
  for (const std::size_t n : sizes) {
    for (const std::size_t m : sizes) {
      if (n * m > 700'000) {
        continue;
      }
      const BitVector seed = random_vector(rng, n + m - 1);
      const BitVector x = random_vector(rng, n);
      auto slow = toeplitz_hash_naive(seed, x, m);
      auto fast = toeplitz_hash(seed, x, m);
      auto portable = detail::toeplitz_hash_clmul(seed, x, m, /*allow_pclmul=*/false);
      auto ntt = toeplitz_hash_ntt(seed, x, m);
      ASSERT_TRUE(slow.ok() && fast.ok() && portable.ok() && ntt.ok());
      ASSERT_EQ(*fast, *slow) << "n=" << n << " m=" << m;
      ASSERT_EQ(*portable, *slow) << "n=" << n << " m=" << m;
      ASSERT_EQ(*ntt, *slow) << "n=" << n << " m=" << m;
      for (const auto k : {detail::ClmulKernel::kPclmul, detail::ClmulKernel::kVpclmul}) {
        if (!detail::clmul_kernel_available(k)) {
          continue;
        }
        auto kernel = detail::toeplitz_hash_clmul(seed, x, m, k);
        ASSERT_TRUE(kernel.ok());
        ASSERT_EQ(*kernel, *slow) << "n=" << n << " m=" << m << " kernel=" << static_cast<int>(k);
      }
    }
  }
}

// Large random sizes: the fast kernel against the NTT (itself checked against the
// definition above), and against the definition on a few output bits.
TEST(Toeplitz, ClmulEqualsNttOnLargeRandomSizes) {
  Xoshiro256ss rng(22);
  for (int t = 0; t < 6; ++t) {
    const std::size_t n = 1 + rng.below(200'000);
    const std::size_t m = 1 + rng.below(200'000);
    const BitVector seed = random_vector(rng, n + m - 1);
    const BitVector x = random_vector(rng, n);
    auto fast = toeplitz_hash(seed, x, m);
    auto ntt = toeplitz_hash_ntt(seed, x, m);
    ASSERT_TRUE(fast.ok() && ntt.ok());
    ASSERT_EQ(*fast, *ntt) << "n=" << n << " m=" << m;
    for (std::size_t i : {std::size_t{0}, m / 2, m - 1}) {
      bool acc = false;
      for (std::size_t j = 0; j < n; ++j) {
        acc ^= seed.get(i + n - 1 - j) && x.get(j);
      }
      ASSERT_EQ(fast->get(i), acc) << "n=" << n << " m=" << m << " i=" << i;
    }
  }
}

TEST(Toeplitz, MatchesMatrixDefinition) {
  // T[i][j] = s[i - j + n - 1]: check one output bit by the matrix form explicitly.
  Xoshiro256ss rng(12);
  const std::size_t n = 37;
  const std::size_t m = 11;
  const BitVector seed = random_vector(rng, n + m - 1);
  const BitVector x = random_vector(rng, n);
  auto y = toeplitz_hash(seed, x, m);
  ASSERT_TRUE(y.ok());
  for (std::size_t i = 0; i < m; ++i) {
    bool acc = false;
    for (std::size_t j = 0; j < n; ++j) {
      acc ^= seed.get(i + n - 1 - j) && x.get(j);
    }
    EXPECT_EQ(y->get(i), acc);
  }
}

// Known answer: seed byte k = (37 k + 11) mod 256, input byte k = (101 k + 7) mod 256,
// n = 256 input bits, m = 64 output bits; computed with toeplitz_hash_naive.
TEST(Toeplitz, KnownAnswer) {
  std::vector<std::uint8_t> sb(40);
  std::vector<std::uint8_t> xb(32);
  for (std::size_t k = 0; k < sb.size(); ++k) {
    sb[k] = static_cast<std::uint8_t>((37 * k + 11) % 256);
  }
  for (std::size_t k = 0; k < xb.size(); ++k) {
    xb[k] = static_cast<std::uint8_t>((101 * k + 7) % 256);
  }
  const BitVector seed = BitVector::from_bytes(sb, 256 + 64 - 1);
  const BitVector x = BitVector::from_bytes(xb, 256);
  auto naive = toeplitz_hash_naive(seed, x, 64);
  auto fast = toeplitz_hash(seed, x, 64);
  auto portable = detail::toeplitz_hash_clmul(seed, x, 64, /*allow_pclmul=*/false);
  auto ntt = toeplitz_hash_ntt(seed, x, 64);
  ASSERT_TRUE(naive.ok());
  ASSERT_TRUE(fast.ok() && portable.ok() && ntt.ok());
  EXPECT_EQ(hex(*naive), "1d69055f48c0078a");
  EXPECT_EQ(hex(*fast), hex(*naive));
  EXPECT_EQ(hex(*portable), hex(*naive));
  EXPECT_EQ(hex(*ntt), hex(*naive));
}

TEST(Toeplitz, RejectsBadSizes) {
  BitVector x(10);
  EXPECT_EQ(toeplitz_hash(BitVector(10), x, 5).error().code, ErrorCode::kInvalidArgument);
  EXPECT_FALSE(toeplitz_hash(BitVector(9), x, 0).ok());
  EXPECT_FALSE(toeplitz_hash(BitVector(0), BitVector(0), 1).ok());
  EXPECT_FALSE(toeplitz_hash_naive(BitVector(10), x, 5).ok());
  EXPECT_FALSE(toeplitz_hash_ntt(BitVector(10), x, 5).ok());
}

TEST(Toeplitz, MegabitBlockMatchesDefinition) {
  Xoshiro256ss rng(13);
  const std::size_t n = 1'000'000;
  const std::size_t m = 500'000;
  const BitVector seed = random_vector(rng, n + m - 1);
  const BitVector x = random_vector(rng, n);
  const auto t0 = std::chrono::steady_clock::now();
  auto y = toeplitz_hash(seed, x, m);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(y.ok());
  RecordProperty("seconds", std::to_string(s));
  std::printf("toeplitz n=1e6 m=5e5: %.3f s\n", s);
  // Spot-check a few output bits against the definition.
  for (std::size_t i : {std::size_t{0}, std::size_t{12345}, m - 1}) {
    bool acc = false;
    for (std::size_t j = 0; j < n; ++j) {
      acc ^= seed.get(i + n - 1 - j) && x.get(j);
    }
    EXPECT_EQ(y->get(i), acc) << i;
  }
}

// n = 2^20 (a word-aligned power of two, the Karatsuba recursion without padding), m = 2^19
// + 3: the fast kernel equals the NTT path bit for bit, and spot checks against the sum.
TEST(Toeplitz, TwoToTheTwentyMatchesNttAndDefinition) {
  Xoshiro256ss rng(14);
  const std::size_t n = std::size_t{1} << 20;
  const std::size_t m = (std::size_t{1} << 19) + 3;
  const BitVector seed = random_vector(rng, n + m - 1);
  const BitVector x = random_vector(rng, n);
  auto y = toeplitz_hash(seed, x, m);
  auto ntt = toeplitz_hash_ntt(seed, x, m);
  ASSERT_TRUE(y.ok() && ntt.ok());
  EXPECT_EQ(*y, *ntt);
  for (std::size_t i : {std::size_t{0}, std::size_t{63}, std::size_t{64}, m / 3, m - 1}) {
    bool acc = false;
    for (std::size_t j = 0; j < n; ++j) {
      acc ^= seed.get(i + n - 1 - j) && x.get(j);
    }
    EXPECT_EQ(y->get(i), acc) << i;
  }
}

}  // namespace
}  // namespace qkd::core
