#include "qkd/core/secure_bytes.hpp"

#include <openssl/crypto.h>

#include <utility>

namespace qkd::core {

SecureBytes& SecureBytes::operator=(const SecureBytes& other) {
  if (this != &other) {
    clear();
    bytes_ = other.bytes_;
  }
  return *this;
}

SecureBytes::SecureBytes(SecureBytes&& other) noexcept : bytes_(std::move(other.bytes_)) {
  other.bytes_.clear();
}

SecureBytes& SecureBytes::operator=(SecureBytes&& other) noexcept {
  if (this != &other) {
    clear();
    bytes_ = std::move(other.bytes_);
    other.bytes_.clear();
  }
  return *this;
}

SecureBytes::~SecureBytes() { clear(); }

void SecureBytes::clear() {
  if (!bytes_.empty()) {
    OPENSSL_cleanse(bytes_.data(), bytes_.size());
  }
  bytes_.clear();
}

void SecureBytes::resize(std::size_t n) {
  if (n <= bytes_.capacity()) {
    if (n < bytes_.size()) {
      OPENSSL_cleanse(bytes_.data() + n, bytes_.size() - n);
    }
    bytes_.resize(n);
    return;
  }
  std::vector<std::uint8_t> bigger(n);
  std::copy(bytes_.begin(), bytes_.end(), bigger.begin());
  clear();
  bytes_ = std::move(bigger);
}

bool constant_time_equal(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) {
  if (a.size() != b.size()) {
    return false;
  }
  return a.empty() || CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace qkd::core
