// Fault scenarios for the NLX bridge inside the real daemon (tests/faults/daemon_harness.h):
// the bridge talks to the NLX emulator through the fault proxy, callers use real gRPC.
// Every scenario checks the invariants:
//  - no NLX turn silently resent: a turn whose outcome the fault made unknown is reported
//    to its caller (OUTCOME_UNKNOWN) and reaches the emulator at most once; the emulator's
//    record of turns is exactly what the callers sent;
//  - every subscriber told of every gap: each Converse call on the conversation gets a
//    `reconnected` event after the fault, before anything pushed on the new socket, and
//    nothing pushed while no socket was open is delivered as if nothing had happened;
//  - no crash (the daemon is this process), bounded queues, and the bridge serves again.
// Every secret contains "s3cr3t"; no status a caller sees may carry one.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "bridges/core/bridge_base.h"
#include "bridges/nlx/factory.h"
#include "bridges/nlx/nlx_bridge.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nlx_emulator.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::nlx::v1;
using Clock = std::chrono::steady_clock;
using Stream = grpc::ClientReaderWriter<v1::ConverseRequest, v1::ConverseEvent>;

constexpr char kApiKey[] = "nlx-api-s3cr3t-1";
constexpr char kRotatedApiKey[] = "nlx-api-s3cr3t-2";
constexpr char kDeploymentKey[] = "nlx-deployment-s3cr3t";
constexpr char kChannelKey[] = "nlx-channel-s3cr3t";  // + "-en-US" (language)
constexpr char kSecretMarker[] = "s3cr3t";

v1::ConverseRequest Msg(const std::string& text, const std::string& id = "") {
  v1::ConverseRequest r;
  r.set_conversation_id(id);
  if (!text.empty()) r.mutable_turn()->set_text(text);
  return r;
}

std::string FirstText(const v1::ConversationResponse& r) {
  return r.messages().empty() ? "" : r.messages(0).text();
}

// A Converse call whose events a thread collects (or that nobody reads: `read` false).
class Converser {
 public:
  Converser(v1::NlxService::Stub& stub, const v1::ConverseRequest& first,
            const std::map<std::string, std::string>& md = {}, bool read = true) {
    ctx_.set_deadline(std::chrono::system_clock::now() + 60s);
    for (const auto& [k, v] : md) ctx_.AddMetadata(k, v);
    stream_ = stub.Converse(&ctx_);
    stream_->Write(first);
    if (read) StartReading();
  }
  ~Converser() {
    ctx_.TryCancel();
    if (reader_.joinable()) reader_.join();
  }

  void StartReading() {
    reader_ = std::thread([this] {
      v1::ConverseEvent e;
      while (stream_->Read(&e)) {
        absl::MutexLock lock(&mu_);
        events_.push_back(e);
      }
      absl::MutexLock lock(&mu_);
      ended_ = true;
    });
  }
  bool Turn(const std::string& text) { return stream_->Write(Msg(text)); }

  std::vector<v1::ConverseEvent> events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  bool ended() const {
    absl::MutexLock lock(&mu_);
    return ended_;
  }
  // Index of the first event matching `pred` (-1 when none).
  int Find(const std::function<bool(const v1::ConverseEvent&)>& pred) const {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < events_.size(); ++i) {
      if (pred(events_[i])) return static_cast<int>(i);
    }
    return -1;
  }
  bool WaitEvent(const std::function<bool(const v1::ConverseEvent&)>& pred,
                 std::chrono::milliseconds timeout = 20s) const {
    return WaitFor([&] { return Find(pred) >= 0; }, timeout);
  }
  std::string Opened() {
    EXPECT_TRUE(WaitEvent([](const v1::ConverseEvent& e) { return e.has_opened(); }));
    auto ev = events();
    return ev.empty() || !ev[0].has_opened() ? "" : ev[0].opened().conversation_id();
  }
  // The event that ended turn `n`, its response or its turn_failed (nullopt when
  // neither came in time).
  std::optional<v1::ConverseEvent> TurnEnd(uint64_t n) {
    auto ends = [n](const v1::ConverseEvent& e) {
      return (e.has_response() && e.response().turn() == n) ||
             (e.has_turn_failed() && e.turn_failed().turn() == n);
    };
    WaitEvent(ends);
    for (const auto& e : events()) {
      if (ends(e)) return e;
    }
    return std::nullopt;
  }
  std::optional<v1::ConversationResponse> Response(uint64_t n) {
    std::optional<v1::ConverseEvent> e = TurnEnd(n);
    if (!e || !e->has_response()) return std::nullopt;
    return e->response();
  }
  std::optional<v1::TurnFailed> Failed(uint64_t n) {
    std::optional<v1::ConverseEvent> e = TurnEnd(n);
    if (!e || !e->has_turn_failed()) return std::nullopt;
    return e->turn_failed();
  }
  // Half-closes and returns how the call ended.
  grpc::Status Finish() {
    stream_->WritesDone();
    if (reader_.joinable()) reader_.join();
    return stream_->Finish();
  }
  Stream& stream() { return *stream_; }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<Stream> stream_;
  std::thread reader_;
  mutable absl::Mutex mu_;
  std::vector<v1::ConverseEvent> events_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
};

bool IsPush(const v1::ConverseEvent& e, const std::string& text) {
  return e.has_response() && e.response().turn() == 0 && FirstText(e.response()) == text;
}
bool IsReconnected(const v1::ConverseEvent& e) { return e.has_reconnected(); }

struct Options {
  bool tls = false;
  // Set on the proxy before the daemon starts.
  std::function<void(FaultProxy&)> faults{};
  // The bridge's config entry (keys, timeouts) before OptionsFromConfig runs.
  std::function<void(config::v1::NlxBridgeConfig&)> config{};
  // The options after OptionsFromConfig (timings the config does not reach).
  std::function<void(nlx::NlxBridgeOptions&)> tweak{};
  // Calls that may wait for an unreachable NLX at once (0 = the default).
  uint32_t max_waiting_calls = 0;
};

// The bound on calls waiting for an unreachable upstream: the bridge's own
// (BridgeBase::set_max_waiting_calls) and the daemon config's bridges[].limits entry,
// which wins where the config has one (set by name: the entry is optional).
void SetWaitingLimit(config::v1::BridgeConfig& b, uint32_t n) {
  const google::protobuf::FieldDescriptor* limits = b.GetDescriptor()->FindFieldByName("limits");
  if (limits == nullptr) return;
  google::protobuf::Message* l = b.GetReflection()->MutableMessage(&b, limits);
  const google::protobuf::FieldDescriptor* f = l->GetDescriptor()->FindFieldByName("max_waiting_calls");
  if (f != nullptr) l->GetReflection()->SetUInt32(l, f, n);
}

class NlxFaultTest : public ::testing::Test {
 protected:
  void Start(Options opts = {}) {
    emulator::NlxEmulatorOptions eopts;
    eopts.api_key = kApiKey;
    eopts.deployment_key = kDeploymentKey;
    eopts.channel_key = absl::StrCat(kChannelKey, "-en-US");
    if (opts.tls) {
      ca_ = pki_.MakeCa("nlx-fault-ca");
      auto server = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"});
      eopts.tls = true;
      eopts.cert_pem = server.cert_pem;
      eopts.key_pem = server.key_pem;
    }
    emulator_ = std::make_unique<emulator::NlxEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());
    proxy_ = std::make_unique<FaultProxy>(emulator_->port());
    ASSERT_TRUE(proxy_->Start().ok());
    if (opts.faults) opts.faults(*proxy_);

    config::v1::NlxBridgeConfig cfg;
    cfg.mutable_upstream()->set_url(
        absl::StrCat(opts.tls ? "wss" : "ws", "://127.0.0.1:", proxy_->port()));
    cfg.mutable_upstream()->set_allow_plaintext(!opts.tls);
    if (opts.tls) cfg.mutable_upstream()->mutable_tls()->set_ca_file(ca_.cert_file);
    cfg.mutable_api_key()->set_value(kApiKey);
    cfg.mutable_deployment_key()->set_value(kDeploymentKey);
    cfg.mutable_channel_key()->set_value(kChannelKey);
    cfg.set_language("en-US");
    if (opts.config) opts.config(cfg);
    absl::StatusOr<nlx::NlxBridgeOptions> o = nlx::OptionsFromConfig(cfg, "nlx");
    ASSERT_TRUE(o.ok()) << o.status();
    o->connection.backoff.initial = 20ms;
    o->connection.backoff.max = 200ms;
    o->turn_timeout = 30s;  // faults, not this timeout, must end a stuck turn
    o->check_interval = 50ms;
    if (opts.tweak) opts.tweak(*o);
    options_ = *o;
    const uint32_t waiting = opts.max_waiting_calls;
    absl::Status started = harness_.Start(
        "nlx",
        [&](config::v1::BridgeConfig& b) {
          *b.mutable_nlx() = cfg;
          if (waiting != 0) SetWaitingLimit(b, waiting);
        },
        [o = *o, waiting](const core::BridgeContext& ctx) {
          auto bridge = nlx::NewNlxBridge(o, ctx);
          if (bridge.ok() && waiting != 0) {
            dynamic_cast<core::BridgeBase&>(**bridge).set_max_waiting_calls(waiting);
          }
          return bridge;
        });
    ASSERT_TRUE(started.ok()) << started;
    stub_ = v1::NlxService::NewStub(harness_.channel());
  }

  void TearDown() override {
    // Memory bounded: no scenario leaves more than a handful of sockets behind (each opens
    // at most six conversations; refused and failed ones are closed).
    if (harness_.bridge() != nullptr) {
      EXPECT_LE(harness_.bridge()->ListSessions().size(), 6u);
    }
    harness_.Stop();
    if (proxy_ != nullptr) proxy_->Stop();
    if (emulator_ != nullptr) emulator_->Stop();
  }

  struct SendResult {
    grpc::Status status;
    v1::SendResponse resp;
  };
  SendResult Send(const std::string& id, const std::string& text,
                  const std::map<std::string, std::string>& md = {},
                  std::chrono::seconds deadline = 20s) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    for (const auto& [k, v] : md) ctx.AddMetadata(k, v);
    v1::SendRequest req;
    req.set_conversation_id(id);
    req.mutable_turn()->set_text(text);
    SendResult out;
    out.status = stub_->Send(&ctx, req, &out.resp);
    ExpectNoSecret(out.status);
    return out;
  }

  static void ExpectNoSecret(const grpc::Status& st) {
    EXPECT_FALSE(absl::StrContains(st.error_message(), kSecretMarker)) << "a secret in a status";
    EXPECT_FALSE(absl::StrContains(st.error_details(), kSecretMarker)) << "a secret in details";
  }
  static void ExpectNoSecret(const std::vector<v1::ConverseEvent>& events) {
    for (const auto& e : events) {
      if (e.has_turn_failed()) {
        EXPECT_FALSE(absl::StrContains(e.turn_failed().message(), kSecretMarker));
      }
    }
  }

  // Turns the emulator recorded for the conversation, by text.
  std::vector<std::string> Recorded(const std::string& id) const {
    std::vector<std::string> out;
    for (const auto& t : emulator_->turns(id)) {
      // {"request":{"unstructured":{"text":..}},..} as the bridge encoded it.
      boost::system::error_code ec;
      boost::json::value v = boost::json::parse(t.json, ec);
      const boost::json::value* text = ec ? nullptr : v.find_pointer("/request/unstructured/text", ec);
      out.push_back(text != nullptr && text->is_string() ? std::string(text->get_string()) : t.json);
    }
    return out;
  }

  // Every gap told: the call saw `reconnected` after the fault (after `before`, the last
  // event from before it), no push made while no socket was open (`missed`), and every
  // later push after the `reconnected` event.
  static void ExpectGapTold(const Converser& c, const std::string& before,
                            const std::string& missed, const std::string& after) {
    const int b = c.Find([&](const v1::ConverseEvent& e) { return IsPush(e, before); });
    const int r = c.Find(IsReconnected);
    const int a = c.Find([&](const v1::ConverseEvent& e) { return IsPush(e, after); });
    ASSERT_GE(b, 0) << "the push from before the fault never came";
    ASSERT_GE(r, 0) << "the call was not told its conversation reconnected";
    ASSERT_GE(a, 0) << "the push after the fault never came";
    EXPECT_LT(b, r);
    EXPECT_LT(r, a) << "a push on the new socket came before the reconnected event";
    if (!missed.empty()) {
      EXPECT_EQ(c.Find([&](const v1::ConverseEvent& e) { return IsPush(e, missed); }), -1);
    }
  }

  // The bridge's first session (admin view).
  admin::v1::Session FirstSession() const {
    auto sessions = harness_.bridge()->ListSessions();
    return sessions.empty() ? admin::v1::Session() : sessions.front();
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_;
  std::unique_ptr<emulator::NlxEmulator> emulator_;
  std::unique_ptr<FaultProxy> proxy_;
  DaemonHarness harness_;
  nlx::NlxBridgeOptions options_;
  std::unique_ptr<v1::NlxService::Stub> stub_;
};

// ---------------------------------------------------------------------------------
// Reset with a turn in flight, RST towards the bridge or towards NLX (the bridge then
// sees a FIN without a close frame). Two Converse calls share the conversation.
class NlxResetTest : public NlxFaultTest, public ::testing::WithParamInterface<Direction> {};

TEST_P(NlxResetTest, ResetWithATurnInFlight) {
  Start();
  Converser a(*stub_, Msg(""));
  const std::string id = a.Opened();
  ASSERT_FALSE(id.empty());
  Converser b(*stub_, Msg("", id));
  ASSERT_EQ(b.Opened(), id);
  ASSERT_TRUE(a.Turn("hello"));
  auto r1 = a.Response(1);
  ASSERT_TRUE(r1.has_value());
  ASSERT_EQ(emulator_->Push(id, "before"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "before"); }));
  ASSERT_TRUE(b.WaitEvent([](const auto& e) { return IsPush(e, "before"); }));

  // Turn 2 reaches NLX; its answer is held until the reset has cut the socket.
  emulator_->SetAnswerDelay(10s);
  ASSERT_TRUE(a.Turn("in flight"));
  ASSERT_TRUE(WaitFor([&] { return emulator_->turns_received(id) == 2; }));
  emulator_->SetAnswerDelay(0ms);
  proxy_->SetMode(GetParam(), Mode::kReset);
  ASSERT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }));
  // Pushed while no socket is open: lost (NLX keeps no backlog); the calls must hear
  // of the gap.
  EXPECT_EQ(emulator_->Push(id, "missed"), 0);
  proxy_->Heal();

  auto failed = a.Failed(2);
  ASSERT_TRUE(failed.has_value()) << "turn 2 was neither answered nor failed";
  EXPECT_EQ(failed->code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_EQ(failed->reason(), "OUTCOME_UNKNOWN") << failed->message();
  EXPECT_TRUE(absl::StrContains(failed->message(), "the socket ended")) << failed->message();
  ASSERT_TRUE(a.WaitEvent(IsReconnected));
  ASSERT_TRUE(b.WaitEvent(IsReconnected));
  ASSERT_GE(emulator_->Push(id, "after"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "after"); }));
  ASSERT_TRUE(b.WaitEvent([](const auto& e) { return IsPush(e, "after"); }));
  ExpectGapTold(a, "before", "missed", "after");
  ExpectGapTold(b, "before", "missed", "after");

  // The conversation goes on; the unknown turn was never sent again.
  ASSERT_TRUE(a.Turn("next"));
  auto r3 = a.Response(3);
  ASSERT_TRUE(r3.has_value());
  EXPECT_EQ(r3->conversation_id(), id);
  EXPECT_EQ(Recorded(id), (std::vector<std::string>{"hello", "in flight", "next"}));
  EXPECT_TRUE(a.Finish().ok());
  EXPECT_TRUE(b.Finish().ok());
  ExpectNoSecret(a.events());
  // Serves again: a new conversation.
  SendResult s = Send("", "fresh");
  EXPECT_TRUE(s.status.ok()) << s.status.error_message();
}

INSTANTIATE_TEST_SUITE_P(BothDirections, NlxResetTest,
                         ::testing::Values(Direction::kUpstreamToClient,
                                           Direction::kClientToUpstream),
                         [](const ::testing::TestParamInfo<Direction>& info) {
                           return info.param == Direction::kUpstreamToClient ? "TowardsTheBridge"
                                                                             : "TowardsTheUpstream";
                         });

// A Send whose socket is reset while its turn is in flight: the caller hears
// OUTCOME_UNKNOWN (never a silent resend), and the next Send on the conversation works.
TEST_F(NlxFaultTest, ResetDuringASendReportsTheOutcomeUnknown) {
  Start();
  SendResult first = Send("", "hello");
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const std::string id = first.resp.conversation_id();
  emulator_->SetAnswerDelay(10s);
  std::thread reset([&] {
    ASSERT_TRUE(WaitFor([&] { return emulator_->turns_received(id) == 2; }));
    emulator_->SetAnswerDelay(0ms);
    proxy_->SetMode(Direction::kUpstreamToClient, Mode::kReset);
    ASSERT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }));
    proxy_->Heal();
  });
  SendResult lost = Send(id, "in flight");
  reset.join();
  EXPECT_EQ(lost.status.error_code(), grpc::StatusCode::UNAVAILABLE) << lost.status.error_message();
  EXPECT_EQ(ErrorReason(lost.status), "OUTCOME_UNKNOWN") << lost.status.error_message();
  // Waits for the session: its first reconnect (after ~1 ms) may have met the proxy still
  // resetting, and until the next attempt a call that does not wait is told UNAVAILABLE
  // (the upstream is unreachable), as it should be.
  SendResult next = Send(id, "next", {{std::string(core::kWaitForReadyMetadata), "true"}});
  ASSERT_TRUE(next.status.ok()) << next.status.error_message();
  EXPECT_EQ(next.resp.conversation_id(), id);
  EXPECT_EQ(Recorded(id), (std::vector<std::string>{"hello", "in flight", "next"}));
}

// Both directions black-holed with a turn in flight: only the WebSocket keepalive can
// notice. The turn fails OUTCOME_UNKNOWN within ping interval + pong timeout (plus a
// margin for a loaded machine; without keepalive it would wait out turn_timeout, 30 s),
// it never reached NLX and is not resent; healed, the conversation goes on.
TEST_F(NlxFaultTest, BlackHoleDetectedWithinTheHeartbeatDeadline) {
  constexpr auto kPing = 200ms;
  constexpr auto kPong = 400ms;
  Start({.tweak = [&](nlx::NlxBridgeOptions& o) {
    o.connection.keepalive.ping_interval = kPing;
    o.connection.keepalive.pong_timeout = kPong;
    o.connection.handshake_timeout = 1s;
  }});
  Converser a(*stub_, Msg("hello"));
  const std::string id = a.Opened();
  ASSERT_TRUE(a.Response(1).has_value());
  ASSERT_EQ(emulator_->Push(id, "before"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "before"); }));

  proxy_->SetMode(Direction::kClientToUpstream, Mode::kBlackHole);
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kBlackHole);
  const Clock::time_point holed_at = Clock::now();
  ASSERT_TRUE(a.Turn("into the hole"));
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return e.has_turn_failed(); }, 30s));
  const auto detected = Clock::now() - holed_at;
  proxy_->Heal();
  RecordProperty("detected_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(detected).count()));
  EXPECT_LE(detected, kPing + kPong + 3s)
      << std::chrono::duration_cast<std::chrono::milliseconds>(detected).count() << " ms";
  auto failed = a.Failed(2);
  ASSERT_TRUE(failed.has_value());
  EXPECT_EQ(failed->reason(), "OUTCOME_UNKNOWN") << failed->message();
  EXPECT_TRUE(absl::StrContains(failed->message(), "pong")) << failed->message();
  EXPECT_GT(proxy_->counters().bytes_dropped, 0u);

  ASSERT_TRUE(a.WaitEvent(IsReconnected, 30s));
  ASSERT_GE(emulator_->Push(id, "after"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "after"); }));
  ExpectGapTold(a, "before", "", "after");
  ASSERT_TRUE(a.Turn("next"));
  ASSERT_TRUE(a.Response(3).has_value());
  // The black-holed turn never arrived, and it was not sent again.
  EXPECT_EQ(Recorded(id), (std::vector<std::string>{"hello", "next"}));
  EXPECT_TRUE(a.Finish().ok());
}

// Every byte both ways in 1-byte writes: upgrades, acks, turns, pushes and closes
// arrive in pieces and nothing changes: one socket per conversation, no reconnect.
TEST_F(NlxFaultTest, SlicingChangesNothing) {
  Start({.faults = [](FaultProxy& proxy) {
    Shaping slice;
    slice.slice = true;
    proxy.SetShaping(Direction::kClientToUpstream, slice);
    proxy.SetShaping(Direction::kUpstreamToClient, slice);
  }});
  Converser a(*stub_, Msg("hello"));
  const std::string id = a.Opened();
  ASSERT_TRUE(a.Turn("multi"));
  ASSERT_TRUE(a.Turn("choices"));
  auto r1 = a.Response(1);
  auto r2 = a.Response(2);
  auto r3 = a.Response(3);
  ASSERT_TRUE(r1 && r2 && r3);
  EXPECT_EQ(FirstText(*r1), "Turn 1: you said \"hello\"");
  EXPECT_EQ(r2->messages_size(), 3);
  ASSERT_FALSE(r3->messages().empty());
  EXPECT_EQ(r3->messages(0).choices_size(), 2);
  ASSERT_EQ(emulator_->Push(id, "pushed"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "pushed"); }));
  EXPECT_TRUE(a.Finish().ok());
  EXPECT_EQ(a.Find(IsReconnected), -1);
  SendResult s = Send("", "unary");
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  SendResult again = Send(s.resp.conversation_id(), "again");
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(FirstText(again.resp.response()), "Turn 2: you said \"again\"");
  EXPECT_EQ(Recorded(id), (std::vector<std::string>{"hello", "multi", "choices"}));
  EXPECT_EQ(proxy_->counters().connections_accepted, 2u);  // one per conversation
  EXPECT_EQ(emulator_->handshakes(), 2);
  EXPECT_TRUE(WaitFor([&] {
    ProxyCounters c = proxy_->counters();
    return c.writes_upstream_to_client == c.bytes_upstream_to_client &&
           c.writes_client_to_upstream == c.bytes_client_to_upstream;
  }));
  EXPECT_GT(proxy_->counters().bytes_upstream_to_client, 1000u);
}

// A slow TLS handshake (the server's first bytes held 500 ms) and a slow ack (300 ms),
// both within their timeouts: one socket, the conversation works.
TEST_F(NlxFaultTest, SlowHandshakeAndAckWithinTheirTimeoutsConnectOnce) {
  const Clock::time_point started = Clock::now();
  Start({.tls = true,
         .faults =
             [](FaultProxy& proxy) {
               Shaping stall;
               stall.stall_bytes = 64 * 1024;  // the whole server flight and the upgrade answer
               stall.stall_for = 500ms;
               proxy.SetShaping(Direction::kUpstreamToClient, stall);
             },
         .tweak = [](nlx::NlxBridgeOptions& o) {
           o.connection.handshake_timeout = 5s;
           o.ack_timeout = 5s;
         }});
  emulator_->SetAckDelay(300ms);
  SendResult s = Send("", "hello");
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_GE(Clock::now() - started, 800ms);  // the stall and the ack delay were in the way
  SendResult again = Send(s.resp.conversation_id(), "again");
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(proxy_->counters().connections_accepted, 1u);
  EXPECT_EQ(emulator_->handshakes(), 1);
}

// A TLS handshake stalled beyond handshake_timeout: a new conversation's one open fails
// (UNAVAILABLE UPGRADE_REFUSED naming the timeout; nothing was sent) instead of
// retrying behind the caller's back, so there is no loop of attempts; healed, it works.
TEST_F(NlxFaultTest, StalledHandshakeFailsTheOpenOnceAndRecovers) {
  Start({.tls = true,
         .faults =
             [](FaultProxy& proxy) {
               Shaping stall;
               stall.stall_bytes = 64 * 1024;
               stall.stall_for = 20s;  // far beyond the handshake timeout
               proxy.SetShaping(Direction::kUpstreamToClient, stall);
             },
         .tweak = [](nlx::NlxBridgeOptions& o) {
           o.connection.handshake_timeout = 300ms;
           o.connection.connect_timeout = 1s;
         }});
  for (int i = 0; i < 3; ++i) {
    SendResult s = Send("", "hello");
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAVAILABLE) << s.status.error_message();
    EXPECT_EQ(ErrorReason(s.status), "UPGRADE_REFUSED") << s.status.error_message();
    EXPECT_TRUE(absl::StrContains(s.status.error_message(), "nothing was sent"))
        << s.status.error_message();
  }
  // One attempt per call: no conversation retries its first open.
  EXPECT_EQ(proxy_->counters().connections_accepted, 3u);
  EXPECT_EQ(emulator_->total_turns(), 0);
  proxy_->Heal();
  SendResult s = Send("", "hello");
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(emulator_->total_turns(), 1);
}

// ---------------------------------------------------------------------------------
// Close codes. 1001 (going away: API Gateway's idle and 2-hour limits), 1011 (internal
// error) and no close frame at all (a TCP drop): the conversation reconnects with
// backoff and the same id; the turn in flight fails OUTCOME_UNKNOWN quoting how the
// socket ended; every Converse call is told.
struct CloseCase {
  int code;  // 0 = dropped without a close frame
  const char* name;
  const char* quoted;  // in the turn_failed message
};

class NlxCloseTest : public NlxFaultTest, public ::testing::WithParamInterface<CloseCase> {};

TEST_P(NlxCloseTest, ReconnectsWithBackoffAndReportsTheCode) {
  const CloseCase c = GetParam();
  Start();
  Converser a(*stub_, Msg("hello"));
  const std::string id = a.Opened();
  ASSERT_TRUE(a.Response(1).has_value());
  ASSERT_EQ(emulator_->Push(id, "before"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "before"); }));
  emulator_->SetAnswerDelay(10s);
  ASSERT_TRUE(a.Turn("in flight"));
  ASSERT_TRUE(WaitFor([&] { return emulator_->turns_received(id) == 2; }));
  emulator_->SetAnswerDelay(0ms);
  const int handshakes = emulator_->handshakes();
  if (c.code == 0) {
    ASSERT_EQ(emulator_->Drop(id), 1);
  } else {
    ASSERT_EQ(emulator_->Close(id, static_cast<uint16_t>(c.code), "bye"), 1);
  }
  auto failed = a.Failed(2);
  ASSERT_TRUE(failed.has_value());
  EXPECT_EQ(failed->code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_EQ(failed->reason(), "OUTCOME_UNKNOWN") << failed->message();
  EXPECT_TRUE(absl::StrContains(failed->message(), c.quoted)) << failed->message();
  ASSERT_TRUE(a.WaitEvent(IsReconnected));
  EXPECT_EQ(emulator_->handshakes(), handshakes + 1) << "one reconnect";
  ASSERT_GE(emulator_->Push(id, "after"), 1);
  ASSERT_TRUE(a.WaitEvent([](const auto& e) { return IsPush(e, "after"); }));
  ExpectGapTold(a, "before", "", "after");
  ASSERT_TRUE(a.Turn("next"));
  ASSERT_TRUE(a.Response(3).has_value());
  EXPECT_EQ(Recorded(id), (std::vector<std::string>{"hello", "in flight", "next"}));
  EXPECT_TRUE(a.Finish().ok());
}

INSTANTIATE_TEST_SUITE_P(
    Codes, NlxCloseTest,
    ::testing::Values(CloseCase{1001, "GoingAway", "code 1001: bye"},
                      CloseCase{1011, "InternalError", "code 1011: bye"},
                      CloseCase{0, "NoCloseFrame", "upstream connection lost"}),
    [](const ::testing::TestParamInfo<CloseCase>& info) { return info.param.name; });

// 1008 (policy violation): NLX no longer accepts the socket's keys. The Converse calls
// on that conversation end UNAUTHENTICATED KEYS_REFUSED quoting the code; later calls on
// it fail the same way at once, without an upgrade, for auth_retry_after (never a fast
// loop), then one upgrade resumes it; other conversations go on meanwhile.
TEST_F(NlxFaultTest, PolicyViolationIsAnAuthRefusalWithoutAFastLoop) {
  Start({.config = [](config::v1::NlxBridgeConfig& c) {
    c.mutable_auth_retry_after()->set_seconds(3);
    c.mutable_idle_conversation_timeout()->set_seconds(60);
  }});
  Converser a(*stub_, Msg("hello"));
  const std::string conv = a.Opened();
  ASSERT_TRUE(a.Response(1).has_value());
  SendResult kept = Send("", "kept");
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  const std::string kept_id = kept.resp.conversation_id();
  SendResult other = Send("", "other");
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();

  ASSERT_EQ(emulator_->Close(conv, 1008, "policy"), 1);
  ASSERT_TRUE(WaitFor([&] { return a.ended(); }));
  grpc::Status ended = a.Finish();
  ExpectNoSecret(ended);
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  EXPECT_EQ(ErrorReason(ended), "KEYS_REFUSED") << ended.error_message();
  EXPECT_TRUE(absl::StrContains(ended.error_message(), "code 1008")) << ended.error_message();
  // Its socket is closed with the call, not reopened.
  EXPECT_TRUE(WaitFor([&] { return emulator_->connections_for(conv) == 0; }));

  const int handshakes = emulator_->handshakes();
  const Clock::time_point closed_at = Clock::now();
  ASSERT_EQ(emulator_->Close(kept_id, 1008, "policy"), 1);
  ASSERT_TRUE(WaitFor([&] { return emulator_->connections_for(kept_id) == 0; }));
  SendResult refused = Send(kept_id, "refused");
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << refused.status.error_message();
  EXPECT_EQ(ErrorReason(refused.status), "KEYS_REFUSED") << refused.status.error_message();
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(), "code 1008"))
      << refused.status.error_message();
  // Other conversations are not affected.
  SendResult still = Send(other.resp.conversation_id(), "still");
  EXPECT_TRUE(still.status.ok()) << still.status.error_message();
  // Calls on the refused conversation keep failing from memory (no upgrade) until
  // auth_retry_after has passed; then one upgrade resumes it.
  int refused_calls = 0;
  ASSERT_TRUE(WaitFor([&] {
    SendResult back = Send(kept_id, "back");
    if (back.status.ok()) return true;
    ++refused_calls;
    EXPECT_EQ(ErrorReason(back.status), "KEYS_REFUSED") << back.status.error_message();
    return false;
  }, 30s));
  RecordProperty("refused_calls", refused_calls);
  EXPECT_GE(Clock::now() - closed_at, 3s) << "resumed before auth_retry_after";
  EXPECT_EQ(emulator_->handshakes(), handshakes + 1) << "more than one upgrade after a 1008";
  EXPECT_EQ(emulator_->connections_for(kept_id), 1);
  EXPECT_EQ(Recorded(kept_id), (std::vector<std::string>{"kept", "back"}));
}

// ---------------------------------------------------------------------------------
// A caller that stops reading its Converse stream while NLX pushes responses: the
// bridge queues stream_queue events beyond what gRPC's flow control already took, then
// ends that call alone (RESOURCE_EXHAUSTED SLOW_CONSUMER) and closes its socket, so
// nothing more accumulates; another caller's conversation is unaffected throughout.
TEST_F(NlxFaultTest, SlowConsumerIsEndedAloneAndNothingGrows) {
  Start({.tweak = [](nlx::NlxBridgeOptions& o) { o.stream_queue = 64; }});
  Converser slow(*stub_, Msg(""), {}, /*read=*/false);
  v1::ConverseEvent opened;
  ASSERT_TRUE(slow.stream().Read(&opened));
  ASSERT_TRUE(opened.has_opened());
  const std::string id = opened.opened().conversation_id();

  auto other_stub = v1::NlxService::NewStub(harness_.NewChannel());
  Converser fast(*other_stub, Msg("hello"));
  ASSERT_TRUE(fast.Response(1).has_value());

  // Push until the bridge gives up on the slow caller and closes its socket.
  const std::string text(200, 'p');
  int pushed = 0;
  while (pushed < 100000 && emulator_->Push(id, text) == 1) {
    ++pushed;
    if (pushed % 500 == 0) {
      // The other caller keeps being served meanwhile.
      ASSERT_TRUE(fast.Turn(absl::StrCat("turn ", pushed)));
    }
  }
  ASSERT_LT(pushed, 100000) << "the slow caller was never ended";
  EXPECT_TRUE(WaitFor([&] { return emulator_->connections_for(id) == 0; }));
  RecordProperty("pushed_before_the_end", pushed);

  // The slow caller reads what was queued, then the status.
  int read = 0;
  v1::ConverseEvent e;
  while (slow.stream().Read(&e)) ++read;
  grpc::Status st = slow.stream().Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_EQ(ErrorReason(st), "SLOW_CONSUMER") << st.error_message();
  RecordProperty("events_read_after_stalling", read);
  // The bridge held stream_queue events for the caller before giving up; what reached
  // the caller is what gRPC's flow control let through meanwhile (a handful: the
  // transport grants a stream that is not being read little window), not every push.
  EXPECT_GE(pushed, 64);
  EXPECT_LT(read, pushed) << "every push reached the caller: nothing was bounded";

  const int fast_turns = 1 + pushed / 500;
  for (int n = 1; n <= fast_turns; ++n) {
    EXPECT_TRUE(fast.Response(static_cast<uint64_t>(n)).has_value()) << "turn " << n;
  }
  EXPECT_EQ(fast.Find([](const auto& e) { return e.has_turn_failed(); }), -1);
  EXPECT_TRUE(fast.Finish().ok());
  // The slow conversation still exists at NLX and resumes.
  SendResult again = Send(id, "again");
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();
}

// ---------------------------------------------------------------------------------
// Key rotation through a mounted file, the way Kubernetes updates a Secret volume: the
// key file is a symlink through "..data", and the new version is written to a fresh
// directory whose "..data" symlink is renamed over the old one. NLX starts refusing the
// old key (its open sockets closed with 1008, new upgrades 401); once the file holds the
// new key the bridge uses it without a restart, for new conversations and for a socket
// that was waiting out auth_retry_after.
TEST_F(NlxFaultTest, KeyRotationThroughAMountedFile) {
  testing::TempDir dir;
  namespace fs = std::filesystem;
  const fs::path root(dir.path());
  auto write_version = [&](const std::string& version, const std::string& key) {
    fs::create_directory(root / version);
    FILE* f = std::fopen((root / version / "api_key").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs(key.c_str(), f);
    std::fclose(f);
  };
  write_version("..2026_v1", kApiKey);
  fs::create_directory_symlink("..2026_v1", root / "..data");
  fs::create_symlink("..data/api_key", root / "api_key");
  Start({.config = [&](config::v1::NlxBridgeConfig& c) {
    c.mutable_api_key()->set_file((root / "api_key").string());
    // Long: only the rotation can bring the refused keys back in time.
    c.mutable_auth_retry_after()->set_seconds(600);
    c.mutable_idle_conversation_timeout()->set_seconds(60);
  }});
  Converser a(*stub_, Msg("hello"));
  const std::string conv = a.Opened();
  ASSERT_TRUE(a.Response(1).has_value());
  SendResult kept = Send("", "kept");
  ASSERT_TRUE(kept.status.ok()) << kept.status.error_message();
  const std::string kept_id = kept.resp.conversation_id();

  // NLX rotates: the old key is refused from now on.
  emulator_->SetApiKey(kRotatedApiKey);
  ASSERT_EQ(emulator_->Close(conv, 1008, "key revoked"), 1);
  ASSERT_EQ(emulator_->Close(kept_id, 1008, "key revoked"), 1);
  ASSERT_TRUE(WaitFor([&] { return a.ended(); }));
  grpc::Status ended = a.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  ExpectNoSecret(ended);
  SendResult refused = Send("", "refused");
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << refused.status.error_message();
  EXPECT_EQ(ErrorReason(refused.status), "KEYS_REFUSED") << refused.status.error_message();
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(), "apiKey is not valid"))
      << refused.status.error_message();
  // Remembered: the next call fails without an upgrade.
  const int handshakes = emulator_->handshakes();
  SendResult again = Send("", "refused again");
  EXPECT_EQ(again.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(emulator_->handshakes(), handshakes);

  // The Secret volume is updated: a new version directory, "..data" renamed over.
  write_version("..2026_v2", kRotatedApiKey);
  fs::create_directory_symlink("..2026_v2", root / "..data_tmp");
  fs::rename(root / "..data_tmp", root / "..data");
  ASSERT_TRUE(WaitFor([&] {
    auto v = options_.api_key->Current();
    return v.ok() && *v == kRotatedApiKey;
  }, 20s)) << "the key file was never re-read";

  SendResult fresh = Send("", "fresh");
  ASSERT_TRUE(fresh.status.ok()) << fresh.status.error_message();
  // The socket that NLX closed with 1008 waits out auth_retry_after (600 s); with the
  // rotated key a resume replaces it at once.
  SendResult resumed = Send(kept_id, "resumed");
  ASSERT_TRUE(resumed.status.ok()) << resumed.status.error_message();
  EXPECT_EQ(resumed.resp.conversation_id(), kept_id);
  Converser b(*stub_, Msg("back", conv));
  EXPECT_EQ(b.Opened(), conv);
  ASSERT_TRUE(b.Response(1).has_value());
  EXPECT_TRUE(b.Finish().ok());
  EXPECT_EQ(Recorded(kept_id), (std::vector<std::string>{"kept", "resumed"}));
  EXPECT_EQ(Recorded(conv), (std::vector<std::string>{"hello", "back"}));
}

// ---------------------------------------------------------------------------------
// Fail-fast (#14 item 1): while a conversation's socket cannot reach NLX (a reconnect
// attempt failed, not just one drop), calls on it fail at once with UNAVAILABLE saying
// since when, and so do new turns on its Converse calls; a call that sends
// x-wsbridge-wait-for-ready: true waits instead, up to max_waiting_calls per bridge
// (RESOURCE_EXHAUSTED beyond). Healed, the waiting calls are answered, each turn once.
TEST_F(NlxFaultTest, UnreachableConversationFailsFastUnlessTheCallerWaits) {
  Start({.config = [](config::v1::NlxBridgeConfig& c) {
           c.mutable_idle_conversation_timeout()->set_seconds(60);
         },
         .max_waiting_calls = 2});
  SendResult first = Send("", "hello");
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  const std::string id = first.resp.conversation_id();
  Converser a(*stub_, Msg("", id));
  ASSERT_EQ(a.Opened(), id);
  const uint64_t accepted = proxy_->counters().connections_accepted;

  // NLX goes away: the socket is reset, and so is every attempt after it.
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kReset);
  // The drop's one reconnect of grace failed and the next attempt was made.
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_accepted >= accepted + 2; }));

  const Clock::time_point asked = Clock::now();
  SendResult fast = Send(id, "fail fast");
  EXPECT_EQ(fast.status.error_code(), grpc::StatusCode::UNAVAILABLE) << fast.status.error_message();
  EXPECT_EQ(ErrorReason(fast.status), "UPSTREAM_UNREACHABLE") << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "unreachable since"))
      << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "x-wsbridge-wait-for-ready"))
      << fast.status.error_message();
  EXPECT_LT(Clock::now() - asked, 15s) << "the call waited instead of failing fast";
  // A turn on the open Converse fails fast too; the stream goes on.
  ASSERT_TRUE(a.Turn("fail fast too"));
  auto failed = a.Failed(1);
  ASSERT_TRUE(failed.has_value());
  EXPECT_EQ(failed->code(), static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  EXPECT_EQ(failed->reason(), "UPSTREAM_UNREACHABLE") << failed->message();

  // Two callers wait (the bound), the third is refused.
  const std::map<std::string, std::string> wait = {{std::string(core::kWaitForReadyMetadata), "true"}};
  SendResult waited[2];
  std::thread waiters[2];
  for (int i = 0; i < 2; ++i) {
    waiters[i] = std::thread([&, i] { waited[i] = Send(id, absl::StrCat("waited ", i), wait, 60s); });
    ASSERT_TRUE(WaitFor([&] { return FirstSession().in_flight_requests() == static_cast<uint32_t>(i + 1); }))
        << "waiting call " << i << " never reached the session";
  }
  SendResult over = Send(id, "over the bound", wait);
  EXPECT_EQ(over.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << over.status.error_message();
  EXPECT_TRUE(absl::StrContains(over.status.error_message(), "max_waiting_calls"))
      << over.status.error_message();
  // A new conversation makes its one attempt and fails, naming the connection error.
  SendResult fresh = Send("", "fresh");
  EXPECT_EQ(fresh.status.error_code(), grpc::StatusCode::UNAVAILABLE) << fresh.status.error_message();

  proxy_->Heal();
  for (auto& t : waiters) t.join();
  for (const auto& w : waited) EXPECT_TRUE(w.status.ok()) << w.status.error_message();
  ASSERT_TRUE(a.WaitEvent(IsReconnected));
  ASSERT_TRUE(a.Turn("served again"));
  ASSERT_TRUE(a.Response(2).has_value());
  EXPECT_TRUE(a.Finish().ok());
  // Each turn reached NLX once; the refused ones never did.
  std::vector<std::string> recorded = Recorded(id);
  ASSERT_EQ(recorded.size(), 4u);
  EXPECT_EQ(recorded[0], "hello");
  EXPECT_EQ(recorded[3], "served again");
  EXPECT_EQ(std::count(recorded.begin(), recorded.end(), "waited 0"), 1);
  EXPECT_EQ(std::count(recorded.begin(), recorded.end(), "waited 1"), 1);
}

}  // namespace
}  // namespace wsbridge::faults
