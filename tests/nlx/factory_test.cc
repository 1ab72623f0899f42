// The NLX bridge built from YAML by its factory (through the daemon's config loader) and
// served by the real daemon against the emulator; config errors named clearly.
#include "bridges/nlx/factory.h"

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "bridges/core/bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nlx_emulator.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::nlx {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;

// The api key from a file (rotatable), the others inline; language appended.
constexpr std::string_view kConfig = R"(
server:
  listen: "127.0.0.1:0"
log:
  level: warn
bridges:
  - name: nlx
    nlx:
      upstream:
        url: URL
        allow_plaintext: true
        backoff: {initial: 10ms, max: 100ms}
      api_key: {file: KEYFILE}
      deployment_key: {value: nlx-emulator-deployment}
      channel_key: {value: nlx-emulator-channel}
      language: en-US
      idle_conversation_timeout: 300ms
      auth_retry_after: 100ms
shutdown:
  drain_timeout: 100ms
  deadline: 10s
)";

class NlxFactoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    key_file_ = absl::StrCat(::testing::TempDir(), "/nlx_factory_api_key_", getpid());
    WriteKey("nlx-emulator-api-key\n");
  }

  void WriteKey(const std::string& v) {
    std::ofstream(key_file_, std::ios::trunc) << v;
  }

  void Start() {
    emulator_ = std::make_unique<emulator::NlxEmulator>(emulator::NlxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
    std::string yaml = absl::StrReplaceAll(std::string(kConfig),
                                           {{"URL", emulator_->url()}, {"KEYFILE", key_file_}});
    absl::StatusOr<config::v1::DaemonConfig> cfg = config::LoadConfigString(yaml, "test.yaml");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    RegisterFactory(registry_);
    daemon::DaemonOptions opts;
    opts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(*std::move(cfg), registry_, opts);
    absl::Status started = daemon_->Start();
    ASSERT_TRUE(started.ok()) << started;
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::NlxService::NewStub(channel_);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
    }
    if (emulator_ != nullptr) emulator_->Stop();
    std::remove(key_file_.c_str());
  }

  grpc::Status Send(const std::string& text, v1::SendResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    v1::SendRequest req;
    req.mutable_turn()->set_text(text);
    return stub_->Send(&ctx, req, resp);
  }

  std::string key_file_;
  std::unique_ptr<emulator::NlxEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NlxService::Stub> stub_;
};

TEST_F(NlxFactoryTest, ServesTheBridgeBuiltFromYamlWithKeysRedacted) {
  Start();
  v1::SendResponse resp;
  grpc::Status st = Send("hello", &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.response().messages(0).text(), "Turn 1: you said \"hello\"");
  EXPECT_TRUE(emulator_->knows(resp.conversation_id()));

  // The conversation socket shows in admin output with its keys redacted.
  auto admin = admin::v1::AdminService::NewStub(channel_);
  grpc::ClientContext actx;
  admin::v1::ListSessionsRequest lreq;
  lreq.set_bridge("nlx");
  admin::v1::ListSessionsResponse lresp;
  ASSERT_TRUE(admin->ListSessions(&actx, lreq, &lresp).ok());
  ASSERT_EQ(lresp.sessions_size(), 1);
  const std::string dump = lresp.DebugString();
  EXPECT_FALSE(absl::StrContains(dump, "nlx-emulator-api-key")) << dump;
  EXPECT_FALSE(absl::StrContains(dump, "nlx-emulator-deployment")) << dump;
  EXPECT_TRUE(absl::StrContains(lresp.sessions(0).target(), "apiKey=[redacted]")) << dump;
  EXPECT_FALSE(absl::StrContains(daemon_->metrics().Render(), "nlx-emulator-api-key"));
  // idle_conversation_timeout closes it.
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
}

TEST_F(NlxFactoryTest, ARotatedKeyFileIsReadOnTheNextConnect) {
  WriteKey("a-wrong-key\n");
  Start();
  v1::SendResponse resp;
  grpc::Status st = Send("hi", &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  WriteKey("nlx-emulator-api-key\n");
  // The refresher re-reads the file within a second; a new secret version is tried at
  // once, without waiting out auth_retry_after.
  ASSERT_TRUE(WaitFor([&] { return Send("hi", &resp).ok(); }, 10s));
  EXPECT_EQ(resp.response().messages(0).text(), "Turn 1: you said \"hi\"");
}

TEST_F(NlxFactoryTest, TheLoaderAppliesTheDocumentedDefaults) {
  absl::StatusOr<config::v1::DaemonConfig> cfg = config::LoadConfigString(R"(
server: {listen: "127.0.0.1:0"}
bridges:
  - name: n
    nlx:
      api_key: {value: k1}
      deployment_key: {value: k2}
      channel_key: {value: k3-en-US}
)", "t.yaml");
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  ASSERT_TRUE(cfg->bridges(0).has_nlx());
  absl::StatusOr<NlxBridgeOptions> o = OptionsFromConfig(cfg->bridges(0).nlx(), "n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->url, "wss://us-east-1-ws.apps.nlx.ai");
  EXPECT_TRUE(o->connection.tls.verify_peer);
  EXPECT_FALSE(o->connection.allow_plaintext);
  EXPECT_EQ(o->ack_timeout, std::chrono::seconds(10));
  EXPECT_EQ(o->turn_timeout, std::chrono::seconds(30));
  EXPECT_EQ(o->idle_conversation_timeout, std::chrono::seconds(30));
  EXPECT_EQ(o->auth_retry_after, std::chrono::seconds(30));
  EXPECT_EQ(o->connection.auth_backoff.initial, std::chrono::seconds(30));
  EXPECT_EQ(o->max_conversations, 1000u);
  EXPECT_EQ(o->max_pending_turns, 16u);
  EXPECT_EQ(o->max_turn_bytes, 131072u);
  EXPECT_EQ(o->stream_queue, 256u);
  EXPECT_FALSE(o->allow_call_keys);
  EXPECT_TRUE(o->language.empty());
}

TEST_F(NlxFactoryTest, RejectsBadConfigNamingTheField) {
  struct Case {
    std::string what;
    std::function<void(config::v1::NlxBridgeConfig&)> edit;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"plaintext", [](auto& c) { c.mutable_upstream()->set_url("ws://h.example"); }, "upstream.url"},
      {"key in url", [](auto& c) { c.mutable_upstream()->set_url("wss://h.example/?apiKey=x"); }, "apiKey"},
      {"no channel key", [](auto& c) { c.clear_channel_key(); }, "channel_key: required"},
      {"missing env secret",
       [](auto& c) { c.mutable_deployment_key()->set_env("WSBRIDGE_NO_SUCH_VAR_42"); }, "deployment_key"},
      {"bad language", [](auto& c) { c.set_language("en US"); }, "language"},
  };
  for (const Case& tc : cases) {
    config::v1::NlxBridgeConfig c;
    c.mutable_upstream()->set_url("wss://h.example");
    c.mutable_api_key()->set_value("k1");
    c.mutable_deployment_key()->set_value("k2");
    c.mutable_channel_key()->set_value("k3");
    tc.edit(c);
    absl::StatusOr<NlxBridgeOptions> o = OptionsFromConfig(c, "n");
    ASSERT_FALSE(o.ok()) << tc.what;
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << tc.what;
    EXPECT_TRUE(absl::StrContains(o.status().message(), tc.want)) << tc.what << ": " << o.status();
  }
  // Per-call keys only is a valid setup; an upstream without url is NLX's endpoint.
  config::v1::NlxBridgeConfig c;
  c.set_allow_call_keys(true);
  c.mutable_upstream()->mutable_connect_timeout()->set_seconds(3);
  absl::StatusOr<NlxBridgeOptions> o = OptionsFromConfig(c, "n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->api_key, nullptr);
  EXPECT_EQ(o->url, "wss://us-east-1-ws.apps.nlx.ai");
  EXPECT_EQ(o->connection.connect_timeout, std::chrono::seconds(3));
}

}  // namespace
}  // namespace wsbridge::nlx
