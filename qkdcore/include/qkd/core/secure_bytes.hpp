// A byte buffer for key material: cleansed (OPENSSL_cleanse) when destroyed or cleared.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qkd::core {

class SecureBytes {
 public:
  SecureBytes() = default;
  explicit SecureBytes(std::size_t n) : bytes_(n) {}
  explicit SecureBytes(std::span<const std::uint8_t> src) : bytes_(src.begin(), src.end()) {}
  SecureBytes(const SecureBytes&) = default;
  SecureBytes& operator=(const SecureBytes& other);
  SecureBytes(SecureBytes&& other) noexcept;
  SecureBytes& operator=(SecureBytes&& other) noexcept;
  ~SecureBytes();

  void clear();  // cleanse, then empty
  void resize(std::size_t n);  // cleanses the old storage if it moves
  [[nodiscard]] std::size_t size() const { return bytes_.size(); }
  [[nodiscard]] bool empty() const { return bytes_.empty(); }
  std::uint8_t* data() { return bytes_.data(); }
  [[nodiscard]] const std::uint8_t* data() const { return bytes_.data(); }
  std::uint8_t& operator[](std::size_t i) { return bytes_[i]; }
  const std::uint8_t& operator[](std::size_t i) const { return bytes_[i]; }
  [[nodiscard]] std::span<const std::uint8_t> span() const { return bytes_; }
  std::span<std::uint8_t> span() { return bytes_; }

 private:
  std::vector<std::uint8_t> bytes_;
};

// Constant-time equality (CRYPTO_memcmp); different lengths compare unequal.
[[nodiscard]] bool constant_time_equal(std::span<const std::uint8_t> a,
                                       std::span<const std::uint8_t> b);

}  // namespace qkd::core
