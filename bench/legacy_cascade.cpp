// The first qkdcore Cascade, unchanged except for names (see legacy_cascade.hpp).
#include "legacy_cascade.hpp"

#include <algorithm>
#include <bit>
#include <string>

namespace qkd::bench_legacy {

using core::BitVector;
using core::CascadeLayout;
using core::CascadeStats;
using core::ErrorCode;
using core::ParityOracle;
using core::ParityQuery;
using core::Result;
using core::make_error;

LegacyResponder::LegacyResponder(const BitVector& key, const CascadeLayout& layout)
    : layout_(layout) {
  permuted_.reserve(layout.passes());
  for (std::uint32_t p = 0; p < layout.passes(); ++p) {
    permuted_.push_back(layout.permuted(key, p));
  }
}

Result<BitVector> LegacyResponder::block_parities(std::uint32_t pass) const {
  if (pass >= layout_.passes()) {
    return make_error(ErrorCode::kProtocol, "Cascade: parity request for pass " +
                                                std::to_string(pass) + " out of range");
  }
  const std::uint32_t n = layout_.size();
  const std::uint32_t k = layout_.block_size(pass);
  const std::uint32_t blocks = layout_.block_count(pass);
  BitVector out(blocks);
  for (std::uint32_t b = 0; b < blocks; ++b) {
    const std::uint32_t begin = b * k;
    const std::uint32_t end = std::min(n, begin + k);
    out.set(b, permuted_[pass].parity_range(begin, end));
  }
  return out;
}

Result<BitVector> LegacyResponder::range_parities(std::span<const ParityQuery> queries) const {
  BitVector out(queries.size());
  const std::uint64_t n = layout_.size();
  for (std::size_t i = 0; i < queries.size(); ++i) {
    const ParityQuery& q = queries[i];
    if (q.pass >= layout_.passes() || q.length == 0 ||
        std::uint64_t{q.start} + q.length > n) {
      return make_error(ErrorCode::kProtocol, "Cascade: parity query out of range");
    }
    out.set(i, permuted_[q.pass].parity_range(q.start, std::uint64_t{q.start} + q.length));
  }
  return out;
}

namespace {

struct Search {
  std::uint32_t start;
  std::uint32_t length;  // the range [start, start+length) has an odd parity difference
};

}  // namespace

Result<CascadeStats> legacy_cascade_correct(BitVector& key, const CascadeLayout& layout,
                                            ParityOracle& oracle) {
  CascadeStats stats;
  const std::uint32_t n = layout.size();
  if (key.size() != n) {
    return make_error(ErrorCode::kInvalidArgument, "Cascade: key size differs from layout");
  }
  if (n == 0) {
    return stats;
  }
  std::vector<BitVector> permuted;  // Bob's key in each started pass's order
  std::vector<BitVector> odd;       // per pass, per block: Bob's parity != Alice's
  permuted.reserve(layout.passes());
  odd.reserve(layout.passes());

  for (std::uint32_t pass = 0; pass < layout.passes(); ++pass) {
    permuted.push_back(layout.permuted(key, pass));
    Result<BitVector> alice = oracle.block_parities(pass);
    ++stats.round_trips;
    if (!alice.ok()) {
      return alice.error();
    }
    const std::uint32_t k = layout.block_size(pass);
    const std::uint32_t blocks = layout.block_count(pass);
    if (alice->size() != blocks) {
      return make_error(ErrorCode::kProtocol, "Cascade: wrong number of block parities");
    }
    stats.parities_disclosed += blocks;
    BitVector diff(blocks);
    for (std::uint32_t b = 0; b < blocks; ++b) {
      const std::uint32_t begin = b * k;
      const std::uint32_t end = std::min(n, begin + k);
      diff.set(b, permuted[pass].parity_range(begin, end) != alice->get(b));
    }
    odd.push_back(std::move(diff));

    // Waves: bisect every odd block of one pass at once; repeat while any started pass
    // has odd blocks (the current one first, then the ones the corrections re-opened).
    for (;;) {
      std::uint32_t q = pass + 1;
      if (odd[pass].popcount() != 0) {
        q = pass;
      } else {
        for (std::uint32_t r = 0; r < pass; ++r) {
          if (odd[r].popcount() != 0) {
            q = r;
            break;
          }
        }
      }
      if (q > pass) {
        break;
      }
      const std::uint32_t kq = layout.block_size(q);
      std::vector<Search> searches;
      const auto words = odd[q].words();
      for (std::size_t w = 0; w < words.size(); ++w) {
        std::uint64_t x = words[w];
        while (x != 0) {
          const auto b = static_cast<std::uint32_t>(w * 64 + std::countr_zero(x));
          x &= x - 1;
          const std::uint32_t begin = b * kq;
          searches.push_back(Search{begin, std::min(n, begin + kq) - begin});
        }
      }
      std::vector<ParityQuery> queries;
      std::vector<std::size_t> active;
      for (;;) {
        queries.clear();
        active.clear();
        for (std::size_t s = 0; s < searches.size(); ++s) {
          if (searches[s].length > 1) {
            active.push_back(s);
            queries.push_back(ParityQuery{q, searches[s].start, searches[s].length / 2});
          }
        }
        if (queries.empty()) {
          break;
        }
        Result<BitVector> answer = oracle.range_parities(queries);
        ++stats.round_trips;
        if (!answer.ok()) {
          return answer.error();
        }
        if (answer->size() != queries.size()) {
          return make_error(ErrorCode::kProtocol, "Cascade: wrong number of range parities");
        }
        stats.parities_disclosed += queries.size();
        for (std::size_t i = 0; i < active.size(); ++i) {
          Search& s = searches[active[i]];
          const std::uint32_t half = s.length / 2;
          const bool mine = permuted[q].parity_range(s.start, s.start + half);
          if (mine != answer->get(i)) {
            s.length = half;
          } else {
            s.start += half;
            s.length -= half;
          }
        }
      }
      for (const Search& s : searches) {
        const std::uint32_t orig = layout.original_index(q, s.start);
        key.flip(orig);
        ++stats.errors_corrected;
        for (std::uint32_t r = 0; r <= pass; ++r) {
          const std::uint32_t pos = layout.position(r, orig);
          permuted[r].flip(pos);
          odd[r].flip(pos / layout.block_size(r));
        }
      }
    }
  }
  for (auto& p : permuted) {
    p.clear();
  }
  return stats;
}

}  // namespace qkd::bench_legacy
