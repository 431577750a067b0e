// A KME configuration file's JSON, for tests of the daemon and of parse_config
// (header-only: no harness library, no keyservice headers needed).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace qkd::test {

// A configuration file's JSON for KME `kme` (link role alice, SAE alice) linked to `peer`
// (SAE bob), listening on loopback port 0 for the API and the link, with the given TLS
// files and a fixed PSK: valid as it stands, for tests that edit one field.
inline nlohmann::json kme_config_json(const std::string& kme, const std::string& peer,
                                      const std::string& cert, const std::string& key,
                                      const std::string& ca) {
  return nlohmann::json{
      {"kme_id", kme},
      {"api", {{"listen", "127.0.0.1:0"}, {"cert", cert}, {"key", key}, {"ca", ca}}},
      {"saes", {"alice"}},
      {"link",
       {{"peer_kme_id", peer},
        {"peer_saes", {"bob"}},
        {"role", "alice"},
        {"listen", "127.0.0.1:0"},
        {"psk_hex", std::string(64, 'a')}}}};
}

}  // namespace qkd::test
