// The TLS groups of qkdprovider: ONE table, the single source of truth. The TLS-GROUP
// capability, the keymgmt and KEM algorithm names, the codepoint settings and the tests all
// enumerate this table; nothing else names a group.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace qkd::prov {

// The classical half of a hybrid group (draft-ietf-tls-hybrid-design: the classical share,
// ciphertext and secret come first, then the QKD part). kNone is pure QKD; the hybrids
// x25519_qkd and p256_qkd are planned and will add rows here plus a classical step in the
// group implementation, with no change to the dispatch or capability code.
enum class Classical : std::uint8_t { kNone, kX25519, kP256 };

struct GroupInfo {
  std::string_view tls_name;           // the name in -groups / Groups = / ssl_ecdh_curve
  std::string_view internal_name;      // passed to keygen as OSSL_PKEY_PARAM_GROUP_NAME
  std::string_view algorithm;          // keymgmt AND KEM name (libssl fetches the KEM by it)
  std::string_view codepoint_setting;  // provider config key overriding the codepoint
  std::uint16_t default_codepoint;     // TLS NamedGroup value
  // Security bits as libssl's security levels see them. 128 for `qkd`: the 256-bit QKD key
  // is information-theoretically secret only up to the SAE's doorstep; it then travels from
  // the KME to this process over classical TLS pinned to X25519/P-256 (128-bit), and the
  // KMEs authenticate each other classically at bootstrap. Claiming 256 would overstate
  // the weakest link; 128 passes Debian's default SECLEVEL 2 (>= 112).
  unsigned int security_bits;
  Classical classical;
  std::uint32_t qkd_key_bits;  // bits asked of the KME per handshake
};

inline constexpr std::array<GroupInfo, 1> kGroups = {{
    {"qkd", "qkd", "qkd", "qkd_codepoint", 0xFE40, 128, Classical::kNone, 256},
}};

// DESIGN decision 2: private use 0xFE00-0xFEFF, but not oqs-provider's 0xFE00-0xFE3A.
inline constexpr std::uint16_t kCodepointMin = 0xFE3B;
inline constexpr std::uint16_t kCodepointMax = 0xFEFF;
constexpr bool codepoint_allowed(std::uint32_t cp) {
  return cp >= kCodepointMin && cp <= kCodepointMax;
}

// Names libssl and the config accept: short, printable, no ':' (the group list separator).
constexpr bool valid_group_name(std::string_view name) {
  if (name.empty() || name.size() > 32) {
    return false;
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
    if (!ok) {
      return false;
    }
  }
  return true;
}

constexpr bool table_is_sound() {
  for (std::size_t i = 0; i < kGroups.size(); ++i) {
    const GroupInfo& g = kGroups[i];
    if (!codepoint_allowed(g.default_codepoint) || !valid_group_name(g.tls_name) ||
        !valid_group_name(g.internal_name) || !valid_group_name(g.algorithm) ||
        g.security_bits < 112 || g.qkd_key_bits == 0 || g.qkd_key_bits % 8 != 0) {
      return false;
    }
    if (g.classical != Classical::kNone) {
      return false;  // hybrids are not implemented yet: a row for one must come with code
    }
    for (std::size_t j = i + 1; j < kGroups.size(); ++j) {
      const GroupInfo& h = kGroups[j];
      if (g.default_codepoint == h.default_codepoint || g.tls_name == h.tls_name ||
          g.algorithm == h.algorithm || g.codepoint_setting == h.codepoint_setting) {
        return false;
      }
    }
  }
  return true;
}
static_assert(table_is_sound(), "kGroups: bad codepoint, name, bits or a duplicate");

inline constexpr std::size_t kQkdKeyBytesMax = 32;  // all rows ask 256 bits for now
static_assert(kGroups[0].qkd_key_bits / 8 == kQkdKeyBytesMax);

}  // namespace qkd::prov
