// NexoraProtocol on its own: every rule with the time passed in, no sockets.
#include "tests/upstreams/nexora_protocol.h"

#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using Kind = NexoraAction::Kind;

constexpr int64_t kUnix = 1'800'000'000;

std::string Type(const NexoraAction& a) {
  if (a.kind != Kind::kSend) return a.kind == Kind::kDrop ? "<drop>" : "<close>";
  return std::string(json::parse(a.text).as_object().at("type").as_string());
}
std::string Get(const NexoraAction& a, std::string_view key) {
  const json::object o = json::parse(a.text).as_object();
  auto it = o.find(key);
  if (it == o.end()) return "<absent>";
  return it->value().is_string() ? std::string(it->value().get_string())
                                 : json::serialize(it->value());
}
std::vector<std::string> Types(const std::vector<NexoraAction>& actions) {
  std::vector<std::string> out;
  for (const auto& a : actions) out.push_back(Type(a));
  return out;
}
std::string Message(std::string_view content, std::string_view id) {
  json::object o;
  o["type"] = "message";
  o["content"] = json::string_view(content.data(), content.size());
  if (!id.empty()) o["client_message_id"] = json::string_view(id.data(), id.size());
  return json::serialize(o);
}

class NexoraProtocolTest : public ::testing::Test {
 protected:
  NexoraProtocolTest() : proto_(Options()) {}
  static NexoraProtocolOptions Options() {
    NexoraProtocolOptions o;
    o.users = {{"user@example.com", "password"}};
    o.jwt_lifetime = milliseconds(60'000);
    o.step_delay = milliseconds(10);
    return o;
  }
  // Opens `conn` on `chat` with a valid API key.
  void Open(uint64_t conn, const std::string& chat) {
    NexoraUpgrade u = proto_.OnUpgrade("/api/ws/" + chat + "?token=nxr_key", t0_);
    ASSERT_EQ(u.status, 101) << u.message;
    proto_.OnOpen(conn, u.chat_id);
  }
  std::string Login() {
    NexoraHttpAnswer a = proto_.OnHttp(
        "POST", "/api/auth/login", "", R"({"email":"user@example.com","password":"password"})",
        t0_, kUnix);
    EXPECT_EQ(a.status, 200) << a.body;
    return std::string(json::parse(a.body).as_object().at("access_token").as_string());
  }

  NexoraProtocol proto_;
  const NexoraClock::time_point t0_ = NexoraClock::time_point() + std::chrono::hours(1);
};

TEST_F(NexoraProtocolTest, UpgradeChecksPathAndApiKey) {
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_anything", t0_).status, 101);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_anything", t0_).chat_id, "c1");
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?x=1&token=nxr_k&y=2", t0_).status, 101);
  NexoraUpgrade missing = proto_.OnUpgrade("/api/ws/c1", t0_);
  EXPECT_EQ(missing.status, 401);
  EXPECT_THAT(missing.message, HasSubstr("missing"));
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=", t0_).status, 401);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_bad1", t0_).status, 401);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=eyJ.not.issued", t0_).status, 401);
  for (const char* path : {"/", "/api/ws/", "/api/ws/a/b?token=nxr_k", "/api/chats?token=nxr_k",
                           "/api/wsx?token=nxr_k"}) {
    EXPECT_EQ(proto_.OnUpgrade(path, t0_).status, 404) << path;
  }
  EXPECT_EQ(proto_.refused_upgrades(), 9);

  NexoraProtocolOptions o = Options();
  o.api_keys = {"nxr_a+b/c"};
  NexoraProtocol strict(o);
  // '+' in a query is a space, so a client must percent-encode it.
  EXPECT_EQ(strict.OnUpgrade("/api/ws/c?token=nxr_a%2Bb%2Fc", t0_).status, 101);
  EXPECT_EQ(strict.OnUpgrade("/api/ws/c?token=nxr_a%2bb/c", t0_).status, 101);
  EXPECT_EQ(strict.OnUpgrade("/api/ws/c?token=nxr_a+b%2Fc", t0_).status, 401);
  EXPECT_EQ(strict.OnUpgrade("/api/ws/c?token=nxr_other", t0_).status, 401);
}

TEST_F(NexoraProtocolTest, LoginIssuesJwtsThatExpire) {
  NexoraHttpAnswer a = proto_.OnHttp(
      "POST", "/api/auth/login", "", R"({"email":"user@example.com","password":"password"})",
      t0_, kUnix);
  ASSERT_EQ(a.status, 200) << a.body;
  const json::object body = json::parse(a.body).as_object();
  EXPECT_EQ(body.at("token_type").as_string(), "bearer");
  EXPECT_EQ(body.at("expires_in").as_int64(), 60);
  const std::string jwt(body.at("access_token").as_string());
  EXPECT_EQ(std::count(jwt.begin(), jwt.end(), '.'), 2) << jwt;
  EXPECT_EQ(jwt.find_first_of("+/="), std::string::npos) << jwt;  // base64url
  EXPECT_EQ(proto_.logins(), 1);

  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c?token=" + jwt, t0_).status, 101);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c?token=" + jwt, t0_ + milliseconds(59'999)).status, 101);
  NexoraUpgrade expired = proto_.OnUpgrade("/api/ws/c?token=" + jwt, t0_ + milliseconds(60'000));
  EXPECT_EQ(expired.status, 401);
  EXPECT_THAT(expired.message, HasSubstr("expired"));
  // A new login gives a new, valid token.
  proto_.SetJwtLifetime(milliseconds(5'000));
  NexoraHttpAnswer again = proto_.OnHttp(
      "POST", "/api/auth/login", "", R"({"email":"user@example.com","password":"password"})",
      t0_ + milliseconds(60'000), kUnix + 60);
  const std::string jwt2(json::parse(again.body).as_object().at("access_token").as_string());
  EXPECT_NE(jwt2, jwt);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c?token=" + jwt2, t0_ + milliseconds(64'999)).status, 101);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c?token=" + jwt2, t0_ + milliseconds(65'000)).status, 401);

  NexoraHttpAnswer wrong = proto_.OnHttp(
      "POST", "/api/auth/login", "", R"({"email":"user@example.com","password":"nope"})", t0_, kUnix);
  EXPECT_EQ(wrong.status, 401);
  EXPECT_THAT(wrong.body, HasSubstr("Incorrect email or password"));
  EXPECT_THAT(wrong.body, ::testing::Not(HasSubstr("nope")));
  EXPECT_EQ(proto_.OnHttp("POST", "/api/auth/login", "", R"({"email":"x"})", t0_, kUnix).status, 422);
  EXPECT_EQ(proto_.OnHttp("POST", "/api/auth/login", "", "not json", t0_, kUnix).status, 422);
  EXPECT_EQ(proto_.OnHttp("GET", "/api/auth/login", "", "", t0_, kUnix).status, 405);
  EXPECT_EQ(proto_.OnHttp("POST", "/api/other", "", "{}", t0_, kUnix).status, 404);
  EXPECT_EQ(proto_.logins(), 2);
  EXPECT_EQ(proto_.refused_logins(), 1);
}

TEST_F(NexoraProtocolTest, CreateChatNeedsABearerTokenAndAnAgent) {
  const std::string jwt = Login();
  auto create = [&](std::string auth, std::string body, milliseconds at = milliseconds(0)) {
    return proto_.OnHttp("POST", "/api/chats", auth, body, t0_ + at, kUnix);
  };
  NexoraHttpAnswer ok = create("Bearer " + jwt, R"({"agent_id":"agent-1"})");
  ASSERT_EQ(ok.status, 201) << ok.body;
  const json::object chat = json::parse(ok.body).as_object();
  EXPECT_EQ(chat.at("agent_id").as_string(), "agent-1");
  EXPECT_EQ(chat.at("id").as_string().size(), 36u);
  EXPECT_EQ(create("Bearer nxr_key", R"({"agent_id":"a"})").status, 201);
  EXPECT_EQ(create("", R"({"agent_id":"a"})").status, 401);
  EXPECT_EQ(create("Basic abc", R"({"agent_id":"a"})").status, 401);
  EXPECT_EQ(create("Bearer nxr_bad", R"({"agent_id":"a"})").status, 401);
  EXPECT_EQ(create("Bearer " + jwt, R"({"agent_id":"a"})", milliseconds(60'000)).status, 401);
  EXPECT_EQ(create("Bearer " + jwt, R"({"agent":"a"})").status, 422);
  EXPECT_EQ(create("Bearer " + jwt, R"({"agent_id":""})").status, 422);
  EXPECT_EQ(proto_.chats_created(), 2);

  NexoraProtocolOptions o = Options();
  o.agents = {"agent-1"};
  o.known_chats_only = true;
  NexoraProtocol strict(o);
  EXPECT_EQ(strict.OnHttp("POST", "/api/chats", "Bearer nxr_k", R"({"agent_id":"agent-2"})", t0_,
                          kUnix).status, 404);
  NexoraHttpAnswer made =
      strict.OnHttp("POST", "/api/chats", "Bearer nxr_k", R"({"agent_id":"agent-1"})", t0_, kUnix);
  ASSERT_EQ(made.status, 201);
  const std::string id(json::parse(made.body).as_object().at("id").as_string());
  EXPECT_EQ(strict.OnUpgrade("/api/ws/" + id + "?token=nxr_k", t0_).status, 101);
  EXPECT_EQ(strict.OnUpgrade("/api/ws/not-created?token=nxr_k", t0_).status, 404);
}

TEST_F(NexoraProtocolTest, AnswerStreamsTheScriptThenDone) {
  Open(1, "chat");
  std::vector<NexoraAction> a = proto_.OnFrame(1, Message("Is \"prod\" ok?", "m1"), t0_);
  EXPECT_EQ(Types(a), (std::vector<std::string>{"chunk", "tool_call", "tool_result",
                                                "sub_agent_start", "sub_agent_complete", "chunk",
                                                "chunk", "done"}));
  const std::string mid = Get(a[0], "message_id");
  EXPECT_EQ(mid.size(), 36u);
  EXPECT_EQ(Get(a.back(), "message_id"), mid);
  EXPECT_EQ(Get(a[5], "message_id"), mid);
  EXPECT_EQ(Get(a[1], "tool"), "github");
  EXPECT_EQ(Get(a[1], "input"), R"({"action":"list_issues","repo":"owner/repo"})");
  EXPECT_EQ(Get(a[2], "result"), R"({"issues":[]})");
  EXPECT_EQ(Get(a[3], "agent_name"), "Research Assistant");
  EXPECT_EQ(Get(a[3], "task_id"), Get(a[4], "task_id"));
  EXPECT_NE(Get(a[3], "task_id"), "{{task_id}}");
  EXPECT_EQ(Get(a[5], "content"), " You asked: Is \"prod\" ok?.");  // escaped, then parsed back
  // One step apart, all to the sender.
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].conn, 1u);
    EXPECT_EQ(a[i].delay, milliseconds(10 * static_cast<int>(i + 1)));
  }
  EXPECT_EQ(proto_.answers_started(), 1);
  EXPECT_EQ(proto_.messages_received("m1"), 1);
}

TEST_F(NexoraProtocolTest, CompletedOrInProgressMessagesAreAnsweredDuplicate) {
  Open(1, "chat");
  Open(2, "chat");
  std::vector<NexoraAction> first = proto_.OnFrame(1, Message("hi", "m1"), t0_);
  const std::string mid = Get(first[0], "message_id");
  // In progress (done is due at +80ms): duplicate at once, to the resender only.
  std::vector<NexoraAction> dup = proto_.OnFrame(2, Message("hi", "m1"), t0_ + milliseconds(30));
  ASSERT_EQ(dup.size(), 1u);
  EXPECT_EQ(Type(dup[0]), "duplicate");
  EXPECT_EQ(dup[0].conn, 2u);
  EXPECT_EQ(dup[0].delay, milliseconds(0));
  EXPECT_EQ(Get(dup[0], "client_message_id"), "m1");
  EXPECT_EQ(Get(dup[0], "message_id"), mid);
  // Completed: duplicate too.
  dup = proto_.OnFrame(1, Message("hi", "m1"), t0_ + milliseconds(500));
  ASSERT_EQ(dup.size(), 1u);
  EXPECT_EQ(Get(dup[0], "message_id"), mid);
  // Dedup is per chat; a message without an id is never deduplicated.
  Open(3, "other");
  EXPECT_EQ(proto_.OnFrame(3, Message("hi", "m1"), t0_ + milliseconds(500)).size(), 8u);
  EXPECT_EQ(proto_.OnFrame(1, Message("x", ""), t0_ + milliseconds(600)).size(), 8u);
  EXPECT_EQ(proto_.OnFrame(1, Message("x", ""), t0_ + milliseconds(700)).size(), 8u);
  EXPECT_EQ(proto_.answers_started(), 4);
  EXPECT_EQ(proto_.duplicates_sent(), 2);
  EXPECT_EQ(proto_.messages_received("m1"), 4);
  EXPECT_EQ(proto_.messages_received(""), 2);
}

TEST_F(NexoraProtocolTest, AnswerInterruptedByAClosedSocketIsAbandoned) {
  Open(1, "chat");
  std::vector<NexoraAction> first = proto_.OnFrame(1, Message("hi", "m1"), t0_);
  proto_.OnClose(1, t0_ + milliseconds(25));  // after two events
  Open(2, "chat");
  std::vector<NexoraAction> again = proto_.OnFrame(2, Message("hi", "m1"), t0_ + milliseconds(40));
  ASSERT_EQ(again.size(), 8u);  // a whole, fresh answer
  EXPECT_NE(Get(again[0], "message_id"), Get(first[0], "message_id"));
  EXPECT_EQ(again[0].delay, milliseconds(10));  // the chat is no longer busy
  EXPECT_EQ(proto_.answers_started(), 2);
}

TEST_F(NexoraProtocolTest, FinishAfterDropMakesTheResendADuplicate) {
  proto_.SetFinishAfterDrop(true);
  Open(1, "chat");
  std::vector<NexoraAction> first = proto_.OnFrame(1, Message("hi", "m1"), t0_);
  proto_.OnClose(1, t0_ + milliseconds(25));
  Open(2, "chat");
  for (int at : {40, 500}) {  // still generating, then saved
    std::vector<NexoraAction> again = proto_.OnFrame(2, Message("hi", "m1"), t0_ + milliseconds(at));
    ASSERT_EQ(again.size(), 1u);
    EXPECT_EQ(Type(again[0]), "duplicate");
    EXPECT_EQ(Get(again[0], "message_id"), Get(first[0], "message_id"));
  }
}

TEST_F(NexoraProtocolTest, DropMidAnswerFault) {
  Open(1, "chat");
  proto_.DropMidAnswer(3, 1);
  std::vector<NexoraAction> a = proto_.OnFrame(1, Message("hi", "m1"), t0_);
  EXPECT_EQ(Types(a), (std::vector<std::string>{"chunk", "tool_call", "tool_result", "<drop>"}));
  EXPECT_EQ(a.back().delay, milliseconds(40));
  // The socket closes when the drop happens; the resend is answered in full.
  proto_.OnClose(1, t0_ + milliseconds(40));
  Open(2, "chat");
  EXPECT_EQ(Types(proto_.OnFrame(2, Message("hi", "m1"), t0_ + milliseconds(41))).back(), "done");
  // The fault was for one answer only.
  EXPECT_EQ(Types(proto_.OnFrame(2, Message("next", "m2"), t0_ + milliseconds(41))).back(), "done");
  // Before the drop happened, a resend is a duplicate of the answer in progress.
  proto_.DropMidAnswer(1, -1);
  std::vector<NexoraAction> b = proto_.OnFrame(2, Message("x", "m3"), t0_ + milliseconds(1000));
  EXPECT_EQ(Type(b.back()), "<drop>");
  EXPECT_EQ(Type(proto_.OnFrame(2, Message("x", "m3"), t0_ + milliseconds(1005))[0]), "duplicate");
  proto_.ClearFaults();
  EXPECT_EQ(Type(proto_.OnFrame(2, Message("y", "m4"), t0_ + milliseconds(2000)).back()), "done");
}

TEST_F(NexoraProtocolTest, ErrorInjectionEndsTheAnswerAndIsNotSaved) {
  Open(1, "chat");
  proto_.InjectError("all_providers_exhausted", "All LLM providers failed", 2, 1);
  std::vector<NexoraAction> a = proto_.OnFrame(1, Message("hi", "m1"), t0_);
  EXPECT_EQ(Types(a), (std::vector<std::string>{"chunk", "tool_call", "error"}));
  EXPECT_EQ(Get(a.back(), "code"), "all_providers_exhausted");
  EXPECT_EQ(Get(a.back(), "message"), "All LLM providers failed");
  EXPECT_EQ(a.back().delay, milliseconds(30));
  // During the failing answer a resend is a duplicate; after the error it is answered.
  EXPECT_EQ(Type(proto_.OnFrame(1, Message("hi", "m1"), t0_ + milliseconds(10))[0]), "duplicate");
  std::vector<NexoraAction> retry = proto_.OnFrame(1, Message("hi", "m1"), t0_ + milliseconds(30));
  EXPECT_EQ(Type(retry.back()), "done");
  proto_.InjectError("all_providers_exhausted", "All LLM providers failed", 0, 1);
  EXPECT_EQ(Types(proto_.OnFrame(1, Message("z", "m9"), t0_ + milliseconds(5000))),
            (std::vector<std::string>{"error"}));
}

TEST_F(NexoraProtocolTest, AnswersOfAChatAreQueuedOtherChatsRunAtOnce) {
  Open(1, "chat");
  Open(2, "chat");
  Open(3, "other");
  std::vector<NexoraAction> a = proto_.OnFrame(1, Message("a", "a"), t0_);
  std::vector<NexoraAction> b = proto_.OnFrame(2, Message("b", "b"), t0_ + milliseconds(5));
  std::vector<NexoraAction> c = proto_.OnFrame(3, Message("c", "c"), t0_ + milliseconds(5));
  // a's done is due at t0+80; b starts then: its first event at +80+10, i.e. 85ms after b.
  EXPECT_EQ(a.back().delay, milliseconds(80));
  EXPECT_EQ(b.front().delay, milliseconds(85));
  EXPECT_EQ(b.front().conn, 2u);
  EXPECT_EQ(c.front().delay, milliseconds(10));
}

TEST_F(NexoraProtocolTest, ScriptsMayCarryUnknownEventsAndOwnDelays) {
  Open(1, "chat");
  proto_.SetScript({{R"({"type":"thinking","content":"{{content}}"})", milliseconds(0)},
                    {R"({"type":"chunk","content":"x"})", milliseconds(100)}});
  std::vector<NexoraAction> a = proto_.OnFrame(1, Message("q", "m1"), t0_);
  EXPECT_EQ(Types(a), (std::vector<std::string>{"thinking", "chunk", "done"}));
  EXPECT_EQ(a[0].text, R"({"type":"thinking","content":"q"})");
  EXPECT_EQ(Get(a[0], "message_id"), "<absent>");  // unknown events are sent as scripted
  EXPECT_EQ(a[0].delay, milliseconds(0));
  EXPECT_EQ(a[1].delay, milliseconds(100));
  EXPECT_EQ(a[2].delay, milliseconds(110));
}

TEST_F(NexoraProtocolTest, PingPongAndMalformedFrames) {
  Open(1, "chat");
  std::vector<NexoraAction> pong = proto_.OnFrame(1, R"({"type":"ping"})", t0_);
  ASSERT_EQ(pong.size(), 1u);
  EXPECT_EQ(pong[0].text, R"({"type":"pong"})");
  proto_.SetAnswerPings(false);
  EXPECT_TRUE(proto_.OnFrame(1, R"({"type":"ping"})", t0_).empty());
  EXPECT_EQ(proto_.pings(), 2);
  struct Case {
    const char* frame;
    const char* code;
  };
  for (const Case& c : {Case{"not json", "invalid_message"}, Case{"[]", "invalid_message"},
                        Case{R"({"type":5})", "invalid_message"},
                        Case{R"({"type":"message"})", "invalid_message"},
                        Case{R"({"type":"message","content":""})", "invalid_message"},
                        Case{R"({"type":"message","content":"x","client_message_id":5})",
                             "invalid_message"},
                        Case{R"({"type":"subscribe"})", "unknown_message_type"}}) {
    std::vector<NexoraAction> a = proto_.OnFrame(1, c.frame, t0_);
    ASSERT_EQ(a.size(), 1u) << c.frame;
    EXPECT_EQ(Type(a[0]), "error") << c.frame;
    EXPECT_EQ(Get(a[0], "code"), c.code) << c.frame;
  }
  EXPECT_EQ(proto_.answers_started(), 0);
  EXPECT_TRUE(proto_.OnFrame(99, R"({"type":"ping"})", t0_).empty());  // unknown socket
}

TEST_F(NexoraProtocolTest, SocketObservations) {
  Open(1, "a");
  Open(2, "a");
  Open(3, "b");
  EXPECT_EQ(proto_.open_sockets("a"), 2);
  EXPECT_EQ(proto_.open_sockets("b"), 1);
  EXPECT_EQ(proto_.open_sockets(), 3);
  EXPECT_EQ(proto_.chats_with_sockets(), 2);
  EXPECT_EQ(proto_.DropSockets("a").size(), 2u);
  EXPECT_EQ(proto_.DropSockets("").size(), 3u);
  proto_.OnClose(1, t0_);
  proto_.OnClose(1, t0_);  // twice is harmless
  EXPECT_EQ(proto_.open_sockets("a"), 1);
  std::vector<NexoraAction> b = proto_.Broadcast("b", R"({"type":"custom"})");
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b[0].conn, 3u);
}

// Fault switches of the scenario suites: refused upgrades (any status, Retry-After, a
// count), close frames with a code, a key rotation.
TEST_F(NexoraProtocolTest, RefusedUpgradesCloseCodesAndRotatedKeys) {
  proto_.RefuseUpgrades(429, "slow down", 2, 30);
  for (int i = 0; i < 2; ++i) {
    NexoraUpgrade u = proto_.OnUpgrade("/api/ws/c1?token=nxr_k", t0_);
    EXPECT_EQ(u.status, 429);
    EXPECT_EQ(u.message, "slow down");
    EXPECT_EQ(u.retry_after_s, 30);
  }
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_k", t0_).status, 101);
  EXPECT_EQ(proto_.upgrades(), 3);
  EXPECT_EQ(proto_.refused_upgrades(), 2);
  proto_.RefuseUpgrades(503, "maintenance", -1);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_k", t0_).status, 503);
  proto_.ClearFaults();
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_k", t0_).status, 101);

  Open(1, "a");
  Open(2, "b");
  std::vector<NexoraAction> closes = proto_.CloseSockets("a", 1008, "API key revoked");
  ASSERT_EQ(closes.size(), 1u);
  EXPECT_EQ(closes[0].conn, 1u);
  EXPECT_EQ(closes[0].kind, NexoraAction::Kind::kClose);
  EXPECT_EQ(closes[0].close_code, 1008);
  EXPECT_EQ(closes[0].close_reason, "API key revoked");
  EXPECT_EQ(proto_.CloseSockets("", 1001, "bye").size(), 2u);

  proto_.SetApiKeys({"nxr_new"});
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_k", t0_).status, 401);
  EXPECT_EQ(proto_.OnUpgrade("/api/ws/c1?token=nxr_new", t0_).status, 101);
}

}  // namespace
}  // namespace wsbridge::emulator
