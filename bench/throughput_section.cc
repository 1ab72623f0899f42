#include "bench/throughput_section.h"

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <deque>
#include <future>
#include <iostream>
#include <memory>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench_echo.grpc.pb.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::bench {
namespace {

namespace json = boost::json;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace dfx = wsbridge::dfx::v1;
using tcp = asio::ip::tcp;

constexpr int kChannels = 4;       // separate HTTP/2 connections
constexpr int kClientThreads = 2;  // each with its own completion queue
// Open loop: calls in flight beyond this wait for a completion (their latency still counts
// from the scheduled time). Below the bridge's per-session limit of pending requests.
constexpr int64_t kMaxOpenLoopInFlight = 2048;

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "wsbridge-bench: throughput: " << what << "\n";
  KillAllChildren();
  std::exit(1);
}

int64_t ThreadCpuNs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// What one phase of one leg measured.
struct Phase {
  int64_t calls = 0;   // answered with success
  int64_t errors = 0;
  std::string first_error;
  double seconds = 0;  // first send to last answer
  std::vector<int64_t> latencies_ns;
  std::vector<int64_t> send_lag_ns;  // open loop: actual send - scheduled send
  double rate() const { return seconds > 0 ? static_cast<double>(calls) / seconds : 0; }
};

// ---------------------------------------------------------------- gRPC generator

// The two unary RPCs the generator drives.
struct BridgedCall {
  using Stub = dfx::DfxService::Stub;
  using Request = dfx::CallRequest;
  using Response = dfx::CallResponse;
  static auto NewStub(std::shared_ptr<grpc::Channel> ch) { return dfx::DfxService::NewStub(std::move(ch)); }
  static auto Start(Stub& s, grpc::ClientContext* ctx, const Request& r, grpc::CompletionQueue* cq) {
    return s.PrepareAsyncCall(ctx, r, cq);
  }
  static bool Ok(const Response& r) { return r.status() == 200; }
  static std::string Describe(const Response& r) { return absl::StrCat("upstream status ", r.status()); }
};

struct EchoCall {
  using Stub = v1::EchoService::Stub;
  using Request = v1::EchoMessage;
  using Response = v1::EchoMessage;
  static auto NewStub(std::shared_ptr<grpc::Channel> ch) { return v1::EchoService::NewStub(std::move(ch)); }
  static auto Start(Stub& s, grpc::ClientContext* ctx, const Request& r, grpc::CompletionQueue* cq) {
    return s.PrepareAsyncEcho(ctx, r, cq);
  }
  static bool Ok(const Response&) { return true; }
  static std::string Describe(const Response&) { return ""; }
};

template <typename Rpc>
class GrpcLoad {
 public:
  GrpcLoad(const std::string& target, typename Rpc::Request request) : request_(std::move(request)) {
    for (int c = 0; c < kChannels; ++c) {
      grpc::ChannelArguments args;
      // Distinct args keep channels from sharing one TCP connection.
      args.SetInt("wsbridge.bench.throughput_channel", c);
      stubs_.push_back(Rpc::NewStub(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args)));
    }
  }

  // Closed loop: `concurrency` calls in flight, each answer starts the next call, until
  // `seconds` have passed.
  Phase MaxThroughput(int concurrency, double seconds) {
    int workers = std::min(kClientThreads, concurrency);
    std::vector<Worker> w(static_cast<size_t>(workers));
    int64_t t0 = NowNs();
    int64_t end = t0 + static_cast<int64_t>(seconds * 1e9);
    std::vector<std::thread> threads;
    for (int i = 0; i < workers; ++i) {
      threads.emplace_back([&, i] {
        Worker& me = w[static_cast<size_t>(i)];
        int outstanding = 0;
        for (int slot = i; slot < concurrency; slot += workers) {
          Send(me, slot, NowNs());
          ++outstanding;
        }
        void* tag;
        bool ok;
        while (outstanding > 0) {
          // No deadline on the calls themselves (it would add timer work to every call on
          // both sides); a stuck leg ends the bench instead.
          auto next = me.cq.AsyncNext(&tag, &ok, std::chrono::system_clock::now() + std::chrono::seconds(60));
          if (next == grpc::CompletionQueue::TIMEOUT) Die("no answer for 60 s");
          if (next != grpc::CompletionQueue::GOT_EVENT) break;
          auto* call = static_cast<Pending*>(tag);
          int64_t now = NowNs();
          Record(me, *call, now);
          --outstanding;
          int64_t slot = call->slot;
          delete call;
          if (now < end) {
            Send(me, slot, NowNs());
            ++outstanding;
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    return Merge(w, t0);
  }

  // Open loop: `rate` calls per second for `seconds`, send times fixed in advance; each
  // latency runs from its call's scheduled send time.
  Phase FixedRate(double rate, double seconds) {
    std::vector<Worker> w(kClientThreads);
    std::atomic<int64_t> done{0};
    std::vector<std::thread> threads;
    for (auto& me : w) {
      threads.emplace_back([&me, &done, this] {
        void* tag;
        bool ok;
        while (me.cq.Next(&tag, &ok)) {
          auto* call = static_cast<Pending*>(tag);
          Record(me, *call, NowNs());
          delete call;
          done.fetch_add(1, std::memory_order_release);
        }
      });
    }
    int64_t n = std::max<int64_t>(1, static_cast<int64_t>(rate * seconds));
    std::vector<int64_t> lag;
    lag.reserve(static_cast<size_t>(n));
    int64_t t0 = NowNs() + 1'000'000;
    for (int64_t k = 0; k < n; ++k) {
      int64_t scheduled = t0 + static_cast<int64_t>(static_cast<double>(k) * 1e9 / rate);
      std::this_thread::sleep_until(Clock::time_point(std::chrono::nanoseconds(scheduled)));
      while (k - done.load(std::memory_order_acquire) >= kMaxOpenLoopInFlight) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      lag.push_back(NowNs() - scheduled);
      Send(w[static_cast<size_t>(k % kClientThreads)], k, scheduled);
    }
    int64_t deadline = NowNs() + 60'000'000'000;
    while (done.load(std::memory_order_acquire) < n) {
      if (NowNs() > deadline) Die("open loop: calls still unanswered after 60 s");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    for (auto& me : w) me.Shutdown();
    for (auto& t : threads) t.join();
    Phase p = Merge(w, t0);
    p.send_lag_ns = std::move(lag);
    return p;
  }

 private:
  struct Pending {
    int64_t slot = 0;
    int64_t start_ns = 0;
    grpc::ClientContext ctx;
    typename Rpc::Response response;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<typename Rpc::Response>> reader;
  };
  struct Worker {
    grpc::CompletionQueue cq;
    std::vector<int64_t> latencies;
    int64_t errors = 0, last_ns = 0;
    std::string first_error;
    bool shut_down = false;
    void Shutdown() {
      if (!std::exchange(shut_down, true)) cq.Shutdown();
    }
    ~Worker() {
      Shutdown();
      void* tag;
      bool ok;
      while (cq.Next(&tag, &ok)) {
      }
    }
  };

  void Send(Worker& w, int64_t slot, int64_t start_ns) {
    auto* call = new Pending;
    call->slot = slot;
    call->start_ns = start_ns;
    call->reader = Rpc::Start(*stubs_[static_cast<size_t>(slot % kChannels)], &call->ctx, request_, &w.cq);
    call->reader->StartCall();
    call->reader->Finish(&call->response, &call->status, call);
  }

  static void Record(Worker& w, const Pending& call, int64_t now) {
    w.last_ns = std::max(w.last_ns, now);
    if (call.status.ok() && Rpc::Ok(call.response)) {
      w.latencies.push_back(now - call.start_ns);
      return;
    }
    if (w.errors++ == 0) {
      w.first_error = call.status.ok() ? Rpc::Describe(call.response)
                                       : absl::StrCat(call.status.error_code(), " ", call.status.error_message());
    }
  }

  static Phase Merge(std::vector<Worker>& w, int64_t t0) {
    Phase p;
    int64_t last = t0;
    for (auto& me : w) {
      p.latencies_ns.insert(p.latencies_ns.end(), me.latencies.begin(), me.latencies.end());
      p.errors += me.errors;
      if (p.first_error.empty()) p.first_error = me.first_error;
      last = std::max(last, me.last_ns);
    }
    p.calls = static_cast<int64_t>(p.latencies_ns.size());
    p.seconds = static_cast<double>(last - t0) / 1e9;
    return p;
  }

  typename Rpc::Request request_;
  std::vector<std::unique_ptr<typename Rpc::Stub>> stubs_;
};

// ---------------------------------------------------------------- direct WebSocket client

// `concurrency` DFX requests (0100, echoed by the upstream) in flight over one WebSocket
// connection, Beast async on one thread that runs nothing else.
class PipelinedWs {
 public:
  virtual ~PipelinedWs() = default;
  // Runs a closed-loop phase on the client's thread; `thread_cpu_s` gets that thread's CPU.
  virtual Phase Run(int concurrency, double seconds, double* thread_cpu_s) = 0;
  static std::unique_ptr<PipelinedWs> Connect(const std::string& url, const std::string& ca_file,
                                              const std::string& body);
};

template <typename Stream>
class PipelinedWsImpl : public PipelinedWs {
 public:
  template <typename... Args>
  PipelinedWsImpl(std::shared_ptr<asio::ssl::context> tls, std::string body, Args&&... args)
      : tls_(std::move(tls)), body_(std::move(body)), ws_(ioc_, std::forward<Args>(args)...) {}

  ~PipelinedWsImpl() override {
    ioc_.stop();
    if (thread_.joinable()) thread_.join();
  }

  websocket::stream<Stream>& ws() { return ws_; }
  asio::io_context& ioc() { return ioc_; }

  // After the (blocking) handshake: logs in like a real client, then starts the read loop.
  void Start() {
    beast::error_code ec;
    ws_.binary(true);
    ws_.write(asio::buffer(std::string("07180718login1{\"Token\":\"direct\"}")), ec);
    if (!ec) ws_.read(buffer_, ec);
    if (ec) Die(absl::StrCat("direct ws login: ", ec.message()));
    buffer_.clear();
    ReadLoop();
    thread_ = std::thread([this] {
      auto guard = asio::make_work_guard(ioc_);
      ioc_.run();
    });
  }

  Phase Run(int concurrency, double seconds, double* thread_cpu_s) override {
    std::promise<void> finished;
    asio::post(ioc_, [&, concurrency, seconds] {
      phase_ = Phase{};
      done_ = &finished;
      slot_start_.assign(static_cast<size_t>(concurrency), 0);
      cpu0_ = ThreadCpuNs();
      t0_ = NowNs();
      end_ = t0_ + static_cast<int64_t>(seconds * 1e9);
      outstanding_ = 0;
      for (int s = 0; s < concurrency; ++s) Send(s);
    });
    if (finished.get_future().wait_for(std::chrono::seconds(static_cast<int64_t>(seconds) + 60)) !=
        std::future_status::ready) {
      Die("direct ws: phase did not finish");
    }
    *thread_cpu_s = static_cast<double>(cpu1_ - cpu0_) / 1e9;
    return std::move(phase_);
  }

 private:
  void Send(int slot) {
    slot_start_[static_cast<size_t>(slot)] = NowNs();
    ++outstanding_;
    // Request id: the slot (4 digits) and a sequence number (6 digits).
    queue_.push_back(absl::StrCat("0100", absl::StrFormat("%04d%06d", slot, seq_++ % 1000000), body_));
    if (!writing_) WriteNext();
  }

  void WriteNext() {
    writing_ = true;
    ws_.async_write(asio::buffer(queue_.front()), [this](beast::error_code ec, size_t) {
      if (ec) Die(absl::StrCat("direct ws write: ", ec.message()));
      queue_.pop_front();
      if (queue_.empty()) {
        writing_ = false;
      } else {
        WriteNext();
      }
    });
  }

  void ReadLoop() {
    ws_.async_read(buffer_, [this](beast::error_code ec, size_t) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) Die(absl::StrCat("direct ws read: ", ec.message()));
      int64_t now = NowNs();
      std::string_view frame(static_cast<const char*>(buffer_.data().data()), buffer_.size());
      int slot = -1;
      if (frame.size() >= 13 && done_) slot = std::atoi(std::string(frame.substr(0, 4)).c_str());
      if (slot < 0 || slot >= static_cast<int>(slot_start_.size()) || frame.substr(10, 3) != "200") {
        Die(absl::StrCat("direct ws: unexpected frame ", std::string(frame.substr(0, 40))));
      }
      buffer_.consume(buffer_.size());
      phase_.latencies_ns.push_back(now - slot_start_[static_cast<size_t>(slot)]);
      --outstanding_;
      if (now < end_) {
        Send(slot);
      } else if (outstanding_ == 0) {
        cpu1_ = ThreadCpuNs();
        phase_.calls = static_cast<int64_t>(phase_.latencies_ns.size());
        phase_.seconds = static_cast<double>(now - t0_) / 1e9;
        std::exchange(done_, nullptr)->set_value();
      }
      ReadLoop();
    });
  }

  std::shared_ptr<asio::ssl::context> tls_;  // outlives the stream
  std::string body_;
  asio::io_context ioc_;
  websocket::stream<Stream> ws_;
  beast::flat_buffer buffer_;
  std::thread thread_;
  // Owned by the client's thread while a phase runs.
  std::deque<std::string> queue_;
  bool writing_ = false;
  std::vector<int64_t> slot_start_;
  int outstanding_ = 0;
  uint64_t seq_ = 0;
  int64_t t0_ = 0, end_ = 0, cpu0_ = 0, cpu1_ = 0;
  Phase phase_;
  std::promise<void>* done_ = nullptr;
};

std::unique_ptr<PipelinedWs> PipelinedWs::Connect(const std::string& url, const std::string& ca_file,
                                                  const std::string& body) {
  absl::StatusOr<WsUrl> u = ParseWsUrl(url);
  if (!u.ok()) Die(absl::StrCat("upstream url: ", u.status().message()));
  const bool tls = u->tls;
  const std::string& host = u->host;
  const std::string& port = u->port;
  auto open = [&](auto& client) {
    tcp::resolver resolver(client.ioc());
    beast::error_code ec;
    auto endpoints = resolver.resolve(host, port, ec);
    if (!ec) asio::connect(beast::get_lowest_layer(client.ws()), endpoints, ec);
    if (ec) Die(absl::StrCat("direct ws connect: ", ec.message()));
    beast::get_lowest_layer(client.ws()).set_option(tcp::no_delay(true));
  };
  auto handshake = [&](auto& client) {
    beast::error_code ec;
    client.ws().set_option(websocket::stream_base::decorator([](websocket::request_type& req) {
      req.set(beast::http::field::sec_websocket_protocol, "json");
    }));
    client.ws().handshake(host, "/", ec);
    if (ec) Die(absl::StrCat("direct ws handshake: ", ec.message()));
    client.Start();
  };
  if (!tls) {
    auto c = std::make_unique<PipelinedWsImpl<tcp::socket>>(nullptr, body);
    open(*c);
    handshake(*c);
    return c;
  }
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  ctx->set_verify_mode(asio::ssl::verify_peer);
  ctx->load_verify_file(ca_file);
  auto c = std::make_unique<PipelinedWsImpl<beast::ssl_stream<tcp::socket>>>(ctx, body, *ctx);
  open(*c);
  c->ws().next_layer().set_verify_callback(asio::ssl::host_name_verification(host));
  beast::error_code ec;
  c->ws().next_layer().handshake(asio::ssl::stream_base::client, ec);
  if (ec) Die(absl::StrCat("direct ws tls handshake: ", ec.message()));
  handshake(*c);
  return c;
}

// ---------------------------------------------------------------- the section

json::object LatencyOf(const Phase& p) {
  Latency l = Summarize(p.latencies_ns);
  return {{"p50_us", l.p50_us}, {"p99_us", l.p99_us}, {"p999_us", l.p999_us}, {"mean_us", l.mean_us}};
}

// Per-run figures of one leg at one concurrency; the section reports medians over runs.
struct LegRuns {
  std::vector<double> rate, p50, p99, p999, cpu_a, cpu_b, cs, client_cpu;
  int64_t errors = 0;
  std::string first_error;

  void Add(const Phase& p) {
    Latency l = Summarize(p.latencies_ns);
    rate.push_back(p.rate());
    p50.push_back(l.p50_us);
    p99.push_back(l.p99_us);
    p999.push_back(l.p999_us);
    errors += p.errors;
    if (first_error.empty()) first_error = p.first_error;
  }
  json::object Common() const {
    json::object o{{"calls_per_s", Median(rate)}, {"p50_us", Median(p50)}, {"p99_us", Median(p99)},
                   {"p999_us", Median(p999)}, {"errors", errors}};
    if (!first_error.empty()) o["first_error"] = first_error;
    return o;
  }
};

double PerCallUs(double cpu_s, const Phase& p) { return p.calls > 0 ? cpu_s / static_cast<double>(p.calls) * 1e6 : 0; }

}  // namespace

json::object ThroughputSection(const ThroughputOptions& o) {
  const double phase_s = o.quick ? 0.1 : 2.0;
  const double warmup_s = o.quick ? 0.05 : 0.3;
  const int runs = o.quick ? 1 : o.runs;
  const std::vector<int> levels = o.quick ? std::vector<int>{1, 8} : std::vector<int>{1, 32, 256};

  dfx::CallRequest call;
  call.set_action_id("0100");
  call.set_json_body(o.body);
  v1::EchoMessage echo_msg;
  echo_msg.set_payload(o.body);
  GrpcLoad<BridgedCall> bridged(o.daemon_target, call);
  GrpcLoad<EchoCall> echo(o.echo_target, echo_msg);
  auto ws = PipelinedWs::Connect(o.upstream_url, o.ca_file, o.body);

  json::array out_levels;
  double bridged_max_at_top = 0;
  for (int c : levels) {
    std::cerr << "    concurrency " << c << "\n";
    LegRuns b, g, w;
    for (int run = 0; run < runs; ++run) {
      // Legs interleaved run by run; each after a warm-up phase at the same concurrency.
      bridged.MaxThroughput(c, warmup_s);
      double d0 = ProcessCpuSeconds(o.daemon_pid), u0 = ProcessCpuSeconds(o.upstream_pid), s0 = SelfCpuSeconds();
      int64_t cs0 = ProcessContextSwitches(o.daemon_pid);
      Phase pb = bridged.MaxThroughput(c, phase_s);
      b.Add(pb);
      b.cpu_a.push_back(PerCallUs(ProcessCpuSeconds(o.daemon_pid) - d0, pb));
      b.cpu_b.push_back(PerCallUs(ProcessCpuSeconds(o.upstream_pid) - u0, pb));
      b.client_cpu.push_back(PerCallUs(SelfCpuSeconds() - s0, pb));
      b.cs.push_back(pb.calls > 0 ? static_cast<double>(ProcessContextSwitches(o.daemon_pid) - cs0) /
                                        static_cast<double>(pb.calls)
                                  : 0);

      echo.MaxThroughput(c, warmup_s);
      double e0 = ProcessCpuSeconds(o.echo_pid);
      s0 = SelfCpuSeconds();
      Phase pg = echo.MaxThroughput(c, phase_s);
      g.Add(pg);
      g.cpu_a.push_back(PerCallUs(ProcessCpuSeconds(o.echo_pid) - e0, pg));
      g.client_cpu.push_back(PerCallUs(SelfCpuSeconds() - s0, pg));

      double ignored = 0, ws_cpu = 0;
      ws->Run(c, warmup_s, &ignored);
      u0 = ProcessCpuSeconds(o.upstream_pid);
      Phase pw = ws->Run(c, phase_s, &ws_cpu);
      w.Add(pw);
      w.cpu_a.push_back(PerCallUs(ws_cpu, pw));
      w.cpu_b.push_back(PerCallUs(ProcessCpuSeconds(o.upstream_pid) - u0, pw));
    }
    json::object jb = b.Common();
    jb["wsbridged_cpu_us_per_call"] = Median(b.cpu_a);
    jb["wsbridged_context_switches_per_call"] = Median(b.cs);
    jb["upstream_cpu_us_per_call"] = Median(b.cpu_b);
    jb["client_cpu_us_per_call"] = Median(b.client_cpu);
    json::object jg = g.Common();
    jg["server_cpu_us_per_call"] = Median(g.cpu_a);
    jg["client_cpu_us_per_call"] = Median(g.client_cpu);
    json::object jw = w.Common();
    jw["client_thread_cpu_us_per_call"] = Median(w.cpu_a);
    jw["upstream_cpu_us_per_call"] = Median(w.cpu_b);
    double direct = Median(g.cpu_a) + Median(w.cpu_a);
    out_levels.push_back(json::object{
        {"concurrency", c},
        {"bridged", std::move(jb)},
        {"grpc_direct", std::move(jg)},
        {"ws_direct", std::move(jw)},
        {"cpu_ratio_wsbridged_over_direct", direct > 0 ? Median(b.cpu_a) / direct : 0},
    });
    bridged_max_at_top = Median(b.rate);
  }

  // Open loop at fractions of the bridged maximum at the highest concurrency.
  json::array open;
  for (double fraction : {0.25, 0.5, 0.75}) {
    double rate = std::max(100.0, fraction * bridged_max_at_top);
    std::cerr << "    open loop " << static_cast<int64_t>(rate) << " calls/s\n";
    double d0 = ProcessCpuSeconds(o.daemon_pid);
    int64_t cs0 = ProcessContextSwitches(o.daemon_pid);
    Phase p = bridged.FixedRate(rate, phase_s);
    Latency lag = Summarize(p.send_lag_ns);
    json::object jo{{"fraction_of_max", fraction},
                    {"offered_per_s", rate},
                    {"achieved_per_s", p.rate()},
                    {"latency_from_scheduled", LatencyOf(p)},
                    {"send_lag_p50_us", lag.p50_us},
                    {"send_lag_p99_us", lag.p99_us},
                    {"wsbridged_cpu_us_per_call", PerCallUs(ProcessCpuSeconds(o.daemon_pid) - d0, p)},
                    {"wsbridged_context_switches_per_call",
                     p.calls > 0 ? static_cast<double>(ProcessContextSwitches(o.daemon_pid) - cs0) /
                                       static_cast<double>(p.calls)
                                 : 0},
                    {"calls", p.calls},
                    {"errors", p.errors}};
    if (!p.first_error.empty()) jo["first_error"] = p.first_error;
    open.push_back(std::move(jo));
  }

  return {
      {"method",
       "closed loop per concurrency: C calls in flight over 4 gRPC channels (2 client threads, a "
       "completion queue each), each answer starts the next, for phase_seconds after a warm-up; the direct "
       "WebSocket leg pipelines C requests over one connection on a thread of its own; CPU per call = "
       "utime+stime delta of the process (/proc/PID/stat; the WebSocket client: its thread's "
       "CLOCK_THREAD_CPUTIME_ID) / answered calls; medians over runs. Open loop: send times fixed in "
       "advance at the offered rate, latency from the scheduled send time"},
      {"message_bytes", o.body.size()},
      {"channels", kChannels},
      {"client_threads", kClientThreads},
      {"phase_seconds", phase_s},
      {"runs", runs},
      {"levels", std::move(out_levels)},
      {"open_loop", std::move(open)},
  };
}

void PrintThroughputTable(const json::value& t) {
  auto num = [](const json::value& v, const char* key) { return v.at(key).to_number<double>(); };
  std::printf("\n7. Throughput, bridged Call vs the direct legs at the same concurrency (%d B body, %d channels,"
              " median of %d runs of %.1f s)\n",
              static_cast<int>(num(t, "message_bytes")), static_cast<int>(num(t, "channels")),
              static_cast<int>(num(t, "runs")), num(t, "phase_seconds"));
  std::printf("   %-5s %-22s %10s %9s %9s %9s %14s %9s\n", "C", "leg", "calls/s", "p50 us", "p99 us", "p99.9 us",
              "CPU us/call", "ctx sw");
  for (const json::value& l : t.at("levels").as_array()) {
    int c = static_cast<int>(num(l, "concurrency"));
    for (auto [key, label, cpu] : std::vector<std::tuple<const char*, const char*, const char*>>{
             {"bridged", "bridged Call", "wsbridged_cpu_us_per_call"},
             {"grpc_direct", "direct gRPC (server)", "server_cpu_us_per_call"},
             {"ws_direct", "direct ws (client thr)", "client_thread_cpu_us_per_call"}}) {
      const json::value& leg = l.at(key);
      std::printf("   %-5d %-22s %10.0f %9.1f %9.1f %9.1f %14.1f", c, label, num(leg, "calls_per_s"),
                  num(leg, "p50_us"), num(leg, "p99_us"), num(leg, "p999_us"), num(leg, cpu));
      if (leg.as_object().contains("wsbridged_context_switches_per_call")) {
        std::printf(" %9.1f", num(leg, "wsbridged_context_switches_per_call"));
      }
      if (num(leg, "errors") > 0) std::printf("  (%d errors)", static_cast<int>(num(leg, "errors")));
      std::printf("\n");
    }
    std::printf("   %-5d wsbridged / (gRPC server + ws client) CPU per call: %.2f  (upstream %.1f us/call bridged,"
                " %.1f direct)\n",
                c, num(l, "cpu_ratio_wsbridged_over_direct"), num(l.at("bridged"), "upstream_cpu_us_per_call"),
                num(l.at("ws_direct"), "upstream_cpu_us_per_call"));
  }
  std::printf("   open loop (latency from the scheduled send time)   achieved/s    p50 us    p99 us  p99.9 us"
              "  CPU us/call  send lag p99 us\n");
  for (const json::value& r : t.at("open_loop").as_array()) {
    const json::value& lat = r.at("latency_from_scheduled");
    std::printf("   offered %8.0f/s (%3.0f%% of max at top C)          %10.0f %9.1f %9.1f %9.1f %12.1f %16.1f\n",
                num(r, "offered_per_s"), num(r, "fraction_of_max") * 100, num(r, "achieved_per_s"),
                num(lat, "p50_us"), num(lat, "p99_us"), num(lat, "p999_us"), num(r, "wsbridged_cpu_us_per_call"),
                num(r, "send_lag_p99_us"));
  }
}

}  // namespace wsbridge::bench
