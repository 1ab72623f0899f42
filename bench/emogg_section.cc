#include "bench/emogg_section.h"

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "bench/ws_client.h"
#include "tests/support/test_support.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::bench {
namespace {

namespace json = boost::json;
namespace emogg = wsbridge::emogg::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kBridgeToken[] = "bench-emogg-bridge";
constexpr char kDirectToken[] = "bench-emogg-direct";
// The emulator's limit is far above anything the section sends; the bridge's limiter
// stays on, below it (it must never learn the limit from a 429).
constexpr int kEmulatorMaxMessages = 100000000;  // the flag takes at most 9 digits
constexpr int kBridgeMaxMessages = 10000000;
// Fan-out channel: the emulator emits on it every kEventIntervalMs (its least
// interval), whatever the key's frequency says.
constexpr char kChannel[] = "session_emotions_counts";
constexpr char kKey[] = "benchsession0000000000000:1s";
constexpr int kEventIntervalMs = 1;

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "wsbridge-bench: emogg: " << what << "\n";
  KillAllChildren();
  std::exit(1);
}

template <typename T>
T Check(absl::StatusOr<T> v, const std::string& what) {
  if (!v.ok()) Die(absl::StrCat(what, ": ", v.status().ToString()));
  return *std::move(v);
}

template <typename Fn>
std::vector<int64_t> Sample(int warmup, int samples, Fn&& once) {
  for (int i = 0; i < warmup; ++i) once();
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(samples));
  for (int i = 0; i < samples; ++i) {
    int64_t t0 = NowNs();
    once();
    out.push_back(NowNs() - t0);
  }
  return out;
}

json::object LatencyJson(const Latency& l) {
  return {{"p50_us", l.p50_us}, {"p99_us", l.p99_us}, {"p999_us", l.p999_us},
          {"mean_us", l.mean_us}, {"samples", l.samples}};
}

// a - b - c, field by field: what the bridge adds over the two direct hops.
json::object AddedJson(const Latency& a, const Latency& b, const Latency& c) {
  return {{"p50_us", a.p50_us - b.p50_us - c.p50_us},
          {"p99_us", a.p99_us - b.p99_us - c.p99_us},
          {"p999_us", a.p999_us - b.p999_us - c.p999_us},
          {"mean_us", a.mean_us - b.mean_us - c.mean_us}};
}

bool WaitUntil(const std::function<bool()>& cond, Clock::duration timeout) {
  auto deadline = Clock::now() + timeout;
  while (!cond()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

int64_t UnixUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Direct leg: one authenticated WebSocket connection to the emulator.
class DirectEmogg {
 public:
  DirectEmogg(const std::string& url, const std::string& ca_file)
      : ws_(Check(WsClient::Connect(url, ca_file), "direct ws connect to the emulator")) {
    Ask(absl::StrCat("{\"id\":\"auth\",\"path\":\"auth:token\",\"body\":{\"token\":\"", kDirectToken,
                     "\"}}"),
        "\"auth:token\"");
  }
  // One `ping` request and its answer (matched by id; nothing else arrives here).
  void Ping() {
    std::string id = absl::StrCat("p", ++seq_);
    Ask(absl::StrCat("{\"id\":\"", id, "\",\"path\":\"ping\",\"body\":{}}"),
        absl::StrCat("\"id\":\"", id, "\""));
  }

 private:
  void Ask(const std::string& frame, const std::string& expect) {
    if (absl::Status st = ws_->Write(frame); !st.ok()) Die(absl::StrCat("direct ws: ", st.ToString()));
    for (;;) {
      std::string answer = Check(ws_->Read(), "direct ws read");
      if (answer.find(expect) == std::string::npos) continue;
      if (answer.find("\"status\":200") == std::string::npos) Die("direct ws answered " + answer);
      return;
    }
  }
  std::unique_ptr<WsClient> ws_;
  uint64_t seq_ = 0;
};

void BridgedPing(emogg::EmoggService::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(10));
  emogg::RequestRequest req;
  req.set_path("ping");
  req.set_json_body("{}");
  emogg::RequestResponse resp;
  grpc::Status st = stub.Request(&ctx, req, &resp);
  if (!st.ok()) Die(absl::StrCat("bridged Request: ", st.error_code(), " ", st.error_message()));
  if (resp.status() != 200) Die(absl::StrCat("bridged Request answered ", resp.status()));
}

void GrpcEcho(v1::EchoService::Stub& echo, const v1::EchoMessage& msg) {
  grpc::ClientContext ctx;
  v1::EchoMessage back;
  grpc::Status st = echo.Echo(&ctx, msg, &back);
  if (!st.ok()) Die(absl::StrCat("grpc echo: ", st.error_message()));
}

// One gRPC Subscribe caller; counts events and records publish->receive latency
// (the emulator stamps events in whole ms since the epoch).
class EventSubscriber : public grpc::ClientReadReactor<emogg::SubscribeResponse> {
 public:
  explicit EventSubscriber(emogg::EmoggService::Stub* stub) {
    req_.set_channel(kChannel);
    req_.set_key(kKey);
    stub->async()->Subscribe(&ctx_, &req_, this);
    StartRead(&msg_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    int64_t now = UnixUs();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& u : msg_.updates()) {
        if (u.has_subscribed()) subscribed_ = true;
        if (u.has_gap()) ++gaps_;
        if (!u.has_event()) continue;
        ++events_;
        if (measuring_) {
          const auto& ts = u.event().timestamp();
          latencies_.push_back((now - (ts.seconds() * 1000000 + ts.nanos() / 1000)) * 1000);
        }
      }
    }
    StartRead(&msg_);
  }

  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    status_ = s;
    cv_.notify_all();
  }

  bool subscribed() { std::lock_guard<std::mutex> l(mu_); return subscribed_; }
  int64_t events() { std::lock_guard<std::mutex> l(mu_); return events_; }
  int64_t gaps() { std::lock_guard<std::mutex> l(mu_); return gaps_; }
  bool done() { std::lock_guard<std::mutex> l(mu_); return done_; }
  std::string status_text() {
    std::lock_guard<std::mutex> l(mu_);
    return absl::StrCat(status_.error_code(), " ", status_.error_message());
  }
  void Measure(bool on) {
    std::lock_guard<std::mutex> l(mu_);
    measuring_ = on;
  }
  std::vector<int64_t> TakeLatencies() {
    std::lock_guard<std::mutex> l(mu_);
    return std::move(latencies_);
  }
  void Cancel() {
    if (done()) return;
    ctx_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, seconds(10), [&] { return done_; });
  }

 private:
  grpc::ClientContext ctx_;
  emogg::SubscribeRequest req_;
  emogg::SubscribeResponse msg_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool subscribed_ = false, measuring_ = false, done_ = false;
  int64_t events_ = 0, gaps_ = 0;
  std::vector<int64_t> latencies_;
  grpc::Status status_;
};

json::object FanoutLevel(int n, double window_s, const std::vector<std::unique_ptr<emogg::EmoggService::Stub>>& stubs,
                         pid_t daemon) {
  std::vector<std::unique_ptr<EventSubscriber>> subs;
  for (int i = 0; i < n; ++i) {
    subs.push_back(std::make_unique<EventSubscriber>(stubs[static_cast<size_t>(i) % stubs.size()].get()));
  }
  auto all = [&](auto pred) {
    return std::all_of(subs.begin(), subs.end(), [&](auto& s) { return pred(*s); });
  };
  if (!WaitUntil([&] { return all([](EventSubscriber& s) { return s.subscribed() && s.events() > 0; }) ||
                              !all([](EventSubscriber& s) { return !s.done(); }); },
                 seconds(30))) {
    Die(absl::StrCat(n, " Subscribe callers: no event within 30 s"));
  }
  for (auto& s : subs) {
    if (s->done()) Die(absl::StrCat("Subscribe ended: ", s->status_text()));
  }
  // Warm-up, then a measured window.
  std::this_thread::sleep_for(milliseconds(static_cast<int>(std::min(window_s, 1.0) * 300)));
  int64_t events0 = 0, gaps0 = 0;
  for (auto& s : subs) s->Measure(true), events0 += s->events(), gaps0 += s->gaps();
  double cpu0 = ProcessCpuSeconds(daemon);
  auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(window_s));
  for (auto& s : subs) s->Measure(false);
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  double cpu = ProcessCpuSeconds(daemon) - cpu0;
  int64_t events = 0, gaps = 0;
  std::vector<int64_t> lat;
  for (auto& s : subs) {
    events += s->events();
    gaps += s->gaps();
    auto l = s->TakeLatencies();
    lat.insert(lat.end(), l.begin(), l.end());
  }
  events -= events0;
  gaps -= gaps0;
  // A subscriber the bridge ended (e.g. SLOW_CONSUMER) is a result, not a failure.
  int ended = 0;
  std::string ended_status;
  for (auto& s : subs) {
    if (s->done()) ++ended, ended_status = s->status_text();
  }
  for (auto& s : subs) s->Cancel();
  Latency l = Summarize(std::move(lat));
  double deliveries = static_cast<double>(events) / elapsed;
  return {{"subscribers", n},
          {"deliveries_per_s", deliveries},
          {"events_per_s_per_subscriber", deliveries / n},
          {"p50_ms", l.p50_us / 1000},
          {"p99_ms", l.p99_us / 1000},
          {"wsbridged_cpu_us_per_delivery", events > 0 ? cpu / static_cast<double>(events) * 1e6 : 0.0},
          {"gaps", gaps},
          {"ended_by_bridge", ended},
          {"ended_status", ended_status},
          {"window_s", elapsed}};
}

}  // namespace

json::object EmoggSection(const EmoggBenchConfig& c, v1::EchoService::Stub& echo) {
  testing::TempDir dir;
  // The emulator, over wss with the bench's certificate.
  Child emulator;
  if (absl::Status st = emulator.Spawn(
          {c.emulator, "--emogg", "127.0.0.1:0", "--emogg-token", kBridgeToken, "--emogg-token",
           kDirectToken, "--emogg-max-messages", std::to_string(kEmulatorMaxMessages),
           "--emogg-event-interval", std::to_string(kEventIntervalMs), "--emogg-idle-timeout",
           "3600000", "--tls-cert", c.cert_file, "--tls-key", c.key_file});
      !st.ok()) {
    Die(absl::StrCat("spawn ", c.emulator, ": ", st.ToString()));
  }
  std::string url = JsonField(Check(emulator.WaitForLine("\"emogg\"", seconds(20)), "emulator start"), "url");

  // wsbridged with one Emogg bridge on it.
  std::string yaml = absl::StrCat(
      "server:\n"
      "  listen: \"127.0.0.1:0\"\n"
      "  max_concurrent_streams: 100000\n"
      "log:\n"
      "  level: warn\n"
      "runtime:\n"
      "  io_threads: ", c.io_threads, "\n"
      "shutdown:\n"
      "  drain_timeout: 0s\n"
      "  deadline: 2s\n"
      "bridges:\n"
      "  - name: emogg\n"
      "    emogg:\n"
      "      upstream:\n"
      "        url: \"", url, "\"\n"
      "        tls:\n"
      "          ca_file: \"", c.ca_file, "\"\n"
      "      token:\n"
      "        value: \"", kBridgeToken, "\"\n"
      "      rate_limit:\n"
      "        max_messages: ", kBridgeMaxMessages, "\n"
      "        window: 60s\n");
  std::string cfg = dir.WriteFile("wsbridged-emogg.yaml", yaml);
  Child daemon;
  std::string log = c.daemon_log.empty() ? absl::StrCat(dir.path(), "/wsbridged-emogg.log") : c.daemon_log;
  if (absl::Status st = daemon.Spawn({c.wsbridged, "--config", cfg}, {}, log); !st.ok()) {
    Die(absl::StrCat("spawn wsbridged: ", st.ToString()));
  }
  std::string target = JsonField(Check(daemon.WaitForLine("\"listening\"", seconds(30)), "wsbridged start"), "grpc");
  std::cerr << "  emogg: emulator " << url << ", wsbridged pid " << daemon.pid() << " on " << target << "\n";
  auto channel_for = [&](int salt) {
    grpc::ChannelArguments args;
    args.SetInt("wsbridge.bench.emogg", salt);  // distinct args: distinct connections
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  };
  auto stub = emogg::EmoggService::NewStub(channel_for(0));
  // Serving once the configured token's session is authenticated.
  if (!WaitUntil([&] {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + seconds(1));
        emogg::RequestRequest req;
        req.set_path("ping");
        req.set_json_body("{}");
        emogg::RequestResponse resp;
        return stub->Request(&ctx, req, &resp).ok();
      }, seconds(20))) {
    Die("the Emogg bridge did not answer a ping within 20 s (see its log: " + log + ")");
  }

  // Round trips: the three legs sampled in turn, in each run.
  DirectEmogg direct(url, c.ca_file);
  v1::EchoMessage msg;
  msg.set_payload("{\"path\":\"ping\",\"body\":{}}");
  std::vector<Latency> ws_runs, grpc_runs, bridge_runs;
  std::vector<double> cpu_per_call;
  for (int run = 0; run < c.runs; ++run) {
    ws_runs.push_back(Summarize(Sample(c.warmup, c.rt_samples, [&] { direct.Ping(); })));
    grpc_runs.push_back(Summarize(Sample(c.warmup, c.rt_samples, [&] { GrpcEcho(echo, msg); })));
    for (int i = 0; i < c.warmup; ++i) BridgedPing(*stub);
    double cpu0 = ProcessCpuSeconds(daemon.pid());
    bridge_runs.push_back(Summarize(Sample(0, c.rt_samples, [&] { BridgedPing(*stub); })));
    cpu_per_call.push_back((ProcessCpuSeconds(daemon.pid()) - cpu0) / c.rt_samples * 1e6);
  }
  Latency w = MedianOf(ws_runs), g = MedianOf(grpc_runs), b = MedianOf(bridge_runs);
  json::object rt{{"path", "ping"},
                  {"runs", c.runs},
                  {"ws_direct", LatencyJson(w)},
                  {"grpc_unary_direct", LatencyJson(g)},
                  {"bridged_request", LatencyJson(b)},
                  {"added_over_ws_plus_grpc_unary", AddedJson(b, w, g)},
                  {"wsbridged_cpu_us_per_request", Median(cpu_per_call)}};

  // Fan-out: n callers on one channel and key share one upstream subscription.
  std::vector<int> levels = c.quick ? std::vector<int>{1, 10} : std::vector<int>{1, 10, 100};
  double window_s = c.quick ? 0.3 : 3.0;
  std::vector<std::unique_ptr<emogg::EmoggService::Stub>> stubs;
  for (int i = 1; i <= 4; ++i) stubs.push_back(emogg::EmoggService::NewStub(channel_for(i)));
  json::array fanout;
  for (int n : levels) fanout.push_back(FanoutLevel(n, window_s, stubs, daemon.pid()));

  daemon.Stop();
  emulator.Stop();
  return {{"upstream", "wsbridge-emulator --emogg over wss, loopback"},
          {"limits",
           {{"emulator_max_messages_per_60s", kEmulatorMaxMessages},
            {"bridge_rate_limit_max_messages_per_60s", kBridgeMaxMessages},
            {"note", "Emogg allows 80 messages per 60 s; both limits raised for the benchmark, "
                     "the bridge's limiter stays on below the emulator's"}}},
          {"round_trip", std::move(rt)},
          {"fanout",
           {{"channel", kChannel},
            {"emulator_event_interval_ms", kEventIntervalMs},
            {"note", "one upstream subscription; the emulator emits one event per ms, so deliveries/s "
                     "is bound by it (about 1000 x subscribers); event timestamps are whole ms, so "
                     "latencies read up to 1 ms high"},
            {"levels", std::move(fanout)}}}};
}

void PrintEmoggTable(const json::value& s) {
  auto num = [](const json::value& v) {
    if (v.is_double()) return v.as_double();
    if (v.is_int64()) return static_cast<double>(v.as_int64());
    if (v.is_uint64()) return static_cast<double>(v.as_uint64());
    return 0.0;
  };
  const auto& lim = s.at("limits");
  std::printf("\nE. Emogg (emulator over wss; limits raised: emulator %.0f msgs/60 s, bridge limiter on at %.0f/60 s;"
              " Emogg's own is 80/60 s)\n",
              num(lim.at("emulator_max_messages_per_60s")), num(lim.at("bridge_rate_limit_max_messages_per_60s")));
  const auto& rt = s.at("round_trip");
  std::printf("   Request \"ping\" round trip (median of %d runs)        p50 us    p99 us  p99.9 us\n",
              static_cast<int>(num(rt.at("runs"))));
  for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
           {"ws_direct", "direct WebSocket ping request"},
           {"grpc_unary_direct", "direct gRPC unary echo"},
           {"bridged_request", "bridged Request (gRPC->wsbridged->emulator)"},
           {"added_over_ws_plus_grpc_unary", "added over ws + gRPC unary"}}) {
    const auto& l = rt.at(key);
    std::printf("   %-46s %9.1f %9.1f %9.1f\n", label, num(l.at("p50_us")), num(l.at("p99_us")),
                num(l.at("p999_us")));
  }
  std::printf("   wsbridged CPU per bridged Request: %.1f us\n", num(rt.at("wsbridged_cpu_us_per_request")));
  const auto& fo = s.at("fanout");
  std::printf("   Subscribe fan-out, one upstream subscription, emulator event every %d ms\n",
              static_cast<int>(num(fo.at("emulator_event_interval_ms"))));
  std::printf("   %-12s %14s %12s %10s %10s %16s\n", "subscribers", "deliveries/s", "events/s", "p50 ms",
              "p99 ms", "CPU us/delivery");
  for (const auto& l : fo.at("levels").as_array()) {
    std::printf("   %-12d %14.0f %12.0f %10.2f %10.2f %16.2f\n", static_cast<int>(num(l.at("subscribers"))),
                num(l.at("deliveries_per_s")), num(l.at("events_per_s_per_subscriber")), num(l.at("p50_ms")),
                num(l.at("p99_ms")), num(l.at("wsbridged_cpu_us_per_delivery")));
  }
}

}  // namespace wsbridge::bench
