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
  void varint(std::uint64_t v);  // LEB128, 1..10 bytes
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
  [[nodiscard]] bool u8(std::uint8_t& v);
  [[nodiscard]] bool u32(std::uint32_t& v);
  [[nodiscard]] bool u64(std::uint64_t& v);
  [[nodiscard]] bool f64(double& v);
  [[nodiscard]] bool varint(std::uint64_t& v);  // rejects > 10 bytes and overflow
  [[nodiscard]] bool bytes(std::size_t n, std::span<const std::uint8_t>& out);
  // Fails if the encoded count exceeds max_bits, the bytes are short, or the unused high
  // bits of the last byte are not zero (one encoding per value).
  [[nodiscard]] bool bits(BitVector& out, std::uint64_t max_bits);
  [[nodiscard]] bool string(std::string& out, std::size_t max_len);
  [[nodiscard]] bool done() const { return pos_ == data_.size(); }
  [[nodiscard]] std::size_t remaining() const { return data_.size() - pos_; }

 private:
  std::span<const std::uint8_t> data_;
  std::size_t pos_ = 0;
};

}  // namespace qkd::core::detail
