// The key object shared by the keymgmt and the KEM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "groups.hpp"
#include "prov.hpp"
#include "wire.hpp"

namespace qkd::prov {

struct QkdKey {
  ProvCtx* prov = nullptr;
  std::size_t group = 0;            // row of kGroups
  bool has_share = false;           // `share` holds a valid encoded share
  bool own = false;                 // made by our keygen: we may decapsulate with it
  std::vector<std::uint8_t> share;  // encoded (wire.hpp)
  std::string peer_sae_id;          // the SAE named by a peer's share (server side)
};

}  // namespace qkd::prov
