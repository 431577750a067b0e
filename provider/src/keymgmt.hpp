// The key object shared by the keymgmt and the KEM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "classical.hpp"
#include "groups.hpp"
#include "prov.hpp"
#include "wire.hpp"

namespace qkd::prov {

struct QkdKey {
  ProvCtx* prov = nullptr;
  std::size_t group = 0;            // row of kGroups
  bool has_share = false;           // `share` holds a valid encoded share
  bool own = false;                 // made by our keygen: we may decapsulate with it
  std::vector<std::uint8_t> share;  // encoded: classical public key (hybrids) || qkd share
  std::string peer_sae_id;          // the SAE named by a peer's share (server side)
  Nonce nonce{};                    // the share's nonce (ours or the peer's)
  std::optional<ClientId> client_id;  // the share's client_id (ours or the peer's)
  // Hybrids only: our key pair (own) or the peer's public key (from its share).
  PkeyPtr classical;

  QkdKey() = default;
  QkdKey(const QkdKey& other)
      : prov(other.prov), group(other.group), has_share(other.has_share), own(other.own),
        share(other.share), peer_sae_id(other.peer_sae_id), nonce(other.nonce),
        client_id(other.client_id),
        classical(share_pkey(other.classical.get())) {}
  QkdKey& operator=(const QkdKey&) = delete;
};

}  // namespace qkd::prov
