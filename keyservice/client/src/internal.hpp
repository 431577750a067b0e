// Private helpers of the client library (not installed, not for tests).
#pragma once

#include <openssl/types.h>

#include <string>

namespace qkd::etsi::internal {

// The process-wide private library context: the default provider only, created on first
// use and never freed (it may be needed until exit; providers are torn down in any order).
// Returns nullptr when it cannot be made.
OSSL_LIB_CTX* private_libctx();

// Pops the OpenSSL errors raised since the last ERR_set_mark() into one short line
// ("certificate verify failed"), or "" when there are none.
std::string pop_openssl_errors();

}  // namespace qkd::etsi::internal
