// Config parsing: valid files parse; each kind of error names the file and the field.
#include "qkd/kms/config.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace {

using nlohmann::json;
using qkd::kms::Config;
using qkd::kms::LinkRole;

json valid_alice() {
  return json::parse(R"({
    "kme_id": "alice-kme",
    "api": {"listen": "127.0.0.1:0", "cert": "pki/alice-kme.crt", "key": "pki/alice-kme.key",
            "ca": "pki/ca.crt"},
    "saes": ["alice"],
    "keys": {"key_size": 256, "min_key_size": 64, "max_key_size": 8192,
             "max_key_per_request": 128, "max_key_count": 100000, "dec_wait_ms": 2000},
    "link": {"peer_kme_id": "bob-kme", "peer_saes": ["bob"], "role": "alice",
             "listen": "127.0.0.1:9443",
             "psk_hex": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
             "channel": {"length_km": 20, "loss_db_per_km": 0.2, "detector_efficiency": 0.1,
                         "dark_count_prob": 1e-6, "misalignment": 0.01,
                         "eve_intercept_fraction": 0, "pulse_rate_hz": 1e9},
             "protocol": {"pulses_per_block": 2000000, "sample_fraction": 0.1,
                          "qber_abort": 0.11}},
    "log_level": "info"
  })");
}

qkd::core::Result<Config> parse(const json& j) {
  return qkd::kms::parse_config(j.dump(), "test.json", "/etc/qkd", /*check_files=*/false);
}

// Expects a parse error whose message contains the file name and `field`.
void expect_error(const json& j, const std::string& field, const std::string& words = "") {
  auto r = parse(j);
  ASSERT_FALSE(r.ok()) << "expected an error about " << field;
  const std::string& m = r.error().message;
  EXPECT_NE(m.find("test.json"), std::string::npos) << m;
  EXPECT_NE(m.find(field), std::string::npos) << m;
  if (!words.empty()) {
    EXPECT_NE(m.find(words), std::string::npos) << m;
  }
}

TEST(Config, ValidAliceParses) {
  auto r = parse(valid_alice());
  ASSERT_TRUE(r.ok()) << r.error().message;
  const Config& c = r.value();
  EXPECT_EQ(c.kme_id, "alice-kme");
  EXPECT_EQ(c.api.listen.host, "127.0.0.1");
  EXPECT_EQ(c.api.listen.port, 0);
  EXPECT_EQ(c.api.cert, std::filesystem::path("/etc/qkd/pki/alice-kme.crt"));
  EXPECT_EQ(c.link.role, LinkRole::kAlice);
  EXPECT_EQ(c.link.listen.port, 9443);
  EXPECT_EQ(c.link.psk.size(), 32u);
  EXPECT_EQ(c.keys.dec_wait_ms, 2000u);
  EXPECT_DOUBLE_EQ(c.link.channel.length_km, 20.0);
  EXPECT_EQ(c.link.protocol.pulses_per_block, 2000000u);
}

TEST(Config, ValidBobParses) {
  json j = valid_alice();
  j["link"].erase("listen");
  j["link"]["role"] = "bob";
  j["link"]["connect"] = "localhost:9443";
  auto r = parse(j);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->link.role, LinkRole::kBob);
  EXPECT_EQ(r->link.connect.host, "localhost");
}

TEST(Config, OptionalSectionsDefault) {
  json j = valid_alice();
  j.erase("keys");
  j["link"].erase("channel");
  j["link"].erase("protocol");
  j.erase("log_level");
  auto r = parse(j);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->keys.key_size, 256u);
  EXPECT_EQ(r->keys.dec_wait_ms, 2000u);
}

TEST(Config, ExampleConfigsParse) {
  const std::filesystem::path ex = std::filesystem::path(QKD_TEST_SOURCE_DIR) / "examples";
  for (const char* name : {"alice-kme.json", "bob-kme.json"}) {
    std::ifstream f(ex / name);
    ASSERT_TRUE(f) << name;
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    auto r = qkd::kms::parse_config(text, name, ex, false);
    EXPECT_TRUE(r.ok()) << r.error().message;
  }
}

TEST(Config, MissingFileNamesTheFile) {
  auto r = qkd::kms::load_config("/nonexistent/dir/kme.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("/nonexistent/dir/kme.json"), std::string::npos);
}

TEST(Config, MissingCertFileNamesTheField) {
  auto r = qkd::kms::parse_config(valid_alice().dump(), "test.json", "/nonexistent", true);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("api.cert"), std::string::npos) << r.error().message;
}

TEST(Config, MalformedJson) {
  auto r = qkd::kms::parse_config("{\"kme_id\": ", "test.json", "/", false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("test.json"), std::string::npos);
}

TEST(Config, UnknownKeysAtEveryLevel) {
  {
    json j = valid_alice();
    j["colour"] = "blue";
    expect_error(j, "colour", "unknown key");
  }
  {
    json j = valid_alice();
    j["api"]["port"] = 1;
    expect_error(j, "api.port", "unknown key");
  }
  {
    json j = valid_alice();
    j["keys"]["size"] = 1;
    expect_error(j, "keys.size", "unknown key");
  }
  {
    json j = valid_alice();
    j["link"]["channel"]["length"] = 1;
    expect_error(j, "link.channel.length", "unknown key");
  }
  {
    json j = valid_alice();
    j["link"]["protocol"]["pulses"] = 1;
    expect_error(j, "link.protocol.pulses", "unknown key");
  }
}

TEST(Config, MissingRequiredFields) {
  for (const char* f : {"kme_id", "api", "saes", "link"}) {
    json j = valid_alice();
    j.erase(f);
    expect_error(j, f, "missing");
  }
  json j = valid_alice();
  j["link"].erase("peer_kme_id");
  expect_error(j, "link.peer_kme_id", "missing");
}

TEST(Config, WrongTypes) {
  {
    json j = valid_alice();
    j["kme_id"] = 5;
    expect_error(j, "kme_id", "string");
  }
  {
    json j = valid_alice();
    j["keys"]["key_size"] = "256";
    expect_error(j, "keys.key_size", "integer");
  }
  {
    json j = valid_alice();
    j["keys"]["dec_wait_ms"] = -1;
    expect_error(j, "keys.dec_wait_ms");
  }
  {
    json j = valid_alice();
    j["saes"] = "alice";
    expect_error(j, "saes", "array");
  }
  {
    json j = valid_alice();
    j["link"]["channel"]["length_km"] = "far";
    expect_error(j, "link.channel.length_km", "number");
  }
  {
    json j = valid_alice();
    j["api"] = "127.0.0.1";
    expect_error(j, "api", "object");
  }
}

TEST(Config, BadValues) {
  {
    json j = valid_alice();
    j["keys"]["key_size"] = 250;
    expect_error(j, "keys.key_size", "multiple of 8");
  }
  {
    json j = valid_alice();
    j["keys"]["min_key_size"] = 512;
    expect_error(j, "keys.key_size");
  }
  {
    json j = valid_alice();
    j["link"]["role"] = "carol";
    expect_error(j, "link.role");
  }
  {
    json j = valid_alice();
    j["link"]["psk_hex"] = "0011";
    expect_error(j, "link.psk_hex", "32 bytes");
  }
  {
    json j = valid_alice();
    j["link"]["psk_hex"] = std::string(64, 'z');
    expect_error(j, "link.psk_hex", "hex");
  }
  {
    json j = valid_alice();
    j["api"]["listen"] = "127.0.0.1:99999";
    expect_error(j, "api.listen", "port");
  }
  {
    json j = valid_alice();
    j["api"]["listen"] = "nocolon";
    expect_error(j, "api.listen");
  }
  {
    json j = valid_alice();
    j["link"]["connect"] = "127.0.0.1:1";
    expect_error(j, "link.connect", "not allowed");
  }
  {
    json j = valid_alice();
    j["link"]["channel"]["detector_efficiency"] = 1.5;
    expect_error(j, "link.channel.detector_efficiency");
  }
  {
    json j = valid_alice();
    j["link"]["peer_saes"] = {"alice"};
    expect_error(j, "link.peer_saes[0]");
  }
  {
    json j = valid_alice();
    j["link"]["protocol"]["auth"] = "none";
    expect_error(j, "link.protocol.auth");
  }
  {
    json j = valid_alice();
    j["link"]["protocol"]["key_bound"] = "optimistic";
    expect_error(j, "link.protocol.key_bound");
  }
  {
    json j = valid_alice();
    j["log_level"] = "loud";
    expect_error(j, "log_level");
  }
  {
    json j = valid_alice();
    j["link"]["psk_file"] = "psk.hex";
    expect_error(j, "link.psk_hex", "exactly one");
  }
}

}  // namespace
