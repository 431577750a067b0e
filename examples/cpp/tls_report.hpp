// A generic report of what a TLS connection negotiated, as any application could log it.
// Nothing here knows of QKD: the group name comes from OpenSSL (SSL_group_to_name), which
// names provider groups too.
#pragma once

#include <openssl/ssl.h>

#include <string>

namespace example {

inline std::string negotiated_group(SSL* ssl) {
  const int nid = static_cast<int>(SSL_get_negotiated_group(ssl));  // a macro: long
  if (nid == NID_undef) {
    return "none";
  }
  const char* name = SSL_group_to_name(ssl, nid);
  return name != nullptr ? name : "unknown(" + std::to_string(nid) + ")";
}

inline std::string tls_report(SSL* ssl) {
  return "group=" + negotiated_group(ssl) + " protocol=" + SSL_get_version(ssl) +
         " cipher=" + SSL_get_cipher_name(ssl);
}

// What every OpenSSL application gets by default, made explicit: load openssl.cnf
// (OPENSSL_CONF or the system one): providers, and the [system_default] Groups list.
inline bool init_openssl() {
  return OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CONFIG, nullptr) == 1;
}

}  // namespace example
