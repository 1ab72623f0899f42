// wsbridge-bench: measures wsbridged against the hops it cannot avoid (a direct
// WebSocket round trip to the upstream plus a direct gRPC round trip), side by side in
// one run on one machine, all on loopback. See docs/performance.md.
//
//   wsbridge-bench [--quick] [--runs N] [--json FILE] [--wsbridged PATH]
//                  [--sections rt,fanout,dfx,sessions,alloc,emogg,nlx,nexora,throughput] [--no-plain] [--max-sessions N]
//
// Internal modes (the bench spawns itself): --upstream ..., --grpc-echo.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "bench/emogg_section.h"
#include "bench/grpc_echo.h"
#include "bench/nexora_section.h"
#include "bench/nlx_section.h"
#include "bench/throughput_section.h"
#include "bench/upstream.h"
#include "bench/ws_client.h"
#include "bench_echo.grpc.pb.h"
#include "tests/support/test_support.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::bench {
namespace {

namespace json = boost::json;
namespace dfx = wsbridge::dfx::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

// ---------------------------------------------------------------- options

struct Options {
  bool quick = false;
  int runs = 3;
  std::string json_out = "bench-results.json";
  std::string wsbridged;
  std::string alloc_lib;
  std::set<std::string> sections = {"rt", "fanout", "dfx", "sessions", "alloc", "emogg", "nlx", "nexora",
                                        "throughput"};
  bool plain_run = true;
  bool direct_only = false;    // no wsbridged: the direct legs alone
  std::string keep_logs;       // wsbridged's stderr goes here ("" = a temp file)
  int max_sessions = 10000;
  int io_threads = 2;  // wsbridged runtime.io_threads
  size_t msg_bytes = 64;       // JSON body of the round-trip probe
  size_t chunk_bytes = 4096;   // SDK payload of one DFX chunk
  size_t event_bytes = 256;    // fan-out result body (<= 512 B)
  int rt_samples = 5000;
  int warmup = 300;
  double step_seconds = 1.0;   // one fan-out rate step
  // --fanout-rate: one fixed rate (total deliveries/s) instead of the ladder, e.g. to
  // measure CPU per delivery at 100,000/s; --fanout-subscribers: which N to run.
  std::vector<double> fanout_rates;
  std::vector<int> fanout_subscribers;
  double dfx_seconds = 2.0;
};

std::string SelfExe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  return std::string(buf, static_cast<size_t>(n));
}

std::string Dir(const std::string& path) { return path.substr(0, path.rfind('/')); }

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "wsbridge-bench: " << what << "\n";
  KillAllChildren();
  std::exit(1);
}

template <typename T>
T Check(absl::StatusOr<T> v, const std::string& what) {
  if (!v.ok()) Die(absl::StrCat(what, ": ", v.status().ToString()));
  return *std::move(v);
}

void CheckOk(const absl::Status& st, const std::string& what) {
  if (!st.ok()) Die(absl::StrCat(what, ": ", st.ToString()));
}

// ---------------------------------------------------------------- processes

struct Pki {
  testing::TestPki pki;
  testing::CertAndKey ca, server;
  Pki() {
    ca = pki.MakeCa("wsbridge-bench CA");
    server = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  }
};

struct Upstream {
  Child child;
  std::string url;
};

std::unique_ptr<Upstream> StartUpstream(bool tls, const Pki& pki) {
  auto u = std::make_unique<Upstream>();
  std::vector<std::string> argv = {SelfExe(), "--upstream", "--listen", "127.0.0.1:0"};
  if (tls) {
    argv.insert(argv.end(), {"--tls-cert", pki.server.cert_file, "--tls-key", pki.server.key_file});
  }
  CheckOk(u->child.Spawn(argv), "spawn upstream");
  std::string line = Check(u->child.WaitForLine("\"upstream\"", seconds(20)), "upstream start");
  u->url = JsonField(line, "url");
  return u;
}

struct EchoServer {
  Child child;
  std::string target;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::EchoService::Stub> stub;
};

grpc::ChannelArguments ChannelArgs(int salt) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Distinct args keep channels from sharing one TCP connection.
  args.SetInt("wsbridge.bench.channel", salt);
  return args;
}

std::unique_ptr<EchoServer> StartEcho() {
  auto e = std::make_unique<EchoServer>();
  CheckOk(e->child.Spawn({SelfExe(), "--grpc-echo"}), "spawn grpc echo");
  std::string line = Check(e->child.WaitForLine("\"grpc-echo\"", seconds(20)), "grpc echo start");
  e->target = absl::StrCat("127.0.0.1:", JsonField(line, "port"));
  e->channel = grpc::CreateCustomChannel(e->target, grpc::InsecureChannelCredentials(), ChannelArgs(0));
  e->stub = v1::EchoService::NewStub(e->channel);
  return e;
}

struct Daemon {
  Child child;
  std::string target;
  std::string alloc_file;
  uint64_t alloc_seq = 0;  // last snapshot read from alloc_file
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<dfx::DfxService::Stub> stub;

  std::shared_ptr<grpc::Channel> NewChannel(int salt) const {
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), ChannelArgs(salt));
  }
  double Cpu() const { return ProcessCpuSeconds(child.pid()); }
  int64_t RssKiB() const { return ProcessRssKiB(child.pid()); }
};

struct DaemonSpec {
  std::string upstream_url;
  bool tls = false;
  std::string ca_file;
  bool preload_alloc = false;
};

std::unique_ptr<Daemon> StartDaemon(const Options& o, const DaemonSpec& spec, const testing::TempDir& dir) {
  static int n = 0;
  ++n;
  std::string yaml = absl::StrCat(
      "server:\n"
      "  listen: \"127.0.0.1:0\"\n"
      "  max_concurrent_streams: 100000\n"
      "log:\n"
      "  level: warn\n"
      "runtime:\n"
      "  io_threads: ", o.io_threads, "\n"
      "shutdown:\n"
      "  drain_timeout: 0s\n"
      "  deadline: 2s\n"
      "bridges:\n"
      "  - name: dfx\n"
      "    dfx:\n"
      "      upstream:\n"
      "        url: \"", spec.upstream_url, "\"\n",
      spec.tls ? absl::StrCat("        tls:\n          ca_file: \"", spec.ca_file, "\"\n")
               : std::string("        allow_plaintext: true\n"),
      "      device_token:\n"
      "        value: \"bench-device-token\"\n"
      "      allow_call_token: true\n"
      "      disable_pacing: true\n"
      "      idle_session_timeout: 24h\n"
      "      max_sessions: ", std::max(o.max_sessions, 1000) + 10, "\n"
      // The fan-out ladder feeds one subscription up to a million results a second: one
      // read of the upstream socket then brings hundreds at once (docs/operations.md).
      "      subscriber_queue: 4096\n");
  std::string cfg = dir.WriteFile(absl::StrCat("wsbridged-", n, ".yaml"), yaml);
  auto d = std::make_unique<Daemon>();
  std::vector<std::string> env;
  if (spec.preload_alloc) {
    d->alloc_file = absl::StrCat(dir.path(), "/alloc-", n, ".txt");
    env = {absl::StrCat("LD_PRELOAD=", o.alloc_lib), absl::StrCat("WSBRIDGE_ALLOC_FILE=", d->alloc_file)};
  }
  std::string log = absl::StrCat(dir.path(), "/wsbridged-", n, ".log");
  CheckOk(d->child.Spawn({o.wsbridged, "--config", cfg}, env, o.keep_logs.empty() ? log : o.keep_logs),
          "spawn wsbridged");
  std::string line = Check(d->child.WaitForLine("\"listening\"", seconds(30)), "wsbridged start");
  d->target = JsonField(line, "grpc");
  std::cerr << "  wsbridged pid " << d->child.pid() << " listening on " << d->target << "\n";
  d->channel = d->NewChannel(1000 + n);
  d->stub = dfx::DfxService::NewStub(d->channel);
  return d;
}

// Allocation counters of a daemon started with the preload library.
struct AllocSnapshot {
  uint64_t allocs = 0, bytes = 0;
};

AllocSnapshot ReadAllocs(Daemon& d) {
  kill(d.child.pid(), SIGUSR2);
  auto deadline = Clock::now() + seconds(5);
  while (Clock::now() < deadline) {
    std::ifstream f(d.alloc_file);
    uint64_t seq = 0, allocs = 0, frees = 0, bytes = 0;
    if (f >> seq >> allocs >> frees >> bytes; seq > d.alloc_seq) {
      d.alloc_seq = seq;
      return {allocs, bytes};
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
  Die("allocation counter did not answer (is the preload library loaded?)");
}

// ---------------------------------------------------------------- round trips

std::string RandomLetters(size_t n) {
  static uint64_t s = 0x9e3779b97f4a7c15ull;
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    out.push_back(static_cast<char>((s % 2 ? 'a' : 'A') + (s >> 8) % 26));
  }
  return out;
}

// A JSON body of exactly `size` bytes (>= 12).
std::string EchoBody(size_t size) {
  std::string body = "{\"Echo\":\"";
  size_t fill = size > body.size() + 2 ? size - body.size() - 2 : 0;
  body.append(fill, 'x');
  body.append("\"}");
  return body;
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

Latency Subtract(const Latency& a, const Latency& b, const Latency& c) {
  Latency r;
  r.p50_us = a.p50_us - b.p50_us - c.p50_us;
  r.p99_us = a.p99_us - b.p99_us - c.p99_us;
  r.p999_us = a.p999_us - b.p999_us - c.p999_us;
  r.mean_us = a.mean_us - b.mean_us - c.mean_us;
  return r;
}

struct Env {
  const Options& o;
  bool tls;
  Pki& pki;
  Upstream& upstream;
  EchoServer& echo;
  Daemon* daemon_ptr;  // null in --direct-only runs
  Daemon& daemon() const { return *daemon_ptr; }
  std::string ca_file() const { return tls ? pki.ca.cert_file : ""; }
};

std::unique_ptr<WsClient> Ws(const Env& e) {
  return Check(WsClient::Connect(e.upstream.url, e.ca_file()), "ws connect to upstream");
}

// Logs a direct WebSocket client in (the upstream wants 0718 first, like the real one).
std::unique_ptr<WsClient> WsLoggedIn(const Env& e) {
  auto ws = Ws(e);
  Check(ws->RoundTrip(absl::StrCat("0718", "0718", RandomLetters(6), "{\"Token\":\"direct\"}")),
        "direct login");
  return ws;
}

void GrpcEchoUnary(EchoServer& echo, const v1::EchoMessage& req) {
  grpc::ClientContext ctx;
  v1::EchoMessage resp;
  grpc::Status st = echo.stub->Echo(&ctx, req, &resp);
  if (!st.ok()) Die(absl::StrCat("grpc echo: ", st.error_message()));
}

void BridgeCall(dfx::DfxService::Stub& stub, const dfx::CallRequest& req, const char* token = nullptr) {
  grpc::ClientContext ctx;
  if (token) ctx.AddMetadata("x-dfx-device-token", token);
  dfx::CallResponse resp;
  grpc::Status st = stub.Call(&ctx, req, &resp);
  if (!st.ok()) Die(absl::StrCat("bridged Call: ", st.error_code(), " ", st.error_message()));
  if (resp.status() != 200) Die(absl::StrCat("bridged Call answered ", resp.status()));
}

json::object RoundTripSection(Env& e) {
  const Options& o = e.o;
  std::string body = EchoBody(o.msg_bytes);
  auto ws = WsLoggedIn(e);
  std::string frame = absl::StrCat("0100", "0100", RandomLetters(6), body);
  v1::EchoMessage msg;
  msg.set_payload(body);
  auto ctx = std::make_unique<grpc::ClientContext>();
  auto stream = e.echo.stub->EchoStream(ctx.get());
  dfx::CallRequest call;
  call.set_action_id("0100");
  call.set_json_body(body);

  std::vector<Latency> ws_runs, unary_runs, stream_runs, bridge_runs;
  std::vector<double> cpu_per_msg, bench_cpu_per_msg, up_cpu_per_msg, cs_per_msg;
  for (int run = 0; run < o.runs; ++run) {
    ws_runs.push_back(Summarize(Sample(o.warmup, o.rt_samples, [&] {
      Check(ws->RoundTrip(frame), "direct ws round trip");
    })));
    unary_runs.push_back(Summarize(Sample(o.warmup, o.rt_samples, [&] { GrpcEchoUnary(e.echo, msg); })));
    stream_runs.push_back(Summarize(Sample(o.warmup, o.rt_samples, [&] {
      v1::EchoMessage back;
      if (!stream->Write(msg) || !stream->Read(&back)) Die("grpc echo stream broke");
    })));
    if (!e.daemon_ptr) continue;
    for (int i = 0; i < o.warmup; ++i) BridgeCall(*e.daemon().stub, call);
    int64_t cs0 = ProcessContextSwitches(e.daemon().child.pid());
    double cpu0 = e.daemon().Cpu(), up0 = ProcessCpuSeconds(e.upstream.child.pid()), self0 = SelfCpuSeconds();
    bridge_runs.push_back(Summarize(Sample(0, o.rt_samples, [&] { BridgeCall(*e.daemon().stub, call); })));
    cpu_per_msg.push_back((e.daemon().Cpu() - cpu0) / o.rt_samples * 1e6);
    cs_per_msg.push_back(static_cast<double>(ProcessContextSwitches(e.daemon().child.pid()) - cs0) /
                         o.rt_samples);
    up_cpu_per_msg.push_back((ProcessCpuSeconds(e.upstream.child.pid()) - up0) / o.rt_samples * 1e6);
    bench_cpu_per_msg.push_back((SelfCpuSeconds() - self0) / o.rt_samples * 1e6);
  }
  stream->WritesDone();
  stream->Finish();
  Latency w = MedianOf(ws_runs), u = MedianOf(unary_runs), s = MedianOf(stream_runs),
          b = MedianOf(bridge_runs);
  if (!e.daemon_ptr) {
    return {{"message_bytes", o.msg_bytes}, {"runs", o.runs}, {"ws_direct", LatencyJson(w)},
            {"grpc_unary_direct", LatencyJson(u)}, {"grpc_stream_direct", LatencyJson(s)}};
  }
  return {
      {"message_bytes", o.msg_bytes},
      {"runs", o.runs},
      {"ws_direct", LatencyJson(w)},
      {"grpc_unary_direct", LatencyJson(u)},
      {"grpc_stream_direct", LatencyJson(s)},
      {"bridged_call", LatencyJson(b)},
      {"added_over_ws_plus_grpc_unary", LatencyJson(Subtract(b, w, u))},
      {"added_over_ws_plus_grpc_stream", LatencyJson(Subtract(b, w, s))},
      {"wsbridged_cpu_us_per_call", Median(cpu_per_msg)},
      {"wsbridged_context_switches_per_call", Median(cs_per_msg)},
      {"wsbridged_threads", ProcessThreads(e.daemon().child.pid())},
      {"upstream_cpu_us_per_call", Median(up_cpu_per_msg)},
      {"client_cpu_us_per_call", Median(bench_cpu_per_msg)},
  };
}

// ---------------------------------------------------------------- fan-out

// One gRPC subscriber; records publish-to-receive latency of events with the current tag.
// A message carries one or more results; each result is one delivery.
class Subscriber : public grpc::ClientReadReactor<dfx::SubscribeResultsResponse> {
 public:
  Subscriber(dfx::DfxService::Stub* stub, const std::string& mid) {
    req_.set_measurement_id(mid);
    stub->async()->SubscribeResults(&ctx_, &req_, this);
    StartRead(&msg_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    int64_t now = NowNs();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& r : msg_.results()) {
        const std::string& b = r.json_body();
        int64_t tag = std::atoll(JsonField(b, "tag").c_str());
        int64_t t = std::atoll(JsonField(b, "t").c_str());
        if (tag == tag_) latencies_.push_back(now - t);
        ++received_any_;
      }
      ++messages_;
    }
    StartRead(&msg_);
  }

  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    status_ = s;
    cv_.notify_all();
  }

  void SetTag(int64_t tag) {
    std::lock_guard<std::mutex> lock(mu_);
    tag_ = tag;
    latencies_.clear();
  }
  size_t received() {
    std::lock_guard<std::mutex> lock(mu_);
    return latencies_.size();
  }
  int64_t received_any() {
    std::lock_guard<std::mutex> lock(mu_);
    return received_any_;
  }
  int64_t messages() {
    std::lock_guard<std::mutex> lock(mu_);
    return messages_;
  }
  std::vector<int64_t> TakeLatencies() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(latencies_);
  }
  bool done() {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  std::string status_text() {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::StrCat(status_.error_code(), " ", status_.error_message());
  }
  void Cancel() {
    if (done()) return;
    ctx_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, seconds(10), [&] { return done_; });
  }

 private:
  grpc::ClientContext ctx_;
  dfx::SubscribeResultsRequest req_;
  dfx::SubscribeResultsResponse msg_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t tag_ = -1;
  int64_t received_any_ = 0;
  int64_t messages_ = 0;
  std::vector<int64_t> latencies_;
  bool done_ = false;
  grpc::Status status_;
};

bool WaitUntil(const std::function<bool()>& cond, Clock::duration timeout) {
  auto deadline = Clock::now() + timeout;
  while (!cond()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

struct FanoutStep {
  double deliveries_per_s = 0, achieved_per_s = 0, p99_ms = 0, p50_ms = 0, cpu_us_per_delivery = 0;
  double results_per_message = 0;  // how much the bridge batched (SubscribeResultsResponse)
  double cs_per_delivery = 0;       // wsbridged context switches
  // The other two processes on the machine: the bench upstream (publishing) and this one
  // (the subscribers' reading), so that a step the machine could not carry shows it.
  double upstream_cpu_us_per_delivery = 0, client_cpu_us_per_delivery = 0;
  std::string ended;                // status of a stream the bridge ended during the step
  bool pass = false;
};

json::array FanoutSection(Env& e) {
  const Options& o = e.o;
  auto control = WsLoggedIn(e);
  std::vector<int> ns = o.quick ? std::vector<int>{1, 10} : std::vector<int>{1, 10, 100};
  if (!o.fanout_subscribers.empty()) ns = o.fanout_subscribers;
  std::vector<double> ladder = o.quick ? std::vector<double>{2000}
                                       : std::vector<double>{10000, 25000, 50000, 75000, 100000,
                                                             150000, 200000, 300000, 400000,
                                                             500000, 750000, 1000000};
  if (!o.fanout_rates.empty()) ladder = o.fanout_rates;
  json::array out;
  static int64_t next_tag = 1;
  for (int n : ns) {
    std::string mid = absl::StrCat("fanout-", n, "-", e.tls ? "tls" : "plain");
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (int c = 0; c < std::min(n, 4); ++c) channels.push_back(e.daemon().NewChannel(c + 1));
    std::vector<std::unique_ptr<dfx::DfxService::Stub>> stubs;
    for (auto& ch : channels) stubs.push_back(dfx::DfxService::NewStub(ch));
    std::vector<std::unique_ptr<Subscriber>> subs(static_cast<size_t>(n));
    int ended = 0;
    std::string ended_status;
    // (Re)subscribes every stream that is not open (the bridge ends streams that fall
    // too far behind), then publishes slowly until every subscriber has seen an event,
    // so that all streams are attached before anything is measured.
    auto attach = [&] {
      for (int i = 0; i < n; ++i) {
        auto& sub = subs[static_cast<size_t>(i)];
        if (sub && sub->done()) {
          ++ended;
          ended_status = sub->status_text();
          sub.reset();
        }
        if (!sub) sub = std::make_unique<Subscriber>(stubs[static_cast<size_t>(i) % stubs.size()].get(), mid);
      }
      bool attached = WaitUntil([&] {
        Check(control->RoundTrip(absl::StrCat("9001", "9001", RandomLetters(6), "{\"mid\":\"", mid,
                                              "\",\"n\":3,\"rate\":1000,\"pad\":8,\"tag\":0}")),
              "publish");
        std::this_thread::sleep_for(milliseconds(20));
        for (auto& s : subs) {
          if (s->received_any() == 0) return false;
        }
        return true;
      }, seconds(30));
      if (!attached) Die(absl::StrCat("fan-out: not every one of ", n, " subscribers got an event"));
    };
    attach();

    std::vector<std::vector<FanoutStep>> per_run;
    for (int run = 0; run < o.runs; ++run) {
      std::vector<FanoutStep> steps;
      for (double d : ladder) {
        attach();
        int64_t tag = next_tag++;
        double rate = d / n;
        int64_t events = std::max<int64_t>(1, static_cast<int64_t>(rate * o.step_seconds));
        for (auto& s : subs) s->SetTag(tag);
        int64_t msgs0 = 0, res0 = 0;
        for (auto& s : subs) msgs0 += s->messages(), res0 += s->received_any();
        double cpu0 = e.daemon().Cpu();
        double up0 = ProcessCpuSeconds(e.upstream.child.pid()), self0 = SelfCpuSeconds();
        int64_t cs0 = ProcessContextSwitches(e.daemon().child.pid());
        auto t0 = Clock::now();
        Check(control->RoundTrip(absl::StrCat("9001", "9001", RandomLetters(6), "{\"mid\":\"", mid,
                                              "\",\"n\":", events, ",\"rate\":", static_cast<int64_t>(rate),
                                              ",\"pad\":", o.event_bytes, ",\"tag\":", tag, "}")),
              "publish");
        bool all = WaitUntil([&] {
          for (auto& s : subs) {
            if (static_cast<int64_t>(s->received()) < events) return false;
          }
          return true;
        }, std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.step_seconds * 2 + 2)));
        double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
        double cpu = e.daemon().Cpu() - cpu0;
        double up_cpu = ProcessCpuSeconds(e.upstream.child.pid()) - up0, self_cpu = SelfCpuSeconds() - self0;
        int64_t cs = ProcessContextSwitches(e.daemon().child.pid()) - cs0;
        int64_t msgs1 = 0, res1 = 0;
        for (auto& s : subs) msgs1 += s->messages(), res1 += s->received_any();
        std::vector<int64_t> lat;
        for (auto& s : subs) {
          auto l = s->TakeLatencies();
          lat.insert(lat.end(), l.begin(), l.end());
        }
        Latency sum = Summarize(lat);
        FanoutStep st;
        st.deliveries_per_s = d;
        st.achieved_per_s = static_cast<double>(lat.size()) / elapsed;
        st.p50_ms = sum.p50_us / 1000;
        st.p99_ms = sum.p99_us / 1000;
        st.cpu_us_per_delivery = lat.empty() ? 0 : cpu / static_cast<double>(lat.size()) * 1e6;
        st.results_per_message = msgs1 > msgs0 ? static_cast<double>(res1 - res0) / static_cast<double>(msgs1 - msgs0) : 0;
        st.cs_per_delivery = lat.empty() ? 0 : static_cast<double>(cs) / static_cast<double>(lat.size());
        if (!lat.empty()) {
          st.upstream_cpu_us_per_delivery = up_cpu / static_cast<double>(lat.size()) * 1e6;
          st.client_cpu_us_per_delivery = self_cpu / static_cast<double>(lat.size()) * 1e6;
        }
        for (auto& s : subs) {
          if (s->done()) st.ended = s->status_text();
        }
        st.pass = all && st.p99_ms < 10.0;
        steps.push_back(st);
        if (!st.pass) break;
        // Let queues drain between steps.
        std::this_thread::sleep_for(milliseconds(50));
      }
      per_run.push_back(steps);
    }
    // Per run: the best passing step. Median over runs of each figure.
    std::vector<double> best_rate, best_achieved, best_p99, best_cpu, best_batch;
    json::array runs_json;
    for (auto& steps : per_run) {
      FanoutStep best;
      json::array sj;
      for (auto& st : steps) {
        sj.push_back({{"target_deliveries_per_s", st.deliveries_per_s},
                      {"achieved_deliveries_per_s", st.achieved_per_s},
                      {"p50_ms", st.p50_ms}, {"p99_ms", st.p99_ms},
                      {"cpu_us_per_delivery", st.cpu_us_per_delivery},
                      {"results_per_message", st.results_per_message},
                      {"context_switches_per_delivery", st.cs_per_delivery},
                      {"upstream_cpu_us_per_delivery", st.upstream_cpu_us_per_delivery},
                      {"client_cpu_us_per_delivery", st.client_cpu_us_per_delivery},
                      {"stream_ended", st.ended}, {"pass", st.pass}});
        if (st.pass) best = st;
      }
      runs_json.push_back(std::move(sj));
      best_rate.push_back(best.deliveries_per_s);
      best_achieved.push_back(best.achieved_per_s);
      best_p99.push_back(best.p99_ms);
      best_cpu.push_back(best.cpu_us_per_delivery);
      best_batch.push_back(best.results_per_message);
    }
    out.push_back({{"subscribers", n},
                   {"event_bytes", o.event_bytes},
                   {"max_sustained_deliveries_per_s", Median(best_rate)},
                   {"max_sustained_events_per_s", Median(best_rate) / n},
                   {"achieved_deliveries_per_s", Median(best_achieved)},
                   {"p99_ms_at_max", Median(best_p99)},
                   {"wsbridged_cpu_us_per_delivery", Median(best_cpu)},
                   {"results_per_message_at_max", Median(best_batch)},
                   {"streams_ended_by_bridge", ended},
                   {"last_end_status", ended_status},
                   {"ladder_capped", !per_run.empty() && !per_run[0].empty() && per_run[0].back().pass},
                   {"steps", std::move(runs_json)}});
    for (auto& s : subs) s->Cancel();
  }
  return out;
}

// ---------------------------------------------------------------- DFX pipeline

std::string Base64(std::string_view in) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += k[v >> 18], out += k[(v >> 12) & 63], out += k[(v >> 6) & 63], out += k[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    out += k[v >> 18], out += k[(v >> 12) & 63], out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8);
    out += k[v >> 18], out += k[(v >> 12) & 63], out += k[(v >> 6) & 63], out += '=';
  }
  return out;
}

// Emulator SDK chunk: "WSBE" | u32 LE order | u32 LE duration_ms | body.
std::string SdkChunk(uint32_t order, uint32_t duration_ms, size_t body) {
  std::string s = "WSBE";
  for (uint32_t v : {order, duration_ms}) {
    for (int b = 0; b < 4; ++b) s.push_back(static_cast<char>((v >> (8 * b)) & 0xff));
  }
  s.append(body, 'c');
  return s;
}

struct DfxRun {
  double chunks_per_s = 0, cpu_us_per_chunk = 0, cs_per_chunk = 0;
  Latency rtt;
};

DfxRun StreamChunks(Env& e, double seconds_budget, int max_chunks) {
  grpc::ClientContext ctx;
  auto stream = e.daemon().stub->StreamMeasurement(&ctx);
  std::vector<int64_t> rtt;
  double cpu0 = e.daemon().Cpu();
  int64_t cs0 = ProcessContextSwitches(e.daemon().child.pid());
  auto t0 = Clock::now();
  auto until = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds_budget));
  dfx::MeasurementChunk chunk;
  dfx::MeasurementEvent ev;
  int i = 0;
  for (; i < max_chunks && Clock::now() < until; ++i) {
    chunk.Clear();
    if (i == 0) {
      chunk.set_measurement_id("bench-measurement");
      chunk.set_stage(dfx::STAGE_FIRST);
    } else {
      chunk.set_stage(dfx::STAGE_CHUNK);
    }
    chunk.set_ignore(true);
    chunk.set_duration_ms(1000);
    chunk.set_payload(SdkChunk(static_cast<uint32_t>(i), 1000, e.o.chunk_bytes));
    int64_t s = NowNs();
    if (!stream->Write(chunk)) Die("StreamMeasurement: write failed");
    while (true) {
      if (!stream->Read(&ev)) {
        grpc::Status st = stream->Finish();
        Die(absl::StrCat("StreamMeasurement ended: ", st.error_code(), " ", st.error_message()));
      }
      if (ev.has_chunk_accepted()) break;
    }
    rtt.push_back(NowNs() - s);
  }
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  DfxRun r;
  r.chunks_per_s = i / elapsed;
  r.cpu_us_per_chunk = (e.daemon().Cpu() - cpu0) / i * 1e6;
  r.cs_per_chunk = static_cast<double>(ProcessContextSwitches(e.daemon().child.pid()) - cs0) / i;
  stream->WritesDone();
  ctx.TryCancel();
  stream->Finish();
  r.rtt = Summarize(rtt);
  return r;
}

json::object DfxSection(Env& e) {
  const Options& o = e.o;
  std::string payload = SdkChunk(1, 1000, o.chunk_bytes);
  std::string frame = absl::StrCat("0506", "0506", RandomLetters(6),
                                   "{\"Params\":{\"ID\":\"bench-measurement\"},\"Action\":\"CHUNK::IGNORE\",\"Payload\":\"",
                                   Base64(payload), "\"}");
  auto ws = WsLoggedIn(e);
  v1::EchoMessage msg;
  msg.set_payload(payload);
  grpc::ClientContext ctx;
  auto stream = e.echo.stub->EchoStream(&ctx);
  int samples = std::max(50, o.rt_samples / 5);
  std::vector<Latency> ws_runs, grpc_runs;
  std::vector<DfxRun> runs;
  for (int run = 0; run < o.runs; ++run) {
    ws_runs.push_back(Summarize(Sample(o.warmup / 3, samples, [&] { Check(ws->RoundTrip(frame), "ws 0506"); })));
    grpc_runs.push_back(Summarize(Sample(o.warmup / 3, samples, [&] {
      v1::EchoMessage back;
      if (!stream->Write(msg) || !stream->Read(&back)) Die("grpc echo stream broke");
    })));
    StreamChunks(e, 0.2, o.warmup);  // warm-up
    runs.push_back(StreamChunks(e, o.dfx_seconds, 1 << 30));
  }
  stream->WritesDone();
  stream->Finish();
  std::vector<double> rate, cpu, cs;
  std::vector<Latency> rtts;
  for (auto& r : runs) {
    rate.push_back(r.chunks_per_s);
    cpu.push_back(r.cpu_us_per_chunk);
    cs.push_back(r.cs_per_chunk);
    rtts.push_back(r.rtt);
  }
  Latency w = MedianOf(ws_runs), g = MedianOf(grpc_runs), b = MedianOf(rtts);
  double share = b.p50_us > 0 ? (b.p50_us - w.p50_us - g.p50_us) / b.p50_us : 0;
  return {{"chunk_payload_bytes", o.chunk_bytes},
          {"chunks_per_s", Median(rate)},
          {"wsbridged_cpu_us_per_chunk", Median(cpu)},
          {"wsbridged_context_switches_per_chunk", Median(cs)},
          {"bridged_chunk_rtt", LatencyJson(b)},
          {"ws_direct_0506_rtt", LatencyJson(w)},
          {"grpc_stream_direct_rtt", LatencyJson(g)},
          {"bridge_share_of_rtt_p50", share}};
}

// ---------------------------------------------------------------- sessions

// Opens sessions [from, to) by calling with a distinct device token each, `window`
// calls in flight. Returns seconds taken.
double OpenSessions(Daemon& d, int from, int to, int window) {
  dfx::CallRequest req;
  req.set_action_id("0100");
  req.set_json_body("{}");
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, failed = 0;
  std::string first_error;
  auto t0 = Clock::now();
  struct Call {
    grpc::ClientContext ctx;
    dfx::CallResponse resp;
  };
  for (int i = from; i < to; ++i) {
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return in_flight < window; });
      ++in_flight;
    }
    auto* c = new Call;
    c->ctx.AddMetadata("x-dfx-device-token", absl::StrCat("bench-session-token-", i));
    c->ctx.set_deadline(std::chrono::system_clock::now() + seconds(60));
    d.stub->async()->Call(&c->ctx, &req, &c->resp, [&, c](grpc::Status st) {
      std::lock_guard<std::mutex> lock(mu);
      if (!st.ok() && failed++ == 0) first_error = absl::StrCat(st.error_code(), " ", st.error_message());
      --in_flight;
      delete c;
      cv.notify_all();
    });
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return in_flight == 0; });
  if (failed) Die(absl::StrCat("opening sessions: ", failed, " calls failed, first: ", first_error));
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int64_t UpstreamStat(WsClient& control, const std::string& key) {
  std::string r = Check(control.RoundTrip(absl::StrCat("9003", "9003", RandomLetters(6), "{}")), "stats");
  return std::atoll(JsonField(r, key).c_str());
}

// RSS once idle: the lowest reading over 6 s, which covers one period of wsbridged's
// default runtime.memory_trim_interval (5 s), when freed heap goes back to the kernel.
int64_t SettledRss(const Daemon& d) {
  int64_t best = INT64_MAX;
  for (int i = 0; i < 12; ++i) {
    std::this_thread::sleep_for(milliseconds(500));
    best = std::min(best, d.RssKiB());
  }
  return best;
}

json::object SessionsSection(Env& e, const testing::TempDir& dir) {
  const Options& o = e.o;
  // A daemon of its own: the session count must not be disturbed by other sections.
  auto d = StartDaemon(o, {e.upstream.url, e.tls, e.ca_file(), false}, dir);
  auto control = WsLoggedIn(e);
  dfx::CallRequest req;
  req.set_action_id("0100");
  req.set_json_body("{}");
  BridgeCall(*d->stub, req);  // the default-token session
  int64_t base_rss = SettledRss(*d);
  int64_t base_conns = UpstreamStat(*control, "conns");
  std::vector<int> targets = o.quick ? std::vector<int>{20} : std::vector<int>{1000, o.max_sessions};
  json::array levels;
  int open = 0;
  double establish_1000 = 0, reestablish = -1;
  int reestablish_n = 0;
  for (int target : targets) {
    if (target <= open) continue;
    double secs = OpenSessions(*d, open, target, 256);
    if (open == 0) establish_1000 = secs;
    open = target;
    int64_t rss = SettledRss(*d);
    int64_t conns = UpstreamStat(*control, "conns") - base_conns;
    levels.push_back({{"sessions", target},
                      {"upstream_connections", conns},
                      {"open_seconds", secs},
                      {"rss_kib", rss},
                      {"rss_kib_per_session", static_cast<double>(rss - base_rss) / target}});
    if (reestablish < 0) {
      // Re-establish: the upstream drops every connection; count logins until every
      // session has logged in again.
      int64_t logins0 = UpstreamStat(*control, "logins");
      auto t0 = Clock::now();
      Check(control->RoundTrip(absl::StrCat("9002", "9002", RandomLetters(6), "{}")), "drop");
      int64_t want = target + 1;  // + the default-token session
      bool ok = WaitUntil([&] {
        std::this_thread::sleep_for(milliseconds(10));
        return UpstreamStat(*control, "logins") - logins0 >= want;
      }, seconds(120));
      reestablish = std::chrono::duration<double>(Clock::now() - t0).count();
      reestablish_n = static_cast<int>(UpstreamStat(*control, "logins") - logins0);
      if (!ok) reestablish = -1;
    }
  }
  json::object out{{"tls", e.tls},
                   {"baseline_rss_kib", base_rss},
                   {"levels", std::move(levels)},
                   {"establish_seconds", establish_1000},
                   {"establish_sessions", targets[0]},
                   {"reestablish_seconds", reestablish},
                   {"reestablished_sessions", reestablish_n}};
  d->child.Stop();
  return out;
}

// ---------------------------------------------------------------- allocations

json::object AllocSection(Env& e, const testing::TempDir& dir) {
  const Options& o = e.o;
  auto d = StartDaemon(o, {e.upstream.url, e.tls, e.ca_file(), true}, dir);
  Env e2{o, e.tls, e.pki, e.upstream, e.echo, d.get()};
  dfx::CallRequest call;
  call.set_action_id("0100");
  call.set_json_body(EchoBody(o.msg_bytes));
  int n = o.quick ? 100 : 5000;
  for (int i = 0; i < o.warmup; ++i) BridgeCall(*d->stub, call);
  AllocSnapshot a0 = ReadAllocs(*d);
  for (int i = 0; i < n; ++i) BridgeCall(*d->stub, call);
  AllocSnapshot a1 = ReadAllocs(*d);

  StreamChunks(e2, 0.2, o.warmup);
  AllocSnapshot c0 = ReadAllocs(*d);
  int chunks = o.quick ? 50 : 2000;
  StreamChunks(e2, 60, chunks);
  AllocSnapshot c1 = ReadAllocs(*d);

  // Fan-out: 10 subscribers, a fixed number of events.
  auto control = WsLoggedIn(e2);
  std::string mid = "alloc-fanout";
  std::vector<std::unique_ptr<Subscriber>> subs;
  for (int i = 0; i < 10; ++i) subs.push_back(std::make_unique<Subscriber>(d->stub.get(), mid));
  bool attached = WaitUntil([&] {
    Check(control->RoundTrip(absl::StrCat("9001", "9001", RandomLetters(6), "{\"mid\":\"", mid,
                                          "\",\"n\":2,\"rate\":1000,\"pad\":8,\"tag\":0}")), "publish");
    std::this_thread::sleep_for(milliseconds(20));
    for (auto& s : subs) if (s->received_any() == 0) return false;
    return true;
  }, seconds(30));
  if (!attached) Die("alloc fan-out: subscribers not attached");
  int events = o.quick ? 50 : 2000;
  for (auto& s : subs) s->SetTag(99);
  AllocSnapshot f0 = ReadAllocs(*d);
  Check(control->RoundTrip(absl::StrCat("9001", "9001", RandomLetters(6), "{\"mid\":\"", mid, "\",\"n\":", events,
                                        ",\"rate\":5000,\"pad\":", o.event_bytes, ",\"tag\":99}")), "publish");
  WaitUntil([&] {
    for (auto& s : subs) if (static_cast<int>(s->received()) < events) return false;
    return true;
  }, seconds(30));
  AllocSnapshot f1 = ReadAllocs(*d);
  int64_t delivered = 0;
  for (auto& s : subs) delivered += static_cast<int64_t>(s->received()), s->Cancel();
  d->child.Stop();
  auto per = [](AllocSnapshot a, AllocSnapshot b, double n) {
    return json::object{{"allocs_per_message", static_cast<double>(b.allocs - a.allocs) / n},
                        {"bytes_per_message", static_cast<double>(b.bytes - a.bytes) / n},
                        {"messages", n}};
  };
  return {{"method", "LD_PRELOAD counter (bench/alloc_count.c) around a phase, SIGUSR2 snapshots"},
          {"bridged_call", per(a0, a1, n)},
          {"dfx_chunk", per(c0, c1, chunks)},
          {"fanout_event_10_subscribers", per(f0, f1, static_cast<double>(events))},
          {"fanout_deliveries", delivered}};
}

// ---------------------------------------------------------------- output

double Num(const json::value& v) {
  if (v.is_double()) return v.as_double();
  if (v.is_int64()) return static_cast<double>(v.as_int64());
  if (v.is_uint64()) return static_cast<double>(v.as_uint64());
  return 0;
}

const json::value* Find(const json::value& root, std::initializer_list<const char*> path) {
  const json::value* v = &root;
  for (const char* k : path) {
    if (!v->is_object()) return nullptr;
    auto* next = v->as_object().if_contains(k);
    if (!next) return nullptr;
    v = next;
  }
  return v;
}

void PrintTable(const json::object& result) {
  auto& m = result.at("machine").as_object();
  std::printf("\nwsbridge-bench  |  %s  |  %d cores  |  %s  |  %s  |  %s build\n",
              json::value_to<std::string>(m.at("cpu_model")).c_str(), static_cast<int>(Num(m.at("cores"))),
              json::value_to<std::string>(m.at("kernel")).c_str(),
              json::value_to<std::string>(m.at("compiler")).c_str(),
              json::value_to<std::string>(m.at("build_type")).c_str());
  for (auto& runv : result.at("runs").as_array()) {
    const json::value& run = runv;
    bool tls = run.at("upstream_tls").as_bool();
    std::printf("\n== upstream %s ==\n", tls ? "TLS (wss)" : "plaintext (ws)");
    if (auto* rt = Find(run, {"round_trip"})) {
      std::printf("\n1. Round trip (%d B body, median of %d runs)        p50 us    p99 us  p99.9 us\n",
                  static_cast<int>(Num(rt->at("message_bytes"))), static_cast<int>(Num(rt->at("runs"))));
      for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
               {"ws_direct", "direct WebSocket echo"},
               {"grpc_unary_direct", "direct gRPC unary echo"},
               {"grpc_stream_direct", "direct gRPC streaming echo"},
               {"bridged_call", "bridged Call (gRPC->wsbridged->upstream)"},
               {"added_over_ws_plus_grpc_unary", "added over ws + gRPC unary"},
               {"added_over_ws_plus_grpc_stream", "added over ws + gRPC stream"}}) {
        if (!rt->as_object().contains(key)) continue;
        auto& l = rt->at(key);
        std::printf("   %-46s %9.1f %9.1f %9.1f\n", label, Num(l.at("p50_us")), Num(l.at("p99_us")),
                    Num(l.at("p999_us")));
      }
      if (rt->as_object().contains("wsbridged_cpu_us_per_call"))
      std::printf("   wsbridged per bridged call: CPU %.1f us, %.1f context switches (%d threads);"
                  " upstream CPU %.1f us, client CPU %.1f us\n",
                  Num(rt->at("wsbridged_cpu_us_per_call")), Num(rt->at("wsbridged_context_switches_per_call")),
                  static_cast<int>(Num(rt->at("wsbridged_threads"))), Num(rt->at("upstream_cpu_us_per_call")),
                  Num(rt->at("client_cpu_us_per_call")));
    }
    if (auto* fo = Find(run, {"fanout"})) {
      std::printf("\n2. Fan-out (one upstream subscription, p99 publish->receive < 10 ms)\n");
      std::printf("   %-12s %16s %14s %10s %18s\n", "subscribers", "deliveries/s", "events/s", "p99 ms",
                  "CPU us/delivery  results/msg");
      for (auto& f : fo->as_array()) {
        std::printf("   %-12d %15.0f%s %14.0f %10.2f %18.2f %12.1f\n", static_cast<int>(Num(f.at("subscribers"))),
                    Num(f.at("max_sustained_deliveries_per_s")), f.at("ladder_capped").as_bool() ? "+" : " ",
                    Num(f.at("max_sustained_events_per_s")), Num(f.at("p99_ms_at_max")),
                    Num(f.at("wsbridged_cpu_us_per_delivery")), Num(f.at("results_per_message_at_max")));
      }
    }
    if (auto* d = Find(run, {"dfx"})) {
      std::printf("\n3. DFX StreamMeasurement, pacing off (%d B chunks)\n",
                  static_cast<int>(Num(d->at("chunk_payload_bytes"))));
      std::printf("   chunks/s %.0f | chunk RTT p50 %.1f us p99 %.1f us | direct ws %.1f + grpc %.1f us p50"
                  " | bridge share %.0f%% | CPU %.1f us/chunk | %.2f context switches/chunk\n",
                  Num(d->at("chunks_per_s")), Num(d->at("bridged_chunk_rtt").at("p50_us")),
                  Num(d->at("bridged_chunk_rtt").at("p99_us")), Num(d->at("ws_direct_0506_rtt").at("p50_us")),
                  Num(d->at("grpc_stream_direct_rtt").at("p50_us")), Num(d->at("bridge_share_of_rtt_p50")) * 100,
                  Num(d->at("wsbridged_cpu_us_per_chunk")), Num(d->at("wsbridged_context_switches_per_chunk")));
    }
    if (auto* s = Find(run, {"sessions"})) {
      std::printf("\n4. Idle upstream sessions (%s)\n", s->at("tls").as_bool() ? "TLS" : "plain");
      for (auto& l : s->at("levels").as_array()) {
        std::printf("   %6d sessions: RSS %.0f MiB, %.1f KiB/session (opened in %.2f s)\n",
                    static_cast<int>(Num(l.at("sessions"))), Num(l.at("rss_kib")) / 1024,
                    Num(l.at("rss_kib_per_session")), Num(l.at("open_seconds")));
      }
      std::printf("   establish %d sessions: %.2f s; re-establish after upstream drop: %.2f s (%d logins)\n",
                  static_cast<int>(Num(s->at("establish_sessions"))), Num(s->at("establish_seconds")),
                  Num(s->at("reestablish_seconds")), static_cast<int>(Num(s->at("reestablished_sessions"))));
    }
    if (auto* em = Find(run, {"emogg"})) PrintEmoggTable(*em);
    if (auto* n = Find(run, {"nlx"})) PrintNlxTable(*n);
    if (auto* nx = Find(run, {"nexora"})) PrintNexoraTable(*nx);
    if (auto* tp = Find(run, {"throughput"})) PrintThroughputTable(*tp);
    if (auto* a = Find(run, {"allocations"})) {
      std::printf("\n5. Heap allocations in wsbridged (LD_PRELOAD counter)\n");
      for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
               {"bridged_call", "per bridged Call"},
               {"dfx_chunk", "per DFX chunk"},
               {"fanout_event_10_subscribers", "per event, 10 subscribers"}}) {
        std::printf("   %-28s %8.1f allocs %10.0f bytes\n", label, Num(a->at(key).at("allocs_per_message")),
                    Num(a->at(key).at("bytes_per_message")));
      }
    }
  }
  std::printf("\n");
}

// ---------------------------------------------------------------- main

int RunBench(const Options& o) {
  uint64_t fds = RaiseFdLimit();
  signal(SIGPIPE, SIG_IGN);
  Machine m = DescribeMachine();
  json::object result;
  result["tool"] = "wsbridge-bench";
  result["machine"] = {{"cpu_model", m.cpu_model}, {"cores", m.cores}, {"kernel", m.kernel},
                       {"compiler", m.compiler}, {"build_type", m.build_type},
                       {"mem_total_kib", m.mem_total_kib}, {"fd_limit", fds}};
  result["settings"] = {{"quick", o.quick}, {"runs", o.runs}, {"round_trip_samples", o.rt_samples},
                        {"message_bytes", o.msg_bytes}, {"chunk_bytes", o.chunk_bytes},
                        {"event_bytes", o.event_bytes}, {"wsbridged", o.wsbridged},
                        {"wsbridged_io_threads", o.io_threads}};
  result["targets"] = {{"added_p50_us", 50}, {"added_p99_us", 250},
                       {"fanout_deliveries_per_s", 100000}, {"rss_kib_per_idle_tls_session", 32}};
  Pki pki;
  testing::TempDir dir;
  auto echo = StartEcho();
  json::array runs;
  for (bool tls : {true, false}) {
    if (!tls && !o.plain_run) continue;
    std::cerr << "wsbridge-bench: upstream " << (tls ? "TLS" : "plaintext") << " run\n";
    auto up = StartUpstream(tls, pki);
    std::unique_ptr<Daemon> d;
    if (!o.direct_only) d = StartDaemon(o, {up->url, tls, pki.ca.cert_file, false}, dir);
    Env e{o, tls, pki, *up, *echo, d.get()};
    json::object run{{"upstream_tls", tls}};
    if (o.direct_only) {
      run["round_trip"] = RoundTripSection(e);
      runs.push_back(std::move(run));
      up->child.Stop();
      continue;
    }
    auto want = [&](const char* s) { return o.sections.count(s) > 0; };
    if (want("rt")) {
      std::cerr << "  round trips\n";
      run["round_trip"] = RoundTripSection(e);
    }
    // The plaintext run repeats what TLS changes most: round trips and session memory.
    if (tls && want("throughput")) {  // bench/throughput_section.cc
      std::cerr << "  throughput\n";
      run["throughput"] = ThroughputSection({.quick = o.quick, .runs = o.runs, .body = EchoBody(o.msg_bytes),
                                             .daemon_target = d->target, .daemon_pid = d->child.pid(),
                                             .echo_target = echo->target, .echo_pid = echo->child.pid(),
                                             .upstream_url = up->url, .upstream_pid = up->child.pid(),
                                             .ca_file = pki.ca.cert_file});
    }
    if (tls && want("fanout")) {
      std::cerr << "  fan-out\n";
      run["fanout"] = FanoutSection(e);
    }
    if (tls && want("dfx")) {
      std::cerr << "  DFX pipeline\n";
      run["dfx"] = DfxSection(e);
    }
    if (tls && want("emogg")) {  // its own emulator and wsbridged (bench/emogg_section.cc)
      std::cerr << "  Emogg\n";
      run["emogg"] = EmoggSection({.quick = o.quick, .runs = o.runs, .rt_samples = o.rt_samples,
                                   .warmup = o.warmup, .io_threads = o.io_threads, .wsbridged = o.wsbridged,
                                   .emulator = WSBRIDGE_BENCH_EMULATOR, .cert_file = pki.server.cert_file,
                                   .key_file = pki.server.key_file, .ca_file = pki.ca.cert_file,
                                   .daemon_log = o.keep_logs},
                                  *echo->stub);
    }
    if (tls && want("nlx")) {  // its own emulator and wsbridged (bench/nlx_section.cc)
      std::cerr << "  NLX\n";
      run["nlx"] = NlxSection({.quick = o.quick, .runs = o.runs, .samples = std::max(50, o.rt_samples / 5),
                               .warmup = o.warmup / 3, .wsbridged = o.wsbridged, .io_threads = o.io_threads,
                               .work_dir = dir.path(), .log_file = o.keep_logs, .tls = true,
                               .ca_file = pki.ca.cert_file, .cert_file = pki.server.cert_file,
                               .key_file = pki.server.key_file, .echo = echo->stub.get(),
                               .conversations = o.quick ? 20 : 1000});
    }
    if (tls && want("nexora")) {  // its own emulator and wsbridged (bench/nexora_section.cc)
      std::cerr << "  Nexora\n";
      run["nexora"] = NexoraSection({.quick = o.quick, .runs = o.runs, .wsbridged = o.wsbridged, .tls = true,
                                     .ca_file = pki.ca.cert_file, .cert_file = pki.server.cert_file,
                                     .key_file = pki.server.key_file, .work_dir = dir.path(),
                                     .keep_logs = o.keep_logs, .io_threads = o.io_threads});
    }
    run["wsbridged_rss_kib_after"] = d->RssKiB();
    d->child.Stop();
    if (want("sessions")) {
      std::cerr << "  sessions\n";
      run["sessions"] = SessionsSection(e, dir);
    }
    if (want("alloc") && !o.alloc_lib.empty()) {
      std::cerr << "  allocations\n";
      run["allocations"] = AllocSection(e, dir);
    }
    runs.push_back(std::move(run));
    up->child.Stop();
  }
  echo->child.Stop();
  result["runs"] = std::move(runs);
  PrintTable(result);
  std::ofstream f(o.json_out);
  f << json::serialize(result) << "\n";
  if (!f) Die(absl::StrCat("cannot write ", o.json_out));
  std::cerr << "wsbridge-bench: wrote " << o.json_out << "\n";
  return 0;
}

constexpr const char* kUsage =
    R"(Usage: wsbridge-bench [--quick] [--runs N] [--json FILE] [--wsbridged PATH]
                      [--alloc-lib PATH] [--sections rt,fanout,dfx,sessions,alloc,emogg,nlx,nexora,throughput]
                      [--no-plain] [--max-sessions N] [--io-threads N] [--direct-only]
                      [--daemon-log FILE] [--fanout-rate D[,D...]] [--fanout-subscribers N[,N...]]
                      [--step-seconds S]

Measures wsbridged against a direct WebSocket round trip plus a direct gRPC round
trip, on loopback, with the upstream over TLS (and a round-trip run without it).
Prints a table and writes JSON (default bench-results.json). --quick: tiny counts, for
smoke tests; its figures mean nothing. --direct-only: only the direct legs (no
wsbridged), i.e. the floor the bridge is measured against. --fanout-rate: the fan-out
section runs these total deliveries/s instead of its ladder (each for --step-seconds,
default 1), e.g. `--sections fanout --fanout-rate 100000 --fanout-subscribers 10,100
--step-seconds 5` for the CPU per delivery at a fixed rate.
)";

}  // namespace
}  // namespace wsbridge::bench

int main(int argc, char** argv) {
  using namespace wsbridge::bench;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--upstream") return RunUpstream(args);
  if (!args.empty() && args[0] == "--grpc-echo") return RunGrpcEcho(args);
  if (!args.empty() && args[0] == "--nexora-upstream") return RunNexoraUpstream(args);
  Options o;
  std::string exe_dir = Dir(SelfExe());
#ifdef WSBRIDGE_BENCH_WSBRIDGED
  o.wsbridged = WSBRIDGE_BENCH_WSBRIDGED;
#endif
#ifdef WSBRIDGE_BENCH_ALLOC_LIB
  o.alloc_lib = WSBRIDGE_BENCH_ALLOC_LIB;
#endif
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= args.size()) {
        std::cerr << a << " needs a value\n" << kUsage;
        std::exit(2);
      }
      return args[++i];
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--runs") {
      o.runs = std::max(1, std::stoi(next()));
    } else if (a == "--json") {
      o.json_out = next();
    } else if (a == "--wsbridged") {
      o.wsbridged = next();
    } else if (a == "--alloc-lib") {
      o.alloc_lib = next();
    } else if (a == "--sections") {
      o.sections.clear();
      for (auto s : absl::StrSplit(next(), ',')) o.sections.insert(std::string(s));
    } else if (a == "--daemon-log") {
      o.keep_logs = next();
    } else if (a == "--direct-only") {
      o.direct_only = true;
    } else if (a == "--no-plain") {
      o.plain_run = false;
    } else if (a == "--io-threads") {
      o.io_threads = std::clamp(std::stoi(next()), 1, 256);
    } else if (a == "--max-sessions") {
      o.max_sessions = std::max(1000, std::stoi(next()));
    } else if (a == "--fanout-rate") {
      for (auto r : absl::StrSplit(next(), ',')) o.fanout_rates.push_back(std::stod(std::string(r)));
    } else if (a == "--fanout-subscribers") {
      for (auto n : absl::StrSplit(next(), ',')) o.fanout_subscribers.push_back(std::max(1, std::stoi(std::string(n))));
    } else if (a == "--step-seconds") {
      o.step_seconds = std::max(0.1, std::stod(next()));
    } else if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    } else {
      std::cerr << "unknown argument \"" << a << "\"\n" << kUsage;
      return 2;
    }
  }
  if (o.quick) {
    o.runs = 1;
    o.rt_samples = 50;
    o.warmup = 10;
    o.step_seconds = 0.1;
    o.dfx_seconds = 0.1;
  }
  if (!o.direct_only && (o.wsbridged.empty() || access(o.wsbridged.c_str(), X_OK) != 0)) {
    std::cerr << "wsbridge-bench: wsbridged not found at \"" << o.wsbridged << "\"; pass --wsbridged PATH\n";
    return 2;
  }
  return RunBench(o);
}
