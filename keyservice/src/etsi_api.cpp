// ETSI GS QKD 014 handlers: (caller SAE ID, request) -> response, over the key store.
#include <fmt/format.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "qkd/kms/api.hpp"
#include "qkd/kms/util.hpp"

namespace qkd::kms {

using json = nlohmann::json;

namespace {

constexpr const char* kNotFound = "one or more keys specified are not found on KME";
constexpr const char* kExtMandatory = "not all extension_mandatory parameters are supported";

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

ApiResponse json_response(const json& j) { return ApiResponse{200, dump_json(j)}; }

// The Key container, written into one buffer reserved up front: no JSON tree and no
// growing string leave copies of key bytes in freed memory (the body itself is cleansed
// when its response is freed, https_server.cpp). Members in the order nlohmann writes them.
std::string key_container(const std::vector<DeliveredKey>& keys) {
  std::size_t size = 16;
  for (const auto& k : keys) {
    size += 4 * ((k.key.size() + 2) / 3) + 6 * k.key_id.size() + 32;
  }
  std::string out;
  out.reserve(size);
  out += R"({"keys":[)";
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out += i == 0 ? R"({"key":")" : R"(,{"key":")";
    std::string b64 = base64_encode(keys[i].key.span());
    out += b64;
    OPENSSL_cleanse(b64.data(), b64.size());
    out += R"(","key_ID":)";
    out += dump_json(json(keys[i].key_id));  // escaped, should a peer's key_ID need it
    out += '}';
  }
  out += "]}";
  return out;
}

// The Key container (or the error) together with the write it must wait for: a failure to
// build the body still carries `pending`, so the allocation's notice is released.
ApiResponse keys_response(const Result<std::vector<DeliveredKey>>& keys,
                          KeyStore::PendingWrite pending) {
  ApiResponse resp;
  try {
    resp = keys.ok() ? ApiResponse{200, key_container(keys.value())} : error_response(keys.error());
  } catch (const std::exception& e) {
    resp = error_response(503, fmt::format("internal error: {}", e.what()));
  }
  resp.pending = std::move(pending);
  return resp;
}

// A parsed Key request (enc_keys).
struct KeyRequest {
  std::uint32_t number = 1;
  std::uint32_t size = 0;
  std::vector<std::string> additional_slaves;
};

// GET takes its parameters in the query string and no body, POST a body and no query
// (ETSI GS QKD 014 "Routes"): a 400 for a request that mixes them.
std::optional<ApiResponse> parameters_in_the_wrong_form(std::string_view route,
                                                        const ApiRequest& req,
                                                        const RouteMatch& m) {
  if (req.method == "POST" && !m.query.empty()) {
    return error_response(
        400, fmt::format("{} by POST takes its parameters in the body, not in the query string",
                         route));
  }
  if (req.method == "GET" && !req.body.empty()) {
    return error_response(
        400, fmt::format("{} by GET takes no body: its parameters go in the query string", route));
  }
  return std::nullopt;
}

// A body that is not JSON, or names a member twice: the JSON parser keeps the last one,
// while a proxy or a log reading the first would see another request than the one served.
ApiResponse bad_body(const JsonTextError& e, std::string_view what) {
  if (e.repeated) {
    return error_response(400,
                          fmt::format("\"{}\" appears twice in the {}", printable(e.path), what));
  }
  return error_response(400, fmt::format("malformed JSON in the {}", what));
}

}  // namespace

EtsiService::EtsiService(const Config& config, KeyStore& store,
                         std::function<LinkStats()> link_stats)
    : config_(config), store_(store), link_stats_(std::move(link_stats)) {
  router_.add("GET", "/api/v1/keys/{slave}/status",
              [this](const std::string& c, const ApiRequest& req, const RouteMatch& m) {
                // Status has no parameters: one given would be ignored, as would a body.
                if (!m.query.empty()) {
                  return error_response(400, "status takes no query parameters");
                }
                if (auto wrong = parameters_in_the_wrong_form("status", req, m)) {
                  return *wrong;
                }
                return status(c, m.params.at("slave"));
              });
  router_.add("GET", "/health", [this](const std::string&, const ApiRequest&, const RouteMatch&) {
    return health();
  });
  for (const char* method : {"GET", "POST"}) {
    router_.add(method, "/api/v1/keys/{slave}/enc_keys",
                [this](const std::string& c, const ApiRequest& r, const RouteMatch& m) {
                  return enc_keys(c, m.params.at("slave"), r, m);
                });
    router_.add(method, "/api/v1/keys/{master}/dec_keys",
                [this](const std::string& c, const ApiRequest& r, const RouteMatch& m) {
                  return dec_keys(c, m.params.at("master"), r, m);
                });
  }
}

std::uint32_t EtsiService::max_sae_id_count() const {
  // Additional slaves: the peer KME's other SAEs and this KME's SAEs other than the master.
  return static_cast<std::uint32_t>(config_.link.peer_saes.size() - 1 + config_.saes.size() - 1);
}

ApiResponse EtsiService::handle(const std::string& caller, const ApiRequest& req) const {
  if (!contains(config_.saes, caller)) {
    return error_response(401, "");
  }
  try {
    return router_.dispatch(caller, req);
  } catch (const std::exception& e) {  // the edge: nothing escapes a handler
    return error_response(503, fmt::format("internal error: {}", e.what()));
  }
}

ApiResponse EtsiService::health() const {
  const char* link = link_up() ? "up" : "down";
  // A store that failed a write serves no key any more: not healthy, whatever the link.
  if (std::string failure = store_.failure(); !failure.empty()) {
    return ApiResponse{503, dump_json(json{{"status", "failing"},
                                           {"link", link},
                                           {"message", "key store: " + failure}})};
  }
  return json_response(json{{"status", "ok"}, {"link", link}});
}

ApiResponse EtsiService::status(const std::string& caller, const std::string& slave) const {
  if (!contains(config_.link.peer_saes, slave)) {
    return error_response(400,
                          fmt::format("slave SAE \"{}\" is not reachable from this KME", slave));
  }
  const StoreStats st = store_.stats();
  const std::uint64_t key_bytes = config_.keys.key_size / 8;
  // The pool's keys and the keys prepared for this pair (store.prepared_keys).
  const std::uint64_t stored = std::min<std::uint64_t>(
      st.own_available_bytes / key_bytes +
          store_.prepared_for(caller, slave, static_cast<std::uint32_t>(key_bytes)),
      config_.keys.max_key_count);
  const LinkStats ls = link_stats_ ? link_stats_() : LinkStats{};
  json link = {{"state", ls.up ? "up" : "down"},
               {"qber", ls.qber},
               {"raw_key_rate_bps", ls.raw_key_rate_bps},
               {"sifted_key_rate_bps", ls.sifted_key_rate_bps},
               {"secret_key_rate_bps", ls.secret_key_rate_bps},
               {"auth_key_rate_bps", ls.auth_key_rate_bps},
               {"key_bound", ls.key_bound},
               {"blocks", ls.blocks},
               {"aborted_blocks", ls.aborted_blocks},
               {"last_abort_reason", ls.last_abort_reason}};
  json j = {{"source_KME_ID", config_.kme_id},
            {"target_KME_ID", config_.link.peer_kme_id},
            {"master_SAE_ID", caller},
            {"slave_SAE_ID", slave},
            {"key_size", config_.keys.key_size},
            {"stored_key_count", stored},
            {"max_key_count", config_.keys.max_key_count},
            {"max_key_per_request", config_.keys.max_key_per_request},
            {"max_key_size", config_.keys.max_key_size},
            {"min_key_size", config_.keys.min_key_size},
            {"max_SAE_ID_count", max_sae_id_count()},
            {"status_extension", {{"link", std::move(link)}}}};
  return json_response(j);
}

bool EtsiService::link_up() const { return !link_stats_ || link_stats_().up; }

ApiResponse EtsiService::peer_unreachable(std::string_view what) const {
  ApiResponse r = error_response(
      503, fmt::format("peer KME unreachable: the link to {} has no session; {}",
                       config_.link.peer_kme_id, what));
  r.retry_after_s = 1;
  return r;
}

ApiResponse EtsiService::enc_keys(const std::string& caller, const std::string& slave,
                                  const ApiRequest& req, const RouteMatch& m) const {
  if (!contains(config_.link.peer_saes, slave)) {
    return error_response(400,
                          fmt::format("slave SAE \"{}\" is not reachable from this KME", slave));
  }
  KeyRequest kr;
  kr.size = config_.keys.key_size;
  // GET carries number and size in the query, POST a Key request body: a parameter in the
  // other form would be ignored, and the request served with the defaults.
  if (auto wrong = parameters_in_the_wrong_form("enc_keys", req, m)) {
    return *wrong;
  }
  if (req.method == "GET") {
    for (const auto& [k, v] : m.query) {
      if (k != "number" && k != "size") {
        return error_response(
            400, fmt::format("enc_keys by GET takes only number and size, not \"{}\"", k));
      }
      if (m.query.count(k) > 1) {
        return error_response(400, fmt::format("query parameter {} given twice", k));
      }
      auto n = parse_decimal<std::uint32_t>(v);  // [0, 2^32)
      if (!n) {
        return error_response(400, fmt::format("{} must be a non-negative integer", k));
      }
      (k == "number" ? kr.number : kr.size) = *n;
    }
  } else if (!req.body.empty()) {
    json j;
    if (auto bad = parse_json_unique(req.body, j)) {
      return bad_body(*bad, "key request");
    }
    if (!j.is_object()) {
      return error_response(400, "the key request must be a JSON object");
    }
    auto read_u32 = [&](const char* name, std::uint32_t& out) -> std::optional<ApiResponse> {
      if (!j.contains(name)) {
        return std::nullopt;
      }
      const json& v = j.at(name);
      if (!v.is_number_unsigned() || v.get<std::uint64_t>() > 0xFFFFFFFFu) {
        return error_response(400, fmt::format("{} must be a non-negative integer", name));
      }
      out = v.get<std::uint32_t>();
      return std::nullopt;
    };
    if (auto e = read_u32("number", kr.number)) {
      return *e;
    }
    if (auto e = read_u32("size", kr.size)) {
      return *e;
    }
    if (j.contains("additional_slave_SAE_IDs")) {
      const json& a = j.at("additional_slave_SAE_IDs");
      if (!a.is_array()) {
        return error_response(400, "additional_slave_SAE_IDs must be an array of strings");
      }
      for (const json& s : a) {
        if (!s.is_string()) {
          return error_response(400, "additional_slave_SAE_IDs must be an array of strings");
        }
        kr.additional_slaves.push_back(s.get<std::string>());
      }
    }
    for (const char* ext : {"extension_mandatory", "extension_optional"}) {
      if (j.contains(ext)) {
        const json& e = j.at(ext);
        // "arrays of one-member name/value objects"
        if (!e.is_array() || !std::all_of(e.begin(), e.end(), [](const json& x) {
              return x.is_object() && x.size() == 1;
            })) {
          return error_response(
              400, fmt::format("{} must be an array of one-member objects ({{\"name\": value}})",
                               ext));
        }
      }
    }
    // No vendor extension is supported yet: any mandatory one fails the request; optional
    // ones are ignored (allowed by the standard).
    if (j.contains("extension_mandatory") && !j.at("extension_mandatory").empty()) {
      return error_response(400, kExtMandatory);
    }
  }

  const KeysConfig& kc = config_.keys;
  if (kr.number < 1) {
    return error_response(400, "number must be at least 1");
  }
  if (kr.number > kc.max_key_per_request) {
    return error_response(400, fmt::format("number {} exceeds max_key_per_request ({})", kr.number,
                                           kc.max_key_per_request));
  }
  if (kr.size % 8 != 0) {
    return error_response(400, "size shall be a multiple of 8");
  }
  if (kr.size < kc.min_key_size) {
    return error_response(
        400, fmt::format("size {} is below min_key_size ({})", kr.size, kc.min_key_size));
  }
  if (kr.size > kc.max_key_size) {
    return error_response(
        400, fmt::format("size {} exceeds max_key_size ({})", kr.size, kc.max_key_size));
  }
  if (kr.additional_slaves.size() > max_sae_id_count()) {
    return error_response(
        400, fmt::format("additional_slave_SAE_IDs: at most {} allowed", max_sae_id_count()));
  }
  // Additional slaves at the peer travel in the notice; those at this KME (multicast here)
  // fetch their copy from this KME's store.
  std::vector<std::string> slaves{slave};
  std::vector<std::string> local_slaves;
  for (const auto& s : kr.additional_slaves) {
    const bool at_peer = contains(config_.link.peer_saes, s);
    const bool here = contains(config_.saes, s) && s != caller;
    if ((!at_peer && !here) || contains(slaves, s) || contains(local_slaves, s)) {
      return error_response(
          400, fmt::format("additional slave SAE \"{}\" is unknown, repeated or the master", s));
    }
    (at_peer ? slaves : local_slaves).push_back(s);
  }
  // The slave's KME learns of keys over the link: while it has no session, the slave could
  // not fetch them (the standard's "peer KME unreachable"). Nothing is consumed.
  if (!link_up()) {
    return peer_unreachable("no key was delivered");
  }
  if (req.admit) {  // a valid request: now the budgets
    std::vector<std::string> named{slave};
    named.insert(named.end(), kr.additional_slaves.begin(), kr.additional_slaves.end());
    if (auto refusal = req.admit(named, kr.number, kr.size)) {
      return *refusal;
    }
  }
  KeyStore::PendingWrite pending;
  auto keys = store_.allocate(caller, slaves, local_slaves, kr.number, kr.size / 8,
                              req.may_defer ? &pending : nullptr);
  return keys_response(keys, std::move(pending));
}

ApiResponse EtsiService::dec_keys(const std::string& caller, const std::string& master,
                                  const ApiRequest& req, const RouteMatch& m) const {
  if (auto wrong = parameters_in_the_wrong_form("dec_keys", req, m)) {
    return *wrong;
  }
  std::vector<std::string> ids;
  if (req.method == "GET") {
    for (const auto& [k, v] : m.query) {
      if (k != "key_ID") {
        return error_response(400, fmt::format("dec_keys by GET takes only key_ID, not \"{}\"", k));
      }
      ids.push_back(v);
    }
    if (ids.size() != 1) {
      return error_response(400, "dec_keys by GET takes exactly one key_ID (use POST for more)");
    }
  } else {
    json j;
    if (auto bad = parse_json_unique(req.body, j)) {
      return bad_body(*bad, "key IDs request");
    }
    if (!j.is_object() || !j.contains("key_IDs") || !j.at("key_IDs").is_array() ||
        j.at("key_IDs").empty()) {
      return error_response(400, "expected {\"key_IDs\": [{\"key_ID\": \"...\"}, ...]}");
    }
    for (const json& e : j.at("key_IDs")) {
      if (!e.is_object() || !e.contains("key_ID") || !e.at("key_ID").is_string()) {
        return error_response(400, "each key_IDs entry must be {\"key_ID\": \"<UUID>\"}");
      }
      ids.push_back(e.at("key_ID").get<std::string>());
    }
  }
  if (ids.size() > config_.keys.max_key_per_request) {
    return error_response(400, fmt::format("more than max_key_per_request ({}) key_IDs",
                                           config_.keys.max_key_per_request));
  }
  for (auto& id : ids) {
    // Hex digits are case-insensitive on input (RFC 4122 section 3); key_IDs are issued, and
    // looked up, in lowercase.
    std::transform(id.begin(), id.end(), id.begin(),
                   [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; });
    if (!is_uuid(id)) {
      return error_response(400, kNotFound);
    }
  }
  // Only a key whose master is an SAE of the peer KME comes in a notice; one of this KME's
  // own masters is written here when its enc_keys allocates it, before any SAE learns its
  // key_ID. For any other, what the store holds now is the answer: no wait, and no 503.
  const bool may_arrive = contains(config_.link.peer_saes, master);
  // While the link is down no notice can arrive: no wait (and no worker) for one.
  const bool down_before = !link_up();
  const bool may_wait_now = may_arrive && !down_before && !req.wait_over;
  if (may_wait_now && !req.may_wait && !store_.knows_all(ids)) {
    return ApiResponse::wait_needed(ids);  // a notice may be in flight: wait where we may
  }
  const auto wait =
      std::chrono::milliseconds(may_wait_now && req.may_wait ? config_.keys.dec_wait_ms : 0);
  KeyStore::PendingWrite pending;
  auto keys = store_.take(caller, master, ids, wait, req.may_defer ? &pending : nullptr);
  // A key_ID not known here while the link is (or was, during the wait) down: its notice
  // may be on its way, so not "not found". A key_ID delivered already is 400 (or 401)
  // whatever the link: take() answered that.
  if (!keys.ok() && keys.error().code == qkd::core::ErrorCode::kInvalidArgument && may_arrive &&
      (down_before || !link_up()) && !store_.knows_all(ids) && !store_.delivered_any(ids)) {
    return peer_unreachable("a key_ID not known at this KME may still be on its way");
  }
  return keys_response(keys, std::move(pending));
}

}  // namespace qkd::kms
