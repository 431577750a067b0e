// Randomness. Two kinds, never mixed up:
//  - simulation randomness (nature: which pulse is detected, noise, Bob's measurement
//    outcomes): Xoshiro256ss, fast and deterministic for a given seed;
//  - cryptographic randomness (Toeplitz and verification seeds, QBER sample choice,
//    Cascade shuffle seeds): OpenSSL's DRBG through random_bytes().
#pragma once

#include <cstdint>
#include <span>

#include "qkd/core/result.hpp"

namespace qkd::core {

// SplitMix64 (Steele, Lea, Flood 2014): used to expand one 64-bit seed into a full state.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

 private:
  std::uint64_t s_;
};

// xoshiro256** (Blackman, Vigna 2018). Not cryptographic.
class Xoshiro256ss {
 public:
  explicit Xoshiro256ss(std::uint64_t seed);
  // Seeds from 32 bytes (e.g. a shared, announced shuffle seed).
  explicit Xoshiro256ss(std::span<const std::uint8_t, 32> seed);
  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // The value next() returns; the state advances only if `take` (no branch: for draws that
  // happen or not at random, where a branch would be mispredicted). The same stream as
  // calling next() exactly when `take` is true.
  std::uint64_t next_if(bool take) {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t keep = std::uint64_t{take} - 1;  // all ones iff !take
    const std::uint64_t t = s_[1] << 17;
    const std::uint64_t s2 = s_[2] ^ s_[0];
    const std::uint64_t s3 = s_[3] ^ s_[1];
    const std::uint64_t s1 = s_[1] ^ s2;
    const std::uint64_t s0 = s_[0] ^ s3;
    s_[0] = (s0 & ~keep) | (s_[0] & keep);
    s_[1] = (s1 & ~keep) | (s_[1] & keep);
    s_[2] = ((s2 ^ t) & ~keep) | (s_[2] & keep);
    s_[3] = (rotl(s3, 45) & ~keep) | (s_[3] & keep);
    return result;
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform in (0, 1]: safe for log().
  double uniform_open0() { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }
  bool bit() { return (next() >> 63) != 0; }
  bool bernoulli(double p) { return uniform() < p; }
  // Uniform in [0, bound), bound > 0 (Lemire's multiply-shift; bias < 2^-64 * bound).
  std::uint64_t below(std::uint64_t bound) {
    __extension__ using U128 = unsigned __int128;
    return static_cast<std::uint64_t>((static_cast<U128>(next()) * bound) >> 64);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

// Fills `out` from OpenSSL's DRBG. Fails (kInternal) only if the DRBG fails.
[[nodiscard]] Status random_bytes(std::span<std::uint8_t> out);

}  // namespace qkd::core
