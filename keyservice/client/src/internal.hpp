// Private helpers of the client library (not installed, not for tests).
#pragma once

#include <openssl/ssl.h>
#include <openssl/types.h>

#include <string>

namespace qkd::etsi::internal {

// The process-wide private library context: the default provider only, created on first
// use and never freed (it may be needed until exit; providers are torn down in any order).
// Returns nullptr when it cannot be made.
OSSL_LIB_CTX* private_libctx();

// A mark in this thread's OpenSSL error queue, and the errors raised above it. The client
// runs on the host application's thread, often inside the application's own TLS handshake
// (the provider's KEM): the errors and marks the application has queued are its own and
// must survive; only ours are read and popped. OpenSSL 3.0 reads the queue only at its
// oldest entry (ERR_peek_error, which SSL_get_error also uses) or its newest: when the queue
// was empty at the mark every error is ours and all are read, as before; otherwise only the
// newest one, and "any raised" is judged by the newest entry having changed.
class ErrorMark {
 public:
  ErrorMark();
  ~ErrorMark();  // pops to the mark unless pop() did
  ErrorMark(const ErrorMark&) = delete;
  ErrorMark& operator=(const ErrorMark&) = delete;

  // Whether an error was raised since the mark (or since reset()).
  [[nodiscard]] bool any() const;
  // The oldest error raised since the mark that can be read (see above), 0 when none.
  [[nodiscard]] unsigned long first() const;
  // Drops the errors raised since the mark; the mark stays.
  void reset();
  // Pops the errors raised since the mark, and the mark, into one short line ("certificate
  // verify failed"), or "" when there are none.
  std::string pop();

 private:
  void set();

  bool was_empty_ = true;
  bool popped_ = false;
  // The newest entry when the mark was set.
  unsigned long top_code_ = 0;
  const char* top_file_ = nullptr;
  int top_line_ = 0;
  const char* top_data_ = nullptr;
};

// SSL_get_error() with only the errors raised since `mark` considered: SSL_get_error itself
// reads the oldest error in the queue, which may be the application's, and would report
// SSL_ERROR_SSL for a mere WANT_READ.
int ssl_error_since(const SSL* ssl, int rc, const ErrorMark& mark);

}  // namespace qkd::etsi::internal
