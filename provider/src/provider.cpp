// qkdprovider's entry point: configuration, algorithm tables, TLS-GROUP capabilities.
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <openssl/prov_ssl.h>

#include <cstdlib>
#include <cstring>
#include <strings.h>
#include <utility>
#include <vector>

#include "groups.hpp"
#include "prov.hpp"

namespace qkd::prov {
namespace {

constexpr const char* kProviderName = "qkdprovider";
constexpr const char* kProperties = "provider=qkdprovider";
constexpr const char* kVersion = "0.1.0";

static OSSL_FUNC_provider_teardown_fn provider_teardown;
static OSSL_FUNC_provider_gettable_params_fn provider_gettable_params;
static OSSL_FUNC_provider_get_params_fn provider_get_params;
static OSSL_FUNC_provider_query_operation_fn provider_query_operation;
static OSSL_FUNC_provider_get_reason_strings_fn provider_get_reason_strings;
static OSSL_FUNC_provider_get_capabilities_fn provider_get_capabilities;

void provider_teardown(void* provctx) {
  guarded<int>(nullptr, 0, __func__, [&] {
    delete static_cast<ProvCtx*>(provctx);
    return 1;
  });
}

const OSSL_PARAM* provider_gettable_params(void* /*provctx*/) {
  static const OSSL_PARAM kTable[] = {
      OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, nullptr, 0),
      OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, nullptr, 0),
      OSSL_PARAM_DEFN(OSSL_PROV_PARAM_BUILDINFO, OSSL_PARAM_UTF8_PTR, nullptr, 0),
      OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, nullptr, 0),
      OSSL_PARAM_END};
  return kTable;
}

int provider_get_params(void* /*provctx*/, OSSL_PARAM params[]) {
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != nullptr && OSSL_PARAM_set_utf8_ptr(p, "QKD provider (ETSI GS QKD 014 keys)") == 0) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != nullptr && OSSL_PARAM_set_utf8_ptr(p, kVersion) == 0) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
  if (p != nullptr && OSSL_PARAM_set_utf8_ptr(p, kVersion) == 0) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  if (p != nullptr && OSSL_PARAM_set_int(p, 1) == 0) {
    return 0;
  }
  return 1;
}

// One OSSL_ALGORITHM per group row (the keymgmt and the KEM share the row's name), made on
// first use from kGroups; the dispatch tables are templates instantiated per row.
template <const OSSL_DISPATCH* (*Dispatch)(std::size_t)>
const OSSL_ALGORITHM* algorithms(const char* description) {
  static const std::vector<OSSL_ALGORITHM> table = [&] {
    std::vector<OSSL_ALGORITHM> t;
    for (std::size_t i = 0; i < kGroups.size(); ++i) {
      t.push_back({kGroups[i].algorithm.data(), kProperties, Dispatch(i), description});
    }
    t.push_back({nullptr, nullptr, nullptr, nullptr});
    return t;
  }();
  return table.data();
}

const OSSL_ALGORITHM* provider_query_operation(void* /*provctx*/, int operation_id,
                                               int* no_cache) {
  return guarded<const OSSL_ALGORITHM*>(nullptr, nullptr, __func__, [&]() -> const OSSL_ALGORITHM* {
    *no_cache = 0;
    switch (operation_id) {
      case OSSL_OP_KEYMGMT:
        return algorithms<keymgmt_dispatch>("QKD key share (client SAE ID + nonce)");
      case OSSL_OP_KEM:
        return algorithms<kem_dispatch>("QKD KEM: key from an ETSI GS QKD 014 KME");
      default:
        return nullptr;
    }
  });
}

const OSSL_ITEM* provider_get_reason_strings(void* /*provctx*/) { return reason_strings(); }

int provider_get_capabilities(void* provctx, const char* capability, OSSL_CALLBACK* cb,
                              void* arg) {
  const auto* prov = static_cast<const ProvCtx*>(provctx);
  return guarded<int>(prov, 0, __func__, [&] {
    if (capability == nullptr || strcasecmp(capability, "TLS-GROUP") != 0) {
      return 0;
    }
    for (std::size_t i = 0; i < kGroups.size(); ++i) {
      const GroupInfo& g = kGroups[i];
      unsigned int group_id = prov->settings().codepoints[i];
      unsigned int security_bits = g.security_bits;
      unsigned int is_kem = 1;
      int min_tls = TLS1_3_VERSION;  // a KEM group exists only in TLS 1.3
      int max_tls = 0;
      int min_dtls = -1;             // no DTLS
      int max_dtls = -1;
      // The names come from string literals (NUL-terminated), which libssl copies.
      const OSSL_PARAM params[] = {
          OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME, const_cast<char*>(g.tls_name.data()),
                                 g.tls_name.size()),
          OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME_INTERNAL,
                                 const_cast<char*>(g.internal_name.data()), g.internal_name.size()),
          OSSL_PARAM_utf8_string(OSSL_CAPABILITY_TLS_GROUP_ALG, const_cast<char*>(g.algorithm.data()),
                                 g.algorithm.size()),
          OSSL_PARAM_uint(OSSL_CAPABILITY_TLS_GROUP_ID, &group_id),
          OSSL_PARAM_uint(OSSL_CAPABILITY_TLS_GROUP_SECURITY_BITS, &security_bits),
          OSSL_PARAM_uint(OSSL_CAPABILITY_TLS_GROUP_IS_KEM, &is_kem),
          OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MIN_TLS, &min_tls),
          OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MAX_TLS, &max_tls),
          OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MIN_DTLS, &min_dtls),
          OSSL_PARAM_int(OSSL_CAPABILITY_TLS_GROUP_MAX_DTLS, &max_dtls),
          OSSL_PARAM_END};
      if (cb(params, arg) == 0) {
        return 0;
      }
    }
    return 1;
  });
}

const OSSL_DISPATCH kProviderDispatch[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, as_fn<OSSL_FUNC_provider_teardown_fn>(&provider_teardown)},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS,
     as_fn<OSSL_FUNC_provider_gettable_params_fn>(&provider_gettable_params)},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, as_fn<OSSL_FUNC_provider_get_params_fn>(&provider_get_params)},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION,
     as_fn<OSSL_FUNC_provider_query_operation_fn>(&provider_query_operation)},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS,
     as_fn<OSSL_FUNC_provider_get_reason_strings_fn>(&provider_get_reason_strings)},
    {OSSL_FUNC_PROVIDER_GET_CAPABILITIES,
     as_fn<OSSL_FUNC_provider_get_capabilities_fn>(&provider_get_capabilities)},
    {0, nullptr}};

// Reads the provider's openssl.cnf section through the core, then the QKD_* environment
// overrides. Copies strings only: no file, socket or thread here (DESIGN decision 3).
RawSettings read_raw_settings(const OSSL_CORE_HANDLE* handle,
                              OSSL_FUNC_core_get_params_fn* get_params) {
  std::vector<std::string> keys;
  for (const auto& s : kSettings) {
    keys.emplace_back(s.key);
  }
  for (const auto& g : kGroups) {
    keys.emplace_back(g.codepoint_setting);
  }
  std::vector<const char*> values(keys.size(), nullptr);
  std::vector<OSSL_PARAM> params;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    params.push_back(OSSL_PARAM_utf8_ptr(keys[i].c_str(), const_cast<char**>(&values[i]), 0));
  }
  params.push_back(OSSL_PARAM_END);
  RawSettings raw;
  if (get_params != nullptr && get_params(handle, params.data()) != 0) {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (values[i] != nullptr) {
        raw[keys[i]] = values[i];
      }
    }
  }
  for (const auto& s : kSettings) {
    if (s.env != nullptr) {
      // secure_getenv: a set-uid host must not take key paths from its caller.
      if (const char* v = secure_getenv(s.env); v != nullptr && *v != '\0') {
        raw[s.key] = v;
      }
    }
  }
  return raw;
}

}  // namespace
}  // namespace qkd::prov

extern "C" __attribute__((visibility("default"))) int OSSL_provider_init(
    const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in, const OSSL_DISPATCH** out,
    void** provctx) {
  using namespace qkd::prov;
  CoreUpcalls core;
  OSSL_FUNC_core_get_params_fn* get_params = nullptr;
  const OSSL_DISPATCH* const in_table = in;
  for (; in != nullptr && in->function_id != 0; ++in) {
    switch (in->function_id) {
      case OSSL_FUNC_CORE_GET_PARAMS:
        get_params = OSSL_FUNC_core_get_params(in);
        break;
      case OSSL_FUNC_CORE_NEW_ERROR:
        core.new_error = OSSL_FUNC_core_new_error(in);
        break;
      case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
        core.set_error_debug = OSSL_FUNC_core_set_error_debug(in);
        break;
      case OSSL_FUNC_CORE_VSET_ERROR:
        core.vset_error = OSSL_FUNC_core_vset_error(in);
        break;
      default:
        break;
    }
  }
  QKD_ENTRY();
  // A context only to raise errors with before the real one exists.
  const ProvCtx reporter(handle, core, Settings{});
  return guarded<int>(&reporter, 0, "OSSL_provider_init", [&] {
    auto settings = resolve_settings(read_raw_settings(handle, get_params));
    if (!settings.ok()) {
      QKD_RAISE(&reporter, kReasonBadSetting, settings.error().message);
      return 0;
    }
    // The hybrids' ECDH runs in a child of the application's library context: it sees the
    // same providers (X25519 and P-256 come from default or FIPS, never from us), and no
    // global state is touched. Making it costs no I/O.
    LibCtxPtr libctx(OSSL_LIB_CTX_new_child(handle, in_table));
    if (!libctx) {
      QKD_RAISE(&reporter, kReasonInternal, "cannot create the provider's library context");
      return 0;
    }
    auto ctx = std::make_unique<ProvCtx>(handle, core, std::move(settings).value(),
                                         std::move(libctx));
    *out = kProviderDispatch;
    *provctx = ctx.release();
    return 1;
  });
}
