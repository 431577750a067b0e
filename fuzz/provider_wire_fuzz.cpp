// Fuzz target: the bytes a TLS peer puts in a key_share for group qkd (the client's share,
// the server's ciphertext), as qkdprovider parses them. Input byte 0 picks which. Checks:
// the parser returns (no crash); what it accepts is canonical: encoding the result gives
// back exactly the input bytes.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  const std::span<const std::uint8_t> bytes(data + 1, size - 1);
  auto same = [&](const auto& encoded) {
    if (!encoded.ok() || encoded->size() != bytes.size() ||
        !std::equal(bytes.begin(), bytes.end(), encoded->begin())) {
      std::abort();
    }
  };
  if ((data[0] & 1) == 0) {
    if (auto share = qkd::prov::parse_share(bytes); share.ok()) {
      same(qkd::prov::encode_share(*share));
    }
  } else if (auto ct = qkd::prov::parse_ciphertext(bytes); ct.ok()) {
    same(qkd::prov::encode_ciphertext(*ct));
  }
  return 0;
}
