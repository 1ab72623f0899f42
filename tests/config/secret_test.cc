// Secret resolution: env, file, inline; errors name the source, never the value.
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "bridges/core/log.h"
#include "daemon/config/config.h"
#include "tests/config/test_util.h"

namespace wsbridge::config {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::ScopedEnv;
using testing::TempDir;

v1::Secret EnvSecret(const std::string& name) {
  v1::Secret s;
  s.set_env(name);
  return s;
}

v1::Secret FileSecret(const std::string& path) {
  v1::Secret s;
  s.set_file(path);
  return s;
}

TEST(ConfigSecret, FromEnvironment) {
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_TOKEN", "env-value-1");
  absl::StatusOr<std::string> v = ResolveSecret(EnvSecret("WSBRIDGE_CONFIG_TEST_TOKEN"));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, "env-value-1");
}

TEST(ConfigSecret, EnvironmentIsReadAgainEachTime) {
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_TOKEN", "before-rotation");
  v1::Secret s = EnvSecret("WSBRIDGE_CONFIG_TEST_TOKEN");
  EXPECT_EQ(ResolveSecret(s).value_or(""), "before-rotation");
  ScopedEnv rotated("WSBRIDGE_CONFIG_TEST_TOKEN", "after-rotation");
  EXPECT_EQ(ResolveSecret(s).value_or(""), "after-rotation");
}

TEST(ConfigSecret, MissingEnvironmentVariableNamesIt) {
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_ABSENT", nullptr);
  absl::StatusOr<std::string> v = ResolveSecret(EnvSecret("WSBRIDGE_CONFIG_TEST_ABSENT"));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(v.status().message(),
              HasSubstr("environment variable \"WSBRIDGE_CONFIG_TEST_ABSENT\" is not set"));
}

TEST(ConfigSecret, EmptyEnvironmentVariableIsAnError) {
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_EMPTY", "");
  absl::StatusOr<std::string> v = ResolveSecret(EnvSecret("WSBRIDGE_CONFIG_TEST_EMPTY"));
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(v.status().message(),
              HasSubstr("environment variable \"WSBRIDGE_CONFIG_TEST_EMPTY\" is empty"));
  EXPECT_FALSE(ResolveSecret(EnvSecret("")).ok());
}

TEST(ConfigSecret, FromFileStripsOneTrailingNewline) {
  TempDir dir;
  EXPECT_EQ(ResolveSecret(FileSecret(dir.Write("a", "file-value\n"))).value_or(""), "file-value");
  EXPECT_EQ(ResolveSecret(FileSecret(dir.Write("b", "file-value"))).value_or(""), "file-value");
  EXPECT_EQ(ResolveSecret(FileSecret(dir.Write("c", "file-value\r\n"))).value_or(""),
            "file-value");
  // Only one: a deliberate second newline is part of the value.
  EXPECT_EQ(ResolveSecret(FileSecret(dir.Write("d", "file-value\n\n"))).value_or(""),
            "file-value\n");
  EXPECT_EQ(ResolveSecret(FileSecret(dir.Write("e", " spaced value "))).value_or(""),
            " spaced value ");
}

TEST(ConfigSecret, FileIsReadAgainEachTime) {
  TempDir dir;
  v1::Secret s = FileSecret(dir.Write("token", "v1\n"));
  EXPECT_EQ(ResolveSecret(s).value_or(""), "v1");
  dir.Write("token", "v2\n");
  EXPECT_EQ(ResolveSecret(s).value_or(""), "v2");
}

TEST(ConfigSecret, MissingFileNamesIt) {
  TempDir dir;
  const std::string path = dir.path() + "/nope";
  absl::StatusOr<std::string> v = ResolveSecret(FileSecret(path));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(v.status().message(),
              HasSubstr("cannot read secret file \"" + path + "\": No such file or directory"));
}

TEST(ConfigSecret, EmptyFileIsAnError) {
  TempDir dir;
  const std::string path = dir.Write("empty", "\n");
  absl::StatusOr<std::string> v = ResolveSecret(FileSecret(path));
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(v.status().message(), HasSubstr("secret file \"" + path + "\" is empty"));
}

TEST(ConfigSecret, DirectoryIsAnError) {
  TempDir dir;
  absl::StatusOr<std::string> v = ResolveSecret(FileSecret(dir.path()));
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(v.status().message(), HasSubstr("cannot read secret file \"" + dir.path() + "\""));
}

TEST(ConfigSecret, UnreadableFileIsAnError) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads files regardless of their mode";
  TempDir dir;
  const std::string path = dir.Write("locked", "locked-value");
  ASSERT_EQ(::chmod(path.c_str(), 0), 0);
  absl::StatusOr<std::string> v = ResolveSecret(FileSecret(path));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(v.status().message(), HasSubstr(path));
  EXPECT_THAT(v.status().message(), Not(HasSubstr("locked-value")));
}

TEST(ConfigSecret, InlineValue) {
  v1::Secret s;
  s.set_value("inline-value");
  EXPECT_EQ(ResolveSecret(s).value_or(""), "inline-value");
  s.set_value("");
  EXPECT_FALSE(ResolveSecret(s).ok());
}

TEST(ConfigSecret, NoSourceIsAnError) {
  absl::StatusOr<std::string> v = ResolveSecret(v1::Secret());
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(v.status().message(), HasSubstr("no source is set"));
}

TEST(ConfigSecret, ResolvedValuesAreRedactedFromLogs) {
  TempDir dir;
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_REDACT", "env-redact-me-123");
  ASSERT_TRUE(ResolveSecret(EnvSecret("WSBRIDGE_CONFIG_TEST_REDACT")).ok());
  ASSERT_TRUE(ResolveSecret(FileSecret(dir.Write("t", "file-redact-me-456\n"))).ok());
  v1::Secret inline_secret;
  inline_secret.set_value("inline-redact-me-789");
  ASSERT_TRUE(ResolveSecret(inline_secret).ok());
  std::string line = log::Redact(
      "token env-redact-me-123 file-redact-me-456 inline-redact-me-789 end");
  EXPECT_THAT(line, Not(HasSubstr("redact-me")));
  EXPECT_THAT(line, HasSubstr("end"));
}

TEST(ConfigSecret, ValuesNeverInLoadErrors) {
  // A config whose other parts are wrong still must not print resolved values.
  ScopedEnv env("WSBRIDGE_CONFIG_TEST_IN_CONFIG", "config-secret-value-42");
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(
      "server:\n  auth_token: {env: WSBRIDGE_CONFIG_TEST_IN_CONFIG}\n"
      "bridges:\n  - name: d\n    dfx:\n      upstream: {url: \"ws://h\"}\n"
      "      device_token: {value: inline-secret-value-43}\n",
      "t.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("neither listen nor unix_socket"));
  EXPECT_THAT(c.status().message(), HasSubstr("is plaintext"));
  EXPECT_THAT(c.status().message(), Not(HasSubstr("config-secret-value-42")));
  EXPECT_THAT(c.status().message(), Not(HasSubstr("inline-secret-value-43")));
}

}  // namespace
}  // namespace wsbridge::config
