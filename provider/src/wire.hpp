// The bytes qkdprovider puts on the wire inside TLS key_share entries.
//
// Wire format, version 3 (all lengths in bytes; no trailing bytes; docs/PROTOCOL.md):
//
//   Key share (ClientHello key_share.key_exchange, client -> server):
//     u8        version         = 0x03
//     u8        sae_id_length   1..64
//     sae_id    sae_id_length bytes of [A-Za-z0-9._-]  the client's SAE ID (ETSI slave)
//     u8[16]    nonce           fresh random bytes, one per ClientHello
//     u8        client_id_length  0 or 16
//     u8[16]    client_id       (when present) random, one per client process: the server
//                               may announce keys it will use for this process's next
//                               handshakes
//
//   Ciphertext (ServerHello key_share.key_exchange, server -> client):
//     u8        version         = 0x03
//     u8        sae_id_length   1..64
//     sae_id    sae_id_length bytes of [A-Za-z0-9._-]  the server's SAE ID (ETSI master)
//     u8[16]    key_id          the KME's key_ID, a UUID in RFC 4122 binary form
//     u8        ahead_count     0..32 (0 unless the share carried a client_id)
//     u8[16]    ahead[i]        key_IDs the server reserved for that client_id's next
//                               handshakes, distinct and other than key_id
//
//   Shared secret: HKDF of the 32-byte key the server got from enc_keys and the client from
//   dec_keys (DESIGN decision 1), bound to the group, both SAE IDs, the nonce and the key_ID
//   (binding.hpp; unchanged since version 2). Versions 1 and 2 are refused with a word on
//   why.
//
// The share costs no key: the server fetches one only in encapsulation. A later version
// bumps the version byte; a parser accepts exactly the versions it knows. A hybrid group
// prefixes the classical share/ciphertext (fixed length per group) to these bytes.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"

namespace qkd::prov {

using qkd::core::Result;

inline constexpr std::uint8_t kWireVersion = 0x03;
inline constexpr std::size_t kMaxSaeIdLength = 64;
inline constexpr std::size_t kNonceLength = 16;
inline constexpr std::size_t kKeyIdLength = 16;
inline constexpr std::size_t kClientIdLength = 16;
inline constexpr std::size_t kMaxAhead = 32;  // key_IDs announced in one ciphertext
inline constexpr std::size_t kMaxShareLength =
    2 + kMaxSaeIdLength + kNonceLength + 1 + kClientIdLength;
inline constexpr std::size_t kMaxCiphertextLength =
    2 + kMaxSaeIdLength + kKeyIdLength + 1 + kMaxAhead * kKeyIdLength;

using Nonce = std::array<std::uint8_t, kNonceLength>;
using KeyId = std::array<std::uint8_t, kKeyIdLength>;
using ClientId = std::array<std::uint8_t, kClientIdLength>;

// Length of an encoded ciphertext (QKD part) for a server SAE ID of `sae_id_length` bytes
// announcing `ahead` keys.
[[nodiscard]] constexpr std::size_t ciphertext_length(std::size_t sae_id_length,
                                                      std::size_t ahead) {
  return 2 + sae_id_length + kKeyIdLength + 1 + ahead * kKeyIdLength;
}

// An SAE ID as this provider puts on the wire: 1..64 of [A-Za-z0-9._-].
[[nodiscard]] bool valid_sae_id(std::string_view id);

struct Share {
  std::string sae_id;
  Nonce nonce{};
  std::optional<ClientId> client_id;  // absent: announce nothing to this client
};
struct Ciphertext {
  std::string sae_id;
  KeyId key_id{};
  std::vector<KeyId> ahead;  // at most kMaxAhead, distinct, none equal to key_id
};

// Encoders require a valid SAE ID and a valid ahead list (kInvalidArgument otherwise).
[[nodiscard]] Result<std::vector<std::uint8_t>> encode_share(const Share& share);
[[nodiscard]] Result<std::vector<std::uint8_t>> encode_ciphertext(const Ciphertext& ct);
// Parsers fail with kProtocol and a message naming the fault.
[[nodiscard]] Result<Share> parse_share(std::span<const std::uint8_t> bytes);
[[nodiscard]] Result<Ciphertext> parse_ciphertext(std::span<const std::uint8_t> bytes);

// UUID text <-> 16 bytes. Parsing accepts 8-4-4-4-12 hex digits in either case; the text
// form is lowercase (RFC 4122).
[[nodiscard]] Result<KeyId> uuid_parse(std::string_view text);
[[nodiscard]] std::string uuid_format(const KeyId& id);

// A bounds-checked reader (BoringSSL's CBS in miniature): every read either succeeds or
// leaves the reader unchanged and returns false.
class Reader {
 public:
  explicit Reader(std::span<const std::uint8_t> bytes) : rest_(bytes) {}
  [[nodiscard]] bool u8(std::uint8_t* out);
  [[nodiscard]] bool bytes(std::size_t n, std::span<const std::uint8_t>* out);
  [[nodiscard]] bool empty() const { return rest_.empty(); }
  [[nodiscard]] std::size_t remaining() const { return rest_.size(); }

 private:
  std::span<const std::uint8_t> rest_;
};

}  // namespace qkd::prov
