// The provider context (one per loaded instance: each OSSL_LIB_CTX that loads qkdprovider
// gets its own), the core's error upcalls, and the helpers every entry point uses.
#pragma once

#include <openssl/core.h>
#include <openssl/core_dispatch.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "admission.hpp"
#include "ahead_keys.hpp"
#include "fork_guard.hpp"
#include "key_cache.hpp"
#include "methods.hpp"
#include "qkd/core/result.hpp"
#include "qkd/etsi/client.hpp"
#include "settings.hpp"

namespace qkd::prov {

// Reason codes registered with the core (get_reason_strings). The text of each is the
// fixed part; the details (URL, SAE ID, key_ID) travel as the error's data string.
enum Reason : std::uint32_t {
  kReasonUnreachable = 1,
  kReasonTimeout,
  kReasonRejected,
  kReasonKeyIdUnknown,
  kReasonBadReply,
  kReasonMissingSetting,
  kReasonBadSetting,
  kReasonBadShare,
  kReasonBadCiphertext,
  kReasonAdmission,
  kReasonBufferTooSmall,
  kReasonWrongKey,
  kReasonBadGroup,
  kReasonInternal,
};
const OSSL_ITEM* reason_strings();

struct CoreUpcalls {
  OSSL_FUNC_core_new_error_fn* new_error = nullptr;
  OSSL_FUNC_core_set_error_debug_fn* set_error_debug = nullptr;
  OSSL_FUNC_core_vset_error_fn* vset_error = nullptr;
};

// A failure to report: reason code + full message.
struct Failure {
  std::uint32_t reason = kReasonInternal;
  std::string message;
};

struct LibCtxDeleter {
  void operator()(OSSL_LIB_CTX* c) const;
};
using LibCtxPtr = std::unique_ptr<OSSL_LIB_CTX, LibCtxDeleter>;

// mu_ guards two values made once; it is never held across I/O or a call out, and is taken
// around fork() (ForkGuarded), so that a child forked while another thread holds it does
// not block at its first handshake.
class ProvCtx final : public ForkGuarded {
 public:
  // `libctx`: the provider's own library context, a child of the application's
  // (OSSL_LIB_CTX_new_child), for the classical half of the hybrids. May be null (the
  // error reporter in OSSL_provider_init); the hybrids then fail with a reason.
  ProvCtx(const OSSL_CORE_HANDLE* handle, CoreUpcalls core, Settings settings,
          LibCtxPtr libctx = nullptr)
      : ForkGuarded(mu_), handle_(handle), core_(core), settings_(std::move(settings)),
        admission_(settings_.admission), key_cache_(settings_.prefetch),
        ahead_keys_(settings_.ahead), libctx_(std::move(libctx)), methods_(libctx_.get()) {
    guard_forks();
  }
  // The prefetch's refill thread and the fetch of announced keys use the ETSI client: stop
  // them before client_ goes.
  ~ProvCtx() {
    unguard_forks();
    key_cache_.stop_soon();  // both threads stop at once, then are waited for
    ahead_keys_.stop_soon();
    key_cache_.shutdown();
    ahead_keys_.shutdown();
  }
  ProvCtx(const ProvCtx&) = delete;
  ProvCtx& operator=(const ProvCtx&) = delete;
  [[nodiscard]] const Settings& settings() const { return settings_; }
  [[nodiscard]] OSSL_LIB_CTX* libctx() const { return libctx_.get(); }
  [[nodiscard]] Admission& admission() { return admission_; }
  [[nodiscard]] KeyCache& key_cache() { return key_cache_; }
  [[nodiscard]] AheadKeys& ahead_keys() { return ahead_keys_; }
  // HKDF and P-256 parameters from libctx(), made once (methods.hpp).
  [[nodiscard]] CryptoMethods& methods() { return methods_; }

  // This SAE's ID: the sae_id setting, else the CN of the cert setting (read once, lazily).
  [[nodiscard]] qkd::core::Result<std::string> own_sae_id(Failure* failure);
  // The ETSI 014 client, made at first use (reads the cert/key/CA files then); a failure is
  // not remembered, so a fixed file is picked up by the next handshake.
  [[nodiscard]] qkd::etsi::Client* client(Failure* failure);

  // Raises an OpenSSL error through the core (never prints).
  void raise(std::uint32_t reason, const char* file, int line, const char* func,
             const std::string& message) const;

 private:
  [[nodiscard]] bool check_settings(Failure* failure, bool need_client) const;

  const OSSL_CORE_HANDLE* handle_;
  CoreUpcalls core_;
  const Settings settings_;
  Admission admission_;
  KeyCache key_cache_;  // server side: prefetched keys per client SAE
  AheadKeys ahead_keys_;  // client side: keys announced by servers
  LibCtxPtr libctx_;
  CryptoMethods methods_;  // after libctx_: made from it, freed before it
  std::mutex mu_;
  std::string own_sae_;                       // guarded by mu_
  std::unique_ptr<qkd::etsi::Client> client_;  // guarded by mu_; thread-safe itself
};

// Entry points start with QKD_ENTRY so that errors raised inside their guarded lambdas
// name the entry point ("encapsulate"), not "operator()".
#define QKD_ENTRY() const char* const qkd_fn = __func__
#define QKD_RAISE(prov, reason, message) \
  (prov)->raise((reason), __FILE__, __LINE__, qkd_fn, (message))

// Runs `body` and turns any exception into a raised error: nothing crosses the C ABI.
template <typename R, typename F>
R guarded(const ProvCtx* prov, R on_failure, const char* func, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    if (prov != nullptr) {
      prov->raise(kReasonInternal, __FILE__, __LINE__, func, "out of memory");
    }
  } catch (const std::exception& e) {
    if (prov != nullptr) {
      prov->raise(kReasonInternal, __FILE__, __LINE__, func, e.what());
    }
  } catch (...) {
    if (prov != nullptr) {
      prov->raise(kReasonInternal, __FILE__, __LINE__, func, "unexpected exception");
    }
  }
  return on_failure;
}

// Type-checked dispatch entries: as_fn<OSSL_FUNC_kem_newctx_fn>(&f) does not compile
// unless f has exactly that signature.
template <typename Fn>
void (*as_fn(Fn* f))(void) {
  return reinterpret_cast<void (*)(void)>(f);
}

// Dispatch tables per group row (templates instantiated for every row of kGroups).
const OSSL_DISPATCH* keymgmt_dispatch(std::size_t group);
const OSSL_DISPATCH* kem_dispatch(std::size_t group);

}  // namespace qkd::prov
