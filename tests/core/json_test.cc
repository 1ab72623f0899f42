#include "bridges/core/json.h"

#include <string>

#include <gtest/gtest.h>

namespace wsbridge::core {
namespace {

TEST(CoreJson, ValidatesOneObjectWithoutADom) {
  EXPECT_TRUE(ValidateJsonObject("{}").ok());
  EXPECT_TRUE(ValidateJsonObject(R"({"a":[1,2]})").ok());
  EXPECT_EQ(ValidateJsonObject("[1]").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateJsonObject("3").code(), absl::StatusCode::kInvalidArgument);
  absl::Status bad = ValidateJsonObject("{bad");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("not valid JSON"), absl::string_view::npos);
  // The validator builds no DOM; it must still reject everything json::parse rejects.
  for (const char* ok : {R"({"a":{"b":[{"c":null}]},"d":"x","e":-1.5e3,"f":true})", " { } ",
                         R"({"k":"\u00e9\n"})", R"({"big":18446744073709551615})"}) {
    EXPECT_TRUE(ValidateJsonObject(ok).ok()) << ok;
  }
  for (const char* not_object : {"[{}]", "\"s\"", "null", "true", "-0"}) {
    absl::Status st = ValidateJsonObject(not_object);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << not_object;
    EXPECT_NE(st.message().find("must be a JSON object"), absl::string_view::npos) << not_object;
  }
  for (const char* invalid : {"", "{} {}", "{}x", R"({"a":})", R"({"a" 1})", "{'a':1}",
                              R"({"a":[1,]})", "{\"a\":\"\x01\"}"}) {
    absl::Status st = ValidateJsonObject(invalid);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << invalid;
    EXPECT_NE(st.message().find("not valid JSON"), absl::string_view::npos) << invalid << ": " << st;
  }
  std::string deep(10000, '[');
  EXPECT_NE(ValidateJsonObject("{\"a\":" + deep).message().find("not valid JSON"),
            absl::string_view::npos);
  EXPECT_NE(ValidateJsonObject("[]", "extra_json").message().find("extra_json must be"),
            absl::string_view::npos);
}

TEST(CoreJson, ParsesWithAReasonAndADepthLimit) {
  std::string why;
  EXPECT_FALSE(ParseJson("{bad", &why).has_value());
  EXPECT_FALSE(why.empty());
  std::string deep = std::string(40, '[') + std::string(40, ']');
  EXPECT_FALSE(ParseJson(deep).has_value());
  EXPECT_TRUE(ParseJson(deep, nullptr, 64).has_value());
}

TEST(CoreJson, ReadsIntegersAndStrings) {
  std::optional<json::value> v =
      ParseJson(R"({"i":3,"u":18446744073709551615,"s":"42","x":"4a","n":null,"t":"text"})");
  ASSERT_TRUE(v.has_value());
  const json::object& o = v->get_object();
  EXPECT_EQ(JsonInt(o.if_contains("i")), 3);
  EXPECT_EQ(JsonInt(o.if_contains("u")), std::nullopt);  // beyond int64
  EXPECT_EQ(JsonInt(o.if_contains("s")), 42);            // quoted numbers are accepted
  EXPECT_EQ(JsonInt(o.if_contains("x")), std::nullopt);
  EXPECT_EQ(JsonInt(o.if_contains("missing")), std::nullopt);
  EXPECT_EQ(JsonString(o, "t"), "text");
  EXPECT_EQ(JsonString(o, "i"), "");
  EXPECT_EQ(JsonString(o, "missing"), "");
}

TEST(CoreJson, Base64) {
  EXPECT_EQ(Base64Encode(""), "");
  EXPECT_EQ(Base64Encode("f"), "Zg==");
  EXPECT_EQ(Base64Encode("fo"), "Zm8=");
  EXPECT_EQ(Base64Encode("foo"), "Zm9v");
  EXPECT_EQ(Base64Encode("foobar"), "Zm9vYmFy");
}

}  // namespace
}  // namespace wsbridge::core
