// Fault scenarios for the Nexora bridge inside the real daemon: the bridge talks to the
// Nexora emulator through the fault proxy (chat sockets, login and create-chat alike),
// and callers send messages as a real backend would. Every scenario checks:
//  - no message answered twice or left unanswered: every accepted SendMessage ends with
//    exactly one done or duplicate (or one error status), nothing after it; the text
//    after the last `restarted` is one whole answer; the emulator received the message
//    once plus once per `restarted` the caller was told of;
//  - nothing left behind (no request held by a chat socket once its calls ended), no
//    crash (the daemon is this process), and the bridge serves again afterwards.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "bridges/core/upstream_config.h"
#include "bridges/nexora/nexora_bridge.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/nexora_emulator.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::nexora::v1;
using nexora::NexoraBridgeOptions;
using Clock = std::chrono::steady_clock;
using E = v1::ChatEvent;

constexpr char kKey[] = "nxr_s3cr3t_fault_key_1";
constexpr char kRotatedKey[] = "nxr_s3cr3t_fault_key_2";

// An answer of `n` chunks, `gap` apart: long enough to be cut mid-way.
std::vector<emulator::NexoraScriptStep> LongScript(int n, std::chrono::milliseconds gap) {
  std::vector<emulator::NexoraScriptStep> steps;
  for (int i = 0; i < n; ++i) {
    steps.push_back({absl::StrCat(R"({"type":"chunk","content":"part-)", i, R"( "})"), gap});
  }
  return steps;
}

// The same, then a step that holds the answer for a minute before it can end: a fault
// injected once some chunks arrived always lands mid-answer, however slow the machine.
// Scenarios switch to LongScript before the fault, so the resend's answer ends.
std::vector<emulator::NexoraScriptStep> StallingScript(int n, std::chrono::milliseconds gap) {
  std::vector<emulator::NexoraScriptStep> steps = LongScript(n, gap);
  steps.push_back({R"({"type":"chunk","content":"part-stalled "})", std::chrono::minutes(1)});
  return steps;
}

std::string LongText(int n) {
  std::string out;
  for (int i = 0; i < n; ++i) absl::StrAppend(&out, "part-", i, " ");
  return out;
}

constexpr char kDefaultTextPrefix[] = "Let me check that. You asked: ";

// One SendMessage call, read on its own thread.
class Caller {
 public:
  struct Options {
    std::string cmid{};
    bool wait_for_ready = false;
    std::chrono::seconds deadline{30};
    bool read = true;  // false: the caller stops reading after `accepted`
  };

  Caller(v1::NexoraService::Stub* stub, const std::string& chat, const std::string& content,
         Options o)
      : options_(std::move(o)) {
    ctx_.set_deadline(std::chrono::system_clock::now() + options_.deadline);
    if (options_.wait_for_ready) ctx_.AddMetadata("x-wsbridge-wait-for-ready", "true");
    v1::SendMessageRequest req;
    req.set_chat_id(chat);
    req.set_content(content);
    req.set_client_message_id(options_.cmid);
    reader_ = stub->SendMessage(&ctx_, req);
    thread_ = std::thread([this] { Run(); });
  }
  // A caller still reading when its test ends (a failed assertion) is cancelled.
  ~Caller() {
    if (!finished()) ctx_.TryCancel();
    ReadOn();
    Join();
  }

  // Let a caller that stopped reading read on.
  void ReadOn() {
    absl::MutexLock lock(&mu_);
    reading_ = true;
  }
  int chunks() const {
    absl::MutexLock lock(&mu_);
    return chunks_;
  }
  bool accepted() const {
    absl::MutexLock lock(&mu_);
    return !events_.empty();
  }
  bool finished() const {
    absl::MutexLock lock(&mu_);
    return finished_;
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  std::vector<E> events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  grpc::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  Clock::time_point finished_at() const {
    absl::MutexLock lock(&mu_);
    return finished_at_;
  }

 private:
  void Run() {
    E ev;
    bool first = true;
    while (true) {
      if (!first) {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(&reading_));
      }
      if (!reader_->Read(&ev)) break;
      absl::MutexLock lock(&mu_);
      if (first && !options_.read) reading_ = false;
      first = false;
      if (ev.has_chunk()) ++chunks_;
      events_.push_back(ev);
    }
    grpc::Status st = reader_->Finish();
    absl::MutexLock lock(&mu_);
    status_ = st;
    finished_ = true;
    finished_at_ = Clock::now();
  }

  const Options options_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<E>> reader_;
  mutable absl::Mutex mu_;
  bool reading_ ABSL_GUARDED_BY(mu_) = true;
  int chunks_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<E> events_ ABSL_GUARDED_BY(mu_);
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  Clock::time_point finished_at_ ABSL_GUARDED_BY(mu_){};
  std::thread thread_;
};

struct Answer {
  std::vector<E> events;
  grpc::Status status;

  int Count(E::EventCase c) const {
    int n = 0;
    for (const E& e : events) n += e.event_case() == c ? 1 : 0;
    return n;
  }
  // The chunks' text after the last restart (what a caller shows).
  std::string Text() const {
    std::string out;
    for (const E& e : events) {
      if (e.has_restarted()) out.clear();
      if (e.has_chunk()) out += e.chunk().content();
    }
    return out;
  }
};

// What a scenario changes (designated initializers, so every name has an initializer).
struct Scenario {
  bool tls = false;
  emulator::NexoraEmulatorOptions emulator{};
  std::function<void(NexoraBridgeOptions&)> tweak{};
  std::function<void(FaultProxy&)> faults{};  // set before the bridge starts
  std::function<void(config::v1::DaemonConfig&)> daemon{};  // e.g. the bridge's limits
};

class NexoraFaultTest : public ::testing::Test {
 protected:

  // The emulator, the proxy in front of it, and the bridge (pointed at the proxy for
  // its sockets and its HTTP calls) inside the real daemon.
  void Start(Scenario setup = {}) {
    emulator::NexoraEmulatorOptions eopts = std::move(setup.emulator);
    if (eopts.api_keys.empty()) eopts.api_keys = {kKey};
    if (setup.tls) {
      ca_ = pki_.MakeCa("nexora-fault-ca");
      testing::CertAndKey server = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"});
      eopts.tls = true;
      eopts.cert_pem = server.cert_pem;
      eopts.key_pem = server.key_pem;
    }
    emulator_ = std::make_unique<emulator::NexoraEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());
    proxy_ = std::make_unique<FaultProxy>(emulator_->port());
    ASSERT_TRUE(proxy_->Start().ok());
    if (setup.faults) setup.faults(*proxy_);

    NexoraBridgeOptions o;
    o.url = absl::StrCat(setup.tls ? "wss" : "ws", "://127.0.0.1:", proxy_->port());
    o.connection.allow_plaintext = !setup.tls;
    if (setup.tls) o.connection.tls.ca_file = ca_.cert_file;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.api_key = core::SecretSource::Fixed(kKey);
    // Faults, not these timeouts, must end a stuck call.
    o.answer_idle_timeout = 30s;
    o.http_timeout = 10s;
    o.auth_retry_after = 2s;
    // Heartbeats that a starved emulator thread on a loaded machine does not trip (the
    // black-hole scenario sets its own).
    o.ping_interval = 1s;
    o.pong_timeout = 3s;
    o.connection.keepalive.ping_interval = 1s;
    o.connection.keepalive.pong_timeout = 3s;
    if (setup.tweak) setup.tweak(o);
    url_ = o.url;
    absl::Status started = harness_.Start(
        "nexora",
        [&](config::v1::BridgeConfig& b) {
          b.mutable_nexora()->mutable_upstream()->set_url(o.url);
          b.mutable_nexora()->mutable_upstream()->set_allow_plaintext(!setup.tls);
        },
        [o](const core::BridgeContext& ctx) { return nexora::NewNexoraBridge(o, ctx); },
        setup.daemon);
    ASSERT_TRUE(started.ok()) << started;
    stub_ = v1::NexoraService::NewStub(harness_.channel());
  }

  void TearDown() override {
    harness_.Stop();
    if (proxy_ != nullptr) proxy_->Stop();
    if (emulator_ != nullptr) emulator_->Stop();
  }

  core::Bridge* bridge() { return harness_.bridge(); }

  std::unique_ptr<Caller> Call(const std::string& chat, const std::string& content,
                               Caller::Options o = {}, v1::NexoraService::Stub* stub = nullptr) {
    return std::make_unique<Caller>(stub != nullptr ? stub : stub_.get(), chat, content,
                                    std::move(o));
  }
  Answer Send(const std::string& chat, const std::string& content, Caller::Options o = {}) {
    Caller c(stub_.get(), chat, content, std::move(o));
    c.Join();
    return {c.events(), c.status()};
  }
  static Answer Finish(Caller& c) {
    c.Join();
    return {c.events(), c.status()};
  }

  // The invariant: answered exactly once. `text`: the whole answer's text (unchecked
  // when absent).
  void ExpectAnsweredOnce(const Answer& a, const std::string& cmid,
                          const std::optional<std::string>& text) {
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    ASSERT_FALSE(a.events.empty());
    EXPECT_TRUE(a.events.front().has_accepted());
    EXPECT_EQ(a.events.front().accepted().client_message_id(), cmid);
    const int terminal = a.Count(E::kDone) + a.Count(E::kDuplicate);
    EXPECT_EQ(terminal, 1) << "the message was answered " << terminal << " times";
    const E& last = a.events.back();
    EXPECT_TRUE(last.has_done() || last.has_duplicate()) << "something followed the answer's end";
    for (const E& e : a.events) EXPECT_EQ(e.client_message_id(), cmid);
    if (last.has_done() && text.has_value()) {
      EXPECT_EQ(a.Text(), *text);
    }
    // Sent once, then once more per restart the caller was told of: nothing resent
    // behind its back.
    EXPECT_EQ(emulator_->messages_received(cmid), 1 + a.Count(E::kRestarted));
  }

  // No chat socket still holds a request for calls that ended.
  void ExpectNothingLeft() {
    EXPECT_TRUE(WaitFor([&] { return NoRequestsHeld(*bridge()); }, 20s))
        << "a chat socket still holds requests of ended calls";
  }

  // The bridge serves again: a fresh message on a fresh chat is answered whole.
  void ExpectServesAgain(const std::string& chat) {
    ASSERT_TRUE(WaitFor([&] { return bridge()->Serving(); }, 20s)) << "never serving again";
    emulator_->SetScript(emulator::NexoraDefaultScript());
    const std::string cmid = absl::StrCat("again-", chat);
    Answer a = Send(chat, "still there?", {.cmid = cmid});
    ExpectAnsweredOnce(a, cmid, absl::StrCat(kDefaultTextPrefix, "still there?. There are no open issues."));
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_;
  std::unique_ptr<emulator::NexoraEmulator> emulator_;
  std::unique_ptr<FaultProxy> proxy_;
  DaemonHarness harness_;
  std::unique_ptr<v1::NexoraService::Stub> stub_;
  std::string url_;
};

constexpr int kParts = 30;
constexpr auto kGap = 25ms;

// ---------------------------------------------------------------------------------
// Reset mid-answer, towards the bridge or towards the upstream, with the upstream
// abandoning the interrupted answer (a resend gets a fresh one) or finishing it anyway
// (a resend gets `duplicate`).
struct ResetCase {
  Direction direction;
  bool upstream_finishes;
};

class NexoraResetTest : public NexoraFaultTest, public ::testing::WithParamInterface<ResetCase> {};

TEST_P(NexoraResetTest, ResetMidAnswerIsResentAndAnsweredOnce) {
  Start();
  emulator_->SetScript(StallingScript(kParts, kGap));
  emulator_->SetFinishAfterDrop(GetParam().upstream_finishes);
  const std::string cmid = "reset-1";
  auto caller = Call("chat-reset", "cut me", {.cmid = cmid});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 5; }, 20s));
  emulator_->SetScript(LongScript(kParts, kGap));  // for the resend
  const uint64_t accepted_before = proxy_->counters().connections_accepted;
  proxy_->SetMode(GetParam().direction, Mode::kReset);
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == 0; }));
  proxy_->Heal();
  Answer a = Finish(*caller);
  ExpectAnsweredOnce(a, cmid, LongText(kParts));
  EXPECT_EQ(a.Count(E::kRestarted), 1);
  EXPECT_GT(proxy_->counters().connections_accepted, accepted_before);
  if (GetParam().upstream_finishes) {
    EXPECT_TRUE(a.events.back().has_duplicate());
    EXPECT_FALSE(a.events.back().duplicate().message_id().empty());
  } else {
    EXPECT_TRUE(a.events.back().has_done());
  }
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-reset");
}

INSTANTIATE_TEST_SUITE_P(
    BothDirections, NexoraResetTest,
    ::testing::Values(ResetCase{Direction::kUpstreamToClient, false},
                      ResetCase{Direction::kClientToUpstream, false},
                      ResetCase{Direction::kUpstreamToClient, true},
                      ResetCase{Direction::kClientToUpstream, true}),
    [](const ::testing::TestParamInfo<ResetCase>& info) {
      return absl::StrCat(info.param.direction == Direction::kUpstreamToClient ? "TowardsTheBridge"
                                                                                : "TowardsTheUpstream",
                          info.param.upstream_finishes ? "_UpstreamFinishes" : "_UpstreamAbandons");
    });

// ---------------------------------------------------------------------------------
// Both directions black-holed mid-answer: only the JSON ping (and the WebSocket
// keepalive) can notice. The socket is found dead within ping_interval + 1.5 x
// pong_timeout of its last frame; once healed the message is resent and answered once
// (a duplicate: the upstream, which noticed nothing, finished the answer).
TEST_F(NexoraFaultTest, BlackHoleDetectedWithinTheHeartbeatDeadline) {
  constexpr auto kPing = 300ms;
  constexpr auto kPong = 600ms;
  Start({.tweak = [&](NexoraBridgeOptions& o) {
    o.ping_interval = kPing;
    o.pong_timeout = kPong;
    o.connection.keepalive.ping_interval = kPing;
    o.connection.keepalive.pong_timeout = kPong;
    o.connection.handshake_timeout = 1s;
  }});
  emulator_->SetScript(StallingScript(kParts, kGap));
  const std::string cmid = "hole-1";
  auto caller = Call("chat-hole", "into the void", {.cmid = cmid});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 5; }, 20s));
  emulator_->SetScript(LongScript(kParts, kGap));  // for the resend
  proxy_->SetMode(Direction::kClientToUpstream, Mode::kBlackHole);
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kBlackHole);
  const Clock::time_point holed_at = Clock::now();
  // Found dead: the chat socket is no longer ready.
  ASSERT_TRUE(WaitFor([&] {
    auto sessions = bridge()->ListSessions();
    return !sessions.empty() && sessions[0].state() != admin::v1::SESSION_STATE_READY;
  }, 20s)) << "the black hole went unnoticed";
  const auto detected = Clock::now() - holed_at;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(detected).count();
  RecordProperty("detected_ms", static_cast<int>(ms));
  // The deadline is ping interval + 1.5 x pong timeout (the check runs every half
  // pong timeout); the margin is for a loaded machine (without a heartbeat the answer
  // would wait for its 30 s answer_idle_timeout).
  EXPECT_LE(detected, kPing + kPong * 3 / 2 + 3s) << ms << " ms";
  EXPECT_FALSE(caller->finished()) << "the message was failed instead of resent";
  proxy_->Heal();
  Answer a = Finish(*caller);
  ExpectAnsweredOnce(a, cmid, LongText(kParts));
  EXPECT_EQ(a.Count(E::kRestarted), 1);
  EXPECT_GT(proxy_->counters().bytes_dropped, 0u);
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-hole");
}

// ---------------------------------------------------------------------------------
// Every byte both ways in 1-byte writes from the first connection: the upgrade, the
// frames and the HTTP login arrive in pieces and nothing changes.
TEST_F(NexoraFaultTest, SlicingChangesNothing) {
  Start({.faults = [](FaultProxy& proxy) {
    Shaping slice;
    slice.slice = true;
    proxy.SetShaping(Direction::kClientToUpstream, slice);
    proxy.SetShaping(Direction::kUpstreamToClient, slice);
  }});
  for (int i = 0; i < 3; ++i) {
    const std::string cmid = absl::StrCat("slice-", i);
    const std::string content = absl::StrCat("sliced message ", i, " ", std::string(2000, 'x'));
    Answer a = Send("chat-slice", content, {.cmid = cmid});
    ExpectAnsweredOnce(a, cmid, absl::StrCat(kDefaultTextPrefix, content, ". There are no open issues."));
    EXPECT_EQ(a.Count(E::kRestarted), 0);
  }
  EXPECT_EQ(proxy_->counters().connections_accepted, 1u) << "the bridge reconnected";
  EXPECT_TRUE(WaitFor([&] {
    ProxyCounters c = proxy_->counters();
    return c.writes_upstream_to_client == c.bytes_upstream_to_client &&
           c.writes_client_to_upstream == c.bytes_client_to_upstream;
  }));
  EXPECT_GT(proxy_->counters().bytes_client_to_upstream, 6000u);
  ExpectNothingLeft();
}

// ---------------------------------------------------------------------------------
// Close codes on an open socket, mid-answer:
//  - 1001 (going away), 1011 (internal error), none (TCP dropped): reconnect with the
//    normal backoff, the message resent with its id and answered once;
//  - repeated past max_resends: UNAVAILABLE / OUTCOME_UNKNOWN naming the close code.
struct CloseCase {
  uint16_t code;  // 0: no close frame (the emulator drops the TCP connection)
  const char* name;
};

class NexoraCloseTest : public NexoraFaultTest, public ::testing::WithParamInterface<CloseCase> {
 protected:
  void Close(const std::string& chat) {
    if (GetParam().code == 0) {
      emulator_->DropSockets(chat);
    } else {
      emulator_->CloseSockets(GetParam().code, absl::StrCat("closing with ", GetParam().code), chat);
    }
  }
};

TEST_P(NexoraCloseTest, AReconnectAndResendAnswersOnce) {
  Start();
  emulator_->SetScript(StallingScript(kParts, kGap));
  const std::string cmid = absl::StrCat("close-", GetParam().name);
  auto caller = Call("chat-close", "close me", {.cmid = cmid});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 5; }, 20s));
  emulator_->SetScript(LongScript(kParts, kGap));  // for the resend
  const int upgrades = emulator_->upgrades();
  Close("chat-close");
  Answer a = Finish(*caller);
  ExpectAnsweredOnce(a, cmid, LongText(kParts));
  EXPECT_EQ(a.Count(E::kRestarted), 1);
  // One reconnect, not a loop.
  EXPECT_EQ(emulator_->upgrades(), upgrades + 1);
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-close");
}

TEST_P(NexoraCloseTest, PastMaxResendsTheCallerLearnsTheCloseCode) {
  Start({.tweak = [](NexoraBridgeOptions& o) { o.max_resends = 1; }});
  emulator_->SetScript(StallingScript(kParts, kGap));
  const std::string cmid = absl::StrCat("close-twice-", GetParam().name);
  auto caller = Call("chat-close2", "close me twice", {.cmid = cmid});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 3; }, 20s));
  Close("chat-close2");
  // The resend streams again (after its `restarted`); close that one too.
  ASSERT_TRUE(WaitFor([&] {
    std::vector<E> ev = caller->events();
    int after = -1;
    for (const E& e : ev) {
      if (e.has_restarted()) after = 0;
      if (e.has_chunk() && after >= 0) ++after;
    }
    return after >= 3;
  }, 20s));
  Close("chat-close2");
  Answer a = Finish(*caller);
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::UNAVAILABLE) << a.status.error_message();
  EXPECT_EQ(ErrorReason(a.status), "OUTCOME_UNKNOWN") << a.status.error_message();
  if (GetParam().code != 0) {
    EXPECT_TRUE(absl::StrContains(a.status.error_message(), absl::StrCat("code ", GetParam().code)))
        << a.status.error_message();
  }
  EXPECT_EQ(a.Count(E::kDone), 0);
  EXPECT_EQ(a.Count(E::kRestarted), 1);
  EXPECT_EQ(emulator_->messages_received(cmid), 2);
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-close2");
}

INSTANTIATE_TEST_SUITE_P(Codes, NexoraCloseTest,
                         ::testing::Values(CloseCase{1001, "GoingAway"},
                                           CloseCase{1011, "InternalError"},
                                           CloseCase{0, "NoCloseFrame"}),
                         [](const ::testing::TestParamInfo<CloseCase>& info) {
                           return std::string(info.param.name);
                         });

// 1008 (policy violation) on an open socket with a key the upstream now refuses and no
// new one: the refusal stands. The message in flight is not resent with a refused key:
// its caller learns UNAVAILABLE / OUTCOME_UNKNOWN; later calls fail UNAUTHENTICATED at
// once, quoting the close code; the chat is not retried in a fast loop (once per
// auth_retry_after); when the upstream takes the key again, the chat serves again.
TEST_F(NexoraFaultTest, PolicyViolationWithARefusedKeyIsNoReconnectLoop) {
  constexpr auto kRetryAfter = 1500ms;
  Start({.tweak = [&](NexoraBridgeOptions& o) { o.auth_retry_after = kRetryAfter; },
         .daemon = [&](config::v1::DaemonConfig& cfg) {
           // How long the refused chat is refused from memory (the config's default: 10 s).
           cfg.mutable_bridges(0)->mutable_limits()->mutable_refusal_memory()->set_nanos(
               static_cast<int32_t>(std::chrono::nanoseconds(kRetryAfter).count() % 1'000'000'000));
           cfg.mutable_bridges(0)->mutable_limits()->mutable_refusal_memory()->set_seconds(
               std::chrono::duration_cast<std::chrono::seconds>(kRetryAfter).count());
         }});
  emulator_->SetScript(StallingScript(kParts, kGap));
  auto caller = Call("chat-1008", "revoked", {.cmid = "policy-1"});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 3; }, 20s));
  const int upgrades = emulator_->upgrades();
  emulator_->SetApiKeys({"nxr_s3cr3t_someone_else"});
  emulator_->CloseSockets(1008, "API key revoked", "chat-1008");
  Answer a = Finish(*caller);
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::UNAVAILABLE) << a.status.error_message();
  EXPECT_EQ(ErrorReason(a.status), "OUTCOME_UNKNOWN") << a.status.error_message();
  EXPECT_EQ(a.Count(E::kDone), 0);
  EXPECT_EQ(a.Count(E::kRestarted), 0);
  EXPECT_EQ(emulator_->messages_received("policy-1"), 1);
  // Later calls on the chat fail at once, without a new upgrade each.
  const Clock::time_point refused_at = Clock::now();
  for (int i = 0; i < 5; ++i) {
    Answer b = Send("chat-1008", "again", {.cmid = absl::StrCat("policy-again-", i)});
    EXPECT_EQ(b.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << b.status.error_message();
    if (i == 0) {
      EXPECT_TRUE(absl::StrContains(b.status.error_message(), "code 1008: API key revoked"))
          << b.status.error_message();
    }
  }
  // No fast loop: at most one attempt per refusal memory (+1 for the one in progress).
  const auto window = Clock::now() - refused_at;
  const int attempts = emulator_->upgrades() - upgrades;
  EXPECT_LE(attempts, 2 + static_cast<int>(window / kRetryAfter)) << attempts << " upgrades";
  RecordProperty("upgrades_after_1008", attempts);
  emulator_->SetApiKeys({kKey});
  emulator_->SetScript(emulator::NexoraDefaultScript());
  EXPECT_TRUE(WaitFor([&] {
    return Send("chat-1008", "back", {.cmid = "policy-back"}).status.ok();
  }, 20s)) << "the chat never served again";
  ExpectNothingLeft();
}

// ---------------------------------------------------------------------------------
// A caller that stops reading a long answer: the bridge queues at most stream_queue
// events for it (plus what the HTTP/2 windows hold), then ends that call alone with
// RESOURCE_EXHAUSTED / SLOW_CONSUMER. (The queue also absorbs an answer arriving faster
// than a reading caller's writes drain: an unpaced burst larger than stream_queue ends
// even a reading caller, which is why the default is 4096.) The answer still runs to its end upstream, so
// the chat's next message is answered in order; callers of other chats, and of the
// same chat after it, are unaffected.
TEST_F(NexoraFaultTest, ASlowConsumerIsEndedAloneAndNothingGrows) {
  constexpr size_t kQueue = 512;
  constexpr int kBigParts = 1500;  // 6 MB: beyond the queue and the HTTP/2 windows
  Start({.tweak = [&](NexoraBridgeOptions& o) { o.stream_queue = kQueue; }});
  // The slow caller on a connection of its own, with HTTP/2 flow control at its fixed
  // defaults (no BDP probing to grow the window while it does not read).
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto slow_stub = v1::NexoraService::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", harness_.daemon().grpc_port()), grpc::InsecureChannelCredentials(),
      args));
  std::vector<emulator::NexoraScriptStep> big;
  const std::string filler(4096, 'z');
  for (int i = 0; i < kBigParts; ++i) {
    // Paced (4 KB every 2 ms) so that a caller who reads keeps up on a loaded machine.
    big.push_back({absl::StrCat(R"({"type":"chunk","content":")", filler, R"("})"), 2ms});
  }
  emulator_->SetScript(big);
  auto slow = Call("chat-slow", "a lot", {.cmid = "slow-1", .read = false}, slow_stub.get());
  ASSERT_TRUE(WaitFor([&] { return slow->accepted(); }, 20s));
  // The next message on the same chat waits for the slow answer's end upstream.
  auto next = Call("chat-slow", "after the slow one", {.cmid = "slow-next"});
  // Another chat is not held back meanwhile.
  Answer other = Send("chat-other", "other", {.cmid = "other-1"});
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  EXPECT_EQ(other.Count(E::kChunk), kBigParts);
  EXPECT_EQ(other.Count(E::kDone), 1);
  Answer after = Finish(*next);
  ExpectAnsweredOnce(after, "slow-next", std::nullopt);
  EXPECT_EQ(after.Count(E::kChunk), kBigParts);
  // The slow caller reads on: what was queued for it, then the status.
  slow->ReadOn();
  Answer s = Finish(*slow);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.status.error_message();
  EXPECT_EQ(ErrorReason(s.status), "SLOW_CONSUMER") << s.status.error_message();
  EXPECT_LT(s.Count(E::kChunk), kBigParts);
  // What it got: at most the queue plus what the HTTP/2 windows held.
  EXPECT_LE(s.Count(E::kChunk), static_cast<int>(kQueue) + 64);
  EXPECT_EQ(s.Count(E::kDone), 0);
  RecordProperty("slow_consumer_chunks_delivered", s.Count(E::kChunk));
  EXPECT_EQ(emulator_->messages_received("slow-1"), 1);
  ExpectNothingLeft();
}

// ---------------------------------------------------------------------------------
// Token rotation through a mounted file, as Kubernetes does it: the API key file is
// replaced (a new file renamed over it, or the ..data symlink swapped), and the
// upstream starts refusing the old key (closing its sockets with 1008). The bridge
// picks up the new key without a restart.
class NexoraRotationTest : public NexoraFaultTest {
 protected:
  // A Kubernetes-style secret volume: <dir>/..data -> <dir>/..v1, key -> ..data/key.
  std::string MountKey(const std::string& key) {
    namespace fs = std::filesystem;
    fs::create_directories(fs::path(dir_.path()) / "..v1");
    dir_.WriteFile("..v1/key", key);
    fs::create_directory_symlink("..v1", fs::path(dir_.path()) / "..data");
    fs::create_symlink("..data/key", fs::path(dir_.path()) / "key");
    return (fs::path(dir_.path()) / "key").string();
  }
  // The kubelet's swap: a new version directory, a new symlink renamed over ..data.
  void SwapKey(const std::string& key) {
    namespace fs = std::filesystem;
    fs::create_directories(fs::path(dir_.path()) / "..v2");
    dir_.WriteFile("..v2/key", key);
    fs::create_directory_symlink("..v2", fs::path(dir_.path()) / "..data_tmp");
    fs::rename(fs::path(dir_.path()) / "..data_tmp", fs::path(dir_.path()) / "..data");
  }
  // A plain file replaced by rename.
  void RenameOver(const std::string& path, const std::string& key) {
    const std::string tmp = dir_.WriteFile("key.tmp", key);
    std::filesystem::rename(tmp, path);
  }
  std::shared_ptr<core::SecretSource> FileSecret(const std::string& path) {
    config::v1::Secret s;
    s.set_file(path);
    absl::StatusOr<std::shared_ptr<core::SecretSource>> src = core::SecretSource::Create(s);
    EXPECT_TRUE(src.ok()) << src.status();
    return src.ok() ? *src : nullptr;
  }

  testing::TempDir dir_;
};

// The file is replaced first (read by the bridge), then the upstream revokes the old key
// mid-answer on the socket opened with it: the socket closes 1008, the bridge
// reconnects at once with the new key and resends; nothing fails.
TEST_F(NexoraRotationTest, KeyReplacedBeforeTheRevocationLosesNothing) {
  const std::string path = MountKey(kKey);
  std::shared_ptr<core::SecretSource> key = FileSecret(path);
  ASSERT_NE(key, nullptr);
  Start({.emulator = {.api_keys = {kKey, kRotatedKey}},
         .tweak = [&](NexoraBridgeOptions& o) {
           o.api_key = key;
           o.auth_retry_after = 60s;  // a refusal would be waited out for a minute
         }});
  ExpectAnsweredOnce(Send("chat-rot", "before", {.cmid = "rot-0"}), "rot-0",
                     absl::StrCat(kDefaultTextPrefix, "before. There are no open issues."));
  // An answer that outlasts the key's re-read (the refresher reads every second).
  emulator_->SetScript(StallingScript(kParts, kGap));
  auto caller = Call("chat-rot", "during", {.cmid = "rot-1"});
  ASSERT_TRUE(WaitFor([&] { return caller->chunks() >= 3; }, 20s));
  const uint64_t version = key->version();
  SwapKey(kRotatedKey);
  ASSERT_TRUE(WaitFor([&] { return key->version() != version; }, 20s)) << "the key file was not re-read";
  emulator_->SetScript(LongScript(kParts, kGap));  // for the resend
  emulator_->SetApiKeys({kRotatedKey});
  emulator_->CloseSockets(1008, "API key revoked", "chat-rot");
  Answer a = Finish(*caller);
  ExpectAnsweredOnce(a, "rot-1", LongText(kParts));
  EXPECT_EQ(a.Count(E::kRestarted), 1);
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-rotation");
}

// The upstream revokes the old key first (open sockets closed with 1008, upgrades with
// it refused 401); calls fail UNAUTHENTICATED; the file is replaced later (the
// kubelet's sync delay): the next calls use the new key at once, not after the
// refusal's hold (auth_retry_after, a minute here).
TEST_F(NexoraRotationTest, KeyReplacedAfterTheRevocationIsPickedUpWithoutRestart) {
  const std::string path = dir_.WriteFile("api_key", kKey);
  std::shared_ptr<core::SecretSource> key = FileSecret(path);
  ASSERT_NE(key, nullptr);
  Start({.tweak = [&](NexoraBridgeOptions& o) {
    o.api_key = key;
    o.auth_retry_after = 60s;
  }});
  ExpectAnsweredOnce(Send("chat-rot2", "before", {.cmid = "rot2-0"}), "rot2-0",
                     absl::StrCat(kDefaultTextPrefix, "before. There are no open issues."));
  emulator_->SetApiKeys({kRotatedKey});
  emulator_->CloseSockets(1008, "API key revoked", "chat-rot2");
  ASSERT_TRUE(WaitFor([&] {
    return Send("chat-rot2", "refused?", {.cmid = "rot2-probe"}).status.error_code() ==
           grpc::StatusCode::UNAUTHENTICATED;
  }, 20s)) << "the revocation was never noticed";
  const Clock::time_point rotated_at = Clock::now();
  RenameOver(path, kRotatedKey);
  ASSERT_TRUE(WaitFor([&] {
    return Send("chat-rot2", "after", {.cmid = "rot2-after"}).status.ok();
  }, 20s)) << "the rotated key was not picked up";
  RecordProperty("picked_up_ms", static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                      Clock::now() - rotated_at).count()));
  EXPECT_LT(Clock::now() - rotated_at, 30s) << "waited out the refusal instead";
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-rotation2");
}

// ---------------------------------------------------------------------------------
// Slow handshakes. The upgrade answer (and the TLS server flight) held back within the
// handshake timeout: the bridge waits and connects once.
TEST_F(NexoraFaultTest, SlowHandshakeWithinTheTimeoutConnectsOnce) {
  Start({.tls = true,
         .tweak = [](NexoraBridgeOptions& o) { o.connection.handshake_timeout = 5s; },
         .faults = [](FaultProxy& proxy) {
           Shaping stall;
           stall.stall_bytes = 64 * 1024;
           stall.stall_for = 500ms;
           proxy.SetShaping(Direction::kUpstreamToClient, stall);
         }});
  const Clock::time_point started = Clock::now();
  Answer a = Send("chat-slowhs", "slow start", {.cmid = "slowhs-1"});
  ExpectAnsweredOnce(a, "slowhs-1", absl::StrCat(kDefaultTextPrefix, "slow start. There are no open issues."));
  EXPECT_GE(Clock::now() - started, 500ms);  // the stall was in the way
  EXPECT_EQ(proxy_->counters().connections_accepted, 1u) << "the bridge reconnected";
  ExpectNothingLeft();
}

// Handshakes stalled beyond the timeout: every attempt times out and is retried with
// backoff. A message waiting for the chat's first socket fails UNAVAILABLE after
// kAttemptsBeforeFailing attempts (nothing sent); later calls on the chat fail at once
// saying since when the upstream is down; the bridge is NOT_SERVING; a caller that asked
// to wait (x-wsbridge-wait-for-ready) waits, bounded by max_waiting_calls, and is
// answered once healed.
TEST_F(NexoraFaultTest, StalledHandshakeFailsFastUnlessTheCallerWaits) {
  Start({.tls = true,
         .tweak =
             [](NexoraBridgeOptions& o) {
               o.connection.handshake_timeout = 300ms;
               o.connection.connect_timeout = 1s;
             },
         .faults =
             [](FaultProxy& proxy) {
               Shaping stall;
               stall.stall_bytes = 64 * 1024;
               stall.stall_for = 60s;
               proxy.SetShaping(Direction::kUpstreamToClient, stall);
             },
         .daemon = [](config::v1::DaemonConfig& cfg) {
           cfg.mutable_bridges(0)->mutable_limits()->set_max_waiting_calls(1);
         }});
  EXPECT_TRUE(bridge()->Serving());  // no chat tried yet
  Answer first = Send("chat-stall", "first", {.cmid = "stall-1"});
  EXPECT_EQ(first.status.error_code(), grpc::StatusCode::UNAVAILABLE) << first.status.error_message();
  EXPECT_EQ(ErrorReason(first.status), "UPSTREAM_UNREACHABLE") << first.status.error_message();
  EXPECT_EQ(ErrorMetadata(first.status, "attempts"), "3");
  EXPECT_GE(proxy_->counters().connections_accepted, 3u);
  EXPECT_EQ(emulator_->messages_received("stall-1"), 0);
  EXPECT_TRUE(WaitFor([&] { return !bridge()->Serving(); }));
  // Fail fast now, saying since when.
  Answer fast = Send("chat-stall", "second", {.cmid = "stall-2"});
  EXPECT_EQ(fast.status.error_code(), grpc::StatusCode::UNAVAILABLE) << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "unreachable since"))
      << fast.status.error_message();
  // One caller may wait; a second is refused (max_waiting_calls 1).
  auto waiting = Call("chat-stall", "patient", {.cmid = "stall-wait", .wait_for_ready = true});
  ASSERT_TRUE(WaitFor([&] { return waiting->accepted(); }, 20s));
  Answer refused = Send("chat-stall", "also patient", {.cmid = "stall-wait-2", .wait_for_ready = true});
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(), "max_waiting_calls"));
  // The waiting one outlives several more failed attempts.
  const uint64_t accepted = proxy_->counters().connections_accepted;
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_accepted >= accepted + 3; }, 20s));
  EXPECT_FALSE(waiting->finished());
  proxy_->Heal();
  Answer w = Finish(*waiting);
  ExpectAnsweredOnce(w, "stall-wait", absl::StrCat(kDefaultTextPrefix, "patient. There are no open issues."));
  EXPECT_TRUE(WaitFor([&] { return bridge()->Serving(); }));
  EXPECT_EQ(emulator_->messages_received("stall-1"), 0);
  EXPECT_EQ(emulator_->messages_received("stall-2"), 0);
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-stall");
}

// ---------------------------------------------------------------------------------
// Upgrades refused with another status than 401/403. A chat the upstream does not know
// (404, which the test server sends as 400) fails at once with the mapped status and
// no retry storm; 429 fails at once with RESOURCE_EXHAUSTED; 503 after the bounded
// attempts. None of them counts as sent.
TEST_F(NexoraFaultTest, AnUnknownChatFailsAtOnceWithoutARetryStorm) {
  Start({.emulator = {.known_chats_only = true}});
  const Clock::time_point started = Clock::now();
  Answer a = Send("chat-nobody-created", "hello?", {.cmid = "unknown-1"});
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << a.status.error_message();
  EXPECT_EQ(ErrorReason(a.status), "HTTP_400") << a.status.error_message();
  EXPECT_TRUE(absl::StrContains(a.status.error_message(), "chat not found")) << a.status.error_message();
  EXPECT_LT(Clock::now() - started, 15s) << "waited for a deadline instead";
  // The chat is refused from memory: no upgrade per call.
  const int upgrades = emulator_->upgrades();
  Answer again = Send("chat-nobody-created", "hello again?", {.cmid = "unknown-2"});
  EXPECT_EQ(again.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << again.status.error_message();
  EXPECT_LE(emulator_->upgrades(), upgrades + 1);
  EXPECT_EQ(emulator_->messages_received("unknown-1"), 0);
  // A Chat stream on another unknown chat ends with the same status once its first
  // message cannot be sent.
  {
    grpc::ClientContext chat_ctx;
    chat_ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    auto stream = stub_->Chat(&chat_ctx);
    v1::ChatRequest first;
    first.set_chat_id("chat-nobody-created-either");
    first.set_content("anyone?");
    first.set_client_message_id("unknown-chat-1");
    ASSERT_TRUE(stream->Write(first));
    E ev;
    int accepted = 0;
    while (stream->Read(&ev)) accepted += ev.has_accepted() ? 1 : 0;
    grpc::Status st = stream->Finish();
    EXPECT_EQ(accepted, 1);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_EQ(ErrorReason(st), "HTTP_400") << st.error_message();
    EXPECT_EQ(emulator_->messages_received("unknown-chat-1"), 0);
  }
  // A refused chat does not make the bridge NOT_SERVING: the upstream answered.
  EXPECT_TRUE(bridge()->Serving());
  // A chat created through the bridge works.
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  v1::CreateChatRequest req;
  req.set_agent_id("agent-1");
  v1::CreateChatResponse resp;
  grpc::Status created = stub_->CreateChat(&ctx, req, &resp);
  ASSERT_TRUE(created.ok()) << created.error_message();
  ExpectAnsweredOnce(Send(resp.chat_id(), "hi", {.cmid = "known-1"}), "known-1",
                     absl::StrCat(kDefaultTextPrefix, "hi. There are no open issues."));
  ExpectNothingLeft();
}

TEST_F(NexoraFaultTest, TooManyRequestsFailsAtOnceAndServiceUnavailableAfterBoundedAttempts) {
  Start({.tweak = [](NexoraBridgeOptions& o) {
    // The slow-down wait after a 429 (at least this, and the Retry-After up to the max).
    o.connection.slow_down_delay = 500ms;
    o.connection.max_retry_after = 1s;
  }});
  emulator_->RefuseUpgrades(429, "slow down", /*count=*/1, /*retry_after_s=*/30);
  const Clock::time_point started = Clock::now();
  Answer limited = Send("chat-429", "hello", {.cmid = "limited-1"});
  EXPECT_EQ(limited.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << limited.status.error_message();
  EXPECT_EQ(ErrorReason(limited.status), "HTTP_429");
  EXPECT_TRUE(absl::StrContains(limited.status.error_message(), "Retry-After"))
      << limited.status.error_message();
  EXPECT_LT(Clock::now() - started, 15s) << "waited out the Retry-After instead";
  EXPECT_EQ(emulator_->messages_received("limited-1"), 0);

  emulator_->RefuseUpgrades(503, "maintenance", /*count=*/-1);
  Answer down = Send("chat-503", "hello", {.cmid = "down-1"});
  EXPECT_EQ(down.status.error_code(), grpc::StatusCode::UNAVAILABLE) << down.status.error_message();
  EXPECT_EQ(ErrorReason(down.status), "UPSTREAM_UNREACHABLE") << down.status.error_message();
  EXPECT_EQ(ErrorMetadata(down.status, "upstream_status"), "503");
  EXPECT_TRUE(absl::StrContains(down.status.error_message(), "maintenance")) << down.status.error_message();
  EXPECT_EQ(emulator_->messages_received("down-1"), 0);
  EXPECT_TRUE(WaitFor([&] { return !bridge()->Serving(); }));
  emulator_->RefuseUpgrades(503, "", /*count=*/0);
  EXPECT_TRUE(WaitFor([&] { return bridge()->Serving(); }, 20s));
  ExpectNothingLeft();
  ExpectServesAgain("chat-after-503");
}

}  // namespace
}  // namespace wsbridge::faults
