// The HTTP-independent request/response model, the route table and the ETSI 014 handlers.
//
// The transport (https_server.hpp) turns an authenticated HTTPS request into an ApiRequest
// (method, decoded path, query, body) plus the caller's SAE ID (the client certificate's
// CN), and writes the ApiResponse back. Everything here is plain data in, plain data out.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "qkd/core/result.hpp"
#include "qkd/kms/config.hpp"
#include "qkd/kms/key_store.hpp"

namespace qkd::kms {

struct ApiResponse {
  unsigned status = 200;
  std::string body;  // JSON text, or empty (401)
  // Set only by wait_needed() (see ApiRequest::may_wait); never sent. wait_for: the
  // key_IDs whose arrival is worth another try (KeyStore::when_known).
  bool needs_wait = false;
  std::vector<std::string> wait_for{};
  // The durable write this response must wait for (ApiRequest::may_defer).
  KeyStore::PendingWrite pending{};
  std::uint32_t retry_after_s = 0;  // > 0: a Retry-After header (seconds), with a 503

  [[nodiscard]] static ApiResponse wait_needed(std::vector<std::string> key_ids) {
    ApiResponse r{0, {}, true, std::move(key_ids)};
    return r;
  }
};

struct ApiRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // raw request target: path and optional ?query
  std::string body;
  // false: the transport runs the handler on its I/O thread, where it must not block. A
  // handler that would have to wait (dec_keys for a notice still in flight) answers
  // ApiResponse::wait_needed() instead, touching nothing; the caller runs the request
  // again when one of its keys arrives, and once more with wait_over = true when
  // keys.dec_wait_ms has passed. true: dec_keys waits (up to keys.dec_wait_ms) in the
  // store, blocking its thread.
  bool may_wait = true;
  // The wait for a notice is over: dec_keys answers from what this KME knows now.
  bool wait_over = false;
  // true: enc_keys and dec_keys do not wait for their durable write; they answer with
  // ApiResponse::pending set, and the transport sends that response only once
  // KeyStore::when_written has reported the write durable. false: they wait.
  bool may_defer = false;
  // Admission control, for enc_keys: called once the request has been found valid (an
  // invalid one gets its 400 whatever the budgets), just before keys are taken, with the
  // slave SAEs (the path's first, then the additional ones as given), the number of keys
  // and their size in bits. A response it returns (503 + Retry-After) answers the request
  // instead. Empty: no admission control.
  using Admit = std::function<std::optional<ApiResponse>(
      const std::vector<std::string>& slaves, std::uint32_t number, std::uint32_t size_bits)>;
  Admit admit{};
};

// The one place where domain errors become HTTP statuses:
//   kInvalidArgument, kProtocol -> 400; kAuthentication -> 401;
//   kUnavailable, kTimeout, kClosed, kInternal, kRejected -> 503.
[[nodiscard]] unsigned http_status_for(qkd::core::ErrorCode code);
// A response body: JSON text, with any invalid UTF-8 in its strings replaced by U+FFFD.
[[nodiscard]] std::string dump_json(const nlohmann::json& j);
// An Error body ({"message": ...}); 401 has no body.
[[nodiscard]] ApiResponse error_response(const qkd::core::Error& error);
[[nodiscard]] ApiResponse error_response(unsigned status, std::string_view message);

// --- router ---
struct RouteMatch {
  std::map<std::string, std::string> params;      // URL-decoded path parameters
  std::multimap<std::string, std::string> query;  // URL-decoded query parameters
};
using RouteHandler =
    std::function<ApiResponse(const std::string& caller, const ApiRequest&, const RouteMatch&)>;

// A table of (method, pattern) -> handler. Patterns are '/'-separated; a segment "{name}"
// matches one non-empty segment. Unknown path: 404 with an Error body. Known path, other
// method: 400 with an Error body (the standard allows only 400/401/503).
class Router {
 public:
  void add(std::string method, std::string pattern, RouteHandler handler);
  [[nodiscard]] ApiResponse dispatch(const std::string& caller, const ApiRequest& req) const;

 private:
  struct Route {
    std::string method;
    std::vector<std::string> segments;
    RouteHandler handler;
  };
  std::vector<Route> routes_;
};

// What the link reports for the status extension.
struct LinkStats {
  bool up = false;
  double qber = 0.0;              // last completed block
  double raw_key_rate_bps = 0.0;  // per second of simulated link time, over all blocks
  double sifted_key_rate_bps = 0.0;
  double secret_key_rate_bps = 0.0;  // net: after the authentication key was paid
  double auth_key_rate_bps = 0.0;    // QKD key spent on authenticating the link
  std::string key_bound;             // the security bound of the last completed block
  std::uint64_t blocks = 0;          // blocks run (committed or aborted)
  std::uint64_t aborted_blocks = 0;
  std::string last_abort_reason;
};

// The ETSI GS QKD 014 service of one KME. Handlers are pure functions of (caller, request)
// over the key store.
//
// Status codes (ETSI allows only 400/401/503 as errors):
//   401 (no body)  the client certificate's CN is not one of this KME's SAEs; or, at
//                  dec_keys, the caller is not the slave (or an additional slave) of every
//                  requested key, or the master SAE in the path is not each key's master
//                  (also for a key already delivered, while its key_ID is remembered).
//   400 + Error    "size shall be a multiple of 8"; "size N is below min_key_size (M)";
//                  "size N exceeds max_key_size (M)"; "number N exceeds max_key_per_request
//                  (M)"; "number must be at least 1"; "not all extension_mandatory
//                  parameters are supported" (no vendor extension is supported yet;
//                  extension_optional is accepted and ignored; both are arrays of
//                  one-member objects); "malformed JSON ..." and
//                  other shape errors (wrong types, unknown GET query parameters); an
//                  unknown slave SAE in the path; more additional slaves than
//                  max_SAE_ID_count (= number of peer SAEs - 1); dec_keys: "one or more
//                  keys specified are not found on KME" for unknown, malformed, expired
//                  (keys.max_age_s) or already delivered (to this caller) key_IDs (after waiting up to
//                  keys.dec_wait_ms for a notice still in flight; with additional slaves,
//                  each slave SAE fetches a key once); a request method the route does not
//                  take; a body over 64 KiB; "no such route" (not an ETSI 014 path).
//   503 + Error    "not enough key material: X bits requested, Y bits available" (the pool
//                  of this KME's direction holds less than number x size; nothing is
//                  consumed); "peer KME unreachable: ..." (with Retry-After: 1) for an
//                  enc_keys while the link has no session (nothing consumed), and for a
//                  dec_keys naming a key_ID not known here while it has none (its notice
//                  may be on its way); "internal error: ..." for an unexpected failure.
class EtsiService {
 public:
  EtsiService(const Config& config, KeyStore& store, std::function<LinkStats()> link_stats);

  // Entry point: 401 unless `caller` is one of this KME's SAEs, then the route table.
  [[nodiscard]] ApiResponse handle(const std::string& caller, const ApiRequest& req) const;

  [[nodiscard]] ApiResponse status(const std::string& caller, const std::string& slave) const;
  // GET /health (not an ETSI route; same mTLS and SAE check as the rest): 200 with
  // {"status": "ok", "link": "up" | "down"}.
  [[nodiscard]] ApiResponse health() const;
  [[nodiscard]] ApiResponse enc_keys(const std::string& caller, const std::string& slave,
                                     const ApiRequest& req, const RouteMatch& m) const;
  [[nodiscard]] ApiResponse dec_keys(const std::string& caller, const std::string& master,
                                     const ApiRequest& req, const RouteMatch& m) const;

  [[nodiscard]] std::uint32_t max_sae_id_count() const;

 private:
  const Config& config_;
  KeyStore& store_;
  std::function<LinkStats()> link_stats_;  // none: the link counts as up
  Router router_;

  [[nodiscard]] bool link_up() const;
  // 503 "peer KME unreachable: ...", Retry-After: 1.
  [[nodiscard]] ApiResponse peer_unreachable(std::string_view what) const;
};

}  // namespace qkd::kms
