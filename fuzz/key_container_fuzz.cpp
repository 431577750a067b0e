// Fuzz target: a key container as the ETSI client receives it (a 200 reply's body). Checks:
// taking the key values out before the JSON parser (scrub_key_values) changes nothing the
// parser decides: the scrubbed text is valid JSON exactly when the input is, and with the
// values put back it is the same document; no value of a member "key" that could be
// base64 is left for the parser; parse_key_container returns (no crash).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "qkd/etsi/client_detail.hpp"

namespace {

using nlohmann::json;
using qkd::etsi::detail::ScrubbedKeys;

void put_back(json& doc, const ScrubbedKeys& scrubbed) {
  if (doc.is_array()) {
    for (auto& entry : doc) {
      put_back(entry, scrubbed);
    }
    return;
  }
  if (!doc.is_object()) {
    return;
  }
  for (auto& [name, value] : doc.items()) {
    if (name != "key" || !value.is_string()) {
      put_back(value, scrubbed);
      continue;
    }
    auto& text = value.get_ref<std::string&>();
    const long index = qkd::etsi::detail::scrubbed_index(text, scrubbed.values.size());
    if (index < 0) {
      // Left in place: only a value that is no ASCII text may be.
      if (std::all_of(text.begin(), text.end(),
                      [](char c) { return static_cast<unsigned char>(c) < 0x80; })) {
        std::abort();
      }
      continue;
    }
    const auto& bytes = scrubbed.values[static_cast<std::size_t>(index)];
    text.assign(bytes.data(), bytes.data() + bytes.size());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const ScrubbedKeys scrubbed = qkd::etsi::detail::scrub_key_values(input);
  const json original = json::parse(input, nullptr, /*allow_exceptions=*/false);
  json restored = json::parse(scrubbed.json, nullptr, /*allow_exceptions=*/false);
  if (original.is_discarded() != restored.is_discarded()) {
    std::abort();
  }
  if (!original.is_discarded()) {
    put_back(restored, scrubbed);
    if (restored != original) {
      std::abort();
    }
  }
  std::string body = input;
  const auto keys = qkd::etsi::detail::parse_key_container(body, size % 3, 0);
  (void)keys;
  return 0;
}
