// Small helpers shared by the tests that talk ETSI 014 to real qkd-kms processes: base64,
// Key containers, Error bodies and Key IDs bodies.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "qkd/test/https_client.hpp"

namespace qkd::test {

using KeyBytes = std::vector<std::uint8_t>;

// RFC 4648 base64 (standard alphabet, padded); empty on malformed input.
[[nodiscard]] KeyBytes b64decode(const std::string& text);

// The (key_ID, key bytes) pairs of a Key container, in order; empty if the body is not one.
[[nodiscard]] std::vector<std::pair<std::string, KeyBytes>> key_list(const HttpResponse& r);
// The key_IDs of a Key container, in order; empty if the body is not one.
[[nodiscard]] std::vector<std::string> key_ids(const HttpResponse& r);
// The same as a map key_ID -> bytes.
[[nodiscard]] std::map<std::string, KeyBytes> key_map(const HttpResponse& r);

// The "message" of an Error body ("<not JSON: ...>" when the body is not JSON).
[[nodiscard]] std::string message_of(const HttpResponse& r);

// A dec_keys POST body {"key_IDs": [{"key_ID": id}, ...]}.
[[nodiscard]] std::string dec_body(const std::vector<std::string>& ids);

}  // namespace qkd::test
