// ETSI GS QKD 014 conformance suite: one test per rule of ETSI GS QKD 014 V1.1.1 (2019-02)
// (section names quoted in each test's comment), against a real qkd-kms pair started once
// for the suite.
//
// The network: alice-kme serves SAEs "alice" and "alice-2"; bob-kme serves "bob", "bob-2"
// and "bob 3" (an SAE ID that must be URL-encoded in a path). So max_SAE_ID_count is 3 at
// both KMEs (the peer's SAEs but the slave, plus this KME's but the master). keys: key_size 256, min 64, max 8192,
// max_key_per_request 128; max_key_count 300 keeps the pool small (the link pauses), so a
// request for more key than a full pool holds is a reliable 503.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "qkd/test/etsi_helpers.hpp"
#include "qkd/test/kme_network.hpp"
#include "qkd/test/network_suite.hpp"

namespace {

using nlohmann::json;
using qkd::test::dec_body;
using qkd::test::HttpResponse;
using qkd::test::HttpsTestClient;
using qkd::test::key_list;
using qkd::test::key_map;
using qkd::test::KeyBytes;
using qkd::test::KmeNetwork;
using qkd::test::KmeNetworkOptions;
using qkd::test::message_of;

constexpr const char* kNotFound = "one or more keys specified are not found on KME";
constexpr const char* kSizeMultiple = "size shall be a multiple of 8";
constexpr const char* kExtMandatory = "not all extension_mandatory parameters are supported";
constexpr std::uint64_t kMaxKeyCount = 300;

bool is_uuid_v4(const std::string& s) {
  static const std::regex re(
      "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
  return std::regex_match(s, re);
}

bool is_json_content_type(const HttpResponse& r) {
  return r.content_type.rfind("application/json", 0) == 0;
}

class Etsi014 : public qkd::test::SharedNetworkSuite<Etsi014> {
 protected:
  static void SetUpTestSuite() {
    KmeNetworkOptions o;
    o.dec_wait_ms = 1000;  // unknown key_IDs wait this long before "not found"
    o.max_key_count = kMaxKeyCount;
    o.extra_alice_saes = {"alice-2"};
    o.extra_bob_saes = {"bob-2", "bob 3"};
    start(qkd::test::start_network_with_keys(o, 200), 64);
  }

  // A client of SAE `sae` at alice-kme / bob-kme.
  static HttpsTestClient at_alice(const char* sae = "alice") {
    return net_->client(net_->alice(), sae);
  }
  static HttpsTestClient at_bob(const char* sae = "bob") { return net_->client(net_->bob(), sae); }

  static HttpResponse call(const HttpsTestClient& c, std::string_view method,
                           std::string_view target, std::string_view body = {}) {
    auto r = c.request(method, target, body);
    EXPECT_TRUE(r.ok()) << method << " " << target << ": " << r.error().message;
    return r.ok() ? r.value() : HttpResponse{};
  }
  static HttpResponse get(const HttpsTestClient& c, std::string_view target) {
    return call(c, "GET", target);
  }
  static HttpResponse post(const HttpsTestClient& c, std::string_view target,
                           std::string_view body) {
    return call(c, "POST", target, body);
  }

  // enc_keys at alice-kme by SAE alice for slave bob; asserts 200 and returns the keys.
  static std::vector<std::pair<std::string, KeyBytes>> alice_enc(const std::string& body) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", body);
    EXPECT_EQ(r.status, 200u) << r.body;
    return key_list(r);
  }

  // Runs `refused` (a request that must consume nothing) between two scrapes of alice-kme's
  // /metrics and checks that her direction of the pool (uncapped, in bytes) is unchanged;
  // retried while a block lands in between. False if no quiet pair of scrapes was found.
  static bool consumes_nothing(const std::function<void()>& refused) {
    EXPECT_TRUE(net_->wait_for_keys(kMaxKeyCount).ok());  // full: the link pauses
    auto scrape = [] {
      HttpResponse m = get(at_alice(), "/metrics");
      auto value = [&](const std::string& name) {
        const auto at = m.body.find("\n" + name + " ");
        return at == std::string::npos
                   ? -1.0
                   : std::stod(m.body.substr(at + name.size() + 2,
                                             m.body.find('\n', at + 1) - at - name.size() - 2));
      };
      return std::pair{value("qkd_kms_pool_committed_bytes{peer_kme_id=\"bob-kme\"}"),
                       value("qkd_kms_pool_bytes{peer_kme_id=\"bob-kme\",direction=\"local\"}")};
    };
    for (int attempt = 0; attempt < 20; ++attempt) {
      const auto before = scrape();
      refused();
      const auto after = scrape();
      if (before.first < 0 || before.second < 0) {
        ADD_FAILURE() << "pool metrics missing";
        return false;
      }
      if (before.first == after.first) {  // no block committed meanwhile
        EXPECT_EQ(after.second, before.second) << "pool bytes taken by a refused request";
        return true;
      }
    }
    return false;
  }

  static std::uint64_t stored_key_count(const HttpsTestClient& c, const std::string& slave) {
    HttpResponse r = get(c, fmt::format("/api/v1/keys/{}/status", slave));
    const json j = r.json();
    return j.is_object() && j.contains("stored_key_count")
               ? j.at("stored_key_count").get<std::uint64_t>()
               : 0;
  }

};

// ---- Transport and authentication ----

// "Transport and authentication": mutual certificate authentication; a connection whose
// SAE the KME cannot identify is rejected.
TEST_F(Etsi014, ConnectionWithoutClientCertificateIsRefused) {
  qkd::test::TlsIdentity anonymous = net_->sae("alice");
  anonymous.cert_file.clear();
  anonymous.key_file.clear();
  HttpsTestClient c(net_->alice().host, net_->alice().api_port, anonymous);
  auto r = c.get("/api/v1/keys/bob/status");
  // Refused in the TLS handshake: no HTTP answer at all, not even a 401.
  EXPECT_FALSE(r.ok()) << "answered " << r->status << " " << r->body;
}

// "Transport and authentication": HTTPS with TLS 1.2 or later: an SAE that offers TLS 1.2
// at most is served (mutual authentication as with 1.3).
TEST_F(Etsi014, Tls12ClientIsServed) {
  HttpsTestClient c = at_alice();
  c.tls12_only();
  HttpResponse r = get(c, "/api/v1/keys/bob/status");
  EXPECT_EQ(r.status, 200u) << r.body;
  qkd::test::TlsIdentity anonymous = net_->sae("alice");
  anonymous.cert_file.clear();
  anonymous.key_file.clear();
  HttpsTestClient no_cert(net_->alice().host, net_->alice().api_port, anonymous);
  no_cert.tls12_only();
  EXPECT_FALSE(no_cert.get("/api/v1/keys/bob/status").ok());
}

// Sends `request` (raw bytes) to alice-kme as SAE alice over the real `openssl s_client`
// with `args`, and returns what s_client printed (its session report and the response).
std::string s_client_exchange(const KmeNetwork& net, const std::string& request,
                              const std::string& args) {
  const qkd::test::TlsIdentity id = net.sae("alice");
  const auto in = net.dir() / "s_client-request.bin";
  {
    std::ofstream f(in, std::ios::binary);
    f << request;
  }
  const std::string cmd = fmt::format(
      "timeout 20 openssl s_client -connect 127.0.0.1:{} -cert '{}' -key '{}' -CAfile '{}' "
      "-ign_eof {} < '{}' 2>&1",
      net.alice().api_port, id.cert_file, id.key_file, id.ca_file, args, in.string());
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    return out;
  }
  char buf[1024];
  while (std::fgets(buf, sizeof buf, p) != nullptr) {
    out += buf;
  }
  ::pclose(p);
  return out;
}

// An SAE that resumes its TLS session (TLS 1.2 session IDs, TLS 1.3 tickets; most client
// stacks do by default) is served on the resumed session. Checked with the real `openssl
// s_client`: the second connection reuses the first one's session and gets a status.
TEST_F(Etsi014, ResumedTlsSessionsAreServed) {
  const auto sess = net_->dir() / "alice.sess";
  for (const char* version : {"-tls1_2", "-tls1_3"}) {
    SCOPED_TRACE(version);
    std::filesystem::remove(sess);
    auto run = [&](const std::string& sess_arg) {
      return s_client_exchange(
          *net_, "GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          fmt::format("{} {}", version, sess_arg));
    };
    const std::string first = run("-sess_out '" + sess.string() + "'");
    ASSERT_NE(first.find("HTTP/1.1 200"), std::string::npos) << first;
    const std::string second = run("-sess_in '" + sess.string() + "'");
    EXPECT_NE(second.find("Reused,"), std::string::npos) << second;
    EXPECT_NE(second.find("HTTP/1.1 200"), std::string::npos) << second;
  }
}

// Not a rule of the standard, but what an SAE (or anyone with a certificate) may send: a
// body over the limit (64 KiB), a request that is not HTTP, a header block over Beast's
// limit each get a 400 with a message, and a connection that never completes its TLS
// handshake holds up no one else.
TEST_F(Etsi014, HostileHttpGetsAClearErrorAndHoldsUpNoOne) {
  const std::string big(100 * 1024, 'x');
  HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", big);
  EXPECT_EQ(r.status, 400u);
  EXPECT_EQ(message_of(r), "request body too large") << r.body;

  const std::string garbage = s_client_exchange(*net_, "\x01\x02 GARBAGE\r\n\r\n", "");
  EXPECT_NE(garbage.find("HTTP/1.1 400"), std::string::npos) << garbage;
  EXPECT_NE(garbage.find("malformed HTTP request"), std::string::npos) << garbage;
  const std::string huge_header = s_client_exchange(
      *net_,
      "GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: x\r\nX-Filler: " +
          std::string(16 * 1024, 'y') + "\r\n\r\n",
      "");
  EXPECT_NE(huge_header.find("HTTP/1.1 400"), std::string::npos) << huge_header;

  // A plain TCP connection that says nothing: its TLS handshake waits (up to 10 s), the
  // next SAE is served meanwhile (a client that gives up after 5 s).
  const int idle = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(idle, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(net_->alice().api_port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(idle, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const HttpsTestClient patient_not(net_->alice().host, net_->alice().api_port,
                                    net_->sae("alice"), std::chrono::seconds(5));
  EXPECT_EQ(get(patient_not, "/api/v1/keys/bob/status").status, 200u);
  ::close(idle);
}

// HTTP/1.1 (RFC 9110 10.1.1): a client that sends "Expect: 100-continue" waits for an interim
// "100 Continue" before it sends the body (curl for a second, others until their timeout).
// Here the client sends nothing more until it has read "HTTP/1.1 100" (within 10 s, where
// the answer comes in milliseconds), then the body, and gets the keys.
TEST_F(Etsi014, ExpectContinueGetsAnInterimResponse) {
  const std::string body = R"({"number": 2})";
  const std::string head = fmt::format(
      "POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
      body.size());
  const HttpsTestClient alice(net_->alice().host, net_->alice().api_port, net_->sae("alice"),
                              std::chrono::seconds(10));
  auto got = alice.converse({{head, "HTTP/1.1 100"}, {body, ""}});
  ASSERT_TRUE(got.ok()) << got.error().message;
  ASSERT_EQ(got->rfind("HTTP/1.1 100 Continue\r\n", 0), 0u) << *got;
  const auto final_at = got->find("HTTP/1.1 200");
  ASSERT_NE(final_at, std::string::npos) << *got;
  const auto json_at = got->find("\r\n\r\n", final_at);
  ASSERT_NE(json_at, std::string::npos) << *got;
  HttpResponse r;
  r.status = 200;
  r.body = got->substr(json_at + 4);
  EXPECT_EQ(key_list(r).size(), 2u) << *got;
}

// "Transport and authentication" / "Status codes": the caller's SAE ID comes from its
// certificate; an SAE this KME does not serve gets 401 on every route.
TEST_F(Etsi014, UnknownSaeCertificateIs401OnEveryRoute) {
  const HttpsTestClient mallory = net_->client(net_->alice(), "mallory");
  EXPECT_EQ(get(mallory, "/api/v1/keys/bob/status").status, 401u);
  EXPECT_EQ(get(mallory, "/api/v1/keys/bob/enc_keys").status, 401u);
  EXPECT_EQ(post(mallory, "/api/v1/keys/bob/enc_keys", "{}").status, 401u);
  EXPECT_EQ(get(mallory, "/api/v1/keys/bob/dec_keys?key_ID=0f0e0d0c-0b0a-4908-8706-050403020100")
                .status,
            401u);
  EXPECT_EQ(post(mallory, "/api/v1/keys/bob/dec_keys",
                 R"({"key_IDs": [{"key_ID": "0f0e0d0c-0b0a-4908-8706-050403020100"}]})")
                .status,
            401u);
  // An SAE served by the *other* KME is unknown here too.
  EXPECT_EQ(get(net_->client(net_->alice(), "bob"), "/api/v1/keys/bob/status").status, 401u);
}

// "Transport and authentication": JSON bodies with Content-Type application/json, for
// successes and errors alike.
TEST_F(Etsi014, ResponsesAreJsonWithTheJsonContentType) {
  for (const HttpResponse& r :
       {get(at_alice(), "/api/v1/keys/bob/status"), get(at_alice(), "/api/v1/keys/bob/enc_keys"),
        get(at_alice(), "/api/v1/keys/bob/enc_keys?size=7"),
        post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 128, "size": 8192})")}) {
    EXPECT_TRUE(is_json_content_type(r)) << r.status << " " << r.content_type;
    EXPECT_FALSE(r.json().is_discarded()) << r.body;
  }
}

// ---- Routes ----

// "Routes": GET /api/v1/keys/{slave_SAE_ID}/status.
TEST_F(Etsi014, StatusByGet) {
  HttpResponse r = get(at_alice(), "/api/v1/keys/bob/status");
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.json().at("slave_SAE_ID"), "bob");
}

// "Routes": enc_keys by GET, with no query (one key of the default size), number and size,
// or number alone (that many keys of the default size).
TEST_F(Etsi014, EncKeysByGet) {
  const struct {
    const char* query;
    std::size_t keys;
    std::size_t bytes;
  } cases[] = {{"", 1, 32}, {"?number=3&size=1024", 3, 128}, {"?number=2", 2, 32}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.query);
    HttpResponse r = get(at_alice(), std::string("/api/v1/keys/bob/enc_keys") + c.query);
    ASSERT_EQ(r.status, 200u) << r.body;
    auto keys = key_list(r);
    ASSERT_EQ(keys.size(), c.keys);
    for (const auto& [id, key] : keys) {
      EXPECT_EQ(key.size(), c.bytes);
    }
  }
}

// "Routes": dec_keys by GET takes a single key_ID: none is a 400.
TEST_F(Etsi014, DecKeysByGetWithoutKeyIdIs400) {
  for (const char* target : {"/api/v1/keys/alice/dec_keys", "/api/v1/keys/alice/dec_keys?"}) {
    HttpResponse r = get(at_bob(), target);
    EXPECT_EQ(r.status, 400u) << target;
    EXPECT_NE(message_of(r).find("key_ID"), std::string::npos) << r.body;
  }
}

// "Routes: SAE IDs in the path are URL-encoded": the path is split first, then each part
// decoded, so an encoded '/' or '%' is part of the SAE ID, not a path separator.
TEST_F(Etsi014, EncodedSlashAndPercentStayInTheSaeId) {
  HttpResponse slash = get(at_alice(), "/api/v1/keys/bob%2F3/status");
  EXPECT_EQ(slash.status, 400u);
  EXPECT_NE(message_of(slash).find("\"bob/3\""), std::string::npos) << slash.body;
  HttpResponse percent = get(at_alice(), "/api/v1/keys/bob%253/enc_keys");
  EXPECT_EQ(percent.status, 400u);
  EXPECT_NE(message_of(percent).find("\"bob%3\""), std::string::npos) << percent.body;
}

// "Routes": by GET only number and size; every other request is a POST.
TEST_F(Etsi014, EncKeysByGetTakesOnlyNumberAndSize) {
  HttpResponse r = get(at_alice(), "/api/v1/keys/bob/enc_keys?number=1&additional_slave_SAE_IDs=bob-2");
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(message_of(r).find("additional_slave_SAE_IDs"), std::string::npos) << r.body;
}

// "Routes": enc_keys by POST with a Key request body.
TEST_F(Etsi014, EncKeysByPost) {
  auto keys = alice_enc(R"({"number": 2, "size": 512})");
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0].second.size(), 64u);
}

// "Routes": POST carries a Key request body; number and size as query parameters belong to
// GET only. A POST with a query is a 400 (the query was ignored: one key of the default size).
TEST_F(Etsi014, EncKeysByPostTakesNoQueryParameters) {
  for (const char* body : {"", "{}", R"({"number": 1})"}) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys?number=5&size=512", body);
    EXPECT_EQ(r.status, 400u) << body << ": " << r.body;
    EXPECT_NE(message_of(r).find("query string"), std::string::npos) << r.body;
  }
}

// "Routes": GET carries only number and size, as query parameters, and no body. A GET with a
// Key request body is a 400 (the body was ignored: one key).
TEST_F(Etsi014, EncKeysByGetTakesNoBody) {
  HttpResponse r = call(at_alice(), "GET", "/api/v1/keys/bob/enc_keys", R"({"number": 5})");
  EXPECT_EQ(r.status, 400u) << r.body;
  EXPECT_NE(message_of(r).find("no body"), std::string::npos) << r.body;
}

// "Routes": dec_keys by POST carries its key_IDs in a Key IDs body: a key_ID in the query as
// well is a 400, and nothing is delivered.
TEST_F(Etsi014, DecKeysByPostTakesNoQueryParameters) {
  auto keys = alice_enc(R"({"number": 2})");
  ASSERT_EQ(keys.size(), 2u);
  HttpResponse r = post(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first,
                        dec_body({keys[1].first}));
  EXPECT_EQ(r.status, 400u) << r.body;
  EXPECT_NE(message_of(r).find("query string"), std::string::npos) << r.body;
  EXPECT_EQ(post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({keys[0].first, keys[1].first}))
                .status,
            200u);
}

// "Routes": dec_keys by GET takes one key_ID in the query and no body: a Key IDs body is a
// 400, and nothing is delivered.
TEST_F(Etsi014, DecKeysByGetTakesNoBody) {
  auto keys = alice_enc(R"({"number": 2})");
  ASSERT_EQ(keys.size(), 2u);
  HttpResponse r = call(at_bob(), "GET", "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first,
                        dec_body({keys[1].first}));
  EXPECT_EQ(r.status, 400u) << r.body;
  EXPECT_NE(message_of(r).find("no body"), std::string::npos) << r.body;
  EXPECT_EQ(post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({keys[0].first, keys[1].first}))
                .status,
            200u);
}

// "Routes": dec_keys by GET for a single key_ID, at the slave's KME, with the master in the
// path; the bytes are those the master got.
TEST_F(Etsi014, DecKeysByGetForOneKeyId) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  HttpResponse r =
      get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
  ASSERT_EQ(r.status, 200u) << r.body;
  auto got = key_list(r);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], keys[0]);
}

// "Routes": two or more key_IDs need POST; a GET with two is a 400.
TEST_F(Etsi014, DecKeysByGetWithTwoKeyIdsIs400) {
  auto keys = alice_enc(R"({"number": 2})");
  ASSERT_EQ(keys.size(), 2u);
  HttpResponse r = get(at_bob(), fmt::format("/api/v1/keys/alice/dec_keys?key_ID={}&key_ID={}",
                                             keys[0].first, keys[1].first));
  EXPECT_EQ(r.status, 400u);
  // Nothing was consumed.
  EXPECT_EQ(post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({keys[0].first, keys[1].first}))
                .status,
            200u);
}

// "Routes": dec_keys by POST with a Key IDs body; keys come back in the order asked.
TEST_F(Etsi014, DecKeysByPostForSeveralKeyIds) {
  auto keys = alice_enc(R"({"number": 4})");
  ASSERT_EQ(keys.size(), 4u);
  std::vector<std::string> ids;
  for (auto it = keys.rbegin(); it != keys.rend(); ++it) {
    ids.push_back(it->first);
  }
  HttpResponse r = post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body(ids));
  ASSERT_EQ(r.status, 200u) << r.body;
  auto got = key_list(r);
  ASSERT_EQ(got.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(got[i], keys[3 - i]);
  }
}

// "Routes": the dec_keys path names the *master* SAE (follow the table, not the GET
// example): naming the slave there is refused.
TEST_F(Etsi014, DecKeysPathNamesTheMaster) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/bob/dec_keys?key_ID=" + keys[0].first).status, 401u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status, 200u);
}

// "Routes (SAE IDs in the path are URL-encoded)": "bob 3" travels as bob%203, in status,
// enc_keys and dec_keys, and comes back decoded.
TEST_F(Etsi014, SaeIdsInThePathAreUrlDecoded) {
  HttpResponse st = get(at_alice(), "/api/v1/keys/bob%203/status");
  ASSERT_EQ(st.status, 200u) << st.body;
  EXPECT_EQ(st.json().at("slave_SAE_ID"), "bob 3");
  HttpResponse enc = get(at_alice(), "/api/v1/keys/bob%203/enc_keys");
  ASSERT_EQ(enc.status, 200u) << enc.body;
  auto keys = key_list(enc);
  ASSERT_EQ(keys.size(), 1u);
  // The caller "bob 3" fetches it; "bob" (the wrong slave) may not.
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status, 401u);
  HttpResponse dec = get(at_bob("bob 3"), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
  ASSERT_EQ(dec.status, 200u) << dec.body;
  EXPECT_EQ(key_list(dec), keys);
  // And as a master: "bob 3" asks for keys for alice; alice fetches with bob%203 as master.
  HttpResponse enc2 = get(at_bob("bob 3"), "/api/v1/keys/alice/enc_keys");
  ASSERT_EQ(enc2.status, 200u) << enc2.body;
  auto keys2 = key_list(enc2);
  ASSERT_EQ(keys2.size(), 1u);
  HttpResponse dec2 = get(at_alice(), "/api/v1/keys/bob%203/dec_keys?key_ID=" + keys2[0].first);
  ASSERT_EQ(dec2.status, 200u) << dec2.body;
  EXPECT_EQ(key_list(dec2), keys2);
}

// "Only three error codes": a path that is not an ETSI route, and a route with a method it
// does not take, are both 400 with an Error body.
TEST_F(Etsi014, UnknownRoutesAndOtherMethodsAre400) {
  HttpResponse unknown = get(at_alice(), "/api/v1/keys/bob/nothing");
  EXPECT_EQ(unknown.status, 400u);
  EXPECT_NE(unknown.body.find("no such route"), std::string::npos) << unknown.body;
  EXPECT_EQ(post(at_alice(), "/api/v1/keys/bob/status", "{}").status, 400u);
  HttpResponse del = call(at_alice(), "DELETE", "/api/v1/keys/bob/enc_keys");
  EXPECT_EQ(del.status, 400u);
  EXPECT_FALSE(message_of(del).empty());
  EXPECT_EQ(call(at_alice(), "PUT", "/api/v1/keys/alice/dec_keys", "{}").status, 400u);
}

// HTTP (RFC 9110 9.3.2): the answer to a HEAD (a 400 here, as for any other method the
// route does not take) carries no body, so the next response on a kept-alive connection is
// read from its first byte.
TEST_F(Etsi014, HeadIsAnsweredWithoutABody) {
  const HttpsTestClient alice(net_->alice().host, net_->alice().api_port, net_->sae("alice"),
                              std::chrono::seconds(10));
  auto got = alice.converse(
      {{"HEAD /api/v1/keys/bob/status HTTP/1.1\r\nHost: x\r\n\r\n", "\r\n\r\n"},
       {"GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", ""}});
  ASSERT_TRUE(got.ok()) << got.error().message;
  ASSERT_EQ(got->rfind("HTTP/1.1 400", 0), 0u) << *got;
  EXPECT_NE(got->find("Content-Length: "), std::string::npos) << *got;
  const auto head_end = got->find("\r\n\r\n");
  ASSERT_NE(head_end, std::string::npos) << *got;
  EXPECT_EQ(got->substr(head_end + 4, 12), "HTTP/1.1 200") << *got;
}

// "Routes": status takes no parameters; a query or a body, which it would ignore, is a 400
// as on the other routes.
TEST_F(Etsi014, StatusTakesNoParametersAndNoBody) {
  HttpResponse query = get(at_alice(), "/api/v1/keys/bob/status?number=2");
  EXPECT_EQ(query.status, 400u) << query.body;
  EXPECT_EQ(message_of(query), "status takes no query parameters");
  HttpResponse body = call(at_alice(), "GET", "/api/v1/keys/bob/status", "{}");
  EXPECT_EQ(body.status, 400u) << body.body;
  EXPECT_NE(message_of(body).find("takes no body"), std::string::npos) << body.body;
  EXPECT_EQ(get(at_alice(), "/api/v1/keys/bob/status").status, 200u);
}

// "Routes": the slave SAE in the path must be one this KME can reach.
TEST_F(Etsi014, UnknownSlaveSaeIs400) {
  for (const char* target : {"/api/v1/keys/carol/status", "/api/v1/keys/carol/enc_keys",
                             "/api/v1/keys/alice-2/enc_keys"}) {
    HttpResponse r = get(at_alice(), target);
    EXPECT_EQ(r.status, 400u) << target;
    EXPECT_NE(message_of(r).find("not reachable"), std::string::npos) << r.body;
  }
}

// ---- Bodies: Status ----

// "Bodies: Status": every field, with its type and value.
TEST_F(Etsi014, StatusHasEveryFieldWithItsValue) {
  for (bool at_a : {true, false}) {
    HttpResponse r = at_a ? get(at_alice("alice-2"), "/api/v1/keys/bob-2/status")
                          : get(at_bob("bob-2"), "/api/v1/keys/alice-2/status");
    ASSERT_EQ(r.status, 200u) << r.body;
    const json j = r.json();
    EXPECT_EQ(j.at("source_KME_ID"), at_a ? "alice-kme" : "bob-kme");
    EXPECT_EQ(j.at("target_KME_ID"), at_a ? "bob-kme" : "alice-kme");
    EXPECT_EQ(j.at("master_SAE_ID"), at_a ? "alice-2" : "bob-2");  // the caller
    EXPECT_EQ(j.at("slave_SAE_ID"), at_a ? "bob-2" : "alice-2");
    for (const char* f : {"key_size", "stored_key_count", "max_key_count", "max_key_per_request",
                          "max_key_size", "min_key_size", "max_SAE_ID_count"}) {
      ASSERT_TRUE(j.contains(f)) << f;
      EXPECT_TRUE(j.at(f).is_number_integer()) << f;
    }
    EXPECT_EQ(j.at("key_size"), 256);
    EXPECT_EQ(j.at("max_key_count"), kMaxKeyCount);
    EXPECT_EQ(j.at("max_key_per_request"), 128);
    EXPECT_EQ(j.at("max_key_size"), 8192);
    EXPECT_EQ(j.at("min_key_size"), 64);
    EXPECT_GE(j.at("stored_key_count").get<std::uint64_t>(), 64u);
    EXPECT_LE(j.at("stored_key_count").get<std::uint64_t>(), kMaxKeyCount);
    // Multicast: the peer's SAEs other than the slave plus this KME's other than the master:
    // 2 + 1 at alice-kme, 1 + 2 at bob-kme.
    EXPECT_EQ(j.at("max_SAE_ID_count"), 3);
    ASSERT_TRUE(j.contains("status_extension"));
    EXPECT_TRUE(j.at("status_extension").is_object());
  }
}

// ---- Bodies: Key request ----

// "Bodies: Key request": every field is optional, the body may be empty; number defaults
// to 1, size to key_size.
TEST_F(Etsi014, KeyRequestDefaults) {
  for (const char* body : {"", "{}"}) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", body);
    ASSERT_EQ(r.status, 200u) << "body '" << body << "': " << r.body;
    auto keys = key_list(r);
    ASSERT_EQ(keys.size(), 1u);
    EXPECT_EQ(keys[0].second.size(), 256u / 8);
  }
}

// "Status codes and fixed messages": size not a multiple of 8 gets the standard's message
// (this KME supports whole bytes only), by GET and by POST.
TEST_F(Etsi014, SizeNotAMultipleOf8IsTheStandardMessage) {
  HttpResponse g = get(at_alice(), "/api/v1/keys/bob/enc_keys?size=260");
  EXPECT_EQ(g.status, 400u);
  EXPECT_EQ(message_of(g), kSizeMultiple);
  HttpResponse p = post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"size": 1001})");
  EXPECT_EQ(p.status, 400u);
  EXPECT_EQ(message_of(p), kSizeMultiple);
}

// "Bodies: Status" (min_key_size / max_key_size): sizes outside the limits are 400, the
// limits themselves are served.
TEST_F(Etsi014, KeySizeLimits) {
  HttpResponse small = post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"size": 56})");
  EXPECT_EQ(small.status, 400u);
  EXPECT_NE(message_of(small).find("min_key_size"), std::string::npos) << small.body;
  HttpResponse big = post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"size": 8200})");
  EXPECT_EQ(big.status, 400u);
  EXPECT_NE(message_of(big).find("max_key_size"), std::string::npos) << big.body;
  auto min_keys = alice_enc(R"({"size": 64})");
  ASSERT_EQ(min_keys.size(), 1u);
  EXPECT_EQ(min_keys[0].second.size(), 8u);
  auto max_keys = alice_enc(R"({"size": 8192})");
  ASSERT_EQ(max_keys.size(), 1u);
  EXPECT_EQ(max_keys[0].second.size(), 1024u);
}

// "Bodies: Status" (max_key_per_request): number above it is 400, number equal to it is
// served with exactly that many keys; number 0 is 400.
TEST_F(Etsi014, NumberLimits) {
  HttpResponse over = get(at_alice(), "/api/v1/keys/bob/enc_keys?number=129&size=64");
  EXPECT_EQ(over.status, 400u);
  EXPECT_NE(message_of(over).find("max_key_per_request"), std::string::npos) << over.body;
  HttpResponse zero = post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 0})");
  EXPECT_EQ(zero.status, 400u);
  EXPECT_EQ(alice_enc(R"({"number": 128, "size": 64})").size(), 128u);
}

// "Bodies: Key request" / "Status codes": wrong field types are 400 with an Error body.
TEST_F(Etsi014, WrongFieldTypesAre400) {
  for (const char* body :
       {R"({"number": "3"})", R"({"size": -8})", R"({"number": 1.5})",
        R"({"additional_slave_SAE_IDs": "bob-2"})", R"({"additional_slave_SAE_IDs": [7]})",
        R"({"extension_mandatory": {"x": 1}})", R"({"extension_optional": [1]})", "[1, 2]",

        R"({"number": 99999999999})",
        // 2^32 + 1 and 2^32 + 64: cut to 32 bits they would be a valid 1 and 64.
        R"({"number": 4294967297})", R"({"size": 4294967360})"}) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", body);
    EXPECT_EQ(r.status, 400u) << body;
    EXPECT_FALSE(message_of(r).empty()) << body;
  }
  for (const char* q : {"?number=abc", "?size=-8", "?number=1&number=2", "?number=4294967297",
                        "?size=4294967360"}) {
    EXPECT_EQ(get(at_alice(), std::string("/api/v1/keys/bob/enc_keys") + q).status, 400u) << q;
  }
  // "arrays of one-member name/value objects": anything else is malformed, also where an
  // extension would be refused or ignored anyway.
  for (const char* body : {R"({"extension_mandatory": [{}]})",
                           R"({"extension_mandatory": [{"abc_a": 1, "abc_b": 2}]})",
                           R"({"extension_optional": [{}]})",
                           R"({"extension_optional": [{"abc_a": 1}, {"abc_b": 2, "abc_c": 3}]})"}) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", body);
    EXPECT_EQ(r.status, 400u) << body;
    EXPECT_NE(message_of(r).find("one-member objects"), std::string::npos) << r.body;
  }
}

// "Status codes": malformed JSON is a 400 with an Error body, on enc_keys and dec_keys, and
// the KME keeps serving.
TEST_F(Etsi014, MalformedJsonIs400) {
  for (const char* target : {"/api/v1/keys/bob/enc_keys", "/api/v1/keys/bob/dec_keys"}) {
    for (const char* body : {"{", "{\"number\": }", "not json", "{\"key_IDs\": [}"}) {
      HttpResponse r = post(at_alice(), target, body);
      EXPECT_EQ(r.status, 400u) << target << " " << body;
      EXPECT_NE(message_of(r).find("JSON"), std::string::npos) << r.body;
    }
  }
  EXPECT_EQ(get(at_alice(), "/api/v1/keys/bob/status").status, 200u);
}

// Unknown fields in a Key request (not defined by the standard) are ignored, like
// extension_optional: the request is served.
TEST_F(Etsi014, UnknownKeyRequestFieldsAreIgnored) {
  HttpResponse r =
      post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 1, "vendor_hint": {"a": 1}})");
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(key_list(r).size(), 1u);
}

// "Status codes and fixed messages": an unsupported extension_mandatory gets the standard's
// message; nothing is consumed.
TEST_F(Etsi014, UnsupportedExtensionMandatoryIsTheStandardMessage) {
  HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys",
                        R"({"extension_mandatory": [{"abc_route_type": "direct"}]})");
  EXPECT_EQ(r.status, 400u);
  EXPECT_EQ(message_of(r), kExtMandatory);
  EXPECT_TRUE(consumes_nothing([] {
    HttpResponse again = post(at_alice(), "/api/v1/keys/bob/enc_keys",
                              R"({"number": 3, "extension_mandatory": [{"abc_route_type": 1}]})");
    EXPECT_EQ(again.status, 400u) << again.body;
  })) << "never two scrapes without a block between them";
}

// "Bodies: Key request": an empty extension_mandatory asks for nothing: served.
TEST_F(Etsi014, EmptyExtensionMandatoryIsServed) {
  EXPECT_EQ(alice_enc(R"({"extension_mandatory": []})").size(), 1u);
}

// "Status codes and fixed messages" ("not all extension_optional request options handled"
// is allowed, not required): extension_optional is ignored and the request served.
TEST_F(Etsi014, ExtensionOptionalIsIgnored) {
  auto keys = alice_enc(
      R"({"number": 2, "extension_optional": [{"abc_route_type": "indirect"}, {"xyz_qos": 5}]})");
  EXPECT_EQ(keys.size(), 2u);
}

// "Bodies: Key request": additional_slave_SAE_IDs holds at most max_SAE_ID_count IDs:
// exactly that many is served.
TEST_F(Etsi014, MaxSaeIdCountAdditionalSlavesAreServed) {
  auto keys = alice_enc(R"({"additional_slave_SAE_IDs": ["bob-2", "bob 3", "alice-2"]})");
  ASSERT_EQ(keys.size(), 1u);
  for (const char* slave : {"bob", "bob-2", "bob 3"}) {
    HttpResponse r = get(at_bob(slave), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
    ASSERT_EQ(r.status, 200u) << slave << ": " << r.body;
    EXPECT_EQ(key_list(r), keys);
  }
  HttpResponse local = get(at_alice("alice-2"), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
  ASSERT_EQ(local.status, 200u) << local.body;
  EXPECT_EQ(key_list(local), keys);
}

// "Bodies: Key request": additional_slave_SAE_IDs holds at most max_SAE_ID_count IDs.
TEST_F(Etsi014, MoreAdditionalSlavesThanMaxSaeIdCountIs400) {
  // alice-kme: max_SAE_ID_count 3; four additional slaves are too many even before
  // looking at who they are.
  HttpResponse r =
      post(at_alice(), "/api/v1/keys/bob/enc_keys",
           R"({"additional_slave_SAE_IDs": ["bob-2", "bob 3", "alice-2", "bob-4"]})");
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(message_of(r).find("at most 3"), std::string::npos) << r.body;
}

// "Bodies: Key request": an additional slave must be an SAE this KME or its peer serves,
// named once, and neither the slave again nor the master.
TEST_F(Etsi014, UnknownOrRepeatedAdditionalSlaveIs400) {
  for (const char* body : {R"({"additional_slave_SAE_IDs": ["carol"]})",
                           R"({"additional_slave_SAE_IDs": ["bob"]})",
                           R"({"additional_slave_SAE_IDs": ["bob-2", "bob-2"]})",
                           R"({"additional_slave_SAE_IDs": ["alice"]})",
                           R"({"additional_slave_SAE_IDs": ["alice-2", "alice-2"]})"}) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", body);
    EXPECT_EQ(r.status, 400u) << body;
    EXPECT_FALSE(message_of(r).empty());
  }
}

// "Bodies: Key request" (additional_slave_SAE_IDs, multicast to slaves at the peer KME):
// every named slave fetches the key once at its KME, with the master's bytes; a second
// fetch by the same slave is "not found"; a slave not named gets 401.
TEST_F(Etsi014, MulticastEveryNamedSlaveFetchesOnce) {
  auto keys = alice_enc(R"({"number": 2, "additional_slave_SAE_IDs": ["bob-2", "bob 3"]})");
  ASSERT_EQ(keys.size(), 2u);
  const std::vector<std::string> ids = {keys[0].first, keys[1].first};
  for (const char* slave : {"bob 3", "bob", "bob-2"}) {
    SCOPED_TRACE(slave);
    HttpResponse r = post(at_bob(slave), "/api/v1/keys/alice/dec_keys", dec_body(ids));
    ASSERT_EQ(r.status, 200u) << r.body;
    EXPECT_EQ(key_list(r), keys);
    HttpResponse again = get(at_bob(slave), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[1]);
    EXPECT_EQ(again.status, 400u);
    EXPECT_EQ(message_of(again), kNotFound);
  }
  // After the last slave: gone on bob-kme.
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[0]).status, 400u);
}

// "Rules: Who may fetch": a key with additional slaves is still refused (401) to an SAE not
// named, and to a named slave giving the wrong master; nothing is consumed.
TEST_F(Etsi014, MulticastKeyIsRefusedToSaesNotNamed) {
  auto keys = alice_enc(R"({"additional_slave_SAE_IDs": ["bob-2"]})");
  ASSERT_EQ(keys.size(), 1u);
  const std::string& id = keys[0].first;
  EXPECT_EQ(get(at_bob("bob 3"), "/api/v1/keys/alice/dec_keys?key_ID=" + id).status, 401u);
  EXPECT_EQ(get(at_bob("bob-2"), "/api/v1/keys/alice-2/dec_keys?key_ID=" + id).status, 401u);
  for (const char* slave : {"bob-2", "bob"}) {
    HttpResponse r = get(at_bob(slave), "/api/v1/keys/alice/dec_keys?key_ID=" + id);
    ASSERT_EQ(r.status, 200u) << slave << ": " << r.body;
    EXPECT_EQ(key_list(r), keys);
  }
}

// "Bodies: Key request" (additional_slave_SAE_IDs, multicast to a slave at THIS KME): the
// master's own KME keeps the key for its local slave, which fetches it there once with the
// master's bytes; the slaves at the peer fetch theirs at the peer; nobody else gets it.
TEST_F(Etsi014, MulticastToSlaveAtThisKme) {
  auto keys = alice_enc(R"({"number": 2, "additional_slave_SAE_IDs": ["alice-2", "bob-2"]})");
  ASSERT_EQ(keys.size(), 2u);
  const std::vector<std::string> ids = {keys[0].first, keys[1].first};
  // Refused, nothing consumed: the master itself, a wrong master, an SAE not named.
  EXPECT_EQ(get(at_alice(), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[0]).status, 401u);
  EXPECT_EQ(get(at_alice("alice-2"), "/api/v1/keys/bob/dec_keys?key_ID=" + ids[0]).status, 401u);
  EXPECT_EQ(get(at_bob("bob 3"), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[0]).status, 401u);
  // The local slave at alice-kme, once.
  HttpResponse local = post(at_alice("alice-2"), "/api/v1/keys/alice/dec_keys", dec_body(ids));
  ASSERT_EQ(local.status, 200u) << local.body;
  EXPECT_EQ(key_list(local), keys);
  HttpResponse again = get(at_alice("alice-2"), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[1]);
  EXPECT_EQ(again.status, 400u);
  EXPECT_EQ(message_of(again), kNotFound);
  // The slaves at bob-kme, once each; the local slave is not one of theirs.
  EXPECT_EQ(get(at_bob("bob 3"), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[1]).status, 401u);
  for (const char* slave : {"bob", "bob-2"}) {
    SCOPED_TRACE(slave);
    HttpResponse r = post(at_bob(slave), "/api/v1/keys/alice/dec_keys", dec_body(ids));
    ASSERT_EQ(r.status, 200u) << r.body;
    EXPECT_EQ(key_list(r), keys);
  }
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + ids[0]).status, 400u);
}

// The same from the link's other end, with only a local additional slave: bob-kme keeps the
// key for "bob-2", and "alice" fetches it at alice-kme; each once.
TEST_F(Etsi014, MulticastToSlaveAtThisKmeFromTheOtherEnd) {
  HttpResponse r = post(at_bob(), "/api/v1/keys/alice/enc_keys",
                        R"({"additional_slave_SAE_IDs": ["bob-2"]})");
  ASSERT_EQ(r.status, 200u) << r.body;
  auto keys = key_list(r);
  ASSERT_EQ(keys.size(), 1u);
  const std::string path = "/api/v1/keys/bob/dec_keys?key_ID=" + keys[0].first;
  HttpResponse at_b = get(at_bob("bob-2"), path);
  ASSERT_EQ(at_b.status, 200u) << at_b.body;
  EXPECT_EQ(key_list(at_b), keys);
  HttpResponse at_a = get(at_alice(), path);
  ASSERT_EQ(at_a.status, 200u) << at_a.body;
  EXPECT_EQ(key_list(at_a), keys);
  EXPECT_EQ(get(at_bob("bob-2"), path).status, 400u);
  EXPECT_EQ(get(at_alice(), path).status, 400u);
}

// ---- Bodies: Key container ----

// "Bodies: Key container" / "Rules: key_ID": {"keys": [{"key_ID", "key"}]}, key_IDs random
// (version 4) UUIDs, all distinct, and no two keys alike.
TEST_F(Etsi014, KeyIdsAreDistinctRandomUuids) {
  std::set<std::string> ids;
  std::set<std::string> bytes;  // key bytes as strings
  for (int i = 0; i < 4; ++i) {
    HttpResponse r = post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 16})");
    ASSERT_EQ(r.status, 200u) << r.body;
    const json j = r.json();
    ASSERT_TRUE(j.is_object() && j.at("keys").is_array());
    for (const auto& k : j.at("keys")) {
      const std::string id = k.at("key_ID").get<std::string>();
      EXPECT_TRUE(is_uuid_v4(id)) << id;
      EXPECT_TRUE(ids.insert(id).second) << "key_ID repeated: " << id;
    }
    for (auto& [id, key] : key_list(r)) {
      EXPECT_TRUE(bytes.insert(std::string(key.begin(), key.end())).second)
          << "key bytes repeated";
    }
  }
  EXPECT_EQ(ids.size(), 64u);
}

// "Bodies: Key container" / "Rules: sizes": key is base64 (RFC 4648, padded) of whole
// bytes: size / 8 bytes.
TEST_F(Etsi014, KeysAreBase64OfWholeBytes) {
  for (unsigned size : {64u, 72u, 80u, 256u, 264u}) {
    HttpResponse r = get(at_alice(), fmt::format("/api/v1/keys/bob/enc_keys?size={}", size));
    ASSERT_EQ(r.status, 200u) << r.body;
    const std::string b64 = r.json().at("keys").at(0).at("key").get<std::string>();
    EXPECT_EQ(b64.size() % 4, 0u) << b64;
    EXPECT_EQ(b64.find_first_not_of(
                  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="),
              std::string::npos);
    EXPECT_EQ(qkd::test::b64decode(b64).size(), size / 8);
  }
}

// ---- Rules that are easy to get wrong ----

// "Rules: Who may fetch": dec_keys by an SAE that is not the key's slave is 401, and the
// key stays for its slave.
TEST_F(Etsi014, DecKeysByAnotherSaeIs401) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  HttpResponse r = get(at_bob("bob-2"), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
  EXPECT_EQ(r.status, 401u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status, 200u);
}

// "Rules: Who may fetch": the master named in the path must be the key's master.
TEST_F(Etsi014, DecKeysWithTheWrongMasterIs401) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice-2/dec_keys?key_ID=" + keys[0].first).status, 401u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status, 200u);
}

// "Rules: Who may fetch": 401 when the caller may not have *every* key requested; none of
// them is delivered.
TEST_F(Etsi014, DecKeysIs401UnlessTheCallerMayHaveEveryKey) {
  auto mine = alice_enc("{}");
  HttpResponse other = post(at_alice("alice-2"), "/api/v1/keys/bob/enc_keys", "{}");
  ASSERT_EQ(other.status, 200u);
  auto theirs = key_list(other);
  ASSERT_EQ(mine.size(), 1u);
  ASSERT_EQ(theirs.size(), 1u);
  HttpResponse r = post(at_bob(), "/api/v1/keys/alice/dec_keys",
                        dec_body({mine[0].first, theirs[0].first}));
  EXPECT_EQ(r.status, 401u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + mine[0].first).status, 200u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice-2/dec_keys?key_ID=" + theirs[0].first).status,
            200u);
}

// "Rules: One use": at the slave's KME a second dec_keys of a key is 400 "not found".
TEST_F(Etsi014, SecondDecKeysIsNotFound) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  const std::string target = "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first;
  ASSERT_EQ(get(at_bob(), target).status, 200u);
  HttpResponse again = get(at_bob(), target);
  EXPECT_EQ(again.status, 400u);
  EXPECT_EQ(message_of(again), kNotFound);
}

// "Rules: Who may fetch" outlives the key: once delivered, the key is 401 to an SAE that was
// not its slave, or with another master in the path, as before its delivery (400 "not
// found" is for its slave only).
TEST_F(Etsi014, DeliveredKeyIsStill401ToWhoMayNotHaveIt) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  ASSERT_EQ(get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status, 200u);
  EXPECT_EQ(get(at_bob("bob-2"), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first).status,
            401u);
  EXPECT_EQ(get(at_bob(), "/api/v1/keys/alice-2/dec_keys?key_ID=" + keys[0].first).status, 401u);
}

// "Rules: One use" and "Who may fetch": at the master's KME a key enc_keys delivered is
// gone: never delivered again, by enc_keys or dec_keys there. The master asking for it
// with dec_keys is not its slave: 401.
TEST_F(Etsi014, KeyDeliveredByEncKeysIsGoneFromTheMastersKme) {
  auto keys = alice_enc(R"({"number": 8})");
  ASSERT_EQ(keys.size(), 8u);
  HttpResponse r = get(at_alice(), "/api/v1/keys/alice/dec_keys?key_ID=" + keys[0].first);
  EXPECT_EQ(r.status, 401u) << r.body;
  auto more = alice_enc(R"({"number": 8})");
  for (const auto& k : more) {
    for (const auto& old : keys) {
      EXPECT_NE(k.first, old.first);
      EXPECT_NE(k.second, old.second);
    }
  }
}

// "Status codes and fixed messages": unknown or malformed key_IDs get the standard's
// "not found" message.
TEST_F(Etsi014, UnknownKeyIdIsTheStandardNotFoundMessage) {
  for (const char* id : {"3f2504e0-4f89-41d3-9a0c-0305e82c3301", "not-a-uuid", "'%20"}) {
    HttpResponse r = get(at_bob(), std::string("/api/v1/keys/alice/dec_keys?key_ID=") + id);
    EXPECT_EQ(r.status, 400u) << id;
    EXPECT_EQ(message_of(r), kNotFound) << id;
  }
}

// "Bodies: Key IDs": key_ID is a UUID, whose hex digits are case-insensitive on input (RFC
// 4122): the uppercase form of an issued key_ID is that key, by GET and by POST.
TEST_F(Etsi014, KeyIdsAreCaseInsensitive) {
  auto keys = alice_enc(R"({"number": 2})");
  ASSERT_EQ(keys.size(), 2u);
  auto upper = [](std::string id) {
    std::transform(id.begin(), id.end(), id.begin(),
                   [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
    return id;
  };
  ASSERT_NE(upper(keys[0].first), keys[0].first);
  HttpResponse g = get(at_bob(), "/api/v1/keys/alice/dec_keys?key_ID=" + upper(keys[0].first));
  ASSERT_EQ(g.status, 200u) << g.body;
  EXPECT_EQ(key_list(g), (std::vector{keys[0]}));  // the key_ID as issued
  HttpResponse p = post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({upper(keys[1].first)}));
  ASSERT_EQ(p.status, 200u) << p.body;
  EXPECT_EQ(key_list(p), (std::vector{keys[1]}));
}

// "Bodies: Key IDs": the dec_keys POST body must be {"key_IDs": [{"key_ID": ...}, ...]}
// with at least one entry; others are 400.
TEST_F(Etsi014, MalformedKeyIdsBodyIs400) {
  for (const char* body : {"{}", R"({"key_IDs": []})", R"({"key_IDs": "x"})",
                           R"({"key_IDs": [{"id": "x"}]})", R"({"key_IDs": [{"key_ID": 5}]})",
                           R"([{"key_ID": "x"}])"}) {
    HttpResponse r = post(at_bob(), "/api/v1/keys/alice/dec_keys", body);
    EXPECT_EQ(r.status, 400u) << body;
    EXPECT_FALSE(message_of(r).empty()) << body;
  }
}

// "Bodies: Key IDs": key_ID_extension and key_IDs_extension are optional and accepted.
TEST_F(Etsi014, KeyIdsExtensionsAreAccepted) {
  auto keys = alice_enc("{}");
  ASSERT_EQ(keys.size(), 1u);
  const json body = {{"key_IDs", {{{"key_ID", keys[0].first}, {"key_ID_extension", {{"a", 1}}}}}},
                     {"key_IDs_extension", {{"b", 2}}}};
  HttpResponse r = post(at_bob(), "/api/v1/keys/alice/dec_keys", body.dump());
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(key_list(r), keys);
}

// "Rules: All or nothing" (dec_keys): one unknown key_ID fails the request and consumes
// none of the others.
TEST_F(Etsi014, DecKeysIsAllOrNothing) {
  auto keys = alice_enc(R"({"number": 2})");
  ASSERT_EQ(keys.size(), 2u);
  HttpResponse r =
      post(at_bob(), "/api/v1/keys/alice/dec_keys",
           dec_body({keys[0].first, "3f2504e0-4f89-41d3-9a0c-0305e82c3301", keys[1].first}));
  EXPECT_EQ(r.status, 400u);
  EXPECT_EQ(message_of(r), kNotFound);
  // The same key_ID twice in one request (hex digits in either case) is not two keys
  // either, and the message says so rather than "not found".
  std::string upper = keys[0].first;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  HttpResponse twice =
      post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({keys[0].first, upper}));
  EXPECT_EQ(twice.status, 400u);
  EXPECT_EQ(message_of(twice),
            fmt::format("key_ID {} is named more than once in the request", keys[0].first));
  HttpResponse ok =
      post(at_bob(), "/api/v1/keys/alice/dec_keys", dec_body({keys[0].first, keys[1].first}));
  ASSERT_EQ(ok.status, 200u) << ok.body;
  EXPECT_EQ(key_list(ok), keys);
}

// "Rules: All or nothing" (enc_keys) and "the standard names no code for not enough key":
// a request for more key than the pool holds is a 503 with a clear message, never fewer
// keys with 200, and nothing is consumed.
TEST_F(Etsi014, NotEnoughKeyIs503AndConsumesNothing) {
  ASSERT_TRUE(net_->wait_for_keys(kMaxKeyCount).ok());  // full: the link pauses
  const std::uint64_t before = stored_key_count(at_alice(), "bob");
  // 128 keys of 8192 bits = 128 KiB, far above a full pool of 300 keys of 32 bytes.
  HttpResponse r =
      post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 128, "size": 8192})");
  EXPECT_EQ(r.status, 503u);
  EXPECT_NE(message_of(r).find("not enough key material"), std::string::npos) << r.body;
  EXPECT_TRUE(key_list(r).empty());
  EXPECT_GE(stored_key_count(at_alice(), "bob"), before);
  EXPECT_TRUE(consumes_nothing([] {
    HttpResponse again =
        post(at_alice(), "/api/v1/keys/bob/enc_keys", R"({"number": 128, "size": 8192})");
    EXPECT_EQ(again.status, 503u) << again.body;
  })) << "never two scrapes without a block between them";
}

// "Bodies: Error": 400 and 503 carry {"message": "..."}; 401 needs no body.
TEST_F(Etsi014, ErrorBodiesCarryAMessage) {
  HttpResponse bad = get(at_alice(), "/api/v1/keys/bob/enc_keys?size=7");
  EXPECT_EQ(bad.status, 400u);
  const json j = bad.json();
  ASSERT_TRUE(j.is_object());
  EXPECT_TRUE(j.at("message").is_string());
  if (j.contains("details")) {
    EXPECT_TRUE(j.at("details").is_array());
  }
  HttpResponse unauth = get(net_->client(net_->alice(), "mallory"), "/api/v1/keys/bob/status");
  EXPECT_EQ(unauth.status, 401u);
}

}  // namespace
