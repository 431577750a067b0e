// Fuzz target: a KME configuration file's text (parse_config without checking the TLS files
// it names; a link.psk_file it names is read, at most 4 KiB of a regular file). Checks: it
// returns (no exception, no crash, no endless read); a refusal names the file.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "qkd/kms/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto c = qkd::kms::parse_config(text, "fuzz.json", "/etc/qkd", false);
  if (!c.ok() && c.error().message.find("fuzz.json") == std::string::npos) {
    std::abort();  // every error names the file
  }
  return 0;
}
