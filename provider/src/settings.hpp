// qkdprovider's configuration: the settings of its openssl.cnf section (read with the core's
// get_params in OSSL_provider_init), overridden by QKD_* environment variables. Parsing
// here is pure: no file is opened and nothing is connected.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "admission.hpp"
#include "ahead_keys.hpp"
#include "groups.hpp"
#include "key_cache.hpp"
#include "qkd/core/result.hpp"

namespace qkd::prov {

// Setting names (openssl.cnf keys) and their environment overrides.
struct SettingName {
  const char* key;
  const char* env;  // nullptr: no override
};
inline constexpr std::array<SettingName, 14> kSettings = {{
    {"kme_url", "QKD_KME_URL"},
    {"sae_id", "QKD_SAE_ID"},
    {"cert", "QKD_CERT"},
    {"key", "QKD_KEY"},
    {"ca", "QKD_CA"},
    {"timeout_ms", "QKD_TIMEOUT_MS"},
    {"admit_rate", nullptr},
    {"admit_burst", nullptr},
    {"admit_outstanding", nullptr},
    {"admit_outstanding_total", nullptr},
    {"prefetch_keys", nullptr},
    {"prefetch_max_age_ms", nullptr},
    {"announce_keys", nullptr},
    {"fetch_ahead_keys", nullptr},
}};

using RawSettings = std::map<std::string, std::string>;

struct Settings {
  std::string kme_url, sae_id, cert, key, ca;  // "" = not set (sae_id: CN of cert)
  std::chrono::milliseconds timeout{5000};
  std::array<std::uint16_t, kGroups.size()> codepoints{};
  AdmissionLimits admission;
  KeyCacheLimits prefetch;  // server side: keys fetched per enc_keys call, how long kept
  AheadLimits ahead;        // client side: keys announced by servers, fetched ahead
  // The first bad value: raised (naming the setting) at first use.
  std::optional<std::string> deferred_error;
};

// Never fails today: a bad value (a codepoint included) ends up in deferred_error and the
// default is kept. Failing OSSL_provider_init instead would make the provider silently
// absent (OpenSSL drops activation errors from openssl.cnf), and `Groups = qkd:X25519`
// would then silently mean X25519; raising at first use makes the handshake fail loudly.
[[nodiscard]] qkd::core::Result<Settings> resolve_settings(const RawSettings& raw);

// "65088", "0xFE40" -> value, if all of the text is a number in [min, max].
[[nodiscard]] std::optional<std::uint64_t> parse_uint(const std::string& text, std::uint64_t min,
                                                      std::uint64_t max);

}  // namespace qkd::prov
