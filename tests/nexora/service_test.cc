// End-to-end: the Nexora bridge inside the real daemon (real gRPC server and client),
// real sockets to the in-process Nexora emulator on 127.0.0.1 (wss:// and https://
// where login matters).
#include <algorithm>
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
#include "bridges/nexora/nexora_bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nexora_emulator.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"

namespace wsbridge::nexora {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::nexora::v1;

constexpr char kKey[] = "nxr_service_test_key";

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

struct Outcome {
  std::vector<v1::ChatEvent> events;
  grpc::Status status;

  int Count(v1::ChatEvent::EventCase c) const {
    return static_cast<int>(std::count_if(events.begin(), events.end(),
                                          [c](const v1::ChatEvent& e) { return e.event_case() == c; }));
  }
  // The chunks' text after the last restart (what a caller shows).
  std::string Text() const {
    std::string out;
    for (const auto& e : events) {
      if (e.has_restarted()) out.clear();
      if (e.has_chunk()) out += e.chunk().content();
    }
    return out;
  }
};

class NexoraServiceTest : public ::testing::Test {
 protected:
  // The emulator (TLS when `tls`), then the bridge inside the real daemon, built by a
  // factory from test-sized options.
  void Start(emulator::NexoraEmulatorOptions eopts = {},
             std::function<void(NexoraBridgeOptions&)> tweak = nullptr) {
    const bool tls = eopts.tls;
    if (tls) {
      ca_ = pki_.MakeCa("nexora-test-ca");
      testing::CertAndKey cert = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"});
      eopts.cert_pem = cert.cert_pem;
      eopts.key_pem = cert.key_pem;
    }
    emulator_ = std::make_unique<emulator::NexoraEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());

    NexoraBridgeOptions o;
    o.url = emulator_->url();
    o.connection.allow_plaintext = !tls;
    if (tls) o.connection.tls.ca_file = ca_.cert_file;
    o.connection.backoff.initial = 10ms;
    o.connection.backoff.max = 100ms;
    o.api_key = core::SecretSource::Fixed(kKey);
    o.allow_call_token = true;
    o.answer_idle_timeout = 5s;
    o.http_timeout = 5s;
    o.auth_retry_after = 30s;
    if (tweak) tweak(o);
    registry_.Register(config::v1::NexoraBridgeConfig::descriptor()->full_name(),
                       [this, o](const google::protobuf::Message&, const core::BridgeContext& ctx)
                           -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                         auto bridge = NewNexoraBridge(o, ctx);
                         if (bridge.ok()) bridge_ = bridge->get();
                         return bridge;
                       });
    config::v1::DaemonConfig cfg;
    cfg.mutable_server()->set_listen("127.0.0.1:0");
    cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
    cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
    auto* b = cfg.add_bridges();
    b->set_name("nexora");
    b->mutable_nexora()->mutable_upstream()->set_url(emulator_->url());
    b->mutable_nexora()->mutable_upstream()->set_allow_plaintext(!tls);
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
    stub_ = v1::NexoraService::NewStub(channel_);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
      daemon_.reset();
    }
    if (emulator_ != nullptr) emulator_->Stop();
  }

  Outcome Send(const std::string& chat, const std::string& content, const std::string& cmid = "",
               const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    if (!token.empty()) ctx.AddMetadata(std::string(kTokenMetadata), token);
    v1::SendMessageRequest req;
    req.set_chat_id(chat);
    req.set_content(content);
    req.set_client_message_id(cmid);
    auto reader = stub_->SendMessage(&ctx, req);
    Outcome out;
    v1::ChatEvent ev;
    while (reader->Read(&ev)) out.events.push_back(ev);
    out.status = reader->Finish();
    return out;
  }

  uint64_t Reconnects() {
    uint64_t n = 0;
    for (const auto& s : bridge_->ListSessions()) n += s.reconnects();
    return n;
  }

  // Chat sinks held on the sessions (one per open Chat stream).
  uint32_t Subscribers() {
    uint32_t n = 0;
    for (const auto& s : bridge_->ListSessions()) n += s.subscribers();
    return n;
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_;
  std::unique_ptr<emulator::NexoraEmulator> emulator_;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  core::Bridge* bridge_ = nullptr;  // owned by daemon_
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NexoraService::Stub> stub_;
};

TEST_F(NexoraServiceTest, StreamsAWholeAnswerWithEveryEventTyped) {
  Start();
  Outcome o = Send("chat-1", "status please");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  ASSERT_EQ(o.events.size(), 9u);
  using E = v1::ChatEvent;
  const std::vector<E::EventCase> want = {E::kAccepted,      E::kChunk,          E::kToolCall,
                                          E::kToolResult,    E::kSubAgentStart,  E::kSubAgentComplete,
                                          E::kChunk,         E::kChunk,          E::kDone};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(o.events[i].event_case(), want[i]) << i;
  // The generated client_message_id (a UUID v4) is on every event and was sent upstream.
  const std::string cmid = o.events[0].accepted().client_message_id();
  EXPECT_TRUE(o.events[0].accepted().generated());
  EXPECT_EQ(cmid.size(), 36u);
  EXPECT_EQ(emulator_->messages_received(cmid), 1);
  const std::string mid = o.events[1].message_id();
  EXPECT_FALSE(mid.empty());
  for (size_t i = 1; i < o.events.size(); ++i) {
    EXPECT_EQ(o.events[i].client_message_id(), cmid);
    EXPECT_EQ(o.events[i].message_id(), mid) << "event " << i;
  }
  EXPECT_EQ(o.events[2].tool_call().tool(), "github");
  EXPECT_TRUE(absl::StrContains(o.events[2].tool_call().input_json(), R"("action":"list_issues")"))
      << o.events[2].tool_call().input_json();
  EXPECT_EQ(o.events[3].tool_result().result_json(), R"({"issues":[]})");
  EXPECT_EQ(o.events[4].sub_agent_start().agent_name(), "Research Assistant");
  EXPECT_EQ(o.events[4].sub_agent_start().task_id(), o.events[5].sub_agent_complete().task_id());
  EXPECT_EQ(o.events[5].sub_agent_complete().result(), "No open issues found.");
  EXPECT_EQ(o.Text(), "Let me check that. You asked: status please. There are no open issues.");
}

TEST_F(NexoraServiceTest, UnknownEventTypesPassThroughRaw) {
  Start();
  emulator_->SetScript({{R"({"type":"thinking","text":"hmm","n":1})"}, {R"({"type":"chunk","content":"ok"})"}});
  Outcome o = Send("chat-u", "x");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  ASSERT_EQ(o.Count(v1::ChatEvent::kUnknown), 1);
  const v1::ChatEvent& u = o.events[1];
  EXPECT_EQ(u.unknown().type(), "thinking");
  EXPECT_TRUE(absl::StrContains(u.unknown().json(), R"("text":"hmm")")) << u.unknown().json();
  EXPECT_EQ(u.client_message_id(), o.events[0].accepted().client_message_id());
  EXPECT_EQ(o.Count(v1::ChatEvent::kDone), 1);
}

TEST_F(NexoraServiceTest, AnUpstreamErrorEndsTheCallWithAMappedStatusAndErrorInfo) {
  Start();
  emulator_->InjectError("all_providers_exhausted", "All LLM providers failed", 2);
  Outcome o = Send("chat-e", "hello");
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << o.status.error_message();
  Detail d = ErrorDetail(o.status);
  EXPECT_EQ(d.reason, "all_providers_exhausted");
  EXPECT_EQ(d.domain, "nexora.wsbridge.dev");
  EXPECT_EQ(d.metadata["upstream_message"], "All LLM providers failed");
  // The events before the error were delivered; the error itself is the status.
  EXPECT_EQ(o.Count(v1::ChatEvent::kChunk), 1);
  EXPECT_EQ(o.Count(v1::ChatEvent::kToolCall), 1);
  EXPECT_EQ(o.Count(v1::ChatEvent::kError), 0);
  // A failed answer is not saved upstream: the same id may be sent again and answered.
  const std::string cmid = o.events[0].accepted().client_message_id();
  Outcome again = Send("chat-e", "hello", cmid);
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.Count(v1::ChatEvent::kDone), 1);
  EXPECT_FALSE(again.events[0].accepted().generated());
}

TEST_F(NexoraServiceTest, ADropBeforeDoneResendsTheSameIdAndTheCallerSeesTheAnswerOnce) {
  Start();
  emulator_->DropMidAnswer(3, 1);
  Outcome o = Send("chat-d", "resend me", "cmid-drop-1");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  // Sent twice with the same id; the answer restarted once and ended once.
  EXPECT_EQ(emulator_->messages_received("cmid-drop-1"), 2);
  EXPECT_EQ(o.Count(v1::ChatEvent::kRestarted), 1);
  EXPECT_EQ(o.Count(v1::ChatEvent::kDone), 1);
  auto restarted = std::find_if(o.events.begin(), o.events.end(),
                                [](const v1::ChatEvent& e) { return e.has_restarted(); });
  EXPECT_EQ(restarted->restarted().attempt(), 1u);
  EXPECT_EQ(restarted->client_message_id(), "cmid-drop-1");
  // Everything after the restart is the whole answer, once.
  EXPECT_EQ(o.Text(), "Let me check that. You asked: resend me. There are no open issues.");
  EXPECT_EQ(std::count_if(restarted, o.events.end(), [](const v1::ChatEvent& e) { return e.has_tool_call(); }), 1);
}

TEST_F(NexoraServiceTest, ADropAfterTheUpstreamFinishedAnywayEndsWithDuplicate) {
  Start();
  emulator_->SetFinishAfterDrop(true);
  emulator_->DropMidAnswer(2, 1);
  Outcome o = Send("chat-dup", "finish anyway", "cmid-dup-1");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(emulator_->messages_received("cmid-dup-1"), 2);
  ASSERT_EQ(o.Count(v1::ChatEvent::kDuplicate), 1);
  EXPECT_EQ(o.Count(v1::ChatEvent::kDone), 0);
  const v1::ChatEvent& last = o.events.back();
  ASSERT_TRUE(last.has_duplicate());
  // The existing answer's id: the one its first chunk carried before the drop.
  EXPECT_EQ(last.duplicate().message_id(), o.events[1].message_id());
  EXPECT_EQ(last.message_id(), last.duplicate().message_id());
  EXPECT_EQ(o.Count(v1::ChatEvent::kRestarted), 1);
}

TEST_F(NexoraServiceTest, ACompletedIdSentAgainIsADuplicateWithTheExistingMessageId) {
  Start();
  Outcome first = Send("chat-again", "once", "cmid-again");
  ASSERT_TRUE(first.status.ok());
  Outcome second = Send("chat-again", "once", "cmid-again");
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  ASSERT_EQ(second.events.size(), 2u);
  EXPECT_TRUE(second.events[1].has_duplicate());
  EXPECT_EQ(second.events[1].duplicate().message_id(), first.events.back().message_id());
  EXPECT_EQ(emulator_->answers_started(), 1);
}

TEST_F(NexoraServiceTest, ResendsAreBoundedAndThenTheOutcomeIsUnknown) {
  Start({}, [](NexoraBridgeOptions& o) { o.max_resends = 1; });
  emulator_->DropMidAnswer(1, -1);
  Outcome o = Send("chat-x", "never finishes", "cmid-x");
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << o.status.error_message();
  EXPECT_EQ(ErrorDetail(o.status).reason, "OUTCOME_UNKNOWN");
  EXPECT_TRUE(absl::StrContains(o.status.error_message(), "max_resends")) << o.status.error_message();
  EXPECT_EQ(emulator_->messages_received("cmid-x"), 2);
}

TEST_F(NexoraServiceTest, AnExpiredJwtIsReplacedThroughAnHttpsLoginAndTheCallContinues) {
  emulator::NexoraEmulatorOptions e;
  e.tls = true;
  e.users = {{"bot@example.com", "pw-s3cret-value"}};
  e.jwt_lifetime = 0ms;  // the start-up login's JWT is expired at once
  Start(std::move(e), [](NexoraBridgeOptions& o) {
    o.api_key = nullptr;
    o.email = core::SecretSource::Fixed("bot@example.com");
    o.password = core::SecretSource::Fixed("pw-s3cret-value");
  });
  ASSERT_TRUE(WaitFor([&] { return emulator_->logins() == 1; }));
  emulator_->SetJwtLifetime(std::chrono::minutes(15));
  Outcome o = Send("chat-jwt", "after expiry");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(o.Count(v1::ChatEvent::kDone), 1);
  EXPECT_EQ(emulator_->logins(), 2);
  EXPECT_GE(emulator_->refused_upgrades(), 1);
  // The new JWT serves further chats without another login, and creating a chat.
  Outcome other = Send("chat-jwt-2", "again");
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  grpc::ClientContext ctx;
  v1::CreateChatRequest req;
  req.set_agent_id("agent-1");
  v1::CreateChatResponse resp;
  ASSERT_TRUE(stub_->CreateChat(&ctx, req, &resp).ok());
  EXPECT_EQ(emulator_->logins(), 2);
  // Neither the password nor a token reaches admin output.
  for (const auto& s : bridge_->ListSessions()) {
    const std::string text = s.DebugString();
    EXPECT_FALSE(absl::StrContains(text, "pw-s3cret-value")) << text;
    EXPECT_FALSE(absl::StrContains(text, "eyJ")) << text;  // a JWT's header
    EXPECT_TRUE(absl::StrContains(s.target(), "token=[redacted]")) << s.target();
  }
}

TEST_F(NexoraServiceTest, ManyChatsRefusedForOneExpiredJwtShareOneLogin) {
  emulator::NexoraEmulatorOptions e;
  e.tls = true;
  e.users = {{"bot@example.com", "pw-many"}};
  e.jwt_lifetime = 0ms;
  Start(std::move(e), [](NexoraBridgeOptions& o) {
    o.api_key = nullptr;
    o.email = core::SecretSource::Fixed("bot@example.com");
    o.password = core::SecretSource::Fixed("pw-many");
  });
  ASSERT_TRUE(WaitFor([&] { return emulator_->logins() == 1; }));
  emulator_->SetJwtLifetime(std::chrono::minutes(15));
  constexpr int kChats = 100;
  std::vector<Outcome> out(kChats);
  std::vector<std::thread> threads;
  for (int i = 0; i < kChats; ++i) {
    threads.emplace_back([&, i] { out[i] = Send(absl::StrCat("jwt-chat-", i), "hi"); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kChats; ++i) {
    ASSERT_TRUE(out[i].status.ok()) << i << ": " << out[i].status.error_message();
    EXPECT_EQ(out[i].Count(v1::ChatEvent::kDone), 1);
  }
  // Every socket refused for the expired JWT waited for the same single re-login.
  EXPECT_EQ(emulator_->logins(), 2);
  EXPECT_GE(emulator_->refused_upgrades(), 1);
}

TEST_F(NexoraServiceTest, AWrongPasswordIsUnauthenticatedWithoutALoginStorm) {
  emulator::NexoraEmulatorOptions e;
  e.tls = true;
  e.users = {{"bot@example.com", "right"}};
  Start(std::move(e), [](NexoraBridgeOptions& o) {
    o.api_key = nullptr;
    o.email = core::SecretSource::Fixed("bot@example.com");
    o.password = core::SecretSource::Fixed("wrong-password");
  });
  Outcome o = Send("chat-pw", "hi");
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << o.status.error_message();
  EXPECT_FALSE(absl::StrContains(o.status.error_message(), "wrong-password"));
  Outcome again = Send("chat-pw-2", "hi");
  EXPECT_EQ(again.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // The refusal holds for auth_retry_after: one login attempt for both calls.
  EXPECT_EQ(emulator_->refused_logins(), 1);
  EXPECT_EQ(emulator_->refused_upgrades(), 0);
}

TEST_F(NexoraServiceTest, NoCredentialOrAWrongKeyIsUnauthenticatedWithoutAReconnectStorm) {
  Start({}, [](NexoraBridgeOptions& o) { o.api_key = nullptr; });
  Outcome none = Send("chat-n", "hi");
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(none.status.error_message(), "x-nexora-token"))
      << none.status.error_message();
  Outcome bad = Send("chat-n", "hi", "", "nxr_bad_key_1");
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << bad.status.error_message();
  EXPECT_FALSE(absl::StrContains(bad.status.error_message(), "nxr_bad_key_1"));
  EXPECT_EQ(ErrorDetail(bad.status).reason, "AUTH_REFUSED");
  const int refused = emulator_->refused_upgrades();
  EXPECT_GE(refused, 1);
  // Later calls with the refused key fail at once, without new upgrades.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Send("chat-n", "hi", "", "nxr_bad_key_1").status.error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(emulator_->refused_upgrades(), refused);
  // A good per-call key works on the same chat (its own socket).
  Outcome good = Send("chat-n", "hi", "", "nxr_tenant_key");
  EXPECT_TRUE(good.status.ok()) << good.status.error_message();
}

TEST_F(NexoraServiceTest, CreateChatReturnsAChatTheBridgeCanTalkTo) {
  emulator::NexoraEmulatorOptions e;
  e.known_chats_only = true;
  e.agents = {"agent-7"};
  Start(std::move(e));
  grpc::ClientContext ctx;
  v1::CreateChatRequest req;
  req.set_agent_id("agent-7");
  v1::CreateChatResponse resp;
  grpc::Status st = stub_->CreateChat(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_FALSE(resp.chat_id().empty());
  EXPECT_EQ(emulator_->chats_created(), 1);
  Outcome o = Send(resp.chat_id(), "hello new chat");
  EXPECT_TRUE(o.status.ok()) << o.status.error_message();

  grpc::ClientContext unknown_ctx;
  req.set_agent_id("agent-unknown");
  st = stub_->CreateChat(&unknown_ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND) << st.error_message();
  EXPECT_EQ(ErrorDetail(st).reason, "HTTP_404");

  grpc::ClientContext empty_ctx;
  req.set_agent_id("");
  st = stub_->CreateChat(&empty_ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "agent_id")) << st.error_message();
}

TEST_F(NexoraServiceTest, TwoCallsOnOneChatShareOneSocketAndAreServedInOrder) {
  Start();
  emulator_->SetStepDelay(20ms);  // the first answer takes a while
  Outcome first, second;
  std::thread a([&] { first = Send("chat-shared", "first", "cmid-first"); });
  ASSERT_TRUE(WaitFor([&] { return emulator_->messages_received("cmid-first") == 1; }));
  std::thread b([&] { second = Send("chat-shared", "second", "cmid-second"); });
  a.join();
  b.join();
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_EQ(first.Text(), "Let me check that. You asked: first. There are no open issues.");
  EXPECT_EQ(second.Text(), "Let me check that. You asked: second. There are no open issues.");
  for (const auto& e : second.events) EXPECT_EQ(e.client_message_id(), "cmid-second");
  EXPECT_NE(first.events.back().message_id(), second.events.back().message_id());
  EXPECT_EQ(emulator_->received_ids(), (std::vector<std::string>{"cmid-first", "cmid-second"}));
  EXPECT_EQ(bridge_->ListSessions().size(), 1u);
  EXPECT_EQ(Reconnects(), 0u);
  EXPECT_LE(emulator_->open_sockets("chat-shared"), 1);
}

TEST_F(NexoraServiceTest, ACallerLeavingMidAnswerDoesNotMisrouteTheNextMessage) {
  Start();
  emulator_->SetStepDelay(30ms);
  {
    grpc::ClientContext ctx;
    v1::SendMessageRequest req;
    req.set_chat_id("chat-leave");
    req.set_content("left");
    req.set_client_message_id("cmid-left");
    auto reader = stub_->SendMessage(&ctx, req);
    v1::ChatEvent ev;
    while (reader->Read(&ev) && !ev.has_chunk()) {
    }
    ctx.TryCancel();
    while (reader->Read(&ev)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The next message waits for the abandoned answer's end upstream, then gets only its own.
  Outcome next = Send("chat-leave", "stayed", "cmid-stayed");
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.Text(), "Let me check that. You asked: stayed. There are no open issues.");
  EXPECT_EQ(next.Count(v1::ChatEvent::kToolCall), 1);
  for (const auto& e : next.events) EXPECT_EQ(e.client_message_id(), "cmid-stayed");
  EXPECT_EQ(emulator_->received_ids(), (std::vector<std::string>{"cmid-left", "cmid-stayed"}));
  EXPECT_EQ(Reconnects(), 0u);
}

TEST_F(NexoraServiceTest, ASilentAnswerTimesOutAndTheChatGoesOnOnAFreshSocket) {
  Start({}, [](NexoraBridgeOptions& o) {
    o.answer_idle_timeout = 200ms;
    o.ping_interval = 100ms;
    o.pong_timeout = 1s;
  });
  emulator_->SetScript({{R"({"type":"chunk","content":"a"})"}, {R"({"type":"chunk","content":"late"})", 1500ms}});
  Outcome slow = Send("chat-silent", "slow", "cmid-slow");
  EXPECT_EQ(slow.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << slow.status.error_message();
  EXPECT_EQ(ErrorDetail(slow.status).reason, "OUTCOME_UNKNOWN");
  emulator_->SetScript({{R"({"type":"chunk","content":"fresh"})"}});
  Outcome next = Send("chat-silent", "next", "cmid-next");
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.Text(), "fresh");  // never the abandoned answer's "late"
  EXPECT_GE(Reconnects(), 1u);     // the socket with the abandoned answer was replaced
}

TEST_F(NexoraServiceTest, ChatsAreIsolated) {
  Start();
  constexpr int kChats = 500;
  std::vector<Outcome> out(kChats);
  std::vector<std::thread> threads;
  for (int i = 0; i < kChats; ++i) {
    threads.emplace_back([&, i] { out[i] = Send(absl::StrCat("chat-", i), absl::StrCat("question ", i)); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kChats; ++i) {
    ASSERT_TRUE(out[i].status.ok()) << i << ": " << out[i].status.error_message();
    EXPECT_EQ(out[i].Text(), absl::StrCat("Let me check that. You asked: question ", i,
                                          ". There are no open issues."));
  }
  EXPECT_EQ(bridge_->ListSessions().size(), static_cast<size_t>(kChats));
}

TEST_F(NexoraServiceTest, AnIdleChatSocketCloses) {
  Start({}, [](NexoraBridgeOptions& o) { o.idle_chat_timeout = 200ms; });
  ASSERT_TRUE(Send("chat-idle", "hi").status.ok());
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets("chat-idle") == 0; }));
  EXPECT_TRUE(bridge_->ListSessions().empty());
  // The chat opens again on the next call.
  EXPECT_TRUE(Send("chat-idle", "again").status.ok());
}

TEST_F(NexoraServiceTest, ADeadSocketIsFoundByThePingDeadlineAndTheAnswerResent) {
  Start({}, [](NexoraBridgeOptions& o) {
    o.ping_interval = 50ms;
    o.pong_timeout = 100ms;
  });
  // The agent pauses long after its first chunk and the server stops answering pings.
  emulator_->SetScript({{R"({"type":"chunk","content":"a"})"}, {R"({"type":"chunk","content":"b"})", 800ms}});
  emulator_->SetAnswerPings(false);
  Outcome o;
  std::thread t([&] { o = Send("chat-dead", "hi", "cmid-dead"); });
  ASSERT_TRUE(WaitFor([&] { return Reconnects() >= 1; }));
  emulator_->SetAnswerPings(true);
  emulator_->SetScript({{R"({"type":"chunk","content":"fine"})"}});
  t.join();
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_GE(emulator_->pings(), 1);
  EXPECT_GE(o.Count(v1::ChatEvent::kRestarted), 1);
  EXPECT_EQ(o.Count(v1::ChatEvent::kDone), 1);
  EXPECT_GE(emulator_->messages_received("cmid-dead"), 2);
}

TEST_F(NexoraServiceTest, BadInputIsInvalidArgumentWithAClearMessage) {
  Start();
  struct Case {
    std::string chat, content, cmid, want;
  };
  const std::vector<Case> cases = {
      {"", "hi", "", "chat_id is required"},
      {"../etc", "hi", "", "chat_id"},
      {"chat-1", "", "", "content is required"},
      {"chat-1", std::string(300 * 1024, 'x'), "", "max_content_bytes"},
      {"chat-1", "hi", "has space", "client_message_id"},
  };
  for (const Case& c : cases) {
    Outcome o = Send(c.chat, c.content, c.cmid);
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.want;
    EXPECT_TRUE(absl::StrContains(o.status.error_message(), c.want)) << o.status.error_message();
    EXPECT_TRUE(o.events.empty());
  }
  // Nothing reached the upstream.
  EXPECT_TRUE(emulator_->received_ids().empty());
  EXPECT_TRUE(bridge_->ListSessions().empty());
}

TEST_F(NexoraServiceTest, ChatStreamsMessagesInOrderWithErrorsAsEvents) {
  Start();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  auto stream = stub_->Chat(&ctx);
  v1::ChatRequest r;
  r.set_chat_id("chat-bidi");
  ASSERT_TRUE(stream->Write(r));  // opens the conversation only
  std::vector<v1::ChatEvent> events;
  // An event while nothing is in flight reaches the stream untagged.
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_sockets("chat-bidi") == 1; }));
  emulator_->Broadcast(R"({"type":"notice","text":"maintenance"})", "chat-bidi");
  v1::ChatEvent ev;
  ASSERT_TRUE(stream->Read(&ev));
  EXPECT_TRUE(ev.has_unknown());
  EXPECT_EQ(ev.client_message_id(), "");
  emulator_->InjectError("rate_limited", "slow down", 1, 1);
  r.Clear();
  r.set_content("one");
  r.set_client_message_id("bidi-1");
  ASSERT_TRUE(stream->Write(r));
  r.set_content("two");
  r.set_client_message_id("bidi-2");
  ASSERT_TRUE(stream->Write(r));
  stream->WritesDone();
  while (stream->Read(&ev)) events.push_back(ev);
  grpc::Status st = stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  // bidi-1's answer ends with an error event; bidi-2 is answered whole, after it.
  // The answers (accepted events aside) come one after the other, bidi-1's first.
  std::vector<std::string> order;
  for (const auto& e : events) {
    if (e.has_accepted()) continue;
    if (order.empty() || order.back() != e.client_message_id()) order.push_back(e.client_message_id());
  }
  ASSERT_FALSE(events.empty());
  auto err = std::find_if(events.begin(), events.end(), [](const v1::ChatEvent& e) { return e.has_error(); });
  ASSERT_NE(err, events.end());
  EXPECT_EQ(err->client_message_id(), "bidi-1");
  EXPECT_EQ(err->error().code(), "rate_limited");
  EXPECT_EQ(err->error().status_code(), static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  int done2 = 0;
  for (const auto& e : events) done2 += e.has_done() && e.client_message_id() == "bidi-2";
  EXPECT_EQ(done2, 1);
  EXPECT_EQ(emulator_->received_ids(), (std::vector<std::string>{"bidi-1", "bidi-2"}));
  EXPECT_EQ(order, (std::vector<std::string>{"bidi-1", "bidi-2"}));
}

TEST_F(NexoraServiceTest, ChatRefusesAnotherChatIdOnTheSameStream) {
  Start();
  grpc::ClientContext ctx;
  auto stream = stub_->Chat(&ctx);
  v1::ChatRequest r;
  r.set_chat_id("chat-a");
  r.set_content("hi");
  ASSERT_TRUE(stream->Write(r));
  r.set_chat_id("chat-b");
  stream->Write(r);
  v1::ChatEvent ev;
  while (stream->Read(&ev)) {
  }
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "chat-b")) << st.error_message();
}

// A Chat caller that goes mid-answer with a second message waiting behind it: the
// waiting message is dropped (never sent), the chat sink released, the call counted
// CANCELLED and no longer held by the drain; the answer in flight runs to its end
// upstream, so the chat's next message gets only its own.
TEST_F(NexoraServiceTest, ACancelledChatDropsItsWaitingMessageAndReleasesTheChat) {
  Start();
  emulator_->SetScript(
      {{R"({"type":"chunk","content":"first"})"}, {R"({"type":"chunk","content":"held"})", 1500ms}});
  {
    grpc::ClientContext ctx;
    auto stream = stub_->Chat(&ctx);
    v1::ChatRequest r;
    r.set_chat_id("chat-cancel");
    r.set_content("answered");
    r.set_client_message_id("cancel-1");
    ASSERT_TRUE(stream->Write(r));
    r.set_content("waiting");
    r.set_client_message_id("cancel-2");
    ASSERT_TRUE(stream->Write(r));
    // The first answer has begun and the second message is taken (it waits for the chat).
    bool chunk = false, second = false;
    v1::ChatEvent ev;
    while (!(chunk && second) && stream->Read(&ev)) {
      chunk |= ev.has_chunk() && ev.client_message_id() == "cancel-1";
      second |= ev.has_accepted() && ev.client_message_id() == "cancel-2";
    }
    ASSERT_TRUE(chunk && second);
    EXPECT_EQ(Subscribers(), 1u);  // the chat sink
    ctx.TryCancel();
    while (stream->Read(&ev)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_TRUE(WaitFor([&] { return Subscribers() == 0; }));
  auto cancelled = [&] {
    return daemon_->metrics()
        .GetCounter("wsbridge_grpc_requests_total", "",
                    {{"method", "/wsbridge.nexora.v1.NexoraService/Chat"}, {"code", "CANCELLED"}})
        .value();
  };
  EXPECT_TRUE(WaitFor([&] { return cancelled() == 1; }));
  EXPECT_TRUE(WaitFor([&] {
    return daemon_->metrics().Render().find("wsbridge_grpc_calls_in_flight 0\n") != std::string::npos;
  }));
  emulator_->SetScript({{R"({"type":"chunk","content":"fresh"})"}});
  Outcome next = Send("chat-cancel", "next", "cancel-next");
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.Text(), "fresh");  // never the abandoned answer's "held"
  for (const auto& e : next.events) EXPECT_EQ(e.client_message_id(), "cancel-next");
  EXPECT_EQ(emulator_->received_ids(), (std::vector<std::string>{"cancel-1", "cancel-next"}));
  EXPECT_EQ(Reconnects(), 0u);
}

}  // namespace
}  // namespace wsbridge::nexora
