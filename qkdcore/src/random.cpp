#include "qkd/core/random.hpp"

#include <openssl/rand.h>

#include <cstring>
#include <limits>

namespace qkd::core {

Xoshiro256ss::Xoshiro256ss(std::uint64_t seed) {
  SplitMix64 sm(seed);
  for (auto& s : s_) {
    s = sm.next();
  }
}

Xoshiro256ss::Xoshiro256ss(std::span<const std::uint8_t, 32> seed) {
  for (std::size_t i = 0; i < 4; ++i) {
    std::uint64_t v = 0;
    for (std::size_t b = 0; b < 8; ++b) {
      v |= std::uint64_t{seed[8 * i + b]} << (8 * b);
    }
    s_[i] = v;
  }
  if ((s_[0] | s_[1] | s_[2] | s_[3]) == 0) {  // the all-zero state is a fixed point
    s_[0] = 0x9E3779B97F4A7C15ULL;
  }
}

Status random_bytes(std::span<std::uint8_t> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    const std::size_t chunk =
        std::min<std::size_t>(out.size() - done, std::numeric_limits<int>::max());
    if (RAND_bytes(out.data() + done, static_cast<int>(chunk)) != 1) {
      return make_error(ErrorCode::kInternal, "RAND_bytes failed");
    }
    done += chunk;
  }
  return ok_status();
}

}  // namespace qkd::core
