// End-to-end: a real gRPC server with the DFX bridge, real sockets to the in-process
// DFX emulator.
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/bridge.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/log.h"
#include "bridges/core/metrics.h"
#include "bridges/core/upstream_config.h"
#include "bridges/dfx/dfx_bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::dfx {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::dfx::v1;

struct Detail {
  std::string reason;
  std::string domain;
  std::map<std::string, std::string> metadata;
};

// Decodes grpc-status-details-bin as a client with googleapis' protos would.
Detail ErrorDetail(const grpc::Status& st) {
  Detail d;
  google::rpc::Status s;
  if (!s.ParseFromString(st.error_details())) return d;
  for (const auto& any : s.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) {
      d.reason = info.reason();
      d.domain = info.domain();
      d.metadata.insert(info.metadata().begin(), info.metadata().end());
    }
  }
  return d;
}

v1::MeasurementChunk Chunk(v1::Stage stage, uint32_t order, uint32_t duration_ms,
                           bool ignore = false) {
  v1::MeasurementChunk c;
  c.set_stage(stage);
  c.set_payload(emulator::MakeEmulatorChunk(order, duration_ms, "data"));
  c.set_duration_ms(duration_ms);
  c.set_ignore(ignore);
  return c;
}

class DfxBridgeTest : public ::testing::Test {
 protected:
  void SetUp() override {}

  // Runs the bridge inside the real daemon: the daemon's registry builds it through a
  // factory (as for any configured bridge), with test-sized windows and timeouts.
  void Start(emulator::DfxEmulatorOptions eopts = {},
             std::function<void(DfxBridgeOptions&)> tweak = nullptr) {
    emulator_ = std::make_unique<emulator::DfxEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());

    DfxBridgeOptions o;
    o.url = emulator_->url();
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.default_token = core::SecretSource::Fixed("demo-device-token");
    o.allow_call_token = true;
    o.request_timeout = 5s;
    o.rate_limit_retry = 50ms;
    if (tweak) tweak(o);
    registry_.Register(config::v1::DfxBridgeConfig::descriptor()->full_name(),
                       [this, o](const google::protobuf::Message&, const core::BridgeContext& ctx)
                           -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                         auto bridge = NewDfxBridge(o, ctx);
                         if (bridge.ok()) bridge_ = bridge->get();
                         return bridge;
                       });

    config::v1::DaemonConfig cfg;
    cfg.mutable_server()->set_listen("127.0.0.1:0");
    cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
    cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
    auto* b = cfg.add_bridges();
    b->set_name("dfx");
    b->mutable_dfx()->mutable_upstream()->set_url(emulator_->url());
    absl::Status defaults = config::ApplyConfigDefaults(&cfg);
    ASSERT_TRUE(defaults.ok()) << defaults;
    daemon::DaemonOptions dopts;
    dopts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
    absl::Status started = daemon_->Start();
    ASSERT_TRUE(started.ok()) << started;
    ASSERT_NE(bridge_, nullptr);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::DfxService::NewStub(channel_);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
      daemon_.reset();
    }
    if (emulator_ != nullptr) emulator_->Stop();
  }

  uint64_t Counter(const std::string& name) {
    return daemon_->metrics().GetCounter(name, "", {{"bridge", "dfx"}}).value();
  }

  uint32_t Subscribers() {
    uint32_t n = 0;
    for (const auto& s : bridge_->ListSessions()) n += s.subscribers();
    return n;
  }

  // A unary Call of `action` with an empty body; `token` goes in x-dfx-device-token.
  grpc::Status CallAction(const std::string& action = "0100", const std::string& token = "") {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("x-dfx-device-token", token);
    v1::CallRequest req;
    req.set_action_id(action);
    v1::CallResponse resp;
    return stub_->Call(&ctx, req, &resp);
  }

  std::string CreateMeasurement(grpc::ClientContext* ctx = nullptr) {
    grpc::ClientContext own;
    v1::CreateMeasurementRequest req;
    req.set_study_id("study-1");
    v1::CreateMeasurementResponse resp;
    grpc::Status st = stub_->CreateMeasurement(ctx ? ctx : &own, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_FALSE(resp.measurement_id().empty());
    return resp.measurement_id();
  }

  struct StreamOutcome {
    std::vector<v1::ChunkAccepted> accepted;
    std::vector<v1::MeasurementResult> results;
    grpc::Status status;
  };

  // Writes every chunk (each after the previous was accepted, as a client would), reads
  // everything back and finishes.
  StreamOutcome RunStream(const std::string& mid, std::vector<v1::MeasurementChunk> chunks,
                          bool subscribe, bool half_close = true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    auto stream = stub_->StreamMeasurement(&ctx);
    StreamOutcome out;
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (i == 0) {
        chunks[i].set_measurement_id(mid);
        chunks[i].set_subscribe_results(subscribe);
      }
      if (!stream->Write(chunks[i])) break;
      // Flow control is natural: wait for this chunk's acceptance before the next.
      bool accepted = false;
      v1::MeasurementEvent ev;
      while (!accepted && stream->Read(&ev)) {
        if (ev.has_chunk_accepted()) {
          out.accepted.push_back(ev.chunk_accepted());
          accepted = true;
        } else {
          out.results.push_back(ev.result());
        }
      }
      if (!accepted) break;
    }
    if (half_close) stream->WritesDone();
    v1::MeasurementEvent ev;
    while (stream->Read(&ev)) {
      if (ev.has_chunk_accepted()) {
        out.accepted.push_back(ev.chunk_accepted());
      } else {
        out.results.push_back(ev.result());
      }
    }
    out.status = stream->Finish();
    return out;
  }

  core::BridgeRegistry registry_;
  std::unique_ptr<emulator::DfxEmulator> emulator_;
  std::unique_ptr<daemon::Daemon> daemon_;
  core::Bridge* bridge_ = nullptr;  // owned by daemon_
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DfxService::Stub> stub_;
};

TEST_F(DfxBridgeTest, FullMeasurementWithResults) {
  Start();
  std::string mid = CreateMeasurement();
  StreamOutcome out = RunStream(mid,
                                {Chunk(v1::STAGE_FIRST, 0, 100), Chunk(v1::STAGE_CHUNK, 1, 100),
                                 Chunk(v1::STAGE_CHUNK, 2, 100), Chunk(v1::STAGE_LAST, 3, 100)},
                                /*subscribe=*/true);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  ASSERT_EQ(out.accepted.size(), 4u);
  for (uint32_t i = 0; i < 4; ++i) {
    EXPECT_EQ(out.accepted[i].chunk_order(), i);
    EXPECT_EQ(out.accepted[i].upstream_chunk_order(), i);
    EXPECT_FALSE(out.accepted[i].measurement_data_id().empty());
  }
  ASSERT_EQ(out.results.size(), 4u);
  EXPECT_NE(out.results.back().json_body().find(R"("ChunkOrder":3)"), std::string::npos);
  for (const auto& r : out.results) {
    EXPECT_EQ(r.measurement_id(), mid);
    EXPECT_FALSE(r.after_reconnect());
  }
  auto chunks = emulator_->chunks();
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(chunks[0].action, "FIRST::PROCESS");
  EXPECT_EQ(chunks[3].action, "LAST::PROCESS");
  EXPECT_EQ(emulator_->logins(), 1);
  EXPECT_GT(daemon_->metrics().GetHistogram("wsbridge_upstream_rtt_seconds", "", {{"bridge", "dfx"}}).count(),
            0u);
}

TEST_F(DfxBridgeTest, CallReturnsUpstreamStatusAsData) {
  Start();
  {
    grpc::ClientContext ctx;
    v1::CallRequest req;
    req.set_action_id("0100");
    v1::CallResponse resp;
    grpc::Status st = stub_->Call(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.status(), 200u);
    EXPECT_NE(resp.json_body().find("emulator"), std::string::npos);
  }
  {
    grpc::ClientContext ctx;
    v1::CallRequest req;
    req.set_action_id("0999");
    req.set_json_body(R"({"x":1})");
    v1::CallResponse resp;
    grpc::Status st = stub_->Call(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.status(), 404u);
    EXPECT_NE(resp.json_body().find("NOT_FOUND"), std::string::npos);
  }
}

TEST_F(DfxBridgeTest, CallRejectsBadInputWithClearMessages) {
  Start();
  struct Case {
    std::string action, body, expect;
  };
  for (const Case& c : {Case{"12a", "{}", "four digits"}, Case{"01000", "{}", "four digits"},
                        Case{"0100", "[1]", "JSON object"}, Case{"0100", "{bad", "not valid JSON"},
                        Case{"0718", "{}", "login"}, Case{"0506", "{}", "StreamMeasurement"},
                        Case{"0510", "{}", "SubscribeResults"}}) {
    grpc::ClientContext ctx;
    v1::CallRequest req;
    req.set_action_id(c.action);
    req.set_json_body(c.body);
    v1::CallResponse resp;
    grpc::Status st = stub_->Call(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.action << " " << c.body;
    EXPECT_NE(st.error_message().find(c.expect), std::string::npos) << st.error_message();
  }
  EXPECT_EQ(emulator_->frames_received("0100"), 0);
}

TEST_F(DfxBridgeTest, TwoSubscribersShareOneUpstreamSubscription) {
  Start();
  std::string mid = CreateMeasurement();
  v1::SubscribeResultsRequest req;
  req.set_measurement_id(mid);
  grpc::ClientContext c1, c2;
  auto r1 = stub_->SubscribeResults(&c1, req);
  auto r2 = stub_->SubscribeResults(&c2, req);
  r1->WaitForInitialMetadata();
  r2->WaitForInitialMetadata();
  EXPECT_EQ(Subscribers(), 2u);
  EXPECT_EQ(emulator_->frames_received("0510"), 1);
  StreamOutcome out = RunStream(
      mid, {Chunk(v1::STAGE_FIRST, 0, 50), Chunk(v1::STAGE_CHUNK, 1, 50),
            Chunk(v1::STAGE_LAST, 2, 50)},
      /*subscribe=*/false);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_TRUE(out.results.empty());
  for (auto* r : {r1.get(), r2.get()}) {
    std::vector<v1::MeasurementResult> got;
    v1::SubscribeResultsResponse res;
    while (r->Read(&res)) {
      EXPECT_GT(res.results_size(), 0);
      for (const auto& one : res.results()) got.push_back(one);
    }
    grpc::Status st = r->Finish();
    EXPECT_TRUE(st.ok()) << st.error_message();
    // Ended OK by the LAST chunk's result: the upstream sends no end marker.
    ASSERT_EQ(got.size(), 3u);
    EXPECT_NE(got.back().json_body().find(R"("ChunkOrder":2)"), std::string::npos);
    EXPECT_EQ(got.back().json_body().find("Status"), std::string::npos);
  }
  EXPECT_EQ(emulator_->frames_received("0510"), 1);
  EXPECT_TRUE(WaitFor([&] { return Subscribers() == 0; }));
}

TEST_F(DfxBridgeTest, UpstreamErrorCodesMapToGrpcStatusAndReason) {
  Start();
  std::string mid = CreateMeasurement();
  {  // Out of order.
    StreamOutcome out = RunStream(mid, {Chunk(v1::STAGE_FIRST, 0, 10), Chunk(v1::STAGE_CHUNK, 2, 10)},
                                  false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    Detail d = ErrorDetail(out.status);
    EXPECT_EQ(d.reason, "MISALIGNED_CHUNK");
    EXPECT_EQ(d.domain, "dfx.wsbridge.dev");
    EXPECT_EQ(d.metadata["last_acked_chunk_order"], "0");
  }
  {  // Payload validation.
    auto bad = Chunk(v1::STAGE_FIRST, 0, 10);
    bad.set_payload("not an sdk chunk");
    StreamOutcome out = RunStream(mid, {bad}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(ErrorDetail(out.status).reason, "UNPACKER_RPC_ERROR");
    EXPECT_EQ(ErrorDetail(out.status).metadata["last_acked_chunk_order"], "-1");
  }
  {  // Unknown measurement.
    StreamOutcome out = RunStream("no-such-measurement", {Chunk(v1::STAGE_FIRST, 0, 10)}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(ErrorDetail(out.status).reason, "INVALID_MEASUREMENT");
  }
  {  // Unknown measurement, subscription.
    grpc::ClientContext ctx;
    v1::SubscribeResultsRequest req;
    req.set_measurement_id("no-such-measurement");
    auto r = stub_->SubscribeResults(&ctx, req);
    v1::SubscribeResultsResponse res;
    EXPECT_FALSE(r->Read(&res));
    grpc::Status st = r->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(ErrorDetail(st).reason, "INVALID_MEASUREMENT");
  }
  {  // Finished measurement.
    StreamOutcome ok = RunStream(mid, {Chunk(v1::STAGE_FIRST, 0, 10), Chunk(v1::STAGE_LAST, 1, 10)},
                                 false);
    ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
    StreamOutcome out = RunStream(mid, {Chunk(v1::STAGE_CHUNK, 2, 10)}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_EQ(ErrorDetail(out.status).reason, "MEASUREMENT_CLOSED");
  }
}

TEST_F(DfxBridgeTest, RateLimitMapsToResourceExhaustedWhenRetriesRunOut) {
  emulator::DfxEmulatorOptions eo;
  eo.rate_window = 1000ms;
  Start(eo, [](DfxBridgeOptions& o) {
    o.pacing = false;
    o.max_rate_limit_retries = 0;
  });
  std::string mid = CreateMeasurement();
  StreamOutcome out = RunStream(
      mid, {Chunk(v1::STAGE_FIRST, 0, 600), Chunk(v1::STAGE_CHUNK, 1, 600)}, false);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  Detail d = ErrorDetail(out.status);
  EXPECT_EQ(d.reason, "RATE_LIMIT");
  EXPECT_EQ(d.metadata["last_acked_chunk_order"], "0");
}

TEST_F(DfxBridgeTest, RateLimitedChunkIsRetriedAfterAPause) {
  emulator::DfxEmulatorOptions eo;
  eo.rate_window = 300ms;
  Start(eo, [](DfxBridgeOptions& o) {
    o.pacing = false;
    o.rate_limit_retry = 50ms;
  });
  std::string mid = CreateMeasurement();
  StreamOutcome out = RunStream(mid,
                                {Chunk(v1::STAGE_FIRST, 0, 200), Chunk(v1::STAGE_CHUNK, 1, 200),
                                 Chunk(v1::STAGE_LAST, 2, 200)},
                                false);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.accepted.size(), 3u);
  EXPECT_EQ(emulator_->chunks().size(), 3u);
  // The emulator refused some sends; the bridge sent those chunks again.
  EXPECT_GT(emulator_->frames_received("0506"), 3);
}

TEST_F(DfxBridgeTest, PacingKeepsAFastCallerUnderTheLimit) {
  emulator::DfxEmulatorOptions eo;
  eo.rate_window = 400ms;
  Start(eo, [](DfxBridgeOptions& o) { o.pacing_window = 400ms; });
  std::string mid = CreateMeasurement();
  std::vector<v1::MeasurementChunk> chunks = {Chunk(v1::STAGE_FIRST, 0, 100)};
  for (uint32_t i = 1; i < 11; ++i) chunks.push_back(Chunk(v1::STAGE_CHUNK, i, 100));
  chunks.push_back(Chunk(v1::STAGE_LAST, 11, 100));
  StreamOutcome out = RunStream(mid, chunks, false);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.accepted.size(), 12u);
  EXPECT_LE(emulator_->MaxDataMsInWindow(), 400);
  // Paced, not refused: every chunk went up exactly once.
  EXPECT_EQ(emulator_->frames_received("0506"), 12);
}

TEST_F(DfxBridgeTest, RefusedTokenIsUnauthenticatedAndNotHammered) {
  Start({}, [](DfxBridgeOptions& o) { o.default_token = nullptr; });
  for (int i = 0; i < 5; ++i) {
    grpc::Status st = CallAction("0100", "bad-token");
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << st.error_message();
    EXPECT_EQ(ErrorDetail(st).reason, "INVALID_TOKEN");
    EXPECT_EQ(st.error_message().find("bad-token"), std::string::npos);
  }
  EXPECT_EQ(emulator_->frames_received("0718"), 1);
  EXPECT_EQ(emulator_->frames_received("0100"), 0);
  // A call without a token, on a bridge without one, is refused without going upstream.
  EXPECT_EQ(CallAction().error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

// A refused token file: calls fail UNAUTHENTICATED at once and the bridge is not
// serving; once the secret is fixed the bridge logs in again on its own (no call
// needed) and serves.
TEST_F(DfxBridgeTest, RefusedDefaultTokenRecoversOnItsOwnWhenTheSecretIsFixed) {
  testing::TempDir dir;
  const std::string path = dir.WriteFile("token", "bad-token\n");
  Start({}, [&path](DfxBridgeOptions& o) {
    config::v1::Secret secret;
    secret.set_file(path);
    o.default_token = core::SecretSource::Create(secret).value();
    o.connection.auth_backoff.initial = 50ms;
    o.connection.auth_backoff.max = 200ms;
  });
  ASSERT_TRUE(WaitFor([&] { return CallAction().error_code() == grpc::StatusCode::UNAUTHENTICATED; }));
  EXPECT_FALSE(bridge_->Serving());
  dir.WriteFile("token", "good-token\n");
  EXPECT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  EXPECT_TRUE(CallAction().ok());
}

// The upstream refuses a token and later accepts the same one (fixed on its side): the
// session retries on the slow auth backoff by itself and the bridge serves again.
TEST_F(DfxBridgeTest, RefusedLoginIsRetriedOnTheAuthBackoffWithoutCalls) {
  Start({}, [](DfxBridgeOptions& o) {
    o.connection.auth_backoff.initial = 50ms;
    o.connection.auth_backoff.max = 200ms;
  });
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  emulator_->SetRefuseLogin(true);
  ASSERT_EQ(bridge_->CloseSession(bridge_->ListSessions().at(0).id()), absl::OkStatus());
  ASSERT_TRUE(WaitFor([&] { return CallAction().error_code() == grpc::StatusCode::UNAUTHENTICATED; }));
  EXPECT_FALSE(bridge_->Serving());
  const int attempts = emulator_->frames_received("0718");
  emulator_->SetRefuseLogin(false);
  EXPECT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  EXPECT_GT(emulator_->frames_received("0718"), attempts);
  EXPECT_TRUE(CallAction().ok());
}

// Requests are validated before a session is taken: bad calls with per-call tokens
// leave no session behind (they cannot fill max_sessions), and every per-call token a
// session was opened with is redacted from logs.
TEST_F(DfxBridgeTest, BadRequestsTakeNoSessionAndPerCallTokensAreRedacted) {
  Start({}, [](DfxBridgeOptions& o) {
    o.default_token = nullptr;
    o.max_sessions = 1;
  });
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(CallAction("01x0", absl::StrCat("bogus-token-", i)).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dfx-device-token", "bogus-token-create");
    v1::CreateMeasurementRequest req;  // no study_id
    v1::CreateMeasurementResponse resp;
    EXPECT_EQ(stub_->CreateMeasurement(&ctx, req, &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-dfx-device-token", "bogus-token-subscribe");
    v1::SubscribeResultsRequest req;  // no measurement_id
    auto reader = stub_->SubscribeResults(&ctx, req);
    v1::SubscribeResultsResponse res;
    EXPECT_FALSE(reader->Read(&res));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_TRUE(bridge_->ListSessions().empty());
  EXPECT_TRUE(CallAction("0100", "tenant-token-7731").ok());
  EXPECT_EQ(log::Redact("sent tenant-token-7731 upstream").find("tenant-token-7731"),
            std::string::npos);
}

// A chunk written after LAST is never sent upstream and never silently dropped: the
// stream ends FAILED_PRECONDITION naming it, with the last acknowledged chunk.
TEST_F(DfxBridgeTest, AChunkAfterLastIsRefusedNamingIt) {
  Start();
  std::string mid = CreateMeasurement();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 30s);
  auto stream = stub_->StreamMeasurement(&ctx);
  v1::MeasurementChunk first = Chunk(v1::STAGE_FIRST, 0, 10);
  first.set_measurement_id(mid);
  v1::MeasurementEvent ev;
  ASSERT_TRUE(stream->Write(first));
  ASSERT_TRUE(stream->Read(&ev));
  ASSERT_TRUE(stream->Write(Chunk(v1::STAGE_LAST, 1, 10)));
  ASSERT_TRUE(stream->Read(&ev));
  ASSERT_TRUE(ev.has_chunk_accepted());
  EXPECT_EQ(ev.chunk_accepted().chunk_order(), 1u);
  stream->Write(Chunk(v1::STAGE_CHUNK, 2, 10));
  while (stream->Read(&ev)) {
  }
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("chunk 2 arrived after the LAST chunk"), std::string::npos)
      << st.error_message();
  EXPECT_EQ(ErrorDetail(st).metadata["last_acked_chunk_order"], "1");
  EXPECT_EQ(emulator_->chunks().size(), 2u);
}

// A chunk waiting for pacing does not outlive its call: when the caller's deadline passes
// the chunk leaves the session's queue and never goes upstream (the pacing would have
// sent it ~5 s after the first).
TEST_F(DfxBridgeTest, AChunkWaitingForPacingIsDroppedAtTheCallsDeadline) {
  Start();  // pacing on, 5 s window
  std::string mid = CreateMeasurement();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 1500ms);
  auto stream = stub_->StreamMeasurement(&ctx);
  // The first chunk is 5 s of data: it fills the pacing window, so the next one waits.
  v1::MeasurementChunk first = Chunk(v1::STAGE_FIRST, 0, 5000);
  first.set_measurement_id(mid);
  ASSERT_TRUE(stream->Write(first));
  v1::MeasurementEvent ev;
  ASSERT_TRUE(stream->Read(&ev));
  ASSERT_TRUE(ev.has_chunk_accepted());
  stream->Write(Chunk(v1::STAGE_CHUNK, 1, 1000));
  while (stream->Read(&ev)) {
  }
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  // Nothing is left in the session: the waiting chunk was dropped, not kept for later.
  EXPECT_TRUE(WaitFor([&] {
    for (const auto& s : bridge_->ListSessions()) {
      if (s.in_flight_requests() != 0) return false;
    }
    return true;
  }));
  EXPECT_EQ(emulator_->chunks().size(), 1u);
  EXPECT_EQ(emulator_->frames_received("0506"), 1);
}

// A caller that goes while its chunk is in the session (here waiting for pacing) and its
// results subscription is open: the chunk is dropped, never sent later, the subscription
// released, the call counted CANCELLED and no longer held by the drain.
TEST_F(DfxBridgeTest, ACancelledStreamReleasesItsChunkInFlightAndItsSubscription) {
  Start();  // pacing on, 5 s window
  std::string mid = CreateMeasurement();
  grpc::ClientContext ctx;
  auto stream = stub_->StreamMeasurement(&ctx);
  v1::MeasurementChunk first = Chunk(v1::STAGE_FIRST, 0, 5000);
  first.set_measurement_id(mid);
  first.set_subscribe_results(true);
  ASSERT_TRUE(stream->Write(first));
  v1::MeasurementEvent ev;
  ASSERT_TRUE(stream->Read(&ev));
  ASSERT_TRUE(ev.has_chunk_accepted());
  ASSERT_TRUE(stream->Write(Chunk(v1::STAGE_CHUNK, 1, 1000)));
  // The second chunk is taken by the session (its pacing gate holds it).
  ASSERT_TRUE(WaitFor([&] {
    for (const auto& s : bridge_->ListSessions()) {
      if (s.in_flight_requests() != 0) return true;
    }
    return false;
  }));
  EXPECT_EQ(Subscribers(), 1u);
  ctx.TryCancel();
  while (stream->Read(&ev)) {
  }
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] {
    for (const auto& s : bridge_->ListSessions()) {
      if (s.in_flight_requests() != 0) return false;
    }
    return Subscribers() == 0;
  }));
  auto cancelled = [&] {
    return daemon_->metrics()
        .GetCounter("wsbridge_grpc_requests_total", "",
                    {{"method", "/wsbridge.dfx.v1.DfxService/StreamMeasurement"}, {"code", "CANCELLED"}})
        .value();
  };
  EXPECT_TRUE(WaitFor([&] { return cancelled() == 1; }));
  EXPECT_TRUE(WaitFor([&] {
    return daemon_->metrics().Render().find("wsbridge_grpc_calls_in_flight 0\n") != std::string::npos;
  }));
  EXPECT_EQ(emulator_->frames_received("0506"), 1);
}

// The shutdown drain ends an open measurement stream like any other error: with the
// measurement id and the last chunk the upstream acknowledged.
TEST_F(DfxBridgeTest, DrainedStreamsNameTheLastAcknowledgedChunk) {
  Start();
  std::string mid = CreateMeasurement();
  grpc::ClientContext ctx;
  auto stream = stub_->StreamMeasurement(&ctx);
  v1::MeasurementChunk first = Chunk(v1::STAGE_FIRST, 0, 10);
  first.set_measurement_id(mid);
  v1::MeasurementEvent ev;
  ASSERT_TRUE(stream->Write(first));
  ASSERT_TRUE(stream->Read(&ev));
  daemon_->RequestShutdown();
  while (stream->Read(&ev)) {
  }
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  Detail d = ErrorDetail(st);
  EXPECT_EQ(d.metadata["last_acked_chunk_order"], "0");
  EXPECT_EQ(d.metadata["measurement_id"], mid);
  daemon_->Wait();
}

// Open calls are bounded: past max_open_calls a new call fails RESOURCE_EXHAUSTED at
// once, naming the limit, and the open ones are unaffected.
TEST_F(DfxBridgeTest, OpenCallsAreBounded) {
  Start({}, [](DfxBridgeOptions& o) { o.max_open_calls = 2; });
  std::string mid = CreateMeasurement();
  // A finished call leaves the count when gRPC reports it done, a moment after the
  // caller saw its answer.
  auto* base = dynamic_cast<core::BridgeBase*>(bridge_);
  ASSERT_NE(base, nullptr);
  ASSERT_TRUE(WaitFor([&] { return base->calls().size() == 0; }));
  v1::SubscribeResultsRequest req;
  req.set_measurement_id(mid);
  grpc::ClientContext c1, c2;
  auto r1 = stub_->SubscribeResults(&c1, req);
  auto r2 = stub_->SubscribeResults(&c2, req);
  r1->WaitForInitialMetadata();
  r2->WaitForInitialMetadata();
  ASSERT_EQ(Subscribers(), 2u);
  grpc::Status st = CallAction();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_NE(st.error_message().find("max_open_calls"), std::string::npos);
  c1.TryCancel();
  v1::SubscribeResultsResponse res;
  while (r1->Read(&res)) {
  }
  r1->Finish();
  EXPECT_TRUE(WaitFor([&] { return CallAction().ok(); }));
  c2.TryCancel();
  while (r2->Read(&res)) {
  }
  r2->Finish();
}

TEST_F(DfxBridgeTest, SessionsAreKeyedByTokenAndCapped) {
  Start({}, [](DfxBridgeOptions& o) { o.max_sessions = 2; });
  EXPECT_TRUE(CallAction("0100", "").ok());
  EXPECT_TRUE(CallAction("0100", "tenant-a").ok());
  EXPECT_TRUE(CallAction("0100", "tenant-a").ok());
  grpc::Status st = CallAction("0100", "tenant-b");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("max_sessions"), std::string::npos);
  auto sessions = bridge_->ListSessions();
  ASSERT_EQ(sessions.size(), 2u);
  for (const auto& s : sessions) {
    EXPECT_EQ(s.id().rfind("dfx/", 0), 0u);
    EXPECT_EQ(s.id().size(), 4u + 8u);
    EXPECT_EQ(s.state(), admin::v1::SESSION_STATE_READY);
  }
  EXPECT_EQ(emulator_->logins(), 2);
  EXPECT_TRUE(bridge_->Serving());
}

// A rotated token file moves the default session to the new token on its own (no call
// needed) within the refresher's second; the old session drains and closes instead of
// staying pinned and counting against max_sessions.
TEST_F(DfxBridgeTest, RotatedDefaultTokenMovesToANewSessionAndClosesTheOld) {
  testing::TempDir dir;
  const std::string path = dir.WriteFile("token", "token-before\n");
  Start({}, [&path](DfxBridgeOptions& o) {
    config::v1::Secret secret;
    secret.set_file(path);
    o.default_token = core::SecretSource::Create(secret).value();
    o.max_sessions = 1;
  });
  ASSERT_TRUE(CallAction().ok());
  auto before = bridge_->ListSessions();
  ASSERT_EQ(before.size(), 1u);
  const std::string first_id = before[0].id();
  dir.WriteFile("token", "token-after\n");
  EXPECT_TRUE(WaitFor([&] {
    auto now = bridge_->ListSessions();
    return now.size() == 1 && now[0].id() != first_id &&
           now[0].state() == admin::v1::SESSION_STATE_READY;
  }));
  EXPECT_EQ(emulator_->logins(), 2);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
  // max_sessions is 1: the retired session no longer holds the slot.
  EXPECT_TRUE(CallAction().ok());
  EXPECT_TRUE(bridge_->Serving());
}

// An unanswered request fails with the bridge's own DEADLINE_EXCEEDED (the caller set
// no deadline, so request_timeout applies); several in flight expire one after another
// off the session's single deadline timer, and late answers are dropped.
TEST_F(DfxBridgeTest, UnansweredCallsExpireAtTheRequestTimeout) {
  Start({}, [](DfxBridgeOptions& o) { o.request_timeout = 300ms; });
  ASSERT_TRUE(CallAction().ok());  // logged in
  emulator_->SetAnswerDelay(3000ms);
  struct Pending {
    grpc::ClientContext ctx;
    v1::CallRequest req;
    v1::CallResponse resp;
    grpc::Status status;
    bool done = false;
  };
  absl::Mutex mu;
  std::vector<std::unique_ptr<Pending>> calls;
  for (int i = 0; i < 3; ++i) {
    auto p = std::make_unique<Pending>();
    p->req.set_action_id("0100");
    Pending* raw = p.get();
    calls.push_back(std::move(p));
    stub_->async()->Call(&raw->ctx, &raw->req, &raw->resp, [&mu, raw](grpc::Status st) {
      absl::MutexLock lock(&mu);
      raw->status = std::move(st);
      raw->done = true;
    });
  }
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&mu);
    for (const auto& c : calls) {
      if (!c->done) return false;
    }
    return true;
  }));
  for (const auto& c : calls) {
    EXPECT_EQ(c->status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << c->status.error_message();
    EXPECT_NE(c->status.error_message().find("no answer from the DFX upstream to action 0100"),
              std::string::npos)
        << c->status.error_message();
  }
  emulator_->SetAnswerDelay(0ms);
  EXPECT_TRUE(WaitFor([&] { return CallAction().ok(); }));
}

TEST_F(DfxBridgeTest, IdleSessionsClose) {
  Start({}, [](DfxBridgeOptions& o) { o.idle_session_timeout = 200ms; });
  ASSERT_TRUE(CallAction("0100", "tenant-a").ok());
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 2; }));
  // The per-call token's session closes; the configured token's session stays.
  EXPECT_TRUE(WaitFor([&] { return bridge_->ListSessions().size() == 1; }));
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
}

TEST_F(DfxBridgeTest, UpstreamDropMidStreamNamesLastAckedChunk) {
  Start();
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  // Frames on this connection so far: login, create. Chunks 0 and 1 are answered; the
  // connection drops when chunk 2 arrives, before it is processed.
  emulator_->SetDropAfterFrames(5);
  StreamOutcome out = RunStream(mid,
                                {Chunk(v1::STAGE_FIRST, 0, 10), Chunk(v1::STAGE_CHUNK, 1, 10),
                                 Chunk(v1::STAGE_CHUNK, 2, 10), Chunk(v1::STAGE_CHUNK, 3, 10)},
                                false);
  EXPECT_EQ(out.status.error_code(), grpc::StatusCode::UNAVAILABLE) << out.status.error_message();
  Detail d = ErrorDetail(out.status);
  EXPECT_EQ(d.reason, "OUTCOME_UNKNOWN");
  EXPECT_EQ(d.metadata["last_acked_chunk_order"], "1");
  EXPECT_EQ(out.accepted.size(), 2u);
  // Never resent blindly: the emulator saw chunk 2 once (and dropped it).
  EXPECT_EQ(emulator_->frames_received("0506"), 3);
  emulator_->SetDropAfterFrames(-1);
  // The caller resumes exactly where it stands.
  StreamOutcome resumed = RunStream(mid, {Chunk(v1::STAGE_CHUNK, 2, 10), Chunk(v1::STAGE_LAST, 3, 10)},
                                    false);
  ASSERT_TRUE(resumed.status.ok()) << resumed.status.error_message();
  EXPECT_EQ(emulator_->chunks().size(), 4u);
  EXPECT_EQ(emulator_->logins(), 2);
}

TEST_F(DfxBridgeTest, ReconnectRestoresSubscriptionsAndFailsUnaryInFlight) {
  Start();
  std::string mid = CreateMeasurement();
  v1::SubscribeResultsRequest sreq;
  sreq.set_measurement_id(mid);
  grpc::ClientContext sctx;
  auto reader = stub_->SubscribeResults(&sctx, sreq);
  reader->WaitForInitialMetadata();
  // login, create, subscribe; the 4th frame (a Call) drops the connection.
  emulator_->SetDropAfterFrames(4);
  {
    grpc::Status st = CallAction();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(ErrorDetail(st).reason, "OUTCOME_UNKNOWN");
    EXPECT_NE(st.error_message().find("outcome unknown"), std::string::npos);
  }
  emulator_->SetDropAfterFrames(-1);
  ASSERT_TRUE(WaitFor([&] { return emulator_->frames_received("0510") == 2; }));
  ASSERT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 1; }));
  StreamOutcome out = RunStream(
      mid, {Chunk(v1::STAGE_FIRST, 0, 10), Chunk(v1::STAGE_LAST, 1, 10)}, false);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  std::vector<v1::MeasurementResult> got;
  v1::SubscribeResultsResponse res;
  while (reader->Read(&res)) {
    EXPECT_GT(res.results_size(), 0);
    for (const auto& one : res.results()) got.push_back(one);
  }
  EXPECT_TRUE(reader->Finish().ok());
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(got[0].after_reconnect());
  EXPECT_FALSE(got[1].after_reconnect());
}

TEST_F(DfxBridgeTest, CancelReleasesTheUpstreamSubscription) {
  Start();
  std::string mid = CreateMeasurement();
  v1::SubscribeResultsRequest sreq;
  sreq.set_measurement_id(mid);
  {
    grpc::ClientContext sctx;
    auto reader = stub_->SubscribeResults(&sctx, sreq);
    reader->WaitForInitialMetadata();
    EXPECT_EQ(Subscribers(), 1u);
    sctx.TryCancel();
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ASSERT_TRUE(WaitFor([&] { return Subscribers() == 0; }));
  uint64_t unrouted = Counter("wsbridge_upstream_unrouted_frames_total");
  // The upstream still pushes results for the old request id: dropped and counted.
  StreamOutcome out = RunStream(mid, {Chunk(v1::STAGE_FIRST, 0, 10)}, false);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_TRUE(WaitFor([&] { return Counter("wsbridge_upstream_unrouted_frames_total") > unrouted; }));
  // A new subscriber subscribes afresh.
  grpc::ClientContext sctx;
  auto reader = stub_->SubscribeResults(&sctx, sreq);
  reader->WaitForInitialMetadata();
  EXPECT_EQ(emulator_->frames_received("0510"), 2);
  sctx.TryCancel();
  reader->Finish();
}

TEST_F(DfxBridgeTest, MalformedUpstreamFramesAreCountedAndSurvived) {
  Start();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  emulator_->SendRaw("short");
  emulator_->SendRaw("0100abcdef2x0{}");
  emulator_->SendRaw("0100abcdef200{bad json");
  EXPECT_TRUE(WaitFor([&] { return Counter("wsbridge_upstream_malformed_frames_total") == 3; }));
  grpc::ClientContext ctx;
  v1::CallRequest req;
  req.set_action_id("0100");
  v1::CallResponse resp;
  grpc::Status st = stub_->Call(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.status(), 200u);
  EXPECT_EQ(emulator_->logins(), 1);
}

TEST_F(DfxBridgeTest, StreamValidatesChunks) {
  Start();
  std::string mid = CreateMeasurement();
  {
    StreamOutcome out = RunStream("", {Chunk(v1::STAGE_FIRST, 0, 10)}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(out.status.error_message().find("measurement_id"), std::string::npos);
  }
  {
    auto c = Chunk(v1::STAGE_FIRST, 0, 10);
    c.set_duration_ms(0);
    StreamOutcome out = RunStream(mid, {c}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(out.status.error_message().find("duration_ms"), std::string::npos);
  }
  {
    auto c = Chunk(v1::STAGE_UNSPECIFIED, 0, 10);
    StreamOutcome out = RunStream(mid, {c}, false);
    EXPECT_EQ(out.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(out.status.error_message().find("stage"), std::string::npos);
  }
  EXPECT_EQ(emulator_->frames_received("0506"), 0);
}

TEST_F(DfxBridgeTest, HalfCloseEndsTheStreamCleanly) {
  Start();
  std::string mid = CreateMeasurement();
  StreamOutcome out = RunStream(mid, {Chunk(v1::STAGE_FIRST, 0, 10), Chunk(v1::STAGE_CHUNK, 1, 10)},
                                true);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.accepted.size(), 2u);
  EXPECT_TRUE(WaitFor([&] { return Subscribers() == 0; }));
}

TEST_F(DfxBridgeTest, DrainRefusesNewCallsAndShutdownEndsOpenOnes) {
  Start();
  std::string mid = CreateMeasurement();
  v1::SubscribeResultsRequest sreq;
  sreq.set_measurement_id(mid);
  grpc::ClientContext sctx;
  auto reader = stub_->SubscribeResults(&sctx, sreq);
  reader->WaitForInitialMetadata();
  bridge_->BeginDrain();
  EXPECT_FALSE(bridge_->Serving());
  EXPECT_EQ(CallAction().error_code(), grpc::StatusCode::UNAVAILABLE);
  std::promise<void> done;
  bridge_->Shutdown(grpc::Status(grpc::StatusCode::UNAVAILABLE, "going away"),
                    [&] { done.set_value(); });
  v1::SubscribeResultsResponse res;
  EXPECT_FALSE(reader->Read(&res));
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  ASSERT_EQ(done.get_future().wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
  EXPECT_TRUE(bridge_->ListSessions().empty());
}

// The DFX service reports its own calls (no interceptor on it): counted by method and
// final status, including cancellations, and held by the daemon's drain while open.
TEST_F(DfxBridgeTest, CallsAreCountedByMethodAndStatusWithoutTheInterceptor) {
  Start();
  auto count = [&](const std::string& method, const std::string& code) {
    return daemon_->metrics()
        .GetCounter("wsbridge_grpc_requests_total", "",
                    {{"method", "/wsbridge.dfx.v1.DfxService/" + method}, {"code", code}})
        .value();
  };
  ASSERT_TRUE(CallAction().ok());
  ASSERT_TRUE(CallAction().ok());
  ASSERT_EQ(CallAction("x").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(WaitFor([&] { return count("Call", "OK") == 2 && count("Call", "INVALID_ARGUMENT") == 1; }));
  std::string mid = CreateMeasurement();
  EXPECT_TRUE(WaitFor([&] { return count("CreateMeasurement", "OK") == 1; }));

  // An open stream holds the drain until it is cancelled; then it counts as CANCELLED.
  v1::SubscribeResultsRequest sreq;
  sreq.set_measurement_id(mid);
  grpc::ClientContext sctx;
  auto reader = stub_->SubscribeResults(&sctx, sreq);
  reader->WaitForInitialMetadata();
  auto in_flight = [&] {
    return daemon_->metrics().Render().find("wsbridge_grpc_calls_in_flight 1\n") != std::string::npos;
  };
  EXPECT_TRUE(WaitFor(in_flight));  // the open stream is what the drain waits for
  EXPECT_EQ(count("SubscribeResults", "CANCELLED"), 0u);
  sctx.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return count("SubscribeResults", "CANCELLED") == 1; }));
  EXPECT_TRUE(WaitFor([&] {
    return daemon_->metrics().Render().find("wsbridge_grpc_calls_in_flight 0\n") != std::string::npos;
  }));
}

TEST_F(DfxBridgeTest, CloseSessionByAdminId) {
  Start();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sessions = bridge_->ListSessions();
  ASSERT_EQ(sessions.size(), 1u);
  EXPECT_EQ(bridge_->CloseSession("dfx/nope").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(bridge_->CloseSession(sessions[0].id()).ok());
  // The configured token's session is always on: it comes back.
  EXPECT_TRUE(WaitFor([&] { return emulator_->logins() == 2; }));
  EXPECT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
}

}  // namespace
}  // namespace wsbridge::dfx
