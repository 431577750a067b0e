// The route table: matching, URL-decoded parameters, query parsing, and 400 for what is not a route.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "qkd/kms/api.hpp"

namespace {

using qkd::kms::ApiRequest;
using qkd::kms::ApiResponse;
using qkd::kms::RouteMatch;
using qkd::kms::Router;

Router make_router(RouteMatch& seen, std::string& which) {
  Router r;
  r.add("GET", "/api/v1/keys/{slave}/status",
        [&](const std::string&, const ApiRequest&, const RouteMatch& m) {
          seen = m;
          which = "status";
          return ApiResponse{200, "{}"};
        });
  r.add("POST", "/api/v1/keys/{slave}/enc_keys",
        [&](const std::string&, const ApiRequest&, const RouteMatch& m) {
          seen = m;
          which = "enc";
          return ApiResponse{200, "{}"};
        });
  return r;
}

TEST(Router, MatchesAndDecodesParameters) {
  RouteMatch m;
  std::string which;
  Router r = make_router(m, which);
  ApiResponse resp = r.dispatch("alice", ApiRequest{"GET", "/api/v1/keys/bob%2D1%20x/status", ""});
  EXPECT_EQ(resp.status, 200u);
  EXPECT_EQ(which, "status");
  EXPECT_EQ(m.params.at("slave"), "bob-1 x");
}

TEST(Router, ParsesQuery) {
  RouteMatch m;
  std::string which;
  Router r = make_router(m, which);
  r.add("GET", "/q", [&](const std::string&, const ApiRequest&, const RouteMatch& mm) {
    m = mm;
    return ApiResponse{200, ""};
  });
  EXPECT_EQ(r.dispatch("a", ApiRequest{"GET", "/q?number=3&size=1024&x=a%2Bb+c", ""}).status, 200u);
  EXPECT_EQ(m.query.find("number")->second, "3");
  EXPECT_EQ(m.query.find("size")->second, "1024");
  EXPECT_EQ(m.query.find("x")->second, "a+b c");
  EXPECT_EQ(r.dispatch("a", ApiRequest{"GET", "/q?bad=%zz", ""}).status, 400u);
}

TEST(Router, UnknownPathIs400WithErrorBody) {
  RouteMatch m;
  std::string which;
  Router r = make_router(m, which);
  for (const char* t : {"/", "/api/v1/keys/bob", "/api/v1/keys/bob/status/extra",
                        "/api/v1/keys//status", "/api/v2/keys/bob/status", "nonsense"}) {
    ApiResponse resp = r.dispatch("alice", ApiRequest{"GET", t, ""});
    EXPECT_EQ(resp.status, 400u) << t;
    EXPECT_NE(nlohmann::json::parse(resp.body).at("message").get<std::string>().find("no such route"),
              std::string::npos)
        << t;
  }
}

// An SAE ID whose percent-encoding is malformed is a 400 that says so, not "no such route".
TEST(Router, MalformedEscapeInAnSaeIdIsNamed) {
  RouteMatch m;
  std::string which;
  Router r = make_router(m, which);
  for (const char* t : {"/api/v1/keys/bob%ZZ/status", "/api/v1/keys/bob%2/status",
                        "/api/v1/keys/bob%00/status"}) {
    ApiResponse resp = r.dispatch("alice", ApiRequest{"GET", t, ""});
    EXPECT_EQ(resp.status, 400u) << t;
    EXPECT_NE(nlohmann::json::parse(resp.body).at("message").get<std::string>().find(
                  "malformed SAE ID in the path"),
              std::string::npos)
        << t << ": " << resp.body;
  }
}

TEST(Router, WrongMethodIs400) {
  RouteMatch m;
  std::string which;
  Router r = make_router(m, which);
  ApiResponse resp = r.dispatch("alice", ApiRequest{"DELETE", "/api/v1/keys/bob/status", ""});
  EXPECT_EQ(resp.status, 400u);
  EXPECT_NE(resp.body.find("DELETE"), std::string::npos);
  EXPECT_EQ(r.dispatch("alice", ApiRequest{"GET", "/api/v1/keys/bob/enc_keys", ""}).status, 400u);
}

TEST(Router, ErrorMappingInOnePlace) {
  using qkd::core::ErrorCode;
  EXPECT_EQ(qkd::kms::http_status_for(ErrorCode::kInvalidArgument), 400u);
  EXPECT_EQ(qkd::kms::http_status_for(ErrorCode::kAuthentication), 401u);
  EXPECT_EQ(qkd::kms::http_status_for(ErrorCode::kUnavailable), 503u);
  EXPECT_EQ(qkd::kms::error_response(401, "x").body, "");
  EXPECT_EQ(nlohmann::json::parse(qkd::kms::error_response(503, "no key").body)["message"],
            "no key");
}

}  // namespace
