// Cascade (Brassard, Salvail 1993) with selectable block schedules, split in two halves:
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
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "qkd/core/bit_vector.hpp"
#include "qkd/core/result.hpp"

namespace qkd::core {

// Block schedules ("variants"). Every variant starts with the identity order (pass 0) and
// a full random shuffle (pass 1); they differ in block sizes, pass count and later orders.
//  - kOriginal (Brassard-Salvail 1993): k1 = 0.73/Q, block size doubling, 4 passes, every
//    pass p >= 1 a full shuffle.
//  - kYan (Yan et al. 2008, as summarised by Martinez-Mateo et al.): k1 = 0.8/Q, k2 = 5 k1,
//    then blocks of n/2 on random halves; 16 passes (the paper's 10 left residual errors
//    in 0.3-0.7 % of 2^14-bit frames here).
//  - kModern (the guidelines of "Demystifying the information reconciliation protocol
//    Cascade", Martinez-Mateo et al. 2015, arXiv:1407.3257): power-of-two k1 from the QBER,
//    k2 = 4 k1 (capped at n/2), then blocks of n/2 on random halves; 16 passes. The first
//    log2(k1) halves are structured (bit j of the index within its pass-0 block, randomly
//    complemented per block) so that an error pair left inside a pass-0 block is always
//    split by one of them; the rest are random.
// BICONF rounds (Buttler et al. 2003, "Fast, efficient error reconciliation for quantum
// cryptography"; selectable for every variant, `biconf_rounds` of CascadeLayout): after the
// Cascade passes, each round draws a fresh random half of the key (exactly ceil(n/2) bits,
// from the same announced seed, so both ends know it), compares its parity (one disclosed
// bit: the complement's parity follows from the whole key's, known from pass 0) and, on a
// mismatch, bisects the subset and its complement at once; every correction cascades back
// through all earlier passes as in Cascade. A round is a kSplit pass with two blocks and a
// purely random mask (never the structured masks of kModern).
// A "random half" pass (kSplit) orders the key as [bits whose mask bit is 0, in index
// order] ++ [bits whose mask bit is 1, in index order] for a random mask, so blocks of n/2
// are (up to the mask's imbalance) random halves; the order is never materialised.
// Bob's side (cascade_correct) also reuses every parity Alice already disclosed: an odd
// block is bisected from the smallest already-known odd sub-block, and for a two-block
// pass only the first block's parity is asked for (the second follows from the parity of
// the whole key, known from pass 0).
enum class CascadeVariant : std::uint8_t { kOriginal = 0, kYan = 1, kModern = 2 };

// "original", "yan", "modern" (and the parser's inverse; nullopt for anything else).
[[nodiscard]] const char* cascade_variant_name(CascadeVariant variant);
[[nodiscard]] std::optional<CascadeVariant> parse_cascade_variant(std::string_view name);

// How the positions of a pass map to key indices.
enum class CascadePassOrder : std::uint8_t { kIdentity, kShuffle, kSplit };

// The pass count each variant is designed for (4, 16, 16); pass it as `passes`.
[[nodiscard]] std::uint32_t cascade_default_passes(CascadeVariant variant);

// The shared, public structure of one Cascade run: block sizes and per-pass orders.
// Pass 0 is the identity; shuffles are Fisher-Yates driven by Xoshiro256ss seeded with the
// announced 32-byte seed, and so are the random-half masks.
class CascadeLayout {
 public:
  // first_block_size >= 1 (clamped into [1, n]); passes >= 1. For kOriginal the block
  // size doubles each pass (capped at n); see CascadeVariant for the others.
  // biconf_rounds: BICONF rounds appended after the `passes` Cascade passes (passes()
  // counts both). Their masks are drawn after every Cascade table, so the Cascade passes
  // are the same with or without them.
  // inverse_tables = false: no index -> position tables for the kShuffle passes (Alice's
  // CascadeResponder never needs them; building them is a third of the layout's cost).
  // position() then searches the permutation (O(n) per call: correct, but meant only for
  // layouts given to a responder); has_inverse_tables() tells which kind this is.
  CascadeLayout(std::uint32_t n, std::uint32_t passes, std::uint32_t first_block_size,
                std::span<const std::uint8_t, 32> shuffle_seed,
                CascadeVariant variant = CascadeVariant::kOriginal,
                std::uint32_t biconf_rounds = 0, bool inverse_tables = true);
  // The shuffle tables go back to a per-thread pool (reused by the next layout of the
  // same size: no fresh pages, hence no page faults, per block).
  ~CascadeLayout();
  CascadeLayout(CascadeLayout&&) noexcept = default;
  CascadeLayout& operator=(CascadeLayout&&) noexcept = default;
  CascadeLayout(const CascadeLayout&) = delete;
  CascadeLayout& operator=(const CascadeLayout&) = delete;
  [[nodiscard]] std::uint32_t size() const { return n_; }
  [[nodiscard]] CascadeVariant variant() const { return variant_; }
  // All passes: the Cascade passes, then the BICONF rounds.
  [[nodiscard]] std::uint32_t passes() const { return static_cast<std::uint32_t>(block_.size()); }
  [[nodiscard]] std::uint32_t biconf_rounds() const { return biconf_rounds_; }
  [[nodiscard]] std::uint32_t cascade_passes() const { return passes() - biconf_rounds_; }
  [[nodiscard]] std::uint32_t block_size(std::uint32_t pass) const { return block_[pass]; }
  [[nodiscard]] std::uint32_t block_count(std::uint32_t pass) const {
    return n_ == 0 ? 0 : (n_ + block_[pass] - 1) / block_[pass];
  }
  [[nodiscard]] CascadePassOrder order(std::uint32_t pass) const { return order_[pass]; }
  // pos -> original index, and original index -> pos, for pass p (any order).
  [[nodiscard]] std::uint32_t original_index(std::uint32_t pass, std::uint32_t pos) const;
  [[nodiscard]] std::uint32_t position(std::uint32_t pass, std::uint32_t index) const;
  // The stored tables of a kShuffle pass (empty for kIdentity and kSplit passes).
  [[nodiscard]] std::span<const std::uint32_t> perm(std::uint32_t pass) const {
    return perm_[pass];
  }
  [[nodiscard]] std::span<const std::uint32_t> inverse(std::uint32_t pass) const {
    return inv_[pass];
  }
  [[nodiscard]] bool has_inverse_tables() const { return inverse_tables_; }
  // Builds the key as seen in pass p's order.
  [[nodiscard]] BitVector permuted(const BitVector& key, std::uint32_t pass) const;
  // Parity of positions [start, start + length) of a kSplit pass, read from the key in
  // index order (no permuted copy). Requires start + length <= n.
  [[nodiscard]] bool split_range_parity(const BitVector& key, std::uint32_t pass,
                                        std::uint32_t start, std::uint32_t length) const;

 private:
  struct Split {
    // Bit i of the words set: index i is in the second class (pooled, like the shuffle
    // tables; bits >= n zero).
    std::vector<std::uint64_t> mask;
    std::vector<std::uint32_t> ones;     // ones[w] = set mask bits in words [0, w) (pooled)
    std::uint32_t zeros = 0;             // size of the first class
  };
  [[nodiscard]] std::uint32_t split_select(const Split& s, bool cls, std::uint32_t rank) const;

  std::uint32_t n_;
  CascadeVariant variant_;
  std::uint32_t biconf_rounds_ = 0;
  std::vector<std::uint32_t> block_;
  std::vector<CascadePassOrder> order_;
  std::vector<std::vector<std::uint32_t>> perm_;  // empty except for kShuffle passes
  std::vector<std::vector<std::uint32_t>> inv_;
  std::vector<Split> split_;  // indexed by pass (empty entries for other orders)
  bool inverse_tables_ = true;
};

// The first block size for a variant: kOriginal 0.73 / QBER, kYan 0.8 / QBER, kModern a
// power of two near 1 / QBER (clamped into [1, n]; QBER floored at 0.2 %).
[[nodiscard]] std::uint32_t cascade_first_block_size(
    double qber, std::uint32_t n, CascadeVariant variant = CascadeVariant::kOriginal);

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
  BitVector key_;                   // index order (identity and kSplit passes)
  std::vector<BitVector> permuted_;  // per pass; filled for kShuffle passes only
  [[nodiscard]] bool parity(std::uint32_t pass, std::uint32_t start, std::uint32_t length) const;
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
  // Of parities_disclosed / errors_corrected: those of the BICONF rounds (their subset
  // parities, the bisections in them and the cascaded corrections they set off).
  std::uint64_t biconf_parities = 0;
  std::uint64_t biconf_errors_corrected = 0;
};

// Bob's side: corrects `key` (size layout.size()) towards Alice's. Fails only if the
// oracle fails or answers with the wrong number of parities (kProtocol).
[[nodiscard]] Result<CascadeStats> cascade_correct(BitVector& key, const CascadeLayout& layout,
                                                   ParityOracle& oracle);

}  // namespace qkd::core
