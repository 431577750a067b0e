#include "settings.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;

std::optional<std::uint64_t> parse_uint(const std::string& text, std::uint64_t min,
                                        std::uint64_t max) {
  std::string_view s = text;
  int base = 10;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    s.remove_prefix(2);
    base = 16;
  }
  if (s.empty() || s.size() > 19) {
    return std::nullopt;
  }
  std::uint64_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v, base);
  if (ec != std::errc{} || ptr != s.data() + s.size() || v < min || v > max) {
    return std::nullopt;
  }
  return v;
}

namespace {

std::optional<double> parse_positive(const std::string& text) {
  if (text.empty() || text.size() > 32) {
    return std::nullopt;
  }
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || !std::isfinite(v) || v <= 0 || v > 1e9) {
    return std::nullopt;
  }
  return v;
}

}  // namespace

qkd::core::Result<Settings> resolve_settings(const RawSettings& raw) {
  Settings s;
  s.prefetch.refill_ahead = true;  // the provider refills ahead; KeyCache's unit tests do not
  const auto get = [&](const char* key) -> std::optional<std::string> {
    const auto it = raw.find(key);
    if (it == raw.end()) {
      return std::nullopt;
    }
    return it->second;
  };
  const auto defer = [&](const std::string& key, const std::string& value, const std::string& rule) {
    if (!s.deferred_error) {
      s.deferred_error = "invalid setting " + key + " = \"" + value.substr(0, 40) + "\": " + rule;
    }
  };
  // An integer setting in [min, max]: apply(value), else a deferred error naming `rule`.
  const auto uint_setting = [&](const char* key, std::uint64_t min, std::uint64_t max,
                                const char* rule, const auto& apply) {
    if (const auto text = get(key)) {
      if (const auto v = parse_uint(*text, min, max)) {
        apply(*v);
      } else {
        defer(key, *text, rule);
      }
    }
  };
  for (std::size_t i = 0; i < kGroups.size(); ++i) {
    s.codepoints[i] = kGroups[i].default_codepoint;
    const std::string key(kGroups[i].codepoint_setting);
    if (const auto text = get(key.c_str())) {
      const auto v = parse_uint(*text, kCodepointMin, kCodepointMax);
      if (!v) {
        char range[64];
        std::snprintf(range, sizeof range, "must be a codepoint in 0x%04X..0x%04X", kCodepointMin,
                      kCodepointMax);
        defer(key, *text, range);
        continue;
      }
      s.codepoints[i] = static_cast<std::uint16_t>(*v);
    }
  }
  // Two groups on one codepoint (an override meeting another group's default or override)
  // would make libssl pick either: the error names the later setting, and every group
  // falls back to its default (the defaults are distinct: groups.hpp checks).
  bool clash = false;
  for (std::size_t i = 0; i < kGroups.size() && !clash; ++i) {
    for (std::size_t j = i + 1; j < kGroups.size() && !clash; ++j) {
      if (s.codepoints[i] == s.codepoints[j]) {
        // Name a setting that was actually given (the other may be a default).
        const bool j_set = raw.count(std::string(kGroups[j].codepoint_setting)) != 0;
        const GroupInfo& named = j_set ? kGroups[j] : kGroups[i];
        const GroupInfo& other = j_set ? kGroups[i] : kGroups[j];
        char value[16];
        std::snprintf(value, sizeof value, "0x%04X", s.codepoints[j]);
        defer(std::string(named.codepoint_setting), value,
              "codepoint already used by group " + std::string(other.tls_name));
        clash = true;
      }
    }
  }
  if (clash) {
    for (std::size_t i = 0; i < kGroups.size(); ++i) {
      s.codepoints[i] = kGroups[i].default_codepoint;
    }
  }
  s.kme_url = get("kme_url").value_or("");
  s.sae_id = get("sae_id").value_or("");
  s.cert = get("cert").value_or("");
  s.key = get("key").value_or("");
  s.ca = get("ca").value_or("");

  uint_setting("timeout_ms", 1, 600'000, "must be 1..600000", [&](std::uint64_t v) { s.timeout = std::chrono::milliseconds(v); });
  if (const auto t = get("admit_rate")) {
    if (const auto v = parse_positive(*t)) {
      s.admission.rate_per_second = *v;
    } else {
      defer("admit_rate", *t, "must be a positive number (keys per second)");
    }
  }
  if (const auto t = get("admit_burst")) {
    if (const auto v = parse_positive(*t); v && *v >= 1) {
      s.admission.burst = *v;
    } else {
      defer("admit_burst", *t, "must be a number >= 1");
    }
  }
  uint_setting("admit_outstanding", 1, 1'000'000, "must be 1..1000000", [&](std::uint64_t v) { s.admission.max_outstanding = static_cast<std::uint32_t>(v); });
  uint_setting("admit_outstanding_total", 1, 1'000'000, "must be 1..1000000", [&](std::uint64_t v) { s.admission.max_outstanding_total = static_cast<std::uint32_t>(v); });
  uint_setting("prefetch_keys", 1, 1024, "must be 1..1024 (1: no prefetch)", [&](std::uint64_t v) { s.prefetch.max_batch = static_cast<std::uint32_t>(v); });
  uint_setting("prefetch_max_age_ms", 1, 3'600'000, "must be 1..3600000", [&](std::uint64_t v) { s.prefetch.max_age = std::chrono::milliseconds(v); });
  uint_setting("announce_keys", 0, kMaxAhead, "must be 0..32 (0: announce no key ahead)", [&](std::uint64_t v) { s.prefetch.announce = static_cast<std::uint32_t>(v); });
  uint_setting("fetch_ahead_keys", 0, 4096, "must be 0..4096 (0: fetch no key ahead)", [&](std::uint64_t v) { s.ahead.max_keys = static_cast<std::size_t>(v); });
  // The client keeps announced keys twice as long as a server reserves them (both ends
  // default to the same prefetch_max_age_ms), and waits for a fetch as long as for a KME.
  s.ahead.max_age = 2 * s.prefetch.max_age;
  s.ahead.wait = s.timeout;
  return s;
}

}  // namespace qkd::prov
