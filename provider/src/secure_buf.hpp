// A fixed-size secret buffer in OpenSSL's secure heap (OPENSSL_secure_zalloc), cleansed and
// freed with OPENSSL_secure_clear_free. When the host process has not initialised a secure
// heap (CRYPTO_secure_malloc_init), OpenSSL falls back to its ordinary allocator and the
// buffer is still cleansed when freed.
#pragma once

#include <openssl/crypto.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <utility>

namespace qkd::prov {

class SecureBuf {
 public:
  SecureBuf() = default;
  // Throws std::bad_alloc when neither heap has room (caught at the C ABI by guarded()).
  explicit SecureBuf(std::size_t n) : size_(n) {
    if (n != 0) {
      data_ = static_cast<std::uint8_t*>(OPENSSL_secure_zalloc(n));
      if (data_ == nullptr) {
        throw std::bad_alloc();
      }
    }
  }
  explicit SecureBuf(std::span<const std::uint8_t> src) : SecureBuf(src.size()) {
    for (std::size_t i = 0; i < src.size(); ++i) {
      data_[i] = src[i];
    }
  }
  SecureBuf(const SecureBuf&) = delete;
  SecureBuf& operator=(const SecureBuf&) = delete;
  SecureBuf(SecureBuf&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  SecureBuf& operator=(SecureBuf&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~SecureBuf() { reset(); }

  // Cleanses and frees; the buffer is then empty.
  void reset() noexcept {
    if (data_ != nullptr) {
      OPENSSL_secure_clear_free(data_, size_);
    }
    data_ = nullptr;
    size_ = 0;
  }
  // Zeroes the bytes and keeps the buffer: a forked child's fork handler, where freeing
  // could wait for the secure heap's lock (held across fork() by no handler).
  void cleanse() noexcept {
    if (data_ != nullptr) {
      OPENSSL_cleanse(data_, size_);
    }
  }
  // True when some byte is not zero (tests: whether a key is still there).
  [[nodiscard]] bool any_nonzero() const {
    for (std::size_t i = 0; i < size_; ++i) {
      if (data_[i] != 0) {
        return true;
      }
    }
    return false;
  }
  [[nodiscard]] std::uint8_t* data() { return data_; }
  [[nodiscard]] const std::uint8_t* data() const { return data_; }
  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }
  [[nodiscard]] std::span<const std::uint8_t> span() const { return {data_, size_}; }
  [[nodiscard]] std::span<std::uint8_t> span() { return {data_, size_}; }
  // True when the bytes live in the secure heap (false for the fallback allocator).
  [[nodiscard]] bool in_secure_heap() const {
    return data_ != nullptr && CRYPTO_secure_allocated(data_) == 1;
  }

 private:
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace qkd::prov
