// The bridge's codec against the emulator's state machine: two independent readings of
// NLX's page (they share no code) must agree on every frame either one produces.
#include <string>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "bridges/core/status.h"
#include "bridges/nlx/codec.h"
#include "tests/upstreams/nlx_protocol.h"

namespace wsbridge::nlx {
namespace {

namespace json = boost::json;
using emulator::NlxAction;
using emulator::NlxClock;
using emulator::NlxProtocol;
using emulator::NlxProtocolOptions;
using ::testing::HasSubstr;

// The path?query part of a ws:// URL, as the server sees it.
std::string TargetOf(const std::string& url) {
  size_t slash = url.find('/', std::string("ws://").size());
  size_t q = url.find('?');
  if (slash == std::string::npos || (q != std::string::npos && q < slash)) {
    return "/" + url.substr(q);
  }
  return url.substr(slash);
}

class CodecEmulatorTest : public ::testing::Test {
 protected:
  CodecEmulatorTest() : proto_(Options()) {}

  static NlxProtocolOptions Options() {
    NlxProtocolOptions o;
    // Keys with characters that must be percent-encoded in a query.
    o.api_key = "k+ey/with=sp&cial%chars";
    o.deployment_key = "dep~1";
    o.channel_key = "chan-1-en-US";
    return o;
  }
  static Keys BridgeKeys() { return Keys{"k+ey/with=sp&cial%chars", "dep~1", "chan-1"}; }

  // Opens a socket the way the bridge would and returns the decoded ack.
  Frame Open(uint64_t conn, const std::string& conversation_id = "") {
    absl::StatusOr<std::string> url =
        UpgradeUrl("ws://127.0.0.1:1", BridgeKeys(), conversation_id, "en-US");
    EXPECT_TRUE(url.ok()) << url.status();
    std::string target = TargetOf(*url);
    EXPECT_EQ(proto_.CheckUpgrade(target).http_status, 101) << target;
    std::vector<NlxAction> acts = proto_.OnOpen(conn, target, now_);
    EXPECT_EQ(acts.size(), 1u);
    absl::StatusOr<Frame> f = DecodeFrame(acts.empty() ? "" : acts[0].text);
    EXPECT_TRUE(f.ok()) << f.status();
    return f.ok() ? *f : Frame();
  }

  // Sends `turn` encoded by the codec and decodes the single answer.
  Frame Turn(uint64_t conn, const v1::Turn& turn, const std::string& conversation_id) {
    absl::StatusOr<std::string> frame = EncodeTurn(turn, conversation_id, "en-US");
    EXPECT_TRUE(frame.ok()) << frame.status();
    std::vector<NlxAction> acts = proto_.OnFrame(conn, *frame, false, now_);
    EXPECT_EQ(acts.size(), 1u) << *frame;
    absl::StatusOr<Frame> f = DecodeFrame(acts.empty() ? "" : acts[0].text);
    EXPECT_TRUE(f.ok()) << f.status();
    return f.ok() ? *f : Frame();
  }
  Frame Text(uint64_t conn, const std::string& text, const std::string& conversation_id) {
    v1::Turn t;
    t.set_text(text);
    return Turn(conn, t, conversation_id);
  }

  NlxProtocol proto_;
  NlxClock::time_point now_ = NlxClock::time_point() + std::chrono::hours(1);
};

TEST_F(CodecEmulatorTest, UpgradeUrlPassesTheEmulatorsKeyCheck) {
  Frame ack = Open(1);
  EXPECT_EQ(ack.kind, FrameKind::kAck);
  EXPECT_EQ(ack.conversation_id.size(), 36u);
  // Wrong keys are refused with 401, and the codec maps that to KEYS_REFUSED.
  absl::StatusOr<std::string> url =
      UpgradeUrl("ws://127.0.0.1:1", Keys{"wrong", "dep~1", "chan-1"}, "", "en-US");
  ASSERT_TRUE(url.ok());
  emulator::NlxUpgrade u = proto_.CheckUpgrade(TargetOf(*url));
  ASSERT_EQ(u.http_status, 401);
  absl::Status st = UpgradeRefusedStatus(u.http_status, u.body);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(st), kReasonKeysRefused);
  EXPECT_THAT(std::string(st.message()), HasSubstr("apiKey is not valid"));
}

TEST_F(CodecEmulatorTest, ResumedIdsSurviveTheRoundTrip) {
  Frame ack = Open(1, "94712479-acea-4c42-b375-e3757056b44b");
  EXPECT_EQ(ack.conversation_id, "94712479-acea-4c42-b375-e3757056b44b");
  Frame odd = Open(2, "id:with/odd?chars");
  EXPECT_EQ(odd.conversation_id, "id:with/odd?chars");
}

TEST_F(CodecEmulatorTest, EveryAnswerShapeDecodesTyped) {
  const std::string id = Open(1).conversation_id;
  Frame f = Text(1, "hello there", id);
  ASSERT_EQ(f.kind, FrameKind::kResponse);
  EXPECT_EQ(f.conversation_id, id);
  ASSERT_EQ(f.response.messages_size(), 1);
  EXPECT_EQ(f.response.messages(0).text(), "Turn 1: you said \"hello there\"");
  EXPECT_EQ(f.response.messages(0).type(), "text");
  EXPECT_EQ(f.response.messages(0).message_id().size(), 36u);
  EXPECT_EQ(f.response.expiration_timestamp(), 1767225600000 + 60000);
  EXPECT_EQ(f.response.metadata().intent_id(), "NLX.Fallback");
  // The emulator's unmodelled echo shows what the codec sent.
  json::object echo = json::parse(f.response.json()).at("emulator").as_object();
  EXPECT_EQ(echo.at("languageCode"), "en-US");

  f = Text(1, "choices", id);
  ASSERT_EQ(f.response.messages_size(), 1);
  const v1::Message& m = f.response.messages(0);
  EXPECT_EQ(m.node_id(), "node-class");
  EXPECT_EQ(m.intent_id(), "BookFlight");
  ASSERT_EQ(m.choices_size(), 2);
  EXPECT_EQ(m.choices(0).choice_id(), "choice-economy");
  EXPECT_EQ(m.choices(1).choice_text(), "Business");
  EXPECT_EQ(json::parse(m.choices(1).choice_payload_json()).at("fare"), "J");

  f = Text(1, "multi", id);
  EXPECT_EQ(f.response.messages_size(), 3);

  f = Text(1, "extra", id);
  EXPECT_EQ(f.response.payload(), "card-payload");
  json::object raw = json::parse(f.response.json()).as_object();
  EXPECT_TRUE(raw.contains("emulatorExtra"));
  EXPECT_TRUE(raw.contains("modalities"));
  EXPECT_TRUE(raw.at("messages").at(0).as_object().contains("rich"));

  EXPECT_TRUE(Text(1, "escalate", id).response.metadata().escalation());
  EXPECT_TRUE(Text(1, "pending", id).response.metadata().has_pending_data_request());

  f = Text(1, "error", id);
  ASSERT_EQ(f.kind, FrameKind::kError);
  absl::Status st = ErrorFrameStatus(f, "turn 7");
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(core::ErrorReason(st), "INTERNAL_SERVER_ERROR");
  EXPECT_FALSE(f.request_id.empty());
}

TEST_F(CodecEmulatorTest, StructuredTurnsContextAndUserIdArriveAsSent) {
  const std::string id = Open(1).conversation_id;
  v1::Turn t;
  v1::StructuredRequest* s = t.mutable_structured();
  s->set_choice_id("choice-economy");
  s->set_flow_id("BookFlight");
  v1::Slot* slot = s->add_slots();
  slot->set_slot_id("Seats");
  slot->mutable_value()->set_number_value(2);
  slot = s->add_slots();
  slot->set_slot_id("City");
  slot->mutable_value()->set_string_value("London");
  t.set_user_id("user-7");
  (*t.mutable_context()->mutable_fields())["tier"].set_string_value("gold");
  Frame f = Turn(1, t, id);
  ASSERT_EQ(f.kind, FrameKind::kResponse);
  EXPECT_EQ(f.response.messages(0).text(),
            "You chose choice-economy. Started flow BookFlight. Slots: Seats=2, City=\"London\".");
  json::object echo = json::parse(f.response.json()).at("emulator").as_object();
  EXPECT_EQ(echo.at("userId"), "user-7");
  EXPECT_EQ(echo.at("context").at("tier"), "gold");
  EXPECT_EQ(proto_.turns_received(id), 1);
}

TEST_F(CodecEmulatorTest, PushesDecodeAsResponsesAndBadBodiesAsBadRequest) {
  const std::string id = Open(1).conversation_id;
  std::vector<NlxAction> pushed = proto_.Push(id, "Agent here");
  ASSERT_EQ(pushed.size(), 1u);
  absl::StatusOr<Frame> f = DecodeFrame(pushed[0].text);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->kind, FrameKind::kResponse);
  EXPECT_EQ(f->response.messages(0).text(), "Agent here");

  std::vector<NlxAction> bad = proto_.OnFrame(1, R"({"request":{}})", false, now_);
  ASSERT_EQ(bad.size(), 1u);
  f = DecodeFrame(bad[0].text);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->kind, FrameKind::kError);
  absl::Status st = ErrorFrameStatus(*f, "turn 1");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(core::ErrorReason(st), "BAD_REQUEST");
}

}  // namespace
}  // namespace wsbridge::nlx
