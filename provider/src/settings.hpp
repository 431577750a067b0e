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
#include "groups.hpp"
#include "qkd/core/result.hpp"

namespace qkd::prov {

// Setting names (openssl.cnf keys) and their environment overrides.
struct SettingName {
  const char* key;
  const char* env;  // nullptr: no override
};
inline constexpr std::array<SettingName, 10> kSettings = {{
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
}};

using RawSettings = std::map<std::string, std::string>;

struct Settings {
  std::string kme_url, sae_id, cert, key, ca;  // "" = not set (sae_id: CN of cert)
  std::chrono::milliseconds timeout{5000};
  std::array<std::uint16_t, kGroups.size()> codepoints{};
  AdmissionLimits admission;
  // A bad value other than a codepoint: kept, and raised at first use.
  std::optional<std::string> deferred_error;
};

// Codepoint errors fail (the TLS-GROUP capability needs a valid one at once); every other
// bad value ends up in deferred_error.
[[nodiscard]] qkd::core::Result<Settings> resolve_settings(const RawSettings& raw);

// "65088", "0xFE40" -> value, if all of the text is a number in [min, max].
[[nodiscard]] std::optional<std::uint64_t> parse_uint(const std::string& text, std::uint64_t min,
                                                      std::uint64_t max);

}  // namespace qkd::prov
