// Fault scenarios for the Emogg bridge inside the real daemon: the bridge talks to the
// Emogg emulator through the fault proxy (or the emulator misbehaves itself: close
// codes, revoked tokens), while real gRPC callers make requests and hold channel
// subscriptions. Every scenario checks the invariants:
//  - every subscriber is told of every gap: within one upstream subscription the events'
//    sequence numbers follow each other, and a new upstream subscription (a restore
//    after a reconnect) is announced by a `gap` update before its first event, which is
//    that subscription's first;
//  - no request answered twice or silently resent: each answer is its own request's, a
//    request cut off in flight ends UNAVAILABLE / OUTCOME_UNKNOWN and reached Emogg
//    exactly once;
//  - no crash (the daemon is this process), memory bounded (no request left behind in
//    a session, the process's resident size within a generous bound), and the bridge
//    serves again afterwards (a request and a fresh subscription work).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
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
#include "bridges/core/upstream_config.h"
#include "bridges/emogg/emogg_bridge.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/emogg_gaps.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/emogg_emulator.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::emogg::v1;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "tok-s3cr3t-main";
constexpr char kChannel[] = "session_emotions_counts";
constexpr char kKey[] = "s1:1s";
constexpr char kOtherKey[] = "s2:1s";
constexpr auto kLong = 20s;  // "it happened at all" on a loaded machine


// A Subscribe call read on its own thread until it ends or is stopped.
class Subscriber {
 public:
  Subscriber(v1::EmoggService::Stub& stub, const std::string& channel, const std::string& key,
             bool read = true) {
    ctx_.set_deadline(std::chrono::system_clock::now() + 120s);
    v1::SubscribeRequest req;
    req.set_channel(channel);
    req.set_key(key);
    reader_ = stub.Subscribe(&ctx_, req);
    if (read) thread_ = std::thread([this] { ReadAll(); });
  }
  ~Subscriber() { Stop(); }

  // Reads whatever is left (a subscriber that did not read until now).
  void StartReading() {
    if (!thread_.joinable() && !done()) thread_ = std::thread([this] { ReadAll(); });
  }
  // Cancels the call and waits for the reader.
  void Stop() {
    ctx_.TryCancel();
    StartReading();
    if (thread_.joinable()) thread_.join();
  }
  // Waits for a stream that ends on its own.
  grpc::Status Ended() {
    if (thread_.joinable()) thread_.join();
    absl::MutexLock lock(&mu_);
    return status_;
  }
  bool done() const {
    absl::MutexLock lock(&mu_);
    return done_;
  }
  std::vector<Update> log() const {
    absl::MutexLock lock(&mu_);
    return log_;
  }
  int Count(Update::Kind kind) const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const Update& u : log_) n += u.kind == kind ? 1 : 0;
    return n;
  }
  int events() const { return Count(Update::Kind::kEvent); }
  int gaps() const { return Count(Update::Kind::kGap); }
  // Events after the last gap (all of them when there was none).
  int events_since_gap() const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const Update& u : log_) {
      if (u.kind == Update::Kind::kGap) n = 0;
      if (u.kind == Update::Kind::kEvent) ++n;
    }
    return n;
  }

 private:
  void ReadAll() {
    v1::SubscribeResponse msg;
    while (reader_->Read(&msg)) {
      absl::MutexLock lock(&mu_);
      for (const auto& u : msg.updates()) {
        if (std::optional<Update> update = UpdateOf(u)) log_.push_back(*std::move(update));
      }
    }
    grpc::Status st = reader_->Finish();
    absl::MutexLock lock(&mu_);
    status_ = st;
    done_ = true;
  }

  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::SubscribeResponse>> reader_;
  mutable absl::Mutex mu_;
  std::vector<Update> log_ ABSL_GUARDED_BY(mu_);
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Every gap told (GapRule) over a whole stream. Returns the number of gaps.
int ExpectEveryGapTold(const std::vector<Update>& log) {
  EXPECT_FALSE(log.empty());
  GapRule rule;
  for (size_t i = 0; i < log.size(); ++i) {
    const std::string broken = rule.Next(log[i]);
    EXPECT_TRUE(broken.empty()) << broken << " (update " << i << ")";
  }
  return rule.gaps();
}

struct Outcome {
  grpc::Status status;
  v1::RequestResponse response;
  Clock::duration took{};
};

class EmoggFaultTest : public ::testing::Test {
 protected:
  // The bridge's URL points at the proxy, which forwards to the emulator; `faults` are
  // set on the proxy before the daemon starts. `tweak` adjusts the bridge's options.
  void Start(std::function<void(emogg::EmoggBridgeOptions&)> tweak = nullptr,
             std::function<void(FaultProxy&)> faults = nullptr) {
    rss_at_start_ = ResidentBytes();
    emulator::EmoggEmulatorOptions eo;
    eo.protocol.max_messages = 1000000;  // limits are not what these scenarios test
    eo.protocol.max_subscriptions_per_user = 100;
    emulator_ = std::make_unique<emulator::EmoggEmulator>(std::move(eo));
    ASSERT_TRUE(emulator_->Start().ok());
    proxy_ = std::make_unique<FaultProxy>(emulator_->port());
    ASSERT_TRUE(proxy_->Start().ok());
    if (faults) faults(*proxy_);

    emogg::EmoggBridgeOptions o;
    o.url = absl::StrCat("ws://127.0.0.1:", proxy_->port(), "/ws/v1");
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.default_token = core::SecretSource::Fixed(kToken);
    o.request_timeout = 30s;  // faults, not this timeout, must end a stuck call
    o.subscribe_timeout = 10s;
    o.limits.max_messages = 100000;
    o.limits.control_reserve = 8;
    if (tweak) tweak(o);
    const std::string url = o.url;
    absl::Status st = harness_.Start(
        "emogg",
        [url](config::v1::BridgeConfig& b) {
          b.mutable_emogg()->mutable_upstream()->set_url(url);
          b.mutable_emogg()->mutable_upstream()->set_allow_plaintext(true);
        },
        [o](const core::BridgeContext& ctx) { return emogg::NewEmoggBridge(o, ctx); });
    ASSERT_TRUE(st.ok()) << st;
    stub_ = v1::EmoggService::NewStub(harness_.channel());
  }

  void TearDown() override {
    subscribers_.clear();
    harness_.Stop();
    if (proxy_ != nullptr) proxy_->Stop();
    if (emulator_ != nullptr) emulator_->Stop();
  }

  core::Bridge& bridge() { return *harness_.bridge(); }
  bool Serving() { return harness_.bridge() != nullptr && bridge().Serving(); }

  Outcome Call(const std::string& path, const std::string& body = "{}", bool wait = false,
               std::chrono::milliseconds deadline = 20s) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    if (wait) ctx.AddMetadata("x-wsbridge-wait-for-ready", "true");
    v1::RequestRequest req;
    req.set_path(path);
    req.set_json_body(body);
    Outcome out;
    const auto started = Clock::now();
    out.status = stub_->Request(&ctx, req, &out.response);
    out.took = Clock::now() - started;
    return out;
  }
  std::future<Outcome> CallAsync(const std::string& path, const std::string& body,
                                 bool wait = false) {
    return std::async(std::launch::async, [this, path, body, wait] { return Call(path, body, wait); });
  }
  // A request Emogg holds for a minute: in flight when the fault strikes.
  std::future<Outcome> InFlight() {
    const int before = emulator_->requests("emulator:slow");
    auto f = CallAsync("emulator:slow", R"({"ms": 60000})");
    EXPECT_TRUE(WaitFor([&] { return emulator_->requests("emulator:slow") == before + 1; }, kLong));
    return f;
  }
  // Echo requests with distinct bodies: each answer must be its own request's.
  void ExpectEchoes(int n, const std::string& tag) {
    std::vector<std::future<Outcome>> calls;
    for (int i = 0; i < n; ++i) {
      calls.push_back(CallAsync("emulator:echo", absl::StrCat(R"({"n":")", tag, i, R"("})")));
    }
    for (int i = 0; i < n; ++i) {
      Outcome o = calls[i].get();
      ASSERT_TRUE(o.status.ok()) << o.status.error_message();
      EXPECT_EQ(o.response.json_body(), absl::StrCat(R"({"n":")", tag, i, R"("})"));
    }
  }

  Subscriber& Subscribe(const std::string& channel = kChannel, const std::string& key = kKey,
                        bool read = true) {
    subscribers_.push_back(std::make_unique<Subscriber>(*stub_, channel, key, read));
    return *subscribers_.back();
  }

  // A request cut off in flight: UNAVAILABLE / OUTCOME_UNKNOWN naming its path.
  static void ExpectOutcomeUnknown(const Outcome& o, const std::string& path) {
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << o.status.error_message();
    EXPECT_EQ(ErrorReason(o.status), "OUTCOME_UNKNOWN") << o.status.error_message();
    EXPECT_EQ(ErrorMetadata(o.status, "path"), path);
  }

  // The bridge serves again: a request works, and a fresh subscription gets events.
  void ExpectServesAgain() {
    ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong)) << "the bridge never served again";
    Outcome o = Call("emulator:echo", R"({"again":true})");
    EXPECT_TRUE(o.status.ok()) << o.status.error_message();
    Subscriber& fresh = Subscribe(kChannel, "s9:1s");
    emulator_->SetEventInterval(50ms);
    EXPECT_TRUE(WaitFor([&] { return fresh.events() >= 2; }, kLong));
    fresh.Stop();
    ExpectEveryGapTold(fresh.log());
  }

  // Memory bounded: no request left in any session once the calls are over, and the
  // process's resident size within a generous bound of where it started.
  void ExpectBounded() {
    EXPECT_TRUE(WaitFor([&] { return NoRequestsHeld(bridge()); }, kLong));
    const int64_t grown = ResidentBytes() - rss_at_start_;
    RecordProperty("rss_growth_kib", static_cast<int>(grown / 1024));
    EXPECT_LT(grown, int64_t{128} << 20) << grown / 1024 << " KiB";
  }

  int64_t rss_at_start_ = 0;
  std::unique_ptr<emulator::EmoggEmulator> emulator_;
  std::unique_ptr<FaultProxy> proxy_;
  DaemonHarness harness_;
  std::unique_ptr<v1::EmoggService::Stub> stub_;
  std::unique_ptr<v1::EmoggService::Stub> other_stub_;  // a second caller's own channel
  std::vector<std::unique_ptr<Subscriber>> subscribers_;
};

// --- Reset mid-stream ------------------------------------------------------------------

// The upstream connection is reset while events flow and a request is in flight: RST
// towards the bridge, or towards Emogg (the bridge then sees a FIN without a close
// frame). The request ends OUTCOME_UNKNOWN and is never resent; the three subscribers
// (two sharing one upstream subscription) are each told of the gap before the restored
// subscription's events.
class EmoggResetTest : public EmoggFaultTest, public ::testing::WithParamInterface<Direction> {};

TEST_P(EmoggResetTest, ResetMidStream) {
  Start();
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& a = Subscribe();
  Subscriber& b = Subscribe();
  Subscriber& c = Subscribe(kChannel, kOtherKey);
  ASSERT_TRUE(WaitFor([&] { return a.events() >= 3 && b.events() >= 3 && c.events() >= 3; }, kLong));
  ExpectEchoes(5, "before");
  std::future<Outcome> cut = InFlight();

  proxy_->SetMode(GetParam(), Mode::kReset);
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == 0; }, kLong));
  proxy_->Heal();

  ExpectOutcomeUnknown(cut.get(), "emulator:slow");
  ASSERT_TRUE(WaitFor([&] {
    return a.events_since_gap() >= 3 && b.events_since_gap() >= 3 && c.events_since_gap() >= 3 &&
           a.gaps() >= 1 && b.gaps() >= 1 && c.gaps() >= 1;
  }, kLong));
  ExpectEchoes(5, "after");
  for (Subscriber* s : {&a, &b, &c}) {
    s->Stop();
    EXPECT_GE(ExpectEveryGapTold(s->log()), 1);
  }
  EXPECT_EQ(emulator_->auth_successes(), 2);
  ExpectServesAgain();
  EXPECT_EQ(emulator_->requests("emulator:slow"), 1) << "the request cut off was resent";
  EXPECT_EQ(emulator_->requests("emulator:echo"), 11);
  EXPECT_EQ(emulator_->frames_before_auth(), 0);
  ExpectBounded();
}

INSTANTIATE_TEST_SUITE_P(BothDirections, EmoggResetTest,
                         ::testing::Values(Direction::kUpstreamToClient,
                                           Direction::kClientToUpstream),
                         [](const ::testing::TestParamInfo<Direction>& info) {
                           return info.param == Direction::kUpstreamToClient ? "TowardsTheBridge"
                                                                             : "TowardsTheUpstream";
                         });

// --- Black hole --------------------------------------------------------------------------

// Both directions black-holed while events flow: the sockets stay open and nothing
// passes. Only the heartbeat can notice (WebSocket pings are off here, so it is the
// `ping` endpoint with its answer deadline): the request in flight ends OUTCOME_UNKNOWN
// within heartbeat interval + timeout, and the subscriber's gap says why.
TEST_F(EmoggFaultTest, BlackHoleDetectedWithinTheHeartbeatDeadline) {
  constexpr auto kInterval = 300ms;
  constexpr auto kTimeout = 600ms;
  Start([&](emogg::EmoggBridgeOptions& o) {
    o.heartbeat_interval = kInterval;
    o.heartbeat_timeout = kTimeout;
    o.connection.keepalive.ping_interval = 0ms;
    o.connection.handshake_timeout = 1s;
  });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.events() >= 3; }, kLong));
  std::future<Outcome> cut = InFlight();

  proxy_->SetMode(Direction::kClientToUpstream, Mode::kBlackHole);
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kBlackHole);
  const Clock::time_point holed = Clock::now();
  Outcome o = cut.get();
  const auto detected = Clock::now() - holed;
  proxy_->Heal();
  RecordProperty("detected_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(detected).count()));
  ExpectOutcomeUnknown(o, "emulator:slow");
  // The deadline is interval + timeout (plus a heartbeat tick); the margin is for a
  // loaded machine. Without the heartbeat the request would wait its 30 s timeout.
  EXPECT_LE(detected, kInterval + kTimeout + 3s)
      << std::chrono::duration_cast<std::chrono::milliseconds>(detected).count() << " ms";
  EXPECT_GT(proxy_->counters().bytes_dropped, 0u);

  ASSERT_TRUE(WaitFor([&] { return s.gaps() >= 1 && s.events_since_gap() >= 3; }, kLong));
  s.Stop();
  ExpectEveryGapTold(s.log());
  bool ping_named = false;
  for (const Update& u : s.log()) {
    if (u.kind == Update::Kind::kGap) ping_named |= absl::StrContains(u.reason, "ping");
  }
  EXPECT_TRUE(ping_named) << "the gap's reason does not say the heartbeat found it";
  ExpectServesAgain();
  EXPECT_EQ(emulator_->requests("emulator:slow"), 1) << "the request cut off was resent";
  ExpectBounded();
}

// --- Slicing -----------------------------------------------------------------------------

// Every byte both ways in 1-byte writes from the first connection: handshakes, frames
// and events arrive in pieces and nothing changes: one connection, one auth, no gap.
TEST_F(EmoggFaultTest, SlicingChangesNothing) {
  Start(nullptr, [](FaultProxy& proxy) {
    Shaping slice;
    slice.slice = true;
    proxy.SetShaping(Direction::kClientToUpstream, slice);
    proxy.SetShaping(Direction::kUpstreamToClient, slice);
  });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& a = Subscribe();
  Subscriber& b = Subscribe();
  Subscriber& w = Subscribe("session_worker_state", "s7");
  ASSERT_TRUE(WaitFor([&] { return w.events() >= 1; }, kLong));
  emulator_->SetWorkerState("s7", "idle");
  ExpectEchoes(20, "sliced");
  ASSERT_TRUE(WaitFor([&] { return a.events() >= 10 && b.events() >= 10 && w.events() >= 2; }, kLong));
  for (Subscriber* s : {&a, &b, &w}) {
    s->Stop();
    EXPECT_EQ(ExpectEveryGapTold(s->log()), 0);
  }
  EXPECT_TRUE(Call("ping").status.ok());
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_EQ(proxy_->counters().connections_accepted, 1u);
  // Every byte went on its own (the counters move just after each write completes).
  EXPECT_TRUE(WaitFor([&] {
    ProxyCounters c = proxy_->counters();
    return c.writes_upstream_to_client == c.bytes_upstream_to_client &&
           c.writes_client_to_upstream == c.bytes_client_to_upstream;
  }, kLong));
  EXPECT_GT(proxy_->counters().bytes_upstream_to_client, 1000u);
  ExpectBounded();
}

// --- Slow handshake ----------------------------------------------------------------------

// The WebSocket upgrade answer held back within the handshake timeout: the bridge waits,
// connects once, and works.
TEST_F(EmoggFaultTest, SlowHandshakeWithinTheTimeoutConnectsOnce) {
  const auto started = Clock::now();
  Start([](emogg::EmoggBridgeOptions& o) { o.connection.handshake_timeout = 5s; },
        [](FaultProxy& proxy) {
          Shaping stall;
          stall.stall_bytes = 64 * 1024;  // the whole upgrade answer
          stall.stall_for = 500ms;
          proxy.SetShaping(Direction::kUpstreamToClient, stall);
        });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  EXPECT_GE(Clock::now() - started, 500ms);  // the stall was in the way
  ExpectEchoes(5, "slow");
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_EQ(proxy_->counters().connections_accepted, 1u) << "the bridge reconnected";
  ExpectBounded();
}

// The upgrade answer stalled beyond the handshake timeout: every attempt gives up and
// is retried with backoff; the bridge is NOT_SERVING and calls fail fast (UNAVAILABLE,
// since when and why) instead of queueing, unless they ask to wait; the ones that asked
// are answered once it is healed.
TEST_F(EmoggFaultTest, StalledHandshakeFailsCallsFastAndRecovers) {
  Start(
      [](emogg::EmoggBridgeOptions& o) {
        o.connection.handshake_timeout = 300ms;
        o.connection.connect_timeout = 1s;
      },
      [](FaultProxy& proxy) {
        Shaping stall;
        stall.stall_bytes = 64 * 1024;
        stall.stall_for = 60s;  // far beyond the handshake timeout
        proxy.SetShaping(Direction::kUpstreamToClient, stall);
      });
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_accepted >= 3; }, kLong));
  EXPECT_FALSE(Serving());
  // A 20 s deadline: a call that queued would end DEADLINE_EXCEEDED, not UNAVAILABLE.
  Outcome fast = Call("emulator:echo", R"({"n":"fast"})");
  EXPECT_EQ(fast.status.error_code(), grpc::StatusCode::UNAVAILABLE) << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "unreachable since"))
      << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "x-wsbridge-wait-for-ready"))
      << fast.status.error_message();
  RecordProperty("fail_fast_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(fast.took).count()));
  Subscriber& refused = Subscribe();
  grpc::Status sub = refused.Ended();
  EXPECT_EQ(sub.error_code(), grpc::StatusCode::UNAVAILABLE) << sub.error_message();

  // Callers that ask to wait are held (not refused) and answered after the heal.
  std::future<Outcome> waiting = CallAsync("emulator:echo", R"({"n":"waited"})", /*wait=*/true);
  ASSERT_TRUE(WaitFor([&] {
    auto sessions = bridge().ListSessions();
    return sessions.size() == 1 && sessions[0].in_flight_requests() == 1;
  }, kLong));
  EXPECT_EQ(emulator_->auth_successes(), 0);
  proxy_->Heal();
  Outcome waited = waiting.get();
  ASSERT_TRUE(waited.status.ok()) << waited.status.error_message();
  EXPECT_EQ(waited.response.json_body(), R"({"n":"waited"})");
  EXPECT_EQ(emulator_->auth_successes(), 1);
  EXPECT_EQ(emulator_->requests("emulator:echo"), 1) << "the fast-failed call reached Emogg";
  ExpectServesAgain();
  ExpectBounded();
}

// --- Close codes -------------------------------------------------------------------------

struct CloseCase {
  uint16_t code;  // 0: the TCP connection dropped without a close frame
  const char* reason;
  const char* name;
};
void PrintTo(const CloseCase& c, std::ostream* os) { *os << c.name; }

// Emogg closes the connection while events flow and a request is in flight: 1001 going
// away, 1011 internal error, 1000 normal, or a drop without a close frame. Each is an
// ordinary loss: the request ends OUTCOME_UNKNOWN carrying the close code, the session
// reconnects with the normal backoff (at once here) and restores the subscription with
// a gap whose reason names the code.
class EmoggCloseCodeTest : public EmoggFaultTest, public ::testing::WithParamInterface<CloseCase> {};

TEST_P(EmoggCloseCodeTest, ReconnectsWithTheNormalBackoff) {
  const CloseCase& cc = GetParam();
  Start([](emogg::EmoggBridgeOptions& o) { o.auth_retry_pause = 60s; o.retry_after_429 = 60s; });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.events() >= 3; }, kLong));
  std::future<Outcome> cut = InFlight();
  if (cc.code == 0) {
    emulator_->DropAll();
  } else {
    emulator_->CloseAll(cc.code, cc.reason);
  }
  Outcome o = cut.get();
  ExpectOutcomeUnknown(o, "emulator:slow");
  if (cc.code == 0) {
    EXPECT_EQ(ErrorMetadata(o.status, "close_code"), "");
  } else {
    EXPECT_EQ(ErrorMetadata(o.status, "close_code"), absl::StrCat(cc.code));
    EXPECT_TRUE(absl::StrContains(o.status.error_message(), absl::StrCat("code ", cc.code)))
        << o.status.error_message();
  }
  // Reconnected under the normal backoff (200 ms at most here), not a refusal's or a
  // slow-down's 60 s.
  ASSERT_TRUE(WaitFor([&] { return s.gaps() >= 1 && s.events_since_gap() >= 3; }, kLong));
  EXPECT_EQ(emulator_->auth_successes(), 2);
  s.Stop();
  ExpectEveryGapTold(s.log());
  if (cc.code != 0) {
    bool named = false;
    for (const Update& u : s.log()) {
      if (u.kind == Update::Kind::kGap) named |= absl::StrContains(u.reason, absl::StrCat("code ", cc.code));
    }
    EXPECT_TRUE(named) << "no gap names close code " << cc.code;
  }
  ExpectServesAgain();
  EXPECT_EQ(emulator_->requests("emulator:slow"), 1) << "the request cut off was resent";
  ExpectBounded();
}

INSTANTIATE_TEST_SUITE_P(Codes, EmoggCloseCodeTest,
                         ::testing::Values(CloseCase{1001, "Going away", "GoingAway1001"},
                                           CloseCase{1011, "Internal error", "InternalError1011"},
                                           CloseCase{1000, "Bye", "Normal1000"},
                                           CloseCase{0, "", "NoCloseFrame"}),
                         [](const ::testing::TestParamInfo<CloseCase>& info) {
                           return std::string(info.param.name);
                         });

// 1008 "Unauthorized" (Emogg's title for 401) without an answer is a refused token:
// calls fail at once (UNAUTHENTICATED, TOKEN_REFUSED, nothing sent), subscriptions end
// the same way, and no connection is opened before auth_retry_pause has passed (no fast
// loop); the token still being good, the bridge then comes back on its own.
TEST_F(EmoggFaultTest, Close1008UnauthorizedWaitsTheAuthPauseThenRecovers) {
  constexpr auto kPause = 1500ms;
  Start([&](emogg::EmoggBridgeOptions& o) { o.auth_retry_pause = kPause; });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.Count(Update::Kind::kSubscribed) == 1; }, kLong));
  const int accepted = static_cast<int>(proxy_->counters().connections_accepted);
  emulator_->CloseAll(1008, "Unauthorized");
  const Clock::time_point closed = Clock::now();
  grpc::Status ended = s.Ended();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  EXPECT_EQ(ErrorReason(ended), "TOKEN_REFUSED");
  Outcome o = Call("emulator:echo");
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << o.status.error_message();
  EXPECT_EQ(ErrorReason(o.status), "TOKEN_REFUSED");
  EXPECT_EQ(emulator_->requests("emulator:echo"), 0);
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  const auto back = Clock::now() - closed;
  RecordProperty("back_after_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(back).count()));
  EXPECT_GE(back, kPause) << "a connection was opened before auth_retry_pause";
  // One new connection: the pause was waited out, not retried against.
  EXPECT_EQ(static_cast<int>(proxy_->counters().connections_accepted), accepted + 1);
  ExpectServesAgain();
  ExpectBounded();
}

// Emogg closes every connection with 1008 (an unknown policy reason) right after
// accepting its auth: the bridge reconnects, but under the exponential backoff (the
// connections never stay up long enough to reset it), never in a fast loop.
TEST_F(EmoggFaultTest, RepeatedPolicyClosesBackOffExponentially) {
  Start([](emogg::EmoggBridgeOptions& o) {
    o.connection.backoff.initial = 50ms;
    o.connection.backoff.max = 1s;
  });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetCloseAfterAuth(1008, "Policy violation");
  const int before = emulator_->auth_successes();
  emulator_->CloseAll(1008, "Policy violation");
  const Clock::time_point first = Clock::now();
  constexpr int kAttempts = 12;
  ASSERT_TRUE(WaitFor([&] { return emulator_->auth_successes() >= before + kAttempts; }, 60s));
  const auto took = Clock::now() - first;
  RecordProperty("twelve_reconnects_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(took).count()));
  // Capped at 50 ms * 2^n (1 s) with full jitter, twelve attempts take ~4 s on average and
  // over 1 s with overwhelming probability; a loop without backoff takes milliseconds.
  EXPECT_GE(took, 1s) << "reconnects without backing off";
  EXPECT_EQ(emulator_->auth_failures(), 0);
  emulator_->SetCloseAfterAuth(0, "");
  ExpectServesAgain();
  ExpectBounded();
}

// After Emogg answered 429 the bridge stays away for retry_after_429: requests fail
// fast meanwhile (UNAVAILABLE, UPSTREAM_RATE_LIMITED, saying until when; nothing sent)
// unless their caller asked to wait, and those are sent once the bridge is back. The
// subscriber is told of the gap.
TEST_F(EmoggFaultTest, After429RequestsFailFastUntilTheBridgeConnectsAgain) {
  constexpr auto kRetry = 2s;
  Start([&](emogg::EmoggBridgeOptions& o) { o.retry_after_429 = kRetry; });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.events() >= 3; }, kLong));
  const Clock::time_point asked = Clock::now();  // before the bridge read the 429
  Outcome trigger = Call("emulator:status", R"({"status": 429})");
  EXPECT_EQ(trigger.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  Outcome fast = Call("emulator:echo", R"({"n":"fast"})");
  EXPECT_EQ(fast.status.error_code(), grpc::StatusCode::UNAVAILABLE) << fast.status.error_message();
  EXPECT_EQ(ErrorReason(fast.status), "UPSTREAM_RATE_LIMITED") << fast.status.error_message();
  EXPECT_TRUE(absl::StrContains(fast.status.error_message(), "retry_after_429"))
      << fast.status.error_message();
  EXPECT_FALSE(ErrorMetadata(fast.status, "retry_at").empty());
  Outcome waited = Call("emulator:echo", R"({"n":"waited"})", /*wait=*/true);
  ASSERT_TRUE(waited.status.ok()) << waited.status.error_message();
  EXPECT_EQ(waited.response.json_body(), R"({"n":"waited"})");
  EXPECT_GE(Clock::now() - asked, kRetry) << "reconnected before retry_after_429";
  EXPECT_EQ(emulator_->requests("emulator:echo"), 1) << "the fast-failed request was sent";
  ASSERT_TRUE(WaitFor([&] { return s.gaps() >= 1 && s.events_since_gap() >= 3; }, kLong));
  s.Stop();
  ExpectEveryGapTold(s.log());
  EXPECT_EQ(emulator_->auth_successes(), 2);
  ExpectEchoes(3, "after");
  ExpectServesAgain();
  ExpectBounded();
}

// --- Slow gRPC consumer ------------------------------------------------------------------

// A subscriber that stops reading while events arrive every millisecond. What bounds it
// is subscriber_queue (here 32 updates) on top of what gRPC has already taken off the
// bridge (the message in flight and the HTTP/2 window): beyond that the stream is ended
// RESOURCE_EXHAUSTED, SLOW_CONSUMER. The other subscriber of the same upstream
// subscription and a request are not held back, and the slow one gets what was already
// on its way, then the status.
TEST_F(EmoggFaultTest, SlowConsumerIsEndedAloneAndToldWhy) {
  constexpr size_t kQueue = 32;
  Start([&](emogg::EmoggBridgeOptions& o) { o.subscriber_queue = kQueue; });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  Subscriber& fast = Subscribe();
  // A caller of its own (its own HTTP/2 connection) with a small, fixed flow-control
  // window, so what it can take off the bridge without reading is small and known.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 * 1024);
  other_stub_ = v1::EmoggService::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", harness_.daemon().grpc_port()),
      grpc::InsecureChannelCredentials(), args));
  subscribers_.push_back(std::make_unique<Subscriber>(*other_stub_, kChannel, kKey, /*read=*/false));
  Subscriber& slow = *subscribers_.back();
  ASSERT_TRUE(WaitFor([&] {
    auto sessions = bridge().ListSessions();
    return sessions.size() == 1 && sessions[0].subscribers() == 2;
  }, kLong));
  emulator_->SetEventInterval(1ms);
  // The slow stream is ended: the session is left with the fast one.
  ASSERT_TRUE(WaitFor([&] {
    auto sessions = bridge().ListSessions();
    return sessions.size() == 1 && sessions[0].subscribers() == 1;
  }, kLong));
  const int fast_then = fast.events();
  ExpectEchoes(5, "meanwhile");
  ASSERT_TRUE(WaitFor([&] { return fast.events() >= fast_then + 200; }, kLong));
  emulator_->SetEventInterval(std::nullopt);
  slow.StartReading();
  grpc::Status st = slow.Ended();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_EQ(ErrorReason(st), "SLOW_CONSUMER") << st.error_message();
  const int slow_got = slow.events();
  RecordProperty("slow_consumer_events_received", slow_got);
  RecordProperty("fast_consumer_events_then", fast_then);
  EXPECT_LT(slow_got, fast.events());
  ExpectEveryGapTold(slow.log());
  fast.Stop();
  EXPECT_EQ(ExpectEveryGapTold(fast.log()), 0);
  EXPECT_EQ(emulator_->auth_successes(), 1);
  ExpectServesAgain();
  ExpectBounded();
}

// --- Token rotation through a mounted file -----------------------------------------------

// The token comes from a file laid out as Kubernetes mounts a Secret: token ->
// ..data/token, ..data -> a timestamped directory, swapped by renaming a new ..data
// symlink over the old one.
class MountedSecret {
 public:
  explicit MountedSecret(const std::string& value) { Swap(value); }
  std::string path() const { return dir_.path() + "/token"; }
  void Swap(const std::string& value) {
    namespace fs = std::filesystem;
    const fs::path root = dir_.path();
    const std::string gen = absl::StrCat("..2026_12_01_", ++generation_);
    fs::create_directory(root / gen);
    std::ofstream(root / gen / "token") << value << "\n";
    fs::create_directory_symlink(gen, root / "..data_tmp");
    fs::rename(root / "..data_tmp", root / "..data");  // atomic, as the kubelet does
    if (!fs::exists(fs::symlink_status(root / "token"))) {
      fs::create_symlink("..data/token", root / "token");
    }
  }

 private:
  testing::TempDir dir_;
  int generation_ = 0;
};

std::shared_ptr<core::SecretSource> FileSecret(const std::string& path) {
  config::v1::Secret secret;
  secret.set_file(path);
  absl::StatusOr<std::shared_ptr<core::SecretSource>> s = core::LoadSecret(secret, "token");
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : nullptr;
}

// The usual order: the new token is mounted first, then Emogg stops accepting the old
// one and tells the connections still using it (401, close). The bridge moves new calls
// to the new token on its own, and the subscriber on the old connection is not ended:
// the 401 concerns a token that is no longer the configured one, so the session
// reconnects with the new one and restores the subscription with a gap.
TEST_F(EmoggFaultTest, RotatedTokenFileIsPickedUpAndSubscribersSurviveTheOldOnesRevocation) {
  MountedSecret secret("tok-s3cr3t-old");
  Start([&](emogg::EmoggBridgeOptions& o) {
    o.default_token = FileSecret(secret.path());
    o.auth_retry_pause = 60s;  // a refusal's pause would outlast every deadline here
  });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  emulator_->SetEventInterval(50ms);
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.events() >= 3; }, kLong));
  ExpectEchoes(3, "old");

  secret.Swap("tok-s3cr3t-new");
  // The refresher reads the file within a second; the pool starts a session for it.
  ASSERT_TRUE(WaitFor([&] { return emulator_->auth_successes() == 2 && Serving(); }, kLong));
  emulator_->RevokeToken("tok-s3cr3t-old");
  // Calls work with the new token (the old one is refused by now).
  ExpectEchoes(3, "new");
  ASSERT_TRUE(WaitFor([&] { return s.gaps() >= 1 && s.events_since_gap() >= 3; }, kLong));
  EXPECT_FALSE(s.done()) << "the subscriber was ended: " << s.Ended().error_message();
  s.Stop();
  ExpectEveryGapTold(s.log());
  bool rotation_named = false;
  for (const Update& u : s.log()) {
    if (u.kind == Update::Kind::kGap) rotation_named |= absl::StrContains(u.reason, "rotated");
  }
  EXPECT_TRUE(rotation_named) << "the gap's reason does not say the token had been rotated";
  // The old value was never offered again after its revocation.
  EXPECT_EQ(emulator_->auth_failures(), 0);
  EXPECT_EQ(emulator_->auth_successes(), 3);
  ExpectServesAgain();
  // The former default session goes once its last subscriber has left.
  EXPECT_TRUE(WaitFor([&] { return bridge().ListSessions().size() == 1; }, kLong));
  ExpectBounded();
}

// The other order: Emogg stops accepting the token before the new one is mounted. The
// bridge tells its callers (TOKEN_REFUSED, the subscriber's stream ends), then picks the
// new file up without a restart, well before auth_retry_pause (60 s) would let it try the
// old one again. The file is replaced by renaming a new one over it.
TEST_F(EmoggFaultTest, TokenRevokedBeforeTheNewFileArrivesRecoversWithoutARestart) {
  testing::TempDir dir;
  const std::string path = dir.WriteFile("token", "tok-s3cr3t-first\n");
  Start([&](emogg::EmoggBridgeOptions& o) {
    o.default_token = FileSecret(path);
    o.auth_retry_pause = 60s;
  });
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  Subscriber& s = Subscribe();
  ASSERT_TRUE(WaitFor([&] { return s.Count(Update::Kind::kSubscribed) == 1; }, kLong));

  emulator_->RevokeToken("tok-s3cr3t-first");
  grpc::Status ended = s.Ended();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAUTHENTICATED) << ended.error_message();
  EXPECT_EQ(ErrorReason(ended), "TOKEN_REFUSED");
  Outcome refused = Call("emulator:echo");
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
      << refused.status.error_message();
  EXPECT_EQ(ErrorReason(refused.status), "TOKEN_REFUSED");
  EXPECT_FALSE(Serving());

  dir.WriteFile("token.tmp", "tok-s3cr3t-second\n");
  std::filesystem::rename(dir.path() + "/token.tmp", path);
  const Clock::time_point rotated = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return Serving(); }, kLong));
  RecordProperty("serving_after_rotation_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - rotated).count()));
  ExpectEchoes(3, "second");
  EXPECT_EQ(emulator_->auth_failures(), 0) << "the revoked token was offered again";
  EXPECT_EQ(emulator_->auth_successes(), 2);
  ExpectServesAgain();
  EXPECT_TRUE(WaitFor([&] { return bridge().ListSessions().size() == 1; }, kLong));
  ExpectBounded();
}

}  // namespace
}  // namespace wsbridge::faults
