// EmoggService end to end: the real daemon's gRPC server with the Emogg bridge, a real
// gRPC client, the in-process Emogg emulator over real sockets. What each RPC sends,
// how answers map to messages and statuses, shared channel streams.
#include <set>
#include <string>
#include <vector>

#include "tests/emogg/bridge_fixture.h"

namespace wsbridge::emogg::testing {
namespace {

class EmoggServiceTest : public EmoggBridgeTest {};

TEST_F(EmoggServiceTest, RequestReturnsTheAnswerAsSent) {
  Start();
  // The answer's body is forwarded as the bytes Emogg sent (the emulator re-serializes
  // the body it echoes, without spaces).
  Outcome echo = Call("emulator:echo", R"({"a": [1, 2], "s": "é"})");
  ASSERT_TRUE(echo.status.ok()) << echo.status.error_message();
  EXPECT_EQ(echo.response.status(), 200u);
  EXPECT_EQ(echo.response.path(), "emulator:echo");
  EXPECT_EQ(echo.response.json_body(), R"({"a":[1,2],"s":"é"})");

  Outcome ping = Call("ping");
  ASSERT_TRUE(ping.status.ok()) << ping.status.error_message();
  EXPECT_NE(ping.response.json_body().find("\"ts\""), std::string::npos);

  Outcome get = Call("sessions:get", R"({"sessionId": "s1"})");
  ASSERT_TRUE(get.status.ok()) << get.status.error_message();
  EXPECT_NE(get.response.json_body().find("\"s1\""), std::string::npos);
  // One connection, authenticated once, carried all three.
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_EQ(emulator_->open_connections(), 1);
}

TEST_F(EmoggServiceTest, ErrorAnswersMapToCodesWithErrorInfo) {
  Start();
  struct Case {
    std::string path, body;
    grpc::StatusCode code;
    std::string reason, status, message;
  };
  const std::vector<Case> cases = {
      {"sessions:get", "{}", grpc::StatusCode::INVALID_ARGUMENT, "BAD_REQUEST", "400",
       "sessionId (string) is required"},
      {"nowhere:at-all", "", grpc::StatusCode::NOT_FOUND, "NOT_FOUND", "404", "Path not found"},
      {"sessions:get", R"({"sessionId":"unknown-1"})", grpc::StatusCode::NOT_FOUND, "NOT_FOUND",
       "404", "Session not found"},
      {"emulator:fail", "", grpc::StatusCode::UNAVAILABLE, "INTERNAL_SERVER_ERROR", "500",
       "Internal server error"},
      // Statuses Emogg's pages do not list: the toolkit's HTTP mapping.
      {"emulator:status", R"({"status": 409, "message": "busy"})", grpc::StatusCode::ABORTED,
       "HTTP_409", "409", "busy"},
      {"emulator:status", R"({"status": 503})", grpc::StatusCode::UNAVAILABLE, "HTTP_503", "503",
       "Forced error"},
  };
  for (const Case& c : cases) {
    Outcome o = Call(c.path, c.body);
    EXPECT_EQ(o.status.error_code(), c.code) << c.path << " " << o.status.error_message();
    Detail d = ErrorDetail(o.status);
    EXPECT_EQ(d.reason, c.reason) << c.path;
    EXPECT_EQ(d.domain, "emogg.wsbridge.dev");
    EXPECT_EQ(d.metadata["upstream_status"], c.status);
    EXPECT_EQ(d.metadata["path"], c.path);
    EXPECT_EQ(d.metadata["upstream_message"], c.message);
    EXPECT_NE(o.status.error_message().find(c.message), std::string::npos) << o.status.error_message();
  }
  // None of these closes the connection.
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_TRUE(emulator_->server_close_codes().empty());
}

TEST_F(EmoggServiceTest, BadInputIsInvalidArgumentAndNeverSent) {
  Start();
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  struct Case {
    std::string path, body, says;
  };
  const std::vector<Case> cases = {
      {"", "", "path"},
      {"auth:token", R"({"token":"x"})", "managed by the bridge"},
      {"channels:subscribe", R"({"channel":"c","key":"k"})", "go through Subscribe"},
      {"channels:unsubscribe", "{}", "go through Subscribe"},
      {"emulator:echo", "[1, 2]", "must be a JSON object"},
      {"emulator:echo", "{\"a\":", "not valid JSON"},
      {"emulator:echo", "{} {}", "not valid JSON"},
      {"bad\npath", "", "path"},
      {std::string(300, 'p'), "", "path"},
  };
  for (const Case& c : cases) {
    Outcome o = Call(c.path, c.body);
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.path;
    EXPECT_NE(o.status.error_message().find(c.says), std::string::npos)
        << c.path << ": " << o.status.error_message();
  }
  for (auto [channel, key] : std::vector<std::pair<std::string, std::string>>{
           {"", "s1:1s"}, {"session_emotions_counts", ""}, {"bad\nchannel", "k"}}) {
    auto s = Subscribe(channel, key);
    v1::SubscriptionUpdate u;
    EXPECT_FALSE(s->Next(&u));
    grpc::Status st = s->reader->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find(key.empty() ? "key" : "channel"), std::string::npos)
        << st.error_message();
  }
  // Nothing reached Emogg: no 405 closed the session under other callers.
  EXPECT_EQ(emulator_->requests("emulator:echo"), 0);
  EXPECT_EQ(emulator_->requests("channels:subscribe"), 0);
  EXPECT_EQ(emulator_->answers_with_status(405), 0);
  EXPECT_TRUE(Call("emulator:echo", "{}").status.ok());
  EXPECT_EQ(emulator_->auth_successes(), 1);
}

TEST_F(EmoggServiceTest, ThousandConcurrentRequestsAreCorrelated) {
  Start();
  std::vector<std::pair<std::string, std::string>> calls;
  for (int i = 0; i < 1000; ++i) {
    // Some answers are held back so that answers arrive out of send order.
    calls.emplace_back(i % 10 == 0 ? "emulator:slow" : "emulator:echo",
                       i % 10 == 0 ? absl::StrCat(R"({"ms": 20, "n": )", i, "}")
                                   : absl::StrCat(R"({"n":)", i, "}"));
  }
  std::vector<Outcome> out = CallAll(calls, 30s);
  ASSERT_EQ(out.size(), 1000u);
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(out[i].status.ok()) << i << ": " << out[i].status.error_message();
    if (i % 10 == 0) {
      EXPECT_EQ(out[i].response.path(), "emulator:slow");
    } else {
      EXPECT_EQ(out[i].response.json_body(), absl::StrCat(R"({"n":)", i, "}")) << i;
    }
  }
  EXPECT_EQ(emulator_->auth_successes(), 1);
}

TEST_F(EmoggServiceTest, PerCallTokenGetsItsOwnSession) {
  Start();
  ASSERT_TRUE(Call("emulator:echo", "{}", 10s, "tenant-token").status.ok());
  std::vector<admin::v1::Session> sessions = bridge_->ListSessions();
  EXPECT_EQ(sessions.size(), 2u);
  for (const auto& s : sessions) {
    // Keyed by a hash: the token itself appears nowhere.
    EXPECT_EQ(s.id().find("tenant-token"), std::string::npos);
    EXPECT_EQ(s.id().find(kToken), std::string::npos);
  }
  Outcome refused = Call("emulator:echo", "{}", 10s, "bad-token");
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << refused.status.error_message();
  EXPECT_EQ(ErrorDetail(refused.status).reason, "TOKEN_REFUSED");
  EXPECT_EQ(refused.status.error_message().find("bad-token"), std::string::npos);
}

TEST_F(EmoggServiceTest, SubscribeStreamsEventsAndUnsubscribesWhenTheCallerLeaves) {
  Start();
  auto s = Subscribe("session_emotions_counts", "s1:1s");
  v1::Subscribed sub = ExpectSubscribed(*s);
  EXPECT_EQ(sub.channel(), "session_emotions_counts");
  EXPECT_EQ(sub.key(), "s1:1s");
  EXPECT_FALSE(sub.subscription_id().empty());
  ASSERT_TRUE(WaitFor([&] { return emulator_->subscriptions_of("session_emotions_counts", "s1:1s") == 1; }));

  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  v1::Event ev;
  ASSERT_TRUE(s->NextEvent(&ev));
  EXPECT_EQ(ev.subscription_id(), sub.subscription_id());
  EXPECT_EQ(ev.type(), "sec");
  EXPECT_FALSE(ev.upstream_subscription_id().empty());
  EXPECT_FALSE(ev.timestamp_raw().empty());
  EXPECT_GT(ev.timestamp().seconds(), 1700000000);
  EXPECT_EQ(ev.json_data().front(), '[');
  EXPECT_FALSE(ev.replayed());

  EXPECT_TRUE(s->Finish().error_code() == grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 0; }));
  EXPECT_EQ(emulator_->requests("channels:unsubscribe"), 1);
}

TEST_F(EmoggServiceTest, CallersOfOneChannelAndKeyShareOneUpstreamSubscription) {
  Start();
  auto a = Subscribe("session_emotions_counts", "s1:1s");
  v1::Subscribed sa = ExpectSubscribed(*a);
  auto b = Subscribe("session_emotions_counts", "s1:1s");
  v1::Subscribed sb = ExpectSubscribed(*b);
  auto other = Subscribe("session_emotions_counts", "s1:5s");
  v1::Subscribed so = ExpectSubscribed(*other);
  EXPECT_EQ(sa.subscription_id(), sb.subscription_id());
  EXPECT_NE(sa.subscription_id(), so.subscription_id());
  EXPECT_EQ(emulator_->subscriptions_of("session_emotions_counts", "s1:1s"), 1);
  EXPECT_EQ(emulator_->requests("channels:subscribe"), 2);

  // Fan-out: each event of the shared subscription reaches both callers.
  for (int i = 0; i < 3; ++i) emulator_->EmitNow("session_emotions_counts", "s1:1s");
  for (auto* s : {a.get(), b.get()}) {
    for (int i = 0; i < 3; ++i) {
      v1::Event ev;
      ASSERT_TRUE(s->NextEvent(&ev));
      EXPECT_EQ(ev.subscription_id(), sa.subscription_id());
      EXPECT_EQ(ev.type(), "sec");
    }
  }
  // The first leaving keeps the upstream subscription; the last one releases it.
  a->Finish();
  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  v1::Event ev;
  ASSERT_TRUE(b->NextEvent(&ev));
  EXPECT_EQ(emulator_->subscriptions_of("session_emotions_counts", "s1:1s"), 1);
  EXPECT_EQ(emulator_->requests("channels:unsubscribe"), 0);
  b->Finish();
  EXPECT_TRUE(WaitFor([&] { return emulator_->subscriptions_of("session_emotions_counts", "s1:1s") == 0; }));
  EXPECT_EQ(emulator_->requests("channels:unsubscribe"), 1);
  EXPECT_EQ(emulator_->subscriptions_of("session_emotions_counts", "s1:5s"), 1);
  other->Finish();
}

TEST_F(EmoggServiceTest, SubscriptionAcknowledgedAfterItsCallerLeftIsReleased) {
  Start(Generous(), [](EmoggBridgeOptions& o) { o.heartbeat_interval = 200ms; });
  ASSERT_TRUE(WaitFor([&] { return Ready(); }));
  emulator_->SetAnswerDelay(400ms);
  {
    auto s = Subscribe("session_emotions_counts", "s1:1s", 100ms);
    v1::SubscriptionUpdate u;
    EXPECT_FALSE(s->Next(&u));
    EXPECT_EQ(s->reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // Emogg subscribed it anyway, after the caller had gone: the bridge unsubscribes it
  // rather than let it hold one of the connection's 5 slots.
  EXPECT_TRUE(WaitFor([&] { return emulator_->requests("channels:unsubscribe") == 1; }));
  EXPECT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 0; }));
  emulator_->SetAnswerDelay(0ms);
  auto again = Subscribe("session_emotions_counts", "s1:1s");
  ExpectSubscribed(*again);
  EXPECT_EQ(emulator_->subscriptions_of("session_emotions_counts", "s1:1s"), 1);
}

TEST_F(EmoggServiceTest, LateJoinerOfWorkerStateGetsTheLastStateReplayed) {
  Start();
  auto a = Subscribe("session_worker_state", "s7");
  ExpectSubscribed(*a);
  v1::Event first;
  ASSERT_TRUE(a->NextEvent(&first));  // Emogg sends the last known state at once
  EXPECT_EQ(first.type(), "sws");
  EXPECT_FALSE(first.replayed());

  auto b = Subscribe("session_worker_state", "s7");
  ExpectSubscribed(*b);
  v1::Event replayed;
  ASSERT_TRUE(b->NextEvent(&replayed));
  EXPECT_TRUE(replayed.replayed());
  EXPECT_EQ(replayed.json_data(), first.json_data());
  EXPECT_EQ(emulator_->subscriptions_of("session_worker_state", "s7"), 1);

  emulator_->SetWorkerState("s7", "finished");
  v1::Event live_a, live_b;
  ASSERT_TRUE(a->NextEvent(&live_a));
  ASSERT_TRUE(b->NextEvent(&live_b));
  EXPECT_FALSE(live_b.replayed());
  EXPECT_NE(live_b.json_data().find("finished"), std::string::npos) << live_b.json_data();
}

TEST_F(EmoggServiceTest, UpstreamRefusalEndsTheStreamWithTheMappedCode) {
  Start();
  auto s = Subscribe("session_emotions_counts", "unknown-9:1s");
  v1::SubscriptionUpdate u;
  EXPECT_FALSE(s->Next(&u));
  grpc::Status st = s->reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND) << st.error_message();
  EXPECT_NE(st.error_message().find("not found"), std::string::npos) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).metadata["path"], "channels:subscribe");
  auto bad = Subscribe("no_such_channel", "k");
  EXPECT_FALSE(bad->Next(&u));
  EXPECT_EQ(bad->reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // The session goes on.
  EXPECT_TRUE(Call("ping").status.ok());
  EXPECT_EQ(emulator_->auth_successes(), 1);
}

TEST_F(EmoggServiceTest, SubscriptionsPerSessionAreBounded) {
  Start(Generous(), [](EmoggBridgeOptions& o) { o.max_subscriptions_per_session = 2; });
  auto a = Subscribe("session_emotions_counts", "s1:1s");
  ExpectSubscribed(*a);
  auto b = Subscribe("session_emotions_counts", "s2:1s");
  ExpectSubscribed(*b);
  auto shared = Subscribe("session_emotions_counts", "s1:1s");  // shares: not one more
  ExpectSubscribed(*shared);
  auto c = Subscribe("session_emotions_counts", "s3:1s");
  v1::SubscriptionUpdate u;
  EXPECT_FALSE(c->Next(&u));
  grpc::Status st = c->reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).reason, "TOO_MANY_SUBSCRIPTIONS");
  EXPECT_EQ(emulator_->requests("channels:subscribe"), 2);
  // A slot frees when its last caller leaves.
  b->Finish();
  auto d = Subscribe("session_emotions_counts", "s3:1s");
  ExpectSubscribed(*d);
}

TEST_F(EmoggServiceTest, MalformedFramesAndUnknownSubscriptionsAreCountedNotFatal) {
  Start();
  auto s = Subscribe("session_emotions_counts", "s1:1s");
  ExpectSubscribed(*s);
  const uint64_t malformed = Counter("wsbridge_upstream_malformed_frames_total");
  const uint64_t unrouted = Counter("wsbridge_upstream_unrouted_frames_total");
  emulator_->SendRaw("{not json");
  emulator_->SendRaw(R"(["s1", 1712675148150])");                  // too short
  emulator_->SendRaw(R"(["nobody-has-this", 1712675148150, "sec", []])");  // unknown id
  emulator_->SendRaw(R"({"id": "never-sent", "path": "x", "status": 200})");
  EXPECT_TRUE(WaitFor([&] { return Counter("wsbridge_upstream_malformed_frames_total") == malformed + 2; }));
  EXPECT_TRUE(WaitFor([&] { return Counter("wsbridge_upstream_unrouted_frames_total") == unrouted + 2; }));
  // The session and the stream go on.
  emulator_->EmitNow("session_emotions_counts", "s1:1s");
  v1::Event ev;
  ASSERT_TRUE(s->NextEvent(&ev));
  EXPECT_TRUE(Call("ping").status.ok());
  EXPECT_EQ(emulator_->auth_successes(), 1);
}

}  // namespace
}  // namespace wsbridge::emogg::testing
