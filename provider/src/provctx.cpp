#include <openssl/crypto.h>

#include <cstdarg>

#include "prov.hpp"
#include "wire.hpp"

namespace qkd::prov {

void LibCtxDeleter::operator()(OSSL_LIB_CTX* c) const { OSSL_LIB_CTX_free(c); }

const OSSL_ITEM* reason_strings() {
  static const OSSL_ITEM kStrings[] = {
      {kReasonUnreachable, const_cast<char*>("key service unreachable")},
      {kReasonTimeout, const_cast<char*>("no key from key service in time")},
      {kReasonRejected, const_cast<char*>("key service refused the request")},
      {kReasonKeyIdUnknown, const_cast<char*>("key_ID unknown at KME")},
      {kReasonBadReply, const_cast<char*>("bad reply from key service")},
      {kReasonMissingSetting, const_cast<char*>("missing qkdprovider setting")},
      {kReasonBadSetting, const_cast<char*>("invalid qkdprovider setting")},
      {kReasonBadShare, const_cast<char*>("malformed qkd key share")},
      {kReasonBadCiphertext, const_cast<char*>("malformed qkd ciphertext")},
      {kReasonAdmission, const_cast<char*>("qkd admission limit reached")},
      {kReasonBufferTooSmall, const_cast<char*>("output buffer too small")},
      {kReasonWrongKey, const_cast<char*>("wrong qkd key for this operation")},
      {kReasonBadGroup, const_cast<char*>("unknown qkd group name")},
      {kReasonInternal, const_cast<char*>("qkdprovider internal error")},
      {0, nullptr},
  };
  return kStrings;
}

namespace {

void call_vset_error(OSSL_FUNC_core_vset_error_fn* vset, const OSSL_CORE_HANDLE* handle,
                     std::uint32_t reason, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vset(handle, reason, fmt, ap);
  va_end(ap);
}

}  // namespace

void ProvCtx::raise(std::uint32_t reason, const char* file, int line, const char* func,
                    const std::string& message) const {
  if (core_.new_error == nullptr || core_.set_error_debug == nullptr || core_.vset_error == nullptr) {
    return;
  }
  core_.new_error(handle_);
  core_.set_error_debug(handle_, file, line, func);
  call_vset_error(core_.vset_error, handle_, reason, "%s", message.c_str());
}

bool ProvCtx::check_settings(Failure* failure, bool need_client) const {
  if (settings_.deferred_error) {
    *failure = {kReasonBadSetting, *settings_.deferred_error};
    return false;
  }
  const auto missing = [&](const char* key, const char* env) {
    *failure = {kReasonMissingSetting,
                std::string("missing setting ") + key + " (set " + key +
                    " in the qkdprovider section of openssl.cnf, or " + env + ")"};
    return false;
  };
  if (settings_.sae_id.empty() && settings_.cert.empty()) {
    return missing("cert", "QKD_CERT");  // needed for the SAE ID when sae_id is unset
  }
  if (!need_client) {
    return true;
  }
  if (settings_.kme_url.empty()) {
    return missing("kme_url", "QKD_KME_URL");
  }
  if (settings_.cert.empty()) {
    return missing("cert", "QKD_CERT");
  }
  if (settings_.key.empty()) {
    return missing("key", "QKD_KEY");
  }
  if (settings_.ca.empty()) {
    return missing("ca", "QKD_CA");
  }
  return true;
}

qkd::core::Result<std::string> ProvCtx::own_sae_id(Failure* failure) {
  const auto fail = [&]() {
    return qkd::core::make_error(qkd::core::ErrorCode::kInvalidArgument, failure->message);
  };
  if (!check_settings(failure, /*need_client=*/false)) {
    return fail();
  }
  {
    std::lock_guard lock(mu_);
    if (!own_sae_.empty()) {
      return own_sae_;
    }
  }
  // Outside the lock (reads a file): two first calls may both read it, to the same end.
  std::string id = settings_.sae_id;
  if (id.empty()) {
    auto cn = qkd::etsi::certificate_common_name(settings_.cert);
    if (!cn.ok()) {
      *failure = {kReasonBadSetting, "sae_id not set and " + cn.error().message};
      return fail();
    }
    id = std::move(cn).value();
  }
  if (!valid_sae_id(id)) {
    *failure = {kReasonBadSetting, "invalid setting sae_id = \"" + id.substr(0, 80) +
                                       "\": must be 1..64 characters of [A-Za-z0-9._-]"};
    return fail();
  }
  std::lock_guard lock(mu_);
  own_sae_ = id;
  return id;
}

qkd::etsi::Client* ProvCtx::client(Failure* failure) {
  if (!check_settings(failure, /*need_client=*/true)) {
    return nullptr;
  }
  {
    std::lock_guard lock(mu_);
    if (client_) {
      return client_.get();
    }
  }
  // Made outside the lock (reads the files): of two made at once, the first kept wins and
  // the other goes (after the lock is released: its destructor frees libssl objects).
  qkd::etsi::ClientConfig config;
  config.kme_url = settings_.kme_url;
  config.cert_file = settings_.cert;
  config.key_file = settings_.key;
  config.ca_file = settings_.ca;
  config.timeout = settings_.timeout;
  auto made = qkd::etsi::Client::create(std::move(config));
  if (!made.ok()) {
    *failure = {kReasonBadSetting, made.error().message};
    return nullptr;
  }
  std::unique_ptr<qkd::etsi::Client> mine = std::move(made).value();
  std::lock_guard lock(mu_);
  if (!client_) {
    client_ = std::move(mine);
  }
  return client_.get();
}

}  // namespace qkd::prov
