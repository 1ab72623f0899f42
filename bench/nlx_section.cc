#include "bench/nlx_section.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>
#include <vector>

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
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::bench {
namespace {

namespace json = boost::json;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace nlx = wsbridge::nlx::v1;
using tcp = asio::ip::tcp;
using std::chrono::milliseconds;
using std::chrono::seconds;

// The emulator's default keys (tests/upstreams/nlx_emulator.h).
constexpr const char* kApiKey = "nlx-emulator-api-key";
constexpr const char* kDeploymentKey = "nlx-emulator-deployment";
constexpr const char* kChannelKey = "nlx-emulator-channel-en-US";
// The turn text: the emulator answers "Turn N: you said \"...\"".
constexpr const char* kTurnText = "I would like to book a flight to London next Tuesday";

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "wsbridge-bench: nlx: " << what << "\n";
  KillAllChildren();
  std::exit(1);
}

template <typename T>
T Check(absl::StatusOr<T> v, const std::string& what) {
  if (!v.ok()) Die(absl::StrCat(what, ": ", v.status().ToString()));
  return *std::move(v);
}

// A blocking NLX client for the direct leg: keys in the query, JSON in text frames (the
// bench's WsClient speaks the DFX wire: binary frames, no query).
class DirectConversation {
 public:
  virtual ~DirectConversation() = default;
  static std::unique_ptr<DirectConversation> Open(const std::string& url, const std::string& ca_file);
  // One turn: the request out, frames in until the ConversationResponse.
  void Turn(const std::string& frame) {
    Write(frame);
    while (true) {
      std::string r = Read();
      if (r.find("\"messages\"") != std::string::npos) return;
      if (r.find("\"message\"") != std::string::npos) Die(absl::StrCat("direct turn answered: ", r));
    }
  }
  const std::string& id() const { return id_; }

 protected:
  virtual void Write(const std::string& data) = 0;
  virtual std::string Read() = 0;
  std::string id_;
};

template <typename Stream>
class DirectImpl : public DirectConversation {
 public:
  template <typename... Args>
  explicit DirectImpl(std::shared_ptr<void> keep, Args&&... args)
      : keep_(std::move(keep)), ws_(std::forward<Args>(args)...) {}
  websocket::stream<Stream>& ws() { return ws_; }

  void Handshake(const std::string& host, const std::string& target) {
    beast::error_code ec;
    ws_.handshake(host, target, ec);
    if (ec) Die(absl::StrCat("direct handshake: ", ec.message()));
    ws_.text(true);
    std::string ack = Read();  // {"conversationId":"..."} comes first
    id_ = JsonField(ack, "conversationId");
    if (id_.empty()) Die(absl::StrCat("direct: no ack, got ", ack));
  }

 protected:
  void Write(const std::string& data) override {
    beast::error_code ec;
    ws_.write(asio::buffer(data), ec);
    if (ec) Die(absl::StrCat("direct write: ", ec.message()));
  }
  std::string Read() override {
    beast::error_code ec;
    buffer_.clear();
    ws_.read(buffer_, ec);
    if (ec) Die(absl::StrCat("direct read: ", ec.message()));
    return beast::buffers_to_string(buffer_.data());
  }

 private:
  std::shared_ptr<void> keep_;  // the TLS context, which must outlive the stream
  websocket::stream<Stream> ws_;
  beast::flat_buffer buffer_;
};

std::unique_ptr<DirectConversation> DirectConversation::Open(const std::string& url,
                                                             const std::string& ca_file) {
  bool tls = url.rfind("wss://", 0) == 0;
  std::string rest = url.substr(tls ? 6 : 5);
  if (size_t slash = rest.find('/'); slash != std::string::npos) rest.resize(slash);
  size_t colon = rest.rfind(':');
  std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
  std::string target = absl::StrCat("/?apiKey=", kApiKey, "&deploymentKey=", kDeploymentKey,
                                    "&channelKey=", kChannelKey);
  static asio::io_context& ioc = *new asio::io_context;  // blocking calls never run it
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  auto endpoints = resolver.resolve(host, port, ec);
  if (ec) Die(absl::StrCat("resolve: ", ec.message()));
  if (!tls) {
    auto c = std::make_unique<DirectImpl<tcp::socket>>(nullptr, ioc);
    asio::connect(c->ws().next_layer(), endpoints, ec);
    if (ec) Die(absl::StrCat("direct connect: ", ec.message()));
    c->ws().next_layer().set_option(tcp::no_delay(true));
    c->Handshake(host, target);
    return c;
  }
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  ctx->set_verify_mode(asio::ssl::verify_peer);
  ctx->load_verify_file(ca_file, ec);
  if (ec) Die(absl::StrCat("ca file: ", ec.message()));
  auto c = std::make_unique<DirectImpl<beast::ssl_stream<tcp::socket>>>(ctx, ioc, *ctx);
  auto& sock = beast::get_lowest_layer(c->ws());
  asio::connect(sock, endpoints, ec);
  if (ec) Die(absl::StrCat("direct connect: ", ec.message()));
  sock.set_option(tcp::no_delay(true));
  c->ws().next_layer().set_verify_callback(asio::ssl::host_name_verification(host));
  c->ws().next_layer().handshake(asio::ssl::stream_base::client, ec);
  if (ec) Die(absl::StrCat("direct tls handshake: ", ec.message()));
  c->Handshake(host, target);
  return c;
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

json::object Added(const Latency& a, const Latency& b, const Latency& c) {
  return {{"p50_us", a.p50_us - b.p50_us - c.p50_us}, {"p99_us", a.p99_us - b.p99_us - c.p99_us},
          {"p999_us", a.p999_us - b.p999_us - c.p999_us}, {"mean_us", a.mean_us - b.mean_us - c.mean_us}};
}

// RSS once idle: the lowest reading over 6 s (one period of wsbridged's 5 s memory trim),
// as the sessions section does. --quick reads once.
int64_t SettledRss(pid_t pid, bool quick) {
  int64_t best = ProcessRssKiB(pid);
  for (int i = 0; i < (quick ? 0 : 12); ++i) {
    std::this_thread::sleep_for(milliseconds(500));
    best = std::min(best, ProcessRssKiB(pid));
  }
  return best;
}

using ConverseStream = grpc::ClientReaderWriter<nlx::ConverseRequest, nlx::ConverseEvent>;

nlx::ConverseRequest TurnRequest(const std::string& text) {
  nlx::ConverseRequest r;
  r.mutable_turn()->set_text(text);
  return r;
}

// Reads events until a response; anything else but `opened` ends the bench.
void ReadResponse(ConverseStream& s) {
  nlx::ConverseEvent ev;
  while (true) {
    if (!s.Read(&ev)) Die(absl::StrCat("Converse ended: ", s.Finish().error_message()));
    if (ev.has_response()) return;
    if (!ev.has_opened()) Die(absl::StrCat("Converse: unexpected event ", ev.ShortDebugString()));
  }
}

}  // namespace

json::object NlxSection(const NlxSectionOptions& o) {
  std::string emulator_path;
#ifdef WSBRIDGE_BENCH_EMULATOR
  emulator_path = WSBRIDGE_BENCH_EMULATOR;
#endif
  if (emulator_path.empty()) Die("built without the emulator path (WSBRIDGE_BENCH_EMULATOR)");
  Child emu;
  std::vector<std::string> eargv = {emulator_path, "--nlx", "127.0.0.1:0"};
  if (o.tls) eargv.insert(eargv.end(), {"--tls-cert", o.cert_file, "--tls-key", o.key_file});
  if (auto st = emu.Spawn(eargv); !st.ok()) Die(absl::StrCat("spawn emulator: ", st.ToString()));
  std::string url = JsonField(Check(emu.WaitForLine("\"nlx\"", seconds(20)), "emulator start"), "url");

  // A daemon of its own with one NLX bridge; sockets stay open between Sends.
  int max_conv = std::max(o.conversations, 1) + 20;
  std::string yaml = absl::StrCat(
      "server:\n  listen: \"127.0.0.1:0\"\n  max_concurrent_streams: 100000\n"
      "log:\n  level: warn\n"
      "runtime:\n  io_threads: ", o.io_threads, "\n"
      "shutdown:\n  drain_timeout: 0s\n  deadline: 2s\n"
      "bridges:\n  - name: nlx\n    nlx:\n      upstream:\n        url: \"", url, "\"\n",
      o.tls ? absl::StrCat("        tls:\n          ca_file: \"", o.ca_file, "\"\n")
            : std::string("        allow_plaintext: true\n"),
      "      api_key: {value: ", kApiKey, "}\n"
      "      deployment_key: {value: ", kDeploymentKey, "}\n"
      "      channel_key: {value: ", kChannelKey, "}\n"
      "      idle_conversation_timeout: 1h\n"
      "      max_conversations: ", max_conv, "\n");
  std::string cfg = absl::StrCat(o.work_dir, "/wsbridged-nlx.yaml");
  std::ofstream(cfg) << yaml;
  Child d;
  std::string log = o.log_file.empty() ? absl::StrCat(o.work_dir, "/wsbridged-nlx.log") : o.log_file;
  if (auto st = d.Spawn({o.wsbridged, "--config", cfg}, {}, log); !st.ok()) {
    Die(absl::StrCat("spawn wsbridged: ", st.ToString()));
  }
  std::string target = JsonField(Check(d.WaitForLine("\"listening\"", seconds(30)), "wsbridged start"), "grpc");
  std::cerr << "  wsbridged (nlx) pid " << d.pid() << " listening on " << target << "\n";
  grpc::ChannelArguments args;
  args.SetInt("wsbridge.bench.channel", 7000);  // its own connection
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  auto stub = nlx::NlxService::NewStub(channel);

  // The direct legs: a WebSocket turn on one conversation, and gRPC echoes of a payload
  // the size of the turn's JSON.
  auto direct = DirectConversation::Open(url, o.ca_file);
  std::string frame = absl::StrCat("{\"request\":{\"unstructured\":{\"text\":\"", kTurnText,
                                   "\"}},\"conversationId\":\"", direct->id(), "\"}");
  v1::EchoMessage echo_msg;
  echo_msg.set_payload(frame);
  grpc::ClientContext echo_ctx;
  auto echo_stream = o.echo->EchoStream(&echo_ctx);

  // Send: the first one opens the conversation, the rest resume it on its open socket.
  nlx::SendRequest send;
  send.mutable_turn()->set_text(kTurnText);
  auto send_once = [&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + seconds(30));
    nlx::SendResponse resp;
    grpc::Status st = stub->Send(&ctx, send, &resp);
    if (!st.ok()) Die(absl::StrCat("Send: ", st.error_code(), " ", st.error_message()));
    if (resp.response().messages_size() == 0) Die("Send: a response without messages");
    send.set_conversation_id(resp.conversation_id());
  };
  send_once();
  grpc::ClientContext conv_ctx;
  auto conv = stub->Converse(&conv_ctx);
  nlx::ConverseRequest turn = TurnRequest(kTurnText);
  auto converse_once = [&] {
    if (!conv->Write(turn)) Die("Converse: write failed");
    ReadResponse(*conv);
  };
  converse_once();

  std::vector<Latency> ws_runs, unary_runs, stream_runs, send_runs, conv_runs;
  std::vector<double> cpu_send, cpu_conv, cs_send, cs_conv;
  for (int run = 0; run < o.runs; ++run) {
    ws_runs.push_back(Summarize(Sample(o.warmup, o.samples, [&] { direct->Turn(frame); })));
    unary_runs.push_back(Summarize(Sample(o.warmup, o.samples, [&] {
      grpc::ClientContext ctx;
      v1::EchoMessage back;
      if (!o.echo->Echo(&ctx, echo_msg, &back).ok()) Die("grpc echo failed");
    })));
    stream_runs.push_back(Summarize(Sample(o.warmup, o.samples, [&] {
      v1::EchoMessage back;
      if (!echo_stream->Write(echo_msg) || !echo_stream->Read(&back)) Die("grpc echo stream broke");
    })));
    for (int i = 0; i < o.warmup; ++i) send_once();
    double cpu0 = ProcessCpuSeconds(d.pid());
    int64_t cs0 = ProcessContextSwitches(d.pid());
    send_runs.push_back(Summarize(Sample(0, o.samples, send_once)));
    cpu_send.push_back((ProcessCpuSeconds(d.pid()) - cpu0) / o.samples * 1e6);
    cs_send.push_back(static_cast<double>(ProcessContextSwitches(d.pid()) - cs0) / o.samples);
    for (int i = 0; i < o.warmup; ++i) converse_once();
    cpu0 = ProcessCpuSeconds(d.pid());
    cs0 = ProcessContextSwitches(d.pid());
    conv_runs.push_back(Summarize(Sample(0, o.samples, converse_once)));
    cpu_conv.push_back((ProcessCpuSeconds(d.pid()) - cpu0) / o.samples * 1e6);
    cs_conv.push_back(static_cast<double>(ProcessContextSwitches(d.pid()) - cs0) / o.samples);
  }
  echo_stream->WritesDone();
  echo_stream->Finish();
  conv->WritesDone();
  if (grpc::Status st = conv->Finish(); !st.ok()) Die(absl::StrCat("Converse finish: ", st.error_message()));
  direct.reset();
  Latency w = MedianOf(ws_runs), u = MedianOf(unary_runs), s = MedianOf(stream_runs),
          b_send = MedianOf(send_runs), b_conv = MedianOf(conv_runs);

  // Memory: `conversations` Converse calls open at once, each with its own upstream
  // socket, acknowledged and one turn answered. The Send conversation stays open too
  // (part of the baseline).
  int64_t base_rss = SettledRss(d.pid(), o.quick);
  struct Open {
    grpc::ClientContext ctx;
    std::unique_ptr<ConverseStream> stream;
  };
  std::vector<std::unique_ptr<Open>> open(static_cast<size_t>(o.conversations));
  auto t0 = Clock::now();
  for (auto& c : open) {
    c = std::make_unique<Open>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + seconds(600));
    c->stream = stub->Converse(&c->ctx);
    if (!c->stream->Write(TurnRequest("hello"))) Die("Converse: open write failed");
  }
  for (auto& c : open) ReadResponse(*c->stream);
  double open_s = std::chrono::duration<double>(Clock::now() - t0).count();
  int64_t rss = SettledRss(d.pid(), o.quick);
  int64_t threads = ProcessThreads(d.pid());
  for (auto& c : open) c->stream->WritesDone();
  for (auto& c : open) {
    if (grpc::Status st = c->stream->Finish(); !st.ok()) Die(absl::StrCat("Converse close: ", st.error_message()));
  }
  open.clear();
  d.Stop();
  emu.Stop();
  return {{"upstream_tls", o.tls},
          {"turn_request_bytes", frame.size()},
          {"runs", o.runs},
          {"ws_direct_turn", LatencyJson(w)},
          {"grpc_unary_direct", LatencyJson(u)},
          {"grpc_stream_direct", LatencyJson(s)},
          {"bridged_send", LatencyJson(b_send)},
          {"bridged_converse_turn", LatencyJson(b_conv)},
          {"added_send_over_ws_plus_grpc_unary", Added(b_send, w, u)},
          {"added_converse_over_ws_plus_grpc_stream", Added(b_conv, w, s)},
          {"wsbridged_cpu_us_per_send", Median(cpu_send)},
          {"wsbridged_cpu_us_per_converse_turn", Median(cpu_conv)},
          {"wsbridged_context_switches_per_send", Median(cs_send)},
          {"wsbridged_context_switches_per_converse_turn", Median(cs_conv)},
          {"memory", {{"conversations", o.conversations},
                      {"baseline_rss_kib", base_rss},
                      {"rss_kib", rss},
                      {"rss_kib_per_conversation",
                       static_cast<double>(rss - base_rss) / std::max(o.conversations, 1)},
                      {"open_seconds", open_s},
                      {"wsbridged_threads", threads}}}};
}

void PrintNlxTable(const json::value& n) {
  auto num = [](const json::value& v) {
    if (v.is_double()) return v.as_double();
    if (v.is_int64()) return static_cast<double>(v.as_int64());
    if (v.is_uint64()) return static_cast<double>(v.as_uint64());
    return 0.0;
  };
  std::printf("\nNLX conversation turn (%s emulator, %d B turn, median of %d runs)  p50 us    p99 us  p99.9 us\n",
              n.at("upstream_tls").as_bool() ? "wss" : "ws", static_cast<int>(num(n.at("turn_request_bytes"))),
              static_cast<int>(num(n.at("runs"))));
  for (auto [key, label] : std::vector<std::pair<const char*, const char*>>{
           {"ws_direct_turn", "direct WebSocket turn"},
           {"grpc_unary_direct", "direct gRPC unary echo"},
           {"grpc_stream_direct", "direct gRPC streaming echo"},
           {"bridged_send", "bridged Send (gRPC->wsbridged->NLX)"},
           {"bridged_converse_turn", "bridged Converse turn"},
           {"added_send_over_ws_plus_grpc_unary", "Send added over ws + gRPC unary"},
           {"added_converse_over_ws_plus_grpc_stream", "Converse added over ws + gRPC stream"}}) {
    auto& l = n.at(key);
    std::printf("   %-46s %9.1f %9.1f %9.1f\n", label, num(l.at("p50_us")), num(l.at("p99_us")),
                num(l.at("p999_us")));
  }
  std::printf("   wsbridged CPU per Send %.1f us, per Converse turn %.1f us;"
              " context switches per Send %.2f, per Converse turn %.2f\n",
              num(n.at("wsbridged_cpu_us_per_send")), num(n.at("wsbridged_cpu_us_per_converse_turn")),
              num(n.at("wsbridged_context_switches_per_send")),
              num(n.at("wsbridged_context_switches_per_converse_turn")));
  auto& m = n.at("memory");
  std::printf("   %d open conversations: RSS %.0f MiB (baseline %.0f MiB), %.1f KiB/conversation"
              " (opened in %.2f s)\n",
              static_cast<int>(num(m.at("conversations"))), num(m.at("rss_kib")) / 1024,
              num(m.at("baseline_rss_kib")) / 1024, num(m.at("rss_kib_per_conversation")),
              num(m.at("open_seconds")));
}

}  // namespace wsbridge::bench
