// The generic YAML -> protobuf converter, durations, and schema defaults.
#include "daemon/config/yaml_proto.h"

#include <string>

#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/duration.pb.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/type.pb.h>
#include <google/protobuf/wrappers.pb.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "wsbridge/config/v1/daemon.pb.h"
#include "wsbridge/config/v1/options.pb.h"

namespace wsbridge::config {
namespace {

namespace pb = google::protobuf;
using ::testing::HasSubstr;
using std::chrono::nanoseconds;

// Parses `yaml` into `msg`; returns all errors ("" when none).
std::string Parse(const std::string& yaml, pb::Message* msg, SourceMap* sources = nullptr) {
  Diagnostics diag("t.yaml");
  ParseYamlInto(YAML::Load(yaml), msg, "", diag, sources);
  return std::string(diag.ToStatus().message());
}

TEST(ConfigDuration, AcceptsUnitsFractionsAndSequences) {
  struct Case {
    const char* text;
    nanoseconds want;
  } cases[] = {
      {"250ms", std::chrono::milliseconds(250)}, {"1.5s", std::chrono::milliseconds(1500)},
      {"2m", std::chrono::minutes(2)},           {"1h", std::chrono::hours(1)},
      {"1m30s", std::chrono::seconds(90)},       {"100us", std::chrono::microseconds(100)},
      {"7ns", nanoseconds(7)},                   {"0s", nanoseconds(0)},
      {".5s", std::chrono::milliseconds(500)},   {"0.001s", std::chrono::milliseconds(1)},
      {"1.0000000019s", nanoseconds(1'000'000'001)},
  };
  for (const Case& c : cases) {
    absl::StatusOr<nanoseconds> d = ParseDuration(c.text);
    ASSERT_TRUE(d.ok()) << c.text << ": " << d.status();
    EXPECT_EQ(*d, c.want) << c.text;
  }
}

TEST(ConfigDuration, RefusesBadSyntaxWithAHint) {
  struct Case {
    const char* text;
    const char* hint;
  } cases[] = {
      {"10", "add a unit, e.g. \"10s\""},
      {"1.5", "add a unit, e.g. \"1.5s\""},
      {"-1s", "durations cannot be negative"},
      {"5x", "unknown unit \"x\""},
      {"5 s", "unknown unit \" s\""},
      {"", "write a number followed by a unit"},
      {"s", "write a number before each unit"},
      {"1.s", "write digits after the decimal point"},
      {"99999999999999h", "too large"},
      {"1s2", "add a unit"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<nanoseconds> d = ParseDuration(c.text);
    ASSERT_FALSE(d.ok()) << c.text;
    EXPECT_THAT(d.status().message(), HasSubstr("expected a duration like")) << c.text;
    EXPECT_THAT(d.status().message(), HasSubstr(c.hint)) << c.text;
  }
}

TEST(ConfigDuration, FormatShortestExactUnit) {
  EXPECT_EQ(FormatDuration(std::chrono::hours(2)), "2h");
  EXPECT_EQ(FormatDuration(std::chrono::minutes(5)), "5m");
  EXPECT_EQ(FormatDuration(std::chrono::seconds(90)), "90s");
  EXPECT_EQ(FormatDuration(std::chrono::milliseconds(1500)), "1500ms");
  EXPECT_EQ(FormatDuration(nanoseconds(1001)), "1001ns");
  EXPECT_EQ(FormatDuration(nanoseconds(0)), "0s");
}

TEST(ConfigYaml, EnumsRepeatedAndNestedMessages) {
  pb::Type t;
  std::string e = Parse(R"(name: T
oneofs: [a, b]
syntax: SYNTAX_PROTO3
fields:
  - {name: f, number: 5, kind: TYPE_STRING, packed: true}
  - name: g
    number: -7
)",
                        &t);
  ASSERT_EQ(e, "");
  EXPECT_EQ(t.name(), "T");
  ASSERT_EQ(t.oneofs_size(), 2);
  EXPECT_EQ(t.oneofs(1), "b");
  EXPECT_EQ(t.syntax(), pb::SYNTAX_PROTO3);
  ASSERT_EQ(t.fields_size(), 2);
  EXPECT_EQ(t.fields(0).kind(), pb::Field::TYPE_STRING);
  EXPECT_TRUE(t.fields(0).packed());
  EXPECT_EQ(t.fields(1).number(), -7);
}

TEST(ConfigYaml, EnumAndListErrors) {
  pb::Type t;
  std::string e = Parse("oneofs: a\nsyntax: proto4\nfields:\n  - number: 3000000000\n    kind: 1\n",
                        &t);
  EXPECT_THAT(e, HasSubstr("t.yaml:1:9: oneofs: expected a list, got a plain value"));
  EXPECT_THAT(e, HasSubstr("t.yaml:2:9: syntax: \"proto4\" is not one of SYNTAX_PROTO2, "
                           "SYNTAX_PROTO3"));
  EXPECT_THAT(e, HasSubstr("t.yaml:4:13: fields[0].number: 3000000000 is above the maximum "
                           "2147483647"));
  EXPECT_THAT(e, HasSubstr("fields[0].kind: \"1\" is not one of TYPE_UNKNOWN"));
}

TEST(ConfigYaml, SixtyFourBitIntegersAndDoubles) {
  pb::Int64Value i64;
  EXPECT_EQ(Parse("value: -9223372036854775808", &i64), "");
  EXPECT_EQ(i64.value(), std::numeric_limits<int64_t>::min());
  EXPECT_THAT(Parse("value: 9223372036854775808", &i64),
              HasSubstr("value: 9223372036854775808 is above the maximum 9223372036854775807"));
  pb::UInt64Value u64;
  EXPECT_EQ(Parse("value: 18446744073709551615", &u64), "");
  EXPECT_EQ(u64.value(), std::numeric_limits<uint64_t>::max());
  EXPECT_THAT(Parse("value: -5", &u64), HasSubstr("value: -5 is below the minimum 0"));
  EXPECT_EQ(Parse("value: +5", &u64), "");
  EXPECT_EQ(u64.value(), 5u);
  pb::UInt32Value u32;
  EXPECT_THAT(Parse("value: 4294967296", &u32),
              HasSubstr("value: 4294967296 is above the maximum 4294967295 (allowed: 0 to "
                        "4294967295)"));
  pb::Int32Value i32;
  EXPECT_THAT(Parse("value: -2147483649", &i32),
              HasSubstr("value: -2147483649 is below the minimum -2147483648"));
  pb::DoubleValue d;
  EXPECT_EQ(Parse("value: 1.5e3", &d), "");
  EXPECT_EQ(d.value(), 1500.0);
  EXPECT_THAT(Parse("value: nan", &d), HasSubstr("value: expected a number, got \"nan\""));
  EXPECT_THAT(Parse("value: 1e999", &d), HasSubstr("expected a number"));
  pb::BoolValue b;
  EXPECT_EQ(Parse("value: TRUE", &b), "");
  EXPECT_TRUE(b.value());
  EXPECT_THAT(Parse("value: 1", &b), HasSubstr("expected true or false, got \"1\""));
}

TEST(ConfigYaml, MapFieldsAndRecordedPositions) {
  v1::UpstreamConfig u;
  SourceMap sources;
  std::string e = Parse("url: wss://h\nheaders:\n  X-One: \"1\"\n  X-Two: two\n", &u, &sources);
  ASSERT_EQ(e, "");
  ASSERT_EQ(u.headers_size(), 2);
  EXPECT_EQ(u.headers().at("X-One"), "1");
  EXPECT_EQ(u.headers().at("X-Two"), "two");
  std::optional<YAML::Mark> m = sources.Find("headers[\"X-Two\"]");
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->line, 3);
  EXPECT_EQ(m->column, 9);
  // Unrecorded paths fall back to their nearest recorded ancestor.
  std::optional<YAML::Mark> parent = sources.Find("keepalive.ping_interval");
  ASSERT_TRUE(parent.has_value());
  EXPECT_EQ(parent->line, 0);
  EXPECT_THAT(Parse("headers: [a]\n", &u), HasSubstr("headers: expected a mapping, got a list"));
  EXPECT_THAT(Parse("headers: {A: {b: c}}\n", &u),
              HasSubstr("headers[\"A\"]: expected a string, got a mapping"));
}

TEST(ConfigYaml, DurationFieldsTakeOnlyScalars) {
  v1::ShutdownConfig s;
  EXPECT_THAT(Parse("deadline: {seconds: 5}\n", &s),
              HasSubstr("deadline: expected a duration like \"10s\", got a mapping"));
}

TEST(ConfigYaml, NonScalarKeysAreRefused) {
  v1::ShutdownConfig s;
  EXPECT_THAT(Parse("? [a]\n: 1\n", &s), HasSubstr("keys must be plain names, got a list"));
}

TEST(ConfigYaml, SelfReferencingAliasStops) {
  // google.protobuf.Struct is recursive, so only the depth limit ends this.
  pb::Struct st;
  std::string e = Parse("&x\nfields:\n  a:\n    struct_value: *x\n", &st);
  EXPECT_THAT(e, HasSubstr("nested more than 32 levels deep"));
}

TEST(ConfigDiagnostics, FormatsWithAndWithoutPosition) {
  Diagnostics d("f.yaml");
  YAML::Node n = YAML::Load("a: 1");
  d.Add(n["a"].Mark(), "a", "bad (fix it)");
  d.Add(std::nullopt, "b.c", "worse");
  d.Add(std::nullopt, "", "whole file");
  // Sorted by position; errors without one come first.
  EXPECT_EQ(d.ToStatus().message(),
            "f.yaml: b.c: worse\nf.yaml: whole file\nf.yaml:1:4: a: bad (fix it)");
  EXPECT_TRUE(Diagnostics("x").ToStatus().ok());
}

// Every default in the schema parses, satisfies its own field's rules, and is reached.
void ExpectDefaultsSet(const pb::Message& msg, const std::string& path, int* count) {
  const pb::Descriptor* desc = msg.GetDescriptor();
  const pb::Reflection* refl = msg.GetReflection();
  for (int i = 0; i < desc->field_count(); ++i) {
    const pb::FieldDescriptor* f = desc->field(i);
    std::string child = path + "." + f->name();
    if (!f->options().GetExtension(v1::rules).default_value().empty()) {
      ++*count;
      EXPECT_TRUE(refl->HasField(msg, f)) << child << " has a default but is unset";
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated() &&
        refl->HasField(msg, f)) {
      ExpectDefaultsSet(refl->GetMessage(msg, f), child, count);
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && f->is_repeated() && !f->is_map()) {
      for (int j = 0; j < refl->FieldSize(msg, f); ++j) {
        ExpectDefaultsSet(refl->GetRepeatedMessage(msg, f, j), child, count);
      }
    }
  }
}

TEST(ConfigDefaults, EverySchemaDefaultIsValidAndApplied) {
  v1::DaemonConfig c;
  c.add_bridges()->mutable_dfx()->mutable_upstream();
  ASSERT_TRUE(ApplyDefaults(&c).ok());
  int count = 0;
  ExpectDefaultsSet(c, "", &count);
  EXPECT_GE(count, 22);
}

TEST(ConfigDefaults, PresenceSensitiveMessagesStayAbsent) {
  v1::DaemonConfig c;
  c.add_bridges()->mutable_dfx();
  ASSERT_TRUE(ApplyDefaults(&c).ok());
  EXPECT_TRUE(c.has_server());  // carries defaults
  EXPECT_FALSE(c.server().has_tls());
  EXPECT_FALSE(c.server().has_auth_token());
  EXPECT_FALSE(c.has_admin());
  EXPECT_FALSE(c.bridges(0).dfx().has_device_token());
  EXPECT_FALSE(c.bridges(0).dfx().upstream().has_tls());
  // A bridge with no kind does not get one invented.
  v1::DaemonConfig empty_bridge;
  empty_bridge.add_bridges();
  ASSERT_TRUE(ApplyDefaults(&empty_bridge).ok());
  EXPECT_EQ(empty_bridge.bridges(0).kind_case(), v1::BridgeConfig::KIND_NOT_SET);
}

TEST(ConfigDefaults, SetValuesAreKept) {
  v1::UpstreamConfig u;
  u.set_max_message_bytes(4096);
  u.mutable_backoff()->mutable_initial()->set_seconds(2);
  ASSERT_TRUE(ApplyDefaults(&u).ok());
  EXPECT_EQ(u.max_message_bytes(), 4096u);
  EXPECT_EQ(u.backoff().initial().seconds(), 2);
  EXPECT_EQ(u.backoff().max().seconds(), 30);
}

}  // namespace
}  // namespace wsbridge::config
