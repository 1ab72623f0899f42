#include "tests/faults/bridge_kits.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>
#include <grpcpp/grpcpp.h>
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/bridge.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/upstream_config.h"
#include "bridges/dfx/dfx_bridge.h"
#include "bridges/emogg/codec.h"
#include "bridges/emogg/emogg_bridge.h"
#include "bridges/nexora/nexora_bridge.h"
#include "bridges/nlx/nlx_bridge.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "tests/upstreams/emogg_emulator.h"
#include "tests/upstreams/nexora_emulator.h"
#include "tests/upstreams/nlx_emulator.h"
#include "tests/upstreams/ws_server.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::faults {

using namespace std::chrono_literals;
using Ms = std::chrono::milliseconds;
using testing::WaitFor;

void Connect(const Settings& s, core::UpstreamEndpoint& e) {
  e.url = s.url;
  e.connection.allow_plaintext = s.ca_file.empty();
  e.connection.tls.ca_file = s.ca_file;
  e.connection.backoff = s.backoff;
  e.connection.connect_timeout = 5s;
  e.connection.handshake_timeout = 5s;
}

void Deadline(grpc::ClientContext& ctx, std::chrono::milliseconds d) {
  ctx.set_deadline(std::chrono::system_clock::now() + d);
}

void WaitForReady(grpc::ClientContext& ctx, bool wait) {
  if (wait) ctx.AddMetadata(std::string(core::kWaitForReadyMetadata), "true");
}

// DFX: a device token per session ("dfx-s3cr3t-<n>" per call).
Kit DfxKit() {
  Kit k;
  k.name = "dfx";
  k.service = "wsbridge.dfx.v1.DfxService";
  k.always_on_session = true;
  k.base_sessions = 1;
  k.start_upstream = [](const TlsServe* tls) -> absl::StatusOr<std::unique_ptr<Upstream>> {
    emulator::DfxEmulatorOptions o;
    if (tls != nullptr) o.tls_max_version = tls->max_version;
    return StartEmulator<emulator::DfxEmulator>(std::move(o), tls);
  };
  k.describe = [](config::v1::BridgeConfig& b, const std::string& url) {
    b.mutable_dfx()->mutable_upstream()->set_url(url);
  };
  k.make = [](const Settings& s, const core::BridgeContext& ctx) {
    dfx::DfxBridgeOptions o;
    Connect(s, o);
    o.default_token = core::SecretSource::Fixed("dfx-s3cr3t-default");
    o.allow_call_token = true;
    o.request_timeout = s.request_timeout;
    o.rate_limit_retry = 50ms;
    return dfx::NewDfxBridge(std::move(o), ctx);
  };
  k.past_tls = PastTls<emulator::DfxEmulator>(+[](const emulator::DfxEmulator& e) { return e.connections(); });
  k.probe = [](const Channel& ch, int caller, bool wait) {
    auto stub = dfx::v1::DfxService::NewStub(ch);
    grpc::ClientContext ctx;
    Deadline(ctx, 20s);
    WaitForReady(ctx, wait);
    if (caller >= 0) {
      ctx.AddMetadata(std::string(dfx::kDeviceTokenMetadata), absl::StrCat("dfx-s3cr3t-", caller));
    }
    dfx::v1::CallRequest req;
    req.set_action_id("0100");
    dfx::v1::CallResponse resp;
    return stub->Call(&ctx, req, &resp);
  };
  k.open_stream = [](const Channel& ch, Upstream& up, int n) -> std::unique_ptr<LiveStream> {
    auto& emu = static_cast<EmulatorUpstream<emulator::DfxEmulator>&>(up).emulator();
    struct State {
      std::shared_ptr<dfx::v1::DfxService::Stub> stub;
      grpc::ClientContext ctx;
      std::unique_ptr<grpc::ClientReaderWriter<dfx::v1::MeasurementChunk, dfx::v1::MeasurementEvent>>
          stream;
      std::string mid;
      std::vector<int> acked;
      // A results subscriber too: a server stream beside the bidi one.
      grpc::ClientContext sub_ctx;
      std::unique_ptr<grpc::ClientReader<dfx::v1::SubscribeResultsResponse>> results;
      int results_seen = 0;
    };
    auto st = std::make_shared<State>();
    st->stub = dfx::v1::DfxService::NewStub(ch);
    {
      grpc::ClientContext ctx;
      Deadline(ctx, 20s);
      dfx::v1::CreateMeasurementRequest req;
      req.set_study_id("study-1");
      dfx::v1::CreateMeasurementResponse resp;
      grpc::Status s = st->stub->CreateMeasurement(&ctx, req, &resp);
      EXPECT_TRUE(s.ok()) << s.error_message();
      st->mid = resp.measurement_id();
    }
    Deadline(st->sub_ctx, 60s);
    dfx::v1::SubscribeResultsRequest sreq;
    sreq.set_measurement_id(st->mid);
    st->results = st->stub->SubscribeResults(&st->sub_ctx, sreq);
    st->results->WaitForInitialMetadata();  // acknowledged upstream
    Deadline(st->ctx, 60s);
    st->stream = st->stub->StreamMeasurement(&st->ctx);
    // A few chunks acknowledged (n of them, at least one), the stream left open.
    for (int order = 0; order < std::max(1, n); ++order) {
      dfx::v1::MeasurementChunk c;
      if (order == 0) c.set_measurement_id(st->mid);
      c.set_stage(order == 0 ? dfx::v1::STAGE_FIRST : dfx::v1::STAGE_CHUNK);
      c.set_payload(emulator::MakeEmulatorChunk(static_cast<uint32_t>(order), 10, "data"));
      c.set_duration_ms(10);
      if (!st->stream->Write(c)) break;
      dfx::v1::MeasurementEvent ev;
      while (st->stream->Read(&ev)) {
        if (ev.has_chunk_accepted()) {
          st->acked.push_back(static_cast<int>(ev.chunk_accepted().chunk_order()));
          break;
        }
      }
    }
    EXPECT_EQ(st->acked.size(), static_cast<size_t>(std::max(1, n)));
    auto out = std::make_unique<LiveStream>();
    out->finish = [st] {
      dfx::v1::MeasurementEvent ev;
      while (st->stream->Read(&ev)) {
      }
      return st->stream->Finish();
    };
    out->check = [st, &emu](const grpc::Status& s) {
      // The results stream ends the same way, after the results it had.
      dfx::v1::SubscribeResultsResponse r;
      while (st->results->Read(&r)) st->results_seen += r.results_size();
      grpc::Status sub = st->results->Finish();
      EXPECT_EQ(sub.error_code(), grpc::StatusCode::UNAVAILABLE) << sub.error_message();
      EXPECT_TRUE(absl::StrContains(sub.error_message(), "shutting down")) << sub.error_message();
      EXPECT_LE(st->results_seen, static_cast<int>(st->acked.size()));
      // The documented drain answer carries where to resume.
      const int last = st->acked.empty() ? -1 : st->acked.back();
      EXPECT_EQ(ErrorMetadata(s, "last_acked_chunk_order"), std::to_string(last)) << s.error_message();
      EXPECT_EQ(ErrorMetadata(s, "measurement_id"), st->mid);
      // Nothing acknowledged was lost or duplicated upstream.
      std::map<int, int> recorded;
      for (const auto& c : emu.chunks()) {
        if (c.measurement_id == st->mid) ++recorded[c.chunk_order];
      }
      for (int order : st->acked) EXPECT_EQ(recorded[order], 1) << "chunk " << order;
      EXPECT_EQ(recorded.size(), st->acked.size());
    };
    return out;
  };
  return k;
}

// Emogg: a token per session ("emogg-s3cr3t-<n>" per call).
Kit EmoggKit() {
  Kit k;
  k.name = "emogg";
  k.service = "wsbridge.emogg.v1.EmoggService";
  k.always_on_session = true;
  k.base_sessions = 1;
  k.start_upstream = [](const TlsServe* tls) -> absl::StatusOr<std::unique_ptr<Upstream>> {
    if (tls != nullptr && tls->max_version != 0) return OutdatedTlsUpstream::Start(*tls);
    emulator::EmoggEmulatorOptions o;
    o.protocol.event_interval = 0ms;  // events only when a test emits them
    return StartEmulator<emulator::EmoggEmulator>(std::move(o), tls);
  };
  k.describe = [](config::v1::BridgeConfig& b, const std::string& url) {
    b.mutable_emogg()->mutable_upstream()->set_url(url);
  };
  k.make = [](const Settings& s, const core::BridgeContext& ctx) {
    emogg::EmoggBridgeOptions o;
    Connect(s, o);
    o.default_token = core::SecretSource::Fixed("emogg-s3cr3t-default");
    o.allow_call_token = true;
    o.request_timeout = s.request_timeout;
    o.subscribe_timeout = s.request_timeout;
    o.auth_retry_pause = 100ms;
    o.retry_after_429 = 100ms;
    o.limits.max_messages = 100000;
    o.limits.control_reserve = 8;
    return emogg::NewEmoggBridge(std::move(o), ctx);
  };
  k.past_tls =
      PastTls<emulator::EmoggEmulator>(+[](const emulator::EmoggEmulator& e) { return e.auth_successes(); });
  k.probe = [](const Channel& ch, int caller, bool wait) {
    auto stub = emogg::v1::EmoggService::NewStub(ch);
    grpc::ClientContext ctx;
    Deadline(ctx, 20s);
    WaitForReady(ctx, wait);
    if (caller >= 0) {
      ctx.AddMetadata(std::string(emogg::kTokenMetadataKey), absl::StrCat("emogg-s3cr3t-", caller));
    }
    emogg::v1::RequestRequest req;
    req.set_path("ping");
    emogg::v1::RequestResponse resp;
    return stub->Request(&ctx, req, &resp);
  };
  k.open_stream = [](const Channel& ch, Upstream& up, int) -> std::unique_ptr<LiveStream> {
    auto& emu = static_cast<EmulatorUpstream<emulator::EmoggEmulator>&>(up).emulator();
    struct State {
      std::shared_ptr<emogg::v1::EmoggService::Stub> stub;
      grpc::ClientContext ctx;
      std::unique_ptr<grpc::ClientReader<emogg::v1::SubscribeResponse>> reader;
      int events = 0;
    };
    auto st = std::make_shared<State>();
    st->stub = emogg::v1::EmoggService::NewStub(ch);
    Deadline(st->ctx, 60s);
    emogg::v1::SubscribeRequest req;
    req.set_channel("session_emotions_counts");
    req.set_key("66151895e00a857bd76f889d:10s");
    st->reader = st->stub->Subscribe(&st->ctx, req);
    EXPECT_TRUE(WaitFor([&] { return emu.active_subscriptions() == 1; }));
    // One event through, so the stream is live end to end.
    emogg::v1::SubscribeResponse msg;
    bool got = false;
    while (!got) {
      emu.EmitNow("session_emotions_counts");
      if (!st->reader->Read(&msg)) break;
      for (const auto& u : msg.updates()) got = got || u.has_event();
    }
    EXPECT_TRUE(got);
    auto out = std::make_unique<LiveStream>();
    out->finish = [st] {
      emogg::v1::SubscribeResponse m;
      while (st->reader->Read(&m)) {
      }
      return st->reader->Finish();
    };
    out->check = [](const grpc::Status&) {};
    return out;
  };
  return k;
}

// NLX: one socket per conversation; the keys are configured (they contain s3cr3t).
constexpr char kNlxApiKey[] = "nlx-s3cr3t-api";
constexpr char kNlxDeployment[] = "nlx-s3cr3t-deployment";
constexpr char kNlxChannel[] = "nlx-s3cr3t-channel";

Kit NlxKit() {
  Kit k;
  k.name = "nlx";
  k.service = "wsbridge.nlx.v1.NlxService";
  k.always_on_session = false;
  k.base_sessions = 0;
  k.start_upstream = [](const TlsServe* tls) -> absl::StatusOr<std::unique_ptr<Upstream>> {
    if (tls != nullptr && tls->max_version != 0) return OutdatedTlsUpstream::Start(*tls);
    emulator::NlxEmulatorOptions o;
    o.api_key = kNlxApiKey;
    o.deployment_key = kNlxDeployment;
    o.channel_key = absl::StrCat(kNlxChannel, "-en-US");
    return StartEmulator<emulator::NlxEmulator>(std::move(o), tls);
  };
  k.describe = [](config::v1::BridgeConfig& b, const std::string& url) {
    b.mutable_nlx()->mutable_upstream()->set_url(url);
  };
  k.make = [](const Settings& s, const core::BridgeContext& ctx) {
    nlx::NlxBridgeOptions o;
    Connect(s, o);
    o.api_key = core::SecretSource::Fixed(kNlxApiKey);
    o.deployment_key = core::SecretSource::Fixed(kNlxDeployment);
    o.channel_key = core::SecretSource::Fixed(kNlxChannel);
    o.language = "en-US";
    o.ack_timeout = s.request_timeout;
    o.turn_timeout = s.request_timeout;
    o.check_interval = 20ms;
    return nlx::NewNlxBridge(std::move(o), ctx);
  };
  k.past_tls = PastTls<emulator::NlxEmulator>(+[](const emulator::NlxEmulator& e) { return e.handshakes(); });
  k.probe = [](const Channel& ch, int caller, bool wait) {
    auto stub = nlx::v1::NlxService::NewStub(ch);
    grpc::ClientContext ctx;
    Deadline(ctx, 20s);
    WaitForReady(ctx, wait);
    nlx::v1::SendRequest req;
    // Each caller number is a conversation of its own (its own upstream socket).
    if (caller >= 0) req.set_conversation_id(absl::StrCat("conv-", caller));
    req.mutable_turn()->set_text("hello");
    nlx::v1::SendResponse resp;
    return stub->Send(&ctx, req, &resp);
  };
  k.open_stream = [](const Channel& ch, Upstream& up, int n) -> std::unique_ptr<LiveStream> {
    auto& emu = static_cast<EmulatorUpstream<emulator::NlxEmulator>&>(up).emulator();
    struct State {
      std::shared_ptr<nlx::v1::NlxService::Stub> stub;
      grpc::ClientContext ctx;
      std::unique_ptr<grpc::ClientReaderWriter<nlx::v1::ConverseRequest, nlx::v1::ConverseEvent>> stream;
      std::string conversation;
      int answered = 0;
    };
    auto st = std::make_shared<State>();
    st->stub = nlx::v1::NlxService::NewStub(ch);
    Deadline(st->ctx, 60s);
    st->stream = st->stub->Converse(&st->ctx);
    for (int i = 0; i < std::max(1, n); ++i) {
      nlx::v1::ConverseRequest r;
      r.mutable_turn()->set_text(absl::StrCat("turn ", i));
      if (!st->stream->Write(r)) break;
      nlx::v1::ConverseEvent ev;
      while (st->stream->Read(&ev)) {
        if (ev.has_opened()) st->conversation = ev.opened().conversation_id();
        if (ev.has_response()) {
          ++st->answered;
          break;
        }
      }
    }
    EXPECT_EQ(st->answered, std::max(1, n));
    auto out = std::make_unique<LiveStream>();
    out->finish = [st] {
      nlx::v1::ConverseEvent ev;
      while (st->stream->Read(&ev)) {
      }
      return st->stream->Finish();
    };
    out->check = [st, &emu](const grpc::Status&) {
      // Every answered turn reached NLX once: none lost, none resent by the drain.
      EXPECT_EQ(emu.turns_received(st->conversation), st->answered);
    };
    return out;
  };
  return k;
}

// Nexora: one socket per chat; an API key (per call: x-nexora-token).
Kit NexoraKit() {
  Kit k;
  k.name = "nexora";
  k.service = "wsbridge.nexora.v1.NexoraService";
  k.always_on_session = false;
  k.base_sessions = 0;
  k.start_upstream = [](const TlsServe* tls) -> absl::StatusOr<std::unique_ptr<Upstream>> {
    if (tls != nullptr && tls->max_version != 0) return OutdatedTlsUpstream::Start(*tls);
    emulator::NexoraEmulatorOptions o;
    return StartEmulator<emulator::NexoraEmulator>(std::move(o), tls);
  };
  k.describe = [](config::v1::BridgeConfig& b, const std::string& url) {
    b.mutable_nexora()->mutable_upstream()->set_url(url);
  };
  k.make = [](const Settings& s, const core::BridgeContext& ctx) {
    nexora::NexoraBridgeOptions o;
    Connect(s, o);
    o.api_key = core::SecretSource::Fixed("nxr_s3cr3t_key");
    o.allow_call_token = true;
    o.answer_idle_timeout = s.request_timeout;
    o.http_timeout = s.request_timeout;
    return nexora::NewNexoraBridge(std::move(o), ctx);
  };
  k.past_tls =
      PastTls<emulator::NexoraEmulator>(+[](const emulator::NexoraEmulator& e) { return e.upgrades(); });
  k.probe = [](const Channel& ch, int caller, bool wait) {
    auto stub = nexora::v1::NexoraService::NewStub(ch);
    grpc::ClientContext ctx;
    Deadline(ctx, 20s);
    WaitForReady(ctx, wait);
    nexora::v1::SendMessageRequest req;
    // Each caller number is a chat of its own (its own upstream socket).
    req.set_chat_id(absl::StrCat("chat-", std::max(caller, 0)));
    req.set_content("status please");
    auto reader = stub->SendMessage(&ctx, req);
    nexora::v1::ChatEvent ev;
    while (reader->Read(&ev)) {
    }
    return reader->Finish();
  };
  k.open_stream = [](const Channel& ch, Upstream& up, int n) -> std::unique_ptr<LiveStream> {
    auto& emu = static_cast<EmulatorUpstream<emulator::NexoraEmulator>&>(up).emulator();
    struct State {
      std::shared_ptr<nexora::v1::NexoraService::Stub> stub;
      grpc::ClientContext ctx;
      std::unique_ptr<grpc::ClientReaderWriter<nexora::v1::ChatRequest, nexora::v1::ChatEvent>> stream;
      std::vector<std::string> done;  // client_message_ids answered in full
    };
    auto st = std::make_shared<State>();
    st->stub = nexora::v1::NexoraService::NewStub(ch);
    Deadline(st->ctx, 60s);
    st->stream = st->stub->Chat(&st->ctx);
    for (int i = 0; i < std::max(1, n); ++i) {
      nexora::v1::ChatRequest r;
      r.set_chat_id(absl::StrCat("chat-drain-", n));
      r.set_content(absl::StrCat("message ", i));
      r.set_client_message_id(absl::StrCat("drain-", n, "-", i));
      if (!st->stream->Write(r)) break;
      nexora::v1::ChatEvent ev;
      while (st->stream->Read(&ev)) {
        if (ev.has_done()) st->done.push_back(ev.client_message_id());
        if (ev.has_done() || ev.has_error() || ev.has_duplicate()) break;
      }
    }
    EXPECT_EQ(st->done.size(), static_cast<size_t>(std::max(1, n)));
    auto out = std::make_unique<LiveStream>();
    out->finish = [st] {
      nexora::v1::ChatEvent ev;
      while (st->stream->Read(&ev)) {
      }
      return st->stream->Finish();
    };
    out->check = [st, &emu](const grpc::Status&) {
      // Every answered message reached Nexora exactly once.
      for (const auto& id : st->done) EXPECT_EQ(emu.messages_received(id), 1) << id;
    };
    return out;
  };
  return k;
}

std::vector<Kit> AllKits() { return {DfxKit(), NlxKit(), EmoggKit(), NexoraKit()}; }
std::string KitName(const ::testing::TestParamInfo<Kit>& info) { return info.param.name; }
void PrintTo(const Kit& kit, std::ostream* os) { *os << kit.name; }

}  // namespace wsbridge::faults
