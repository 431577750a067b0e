// The smallest KME configuration the ETSI handlers run on, for tests and fuzz targets that
// call them directly over an in-memory store (header-only: no harness library needed).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qkd/kms/config.hpp"

namespace qkd::test {

// KME `kme` serving `saes`, linked to `peer`, which serves `peer_saes`.
inline qkd::kms::Config kme_config(std::string kme, std::vector<std::string> saes, std::string peer,
                                   std::vector<std::string> peer_saes, std::uint32_t dec_wait_ms) {
  qkd::kms::Config c;
  c.kme_id = std::move(kme);
  c.saes = std::move(saes);
  c.link.peer_kme_id = std::move(peer);
  c.link.peer_saes = std::move(peer_saes);
  c.keys.dec_wait_ms = dec_wait_ms;
  return c;
}

}  // namespace qkd::test
