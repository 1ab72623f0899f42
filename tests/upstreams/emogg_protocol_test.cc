// EmoggProtocol on its own: every rule of the page with time injected, no sockets.
#include "tests/upstreams/emogg_protocol.h"

#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using std::chrono::milliseconds;
using Kind = EmoggAction::Kind;

constexpr int64_t kUnix0 = 1712675148150;  // 2024-04-09T15:05:48.150Z

class EmoggProtocolTest : public ::testing::Test {
 protected:
  void Make(EmoggProtocolOptions o = {}) {
    if (o.tokens.empty()) o.tokens = {"tok"};
    proto_ = std::make_unique<EmoggProtocol>(o);
  }
  void SetUp() override { Make(); }

  EmoggTime At(int64_t ms) const {
    return EmoggTime{EmoggClock::time_point(milliseconds(1'000'000 + ms)), kUnix0 + ms};
  }
  void Open(uint64_t conn, int64_t ms = 0) { proto_->OnOpen(conn, At(ms)); }
  std::vector<EmoggAction> Frame(uint64_t conn, std::string_view text, int64_t ms = 0) {
    return proto_->OnFrame(conn, text, At(ms));
  }
  void Auth(uint64_t conn, int64_t ms = 0) {
    auto out = Frame(conn, R"({"id":1,"path":"auth:token","body":{"token":"tok"}})", ms);
    ASSERT_EQ(out.size(), 1u);
    ASSERT_EQ(Status(out[0]), 200);
  }
  static json::value Json(const EmoggAction& a) {
    EXPECT_EQ(a.kind, Kind::kSend);
    return json::parse(a.text);
  }
  static int Status(const EmoggAction& a) {
    json::value v = Json(a);
    return static_cast<int>(v.at("status").as_int64());
  }
  std::string SubscribeOk(uint64_t conn, std::string_view channel, std::string_view key,
                          int64_t ms = 0) {
    auto out = Frame(conn,
                     std::string(R"({"id":"s","path":"channels:subscribe","body":{"channel":")") +
                         std::string(channel) + R"(","key":")" + std::string(key) + R"("}})",
                     ms);
    EXPECT_GE(out.size(), 1u);
    if (out.empty()) return "";
    json::value v = Json(out[0]);
    EXPECT_EQ(v.at("status").as_int64(), 200) << out[0].text;
    return std::string(v.at("body").at("subscriptionId").as_string());
  }

  std::unique_ptr<EmoggProtocol> proto_;
};

TEST_F(EmoggProtocolTest, AuthenticatesAndEchoesTheId) {
  Open(1);
  auto out = Frame(1, R"({"id":"abc","path":"auth:token","body":{"token":"tok"}})");
  ASSERT_EQ(out.size(), 1u);
  json::value v = Json(out[0]);
  EXPECT_EQ(v.at("id").as_string(), "abc");
  EXPECT_EQ(v.at("path").as_string(), "auth:token");
  EXPECT_EQ(v.at("status").as_int64(), 200);
  EXPECT_FALSE(v.as_object().contains("error"));
  EXPECT_EQ(proto_->auth_successes(), 1);
  EXPECT_EQ(proto_->authenticated_connections(), 1);
  // Numbers stay numbers; a missing id is answered with null.
  Open(2);
  EXPECT_EQ(Json(Frame(2, R"({"id":7,"path":"auth:token","body":{"token":"tok"}})")[0]).at("id"),
            json::value(7));
  Open(3);
  EXPECT_TRUE(Json(Frame(3, R"({"path":"auth:token","body":{"token":"tok"}})")[0]).at("id").is_null());
}

TEST_F(EmoggProtocolTest, AnythingBeforeAuthTerminatesTheConnection) {
  Open(1);
  auto out = Frame(1, R"({"id":1,"path":"ping"})");
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].kind, Kind::kDrop);
  EXPECT_EQ(proto_->frames_before_auth(), 1);
  // Nothing more is read from it.
  EXPECT_TRUE(Frame(1, R"({"path":"auth:token","body":{"token":"tok"}})").empty());
  EXPECT_EQ(proto_->auth_successes(), 0);
}

TEST_F(EmoggProtocolTest, RefusedTokenAnswers401AndCloses) {
  for (const char* frame : {R"({"id":1,"path":"auth:token","body":{"token":"nope"}})",
                            R"({"id":1,"path":"auth:token","body":{}})",
                            R"({"id":1,"path":"auth:token"})"}) {
    Make();
    Open(1);
    auto out = Frame(1, frame);
    ASSERT_EQ(out.size(), 2u) << frame;
    json::value v = Json(out[0]);
    EXPECT_EQ(v.at("status").as_int64(), 401);
    EXPECT_TRUE(v.at("error").as_bool());
    EXPECT_EQ(v.at("data").at("message").as_string(), "Invalid token");
    EXPECT_EQ(out[1].kind, Kind::kClose);
    EXPECT_EQ(out[1].close_code, 1008);
    EXPECT_EQ(proto_->auth_failures(), 1);
    EXPECT_EQ(proto_->server_close_codes(), std::vector<int>{1008});
  }
  // The fault switch refuses a good token too.
  Make();
  proto_->SetRefuseAuth(true);
  Open(1);
  EXPECT_EQ(Status(Frame(1, R"({"path":"auth:token","body":{"token":"tok"}})")[0]), 401);
}

TEST_F(EmoggProtocolTest, MalformedMessagesAnswer405AndClose) {
  struct Case {
    const char* frame;
    bool id_echoed;
  };
  const Case cases[] = {
      {"not json", false},
      {R"(["path","ping"])", false},
      {R"({"id":1})", true},
      {R"({"id":1,"path":""})", true},
      {R"({"id":1,"path":7})", true},
      {R"({"id":"0123456789012345678901234567890123456","path":"ping"})", false},
      {R"({"id":true,"path":"ping"})", false},
      {R"({"id":1,"path":"ping","body":[1]})", true},
      {R"({"id":1,"path":"ping","body":"x"})", true},
  };
  for (const Case& c : cases) {
    Make();
    Open(1);
    Auth(1);
    auto out = Frame(1, c.frame);
    ASSERT_EQ(out.size(), 2u) << c.frame;
    json::value v = Json(out[0]);
    EXPECT_EQ(v.at("status").as_int64(), 405) << c.frame;
    EXPECT_TRUE(v.at("error").as_bool());
    EXPECT_EQ(v.at("id").is_null(), !c.id_echoed) << c.frame;
    EXPECT_EQ(out[1].kind, Kind::kClose);
    EXPECT_EQ(out[1].close_code, 1008);
  }
  // Malformed before auth is a 405 too (the structure is checked first).
  Make();
  Open(1);
  EXPECT_EQ(Status(Frame(1, "{")[0]), 405);
  EXPECT_EQ(proto_->frames_before_auth(), 0);
  // A null id is no id; unknown members are ignored.
  Make();
  Open(1);
  Auth(1);
  auto ok = Frame(1, R"({"id":null,"path":"ping","extra":[1]})");
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_EQ(Status(ok[0]), 200);
}

TEST_F(EmoggProtocolTest, ServesDeterministicPaths) {
  Open(1);
  Auth(1);
  json::value ping = Json(Frame(1, R"({"id":"p","path":"ping"})")[0]);
  EXPECT_EQ(ping.at("body").at("ts").as_string(), "2024-04-09T15:05:48.150Z");

  json::value got = Json(Frame(1, R"({"id":2,"path":"sessions:get","body":{"sessionId":"s1"}})")[0]);
  EXPECT_EQ(got.at("status").as_int64(), 200);
  EXPECT_EQ(got.at("body").at("id").as_string(), "s1");

  auto missing = Frame(1, R"({"id":3,"path":"sessions:get","body":{}})");
  ASSERT_EQ(missing.size(), 1u);  // 400 does not close
  EXPECT_EQ(Status(missing[0]), 400);
  auto unknown = Frame(1, R"({"id":4,"path":"sessions:get","body":{"sessionId":"unknown-1"}})");
  ASSERT_EQ(unknown.size(), 1u);
  EXPECT_EQ(Status(unknown[0]), 404);
  auto fail = Frame(1, R"({"id":5,"path":"emulator:fail"})");
  ASSERT_EQ(fail.size(), 1u);  // 500 does not close
  EXPECT_EQ(Status(fail[0]), 500);
  auto nowhere = Frame(1, R"({"id":6,"path":"no:such"})");
  ASSERT_EQ(nowhere.size(), 1u);
  EXPECT_EQ(Status(nowhere[0]), 404);
  EXPECT_EQ(Json(nowhere[0]).at("data").at("message").as_string(), "Path not found");

  json::value echo = Json(Frame(1, R"({"id":"e","path":"emulator:echo","body":{"n":[1,2]}})")[0]);
  EXPECT_EQ(echo.at("body"), json::parse(R"({"n":[1,2]})"));
  EXPECT_EQ(proto_->requests("sessions:get"), 3);
  EXPECT_EQ(proto_->answers_with_status(404), 2);
  EXPECT_TRUE(proto_->server_close_codes().empty());
}

TEST_F(EmoggProtocolTest, StatusPathAnswersAnyErrorAndClosesOnTheClosingOnes) {
  Open(1);
  Auth(1);
  auto conflict = Frame(1, R"({"id":1,"path":"emulator:status","body":{"status":409,"message":"m"}})");
  ASSERT_EQ(conflict.size(), 1u);  // 409 does not close
  EXPECT_EQ(Status(conflict[0]), 409);
  EXPECT_EQ(Json(conflict[0]).at("data").at("message").as_string(), "m");
  auto refused = Frame(1, R"({"id":2,"path":"emulator:status","body":{"status":401}})");
  ASSERT_EQ(refused.size(), 2u);
  EXPECT_EQ(Status(refused[0]), 401);
  EXPECT_EQ(refused[1].kind, Kind::kClose);
  EXPECT_EQ(refused[1].close_code, 1008);
}

TEST_F(EmoggProtocolTest, SlowAnswersAreReleasedByAdvance) {
  Open(1);
  Auth(1);
  EXPECT_TRUE(Frame(1, R"({"id":"slow","path":"emulator:slow","body":{"ms":500}})", 10).empty());
  ASSERT_TRUE(proto_->NextWakeup().has_value());
  EXPECT_EQ(*proto_->NextWakeup(), At(510).mono);
  EXPECT_TRUE(proto_->Advance(At(509)).empty());
  auto out = proto_->Advance(At(510));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(Json(out[0]).at("id").as_string(), "slow");
  // The answer delay switch holds ordinary answers back, in order.
  proto_->SetAnswerDelay(milliseconds(100));
  EXPECT_TRUE(Frame(1, R"({"id":"a","path":"ping"})", 600).empty());
  EXPECT_TRUE(Frame(1, R"({"id":"b","path":"ping"})", 600).empty());
  auto both = proto_->Advance(At(700));
  ASSERT_EQ(both.size(), 2u);
  EXPECT_EQ(Json(both[0]).at("id").as_string(), "a");
  EXPECT_EQ(Json(both[1]).at("id").as_string(), "b");
}

TEST_F(EmoggProtocolTest, RateLimitIsPerUserAcrossConnections) {
  EmoggProtocolOptions o;
  o.max_messages = 4;
  o.rate_window = milliseconds(1000);
  Make(o);
  Open(1);
  Open(2);
  Auth(1, 0);  // 1
  Auth(2, 0);  // 2
  EXPECT_EQ(Status(Frame(1, R"({"path":"ping"})", 10)[0]), 200);  // 3
  EXPECT_EQ(Status(Frame(2, R"({"path":"ping"})", 20)[0]), 200);  // 4
  auto out = Frame(2, R"({"id":9,"path":"ping"})", 30);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(Status(out[0]), 429);
  EXPECT_EQ(out[1].kind, Kind::kClose);
  EXPECT_EQ(out[1].close_code, 1008);
  // The sends at 0 leave the window at 1000 (the refused one did not count).
  EXPECT_EQ(Status(Frame(1, R"({"path":"ping"})", 999)[0]), 429);
  Make(o);
  Open(1);
  Auth(1, 0);
  for (int i = 1; i < 4; ++i) EXPECT_EQ(Status(Frame(1, R"({"path":"ping"})", i)[0]), 200);
  EXPECT_EQ(Status(Frame(1, R"({"path":"ping"})", 1000)[0]), 200);
  EXPECT_EQ(proto_->answers_with_status(429), 0);
}

TEST_F(EmoggProtocolTest, SubscriptionsEmitUntilUnsubscribed) {
  EmoggProtocolOptions o;
  o.event_interval = milliseconds(100);
  Make(o);
  Open(1);
  Auth(1);
  std::string sub = SubscribeOk(1, "session_emotions_counts", "66151895e00a857bd76f889d:10s");
  EXPECT_GE(sub.size(), 8u);
  EXPECT_EQ(proto_->active_subscriptions(), 1);
  EXPECT_EQ(proto_->subscriptions_of("session_emotions_counts", "66151895e00a857bd76f889d:10s"), 1);
  EXPECT_TRUE(proto_->Advance(At(99)).empty());
  auto ev = proto_->Advance(At(100));
  ASSERT_EQ(ev.size(), 1u);
  json::value e = Json(ev[0]);
  ASSERT_TRUE(e.is_array());
  ASSERT_EQ(e.as_array().size(), 4u);
  EXPECT_EQ(e.at(0).as_string(), sub);
  EXPECT_EQ(e.at(1).as_int64(), kUnix0 + 100);
  EXPECT_EQ(e.at(2).as_string(), "sec");
  EXPECT_TRUE(e.at(3).is_array());
  EXPECT_EQ(e.at(3).at(0).at("seq").as_int64(), 1);
  // A late tick emits once, not a burst.
  EXPECT_EQ(proto_->Advance(At(450)).size(), 1u);
  // EmitNow emits at once.
  EXPECT_EQ(proto_->EmitNow("session_emotions_counts", "", At(460)).size(), 1u);
  EXPECT_EQ(proto_->events_sent(), 3);

  auto bad = Frame(1, R"({"id":"u","path":"channels:unsubscribe","body":{"subscriptionId":"zzz"}})");
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(Status(bad[0]), 404);
  EXPECT_EQ(Json(bad[0]).at("data").at("message").as_string(), "Subscription not found");
  auto ok = Frame(1, R"({"id":"u","path":"channels:unsubscribe","body":{"subscriptionId":")" + sub + "\"}}");
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_EQ(Status(ok[0]), 200);
  EXPECT_EQ(Json(ok[0]).at("body"), json::object());
  EXPECT_EQ(proto_->active_subscriptions(), 0);
  EXPECT_TRUE(proto_->Advance(At(2000)).empty());
}

TEST_F(EmoggProtocolTest, SubscribeChecksChannelKeyAndLimits) {
  Open(1);
  Auth(1);
  auto status_of = [&](const std::string& body) {
    auto out = Frame(1, R"({"id":"s","path":"channels:subscribe","body":)" + body + "}");
    return out.empty() ? 0 : Status(out[0]);
  };
  EXPECT_EQ(status_of(R"({"channel":"session_emotions_counts"})"), 400);
  EXPECT_EQ(status_of(R"({"channel":"nope","key":"a:1s"})"), 400);
  EXPECT_EQ(status_of(R"({"channel":"session_emotions_counts","key":"abc"})"), 400);
  EXPECT_EQ(status_of(R"({"channel":"session_emotions_counts","key":"abc:2s"})"), 400);
  EXPECT_EQ(status_of(R"({"channel":"session_emotions_counts","key":"unknown-s:1s"})"), 404);
  EXPECT_EQ(status_of(R"({"channel":"session_worker_state","key":"a:1s"})"), 400);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(status_of(R"({"channel":"session_emotions_intensities","key":"s:1m"})"), 200) << i;
  }
  EXPECT_EQ(status_of(R"({"channel":"session_emotions_intensities","key":"s:1m"})"), 400);
  EXPECT_TRUE(proto_->server_close_codes().empty());
  // Ten per user across connections.
  Open(2);
  Auth(2);
  for (int i = 0; i < 5; ++i) SubscribeOk(2, "session_emotions_counts", "t:5s");
  Open(3);
  Auth(3);
  auto out = Frame(3, R"({"id":"s","path":"channels:subscribe","body":{"channel":"session_emotions_counts","key":"t:5s"}})");
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(Status(out[0]), 400);
  EXPECT_EQ(proto_->active_subscriptions(), 10);
  proto_->OnClose(1);
  EXPECT_EQ(proto_->active_subscriptions(), 5);
  SubscribeOk(3, "session_emotions_counts", "t:5s");
}

TEST_F(EmoggProtocolTest, WorkerStateIsSentOnSubscribeAndOnChange) {
  Open(1);
  Auth(1);
  auto out = Frame(1, R"({"id":"w","path":"channels:subscribe","body":{"channel":"session_worker_state","key":"s9"}})");
  ASSERT_EQ(out.size(), 2u);
  std::string sub(Json(out[0]).at("body").at("subscriptionId").as_string());
  json::value first = Json(out[1]);
  EXPECT_EQ(first.at(0).as_string(), sub);
  EXPECT_EQ(first.at(2).as_string(), "sws");
  EXPECT_EQ(first.at(3), json::parse(R"(["working"])"));
  auto change = proto_->SetWorkerState("s9", "finished", At(5));
  ASSERT_EQ(change.size(), 1u);
  EXPECT_EQ(Json(change[0]).at(3), json::parse(R"(["finished"])"));
  EXPECT_TRUE(proto_->SetWorkerState("other", "x", At(6)).empty());
  // No periodic events on this channel.
  EXPECT_TRUE(proto_->Advance(At(60000)).empty());
}

TEST_F(EmoggProtocolTest, IsoTimestampsWhenAsked) {
  EmoggProtocolOptions o;
  o.iso_timestamps = true;
  Make(o);
  Open(1);
  Auth(1);
  SubscribeOk(1, "session_emotions_counts", "s:1s");
  auto ev = proto_->Advance(At(1000));
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(Json(ev[0]).at(1).as_string(), "2024-04-09T15:05:49.150Z");
}

TEST_F(EmoggProtocolTest, IdleConnectionsCloseAndAnswersKeepThemOpen) {
  EmoggProtocolOptions o;
  o.idle_timeout = milliseconds(1000);
  Make(o);
  Open(1);
  Auth(1, 0);
  EXPECT_EQ(*proto_->NextWakeup(), At(1000).mono);
  Frame(1, R"({"path":"ping"})", 900);  // the answer restarts the timer
  EXPECT_TRUE(proto_->Advance(At(1500)).empty());
  auto out = proto_->Advance(At(1900));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].kind, Kind::kClose);
  EXPECT_EQ(out[0].close_code, 1000);
  EXPECT_EQ(out[0].close_reason, "Idle timeout");
  // Events keep a connection open too.
  Make(o);
  proto_->SetEventInterval(milliseconds(400));
  Open(1);
  Auth(1, 0);
  SubscribeOk(1, "session_emotions_counts", "s:1s", 0);
  for (int64_t t = 400; t <= 4000; t += 400) {
    auto ev = proto_->Advance(At(t));
    ASSERT_EQ(ev.size(), 1u) << t;
    EXPECT_EQ(ev[0].kind, Kind::kSend) << t;
  }
}

TEST_F(EmoggProtocolTest, UnauthenticatedConnectionsAreDroppedAfterTheAuthTimeout) {
  EmoggProtocolOptions o;
  o.auth_timeout = milliseconds(300);
  Make(o);
  Open(1, 0);
  EXPECT_TRUE(proto_->Advance(At(299)).empty());
  auto out = proto_->Advance(At(300));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].kind, Kind::kDrop);
}

TEST_F(EmoggProtocolTest, FaultSwitches) {
  Open(1);
  Open(2);
  Auth(1);
  // SendRaw reaches authenticated connections only.
  auto raw = proto_->SendRaw(R"(["nobody",1,"sec",[]])", At(1));
  ASSERT_EQ(raw.size(), 1u);
  EXPECT_EQ(raw[0].conn, 1u);
  // Silent: nothing answered, no timers.
  proto_->SetSilent(true);
  EXPECT_TRUE(Frame(1, R"({"path":"ping"})").empty());
  EXPECT_FALSE(proto_->NextWakeup().has_value());
  proto_->SetSilent(false);
  EXPECT_EQ(Frame(1, R"({"path":"ping"})").size(), 1u);
  // Drop on the n-th frame (every frame counts, auth included).
  proto_->SetDropAfterFrames(3);
  auto dropped = Frame(1, R"({"path":"ping"})");
  ASSERT_EQ(dropped.size(), 1u);
  EXPECT_EQ(dropped[0].kind, Kind::kDrop);
  proto_->SetDropAfterFrames(-1);
  auto all = proto_->DropAll();
  ASSERT_EQ(all.size(), 1u);  // connection 1 is already going
  EXPECT_EQ(all[0].conn, 2u);
}

TEST_F(EmoggProtocolTest, CloseCodesOnDemand) {
  Open(1);
  Open(2);
  Auth(1);
  // Every open connection, authenticated or not, gets the close frame asked for.
  auto closed = proto_->CloseAll(1011, "Internal error");
  ASSERT_EQ(closed.size(), 2u);
  for (const EmoggAction& a : closed) {
    EXPECT_EQ(a.kind, Kind::kClose);
    EXPECT_EQ(a.close_code, 1011);
    EXPECT_EQ(a.close_reason, "Internal error");
  }
  EXPECT_TRUE(Frame(1, R"({"path":"ping"})").empty());  // closing: nothing more
  // Close after every accepted auth: answered 200 first, then the close.
  proto_->SetCloseAfterAuth(1001, "Going away");
  Open(3);
  auto out = Frame(3, R"({"id":1,"path":"auth:token","body":{"token":"tok"}})");
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(Status(out[0]), 200);
  EXPECT_EQ(out[1].kind, Kind::kClose);
  EXPECT_EQ(out[1].close_code, 1001);
  proto_->SetCloseAfterAuth(0, "");
  Open(4);
  EXPECT_EQ(Frame(4, R"({"id":1,"path":"auth:token","body":{"token":"tok"}})").size(), 1u);
  EXPECT_EQ(proto_->server_close_codes(), (std::vector<int>{1011, 1011, 1001}));
}

TEST_F(EmoggProtocolTest, RevokedTokenIsToldAndRefused) {
  EmoggProtocolOptions o;
  o.tokens = {"tok", "other"};
  Make(o);
  Open(1);
  Open(2);
  Auth(1);
  Frame(2, R"({"id":1,"path":"auth:token","body":{"token":"other"}})");
  // The connection using the revoked token is told at once (401, then close 1008); the
  // other one is left alone.
  auto told = proto_->RevokeToken("tok", At(1));
  ASSERT_EQ(told.size(), 2u);
  EXPECT_EQ(told[0].conn, 1u);
  json::value v = Json(told[0]);
  EXPECT_EQ(v.at("status").as_int64(), 401);
  EXPECT_TRUE(v.at("id").is_null());
  EXPECT_EQ(v.at("path").as_string(), "auth:token");
  EXPECT_EQ(v.at("data").at("message").as_string(), "Token revoked");
  EXPECT_EQ(told[1].kind, Kind::kClose);
  EXPECT_EQ(told[1].close_code, 1008);
  EXPECT_EQ(told[1].close_reason, "Unauthorized");
  EXPECT_EQ(Status(Frame(2, R"({"path":"ping"})")[0]), 200);
  // From now on the token is refused.
  Open(3);
  auto refused = Frame(3, R"({"id":1,"path":"auth:token","body":{"token":"tok"}})");
  ASSERT_GE(refused.size(), 1u);
  EXPECT_EQ(Status(refused[0]), 401);
  EXPECT_EQ(proto_->auth_failures(), 1);
}

}  // namespace
}  // namespace wsbridge::emulator
