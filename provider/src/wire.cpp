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

// version, SAE ID, then a fixed-length tail; shared by the share and the ciphertext.
Result<std::vector<std::uint8_t>> encode(std::string_view sae_id,
                                         std::span<const std::uint8_t> tail) {
  if (!valid_sae_id(sae_id)) {
    return make_error(ErrorCode::kInvalidArgument,
                      "SAE ID \"" + std::string(sae_id.substr(0, 80)) +
                          "\" is not 1..64 characters of [A-Za-z0-9._-]");
  }
  std::vector<std::uint8_t> out;
  out.reserve(2 + sae_id.size() + tail.size());
  out.push_back(kWireVersion);
  out.push_back(static_cast<std::uint8_t>(sae_id.size()));
  out.insert(out.end(), sae_id.begin(), sae_id.end());
  out.insert(out.end(), tail.begin(), tail.end());
  return out;
}

struct Parsed {
  std::string sae_id;
  std::span<const std::uint8_t> tail;
};

Result<Parsed> parse(std::span<const std::uint8_t> bytes, std::size_t tail_len,
                     std::string_view what) {
  const auto bad = [&](std::string_view why) {
    return make_error(ErrorCode::kProtocol, std::string(what) + ": " + std::string(why));
  };
  Reader r(bytes);
  std::uint8_t version = 0;
  std::uint8_t len = 0;
  std::span<const std::uint8_t> id;
  Parsed out;
  if (!r.u8(&version)) {
    return bad("empty");
  }
  if (version == 0x01) {
    return bad("version 1 (secret not bound to the handshake) is no longer accepted: "
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
  out.sae_id.assign(id.begin(), id.end());
  if (!valid_sae_id(out.sae_id)) {
    return bad("SAE ID has characters outside [A-Za-z0-9._-]");
  }
  if (!r.bytes(tail_len, &out.tail)) {
    return bad("truncated");
  }
  if (!r.empty()) {
    return bad(std::to_string(r.remaining()) + " trailing byte(s)");
  }
  return out;
}

}  // namespace

Result<std::vector<std::uint8_t>> encode_share(const Share& share) {
  return encode(share.sae_id, share.nonce);
}

Result<std::vector<std::uint8_t>> encode_ciphertext(const Ciphertext& ct) {
  return encode(ct.sae_id, ct.key_id);
}

Result<Share> parse_share(std::span<const std::uint8_t> bytes) {
  auto p = parse(bytes, kNonceLength, "malformed qkd key share");
  if (!p.ok()) {
    return p.error();
  }
  Share s;
  s.sae_id = std::move(p->sae_id);
  std::copy(p->tail.begin(), p->tail.end(), s.nonce.begin());
  return s;
}

Result<Ciphertext> parse_ciphertext(std::span<const std::uint8_t> bytes) {
  auto p = parse(bytes, kKeyIdLength, "malformed qkd ciphertext");
  if (!p.ok()) {
    return p.error();
  }
  Ciphertext c;
  c.sae_id = std::move(p->sae_id);
  std::copy(p->tail.begin(), p->tail.end(), c.key_id.begin());
  return c;
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
