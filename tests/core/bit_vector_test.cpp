#include "qkd/core/bit_vector.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "qkd/core/random.hpp"

namespace qkd::core {
namespace {

BitVector random_vector(Xoshiro256ss& rng, std::size_t n) {
  BitVector v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v.set(i, rng.bit());
  }
  return v;
}

TEST(BitVector, GetSetFlipAndTailStaysZero) {
  BitVector v(130);
  EXPECT_EQ(v.size(), 130U);
  EXPECT_EQ(v.word_count(), 3U);
  v.set(0, true);
  v.set(64, true);
  v.set(129, true);
  v.flip(5);
  EXPECT_TRUE(v.get(0));
  EXPECT_TRUE(v.get(5));
  EXPECT_TRUE(v.get(64));
  EXPECT_TRUE(v.get(129));
  EXPECT_FALSE(v.get(128));
  EXPECT_EQ(v.popcount(), 4U);
  v.set(5, false);
  EXPECT_EQ(v.popcount(), 3U);
  v.resize(100);
  EXPECT_EQ(v.popcount(), 2U);  // bit 129 gone
  v.resize(140);
  EXPECT_FALSE(v.get(129));  // and not resurrected
}

TEST(BitVector, PushBackMatchesSet) {
  Xoshiro256ss rng(1);
  BitVector a;
  BitVector b(1000);
  for (std::size_t i = 0; i < 1000; ++i) {
    const bool x = rng.bit();
    a.push_back(x);
    b.set(i, x);
  }
  EXPECT_EQ(a, b);
}

TEST(BitVector, ParityRangeMatchesBitByBit) {
  Xoshiro256ss rng(2);
  const BitVector v = random_vector(rng, 777);
  for (int t = 0; t < 2000; ++t) {
    std::size_t a = rng.below(778);
    std::size_t b = rng.below(778);
    if (a > b) {
      std::swap(a, b);
    }
    bool p = false;
    for (std::size_t i = a; i < b; ++i) {
      p ^= v.get(i);
    }
    ASSERT_EQ(v.parity_range(a, b), p) << a << ".." << b;
  }
  EXPECT_EQ(v.parity(), v.parity_range(0, v.size()));
  EXPECT_EQ(v.parity(), (v.popcount() & 1) != 0);
}

TEST(BitVector, ParityOfIndexSet) {
  Xoshiro256ss rng(3);
  const BitVector v = random_vector(rng, 500);
  std::vector<std::uint32_t> idx;
  bool p = false;
  for (std::uint32_t i = 0; i < 500; i += 7) {
    idx.push_back(i);
    p ^= v.get(i);
  }
  EXPECT_EQ(v.parity_of(idx), p);
}

TEST(BitVector, XorAndHamming) {
  Xoshiro256ss rng(4);
  const BitVector a = random_vector(rng, 300);
  const BitVector b = random_vector(rng, 300);
  const BitVector c = a ^ b;
  std::size_t diff = 0;
  for (std::size_t i = 0; i < 300; ++i) {
    ASSERT_EQ(c.get(i), a.get(i) != b.get(i));
    diff += a.get(i) != b.get(i) ? 1 : 0;
  }
  EXPECT_EQ(a.hamming_distance(b), diff);
  EXPECT_EQ(c.popcount(), diff);
}

TEST(BitVector, BytesAreLittleEndianWithinByte) {
  BitVector v(12);
  v.set(0, true);   // byte 0 bit 0 -> 0x01
  v.set(7, true);   // byte 0 bit 7 -> 0x80
  v.set(9, true);   // byte 1 bit 1 -> 0x02
  const auto bytes = v.to_bytes();
  ASSERT_EQ(bytes.size(), 2U);
  EXPECT_EQ(bytes[0], 0x81);
  EXPECT_EQ(bytes[1], 0x02);
  EXPECT_EQ(BitVector::from_bytes(bytes, 12), v);
  // Bits beyond nbits are dropped.
  const std::vector<std::uint8_t> all{0xFF, 0xFF};
  EXPECT_EQ(BitVector::from_bytes(all, 10).popcount(), 10U);
}

TEST(BitVector, RoundTripAndSlice) {
  Xoshiro256ss rng(5);
  for (std::size_t n : {1U, 63U, 64U, 65U, 1000U}) {
    const BitVector v = random_vector(rng, n);
    EXPECT_EQ(BitVector::from_bytes(v.to_bytes(), n), v);
    const std::size_t a = n / 3;
    const std::size_t b = n - n / 5;
    const BitVector s = v.slice(a, b);
    ASSERT_EQ(s.size(), b - a);
    for (std::size_t i = a; i < b; ++i) {
      ASSERT_EQ(s.get(i - a), v.get(i));
    }
  }
}

TEST(BitVector, MoveLeavesEmpty) {
  BitVector a(100);
  a.set(3, true);
  BitVector b(std::move(a));
  EXPECT_EQ(b.popcount(), 1U);
  EXPECT_EQ(a.size(), 0U);  // NOLINT(bugprone-use-after-move): specified state
}

// append_bits: the same vector as bit-by-bit push_back, for every chunk width and
// alignment, with garbage above the n bits ignored and the tail kept zero.
TEST(BitVector, AppendBitsMatchesPushBack) {
  Xoshiro256ss rng(11);
  BitVector bulk;
  BitVector single;
  for (int round = 0; round < 400; ++round) {
    const auto n = static_cast<unsigned>(rng.below(65));  // 0..64
    const std::uint64_t bits = rng.next();                // high garbage included
    bulk.append_bits(bits, n);
    for (unsigned b = 0; b < n; ++b) {
      single.push_back(((bits >> b) & 1U) != 0);
    }
    ASSERT_EQ(bulk.size(), single.size()) << round;
    ASSERT_TRUE(bulk == single) << round;  // word equality: the tails are zero too
  }
  EXPECT_GT(bulk.size(), 64U * 100);
}

// append_masked (the word-wise split used by sifting and sampling) against the bit-by-bit
// definition, on sizes around word boundaries, sparse, dense, empty and full masks, and
// appended after a non-aligned prefix.
TEST(BitVector, AppendMaskedMatchesBitByBit) {
  Xoshiro256ss rng(12);
  for (const std::size_t n : {0U, 1U, 63U, 64U, 65U, 127U, 128U, 1000U, 4099U}) {
    for (const int density : {0, 1, 50, 99, 100}) {
      const BitVector src = random_vector(rng, n);
      BitVector mask(n);
      for (std::size_t i = 0; i < n; ++i) {
        mask.set(i, rng.below(100) < static_cast<std::uint64_t>(density));
      }
      for (const bool select : {true, false}) {
        const std::size_t prefix = rng.below(70);
        BitVector got = random_vector(rng, prefix);
        BitVector want = got;
        got.append_masked(src, mask, select);
        for (std::size_t i = 0; i < n; ++i) {
          if (mask.get(i) == select) {
            want.push_back(src.get(i));
          }
        }
        ASSERT_EQ(got.size(), want.size()) << n << " " << density << " " << select;
        ASSERT_TRUE(got == want) << n << " " << density << " " << select;
      }
    }
  }
}

}  // namespace
}  // namespace qkd::core
