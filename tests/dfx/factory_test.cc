// The DFX bridge built from YAML config by its factory and served by the real daemon.
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "bridges/core/bridge.h"
#include "bridges/dfx/factory.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::dfx {
namespace {

using testing::WaitFor;

constexpr std::string_view kConfig = R"(
server:
  listen: "127.0.0.1:0"
log:
  level: warn
# Two completion-queue loops: Call and SubscribeResults are matched on either.
runtime: {grpc_cq_threads: 2}
bridges:
  - name: dfx
    dfx:
      upstream:
        url: URL
        allow_plaintext: true
        backoff: {initial: 20ms, max: 200ms}
      device_token:
        value: demo-device-token
      allow_call_token: true
      idle_session_timeout: 1s
shutdown:
  drain_timeout: 300ms
  deadline: 10s
)";

class DfxDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    emulator_ = std::make_unique<emulator::DfxEmulator>(emulator::DfxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
    std::string yaml = absl::StrReplaceAll(std::string(kConfig), {{"URL", emulator_->url()}});
    absl::StatusOr<config::v1::DaemonConfig> cfg = config::LoadConfigString(yaml, "test.yaml");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    RegisterFactory(registry_);
    daemon::DaemonOptions opts;
    opts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(*std::move(cfg), registry_, opts);
    ASSERT_TRUE(daemon_->Start().ok());
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::DfxService::NewStub(channel_);
  }
  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
    }
    emulator_->Stop();
  }

  std::unique_ptr<emulator::DfxEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DfxService::Stub> stub_;
};

TEST_F(DfxDaemonTest, ServesTheBridgeBuiltFromConfig) {
  EXPECT_TRUE(WaitFor([&] { return daemon_->ready(); }));
  grpc::ClientContext ctx;
  v1::CreateMeasurementRequest req;
  req.set_study_id("study");
  v1::CreateMeasurementResponse resp;
  grpc::Status st = stub_->CreateMeasurement(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_FALSE(resp.measurement_id().empty());

  // A per-call token gets its own session, visible to the admin service.
  grpc::ClientContext cctx;
  cctx.AddMetadata("x-dfx-device-token", "tenant-token");
  v1::CallRequest creq;
  creq.set_action_id("0100");
  v1::CallResponse cresp;
  ASSERT_TRUE(stub_->Call(&cctx, creq, &cresp).ok());
  EXPECT_EQ(cresp.status(), 200u);
  auto admin = admin::v1::AdminService::NewStub(channel_);
  grpc::ClientContext actx;
  admin::v1::ListSessionsRequest lreq;
  lreq.set_bridge("dfx");
  admin::v1::ListSessionsResponse lresp;
  ASSERT_TRUE(admin->ListSessions(&actx, lreq, &lresp).ok());
  EXPECT_EQ(lresp.sessions_size(), 2);
  // The tenant's session closes after idle_session_timeout (1s); the configured stays.
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
}

// SIGTERM's path (RequestShutdown): open streams end with UNAVAILABLE after the drain,
// and every upstream session is closed with 1001 (going away).
TEST_F(DfxDaemonTest, ShutdownEndsStreamsAndClosesUpstreamsWithGoingAway) {
  ASSERT_TRUE(WaitFor([&] { return daemon_->ready(); }));
  grpc::ClientContext cctx;
  v1::CreateMeasurementRequest creq;
  creq.set_study_id("study");
  v1::CreateMeasurementResponse cresp;
  ASSERT_TRUE(stub_->CreateMeasurement(&cctx, creq, &cresp).ok());

  grpc::ClientContext sctx;
  v1::SubscribeResultsRequest sreq;
  sreq.set_measurement_id(cresp.measurement_id());
  auto reader = stub_->SubscribeResults(&sctx, sreq);
  ASSERT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 1; }));

  daemon_->RequestShutdown();
  v1::SubscribeResultsResponse result;
  EXPECT_FALSE(reader->Read(&result));
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_NE(st.error_message().find("shutting down"), std::string::npos) << st.error_message();
  daemon_->Wait();
  daemon_.reset();

  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
  std::vector<int> codes = emulator_->close_codes();
  ASSERT_FALSE(codes.empty());
  for (int code : codes) EXPECT_EQ(code, 1001);
}

TEST_F(DfxDaemonTest, SubscriberQueueComesFromConfig) {
  config::v1::DfxBridgeConfig cfg;
  cfg.mutable_upstream()->set_url(emulator_->url());
  cfg.mutable_upstream()->set_allow_plaintext(true);
  cfg.set_allow_call_token(true);
  absl::StatusOr<DfxBridgeOptions> o = OptionsFromConfig(cfg, "dfx");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->subscriber_queue, 256u);  // unset: the default
  cfg.set_subscriber_queue(4096);
  o = OptionsFromConfig(cfg, "dfx");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->subscriber_queue, 4096u);
}

TEST_F(DfxDaemonTest, RejectsBadConfig) {
  config::v1::DfxBridgeConfig cfg;
  cfg.mutable_upstream()->set_url(emulator_->url());
  cfg.mutable_upstream()->set_allow_plaintext(true);
  absl::StatusOr<DfxBridgeOptions> o = OptionsFromConfig(cfg, "dfx");
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("device_token"), absl::string_view::npos);
  cfg.set_allow_call_token(true);
  cfg.mutable_upstream()->set_allow_plaintext(false);
  EXPECT_FALSE(OptionsFromConfig(cfg, "dfx").ok());  // ws:// without allow_plaintext
}

}  // namespace
}  // namespace wsbridge::dfx
