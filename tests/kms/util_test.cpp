#include "qkd/kms/util.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

namespace {

TEST(Uuid, IsVersion4Rfc) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    auto id = qkd::kms::random_uuid_v4();
    ASSERT_TRUE(id.ok());
    const std::string& s = id.value();
    ASSERT_TRUE(qkd::kms::is_uuid(s)) << s;
    EXPECT_EQ(s[14], '4') << s;
    EXPECT_NE(std::string("89ab").find(s[19]), std::string::npos) << s;
    for (char c : s) {
      EXPECT_TRUE(c == '-' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << s;
    }
    EXPECT_TRUE(seen.insert(s).second);
  }
}

TEST(Uuid, Recognizer) {
  EXPECT_TRUE(qkd::kms::is_uuid("123e4567-e89b-42d3-a456-426614174000"));
  EXPECT_FALSE(qkd::kms::is_uuid("123e4567e89b42d3a456426614174000"));
  EXPECT_FALSE(qkd::kms::is_uuid("123e4567-e89b-42d3-a456-42661417400g"));
  EXPECT_FALSE(qkd::kms::is_uuid(""));
}

TEST(Base64, Rfc4648Vectors) {
  auto enc = [](std::string_view s) {
    return qkd::kms::base64_encode({reinterpret_cast<const std::uint8_t*>(s.data()), s.size()});
  };
  EXPECT_EQ(enc(""), "");
  EXPECT_EQ(enc("f"), "Zg==");
  EXPECT_EQ(enc("fo"), "Zm8=");
  EXPECT_EQ(enc("foo"), "Zm9v");
  EXPECT_EQ(enc("foobar"), "Zm9vYmFy");
}

TEST(UrlDecode, EscapesAndErrors) {
  EXPECT_EQ(qkd::kms::url_decode("a%20b+c", false).value(), "a b+c");
  EXPECT_EQ(qkd::kms::url_decode("a%20b+c", true).value(), "a b c");
  EXPECT_FALSE(qkd::kms::url_decode("%2", false).has_value());
  EXPECT_FALSE(qkd::kms::url_decode("%", false).has_value());
  EXPECT_FALSE(qkd::kms::url_decode("%00", false).has_value());
  EXPECT_FALSE(qkd::kms::url_decode("%g1", false).has_value());
}

TEST(Hex, Decode) {
  auto b = qkd::kms::hex_decode("00ffA0");
  ASSERT_TRUE(b.has_value());
  ASSERT_EQ(b->size(), 3u);
  EXPECT_EQ((*b)[1], 0xff);
  EXPECT_EQ((*b)[2], 0xa0);
  EXPECT_FALSE(qkd::kms::hex_decode("abc").has_value());
  EXPECT_FALSE(qkd::kms::hex_decode("zz").has_value());
}

// JSON with each member named once per object: a repeated one is refused with its path,
// wherever it is; the same name in different objects is fine.
TEST(ParseJsonUnique, RefusesARepeatedMemberNamingItsPath) {
  nlohmann::json j;
  EXPECT_FALSE(qkd::kms::parse_json_unique(R"({"a": {"b": 1}, "c": [{"b": 2}], "b": 3})", j));
  EXPECT_EQ(j.at("c").at(0).at("b"), 2);
  struct Case {
    const char* text;
    const char* path;
  };
  for (const Case& c :
       {Case{R"({"a": 1, "a": 2})", "a"}, Case{R"({"x": {"y": [], "y": {}}})", "x.y"},
        Case{R"([0, {"k": 1}, [{"k": 1, "k": 1}]])", "[2][0].k"},
        Case{R"({"l": [1, 2, {"m": {"": 1, "": 2}}]})", "l[2].m."},
        Case{R"({"l": [[], {"n": 1}], "l": 2})", "l"}}) {
    SCOPED_TRACE(c.text);
    const auto e = qkd::kms::parse_json_unique(c.text, j);
    ASSERT_TRUE(e);
    EXPECT_TRUE(e->repeated);
    EXPECT_EQ(e->path, c.path);
  }
  // Not JSON: the parser's position, never the text it stopped in.
  const auto bad = qkd::kms::parse_json_unique(R"({"secret": "abcdef)", j);
  ASSERT_TRUE(bad);
  EXPECT_FALSE(bad->repeated);
  EXPECT_NE(bad->message.find("line 1"), std::string::npos) << bad->message;
  EXPECT_EQ(bad->message.find("abcdef"), std::string::npos) << bad->message;
}

}  // namespace
