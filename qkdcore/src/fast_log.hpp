// The geometric gaps of the channel simulation, floor(log(u) / log(1 - Q)), without a
// libm call in the common case and always bit-identical to the libm formula.
//
// log_approx(u) is a table-driven natural logarithm (256 intervals per octave, a degree-5
// series for log(1 + r), |r| <= 1/511) with an absolute error below 1e-14 for u in
// [2^-64, 1]. The gap is the floor of x = log(u) * inv, inv = 1 / log(1 - Q) < 0, so x >= 0;
// an error in x can change its floor only if x lies within that error of an integer.
// geometric_gap() therefore uses the approximation only when x is farther than
// eps = 1e-12 (|inv| + x) from every integer (a margin ~100 times the worst error of the
// approximation plus the rounding of libm's own result), and otherwise, with probability
// ~2 eps per call, falls back to std::floor(std::log(u) * inv) itself. Either way the
// result equals the libm formula, so the random stream of the simulation is unchanged.
#pragma once

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>

namespace qkd::core::detail {

struct LogTable {
  static constexpr unsigned kBits = 8;  // 256 intervals of [1, 2), by the top mantissa bits
  static constexpr std::size_t kSize = std::size_t{1} << kBits;
  // Interval i = [1 + i/256, 1 + (i+1)/256): c_i = 1 / its midpoint rounded to double, and
  // -log(c_i) of that rounded value.
  std::array<double, kSize> inv_center{};
  std::array<double, kSize> neg_log{};
};

// The table, computed once (thread-safe static initialisation).
[[nodiscard]] const LogTable& log_table();

// log(u) for a normal, positive, finite u (absolute error < 1e-14 for u in [2^-64, 1]).
// Written for a short dependency chain (the simulation computes one per candidate and
// the CPU overlaps consecutive ones): exponent and table index from the bits, no
// float-to-int conversion, an Estrin-form polynomial.
[[nodiscard]] inline double log_approx(double u, const LogTable& t) {
  const auto bits = std::bit_cast<std::uint64_t>(u);
  // u = 2^e m, m in [1, 2); e as a double without a conversion instruction.
  const double e = std::bit_cast<double>((bits >> 52) | 0x4330000000000000ULL) -
                   (0x1p52 + 1023.0);
  const std::size_t i = (bits >> (52 - LogTable::kBits)) & (LogTable::kSize - 1);
  const double m = std::bit_cast<double>((bits & 0x000FFFFFFFFFFFFFULL) | 0x3FF0000000000000ULL);
  const double r = m * t.inv_center[i] - 1.0;  // |r| <= 1/511
  // log(1 + r) = r - r^2/2 + r^3/3 - r^4/4 + r^5/5 (next term < 1e-17).
  const double r2 = r * r;
  const double p = r + r2 * ((-1.0 / 2 + r * (1.0 / 3)) + r2 * (-1.0 / 4 + r * (1.0 / 5)));
  constexpr double kLn2 = 0x1.62e42fefa39efp-1;
  return e * kLn2 + (t.neg_log[i] + p);
}

// std::floor(std::log(u) * inv) for u in (0, 1] and inv < 0, bit-identical (see above;
// u below 2^-64 or a gap of 2^51 or more always takes the libm formula).
[[nodiscard]] inline double geometric_gap(double u, double inv, const LogTable& t) {
  const double x = log_approx(u, t) * inv;  // >= 0 up to the error
  if (u >= 0x1p-64 && x < 0x1p51) {  // else the libm formula (outside the tested domain)
    // The nearest integer to x (exact for 0 <= x < 2^51) and the distance to it.
    const double nearest = (x + 0x1p52) - 0x1p52;
    const double d = x - nearest;
    const double eps = 1e-12 * (x - inv);
    if (std::fabs(d) > eps) {
      // floor(x): nearest, less 1 when x lies below it (a mask, not a branch: a coin flip).
      const auto below = std::bit_cast<std::uint64_t>(d) >> 63;  // d < 0 (d != 0 here)
      return nearest - static_cast<double>(static_cast<std::int64_t>(below));
    }
  }
  return std::floor(std::log(u) * inv);
}

}  // namespace qkd::core::detail
