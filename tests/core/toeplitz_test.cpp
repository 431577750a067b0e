#include "qkd/core/toeplitz.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <chrono>
#include <cstdio>
#include <string>

#include "qkd/core/random.hpp"
#include "gf2x_fft.hpp"
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
  auto fft = detail::toeplitz_hash_fft(seed, x, 64, detail::ClmulKernel::kBest);
  auto fft_portable = detail::toeplitz_hash_fft(seed, x, 64, detail::ClmulKernel::kPortable);
  ASSERT_TRUE(naive.ok());
  ASSERT_TRUE(fast.ok() && portable.ok() && ntt.ok() && fft.ok() && fft_portable.ok());
  EXPECT_EQ(hex(*naive), "1d69055f48c0078a");
  EXPECT_EQ(hex(*fast), hex(*naive));
  EXPECT_EQ(hex(*portable), hex(*naive));
  EXPECT_EQ(hex(*ntt), hex(*naive));
  EXPECT_EQ(hex(*fft), hex(*naive));
  EXPECT_EQ(hex(*fft_portable), hex(*naive));
}

TEST(Toeplitz, RejectsBadSizes) {
  BitVector x(10);
  EXPECT_EQ(toeplitz_hash(BitVector(10), x, 5).error().code, ErrorCode::kInvalidArgument);
  EXPECT_FALSE(toeplitz_hash(BitVector(9), x, 0).ok());
  EXPECT_FALSE(toeplitz_hash(BitVector(0), BitVector(0), 1).ok());
  EXPECT_FALSE(toeplitz_hash_naive(BitVector(10), x, 5).ok());
  EXPECT_FALSE(toeplitz_hash_ntt(BitVector(10), x, 5).ok());
  EXPECT_FALSE(detail::toeplitz_hash_fft(BitVector(10), x, 5, detail::ClmulKernel::kBest).ok());
  EXPECT_FALSE(detail::toeplitz_hash_fft(BitVector(0), BitVector(0), 1,
                                         detail::ClmulKernel::kPortable).ok());
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


// ---------------------------------------------------------------------------------------
// The O(n log n) layer: additive FFT over GF(2^64) (gf2x_fft.hpp) and the Toeplitz path
// built on it.
// ---------------------------------------------------------------------------------------
using detail::AdditiveFft;
using detail::ClmulKernel;
using detail::gf64_cantor_beta;
using detail::gf64_mul;

constexpr ClmulKernel kAllKernels[] = {ClmulKernel::kPortable, ClmulKernel::kPclmul,
                                       ClmulKernel::kVpclmul};

std::vector<std::uint64_t> random_words(Xoshiro256ss& rng, std::size_t count) {
  std::vector<std::uint64_t> v(count);
  for (auto& w : v) {
    w = rng.next();
  }
  return v;
}

TEST(Gf2xFft, FieldMultiplyKnownValues) {
  // x^63 * x = x^64 = x^4 + x^3 + x + 1 modulo x^64 + x^4 + x^3 + x + 1.
  EXPECT_EQ(gf64_mul(std::uint64_t{1} << 63, 2), 0x1BU);
  // x^63 * x^63 = x^126 = x^62 (x^64) = x^66 + x^65 + x^63 + x^62 = ... reduced by hand:
  // x^66 = x^6 + x^5 + x^3 + x^2, x^65 = x^5 + x^4 + x^2 + x: sum x^63 + x^62 + x^6 + x^4
  // + x^3 + x.
  EXPECT_EQ(gf64_mul(std::uint64_t{1} << 63, std::uint64_t{1} << 63),
            (std::uint64_t{3} << 62) | 0x5AU);
  Xoshiro256ss rng(31);
  for (int t = 0; t < 200; ++t) {
    const std::uint64_t a = rng.next();
    const std::uint64_t b = rng.next();
    const std::uint64_t c = rng.next();
    EXPECT_EQ(gf64_mul(a, 1), a);
    EXPECT_EQ(gf64_mul(a, b), gf64_mul(b, a));
    EXPECT_EQ(gf64_mul(a, b ^ c), gf64_mul(a, b) ^ gf64_mul(a, c));
    EXPECT_EQ(gf64_mul(gf64_mul(a, b), c), gf64_mul(a, gf64_mul(b, c)));
    // Products of polynomials of degree < 32 are not reduced: equal to the carry-less product.
    const std::uint64_t a32 = a & 0xffffffffU;
    const std::uint64_t b32 = b & 0xffffffffU;
    std::uint64_t clmul = 0;
    for (unsigned i = 0; i < 32; ++i) {
      if (((b32 >> i) & 1U) != 0) {
        clmul ^= a32 << i;
      }
    }
    EXPECT_EQ(gf64_mul(a32, b32), clmul);
  }
}

TEST(Gf2xFft, CantorBasisIsABasisAndSatisfiesItsRecurrence) {
  EXPECT_EQ(gf64_cantor_beta(0), 1U);
  std::uint64_t pivots[64] = {};
  for (unsigned i = 0; i < 64; ++i) {
    const std::uint64_t b = gf64_cantor_beta(i);
    if (i > 0) {
      EXPECT_EQ(gf64_mul(b, b) ^ b, gf64_cantor_beta(i - 1)) << i;
    }
    // Linear independence over GF(2): each beta adds a new pivot.
    std::uint64_t v = b;
    while (v != 0) {
      const int top = 63 - std::countl_zero(v);
      if (pivots[top] == 0) {
        pivots[top] = v;
        break;
      }
      v ^= pivots[top];
    }
    EXPECT_NE(v, 0U) << "beta_" << i << " is dependent";
  }
}

// Evaluating in the novel basis equals Horner's rule on the monomial coefficients at the
// Cantor points omega_t = sum of beta_i over the bits of t, for every kernel.
TEST(Gf2xFft, ForwardEvaluatesAtCantorPoints) {
  Xoshiro256ss rng(32);
  for (const unsigned lg : {0U, 1U, 2U, 3U, 4U, 5U, 7U}) {
    const std::size_t len = std::size_t{1} << lg;
    const auto f = random_words(rng, len);
    std::vector<std::uint64_t> expect(len);
    for (std::size_t t = 0; t < len; ++t) {
      std::uint64_t w = 0;
      for (unsigned i = 0; i < lg; ++i) {
        if (((t >> i) & 1U) != 0) {
          w ^= gf64_cantor_beta(i);
        }
      }
      std::uint64_t acc = 0;
      for (std::size_t i = len; i-- > 0;) {
        acc = gf64_mul(acc, w) ^ f[i];
      }
      expect[t] = acc;
    }
    for (const auto k : kAllKernels) {
      if (!detail::clmul_kernel_available(k)) {
        continue;
      }
      const AdditiveFft fft(lg, k);
      auto v = f;
      fft.to_novel(v);
      fft.forward(v);
      EXPECT_EQ(v, expect) << "lg=" << lg << " kernel=" << static_cast<int>(k);
    }
  }
}

// Each step undone by its inverse, on sizes below and above the cache-block recursion
// (2^13 words), and all kernels give the same transform.
TEST(Gf2xFft, TransformThenInverseIsIdentityAndKernelsAgree) {
  Xoshiro256ss rng(33);
  for (const unsigned lg : {1U, 2U, 3U, 4U, 5U, 6U, 9U, 13U, 14U, 16U}) {
    const auto f = random_words(rng, std::size_t{1} << lg);
    std::vector<std::uint64_t> reference;
    for (const auto k : kAllKernels) {
      if (!detail::clmul_kernel_available(k) || (k == ClmulKernel::kPortable && lg > 14)) {
        continue;
      }
      const AdditiveFft fft(lg, k);
      auto v = f;
      fft.to_novel(v);
      if (lg >= 2) {
        EXPECT_NE(v, f);  // size 2: the basis change is the identity
      }
      auto back = v;
      fft.from_novel(back);
      ASSERT_EQ(back, f) << "basis change, lg=" << lg;
      fft.forward(v);
      if (reference.empty()) {
        reference = v;
      } else {
        ASSERT_EQ(v, reference) << "lg=" << lg << " kernel=" << static_cast<int>(k);
      }
      fft.inverse(v);
      fft.from_novel(v);
      ASSERT_EQ(v, f) << "lg=" << lg << " kernel=" << static_cast<int>(k);
    }
  }
}

// A product in GF(2^64)[y] through the transform equals the schoolbook convolution, and the
// pointwise multiply of every kernel equals the portable field multiply.
TEST(Gf2xFft, TransformProductMatchesSchoolbook) {
  Xoshiro256ss rng(34);
  const unsigned lg = 8;
  const std::size_t len = std::size_t{1} << lg;
  auto f = random_words(rng, len / 2);
  auto g = random_words(rng, len / 2);
  std::vector<std::uint64_t> expect(len, 0);
  for (std::size_t i = 0; i < f.size(); ++i) {
    for (std::size_t j = 0; j < g.size(); ++j) {
      expect[i + j] ^= gf64_mul(f[i], g[j]);
    }
  }
  f.resize(len, 0);
  g.resize(len, 0);
  for (const auto k : kAllKernels) {
    if (!detail::clmul_kernel_available(k)) {
      continue;
    }
    const AdditiveFft fft(lg, k);
    auto a = f;
    auto b = g;
    fft.to_novel(a);
    fft.forward(a);
    fft.to_novel(b);
    fft.forward(b);
    auto pa = a;
    fft.pointwise(pa, b);
    for (std::size_t i = 0; i < len; ++i) {
      ASSERT_EQ(pa[i], gf64_mul(a[i], b[i])) << i;
    }
    fft.inverse(pa);
    fft.from_novel(pa);
    EXPECT_EQ(pa, expect) << "kernel=" << static_cast<int>(k);
  }
}

// The FFT Toeplitz path against the definition on small and odd sizes (including m = 1,
// m = n, n = 1 and sizes where the transform wraps modulo s_k), for every kernel.
TEST(Toeplitz, FftEqualsNaiveOnSmallAndOddSizes) {
  Xoshiro256ss rng(35);
  const std::size_t sizes[] = {1, 2, 31, 32, 33, 63, 64, 65, 95, 127, 129, 500, 1023, 1025, 2049};
  int wrapped = 0;
  for (const std::size_t n : sizes) {
    for (const std::size_t m : sizes) {
      const BitVector seed = random_vector(rng, n + m - 1);
      const BitVector x = random_vector(rng, n);
      auto slow = toeplitz_hash_naive(seed, x, m);
      ASSERT_TRUE(slow.ok());
      const std::size_t chunks = (n + m - 1 + 31) / 32 + (n + 31) / 32 - 1;
      if ((std::size_t{1} << detail::toeplitz_fft_log_size(n, m)) < chunks) {
        ++wrapped;
      }
      for (const auto k : kAllKernels) {
        if (!detail::clmul_kernel_available(k)) {
          continue;
        }
        auto fft = detail::toeplitz_hash_fft(seed, x, m, k);
        ASSERT_TRUE(fft.ok()) << fft.error().message;
        ASSERT_EQ(*fft, *slow) << "n=" << n << " m=" << m << " kernel=" << static_cast<int>(k);
      }
    }
  }
  EXPECT_GT(wrapped, 10);  // the shortened (wrapped) transform is exercised
}

// Bits past the end of the seed's and the input's last words are ignored.
TEST(Toeplitz, FftIgnoresBitsPastTheEnd) {
  Xoshiro256ss rng(36);
  const std::size_t n = 1000;
  const std::size_t m = 333;
  BitVector seed = random_vector(rng, n + m - 1);
  BitVector x = random_vector(rng, n);
  auto clean = toeplitz_hash_naive(seed, x, m);
  seed.mutable_words().back() |= ~std::uint64_t{0} << ((n + m - 1) % 64);
  x.mutable_words().back() |= ~std::uint64_t{0} << (n % 64);
  auto fft = detail::toeplitz_hash_fft(seed, x, m, ClmulKernel::kBest);
  ASSERT_TRUE(clean.ok() && fft.ok());
  EXPECT_EQ(*fft, *clean);
}

// Large sizes around and above the crossover (n ~ 4e5 at m = n / 2): the FFT path
// equals the Karatsuba path bit for bit (odd lengths, m = 1, m = n, m > n), toeplitz_hash
// equals both, and the dispatch picks the FFT above the crossover and Karatsuba below it.
TEST(Toeplitz, FftEqualsKaratsubaOnLargeSizes) {
  Xoshiro256ss rng(37);
  struct Case {
    std::size_t n, m;
  };
  const Case cases[] = {{699'999, 350'001},
                        {1'000'017, 1'000'017},
                        {1'048'577, 524'287},
                        {999'999, 1},
                        {300'001, 700'003},
                        {2'500'003, 1'250'001}};
  int wrapped = 0;
  for (const auto& c : cases) {
    const std::size_t chunks = (c.n + c.m - 1 + 31) / 32 + (c.n + 31) / 32 - 1;
    if ((std::size_t{1} << detail::toeplitz_fft_log_size(c.n, c.m)) < chunks) {
      ++wrapped;
    }
    const BitVector seed = random_vector(rng, c.n + c.m - 1);
    const BitVector x = random_vector(rng, c.n);
    auto kara = detail::toeplitz_hash_clmul(seed, x, c.m, ClmulKernel::kBest);
    auto fft = detail::toeplitz_hash_fft(seed, x, c.m, ClmulKernel::kBest);
    auto fast = toeplitz_hash(seed, x, c.m);
    ASSERT_TRUE(kara.ok() && fft.ok() && fast.ok());
    ASSERT_EQ(*fft, *kara) << "n=" << c.n << " m=" << c.m;
    ASSERT_EQ(*fast, *kara) << "n=" << c.n << " m=" << c.m;
    // And against the defining sum on a few bits (independent of both paths).
    for (std::size_t i : {std::size_t{0}, c.m / 2, c.m - 1}) {
      bool acc = false;
      for (std::size_t j = 0; j < c.n; ++j) {
        acc ^= seed.get(i + c.n - 1 - j) && x.get(j);
      }
      ASSERT_EQ(fft->get(i), acc) << "n=" << c.n << " m=" << c.m << " i=" << i;
    }
  }
  EXPECT_GE(wrapped, 1);  // a shortened transform (modulo s_k) among the large cases
  EXPECT_TRUE(detail::toeplitz_uses_fft(10'000'000, 5'000'000));
  EXPECT_TRUE(detail::toeplitz_uses_fft(1'000'000, 500'000));
  EXPECT_FALSE(detail::toeplitz_uses_fft(300'000, 150'000));
  EXPECT_FALSE(detail::toeplitz_uses_fft(10'000, 5'000));
  EXPECT_FALSE(detail::toeplitz_uses_fft(10'000'000, 64));  // short tags stay on Karatsuba
}

// Portable field multiply == PCLMULQDQ == VPCLMULQDQ on one mid-size block.
TEST(Toeplitz, FftPortableEqualsClmulKernels) {
  Xoshiro256ss rng(38);
  const std::size_t n = 150'001;
  const std::size_t m = 75'003;
  const BitVector seed = random_vector(rng, n + m - 1);
  const BitVector x = random_vector(rng, n);
  auto portable = detail::toeplitz_hash_fft(seed, x, m, ClmulKernel::kPortable);
  auto kara = detail::toeplitz_hash_clmul(seed, x, m, ClmulKernel::kBest);
  ASSERT_TRUE(portable.ok() && kara.ok());
  EXPECT_EQ(*portable, *kara);
  for (const auto k : {ClmulKernel::kPclmul, ClmulKernel::kVpclmul}) {
    if (!detail::clmul_kernel_available(k)) {
      continue;
    }
    auto y = detail::toeplitz_hash_fft(seed, x, m, k);
    ASSERT_TRUE(y.ok());
    EXPECT_EQ(*y, *portable) << "kernel=" << static_cast<int>(k);
  }
}

}  // namespace
}  // namespace qkd::core
