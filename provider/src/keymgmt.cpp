// Key management for the qkd groups. A key object is a key share: the client's own share
// (made by keygen, can decapsulate), or the peer's share set by the server through
// OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY (can be encapsulated to). No key object holds a
// secret: the secret exists only inside encapsulate/decapsulate.
#include "keymgmt.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include <cstring>
#include <utility>

namespace qkd::prov {

namespace {

struct GenCtx {
  ProvCtx* prov = nullptr;
  int selection = 0;
};

// The peer's share (server side). Hybrids: the fixed-length classical public key first,
// then the qkd share; both parts must parse, with nothing left over (docs/PROTOCOL.md).
bool set_peer_share(QkdKey* key, const void* data, std::size_t len) {
  QKD_ENTRY();
  const auto bytes = std::span<const std::uint8_t>(static_cast<const std::uint8_t*>(data),
                                                   data == nullptr ? 0 : len);
  const Classical kind = kGroups[key->group].classical;
  const std::size_t classical_len = classical_public_length(kind);
  PkeyPtr classical;
  if (kind != Classical::kNone) {
    if (bytes.size() < classical_len) {
      QKD_RAISE(key->prov, kReasonBadShare,
                "malformed qkd key share: " + std::to_string(bytes.size()) +
                    " bytes, shorter than the " + classical_name(kind) + " public key (" +
                    std::to_string(classical_len) + ")");
      return false;
    }
    auto peer = classical_import_peer(key->prov->methods(), kind, bytes.first(classical_len));
    if (!peer.ok()) {
      QKD_RAISE(key->prov, kReasonBadShare, "malformed qkd key share: " + peer.error().message);
      return false;
    }
    classical = std::move(peer).value();
  }
  auto share = parse_share(bytes.subspan(classical_len));
  if (!share.ok()) {
    QKD_RAISE(key->prov, kReasonBadShare, share.error().message);
    return false;
  }
  key->share.assign(bytes.begin(), bytes.end());
  key->peer_sae_id = std::move(share->sae_id);
  key->nonce = share->nonce;
  key->client_id = share->client_id;
  key->classical = std::move(classical);
  key->has_share = true;
  key->own = false;
  return true;
}

template <std::size_t G>
struct Keymgmt {
  static OSSL_FUNC_keymgmt_new_fn new_key;
  static OSSL_FUNC_keymgmt_free_fn free_key;
  static OSSL_FUNC_keymgmt_dup_fn dup;
  static OSSL_FUNC_keymgmt_has_fn has;
  static OSSL_FUNC_keymgmt_match_fn match;
  static OSSL_FUNC_keymgmt_gen_init_fn gen_init;
  static OSSL_FUNC_keymgmt_gen_set_params_fn gen_set_params;
  static OSSL_FUNC_keymgmt_gen_settable_params_fn gen_settable_params;
  static OSSL_FUNC_keymgmt_gen_fn gen;
  static OSSL_FUNC_keymgmt_gen_cleanup_fn gen_cleanup;
  static OSSL_FUNC_keymgmt_get_params_fn get_params;
  static OSSL_FUNC_keymgmt_gettable_params_fn gettable_params;
  static OSSL_FUNC_keymgmt_set_params_fn set_params;
  static OSSL_FUNC_keymgmt_settable_params_fn settable_params;
  static OSSL_FUNC_keymgmt_import_fn import_key;
  static OSSL_FUNC_keymgmt_import_types_fn import_types;
  static OSSL_FUNC_keymgmt_export_fn export_key;
  static OSSL_FUNC_keymgmt_export_types_fn export_types;
  static OSSL_FUNC_keymgmt_query_operation_name_fn query_operation_name;

  static const OSSL_DISPATCH kDispatch[];
};

template <std::size_t G>
void* Keymgmt<G>::new_key(void* provctx) {
  auto* prov = static_cast<ProvCtx*>(provctx);
  return guarded<void*>(prov, nullptr, __func__, [&]() -> void* {
    auto* key = new QkdKey;
    key->prov = prov;
    key->group = G;
    return key;
  });
}

template <std::size_t G>
void Keymgmt<G>::free_key(void* keydata) {
  delete static_cast<QkdKey*>(keydata);  // noexcept: members' destructors do not throw
}

template <std::size_t G>
void* Keymgmt<G>::dup(const void* keydata_from, int /*selection*/) {
  const auto* from = static_cast<const QkdKey*>(keydata_from);
  if (from == nullptr) {
    return nullptr;
  }
  return guarded<void*>(from->prov, nullptr, __func__, [&]() -> void* {
    auto copy = std::make_unique<QkdKey>(*from);
    if (from->classical && !copy->classical) {
      return nullptr;
    }
    return copy.release();
  });
}

template <std::size_t G>
int Keymgmt<G>::has(const void* keydata, int selection) {
  const auto* key = static_cast<const QkdKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  int ok = 1;
  if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0) {
    ok &= key->has_share ? 1 : 0;
  }
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) {
    ok &= key->own ? 1 : 0;
  }
  return ok;
}

template <std::size_t G>
int Keymgmt<G>::match(const void* keydata1, const void* keydata2, int selection) {
  const auto* a = static_cast<const QkdKey*>(keydata1);
  const auto* b = static_cast<const QkdKey*>(keydata2);
  if (a == nullptr || b == nullptr || a->group != b->group) {
    return 0;
  }
  if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0) {
    if (a->has_share != b->has_share || a->share.size() != b->share.size()) {
      return 0;
    }
    if (a->has_share && CRYPTO_memcmp(a->share.data(), b->share.data(), a->share.size()) != 0) {
      return 0;
    }
  }
  return 1;
}

template <std::size_t G>
void* Keymgmt<G>::gen_init(void* provctx, int selection, const OSSL_PARAM params[]) {
  auto* prov = static_cast<ProvCtx*>(provctx);
  return guarded<void*>(prov, nullptr, __func__, [&]() -> void* {
    auto gctx = std::make_unique<GenCtx>();
    gctx->prov = prov;
    gctx->selection = selection;
    if (gen_set_params(gctx.get(), params) == 0) {
      return nullptr;
    }
    return gctx.release();
  });
}

template <std::size_t G>
int Keymgmt<G>::gen_set_params(void* genctx, const OSSL_PARAM params[]) {
  QKD_ENTRY();
  auto* gctx = static_cast<GenCtx*>(genctx);
  if (gctx == nullptr) {
    return 0;
  }
  return guarded<int>(gctx->prov, 0, __func__, [&] {
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    if (p == nullptr) {
      return 1;
    }
    const char* name = nullptr;
    if (OSSL_PARAM_get_utf8_string_ptr(p, &name) == 0 || name == nullptr ||
        kGroups[G].internal_name != name) {
      QKD_RAISE(gctx->prov, kReasonBadGroup,
                "group \"" + std::string(name != nullptr ? name : "?") + "\" is not " +
                    std::string(kGroups[G].internal_name));
      return 0;
    }
    return 1;
  });
}

template <std::size_t G>
const OSSL_PARAM* Keymgmt<G>::gen_settable_params(void* /*genctx*/, void* /*provctx*/) {
  static const OSSL_PARAM kTable[] = {
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0), OSSL_PARAM_END};
  return kTable;
}

// Full selection (the client's keygen): a fresh share naming this SAE. Parameters only
// (the server's paramgen before it sets the peer's share): an empty key, no work at all.
// Neither touches the KME.
template <std::size_t G>
void* Keymgmt<G>::gen(void* genctx, OSSL_CALLBACK* /*cb*/, void* /*cbarg*/) {
  QKD_ENTRY();
  auto* gctx = static_cast<GenCtx*>(genctx);
  if (gctx == nullptr) {
    return nullptr;
  }
  ProvCtx* prov = gctx->prov;
  return guarded<void*>(prov, nullptr, __func__, [&]() -> void* {
    auto key = std::make_unique<QkdKey>();
    key->prov = prov;
    key->group = G;
    if ((gctx->selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0) {
      return key.release();
    }
    Failure failure;
    auto own = prov->own_sae_id(&failure);
    if (!own.ok()) {
      QKD_RAISE(prov, failure.reason, failure.message);
      return nullptr;
    }
    std::vector<std::uint8_t> encoded_share;
    if (constexpr Classical kind = kGroups[G].classical; kind != Classical::kNone) {
      auto pair = classical_generate(prov->methods(), kind);
      if (!pair.ok()) {
        QKD_RAISE(prov, kReasonInternal, pair.error().message);
        return nullptr;
      }
      auto pub = classical_public(pair->get(), kind);
      if (!pub.ok()) {
        QKD_RAISE(prov, kReasonInternal, pub.error().message);
        return nullptr;
      }
      key->classical = std::move(pair).value();
      encoded_share = std::move(pub).value();
    }
    Share share;
    share.sae_id = own.value();
    if (auto rnd = qkd::etsi::random_bytes(share.nonce); !rnd.ok()) {
      QKD_RAISE(prov, kReasonInternal, rnd.error().message);
      return nullptr;
    }
    // No KME work: the client_id is made here, the keys announced for it are fetched later.
    auto client_id = prov->ahead_keys().client_id();
    if (!client_id.ok()) {
      QKD_RAISE(prov, kReasonInternal, client_id.error().message);
      return nullptr;
    }
    share.client_id = client_id.value();
    auto encoded = encode_share(share);
    if (!encoded.ok()) {
      QKD_RAISE(prov, kReasonBadSetting, encoded.error().message);
      return nullptr;
    }
    encoded_share.insert(encoded_share.end(), encoded->begin(), encoded->end());
    key->share = std::move(encoded_share);
    key->nonce = share.nonce;
    key->client_id = share.client_id;
    key->has_share = true;
    key->own = true;
    return key.release();
  });
}

template <std::size_t G>
void Keymgmt<G>::gen_cleanup(void* genctx) {
  delete static_cast<GenCtx*>(genctx);
}

template <std::size_t G>
int Keymgmt<G>::get_params(void* keydata, OSSL_PARAM params[]) {
  QKD_ENTRY();
  auto* key = static_cast<QkdKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  return guarded<int>(key->prov, 0, __func__, [&] {
    OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_BITS);
    if (p != nullptr && OSSL_PARAM_set_int(p, static_cast<int>(kGroups[G].qkd_key_bits)) == 0) {
      return 0;
    }
    p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_SECURITY_BITS);
    if (p != nullptr && OSSL_PARAM_set_int(p, static_cast<int>(kGroups[G].security_bits)) == 0) {
      return 0;
    }
    p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_MAX_SIZE);
    constexpr std::size_t kMaxSize =
        classical_public_length(kGroups[G].classical) + kMaxCiphertextLength;
    if (p != nullptr && OSSL_PARAM_set_int(p, static_cast<int>(kMaxSize)) == 0) {
      return 0;
    }
    p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    if (p != nullptr) {
      if (!key->has_share) {
        QKD_RAISE(key->prov, kReasonWrongKey, "the key has no share yet");
        return 0;
      }
      // A NULL buffer asks for the size (OSSL_PARAM_set_octet_string handles it).
      if (OSSL_PARAM_set_octet_string(p, key->share.data(), key->share.size()) == 0) {
        return 0;
      }
    }
    return 1;
  });
}

template <std::size_t G>
const OSSL_PARAM* Keymgmt<G>::gettable_params(void* /*provctx*/) {
  static const OSSL_PARAM kTable[] = {
      OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
      OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
      OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0),
      OSSL_PARAM_END};
  return kTable;
}

template <std::size_t G>
int Keymgmt<G>::set_params(void* keydata, const OSSL_PARAM params[]) {
  QKD_ENTRY();
  auto* key = static_cast<QkdKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  return guarded<int>(key->prov, 0, __func__, [&] {
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    if (p == nullptr) {
      return 1;
    }
    const void* data = nullptr;
    std::size_t len = 0;
    if (OSSL_PARAM_get_octet_string_ptr(p, &data, &len) == 0) {
      QKD_RAISE(key->prov, kReasonBadShare, "malformed qkd key share: not an octet string");
      return 0;
    }
    return set_peer_share(key, data, len) ? 1 : 0;
  });
}

template <std::size_t G>
const OSSL_PARAM* Keymgmt<G>::settable_params(void* /*provctx*/) {
  static const OSSL_PARAM kTable[] = {
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0), OSSL_PARAM_END};
  return kTable;
}

// Import/export carry the public share only (OSSL_PKEY_PARAM_PUB_KEY): the ability to
// decapsulate is this SAE's standing with its KME, not bytes that could be exported.
template <std::size_t G>
int Keymgmt<G>::import_key(void* keydata, int selection, const OSSL_PARAM params[]) {
  QKD_ENTRY();
  auto* key = static_cast<QkdKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  return guarded<int>(key->prov, 0, __func__, [&] {
    if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0) {
      return 1;
    }
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_PUB_KEY);
    const void* data = nullptr;
    std::size_t len = 0;
    if (p == nullptr || OSSL_PARAM_get_octet_string_ptr(p, &data, &len) == 0) {
      QKD_RAISE(key->prov, kReasonBadShare, "malformed qkd key share: no public key to import");
      return 0;
    }
    return set_peer_share(key, data, len) ? 1 : 0;
  });
}

template <std::size_t G>
const OSSL_PARAM* Keymgmt<G>::import_types(int selection) {
  static const OSSL_PARAM kTable[] = {
      OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0), OSSL_PARAM_END};
  return (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0 ? kTable : nullptr;
}

template <std::size_t G>
int Keymgmt<G>::export_key(void* keydata, int selection, OSSL_CALLBACK* param_cb, void* cbarg) {
  auto* key = static_cast<QkdKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  return guarded<int>(key->prov, 0, __func__, [&] {
    if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0 || !key->has_share) {
      return 0;
    }
    OSSL_PARAM params[] = {
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, key->share.data(), key->share.size()),
        OSSL_PARAM_END};
    return param_cb(params, cbarg);
  });
}

template <std::size_t G>
const OSSL_PARAM* Keymgmt<G>::export_types(int selection) {
  return import_types(selection);
}

template <std::size_t G>
const char* Keymgmt<G>::query_operation_name(int /*operation_id*/) {
  return kGroups[G].algorithm.data();  // the KEM carries the same name
}

template <std::size_t G>
const OSSL_DISPATCH Keymgmt<G>::kDispatch[] = {
    {OSSL_FUNC_KEYMGMT_NEW, as_fn<OSSL_FUNC_keymgmt_new_fn>(&new_key)},
    {OSSL_FUNC_KEYMGMT_FREE, as_fn<OSSL_FUNC_keymgmt_free_fn>(&free_key)},
    {OSSL_FUNC_KEYMGMT_DUP, as_fn<OSSL_FUNC_keymgmt_dup_fn>(&dup)},
    {OSSL_FUNC_KEYMGMT_HAS, as_fn<OSSL_FUNC_keymgmt_has_fn>(&has)},
    {OSSL_FUNC_KEYMGMT_MATCH, as_fn<OSSL_FUNC_keymgmt_match_fn>(&match)},
    {OSSL_FUNC_KEYMGMT_GEN_INIT, as_fn<OSSL_FUNC_keymgmt_gen_init_fn>(&gen_init)},
    {OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, as_fn<OSSL_FUNC_keymgmt_gen_set_params_fn>(&gen_set_params)},
    {OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS,
     as_fn<OSSL_FUNC_keymgmt_gen_settable_params_fn>(&gen_settable_params)},
    {OSSL_FUNC_KEYMGMT_GEN, as_fn<OSSL_FUNC_keymgmt_gen_fn>(&gen)},
    {OSSL_FUNC_KEYMGMT_GEN_CLEANUP, as_fn<OSSL_FUNC_keymgmt_gen_cleanup_fn>(&gen_cleanup)},
    {OSSL_FUNC_KEYMGMT_GET_PARAMS, as_fn<OSSL_FUNC_keymgmt_get_params_fn>(&get_params)},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS,
     as_fn<OSSL_FUNC_keymgmt_gettable_params_fn>(&gettable_params)},
    {OSSL_FUNC_KEYMGMT_SET_PARAMS, as_fn<OSSL_FUNC_keymgmt_set_params_fn>(&set_params)},
    {OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS,
     as_fn<OSSL_FUNC_keymgmt_settable_params_fn>(&settable_params)},
    {OSSL_FUNC_KEYMGMT_IMPORT, as_fn<OSSL_FUNC_keymgmt_import_fn>(&import_key)},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, as_fn<OSSL_FUNC_keymgmt_import_types_fn>(&import_types)},
    {OSSL_FUNC_KEYMGMT_EXPORT, as_fn<OSSL_FUNC_keymgmt_export_fn>(&export_key)},
    {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, as_fn<OSSL_FUNC_keymgmt_export_types_fn>(&export_types)},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME,
     as_fn<OSSL_FUNC_keymgmt_query_operation_name_fn>(&query_operation_name)},
    {0, nullptr}};

template <std::size_t... I>
const OSSL_DISPATCH* keymgmt_table(std::size_t group, std::index_sequence<I...>) {
  static const OSSL_DISPATCH* const kTables[] = {Keymgmt<I>::kDispatch...};
  return group < sizeof...(I) ? kTables[group] : nullptr;
}

}  // namespace

const OSSL_DISPATCH* keymgmt_dispatch(std::size_t group) {
  return keymgmt_table(group, std::make_index_sequence<kGroups.size()>{});
}

}  // namespace qkd::prov
