// Thin wrappers over OpenSSL libcrypto (internal to qkdcore).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>

#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::core::detail {

inline constexpr std::size_t kMacBytes = 32;
using MacTag = std::array<std::uint8_t, kMacBytes>;

// HMAC-SHA256 over the concatenation of `data`. Fails only if OpenSSL fails.
[[nodiscard]] Result<MacTag> hmac_sha256(std::span<const std::uint8_t> key,
                                         std::span<const std::uint8_t> data);

// HKDF-SHA256 (RFC 5869) with the given salt and info, `out_len` bytes.
[[nodiscard]] Result<SecureBytes> hkdf_sha256(std::span<const std::uint8_t> ikm,
                                              std::string_view salt, std::string_view info,
                                              std::size_t out_len);

}  // namespace qkd::core::detail
