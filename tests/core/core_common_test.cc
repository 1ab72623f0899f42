// Tests of the small shared pieces: metrics exposition, log redaction, status mapping,
// the bridge registry and the open-call tracker.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "bridges/core/bridge.h"
#include "bridges/core/log.h"
#include "bridges/core/metrics.h"
#include "bridges/core/status.h"
#include "absl/strings/str_cat.h"
#include "wsbridge/config/v1/common.pb.h"
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
            "wss://h/ws?deploymentKey=[redacted]&apiKey=[redacted]&channelKey=[redacted]&x=[redacted]");
  EXPECT_EQ(log::RedactUrl("wss://h/api/ws/chat1?token=eyJabc"), "wss://h/api/ws/chat1?token=[redacted]");
  EXPECT_EQ(log::RedactUrl("wss://h/path"), "wss://h/path");
  EXPECT_EQ(log::RedactUrl("ws://h/?conversationId=42"), "ws://h/?conversationId=42");
}

// A credential registered while held is redacted exactly while some holder lives; two
// holders of one value keep it until both let go.
TEST(Log, ASecretHeldIsRedactedUntilItsLastHolderLetsGo) {
  const size_t before = log::RegisteredSecrets();
  auto first = log::RegisterSecretWhileHeld("tenant-token-1234");
  auto second = log::RegisterSecretWhileHeld("tenant-token-1234");
  EXPECT_EQ(log::RegisteredSecrets(), before + 1);
  EXPECT_EQ(log::Redact("refused tenant-token-1234."), "refused [redacted].");
  first.reset();
  EXPECT_EQ(log::Redact("refused tenant-token-1234."), "refused [redacted].");
  second.reset();
  EXPECT_EQ(log::Redact("refused tenant-token-1234."), "refused tenant-token-1234.");
  EXPECT_EQ(log::RegisteredSecrets(), before);
  EXPECT_EQ(log::RegisterSecretWhileHeld("abc"), nullptr);  // too short to be a credential
}

// Thousands of per-call credentials (sessions coming and going): each is redacted wherever
// it stands in a line, the longest of two that start at one place wins, text between and
// around is kept, and nothing stays registered once they are gone.
TEST(Log, ManyHeldSecretsAreEachRedactedAndAllReleased) {
  const size_t before = log::RegisteredSecrets();
  std::vector<std::shared_ptr<const void>> held;
  for (int i = 0; i < 10000; ++i) held.push_back(log::RegisterSecretWhileHeld(absl::StrCat("tok-", i, "-x")));
  EXPECT_EQ(log::RegisteredSecrets(), before + 10000);
  EXPECT_EQ(log::Redact("a tok-7-x b tok-9999-xtok-42-x c tok-10000-x tok-"),
            "a [redacted] b [redacted][redacted] c tok-10000-x tok-");
  auto longer = log::RegisterSecretWhileHeld("tok-7-x-and-more");
  EXPECT_EQ(log::Redact("[tok-7-x-and-more]"), "[[redacted]]");
  EXPECT_EQ(log::Redact("[tok-7-x-and-mor]"), "[[redacted]-and-mor]");
  longer.reset();
  held.clear();
  EXPECT_EQ(log::RegisteredSecrets(), before);
  EXPECT_EQ(log::Redact("a tok-7-x b"), "a tok-7-x b");
}

// Captures what is written to stderr (fd 2) while it lives.
class StderrCapture {
 public:
  StderrCapture() {
    std::fflush(stderr);
    std::snprintf(path_, sizeof path_, "/tmp/wsb-log-XXXXXX");
    fd_ = mkstemp(path_);
    saved_ = dup(2);
    dup2(fd_, 2);
  }
  ~StderrCapture() {
    std::fflush(stderr);
    dup2(saved_, 2);
    close(saved_);
    close(fd_);
    unlink(path_);
  }
  std::string Text() {
    std::fflush(stderr);
    std::ifstream in(path_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  char path_[64];
  int fd_ = -1;
  int saved_ = -1;
};

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Issue #14, item 9: every reconnect attempt of every session was logged.
TEST(Log, RepeatsBeyondTheBurstAreSummarisedOncePerWindow) {
  StderrCapture capture;
  log::SetRepeatLimit(3, 0.2);
  for (int i = 0; i < 50; ++i) {
    log::Warn("test", "upstream reconnecting", {{"session", std::to_string(i)}});
  }
  log::Warn("test", "a different message");
  std::string text = capture.Text();
  EXPECT_EQ(Count(text, "upstream reconnecting"), 3u) << text;
  EXPECT_NE(text.find("session=2"), std::string::npos);
  EXPECT_EQ(text.find("session=3"), std::string::npos);
  EXPECT_EQ(Count(text, "a different message"), 1u);

  // Once the window is over, the next line written brings the count.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (text.find("suppressed 47 similar lines: upstream reconnecting") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    log::Info("test", "tick");
    text = capture.Text();
  }
  EXPECT_EQ(Count(text, "suppressed 47 similar lines: upstream reconnecting"), 1u) << text;
  EXPECT_NE(text.find("suppressed=47"), std::string::npos);
  // A new window starts with a fresh burst.
  log::Warn("test", "upstream reconnecting", {{"session", "again"}});
  text = capture.Text();
  EXPECT_NE(text.find("session=again"), std::string::npos);
  log::SetRepeatLimit(0, 0);
  for (int i = 0; i < 10; ++i) log::Warn("test", "unlimited");
  EXPECT_EQ(Count(capture.Text(), "unlimited"), 10u);
}

// The counts are written without waiting for another line: WriteEndedRepeats (wsbridged
// calls it once a second) writes the windows that have ended, FlushRepeats (at exit) the
// ones still open, whose later lines stay limited.
TEST(Log, SuppressedCountsAreWrittenWhenAWindowEndsAndAtExit) {
  StderrCapture capture;
  log::SetRepeatLimit(2, 0.2);
  for (int i = 0; i < 10; ++i) log::Warn("test", "storm line");
  log::WriteEndedRepeats();  // the window is still open: nothing yet
  EXPECT_EQ(Count(capture.Text(), "similar lines"), 0u) << capture.Text();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::string text;
  while (std::chrono::steady_clock::now() < deadline) {
    log::WriteEndedRepeats();
    text = capture.Text();
    if (text.find("suppressed 8 similar lines: storm line") != std::string::npos) break;
  }
  EXPECT_EQ(Count(text, "suppressed 8 similar lines: storm line"), 1u) << text;
  EXPECT_EQ(Count(text, "storm line"), 3u) << text;  // 2 lines and the count

  log::SetRepeatLimit(2, 3600);
  for (int i = 0; i < 5; ++i) log::Warn("test", "last stretch");
  log::FlushRepeats();
  text = capture.Text();
  EXPECT_EQ(Count(text, "suppressed 3 similar lines: last stretch"), 1u) << text;
  log::Warn("test", "last stretch");  // the window goes on
  log::FlushRepeats();
  text = capture.Text();
  EXPECT_EQ(Count(text, "suppressed 1 similar lines: last stretch"), 1u) << text;
  EXPECT_EQ(Count(text, "last stretch"), 4u) << text;
  log::SetRepeatLimit(0, 0);
}

// Issue #14, item 8: credentials under names that do not look like one (signed URLs).
TEST(Log, RedactsEveryQueryValueButAShortAllowList) {
  EXPECT_EQ(log::RedactUrl("wss://h/ws?sig=c2lnbmF0dXJl&se=2026-01-01&st=abc&sv=2021&sp=rw"),
            "wss://h/ws?sig=[redacted]&se=[redacted]&st=[redacted]&sv=[redacted]&sp=[redacted]");
  EXPECT_EQ(log::RedactUrl("wss://b.s3.test/o?X-Amz-Credential=AKIA1&X-Amz-Signature=f00d#frag"),
            "wss://b.s3.test/o?X-Amz-Credential=[redacted]&X-Amz-Signature=[redacted]#frag");
  EXPECT_EQ(log::RedactUrl("wss://h/ws?v=2&format=json&languageCode=en-US&Version=3"),
            "wss://h/ws?v=2&format=json&languageCode=en-US&Version=3");
  // A bare value may be the credential itself.
  EXPECT_EQ(log::RedactUrl("wss://h/ws?eyJhbGciOi&lang=en"), "wss://h/ws?[redacted]&lang=en");
  EXPECT_EQ(log::RedactUrl("wss://h/ws?"), "wss://h/ws?");
}

TEST(Status, CutTextKeepsShortTextAndCutsLongTextOnACharacterBoundary) {
  EXPECT_EQ(CutText("short", 10), "short");
  EXPECT_EQ(CutText("0123456789", 10), "0123456789");
  EXPECT_EQ(CutText("0123456789abc", 10), "0123456789 ...[cut: 13 bytes in all]");
  // "é" is two bytes (C3 A9): a cut through it backs off to before it.
  EXPECT_EQ(CutText("abcdefghi\xC3\xA9xyz", 10), "abcdefghi ...[cut: 14 bytes in all]");
}

TEST(Status, ToGrpcStatusCutsTheMessageAndErrorInfoValues) {
  const std::string big(10'000, 'z');
  std::map<std::string, std::string> metadata;
  for (int i = 0; i < 40; ++i) metadata[absl::StrCat("k", 100 + i)] = big;
  grpc::Status edge = ToGrpcStatus(
      WithErrorInfo(absl::NotFoundError(big), std::string(1000, 'R'), "d.test", metadata));
  EXPECT_EQ(edge.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(edge.error_message(),
            absl::StrCat(std::string(kMaxGrpcMessageBytes, 'z'), " ...[cut: 10000 bytes in all]"));
  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(edge.error_details()));
  EXPECT_EQ(details.message(), edge.error_message());
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(info.ParseFromString(details.details(0).value()));
  EXPECT_EQ(info.reason().substr(0, kMaxErrorInfoValueBytes),
            std::string(kMaxErrorInfoValueBytes, 'R'));
  EXPECT_LT(info.reason().size(), 300u);
  EXPECT_EQ(info.metadata_size(), static_cast<int>(kMaxErrorInfoEntries));
  EXPECT_TRUE(info.metadata().contains("k100"));  // the first keys in order are kept
  EXPECT_FALSE(info.metadata().contains("k139"));
  for (const auto& [k, v] : info.metadata()) EXPECT_LT(v.size(), 300u) << k;
  // Everything together stays far below a caller's 8 KiB trailer limit.
  EXPECT_LT(edge.error_message().size() * 3 + edge.error_details().size() * 4 / 3, 8000u);
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

// What a bridge's factory registers with RegisterConfigFactory: the config type it is
// found by, its options checked first, errors naming the bridge's kind and name.
struct TestOptions {
  std::string url;
};

TEST(BridgeRegistry, RegisterConfigFactoryChecksTheTypeAndPrefixesErrors) {
  BridgeRegistry registry;
  int made = 0;
  RegisterConfigFactory<config::v1::UpstreamConfig>(
      registry, "test",
      [](const config::v1::UpstreamConfig& c, std::string_view) -> absl::StatusOr<TestOptions> {
        if (c.url().empty()) return absl::InvalidArgumentError("upstream.url: required");
        return TestOptions{c.url()};
      },
      [&made](TestOptions o, const BridgeContext&) -> absl::StatusOr<std::unique_ptr<Bridge>> {
        ++made;
        return absl::UnimplementedError(absl::StrCat("made for ", o.url));
      });
  const BridgeFactory* f = registry.Find("wsbridge.config.v1.UpstreamConfig");
  ASSERT_NE(f, nullptr);
  BridgeContext ctx;
  ctx.name = "main";
  config::v1::UpstreamConfig empty;
  absl::StatusOr<std::unique_ptr<Bridge>> r = (*f)(empty, ctx);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "test bridge \"main\": upstream.url: required");
  EXPECT_EQ(made, 0);
  config::v1::Secret other;
  r = (*f)(other, ctx);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("expected wsbridge.config.v1.UpstreamConfig, got "
                                      "wsbridge.config.v1.Secret"),
            std::string_view::npos)
      << r.status();
  config::v1::UpstreamConfig good;
  good.set_url("wss://h");
  r = (*f)(good, ctx);
  EXPECT_EQ(r.status().message(), "made for wss://h");
  EXPECT_EQ(made, 1);
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
