// nexora::Protocol and its token sources: the pure parts with the time passed in
// (target, decode and routing, heartbeat deadline, gate, 401 classification), and the
// rest through a real core::UpstreamSession and LoginToken against the emulator on
// 127.0.0.1 (id-less events to the message in flight, idle events to the chat sink, one
// message in flight, single-flight logins, a refused login held).
#include "bridges/nexora/protocol.h"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <atomic>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/status.h"
#include "bridges/core/upstream_config.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nexora_emulator.h"

namespace wsbridge::nexora {
namespace {

namespace net = boost::asio;
using namespace std::chrono_literals;
using core::Inbound;
using testing::WaitFor;

std::shared_ptr<TokenSource> Key(std::string k) {
  return std::make_shared<StaticToken>(core::SecretSource::Fixed(std::move(k)));
}

// A protocol whose clock the test moves.
struct Clocked {
  core::Clock::time_point now = core::Clock::now();
  std::unique_ptr<Protocol> p;
  explicit Clocked(std::shared_ptr<TokenSource> token, std::string url = "ws://127.0.0.1:9") {
    ProtocolOptions o;
    o.url = std::move(url);
    o.chat_id = "chat-1";
    o.token = std::move(token);
    o.ping_interval = 100ms;
    o.pong_timeout = 50ms;
    o.now = [this] { return now; };
    p = std::make_unique<Protocol>(std::move(o));
  }
};

TEST(NexoraProtocol, TheTargetCarriesThePathPrefixAndThePercentEncodedToken) {
  Clocked c(Key("nxr_a+b/c=="), "wss://nexora.example.com:8443/prefix/");
  absl::StatusOr<core::HandshakeRequest> h = c.p->PrepareHandshake();
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->url, "wss://nexora.example.com:8443/prefix/api/ws/chat-1?token=nxr_a%2Bb%2Fc%3D%3D");
  // The socket is usable at once: no login frame, no wait.
  absl::StatusOr<core::LoginPlan> plan = c.p->OnOpen("");
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->frames.empty());
  EXPECT_FALSE(plan->wait);
}

TEST(NexoraProtocol, EventsRouteToTheMessageInFlightOrElseToTheChatSink) {
  Clocked c(Key("nxr_k"));
  core::SendGate* gate = c.p->gate();
  ASSERT_NE(gate, nullptr);
  // Nothing in flight: an event goes to the chat's sinks.
  Inbound idle = c.p->Decode(R"({"type":"tool_call","tool":"t","input":{}})", false);
  EXPECT_EQ(idle.kind, Inbound::Kind::kEvent);
  EXPECT_EQ(idle.route, kChatRoute);
  // A message in flight: every event is its reply, in send order; done/error/duplicate end it.
  ASSERT_TRUE(gate->When(1, c.now).has_value());
  gate->Sent(1, 1, c.now);
  EXPECT_FALSE(gate->When(1, c.now).has_value());  // one at a time
  Inbound tool = c.p->Decode(R"({"type":"tool_result","tool":"t","result":null})", false);
  EXPECT_EQ(tool.kind, Inbound::Kind::kReply);
  EXPECT_EQ(tool.route, "");
  EXPECT_FALSE(tool.final);
  Inbound unknown = c.p->Decode(R"({"type":"thinking"})", false);
  EXPECT_EQ(unknown.kind, Inbound::Kind::kReply);
  EXPECT_EQ(static_cast<const EventPayload&>(*unknown.payload).event.kind, EventKind::kUnknown);
  for (const char* end : {R"({"type":"done","message_id":"m"})", R"({"type":"error","code":"x"})",
                          R"({"type":"duplicate","client_message_id":"c","message_id":"m"})"}) {
    EXPECT_TRUE(c.p->Decode(end, false).final) << end;
  }
  gate->Answered(1, true, c.now);
  EXPECT_TRUE(gate->When(1, c.now).has_value());
  // Pongs are heartbeats; broken frames are malformed, never routed.
  EXPECT_EQ(c.p->Decode(R"({"type":"pong"})", false).kind, Inbound::Kind::kHeartbeat);
  EXPECT_EQ(c.p->Decode("not json", false).kind, Inbound::Kind::kMalformed);
  EXPECT_EQ(c.p->Decode(R"({"type":"chunk","content":5})", false).kind, Inbound::Kind::kMalformed);
  EXPECT_EQ(c.p->Decode(R"({"type":"chunk"})", true).kind, Inbound::Kind::kMalformed);
}

TEST(NexoraProtocol, AnAnswerAbandonedOnAnOpenSocketShutsTheGateUntilTheSocketIsReplaced) {
  Clocked c(Key("nxr_k"));
  core::SendGate* gate = c.p->gate();
  ASSERT_TRUE(c.p->OnOpen("").ok());
  gate->Sent(1, 1, c.now);
  gate->Abandoned(1, c.now);  // e.g. the answer went silent past answer_idle_timeout
  EXPECT_FALSE(gate->When(1, c.now).has_value());
  // Its late events are dropped, not taken for anyone's...
  EXPECT_EQ(c.p->Decode(R"({"type":"chunk","content":"late"})", false).kind, Inbound::Kind::kIgnore);
  // ...and the next heartbeat replaces the socket.
  absl::Status alive = c.p->CheckAlive();
  EXPECT_EQ(alive.code(), absl::StatusCode::kAborted) << alive;
  ASSERT_TRUE(c.p->OnOpen("").ok());
  EXPECT_TRUE(gate->When(1, c.now).has_value());
  EXPECT_TRUE(c.p->CheckAlive().ok());
}

TEST(NexoraProtocol, AQuietSocketIsPingedAndDeadWhenNothingFollowsWithinThePongTimeout) {
  Clocked c(Key("nxr_k"));
  ASSERT_TRUE(c.p->OnOpen("").ok());
  c.now += 60ms;
  EXPECT_FALSE(c.p->Heartbeat().has_value());  // not quiet for ping_interval yet
  c.now += 40ms;
  std::optional<core::Outbound> ping = c.p->Heartbeat();
  ASSERT_TRUE(ping.has_value());
  EXPECT_EQ(ping->frame, R"({"type":"ping"})");
  EXPECT_FALSE(c.p->Heartbeat().has_value());  // one ping outstanding at a time
  c.now += 49ms;
  EXPECT_TRUE(c.p->CheckAlive().ok());
  // Any frame (here a pong) shows it alive.
  EXPECT_EQ(c.p->Decode(R"({"type":"pong"})", false).kind, Inbound::Kind::kHeartbeat);
  c.now += 100ms;
  EXPECT_TRUE(c.p->CheckAlive().ok());
  ASSERT_TRUE(c.p->Heartbeat().has_value());
  c.now += 50ms;
  absl::Status dead = c.p->CheckAlive();
  EXPECT_EQ(dead.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(dead.message(), "dead")) << dead;
}

TEST(NexoraProtocol, AFixedKeyRefusedAtTheUpgradeIsAnAuthRefusal) {
  Clocked c(Key("nxr_k"));
  ASSERT_TRUE(c.p->PrepareHandshake().ok());
  core::DisconnectInfo info;
  info.http_status = 401;
  EXPECT_EQ(c.p->Classify(info), core::DisconnectKind::kAuthRefused);
  info.http_status = 0;
  info.close_code = 0;
  EXPECT_EQ(c.p->Classify(info), core::DisconnectKind::kError);  // a lost connection
  // A key that cannot be read fails the attempt as a refusal, not a fast retry.
  Clocked empty(Key(""));
  EXPECT_FALSE(empty.p->PrepareHandshake().ok());
  EXPECT_EQ(empty.p->Classify(core::DisconnectInfo{}), core::DisconnectKind::kAuthRefused);
}

// What failed attempts tell the chat's waiting messages (ChatLink) and the bridge's
// health: a 4xx refusal fails every message at once and stands until a socket opens; 429
// fails the unsent ones that did not ask to wait; network failures after
// kAttemptsBeforeFailing attempts; a message already sent waits for its resend.
TEST(NexoraProtocol, RefusedUpgradesFailWaitingMessagesByKind) {
  auto link = std::make_shared<ChatLink>();
  int health_changes = 0;
  auto health = std::make_shared<UpstreamHealth>([&] { ++health_changes; });
  ProtocolOptions o;
  o.url = "ws://127.0.0.1:9";
  o.chat_id = "chat-1";
  o.token = Key("nxr_k");
  o.link = link;
  o.health = health;
  auto p = std::make_unique<Protocol>(std::move(o));
  std::vector<absl::Status> failed_unsent, failed_waiting, failed_sent;
  std::atomic<bool> unsent{false}, sent{true};
  auto add = [&](bool wait, std::atomic<bool>* s, std::vector<absl::Status>* out) {
    return link->Add(wait, s, [out](const absl::Status& st) { out->push_back(st); });
  };
  add(false, &unsent, &failed_unsent);
  add(true, &unsent, &failed_waiting);
  add(false, &sent, &failed_sent);

  core::DisconnectInfo lost;
  lost.reason = absl::UnavailableError("connection refused");
  for (int i = 1; i < kAttemptsBeforeFailing; ++i) {
    ASSERT_TRUE(p->PrepareHandshake().ok());
    EXPECT_EQ(p->Classify(lost), core::DisconnectKind::kError);
  }
  EXPECT_TRUE(failed_unsent.empty());
  EXPECT_FALSE(health->serving());
  EXPECT_EQ(health_changes, 1);
  ASSERT_TRUE(p->PrepareHandshake().ok());
  p->Classify(lost);
  ASSERT_EQ(failed_unsent.size(), 1u);
  EXPECT_EQ(failed_unsent[0].code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::ErrorReason(failed_unsent[0]), "UPSTREAM_UNREACHABLE");
  EXPECT_TRUE(failed_waiting.empty());  // asked to wait
  EXPECT_TRUE(failed_sent.empty());     // waits for its resend

  // An opened socket clears the health mark; a 404 fails everyone and stands.
  ASSERT_TRUE(p->OnOpen("").ok());
  EXPECT_TRUE(health->serving());
  core::DisconnectInfo not_found;
  not_found.http_status = 404;
  not_found.http_body = R"({"detail":"Chat not found"})";
  ASSERT_TRUE(p->PrepareHandshake().ok());
  EXPECT_EQ(p->Classify(not_found), core::DisconnectKind::kError);
  ASSERT_EQ(failed_waiting.size(), 1u);
  EXPECT_EQ(failed_waiting[0].code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(failed_waiting[0].message(), "Chat not found")) << failed_waiting[0];
  ASSERT_EQ(failed_sent.size(), 1u);
  EXPECT_EQ(link->Refusal().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(health->serving());  // the upstream answered
  ASSERT_TRUE(p->OnOpen("").ok());
  EXPECT_TRUE(link->Refusal().ok());

  // 429: the unsent message that did not ask to wait fails at once.
  std::vector<absl::Status> limited;
  link->Add(false, &unsent, [&](const absl::Status& st) { limited.push_back(st); });
  core::DisconnectInfo too_many;
  too_many.http_status = 429;
  too_many.retry_after = 30s;
  ASSERT_TRUE(p->PrepareHandshake().ok());
  EXPECT_EQ(p->Classify(too_many), core::DisconnectKind::kSlowDown);
  ASSERT_EQ(limited.size(), 1u);
  EXPECT_EQ(limited[0].code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(limited[0].message(), "Retry-After 30s")) << limited[0];
  p.reset();  // a closed socket no longer counts against health
  EXPECT_TRUE(health->serving());
}

// Close codes on an open socket: 1001/1011 are drops (resend), 1008 is a refusal of the
// token unless the key changed since it was used (a rotation: reconnect at once).
TEST(NexoraProtocol, CloseCodesOnAnOpenSocket) {
  config::v1::Secret secret;
  testing::TempDir dir;
  secret.set_file(dir.WriteFile("key", "nxr_s3cr3t_one"));
  absl::StatusOr<std::shared_ptr<core::SecretSource>> source = core::SecretSource::Create(secret);
  ASSERT_TRUE(source.ok());
  auto link = std::make_shared<ChatLink>();
  ProtocolOptions o;
  o.url = "ws://127.0.0.1:9";
  o.chat_id = "chat-1";
  o.token = std::make_shared<StaticToken>(*source);
  o.link = link;
  Protocol p(std::move(o));
  ASSERT_TRUE(p.PrepareHandshake().ok());
  ASSERT_TRUE(p.OnOpen("").ok());
  core::DisconnectInfo closed;
  closed.was_open = true;
  for (uint16_t code : {1001, 1011}) {
    closed.close_code = code;
    closed.reason = absl::UnavailableError(absl::StrCat("upstream closed the connection (code ", code, ")"));
    EXPECT_EQ(p.Classify(closed), core::DisconnectKind::kClosedByPeer) << code;
    EXPECT_TRUE(absl::StrContains(link->LastDrop(), absl::StrCat(code))) << link->LastDrop();
  }
  closed.close_code = 1008;
  EXPECT_EQ(p.Classify(closed), core::DisconnectKind::kAuthRefused);  // the same key
  dir.WriteFile("key", "nxr_s3cr3t_two");
  (*source)->Refresh();
  EXPECT_EQ(p.Classify(closed), core::DisconnectKind::kError);  // rotated: at once
  ASSERT_TRUE(p.PrepareHandshake().ok());
  EXPECT_EQ(p.Classify(closed), core::DisconnectKind::kAuthRefused);  // refused again: stands
}

// LoginToken and sessions against the emulator.
class NexoraProtocolLive : public ::testing::Test {
 protected:
  NexoraProtocolLive() : work_(net::make_work_guard(ioc_)), thread_([this] { ioc_.run(); }) {}
  ~NexoraProtocolLive() override {
    if (emulator_) emulator_->Stop();
    work_.reset();
    ioc_.stop();
    thread_.join();
  }

  void StartEmulator(emulator::NexoraEmulatorOptions o = {}) {
    o.users = {{"u@example.com", "good-pw"}};
    emulator_ = std::make_unique<emulator::NexoraEmulator>(std::move(o));
    ASSERT_TRUE(emulator_->Start().ok());
  }

  std::shared_ptr<LoginToken> Login(std::string password, core::Duration retry_after = 30s) {
    core::HttpClientOptions ho;
    ho.allow_plaintext = true;
    LoginToken::Options lo;
    lo.login_url = emulator_->http_url() + "/api/auth/login";
    lo.email = core::SecretSource::Fixed("u@example.com");
    lo.password = core::SecretSource::Fixed(std::move(password));
    lo.http = core::HttpClient::Create(ioc_.get_executor(), ho);
    lo.retry_after = retry_after;
    return std::make_shared<LoginToken>(std::move(lo));
  }

  absl::StatusOr<Token> Get(TokenSource& t) {
    std::promise<absl::StatusOr<Token>> p;
    t.WithToken([&p](absl::StatusOr<Token> v) { p.set_value(std::move(v)); });
    auto f = p.get_future();
    EXPECT_EQ(f.wait_for(10s), std::future_status::ready);
    return f.get();
  }

  std::shared_ptr<core::UpstreamSession> Session(std::shared_ptr<TokenSource> token, std::string chat) {
    core::SessionOptions so;
    so.id = "test/" + chat;
    so.upstream = "Nexora";
    so.error_domain = "nexora.wsbridge.dev";
    so.connection.allow_plaintext = true;
    so.connection.backoff.initial = 10ms;
    so.connection.backoff.max = 50ms;
    so.connection.keepalive.heartbeat_interval = 100ms;
    so.request_timeout = 5s;
    ProtocolOptions po;
    po.url = emulator_->url();
    po.chat_id = std::move(chat);
    po.token = std::move(token);
    return core::UpstreamSession::Create(ioc_.get_executor(), std::move(so),
                                         std::make_unique<Protocol>(std::move(po)));
  }

  // Sends one message; its replies (event types, in order) land in `log` under `tag`.
  uint64_t SendMessage(core::UpstreamSession& s, std::string cmid, std::string tag) {
    core::Request r;
    r.gated = true;
    r.on_drop = core::OnDrop::kResend;
    r.encode = [cmid](std::string_view) -> absl::StatusOr<core::Outbound> {
      return core::Outbound{EncodeSend("hi", cmid), false};
    };
    return s.Send(std::move(r), [this, tag](absl::StatusOr<core::Reply> reply) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!reply.ok()) {
        log_.push_back(tag + ":" + std::string(reply.status().message()));
        return;
      }
      const Event& ev = static_cast<const EventPayload&>(*reply->payload).event;
      log_.push_back(absl::StrCat(tag, ":", ev.type, reply->final ? ":final" : ""));
    });
  }

  std::vector<std::string> log() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

  net::io_context ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::thread thread_;
  std::unique_ptr<emulator::NexoraEmulator> emulator_;
  std::mutex mu_;
  std::vector<std::string> log_;
};

TEST_F(NexoraProtocolLive, OneMessageInFlightPerChatAndEveryIdLessEventGoesToIt) {
  StartEmulator();
  auto s = Session(Key("nxr_k"), "chat-live");
  SendMessage(*s, "m-1", "a");
  SendMessage(*s, "m-2", "b");
  ASSERT_TRUE(WaitFor([&] {
    std::vector<std::string> l = log();
    return !l.empty() && l.back() == "b:done:final";
  }));
  const std::vector<std::string> want = {"chunk", "tool_call", "tool_result", "sub_agent_start",
                                         "sub_agent_complete", "chunk", "chunk"};
  std::vector<std::string> expected;
  for (const char* tag : {"a", "b"}) {
    for (const auto& t : want) expected.push_back(absl::StrCat(tag, ":", t));
    expected.push_back(absl::StrCat(tag, ":done:final"));
  }
  EXPECT_EQ(log(), expected);
  EXPECT_EQ(emulator_->received_ids(), (std::vector<std::string>{"m-1", "m-2"}));
  EXPECT_EQ(emulator_->open_sockets("chat-live"), 1);
  std::promise<void> closed;
  s->Close(1000, "test", [&] { closed.set_value(); });
  closed.get_future().wait();
}

TEST_F(NexoraProtocolLive, EventsWhileNothingIsInFlightReachTheChatSink) {
  StartEmulator();
  auto s = Session(Key("nxr_k"), "chat-sink");
  struct Sink : core::EventSink {
    std::mutex mu;
    std::vector<std::string> types;
    std::atomic<bool> subscribed{false};
    void OnSubscribed(const core::SubscribedInfo&) override { subscribed = true; }
    void OnEvent(const core::PayloadPtr& e, bool) override {
      std::lock_guard<std::mutex> lock(mu);
      types.push_back(static_cast<const EventPayload&>(*e).event.type);
    }
    void OnEnded(const absl::Status&) override {}
  };
  auto sink = std::make_shared<Sink>();
  s->Subscribe(std::string(kChatRoute), nullptr, sink);
  ASSERT_TRUE(WaitFor([&] { return sink->subscribed.load() && emulator_->open_sockets("chat-sink") == 1; }));
  emulator_->Broadcast(R"({"type":"agent_status","status":"busy"})", "chat-sink");
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(sink->mu);
    return sink->types.size() == 1;
  }));
  EXPECT_EQ(sink->types[0], "agent_status");
  std::promise<void> closed;
  s->Close(1000, "test", [&] { closed.set_value(); });
  closed.get_future().wait();
}

TEST_F(NexoraProtocolLive, A401LogsInOnceThenTheSecondRefusalStands) {
  StartEmulator();
  std::shared_ptr<LoginToken> login = Login("good-pw");
  absl::StatusOr<Token> first = Get(*login);
  ASSERT_TRUE(first.ok()) << first.status();
  ProtocolOptions po;
  po.url = emulator_->url();
  po.chat_id = "c";
  po.token = login;
  Protocol p(std::move(po));
  ASSERT_TRUE(p.PrepareHandshake().ok());
  core::DisconnectInfo refused;
  refused.http_status = 401;
  EXPECT_EQ(p.Classify(refused), core::DisconnectKind::kError);  // log in again, retry soon
  ASSERT_TRUE(WaitFor([&] { return emulator_->logins() == 2; }));
  ASSERT_TRUE(WaitFor([&] { return p.PrepareHandshake().ok(); }));
  absl::StatusOr<Token> second = login->Current();
  ASSERT_TRUE(second.ok());
  EXPECT_NE(second->value, first->value);
  EXPECT_EQ(second->generation, first->generation + 1);
  // Refused again right after a fresh login: the refusal stands (auth backoff).
  EXPECT_EQ(p.Classify(refused), core::DisconnectKind::kAuthRefused);
  // After that backoff, one more login may be tried.
  EXPECT_EQ(p.Classify(refused), core::DisconnectKind::kError);
}

TEST_F(NexoraProtocolLive, SessionsSharingAnAccountLogInOnce) {
  StartEmulator();
  std::shared_ptr<LoginToken> login = Login("good-pw");
  absl::StatusOr<Token> t = Get(*login);
  ASSERT_TRUE(t.ok());
  // Every chat socket refused for the same expired token asks for a refresh.
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(login->Refresh(t->generation));
  ASSERT_TRUE(WaitFor([&] { return login->Current().ok(); }));
  EXPECT_EQ(emulator_->logins(), 2);
  EXPECT_EQ(login->Current()->generation, t->generation + 1);
}

TEST_F(NexoraProtocolLive, ARefusedLoginIsHeldForRetryAfter) {
  StartEmulator();
  std::shared_ptr<LoginToken> login = Login("wrong-pw", 30s);
  absl::StatusOr<Token> t = Get(*login);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnauthenticated) << t.status();
  EXPECT_FALSE(absl::StrContains(t.status().message(), "wrong-pw"));
  // Held: no new login while it lasts.
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(login->Current().status().code(), absl::StatusCode::kUnauthenticated);
    EXPECT_FALSE(login->Refresh(0));
    EXPECT_EQ(Get(*login).status().code(), absl::StatusCode::kUnauthenticated);
  }
  EXPECT_EQ(emulator_->refused_logins(), 1);
  // Once the hold passed, the next use tries again.
  std::shared_ptr<LoginToken> short_hold = Login("wrong-pw", 1ms);
  EXPECT_EQ(Get(*short_hold).status().code(), absl::StatusCode::kUnauthenticated);
  ASSERT_TRUE(WaitFor([&] {
    (void)short_hold->Current();
    return emulator_->refused_logins() >= 3;
  }));
}

}  // namespace
}  // namespace wsbridge::nexora
