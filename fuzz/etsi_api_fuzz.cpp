// Fuzz target: one ETSI 014 request (any caller, method, target and body) against a KME's
// handlers (EtsiService) over in-memory stores holding keys at both ends; keys enc_keys
// hands out at one end are noticed at the other, so dec_keys finds them too.
//
// Input: byte 0 picks the KME and the caller (one of its SAEs, the peer's, or a stranger);
// the rest is "METHOD\nTARGET\nBODY" (missing parts empty).
// Checks: the handler returns (no exception, no crash, no wait: a dec_keys that would wait
// says so instead); the status is one the API answers with; a 401 has no body and every
// other body is a JSON object, with a "message" string unless the status is 200.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/kms/api.hpp"
#include "qkd/kms/key_store.hpp"
#include "qkd/test/kme_config.hpp"

namespace {

using qkd::kms::ApiRequest;
using qkd::kms::ApiResponse;
using qkd::kms::Config;
using qkd::kms::Direction;
using qkd::kms::KeyAssignment;
using qkd::kms::KeyStore;

struct Kme {
  Config config;
  std::unique_ptr<KeyStore> store;
  std::unique_ptr<qkd::kms::EtsiService> service;
  std::vector<KeyAssignment> sent;  // notices for the peer

  Kme(Config c, Direction own) : config(std::move(c)), store(qkd::kms::make_memory_key_store(own)) {
    service = std::make_unique<qkd::kms::EtsiService>(config, *store,
                                                      [] { return qkd::kms::LinkStats{}; });
    store->set_assignment_listener([this](const std::vector<KeyAssignment>& as) {
      sent.insert(sent.end(), as.begin(), as.end());
    });
  }
};

struct Network {
  Kme alice{
      qkd::test::kme_config("alice-kme", {"alice", "alice-2"}, "bob-kme", {"bob", "bob-2"}, 0),
      Direction::kAlice};
  Kme bob{qkd::test::kme_config("bob-kme", {"bob", "bob-2"}, "alice-kme", {"alice", "alice-2"}, 0),
          Direction::kBob};

  // Both stores hold the same pool; topped up as enc_keys uses it.
  void top_up() {
    if (alice.store->stats().own_available_bytes >= 64 * 1024 &&
        bob.store->stats().own_available_bytes >= 64 * 1024) {
      return;
    }
    std::vector<std::uint8_t> block(256 * 1024);
    for (std::size_t i = 0; i < block.size(); ++i) {
      block[i] = static_cast<std::uint8_t>(i * 131 + 7);
    }
    alice.store->commit(block);
    bob.store->commit(block);
  }
  void deliver_notices() {
    for (auto [from, to] : {std::pair{&alice, &bob}, std::pair{&bob, &alice}}) {
      for (auto& a : from->sent) {
        (void)to->store->apply_peer_assignment(a);
      }
      from->sent.clear();
    }
  }
};

void check(const ApiResponse& r) {
  if (r.needs_wait) {
    return;  // a dec_keys for a key not noticed yet: the transport would retry it
  }
  switch (r.status) {
    case 200:
    case 400:
    case 401:
    case 404:
    case 405:
    case 503:
      break;
    default:
      std::abort();  // a status the API does not answer with
  }
  if (r.status == 401) {
    if (!r.body.empty()) {
      std::abort();
    }
    return;
  }
  const auto j = nlohmann::json::parse(r.body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::abort();
  }
  if (r.status != 200 && (!j.contains("message") || !j.at("message").is_string())) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A fresh pair every 2,048 inputs: keys noticed but never fetched pile up at the peer,
  // and would slow every run down.
  static std::unique_ptr<Network> net_holder;
  static unsigned runs = 0;
  if (!net_holder || ++runs % 2048 == 0) {
    net_holder = std::make_unique<Network>();
  }
  Network& net = *net_holder;
  if (size == 0) {
    return 0;
  }
  const std::uint8_t pick = data[0];
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  auto next_line = [&rest]() {
    const auto nl = rest.find('\n');
    std::string line(rest.substr(0, nl));
    rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
    return line;
  };
  ApiRequest req;
  req.method = next_line();
  req.target = next_line();
  req.body = std::string(rest);
  req.may_wait = false;
  static const char* const kCallers[] = {"alice", "alice-2", "bob", "bob-2", "mallory", ""};
  const std::string caller = kCallers[(pick >> 1) % 6];
  net.top_up();
  Kme& kme = (pick & 1) == 0 ? net.alice : net.bob;
  check(kme.service->handle(caller, req));
  net.deliver_notices();
  return 0;
}
