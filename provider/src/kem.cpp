// The KEM for the qkd groups (DESIGN decision 1; docs/PROTOCOL.md):
//   server: encapsulate(peer share) -> a key for the SAE in the share: one reserved for the
//           share's client_id, prefetched, or from enc_keys at its own KME (key_cache.hpp);
//           ciphertext = (server SAE ID, key_ID, key_IDs announced to that client_id);
//   client: decapsulate(ciphertext) -> the key for (SAE in the ciphertext, key_ID): fetched
//           ahead after an earlier announcement, or from dec_keys at its own KME
//           (ahead_keys.hpp), which then also fetches what this ciphertext announces;
//   both:   secret = K' = HKDF(key, group, client SAE, nonce, server SAE, key_ID)
//           (binding.hpp).
// Hybrids (x25519_qkd, p256_qkd) add an ephemeral ECDH in front (docs/PROTOCOL.md):
//   server: ciphertext = ephemeral public key || qkd ciphertext,
//   both:   secret = ECDH secret || K'.
// The ECDH runs before the KME call, so a bad point never costs a key.
// Size queries (NULL output) never reach the KME and report non-zero sizes; the
// ciphertext's size is an upper bound (the number of key_IDs announced is known only once
// the key is taken).
#include <openssl/crypto.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "binding.hpp"
#include "keymgmt.hpp"

namespace qkd::prov {
namespace {

struct KemCtx {
  ProvCtx* prov = nullptr;
  QkdKey* key = nullptr;  // owned by the EVP_PKEY, which outlives the operation
  int operation = 0;      // EVP_PKEY_OP_ENCAPSULATE / DECAPSULATE
};
constexpr int kOpEncapsulate = 1;
constexpr int kOpDecapsulate = 2;

// Checks a caller-supplied output buffer; raises "<what> buffer has N bytes, needs M".
bool buffer_fits(const ProvCtx* prov, const char* what, std::size_t have, std::size_t need,
                 const char* qkd_fn) {
  if (have >= need) {
    return true;
  }
  QKD_RAISE(prov, kReasonBufferTooSmall,
            std::string(what) + " buffer has " + std::to_string(have) + " bytes, needs " +
                std::to_string(need));
  return false;
}

// Cleanses a secret buffer on every exit unless the operation succeeded (release()).
class SecretGuard {
 public:
  SecretGuard(unsigned char* secret, std::size_t len) : secret_(secret), len_(len) {}
  ~SecretGuard() {
    if (secret_ != nullptr) {
      OPENSSL_cleanse(secret_, len_);
    }
  }
  SecretGuard(const SecretGuard&) = delete;
  SecretGuard& operator=(const SecretGuard&) = delete;
  void release() { secret_ = nullptr; }

 private:
  unsigned char* secret_;
  std::size_t len_;
};

// Turns a client library error into a raised error with words.
void raise_kme_error(ProvCtx* prov, const qkd::core::Error& e, int operation,
                     const std::string& peer_sae, const std::string& key_id, const char* func) {
  using qkd::core::ErrorCode;
  const std::string ms = std::to_string(prov->settings().timeout.count());
  switch (e.code) {
    case ErrorCode::kUnavailable:
      prov->raise(kReasonUnreachable, __FILE__, __LINE__, func, e.message);
      return;
    case ErrorCode::kTimeout:
      prov->raise(kReasonTimeout, __FILE__, __LINE__, func,
                  "no key for SAE " + peer_sae + " after " + ms + " ms (" + e.message + ")");
      return;
    case ErrorCode::kRejected:
      if (operation == kOpDecapsulate && qkd::etsi::rejected_http_status(e) == 400) {
        prov->raise(kReasonKeyIdUnknown, __FILE__, __LINE__, func,
                    "key_ID unknown at KME: " + key_id + " from SAE " + peer_sae + " (" +
                        e.message + ")");
      } else if (operation == kOpEncapsulate) {
        prov->raise(kReasonRejected, __FILE__, __LINE__, func,
                    "no key for SAE " + peer_sae + ": " + e.message);
      } else {
        prov->raise(kReasonRejected, __FILE__, __LINE__, func,
                    "key " + key_id + " from SAE " + peer_sae + " refused: " + e.message);
      }
      return;
    case ErrorCode::kProtocol:
      prov->raise(kReasonBadReply, __FILE__, __LINE__, func, e.message);
      return;
    case ErrorCode::kInvalidArgument:
      prov->raise(kReasonBadSetting, __FILE__, __LINE__, func, e.message);
      return;
    default:
      prov->raise(kReasonInternal, __FILE__, __LINE__, func, e.message);
      return;
  }
}

template <std::size_t G>
struct Kem {
  static OSSL_FUNC_kem_newctx_fn newctx;
  static OSSL_FUNC_kem_freectx_fn freectx;
  static OSSL_FUNC_kem_dupctx_fn dupctx;
  static OSSL_FUNC_kem_encapsulate_init_fn encapsulate_init;
  static OSSL_FUNC_kem_encapsulate_fn encapsulate;
  static OSSL_FUNC_kem_decapsulate_init_fn decapsulate_init;
  static OSSL_FUNC_kem_decapsulate_fn decapsulate;

  static constexpr Classical kClassical = kGroups[G].classical;
  static constexpr std::size_t kClassicalPublic = classical_public_length(kClassical);
  static constexpr std::size_t kClassicalSecret = classical_secret_length(kClassical);
  static constexpr std::size_t kQkdBytes = kGroups[G].qkd_key_bits / 8;
  static constexpr std::size_t kSecretBytes = kClassicalSecret + kQkdBytes;
  static const OSSL_DISPATCH kDispatch[];
};

template <std::size_t G>
void* Kem<G>::newctx(void* provctx) {
  auto* prov = static_cast<ProvCtx*>(provctx);
  return guarded<void*>(prov, nullptr, __func__, [&]() -> void* {
    auto* ctx = new KemCtx;
    ctx->prov = prov;
    return ctx;
  });
}

template <std::size_t G>
void Kem<G>::freectx(void* vctx) {
  delete static_cast<KemCtx*>(vctx);
}

template <std::size_t G>
void* Kem<G>::dupctx(void* vctx) {
  const auto* ctx = static_cast<const KemCtx*>(vctx);
  if (ctx == nullptr) {
    return nullptr;
  }
  return guarded<void*>(ctx->prov, nullptr, __func__, [&]() -> void* { return new KemCtx(*ctx); });
}

template <std::size_t G>
int Kem<G>::encapsulate_init(void* vctx, void* provkey, const OSSL_PARAM* /*params*/) {
  QKD_ENTRY();
  auto* ctx = static_cast<KemCtx*>(vctx);
  auto* key = static_cast<QkdKey*>(provkey);
  if (ctx == nullptr) {
    return 0;
  }
  if (key == nullptr || key->group != G || !key->has_share || key->own) {
    QKD_RAISE(ctx->prov, kReasonWrongKey,
              "encapsulation needs a key holding the peer's qkd share");
    return 0;
  }
  ctx->key = key;
  ctx->operation = kOpEncapsulate;
  return 1;
}

template <std::size_t G>
int Kem<G>::encapsulate(void* vctx, unsigned char* out, std::size_t* outlen,
                        unsigned char* secret, std::size_t* secretlen) {
  QKD_ENTRY();
  auto* ctx = static_cast<KemCtx*>(vctx);
  if (ctx == nullptr) {
    return 0;
  }
  ProvCtx* prov = ctx->prov;
  return guarded<int>(prov, 0, __func__, [&] {
    // One deadline for the whole operation: every KME call and wait below ends by it, so
    // that a retry never adds a timeout of its own (timeout_ms bounds the handshake step).
    const auto deadline = KeyCache::Clock::now() + prov->settings().timeout;
    if (ctx->operation != kOpEncapsulate || ctx->key == nullptr) {
      QKD_RAISE(prov, kReasonWrongKey, "encapsulate called without encapsulate_init");
      return 0;
    }
    Failure failure;
    auto own = prov->own_sae_id(&failure);
    if (!own.ok()) {
      QKD_RAISE(prov, failure.reason, failure.message);
      return 0;
    }
    const std::size_t max_ahead =
        ctx->key->client_id ? std::min<std::size_t>(prov->settings().prefetch.announce, kMaxAhead)
                            : 0;
    const std::size_t max_ct_len = kClassicalPublic + ciphertext_length(own->size(), max_ahead);
    if (out == nullptr) {  // size query: no KME work
      if (outlen == nullptr && secretlen == nullptr) {
        QKD_RAISE(prov, kReasonBufferTooSmall, "size query without length pointers");
        return 0;
      }
      if (outlen != nullptr) {
        *outlen = max_ct_len;
      }
      if (secretlen != nullptr) {
        *secretlen = kSecretBytes;
      }
      return 1;
    }
    if (outlen == nullptr || secret == nullptr || secretlen == nullptr) {
      QKD_RAISE(prov, kReasonBufferTooSmall, "no buffer for the shared secret");
      return 0;
    }
    if (!buffer_fits(prov, "ciphertext", *outlen, max_ct_len, qkd_fn)) {
      return 0;
    }
    if (!buffer_fits(prov, "secret", *secretlen, kSecretBytes, qkd_fn)) {
      return 0;
    }
    // One exit path for the secret: cleansed unless everything below succeeds.
    SecretGuard guard(secret, kSecretBytes);
    std::vector<std::uint8_t> ciphertext;
    if constexpr (kClassical != Classical::kNone) {
      if (!ctx->key->classical) {
        QKD_RAISE(prov, kReasonWrongKey, "the peer's key has no classical public key");
        return 0;
      }
      auto eph = classical_generate(prov->methods(), kClassical);
      if (!eph.ok()) {
        QKD_RAISE(prov, kReasonInternal, eph.error().message);
        return 0;
      }
      auto pub = classical_public(eph->get(), kClassical);
      if (!pub.ok()) {
        QKD_RAISE(prov, kReasonInternal, pub.error().message);
        return 0;
      }
      auto dh = classical_derive(prov->libctx(), kClassical, eph->get(), ctx->key->classical.get(),
                                 std::span<std::uint8_t>(secret, kClassicalSecret));
      if (!dh.ok()) {
        QKD_RAISE(prov, kReasonBadShare, "malformed qkd key share: " + dh.error().message);
        return 0;
      }
      ciphertext = std::move(pub).value();
    }
    const std::string& peer = ctx->key->peer_sae_id;
    qkd::etsi::Client* client = prov->client(&failure);
    if (client == nullptr) {
      QKD_RAISE(prov, failure.reason, failure.message);
      return 0;
    }
    // The ticket releases the slot when the encapsulation is over, however it ends.
    const auto ticket = prov->admission().acquire(peer, Admission::Clock::now());
    if (!ticket.ok()) {
      QKD_RAISE(prov, kReasonAdmission, ticket.error().message);
      return 0;
    }
    // A key reserved for the share's client_id, else a prefetched one for this client SAE,
    // else one enc_keys call (which may fetch a batch for the following handshakes:
    // key_cache.hpp). The fetch may also run later on the cache's refill thread, so it
    // captures by value (the client lives until the provider context has joined that thread).
    const ClientId* client_id = ctx->key->client_id ? &*ctx->key->client_id : nullptr;
    auto key = prov->key_cache().take(
        peer, client_id, kQkdBytes, KeyCache::Clock::now(), deadline,
        [client, peer](std::uint32_t number, qkd::etsi::Deadline until) {
          return client->enc_keys(peer, number, kGroups[G].qkd_key_bits, until);
        });
    if (!key.ok()) {
      raise_kme_error(prov, key.error(), kOpEncapsulate, peer, "", qkd_fn);
      return 0;
    }
    auto ct = encode_ciphertext(Ciphertext{own.value(), key->key_id, std::move(key->ahead)});
    if (!ct.ok()) {
      QKD_RAISE(prov, kReasonInternal, "cannot encode the ciphertext: " + ct.error().message);
      return 0;
    }
    ciphertext.insert(ciphertext.end(), ct->begin(), ct->end());
    if (ciphertext.size() > max_ct_len) {
      QKD_RAISE(prov, kReasonInternal, "cannot encode the ciphertext");
      return 0;
    }
    const Binding binding{kGroups[G].tls_name, peer, &ctx->key->nonce, own.value(),
                          &key->key_id};
    if (auto bound = derive_bound_key(prov->methods(),
                                      std::span<std::uint8_t>(secret + kClassicalSecret, kQkdBytes),
                                      key->key.span(), binding);
        !bound.ok()) {
      QKD_RAISE(prov, kReasonInternal, bound.error().message);
      return 0;
    }
    // Nothing can fail from here on.
    std::memcpy(out, ciphertext.data(), ciphertext.size());
    *outlen = ciphertext.size();
    *secretlen = kSecretBytes;
    guard.release();
    return 1;
  });
}

template <std::size_t G>
int Kem<G>::decapsulate_init(void* vctx, void* provkey, const OSSL_PARAM* /*params*/) {
  QKD_ENTRY();
  auto* ctx = static_cast<KemCtx*>(vctx);
  auto* key = static_cast<QkdKey*>(provkey);
  if (ctx == nullptr) {
    return 0;
  }
  if (key == nullptr || key->group != G || !key->own) {
    QKD_RAISE(ctx->prov, kReasonWrongKey, "decapsulation needs this SAE's own qkd key share");
    return 0;
  }
  ctx->key = key;
  ctx->operation = kOpDecapsulate;
  return 1;
}

template <std::size_t G>
int Kem<G>::decapsulate(void* vctx, unsigned char* out, std::size_t* outlen,
                        const unsigned char* in, std::size_t inlen) {
  QKD_ENTRY();
  auto* ctx = static_cast<KemCtx*>(vctx);
  if (ctx == nullptr) {
    return 0;
  }
  ProvCtx* prov = ctx->prov;
  return guarded<int>(prov, 0, __func__, [&] {
    // One deadline for the whole operation, as in encapsulate.
    const auto deadline = AheadKeys::Clock::now() + prov->settings().timeout;
    if (ctx->operation != kOpDecapsulate || ctx->key == nullptr || outlen == nullptr) {
      QKD_RAISE(prov, kReasonWrongKey, "decapsulate called without decapsulate_init");
      return 0;
    }
    // Parse before anything else: the framing (all a size query checks), then the hybrid's
    // classical point, then the key; a bad ciphertext never reaches the KME.
    const auto bytes = std::span<const std::uint8_t>(in, in == nullptr ? 0 : inlen);
    if (bytes.size() < kClassicalPublic) {
      QKD_RAISE(prov, kReasonBadCiphertext,
                "malformed qkd ciphertext: " + std::to_string(bytes.size()) +
                    " bytes, shorter than the " + classical_name(kClassical) + " public key (" +
                    std::to_string(kClassicalPublic) + ")");
      return 0;
    }
    auto ct = parse_ciphertext(bytes.subspan(kClassicalPublic));
    if (!ct.ok()) {
      QKD_RAISE(prov, kReasonBadCiphertext, ct.error().message);
      return 0;
    }
    if (!ct->ahead.empty() && !ctx->key->client_id) {
      QKD_RAISE(prov, kReasonBadCiphertext,
                "malformed qkd ciphertext: key_IDs announced to a key share without client_id");
      return 0;
    }
    if (out == nullptr) {  // size query (libssl makes one before each decapsulation): no
      *outlen = kSecretBytes;  // KME work, no point import; the real call checks everything
      return 1;
    }
    PkeyPtr peer_classical;
    if constexpr (kClassical != Classical::kNone) {
      auto peer = classical_import_peer(prov->methods(), kClassical,
                                        bytes.first(kClassicalPublic));
      if (!peer.ok()) {
        QKD_RAISE(prov, kReasonBadCiphertext, "malformed qkd ciphertext: " + peer.error().message);
        return 0;
      }
      peer_classical = std::move(peer).value();
    }
    if (!buffer_fits(prov, "secret", *outlen, kSecretBytes, qkd_fn)) {
      return 0;
    }
    SecretGuard guard(out, kSecretBytes);
    if constexpr (kClassical != Classical::kNone) {
      if (!ctx->key->classical) {
        QKD_RAISE(prov, kReasonWrongKey, "the key has no classical key pair");
        return 0;
      }
      auto dh = classical_derive(prov->libctx(), kClassical, ctx->key->classical.get(),
                                 peer_classical.get(), std::span<std::uint8_t>(out, kClassicalSecret));
      if (!dh.ok()) {
        QKD_RAISE(prov, kReasonBadCiphertext, "malformed qkd ciphertext: " + dh.error().message);
        return 0;
      }
    }
    Failure failure;
    qkd::etsi::Client* client = prov->client(&failure);
    if (client == nullptr) {
      QKD_RAISE(prov, failure.reason, failure.message);
      return 0;
    }
    // The key fetched ahead when an earlier ciphertext announced it, else one dec_keys call
    // (with the key_IDs this ciphertext announces). The fetch of announced keys may run on
    // another thread after this returns, so it captures by value (the client lives until
    // the provider context has joined that thread).
    auto key = prov->ahead_keys().take(
        ct->sae_id, ct->key_id, ct->ahead, ctx->key->client_id, kQkdBytes,
        AheadKeys::Clock::now(), deadline,
        [client](const std::string& master, std::span<const std::string> ids,
                 qkd::etsi::Deadline until) { return client->dec_keys(master, ids, until); });
    if (!key.ok()) {
      raise_kme_error(prov, key.error(), kOpDecapsulate, ct->sae_id, uuid_format(ct->key_id),
                      qkd_fn);
      return 0;
    }
    auto own = prov->own_sae_id(&failure);
    if (!own.ok()) {
      QKD_RAISE(prov, failure.reason, failure.message);
      return 0;
    }
    const Binding binding{kGroups[G].tls_name, own.value(), &ctx->key->nonce, ct->sae_id,
                          &ct->key_id};
    if (auto bound = derive_bound_key(prov->methods(),
                                      std::span<std::uint8_t>(out + kClassicalSecret, kQkdBytes),
                                      key->span(), binding);
        !bound.ok()) {
      QKD_RAISE(prov, kReasonInternal, bound.error().message);
      return 0;
    }
    *outlen = kSecretBytes;
    guard.release();
    return 1;
  });
}

template <std::size_t G>
const OSSL_DISPATCH Kem<G>::kDispatch[] = {
    {OSSL_FUNC_KEM_NEWCTX, as_fn<OSSL_FUNC_kem_newctx_fn>(&newctx)},
    {OSSL_FUNC_KEM_FREECTX, as_fn<OSSL_FUNC_kem_freectx_fn>(&freectx)},
    {OSSL_FUNC_KEM_DUPCTX, as_fn<OSSL_FUNC_kem_dupctx_fn>(&dupctx)},
    {OSSL_FUNC_KEM_ENCAPSULATE_INIT, as_fn<OSSL_FUNC_kem_encapsulate_init_fn>(&encapsulate_init)},
    {OSSL_FUNC_KEM_ENCAPSULATE, as_fn<OSSL_FUNC_kem_encapsulate_fn>(&encapsulate)},
    {OSSL_FUNC_KEM_DECAPSULATE_INIT, as_fn<OSSL_FUNC_kem_decapsulate_init_fn>(&decapsulate_init)},
    {OSSL_FUNC_KEM_DECAPSULATE, as_fn<OSSL_FUNC_kem_decapsulate_fn>(&decapsulate)},
    {0, nullptr}};

template <std::size_t... I>
const OSSL_DISPATCH* kem_table(std::size_t group, std::index_sequence<I...>) {
  static const OSSL_DISPATCH* const kTables[] = {Kem<I>::kDispatch...};
  return group < sizeof...(I) ? kTables[group] : nullptr;
}

}  // namespace

const OSSL_DISPATCH* kem_dispatch(std::size_t group) {
  return kem_table(group, std::make_index_sequence<kGroups.size()>{});
}

}  // namespace qkd::prov
