// A caller whose whole process stalls (docs/operations.md, "Slow and stalled callers",
// point 3), driven through the real path: the Emogg bridge inside the real daemon
// (DaemonHarness) with short server keepalive settings, the Emogg emulator emitting
// events, and the stalled caller a real process of its own: `wsbridgectl call ...
// Subscribe`, stopped with SIGSTOP while the upstream keeps emitting. A stopped process
// answers no HTTP/2 ping, so the daemon's keepalive must close its connection, end its
// stream and clean it up, while another subscriber of the same upstream subscription (in
// this process) keeps getting every event. Once it runs again (SIGCONT) the caller learns
// UNAVAILABLE, not SLOW_CONSUMER.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "bridges/emogg/emogg_bridge.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/emogg_gaps.h"
#include "tests/support/child_process.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/emogg_emulator.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::emogg::v1;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "tok-s3cr3t-stall";
constexpr char kChannel[] = "session_emotions_counts";
constexpr char kKey[] = "s1:1s";
constexpr char kSubscribeMethod[] = "/wsbridge.emogg.v1.EmoggService/Subscribe";
// server.connections: the daemon pings every caller connection after a second without
// one and closes it when a ping goes unanswered for two (a second would do; two leave
// the callers in this process, under ASan and CPU hogs, room to answer in time).
constexpr auto kKeepaliveTime = 1s;
constexpr auto kKeepaliveTimeout = 2s;
// On top of keepalive_time + keepalive_timeout, for a loaded machine and ASan.
constexpr auto kMargin = 20s;
constexpr auto kLong = 60s;  // "it happened at all"

// --- The stalled caller's output: wsbridgectl as a child process (ChildProcess) ---------

// The stream's updates as wsbridgectl printed them (one SubscribeResponse per line, JSON).
struct PrintedStream {
  std::vector<Update> log;
  std::vector<std::string> unparsed;
  int events() const {
    int n = 0;
    for (const Update& u : log) n += u.kind == Update::Kind::kEvent ? 1 : 0;
    return n;
  }
  void Add(const std::string& line) {
    v1::SubscribeResponse msg;
    if (!google::protobuf::util::JsonStringToMessage(line, &msg).ok()) {
      unparsed.push_back(line);
      return;
    }
    for (const auto& u : msg.updates()) {
      if (std::optional<Update> update = UpdateOf(u)) log.push_back(*std::move(update));
    }
  }
};

// --- The caller that goes on: a Subscribe read on its own thread, in this process ---

class Subscriber {
 public:
  Subscriber(v1::EmoggService::Stub& stub, const std::string& channel, const std::string& key) {
    ctx_.set_deadline(std::chrono::system_clock::now() + 10min);  // the test ends it
    v1::SubscribeRequest req;
    req.set_channel(channel);
    req.set_key(key);
    reader_ = stub.Subscribe(&ctx_, req);
    thread_ = std::thread([this] { ReadAll(); });
  }
  ~Subscriber() { Cancel(); }

  void Cancel() {
    ctx_.TryCancel();
    if (thread_.joinable()) thread_.join();
  }
  bool done() const {
    absl::MutexLock lock(&mu_);
    return done_;
  }
  grpc::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  std::vector<Update> log() const {
    absl::MutexLock lock(&mu_);
    return log_;
  }
  int events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }

 private:
  void ReadAll() {
    v1::SubscribeResponse msg;
    while (reader_->Read(&msg)) {
      absl::MutexLock lock(&mu_);
      for (const auto& u : msg.updates()) {
        if (std::optional<Update> update = UpdateOf(u)) {
          events_ += update->kind == Update::Kind::kEvent ? 1 : 0;
          log_.push_back(*std::move(update));
        }
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
  int events_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// --- The daemon's /metrics, over HTTP from its admin listener --------------------------

// GET http://127.0.0.1:port/path; the body of a 200 answer, or "" on any failure.
std::string HttpGetBody(int port, const std::string& path) {
  absl::StatusOr<testing::HttpResponse> answer = testing::HttpRequest(port, "GET", path);
  return answer.ok() && answer->status == 200 ? answer->body : "";
}

// The value of the sample of `name` whose labels include every one of `labels`
// (`key="value"`); 0 when there is none (a counter not yet incremented).
double Sample(const std::string& metrics, const std::string& name,
              const std::vector<std::string>& labels = {}) {
  for (absl::string_view line : absl::StrSplit(metrics, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    absl::string_view rest = line.substr(name.size());
    if (!rest.empty() && rest[0] != '{' && rest[0] != ' ') continue;  // a longer name
    const size_t space = rest.rfind(' ');
    if (space == absl::string_view::npos) continue;
    const absl::string_view label_part = rest.substr(0, space);
    bool all = true;
    for (const std::string& l : labels) all = all && absl::StrContains(label_part, l);
    if (!all) continue;
    double value = 0;
    if (absl::SimpleAtod(rest.substr(space + 1), &value)) return value;
  }
  return 0;
}

// What the daemon's /metrics says about the Subscribe calls.
struct CallMetrics {
  bool scraped = false;
  double in_flight = 0;                    // wsbridge_grpc_calls_in_flight
  double subscribe_cancelled = 0;          // Subscribe calls ended CANCELLED
  double subscribe_resource_exhausted = 0;  // ... RESOURCE_EXHAUSTED (SLOW_CONSUMER)
  double subscribe_ended = 0;              // ... with any code
};

CallMetrics ScrapeCalls(int admin_port) {
  CallMetrics m;
  const std::string text = HttpGetBody(admin_port, "/metrics");
  if (text.empty()) return m;
  m.scraped = true;
  const std::string method = absl::StrCat("method=\"", kSubscribeMethod, "\"");
  m.in_flight = Sample(text, "wsbridge_grpc_calls_in_flight");
  m.subscribe_cancelled = Sample(text, "wsbridge_grpc_requests_total", {method, "code=\"CANCELLED\""});
  m.subscribe_resource_exhausted =
      Sample(text, "wsbridge_grpc_requests_total", {method, "code=\"RESOURCE_EXHAUSTED\""});
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, "wsbridge_grpc_requests_total{") || !absl::StrContains(line, method)) {
      continue;
    }
    double v = 0;
    const size_t space = line.rfind(' ');
    if (space != absl::string_view::npos && absl::SimpleAtod(line.substr(space + 1), &v)) {
      m.subscribe_ended += v;
    }
  }
  return m;
}

// How many callers the bridge's session has on the upstream subscription (the admin
// view: AdminService/ListSessions); -1 unless there is exactly one session.
int SessionSubscribers(const core::Bridge& bridge) {
  auto sessions = bridge.ListSessions();
  return sessions.size() == 1 ? static_cast<int>(sessions[0].subscribers()) : -1;
}

std::string Dump(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) absl::StrAppend(&out, l.substr(0, 200), "\n");
  return out;
}

// Every update keeps the gap rule; returns the number of gaps.
int ExpectEveryGapTold(const std::vector<Update>& log, const std::string& who) {
  GapRule rule;
  for (size_t i = 0; i < log.size(); ++i) {
    const std::string broken = rule.Next(log[i]);
    EXPECT_TRUE(broken.empty()) << who << ": " << broken << " (update " << i << ")";
  }
  return rule.gaps();
}

// The stalled caller is a process of its own, stopped (SIGSTOP) after it has read a few
// events, while Emogg emits every 5 ms. The daemon pings its connection after
// keepalive_time, gets no answer within keepalive_timeout and closes the connection: the
// stream ends on the daemon's side (its upstream share released, its call counted as
// ended) while the process is still stopped. The other subscriber of the same upstream
// subscription, in this process, gets every event in order throughout. Once the process
// runs again it reads what was already in its socket and then learns UNAVAILABLE: the
// stream ended with the connection, not with SLOW_CONSUMER (subscriber_queue is far
// larger than anything this stall can queue, so only the keepalive can end it).
TEST(StalledCallerTest, KeepaliveClosesAStoppedProcessConnectionAndOthersKeepEveryEvent) {
  testing::TempDir dir;
  emulator::EmoggEmulatorOptions eo;
  eo.protocol.max_messages = 1000000;
  eo.protocol.max_subscriptions_per_user = 100;
  // Every 5 ms from the first subscription on (a change applies at a subscription's next
  // tick only, so it is set before).
  eo.protocol.event_interval = 5ms;
  emulator::EmoggEmulator emulator(std::move(eo));
  ASSERT_TRUE(emulator.Start().ok());

  emogg::EmoggBridgeOptions o;
  o.url = emulator.url();
  o.connection.allow_plaintext = true;
  o.connection.backoff.initial = 20ms;
  o.connection.backoff.max = 200ms;
  o.default_token = core::SecretSource::Fixed(kToken);
  o.limits.max_messages = 100000;
  o.limits.control_reserve = 8;
  // Far beyond what the stall can queue (200 events a second for a few seconds): if the
  // stalled stream ends, the keepalive ended it, not SLOW_CONSUMER.
  o.subscriber_queue = 1'000'000;
  DaemonHarness harness;
  absl::Status started = harness.Start(
      "emogg",
      [url = o.url](config::v1::BridgeConfig& b) {
        b.mutable_emogg()->mutable_upstream()->set_url(url);
        b.mutable_emogg()->mutable_upstream()->set_allow_plaintext(true);
      },
      [o](const core::BridgeContext& ctx) { return emogg::NewEmoggBridge(o, ctx); },
      [](config::v1::DaemonConfig& cfg) {
        auto* conn = cfg.mutable_server()->mutable_connections();
        conn->mutable_keepalive_time()->set_seconds(
            std::chrono::duration_cast<std::chrono::seconds>(kKeepaliveTime).count());
        conn->mutable_keepalive_timeout()->set_seconds(
            std::chrono::duration_cast<std::chrono::seconds>(kKeepaliveTimeout).count());
        cfg.mutable_admin()->set_listen("127.0.0.1:0");
      });
  ASSERT_TRUE(started.ok()) << started;
  core::Bridge& bridge = *harness.bridge();
  const int admin_port = harness.daemon().admin_port();
  ASSERT_NE(admin_port, 0);
  ASSERT_TRUE(WaitFor([&] { return bridge.Serving(); }, kLong));

  auto stub = v1::EmoggService::NewStub(harness.channel());
  Subscriber steady(*stub, kChannel, kKey);
  ASSERT_TRUE(WaitFor([&] { return SessionSubscribers(bridge) == 1; }, kLong));

  // The stalled caller, on its own connection: wsbridgectl finds the method through the
  // daemon's reflection and prints every SubscribeResponse as a JSON line as it arrives.
  // The test's WSBRIDGE_* settings (target, token) do not reach it.
  testing::ChildProcess ctl(
      WSBRIDGECTL_PATH,
      {"--target", absl::StrCat("127.0.0.1:", harness.daemon().grpc_port()), "call",
       "wsbridge.emogg.v1.EmoggService/Subscribe",
       absl::StrCat(R"({"channel":")", kChannel, R"(","key":")", kKey, R"("})")},
      {.stderr_path = dir.path() + "/wsbridgectl.stderr"});
  ASSERT_TRUE(ctl.spawned());
  PrintedStream printed;
  std::vector<std::string> lines;
  // Joined: `subscribed` printed, and the bridge counts two callers on the subscription.
  while (printed.log.empty()) {
    auto line = ctl.ReadLine(kLong);
    ASSERT_TRUE(line.has_value()) << "wsbridgectl printed no update: " << ctl.Stderr() << "\n"
                                  << Dump(lines);
    lines.push_back(*line);
    printed.Add(*line);
  }
  ASSERT_TRUE(WaitFor([&] { return SessionSubscribers(bridge) == 2; }, kLong));
  const CallMetrics before = ScrapeCalls(admin_port);
  ASSERT_TRUE(before.scraped);
  EXPECT_EQ(before.subscribe_ended, 0);
  EXPECT_GE(before.in_flight, 2);  // the two subscribers (and whatever else wsbridgectl holds)

  // The child reads (and prints) events before it stalls.
  while (printed.events() < 20) {
    auto line = ctl.ReadLine(kLong);
    ASSERT_TRUE(line.has_value()) << "wsbridgectl stopped printing: " << ctl.Stderr() << "\n"
                                  << Dump(lines);
    lines.push_back(*line);
    printed.Add(*line);
  }
  const int printed_before_stop = printed.events();

  ASSERT_TRUE(ctl.Stop()) << "wsbridgectl is not running: " << ctl.Stderr();
  const auto stopped_at = Clock::now();
  const int steady_at_stop = steady.events();

  // (1) The daemon ends the stopped caller's stream within keepalive_time +
  // keepalive_timeout (+ margin): its share of the upstream subscription is released
  // (admin view) and /metrics counts the Subscribe call as ended, CANCELLED: the
  // connection went away under it (SLOW_CONSUMER would be RESOURCE_EXHAUSTED).
  CallMetrics after;
  const bool ended = WaitFor(
      [&] {
        if (SessionSubscribers(bridge) != 1) return false;  // cheap check first
        after = ScrapeCalls(admin_port);
        return after.scraped && after.subscribe_ended >= 1;
      },
      std::chrono::duration_cast<std::chrono::milliseconds>(kKeepaliveTime + kKeepaliveTimeout +
                                                            kMargin));
  const auto ended_after = Clock::now() - stopped_at;
  const auto ended_ms = std::chrono::duration_cast<std::chrono::milliseconds>(ended_after).count();
  ::testing::Test::RecordProperty("stalled_stream_ended_ms", static_cast<int>(ended_ms));
  std::cout << "[stalled caller] stream ended " << ended_ms << " ms after SIGSTOP (keepalive "
            << std::chrono::duration_cast<std::chrono::milliseconds>(kKeepaliveTime).count()
            << " + "
            << std::chrono::duration_cast<std::chrono::milliseconds>(kKeepaliveTimeout).count()
            << " ms); calls in flight before the stall: " << before.in_flight << std::endl;
  ASSERT_TRUE(ended) << "the stopped caller's stream was not ended within keepalive_time + "
                        "keepalive_timeout + margin; subscribers on the session: "
                     << SessionSubscribers(bridge) << ", Subscribe calls ended: "
                     << after.subscribe_ended;
  EXPECT_FALSE(ctl.WaitExit(0ms).has_value()) << "ended only because the child exited";
  EXPECT_EQ(after.subscribe_cancelled, 1) << "the stalled stream ended with another code";
  EXPECT_EQ(after.subscribe_resource_exhausted, 0) << "SLOW_CONSUMER, not the keepalive";
  EXPECT_EQ(after.subscribe_ended, 1);
  // Every call the stopped process had open is gone with its connection: the one left is
  // the steady subscriber's.
  EXPECT_TRUE(WaitFor([&] { return ScrapeCalls(admin_port).in_flight == 1; }, kLong))
      << "calls in flight: " << ScrapeCalls(admin_port).in_flight << " (before the stall: "
      << before.in_flight << ")";
  // The shared upstream subscription itself goes on (the steady subscriber holds it).
  EXPECT_EQ(emulator.subscriptions_of(kChannel, kKey), 1);

  // (2) The steady subscriber was not held back and goes on after the close.
  EXPECT_FALSE(steady.done()) << steady.status().error_message();
  const int steady_at_end = steady.events();
  EXPECT_GT(steady_at_end, steady_at_stop);
  EXPECT_TRUE(WaitFor([&] { return steady.events() >= steady_at_end + 100; }, kLong))
      << "the steady subscriber stopped getting events after the close";

  // (3) The process runs again: it prints what was already on its way, then learns that
  // the connection is gone.
  ASSERT_TRUE(ctl.Signal(SIGCONT));
  const auto drain_deadline = Clock::now() + kLong;
  while (!ctl.eof() && Clock::now() < drain_deadline) {
    auto line = ctl.ReadLine(std::chrono::duration_cast<std::chrono::milliseconds>(
        drain_deadline - Clock::now()));
    if (!line) continue;
    lines.push_back(*line);
    printed.Add(*line);
  }
  EXPECT_TRUE(ctl.eof()) << "wsbridgectl never closed its stdout";
  const std::optional<int> exit_code = ctl.WaitExitCode(kLong);
  const std::string err = ctl.Stderr();
  std::cout << "[stalled caller] wsbridgectl exited " << exit_code.value_or(-99) << " after "
            << printed.events() << " events (" << printed_before_stop
            << " before SIGSTOP); stderr: " << err;
  ASSERT_TRUE(exit_code.has_value()) << "wsbridgectl did not exit after SIGCONT";
  EXPECT_EQ(*exit_code, 1) << err;
  EXPECT_TRUE(absl::StartsWith(err, "UNAVAILABLE: ")) << err;
  const std::string all_output = absl::StrCat(Dump(lines), ctl.rest(), err);
  EXPECT_FALSE(absl::StrContains(all_output, "SLOW_CONSUMER")) << err;
  EXPECT_FALSE(absl::StrContains(all_output, "RESOURCE_EXHAUSTED")) << err;
  EXPECT_TRUE(printed.unparsed.empty()) << Dump(printed.unparsed);
  // What it did get is a clean prefix of the stream: no event lost or reordered.
  EXPECT_EQ(ExpectEveryGapTold(printed.log, "stalled caller"), 0);
  EXPECT_GE(printed.events(), printed_before_stop);
  EXPECT_LT(printed.events(), steady.events());

  // (2, whole) Every event of the upstream subscription, in order, to the steady one.
  emulator.SetEventInterval(0ms);
  EXPECT_FALSE(steady.done()) << steady.status().error_message();
  steady.Cancel();
  const std::vector<Update> log = steady.log();
  EXPECT_EQ(ExpectEveryGapTold(log, "steady subscriber"), 0);
  int expected_seq = 1;
  for (const Update& u : log) {
    if (u.kind != Update::Kind::kEvent) continue;
    ASSERT_EQ(u.seq, expected_seq) << "the steady subscriber missed or reordered an event";
    ++expected_seq;
  }
  EXPECT_GT(expected_seq - 1, steady_at_end);
  EXPECT_EQ(emulator.auth_successes(), 1) << "the upstream session was not disturbed";
}

}  // namespace
}  // namespace wsbridge::faults
