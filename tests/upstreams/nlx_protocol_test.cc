// NlxProtocol on its own: upgrade checks, conversation ids, acks, turns, answers,
// pushes, faults and observations, with an injected clock.
#include "tests/upstreams/nlx_protocol.h"

#include <string>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kKeys =
    "apiKey=nlx-emulator-api-key&deploymentKey=nlx-emulator-deployment"
    "&channelKey=nlx-emulator-channel-en-US";

std::string Target(const std::string& extra = "") {
  return "/?" + kKeys + (extra.empty() ? "" : "&" + extra);
}

json::object Obj(const std::string& text) { return json::parse(text).as_object(); }

std::string TextTurn(const std::string& text) {
  json::object o;
  o["request"].emplace_object()["unstructured"].emplace_object()["text"] = text;
  return json::serialize(o);
}

class NlxProtocolTest : public ::testing::Test {
 protected:
  NlxProtocolTest() : proto_(NlxProtocolOptions{}) {}

  // Opens `conn` on `target` and returns the conversation id its ack names.
  std::string Open(uint64_t conn, const std::string& target = Target()) {
    EXPECT_EQ(proto_.CheckUpgrade(target).http_status, 101);
    std::vector<NlxAction> acts = proto_.OnOpen(conn, target, now_);
    EXPECT_EQ(acts.size(), 1u);
    if (acts.empty()) return "";
    EXPECT_EQ(acts[0].conn, conn);
    EXPECT_EQ(acts[0].kind, NlxAction::Kind::kSend);
    json::object ack = Obj(acts[0].text);
    EXPECT_EQ(ack.size(), 1u) << acts[0].text;
    return std::string(ack.at("conversationId").as_string());
  }

  // Sends one frame and returns the single answer's JSON.
  json::object Answer(uint64_t conn, const std::string& frame) {
    std::vector<NlxAction> acts = proto_.OnFrame(conn, frame, false, now_);
    EXPECT_EQ(acts.size(), 1u) << frame;
    if (acts.size() != 1) return {};
    EXPECT_EQ(acts[0].conn, conn);
    EXPECT_EQ(acts[0].kind, NlxAction::Kind::kSend);
    return Obj(acts[0].text);
  }

  NlxProtocol proto_;
  NlxClock::time_point now_ = NlxClock::time_point() + std::chrono::hours(1);
};

TEST_F(NlxProtocolTest, AcceptsTheThreeKeysAndIgnoresOtherParameters) {
  EXPECT_EQ(proto_.CheckUpgrade(Target()).http_status, 101);
  EXPECT_EQ(proto_.CheckUpgrade("/ws/path?" + kKeys + "&languageCode=en-US").http_status, 101);
  // Percent-encoded values decode to the same keys.
  EXPECT_EQ(proto_.CheckUpgrade("/?apiKey=nlx%2Demulator%2Dapi%2Dkey&deploymentKey="
                                "nlx-emulator-deployment&channelKey=nlx-emulator-channel-en-US")
                .http_status,
            101);
  // The last of a repeated parameter counts.
  EXPECT_EQ(proto_.CheckUpgrade("/?apiKey=wrong&" + kKeys).http_status, 101);
  EXPECT_EQ(proto_.handshakes(), 4);
  EXPECT_EQ(proto_.refused_handshakes(), 0);
}

TEST_F(NlxProtocolTest, MissingOrWrongKeysAre401NamingTheKeyNotItsValue) {
  struct Case {
    std::string target;
    std::string want;
  };
  const Case cases[] = {
      {"/", "apiKey is missing"},
      {"/?deploymentKey=nlx-emulator-deployment&channelKey=nlx-emulator-channel-en-US",
       "apiKey is missing"},
      {"/?apiKey=&deploymentKey=x&channelKey=y", "apiKey is missing"},
      {"/?apiKey=nlx-emulator-api-key&channelKey=nlx-emulator-channel-en-US",
       "deploymentKey is missing"},
      {"/?apiKey=nlx-emulator-api-key&deploymentKey=nlx-emulator-deployment",
       "channelKey is missing"},
      {"/?apiKey=guess-me&deploymentKey=nlx-emulator-deployment&channelKey=nlx-emulator-channel-en-US",
       "apiKey is not valid"},
      {"/?apiKey=nlx-emulator-api-key&deploymentKey=guess-me&channelKey=nlx-emulator-channel-en-US",
       "deploymentKey is not valid"},
      // Without the language suffix.
      {"/?apiKey=nlx-emulator-api-key&deploymentKey=nlx-emulator-deployment&channelKey=nlx-emulator-channel",
       "channelKey is not valid (it carries the language suffix"},
  };
  for (const Case& c : cases) {
    NlxUpgrade u = proto_.CheckUpgrade(c.target);
    EXPECT_EQ(u.http_status, 401) << c.target;
    EXPECT_THAT(u.body, HasSubstr(c.want)) << c.target;
    EXPECT_THAT(u.body, Not(HasSubstr("guess-me")));
    EXPECT_TRUE(Obj(u.body).contains("message"));
  }
  EXPECT_EQ(proto_.refused_handshakes(), static_cast<int>(std::size(cases)));
  EXPECT_EQ(proto_.CheckUpgrade("/?apiKey=%zz").http_status, 400);
  EXPECT_EQ(proto_.CheckUpgrade("/?apiKey=%4").http_status, 400);
  EXPECT_EQ(proto_.CheckUpgrade(Target("conversationId=a%20b")).http_status, 400);
  EXPECT_EQ(proto_.CheckUpgrade(Target("conversationId=" + std::string(129, 'c'))).http_status,
            400);
}

TEST_F(NlxProtocolTest, RefuseSwitchAnswersTheChosenStatus) {
  proto_.SetRefuseUpgrades(503);
  EXPECT_EQ(proto_.CheckUpgrade(Target()).http_status, 503);
  proto_.SetRefuseUpgrades(429);
  NlxUpgrade u = proto_.CheckUpgrade(Target());
  EXPECT_EQ(u.http_status, 429);
  EXPECT_THAT(u.body, HasSubstr("Too Many Requests"));
  proto_.SetRefuseUpgrades(0);
  EXPECT_EQ(proto_.CheckUpgrade(Target()).http_status, 101);
  EXPECT_EQ(proto_.refused_handshakes(), 2);
}

TEST_F(NlxProtocolTest, IssuesNewIdsAndResumesKnownOnes) {
  std::string a = Open(1);
  std::string b = Open(2);
  EXPECT_NE(a, b);
  EXPECT_EQ(a.size(), 36u);  // UUID-shaped
  EXPECT_EQ(proto_.conversations(), 2);
  Answer(1, TextTurn("hello"));
  proto_.OnClose(1);
  EXPECT_EQ(proto_.connections_for(a), 0);
  EXPECT_TRUE(proto_.knows(a));  // conversations outlive their sockets
  // Resuming continues the turn count.
  EXPECT_EQ(Open(3, Target("conversationId=" + a)), a);
  json::object r = Answer(3, TextTurn("again"));
  EXPECT_EQ(r.at("emulator").at("turn"), 2);
  EXPECT_EQ(r.at("messages").at(0).at("text"), "Turn 2: you said \"again\"");
  EXPECT_EQ(proto_.turns_received(a), 2);
  EXPECT_EQ(proto_.conversations(), 2);
  EXPECT_EQ(proto_.conversation_ids(), (std::vector<std::string>{a, b}));
}

TEST_F(NlxProtocolTest, UnknownIdStartsANewConversationUnderThatId) {
  EXPECT_FALSE(proto_.knows("client-made-id"));
  EXPECT_EQ(Open(1, Target("conversationId=client-made-id")), "client-made-id");
  EXPECT_TRUE(proto_.knows("client-made-id"));
  EXPECT_EQ(Answer(1, TextTurn("hi")).at("emulator").at("turn"), 1);
}

TEST_F(NlxProtocolTest, AckDelayAndWithholdAndFramesBeforeTheAck) {
  proto_.SetAckDelay(milliseconds(250));
  ASSERT_EQ(proto_.CheckUpgrade(Target()).http_status, 101);
  std::vector<NlxAction> acts = proto_.OnOpen(1, Target(), now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(acts[0].delay, milliseconds(250));
  // A turn 100 ms later came before the ack was due: answered, but counted.
  proto_.OnFrame(1, TextTurn("early"), false, now_ + milliseconds(100));
  EXPECT_EQ(proto_.frames_before_ack(), 1);
  proto_.OnFrame(1, TextTurn("late"), false, now_ + milliseconds(250));
  EXPECT_EQ(proto_.frames_before_ack(), 1);

  proto_.SetWithholdAck(true);
  EXPECT_TRUE(proto_.OnOpen(2, Target(), now_).empty());
  proto_.OnFrame(2, TextTurn("never acked"), false, now_ + std::chrono::hours(5));
  EXPECT_EQ(proto_.frames_before_ack(), 2);
  EXPECT_EQ(proto_.open_connections(), 2);
}

TEST_F(NlxProtocolTest, AnswersTextTurnsDeterministically) {
  std::string id = Open(1);
  json::object turn = Obj(TextTurn("Book a flight to London"));
  turn["userId"] = "user-1";
  turn["languageCode"] = "en-US";
  turn["conversationId"] = id;
  turn["context"] = json::parse(R"({"tier":"gold","n":3})");
  json::object r = Answer(1, json::serialize(turn));
  EXPECT_EQ(r.at("conversationId"), json::value(id));
  ASSERT_EQ(r.at("messages").as_array().size(), 1u);
  const json::object& m = r.at("messages").at(0).as_object();
  EXPECT_EQ(m.at("text"), "Turn 1: you said \"Book a flight to London\"");
  EXPECT_EQ(m.at("type"), "text");
  EXPECT_EQ(m.at("messageId").as_string().size(), 36u);
  EXPECT_EQ(r.at("metadata").at("intentId"), "NLX.Fallback");
  EXPECT_EQ(r.at("expirationTimestamp"), 1767225600000 + 60000);
  EXPECT_EQ(r.at("emulator").at("userId"), "user-1");
  EXPECT_EQ(r.at("emulator").at("languageCode"), "en-US");
  EXPECT_EQ(json::serialize(r.at("emulator").at("context")), R"({"tier":"gold","n":3})");
  EXPECT_EQ(proto_.turns(id).at(0).json, json::serialize(turn));
  EXPECT_EQ(proto_.turns(id).at(0).number, 1);

  // The same conversation, turn and index always get the same message id.
  NlxProtocol other(NlxProtocolOptions{.id_seed = 99});
  other.CheckUpgrade(Target("conversationId=" + id));
  other.OnOpen(7, Target("conversationId=" + id), now_);
  std::vector<NlxAction> acts = other.OnFrame(7, TextTurn("different words"), false, now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(Obj(acts[0].text).at("messages").at(0).at("messageId"), m.at("messageId"));
}

TEST_F(NlxProtocolTest, CommandWordsPickTheAnswerShape) {
  Open(1);
  json::object r = Answer(1, TextTurn("Choices please"));
  const json::object& m = r.at("messages").at(0).as_object();
  EXPECT_EQ(m.at("nodeId"), "node-class");
  ASSERT_EQ(m.at("choices").as_array().size(), 2u);
  EXPECT_EQ(m.at("choices").at(0).at("choiceId"), "choice-economy");
  EXPECT_EQ(m.at("choices").at(1).at("choicePayload").at("fare"), "J");
  EXPECT_EQ(r.at("metadata").at("intentId"), "BookFlight");

  r = Answer(1, TextTurn("multi part"));
  ASSERT_EQ(r.at("messages").as_array().size(), 3u);
  EXPECT_EQ(r.at("messages").at(2).at("text"), "Part 3 of 3: multi part");
  EXPECT_NE(r.at("messages").at(0).at("messageId"), r.at("messages").at(1).at("messageId"));

  r = Answer(1, TextTurn("extra"));
  EXPECT_TRUE(r.contains("emulatorExtra"));
  EXPECT_TRUE(r.contains("modalities"));
  EXPECT_EQ(r.at("payload"), "card-payload");
  EXPECT_TRUE(r.at("messages").at(0).as_object().contains("rich"));
  EXPECT_EQ(r.at("messages").at(0).at("choices").at(0).at("choiceStyle"), "primary");

  r = Answer(1, TextTurn("escalate now"));
  EXPECT_EQ(r.at("metadata").at("escalation"), true);
  r = Answer(1, TextTurn("pending"));
  EXPECT_EQ(r.at("metadata").at("hasPendingDataRequest"), true);

  r = Answer(1, TextTurn("error"));
  EXPECT_EQ(r.at("message"), "Internal server error");
  EXPECT_TRUE(r.contains("connectionId"));
  EXPECT_TRUE(r.contains("requestId"));
  EXPECT_FALSE(r.contains("messages"));

  EXPECT_TRUE(proto_.OnFrame(1, TextTurn("silent"), false, now_).empty());
  EXPECT_EQ(proto_.total_turns(), 7);
}

TEST_F(NlxProtocolTest, AnswersStructuredTurns) {
  Open(1);
  json::object r = Answer(
      1, R"({"request":{"structured":{"choiceId":"choice-economy","intentId":"BookFlight",)"
         R"("slots":[{"slotId":"City","value":"London"},{"slotId":"Seats","value":2}],"poll":true}}})");
  EXPECT_EQ(r.at("messages").at(0).at("text"),
            "You chose choice-economy. Started flow BookFlight. Slots: City=\"London\", Seats=2. "
            "Nothing pending.");
  r = Answer(1, R"({"request":{"structured":{"flowId":"Greet"}}})");
  EXPECT_EQ(r.at("messages").at(0).at("text"), "Started flow Greet.");
  r = Answer(1, R"({"request":{"structured":{"somethingNew":1}}})");
  EXPECT_EQ(r.at("messages").at(0).at("text"), "Nothing to do.");
}

TEST_F(NlxProtocolTest, InvalidFramesGetApiGatewayErrorsAndAreNotTurns) {
  std::string id = Open(1);
  const std::pair<std::string, std::string> cases[] = {
      {"not json", "not valid JSON"},
      {"[1]", "expected a JSON object"},
      {"{}", "request is required"},
      {R"({"request":{}})", "request.unstructured or request.structured is required"},
      {R"({"request":{"unstructured":{"text":""}}})", "non-empty string"},
      {R"({"request":{"unstructured":{"text":5}}})", "non-empty string"},
      {R"({"request":{"structured":[]}})", "request.structured must be an object"},
      {R"({"request":{"unstructured":{"text":"x"}},"conversationId":"other"})",
       "conversationId is not this connection's conversation"},
  };
  for (const auto& [frame, want] : cases) {
    json::object r = Answer(1, frame);
    EXPECT_THAT(std::string(r.at("message").as_string()), HasSubstr("Invalid request body"));
    EXPECT_THAT(std::string(r.at("message").as_string()), HasSubstr(want)) << frame;
  }
  std::vector<NlxAction> acts = proto_.OnFrame(1, TextTurn("hi"), /*binary=*/true, now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_THAT(acts[0].text, HasSubstr("text frame"));
  EXPECT_EQ(proto_.invalid_frames(), static_cast<int>(std::size(cases)) + 1);
  EXPECT_EQ(proto_.turns_received(id), 0);
  // A conversationId that matches is fine.
  EXPECT_TRUE(Answer(1, R"({"request":{"unstructured":{"text":"x"}},"conversationId":")" + id +
                            "\"}")
                  .contains("messages"));
}

TEST_F(NlxProtocolTest, DropNextTurnsCountsTheTurnThenDrops) {
  std::string id = Open(1);
  proto_.DropNextTurns(1);
  std::vector<NlxAction> acts = proto_.OnFrame(1, TextTurn("lost"), false, now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(acts[0].kind, NlxAction::Kind::kDrop);
  EXPECT_EQ(proto_.turns_received(id), 1);
  // One-shot: the next turn is answered.
  EXPECT_EQ(Answer(1, TextTurn("next")).at("emulator").at("turn"), 2);
}

TEST_F(NlxProtocolTest, AnswerDelayAppliesToAnswersNotAcks) {
  proto_.SetAnswerDelay(milliseconds(40));
  ASSERT_EQ(proto_.CheckUpgrade(Target()).http_status, 101);
  std::vector<NlxAction> acts = proto_.OnOpen(1, Target(), now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(acts[0].delay, milliseconds(0));
  acts = proto_.OnFrame(1, TextTurn("x"), false, now_);
  ASSERT_EQ(acts.size(), 1u);
  EXPECT_EQ(acts[0].delay, milliseconds(40));
}

TEST_F(NlxProtocolTest, PushesGoToEverySocketOfTheConversation) {
  std::string id = Open(1);
  EXPECT_EQ(Open(2, Target("conversationId=" + id)), id);
  std::string other = Open(3);
  EXPECT_EQ(proto_.connections_for(id), 2);
  std::vector<NlxAction> acts = proto_.Push(id, "Agent Smith here");
  ASSERT_EQ(acts.size(), 2u);
  EXPECT_EQ(acts[0].conn, 1u);
  EXPECT_EQ(acts[1].conn, 2u);
  json::object r = Obj(acts[0].text);
  EXPECT_EQ(r.at("messages").at(0).at("text"), "Agent Smith here");
  EXPECT_EQ(r.at("emulatorPush"), true);
  EXPECT_EQ(r.at("conversationId"), json::value(id));
  EXPECT_TRUE(proto_.Push("nobody", "x").empty());
  // A turn's answer goes only to the socket it came on.
  std::vector<NlxAction> answer = proto_.OnFrame(2, TextTurn("hi"), false, now_);
  ASSERT_EQ(answer.size(), 1u);
  EXPECT_EQ(answer[0].conn, 2u);

  EXPECT_EQ(proto_.PushRaw("", "raw").size(), 3u);
  EXPECT_EQ(proto_.Drop(other).size(), 1u);
  std::vector<NlxAction> closes = proto_.Close(id, 1001, "Going away");
  ASSERT_EQ(closes.size(), 2u);
  EXPECT_EQ(closes[0].kind, NlxAction::Kind::kClose);
  EXPECT_EQ(closes[0].close_code, 1001);
}

TEST_F(NlxProtocolTest, FramesOnUnknownConnectionsAreIgnored) {
  EXPECT_TRUE(proto_.OnFrame(42, TextTurn("hi"), false, now_).empty());
  proto_.OnClose(42);
  EXPECT_EQ(proto_.total_turns(), 0);
}

}  // namespace
}  // namespace wsbridge::emulator
