// The harness's secret check (DaemonHarness: every log line, caller status, metric and
// admin answer is searched for kSecretMarker), shown to catch a secret where it would
// appear, and a per-call credential the upstream refuses (a bogus token, as an attacker
// would send) shown nowhere, with the DFX bridge in the real daemon.
#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/upstream_config.h"
#include "bridges/dfx/dfx_bridge.h"
#include "tests/faults/daemon_harness.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
namespace v1 = wsbridge::dfx::v1;

class SecretsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    emulator_ = std::make_unique<emulator::DfxEmulator>(emulator::DfxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
    const std::string url = absl::StrCat("ws://127.0.0.1:", emulator_->port());
    absl::Status started = harness_.Start(
        "dfx", [url](config::v1::BridgeConfig& b) { b.mutable_dfx()->mutable_upstream()->set_url(url); },
        [url](const core::BridgeContext& ctx) {
          dfx::DfxBridgeOptions o;
          o.url = url;
          o.connection.allow_plaintext = true;
          o.connection.backoff.initial = 20ms;
          o.connection.backoff.max = 200ms;
          o.default_token = core::SecretSource::Fixed("demo-device-token");
          o.allow_call_token = true;
          return dfx::NewDfxBridge(std::move(o), ctx);
        });
    ASSERT_TRUE(started.ok()) << started;
    stub_ = v1::DfxService::NewStub(harness_.channel());
  }
  void TearDown() override {
    harness_.Stop();
    emulator_->Stop();
  }

  grpc::Status Call(const std::string& action, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    if (!token.empty()) ctx.AddMetadata(std::string(dfx::kDeviceTokenMetadata), token);
    v1::CallRequest req;
    req.set_action_id(action);
    v1::CallResponse resp;
    return stub_->Call(&ctx, req, &resp);
  }

  std::unique_ptr<emulator::DfxEmulator> emulator_;
  DaemonHarness harness_;
  std::unique_ptr<v1::DfxService::Stub> stub_;
};

// A line with the marker in the log fails the test, naming where (not the secret).
TEST_F(SecretsTest, TheCheckCatchesASecretInTheLog) {
  ASSERT_TRUE(Call("0100").ok());
  log::Warn("test", "an upstream echoed tok-s3cr3t-9 back");
  EXPECT_NONFATAL_FAILURE(harness_.Stop(), "was shown in: log (");
}

// A status a caller receives with the marker fails the test, naming the method. The
// bridge quotes a bad action id back (cut to 16 characters), so a caller's own typo is
// enough to show the check sees statuses.
TEST_F(SecretsTest, TheCheckCatchesASecretInACallersStatus) {
  grpc::Status st = Call("s3cr3t");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NONFATAL_FAILURE(harness_.Stop(), "status of /wsbridge.dfx.v1.DfxService/Call");
}

// A per-call token the upstream refuses, sent again and again: the caller is told it was
// refused, and the token appears in no log line (debug included), status, error detail,
// metric or admin answer (checked by the harness when the test ends).
TEST_F(SecretsTest, ARefusedPerCallTokenIsShownNowhere) {
  // The emulator refuses tokens starting "bad".
  for (int i = 0; i < 3; ++i) {
    grpc::Status st = Call("0100", "bad-attacker-s3cr3t-token");
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  }
  EXPECT_TRUE(Call("0100").ok());
  EXPECT_TRUE(harness_.SecretLeaks().empty());
}

}  // namespace
}  // namespace wsbridge::faults
