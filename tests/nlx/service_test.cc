// End-to-end: the NLX bridge inside the real daemon (real gRPC server and client), real
// sockets to the in-process NLX emulator on 127.0.0.1.
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/bridge.h"
#include "bridges/core/upstream_config.h"
#include "bridges/nlx/nlx_bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nlx_emulator.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::nlx {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::nlx::v1;
using Stream = grpc::ClientReaderWriter<v1::ConverseRequest, v1::ConverseEvent>;

struct Detail {
  std::string reason;
  std::string domain;
  std::map<std::string, std::string> metadata;
};

Detail ErrorDetail(const grpc::Status& st) {
  Detail d;
  google::rpc::Status s;
  if (!s.ParseFromString(st.error_details())) return d;
  for (const auto& any : s.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) {
      d.reason = info.reason();
      d.domain = info.domain();
      d.metadata.insert(info.metadata().begin(), info.metadata().end());
    }
  }
  return d;
}

v1::Turn Text(const std::string& text) {
  v1::Turn t;
  t.set_text(text);
  return t;
}

v1::ConverseRequest Msg(const std::string& text, const std::string& id = "") {
  v1::ConverseRequest r;
  r.set_conversation_id(id);
  if (!text.empty()) *r.mutable_turn() = Text(text);
  return r;
}

class NlxServiceTest : public ::testing::Test {
 protected:
  void Start(std::function<void(NlxBridgeOptions&)> tweak = nullptr) {
    emulator_ = std::make_unique<emulator::NlxEmulator>(emulator::NlxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
    emulator::NlxEmulatorOptions keys;
    NlxBridgeOptions o;
    o.url = emulator_->url();
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 10ms;
    o.connection.backoff.max = 100ms;
    o.api_key = core::SecretSource::Fixed(keys.api_key);
    o.deployment_key = core::SecretSource::Fixed(keys.deployment_key);
    o.channel_key = core::SecretSource::Fixed("nlx-emulator-channel");
    o.language = "en-US";  // appended to the channel key, as the emulator expects
    o.allow_call_keys = true;
    o.ack_timeout = 5s;
    o.turn_timeout = 5s;
    o.check_interval = 20ms;
    if (tweak) tweak(o);
    registry_.Register(config::v1::NlxBridgeConfig::descriptor()->full_name(),
                       [this, o](const google::protobuf::Message&, const core::BridgeContext& ctx)
                           -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                         auto bridge = NewNlxBridge(o, ctx);
                         if (bridge.ok()) bridge_ = bridge->get();
                         return bridge;
                       });
    config::v1::DaemonConfig cfg;
    cfg.mutable_server()->set_listen("127.0.0.1:0");
    cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
    cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
    auto* b = cfg.add_bridges();
    b->set_name("nlx");
    b->mutable_nlx()->mutable_upstream()->set_url(emulator_->url());
    b->mutable_nlx()->mutable_upstream()->set_allow_plaintext(true);
    absl::Status defaults = config::ApplyConfigDefaults(&cfg);
    ASSERT_TRUE(defaults.ok()) << defaults;
    daemon::DaemonOptions dopts;
    dopts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
    absl::Status started = daemon_->Start();
    ASSERT_TRUE(started.ok()) << started;
    ASSERT_NE(bridge_, nullptr);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::NlxService::NewStub(channel_);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
      daemon_.reset();
    }
    if (emulator_ != nullptr) emulator_->Stop();
  }

  struct SendResult {
    grpc::Status status;
    v1::SendResponse resp;
  };
  SendResult Send(const std::string& id, const v1::Turn& turn,
                  std::chrono::milliseconds deadline = 10s,
                  const std::map<std::string, std::string>& md = {}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    for (const auto& [k, v] : md) ctx.AddMetadata(k, v);
    v1::SendRequest req;
    req.set_conversation_id(id);
    *req.mutable_turn() = turn;
    SendResult r;
    r.status = stub_->Send(&ctx, req, &r.resp);
    return r;
  }

  // A Converse call with a 15s deadline (a hung test fails instead of hanging).
  struct Call {
    grpc::ClientContext ctx;
    std::unique_ptr<Stream> stream;
    v1::ConverseEvent Next() {
      v1::ConverseEvent e;
      if (!stream->Read(&e)) e.Clear();
      return e;
    }
  };
  std::unique_ptr<Call> Converse(const std::map<std::string, std::string>& md = {}) {
    auto c = std::make_unique<Call>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + 15s);
    for (const auto& [k, v] : md) c->ctx.AddMetadata(k, v);
    c->stream = stub_->Converse(&c->ctx);
    return c;
  }

  std::unique_ptr<emulator::NlxEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  core::Bridge* bridge_ = nullptr;  // owned by daemon_
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NlxService::Stub> stub_;
};

TEST_F(NlxServiceTest, ConverseOpensThenAnswersTurnsInOrderTypedWithTheRawJson) {
  Start();
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("hello there")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened()) << e.DebugString();
  const std::string id = e.opened().conversation_id();
  EXPECT_FALSE(e.opened().resumed());
  EXPECT_TRUE(emulator_->knows(id)) << id;
  ASSERT_TRUE(c->stream->Write(Msg("multi")));
  ASSERT_TRUE(c->stream->Write(Msg("choices")));
  ASSERT_TRUE(c->stream->Write(Msg("extra")));
  c->stream->WritesDone();
  std::vector<v1::ConversationResponse> rs;
  for (v1::ConverseEvent ev = c->Next(); ev.event_case() != v1::ConverseEvent::EVENT_NOT_SET; ev = c->Next()) {
    ASSERT_TRUE(ev.has_response()) << ev.DebugString();
    rs.push_back(ev.response());
  }
  grpc::Status st = c->stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(rs.size(), 4u);
  for (size_t i = 0; i < rs.size(); ++i) {
    EXPECT_EQ(rs[i].turn(), i + 1);
    EXPECT_EQ(rs[i].conversation_id(), id);
  }
  ASSERT_EQ(rs[0].messages_size(), 1);
  EXPECT_EQ(rs[0].messages(0).text(), "Turn 1: you said \"hello there\"");
  EXPECT_EQ(rs[0].messages(0).type(), "text");
  EXPECT_EQ(rs[0].messages(0).message_id().size(), 36u);
  EXPECT_EQ(rs[1].messages_size(), 3);
  ASSERT_EQ(rs[2].messages_size(), 1);
  ASSERT_EQ(rs[2].messages(0).choices_size(), 2);
  EXPECT_FALSE(rs[2].messages(0).choices(0).choice_id().empty());
  EXPECT_FALSE(rs[2].messages(0).node_id().empty());
  // Fields the proto does not model survive in the JSON, and the emulator saw the
  // language the bridge adds to every turn.
  EXPECT_TRUE(absl::StrContains(rs[3].json(), "\"emulator\"")) << rs[3].json();
  EXPECT_TRUE(absl::StrContains(rs[3].json(), "modalities")) << rs[3].json();
  EXPECT_TRUE(absl::StrContains(rs[0].json(), "\"languageCode\":\"en-US\"")) << rs[0].json();
  // Nothing went out before the ack; half-close closed the socket after the last response.
  EXPECT_EQ(emulator_->frames_before_ack(), 0);
  EXPECT_EQ(emulator_->turns_received(id), 4);
  EXPECT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }, 5s));
  EXPECT_TRUE(WaitFor([&] { return bridge_->ListSessions().empty(); }, 5s));
}

TEST_F(NlxServiceTest, SendStartsAConversationAndLaterCallsResumeItById) {
  Start();
  SendResult a = Send("", Text("first"));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  const std::string id = a.resp.conversation_id();
  ASSERT_TRUE(emulator_->knows(id)) << id;
  EXPECT_EQ(a.resp.response().turn(), 1u);
  EXPECT_EQ(a.resp.response().messages(0).text(), "Turn 1: you said \"first\"");
  // The caller went away; another call resumes by id on the same socket (still open).
  SendResult b = Send(id, Text("second"));
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.resp.conversation_id(), id);
  EXPECT_EQ(b.resp.response().messages(0).text(), "Turn 2: you said \"second\"");
  EXPECT_EQ(emulator_->handshakes(), 1);
  // A Converse resume of the same id shares that socket too.
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("third", id)));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened()) << e.DebugString();
  EXPECT_EQ(e.opened().conversation_id(), id);
  EXPECT_TRUE(e.opened().resumed());
  e = c->Next();
  ASSERT_TRUE(e.has_response()) << e.DebugString();
  EXPECT_EQ(e.response().turn(), 1u);
  EXPECT_EQ(e.response().messages(0).text(), "Turn 3: you said \"third\"");
  c->stream->WritesDone();
  EXPECT_TRUE(c->stream->Finish().ok());
  EXPECT_EQ(emulator_->handshakes(), 1);
  // Its socket closed with the Converse; a later resume connects with the id again.
  ASSERT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }, 5s));
  SendResult d = Send(id, Text("fourth"));
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.resp.response().messages(0).text(), "Turn 4: you said \"fourth\"");
  EXPECT_EQ(emulator_->handshakes(), 2);
  EXPECT_EQ(emulator_->conversations(), 1);
}

TEST_F(NlxServiceTest, ADropMidTurnReportsOutcomeUnknownThenReconnectsToTheSameConversation) {
  Start();
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened()) << e.DebugString();
  const std::string id = e.opened().conversation_id();
  emulator_->DropNextTurns(1);
  ASSERT_TRUE(c->stream->Write(Msg("lost one")));
  e = c->Next();
  ASSERT_TRUE(e.has_turn_failed()) << e.DebugString();
  EXPECT_EQ(e.turn_failed().turn(), 1u);
  EXPECT_EQ(e.turn_failed().code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_EQ(e.turn_failed().reason(), "OUTCOME_UNKNOWN");
  e = c->Next();
  ASSERT_TRUE(e.has_reconnected()) << e.DebugString();
  EXPECT_EQ(e.reconnected().attempt(), 1u);
  EXPECT_EQ(e.reconnected().conversation_id(), id);
  ASSERT_TRUE(c->stream->Write(Msg("next")));
  e = c->Next();
  ASSERT_TRUE(e.has_response()) << e.DebugString();
  EXPECT_EQ(e.response().turn(), 2u);
  // NLX counted the lost turn once (never resent) and this one as its second.
  EXPECT_EQ(e.response().messages(0).text(), "Turn 2: you said \"next\"");
  EXPECT_EQ(emulator_->turns_received(id), 2);
  EXPECT_EQ(emulator_->conversations(), 1);
  c->stream->WritesDone();
  EXPECT_TRUE(c->stream->Finish().ok());
}

TEST_F(NlxServiceTest, SendOnADropGetsOutcomeUnknownAndIsNotResent) {
  Start();
  SendResult a = Send("", Text("hi"));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  const std::string id = a.resp.conversation_id();
  emulator_->DropNextTurns(1);
  SendResult b = Send(id, Text("dropped"));
  EXPECT_EQ(b.status.error_code(), grpc::StatusCode::UNAVAILABLE) << b.status.error_message();
  Detail d = ErrorDetail(b.status);
  EXPECT_EQ(d.reason, "OUTCOME_UNKNOWN");
  EXPECT_EQ(d.domain, "nlx.wsbridge.dev");
  SendResult c = Send(id, Text("after"));
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.resp.response().messages(0).text(), "Turn 3: you said \"after\"");
  EXPECT_EQ(emulator_->turns_received(id), 3);
}

TEST_F(NlxServiceTest, ATurnPastItsDeadlineFailsTurnTimeoutAndTheSocketIsReplaced) {
  Start();
  SendResult a = Send("", Text("hi"));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  const std::string id = a.resp.conversation_id();
  SendResult b = Send(id, Text("silent please"), 300ms);
  EXPECT_EQ(b.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << b.status.error_message();
  // The next turn is answered on a fresh socket of the same conversation, never with
  // an answer meant for the abandoned one.
  SendResult c = Send(id, Text("again"));
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(c.resp.response().messages(0).text(), "Turn 3: you said \"again\"");
  EXPECT_EQ(emulator_->handshakes(), 2);
}

TEST_F(NlxServiceTest, ConverseTurnTimeoutIsATurnFailedAndTheStreamGoesOn) {
  Start([](NlxBridgeOptions& o) { o.turn_timeout = 300ms; });
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("silent")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened()) << e.DebugString();
  e = c->Next();
  ASSERT_TRUE(e.has_turn_failed()) << e.DebugString();
  EXPECT_EQ(e.turn_failed().reason(), "TURN_TIMEOUT");
  EXPECT_EQ(e.turn_failed().code(), static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED));
  e = c->Next();
  ASSERT_TRUE(e.has_reconnected()) << e.DebugString();
  ASSERT_TRUE(c->stream->Write(Msg("ok now")));
  e = c->Next();
  ASSERT_TRUE(e.has_response()) << e.DebugString();
  EXPECT_EQ(e.response().turn(), 2u);
  c->stream->WritesDone();
  EXPECT_TRUE(c->stream->Finish().ok());
}

TEST_F(NlxServiceTest, RefusedKeysAreUnauthenticatedNamingTheKeyWithoutAReconnectStorm) {
  Start();
  const std::map<std::string, std::string> bad = {{"x-nlx-api-key", "wrong-key"}};
  SendResult a = Send("", Text("hi"), 10s, bad);
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << a.status.error_message();
  EXPECT_TRUE(absl::StrContains(a.status.error_message(), "apiKey")) << a.status.error_message();
  EXPECT_FALSE(absl::StrContains(a.status.error_message(), "wrong-key"));
  Detail d = ErrorDetail(a.status);
  EXPECT_EQ(d.reason, "KEYS_REFUSED");
  EXPECT_EQ(d.metadata["http_status"], "401");
  const int handshakes = emulator_->handshakes();
  EXPECT_EQ(handshakes, 1);
  for (int i = 0; i < 20; ++i) {
    SendResult r = Send("", Text("again"), 10s, bad);
    ASSERT_EQ(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << i;
  }
  auto c = Converse(bad);
  ASSERT_TRUE(c->stream->Write(Msg("hi")));
  v1::ConverseEvent e;
  EXPECT_FALSE(c->stream->Read(&e));
  grpc::Status st = c->stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).reason, "KEYS_REFUSED");
  EXPECT_EQ(emulator_->handshakes(), handshakes);  // no storm
  // The configured (good) keys are a different tenant and still work.
  SendResult ok = Send("", Text("fine"));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() <= 1; }, 5s));
}

TEST_F(NlxServiceTest, PerCallKeysAreATenantOfTheirOwn) {
  Start();
  emulator::NlxEmulatorOptions keys;
  const std::map<std::string, std::string> md = {{"x-nlx-api-key", keys.api_key},
                                                 {"x-nlx-deployment-key", keys.deployment_key},
                                                 {"x-nlx-channel-key", keys.channel_key}};
  SendResult a = Send("", Text("mine"), 10s, md);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  const std::string id = a.resp.conversation_id();
  // The same id with the configured keys is another tenant's: not that socket.
  SendResult b = Send(id, Text("yours"));
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.resp.conversation_id(), id);
  EXPECT_EQ(emulator_->handshakes(), 2);
  // With the same keys again, the call finds its own socket.
  SendResult c = Send(id, Text("mine again"), 10s, md);
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  EXPECT_EQ(emulator_->handshakes(), 2);
  EXPECT_EQ(c.resp.response().messages(0).text(), "Turn 3: you said \"mine again\"");
}

TEST_F(NlxServiceTest, MetadataKeysAreRefusedUnlessTheBridgeAllowsThem) {
  Start([](NlxBridgeOptions& o) { o.allow_call_keys = false; });
  SendResult a = Send("", Text("hi"), 10s, {{"x-nlx-api-key", "some-key"}});
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(ErrorDetail(a.status).reason, "KEYS_MISSING");
  EXPECT_TRUE(absl::StrContains(a.status.error_message(), "allow_call_keys")) << a.status.error_message();
  EXPECT_EQ(emulator_->handshakes(), 0);
}

TEST_F(NlxServiceTest, A403AtTheUpgradeIsAnAuthFailureToo) {
  Start();
  emulator_->SetRefuseUpgrades(403);
  SendResult a = Send("", Text("hi"));
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << a.status.error_message();
  EXPECT_EQ(ErrorDetail(a.status).reason, "KEYS_REFUSED");
  SendResult b = Send("", Text("hi"));
  EXPECT_EQ(b.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(emulator_->handshakes(), 1);
}

TEST_F(NlxServiceTest, AnAckThatDoesNotComeFailsTheOpenAndClosesTheSocket) {
  Start([](NlxBridgeOptions& o) { o.ack_timeout = 200ms; });
  emulator_->SetWithholdAck(true);
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("hi")));
  v1::ConverseEvent e;
  EXPECT_FALSE(c->stream->Read(&e)) << e.DebugString();
  grpc::Status st = c->stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).reason, "ACK_TIMEOUT");
  SendResult s = Send("", Text("hi"));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE) << s.status.error_message();
  EXPECT_EQ(ErrorDetail(s.status).reason, "ACK_TIMEOUT");
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }, 5s));
  EXPECT_TRUE(WaitFor([&] { return bridge_->ListSessions().empty(); }, 5s));
  EXPECT_EQ(emulator_->total_turns(), 0);
  EXPECT_EQ(emulator_->frames_before_ack(), 0);
}

TEST_F(NlxServiceTest, BadInputIsInvalidArgumentWithAClearMessage) {
  Start();
  SendResult none;
  {
    grpc::ClientContext ctx;
    v1::SendRequest req;
    none.status = stub_->Send(&ctx, req, &none.resp);
  }
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(none.status.error_message(), "turn is required")) << none.status.error_message();
  SendResult empty = Send("", Text(""));
  EXPECT_EQ(empty.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << empty.status.error_message();
  SendResult bad_id = Send("has space", Text("hi"));
  EXPECT_EQ(bad_id.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bad_id.status.error_message(), "conversation")) << bad_id.status.error_message();
  v1::Turn extra = Text("hi");
  extra.set_extra_json("[1]");
  SendResult bad_extra = Send("", extra);
  EXPECT_EQ(bad_extra.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(emulator_->handshakes(), 0);  // bad requests never open a socket

  // Converse: a bad later turn is a turn_failed; another conversation id ends the stream.
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("hi")));
  ASSERT_TRUE(c->Next().has_opened());
  ASSERT_TRUE(c->Next().has_response());
  ASSERT_TRUE(c->stream->Write(Msg("")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_turn_failed()) << e.DebugString();
  EXPECT_EQ(e.turn_failed().turn(), 2u);
  EXPECT_EQ(e.turn_failed().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_TRUE(absl::StrContains(e.turn_failed().message(), "turn is required")) << e.turn_failed().message();
  ASSERT_TRUE(c->stream->Write(Msg("hi", "another-conversation")));
  EXPECT_FALSE(c->stream->Read(&e));
  grpc::Status st = c->stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ErrorDetail(st).reason, "CONVERSATION_MISMATCH");
}

TEST_F(NlxServiceTest, PushesUnknownFramesAndUpstreamErrorsReachConverse) {
  Start();
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened());
  const std::string id = e.opened().conversation_id();
  ASSERT_EQ(emulator_->Push(id, "an agent joined"), 1);
  e = c->Next();
  ASSERT_TRUE(e.has_response()) << e.DebugString();
  EXPECT_EQ(e.response().turn(), 0u);
  EXPECT_EQ(e.response().messages(0).text(), "an agent joined");
  ASSERT_EQ(emulator_->PushRaw(id, R"({"type":"typing","who":"agent"})"), 1);
  e = c->Next();
  ASSERT_TRUE(e.has_unknown()) << e.DebugString();
  EXPECT_EQ(e.unknown().json(), R"({"type":"typing","who":"agent"})");
  ASSERT_TRUE(c->stream->Write(Msg("error please")));
  e = c->Next();
  ASSERT_TRUE(e.has_turn_failed()) << e.DebugString();
  EXPECT_EQ(e.turn_failed().code(), static_cast<int>(grpc::StatusCode::INTERNAL));
  EXPECT_EQ(e.turn_failed().reason(), "INTERNAL_SERVER_ERROR");
  EXPECT_TRUE(absl::StrContains(e.turn_failed().upstream_json(), "Internal server error"))
      << e.turn_failed().upstream_json();
  c->stream->WritesDone();
  EXPECT_TRUE(c->stream->Finish().ok());
}

// The issue's figure: 1,000 conversations open at once (one upstream socket each), each
// answered in its own words, on its own id, and every socket closed when its call ends.
// One thread drives all the calls (write to all, then read all) so the conversations are
// open together; the in-process emulator and daemon need ~3 fds per conversation.
TEST_F(NlxServiceTest, ConcurrentConversationsStayIsolatedAndTheirSocketsClose) {
  constexpr int kConversations = 1000;
  rlimit fds{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &fds), 0);
  fds.rlim_cur = fds.rlim_max;
  setrlimit(RLIMIT_NOFILE, &fds);
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &fds), 0);
  if (fds.rlim_cur < 4 * kConversations) {
    GTEST_SKIP() << "needs " << 4 * kConversations << " file descriptors, the hard limit is "
                 << fds.rlim_max << " (raise it with ulimit -Hn)";
  }
  Start([](NlxBridgeOptions& o) {
    o.idle_conversation_timeout = 200ms;
    o.max_conversations = kConversations;
    // Not a test of timeouts: under TSan on a busy machine, 1,000 conversations opening
    // at once keep some turns waiting longer than the fixture's 5 s (the calls' 60 s
    // deadline still ends a hung run).
    o.ack_timeout = 60s;
    o.turn_timeout = 60s;
  });
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < kConversations; ++i) {
    auto c = std::make_unique<Call>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + 60s);  // a hung test fails
    c->stream = stub_->Converse(&c->ctx);
    calls.push_back(std::move(c));
  }
  for (int i = 0; i < kConversations; ++i) {
    ASSERT_TRUE(calls[i]->stream->Write(Msg(absl::StrCat("from ", i)))) << i;
  }
  std::vector<std::string> ids(kConversations);
  for (int i = 0; i < kConversations; ++i) {
    v1::ConverseEvent e = calls[i]->Next();
    ASSERT_TRUE(e.has_opened()) << i << ": " << e.ShortDebugString();
    ids[i] = e.opened().conversation_id();
    e = calls[i]->Next();
    ASSERT_TRUE(e.has_response()) << i << ": " << e.ShortDebugString();
    EXPECT_EQ(e.response().conversation_id(), ids[i]);
    ASSERT_GT(e.response().messages_size(), 0) << i;
    EXPECT_EQ(e.response().messages(0).text(), absl::StrCat("Turn 1: you said \"from ", i, "\""));
  }
  // All open together: one upstream socket per conversation.
  EXPECT_EQ(emulator_->open_connections(), kConversations);
  for (int i = 0; i < kConversations; ++i) {
    ASSERT_TRUE(calls[i]->stream->Write(Msg(absl::StrCat("again ", i)))) << i;
  }
  for (int i = 0; i < kConversations; ++i) {
    v1::ConverseEvent e = calls[i]->Next();
    ASSERT_TRUE(e.has_response()) << i << ": " << e.ShortDebugString();
    EXPECT_EQ(e.response().conversation_id(), ids[i]);
    ASSERT_GT(e.response().messages_size(), 0) << i;
    EXPECT_EQ(e.response().messages(0).text(), absl::StrCat("Turn 2: you said \"again ", i, "\""));
    EXPECT_EQ(emulator_->turns_received(ids[i]), 2) << i;
  }
  for (auto& c : calls) c->stream->WritesDone();
  int ok = 0;
  for (auto& c : calls) ok += c->stream->Finish().ok() ? 1 : 0;
  EXPECT_EQ(ok, kConversations);
  EXPECT_EQ(emulator_->conversations(), kConversations);
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::unique(ids.begin(), ids.end()), ids.end());
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }, 10s));
  EXPECT_TRUE(WaitFor([&] { return bridge_->ListSessions().empty(); }, 10s));
}

TEST_F(NlxServiceTest, CancelClosesTheSocketAtOnce) {
  Start();
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("silent")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened());
  const std::string id = e.opened().conversation_id();
  ASSERT_TRUE(WaitFor([&] { return emulator_->turns_received(id) == 1; }, 5s));
  c->ctx.TryCancel();
  EXPECT_EQ(c->stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }, 5s));
}

// A caller that goes with a turn in flight: the turn is dropped (never resent), the
// conversation's socket closed, the call counted CANCELLED and no longer held open.
TEST_F(NlxServiceTest, ACancelledStreamDropsItsTurnInFlightAndCountsCancelled) {
  Start();
  auto c = Converse();
  ASSERT_TRUE(c->stream->Write(Msg("hello")));
  v1::ConverseEvent e = c->Next();
  ASSERT_TRUE(e.has_opened());
  const std::string id = e.opened().conversation_id();
  ASSERT_TRUE(c->Next().has_response());
  ASSERT_TRUE(c->stream->Write(Msg("silent")));
  ASSERT_TRUE(WaitFor([&] { return emulator_->turns_received(id) == 2; }, 5s));
  c->ctx.TryCancel();
  while (c->stream->Read(&e)) {
  }
  EXPECT_EQ(c->stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }, 5s));
  EXPECT_TRUE(WaitFor([&] { return bridge_->ListSessions().empty(); }, 5s));
  auto cancelled = [&] {
    return daemon_->metrics()
        .GetCounter("wsbridge_grpc_requests_total", "",
                    {{"method", "/wsbridge.nlx.v1.NlxService/Converse"}, {"code", "CANCELLED"}})
        .value();
  };
  EXPECT_TRUE(WaitFor([&] { return cancelled() == 1; }, 5s));
  EXPECT_TRUE(WaitFor([&] {
    return daemon_->metrics().Render().find("wsbridge_grpc_calls_in_flight 0\n") != std::string::npos;
  }, 5s));
  EXPECT_EQ(emulator_->turns_received(id), 2);
}

}  // namespace
}  // namespace wsbridge::nlx
