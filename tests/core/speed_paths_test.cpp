// The fast paths of the engine equal the plain code they replace: the table logarithm of
// the channel simulation's gaps (bit-identical to libm's floor(log(u) * inv)), the
// conditional random draw without a branch, POPCNT / PEXT / PDEP chosen at run time vs
// the portable code, the word-wise parameter-estimation statistics and disclosure masks
// vs the per-bit loops, the branch-free detection frame coding (same bytes), the
// responder's layout without inverse tables, and the four-block transcript hash.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <vector>

#include "bit_ops.hpp"
#include "fast_log.hpp"
#include "gf128.hpp"
#include "protocol.hpp"
#include "qkd/core/bit_vector.hpp"
#include "qkd/core/cascade.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/random.hpp"
#include "wire.hpp"

namespace qkd::core {
namespace {

// Restores the run-time choice of the bit instructions when a test ends.
class BitOpsGuard {
 public:
  BitOpsGuard() = default;
  BitOpsGuard(const BitOpsGuard&) = delete;
  BitOpsGuard& operator=(const BitOpsGuard&) = delete;
  ~BitOpsGuard() { detail::set_hardware_bit_ops(true); }
};

// Every combination the word-wise sifting paths branch on: each size (around word edges),
// with and without decoy classes, balanced or biased bases, with the hardware bit
// instructions and without. Calls f(n, decoys, biased); returns the number of cases.
template <typename F>
int for_each_sifting_case(std::initializer_list<std::size_t> sizes, F&& f) {
  int cases = 0;
  for (const std::size_t n : sizes) {
    for (const bool decoys : {false, true}) {
      for (const bool biased : {false, true}) {
        for (const bool hw : {false, true}) {
          detail::set_hardware_bit_ops(hw);
          f(n, decoys, biased);
          ++cases;
        }
      }
    }
  }
  return cases;
}

// n sifted positions: Z basis with probability 1/4; with decoys, an intensity class each.
detail::SiftedInfo random_sifted_info(Xoshiro256ss& rng, std::size_t n, bool decoys) {
  detail::SiftedInfo info;
  info.basis = BitVector(n);
  for (std::size_t i = 0; i < n; ++i) {
    info.basis.set(i, rng.below(4) == 0);
    if (decoys) {
      info.intensity.push_back(static_cast<std::uint8_t>(rng.below(3)));
    }
  }
  return info;
}

double reference_gap(double u, double inv) { return std::floor(std::log(u) * inv); }

TEST(SpeedPaths, GeometricGapEqualsTheLibmFormula) {
  const detail::LogTable& t = detail::log_table();
  // Q from a near-certain click to a long fiber, as in the simulator (inv = 1/log(1 - Q)).
  const std::array<double, 6> qs{0.99, 0.5, 0.0138, 1e-3, 1e-6, 1e-10};
  Xoshiro256ss rng(2026);
  double worst = 0.0;
  for (const double q : qs) {
    const double inv = 1.0 / std::log1p(-q);
    for (int i = 0; i < 200'000; ++i) {
      double u = rng.uniform_open0();  // the simulator's draw, in [2^-53, 1]
      if (i % 4 == 1) {
        u = std::ldexp(u, -static_cast<int>(rng.below(11)));  // down to 2^-63
      }
      ASSERT_EQ(detail::geometric_gap(u, inv, t), reference_gap(u, inv))
          << "u = " << u << ", q = " << q;
      worst = std::max(worst, std::fabs(detail::log_approx(u, t) - std::log(u)));
    }
    // Adversarial: u whose x = log(u) * inv lies within a few ulps of an integer.
    for (int k = 0; k < 3000; ++k) {
      const double target = static_cast<double>(k) * (q > 1e-3 ? 1.0 : 997.0);
      double u = std::exp(target / inv);
      for (int s = 0; s < 3; ++s) {
        u = std::nextafter(u, 0.0);
      }
      for (int s = 0; s < 7 && u > 0.0 && u <= 1.0; ++s, u = std::nextafter(u, 2.0)) {
        ASSERT_EQ(detail::geometric_gap(u, inv, t), reference_gap(u, inv))
            << "u = " << u << ", q = " << q;
      }
    }
  }
  EXPECT_LT(worst, 1e-14);  // the error the fallback margin is sized for
  // The ends of the domain, and below it (always the libm formula).
  const double inv = 1.0 / std::log1p(-0.0138);
  for (const double u : {1.0, std::nextafter(1.0, 0.0), 0x1p-53, 0x1p-64, 0x1p-80, 1e-300}) {
    EXPECT_EQ(detail::geometric_gap(u, inv, t), reference_gap(u, inv)) << u;
  }
}

TEST(SpeedPaths, NextIfIsTheConditionalStream) {
  Xoshiro256ss a(77);
  Xoshiro256ss b(77);
  Xoshiro256ss coin(5);
  for (int i = 0; i < 100'000; ++i) {
    const bool take = coin.bit();
    const std::uint64_t v = a.next_if(take);
    if (take) {
      ASSERT_EQ(v, b.next()) << i;
    } else {
      Xoshiro256ss peek = b;
      ASSERT_EQ(v, peek.next()) << i;  // the value next() would give, state unchanged
    }
  }
  EXPECT_EQ(a.next(), b.next());
}

TEST(SpeedPaths, BitInstructionsEqualThePortableCode) {
  BitOpsGuard guard;
  Xoshiro256ss rng(11);
  for (int i = 0; i < 20'000; ++i) {
    const std::uint64_t x = rng.next();
    std::uint64_t m = rng.next();
    if (i % 3 == 0) {
      m &= rng.next();  // sparse masks too
    }
    if (i % 7 == 0) {
      m = i % 2 == 0 ? 0 : ~std::uint64_t{0};
    }
    const std::uint64_t c = detail::compress_bits_portable(x, m);
    // Reference by bit: the k-th set bit of m supplies bit k.
    std::uint64_t ref = 0;
    unsigned k = 0;
    for (unsigned b = 0; b < 64; ++b) {
      if (((m >> b) & 1U) != 0) {
        ref |= ((x >> b) & 1U) << k++;
      }
    }
    ASSERT_EQ(c, ref);
    ASSERT_EQ(detail::deposit_bits_portable(c, m), x & m);
    for (const bool hw : {false, true}) {
      detail::set_hardware_bit_ops(hw);
      ASSERT_EQ(detail::popcount64(x), static_cast<unsigned>(std::popcount(x)));
      ASSERT_EQ(detail::compress_bits(x, m), ref);
      ASSERT_EQ(detail::deposit_bits(ref, m), x & m);
    }
  }
  // BitVector and CascadeLayout users: the same results either way.
  BitVector src(10'007);
  BitVector mask(10'007);
  for (std::size_t i = 0; i < src.size(); ++i) {
    src.set(i, rng.bit());
    mask.set(i, rng.below(5) == 0);
  }
  std::array<std::uint8_t, 32> seed{};
  seed[0] = 3;
  std::vector<std::uint32_t> positions[2];
  BitVector selected[2];
  std::size_t counts[2] = {0, 0};
  for (int mode = 0; mode < 2; ++mode) {
    detail::set_hardware_bit_ops(mode == 1);
    selected[mode].append_masked(src, mask, true);
    counts[mode] = src.popcount() + 7 * src.hamming_distance(mask);
    const CascadeLayout layout(10'007, 16, 32, seed, CascadeVariant::kModern, 4);
    for (std::uint32_t p = 0; p < layout.passes(); ++p) {
      for (std::uint32_t i = 0; i < 10'007; i += 13) {
        positions[mode].push_back(layout.position(p, i));
      }
    }
  }
  EXPECT_EQ(selected[0], selected[1]);
  EXPECT_EQ(selected[0].size(), mask.popcount());
  EXPECT_EQ(counts[0], counts[1]);
  EXPECT_EQ(positions[0], positions[1]);
  // The build and CPU choose; say which path the suite ran by default.
  detail::set_hardware_bit_ops(true);
  std::printf("[ info ] POPCNT %s, PEXT/PDEP %s\n", detail::hardware_popcount() ? "on" : "off",
              detail::hardware_pext() ? "on" : "off");
}

// The per-bit loop gather_statistics used before (the reference for the word-wise one).
BlockStatistics reference_statistics(const detail::SiftedInfo& info,
                                             const BitVector& mask, const BitVector& alice,
                                             const BitVector& bob, bool biased,
                                             BlockResult& r) {
  BlockStatistics s;
  std::array<std::uint64_t, 3> test_disclosed{};
  std::size_t d = 0;
  for (std::size_t i = 0; i < mask.size(); ++i) {
    const std::size_t k = info.intensity.empty() ? 0 : info.intensity[i];
    const bool x_basis = info.basis.get(i);
    const bool key_basis = !biased || !x_basis;
    const bool test = !biased || x_basis;
    auto& cls = r.intensity[k];
    ++cls.sifted;
    s.key_basis_sifted[k] += key_basis ? 1 : 0;
    s.test_sifted[k] += test ? 1 : 0;
    if (mask.get(i)) {
      const bool err = alice.get(d) != bob.get(d);
      ++d;
      ++cls.disclosed;
      cls.errors += err ? 1 : 0;
      if (test) {
        ++test_disclosed[k];
        s.test_errors[k] += err ? 1 : 0;
      }
      if (k == 0 && key_basis) {
        ++s.sample_bits;
        s.sample_errors += err ? 1 : 0;
      }
    } else {
      ++s.key_bits;
    }
  }
  for (std::size_t k = 0; k < 3; ++k) {
    if (test_disclosed[k] > 0 && test_disclosed[k] < s.test_sifted[k]) {
      s.test_errors[k] = static_cast<std::uint64_t>(std::llround(
          static_cast<double>(s.test_errors[k]) * static_cast<double>(s.test_sifted[k]) /
          static_cast<double>(test_disclosed[k])));
    }
  }
  return s;
}

TEST(SpeedPaths, WordWiseStatisticsEqualThePerBitLoop) {
  BitOpsGuard guard;
  Xoshiro256ss rng(31);
  const int cases = for_each_sifting_case(
      {0, 1, 63, 64, 65, 1000, 20'011}, [&](std::size_t n, bool decoys, bool biased) {
        const detail::SiftedInfo info = random_sifted_info(rng, n, decoys);
        BitVector mask(n);
        for (std::size_t i = 0; i < n; ++i) {
          mask.set(i, (decoys && info.intensity[i] != 0) || rng.below(10) == 0);
        }
        const std::size_t disclosed = mask.popcount();
        BitVector alice(disclosed);
        BitVector bob(disclosed);
        for (std::size_t i = 0; i < disclosed; ++i) {
          const bool a = rng.bit();
          alice.set(i, a);
          bob.set(i, rng.below(20) == 0 ? !a : a);
        }
        ProtocolParams p;
        p.z_basis_prob = biased ? 0.8 : 0.5;
        detail::SourceInfo source;
        BlockResult fast;
        BlockResult ref;
        const BlockStatistics s =
            detail::gather_statistics(info, mask, alice, bob, p, source, 1'000'000, fast);
        const BlockStatistics e = reference_statistics(info, mask, alice, bob, biased, ref);
        EXPECT_EQ(s.key_basis_sifted, e.key_basis_sifted);
        EXPECT_EQ(s.test_sifted, e.test_sifted);
        EXPECT_EQ(s.test_errors, e.test_errors);
        EXPECT_EQ(s.sample_bits, e.sample_bits);
        EXPECT_EQ(s.sample_errors, e.sample_errors);
        EXPECT_EQ(s.key_bits, e.key_bits);
        for (std::size_t k = 0; k < 3; ++k) {
          EXPECT_EQ(fast.intensity[k].sifted, ref.intensity[k].sifted) << k;
          EXPECT_EQ(fast.intensity[k].disclosed, ref.intensity[k].disclosed) << k;
          EXPECT_EQ(fast.intensity[k].errors, ref.intensity[k].errors) << k;
        }
        EXPECT_EQ(fast.sample_bits, disclosed);
      });
  EXPECT_EQ(cases, 56);
}

TEST(SpeedPaths, DetectionFramesKeepTheirBytesForEveryGapLength) {
  // Gaps around the one/two/three-byte boundaries, and their exact encoding.
  const std::vector<std::uint64_t> gaps{0,     1,     127,       128,       129, 16383,
                                        16384, 16385, 2'097'151, 2'097'152, 5,   300};
  std::vector<DetectionEvent> ev;
  std::uint64_t pulse = 0;
  for (std::size_t i = 0; i < gaps.size(); ++i) {
    pulse += gaps[i];
    DetectionEvent e;
    e.pulse = pulse & DetectionEvent::kMaxPulse;
    e.bit = static_cast<std::uint64_t>(i % 2);
    e.basis = static_cast<std::uint64_t>((i / 2) % 2);
    e.dark = i % 5 == 4 ? 1U : 0U;
    ev.push_back(e);
    ++pulse;
  }
  const auto msg = detail::encode_detections(9, 0, true, ev, 0);
  // Payload after the header: varint gap, state byte, per event (LEB128, little end first).
  const std::vector<std::uint8_t> first{0x00, 0x00,        // gap 0, state 0
                                        0x01, 0x01,        // gap 1, bit 1
                                        0x7F, 0x02,        // gap 127, basis 1
                                        0x80, 0x01, 0x03,  // gap 128 (two bytes), bit 1 basis 1
                                        0x81, 0x01, 0x04,  // gap 129, dark
                                        0xFF, 0x7F, 0x01,  // gap 16383 (two bytes)
                                        0x80, 0x80, 0x01, 0x02,   // gap 16384 (three bytes)
                                        0x81, 0x80, 0x01, 0x03};  // gap 16385
  const std::size_t payload = 1 + 1 + 8 + 4 + 1 + 4;  // version, type, block, chunk, last, count
  ASSERT_GT(msg.size(), payload + first.size());
  EXPECT_EQ(
      std::vector<std::uint8_t>(msg.begin() + static_cast<std::ptrdiff_t>(payload),
                                msg.begin() + static_cast<std::ptrdiff_t>(payload + first.size())),
      first);
  std::uint64_t next = 0;
  auto c = detail::decode_detections(msg, 9, 0, next, 1ULL << 32);
  ASSERT_TRUE(c.ok()) << c.error().message;
  ASSERT_EQ(c->events.size(), ev.size());
  for (std::size_t i = 0; i < ev.size(); ++i) {
    EXPECT_EQ(c->events[i].pulse, ev[i].pulse) << i;
    EXPECT_EQ(c->events[i].dark, ev[i].dark) << i;
    if (ev[i].dark == 0) {
      EXPECT_EQ(c->events[i].bit, ev[i].bit) << i;
      EXPECT_EQ(c->events[i].basis, ev[i].basis) << i;
    }
  }
  // gap_and_state = varint then u8, on random bytes and every truncation.
  Xoshiro256ss rng(8);
  for (int i = 0; i < 20'000; ++i) {
    std::vector<std::uint8_t> bytes(rng.below(6));
    for (auto& b : bytes) {
      b = static_cast<std::uint8_t>(rng.below(4) == 0 ? rng.next() | 0x80 : rng.next());
    }
    detail::Reader fast(bytes);
    detail::Reader slow(bytes);
    std::uint64_t g1 = 0;
    std::uint64_t g2 = 0;
    std::uint8_t s1 = 0;
    std::uint8_t s2 = 0;
    const bool ok1 = fast.gap_and_state(g1, s1);
    const bool ok2 = slow.varint(g2) && slow.u8(s2);
    ASSERT_EQ(ok1, ok2);
    if (ok1) {
      ASSERT_EQ(g1, g2);
      ASSERT_EQ(s1, s2);
      ASSERT_EQ(fast.remaining(), slow.remaining());
    }
  }
}

TEST(SpeedPaths, ResponderLayoutWithoutInverseTablesAnswersTheSame) {
  std::array<std::uint8_t, 32> seed{};
  seed[5] = 9;
  const std::uint32_t n = 5000;
  const CascadeLayout full(n, 16, 16, seed, CascadeVariant::kModern, 4);
  const CascadeLayout lean(n, 16, 16, seed, CascadeVariant::kModern, 4, false);
  EXPECT_TRUE(full.has_inverse_tables());
  EXPECT_FALSE(lean.has_inverse_tables());
  ASSERT_EQ(full.passes(), lean.passes());
  BitVector key(n);
  Xoshiro256ss rng(4);
  for (std::uint32_t i = 0; i < n; ++i) {
    key.set(i, rng.bit());
  }
  const CascadeResponder a(key, full);
  const CascadeResponder b(key, lean);
  for (std::uint32_t p = 0; p < full.passes(); ++p) {
    ASSERT_EQ(full.order(p), lean.order(p));
    EXPECT_TRUE(std::ranges::equal(full.perm(p), lean.perm(p))) << p;
    EXPECT_TRUE(lean.inverse(p).empty());
    for (std::uint32_t i = 0; i < n; i += 97) {
      EXPECT_EQ(full.position(p, i), lean.position(p, i));
    }
    auto pa = a.block_parities(p);
    auto pb = b.block_parities(p);
    ASSERT_TRUE(pa.ok() && pb.ok());
    EXPECT_EQ(*pa, *pb);
  }
}

TEST(SpeedPaths, WordWiseDisclosureEqualsThePerBitLoops) {
  BitOpsGuard guard;
  Xoshiro256ss rng(41);
  const int cases = for_each_sifting_case(
      {0, 1, 63, 64, 65, 777, 10'000}, [&](std::size_t n, bool decoys, bool biased) {
        const detail::SiftedInfo info = random_sifted_info(rng, n, decoys);
        // mandatory_disclosure vs the per-bit rule.
        const BitVector m = detail::mandatory_disclosure(info, biased);
        ASSERT_EQ(m.size(), n);
        for (std::size_t i = 0; i < n; ++i) {
          const bool decoy = decoys && info.intensity[i] != 0;
          ASSERT_EQ(m.get(i), decoy || (biased && info.basis.get(i))) << i;
        }
        // add_sample vs the per-bit deposit of the sample on the clear positions.
        const std::size_t rest = n - m.popcount();
        BitVector sample(rest);
        for (std::size_t j = 0; j < rest; ++j) {
          sample.set(j, rng.below(7) == 0);
        }
        BitVector fast = m;
        detail::add_sample(fast, sample);
        BitVector ref = m;
        std::size_t j = 0;
        for (std::size_t i = 0; i < n; ++i) {
          if (!m.get(i)) {
            ref.set(i, sample.get(j++));
          }
        }
        ASSERT_EQ(fast, ref);
        // The sampler from a given generator vs the per-bit selection loop.
        Xoshiro256ss g1(n + 1);
        Xoshiro256ss g2(n + 1);
        const std::uint64_t k = rest / 3;
        const BitVector s1 = detail::random_sample_mask(g1, rest, k);
        BitVector s2(rest);
        std::uint64_t need = std::min<std::uint64_t>(k, rest);
        for (std::uint64_t i = 0; i < rest && need > 0; ++i) {
          if (g2.below(rest - i) < need) {
            s2.set(i, true);
            --need;
          }
        }
        ASSERT_EQ(s1, s2);
        EXPECT_EQ(s1.popcount(), k);
        EXPECT_EQ(g1.next(), g2.next());
      });
  EXPECT_EQ(cases, 56);
}

TEST(SpeedPaths, FourBlockPolyHashEqualsHorner) {
  // PolyHasher folds four blocks per step (h^4, h^3, h^2, h) when an update holds >= 64
  // bytes: the same field element as the Horner chain (portable one-shot reference).
  Xoshiro256ss rng(12);
  std::array<std::uint8_t, 16> key{};
  for (auto& b : key) {
    b = static_cast<std::uint8_t>(rng.next());
  }
  for (const std::size_t n : {64UL, 65UL, 127UL, 128UL, 1000UL, 4099UL}) {
    std::vector<std::uint8_t> m(n);
    for (auto& b : m) {
      b = static_cast<std::uint8_t>(rng.next());
    }
    const auto expected = detail::poly_hash(key, m, detail::Gf128Impl::kPortable);
    for (int trial = 0; trial < 10; ++trial) {
      detail::PolyHasher h(key);
      std::size_t at = 0;
      while (at < n) {
        const std::size_t len =
            std::min<std::size_t>(n - at, trial == 0 ? n : rng.below(300) + 1);
        h.update(std::span<const std::uint8_t>(m).subspan(at, len));
        at += len;
      }
      ASSERT_EQ(h.finish(), expected) << n << " bytes, trial " << trial;
    }
  }
}

}  // namespace
}  // namespace qkd::core
