// Byte-level encoding of protocol messages (internal). Integers are big-endian; a bit
// vector is its bit count (u64) followed by its packed bytes. The Reader is bounds-checked
// throughout: every read returns false instead of reading past the end, and done() tells
// whether the whole buffer was consumed (callers reject trailing bytes).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qkd/core/bit_vector.hpp"

namespace qkd::core::detail {

class Writer {
 public:
  void u8(std::uint8_t v) { buf_.push_back(v); }
  void u32(std::uint32_t v);
  void u64(std::uint64_t v);
  void f64(double v);
  void varint(std::uint64_t v) {  // LEB128, 1..10 bytes (inline: one per detection event)
    while (v >= 0x80) {
      buf_.push_back(static_cast<std::uint8_t>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    buf_.push_back(static_cast<std::uint8_t>(v));
  }
  void bytes(std::span<const std::uint8_t> b) { buf_.insert(buf_.end(), b.begin(), b.end()); }
  void bits(const BitVector& v);
  void string(const std::string& s);  // u32 length + bytes
  void reserve(std::size_t n) { buf_.reserve(n); }
  [[nodiscard]] std::size_t size() const { return buf_.size(); }
  [[nodiscard]] std::vector<std::uint8_t>& buffer() { return buf_; }
  [[nodiscard]] std::vector<std::uint8_t> take() { return std::move(buf_); }

 private:
  std::vector<std::uint8_t> buf_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::uint8_t> data) : data_(data) {}
  [[nodiscard]] bool u8(std::uint8_t& v) {
    if (pos_ >= data_.size()) {
      return false;
    }
    v = data_[pos_++];
    return true;
  }
  [[nodiscard]] bool u32(std::uint32_t& v);
  [[nodiscard]] bool u64(std::uint64_t& v);
  [[nodiscard]] bool f64(double& v);
  // Rejects > 10 bytes and overflow. Inline fast path for one- and two-byte values (the
  // gaps between detections), the general loop otherwise.
  [[nodiscard]] bool varint(std::uint64_t& v) {
    if (data_.size() - pos_ >= 2) {
      const std::uint8_t b0 = data_[pos_];
      if ((b0 & 0x80) == 0) {
        v = b0;
        pos_ += 1;
        return true;
      }
      const std::uint8_t b1 = data_[pos_ + 1];
      if ((b1 & 0x80) == 0) {
        v = std::uint64_t{static_cast<std::uint8_t>(b0 & 0x7F)} | (std::uint64_t{b1} << 7);
        pos_ += 2;
        return true;
      }
    }
    return varint_slow(v);
  }
  // varint(gap) then u8(state), the record of one detection event. Fast path (3 bytes
  // left, gap < 2^14: one or two bytes) without a branch on the gap's length, which is
  // random (a third of the gaps take two bytes at 10 km); the general reads otherwise.
  [[nodiscard]] bool gap_and_state(std::uint64_t& gap, std::uint8_t& state) {
    if (data_.size() - pos_ >= 3) {
      const std::uint8_t* p = data_.data() + pos_;
      const std::uint64_t b0 = p[0];
      const std::uint64_t b1 = p[1];
      const std::uint64_t b2 = p[2];
      const std::uint64_t two = b0 >> 7;  // 1: a two-byte gap
      if ((two & (b1 >> 7)) == 0) {
        const std::uint64_t m = std::uint64_t{0} - two;
        gap = (((b0 & 0x7F) | (b1 << 7)) & m) | (b0 & ~m);
        state = static_cast<std::uint8_t>((b2 & m) | (b1 & ~m));
        pos_ += 2 + two;
        return true;
      }
    }
    return varint(gap) && u8(state);
  }
  [[nodiscard]] bool bytes(std::size_t n, std::span<const std::uint8_t>& out);
  // Fails if the encoded count exceeds max_bits, the bytes are short, or the unused high
  // bits of the last byte are not zero (one encoding per value).
  [[nodiscard]] bool bits(BitVector& out, std::uint64_t max_bits);
  [[nodiscard]] bool string(std::string& out, std::size_t max_len);
  [[nodiscard]] bool done() const { return pos_ == data_.size(); }
  [[nodiscard]] std::size_t remaining() const { return data_.size() - pos_; }

 private:
  [[nodiscard]] bool varint_slow(std::uint64_t& v);
  std::span<const std::uint8_t> data_;
  std::size_t pos_ = 0;
};

}  // namespace qkd::core::detail
