#include "qkd/core/key_length.hpp"

#include <cmath>

namespace qkd::core {

double binary_entropy(double x) {
  if (!(x > 0.0) || !(x < 1.0)) {
    return 0.0;
  }
  return -x * std::log2(x) - (1.0 - x) * std::log2(1.0 - x);
}

std::uint64_t secret_key_length(std::uint64_t reconciled_bits, double qber,
                                std::uint64_t leaked_bits, double safety_margin) {
  const double n = static_cast<double>(reconciled_bits);
  const double m = std::floor(n * (1.0 - binary_entropy(qber)) -
                              static_cast<double>(leaked_bits) - safety_margin * n);
  if (!(m > 0.0)) {
    return 0;
  }
  const auto bits = static_cast<std::uint64_t>(m);
  return bits - (bits % 8);
}

}  // namespace qkd::core
