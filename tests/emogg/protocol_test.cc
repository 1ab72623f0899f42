// The Emogg session protocol through the real path (daemon, gRPC client, emulator over
// real sockets): auth first, Emogg's closing statuses, reconnect and restore with gaps,
// heartbeats and dead servers, the client-side rate limiter.
#include <string>
#include <thread>
#include <vector>

#include "tests/emogg/bridge_fixture.h"

namespace wsbridge::emogg::testing {
namespace {

class EmoggProtocolTest : public EmoggBridgeTest {};

TEST_F(EmoggProtocolTest, NothingIsSentBeforeAuthSucceeded) {
  Start();
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  // The next connection's auth answer is held back a second; requests made meanwhile
  // wait in the bridge until it arrives.
  emulator_->SetAnswerDelay(1000ms);
  emulator_->DropAll();
  ASSERT_TRUE(WaitFor([&] { return !Ready(); }));  // the drop is noticed
  std::vector<Outcome> out;
  std::thread t([&] { out = CallAll(std::vector<std::pair<std::string, std::string>>(5, {"emulator:echo", "{}"})); });
  ASSERT_TRUE(WaitFor([&] {
    auto sessions = bridge_->ListSessions();
    return emulator_->auth_successes() == 2 && sessions.size() == 1 &&
           sessions[0].in_flight_requests() == 5;
  }));
  // Emogg has the auth message, not yet answered: nothing else has been sent.
  EXPECT_EQ(emulator_->requests("emulator:echo"), 0);
  t.join();
  for (const Outcome& o : out) EXPECT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(emulator_->requests("emulator:echo"), 5);
  EXPECT_EQ(emulator_->frames_before_auth(), 0);
}

TEST_F(EmoggProtocolTest, RefusedTokenSendsNothingElseAndMakesNoStorm) {
  emulator::EmoggProtocolOptions p = Generous();
  Start(p, [](EmoggBridgeOptions& o) { o.auth_retry_pause = 1500ms; });
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  emulator_->SetRefuseAuth(true);
  emulator_->DropAll();
  ASSERT_TRUE(WaitFor([&] { return emulator_->auth_failures() == 1; }));
  // Every call fails at once, naming the refusal; none reaches Emogg, and the bridge
  // does not try the token again within auth_retry_pause.
  for (int i = 0; i < 20; ++i) {
    Outcome o = Call("emulator:echo", "{}");
    ASSERT_EQ(o.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << o.status.error_message();
    EXPECT_EQ(ErrorDetail(o.status).reason, "TOKEN_REFUSED");
  }
  EXPECT_EQ(emulator_->auth_failures(), 1);
  EXPECT_EQ(emulator_->requests("emulator:echo"), 0);
  EXPECT_EQ(emulator_->frames_before_auth(), 0);
  EXPECT_FALSE(Ready());
  // A fixed token brings the session back on its own.
  emulator_->SetRefuseAuth(false);
  EXPECT_TRUE(WaitFor([&] { return Ready(); }, 15s));
  EXPECT_TRUE(Call("emulator:echo", "{}").status.ok());
  EXPECT_LE(emulator_->auth_failures(), 3);
}

// 401, 405 and 429 close the connection: the request they answer gets the mapped code;
// the others in flight end OUTCOME_UNKNOWN naming the close; the session comes back.
struct Closing {
  int status;
  grpc::StatusCode code;
  std::string reason;
};

class EmoggClosingTest : public EmoggBridgeTest, public ::testing::WithParamInterface<Closing> {};

TEST_P(EmoggClosingTest, TriggerGetsItsCodeOthersOutcomeUnknownThenReconnect) {
  const Closing c = GetParam();
  Start();
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  std::vector<std::pair<std::string, std::string>> calls(3, {"emulator:slow", R"({"ms": 20000})"});
  std::vector<Outcome> slow;
  std::thread t([&] { slow = CallAll(calls, 15s); });
  ASSERT_TRUE(WaitFor([&] { return emulator_->requests("emulator:slow") == 3; }));
  Outcome trigger = Call("emulator:status", absl::StrCat(R"({"status": )", c.status, "}"));
  t.join();
  EXPECT_EQ(trigger.status.error_code(), c.code) << trigger.status.error_message();
  Detail td = ErrorDetail(trigger.status);
  EXPECT_EQ(td.reason, c.reason);
  EXPECT_EQ(td.metadata["upstream_status"], absl::StrCat(c.status));
  EXPECT_NE(trigger.status.error_message().find("closes the connection"), std::string::npos);
  for (const Outcome& o : slow) {
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << o.status.error_message();
    Detail d = ErrorDetail(o.status);
    EXPECT_EQ(d.reason, "OUTCOME_UNKNOWN");
    EXPECT_EQ(d.metadata["path"], "emulator:slow");
    EXPECT_EQ(d.metadata["close_status"], absl::StrCat(c.status));
    EXPECT_NE(o.status.error_message().find("outcome unknown"), std::string::npos)
        << o.status.error_message();
  }
  EXPECT_EQ(emulator_->server_close_codes(), std::vector<int>{1008});
  // Re-authenticated on a new connection (after the pause 401 and 429 ask for).
  EXPECT_TRUE(WaitFor([&] { return emulator_->auth_successes() == 2 && Ready(); }, 15s));
  EXPECT_TRUE(Call("ping").status.ok());
  EXPECT_EQ(emulator_->frames_before_auth(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Statuses, EmoggClosingTest,
    ::testing::Values(Closing{401, grpc::StatusCode::UNAUTHENTICATED, "UNAUTHORIZED"},
                      Closing{405, grpc::StatusCode::INTERNAL, "MALFORMED_PAYLOAD"},
                      Closing{429, grpc::StatusCode::RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS"}),
    [](const ::testing::TestParamInfo<Closing>& i) { return absl::StrCat("Status", i.param.status); });

TEST_F(EmoggProtocolTest, After429TheSubscriptionIsRestoredWithAGap) {
  Start();
  auto a = Subscribe("session_emotions_counts", "s1:1s");
  v1::Subscribed sub = ExpectSubscribed(*a);
  auto b = Subscribe("session_emotions_counts", "s1:1s");
  ExpectSubscribed(*b);
  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  v1::Event before;
  ASSERT_TRUE(a->NextEvent(&before));
  v1::Event before_b;
  ASSERT_TRUE(b->NextEvent(&before_b));

  Outcome trigger = Call("emulator:status", R"({"status": 429})");
  EXPECT_EQ(trigger.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ASSERT_TRUE(WaitFor([&] {
    return emulator_->auth_successes() == 2 &&
           emulator_->subscriptions_of("session_emotions_counts", "s1:1s") == 1;
  }, 15s));
  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  for (auto* s : {a.get(), b.get()}) {
    std::vector<v1::SubscriptionUpdate> skipped;
    v1::Event after;
    ASSERT_TRUE(s->NextEvent(&after, &skipped));
    // Every subscriber gets the gap before any event of the new upstream subscription.
    ASSERT_EQ(skipped.size(), 1u);
    ASSERT_TRUE(skipped[0].has_gap());
    const v1::Gap& gap = skipped[0].gap();
    EXPECT_EQ(gap.subscription_id(), sub.subscription_id());
    EXPECT_LE(gap.from().seconds(), gap.to().seconds());
    EXPECT_TRUE(gap.from().seconds() < gap.to().seconds() || gap.from().nanos() <= gap.to().nanos());
    EXPECT_EQ(gap.last_event_timestamp_raw(), before.timestamp_raw());
    EXPECT_NE(gap.reason().find("429"), std::string::npos) << gap.reason();
    // The bridge's id stays; the upstream one is new and mapped transparently.
    EXPECT_EQ(after.subscription_id(), sub.subscription_id());
    EXPECT_NE(after.upstream_subscription_id(), before.upstream_subscription_id());
  }
}

TEST_F(EmoggProtocolTest, A401EndsSubscriptionsAfterTheirQueuedEvents) {
  Start(Generous(), [](EmoggBridgeOptions& o) { o.auth_retry_pause = 1s; });
  auto s = Subscribe("session_emotions_counts", "s1:1s");
  ExpectSubscribed(*s);
  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  ASSERT_TRUE(WaitFor([&] { return emulator_->events_sent() == 1; }));
  Outcome trigger = Call("emulator:status", R"({"status": 401})");
  EXPECT_EQ(trigger.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // The event sent before the 401 still arrives; then the stream ends: the token is
  // considered refused, so the subscription cannot be restored with it.
  v1::Event ev;
  ASSERT_TRUE(s->NextEvent(&ev));
  v1::SubscriptionUpdate u;
  EXPECT_FALSE(s->Next(&u));
  grpc::Status st = s->reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).reason, "TOKEN_REFUSED");
  EXPECT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 0; }));
}

TEST_F(EmoggProtocolTest, DroppedConnectionRestoresSubscriptionsWithAGap) {
  Start();
  auto s = Subscribe("session_worker_state", "s3");
  v1::Subscribed sub = ExpectSubscribed(*s);
  v1::Event first;
  ASSERT_TRUE(s->NextEvent(&first));
  emulator_->DropAll();
  std::vector<v1::SubscriptionUpdate> skipped;
  v1::Event after;
  // Emogg sends the last state on the new subscription at once.
  ASSERT_TRUE(s->NextEvent(&after, &skipped));
  ASSERT_EQ(skipped.size(), 1u);
  ASSERT_TRUE(skipped[0].has_gap());
  EXPECT_FALSE(skipped[0].gap().reason().empty());
  EXPECT_EQ(after.subscription_id(), sub.subscription_id());
  EXPECT_EQ(emulator_->auth_successes(), 2);
  EXPECT_EQ(emulator_->subscriptions_of("session_worker_state", "s3"), 1);
}

TEST_F(EmoggProtocolTest, HeartbeatKeepsAnIdleSessionPastTheIdleTimeout) {
  emulator::EmoggProtocolOptions p = Generous();
  p.idle_timeout = 600ms;
  Start(p, [](EmoggBridgeOptions& o) {
    o.heartbeat_interval = 150ms;
    o.heartbeat_timeout = 2s;
  });
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  // Eight pings after 150 ms of silence each: well past the 600 ms idle timeout.
  ASSERT_TRUE(WaitFor([&] { return emulator_->requests("ping") >= 8; }));
  EXPECT_TRUE(emulator_->server_close_codes().empty());
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_TRUE(Call("emulator:echo", "{}").status.ok());
}

TEST_F(EmoggProtocolTest, WithoutHeartbeatTheIdleSessionIsClosedAndReopened) {
  // The control for the test above: the emulator's idle timeout is real.
  emulator::EmoggProtocolOptions p = Generous();
  p.idle_timeout = 300ms;
  Start(p, [](EmoggBridgeOptions& o) { o.heartbeat_interval = core::Duration::zero(); });
  ASSERT_TRUE(WaitFor([&] { return !emulator_->server_close_codes().empty(); }));
  EXPECT_EQ(emulator_->server_close_codes().front(), 1000);
  EXPECT_EQ(emulator_->requests("ping"), 0);
  // Reopened (and closed again when idle, as long as nobody uses it).
  EXPECT_TRUE(WaitFor([&] { return emulator_->auth_successes() >= 2; }));
}

TEST_F(EmoggProtocolTest, DeadServerIsDetectedByThePingDeadline) {
  Start(Generous(), [](EmoggBridgeOptions& o) {
    o.heartbeat_interval = 100ms;
    o.heartbeat_timeout = 300ms;
    o.connection.keepalive.ping_interval = core::Duration::zero();  // the ping request alone
    o.connection.handshake_timeout = 500ms;
  });
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  std::vector<Outcome> slow;
  std::thread t([&] { slow = CallAll({{"emulator:slow", R"({"ms": 3000})"}}, 20s); });
  ASSERT_TRUE(WaitFor([&] { return emulator_->requests("emulator:slow") == 1; }));
  emulator_->SetSilent(true);
  t.join();
  ASSERT_EQ(slow.size(), 1u);
  // Found dead long before the call's deadline: the request's outcome is unknown.
  EXPECT_EQ(slow[0].status.error_code(), grpc::StatusCode::UNAVAILABLE) << slow[0].status.error_message();
  EXPECT_EQ(ErrorDetail(slow[0].status).reason, "OUTCOME_UNKNOWN");
  EXPECT_FALSE(Ready());
  emulator_->SetSilent(false);
  EXPECT_TRUE(WaitFor([&] { return Ready(); }, 15s));
  EXPECT_TRUE(Call("emulator:echo", "{}").status.ok());
}

TEST_F(EmoggProtocolTest, RateLimiterKeepsABurstUnderTheUpstreamLimit) {
  emulator::EmoggProtocolOptions p = Generous();
  p.max_messages = 20;
  p.rate_window = 500ms;
  // 8 requests per window on our side, 20 messages on Emogg's: even two of our windows
  // seen as one (sends delayed on the way under load) stay under Emogg's limit.
  Start(p, [](EmoggBridgeOptions& o) {
    o.limits.max_messages = 10;
    o.limits.window = 500ms;
    o.limits.control_reserve = 2;
  });
  std::vector<std::pair<std::string, std::string>> calls(30, {"emulator:echo", "{}"});
  std::vector<Outcome> out = CallAll(calls, 20s);
  for (const Outcome& o : out) EXPECT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(emulator_->answers_with_status(429), 0);
  EXPECT_TRUE(emulator_->server_close_codes().empty());
  EXPECT_EQ(emulator_->auth_successes(), 1);
}

TEST_F(EmoggProtocolTest, WithoutTheLimiterTheSameBurstGets429) {
  // The control for the test above: the emulator's limit is real.
  emulator::EmoggProtocolOptions p = Generous();
  p.max_messages = 20;
  p.rate_window = 500ms;
  Start(p, [](EmoggBridgeOptions& o) { o.rate_limit = false; });
  std::vector<std::pair<std::string, std::string>> calls(40, {"emulator:echo", "{}"});
  std::vector<Outcome> out = CallAll(calls, 20s);
  int exhausted = 0;
  for (const Outcome& o : out) exhausted += o.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(emulator_->answers_with_status(429), 1);
}

TEST_F(EmoggProtocolTest, RequestThatCannotBeSentBeforeItsDeadlineIsClientRateLimited) {
  Start(Generous(), [](EmoggBridgeOptions& o) {
    o.limits.max_messages = 7;
    o.limits.window = 60s;
    o.limits.control_reserve = 2;  // requests may use 5 of the 7; auth took one of those
  });
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(Call("emulator:echo", "{}").status.ok()) << i;
  // Answered before the caller's own deadline, so it learns the request never left.
  Outcome o = Call("emulator:echo", "{}", 2s);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << o.status.error_message();
  EXPECT_EQ(ErrorDetail(o.status).reason, "CLIENT_RATE_LIMITED");
  EXPECT_NE(o.status.error_message().find("never sent"), std::string::npos);
  EXPECT_EQ(emulator_->requests("emulator:echo"), 4);
}

}  // namespace
}  // namespace wsbridge::emogg::testing
