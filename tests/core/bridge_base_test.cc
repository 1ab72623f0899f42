// BridgeBase through the fake bridge (fake_bridge.h) in the real daemon, over a real
// WebSocket fake upstream: admission (drain, open-call bound, caller auth), validation
// before a session is taken, default and per-call credentials, health, admin, shutdown.
#include "bridges/core/bridge_base.h"

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tests/core/fake_bridge.h"
#include "tests/core/fake_upstream.h"
#include "tests/support/test_support.h"

namespace wsbridge::core {
namespace {

using namespace std::chrono_literals;
using testing::FakeBridgeOptions;
using testing::FakeDaemon;
using testing::FakeUpstream;
using wsbridge::testing::WaitFor;
namespace v1 = wsbridge::coretest::v1;

class BridgeBaseTest : public ::testing::Test {
 protected:
  FakeBridgeOptions Options(bool default_token = true) {
    FakeBridgeOptions o;
    o.url = upstream_.url();
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    if (default_token) o.default_token = SecretSource::Fixed("default-token");
    return o;
  }

  // Echo with optional per-call token and caller authorization.
  grpc::Status Echo(const std::string& text, const std::string& token = "",
                    const std::string& authorization = "", std::string* out = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    if (!token.empty()) ctx.AddMetadata(std::string(testing::kFakeTokenMetadata), token);
    if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
    v1::EchoRequest req;
    req.set_text(text);
    v1::EchoResponse resp;
    grpc::Status st = daemon_.stub().Echo(&ctx, req, &resp);
    if (out != nullptr) *out = resp.text();
    return st;
  }

  // Sets the bridge's caller limits in the daemon config, as an operator does.
  static std::function<void(config::v1::DaemonConfig&)> Limits(
      std::function<void(config::v1::CallerLimits&)> set) {
    return [set](config::v1::DaemonConfig& c) { set(*c.mutable_bridges(0)->mutable_limits()); };
  }

  FakeUpstream upstream_;
  FakeDaemon daemon_;
};

TEST_F(BridgeBaseTest, AnswersThroughTheDefaultSessionAndReportsHealth) {
  ASSERT_TRUE(daemon_.Start(Options()).ok());
  std::string out;
  grpc::Status st = Echo("hello", "", "", &out);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(out, "hello");
  EXPECT_TRUE(WaitFor([&] { return daemon_.bridge().Serving(); }, 5s));
  EXPECT_EQ(daemon_.sessions(), 1u);
  EXPECT_EQ(upstream_.Count("login|default-token"), 1);
}

TEST_F(BridgeBaseTest, ValidatesTheRequestBeforeTakingASession) {
  ASSERT_TRUE(daemon_.Start(Options(/*default_token=*/false)).ok());
  grpc::Status bad = Echo("", "tenant-a");
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bad.error_message(), "text is required")) << bad.error_message();
  EXPECT_EQ(daemon_.sessions(), 0u);
  EXPECT_EQ(upstream_.handshakes(), 0);
  ASSERT_TRUE(Echo("ok", "tenant-a").ok());
  EXPECT_EQ(daemon_.sessions(), 1u);
}

TEST_F(BridgeBaseTest, CallWithoutAnyCredentialIsUnauthenticated) {
  ASSERT_TRUE(daemon_.Start(Options(/*default_token=*/false)).ok());
  grpc::Status st = Echo("x");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(st.error_message(), std::string(testing::kFakeTokenMetadata))) << st.error_message();
  EXPECT_EQ(upstream_.handshakes(), 0);
}

// The server knows a call's deadline as its arrival plus the caller's timeout (gRPC
// sends a duration): calls that wait longer than that to be handled (a saturated
// daemon, held here) must not be sent upstream when they finally are.
TEST_F(BridgeBaseTest, ACallWhoseDeadlineHasPassedIsNotForwarded) {
  ASSERT_TRUE(daemon_.Start(Options()).ok());
  ASSERT_TRUE(Echo("warm").ok());  // the session is ready: a call would go out at once
  auto release = std::make_shared<absl::Notification>();
  daemon_.HoldLoops(release);
  grpc::CompletionQueue cq;
  constexpr int kCalls = 200;
  std::vector<std::unique_ptr<grpc::ClientContext>> ctx;
  std::vector<v1::EchoResponse> resp(kCalls);
  std::vector<grpc::Status> st(kCalls);
  std::vector<std::unique_ptr<grpc::ClientAsyncResponseReader<v1::EchoResponse>>> calls;
  v1::EchoRequest req;
  req.set_text("expired");
  std::chrono::system_clock::time_point last_deadline;
  for (int i = 0; i < kCalls; ++i) {
    ctx.push_back(std::make_unique<grpc::ClientContext>());
    last_deadline = std::chrono::system_clock::now() + 20ms;
    ctx.back()->set_deadline(last_deadline);
    calls.push_back(daemon_.stub().AsyncEcho(ctx.back().get(), req, &cq));
    calls.back()->Finish(&resp[i], &st[i], reinterpret_cast<void*>(static_cast<intptr_t>(i)));
  }
  for (int i = 0; i < kCalls; ++i) {  // every deadline passes while the loops are held
    void* tag;
    bool ok;
    ASSERT_TRUE(cq.Next(&tag, &ok));
  }
  for (const grpc::Status& s : st) EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server's deadline of a call is its arrival plus the timeout left when it was
  // sent, so it trails the client's by the transit time: let a generous margin of time
  // pass as well (this waits for time itself, not for an event).
  std::this_thread::sleep_until(last_deadline + 500ms);
  release->Notify();
  ASSERT_TRUE(Echo("after").ok());
  // The held calls are matched before "after" (the server matches calls in arrival order).
  EXPECT_EQ(upstream_.Count("req|"), 2) << "a call whose deadline had passed went upstream";
}

TEST_F(BridgeBaseTest, PerCallCredentialsGetTheirOwnSession) {
  ASSERT_TRUE(daemon_.Start(Options()).ok());
  ASSERT_TRUE(Echo("a").ok());
  ASSERT_TRUE(Echo("b", "tenant-b").ok());
  ASSERT_TRUE(Echo("c", "tenant-b").ok());
  EXPECT_EQ(daemon_.sessions(), 2u);
  EXPECT_EQ(upstream_.Count("login|tenant-b"), 1);
  // A refused credential is the caller's problem, reported as such.
  grpc::Status refused = Echo("d", "bad-token");
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED) << refused.error_message();
}

TEST_F(BridgeBaseTest, PerCallCredentialsAreRefusedUnlessAllowed) {
  FakeBridgeOptions o = Options();
  o.allow_per_call = false;
  ASSERT_TRUE(daemon_.Start(o).ok());
  grpc::Status st = Echo("a", "tenant-b");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "per-call credentials")) << st.error_message();
  EXPECT_EQ(upstream_.Count("login|tenant-b"), 0);
}

TEST_F(BridgeBaseTest, OpenCallsAreBounded) {
  FakeBridgeOptions o = Options();
  o.max_open_calls = 2;
  ASSERT_TRUE(daemon_.Start(o).ok());
  grpc::CompletionQueue cq;
  grpc::ClientContext held[2];
  v1::EchoRequest hold;
  hold.set_text("hold");
  v1::EchoResponse resp[2];
  grpc::Status st[2];
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::EchoResponse>> calls[2];
  for (int i = 0; i < 2; ++i) {
    calls[i] = daemon_.stub().AsyncEcho(&held[i], hold, &cq);
    calls[i]->Finish(&resp[i], &st[i], reinterpret_cast<void*>(static_cast<intptr_t>(i + 1)));
  }
  ASSERT_TRUE(WaitFor([&] { return upstream_.Count("req|") == 2; }, 10s));
  grpc::Status over = Echo("third");
  EXPECT_EQ(over.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(absl::StrContains(over.error_message(), "max_open_calls")) << over.error_message();
  for (auto& c : held) c.TryCancel();
  for (int i = 0; i < 2; ++i) {
    void* tag = nullptr;
    bool ok = false;
    ASSERT_TRUE(cq.Next(&tag, &ok));
  }
  // Once the cancelled calls have left, calls are admitted again.
  EXPECT_TRUE(WaitFor([&] { return Echo("again").ok(); }, 10s));
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

TEST_F(BridgeBaseTest, CallerAuthorizationIsCheckedBeforeAnythingElse) {
  ASSERT_TRUE(daemon_
                  .Start(Options(/*default_token=*/false),
                         [](config::v1::DaemonConfig& cfg) {
                           cfg.mutable_server()->mutable_auth_token()->set_value("s3cret");
                         })
                  .ok());
  grpc::Status missing = Echo("x", "tenant-a");
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(daemon_.sessions(), 0u);
  EXPECT_EQ(upstream_.handshakes(), 0);
  EXPECT_TRUE(Echo("x", "tenant-a", "Bearer s3cret").ok());
}

TEST_F(BridgeBaseTest, DrainRefusesNewCallsAndShutdownEndsOpenOnes) {
  ASSERT_TRUE(daemon_.Start(Options()).ok());
  grpc::ClientContext wctx;
  v1::WatchRequest wreq;
  wreq.set_topic("t");
  auto watch = daemon_.stub().Watch(&wctx, wreq);
  watch->WaitForInitialMetadata();  // the subscription is acknowledged

  daemon_.bridge().BeginDrain();
  grpc::Status refused = Echo("x");
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "shutting down")) << refused.error_message();
  EXPECT_FALSE(daemon_.bridge().Serving());

  daemon_.daemon().RequestShutdown();
  v1::WatchResponse m;
  while (watch->Read(&m)) {
  }
  grpc::Status ended = watch->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  // The upstream session is closed as the daemon stops.
  EXPECT_TRUE(WaitFor([&] { return upstream_.open() == 0; }, 10s));
}

TEST_F(BridgeBaseTest, AdminListsAndClosesSessions) {
  ASSERT_TRUE(daemon_.Start(Options(/*default_token=*/false)).ok());
  ASSERT_TRUE(Echo("a", "tenant-b").ok());
  auto sessions = daemon_.bridge().ListSessions();
  ASSERT_EQ(sessions.size(), 1u);
  for (const auto& s : sessions) {
    EXPECT_EQ(s.bridge(), "fake");
    EXPECT_FALSE(absl::StrContains(s.id(), "tenant-b")) << s.id();  // ids never carry credentials
  }
  EXPECT_TRUE(daemon_.bridge().CloseSession(sessions[0].id()).ok());
  EXPECT_TRUE(WaitFor([&] { return upstream_.open() == 0; }, 10s));
  EXPECT_EQ(daemon_.bridge().CloseSession("fake/no-such-session").code(), absl::StatusCode::kNotFound);
}

// While the upstream cannot be reached, calls fail at once saying so (nothing queues up
// in memory), unless they ask to wait in metadata; those are bounded per bridge and go
// through once the upstream is back.
TEST_F(BridgeBaseTest, AnUnreachableUpstreamFailsCallsFastUnlessTheyAskToWait) {
  upstream_.Refuse(absl::UnavailableError("down for maintenance"));
  ASSERT_TRUE(daemon_.Start(Options(), Limits([](auto& l) { l.set_max_waiting_calls(2); })).ok());
  // A second handshake: the first attempt failed and the session knows it.
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshakes() >= 2; }, 10s));
  grpc::Status st = Echo("x");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_TRUE(absl::StrContains(st.error_message(), "Fake upstream has been unreachable since"))
      << st.error_message();
  EXPECT_TRUE(absl::StrContains(st.error_message(), "x-wsbridge-wait-for-ready"))
      << st.error_message();

  grpc::CompletionQueue cq;
  constexpr int kCalls = 3;
  grpc::ClientContext ctx[kCalls];
  v1::EchoResponse resp[kCalls];
  grpc::Status status[kCalls];
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::EchoResponse>> calls[kCalls];
  v1::EchoRequest req;
  req.set_text("waited");
  for (int i = 0; i < kCalls; ++i) {
    ctx[i].set_deadline(std::chrono::system_clock::now() + 20s);
    ctx[i].AddMetadata(std::string(kWaitForReadyMetadata), "true");
    calls[i] = daemon_.stub().AsyncEcho(&ctx[i], req, &cq);
    calls[i]->Finish(&resp[i], &status[i], reinterpret_cast<void*>(static_cast<intptr_t>(i)));
  }
  // Only the one beyond the bound ends while the upstream is still down.
  void* tag = nullptr;
  bool ok = false;
  ASSERT_TRUE(cq.Next(&tag, &ok));
  const grpc::Status& over = status[reinterpret_cast<intptr_t>(tag)];
  EXPECT_EQ(over.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << over.error_message();
  EXPECT_TRUE(absl::StrContains(over.error_message(), "max_waiting_calls")) << over.error_message();
  EXPECT_EQ(upstream_.Count("req|"), 0);
  upstream_.Refuse(absl::OkStatus());
  for (int i = 0; i < kCalls - 1; ++i) ASSERT_TRUE(cq.Next(&tag, &ok));
  int answered = 0;
  for (int i = 0; i < kCalls; ++i) answered += status[i].ok() && resp[i].text() == "waited" ? 1 : 0;
  EXPECT_EQ(answered, kCalls - 1);
  // Back up: calls without the metadata go through again.
  EXPECT_TRUE(Echo("after").ok());
}

// A per-call credential the upstream refuses gives its pool slot back at once, and is
// remembered for a while so that repeating it costs no upstream attempt.
TEST_F(BridgeBaseTest, ARefusedPerCallCredentialFreesItsSlotAndIsRemembered) {
  FakeBridgeOptions o = Options();
  o.max_sessions = 2;  // the default session and one more
  ASSERT_TRUE(daemon_.Start(o).ok());
  ASSERT_TRUE(Echo("a").ok());
  for (int i = 0; i < 5; ++i) {
    grpc::Status bogus = Echo("x", absl::StrCat("bad-", i));
    EXPECT_EQ(bogus.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bogus.error_message();
  }
  grpc::Status tenant = Echo("b", "tenant-b");
  EXPECT_TRUE(tenant.ok()) << tenant.error_message();
  EXPECT_EQ(daemon_.sessions(), 2u);
  const int logins = upstream_.Count("login|bad-0");
  grpc::Status again = Echo("x", "bad-0");
  EXPECT_EQ(again.error_code(), grpc::StatusCode::UNAUTHENTICATED) << again.error_message();
  EXPECT_TRUE(absl::StrContains(again.error_message(), "refused the credential")) << again.error_message();
  EXPECT_TRUE(absl::StrContains(again.error_message(), "remembered: not tried again"))
      << again.error_message();
  EXPECT_EQ(upstream_.Count("login|bad-0"), logins);
}

// One caller cannot take every session slot with per-call credentials.
TEST_F(BridgeBaseTest, SessionsPerCallerAreBounded) {
  FakeBridgeOptions o = Options(/*default_token=*/false);
  o.max_sessions = 10;
  ASSERT_TRUE(daemon_.Start(o, Limits([](auto& l) { l.set_max_sessions_per_caller(2); })).ok());
  ASSERT_TRUE(Echo("a", "tenant-a").ok());
  ASSERT_TRUE(Echo("b", "tenant-b").ok());
  grpc::Status third = Echo("c", "tenant-c");
  EXPECT_EQ(third.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << third.error_message();
  EXPECT_TRUE(absl::StrContains(third.error_message(), "max_sessions_per_caller"))
      << third.error_message();
  EXPECT_TRUE(absl::StrContains(third.error_message(), "ipv4:127.0.0.1)")) << third.error_message();
  EXPECT_EQ(upstream_.Count("login|tenant-c"), 0);
  // Its existing sessions stay usable.
  EXPECT_TRUE(Echo("a2", "tenant-a").ok());
  EXPECT_EQ(daemon_.sessions(), 2u);
}

// Once the refusal memory is over, the credential gets one fresh upstream attempt (a
// token that was fixed upstream starts working without a restart).
TEST_F(BridgeBaseTest, ARememberedRefusalExpiresIntoAFreshAttempt) {
  ASSERT_TRUE(daemon_.Start(Options(), Limits([](auto& l) {
                l.mutable_refusal_memory()->set_nanos(200'000'000);
              })).ok());
  ASSERT_EQ(Echo("x", "bad-token").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(WaitFor([&] { return daemon_.sessions() == 1; }, 10s));  // only the default
  const int logins = upstream_.Count("login|bad-token");
  EXPECT_TRUE(WaitFor(
      [&] {
        grpc::Status st = Echo("x", "bad-token");
        return st.error_code() == grpc::StatusCode::UNAUTHENTICATED &&
               !absl::StrContains(st.error_message(), "remembered");
      },
      10s));
  EXPECT_EQ(upstream_.Count("login|bad-token"), logins + 1);
}

}  // namespace
}  // namespace wsbridge::core
