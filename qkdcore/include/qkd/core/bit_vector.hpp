// A packed bit vector: 64-bit words, bit i lives in word i/64 at position i%64.
//
// Used for raw, sifted and reconciled keys, basis lists and masks. The unused high bits
// of the last word are always zero (every mutator keeps that invariant), so word-wise
// popcount/parity/equality need no masking. Storage is cleansed when destroyed, because
// most bit vectors in this library hold key material.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qkd::core {

class BitVector {
 public:
  BitVector() = default;
  explicit BitVector(std::size_t nbits) : words_((nbits + 63) / 64, 0), size_(nbits) {}
  BitVector(const BitVector&) = default;
  BitVector& operator=(const BitVector& other);
  BitVector(BitVector&& other) noexcept;
  BitVector& operator=(BitVector&& other) noexcept;
  ~BitVector();

  // Bytes -> bits, bit i = (bytes[i/8] >> (i%8)) & 1 (little-endian within a byte).
  // Bits beyond bytes.size()*8 are zero.
  [[nodiscard]] static BitVector from_bytes(std::span<const std::uint8_t> bytes,
                                            std::size_t nbits);

  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }
  [[nodiscard]] std::size_t word_count() const { return words_.size(); }

  [[nodiscard]] bool get(std::size_t i) const { return ((words_[i >> 6] >> (i & 63)) & 1U) != 0; }
  void set(std::size_t i, bool v) {
    const std::uint64_t m = std::uint64_t{1} << (i & 63);
    if (v) {
      words_[i >> 6] |= m;
    } else {
      words_[i >> 6] &= ~m;
    }
  }
  void flip(std::size_t i) { words_[i >> 6] ^= std::uint64_t{1} << (i & 63); }
  void push_back(bool v) {  // inline: the sifting loops call it once per detection
    if ((size_ & 63) == 0) {
      words_.push_back(0);
    }
    words_[size_ >> 6] |= std::uint64_t{v ? 1U : 0U} << (size_ & 63);
    ++size_;
  }
  // Appends the low n bits of `bits` (n <= 64; higher bits of `bits` are ignored), bit 0
  // first: the same as n calls of push_back, one word at a time.
  void append_bits(std::uint64_t bits, unsigned n) {
    if (n == 0) {
      return;
    }
    if (n < 64) {
      bits &= (std::uint64_t{1} << n) - 1;
    }
    const unsigned off = static_cast<unsigned>(size_ & 63);
    if (off == 0) {
      words_.push_back(bits);
    } else {
      words_.back() |= bits << off;
      if (off + n > 64) {
        words_.push_back(bits >> (64 - off));
      }
    }
    size_ += n;
  }
  // Appends every bit of `src` at a position where `mask` (same size) is set (select =
  // true) or clear (select = false), in order: a word-wise bit compress.
  void append_masked(const BitVector& src, const BitVector& mask, bool select);
  // Capacity for nbits bits. Grows at least geometrically, so that reserving a little more
  // before each appended chunk stays linear overall (not a copy of everything per chunk).
  void reserve(std::size_t nbits) {
    const std::size_t need = (nbits + 63) / 64;
    if (need > words_.capacity()) {
      words_.reserve(std::max(need, words_.capacity() + words_.capacity() / 2));
    }
  }
  void resize(std::size_t nbits);  // new bits are zero
  void clear();                    // cleanse, then empty

  [[nodiscard]] std::size_t popcount() const;
  [[nodiscard]] bool parity() const;
  // Parity of bits [begin, end). Requires begin <= end <= size().
  [[nodiscard]] bool parity_range(std::size_t begin, std::size_t end) const;
  // Parity of the bits at the given indices (each < size()).
  [[nodiscard]] bool parity_of(std::span<const std::uint32_t> indices) const;
  [[nodiscard]] std::size_t hamming_distance(const BitVector& other) const;  // same size
  // Bits [begin, end) as a new vector.
  [[nodiscard]] BitVector slice(std::size_t begin, std::size_t end) const;

  BitVector& operator^=(const BitVector& other);  // requires equal sizes
  [[nodiscard]] friend BitVector operator^(BitVector a, const BitVector& b) {
    a ^= b;
    return a;
  }
  [[nodiscard]] bool operator==(const BitVector& other) const;

  [[nodiscard]] std::span<const std::uint64_t> words() const { return words_; }
  // Direct word access. The caller must keep bits >= size() in the last word zero
  // (call clear_tail() after writing whole words).
  [[nodiscard]] std::span<std::uint64_t> mutable_words() { return words_; }
  void clear_tail();

  [[nodiscard]] std::size_t byte_size() const { return (size_ + 7) / 8; }
  // Writes byte_size() bytes to out (out.size() must be >= byte_size()).
  void to_bytes(std::span<std::uint8_t> out) const;
  [[nodiscard]] std::vector<std::uint8_t> to_bytes() const;

 private:
  std::vector<std::uint64_t> words_;
  std::size_t size_ = 0;
};

}  // namespace qkd::core
