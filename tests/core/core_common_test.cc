// Tests of the small shared pieces: metrics exposition, log redaction, status mapping,
// the bridge registry and the open-call tracker.
#include <atomic>
#include <string>

#include <gtest/gtest.h>

#include "bridges/core/bridge.h"
#include "bridges/core/log.h"
#include "bridges/core/metrics.h"
#include "bridges/core/status.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace wsbridge::core {
namespace {

TEST(Metrics, RendersCountersGaugesAndHistogramsInPrometheusText) {
  MetricsRegistry registry;
  registry.GetCounter("wsb_frames_total", "Frames.", {{"bridge", "dfx"}, {"dir", "in"}}).Inc(3);
  registry.GetCounter("wsb_frames_total", "Frames.", {{"bridge", "dfx"}, {"dir", "in"}}).Inc();
  registry.GetGauge("wsb_sessions", "Sessions.").Set(7);
  auto& h = registry.GetHistogram("wsb_rtt_seconds", "RTT.", {{"bridge", "d\"x"}}, {0.001, 0.01});
  h.Observe(0.0005);
  h.Observe(0.005);
  h.Observe(5);
  registry.AddCollector([](std::string& out) { out += "wsb_collected 42\n"; });

  std::string text = registry.Render();
  EXPECT_NE(text.find("# TYPE wsb_frames_total counter\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_frames_total{bridge=\"dfx\",dir=\"in\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_sessions 7\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_rtt_seconds_bucket{bridge=\"d\\\"x\",le=\"0.001\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_rtt_seconds_bucket{bridge=\"d\\\"x\",le=\"0.01\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_rtt_seconds_bucket{bridge=\"d\\\"x\",le=\"+Inf\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_rtt_seconds_count{bridge=\"d\\\"x\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("wsb_collected 42\n"), std::string::npos) << text;
  EXPECT_EQ(h.count(), 3u);
  EXPECT_NEAR(h.sum(), 5.0055, 1e-6);
}

TEST(Log, RedactsRegisteredSecretsAndCredentialQueryValues) {
  log::RegisterSecret("s3cr3t-token-value");
  EXPECT_EQ(log::Redact("login with s3cr3t-token-value failed"), "login with [redacted] failed");
  EXPECT_EQ(log::RedactUrl("wss://h/ws?deploymentKey=dep&apiKey=abc&channelKey=c-en-US&x=1"),
            "wss://h/ws?deploymentKey=[redacted]&apiKey=[redacted]&channelKey=[redacted]&x=1");
  EXPECT_EQ(log::RedactUrl("wss://h/api/ws/chat1?token=eyJabc"), "wss://h/api/ws/chat1?token=[redacted]");
  EXPECT_EQ(log::RedactUrl("wss://h/path"), "wss://h/path");
  EXPECT_EQ(log::RedactUrl("ws://h/?conversationId=42"), "ws://h/?conversationId=42");
}

TEST(Status, ErrorInfoTravelsFromAbslToGrpcDetailsAndBack) {
  absl::Status inner = WithErrorInfo(absl::FailedPreconditionError("chunk out of order"),
                                     "MISALIGNED_CHUNK", "dfx.wsbridge.dev", {{"last_acked_chunk_order", "3"}});
  EXPECT_EQ(ErrorReason(inner), "MISALIGNED_CHUNK");

  grpc::Status edge = ToGrpcStatus(inner);
  EXPECT_EQ(edge.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(edge.error_message(), "chunk out of order");
  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(edge.error_details()));
  EXPECT_EQ(details.code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  ASSERT_EQ(details.details_size(), 1);
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(details.details(0).UnpackTo(&info));
  EXPECT_EQ(info.reason(), "MISALIGNED_CHUNK");
  EXPECT_EQ(info.domain(), "dfx.wsbridge.dev");
  EXPECT_EQ(info.metadata().at("last_acked_chunk_order"), "3");

  absl::Status back = FromGrpcStatus(edge);
  EXPECT_EQ(back.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorReason(back), "MISALIGNED_CHUNK");
}

TEST(Status, PlainErrorsHaveNoDetails) {
  grpc::Status edge = ToGrpcStatus(absl::UnavailableError("upstream down"));
  EXPECT_EQ(edge.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(edge.error_details().empty());
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ErrorReason(absl::InternalError("x")), "");
}

TEST(BridgeRegistry, FindsFactoriesByConfigType) {
  BridgeRegistry registry;
  EXPECT_EQ(registry.Find("wsbridge.config.v1.DfxBridgeConfig"), nullptr);
  registry.Register("wsbridge.config.v1.DfxBridgeConfig",
                    [](const google::protobuf::Message&, const BridgeContext&)
                        -> absl::StatusOr<std::unique_ptr<Bridge>> { return absl::UnimplementedError("x"); });
  ASSERT_NE(registry.Find("wsbridge.config.v1.DfxBridgeConfig"), nullptr);
  EXPECT_EQ(registry.Types(), std::vector<std::string>{"wsbridge.config.v1.DfxBridgeConfig"});
}

TEST(ActiveCalls, AbortAllEndsOpenCallsAndRefusesNewOnes) {
  ActiveCalls calls;
  std::atomic<int> aborted{0};
  auto a = calls.Add([&](const grpc::Status& s) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    aborted++;
  });
  auto b = calls.Add([&](const grpc::Status&) { aborted++; });
  ASSERT_NE(a, 0u);
  ASSERT_NE(b, 0u);
  calls.Remove(b);
  EXPECT_EQ(calls.size(), 1u);
  calls.AbortAll(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
  EXPECT_EQ(aborted.load(), 1);
  EXPECT_EQ(calls.size(), 0u);
  EXPECT_EQ(calls.Add([](const grpc::Status&) {}), 0u);
}

}  // namespace
}  // namespace wsbridge::core
