// Config parsing: valid files parse; each kind of error names the file and the field.
#include "qkd/kms/config.hpp"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <tuple>
#include <vector>

#include "qkd/test/scratch_dir.hpp"
#include "qkd/test/unit_pki.hpp"

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

// The parser's error would quote the text it stopped in: with an unterminated psk_hex, the
// secret. The message gives the position only.
TEST(Config, AJsonErrorDoesNotQuoteTheText) {
  const std::string psk(64, 'a');
  auto r = qkd::kms::parse_config(R"({"link": {"psk_hex": ")" + psk, "test.json", "/", false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("test.json"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("line 1"), std::string::npos) << r.error().message;
  EXPECT_EQ(r.error().message.find("aaaa"), std::string::npos) << r.error().message;
}

// A member named twice in one object is an error naming the file and the member's path:
// the JSON parser keeps the last one silently, so a second kme_id, store or psk_hex further
// down would override the first without a word.
TEST(Config, RepeatedMembersAreRefused) {
  const std::string text = valid_alice().dump();
  auto with = [&](const std::string& at, const std::string& member) {
    std::string t = text;
    const auto pos = t.find(at);
    EXPECT_NE(pos, std::string::npos) << at;
    t.insert(pos + at.size(), member + ",");
    return qkd::kms::parse_config(t, "test.json", "/etc/qkd", false);
  };
  struct Case {
    std::string at, member, message;
  };
  const std::vector<Case> cases = {
      {"{", R"("kme_id":"b-kme")", "test.json: kme_id: appears twice"},
      {R"("link":{)", R"("psk_hex":")" + std::string(64, '1') + "\"",
       "test.json: link.psk_hex: appears twice"},
      {R"("protocol":{)", R"("qber_abort":0.2)",
       "test.json: link.protocol.qber_abort: appears twice"},
      {"{", R"("store":{"path":"a.db"},"store":{"path":"b.db"})",
       "test.json: store: appears twice"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.member);
    auto r = with(c.at, c.member);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message, c.message);
  }
  // The same name in different objects is fine (api.listen, link.listen).
  EXPECT_TRUE(parse(valid_alice()).ok());
}

// KME and SAE IDs are matched against certificate CNs and written into every log line:
// 1 to 64 bytes (the longest X.509 CN) of UTF-8 without control characters. Spaces, quotes
// and backslashes are fine.
TEST(Config, IdsAreOneTo64BytesOfUtf8WithoutControlCharacters) {
  const std::string e_acute = "\xc3\xa9";
  std::string longest;
  for (int i = 0; i < 32; ++i) {
    longest += e_acute;  // 64 bytes, 32 characters
  }
  {
    json j = valid_alice();
    j["kme_id"] = longest;
    j["saes"] = {"alice", "bob 3", "a\"quote", "back\\slash", std::string(64, 'x')};
    j["link"]["peer_kme_id"] = "bob kme";
    j["link"]["peer_saes"] = {"bob", "caf" + e_acute};
    auto r = parse(j);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->kme_id, longest);
    EXPECT_EQ(r->saes[1], "bob 3");
  }
  struct Case {
    std::string text;
    std::string words;
  };
  const std::vector<Case> bad = {
      {"", "empty"},
      {std::string(65, 'x'), "65 bytes"},
      {longest + "x", "65 bytes"},
      {"alice\nkme", "control character"},
      {"alice\tkme", "control character"},
      {std::string("alice\0kme", 9), "control character"},
      {"alice\x7f", "control character"},
  };
  // The value goes into the text where "@" was, control characters as JSON escapes.
  auto with = [](const json& j, const std::string& value) {
    std::string text = j.dump();
    std::string escaped;
    for (char ch : value) {
      const auto u = static_cast<unsigned char>(ch);
      escaped += u < 0x20 ? fmt::format("\\u{:04x}", u) : std::string(1, ch);
    }
    text.replace(text.find("\"@\""), 3, "\"" + escaped + "\"");
    return qkd::kms::parse_config(text, "test.json", "/etc/qkd", false);
  };
  std::vector<std::pair<std::string, json>> places;
  {
    json j = valid_alice();
    j["kme_id"] = "@";
    places.emplace_back("kme_id", j);
    j = valid_alice();
    j["link"]["peer_kme_id"] = "@";
    places.emplace_back("link.peer_kme_id", j);
    j = valid_alice();
    j["saes"] = {"alice", "carol", "@"};
    places.emplace_back("saes[2]", j);
    j = valid_alice();
    j["link"]["peer_saes"] = {"@"};
    places.emplace_back("link.peer_saes[0]", j);
  }
  for (const auto& [field, j] : places) {
    for (const auto& c : bad) {
      SCOPED_TRACE(field + ": " + c.words);
      auto r = with(j, c.text);
      ASSERT_FALSE(r.ok());
      const std::string& m = r.error().message;
      EXPECT_EQ(m.rfind("test.json: " + field + ": ", 0), 0u) << m;
      EXPECT_NE(m.find(c.words), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
    // Ill-formed UTF-8 (a bad byte, a UTF-16 surrogate, an overlong '/') is refused by the
    // JSON parser already, with its position.
    for (const std::string text : {"\xc3(", "\xff", "\xed\xa0\x80", "\xc0\xaf"}) {
      auto r = with(j, text);
      ASSERT_FALSE(r.ok()) << field;
      EXPECT_NE(r.error().message.find("UTF-8"), std::string::npos) << r.error().message;
    }
  }
}

// A listener binds an IP address (the daemon does not resolve names: "localhost" passed
// --check-config and then failed at start). link.connect still takes a name.
TEST(Config, ListenHostMustBeAnIpAddress) {
  for (const char* field : {"api", "link"}) {
    SCOPED_TRACE(field);
    for (const char* ok : {"127.0.0.1:0", "0.0.0.0:8443", "[::1]:0", "[::]:9443"}) {
      json j = valid_alice();
      j[field]["listen"] = ok;
      auto r = parse(j);
      EXPECT_TRUE(r.ok()) << ok << ": " << r.error().message;
    }
    for (const char* bad : {"localhost:0", "kme.example:8443", "[localhost]:0", "[]:0",
                            "127.0.0.256:0"}) {
      json j = valid_alice();
      j[field]["listen"] = bad;
      expect_error(j, std::string(field) + ".listen", "IP address");
    }
  }
  auto r = parse(valid_alice());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->api.listen.host, "127.0.0.1");
}

// valid_alice() with the files of `kme` in the unit test PKI (CN = the file's name),
// parsed with the files checked as the KME will use them.
json with_unit_pki(json j, const std::string& kme) {
  const auto& d = qkd::test::unit_pki_dir();
  j["api"]["cert"] = (d / (kme + ".crt")).string();
  j["api"]["key"] = (d / (kme + ".key")).string();
  j["api"]["ca"] = (d / "ca.crt").string();
  return j;
}
qkd::core::Result<Config> parse_checked(const json& j) {
  return qkd::kms::parse_config(j.dump(), "test.json", "/etc/qkd", /*check_files=*/true);
}

// The peer KME checks our certificate's CN against its link.peer_kme_id, and an SAE takes
// the KME's ID from it (ETSI GS QKD 014): a certificate of another CN is a config error,
// not a link that never comes up.
TEST(Config, ApiCertCnMustBeKmeId) {
  auto ok = parse_checked(with_unit_pki(valid_alice(), "alice-kme"));
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  for (const char* other : {"bob-kme", "mallory"}) {
    SCOPED_TRACE(other);
    json j = with_unit_pki(valid_alice(), other);  // kme_id is still alice-kme
    auto r = parse_checked(j);
    ASSERT_FALSE(r.ok());
    const std::string& m = r.error().message;
    EXPECT_EQ(m.rfind("test.json: api.cert: ", 0), 0u) << m;
    EXPECT_NE(m.find(std::string("is \"") + other + "\", not kme_id \"alice-kme\""),
              std::string::npos)
        << m;
  }
}

// api.cert must verify against api.ca, the trust anchor the peer KME uses for it (the
// same PKI, as the peer's certificate is verified against ours).
TEST(Config, ApiCertMustVerifyAgainstApiCa) {
  const qkd::test::ScratchDir scratch("config-other-pki");
  const std::filesystem::path& other = scratch.path();
  ASSERT_EQ(std::system(("bash '" + std::string(QKD_TEST_SOURCE_DIR) + "/examples/pki.sh' '" +
                         other.string() + "' alice-kme >/dev/null 2>&1")
                            .c_str()),
            0);
  json j = with_unit_pki(valid_alice(), "alice-kme");
  j["api"]["ca"] = (other / "ca.crt").string();  // another CA than the one that signed it
  auto r = parse_checked(j);
  ASSERT_FALSE(r.ok());
  std::string m = r.error().message;
  EXPECT_EQ(m.rfind("test.json: api.cert: ", 0), 0u) << m;
  EXPECT_NE(m.find("does not verify against api.ca"), std::string::npos) << m;
  EXPECT_NE(m.find((other / "ca.crt").string()), std::string::npos) << m;
  j["api"]["cert"] = (other / "alice-kme.crt").string();  // and the other way round
  j["api"]["key"] = (other / "alice-kme.key").string();
  j["api"]["ca"] = (qkd::test::unit_pki_dir() / "ca.crt").string();
  r = parse_checked(j);
  ASSERT_FALSE(r.ok());
  m = r.error().message;
  EXPECT_NE(m.find("api.cert: "), std::string::npos) << m;
  EXPECT_NE(m.find("does not verify against api.ca"), std::string::npos) << m;
  j["api"]["ca"] = (other / "ca.crt").string();
  EXPECT_TRUE(parse_checked(j).ok());
}

// store.path's folder must exist and let the KME create files in it (the database, its
// -wal and -shm): --check-config says so with the system's reason, without opening (or
// creating) the store.
TEST(Config, StoreFolderMustBeAWritableFolder) {
  const qkd::test::ScratchDir scratch("config-store");
  const std::filesystem::path& dir = scratch.path();
  std::filesystem::create_directories(dir / "db");
  const auto node_key = dir / "node.key";
  std::ofstream(node_key) << std::string(64, 'c') << "\n";
  std::filesystem::permissions(
      node_key, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  std::ofstream(dir / "file") << "x";
  json j = with_unit_pki(valid_alice(), "alice-kme");
  auto with_store = [&](const std::filesystem::path& path) {
    j["store"] = {{"path", path.string()}, {"node_key_file", node_key.string()}};
    return parse_checked(j);
  };
  auto ok = with_store(dir / "db" / "kme.db");
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_FALSE(std::filesystem::exists(dir / "db" / "kme.db")) << "the check created the store";

  struct Case {
    std::filesystem::path path;
    std::string words;
  };
  for (const Case& c : {Case{dir / "missing" / "kme.db", "No such file or directory"},
                        Case{dir / "file" / "kme.db", "Not a directory"}}) {
    auto r = with_store(c.path);
    ASSERT_FALSE(r.ok()) << c.path;
    const std::string& m = r.error().message;
    EXPECT_EQ(m.rfind("test.json: store.path: ", 0), 0u) << m;
    EXPECT_NE(m.find(c.path.parent_path().string()), std::string::npos) << m;
    EXPECT_NE(m.find(c.words), std::string::npos) << m;
  }
  if (::geteuid() != 0) {  // root may write anywhere
    std::filesystem::permissions(
        dir / "db", std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
    auto r = with_store(dir / "db" / "kme.db");
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().message.find("store.path: "), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("Permission denied"), std::string::npos) << r.error().message;
    std::filesystem::permissions(dir / "db", std::filesystem::perms::owner_all);
  }
}

// A file that cannot be used says why: the system's reason, "is a directory" (which opens
// but reads as nothing: a JSON error at line 1 for the config file), or what kind of PEM
// file was expected (not OpenSSL's bare "no start line" or "unsupported").
TEST(Config, UnusableFilesSayWhy) {
  const qkd::test::ScratchDir scratch("config-files");
  const std::filesystem::path& dir = scratch.path();
  std::filesystem::create_directories(dir / "folder");
  const auto text = dir / "notes.txt";
  std::ofstream(text) << "not PEM at all\n";

  auto missing = qkd::kms::load_config(dir / "missing.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().message, (dir / "missing.json").string() +
                                         ": cannot open config file: No such file or directory");
  auto folder = qkd::kms::load_config(dir / "folder");
  ASSERT_FALSE(folder.ok());
  EXPECT_EQ(folder.error().message,
            (dir / "folder").string() + ": is a directory, not a config file");

  const auto& pki = qkd::test::unit_pki_dir();
  struct Case {
    const char* field;
    std::filesystem::path file;
    std::string message;  // after "test.json: "
  };
  const std::vector<Case> cases = {
      {"cert", dir / "missing.crt",
       "api.cert: cannot read " + (dir / "missing.crt").string() + ": No such file or directory"},
      {"cert", dir / "folder", "api.cert: " + (dir / "folder").string() + " is a directory"},
      {"key", dir / "folder", "api.key: " + (dir / "folder").string() + " is a directory"},
      {"ca", dir / "folder", "api.ca: " + (dir / "folder").string() + " is a directory"},
      {"cert", text, "api.cert: " + text.string() + " is not a PEM certificate"},
      {"cert", pki / "alice-kme.key",
       "api.cert: " + (pki / "alice-kme.key").string() + " is not a PEM certificate"},
      {"key", text, "api.key: " + text.string() + " is not a PEM private key"},
      {"key", pki / "alice-kme.crt",
       "api.key: " + (pki / "alice-kme.crt").string() + " is not a PEM private key"},
      {"ca", pki / "alice-kme.key",
       "api.ca: " + (pki / "alice-kme.key").string() + " is not a PEM certificate"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.message);
    json j = with_unit_pki(valid_alice(), "alice-kme");
    j["api"][c.field] = c.file.string();
    auto r = parse_checked(j);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message.rfind("test.json: " + c.message, 0), 0u) << r.error().message;
  }
  if (::geteuid() != 0) {  // root reads anything
    std::filesystem::permissions(text, std::filesystem::perms::none);
    json j = with_unit_pki(valid_alice(), "alice-kme");
    j["api"]["ca"] = text.string();
    auto r = parse_checked(j);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message,
              "test.json: api.ca: cannot read " + text.string() + ": Permission denied");
  }
}

// link.psk_file holds the link's long-term secret: owner-only, as the node key file.
TEST(Config, PskFileMustBeOwnerOnly) {
  const qkd::test::ScratchDir dir("config-psk");
  const auto file = dir / "psk.hex";
  std::ofstream(file) << std::string(64, 'b') << "\n";
  json j = valid_alice();
  j["link"].erase("psk_hex");
  j["link"]["psk_file"] = file.string();
  std::filesystem::permissions(file, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write |
                                         std::filesystem::perms::group_read);
  expect_error(j, "link.psk_file", "owner only");
  std::filesystem::permissions(file, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  EXPECT_TRUE(qkd::kms::parse_config(j.dump(), "test.json", "/etc/qkd", false).ok());
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
    j["lock_memory"] = "yes";
    expect_error(j, "lock_memory");
  }
  {
    json j = valid_alice();
    j["link"]["psk_file"] = "psk.hex";
    expect_error(j, "link.psk_hex", "exactly one");
  }
  {
    // A device named by mistake is refused, not read for ever.
    json j = valid_alice();
    j["link"].erase("psk_hex");
    j["link"]["psk_file"] = "/dev/zero";
    expect_error(j, "link.psk_file", "not a readable regular file");
  }
}

TEST(Config, DecoyChannelAndProtocolFieldsParse) {
  json j = valid_alice();
  j["link"]["channel"].update(json::parse(R"({
    "source": "weak_coherent", "mu_signal": 0.5, "mu_decoy": 0.1, "mu_vacuum": 0.0,
    "prob_decoy": 0.2, "prob_vacuum": 0.1, "insertion_loss_db": 1.5,
    "fiber_cut": false, "eve_photon_number_splitting": true})"));
  j["link"]["protocol"].update(json::parse(R"({
    "key_bound": "finite-decoy", "z_basis_prob": 0.9, "epsilon_sec": 1e-9,
    "epsilon_cor": 1e-12, "confidence_sd": 3, "auth_pool_bits": 32768,
    "auth_key_refresh_blocks": 8, "auth_every_message": true, "cascade_passes": 0,
    "cascade_variant": "yan"})"));
  auto r = parse(j);
  ASSERT_TRUE(r.ok()) << r.error().message;
  const auto& c = r->link.channel;
  EXPECT_EQ(c.source, qkd::core::SourceKind::kWeakCoherent);
  EXPECT_DOUBLE_EQ(c.mu_signal, 0.5);
  EXPECT_DOUBLE_EQ(c.mu_decoy, 0.1);
  EXPECT_DOUBLE_EQ(c.mu_vacuum, 0.0);
  EXPECT_DOUBLE_EQ(c.prob_decoy, 0.2);
  EXPECT_DOUBLE_EQ(c.prob_vacuum, 0.1);
  EXPECT_DOUBLE_EQ(c.insertion_loss_db, 1.5);
  EXPECT_FALSE(c.fiber_cut);
  EXPECT_TRUE(c.eve_photon_number_splitting);
  const auto& p = r->link.protocol;
  EXPECT_EQ(p.key_bound, qkd::core::KeyBound::kFiniteDecoy);
  EXPECT_DOUBLE_EQ(p.z_basis_prob, 0.9);
  EXPECT_DOUBLE_EQ(p.epsilon_sec, 1e-9);
  EXPECT_DOUBLE_EQ(p.epsilon_cor, 1e-12);
  EXPECT_DOUBLE_EQ(p.confidence_sd, 3.0);
  EXPECT_EQ(p.auth_pool_bits, 32768u);
  EXPECT_EQ(p.auth_key_refresh_blocks, 8u);
  EXPECT_TRUE(p.auth_every_message);
  EXPECT_EQ(p.cascade_passes, 0u);
  EXPECT_EQ(p.cascade_variant, qkd::core::CascadeVariant::kYan);
}

TEST(Config, DecoyFieldsDefaultToSinglePhoton) {
  auto r = parse(valid_alice());
  ASSERT_TRUE(r.ok()) << r.error().message;
  const qkd::core::ChannelParams d;
  EXPECT_EQ(r->link.channel.source, qkd::core::SourceKind::kSinglePhoton);
  EXPECT_DOUBLE_EQ(r->link.channel.mu_signal, d.mu_signal);
  EXPECT_DOUBLE_EQ(r->link.channel.prob_decoy, 0.0);
  EXPECT_FALSE(r->link.channel.fiber_cut);
  EXPECT_EQ(r->link.protocol.cascade_variant, qkd::core::ProtocolParams{}.cascade_variant);
}

TEST(Config, BadDecoyChannelValues) {
  auto weak = []() {
    json j = valid_alice();
    j["link"]["channel"]["source"] = "weak_coherent";
    return j;
  };
  struct Case {
    const char* key;
    json value;
    const char* field;
    const char* words;
  };
  const std::vector<Case> cases = {
      {"source", "laser", "link.channel.source", "weak_coherent"},
      {"source", 1, "link.channel.source", "string"},
      {"source", "", "link.channel.source", "empty"},
      {"mu_signal", "0.5", "link.channel.mu_signal", "number"},
      {"mu_signal", -0.1, "link.channel.mu_signal", "between"},
      {"mu_signal", 0, "link.channel.mu_signal", "greater than 0"},
      {"mu_signal", 25, "link.channel.mu_signal", "between"},
      {"mu_decoy", 0.7, "link.channel.mu_decoy", "mu_signal"},
      {"mu_vacuum", 0.2, "link.channel.mu_vacuum", "mu_decoy"},
      {"mu_vacuum", -1, "link.channel.mu_vacuum", "between"},
      {"prob_decoy", 1.5, "link.channel.prob_decoy", "between"},
      {"prob_decoy", true, "link.channel.prob_decoy", "number"},
      {"prob_vacuum", -0.1, "link.channel.prob_vacuum", "between"},
      {"insertion_loss_db", -1, "link.channel.insertion_loss_db", "between"},
      {"insertion_loss_db", 500, "link.channel.insertion_loss_db", "between"},
      {"fiber_cut", 1, "link.channel.fiber_cut", "true or false"},
      {"fiber_cut", "yes", "link.channel.fiber_cut", "true or false"},
      {"eve_photon_number_splitting", nullptr, "link.channel.eve_photon_number_splitting",
       "true or false"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.key);
    json j = weak();
    j["link"]["channel"][c.key] = c.value;
    expect_error(j, c.field, c.words);
  }
  {
    json j = weak();
    j["link"]["channel"]["prob_decoy"] = 0.6;
    j["link"]["channel"]["prob_vacuum"] = 0.4;
    expect_error(j, "link.channel.prob_vacuum", "less than 1");
  }
  {
    // Decoy classes need a weak coherent source.
    json j = valid_alice();
    j["link"]["channel"]["prob_decoy"] = 0.2;
    expect_error(j, "link.channel.prob_decoy", "weak_coherent");
  }
}

TEST(Config, DetectorAndReconciliationFieldsParse) {
  json j = valid_alice();
  j["link"]["channel"].update(json::parse(R"({
    "dead_time_ns": 50, "afterpulse_prob": 0.02, "afterpulse_window_ns": 200})"));
  j["link"]["protocol"].update(json::parse(R"({
    "cascade_biconf_rounds": 8, "verify_hash_bits": 0, "epsilon_cor": 1e-9})"));
  auto r = parse(j);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_DOUBLE_EQ(r->link.channel.dead_time_ns, 50.0);
  EXPECT_DOUBLE_EQ(r->link.channel.afterpulse_prob, 0.02);
  EXPECT_DOUBLE_EQ(r->link.channel.afterpulse_window_ns, 200.0);
  EXPECT_EQ(r->link.protocol.cascade_biconf_rounds, 8u);
  EXPECT_EQ(qkd::core::verify_tag_bits(r->link.protocol), 30u);  // ceil(log2(1e9))

  const std::vector<std::tuple<const char*, const char*, json>> bad = {
      {"channel", "dead_time_ns", -1},
      {"channel", "afterpulse_prob", 0.6},
      {"channel", "afterpulse_window_ns", "100"},
      {"protocol", "cascade_biconf_rounds", 65},
      {"protocol", "verify_hash_bits", 257},
  };
  for (const auto& [section, key, value] : bad) {
    SCOPED_TRACE(key);
    json b = valid_alice();
    b["link"][section][key] = value;
    expect_error(b, std::string("link.") + section + "." + key);
  }
  {
    // A tag shorter than eps_cor demands is refused, naming the field.
    json b = valid_alice();
    b["link"]["protocol"]["verify_hash_bits"] = 32;
    expect_error(b, "verify_hash_bits");
  }
}

TEST(Config, BadProtocolValues) {
  struct Case {
    const char* key;
    json value;
    const char* words;
  };
  const std::vector<Case> cases = {
      {"z_basis_prob", 0.3, "between"},
      {"z_basis_prob", 1.0, "between"},
      {"epsilon_sec", 0, "greater than 0"},
      {"epsilon_sec", 0.9, "between"},
      {"epsilon_sec", "1e-10", "number"},
      {"epsilon_cor", 0, "greater than 0"},
      {"epsilon_cor", -1e-15, "between"},
      {"confidence_sd", -1, "between"},
      {"confidence_sd", 51, "between"},
      {"auth_pool_bits", 512, "between"},
      {"auth_pool_bits", 1025, "multiple of 8"},
      {"auth_pool_bits", 1.5, "integer"},
      {"auth_key_refresh_blocks", 0, "between"},
      {"auth_key_refresh_blocks", -3, "integer"},
      {"auth_tag_bits", 96, "64 or 128"},
      {"auth_every_message", "no", "true or false"},
      {"cascade_passes", 17, "between"},
      {"cascade_variant", "winnow", "original, yan, modern"},
      {"cascade_variant", 2, "string"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.key);
    json j = valid_alice();
    j["link"]["protocol"][c.key] = c.value;
    expect_error(j, std::string("link.protocol.") + c.key, c.words);
  }
}

// link.protocol.pulses_per_block: the engine's own bounds, 1000 to 2^32 (KMS.md), with one
// message in one field-path form on both sides of the range (it was "between 1000 and
// 10000000000" below and "link.protocol: pulses_per_block must be in [1000, 2^32]" above).
TEST(Config, PulsesPerBlockBoundsAreTheEnginesOwn) {
  const std::string message =
      "test.json: link.protocol.pulses_per_block: must be between 1000 and 4294967296 (2^32)";
  for (const json& bad : {json(10), json(999), json(4'294'967'297ULL), json(10'000'000'000ULL)}) {
    json j = valid_alice();
    j["link"]["protocol"]["pulses_per_block"] = bad;
    auto r = parse(j);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().message, message);
  }
  for (const std::uint64_t ok : {std::uint64_t{1000}, std::uint64_t{1} << 32}) {
    json j = valid_alice();
    j["link"]["protocol"]["pulses_per_block"] = ok;
    auto r = parse(j);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->link.protocol.pulses_per_block, ok);
  }
  // A rule only the engine's checks know is named in the same form.
  json j = valid_alice();
  j["link"]["protocol"]["epsilon_cor"] = 1e-80;  // below 2^-256
  auto r = parse(j);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message.rfind("test.json: link.protocol.epsilon_cor: must be in [2^-256", 0),
            0u)
      << r.error().message;
}

// keys.max_age_s (H5): optional, 0 by default (keys never expire), whole seconds up to a
// year; a bad value names the field.
TEST(Config, KeyMaxAge) {
  EXPECT_EQ(parse(valid_alice())->keys.max_age_s, 0u);
  json j = valid_alice();
  j["keys"]["max_age_s"] = 3600;
  auto r = parse(j);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->keys.max_age_s, 3600u);
  for (const json& bad : {json(-1), json(1.5), json("60"), json(31'536'001)}) {
    j["keys"]["max_age_s"] = bad;
    expect_error(j, "keys.max_age_s");
  }
}

// keys.max_unfetched_per_pair: 100,000 by default, raised with max_key_per_request so that
// the peer's prepared keys and two requests always fit; 0 (no limit) or at least that.
TEST(Config, MaxUnfetchedPerPair) {
  EXPECT_EQ(parse(valid_alice())->keys.max_unfetched_per_pair, 100'000u);
  json j = valid_alice();
  j["keys"]["max_key_per_request"] = 60'000;
  EXPECT_EQ(parse(j)->keys.max_unfetched_per_pair, 124'096u);
  j = valid_alice();
  for (const json& ok : {json(0), json(4'352), json(100'000'000)}) {
    j["keys"]["max_unfetched_per_pair"] = ok;
    auto r = parse(j);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->keys.max_unfetched_per_pair, ok.get<std::uint64_t>());
  }
  for (const json& bad : {json(4'351), json(-1), json("10"), json(100'000'001)}) {
    j["keys"]["max_unfetched_per_pair"] = bad;
    expect_error(j, "keys.max_unfetched_per_pair");
  }
}

TEST(Config, EngineNice) {
  EXPECT_EQ(parse(valid_alice())->link.engine_nice, 10u);
  json j = valid_alice();
  for (int v : {0, 19}) {
    j["link"]["engine_nice"] = v;
    auto r = parse(j);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->link.engine_nice, static_cast<std::uint32_t>(v));
  }
  for (const json& bad : {json(-1), json(20), json(2.5), json("10")}) {
    j["link"]["engine_nice"] = bad;
    expect_error(j, "link.engine_nice");
  }
}

}  // namespace
