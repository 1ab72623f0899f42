// Upstream config adapters: secrets kept current off the io threads, and every
// UpstreamConfig field reaching ConnectionOptions.
#include "bridges/core/upstream_config.h"

#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace wsbridge::core {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

config::v1::UpstreamConfig Url(std::string url) {
  config::v1::UpstreamConfig u;
  u.set_url(std::move(url));
  return u;
}

TEST(UpstreamConfigTest, EveryFieldIsMapped) {
  config::v1::UpstreamConfig u = Url("wss://api.example.com/ws");
  u.mutable_connect_timeout()->set_seconds(3);
  u.mutable_handshake_timeout()->set_seconds(4);
  u.mutable_close_timeout()->set_nanos(250'000'000);
  u.set_max_message_bytes(4096);
  u.set_send_queue_messages(7);
  u.set_send_queue_bytes(65536);
  u.mutable_keepalive()->mutable_ping_interval()->set_seconds(11);
  u.mutable_keepalive()->mutable_pong_timeout()->set_seconds(12);
  u.mutable_keepalive()->mutable_heartbeat_interval()->set_seconds(30);
  u.mutable_backoff()->mutable_initial()->set_nanos(100'000'000);
  u.mutable_backoff()->mutable_max()->set_seconds(9);
  u.mutable_backoff()->set_multiplier(3);
  u.mutable_backoff()->mutable_reset_after()->set_seconds(13);
  u.mutable_tls()->set_server_name("sni.example.com");
  absl::StatusOr<ConnectionOptions> o = ToConnectionOptions(u, "x/y");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->name, "x/y");
  EXPECT_EQ(o->connect_timeout, seconds(3));
  EXPECT_EQ(o->handshake_timeout, seconds(4));
  EXPECT_EQ(o->close_timeout, milliseconds(250));
  EXPECT_EQ(o->max_message_bytes, 4096u);
  EXPECT_EQ(o->send_queue_max_messages, 7u);
  EXPECT_EQ(o->send_queue_max_bytes, 65536u);
  EXPECT_EQ(o->keepalive.ping_interval, seconds(11));
  EXPECT_EQ(o->keepalive.pong_timeout, seconds(12));
  EXPECT_EQ(o->keepalive.heartbeat_interval, seconds(30));
  EXPECT_EQ(o->backoff.initial, milliseconds(100));
  EXPECT_EQ(o->backoff.max, seconds(9));
  EXPECT_EQ(o->backoff.multiplier, 3);
  EXPECT_EQ(o->backoff.reset_after, seconds(13));
  EXPECT_EQ(o->tls.server_name, "sni.example.com");
  EXPECT_TRUE(o->tls.verify_peer);
}

TEST(UpstreamConfigTest, UnsetFieldsTakeTheDocumentedDefaults) {
  absl::StatusOr<ConnectionOptions> o = ToConnectionOptions(Url("wss://h"), "n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->close_timeout, seconds(5));
  EXPECT_EQ(o->send_queue_max_bytes, 16u << 20);
  EXPECT_EQ(o->keepalive.heartbeat_interval, Duration::zero());  // the bridge picks its own
  EXPECT_EQ(o->keepalive.ping_interval, seconds(20));
}

TEST(UpstreamConfigTest, PlaintextNeedsTheSwitchAndBadUrlsAreNamed) {
  absl::StatusOr<ConnectionOptions> o = ToConnectionOptions(Url("ws://127.0.0.1:1"), "n");
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("allow_plaintext"), std::string_view::npos);
  EXPECT_FALSE(CheckUpstreamUrl(Url("https://h")).ok());
  EXPECT_FALSE(CheckUpstreamUrl(Url("wss://user:pw@h")).ok());
  EXPECT_FALSE(CheckUpstreamUrl(Url("wss://h:70000")).ok());
}

TEST(UpstreamConfigTest, ToEndpointChecksTheUrlAndReconnects) {
  config::v1::UpstreamConfig u = Url("wss://api.example.com/v1");
  (*u.mutable_headers())["X-Client"] = "wsbridge";
  absl::StatusOr<UpstreamEndpoint> e = ToEndpoint(u, "dfx/default");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->url, "wss://api.example.com/v1");
  EXPECT_EQ(e->headers, (std::vector<std::pair<std::string, std::string>>{{"X-Client", "wsbridge"}}));
  EXPECT_EQ(e->connection.name, "dfx/default");
  EXPECT_TRUE(e->connection.reconnect);
  absl::StatusOr<UpstreamEndpoint> bad = ToEndpoint(Url("https://h"), "n");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().rfind("upstream.url: ", 0), 0u) << bad.status();
}

TEST(UpstreamConfigTest, LoadSecretNamesTheFieldNeverTheValue) {
  config::v1::Secret s;
  s.set_env("WSBRIDGE_TEST_SURELY_UNSET_VARIABLE");
  absl::StatusOr<std::shared_ptr<SecretSource>> missing = LoadSecret(s, "device_token");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(missing.status().message().rfind("device_token: ", 0), 0u) << missing.status();
  s.set_value("inline-secret-value");
  absl::StatusOr<std::shared_ptr<SecretSource>> ok = LoadSecret(s, "device_token");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*(*ok)->Current(), "inline-secret-value");
}

TEST(SecretSourceTest, FileRotationIsPickedUpByTheRefresherNotByReaders) {
  testing::TempDir dir;
  std::string path = dir.WriteFile("token", "first-token\n");
  config::v1::Secret s;
  s.set_file(path);
  absl::StatusOr<std::shared_ptr<SecretSource>> src = SecretSource::Create(s);
  ASSERT_TRUE(src.ok()) << src.status();
  EXPECT_EQ((*src)->Current().value_or(""), "first-token");
  const uint64_t v1 = (*src)->version();
  dir.WriteFile("token", "second-token\n");
  // Readers see the cached value until the refresher re-reads: no I/O on their thread.
  EXPECT_EQ((*src)->Current().value_or(""), "first-token");
  SecretRefresher refresher(std::chrono::hours(1));
  refresher.Watch(*src);
  refresher.RefreshNow();
  ASSERT_TRUE(testing::WaitFor([&] { return (*src)->Current().value_or("") == "second-token"; }));
  EXPECT_GT((*src)->version(), v1);
}

TEST(SecretSourceTest, AMissingSecretIsAStartUpErrorAndALaterLossIsReported) {
  config::v1::Secret s;
  s.set_env("WSBRIDGE_UPSTREAM_CONFIG_TEST_UNSET");
  EXPECT_EQ(SecretSource::Create(s).status().code(), absl::StatusCode::kNotFound);
  ::setenv("WSBRIDGE_UPSTREAM_CONFIG_TEST_TOKEN", "env-token", 1);
  s.set_env("WSBRIDGE_UPSTREAM_CONFIG_TEST_TOKEN");
  absl::StatusOr<std::shared_ptr<SecretSource>> src = SecretSource::Create(s);
  ASSERT_TRUE(src.ok());
  ::unsetenv("WSBRIDGE_UPSTREAM_CONFIG_TEST_TOKEN");
  (*src)->Refresh();
  EXPECT_EQ((*src)->Current().status().code(), absl::StatusCode::kNotFound);
}

TEST(SecretSourceTest, FixedValuesNeverChange) {
  std::shared_ptr<SecretSource> f = SecretSource::Fixed("per-call-token");
  EXPECT_FALSE(f->refreshable());
  const uint64_t v = f->version();
  f->Refresh();
  EXPECT_EQ(f->version(), v);
  EXPECT_EQ(f->Current().value_or(""), "per-call-token");
}

}  // namespace
}  // namespace wsbridge::core
