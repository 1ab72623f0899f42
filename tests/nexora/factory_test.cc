// The Nexora bridge built from YAML by its factory (through the daemon's config loader)
// and served by the real daemon against the emulator; config errors named clearly.
#include "bridges/nexora/factory.h"

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
#include "tests/upstreams/nexora_emulator.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"

namespace wsbridge::nexora {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;

constexpr std::string_view kKeyConfig = R"(
server:
  listen: "127.0.0.1:0"
log:
  level: warn
bridges:
  - name: nexora
    nexora:
      upstream:
        url: URL
        allow_plaintext: true
        backoff: {initial: 10ms, max: 100ms}
      api_key:
        value: nxr_factory_key_1
      idle_chat_timeout: 1s
shutdown:
  drain_timeout: 100ms
  deadline: 10s
)";

constexpr std::string_view kLoginConfig = R"(
server:
  listen: "127.0.0.1:0"
log:
  level: warn
bridges:
  - name: nexora
    nexora:
      upstream:
        url: URL
        tls: {ca_file: CA}
        backoff: {initial: 10ms, max: 100ms}
      email: {value: ops@example.com}
      password: {value: factory-pw-9}
shutdown:
  drain_timeout: 100ms
  deadline: 10s
)";

class NexoraFactoryTest : public ::testing::Test {
 protected:
  void Start(std::string_view yaml_template, emulator::NexoraEmulatorOptions eopts = {}) {
    if (eopts.tls) {
      ca_ = pki_.MakeCa("factory-ca");
      testing::CertAndKey cert = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"});
      eopts.cert_pem = cert.cert_pem;
      eopts.key_pem = cert.key_pem;
    }
    emulator_ = std::make_unique<emulator::NexoraEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());
    std::string yaml = absl::StrReplaceAll(std::string(yaml_template),
                                           {{"URL", emulator_->url()}, {"CA", ca_.cert_file}});
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
    stub_ = v1::NexoraService::NewStub(channel_);
  }
  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
    }
    if (emulator_ != nullptr) emulator_->Stop();
  }

  grpc::Status Send(const std::string& chat, int* events = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::SendMessageRequest req;
    req.set_chat_id(chat);
    req.set_content("hello");
    auto reader = stub_->SendMessage(&ctx, req);
    v1::ChatEvent ev;
    int n = 0;
    while (reader->Read(&ev)) ++n;
    if (events != nullptr) *events = n;
    return reader->Finish();
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_;
  std::unique_ptr<emulator::NexoraEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NexoraService::Stub> stub_;
};

TEST_F(NexoraFactoryTest, ServesTheBridgeBuiltFromYaml) {
  emulator::NexoraEmulatorOptions e;
  e.api_keys = {"nxr_factory_key_1"};
  Start(kKeyConfig, std::move(e));
  EXPECT_TRUE(WaitFor([&] { return daemon_->ready(); }));
  int events = 0;
  grpc::Status st = Send("chat-f", &events);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(events, 9);
  grpc::ClientContext cctx;
  v1::CreateChatRequest creq;
  creq.set_agent_id("agent-1");
  v1::CreateChatResponse cresp;
  ASSERT_TRUE(stub_->CreateChat(&cctx, creq, &cresp).ok());
  EXPECT_FALSE(cresp.chat_id().empty());

  // The chat socket shows in admin output, its token redacted.
  auto admin = admin::v1::AdminService::NewStub(channel_);
  grpc::ClientContext actx;
  admin::v1::ListSessionsRequest lreq;
  lreq.set_bridge("nexora");
  admin::v1::ListSessionsResponse lresp;
  ASSERT_TRUE(admin->ListSessions(&actx, lreq, &lresp).ok());
  ASSERT_EQ(lresp.sessions_size(), 1);
  EXPECT_FALSE(absl::StrContains(lresp.DebugString(), "nxr_factory_key_1")) << lresp.DebugString();
  EXPECT_TRUE(absl::StrContains(lresp.sessions(0).target(), "/api/ws/chat-f?token=[redacted]"));
  // idle_chat_timeout (1s) closes it.
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets() == 0; }));
  // The key in metrics output neither.
  EXPECT_FALSE(absl::StrContains(daemon_->metrics().Render(), "nxr_factory_key_1"));
}

TEST_F(NexoraFactoryTest, LogsInWithEmailAndPasswordOverHttpsFromYaml) {
  emulator::NexoraEmulatorOptions e;
  e.tls = true;
  e.users = {{"ops@example.com", "factory-pw-9"}};
  Start(kLoginConfig, std::move(e));
  grpc::Status st = Send("chat-login");
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(emulator_->logins(), 1);
}

TEST_F(NexoraFactoryTest, TheLoaderAppliesTheDocumentedDefaults) {
  absl::StatusOr<config::v1::DaemonConfig> cfg = config::LoadConfigString(R"(
server: {listen: "127.0.0.1:0"}
bridges:
  - name: n
    nexora:
      upstream: {url: "wss://nexora.example.com/prefix"}
      api_key: {value: nxr_k}
)", "t.yaml");
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  absl::StatusOr<NexoraBridgeOptions> o = OptionsFromConfig(cfg->bridges(0).nexora(), "n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->url, "wss://nexora.example.com/prefix");
  EXPECT_EQ(o->idle_chat_timeout, std::chrono::minutes(5));
  EXPECT_EQ(o->ping_interval, std::chrono::seconds(20));
  EXPECT_EQ(o->pong_timeout, std::chrono::seconds(10));
  EXPECT_EQ(o->http_timeout, std::chrono::seconds(30));
  EXPECT_EQ(o->answer_idle_timeout, std::chrono::seconds(120));
  EXPECT_EQ(o->auth_retry_after, std::chrono::seconds(30));
  EXPECT_EQ(o->max_chats, 1000u);
  EXPECT_EQ(o->max_resends, 5u);
  EXPECT_EQ(o->max_pending_messages_per_chat, 64u);
  EXPECT_EQ(o->max_content_bytes, 262144u);
  EXPECT_EQ(o->connection.auth_backoff.initial, std::chrono::seconds(30));
  EXPECT_FALSE(o->allow_call_token);
}

TEST_F(NexoraFactoryTest, TheLoaderRefusesUnknownKeysAndValuesOutOfRange) {
  absl::StatusOr<config::v1::DaemonConfig> typo = config::LoadConfigString(R"(
server: {listen: "127.0.0.1:0"}
bridges:
  - name: n
    nexora:
      upstream: {url: "wss://nexora.example.com"}
      api_key: {value: nxr_k}
      idle_chat_timeut: 5m
)", "t.yaml");
  ASSERT_FALSE(typo.ok());
  EXPECT_TRUE(absl::StrContains(typo.status().message(), "idle_chat_timeut")) << typo.status();
  absl::StatusOr<config::v1::DaemonConfig> range = config::LoadConfigString(R"(
server: {listen: "127.0.0.1:0"}
bridges:
  - name: n
    nexora:
      upstream: {url: "wss://nexora.example.com"}
      api_key: {value: nxr_k}
      max_resends: 1000
)", "t.yaml");
  ASSERT_FALSE(range.ok());
  EXPECT_TRUE(absl::StrContains(range.status().message(), "max_resends")) << range.status();
}

TEST_F(NexoraFactoryTest, RejectsBadConfigNamingTheField) {
  struct Case {
    std::string what;
    std::function<void(config::v1::NexoraBridgeConfig&)> edit;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"no upstream", [](auto& c) { c.clear_upstream(); }, "upstream: required"},
      {"query in url", [](auto& c) { c.mutable_upstream()->set_url("wss://h.example/x?token=1"); },
       "must not carry a query"},
      {"plaintext", [](auto& c) { c.mutable_upstream()->set_url("ws://h.example"); }, "upstream.url"},
      {"key and login",
       [](auto& c) { c.mutable_email()->set_value("a@b.c"); c.mutable_password()->set_value("p"); },
       "alternatives"},
      {"email alone",
       [](auto& c) { c.clear_api_key(); c.mutable_email()->set_value("a@b.c"); }, "password: required"},
      {"no credential", [](auto& c) { c.clear_api_key(); }, "allow_call_token"},
      {"missing env secret", [](auto& c) { c.mutable_api_key()->set_env("WSBRIDGE_NO_SUCH_VAR_42"); },
       "api_key"},
      {"http base scheme", [](auto& c) { c.set_http_base_url("ftp://h.example"); }, "http_base_url"},
      {"plain http base", [](auto& c) { c.set_http_base_url("http://h.example"); }, "allow_plaintext"},
  };
  for (const Case& tc : cases) {
    config::v1::NexoraBridgeConfig c;
    c.mutable_upstream()->set_url("wss://h.example");
    c.mutable_api_key()->set_value("nxr_k");
    tc.edit(c);
    absl::StatusOr<NexoraBridgeOptions> o = OptionsFromConfig(c, "n");
    ASSERT_FALSE(o.ok()) << tc.what;
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument) << tc.what;
    EXPECT_TRUE(absl::StrContains(o.status().message(), tc.want)) << tc.what << ": " << o.status();
  }
  // Per-call tokens only is a valid setup; so is an explicit https base.
  config::v1::NexoraBridgeConfig c;
  c.mutable_upstream()->set_url("wss://h.example");
  c.set_allow_call_token(true);
  c.set_http_base_url("https://api.h.example/base");
  absl::StatusOr<NexoraBridgeOptions> o = OptionsFromConfig(c, "n");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->http_base_url, "https://api.h.example/base");
}

}  // namespace
}  // namespace wsbridge::nexora
