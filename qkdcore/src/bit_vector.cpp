#include "qkd/core/bit_vector.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <cassert>
#include <cstdlib>
#include <utility>

#include "bit_ops.hpp"

namespace qkd::core {
namespace detail {
namespace {

// QKD_CORE_PORTABLE_BITS=1 in the environment: the portable code only (to test it on any
// machine; ctest runs part of the core suite so).
bool portable_forced() {
  const char* v = std::getenv("QKD_CORE_PORTABLE_BITS");
  return v != nullptr && v[0] == '1';
}

bool cpu_has_popcount() {
#if defined(QKD_POPCOUNT_DISPATCH)
  __builtin_cpu_init();  // may run before libgcc's own constructor
  return __builtin_cpu_supports("popcnt") != 0 && !portable_forced();
#else
  return false;
#endif
}

bool cpu_has_fast_pext() {
#if defined(QKD_PEXT_DISPATCH)
  __builtin_cpu_init();
  return __builtin_cpu_supports("bmi2") != 0 && __builtin_cpu_is("amdfam15h") == 0 &&
         __builtin_cpu_is("amdfam17h") == 0 && !portable_forced();
#else
  return false;
#endif
}

}  // namespace

// Zero (the portable code) until these initializers run: correct either way.
#if defined(QKD_POPCOUNT_DISPATCH)
bool g_hardware_popcount = cpu_has_popcount();
#endif
#if defined(QKD_PEXT_DISPATCH)
bool g_hardware_pext = cpu_has_fast_pext();
#endif

bool hardware_popcount() {
#if defined(QKD_POPCOUNT_DISPATCH)
  return g_hardware_popcount;
#else
  return false;
#endif
}

bool hardware_pext() {
#if defined(QKD_PEXT_DISPATCH)
  return g_hardware_pext;
#else
  return false;
#endif
}

void set_hardware_bit_ops(bool on) {
#if defined(QKD_POPCOUNT_DISPATCH)
  g_hardware_popcount = on && cpu_has_popcount();
#endif
#if defined(QKD_PEXT_DISPATCH)
  g_hardware_pext = on && cpu_has_fast_pext();
#endif
  (void)on;
}

}  // namespace detail

namespace {

void cleanse(std::vector<std::uint64_t>& w) {
  if (!w.empty()) {
    OPENSSL_cleanse(w.data(), w.size() * sizeof(std::uint64_t));
  }
}

std::uint64_t low_mask(std::size_t bits) {  // bits in [0, 64]
  return bits >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << bits) - 1);
}

}  // namespace

BitVector& BitVector::operator=(const BitVector& other) {
  if (this != &other) {
    cleanse(words_);
    words_ = other.words_;
    size_ = other.size_;
  }
  return *this;
}

BitVector::BitVector(BitVector&& other) noexcept
    : words_(std::move(other.words_)), size_(other.size_) {
  other.words_.clear();
  other.size_ = 0;
}

BitVector& BitVector::operator=(BitVector&& other) noexcept {
  if (this != &other) {
    cleanse(words_);
    words_ = std::move(other.words_);
    size_ = other.size_;
    other.words_.clear();
    other.size_ = 0;
  }
  return *this;
}

BitVector::~BitVector() { cleanse(words_); }

BitVector BitVector::from_bytes(std::span<const std::uint8_t> bytes, std::size_t nbits) {
  BitVector v(nbits);
  const std::size_t nbytes = std::min(bytes.size(), (nbits + 7) / 8);
  for (std::size_t i = 0; i < nbytes; ++i) {
    v.words_[i >> 3] |= std::uint64_t{bytes[i]} << (8 * (i & 7));
  }
  v.clear_tail();
  return v;
}

void BitVector::append_masked(const BitVector& src, const BitVector& mask, bool select) {
  assert(src.size_ == mask.size_);
  assert(this != &src && this != &mask);
  const std::size_t nw = src.words_.size();
  for (std::size_t w = 0; w < nw; ++w) {
    std::uint64_t m = select ? mask.words_[w] : ~mask.words_[w];
    if (w + 1 == nw) {
      m &= low_mask(src.size_ - 64 * w);  // not the unused high bits of the last word
    }
    if (m == ~std::uint64_t{0}) {
      append_bits(src.words_[w], 64);
    } else if (m != 0) {
      append_bits(detail::compress_bits(src.words_[w], m), detail::popcount64(m));
    }
  }
}

void BitVector::resize(std::size_t nbits) {
  const std::size_t old = size_;
  words_.resize((nbits + 63) / 64, 0);
  size_ = nbits;
  if (nbits < old) {
    clear_tail();
  }
}

void BitVector::clear() {
  cleanse(words_);
  words_.clear();
  size_ = 0;
}

void BitVector::clear_tail() {
  if ((size_ & 63) != 0 && !words_.empty()) {
    words_.back() &= low_mask(size_ & 63);
  }
}

std::size_t BitVector::popcount() const {
  std::size_t c = 0;
  for (const std::uint64_t w : words_) {
    c += detail::popcount64(w);
  }
  return c;
}

bool BitVector::parity() const {
  std::uint64_t x = 0;
  for (const std::uint64_t w : words_) {
    x ^= w;
  }
  return (std::popcount(x) & 1) != 0;
}

bool BitVector::parity_range(std::size_t begin, std::size_t end) const {
  assert(begin <= end && end <= size_);
  if (begin >= end) {
    return false;
  }
  const std::size_t wb = begin >> 6;
  const std::size_t we = (end - 1) >> 6;
  const std::uint64_t first_mask = ~low_mask(begin & 63);
  const std::uint64_t last_mask = low_mask(((end - 1) & 63) + 1);
  if (wb == we) {
    return (std::popcount(words_[wb] & first_mask & last_mask) & 1) != 0;
  }
  std::uint64_t x = (words_[wb] & first_mask) ^ (words_[we] & last_mask);
  for (std::size_t w = wb + 1; w < we; ++w) {
    x ^= words_[w];
  }
  return (std::popcount(x) & 1) != 0;
}

bool BitVector::parity_of(std::span<const std::uint32_t> indices) const {
  bool p = false;
  for (const std::uint32_t i : indices) {
    p ^= get(i);
  }
  return p;
}

std::size_t BitVector::hamming_distance(const BitVector& other) const {
  assert(size_ == other.size_);
  std::size_t c = 0;
  for (std::size_t w = 0; w < words_.size(); ++w) {
    c += detail::popcount64(words_[w] ^ other.words_[w]);
  }
  return c;
}

BitVector BitVector::slice(std::size_t begin, std::size_t end) const {
  assert(begin <= end && end <= size_);
  BitVector out(end - begin);
  const std::size_t shift = begin & 63;
  const std::size_t first = begin >> 6;
  for (std::size_t w = 0; w < out.words_.size(); ++w) {
    std::uint64_t v = words_[first + w] >> shift;
    if (shift != 0 && first + w + 1 < words_.size()) {
      v |= words_[first + w + 1] << (64 - shift);
    }
    out.words_[w] = v;
  }
  out.clear_tail();
  return out;
}

BitVector& BitVector::operator^=(const BitVector& other) {
  assert(size_ == other.size_);
  for (std::size_t w = 0; w < words_.size(); ++w) {
    words_[w] ^= other.words_[w];
  }
  return *this;
}

bool BitVector::operator==(const BitVector& other) const {
  return size_ == other.size_ && words_ == other.words_;
}

void BitVector::to_bytes(std::span<std::uint8_t> out) const {
  assert(out.size() >= byte_size());
  const std::size_t nbytes = byte_size();
  for (std::size_t i = 0; i < nbytes; ++i) {
    out[i] = static_cast<std::uint8_t>(words_[i >> 3] >> (8 * (i & 7)));
  }
}

std::vector<std::uint8_t> BitVector::to_bytes() const {
  std::vector<std::uint8_t> out(byte_size());
  to_bytes(out);
  return out;
}

}  // namespace qkd::core
