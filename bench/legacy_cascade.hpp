// The first qkdcore Cascade (commit 2d790c7), kept only so that the benchmarks can show
// the old and new implementations side by side in one run. Bob's side bisects every odd
// block from its top (no reuse of disclosed sub-block parities) and keeps one permuted
// copy per pass on both sides. Works on kOriginal layouts (identity + shuffle passes).
#pragma once

#include "qkd/core/cascade.hpp"

namespace qkd::bench_legacy {

class LegacyResponder {
 public:
  LegacyResponder(const core::BitVector& key, const core::CascadeLayout& layout);
  [[nodiscard]] core::Result<core::BitVector> block_parities(std::uint32_t pass) const;
  [[nodiscard]] core::Result<core::BitVector> range_parities(
      std::span<const core::ParityQuery> queries) const;

 private:
  const core::CascadeLayout& layout_;
  std::vector<core::BitVector> permuted_;
};

class LegacyOracle final : public core::ParityOracle {
 public:
  explicit LegacyOracle(const LegacyResponder& r) : r_(r) {}
  core::Result<core::BitVector> block_parities(std::uint32_t pass) override {
    return r_.block_parities(pass);
  }
  core::Result<core::BitVector> range_parities(std::span<const core::ParityQuery> q) override {
    return r_.range_parities(q);
  }

 private:
  const LegacyResponder& r_;
};

[[nodiscard]] core::Result<core::CascadeStats> legacy_cascade_correct(
    core::BitVector& key, const core::CascadeLayout& layout, core::ParityOracle& oracle);

}  // namespace qkd::bench_legacy
