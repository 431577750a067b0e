// Unit tests of the KME's operations layer: admission and metrics settings, the token
// buckets (with an explicit clock), request classification, the Prometheus exposition and
// its label escaping.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "prometheus_text.hpp"
#include "qkd/kms/admission.hpp"
#include "qkd/kms/config.hpp"
#include "qkd/kms/logging.hpp"
#include "qkd/kms/metrics.hpp"
#include "qkd/test/config_json.hpp"

namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using qkd::kms::AdmissionConfig;
using qkd::kms::AdmissionControl;

// Placeholder TLS file names: parse_config(check_files = false) does not open them.
json base_config() { return qkd::test::kme_config_json("a-kme", "b-kme", "c", "k", "ca"); }

std::string parse_error(const json& j) {
  auto c = qkd::kms::parse_config(j.dump(), "t.json", ".", false);
  return c.ok() ? std::string("OK") : c.error().message;
}

TEST(OpsConfigTest, DefaultsAreOnAndGenerous) {
  auto c = qkd::kms::parse_config(base_config().dump(), "t.json", ".", false);
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->admission.sae_keys_per_s, 5000u);
  EXPECT_EQ(c->admission.sae_burst, 10000u);
  EXPECT_EQ(c->admission.pair_keys_per_window, 2500u);
  EXPECT_EQ(c->admission.pair_window_s, 1.0);
  EXPECT_FALSE(c->metrics.plain_listener);
}

TEST(OpsConfigTest, AdmissionAndMetricsFieldsAreParsed) {
  json j = base_config();
  j["admission"] = {{"sae_keys_per_s", 0}, {"sae_burst", 0}, {"pair_keys_per_window", 500},
                    {"pair_window_s", 2.5}};
  j["metrics"] = {{"listen", "127.0.0.1:9464"}};
  auto c = qkd::kms::parse_config(j.dump(), "t.json", ".", false);
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->admission.sae_keys_per_s, 0u);
  EXPECT_EQ(c->admission.pair_keys_per_window, 500u);
  EXPECT_EQ(c->admission.pair_window_s, 2.5);
  EXPECT_TRUE(c->metrics.plain_listener);
  EXPECT_EQ(c->metrics.listen.port, 9464);
  j["metrics"] = {{"listen", "[::1]:0"}};
  EXPECT_EQ(parse_error(j), "OK");
}

TEST(OpsConfigTest, ErrorsNameTheField) {
  json j = base_config();
  j["admission"] = {{"sae_keys_per_s", -1}};
  EXPECT_EQ(parse_error(j), "t.json: admission.sae_keys_per_s: expected a non-negative integer");
  j["admission"] = {{"sae_burst", 10}};
  EXPECT_EQ(parse_error(j),
            "t.json: admission.sae_burst: must be at least keys.max_key_per_request (128) while "
            "admission.sae_keys_per_s is not 0");
  j["admission"] = {{"pair_keys_per_window", 100}};
  EXPECT_EQ(parse_error(j), "t.json: admission.pair_keys_per_window: must be 0 (off) or at least "
                            "keys.max_key_per_request (128)");
  j["admission"] = {{"pair_window_s", 0}};
  EXPECT_EQ(parse_error(j), "t.json: admission.pair_window_s: must be between 0.001 and 86400");
  j["admission"] = {{"burst", 1}};
  EXPECT_EQ(parse_error(j), "t.json: admission.burst: unknown key");
  j["admission"] = 5;
  EXPECT_EQ(parse_error(j), "t.json: admission: expected an object");
  j.erase("admission");
  j["metrics"] = {{"listen", "0.0.0.0:9464"}};
  EXPECT_NE(parse_error(j).find("t.json: metrics.listen: \"0.0.0.0\" is not a numeric loopback"),
            std::string::npos)
      << parse_error(j);
  j["metrics"] = {{"listen", "localhost"}};
  EXPECT_EQ(parse_error(j), "t.json: metrics.listen: expected \"host:port\"");
  j["metrics"] = {{"port", 1}};
  EXPECT_EQ(parse_error(j), "t.json: metrics.port: unknown key");
}

// A per-SAE budget only: 10 keys/s, burst 20.
AdmissionConfig sae_budget_only() {
  AdmissionConfig cfg;
  cfg.sae_keys_per_s = 10;
  cfg.sae_burst = 20;
  cfg.pair_keys_per_window = 0;
  return cfg;
}

TEST(AdmissionControlTest, SaeBucketRefusesRefillsAndRefunds) {
  AdmissionControl ac(sae_budget_only());
  const auto t0 = AdmissionControl::Clock::time_point{} + 1000s;
  EXPECT_FALSE(ac.admit("a", {"b"}, 15, t0));
  auto r = ac.admit("a", {"b"}, 10, t0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->budget, "sae");
  EXPECT_EQ(r->retry_after_s, 1u);  // 5 tokens short at 10/s: 0.5 s, rounded up
  EXPECT_FALSE(ac.admit("other", {"b"}, 20, t0)) << "each SAE has its own bucket";
  EXPECT_FALSE(ac.admit("a", {"b"}, 10, t0 + 500ms));  // refilled to 10
  ac.refund("a", {"b"}, 10, t0 + 500ms);
  EXPECT_FALSE(ac.admit("a", {"b"}, 10, t0 + 500ms)) << "refunded tokens are usable";
  // Never above the burst.
  EXPECT_FALSE(ac.admit("a", {"b"}, 20, t0 + 1h));
  EXPECT_TRUE(ac.admit("a", {"b"}, 1, t0 + 1h));
}

// Tokens count keys of keys.key_size (fractions for smaller keys); a request that costs
// more than a full bucket waits for a full bucket and empties it (it can pass in time).
TEST(AdmissionControlTest, RequestsLargerThanTheBucketTakeAFullBucket) {
  AdmissionControl ac(sae_budget_only());
  const auto t0 = AdmissionControl::Clock::time_point{} + 1000s;
  EXPECT_FALSE(ac.admit("a", {"b"}, 0.5, t0));
  auto r = ac.admit("a", {"b"}, 64, t0);  // 19.5 left: not a full bucket
  ASSERT_TRUE(r);
  EXPECT_EQ(r->retry_after_s, 1u);  // 0.5 short at 10/s
  EXPECT_FALSE(ac.admit("a", {"b"}, 64, t0 + 1s));  // full again: admitted, emptied
  EXPECT_TRUE(ac.admit("a", {"b"}, 0.5, t0 + 1s));
}

TEST(AdmissionControlTest, PairBucketIsPerSlaveAndAllOrNothing) {
  AdmissionConfig cfg;
  cfg.sae_keys_per_s = 1000;
  cfg.sae_burst = 1000;
  cfg.pair_keys_per_window = 10;
  cfg.pair_window_s = 60;
  AdmissionControl ac(cfg);
  const auto t0 = AdmissionControl::Clock::time_point{} + 1000s;
  EXPECT_FALSE(ac.admit("a", {"b"}, 10, t0));
  auto r = ac.admit("a", {"c", "b"}, 1, t0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->budget, "pair");
  EXPECT_EQ(r->slave, "b");
  EXPECT_EQ(r->retry_after_s, 6u);  // one key per 6 s
  EXPECT_NE(r->message.find("\"a\" -> \"b\""), std::string::npos) << r->message;
  // The refused request took nothing from (a, c) nor from a's own bucket.
  EXPECT_FALSE(ac.admit("a", {"c"}, 10, t0));
  EXPECT_TRUE(ac.admit("a", {"c"}, 1, t0));
  EXPECT_FALSE(ac.admit("x", {"b"}, 10, t0)) << "another master's pair with b is separate";
}

TEST(ClassifyRequestTest, Routes) {
  using qkd::kms::ApiRequest;
  using qkd::kms::classify_request;
  auto i = classify_request(ApiRequest{"GET", "/api/v1/keys/b%20x/enc_keys?number=7&size=256", ""});
  EXPECT_EQ(i.route, "enc_keys");
  EXPECT_EQ(i.path_sae, "b x");
  EXPECT_EQ(classify_request(ApiRequest{"POST", "/api/v1/keys/b/enc_keys", "{"}).route, "enc_keys");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/api/v1/keys/a/dec_keys?key_ID=1", ""}).route,
            "dec_keys");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/api/v1/keys/a/status", ""}).route, "status");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/metrics", ""}).route, "metrics");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/health", ""}).route, "health");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/api/v1/keys/a/other", ""}).route, "other");
  EXPECT_EQ(classify_request(ApiRequest{"GET", "/", ""}).route, "other");
}

// Every pair whose keys can wait at a KME has a series, 0 when none waits, and no other:
// keys a faulty peer assigned to SAEs nobody here serves add no series.
TEST(MetricsTest, PairWaitingSeriesAreTheConfiguredPairsOnly) {
  const std::vector<std::string> saes = {"alice", "alice-2"};
  const std::vector<std::string> peer_saes = {"bob"};
  const auto series = qkd::kms::pair_waiting_series(
      saes, peer_saes,
      {{{"bob", "alice"}, 3}, {{"alice", "alice-2"}, 1}, {{"mallory", "alice"}, 7},
       {{"bob", "eve"}, 9}});
  const std::map<std::pair<std::string, std::string>, std::uint64_t> expected = {
      {{"bob", "alice"}, 3},     {{"alice-2", "alice"}, 0}, {{"bob", "alice-2"}, 0},
      {{"alice", "alice-2"}, 1}};
  EXPECT_EQ(series, expected);
}

TEST(MetricsTest, LabelValuesAreEscaped) {
  EXPECT_EQ(qkd::kms::escape_label_value("plain"), "plain");
  EXPECT_EQ(qkd::kms::escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

// A message with quotes, a line feed and bytes that are not UTF-8 stays one JSON line.
TEST(JsonLogFormatter, AwkwardMessagesStayOneObjectPerLine) {
  auto f = qkd::kms::make_json_log_formatter("kme \"one\"");
  const std::string text = "peer \"x\"\nsecond line \xff\xfe end";
  spdlog::details::log_msg msg(spdlog::source_loc{}, "qkd-kms", spdlog::level::warn, text);
  spdlog::memory_buf_t buf;
  f->format(msg, buf);
  const std::string line(buf.data(), buf.size());
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one line only";
  const auto j = nlohmann::json::parse(line, nullptr, false);
  ASSERT_TRUE(j.is_object()) << line;
  EXPECT_EQ(j.at("kme"), "kme \"one\"");
  EXPECT_EQ(j.at("level"), "warning");
  const std::string m = j.at("message").get<std::string>();
  EXPECT_EQ(m.rfind("peer \"x\"\nsecond line ", 0), 0u) << m;
  EXPECT_NE(m.find(" end"), std::string::npos) << m;
}

TEST(MetricsTest, ExpositionIsValidWithAwkwardSaeIds) {
  qkd::kms::Metrics m("kme \"one\"", "peer\\two", 256);
  const std::string odd = "sae \"x\"\\\nline";
  m.observe_request("enc_keys", 200, 0.0003);
  m.observe_request("enc_keys", 200, 3.0);
  m.observe_request("dec_keys", 400, 0.002);
  m.add_keys_delivered("enc_keys", odd, "bob", 5);
  m.add_admission_refusal("pair", odd);
  qkd::kms::StoreStats st;
  st.own_available_bytes = 320;
  st.waiting_by_pair[{odd, "bob"}] = 3;
  st.request_commits.add(0.0004);
  st.request_commits.add(0.003);
  st.request_commits.add(1.5);  // above the last bound: only in +Inf
  st.link_commits.add(0.002);
  st.store_syncs.add(0.0009);
  qkd::kms::LinkStats ls;
  ls.up = true;
  ls.qber = 0.031;
  ls.blocks = 7;
  ls.aborted_blocks = 2;
  const std::string text = m.render(st, ls);
  const auto e = qkd::test::parse_exposition(text);
  ASSERT_EQ(e.error, "") << text;
  EXPECT_EQ(e.samples.at("qkd_kms_keys_delivered_total{route=\"enc_keys\",master_sae=\"" + odd +
                         "\",slave_sae=\"bob\"}"),
            5.0);
  EXPECT_EQ(e.samples.at("qkd_kms_admission_refusals_total{budget=\"pair\",master_sae=\"" + odd +
                         "\"}"),
            1.0);
  EXPECT_EQ(e.samples.at("qkd_kms_pool_keys{peer_kme_id=\"peer\\two\",direction=\"local\"}"), 10.0);
  EXPECT_EQ(e.samples.at("qkd_kms_pair_keys_waiting{master_sae=\"" + odd + "\",slave_sae=\"bob\"}"),
            3.0);
  EXPECT_EQ(e.samples.at("qkd_kms_link_blocks_total{peer_kme_id=\"peer\\two\",result=\"settled\"}"),
            5.0);
  EXPECT_EQ(e.samples.at("qkd_kms_http_request_duration_seconds_bucket{route=\"enc_keys\","
                         "status=\"200\",le=\"0.0005\"}"),
            1.0);
  EXPECT_EQ(e.samples.at("qkd_kms_http_request_duration_seconds_bucket{route=\"enc_keys\","
                         "status=\"200\",le=\"+Inf\"}"),
            2.0);
  EXPECT_EQ(e.samples.at("qkd_kms_http_request_duration_seconds_count{route=\"enc_keys\","
                         "status=\"200\"}"),
            2.0);
  EXPECT_EQ(e.types.at("qkd_kms_http_request_duration_seconds"), "histogram");
  EXPECT_EQ(e.types.at("qkd_kms_store_commit_duration_seconds"), "histogram");
  const std::string req = "qkd_kms_store_commit_duration_seconds_bucket{writes=\"requests\",le=";
  EXPECT_EQ(e.samples.at(req + "\"0.00025\"}"), 0.0);
  EXPECT_EQ(e.samples.at(req + "\"0.0005\"}"), 1.0);
  EXPECT_EQ(e.samples.at(req + "\"0.00275\"}"), 1.0);
  EXPECT_EQ(e.samples.at(req + "\"0.003\"}"), 2.0);  // a value on a bound counts there
  EXPECT_EQ(e.samples.at(req + "\"1\"}"), 2.0);
  EXPECT_EQ(e.samples.at(req + "\"+Inf\"}"), 3.0);
  EXPECT_EQ(e.samples.at("qkd_kms_store_commit_duration_seconds_count{writes=\"requests\"}"), 3.0);
  EXPECT_NEAR(e.samples.at("qkd_kms_store_commit_duration_seconds_sum{writes=\"requests\"}"),
              1.5034, 1e-9);
  EXPECT_EQ(e.samples.at("qkd_kms_store_commit_duration_seconds_bucket{writes=\"link\",le=\"0.002\"}"),
            1.0);
  EXPECT_EQ(e.samples.at("qkd_kms_store_commit_duration_seconds_count{writes=\"link\"}"), 1.0);
  EXPECT_EQ(e.types.at("qkd_kms_store_sync_duration_seconds"), "histogram");
  EXPECT_EQ(e.samples.at("qkd_kms_store_sync_duration_seconds_bucket{le=\"0.00075\"}"), 0.0);
  EXPECT_EQ(e.samples.at("qkd_kms_store_sync_duration_seconds_bucket{le=\"0.001\"}"), 1.0);
  EXPECT_EQ(e.samples.at("qkd_kms_store_sync_duration_seconds_count"), 1.0);
}

}  // namespace
