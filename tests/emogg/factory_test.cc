// The Emogg bridge built from YAML config by its factory (registered as the daemon
// registers every built-in bridge) and served by the real daemon; the documented
// defaults and the config checks.
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "bridges/core/bridge.h"
#include "bridges/emogg/codec.h"
#include "bridges/emogg/factory.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/emogg_emulator.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::emogg {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;

constexpr std::string_view kConfig = R"(
server:
  listen: "127.0.0.1:0"
log:
  level: warn
runtime: {grpc_cq_threads: 2}
bridges:
  - name: emogg
    emogg:
      upstream:
        url: URL
        allow_plaintext: true
        backoff: {initial: 20ms, max: 200ms}
      token:
        value: demo-token
      allow_call_token: true
      idle_session_timeout: 1s
      heartbeat: {interval: 100ms, timeout: 2s}
      rate_limit: {max_messages: 500, window: 1s, control_reserve: 10}
shutdown:
  drain_timeout: 300ms
  deadline: 10s
)";

class EmoggFactoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    emulator::EmoggEmulatorOptions eo;
    eo.protocol.tokens = {"demo-token", "tenant-token"};
    eo.protocol.idle_timeout = 500ms;
    emulator_ = std::make_unique<emulator::EmoggEmulator>(eo);
    ASSERT_TRUE(emulator_->Start().ok());
  }
  void StartDaemon(std::string yaml) {
    yaml = absl::StrReplaceAll(yaml, {{"URL", emulator_->url()}});
    absl::StatusOr<config::v1::DaemonConfig> cfg = config::LoadConfigString(yaml, "test.yaml");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    RegisterFactory(registry_);
    daemon::DaemonOptions opts;
    opts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(*std::move(cfg), registry_, opts);
    ASSERT_TRUE(daemon_->Start().ok());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::EmoggService::NewStub(channel_);
  }
  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
    }
    emulator_->Stop();
  }

  grpc::Status Request(const std::string& path, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    if (!token.empty()) ctx.AddMetadata("x-emogg-token", token);
    v1::RequestRequest req;
    req.set_path(path);
    v1::RequestResponse resp;
    return stub_->Request(&ctx, req, &resp);
  }

  std::unique_ptr<emulator::EmoggEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::EmoggService::Stub> stub_;
};

TEST_F(EmoggFactoryTest, ServesTheBridgeBuiltFromConfig) {
  StartDaemon(std::string(kConfig));
  // The configured token's session connects at start-up; the daemon is ready once it
  // is authenticated.
  EXPECT_TRUE(WaitFor([&] { return daemon_->ready(); }));
  EXPECT_EQ(emulator_->auth_successes(), 1);
  ASSERT_TRUE(Request("ping").ok());

  // A per-call token gets its own session, visible to the admin service.
  ASSERT_TRUE(Request("ping", "tenant-token").ok());
  auto admin = admin::v1::AdminService::NewStub(channel_);
  grpc::ClientContext actx;
  admin::v1::ListSessionsRequest lreq;
  lreq.set_bridge("emogg");
  admin::v1::ListSessionsResponse lresp;
  ASSERT_TRUE(admin->ListSessions(&actx, lreq, &lresp).ok());
  EXPECT_EQ(lresp.sessions_size(), 2);
  // The configured heartbeat keeps the pinned session past Emogg's (500 ms) idle
  // timeout; the tenant's session closes after idle_session_timeout (1s).
  EXPECT_TRUE(WaitFor([&] { return emulator_->requests("ping") >= 10; }));
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
  EXPECT_TRUE(emulator_->server_close_codes().empty());
}

TEST_F(EmoggFactoryTest, DocumentedDefaultsApply) {
  config::v1::EmoggBridgeConfig cfg;
  cfg.mutable_token()->set_value("t");
  absl::StatusOr<EmoggBridgeOptions> o = OptionsFromConfig(cfg, "emogg");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->url, kDefaultUrl);
  EXPECT_FALSE(o->connection.allow_plaintext);
  EXPECT_TRUE(o->connection.tls.verify_peer);
  EXPECT_EQ(o->request_timeout, 30s);
  EXPECT_EQ(o->idle_session_timeout, 5min);
  EXPECT_EQ(o->max_sessions, 1000u);
  EXPECT_EQ(o->subscriber_queue, 256u);
  EXPECT_EQ(o->max_subscriptions_per_session, 5u);
  EXPECT_EQ(o->max_pending_requests, 4096u);
  EXPECT_EQ(o->auth_timeout, 10s);
  EXPECT_EQ(o->auth_retry_pause, 30s);
  EXPECT_EQ(o->subscribe_timeout, 10s);
  EXPECT_EQ(o->heartbeat_interval, 30s);
  EXPECT_EQ(o->heartbeat_timeout, 10s);
  EXPECT_TRUE(o->rate_limit);
  EXPECT_EQ(o->limits.max_messages, 70u);
  EXPECT_EQ(o->limits.window, 60s);
  EXPECT_EQ(o->limits.control_reserve, 8u);
  EXPECT_EQ(o->retry_after_429, 60s);
  EXPECT_FALSE(o->allow_call_token);

  cfg.mutable_heartbeat()->set_disabled(true);
  cfg.mutable_rate_limit()->set_disabled(true);
  o = OptionsFromConfig(cfg, "emogg");
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->heartbeat_interval, core::Duration::zero());
  EXPECT_FALSE(o->rate_limit);
}

TEST_F(EmoggFactoryTest, RejectsBadConfig) {
  config::v1::EmoggBridgeConfig cfg;
  cfg.mutable_upstream()->set_url(emulator_->url());
  cfg.mutable_upstream()->set_allow_plaintext(true);
  absl::StatusOr<EmoggBridgeOptions> o = OptionsFromConfig(cfg, "emogg");
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("token"), absl::string_view::npos) << o.status();

  cfg.set_allow_call_token(true);
  EXPECT_TRUE(OptionsFromConfig(cfg, "emogg").ok());
  cfg.mutable_upstream()->set_allow_plaintext(false);
  o = OptionsFromConfig(cfg, "emogg");  // ws:// without allow_plaintext
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("upstream.url"), absl::string_view::npos) << o.status();

  cfg.mutable_upstream()->set_allow_plaintext(true);
  cfg.mutable_rate_limit()->set_max_messages(8);
  cfg.mutable_rate_limit()->set_control_reserve(8);
  o = OptionsFromConfig(cfg, "emogg");
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("control_reserve"), absl::string_view::npos) << o.status();

  config::v1::EmoggBridgeConfig env;
  env.mutable_token()->set_env("WSBRIDGE_EMOGG_TEST_NO_SUCH_VARIABLE");
  o = OptionsFromConfig(env, "emogg");
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("WSBRIDGE_EMOGG_TEST_NO_SUCH_VARIABLE"),
            absl::string_view::npos);

  // Through the loader: the bridge kind is found under `emogg:`.
  std::string yaml = absl::StrReplaceAll(std::string(kConfig), {{"URL", emulator_->url()}});
  absl::StatusOr<config::v1::DaemonConfig> loaded = config::LoadConfigString(yaml, "test.yaml");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->bridges_size(), 1);
  EXPECT_TRUE(loaded->bridges(0).has_emogg());
  EXPECT_EQ(loaded->bridges(0).emogg().rate_limit().max_messages(), 500u);
}

}  // namespace
}  // namespace wsbridge::emogg
