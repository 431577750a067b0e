// Cascade (Brassard, Salvail 1993), original four-pass version, split in two halves:
//  - CascadeResponder (Alice): holds the reference key and answers parity queries;
//  - cascade_correct (Bob): asks for parities through a ParityOracle and flips his bits.
// The oracle is the seam to the protocol: in the link it sends one message per round and
// waits for Alice's answer; in tests it calls a local CascadeResponder directly.
//
// Batching: within one "wave" every odd block of one pass is bisected at once, so a wave
// costs ceil(log2 k) round trips whatever the number of odd blocks. A correction in pass
// p toggles the parity of the block holding that bit in every earlier pass (the cascade
// effect); the next wave picks such a pass. Blocks of one pass are disjoint, so the
// searches of one wave never interfere.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "qkd/core/bit_vector.hpp"
#include "qkd/core/result.hpp"

namespace qkd::core {

// The shared, public structure of one Cascade run: block sizes and per-pass shuffles.
// Pass 0 is the identity permutation; pass p >= 1 is a Fisher-Yates shuffle driven by
// Xoshiro256ss seeded with the announced 32-byte seed.
class CascadeLayout {
 public:
  // first_block_size >= 1; passes >= 1; block size doubles each pass (capped at n).
  CascadeLayout(std::uint32_t n, std::uint32_t passes, std::uint32_t first_block_size,
                std::span<const std::uint8_t, 32> shuffle_seed);
  [[nodiscard]] std::uint32_t size() const { return n_; }
  [[nodiscard]] std::uint32_t passes() const { return static_cast<std::uint32_t>(block_.size()); }
  [[nodiscard]] std::uint32_t block_size(std::uint32_t pass) const { return block_[pass]; }
  [[nodiscard]] std::uint32_t block_count(std::uint32_t pass) const {
    return (n_ + block_[pass] - 1) / block_[pass];
  }
  // pos -> original index, and original index -> pos, for pass p.
  [[nodiscard]] std::span<const std::uint32_t> perm(std::uint32_t pass) const { return perm_[pass]; }
  [[nodiscard]] std::span<const std::uint32_t> inverse(std::uint32_t pass) const { return inv_[pass]; }
  // Builds the key as seen in pass p's order.
  [[nodiscard]] BitVector permuted(const BitVector& key, std::uint32_t pass) const;

 private:
  std::uint32_t n_;
  std::vector<std::uint32_t> block_;
  std::vector<std::vector<std::uint32_t>> perm_;
  std::vector<std::vector<std::uint32_t>> inv_;
};

// The classic first block size 0.73 / QBER (clamped into [1, n]; QBER floored at 0.2 %).
[[nodiscard]] std::uint32_t cascade_first_block_size(double qber, std::uint32_t n);

// One parity query: bits [start, start + length) of pass `pass`'s permuted key.
struct ParityQuery {
  std::uint32_t pass = 0;
  std::uint32_t start = 0;
  std::uint32_t length = 0;
};

// Alice's side.
class CascadeResponder {
 public:
  CascadeResponder(const BitVector& key, const CascadeLayout& layout);
  // Parities of every top-level block of a pass. Fails on a pass out of range.
  [[nodiscard]] Result<BitVector> block_parities(std::uint32_t pass) const;
  // Parities of the queried ranges. Fails on any query out of range (pass, empty range,
  // range past the end) so that a malformed request cannot read out of bounds.
  [[nodiscard]] Result<BitVector> range_parities(std::span<const ParityQuery> queries) const;

 private:
  const CascadeLayout& layout_;
  std::vector<BitVector> permuted_;
};

// Bob's view of Alice: one call = one round trip in the protocol.
class ParityOracle {
 public:
  virtual ~ParityOracle() = default;
  [[nodiscard]] virtual Result<BitVector> block_parities(std::uint32_t pass) = 0;
  [[nodiscard]] virtual Result<BitVector> range_parities(std::span<const ParityQuery> q) = 0;
};

// A ParityOracle over a local CascadeResponder (tests, benchmarks).
class LocalParityOracle final : public ParityOracle {
 public:
  explicit LocalParityOracle(const CascadeResponder& r) : r_(r) {}
  Result<BitVector> block_parities(std::uint32_t pass) override { return r_.block_parities(pass); }
  Result<BitVector> range_parities(std::span<const ParityQuery> q) override {
    return r_.range_parities(q);
  }

 private:
  const CascadeResponder& r_;
};

struct CascadeStats {
  std::uint64_t parities_disclosed = 0;  // every parity bit Alice revealed
  std::uint64_t errors_corrected = 0;    // bits Bob flipped
  std::uint64_t round_trips = 0;         // oracle calls
};

// Bob's side: corrects `key` (size layout.size()) towards Alice's. Fails only if the
// oracle fails or answers with the wrong number of parities (kProtocol).
[[nodiscard]] Result<CascadeStats> cascade_correct(BitVector& key, const CascadeLayout& layout,
                                                   ParityOracle& oracle);

}  // namespace qkd::core
