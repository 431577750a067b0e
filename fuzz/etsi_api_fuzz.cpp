// Fuzz target: ETSI 014 requests (any caller, method, target and body) to the two KMEs of
// an in-memory pair holding keys, built anew for each input; the keys enc_keys hands out
// at one end are noticed at the other, so dec_keys can find them.
//
// Input: requests separated by the bytes FF FE (never in UTF-8). A request: byte 0 picks
// the KME and the caller (one of its SAEs, the peer's, or a stranger); the rest is
// "METHOD\nTARGET\nBODY" (missing parts empty). "KEYID" in a target or body stands for the
// last key_ID an enc_keys answered in this input (key_IDs are random).
// Checks: the handler returns (no exception, no crash, no wait: a dec_keys that would wait
// says so instead); the status is one the API answers with (200, 400, 401, 503: the standard's), and
// a 503 is never an internal error; a 401 has no body, every other body is a JSON object,
// with a "message" string unless the status is 200.
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
    service = std::make_unique<qkd::kms::EtsiService>(config, *store, [] {
      qkd::kms::LinkStats up;
      up.up = true;  // the link-down answers have their own tests
      return up;
    });
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
    if (alice.store->stats().own_available_bytes >= 2048 &&
        bob.store->stats().own_available_bytes >= 2048) {
      return;
    }
    std::vector<std::uint8_t> block(8 * 1024);  // per input: small, the commit is per byte
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
  if (r.status == 200) {
    return;
  }
  if (!j.contains("message") || !j.at("message").is_string() ||
      j.at("message").get<std::string>().starts_with("internal error")) {
    std::abort();  // no message, or a handler threw
  }
}

void replace_all(std::string& text, std::string_view what, const std::string& with) {
  for (auto p = text.find(what); p != std::string::npos; p = text.find(what, p + with.size())) {
    text.replace(p, what.size(), with);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 8192) {
    return 0;
  }
  Network net;
  net.top_up();
  std::string last_key_id = "00000000-0000-4000-8000-000000000000";
  std::string_view input(reinterpret_cast<const char*>(data), size);
  constexpr std::string_view kSeparator = "\xFF\xFE";
  while (!input.empty()) {
    const auto end = input.find(kSeparator);
    std::string_view one = input.substr(0, end);
    input = end == std::string_view::npos ? std::string_view{} : input.substr(end + 2);
    if (one.empty()) {
      continue;
    }
    const auto pick = static_cast<std::uint8_t>(one.front());
    one.remove_prefix(1);
    auto next_line = [&one]() {
      const auto nl = one.find('\n');
      std::string line(one.substr(0, nl));
      one = nl == std::string_view::npos ? std::string_view{} : one.substr(nl + 1);
      return line;
    };
    ApiRequest req;
    req.method = next_line();
    req.target = next_line();
    req.body = std::string(one);
    req.may_wait = false;
    replace_all(req.target, "KEYID", last_key_id);
    replace_all(req.body, "KEYID", last_key_id);
    static const char* const kCallers[] = {"alice", "alice-2", "bob", "bob-2", "mallory", ""};
    const std::string caller = kCallers[(pick >> 1) % 6];
    Kme& kme = (pick & 1) == 0 ? net.alice : net.bob;
    const ApiResponse r = kme.service->handle(caller, req);
    check(r);
    if (r.status == 200 && req.target.find("enc_keys") != std::string::npos) {
      const auto j = nlohmann::json::parse(r.body, nullptr, false);
      if (j.contains("keys") && j.at("keys").is_array() && !j.at("keys").empty()) {
        last_key_id = j.at("keys").back().value("key_ID", last_key_id);
      }
    }
    net.deliver_notices();
    net.top_up();
  }
  return 0;
}
