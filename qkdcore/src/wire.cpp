#include "wire.hpp"

#include <bit>
#include <cstring>

namespace qkd::core::detail {

void Writer::u32(std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) {
    buf_.push_back(static_cast<std::uint8_t>(v >> s));
  }
}

void Writer::u64(std::uint64_t v) {
  for (int s = 56; s >= 0; s -= 8) {
    buf_.push_back(static_cast<std::uint8_t>(v >> s));
  }
}

void Writer::f64(double v) { u64(std::bit_cast<std::uint64_t>(v)); }

void Writer::bits(const BitVector& v) {
  u64(v.size());
  const std::size_t at = buf_.size();
  buf_.resize(at + v.byte_size());
  v.to_bytes(std::span<std::uint8_t>(buf_.data() + at, v.byte_size()));
}

void Writer::string(const std::string& s) {
  u32(static_cast<std::uint32_t>(s.size()));
  buf_.insert(buf_.end(), s.begin(), s.end());
}

bool Reader::u32(std::uint32_t& v) {
  if (remaining() < 4) {
    return false;
  }
  v = 0;
  for (int i = 0; i < 4; ++i) {
    v = (v << 8) | data_[pos_++];
  }
  return true;
}

bool Reader::u64(std::uint64_t& v) {
  if (remaining() < 8) {
    return false;
  }
  v = 0;
  for (int i = 0; i < 8; ++i) {
    v = (v << 8) | data_[pos_++];
  }
  return true;
}

bool Reader::f64(double& v) {
  std::uint64_t u = 0;
  if (!u64(u)) {
    return false;
  }
  v = std::bit_cast<double>(u);
  return true;
}

bool Reader::varint_slow(std::uint64_t& v) {
  v = 0;
  for (int i = 0; i < 10; ++i) {
    std::uint8_t b = 0;
    if (!u8(b)) {
      return false;
    }
    if (i == 9 && b > 1) {
      return false;  // would overflow 64 bits
    }
    v |= std::uint64_t{static_cast<std::uint8_t>(b & 0x7F)} << (7 * i);
    if ((b & 0x80) == 0) {
      return true;
    }
  }
  return false;
}

bool Reader::bytes(std::size_t n, std::span<const std::uint8_t>& out) {
  if (remaining() < n) {
    return false;
  }
  out = data_.subspan(pos_, n);
  pos_ += n;
  return true;
}

bool Reader::bits(BitVector& out, std::uint64_t max_bits) {
  std::uint64_t n = 0;
  if (!u64(n) || n > max_bits) {
    return false;
  }
  const std::uint64_t nbytes = (n + 7) / 8;
  std::span<const std::uint8_t> b;
  if (nbytes > remaining() || !bytes(static_cast<std::size_t>(nbytes), b)) {
    return false;
  }
  if ((n & 7) != 0 && (b.back() >> (n & 7)) != 0) {
    return false;
  }
  out = BitVector::from_bytes(b, static_cast<std::size_t>(n));
  return true;
}

bool Reader::string(std::string& out, std::size_t max_len) {
  std::uint32_t n = 0;
  std::span<const std::uint8_t> b;
  if (!u32(n) || n > max_len || !bytes(n, b)) {
    return false;
  }
  out.assign(b.begin(), b.end());
  return true;
}

}  // namespace qkd::core::detail
