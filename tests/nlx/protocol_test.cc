// nlx::Protocol: the upgrade URL and resume, frame routing (ack gate, the turn in
// flight, unsolicited pushes, abandoned turns), refusals and failed first opens with the
// time passed in; and core sessions with this protocol against the emulator over real
// sockets (nothing before the ack, turns in order, resume after a drop).
#include "bridges/nlx/protocol.h"

#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/status.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nlx_emulator.h"

namespace wsbridge::nlx {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace net = boost::asio;
using Kind = core::Inbound::Kind;

constexpr char kAck[] = R"({"conversationId":"c-1"})";
constexpr char kResponse[] = R"({"conversationId":"c-1","messages":[{"text":"hi","type":"text"}]})";
constexpr char kError[] = R"({"message":"Internal server error","requestId":"r-9"})";

KeySources Keys(std::string api = "nlx-emulator-api-key") {
  return {core::SecretSource::Fixed(std::move(api)), core::SecretSource::Fixed("nlx-emulator-deployment"),
          core::SecretSource::Fixed("nlx-emulator-channel")};
}

class NlxProtocolTest : public ::testing::Test {
 protected:
  std::unique_ptr<Protocol> Make(std::string resume = "") {
    conv_ = std::make_shared<Conversation>(std::move(resume));
    pool_key_ = registry_->NewPoolKey();
    registry_->Put(pool_key_, conv_);
    ProtocolOptions o;
    o.url = "wss://nlx.example/ws";
    o.language = "en-US";
    o.keys = Keys();
    o.tenant = "default";
    o.pool_key = pool_key_;
    o.conversation = conv_;
    o.registry = registry_;
    o.ack_timeout = 10s;
    o.auth_retry_after = 30s;
    o.now = [this] { return now_; };
    return std::make_unique<Protocol>(std::move(o));
  }
  // Opens: handshake, socket open, ack.
  void Open(Protocol& p) {
    ASSERT_TRUE(p.PrepareHandshake().ok());
    ASSERT_TRUE(p.OnOpen("").ok());
    ASSERT_EQ(p.Decode(kAck, false).kind, Kind::kLogin);
  }

  core::Clock::time_point now_ = core::Clock::now();
  std::shared_ptr<Registry> registry_ = std::make_shared<Registry>();
  std::shared_ptr<Conversation> conv_;
  std::string pool_key_;
};

TEST_F(NlxProtocolTest, TheUpgradeCarriesTheKeysAndAfterTheAckResumesTheAcknowledgedId) {
  auto p = Make();
  absl::StatusOr<core::HandshakeRequest> h = p->PrepareHandshake();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->url,
            "wss://nlx.example/ws?apiKey=nlx-emulator-api-key&deploymentKey=nlx-emulator-deployment"
            "&channelKey=nlx-emulator-channel-en-US&languageCode=en-US");
  absl::StatusOr<core::LoginPlan> plan = p->OnOpen("");
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->wait);  // nothing is sent before the ack
  EXPECT_TRUE(plan->frames.empty());
  core::Inbound in = p->Decode(kAck, false);
  EXPECT_EQ(in.kind, Kind::kLogin);
  EXPECT_TRUE(in.status.ok());
  EXPECT_EQ(conv_->id(), "c-1");
  EXPECT_TRUE(conv_->acknowledged());
  // Resume by id finds this pool key; a reconnect resumes the acknowledged id.
  EXPECT_EQ(registry_->PoolKeyFor("default", "c-1"), pool_key_);
  EXPECT_NE(registry_->PoolKeyFor("tenant-b", "c-1"), pool_key_);  // another tenant's id
  h = p->PrepareHandshake();
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(absl::EndsWith(h->url, "&conversationId=c-1&languageCode=en-US")) << h->url;
}

TEST_F(NlxProtocolTest, NLXsIdWinsWhenItAcknowledgesAnotherThanTheOneResumed) {
  auto p = Make("asked-id");
  absl::StatusOr<core::HandshakeRequest> h = p->PrepareHandshake();
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(absl::StrContains(h->url, "conversationId=asked-id")) << h->url;
  ASSERT_TRUE(p->OnOpen("").ok());
  ASSERT_EQ(p->Decode(kAck, false).kind, Kind::kLogin);
  EXPECT_EQ(conv_->id(), "c-1");
}

TEST_F(NlxProtocolTest, FramesRouteToTheTurnInFlightOrToTheConversationsSinks) {
  auto p = Make();
  ASSERT_TRUE(p->PrepareHandshake().ok());
  ASSERT_TRUE(p->OnOpen("").ok());
  // Before the ack, a response is not understood (and never routed).
  EXPECT_EQ(p->Decode(kResponse, false).kind, Kind::kMalformed);
  ASSERT_EQ(p->Decode(kAck, false).kind, Kind::kLogin);
  // No turn in flight: an unsolicited push for the sinks.
  core::Inbound push = p->Decode(kResponse, false);
  EXPECT_EQ(push.kind, Kind::kEvent);
  EXPECT_EQ(push.route, kConversationRoute);
  // A turn in flight takes the next response, in send order (route "").
  p->gate()->Sent(1, 1, now_);
  core::Inbound reply = p->Decode(kResponse, false);
  EXPECT_EQ(reply.kind, Kind::kReply);
  EXPECT_EQ(reply.route, "");
  const Frame& f = static_cast<const FramePayload&>(*reply.payload).frame;
  EXPECT_EQ(f.response.messages(0).text(), "hi");
  EXPECT_EQ(f.response.json(), kResponse);
  // ... or an error frame, as a status with the upstream JSON alongside.
  core::Inbound err = p->Decode(kError, false);
  EXPECT_EQ(err.kind, Kind::kReply);
  EXPECT_EQ(err.status.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(core::ErrorReason(err.status), "INTERNAL_SERVER_ERROR");
  ASSERT_TRUE(err.status.GetPayload(Av(kUpstreamJsonPayload)).has_value());
  EXPECT_EQ(std::string(*err.status.GetPayload(Av(kUpstreamJsonPayload))), kError);
  p->gate()->Answered(1, false, now_);
  // Frames that are no ack, response or error (or not JSON) go to the sinks as they came.
  core::Inbound odd = p->Decode("not json", false);
  EXPECT_EQ(odd.kind, Kind::kEvent);
  EXPECT_EQ(static_cast<const FramePayload&>(*odd.payload).frame.json(), "not json");
  EXPECT_EQ(p->Decode(R"({"typing":true})", false).kind, Kind::kEvent);
  EXPECT_EQ(p->Decode("x", true).kind, Kind::kMalformed);
  EXPECT_TRUE(p->CheckAlive().ok());
}

TEST_F(NlxProtocolTest, AnAbandonedTurnIgnoresItsLateAnswerAndReplacesTheSocket) {
  auto p = Make();
  Open(*p);
  p->gate()->Sent(1, 1, now_);
  p->gate()->Abandoned(1, now_);  // deadline or cancel
  EXPECT_FALSE(p->gate()->When(1, now_).has_value());  // the next turn waits
  EXPECT_EQ(p->Decode(kResponse, false).kind, Kind::kIgnore);
  EXPECT_FALSE(p->CheckAlive().ok());
  // A new socket: the gate opens again.
  ASSERT_TRUE(p->PrepareHandshake().ok());
  ASSERT_TRUE(p->OnOpen("").ok());
  EXPECT_TRUE(p->gate()->When(1, now_).has_value());
  EXPECT_TRUE(p->CheckAlive().ok());
}

TEST_F(NlxProtocolTest, ARefusedUpgradeIsRememberedForTheKeysAndFailsTheFirstOpen) {
  auto p = Make();
  ASSERT_TRUE(p->PrepareHandshake().ok());
  absl::Status seen;
  ASSERT_NE(conv_->WatchOpen([&](const absl::Status& st) { seen = st; }), 0u);
  core::DisconnectInfo info;
  info.http_status = 401;
  info.reason = absl::UnauthenticatedError(
      R"(WebSocket upgrade refused by h with HTTP 401: {"message":"Unauthorized: apiKey is not valid"})");
  info.http_body = R"({"message":"Unauthorized: apiKey is not valid"})";
  EXPECT_EQ(p->Classify(info), core::DisconnectKind::kAuthRefused);
  EXPECT_EQ(seen.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(seen), "KEYS_REFUSED");
  EXPECT_TRUE(absl::StrContains(seen.message(), "apiKey is not valid")) << seen;
  const std::string key = RefusalKey("default", Keys());
  EXPECT_EQ(registry_->Refused(key, now_).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(registry_->Refused(key, now_ + 31s).ok());  // auth_retry_after
  // No network while refused: the attempt fails before it starts.
  absl::StatusOr<core::HandshakeRequest> h = p->PrepareHandshake();
  EXPECT_FALSE(h.ok());
  core::DisconnectInfo none;
  none.reason = h.status();
  EXPECT_EQ(p->Classify(none), core::DisconnectKind::kAuthRefused);
}

// Close codes of an acknowledged socket: 1001/1011 and no close frame reconnect; 1008
// refuses this conversation's keys for auth_retry_after (no attempt meanwhile, quoting the
// close), but neither the keys as a whole nor a rotated key; every end is kept for the
// turn it left unknown.
TEST_F(NlxProtocolTest, CloseCodesReconnectOrRefuseTheConversationsKeys) {
  auto p = Make();
  Open(*p);
  auto closed = [](uint16_t code) {
    core::DisconnectInfo info;
    info.was_open = true;
    info.close_code = code;
    info.reason = absl::UnavailableError(absl::StrCat("upstream closed the connection (code ", code, ": bye)"));
    return info;
  };
  EXPECT_EQ(p->Classify(closed(1001)), core::DisconnectKind::kClosedByPeer);
  EXPECT_EQ(conv_->last_disconnect(), "upstream closed the connection (code 1001: bye)");
  EXPECT_EQ(p->Classify(closed(1011)), core::DisconnectKind::kClosedByPeer);
  core::DisconnectInfo dropped;
  dropped.was_open = true;
  dropped.reason = absl::UnavailableError("upstream connection lost: End of file");
  EXPECT_EQ(p->Classify(dropped), core::DisconnectKind::kError);
  EXPECT_EQ(conv_->last_disconnect(), "upstream connection lost: End of file");
  ASSERT_TRUE(p->PrepareHandshake().ok());  // none of these refuses anything

  ASSERT_TRUE(p->OnOpen("").ok());
  ASSERT_EQ(p->Decode(kAck, false).kind, Kind::kLogin);
  EXPECT_EQ(p->Classify(closed(1008)), core::DisconnectKind::kAuthRefused);
  const std::string mine = ConversationRefusalKey("default", Keys(), "c-1");
  absl::Status refused = registry_->Refused(mine, now_);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(refused), "KEYS_REFUSED");
  EXPECT_TRUE(absl::StrContains(refused.message(), "code 1008")) << refused;
  EXPECT_TRUE(registry_->Refused(RefusalKey("default", Keys()), now_).ok()) << "not the keys as a whole";
  EXPECT_TRUE(registry_->Refused(ConversationRefusalKey("default", Keys(), "c-2"), now_).ok());
  // No attempt while refused; the failed attempt is no socket end (the 1008 is kept).
  absl::StatusOr<core::HandshakeRequest> h = p->PrepareHandshake();
  ASSERT_FALSE(h.ok());
  core::DisconnectInfo none;
  none.reason = h.status();
  EXPECT_EQ(p->Classify(none), core::DisconnectKind::kAuthRefused);
  EXPECT_EQ(conv_->last_disconnect(), "upstream closed the connection (code 1008: bye)");
  now_ += 31s;  // auth_retry_after
  EXPECT_TRUE(p->PrepareHandshake().ok());
}

TEST_F(NlxProtocolTest, NoAckWithinAckTimeoutFailsTheFirstOpenButNotALaterReconnect) {
  auto p = Make();
  absl::Status seen;
  conv_->WatchOpen([&](const absl::Status& st) { seen = st; });
  ASSERT_TRUE(p->PrepareHandshake().ok());
  ASSERT_TRUE(p->OnOpen("").ok());
  now_ += 10s;  // the session's login timer fired and dropped the socket
  EXPECT_FALSE(p->PrepareHandshake().ok());
  EXPECT_EQ(seen.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::ErrorReason(seen), "ACK_TIMEOUT");
  EXPECT_EQ(core::ErrorReason(conv_->open_error()), "ACK_TIMEOUT");

  // Once acknowledged, a socket lost before its next ack is simply reconnected.
  auto q = Make();
  Open(*q);
  ASSERT_TRUE(q->PrepareHandshake().ok());
  ASSERT_TRUE(q->OnOpen("").ok());
  now_ += 10s;
  EXPECT_TRUE(q->PrepareHandshake().ok());
  EXPECT_TRUE(conv_->open_error().ok());
}

// ---------------------------------------------------------------------------------
// Sessions against the emulator.
class NlxProtocolLive : public ::testing::Test {
 protected:
  NlxProtocolLive() : work_(net::make_work_guard(ioc_)) {
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~NlxProtocolLive() override {
    for (auto& s : sessions_) {
      std::promise<void> closed;
      s->Close(1000, "test over", [&] { closed.set_value(); });
      closed.get_future().wait_for(5s);
    }
    sessions_.clear();
    work_.reset();
    ioc_.stop();
    thread_.join();
  }

  void StartEmulator() {
    emulator_ = std::make_unique<emulator::NlxEmulator>(emulator::NlxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
  }

  std::shared_ptr<core::UpstreamSession> Session(std::shared_ptr<Conversation> conv) {
    core::SessionOptions so;
    so.id = "test/nlx";
    so.upstream = "NLX";
    so.error_domain = std::string(kErrorDomain);
    so.connection.allow_plaintext = true;
    so.connection.backoff.initial = 10ms;
    so.connection.backoff.max = 50ms;
    so.connection.keepalive.heartbeat_interval = 20ms;
    so.request_timeout = 5s;
    so.login_timeout = 5s;
    ProtocolOptions po;
    po.url = emulator_->url();
    po.language = "en-US";
    po.keys = Keys();
    po.tenant = "default";
    po.pool_key = "00000001";
    po.conversation = std::move(conv);
    po.registry = registry_;
    auto s = core::UpstreamSession::Create(ioc_.get_executor(), std::move(so),
                                           std::make_unique<Protocol>(std::move(po)));
    sessions_.push_back(s);
    return s;
  }

  // Sends a text turn; its answer's first message text (or the error) lands in log().
  void Turn(core::UpstreamSession& s, std::shared_ptr<Conversation> conv, std::string text) {
    core::Request r;
    r.gated = true;
    r.gate_cost = 1;
    r.encode = [conv, text](std::string_view) -> absl::StatusOr<core::Outbound> {
      v1::Turn t;
      t.set_text(text);
      absl::StatusOr<std::string> f = EncodeTurn(t, conv->id(), "");
      if (!f.ok()) return f.status();
      return core::Outbound{*f, false};
    };
    s.Send(std::move(r), [this](absl::StatusOr<core::Reply> reply) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!reply.ok()) {
        log_.push_back(absl::StrCat("error:", core::ErrorReason(reply.status())));
        return;
      }
      log_.push_back(static_cast<const FramePayload&>(*reply->payload).frame.response.messages(0).text());
    });
  }

  std::vector<std::string> log() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

  net::io_context ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::thread thread_;
  std::unique_ptr<emulator::NlxEmulator> emulator_;
  std::shared_ptr<Registry> registry_ = std::make_shared<Registry>();
  std::vector<std::shared_ptr<core::UpstreamSession>> sessions_;
  std::mutex mu_;
  std::vector<std::string> log_;
};

TEST_F(NlxProtocolLive, TurnsWaitForTheAckThenGoOneAtATimeInOrder) {
  StartEmulator();
  emulator_->SetAckDelay(100ms);
  emulator_->SetAnswerDelay(20ms);
  auto conv = std::make_shared<Conversation>("");
  auto s = Session(conv);
  Turn(*s, conv, "one");
  Turn(*s, conv, "two");
  Turn(*s, conv, "three");
  ASSERT_TRUE(WaitFor([&] { return log().size() == 3; }));
  EXPECT_EQ(log(), (std::vector<std::string>{"Turn 1: you said \"one\"", "Turn 2: you said \"two\"",
                                             "Turn 3: you said \"three\""}));
  EXPECT_EQ(emulator_->frames_before_ack(), 0);
  EXPECT_EQ(emulator_->invalid_frames(), 0);
  EXPECT_EQ(emulator_->turns_received(conv->id()), 3);
}

TEST_F(NlxProtocolLive, ADropFailsTheTurnInFlightAndTheNextGoesToTheSameConversation) {
  StartEmulator();
  auto conv = std::make_shared<Conversation>("");
  auto s = Session(conv);
  Turn(*s, conv, "first");
  ASSERT_TRUE(WaitFor([&] { return log().size() == 1; }));
  const std::string id = conv->id();
  emulator_->DropNextTurns(1);
  Turn(*s, conv, "lost");
  Turn(*s, conv, "queued");  // waits behind it; goes out on the new socket
  ASSERT_TRUE(WaitFor([&] { return log().size() == 3; }));
  EXPECT_EQ(log()[1], "error:OUTCOME_UNKNOWN");
  EXPECT_EQ(log()[2], "Turn 3: you said \"queued\"");
  EXPECT_EQ(conv->id(), id);
  EXPECT_EQ(emulator_->conversations(), 1);
  EXPECT_EQ(emulator_->turns_received(id), 3);  // "lost" once, never resent
}

}  // namespace
}  // namespace wsbridge::nlx
