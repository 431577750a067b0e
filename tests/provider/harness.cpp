#include "harness.hpp"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/provider.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace qkd::test_prov {

std::string make_temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  const auto dir = std::filesystem::path(QKD_TEST_TMP) /
                   (tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

bool make_pki(const std::string& dir) {
  const std::string cmd = std::string("bash '") + QKD_PKI_SCRIPT + "' '" + dir + "' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

std::string write_provider_config(const std::string& path,
                                  const std::map<std::string, std::string>& settings) {
  std::ofstream out(path);
  out << "openssl_conf = openssl_init\n"
         "[openssl_init]\n"
         "providers = provider_sect\n"
         "[provider_sect]\n"
         "default = default_sect\n"
         "qkdprovider = qkd_sect\n"
         "[default_sect]\n"
         "activate = 1\n"
         "[qkd_sect]\n"
         "module = " QKD_MODULE_DIR "/qkdprovider.so\n"
         "activate = 1\n";
  for (const auto& [k, v] : settings) {
    out << k << " = " << v << "\n";
  }
  return path;
}

LibCtxPtr load_libctx(const std::string& config) {
  LibCtxPtr ctx(OSSL_LIB_CTX_new());
  if (!ctx || OSSL_LIB_CTX_load_config(ctx.get(), config.c_str()) != 1) {
    return nullptr;
  }
  return ctx;
}

namespace {

SslCtxPtr make_ctx(OSSL_LIB_CTX* libctx, const SSL_METHOD* method, const std::string& groups) {
  SslCtxPtr ctx(SSL_CTX_new_ex(libctx, nullptr, method));
  if (!ctx) {
    return nullptr;
  }
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_3_VERSION) != 1 ||
      SSL_CTX_set1_groups_list(ctx.get(), groups.c_str()) != 1) {
    return nullptr;
  }
  return ctx;
}

}  // namespace

SslCtxPtr make_server_ctx(OSSL_LIB_CTX* libctx, const std::string& groups,
                          const std::string& cert, const std::string& key) {
  auto ctx = make_ctx(libctx, TLS_server_method(), groups);
  if (!ctx || SSL_CTX_use_certificate_chain_file(ctx.get(), cert.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx.get(), key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return nullptr;
  }
  return ctx;
}

SslCtxPtr make_client_ctx(OSSL_LIB_CTX* libctx, const std::string& groups,
                          const std::string& ca) {
  auto ctx = make_ctx(libctx, TLS_client_method(), groups);
  if (!ctx || SSL_CTX_load_verify_locations(ctx.get(), ca.c_str(), nullptr) != 1) {
    return nullptr;
  }
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  return ctx;
}

std::string drain_errors() {
  std::string out;
  const char* data = nullptr;
  int flags = 0;
  unsigned long code = 0;
  while ((code = ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags)) != 0) {
    const char* lib = ERR_lib_error_string(code);
    const char* reason = ERR_reason_error_string(code);
    out += std::string(lib != nullptr ? lib : "?") + ":" + (reason != nullptr ? reason : "?");
    if (data != nullptr && (flags & ERR_TXT_STRING) != 0) {
      out += std::string(":") + data;
    }
    out += "\n";
  }
  return out;
}

std::vector<AdvertisedGroup> advertised_groups() {
  std::vector<AdvertisedGroup> out;
  LibCtxPtr lib(OSSL_LIB_CTX_new());
  if (!lib || OSSL_PROVIDER_set_default_search_path(lib.get(), QKD_MODULE_DIR) != 1) {
    return out;
  }
  OSSL_PROVIDER* prov = OSSL_PROVIDER_load(lib.get(), "qkdprovider");
  if (prov == nullptr) {
    ERR_clear_error();
    return out;
  }
  const auto collect = [](const OSSL_PARAM params[], void* arg) -> int {
    AdvertisedGroup g;
    const char* name = nullptr;
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_NAME);
    if (p == nullptr || OSSL_PARAM_get_utf8_string_ptr(p, &name) != 1) {
      return 0;
    }
    g.name = name;
    OSSL_PARAM_get_uint(OSSL_PARAM_locate_const(params, OSSL_CAPABILITY_TLS_GROUP_ID),
                        &g.codepoint);
    static_cast<std::vector<AdvertisedGroup>*>(arg)->push_back(std::move(g));
    return 1;
  };
  OSSL_PROVIDER_get_capabilities(prov, "TLS-GROUP", collect, &out);
  OSSL_PROVIDER_unload(prov);
  return out;
}

Handshake handshake(SSL_CTX* client_ctx, SSL_CTX* server_ctx) {
  using Clock = std::chrono::steady_clock;
  Handshake h;
  // Runs `step` and adds its duration to `*ms`.
  const auto timed = [](double* ms, auto&& step) {
    const auto t0 = Clock::now();
    auto r = step();
    *ms += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    return r;
  };
  h.client.reset(timed(&h.client_ms, [&] { return SSL_new(client_ctx); }));
  h.server.reset(timed(&h.server_ms, [&] { return SSL_new(server_ctx); }));
  BIO* cbio = nullptr;
  BIO* sbio = nullptr;
  BIO_new_bio_pair(&cbio, 0, &sbio, 0);
  SSL_set_bio(h.client.get(), cbio, cbio);
  SSL_set_bio(h.server.get(), sbio, sbio);
  SSL_set_connect_state(h.client.get());
  SSL_set_accept_state(h.server.get());
  SSL_set_tlsext_host_name(h.client.get(), "localhost");
  SSL_set1_host(h.client.get(), "localhost");
  bool client_done = false;
  bool server_done = false;
  ERR_clear_error();
  for (int round = 0; round < 50 && !(client_done && server_done); ++round) {
    if (!client_done) {
      const int rc = timed(&h.client_ms, [&] { return SSL_do_handshake(h.client.get()); });
      if (rc == 1) {
        client_done = true;
      } else if (SSL_get_error(h.client.get(), rc) != SSL_ERROR_WANT_READ) {
        h.client_errors = drain_errors();
        return h;
      }
    }
    if (!server_done) {
      const int rc = timed(&h.server_ms, [&] { return SSL_do_handshake(h.server.get()); });
      if (rc == 1) {
        server_done = true;
      } else if (SSL_get_error(h.server.get(), rc) != SSL_ERROR_WANT_READ) {
        h.server_errors = drain_errors();
        // Let the client read the alert and fail too.
        SSL_do_handshake(h.client.get());
        h.client_errors = drain_errors();
        return h;
      }
    }
  }
  h.ok = client_done && server_done;
  return h;
}

bool openssl_full_check_derive(EVP_PKEY* own, EVP_PKEY* peer, unsigned char* out,
                               std::size_t len) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, own, nullptr);
  std::size_t got = len;
  const bool ok = ctx != nullptr && EVP_PKEY_derive_init(ctx) == 1 &&
                  EVP_PKEY_derive_set_peer(ctx, peer) == 1 &&
                  EVP_PKEY_derive(ctx, out, &got) == 1 && got == len;
  EVP_PKEY_CTX_free(ctx);
  return ok;
}

}  // namespace qkd::test_prov
