#include "bench/nexora_section.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "tests/upstreams/nexora_emulator.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"

namespace wsbridge::bench {
namespace {

namespace json = boost::json;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace nx = wsbridge::nexora::v1;
using tcp = asio::ip::tcp;
using std::chrono::seconds;

constexpr const char* kApiKey = "nxr_bench_key";
// A chunk's content: LLM streams send a few words per chunk.
constexpr size_t kChunkBytes = 64;

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "wsbridge-bench: nexora: " << what << "\n";
  KillAllChildren();
  std::exit(1);
}

std::string SelfExe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The events of one answer as one client saw them.
struct AnswerTiming {
  int64_t first_chunk_ns = 0;  // send -> first chunk
  int64_t total_ns = 0;        // send -> done
  int chunks = 0;
  size_t bytes = 0;            // chunk content bytes
};

// ---------------------------------------------------------------- direct client

// A blocking WebSocket client speaking Nexora's text frames straight to the emulator.
class DirectClient {
 public:
  virtual ~DirectClient() = default;
  virtual void Write(const std::string& text) = 0;
  virtual std::string Read() = 0;

  static std::unique_ptr<DirectClient> Connect(const std::string& url, const std::string& ca_file,
                                               const std::string& target);

  AnswerTiming Answer(const std::string& content) {
    AnswerTiming t;
    int64_t t0 = NowNs();
    Write(json::serialize(json::object{{"type", "message"}, {"content", content}}));
    while (true) {
      std::string frame = Read();
      json::value v = json::parse(frame);
      const json::object& o = v.as_object();
      std::string_view type = o.at("type").as_string();
      if (type == "chunk") {
        if (t.chunks++ == 0) t.first_chunk_ns = NowNs() - t0;
        t.bytes += o.at("content").as_string().size();
      } else if (type == "done") {
        t.total_ns = NowNs() - t0;
        return t;
      } else if (type == "error" || type == "duplicate") {
        Die(absl::StrCat("direct client: unexpected ", frame));
      }
    }
  }
};

template <typename Stream>
class DirectImpl : public DirectClient {
 public:
  template <typename... Args>
  explicit DirectImpl(std::shared_ptr<void> keep, Args&&... args)
      : keep_(std::move(keep)), ws_(std::forward<Args>(args)...) {}
  websocket::stream<Stream>& ws() { return ws_; }

  void Write(const std::string& text) override {
    beast::error_code ec;
    ws_.text(true);
    ws_.write(asio::buffer(text), ec);
    if (ec) Die(absl::StrCat("direct ws write: ", ec.message()));
  }
  std::string Read() override {
    beast::error_code ec;
    buffer_.clear();
    ws_.read(buffer_, ec);
    if (ec) Die(absl::StrCat("direct ws read: ", ec.message()));
    return beast::buffers_to_string(buffer_.data());
  }

 private:
  std::shared_ptr<void> keep_;  // the TLS context outlives the stream
  websocket::stream<Stream> ws_;
  beast::flat_buffer buffer_;
};

std::unique_ptr<DirectClient> DirectClient::Connect(const std::string& url, const std::string& ca_file,
                                                    const std::string& target) {
  absl::StatusOr<WsUrl> u = ParseWsUrl(url);
  if (!u.ok()) Die(absl::StrCat("emulator url: ", u.status().message()));
  const bool tls = u->tls;
  const std::string& host = u->host;
  const std::string& port = u->port;
  // Blocking calls never run the io_context; one that is never destroyed suffices.
  static asio::io_context& ioc = *new asio::io_context;
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  auto endpoints = resolver.resolve(host, port, ec);
  if (ec) Die(absl::StrCat("resolve ", host, ": ", ec.message()));
  auto handshake = [&](auto& ws) {
    ws.handshake(host, target, ec);
    if (ec) Die(absl::StrCat("direct ws handshake: ", ec.message()));
    ws.read_message_max(64u << 20);
  };
  if (!tls) {
    auto c = std::make_unique<DirectImpl<tcp::socket>>(nullptr, ioc);
    asio::connect(c->ws().next_layer(), endpoints, ec);
    if (ec) Die(absl::StrCat("direct connect: ", ec.message()));
    c->ws().next_layer().set_option(tcp::no_delay(true));
    handshake(c->ws());
    return c;
  }
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  ctx->set_verify_mode(asio::ssl::verify_peer);
  ctx->load_verify_file(ca_file, ec);
  if (ec) Die(absl::StrCat("ca file ", ca_file, ": ", ec.message()));
  auto c = std::make_unique<DirectImpl<beast::ssl_stream<tcp::socket>>>(ctx, ioc, *ctx);
  auto& sock = beast::get_lowest_layer(c->ws());
  asio::connect(sock, endpoints, ec);
  if (ec) Die(absl::StrCat("direct connect: ", ec.message()));
  sock.set_option(tcp::no_delay(true));
  c->ws().next_layer().set_verify_callback(asio::ssl::host_name_verification(host));
  c->ws().next_layer().handshake(asio::ssl::stream_base::client, ec);
  if (ec) Die(absl::StrCat("direct tls handshake: ", ec.message()));
  handshake(c->ws());
  return c;
}

// ---------------------------------------------------------------- bridged client

AnswerTiming BridgedAnswer(nx::NexoraService::Stub& stub, const std::string& chat, const std::string& content) {
  AnswerTiming t;
  nx::SendMessageRequest req;
  req.set_chat_id(chat);
  req.set_content(content);
  grpc::ClientContext ctx;
  int64_t t0 = NowNs();
  auto reader = stub.SendMessage(&ctx, req);
  nx::ChatEvent ev;
  bool done = false;
  while (reader->Read(&ev)) {
    if (ev.has_chunk()) {
      if (t.chunks++ == 0) t.first_chunk_ns = NowNs() - t0;
      t.bytes += ev.chunk().content().size();
    } else if (ev.has_done()) {
      t.total_ns = NowNs() - t0;
      done = true;
    } else if (ev.has_duplicate() || ev.has_restarted()) {
      Die(absl::StrCat("bridged SendMessage: unexpected event ", ev.ShortDebugString()));
    }
  }
  grpc::Status st = reader->Finish();
  if (!st.ok()) Die(absl::StrCat("bridged SendMessage: ", st.error_code(), " ", st.error_message()));
  if (!done) Die("bridged SendMessage ended without done");
  return t;
}

// ---------------------------------------------------------------- figures

struct LegRun {
  std::vector<int64_t> first_chunk_ns;
  double chunks_per_s = 0, bytes_per_s = 0;
};

LegRun Measure(int answers, const std::function<AnswerTiming()>& one) {
  LegRun r;
  int64_t total_ns = 0;
  int64_t chunks = 0, bytes = 0;
  for (int i = 0; i < answers; ++i) {
    AnswerTiming t = one();
    r.first_chunk_ns.push_back(t.first_chunk_ns);
    total_ns += t.total_ns;
    chunks += t.chunks;
    bytes += static_cast<int64_t>(t.bytes);
  }
  double secs = static_cast<double>(total_ns) / 1e9;
  r.chunks_per_s = secs > 0 ? static_cast<double>(chunks) / secs : 0;
  r.bytes_per_s = secs > 0 ? static_cast<double>(bytes) / secs : 0;
  return r;
}

json::object LatencyObject(const Latency& l) {
  return {{"p50_us", l.p50_us}, {"p99_us", l.p99_us}, {"mean_us", l.mean_us}, {"samples", l.samples}};
}

json::object LegJson(const std::vector<LegRun>& runs) {
  std::vector<Latency> first;
  std::vector<double> cps, bps;
  for (const LegRun& r : runs) {
    first.push_back(Summarize(r.first_chunk_ns));
    cps.push_back(r.chunks_per_s);
    bps.push_back(r.bytes_per_s);
  }
  return {{"first_chunk", LatencyObject(MedianOf(first))},
          {"chunks_per_s", Median(cps)},
          {"bytes_per_s", Median(bps)}};
}

double Num(const json::value& v) {
  if (v.is_double()) return v.as_double();
  if (v.is_int64()) return static_cast<double>(v.as_int64());
  if (v.is_uint64()) return static_cast<double>(v.as_uint64());
  return 0;
}

}  // namespace

json::object NexoraSection(const NexoraBenchOptions& o) {
  // A long answer: enough chunks that the rate is the pipeline's, below the bridge's
  // per-stream queue bound (4096 events) even if the client fell behind entirely.
  const int chunks = o.quick ? 20 : 2000;
  const int answers = o.quick ? 2 : 20;
  const int warmup = o.quick ? 1 : 3;

  Child upstream;
  std::vector<std::string> argv = {SelfExe(), "--nexora-upstream", "--chunks", std::to_string(chunks),
                                   "--chunk-bytes", std::to_string(kChunkBytes)};
  if (o.tls) argv.insert(argv.end(), {"--tls-cert", o.cert_file, "--tls-key", o.key_file});
  if (auto st = upstream.Spawn(argv); !st.ok()) Die(absl::StrCat("spawn emulator: ", st.ToString()));
  auto line = upstream.WaitForLine("\"nexora-upstream\"", seconds(20));
  if (!line.ok()) Die(absl::StrCat("emulator start: ", line.status().ToString()));
  std::string url = JsonField(*line, "url");

  std::string yaml = absl::StrCat(
      "server:\n"
      "  listen: \"127.0.0.1:0\"\n"
      "log:\n"
      "  level: warn\n"
      "runtime:\n"
      "  io_threads: ", o.io_threads, "\n"
      "shutdown:\n"
      "  drain_timeout: 0s\n"
      "  deadline: 2s\n"
      "bridges:\n"
      "  - name: nexora\n"
      "    nexora:\n"
      "      upstream:\n"
      "        url: \"", url, "\"\n",
      o.tls ? absl::StrCat("        tls:\n          ca_file: \"", o.ca_file, "\"\n")
            : std::string("        allow_plaintext: true\n"),
      "      api_key:\n"
      "        value: \"", kApiKey, "\"\n");
  std::string cfg = absl::StrCat(o.work_dir, "/wsbridged-nexora-", o.tls ? "tls" : "plain", ".yaml");
  std::ofstream(cfg) << yaml;
  std::string log = o.keep_logs.empty() ? absl::StrCat(o.work_dir, "/wsbridged-nexora.log") : o.keep_logs;
  Child daemon;
  if (auto st = daemon.Spawn({o.wsbridged, "--config", cfg}, {}, log); !st.ok()) {
    Die(absl::StrCat("spawn wsbridged: ", st.ToString()));
  }
  auto listening = daemon.WaitForLine("\"listening\"", seconds(30));
  if (!listening.ok()) Die(absl::StrCat("wsbridged start: ", listening.status().ToString(), " (log: ", log, ")"));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(JsonField(*listening, "grpc"), grpc::InsecureChannelCredentials(), args);
  auto stub = nx::NexoraService::NewStub(channel);

  // One chat per leg, its socket kept open across answers, as a backend streaming a
  // conversation would. The bridge's first answer opens the chat socket: warm-up.
  const std::string bridged_chat = "bench-bridged";
  auto direct = DirectClient::Connect(url, o.ca_file, absl::StrCat("/api/ws/bench-direct?token=", kApiKey));
  auto bridged_one = [&] { return BridgedAnswer(*stub, bridged_chat, "Tell me a long story."); };
  auto direct_one = [&] { return direct->Answer("Tell me a long story."); };
  std::vector<LegRun> bridged_runs, direct_runs;
  std::vector<double> cpu_per_chunk;
  for (int run = 0; run < o.runs; ++run) {
    Measure(warmup, direct_one);
    direct_runs.push_back(Measure(answers, direct_one));
    Measure(warmup, bridged_one);
    double cpu0 = ProcessCpuSeconds(daemon.pid());
    bridged_runs.push_back(Measure(answers, bridged_one));
    cpu_per_chunk.push_back((ProcessCpuSeconds(daemon.pid()) - cpu0) / (static_cast<double>(answers) * chunks) * 1e6);
  }
  direct.reset();
  stub.reset();
  channel.reset();
  daemon.Stop();
  upstream.Stop();

  json::object bridged = LegJson(bridged_runs), ws = LegJson(direct_runs);
  bridged["wsbridged_cpu_us_per_chunk"] = Median(cpu_per_chunk);
  double added_p50 = Num(bridged.at("first_chunk").at("p50_us")) - Num(ws.at("first_chunk").at("p50_us"));
  double rate_ratio = Num(ws.at("chunks_per_s")) > 0 ? Num(bridged.at("chunks_per_s")) / Num(ws.at("chunks_per_s")) : 0;
  return {{"tls", o.tls},
          {"answer_chunks", chunks},
          {"chunk_content_bytes", kChunkBytes},
          {"answers_per_run", answers},
          {"runs", o.runs},
          {"bridged", std::move(bridged)},
          {"ws_direct", std::move(ws)},
          {"added_first_chunk_p50_us", added_p50},
          {"bridged_over_direct_chunk_rate", rate_ratio}};
}

void PrintNexoraTable(const json::value& n) {
  std::printf("\n6. Nexora SendMessage, %d-chunk answer of %d B chunks, emulator unpaced (median of %d runs)\n",
              static_cast<int>(Num(n.at("answer_chunks"))), static_cast<int>(Num(n.at("chunk_content_bytes"))),
              static_cast<int>(Num(n.at("runs"))));
  std::printf("   %-40s %12s %12s %12s %12s\n", "", "1st chunk p50", "p99 us", "chunks/s", "MB/s");
  for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
           {"ws_direct", "direct WebSocket client"}, {"bridged", "bridged (gRPC->wsbridged->emulator)"}}) {
    const json::value& l = n.at(key);
    std::printf("   %-40s %12.1f %12.1f %12.0f %12.2f\n", label, Num(l.at("first_chunk").at("p50_us")),
                Num(l.at("first_chunk").at("p99_us")), Num(l.at("chunks_per_s")), Num(l.at("bytes_per_s")) / 1e6);
  }
  std::printf("   added to first chunk p50 %.1f us | bridged/direct chunk rate %.2f | wsbridged CPU %.2f us/chunk\n",
              Num(n.at("added_first_chunk_p50_us")), Num(n.at("bridged_over_direct_chunk_rate")),
              Num(n.at("bridged").at("wsbridged_cpu_us_per_chunk")));
}

int RunNexoraUpstream(const std::vector<std::string>& args) {
  emulator::NexoraEmulatorOptions opt;
  opt.step_delay = std::chrono::milliseconds(0);
  opt.api_keys = {kApiKey};
  int chunks = 2000;
  size_t chunk_bytes = kChunkBytes;
  for (size_t i = 1; i + 1 < args.size(); ++i) {
    if (args[i] == "--tls-cert") opt.cert_pem = ReadFile(args[i + 1]), opt.tls = true;
    if (args[i] == "--tls-key") opt.key_pem = ReadFile(args[i + 1]);
    if (args[i] == "--chunks") chunks = std::max(1, std::stoi(args[i + 1]));
    if (args[i] == "--chunk-bytes") chunk_bytes = static_cast<size_t>(std::max(1, std::stoi(args[i + 1])));
  }
  // Block the stop signals before the emulator's threads start so only sigwait sees them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  emulator::NexoraEmulator em(opt);
  if (absl::Status st = em.Start(); !st.ok()) {
    std::cerr << "wsbridge-bench --nexora-upstream: " << st << "\n";
    return 1;
  }
  // The scripted answer: `chunks` chunks of plain words, then the protocol's done.
  std::string words;
  while (words.size() < chunk_bytes) words += "lorem ipsum ";
  words.resize(chunk_bytes);
  std::vector<emulator::NexoraScriptStep> script;
  std::string event = json::serialize(json::object{{"type", "chunk"}, {"content", words}});
  for (int i = 0; i < chunks; ++i) script.push_back({event});
  em.SetScript(std::move(script));
  std::cout << json::serialize(json::object{{"event", "nexora-upstream"}, {"url", em.url()}}) << std::endl;
  int sig = 0;
  sigwait(&stop, &sig);
  em.Stop();
  return 0;
}

}  // namespace wsbridge::bench
