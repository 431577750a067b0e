#include "fake_kme.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <nlohmann/json.hpp>

namespace qkd::test_prov {

namespace {

int listen_loopback(int* port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::listen(fd, 16);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

std::string reason_phrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 503: return "Service Unavailable";
    default: return "Status";
  }
}

std::string uuid4() {
  unsigned char b[16];
  RAND_bytes(b, sizeof b);
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);
  char out[37];
  std::snprintf(out, sizeof out,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return out;
}

std::string error_body(const std::string& message) {
  return nlohmann::json{{"message", message}}.dump();
}

}  // namespace

int closed_port() {
  int port = 0;
  const int fd = listen_loopback(&port);
  ::close(fd);
  return port;
}

FakeKme::FakeKme(const std::string& pki_dir, const std::string& name, Handler handler)
    : handler_(std::move(handler)) {
  // The fake writes replies to clients that may have given up (timeouts): a test process,
  // unlike the library, may simply ignore SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  ctx_ = SSL_CTX_new(TLS_server_method());
  SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
  SSL_CTX_use_certificate_chain_file(ctx_, (pki_dir + "/" + name + ".crt").c_str());
  SSL_CTX_use_PrivateKey_file(ctx_, (pki_dir + "/" + name + ".key").c_str(), SSL_FILETYPE_PEM);
  SSL_CTX_load_verify_locations(ctx_, (pki_dir + "/ca.crt").c_str(), nullptr);
  SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  listen_fd_ = listen_loopback(&port_);
  acceptor_ = std::thread([this] { accept_loop(); });
}

FakeKme::~FakeKme() {
  stop_ = true;
  acceptor_.join();
  {
    std::lock_guard lock(mu_);
    for (auto& t : workers_) {
      t.join();
    }
  }
  ::close(listen_fd_);
  SSL_CTX_free(ctx_);
}

void FakeKme::accept_loop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) {
      continue;
    }
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      continue;
    }
    ++connections_;
    std::lock_guard lock(mu_);
    workers_.emplace_back([this, fd] { serve(fd); });
  }
}

void FakeKme::serve(int fd) {
  const auto deadline_ok = [&] { return !stop_.load(); };
  if (close_new_) {
    ::close(fd);
    ++connections_done_;
    return;
  }
  const auto start_at =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(handshake_delay_ms_.load());
  while (std::chrono::steady_clock::now() < start_at && deadline_ok()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  timeval tv{0, 50'000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  SSL* ssl = SSL_new(ctx_);
  SSL_set_fd(ssl, fd);
  int rc = 0;
  while ((rc = SSL_accept(ssl)) != 1 && deadline_ok()) {
    const int err = SSL_get_error(ssl, rc);
    if (err != SSL_ERROR_WANT_READ && !(err == SSL_ERROR_SYSCALL && errno == EAGAIN)) {
      break;
    }
  }
  std::string caller;
  if (rc == 1) {
    if (X509* peer = SSL_get1_peer_certificate(ssl)) {
      char cn[256] = {0};
      X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof cn);
      caller = cn;
      X509_free(peer);
    }
  }
  std::string buf;
  bool open = rc == 1;
  while (open && deadline_ok()) {
    // Read one request (headers + Content-Length body).
    std::size_t head_end = buf.find("\r\n\r\n");
    std::size_t need = 0;
    while (deadline_ok()) {
      head_end = buf.find("\r\n\r\n");
      if (head_end != std::string::npos) {
        const auto cl = buf.find("Content-Length: ");
        need = cl != std::string::npos && cl < head_end
                   ? std::stoul(buf.substr(cl + 16, buf.find("\r\n", cl) - cl - 16))
                   : 0;
        if (buf.size() >= head_end + 4 + need) {
          break;
        }
      }
      char tmp[4096];
      const int n = SSL_read(ssl, tmp, sizeof tmp);
      if (n > 0) {
        buf.append(tmp, static_cast<std::size_t>(n));
        continue;
      }
      const int err = SSL_get_error(ssl, n);
      if (err == SSL_ERROR_WANT_READ || (err == SSL_ERROR_SYSCALL && errno == EAGAIN)) {
        ERR_clear_error();
        continue;
      }
      open = false;
      break;
    }
    if (!open || !deadline_ok()) {
      break;
    }
    FakeRequest req;
    const std::string line = buf.substr(0, buf.find("\r\n"));
    req.method = line.substr(0, line.find(' '));
    req.target = line.substr(line.find(' ') + 1, line.rfind(' ') - line.find(' ') - 1);
    req.body = buf.substr(head_end + 4, need);
    req.caller = caller;
    buf.erase(0, head_end + 4 + need);
    ++requests_;
    const FakeReply reply = handler_(req);
    if (reply.delay_ms > 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(reply.delay_ms);
      while (std::chrono::steady_clock::now() < until && deadline_ok()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    std::string out = reply.raw;
    if (out.empty()) {
      out = "HTTP/1.1 " + std::to_string(reply.status) + " " + reason_phrase(reply.status) +
            "\r\nContent-Type: application/json\r\nContent-Length: " +
            std::to_string(reply.body.size()) + "\r\n" +
            (reply.close_after ? "Connection: close\r\n" : "") + "\r\n" + reply.body;
    }
    SSL_write(ssl, out.data(), static_cast<int>(out.size()));
    if (reply.close_after || !reply.raw.empty()) {
      break;
    }
  }
  SSL_shutdown(ssl);
  SSL_free(ssl);
  ::close(fd);
  ++connections_done_;
}

FakeReply FakeKeyStore::enc_keys(const FakeRequest& req) {
  // target: /api/v1/keys/{slave}/enc_keys
  const std::string prefix = "/api/v1/keys/";
  const std::string slave = req.target.substr(prefix.size(), req.target.find("/enc_keys") - prefix.size());
  const auto doc = nlohmann::json::parse(req.body.empty() ? "{}" : req.body);
  const int number = doc.value("number", 1);
  const int size = doc.value("size", 256);
  nlohmann::json keys = nlohmann::json::array();
  std::lock_guard lock(mu_);
  max_enc_number_ = std::max(max_enc_number_, number);
  for (int i = 0; i < number; ++i) {
    std::vector<unsigned char> key(static_cast<std::size_t>(size / 8));
    RAND_bytes(key.data(), static_cast<int>(key.size()));
    std::string b64(4 * ((key.size() + 2) / 3) + 1, '\0');
    const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), key.data(),
                                  static_cast<int>(key.size()));
    b64.resize(static_cast<std::size_t>(n));
    const std::string id = uuid4();
    keys_[id] = {b64, slave};
    keys.push_back({{"key_ID", id}, {"key", b64}});
  }
  return {200, nlohmann::json{{"keys", keys}}.dump()};
}

FakeReply FakeKeyStore::dec_keys(const FakeRequest& req) {
  // GET with one key_ID, or POST {"key_IDs":[{"key_ID":...},...]}: all or nothing.
  std::vector<std::string> ids;
  if (const auto q = req.target.find("?key_ID="); q != std::string::npos) {
    ids.push_back(req.target.substr(q + 8));
  } else if (req.method == "POST") {
    const auto doc = nlohmann::json::parse(req.body, nullptr, false);
    if (doc.is_discarded() || !doc.contains("key_IDs") || !doc["key_IDs"].is_array()) {
      return {400, error_body("bad dec_keys body")};
    }
    for (const auto& k : doc["key_IDs"]) {
      ids.push_back(k.value("key_ID", ""));
    }
  }
  if (ids.empty()) {
    return {400, error_body("no key_ID")};
  }
  std::lock_guard lock(mu_);
  nlohmann::json keys = nlohmann::json::array();
  for (const auto& id : ids) {
    const auto it = keys_.find(id);
    if (it == keys_.end()) {
      return {400, error_body("one or more keys specified are not found on KME")};
    }
    if (it->second.second != req.caller) {
      return {401, ""};
    }
    keys.push_back({{"key_ID", id}, {"key", it->second.first}});
  }
  for (const auto& id : ids) {
    keys_.erase(id);
  }
  ++dec_calls_;
  max_dec_number_ = std::max<int>(max_dec_number_, static_cast<int>(ids.size()));
  return {200, nlohmann::json{{"keys", keys}}.dump()};
}

FakeReply FakeKeyStore::route(const FakeRequest& req) {
  if (req.target.find("/enc_keys") != std::string::npos) {
    return enc_keys(req);
  }
  if (req.target.find("/dec_keys") != std::string::npos) {
    return dec_keys(req);
  }
  return {400, error_body("unknown route")};
}

}  // namespace qkd::test_prov
