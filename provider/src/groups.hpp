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
// ciphertext and secret come first, then the QKD part). kNone is pure QKD.
enum class Classical : std::uint8_t { kNone, kX25519, kP256 };

// Fixed sizes of the classical part on the wire and in the secret (docs/PROTOCOL.md).
// The share and the ciphertext both carry one public key: X25519's 32 bytes (RFC 7748),
// P-256's uncompressed point 0x04 || x || y (65 bytes, SEC 1). The ECDH secret is
// X25519's 32-byte output or P-256's 32-byte x coordinate.
constexpr std::size_t classical_public_length(Classical c) {
  switch (c) {
    case Classical::kX25519:
      return 32;
    case Classical::kP256:
      return 65;
    case Classical::kNone:
      break;
  }
  return 0;
}
constexpr std::size_t classical_secret_length(Classical c) {
  return c == Classical::kNone ? 0 : 32;
}
// The name of the classical algorithm, for messages ("none" for kNone).
constexpr const char* classical_name(Classical c) {
  switch (c) {
    case Classical::kX25519:
      return "X25519";
    case Classical::kP256:
      return "P-256";
    case Classical::kNone:
      break;
  }
  return "none";
}

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

// Hybrids claim 128 bits too: X25519 and P-256 are 128-bit groups, and the QKD half is
// bounded by the same classical links (above), so neither half lifts the other.
inline constexpr std::array<GroupInfo, 3> kGroups = {{
    {"qkd", "qkd", "qkd", "qkd_codepoint", 0xFE40, 128, Classical::kNone, 256},
    {"x25519_qkd", "x25519_qkd", "x25519_qkd", "x25519_qkd_codepoint", 0xFE41, 128,
     Classical::kX25519, 256},
    {"p256_qkd", "p256_qkd", "p256_qkd", "p256_qkd_codepoint", 0xFE42, 128, Classical::kP256,
     256},
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
inline constexpr std::size_t kClassicalPublicMax = 65;
constexpr bool sizes_are_bounded() {
  for (const GroupInfo& g : kGroups) {
    if (g.qkd_key_bits / 8 != kQkdKeyBytesMax ||
        classical_public_length(g.classical) > kClassicalPublicMax) {
      return false;
    }
  }
  return true;
}
static_assert(sizes_are_bounded(), "kGroups: a row outgrows the size bounds");

}  // namespace qkd::prov
