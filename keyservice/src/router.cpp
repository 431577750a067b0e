#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "qkd/kms/api.hpp"
#include "qkd/kms/util.hpp"

namespace qkd::kms {

using qkd::core::ErrorCode;

unsigned http_status_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kProtocol:
      return 400;
    case ErrorCode::kAuthentication:
      return 401;
    case ErrorCode::kUnavailable:
    case ErrorCode::kTimeout:
    case ErrorCode::kClosed:
    case ErrorCode::kRejected:
    case ErrorCode::kInternal:
      return 503;
  }
  return 503;
}

std::string dump_json(const nlohmann::json& j) {
  // A message may quote the request (an SAE ID from the URL), which need not be UTF-8.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

ApiResponse error_response(unsigned status, std::string_view message) {
  if (status == 401) {
    return ApiResponse{401, ""};
  }
  return ApiResponse{status, dump_json(nlohmann::json{{"message", std::string(message)}})};
}

ApiResponse error_response(const qkd::core::Error& error) {
  return error_response(http_status_for(error.code), error.message);
}

namespace {

std::vector<std::string> split_path(std::string_view path) {
  std::vector<std::string> out;
  if (path.empty() || path.front() != '/') {
    return out;
  }
  std::size_t start = 1;
  for (;;) {
    const std::size_t slash = path.find('/', start);
    out.emplace_back(path.substr(
        start, slash == std::string_view::npos ? std::string_view::npos : slash - start));
    if (slash == std::string_view::npos) {
      break;
    }
    start = slash + 1;
  }
  return out;
}

bool parse_query(std::string_view q, std::multimap<std::string, std::string>& out) {
  std::size_t start = 0;
  while (start <= q.size() && !q.empty()) {
    const std::size_t amp = q.find('&', start);
    const std::string_view part =
        q.substr(start, amp == std::string_view::npos ? std::string_view::npos : amp - start);
    if (!part.empty()) {
      const std::size_t eq = part.find('=');
      auto key = url_decode(part.substr(0, eq), true);
      auto val =
          url_decode(eq == std::string_view::npos ? std::string_view{} : part.substr(eq + 1), true);
      if (!key || !val) {
        return false;
      }
      out.emplace(std::move(*key), std::move(*val));
    }
    if (amp == std::string_view::npos) {
      break;
    }
    start = amp + 1;
  }
  return true;
}

}  // namespace

void Router::add(std::string method, std::string pattern, RouteHandler handler) {
  routes_.push_back(Route{std::move(method), split_path(pattern), std::move(handler)});
}

ApiResponse Router::dispatch(const std::string& caller, const ApiRequest& req) const {
  const std::string_view target = req.target;
  const std::size_t qmark = target.find('?');
  const std::string_view path = target.substr(0, qmark);
  const std::vector<std::string> segs = split_path(path);
  bool path_known = false;
  bool bad_escape = false;  // a route's SAE ID segment had a malformed %XX
  for (const Route& r : routes_) {
    if (r.segments.size() != segs.size()) {
      continue;
    }
    RouteMatch m;
    bool ok = true;
    for (std::size_t i = 0; i < segs.size() && ok; ++i) {
      const std::string& p = r.segments[i];
      if (p.size() >= 2 && p.front() == '{' && p.back() == '}') {
        auto v = url_decode(segs[i], false);
        if (!v || v->empty()) {
          bad_escape = bad_escape || !v;
          ok = false;
        } else {
          m.params[p.substr(1, p.size() - 2)] = std::move(*v);
        }
      } else {
        ok = (p == segs[i]);
      }
    }
    if (!ok) {
      continue;
    }
    path_known = true;
    if (r.method != req.method) {
      continue;
    }
    if (qmark != std::string_view::npos && !parse_query(target.substr(qmark + 1), m.query)) {
      return error_response(400, "malformed query string");
    }
    return r.handler(caller, req, m);
  }
  if (path_known) {
    return error_response(400, fmt::format("method {} is not allowed on this route", req.method));
  }
  if (bad_escape) {
    return error_response(400, "malformed SAE ID in the path: a % must be followed by two hex "
                               "digits, and %00 is not allowed");
  }
  // Not a route of the API: still 400, the standard allowing no error codes but 400, 401
  // and 503.
  return error_response(400, "no such route: the API has /api/v1/keys/{SAE_ID}/status, "
                             "/enc_keys and /dec_keys");
}

}  // namespace qkd::kms
