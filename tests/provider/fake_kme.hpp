// A minimal ETSI 014 KME for tests of the client and the provider alone: HTTPS with mutual
// TLS on 127.0.0.1 (a thread per connection, keep-alive), a scripted or pair-shared key
// store. Not the real qkd-kms (tests against that use qkd_test_support).
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace qkd::test_prov {

struct FakeReply {
  int status = 200;
  std::string body;
  int delay_ms = 0;          // sleep before answering
  bool close_after = false;  // Connection: close
  std::string raw;           // when set: sent verbatim instead of a formatted response
};

struct FakeRequest {
  std::string method, target, body, caller;  // caller: CN of the client certificate
};

class FakeKme {
 public:
  using Handler = std::function<FakeReply(const FakeRequest&)>;
  FakeKme(const std::string& pki_dir, const std::string& name, Handler handler);
  ~FakeKme();
  FakeKme(const FakeKme&) = delete;
  FakeKme& operator=(const FakeKme&) = delete;

  [[nodiscard]] std::string url() const { return "https://127.0.0.1:" + std::to_string(port_); }
  [[nodiscard]] int connections() const { return connections_.load(); }
  [[nodiscard]] int requests() const { return requests_.load(); }
  // Connections the fake has finished with (the client closed it, or the fake did).
  [[nodiscard]] int connections_done() const { return connections_done_.load(); }
  // For connections accepted from now on: wait `ms` before the TLS handshake (a slow KME;
  // the wait ends early when the fake stops), or close the socket without a word.
  void delay_handshakes(int ms) { handshake_delay_ms_ = ms; }
  void close_new_connections(bool close) { close_new_ = close; }

 private:
  void accept_loop();
  void serve(int fd);

  Handler handler_;
  SSL_CTX* ctx_ = nullptr;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<int> requests_{0};
  std::atomic<int> connections_done_{0};
  std::atomic<int> handshake_delay_ms_{0};
  std::atomic<bool> close_new_{false};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> workers_;
};

// The key store shared by a fake master KME and a fake slave KME: enc_keys at one makes
// a random key and a UUID; dec_keys at the other hands it out once.
class FakeKeyStore {
 public:
  FakeReply enc_keys(const FakeRequest& req);
  FakeReply dec_keys(const FakeRequest& req);
  FakeReply route(const FakeRequest& req);  // dispatches on the path
  // The largest `number` an enc_keys request asked for so far (0: none yet).
  int max_enc_number() {
    std::lock_guard lock(mu_);
    return max_enc_number_;
  }
  // Successful dec_keys calls, and the most key_IDs one of them asked for.
  int dec_calls() {
    std::lock_guard lock(mu_);
    return dec_calls_;
  }
  int max_dec_number() {
    std::lock_guard lock(mu_);
    return max_dec_number_;
  }

 private:
  std::mutex mu_;
  int max_enc_number_ = 0;
  int dec_calls_ = 0;
  int max_dec_number_ = 0;
  std::map<std::string, std::pair<std::string, std::string>> keys_;  // id -> (base64, slave)
};

// A port on 127.0.0.1 where nothing listens (bound, then closed).
int closed_port();

}  // namespace qkd::test_prov
