// NlxBridgeConfig through the daemon's config machinery: every documented default
// applies, limits are enforced, and the default upstream URL passes the URL check.
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "bridges/nlx/codec.h"
#include "daemon/config/config.h"
#include "wsbridge/config/v1/nlx.pb.h"

namespace wsbridge::nlx {
namespace {

namespace v1c = wsbridge::config::v1;
using ::testing::HasSubstr;

TEST(NlxConfig, DefaultsAreTheDocumentedOnes) {
  v1c::NlxBridgeConfig c;
  ASSERT_TRUE(config::ApplyConfigDefaults(&c).ok());
  EXPECT_EQ(c.ack_timeout().seconds(), 10);
  EXPECT_EQ(c.turn_timeout().seconds(), 30);
  EXPECT_EQ(c.idle_conversation_timeout().seconds(), 30);
  EXPECT_EQ(c.max_conversations(), 1000u);
  EXPECT_EQ(c.max_pending_turns(), 16u);
  EXPECT_EQ(c.max_turn_bytes(), 131072u);
  EXPECT_EQ(c.auth_retry_after().seconds(), 30);
  EXPECT_EQ(c.stream_queue(), 256u);
  EXPECT_FALSE(c.allow_call_keys());
  EXPECT_EQ(c.language(), "");
  // Absent upstream: its own defaults, and no URL (the bridge uses kDefaultUrl).
  EXPECT_EQ(c.upstream().url(), "");
  EXPECT_EQ(c.upstream().connect_timeout().seconds(), 10);
  v1c::UpstreamConfig def = c.upstream();
  def.set_url(std::string(kDefaultUrl));
  EXPECT_TRUE(config::CheckUpstreamUrl(def).ok());
}

TEST(NlxConfig, ParsesKeysAsSecretsAndChecksLimits) {
  YAML::Node ok = YAML::Load(R"(
upstream: {url: "ws://127.0.0.1:4000", allow_plaintext: true}
api_key: {env: NLX_API_KEY}
deployment_key: {file: /run/secrets/nlx-deployment}
channel_key: {value: "abc"}
language: en-US
allow_call_keys: true
ack_timeout: 2s
max_turn_bytes: 65536
)");
  v1c::NlxBridgeConfig c;
  absl::Status st = config::ParseYamlInto(ok, &c, "nlx.yaml");
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(c.api_key().env(), "NLX_API_KEY");
  EXPECT_EQ(c.deployment_key().file(), "/run/secrets/nlx-deployment");
  EXPECT_EQ(c.channel_key().value(), "abc");
  EXPECT_EQ(c.ack_timeout().seconds(), 2);
  EXPECT_EQ(c.max_turn_bytes(), 65536u);

  YAML::Node bad = YAML::Load(R"(
upstream: {allow_plaintext: true}
max_turn_bytes: 10
ack_timeout: 1h
max_conversations: 0
apikey: {env: X}
)");
  v1c::NlxBridgeConfig b;
  st = config::ParseYamlInto(bad, &b, "nlx.yaml");
  ASSERT_FALSE(st.ok());
  std::string m(st.message());
  EXPECT_THAT(m, HasSubstr("upstream.url"));
  EXPECT_THAT(m, HasSubstr("max_turn_bytes"));
  EXPECT_THAT(m, HasSubstr("ack_timeout"));
  EXPECT_THAT(m, HasSubstr("max_conversations"));
  EXPECT_THAT(m, HasSubstr("apikey"));
}

}  // namespace
}  // namespace wsbridge::nlx
