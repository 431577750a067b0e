// Small helpers shared by the KME layers: UUIDs, base64, hex, URL decoding, log text.
#pragma once

#include <charconv>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::kms {

// A random (version 4, RFC 9562) UUID from OpenSSL's RAND_bytes, lower-case, 36 chars.
// Never derived from key material. Fails only if the DRBG fails.
[[nodiscard]] qkd::core::Result<std::string> random_uuid_v4();

// True for the canonical 8-4-4-4-12 hexadecimal form (any case).
[[nodiscard]] bool is_uuid(std::string_view s);

// RFC 4648 base64 with padding.
[[nodiscard]] std::string base64_encode(std::span<const std::uint8_t> bytes);

// Hex string (upper or lower case, even length) to bytes; nullopt on a bad digit or length.
[[nodiscard]] std::optional<qkd::core::SecureBytes> hex_decode(std::string_view hex);

// Percent-decoding of a URL path segment or query value ('+' decodes to ' ' only when
// `plus_is_space`). nullopt on a malformed escape or a decoded NUL.
[[nodiscard]] std::optional<std::string> url_decode(std::string_view s, bool plus_is_space);

// A whole decimal number (digits only, no sign, no spaces) that fits in T; nullopt otherwise.
template <typename T>
[[nodiscard]] std::optional<T> parse_decimal(std::string_view s) {
  T v{};
  if (s.empty()) {
    return std::nullopt;
  }
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || p != s.data() + s.size()) {
    return std::nullopt;
  }
  return v;
}

// Why parse_json_unique refused a text.
struct JsonTextError {
  // An object names the member at `path` twice ("kme_id", "link.psk_hex",
  // "key_IDs[1].key_ID"); otherwise the text is not JSON and `message` says where.
  bool repeated = false;
  std::string path;
  // The parser's message: the position, never the text it stopped in (a secret, perhaps).
  std::string message;
};

// Parses `text` into `out` as nlohmann::json::parse does, except that an object naming a
// member twice is refused: nlohmann keeps the last one silently, so a file or a request
// read by someone else (a reviewer, a proxy) taking the first one would mean another thing
// than what runs. Stops at the first repeated member. nullopt when parsed.
[[nodiscard]] std::optional<JsonTextError> parse_json_unique(std::string_view text,
                                                             nlohmann::json& out);

// Text from a peer or a file, for a log line or an error message: at most 64 characters,
// anything but printable ASCII as '?' (no control characters reach the log).
[[nodiscard]] std::string printable(std::string_view text);

// Names the calling thread (at most 15 characters), as top -H and ps -L show it.
void name_this_thread(const char* name);

// A random 64-bit value from RAND_bytes (seeds, epochs); falls back to nothing: fails.
[[nodiscard]] qkd::core::Result<std::uint64_t> random_u64();

}  // namespace qkd::kms
