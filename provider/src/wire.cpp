#include "wire.hpp"

#include <algorithm>

namespace qkd::prov {

using qkd::core::ErrorCode;
using qkd::core::make_error;

bool Reader::u8(std::uint8_t* out) {
  if (rest_.empty()) {
    return false;
  }
  *out = rest_[0];
  rest_ = rest_.subspan(1);
  return true;
}

bool Reader::bytes(std::size_t n, std::span<const std::uint8_t>* out) {
  if (rest_.size() < n) {
    return false;
  }
  *out = rest_.first(n);
  rest_ = rest_.subspan(n);
  return true;
}

bool valid_sae_id(std::string_view id) {
  if (id.empty() || id.size() > kMaxSaeIdLength) {
    return false;
  }
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

namespace {

// An ahead list the encoder may write and the parser accepts: at most kMaxAhead key_IDs,
// distinct, none equal to the key_ID the ciphertext uses now. Empty string: fine.
std::string ahead_fault(const KeyId& key_id, const std::vector<KeyId>& ahead) {
  if (ahead.size() > kMaxAhead) {
    return std::to_string(ahead.size()) + " key_IDs announced, at most " +
           std::to_string(kMaxAhead);
  }
  for (std::size_t i = 0; i < ahead.size(); ++i) {
    if (ahead[i] == key_id) {
      return "an announced key_ID is the one used now";
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (ahead[i] == ahead[j]) {
        return "a key_ID is announced twice";
      }
    }
  }
  return {};
}

// version and SAE ID, the head shared by the share and the ciphertext.
Result<std::vector<std::uint8_t>> encode_head(std::string_view sae_id, std::size_t reserve) {
  if (!valid_sae_id(sae_id)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "SAE ID \"" + std::string(sae_id.substr(0, 80)) +
                          "\" is not 1..64 characters of [A-Za-z0-9._-]");
  }
  std::vector<std::uint8_t> out;
  out.reserve(2 + sae_id.size() + reserve);
  out.push_back(kWireVersion);
  out.push_back(static_cast<std::uint8_t>(sae_id.size()));
  out.insert(out.end(), sae_id.begin(), sae_id.end());
  return out;
}

// Reads version and SAE ID; on success `r` is left at the first byte after them.
Result<std::string> parse_head(Reader& r, std::string_view what) {
  const auto bad = [&](std::string_view why) {
    return make_error(ErrorCode::kProtocol, std::string(what) + ": " + std::string(why));
  };
  std::uint8_t version = 0;
  std::uint8_t len = 0;
  std::span<const std::uint8_t> id;
  if (!r.u8(&version)) {
    return bad("empty");
  }
  if (version == 0x01) {
    return bad("version 1 (secret not bound to the handshake) is no longer accepted: "
               "upgrade the peer's qkdprovider");
  }
  if (version == 0x02) {
    return bad("version 2 (no keys announced ahead) is no longer accepted: "
               "upgrade the peer's qkdprovider");
  }
  if (version != kWireVersion) {
    return bad("unknown version " + std::to_string(version));
  }
  if (!r.u8(&len) || len == 0 || len > kMaxSaeIdLength) {
    return bad("SAE ID length must be 1..64");
  }
  if (!r.bytes(len, &id)) {
    return bad("truncated SAE ID");
  }
  std::string sae_id(id.begin(), id.end());
  if (!valid_sae_id(sae_id)) {
    return bad("SAE ID has characters outside [A-Za-z0-9._-]");
  }
  return sae_id;
}

template <std::size_t N>
bool read_array(Reader& r, std::array<std::uint8_t, N>* out) {
  std::span<const std::uint8_t> b;
  if (!r.bytes(N, &b)) {
    return false;
  }
  std::copy(b.begin(), b.end(), out->begin());
  return true;
}

}  // namespace

Result<std::vector<std::uint8_t>> encode_share(const Share& share) {
  auto out = encode_head(share.sae_id, kNonceLength + 1 + kClientIdLength);
  if (!out.ok()) {
    return out;
  }
  out->insert(out->end(), share.nonce.begin(), share.nonce.end());
  out->push_back(share.client_id ? kClientIdLength : 0);
  if (share.client_id) {
    out->insert(out->end(), share.client_id->begin(), share.client_id->end());
  }
  return out;
}

Result<std::vector<std::uint8_t>> encode_ciphertext(const Ciphertext& ct) {
  if (auto fault = ahead_fault(ct.key_id, ct.ahead); !fault.empty()) {
    return make_error(ErrorCode::kInvalidArgument, fault);
  }
  auto out = encode_head(ct.sae_id, kKeyIdLength + 1 + ct.ahead.size() * kKeyIdLength);
  if (!out.ok()) {
    return out;
  }
  out->insert(out->end(), ct.key_id.begin(), ct.key_id.end());
  out->push_back(static_cast<std::uint8_t>(ct.ahead.size()));
  for (const KeyId& id : ct.ahead) {
    out->insert(out->end(), id.begin(), id.end());
  }
  return out;
}

namespace {

qkd::core::Error malformed(std::string_view what, std::string_view why) {
  return make_error(ErrorCode::kProtocol, std::string(what) + ": " + std::string(why));
}

// Reads the head, then `body(sae_id, reader)` (which returns Result<T> and reports faults
// with malformed(what, ...)), then refuses trailing bytes.
template <typename T, typename Body>
Result<T> parse_message(std::span<const std::uint8_t> bytes, std::string_view what, Body body) {
  Reader r(bytes);
  auto sae_id = parse_head(r, what);
  if (!sae_id.ok()) {
    return sae_id.error();
  }
  Result<T> out = body(std::move(sae_id).value(), r);
  if (out.ok() && !r.empty()) {
    return malformed(what, std::to_string(r.remaining()) + " trailing byte(s)");
  }
  return out;
}

}  // namespace

Result<Share> parse_share(std::span<const std::uint8_t> bytes) {
  static constexpr std::string_view kWhat = "malformed qkd key share";
  return parse_message<Share>(bytes, kWhat, [](std::string sae_id, Reader& r) -> Result<Share> {
    Share s;
    s.sae_id = std::move(sae_id);
    std::uint8_t id_len = 0;
    if (!read_array(r, &s.nonce) || !r.u8(&id_len)) {
      return malformed(kWhat, "truncated");
    }
    if (id_len != 0 && id_len != kClientIdLength) {
      return malformed(kWhat, "client_id length must be 0 or 16, not " + std::to_string(id_len));
    }
    if (id_len != 0) {
      s.client_id.emplace();
      if (!read_array(r, &*s.client_id)) {
        return malformed(kWhat, "truncated client_id");
      }
    }
    return s;
  });
}

Result<Ciphertext> parse_ciphertext(std::span<const std::uint8_t> bytes) {
  static constexpr std::string_view kWhat = "malformed qkd ciphertext";
  return parse_message<Ciphertext>(
      bytes, kWhat, [](std::string sae_id, Reader& r) -> Result<Ciphertext> {
        Ciphertext c;
        c.sae_id = std::move(sae_id);
        std::uint8_t count = 0;
        if (!read_array(r, &c.key_id) || !r.u8(&count)) {
          return malformed(kWhat, "truncated");
        }
        if (count > kMaxAhead) {
          return malformed(kWhat, std::to_string(count) + " key_IDs announced, at most " +
                                      std::to_string(kMaxAhead));
        }
        c.ahead.resize(count);
        for (KeyId& id : c.ahead) {
          if (!read_array(r, &id)) {
            return malformed(kWhat, "truncated announced key_IDs");
          }
        }
        if (auto fault = ahead_fault(c.key_id, c.ahead); !fault.empty()) {
          return malformed(kWhat, fault);
        }
        return c;
      });
}

Result<KeyId> uuid_parse(std::string_view text) {
  const auto bad = [&]() {
    return make_error(ErrorCode::kProtocol,
                      "key_ID \"" + std::string(text.substr(0, 80)) + "\" is not a UUID");
  };
  if (text.size() != 36) {
    return bad();
  }
  KeyId out{};
  std::size_t nibble = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') {
        return bad();
      }
      continue;
    }
    int v = -1;
    if (c >= '0' && c <= '9') {
      v = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      v = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      v = c - 'A' + 10;
    }
    if (v < 0) {
      return bad();
    }
    out[nibble / 2] = static_cast<std::uint8_t>(out[nibble / 2] | (nibble % 2 == 0 ? v << 4 : v));
    ++nibble;
  }
  return out;
}

std::string uuid_format(const KeyId& id) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  for (std::size_t i = 0; i < id.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) {
      out += '-';
    }
    out += kHex[id[i] >> 4];
    out += kHex[id[i] & 0x0f];
  }
  return out;
}

}  // namespace qkd::prov
