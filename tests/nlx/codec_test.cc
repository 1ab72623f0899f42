#include "bridges/nlx/codec.h"

#include <cmath>
#include <limits>
#include <string>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "bridges/core/log.h"
#include "bridges/core/status.h"
#include "google/rpc/error_details.pb.h"

namespace wsbridge::nlx {
namespace {

namespace json = boost::json;
using ::testing::HasSubstr;
using ::testing::Not;

Keys TestKeys() { return Keys{"api-key-1", "dep-1", "chan-1-en-US"}; }

std::string Message(const absl::Status& st) { return std::string(st.message()); }

std::map<std::string, std::string> ErrorMetadata(const absl::Status& st) {
  auto payload = st.GetPayload(absl::string_view(core::kErrorInfoTypeUrl.data(),
                                                 core::kErrorInfoTypeUrl.size()));
  google::rpc::ErrorInfo info;
  if (!payload || !info.ParseFromString(std::string(*payload))) return {};
  return {info.metadata().begin(), info.metadata().end()};
}

json::object ParseObject(const std::string& text) { return json::parse(text).as_object(); }

TEST(NlxCodec, UpgradeUrlCarriesTheThreeKeysAndTheConversation) {
  absl::StatusOr<std::string> url = UpgradeUrl(kDefaultUrl, TestKeys(), "", "");
  ASSERT_TRUE(url.ok()) << url.status();
  EXPECT_EQ(*url,
            "wss://us-east-1-ws.apps.nlx.ai?apiKey=api-key-1&deploymentKey=dep-1&channelKey="
            "chan-1-en-US");
  url = UpgradeUrl("ws://127.0.0.1:4000/", TestKeys(), "94712479-acea-4c42-b375-e3757056b44b",
                   "");
  ASSERT_TRUE(url.ok()) << url.status();
  EXPECT_EQ(*url,
            "ws://127.0.0.1:4000/?apiKey=api-key-1&deploymentKey=dep-1&channelKey=chan-1-en-US"
            "&conversationId=94712479-acea-4c42-b375-e3757056b44b");
}

TEST(NlxCodec, UpgradeUrlPercentEncodesValuesAndKeepsAnExistingQuery) {
  Keys keys{"a+b/c=d&e", "dep 1", "chän"};
  absl::StatusOr<std::string> url = UpgradeUrl("wss://h/ws?region=eu", keys, "c:1?x", "");
  // Spaces and non-ASCII are refused as keys (they cannot be NLX keys), so use the
  // encodable ones only.
  EXPECT_FALSE(url.ok());
  keys = Keys{"a+b/c=d&e%", "dep~1_.-", "ch#1"};
  url = UpgradeUrl("wss://h/ws?region=eu", keys, "c:1?x", "");
  ASSERT_TRUE(url.ok()) << url.status();
  EXPECT_EQ(*url,
            "wss://h/ws?region=eu&apiKey=a%2Bb%2Fc%3Dd%26e%25&deploymentKey=dep~1_.-"
            "&channelKey=ch%231&conversationId=c%3A1%3Fx");
  EXPECT_EQ(PercentEncode("AZaz09-_.~ /?%\xc3\xa4"), "AZaz09-_.~%20%2F%3F%25%C3%A4");
}

TEST(NlxCodec, LanguageSuffixesTheChannelKeyOnce) {
  EXPECT_EQ(ChannelKeyWithLanguage("abc", "en-US"), "abc-en-US");
  EXPECT_EQ(ChannelKeyWithLanguage("abc-en-US", "en-US"), "abc-en-US");
  EXPECT_EQ(ChannelKeyWithLanguage("abc-en-US", ""), "abc-en-US");
  EXPECT_EQ(ChannelKeyWithLanguage("abc-en-US", "es-US"), "abc-en-US-es-US");
  absl::StatusOr<std::string> url =
      UpgradeUrl(kDefaultUrl, Keys{"k", "d", "abc"}, "", "en-US");
  ASSERT_TRUE(url.ok());
  EXPECT_EQ(*url,
            "wss://us-east-1-ws.apps.nlx.ai?apiKey=k&deploymentKey=d&channelKey=abc-en-US"
            "&languageCode=en-US");
}

TEST(NlxCodec, UpgradeUrlIsRedactedInLogs) {
  absl::StatusOr<std::string> url = UpgradeUrl(kDefaultUrl, TestKeys(), "conv-1", "");
  ASSERT_TRUE(url.ok());
  std::string shown = log::RedactUrl(*url);
  EXPECT_THAT(shown, Not(HasSubstr("api-key-1")));
  EXPECT_THAT(shown, Not(HasSubstr("dep-1")));
  EXPECT_THAT(shown, Not(HasSubstr("chan-1")));
  EXPECT_THAT(shown, HasSubstr("conversationId=conv-1"));
}

TEST(NlxCodec, MissingOrMalformedKeysNameTheKeyButNeverItsValue) {
  absl::Status st = ValidateKeys(Keys{"k", "", "c"});
  EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(st), kReasonKeysMissing);
  EXPECT_THAT(Message(st), HasSubstr("deploymentKey"));
  EXPECT_THAT(Message(st), HasSubstr("x-nlx-deployment-key"));
  st = ValidateKeys(Keys{"secret-value\n", "d", "c"});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(core::ErrorReason(st), "INVALID_KEYS");
  EXPECT_THAT(Message(st), HasSubstr("apiKey"));
  EXPECT_THAT(Message(st), Not(HasSubstr("secret-value")));
  EXPECT_FALSE(ValidateKeys(Keys{"k", "d", std::string(1025, 'c')}).ok());
  EXPECT_TRUE(ValidateKeys(Keys{"k", "d", std::string(1024, 'c')}).ok());
  EXPECT_FALSE(UpgradeUrl(kDefaultUrl, Keys{"", "d", "c"}, "", "").ok());
}

TEST(NlxCodec, RejectsBadBaseUrlsAndConversationIds) {
  EXPECT_EQ(UpgradeUrl("https://x", TestKeys(), "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UpgradeUrl("wss://x/#frag", TestKeys(), "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  for (std::string_view bad : {"has space", "tab\t", "\x7f", "é"}) {
    absl::Status st = ValidateConversationId(bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(core::ErrorReason(st), kReasonInvalidTurn);
  }
  EXPECT_FALSE(ValidateConversationId("").ok());
  EXPECT_FALSE(ValidateConversationId(std::string(129, 'a')).ok());
  EXPECT_TRUE(ValidateConversationId(std::string(128, 'a')).ok());
  EXPECT_TRUE(ValidateConversationId("94712479-acea-4c42-b375-e3757056b44b").ok());
  EXPECT_FALSE(UpgradeUrl(kDefaultUrl, TestKeys(), "a b", "").ok());
}

TEST(NlxCodec, EncodesATextTurnAsThePageShows) {
  v1::Turn turn;
  turn.set_text("Book a flight to London");
  turn.set_user_id("0da722ad-cb3f-4938-a447-82ee53733362");
  absl::StatusOr<std::string> out = EncodeTurn(turn, "", "");
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out,
            R"({"request":{"unstructured":{"text":"Book a flight to London"}},)"
            R"("userId":"0da722ad-cb3f-4938-a447-82ee53733362"})");
  out = EncodeTurn(turn, "conv-9", "en-US");
  ASSERT_TRUE(out.ok());
  json::object o = ParseObject(*out);
  EXPECT_EQ(o.at("conversationId"), "conv-9");
  EXPECT_EQ(o.at("languageCode"), "en-US");
  turn.set_language_code("fr-FR");
  EXPECT_EQ(ParseObject(*EncodeTurn(turn, "", "en-US")).at("languageCode"), "fr-FR");
}

TEST(NlxCodec, EncodesStructuredTurnsWithSlotsAndContext) {
  v1::Turn turn;
  v1::StructuredRequest* s = turn.mutable_structured();
  s->set_choice_id("c-yes");
  s->set_node_id("n-1");
  s->set_flow_id("BookFlight");
  v1::Slot* slot = s->add_slots();
  slot->set_slot_id("City");
  slot->mutable_value()->set_string_value("London");
  slot = s->add_slots();
  slot->set_slot_id("Passengers");
  slot->mutable_value()->set_number_value(2);
  s->add_slots()->set_slot_id("Nothing");
  s->add_upload_ids("u-1");
  s->set_utterance("see attached");
  s->set_poll(true);
  auto& ctx = *turn.mutable_context()->mutable_fields();
  ctx["tier"].set_string_value("gold");
  ctx["score"].set_number_value(2.5);
  ctx["count"].set_number_value(3);
  ctx["big"].set_number_value(1e300);
  ctx["vip"].set_bool_value(true);
  ctx["none"].set_null_value(google::protobuf::NULL_VALUE);
  auto* list = ctx["list"].mutable_list_value();
  list->add_values()->set_number_value(-1);
  (*list->add_values()->mutable_struct_value()->mutable_fields())["k"].set_string_value("v");
  absl::StatusOr<std::string> out = EncodeTurn(turn, "c", "");
  ASSERT_TRUE(out.ok()) << out.status();
  json::object o = ParseObject(*out);
  const json::object& st = o.at("request").at("structured").as_object();
  EXPECT_FALSE(o.at("request").as_object().contains("unstructured"));
  EXPECT_EQ(st.at("choiceId"), "c-yes");
  EXPECT_EQ(st.at("nodeId"), "n-1");
  EXPECT_EQ(st.at("flowId"), "BookFlight");
  EXPECT_EQ(st.at("intentId"), "BookFlight");  // as NLX's SDK sends a flow
  EXPECT_EQ(json::serialize(st.at("slots")),
            R"([{"slotId":"City","value":"London"},{"slotId":"Passengers","value":2},)"
            R"({"slotId":"Nothing","value":null}])");
  EXPECT_EQ(json::serialize(st.at("uploadIds")), R"(["u-1"])");
  EXPECT_EQ(st.at("utterance"), "see attached");
  EXPECT_EQ(st.at("poll"), true);
  const json::object& c = o.at("context").as_object();
  EXPECT_EQ(c.at("tier"), "gold");
  EXPECT_EQ(c.at("score").as_double(), 2.5);
  EXPECT_TRUE(c.at("count").is_int64());
  EXPECT_EQ(c.at("count").as_int64(), 3);
  EXPECT_TRUE(c.at("big").is_double());
  EXPECT_EQ(c.at("vip"), true);
  EXPECT_TRUE(c.at("none").is_null());
  EXPECT_EQ(json::serialize(c.at("list")), R"([-1,{"k":"v"}])");

  s->set_intent_id("Legacy");
  o = ParseObject(*EncodeTurn(turn, "", ""));
  EXPECT_EQ(o.at("request").at("structured").at("intentId"), "Legacy");
  EXPECT_EQ(o.at("request").at("structured").at("flowId"), "BookFlight");
}

TEST(NlxCodec, RefusesTurnsNlxCannotTake) {
  struct Case {
    v1::Turn turn;
    std::string want;
  };
  std::vector<Case> cases;
  cases.push_back({v1::Turn(), "no request"});
  v1::Turn t;
  t.set_text("");
  cases.push_back({t, "text is empty"});
  t.Clear();
  t.mutable_structured();
  cases.push_back({t, "structured is empty"});
  t.Clear();
  t.mutable_structured()->add_slots()->mutable_value()->set_string_value("x");
  cases.push_back({t, "slots[0].slot_id is empty"});
  t.Clear();
  t.set_text("hi");
  (*t.mutable_context()->mutable_fields())["x"].set_number_value(
      std::numeric_limits<double>::quiet_NaN());
  cases.push_back({t, "turn.context.x"});
  t.Clear();
  t.set_text("hi");
  t.set_extra_json("[1]");
  cases.push_back({t, "must be a JSON object"});
  t.set_extra_json("{bad");
  cases.push_back({t, "not valid JSON"});
  t.set_extra_json(R"({"userId":"x"})");
  cases.push_back({t, "\"userId\""});
  for (const Case& c : cases) {
    absl::StatusOr<std::string> out = EncodeTurn(c.turn, "", "");
    ASSERT_FALSE(out.ok()) << c.want;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << c.want;
    EXPECT_EQ(core::ErrorReason(out.status()), kReasonInvalidTurn) << c.want;
    EXPECT_THAT(Message(out.status()), HasSubstr(c.want));
  }
}

TEST(NlxCodec, ExtraJsonAddsFieldsNotModelled) {
  v1::Turn t;
  t.set_text("hi");
  t.set_extra_json(R"({"environment":"development","channelType":"API","nested":{"a":[1]}})");
  json::object o = ParseObject(*EncodeTurn(t, "", ""));
  EXPECT_EQ(o.at("environment"), "development");
  EXPECT_EQ(o.at("channelType"), "API");
  EXPECT_EQ(json::serialize(o.at("nested")), R"({"a":[1]})");
}

TEST(NlxCodec, DecodesTheAck) {
  absl::StatusOr<Frame> f = DecodeFrame(R"({"conversationId":"94712479-acea"})");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->kind, FrameKind::kAck);
  EXPECT_EQ(f->conversation_id, "94712479-acea");
  EXPECT_EQ(f->json(), R"({"conversationId":"94712479-acea"})");
  // Extra fields do not change what it is.
  f = DecodeFrame(R"({"conversationId":"c","connectionId":"x=","resumed":true})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kAck);
  EXPECT_EQ(f->conversation_id, "c");
}

TEST(NlxCodec, DecodesTheResponseOfThePage) {
  const std::string text = R"({
    "messages": [
      {
        "text": "I can help with that. What date are you flying?",
        "type": "text",
        "messageId": "c7048e3f-3da1-4109-ab26-6c10efd96139"
      }
    ],
    "conversationId": "94712479-acea-4c42-b375-e3757056b44b"
  })";
  absl::StatusOr<Frame> f = DecodeFrame(text);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->kind, FrameKind::kResponse);
  EXPECT_EQ(f->conversation_id, "94712479-acea-4c42-b375-e3757056b44b");
  const v1::ConversationResponse& r = f->response;
  EXPECT_EQ(r.turn(), 0u);
  EXPECT_EQ(r.conversation_id(), "94712479-acea-4c42-b375-e3757056b44b");
  ASSERT_EQ(r.messages_size(), 1);
  EXPECT_EQ(r.messages(0).text(), "I can help with that. What date are you flying?");
  EXPECT_EQ(r.messages(0).type(), "text");
  EXPECT_EQ(r.messages(0).message_id(), "c7048e3f-3da1-4109-ab26-6c10efd96139");
  EXPECT_EQ(r.json(), text);
  EXPECT_EQ(f->json(), text);
  EXPECT_TRUE(f->raw.empty());
}

TEST(NlxCodec, DecodesEveryModelledFieldAndKeepsTheRest) {
  const std::string text = R"({"conversationId":"c","expirationTimestamp":1733000000000,
    "payload":{"card":1},"modalities":{"MapUrl":"https://m"},"context":{"tier":"gold"},
    "metadata":{"intentId":"BookFlight","escalation":true,"frustration":false,
      "incomprehension":true,"hasPendingDataRequest":true,"uploadUrls":[],"sources":[{}]},
    "messages":[
      {"messageId":"m1","nodeId":"n1","text":"Pick one","metadata":{"intentId":"f1"},
       "choices":[{"choiceId":"a","choiceText":"A","choicePayload":{"x":[1,2]}},
                  {"choiceId":"b","choiceText":"B"}],"rich":{"card":"x"}},
      {"text":"second","type":null,"choices":null}],
    "futureField":[1,{"deep":true}]})";
  absl::StatusOr<Frame> f = DecodeFrame(text);
  ASSERT_TRUE(f.ok()) << f.status();
  const v1::ConversationResponse& r = f->response;
  EXPECT_EQ(r.expiration_timestamp(), 1733000000000);
  EXPECT_EQ(r.payload(), R"({"card":1})");
  EXPECT_EQ(r.metadata().intent_id(), "BookFlight");
  EXPECT_TRUE(r.metadata().escalation());
  EXPECT_FALSE(r.metadata().frustration());
  EXPECT_TRUE(r.metadata().incomprehension());
  EXPECT_TRUE(r.metadata().has_pending_data_request());
  ASSERT_EQ(r.messages_size(), 2);
  EXPECT_EQ(r.messages(0).node_id(), "n1");
  EXPECT_EQ(r.messages(0).intent_id(), "f1");
  ASSERT_EQ(r.messages(0).choices_size(), 2);
  EXPECT_EQ(r.messages(0).choices(0).choice_id(), "a");
  EXPECT_EQ(r.messages(0).choices(0).choice_text(), "A");
  EXPECT_EQ(r.messages(0).choices(0).choice_payload_json(), R"({"x":[1,2]})");
  EXPECT_EQ(r.messages(0).choices(1).choice_payload_json(), "");
  EXPECT_EQ(r.messages(1).text(), "second");
  EXPECT_EQ(r.messages(1).type(), "");
  EXPECT_EQ(r.messages(1).choices_size(), 0);
  // Nothing is lost: the unmodelled fields are in the JSON, byte for byte.
  EXPECT_EQ(r.json(), text);
  json::object o = ParseObject(r.json());
  EXPECT_EQ(json::serialize(o.at("futureField")), R"([1,{"deep":true}])");
  EXPECT_EQ(o.at("messages").at(0).at("rich").at("card"), "x");

  f = DecodeFrame(R"({"messages":[],"payload":"plain"})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->response.payload(), "plain");
  EXPECT_EQ(f->response.messages_size(), 0);
}

TEST(NlxCodec, DecodesApiGatewayAndOtherErrorShapes) {
  absl::StatusOr<Frame> f = DecodeFrame(
      R"({"message": "Internal server error", "connectionId":"L0SM9cOFvHcCIhw=", "requestId":"L0SM9FPMvHcFfBg="})");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->kind, FrameKind::kError);
  EXPECT_EQ(f->error_message, "Internal server error");
  EXPECT_EQ(f->request_id, "L0SM9FPMvHcFfBg=");
  EXPECT_FALSE(f->raw.empty());
  f = DecodeFrame(R"({"errorMessage":"Task timed out"})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kError);
  EXPECT_EQ(f->error_message, "Task timed out");
  f = DecodeFrame(R"({"error":{"message":"bad things","code":7}})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->error_message, "bad things");
  f = DecodeFrame(R"({"error":"plain"})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->error_message, "plain");
  f = DecodeFrame(R"({"error":42})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kError);
  EXPECT_EQ(f->error_message, "42");
  // An error that names the conversation is still an error, not an ack.
  f = DecodeFrame(R"({"conversationId":"c","message":"Forbidden"})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kError);
  // A response wins over an error-looking field.
  f = DecodeFrame(R"({"messages":[],"message":"hi"})");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kResponse);
}

TEST(NlxCodec, KeepsUnknownFramesRaw) {
  for (std::string_view text : {R"({})", R"({"type":"typing"})", R"({"conversationId":""})",
                                R"({"conversationId":null,"x":1})"}) {
    absl::StatusOr<Frame> f = DecodeFrame(text);
    ASSERT_TRUE(f.ok()) << text;
    EXPECT_EQ(f->kind, FrameKind::kUnknown) << text;
    EXPECT_EQ(f->json(), text);
  }
}

TEST(NlxCodec, MalformedFramesSayWhatIsWrong) {
  struct Case {
    std::string_view text;
    std::string_view want;
  };
  const Case cases[] = {
      {"", "not valid JSON"},
      {"{bad", "not valid JSON"},
      {"{} {}", "not valid JSON"},
      {"[1]", "is an array, expected a JSON object"},
      {"\"s\"", "is a string"},
      {R"({"messages":{}})", "messages is an object, expected an array"},
      {R"({"messages":[1]})", "messages[0] is a number, expected an object"},
      {R"({"messages":[{"text":5}]})", "messages[0].text is a number"},
      {R"({"messages":[{"choices":{}}]})", "messages[0].choices is an object"},
      {R"({"messages":[{"choices":[{"choiceId":1}]}]})", "messages[0].choices[0].choiceId"},
      {R"({"messages":[{"metadata":[]}]})", "messages[0].metadata is an array"},
      {R"({"messages":[],"metadata":{"escalation":"yes"}})", "metadata.escalation is a string"},
      {R"({"messages":[],"expirationTimestamp":"soon"})", "expirationTimestamp is a string"},
      {R"({"messages":[],"conversationId":7})", "conversationId is a number"},
      {R"({"conversationId":true})", "conversationId is a boolean"},
      {R"({"message":{"a":1}})", "message is an object, expected a string"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<Frame> f = DecodeFrame(c.text);
    ASSERT_FALSE(f.ok()) << c.text;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(Message(f.status()), HasSubstr(c.want)) << c.text;
  }
  std::string deep = std::string(100, '[') + std::string(100, ']');
  EXPECT_FALSE(DecodeFrame(R"({"messages":[],"x":)" + deep + "}").ok());
  std::string ok_depth = std::string(40, '[') + std::string(40, ']');
  EXPECT_TRUE(DecodeFrame(R"({"messages":[],"x":)" + ok_depth + "}").ok());
}

TEST(NlxCodec, MapsErrorFrames) {
  struct Case {
    std::string message;
    absl::StatusCode code;
    std::string reason;
  };
  const Case cases[] = {
      {"Forbidden", absl::StatusCode::kPermissionDenied, "FORBIDDEN"},
      {"Unauthorized", absl::StatusCode::kUnauthenticated, "UNAUTHORIZED"},
      {"Internal server error", absl::StatusCode::kInternal, "INTERNAL_SERVER_ERROR"},
      {"Too Many Requests", absl::StatusCode::kResourceExhausted, "RATE_LIMITED"},
      {"Limit Exceeded", absl::StatusCode::kResourceExhausted, "RATE_LIMITED"},
      {"rate exceeded", absl::StatusCode::kResourceExhausted, "RATE_LIMITED"},
      {"Message too long", absl::StatusCode::kInvalidArgument, "MESSAGE_TOO_LONG"},
      {"Endpoint request timed out", absl::StatusCode::kDeadlineExceeded, "UPSTREAM_TIMEOUT"},
      {"Invalid request body", absl::StatusCode::kInvalidArgument, "BAD_REQUEST"},
      {"Something odd", absl::StatusCode::kUnknown, "UPSTREAM_ERROR"},
  };
  for (const Case& c : cases) {
    Frame f;
    f.kind = FrameKind::kError;
    f.error_message = c.message;
    f.request_id = "req-1";
    absl::Status st = ErrorFrameStatus(f, "turn 2");
    EXPECT_EQ(st.code(), c.code) << c.message;
    EXPECT_EQ(core::ErrorReason(st), c.reason) << c.message;
    EXPECT_THAT(Message(st), HasSubstr("turn 2"));
    EXPECT_THAT(Message(st), HasSubstr(c.message));
    auto md = ErrorMetadata(st);
    EXPECT_EQ(md["upstream_message"], c.message);
    EXPECT_EQ(md["upstream_request_id"], "req-1");
  }
  Frame f;
  f.kind = FrameKind::kError;
  f.error_message = std::string(1000, 'x');
  EXPECT_LT(ErrorFrameStatus(f, "t").message().size(), 400u);
}

TEST(NlxCodec, MapsRefusedUpgrades) {
  absl::Status st = UpgradeRefusedStatus(401, "Unauthorized: bad apiKey\n");
  EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(st), kReasonKeysRefused);
  EXPECT_THAT(Message(st), HasSubstr("bad apiKey"));
  EXPECT_EQ(ErrorMetadata(st)["http_status"], "401");
  st = UpgradeRefusedStatus(403, "");
  EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(st), kReasonKeysRefused);
  st = UpgradeRefusedStatus(429, "slow");
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(core::ErrorReason(st), kReasonUpgradeRefused);
  st = UpgradeRefusedStatus(503, "down");
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::ErrorReason(st), kReasonUpgradeRefused);
  EXPECT_EQ(ErrorMetadata(st)["http_status"], "503");
}

TEST(NlxCodec, RegisteredSecretsNeverReachErrorMessages) {
  log::RegisterSecret("topsecret-api-key-9");
  Frame f;
  f.kind = FrameKind::kError;
  f.error_message = "Forbidden for topsecret-api-key-9";
  absl::Status st = ErrorFrameStatus(f, "turn 1");
  EXPECT_THAT(Message(st), Not(HasSubstr("topsecret-api-key-9")));
  EXPECT_THAT(ErrorMetadata(st)["upstream_message"], Not(HasSubstr("topsecret-api-key-9")));
  st = UpgradeRefusedStatus(401, "key topsecret-api-key-9 unknown");
  EXPECT_THAT(Message(st), Not(HasSubstr("topsecret-api-key-9")));
}

}  // namespace
}  // namespace wsbridge::nlx
