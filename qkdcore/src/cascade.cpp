#include "qkd/core/cascade.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "bit_ops.hpp"
#include "huge_pages.hpp"
#include "qkd/core/random.hpp"

namespace qkd::core {
namespace {

std::uint64_t low_mask(unsigned bits) {  // bits in [0, 64]
  return bits >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << bits) - 1);
}

// Parity of the bits of (key & mask) (or key & ~mask when `invert`) in [lo, hi).
bool masked_parity(std::span<const std::uint64_t> key, std::span<const std::uint64_t> mask,
                   bool invert, std::uint32_t lo, std::uint32_t hi) {
  if (lo >= hi) {
    return false;
  }
  const std::uint64_t flip = invert ? ~std::uint64_t{0} : 0;
  const std::size_t wb = lo >> 6;
  const std::size_t we = (hi - 1) >> 6;
  const std::uint64_t first = ~low_mask(lo & 63);
  const std::uint64_t last = low_mask(((hi - 1) & 63) + 1);
  if (wb == we) {
    return (std::popcount(key[wb] & (mask[wb] ^ flip) & first & last) & 1) != 0;
  }
  std::uint64_t x = (key[wb] & (mask[wb] ^ flip) & first) ^ (key[we] & (mask[we] ^ flip) & last);
  for (std::size_t w = wb + 1; w < we; ++w) {
    x ^= key[w] & (mask[w] ^ flip);
  }
  return (std::popcount(x) & 1) != 0;
}

// Per-thread free lists of buffers. Cascade runs block after block with the same sizes;
// allocating the shuffle tables (2 x 4n bytes) and Bob's bisection bitmaps afresh each
// time made glibc hand the pages back and fault them in again (a fifth of the time at
// n = 2^16). Contents are public (layout tables, disclosed parities): no cleansing.
// Tag: separate free lists for buffers of different roles (the layout's tables and Bob's
// per-pass bitmaps differ in size; in one list a small request could take a large buffer
// and leave the next large one to allocate afresh).
template <class T, int Tag = 0>
class BufferPool {
 public:
  // A buffer of `size` elements; zeroed when `zero`, else unspecified contents.
  static std::vector<T> take(std::size_t size, bool zero) {
    auto& list = free_list();
    std::vector<T> v;
    for (std::size_t i = list.size(); i > 0; --i) {  // the most recent that fits
      if (list[i - 1].capacity() >= size) {
        v = std::move(list[i - 1]);
        list.erase(list.begin() + static_cast<std::ptrdiff_t>(i - 1));
        break;
      }
    }
    if (v.capacity() < size) {
      // A new buffer: 1/8 headroom, so the next block's slightly larger n (block sizes
      // vary by a fraction of a percent) reuses it instead of faulting in fresh pages.
      v.reserve(size + size / 8);
      detail::prefer_huge_pages(v.data(), v.capacity() * sizeof(T));
    }
    if (zero) {
      v.assign(size, T{});
    } else {
      v.resize(size);
    }
    return v;
  }
  static void give(std::vector<T>&& v) {
    auto& list = free_list();
    if (v.capacity() == 0 || v.capacity() > kMaxElements) {
      return;
    }
    if (list.size() >= kMaxBuffers) {
      list.erase(list.begin());
    }
    list.push_back(std::move(v));
  }

 private:
  static constexpr std::size_t kMaxBuffers = 64;
  static constexpr std::size_t kMaxElements = std::size_t{1} << 24;
  static std::vector<std::vector<T>>& free_list() {
    thread_local std::vector<std::vector<T>> list;
    return list;
  }
};

// Index of the r-th set bit of x (r < popcount(x)).
unsigned select_in_word(std::uint64_t x, unsigned r) {
  for (unsigned i = 0; i < r; ++i) {
    x &= x - 1;
  }
  return static_cast<unsigned>(std::countr_zero(x));
}

}  // namespace

// kBitPatterns[j] has bit i set iff bit j of i is set (i < 64).
constexpr std::uint64_t kBitPatterns[6] = {0xAAAAAAAAAAAAAAAAULL, 0xCCCCCCCCCCCCCCCCULL,
                                           0xF0F0F0F0F0F0F0F0ULL, 0xFF00FF00FF00FF00ULL,
                                           0xFFFF0000FFFF0000ULL, 0xFFFFFFFF00000000ULL};

const char* cascade_variant_name(CascadeVariant variant) {
  switch (variant) {
    case CascadeVariant::kOriginal: return "original";
    case CascadeVariant::kYan: return "yan";
    case CascadeVariant::kModern: return "modern";
  }
  return "unknown";
}

std::optional<CascadeVariant> parse_cascade_variant(std::string_view name) {
  if (name == "original") {
    return CascadeVariant::kOriginal;
  }
  if (name == "yan") {
    return CascadeVariant::kYan;
  }
  if (name == "modern") {
    return CascadeVariant::kModern;
  }
  return std::nullopt;
}

std::uint32_t cascade_default_passes(CascadeVariant variant) {
  switch (variant) {
    case CascadeVariant::kYan:
      return 16;  // 10 in Yan et al.; with 10 passes 0.3-0.7 % of 2^14-bit frames kept errors
    case CascadeVariant::kModern:
      return 16;
    case CascadeVariant::kOriginal:
      break;
  }
  return 4;
}

CascadeLayout::CascadeLayout(std::uint32_t n, std::uint32_t passes,
                             std::uint32_t first_block_size,
                             std::span<const std::uint8_t, 32> shuffle_seed,
                             CascadeVariant variant, std::uint32_t biconf_rounds,
                             bool inverse_tables)
    : n_(n), variant_(variant), biconf_rounds_(biconf_rounds), inverse_tables_(inverse_tables) {
  passes = std::max<std::uint32_t>(passes, 1);
  const std::uint32_t cascade_passes = passes;
  passes += biconf_rounds;
  const std::uint64_t cap = std::max<std::uint32_t>(n, 1);
  const std::uint64_t half = std::max<std::uint64_t>((std::uint64_t{n} + 1) / 2, 1);
  const std::uint64_t k1 = std::clamp<std::uint64_t>(first_block_size, 1, cap);
  Xoshiro256ss rng(shuffle_seed);
  bool chunk_flip = false;
  block_.reserve(passes);
  order_.reserve(passes);
  perm_.resize(passes);
  inv_.resize(passes);
  split_.resize(passes);
  for (std::uint32_t p = 0; p < passes; ++p) {
    std::uint64_t k = k1;
    CascadePassOrder order = p == 0 ? CascadePassOrder::kIdentity : CascadePassOrder::kShuffle;
    const bool biconf = p >= cascade_passes;
    if (biconf) {
      // BICONF round: a random half (positions [0, ceil(n/2))) and its complement.
      k = half;
      order = CascadePassOrder::kSplit;
    } else {
      switch (variant) {
        case CascadeVariant::kOriginal:
          k = std::min<std::uint64_t>(k1 << std::min<std::uint32_t>(p, 32), cap);
          break;
        case CascadeVariant::kYan:
        case CascadeVariant::kModern: {
          const std::uint64_t factor = variant == CascadeVariant::kYan ? 5 : 4;
          if (p == 1) {
            k = std::min(k1 * factor, std::max(half, k1));
          } else if (p >= 2) {
            k = std::max(half, k1);
            order = CascadePassOrder::kSplit;
          }
          break;
        }
      }
    }
    block_.push_back(static_cast<std::uint32_t>(std::min(k, cap)));
    order_.push_back(order);
    if (order == CascadePassOrder::kSplit) {
      Split& s = split_[p];
      // Pooled (contents unspecified: every word is written below, then the tail cleared).
      s.mask = BufferPool<std::uint64_t, 1>::take((std::size_t{n} + 63) / 64, /*zero=*/false);
      const std::uint32_t j = p - 2;  // index among the random-half passes
      if (!biconf && variant == CascadeVariant::kModern && std::has_single_bit(k1) &&
          (1ULL << j) < k1) {
        // Structured half: mask(i) = bit j of (i mod k1), complemented per pass-0 block by
        // a random bit. Any two indices of one pass-0 block differ in some bit j < log2 k1,
        // so an error pair left inside a pass-0 block (the typical pattern that passes 0
        // and 1 miss) is split, hence found, by one of the first log2(k1) such passes.
        const unsigned lg = static_cast<unsigned>(std::countr_zero(k1));
        std::vector<std::uint64_t>& words = s.mask;
        for (std::size_t w = 0; w < words.size(); ++w) {
          std::uint64_t pattern = 0;
          if (j < 6) {
            pattern = kBitPatterns[j];
          } else {
            pattern = ((w >> (j - 6)) & 1U) != 0 ? ~std::uint64_t{0} : 0;
          }
          // One random complement bit per pass-0 block (k1-bit chunk) in this word.
          std::uint64_t flip = 0;
          if (lg >= 6) {
            if (w % (std::uint64_t{k1} >> 6) == 0) {
              chunk_flip = rng.bit();
            }
            flip = chunk_flip ? ~std::uint64_t{0} : 0;
          } else {
            const std::uint64_t r = rng.next();
            for (unsigned c = 0; c < (64U >> lg); ++c) {
              if (((r >> c) & 1U) != 0) {
                flip |= low_mask(1U << lg) << (c << lg);
              }
            }
          }
          words[w] = pattern ^ flip;
        }
      } else {
        for (auto& w : s.mask) {
          w = rng.next();
        }
      }
      if ((n & 63) != 0) {
        s.mask.back() &= low_mask(n & 63);  // the unused high bits of the last word: zero
      }
      const std::vector<std::uint64_t>& mw = s.mask;
      s.ones = BufferPool<std::uint32_t, 1>::take(mw.size() + 1, /*zero=*/false);
      std::uint32_t acc = 0;
      for (std::size_t w = 0; w < mw.size(); ++w) {
        s.ones[w] = acc;
        acc += detail::popcount64(mw[w]);
      }
      s.ones[mw.size()] = acc;
      s.zeros = n - acc;
      continue;
    }
    if (order == CascadePassOrder::kIdentity) {
      continue;  // no tables
    }
    // Pooled storage, contents unspecified: every entry is written below.
    perm_[p] = BufferPool<std::uint32_t>::take(n, /*zero=*/false);
    std::uint32_t* perm = perm_[p].data();
    std::iota(perm, perm + n, 0U);
    // Fisher-Yates. The random indices are drawn kAhead at a time (the same draws in the
    // same order) so that their cache lines are prefetched before the swaps reach them.
    constexpr std::uint32_t kAhead = 32;
    std::array<std::uint32_t, kAhead> ahead{};
    for (std::uint32_t i = n; i > 1;) {
      const std::uint32_t m = std::min(kAhead, i - 1);
      for (std::uint32_t t = 0; t < m; ++t) {
        ahead[t] = static_cast<std::uint32_t>(rng.below(i - t));
        __builtin_prefetch(perm + ahead[t], 1);
      }
      for (std::uint32_t t = 0; t < m; ++t, --i) {
        std::swap(perm[i - 1], perm[ahead[t]]);
      }
    }
    if (!inverse_tables) {
      continue;
    }
    inv_[p] = BufferPool<std::uint32_t>::take(n, /*zero=*/false);
    std::uint32_t* inv = inv_[p].data();
    for (std::uint32_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        __builtin_prefetch(inv + perm[i + kAhead], 1);
      }
      inv[perm[i]] = i;
    }
  }
}

CascadeLayout::~CascadeLayout() {
  for (auto& v : perm_) {
    BufferPool<std::uint32_t>::give(std::move(v));
  }
  for (auto& v : inv_) {
    BufferPool<std::uint32_t>::give(std::move(v));
  }
  for (Split& s : split_) {
    BufferPool<std::uint64_t, 1>::give(std::move(s.mask));
    BufferPool<std::uint32_t, 1>::give(std::move(s.ones));
  }
}

std::uint32_t CascadeLayout::split_select(const Split& s, bool cls, std::uint32_t rank) const {
  // The word holding the rank-th member of the class: members before word w are ones[w]
  // (class 1) or 64 w - ones[w] (class 0), both non-decreasing in w.
  const auto before = [&](std::size_t w) {
    return cls ? s.ones[w] : static_cast<std::uint32_t>(64 * w) - s.ones[w];
  };
  std::size_t lo = 0;
  std::size_t hi = s.ones.size() - 1;  // invariant: before(lo) <= rank < before(hi)
  while (hi - lo > 1) {
    const std::size_t mid = (lo + hi) / 2;
    if (before(mid) <= rank) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const std::uint64_t word = cls ? s.mask[lo] : ~s.mask[lo];
  return static_cast<std::uint32_t>(64 * lo + select_in_word(word, rank - before(lo)));
}

std::uint32_t CascadeLayout::original_index(std::uint32_t pass, std::uint32_t pos) const {
  if (order_[pass] == CascadePassOrder::kIdentity) {
    return pos;
  }
  if (order_[pass] == CascadePassOrder::kShuffle) {
    return perm_[pass][pos];
  }
  const Split& s = split_[pass];
  return pos < s.zeros ? split_select(s, false, pos) : split_select(s, true, pos - s.zeros);
}

std::uint32_t CascadeLayout::position(std::uint32_t pass, std::uint32_t index) const {
  if (order_[pass] == CascadePassOrder::kIdentity) {
    return index;
  }
  if (order_[pass] == CascadePassOrder::kShuffle) {
    if (!inverse_tables_) {  // a responder's layout: search (see the header)
      const auto& perm = perm_[pass];
      return static_cast<std::uint32_t>(std::find(perm.begin(), perm.end(), index) -
                                        perm.begin());
    }
    return inv_[pass][index];
  }
  const Split& s = split_[pass];
  const std::uint64_t w = s.mask[index >> 6];
  const std::uint32_t ones_before =
      s.ones[index >> 6] + detail::popcount64(w & low_mask(index & 63));
  if (((w >> (index & 63)) & 1U) != 0) {
    return s.zeros + ones_before;
  }
  return index - ones_before;
}

bool CascadeLayout::split_range_parity(const BitVector& key, std::uint32_t pass,
                                       std::uint32_t start, std::uint32_t length) const {
  const Split& s = split_[pass];
  const std::uint32_t end = start + length;
  const auto kw = key.words();
  const std::span<const std::uint64_t> mw = s.mask;
  bool p = false;
  const auto bound = [&](bool cls, std::uint32_t rank) {  // index of a class rank, or n
    const std::uint32_t count = cls ? n_ - s.zeros : s.zeros;
    return rank >= count ? n_ : split_select(s, cls, rank);
  };
  if (start < s.zeros) {
    const std::uint32_t e = std::min(end, s.zeros);
    p ^= masked_parity(kw, mw, true, bound(false, start), bound(false, e));
  }
  if (end > s.zeros) {
    const std::uint32_t b = std::max(start, s.zeros) - s.zeros;
    p ^= masked_parity(kw, mw, false, bound(true, b), bound(true, end - s.zeros));
  }
  return p;
}

BitVector CascadeLayout::permuted(const BitVector& key, std::uint32_t pass) const {
  if (order_[pass] == CascadePassOrder::kIdentity) {
    return key;
  }
  BitVector out(n_);
  if (order_[pass] == CascadePassOrder::kShuffle) {
    // Gather 64 bits per output word (no read-modify-write of the output per bit).
    const std::uint32_t* perm = perm_[pass].data();
    auto ow = out.mutable_words();
    for (std::size_t w = 0; w < ow.size(); ++w) {
      const std::uint32_t begin = static_cast<std::uint32_t>(64 * w);
      const std::uint32_t end = std::min<std::uint32_t>(n_, begin + 64);
      std::uint64_t v = 0;
      for (std::uint32_t i = begin; i < end; ++i) {
        v |= std::uint64_t{key.get(perm[i])} << (i - begin);
      }
      ow[w] = v;
    }
    return out;
  }
  for (std::uint32_t i = 0; i < n_; ++i) {
    if (key.get(original_index(pass, i))) {
      out.set(i, true);
    }
  }
  return out;
}

std::uint32_t cascade_first_block_size(double qber, std::uint32_t n, CascadeVariant variant) {
  const double q = std::max(qber, 0.002);
  double k = 0;
  switch (variant) {
    case CascadeVariant::kOriginal:
      k = std::ceil(0.73 / q);
      break;
    case CascadeVariant::kYan:
      k = std::ceil(0.8 / q);
      break;
    case CascadeVariant::kModern:
      // A power of two (bisection then splits evenly): 2^round(log2(1 / Q)).
      k = std::exp2(std::round(std::log2(1.0 / q)));
      break;
  }
  const auto kk = static_cast<std::uint32_t>(std::min(k, 1e9));
  return std::clamp<std::uint32_t>(kk, 1, std::max<std::uint32_t>(n, 1));
}

CascadeResponder::CascadeResponder(const BitVector& key, const CascadeLayout& layout)
    : layout_(layout), key_(key) {
  permuted_.resize(layout.passes());
  for (std::uint32_t p = 0; p < layout.passes(); ++p) {
    if (layout.order(p) == CascadePassOrder::kShuffle) {
      permuted_[p] = layout.permuted(key, p);
    }
  }
}

bool CascadeResponder::parity(std::uint32_t pass, std::uint32_t start,
                              std::uint32_t length) const {
  switch (layout_.order(pass)) {
    case CascadePassOrder::kIdentity:
      return key_.parity_range(start, std::uint64_t{start} + length);
    case CascadePassOrder::kShuffle:
      return permuted_[pass].parity_range(start, std::uint64_t{start} + length);
    case CascadePassOrder::kSplit:
      break;
  }
  return layout_.split_range_parity(key_, pass, start, length);
}

Result<BitVector> CascadeResponder::block_parities(std::uint32_t pass) const {
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
    out.set(b, parity(pass, begin, std::min(n - begin, k)));
  }
  return out;
}

Result<BitVector> CascadeResponder::range_parities(std::span<const ParityQuery> queries) const {
  BitVector out(queries.size());
  const std::uint64_t n = layout_.size();
  for (std::size_t i = 0; i < queries.size(); ++i) {
    const ParityQuery& q = queries[i];
    if (q.pass >= layout_.passes() || q.length == 0 ||
        std::uint64_t{q.start} + q.length > n) {
      return make_error(ErrorCode::kProtocol, "Cascade: parity query out of range");
    }
    out.set(i, parity(q.pass, q.start, q.length));
  }
  return out;
}

namespace {

// A plain bitmap over pooled words (public data: no cleansing, storage reused).
class PooledBits {
 public:
  PooledBits() = default;
  PooledBits(const PooledBits&) = delete;
  PooledBits& operator=(const PooledBits&) = delete;
  PooledBits(PooledBits&& o) noexcept = default;
  PooledBits& operator=(PooledBits&& o) noexcept {
    if (this != &o) {
      BufferPool<std::uint64_t>::give(std::move(w_));
      w_ = std::move(o.w_);
    }
    return *this;
  }
  ~PooledBits() { BufferPool<std::uint64_t>::give(std::move(w_)); }
  void reset(std::uint64_t nbits) {
    BufferPool<std::uint64_t>::give(std::move(w_));
    w_ = BufferPool<std::uint64_t>::take(static_cast<std::size_t>((nbits + 63) / 64), true);
  }
  [[nodiscard]] bool get(std::uint64_t i) const { return ((w_[i >> 6] >> (i & 63)) & 1U) != 0; }
  void set(std::uint64_t i, bool v) {
    const std::uint64_t m = std::uint64_t{1} << (i & 63);
    w_[i >> 6] = v ? (w_[i >> 6] | m) : (w_[i >> 6] & ~m);
  }

 private:
  std::vector<std::uint64_t> w_;
};

// Bob's state for one started pass.
struct PassState {
  CascadePassOrder order = CascadePassOrder::kIdentity;
  std::uint32_t k = 1;
  std::uint32_t blocks = 0;
  std::uint32_t odd_count = 0;  // blocks whose parity differs from Alice's
  BitVector keyp;               // Bob's key in this pass's order (kShuffle only)
  BitVector odd;                // per block: Bob's parity != Alice's
  // Disclosed sub-block parities, per block a heap of internal bisection nodes (root 1,
  // children 2i, 2i+1; the left child of [s, s+len) is [s, s+len/2)): known[b*cap + i]
  // is set once Alice disclosed the parity of node i's left child, stored in left[].
  std::uint32_t cap = 1;
  PooledBits known;
  PooledBits left;
};

// One bisection in progress: [start, start + length) of pass `pass` has an odd parity
// difference; `node` is its heap index within its block (heap base `base`).
struct Search {
  std::uint32_t start;
  std::uint32_t length;
  std::uint32_t node;
  std::uint64_t base;
};

class Corrector {
 public:
  Corrector(BitVector& key, const CascadeLayout& layout, ParityOracle& oracle)
      : key_(key), layout_(layout), oracle_(oracle) {}

  Result<CascadeStats> run() {
    const std::uint32_t n = layout_.size();
    if (key_.size() != n) {
      return make_error(ErrorCode::kInvalidArgument, "Cascade: key size differs from layout");
    }
    if (n == 0) {
      return stats_;
    }
    passes_.resize(layout_.passes());
    queries_.reserve(1024);
    searches_.reserve(1024);
    for (std::uint32_t pass = 0; pass < layout_.passes(); ++pass) {
      const std::uint64_t disclosed_before = stats_.parities_disclosed;
      const std::uint64_t corrected_before = stats_.errors_corrected;
      if (Status s = start_pass(pass); !s.ok()) {
        return s.error();
      }
      started_ = pass + 1;
      // Waves: bisect every odd block of one pass at once; repeat while any started pass
      // has odd blocks (the current one first, then the ones the corrections re-opened).
      for (;;) {
        std::uint32_t q = passes_[pass].odd_count != 0 ? pass : started_;
        for (std::uint32_t r = 0; q == started_ && r < pass; ++r) {
          if (passes_[r].odd_count != 0) {
            q = r;
          }
        }
        if (q == started_) {
          break;
        }
        // Honest parities only ever flip erroneous bits, so more corrections than bits
        // means inconsistent parities (a tampered, not yet authenticated, layout seed or
        // reply): stop instead of looping (waves can resolve from known parities alone).
        if (stats_.errors_corrected > layout_.size()) {
          return make_error(ErrorCode::kProtocol,
                            "Cascade: inconsistent parities (more corrections than bits)");
        }
        if (Status s = wave(q); !s.ok()) {
          return s.error();
        }
      }
      if (pass >= layout_.cascade_passes()) {  // a BICONF round and what it set off
        stats_.biconf_parities += stats_.parities_disclosed - disclosed_before;
        stats_.biconf_errors_corrected += stats_.errors_corrected - corrected_before;
      }
    }
    for (auto& p : passes_) {
      p.keyp.clear();
    }
    return stats_;
  }

 private:
  bool bob_parity(std::uint32_t pass, std::uint32_t start, std::uint32_t length) const {
    switch (passes_[pass].order) {
      case CascadePassOrder::kIdentity:
        return key_.parity_range(start, std::uint64_t{start} + length);
      case CascadePassOrder::kShuffle:
        return passes_[pass].keyp.parity_range(start, std::uint64_t{start} + length);
      case CascadePassOrder::kSplit:
        break;
    }
    return layout_.split_range_parity(key_, pass, start, length);
  }

  Status start_pass(std::uint32_t pass) {
    const std::uint32_t n = layout_.size();
    PassState& st = passes_[pass];
    st.order = layout_.order(pass);
    st.k = layout_.block_size(pass);
    st.blocks = layout_.block_count(pass);
    st.cap = std::bit_ceil(st.k);
    st.known.reset(std::uint64_t{st.blocks} * st.cap);
    st.left.reset(std::uint64_t{st.blocks} * st.cap);
    if (st.order == CascadePassOrder::kShuffle) {
      st.keyp = layout_.permuted(key_, pass);
    }
    BitVector alice;
    if (st.blocks == 2 && pass > 0) {
      // The parity of the whole key is known from pass 0: ask for the first block only.
      const ParityQuery query{pass, 0, st.k};
      Result<BitVector> a = oracle_.range_parities(std::span(&query, 1));
      ++stats_.round_trips;
      if (!a.ok()) {
        return a.error();
      }
      if (a->size() != 1) {
        return make_error(ErrorCode::kProtocol, "Cascade: wrong number of range parities");
      }
      stats_.parities_disclosed += 1;
      alice = BitVector(2);
      alice.set(0, a->get(0));
      alice.set(1, a->get(0) != alice_total_);
    } else {
      Result<BitVector> a = oracle_.block_parities(pass);
      ++stats_.round_trips;
      if (!a.ok()) {
        return a.error();
      }
      if (a->size() != st.blocks) {
        return make_error(ErrorCode::kProtocol, "Cascade: wrong number of block parities");
      }
      stats_.parities_disclosed += st.blocks;
      alice = std::move(*a);
      if (pass == 0) {
        alice_total_ = alice.parity();
      }
    }
    st.odd = BitVector(st.blocks);
    st.odd_count = 0;
    for (std::uint32_t b = 0; b < st.blocks; ++b) {
      const std::uint32_t begin = b * st.k;
      const bool mine = bob_parity(pass, begin, std::min(n - begin, st.k));
      if (mine != alice.get(b)) {
        st.odd.set(b, true);
        ++st.odd_count;
      }
    }
    return ok_status();
  }

  // Flips key index x (a found error) and updates every started pass.
  void correct(std::uint32_t x) {
    key_.flip(x);
    ++stats_.errors_corrected;
    for (std::uint32_t r = 0; r < started_; ++r) {
      PassState& st = passes_[r];
      const std::uint32_t pos = st.order == CascadePassOrder::kIdentity ? x : layout_.position(r, x);
      if (st.order == CascadePassOrder::kShuffle) {
        st.keyp.flip(pos);
      }
      const std::uint32_t b = pos / st.k;
      st.odd.flip(b);
      if (st.odd.get(b)) {
        ++st.odd_count;
      } else {
        --st.odd_count;
      }
    }
  }

  Status wave(std::uint32_t q) {
    const std::uint32_t n = layout_.size();
    PassState& st = passes_[q];
    searches_.clear();
    const auto words = st.odd.words();
    for (std::size_t w = 0; w < words.size(); ++w) {
      std::uint64_t bits = words[w];
      while (bits != 0) {
        const auto b = static_cast<std::uint32_t>(w * 64 + std::countr_zero(bits));
        bits &= bits - 1;
        Search s{b * st.k, std::min(n - b * st.k, st.k), 1, std::uint64_t{b} * st.cap};
        // Walk down the sub-blocks whose parities are already known: exactly one child
        // of an odd node is odd. No disclosure.
        while (s.length > 1 && st.known.get(s.base + s.node)) {
          const std::uint32_t half = s.length / 2;
          if (bob_parity(q, s.start, half) != st.left.get(s.base + s.node)) {
            s.length = half;
            s.node = 2 * s.node;
          } else {
            s.start += half;
            s.length -= half;
            s.node = 2 * s.node + 1;
          }
        }
        searches_.push_back(s);
      }
    }
    for (;;) {
      queries_.clear();
      for (const Search& s : searches_) {
        if (s.length > 1) {
          queries_.push_back(ParityQuery{q, s.start, s.length / 2});
        }
      }
      if (queries_.empty()) {
        break;
      }
      Result<BitVector> answer = oracle_.range_parities(queries_);
      ++stats_.round_trips;
      if (!answer.ok()) {
        return answer.error();
      }
      if (answer->size() != queries_.size()) {
        return make_error(ErrorCode::kProtocol, "Cascade: wrong number of range parities");
      }
      stats_.parities_disclosed += queries_.size();
      std::size_t i = 0;
      for (Search& s : searches_) {
        if (s.length <= 1) {
          continue;
        }
        const bool alice = answer->get(i++);
        const std::uint32_t half = s.length / 2;
        st.known.set(s.base + s.node, true);
        st.left.set(s.base + s.node, alice);
        if (bob_parity(q, s.start, half) != alice) {
          s.length = half;
          s.node = 2 * s.node;
        } else {
          s.start += half;
          s.length -= half;
          s.node = 2 * s.node + 1;
        }
      }
    }
    // Searches of one wave lie in distinct blocks of pass q: correcting one does not
    // change the parities the others rely on.
    for (const Search& s : searches_) {
      correct(layout_.original_index(q, s.start));
    }
    return ok_status();
  }

  BitVector& key_;
  const CascadeLayout& layout_;
  ParityOracle& oracle_;
  CascadeStats stats_;
  std::vector<PassState> passes_;
  std::uint32_t started_ = 0;
  bool alice_total_ = false;  // parity of Alice's whole key (from pass 0)
  std::vector<ParityQuery> queries_;
  std::vector<Search> searches_;
};

}  // namespace

Result<CascadeStats> cascade_correct(BitVector& key, const CascadeLayout& layout,
                                     ParityOracle& oracle) {
  Corrector c(key, layout, oracle);
  return c.run();
}

}  // namespace qkd::core
