#include "transport.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "internal.hpp"

namespace qkd::etsi::internal {

using qkd::core::make_error;

namespace {

// OpenSSL's socket BIO writes with write(2), which raises SIGPIPE on a connection the peer
// has reset; a library must not kill its host for that. This BIO is the socket BIO with a
// write that uses send(MSG_NOSIGNAL).
int nosigpipe_write(BIO* bio, const char* data, int len) {
  const int fd = static_cast<int>(BIO_get_fd(bio, nullptr));
  ssize_t n = 0;
  do {
    n = ::send(fd, data, static_cast<std::size_t>(len), MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  BIO_clear_retry_flags(bio);
  if (n <= 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    BIO_set_retry_write(bio);
  }
  return static_cast<int>(n);
}

const BIO_METHOD* nosigpipe_socket_method() {
  static BIO_METHOD* const method = []() -> BIO_METHOD* {
    const BIO_METHOD* base = BIO_s_socket();
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR,
                                 "qkd socket (no SIGPIPE)");
    if (m == nullptr) {
      return nullptr;
    }
    BIO_meth_set_write(m, nosigpipe_write);
    BIO_meth_set_read(m, BIO_meth_get_read(base));
    BIO_meth_set_puts(m, BIO_meth_get_puts(base));
    BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(base));
    BIO_meth_set_create(m, BIO_meth_get_create(base));
    BIO_meth_set_destroy(m, BIO_meth_get_destroy(base));
    return m;
  }();
  return method;
}

std::string errno_text(int err) {
  std::string s = std::strerror(err);
  if (!s.empty() && s[0] >= 'A' && s[0] <= 'Z') {
    s[0] = static_cast<char>(s[0] - 'A' + 'a');
  }
  return s;
}

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) {
    return 0;
  }
  return left.count() > 60'000 ? 60'000 : static_cast<int>(left.count());
}

// poll() for `events` until the deadline: 1 ready, 0 timeout, -1 error (errno).
int poll_until(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const int wait_ms = ms_left(deadline);
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, wait_ms);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r < 0) {
      return -1;
    }
    if (r > 0) {
      return 1;
    }
    if (wait_ms == 0 || Clock::now() >= deadline) {
      return 0;
    }
  }
}

Error timeout_error() { return make_error(ErrorCode::kTimeout, "timed out"); }

// One TCP connection, non-blocking, to the first address of `url` that accepts.
qkd::core::Result<int> connect_tcp(const detail::Url& url, Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (url.host_is_ip ? AI_NUMERICHOST : 0);
  addrinfo* list = nullptr;
  // getaddrinfo blocks and is not bounded by the deadline; with an IP address (the usual
  // KME setting) it does no I/O.
  const std::string port = std::to_string(url.port);
  const int gai = ::getaddrinfo(url.host.c_str(), port.c_str(), &hints, &list);
  if (gai != 0) {
    return make_error(ErrorCode::kUnavailable,
                      std::string("cannot resolve host: ") + ::gai_strerror(gai));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(list, ::freeaddrinfo);
  std::string last = "no address";
  for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                            ai->ai_protocol);
    if (fd < 0) {
      last = errno_text(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      const int ready = poll_until(fd, POLLOUT, deadline);
      if (ready == 0) {
        ::close(fd);
        return timeout_error();
      }
      int err = 0;
      socklen_t len = sizeof err;
      if (ready < 0) {
        err = errno;
      } else if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
        err = errno;
      }
      rc = err == 0 ? 0 : -1;
      errno = err;
    }
    if (rc == 0) {
      return fd;
    }
    last = errno_text(errno);
    ::close(fd);
  }
  return make_error(ErrorCode::kUnavailable, last);
}

}  // namespace

qkd::core::Result<std::unique_ptr<Connection>> Connection::open(SSL_CTX* ctx,
                                                                const detail::Url& url,
                                                                Clock::time_point deadline) {
  auto fd = connect_tcp(url, deadline);
  if (!fd.ok()) {
    return fd.error();
  }
  // The application's queued errors stay; ours are popped on every exit.
  ErrorMark mark;
  const auto tls_fail = [&](std::string why) {
    const std::string ossl = mark.pop();
    return make_error(ErrorCode::kUnavailable, ossl.empty() ? why : why + ": " + ossl);
  };
  SSL* ssl = SSL_new(ctx);
  if (ssl == nullptr) {
    ::close(*fd);
    return tls_fail("cannot make a TLS session");
  }
  std::unique_ptr<Connection> conn(new Connection(*fd, ssl));
  const BIO_METHOD* method = nosigpipe_socket_method();
  BIO* bio = method != nullptr ? BIO_new(method) : nullptr;
  if (bio == nullptr) {
    return tls_fail("cannot make a socket BIO");
  }
  BIO_set_fd(bio, *fd, BIO_NOCLOSE);
  SSL_set_bio(ssl, bio, bio);
  SSL_set_connect_state(ssl);
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  if (url.host_is_ip) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, url.host.c_str()) != 1) {
      return tls_fail("cannot pin the KME address");
    }
  } else {
    if (X509_VERIFY_PARAM_set1_host(param, url.host.c_str(), 0) != 1 ||
        SSL_set_tlsext_host_name(ssl, url.host.c_str()) != 1) {
      return tls_fail("cannot pin the KME host name");
    }
  }
  for (;;) {
    mark.reset();  // only this step's errors decide
    // (libssl 3.0's handshake state machine clears the thread's whole queue itself: the
    // client calls open() on a thread of its own.)
    const int rc = SSL_connect(ssl);
    if (rc == 1) {
      break;
    }
    const int err = ssl_error_since(ssl, rc, mark);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      auto waited = conn->wait(err, deadline);
      if (!waited.ok()) {
        return waited.error();
      }
      continue;
    }
    const long verify = SSL_get_verify_result(ssl);
    if (verify != X509_V_OK) {
      return tls_fail(std::string("TLS handshake failed: KME certificate rejected: ") +
                      X509_verify_cert_error_string(verify));
    }
    if (err == SSL_ERROR_SYSCALL && !mark.any()) {
      const int e = errno;
      return tls_fail("TLS handshake failed: " +
                      (e != 0 ? errno_text(e) : std::string("connection closed by the KME")));
    }
    return tls_fail("TLS handshake failed");
  }
  return conn;
}

Connection::~Connection() {
  // No close_notify: the connection may be a copy inherited across fork(), and a KME does
  // not need one. SSL_free writes nothing.
  if (ssl_ != nullptr) {
    SSL_free(ssl_);
  }
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

qkd::core::Status Connection::wait(int ssl_error, Clock::time_point deadline) const {
  const short events = ssl_error == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
  const int r = poll_until(fd_, events, deadline);
  if (r == 0) {
    return timeout_error();
  }
  if (r < 0) {
    return make_error(ErrorCode::kUnavailable, errno_text(errno));
  }
  return qkd::core::ok_status();
}

qkd::core::Status Connection::write_all(std::string_view data, Clock::time_point deadline) {
  ErrorMark mark;  // the application's queued errors stay; ours are popped on every exit
  std::size_t done = 0;
  while (done < data.size()) {
    std::size_t n = 0;
    mark.reset();  // only this step's errors decide
    errno = 0;
    const int rc = SSL_write_ex(ssl_, data.data() + done, data.size() - done, &n);
    if (rc == 1) {
      done += n;
      continue;
    }
    const int err = ssl_error_since(ssl_, rc, mark);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      auto waited = wait(err, deadline);
      if (!waited.ok()) {
        return waited;
      }
      continue;
    }
    const int e = errno;
    const std::string ossl = mark.pop();
    return make_error(ErrorCode::kClosed,
                      "connection lost while sending" +
                          (!ossl.empty() ? ": " + ossl : e != 0 ? ": " + errno_text(e) : ""));
  }
  return qkd::core::ok_status();
}

qkd::core::Result<std::size_t> Connection::read_some(std::span<std::uint8_t> buf,
                                                     Clock::time_point deadline) {
  ErrorMark mark;  // the application's queued errors stay; ours are popped on every exit
  for (;;) {
    std::size_t n = 0;
    mark.reset();  // only this step's errors decide
    errno = 0;
    const int rc = SSL_read_ex(ssl_, buf.data(), buf.size(), &n);
    if (rc == 1) {
      return n;
    }
    const int err = ssl_error_since(ssl_, rc, mark);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      auto waited = wait(err, deadline);
      if (!waited.ok()) {
        return waited.error();
      }
      continue;
    }
    if (err == SSL_ERROR_ZERO_RETURN) {
      return std::size_t{0};
    }
    const int e = errno;
    const std::string ossl = mark.pop();
    if (err == SSL_ERROR_SYSCALL && ossl.empty()) {
      // EOF without close_notify, or a reset.
      if (e == 0) {
        return std::size_t{0};
      }
      return make_error(ErrorCode::kClosed, "connection lost: " + errno_text(e));
    }
    return make_error(ErrorCode::kClosed, "TLS error: " + ossl);
  }
}

bool Connection::usable_when_idle() const {
  pollfd p{fd_, POLLIN, 0};
  const int r = ::poll(&p, 1, 0);
  return r == 0;
}

}  // namespace qkd::etsi::internal
