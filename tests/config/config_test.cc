// Loading whole configs: every class of bad config gets an error naming the file
// position, the field path, what is wrong and what to do.
#include "daemon/config/config.h"

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "tests/config/test_util.h"

namespace wsbridge::config {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::ScopedEnv;
using testing::TempDir;

// A complete, valid config that the tests below break one way at a time.
constexpr char kValid[] = R"(server:
  listen: "127.0.0.1:50051"
bridges:
  - name: dfx
    dfx:
      upstream:
        url: wss://api.example.test/ws
      allow_call_token: true
)";

std::string ErrorOf(std::string_view yaml) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(yaml, "test.yaml");
  EXPECT_FALSE(c.ok()) << "config unexpectedly loaded:\n" << yaml;
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  return std::string(c.status().message());
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ConfigLoad, ValidMinimalConfigLoads) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(kValid, "test.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().listen(), "127.0.0.1:50051");
  ASSERT_EQ(c->bridges_size(), 1);
  EXPECT_EQ(c->bridges(0).name(), "dfx");
  EXPECT_EQ(c->bridges(0).dfx().upstream().url(), "wss://api.example.test/ws");
  EXPECT_TRUE(c->bridges(0).dfx().allow_call_token());
}

TEST(ConfigLoad, DefaultsAreApplied) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(kValid, "test.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().unix_socket_mode(), "0660");
  EXPECT_EQ(c->server().max_message_bytes(), 4u << 20);
  EXPECT_EQ(c->server().max_concurrent_streams(), 1000u);
  EXPECT_FALSE(c->server().has_tls());
  EXPECT_FALSE(c->server().has_auth_token());
  EXPECT_EQ(c->shutdown().drain_timeout().seconds(), 10);
  EXPECT_EQ(c->shutdown().deadline().seconds(), 15);
  EXPECT_EQ(c->runtime().io_threads(), 2u);
  EXPECT_EQ(c->runtime().grpc_cq_threads(), 1u);
  EXPECT_EQ(c->runtime().memory_trim_interval().seconds(), 5);
  EXPECT_EQ(c->log().format(), "plain");
  EXPECT_EQ(c->log().level(), "info");
  const v1::DfxBridgeConfig& dfx = c->bridges(0).dfx();
  EXPECT_EQ(dfx.request_timeout().seconds(), 30);
  EXPECT_EQ(dfx.idle_session_timeout().seconds(), 300);
  EXPECT_EQ(dfx.rate_limit_retry().seconds(), 1);
  EXPECT_EQ(dfx.max_sessions(), 1000u);
  EXPECT_EQ(dfx.subscriber_queue(), 256u);
  EXPECT_FALSE(dfx.has_device_token());
  const v1::UpstreamConfig& u = dfx.upstream();
  EXPECT_EQ(u.connect_timeout().seconds(), 10);
  EXPECT_EQ(u.handshake_timeout().seconds(), 10);
  EXPECT_EQ(u.max_message_bytes(), 1u << 20);
  EXPECT_EQ(u.send_queue_messages(), 1024u);
  EXPECT_EQ(u.keepalive().ping_interval().seconds(), 20);
  EXPECT_EQ(u.keepalive().pong_timeout().seconds(), 10);
  EXPECT_EQ(u.backoff().initial().nanos(), 500'000'000);
  EXPECT_EQ(u.backoff().initial().seconds(), 0);
  EXPECT_EQ(u.backoff().max().seconds(), 30);
  EXPECT_EQ(u.backoff().multiplier(), 2.0);
  EXPECT_EQ(u.backoff().reset_after().seconds(), 30);
  EXPECT_FALSE(u.has_tls());
}

TEST(ConfigLoad, ExplicitValuesWinOverDefaults) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(R"(server:
  unix_socket: /tmp/x.sock
  unix_socket_mode: "0600"
  max_message_bytes: 2048
log: {level: debug, format: json}
shutdown: {drain_timeout: 0s, deadline: 1.5s}
runtime: {io_threads: 8, grpc_cq_threads: 3, memory_trim_interval: 0s}
)",
                                                        "test.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().unix_socket_mode(), "0600");
  EXPECT_EQ(c->server().max_message_bytes(), 2048u);
  EXPECT_EQ(c->log().level(), "debug");
  EXPECT_EQ(c->log().format(), "json");
  // An explicit zero duration is kept, not replaced by the default.
  EXPECT_TRUE(c->shutdown().has_drain_timeout());
  EXPECT_EQ(c->shutdown().drain_timeout().seconds(), 0);
  EXPECT_EQ(c->shutdown().deadline().seconds(), 1);
  EXPECT_EQ(c->shutdown().deadline().nanos(), 500'000'000);
  EXPECT_EQ(c->runtime().io_threads(), 8u);
  EXPECT_EQ(c->runtime().grpc_cq_threads(), 3u);
  EXPECT_TRUE(c->runtime().has_memory_trim_interval());  // 0s: trimming off
  EXPECT_EQ(c->runtime().memory_trim_interval().seconds(), 0);
}

TEST(ConfigLoad, CallerConnectionLimitsHaveDefaultsAndCanBeSet) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigString(kValid, "test.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().max_metadata_bytes(), 16u * 1024);
  EXPECT_FALSE(c->server().reflection_without_token());
  const v1::ServerConnectionConfig& conn = c->server().connections();
  EXPECT_EQ(conn.keepalive_time().seconds(), 60);
  EXPECT_EQ(conn.keepalive_timeout().seconds(), 20);
  EXPECT_EQ(conn.max_idle().seconds(), 300);
  EXPECT_FALSE(conn.has_max_age());  // no limit unless set
  EXPECT_EQ(conn.max_age_grace().seconds(), 30);
  EXPECT_EQ(conn.min_ping_interval().seconds(), 10);
  EXPECT_TRUE(conn.has_max_connections());
  EXPECT_EQ(conn.max_connections(), 1000u);

  c = LoadConfigString(R"(server:
  listen: "127.0.0.1:50051"
  max_metadata_bytes: 4096
  reflection_without_token: true
  connections: {keepalive_time: 5s, max_idle: 0s, max_age: 1h, max_age_grace: 2s,
                max_connections: 0}
)",
                       "test.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().max_metadata_bytes(), 4096u);
  EXPECT_TRUE(c->server().reflection_without_token());
  EXPECT_EQ(c->server().connections().keepalive_time().seconds(), 5);
  EXPECT_TRUE(c->server().connections().has_max_idle());  // 0s: idle connections stay
  EXPECT_EQ(c->server().connections().max_idle().seconds(), 0);
  EXPECT_EQ(c->server().connections().max_age().seconds(), 3600);
  EXPECT_EQ(c->server().connections().max_age_grace().seconds(), 2);
  EXPECT_TRUE(c->server().connections().has_max_connections());  // 0: no cap
  EXPECT_EQ(c->server().connections().max_connections(), 0u);

  EXPECT_THAT(ErrorOf("server: {listen: \"127.0.0.1:1\", max_metadata_bytes: 100}\n"),
              HasSubstr("server.max_metadata_bytes: 100 is below the minimum 1024"));
}

TEST(ConfigErrors, HugeBadValuesAreCutInTheMessage) {
  // A 3 MB value in the wrong place must not come back in full in the error.
  const std::string huge(3 * 1024 * 1024, 'x');
  std::string e = ErrorOf(absl::StrCat("server:\n  listen: \"", huge, "\"\n"));
  EXPECT_LT(e.size(), 1000u);
  EXPECT_THAT(e, HasSubstr("server.listen: \"xxxx"));
  EXPECT_THAT(e, HasSubstr("(3145728 bytes) is not host:port"));

  e = ErrorOf(absl::StrCat("server:\n  listen: \"127.0.0.1:1\"\n  unix_socket_mode: \"", huge,
                           "\"\n"));
  EXPECT_LT(e.size(), 1000u);
  EXPECT_THAT(e, HasSubstr("server.unix_socket_mode"));

  // A message built outside the loader (the upstream URL check) is cut as well.
  e = ErrorOf(absl::StrReplaceAll(kValid, {{"wss://api.example.test/ws",
                                            absl::StrCat("ftp://", huge)}}));
  EXPECT_LT(e.size(), 2000u);
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.url: "));
  EXPECT_THAT(e, HasSubstr("message cut: "));
}

TEST(ConfigLoad, DemoConfigLoadsWithNoEnvironment) {
  const std::string path = WSBRIDGE_DEPLOY_CONFIG_DIR "/demo.yaml";
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigFile(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().listen(), "127.0.0.1:50051");
  EXPECT_EQ(c->server().unix_socket(), "/tmp/wsbridge/wsbridged.sock");
  EXPECT_EQ(c->server().unix_socket_mode(), "0660");
  EXPECT_EQ(c->admin().listen(), "127.0.0.1:9090");
  // All four bridges, each in front of wsbridge-emulator on its fixed loopback port with
  // the emulator's demo credentials inline (scripts/run.sh starts the emulator so).
  ASSERT_EQ(c->bridges_size(), 4);
  auto secret = [](const v1::Secret& s) {
    absl::StatusOr<std::string> v = ResolveSecret(s);
    return v.ok() ? *v : "<" + v.status().ToString() + ">";
  };
  const v1::BridgeConfig& dfx = c->bridges(0);
  EXPECT_EQ(dfx.name(), "dfx");
  EXPECT_EQ(dfx.dfx().upstream().url(), "ws://127.0.0.1:18081");
  EXPECT_TRUE(dfx.dfx().allow_call_token());
  EXPECT_EQ(secret(dfx.dfx().device_token()), "demo-device-token");
  const v1::BridgeConfig& nlx = c->bridges(1);
  EXPECT_EQ(nlx.name(), "nlx");
  EXPECT_EQ(nlx.nlx().upstream().url(), "ws://127.0.0.1:18082");
  EXPECT_EQ(secret(nlx.nlx().api_key()), "nlx-emulator-api-key");
  EXPECT_EQ(secret(nlx.nlx().deployment_key()), "nlx-emulator-deployment");
  EXPECT_EQ(secret(nlx.nlx().channel_key()), "nlx-emulator-channel");
  EXPECT_EQ(nlx.nlx().language(), "en-US");
  const v1::BridgeConfig& emogg = c->bridges(2);
  EXPECT_EQ(emogg.name(), "emogg");
  EXPECT_EQ(emogg.emogg().upstream().url(), "ws://127.0.0.1:18083/ws/v1");
  EXPECT_EQ(secret(emogg.emogg().token()), "demo-emogg-token");
  const v1::BridgeConfig& nexora = c->bridges(3);
  EXPECT_EQ(nexora.name(), "nexora");
  EXPECT_EQ(nexora.nexora().upstream().url(), "ws://127.0.0.1:18084");
  EXPECT_EQ(secret(nexora.nexora().api_key()), "nxr_demo_key");
  for (const v1::UpstreamConfig* u :
       {&dfx.dfx().upstream(), &nlx.nlx().upstream(), &emogg.emogg().upstream(),
        &nexora.nexora().upstream()}) {
    absl::StatusOr<core::ConnectionOptions> o = ToConnectionOptions(*u, "demo");
    ASSERT_TRUE(o.ok()) << u->url() << ": " << o.status();
    EXPECT_TRUE(o->allow_plaintext) << u->url();
  }
}

TEST(ConfigLoad, ProductionExampleLoadsWithSecretsFromEnvAndFiles) {
  TempDir dir;
  // The example names absolute paths; point them into the temp dir.
  std::string yaml = absl::StrReplaceAll(
      ReadText(WSBRIDGE_DEPLOY_CONFIG_DIR "/example-production.yaml"),
      {{"/etc/wsbridge/", dir.path() + "/etc/"},
       {"/var/run/secrets/wsbridge/", dir.path() + "/secrets/"}});
  ASSERT_THAT(yaml, HasSubstr(dir.path()));
  dir.Write("etc/tls/server.crt", "cert");
  dir.Write("etc/tls/server.key", "key");
  dir.Write("etc/tls/clients-ca.pem", "ca");
  dir.Write("etc/ca/upstream-ca.pem", "ca");
  const std::string config_path = dir.Write("production.yaml", yaml);

  {
    // Without the secrets it must not load, and must say which ones are missing.
    ScopedEnv env("WSBRIDGE_AUTH_TOKEN", nullptr);
    absl::StatusOr<v1::DaemonConfig> c = LoadConfigFile(config_path);
    ASSERT_FALSE(c.ok());
    EXPECT_THAT(c.status().message(),
                AllOf(HasSubstr("server.auth_token.env: environment variable "
                                "\"WSBRIDGE_AUTH_TOKEN\" is not set"),
                      HasSubstr("bridges[0].dfx.device_token.file: cannot read secret file")));
  }

  dir.Write("secrets/dfx-device-token", "prod-device-token\n");
  dir.Write("secrets/emogg-token", "prod-emogg-token\n");
  ScopedEnv env("WSBRIDGE_AUTH_TOKEN", "prod-auth-token");
  ScopedEnv nlx_api("NLX_API_KEY", "prod-nlx-api");
  ScopedEnv nlx_deployment("NLX_DEPLOYMENT_KEY", "prod-nlx-deployment");
  ScopedEnv nlx_channel("NLX_CHANNEL_KEY", "prod-nlx-channel");
  ScopedEnv nexora_key("NEXORA_API_KEY", "nxr_prod");
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigFile(config_path);
  ASSERT_TRUE(c.ok()) << c.status();
  // The demo's four bridges, over verified wss://.
  ASSERT_EQ(c->bridges_size(), 4);
  EXPECT_EQ(c->bridges(1).nlx().upstream().url(), "wss://us-east-1-ws.apps.nlx.ai");
  EXPECT_EQ(c->bridges(2).emogg().upstream().url(), "wss://api.emogg.com:443/ws/v1");
  EXPECT_EQ(c->bridges(3).nexora().upstream().url(), "wss://nexora.example.com");
  std::vector<std::string> names;
  for (const v1::BridgeConfig& b : c->bridges()) names.push_back(b.name());
  EXPECT_THAT(names, ::testing::ElementsAre("dfx", "nlx", "emogg", "nexora"));
  absl::StatusOr<std::string> emogg_token = ResolveSecret(c->bridges(2).emogg().token());
  ASSERT_TRUE(emogg_token.ok()) << emogg_token.status();
  EXPECT_EQ(*emogg_token, "prod-emogg-token");
  EXPECT_EQ(c->server().tls().client_ca_file(), dir.path() + "/etc/tls/clients-ca.pem");
  EXPECT_TRUE(c->server().tls().require_client_cert());
  EXPECT_EQ(c->log().format(), "json");
  EXPECT_EQ(c->shutdown().drain_timeout().seconds(), 20);
  EXPECT_EQ(c->shutdown().deadline().seconds(), 25);
  const v1::DfxBridgeConfig& dfx = c->bridges(0).dfx();
  EXPECT_EQ(dfx.upstream().url(), "wss://api.deepaffex.ai");
  EXPECT_FALSE(dfx.upstream().allow_plaintext());
  EXPECT_EQ(dfx.upstream().backoff().reset_after().seconds(), 60);
  absl::StatusOr<std::string> auth = ResolveSecret(c->server().auth_token());
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ(*auth, "prod-auth-token");
  absl::StatusOr<std::string> token = ResolveSecret(dfx.device_token());
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "prod-device-token");
  absl::StatusOr<core::ConnectionOptions> o = ToConnectionOptions(dfx.upstream(), "dfx/dfx");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->tls.ca_file, dir.path() + "/etc/ca/upstream-ca.pem");
  EXPECT_TRUE(o->tls.verify_peer);
  EXPECT_EQ(o->connect_timeout, std::chrono::seconds(5));
}

TEST(ConfigLoad, MissingFileIsNotFoundAndNamesIt) {
  TempDir dir;
  const std::string path = dir.path() + "/absent.yaml";
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
}

TEST(ConfigLoad, ErrorsCarryTheFileNameGiven) {
  TempDir dir;
  const std::string path = dir.Write("bad.yaml", "server:\n  listenn: x\n");
  absl::StatusOr<v1::DaemonConfig> c = LoadConfigFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr(path + ":2:3: server.listenn: unknown key"));
}

TEST(ConfigErrors, UnknownKeyNamesPositionPathAndKnownKeys) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:50051"
bridges:
  - name: dfx
    dfx:
      upstream:
        urll: wss://api.example.test
      allow_call_token: true
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:7:9: bridges[0].dfx.upstream.urll: unknown key \"urll\" "
                           "(did you mean \"url\"? known keys: url, allow_plaintext, tls,"));
}

TEST(ConfigErrors, BelowMinimum) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  max_message_bytes: 512\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:3:22: server.max_message_bytes: 512 is below the minimum "
                           "1024 (allowed: 1024 to 268435456)"));
}

TEST(ConfigErrors, AboveMaximum) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\nruntime:\n  io_threads: 1000\n");
  EXPECT_THAT(e, HasSubstr("runtime.io_threads: 1000 is above the maximum 256"));
}

TEST(ConfigErrors, IntegerOutsideItsType) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  max_concurrent_streams: -1\n"
                          "runtime:\n  io_threads: 99999999999\n");
  EXPECT_THAT(e, HasSubstr("server.max_concurrent_streams: -1 is below the minimum 1 (allowed: 1 to 100000)"));
  EXPECT_THAT(e, HasSubstr("runtime.io_threads: 99999999999 is above the maximum 256 (allowed: 1 to 256)"));
}

TEST(ConfigErrors, StringNotOneOfTheAllowedValues) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\nlog:\n  level: verbose\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:4:10: log.level: \"verbose\" is not one of debug, info, "
                           "warn, error"));
}

TEST(ConfigErrors, WrongScalarTypes) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
  max_message_bytes: abc
runtime:
  io_threads: 1.5
bridges:
  - name: dfx
    dfx:
      upstream:
        url: wss://x.test
        allow_plaintext: yes
        backoff:
          multiplier: fast
      allow_call_token: true
)");
  EXPECT_THAT(e, HasSubstr("server.max_message_bytes: expected an integer, got \"abc\""));
  EXPECT_THAT(e, HasSubstr("runtime.io_threads: expected an integer, got \"1.5\""));
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.allow_plaintext: expected true or false, "
                           "got \"yes\""));
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.backoff.multiplier: expected a number, got "
                           "\"fast\""));
}

TEST(ConfigErrors, ExpectedAMapping) {
  std::string e = ErrorOf("server: 127.0.0.1:50051\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:1:9: server: expected a mapping, got a plain value"));
}

TEST(ConfigErrors, ExpectedAListAndScalarGivenAList) {
  std::string e = ErrorOf("server:\n  listen: [a, b]\nbridges:\n  name: dfx\n");
  EXPECT_THAT(e, HasSubstr("server.listen: expected a string, got a list"));
  EXPECT_THAT(e, HasSubstr("bridges: expected a list, got a mapping"));
}

TEST(ConfigErrors, EmptyValueForScalar) {
  std::string e = ErrorOf("server:\n  listen:\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:2:3: server.listen: expected a string, got an empty value "
                           "(write a value or remove the key)"));
}

TEST(ConfigErrors, DurationSyntax) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
shutdown:
  drain_timeout: 10
  deadline: 5 minutes
)");
  EXPECT_THAT(e, HasSubstr("shutdown.drain_timeout: expected a duration like \"250ms\", \"1.5s\", "
                           "\"2m\" or \"1h\", got \"10\" (add a unit, e.g. \"10s\")"));
  EXPECT_THAT(e, HasSubstr("shutdown.deadline: expected a duration"));
}

TEST(ConfigErrors, DurationOutOfRange) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: dfx
    dfx:
      upstream: {url: "wss://x.test", connect_timeout: 500us}
      idle_session_timeout: 2d
      allow_call_token: true
)");
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.connect_timeout: 500us is below the minimum "
                           "1ms (allowed: 1ms to 5m)"));
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.idle_session_timeout: expected a duration"));
  EXPECT_THAT(e, HasSubstr("unknown unit \"d\""));
}

TEST(ConfigErrors, RequiredKeysMissing) {
  EXPECT_THAT(ErrorOf("log:\n  level: info\n"),
              HasSubstr("test.yaml:1:1: server: required key \"server\" is missing (add it at "
                        "the top level)"));
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - dfx:
      upstream:
        allow_plaintext: true
      allow_call_token: true
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:4:5: bridges[0].name: required key \"name\" is missing "
                           "(add it under bridges[0])"));
  EXPECT_THAT(e, HasSubstr("test.yaml:6:9: bridges[0].dfx.upstream.url: required key \"url\" is "
                           "missing (add it under bridges[0].dfx.upstream)"));
}

TEST(ConfigErrors, RequiredStringEmpty) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: ""
    dfx: {upstream: {url: "wss://x.test"}, allow_call_token: true}
)");
  EXPECT_THAT(e, HasSubstr("bridges[0].name: must not be empty"));
}

TEST(ConfigErrors, OneofWithTwoChoices) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
  auth_token:
    env: TOKEN_VAR
    file: /run/token
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:5:5: server.auth_token: \"env\" and \"file\" are both set, "
                           "but only one of env, file, value may be (keep one)"));
}

TEST(ConfigErrors, DuplicateBridgeNames) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: dfx
    dfx: {upstream: {url: "wss://a.test"}, allow_call_token: true}
  - name: dfx
    dfx: {upstream: {url: "wss://b.test"}, allow_call_token: true}
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:6:11: bridges[1].name: \"dfx\" is already used by "
                           "bridges[0] (bridge names must be unique)"));
}

TEST(ConfigErrors, BridgeNameWithBadCharacters) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: "my bridge"
    dfx: {upstream: {url: "wss://a.test"}, allow_call_token: true}
)");
  EXPECT_THAT(e, HasSubstr("bridges[0].name: \"my bridge\" may only contain letters, digits"));
}

TEST(ConfigErrors, UnknownBridgeKind) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: x
    acme: {}
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:5:5: bridges[0].acme: unknown key \"acme\" (known keys: "
                           "name, dfx, nlx, emogg, nexora, limits)"));
}

TEST(ConfigErrors, BridgeWithoutKind) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: x
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:4:5: bridges[0]: no bridge kind is set (add one of: dfx, nlx, emogg, nexora)"));
}

TEST(ConfigErrors, EmptyBridgeKind) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: x
    dfx:
)");
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream: required key \"upstream\" is missing"));
}

TEST(ConfigErrors, MissingSecretEnvAndFile) {
  TempDir dir;
  ScopedEnv unset("WSBRIDGE_CONFIG_TEST_UNSET_VAR", nullptr);
  std::string yaml = R"(server:
  listen: "127.0.0.1:1"
  auth_token:
    env: WSBRIDGE_CONFIG_TEST_UNSET_VAR
bridges:
  - name: dfx
    dfx:
      upstream: {url: "wss://x.test"}
      device_token:
        file: DIR/missing-token
)";
  yaml = absl::StrReplaceAll(yaml, {{"DIR", dir.path()}});
  std::string e = ErrorOf(yaml);
  EXPECT_THAT(e, HasSubstr("test.yaml:4:10: server.auth_token.env: environment variable "
                           "\"WSBRIDGE_CONFIG_TEST_UNSET_VAR\" is not set"));
  EXPECT_THAT(e, HasSubstr("test.yaml:10:15: bridges[0].dfx.device_token.file: cannot read "
                           "secret file \"" + dir.path() + "/missing-token\": No such file"));
}

TEST(ConfigErrors, SecretWithNoSource) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
  auth_token: {}
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:3:15: server.auth_token: no source is set (write one of "
                           "env: VARIABLE, file: /path or value: ...)"));
}

TEST(ConfigErrors, PlaintextUrlWithoutAllowPlaintext) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
bridges:
  - name: dfx
    dfx:
      upstream:
        url: ws://127.0.0.1:18081
      allow_call_token: true
)");
  EXPECT_THAT(e, HasSubstr("test.yaml:7:14: bridges[0].dfx.upstream.url: "
                           "\"ws://127.0.0.1:18081\" is plaintext (use wss://, or set "
                           "allow_plaintext: true"));
}

TEST(ConfigErrors, UrlNotWebSocket) {
  for (const char* url : {"https://api.example.test", "api.example.test", "wss://", "wss://:443",
                          "wss://host:99999", "wss://user:pw@host/"}) {
    std::string yaml = absl::StrReplaceAll(kValid, {{"wss://api.example.test/ws", url}});
    std::string e = ErrorOf(yaml);
    EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.url: \"")) << url;
  }
  EXPECT_THAT(ErrorOf(absl::StrReplaceAll(kValid, {{"wss://api.example.test/ws", "https://h"}})),
              HasSubstr("\"https://h\" is not a ws:// or wss:// URL"));
  // Credentials in a URL are refused, and not echoed.
  std::string e =
      ErrorOf(absl::StrReplaceAll(kValid, {{"wss://api.example.test/ws", "wss://u:hunter2@h/"}}));
  EXPECT_THAT(e, HasSubstr("carries user info"));
}

TEST(ConfigErrors, ShutdownDeadlineMustExceedDrain) {
  EXPECT_THAT(ErrorOf("server:\n  listen: \"127.0.0.1:1\"\nshutdown:\n  drain_timeout: 10s\n"
                      "  deadline: 10s\n"),
              HasSubstr("test.yaml:5:13: shutdown.deadline: deadline 10s must exceed "
                        "drain_timeout 10s (raise shutdown.deadline or lower "
                        "shutdown.drain_timeout)"));
  // Against the default deadline (15s) the error sits on the field that was written.
  EXPECT_THAT(ErrorOf("server:\n  listen: \"127.0.0.1:1\"\nshutdown:\n  drain_timeout: 20s\n"),
              HasSubstr("test.yaml:4:18: shutdown.drain_timeout: deadline 15s must exceed "
                        "drain_timeout 20s"));
}

TEST(ConfigErrors, UnixSocketModeNotOctal) {
  for (const char* mode : {"rw-rw----", "0999", "66", "06600", "0x1b0"}) {
    std::string e = ErrorOf(std::string("server:\n  unix_socket: /tmp/s.sock\n"
                                        "  unix_socket_mode: \"") + mode + "\"\n");
    EXPECT_THAT(e, HasSubstr(std::string("test.yaml:3:21: server.unix_socket_mode: \"") + mode +
                             "\" is not an octal file mode"))
        << mode;
  }
  // Unquoted 0660 stays the text "0660" (YAML would not make it a number for us).
  absl::StatusOr<v1::DaemonConfig> c =
      LoadConfigString("server:\n  unix_socket: /tmp/s.sock\n  unix_socket_mode: 0640\n", "t");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server().unix_socket_mode(), "0640");
}

TEST(ConfigErrors, NoListenerAtAll) {
  std::string e = ErrorOf("server:\n  max_message_bytes: 2048\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:2:3: server: neither listen nor unix_socket is set"));
  EXPECT_THAT(ErrorOf("server:\n"), HasSubstr("server: neither listen nor unix_socket is set"));
}

TEST(ConfigErrors, ListenNotHostPort) {
  std::string e = ErrorOf("server:\n  listen: localhost\nadmin:\n  listen: \"::1:9090\"\n");
  EXPECT_THAT(e, HasSubstr("server.listen: \"localhost\" is not host:port"));
  EXPECT_THAT(e, HasSubstr("admin.listen: \"::1:9090\" is not host:port"));
  absl::StatusOr<v1::DaemonConfig> ok = LoadConfigString(
      "server:\n  listen: \"[::1]:0\"\nadmin:\n  listen: \"localhost:9090\"\n", "t");
  EXPECT_TRUE(ok.ok()) << ok.status();
}

TEST(ConfigErrors, AdminOnTheGrpcAddress) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:5\"\nadmin:\n  listen: \"127.0.0.1:5\"\n");
  EXPECT_THAT(e, HasSubstr("admin.listen: is the same address as server.listen"));
}

TEST(ConfigErrors, ClientCertRequiredWithoutCa) {
  TempDir dir;
  std::string cert = dir.Write("c.pem", "x");
  std::string key = dir.Write("k.pem", "x");
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  tls:\n    cert_file: " + cert +
                          "\n    key_file: " + key + "\n    require_client_cert: true\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:6:26: server.tls.require_client_cert: needs "
                           "client_ca_file (set server.tls.client_ca_file"));
}

TEST(ConfigErrors, ServerTlsNeedsTcpListenerAndReadableFiles) {
  TempDir dir;
  std::string e = ErrorOf("server:\n  unix_socket: /tmp/s.sock\n  tls:\n    cert_file: " +
                          dir.path() + "/none.crt\n    key_file: " + dir.path() + "/none.key\n");
  EXPECT_THAT(e, HasSubstr("server.tls: applies to the TCP listener only"));
  EXPECT_THAT(e, HasSubstr("server.tls.cert_file: cannot read \"" + dir.path() + "/none.crt\""));
  EXPECT_THAT(e, HasSubstr("server.tls.key_file: cannot read"));
  EXPECT_THAT(ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  tls: {cert_file: a}\n"),
              HasSubstr("server.tls.key_file: required key \"key_file\" is missing"));
}

TEST(ConfigErrors, UpstreamTlsFilesAndPairs) {
  TempDir dir;
  std::string cert = dir.Write("c.pem", "x");
  std::string yaml = absl::StrReplaceAll(kValid, {{"        url: wss://api.example.test/ws\n",
                                                   "        url: wss://api.example.test/ws\n"
                                                   "        tls:\n"
                                                   "          ca_file: DIR/missing-ca.pem\n"
                                                   "          cert_file: CERT\n"}});
  yaml = absl::StrReplaceAll(yaml, {{"DIR", dir.path()}, {"CERT", cert}});
  std::string e = ErrorOf(yaml);
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.tls: cert_file and key_file go together"));
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.tls.ca_file: cannot read \"" + dir.path() +
                           "/missing-ca.pem\": No such file or directory"));
}

TEST(ConfigErrors, DfxWithNoWayToAuthenticate) {
  std::string yaml = absl::StrReplaceAll(kValid, {{"      allow_call_token: true\n", ""}});
  EXPECT_THAT(ErrorOf(yaml),
              HasSubstr("test.yaml:6:7: bridges[0].dfx: has no device_token and allow_call_token "
                        "is false"));
}

TEST(ConfigErrors, BackoffInitialAboveMax) {
  std::string yaml = absl::StrReplaceAll(
      kValid, {{"        url: wss://api.example.test/ws\n",
                "        url: wss://api.example.test/ws\n        backoff: {initial: 1m}\n"}});
  EXPECT_THAT(ErrorOf(yaml), HasSubstr("bridges[0].dfx.upstream.backoff.initial: 1m is above "
                                       "backoff.max 30s"));
}

TEST(ConfigErrors, BadHeaders) {
  std::string yaml = absl::StrReplaceAll(
      kValid, {{"        url: wss://api.example.test/ws\n",
                "        url: wss://api.example.test/ws\n"
                "        headers:\n"
                "          \"Bad Name\": x\n"
                "          Sec-WebSocket-Protocol: y\n"
                "          X-Ok: \"a\\r\\nInjected: 1\"\n"}});
  std::string e = ErrorOf(yaml);
  EXPECT_THAT(e, HasSubstr("bridges[0].dfx.upstream.headers[\"Bad Name\"]: is not a valid HTTP "
                           "header name"));
  EXPECT_THAT(e, HasSubstr("headers[\"Sec-WebSocket-Protocol\"]: is set by the WebSocket "
                           "handshake itself"));
  EXPECT_THAT(e, HasSubstr("headers[\"X-Ok\"]: value contains a line break"));
}

TEST(ConfigErrors, DuplicateYamlKeys) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  listen: \"127.0.0.1:2\"\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:3:3: server.listen: duplicate key \"listen\" (first set on "
                           "line 2; keep one)"));
  std::string m = ErrorOf(absl::StrReplaceAll(
      kValid, {{"        url: wss://api.example.test/ws\n",
                "        url: wss://api.example.test/ws\n        headers: {A: x, A: y}\n"}}));
  EXPECT_THAT(m, HasSubstr("headers[\"A\"]: duplicate key \"A\""));
}

TEST(ConfigErrors, InvalidYamlSyntaxHasPosition) {
  std::string e = ErrorOf("server:\n  listen: [a, b\n");
  EXPECT_THAT(e, HasSubstr("test.yaml:"));
  EXPECT_THAT(e, HasSubstr("invalid YAML: "));
}

TEST(ConfigErrors, EmptyAndMultiDocumentFiles) {
  EXPECT_THAT(ErrorOf(""), HasSubstr("test.yaml: the config is empty"));
  EXPECT_THAT(ErrorOf("# only a comment\n"), HasSubstr("the config is empty"));
  EXPECT_THAT(ErrorOf(std::string(kValid) + "---\nserver: {}\n"),
              HasSubstr("a config file holds one YAML document"));
  EXPECT_THAT(ErrorOf("- a\n- b\n"), HasSubstr("test.yaml:1:1: expected a mapping, got a list"));
}

TEST(ConfigErrors, AllErrorsAreReportedOnePerLine) {
  std::string e = ErrorOf(R"(server:
  listen: "127.0.0.1:1"
  max_message_bytes: 1
  bogus: 1
log:
  level: loud
)");
  std::vector<std::string> lines = absl::StrSplit(e, '\n');
  ASSERT_EQ(lines.size(), 3u) << e;
  EXPECT_THAT(lines[0], HasSubstr("test.yaml:3:22: server.max_message_bytes"));
  EXPECT_THAT(lines[1], HasSubstr("test.yaml:4:3: server.bogus"));
  EXPECT_THAT(lines[2], HasSubstr("test.yaml:6:10: log.level"));
}

// A secret value written in any wrong place must not be echoed back.
TEST(ConfigErrors, SecretValuesNeverInMessages) {
  const std::string secret = "s3cr3t-Zq8-value";
  const std::vector<std::string> cases = {
      // A bare value where a Secret mapping belongs.
      "  auth_token: SECRET\n",
      // A mistyped key inside the Secret.
      "  auth_token: {valu: SECRET}\n",
      // The value written as a key (flow mapping shorthand).
      "  auth_token: {SECRET}\n",
      // Two sources at once.
      "  auth_token: {env: SOME_VAR, value: SECRET}\n",
      // A list where the string belongs.
      "  auth_token: {value: [SECRET]}\n",
      // A mapping where the string belongs.
      "  auth_token:\n    value: {SECRET: 1}\n",
  };
  for (const std::string& c : cases) {
    std::string yaml = "server:\n  listen: \"127.0.0.1:1\"\n" +
                       absl::StrReplaceAll(c, {{"SECRET", secret}});
    std::string e = ErrorOf(yaml);
    EXPECT_THAT(e, Not(HasSubstr(secret))) << yaml;
    EXPECT_THAT(e, HasSubstr("server.auth_token")) << yaml;
  }
}

TEST(ConfigErrors, UnknownKeyInSecretIsNotEchoed) {
  std::string e = ErrorOf("server:\n  listen: \"127.0.0.1:1\"\n  auth_token: {tokn: x}\n");
  EXPECT_THAT(e, HasSubstr("server.auth_token: unknown key, not shown because this section holds "
                           "a secret (known keys: env, file, value)"));
}

TEST(ConfigConnectionOptions, DefaultsFillEverything) {
  v1::UpstreamConfig u;
  u.set_url("wss://api.example.test");
  absl::StatusOr<core::ConnectionOptions> o = ToConnectionOptions(u, "dfx/default");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->name, "dfx/default");
  EXPECT_FALSE(o->allow_plaintext);
  EXPECT_TRUE(o->tls.verify_peer);
  EXPECT_EQ(o->tls.ca_file, "");
  EXPECT_EQ(o->connect_timeout, std::chrono::seconds(10));
  EXPECT_EQ(o->handshake_timeout, std::chrono::seconds(10));
  EXPECT_EQ(o->max_message_bytes, size_t{1} << 20);
  EXPECT_EQ(o->send_queue_max_messages, 1024u);
  EXPECT_EQ(o->keepalive.ping_interval, std::chrono::seconds(20));
  EXPECT_EQ(o->keepalive.pong_timeout, std::chrono::seconds(10));
  EXPECT_EQ(o->backoff.initial, std::chrono::milliseconds(500));
  EXPECT_EQ(o->backoff.max, std::chrono::seconds(30));
  EXPECT_EQ(o->backoff.multiplier, 2.0);
  EXPECT_EQ(o->backoff.reset_after, std::chrono::seconds(30));
}

TEST(ConfigConnectionOptions, ExplicitValuesAreConverted) {
  v1::DaemonConfig cfg;
  ASSERT_TRUE(ParseYamlInto(YAML::Load(R"(url: ws://127.0.0.1:18081
allow_plaintext: true
tls: {ca_file: /ca.pem, server_name: api.test, insecure_skip_verify: true,
      cert_file: /c.pem, key_file: /k.pem}
connect_timeout: 1.5s
handshake_timeout: 250ms
max_message_bytes: 65536
send_queue_messages: 7
keepalive: {ping_interval: 3s, pong_timeout: 2s}
backoff: {initial: 100ms, max: 1m, multiplier: 1.5, reset_after: 1h}
)"),
                            cfg.add_bridges()->mutable_dfx()->mutable_upstream(), "inline")
                  .ok());
  absl::StatusOr<core::ConnectionOptions> o =
      ToConnectionOptions(cfg.bridges(0).dfx().upstream(), "dfx/x");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->allow_plaintext);
  EXPECT_FALSE(o->tls.verify_peer);
  EXPECT_EQ(o->tls.ca_file, "/ca.pem");
  EXPECT_EQ(o->tls.server_name, "api.test");
  EXPECT_EQ(o->tls.cert_file, "/c.pem");
  EXPECT_EQ(o->tls.key_file, "/k.pem");
  EXPECT_EQ(o->connect_timeout, std::chrono::milliseconds(1500));
  EXPECT_EQ(o->handshake_timeout, std::chrono::milliseconds(250));
  EXPECT_EQ(o->max_message_bytes, 65536u);
  EXPECT_EQ(o->send_queue_max_messages, 7u);
  EXPECT_EQ(o->keepalive.ping_interval, std::chrono::seconds(3));
  EXPECT_EQ(o->keepalive.pong_timeout, std::chrono::seconds(2));
  EXPECT_EQ(o->backoff.initial, std::chrono::milliseconds(100));
  EXPECT_EQ(o->backoff.max, std::chrono::minutes(1));
  EXPECT_EQ(o->backoff.multiplier, 1.5);
  EXPECT_EQ(o->backoff.reset_after, std::chrono::hours(1));
}

TEST(ConfigConnectionOptions, DisabledKeepaliveMeansNoPings) {
  v1::UpstreamConfig u;
  u.set_url("wss://h.test");
  u.mutable_keepalive()->set_disabled(true);
  absl::StatusOr<core::ConnectionOptions> o = ToConnectionOptions(u, "x");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->keepalive.ping_interval, core::Duration::zero());
}

TEST(ConfigConnectionOptions, RefusesBadUrls) {
  v1::UpstreamConfig u;
  u.set_url("ws://127.0.0.1:1");
  absl::StatusOr<core::ConnectionOptions> o = ToConnectionOptions(u, "dfx/a");
  ASSERT_FALSE(o.ok());
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(o.status().message(), HasSubstr("dfx/a: url: \"ws://127.0.0.1:1\" is plaintext"));
  u.set_url("");
  EXPECT_FALSE(ToConnectionOptions(u, "dfx/a").ok());
}

}  // namespace
}  // namespace wsbridge::config
