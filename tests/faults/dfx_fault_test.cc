// Fault scenarios for the DFX bridge inside the real daemon: the bridge talks to the
// DFX emulator through the fault proxy, and a client measures as a real one would
// (each chunk after the previous was accepted; after a failed stream it resumes after
// the last acknowledged chunk). Every scenario checks the invariants:
//  - no acknowledged chunk lost or duplicated: each acknowledged ChunkOrder is in the
//    emulator's record exactly once, and the record holds exactly the measurement;
//  - subscribers are told of every gap: the first result after a reconnect carries
//    after_reconnect, and a result that never arrived is followed by one that does;
//  - no crash (the daemon is this process), and the bridge serves again afterwards.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/bridge.h"
#include "bridges/core/upstream_config.h"
#include "bridges/dfx/dfx_bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
namespace v1 = wsbridge::dfx::v1;
using Clock = std::chrono::steady_clock;

v1::MeasurementChunk Chunk(uint32_t order, uint32_t count) {
  v1::MeasurementChunk c;
  c.set_stage(order == 0 ? v1::STAGE_FIRST
                         : order + 1 == count ? v1::STAGE_LAST : v1::STAGE_CHUNK);
  c.set_payload(emulator::MakeEmulatorChunk(order, 10, "data"));
  c.set_duration_ms(10);
  return c;
}

std::string Reason(const grpc::Status& st) {
  google::rpc::Status s;
  if (!s.ParseFromString(st.error_details())) return "";
  for (const auto& any : s.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) return info.reason();
  }
  return "";
}

int ResultOrder(const v1::MeasurementResult& r) {
  static const std::regex kOrder(R"re("ChunkOrder":(\d+))re");
  std::smatch m;
  const std::string& body = r.json_body();
  return std::regex_search(body, m, kOrder) ? std::stoi(m[1]) : -1;
}

struct Hooks {
  // After chunk `order` was acknowledged, before the next one is written.
  std::function<void(uint32_t order)> after_ack;
  // After a stream failed, before the client waits for the bridge and resumes.
  std::function<void(const grpc::Status&)> on_failure;
  // Where the client resumes after a failed stream (`next`: the first unacknowledged
  // chunk). A client learns from the upstream's MISALIGNED_CHUNK answer that a chunk
  // whose outcome was unknown did arrive.
  std::function<uint32_t(uint32_t next)> resume_at;
};

struct Measured {
  std::vector<uint32_t> acked;          // every acknowledgement, in order
  std::vector<grpc::Status> failures;   // streams that ended with an error
  std::vector<Clock::time_point> failed_at;
  bool complete = false;
};

struct SubscriberLog {
  std::vector<std::pair<int, bool>> results;  // (ChunkOrder, after_reconnect)
  grpc::Status status;
};

class DfxFaultTest : public ::testing::Test {
 protected:
  // The bridge's upstream URL points at the proxy, which forwards to the emulator.
  // `faults` are set on the proxy before the daemon (and so the bridge) starts.
  void Start(std::function<void(dfx::DfxBridgeOptions&)> tweak = nullptr, bool tls = false,
             std::function<void(FaultProxy&)> faults = nullptr) {
    emulator::DfxEmulatorOptions eopts;
    if (tls) {
      ca_ = pki_.MakeCa("fault-ca");
      auto server = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"});
      eopts.tls = true;
      eopts.cert_pem = server.cert_pem;
      eopts.key_pem = server.key_pem;
    }
    emulator_ = std::make_unique<emulator::DfxEmulator>(std::move(eopts));
    ASSERT_TRUE(emulator_->Start().ok());
    proxy_ = std::make_unique<FaultProxy>(emulator_->port());
    ASSERT_TRUE(proxy_->Start().ok());
    if (faults) faults(*proxy_);

    dfx::DfxBridgeOptions o;
    o.url = absl::StrCat(tls ? "wss" : "ws", "://127.0.0.1:", proxy_->port());
    o.connection.allow_plaintext = !tls;
    if (tls) o.connection.tls.ca_file = ca_.cert_file;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.default_token = core::SecretSource::Fixed("dfx-s3cr3t-device");
    o.request_timeout = 30s;  // faults, not this timeout, must end a stuck call
    o.rate_limit_retry = 50ms;
    if (tweak) tweak(o);
    registry_.Register(config::v1::DfxBridgeConfig::descriptor()->full_name(),
                       [this, o](const google::protobuf::Message&, const core::BridgeContext& ctx)
                           -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                         auto bridge = dfx::NewDfxBridge(o, ctx);
                         if (bridge.ok()) bridge_ = bridge->get();
                         return bridge;
                       });
    config::v1::DaemonConfig cfg;
    cfg.mutable_server()->set_listen("127.0.0.1:0");
    cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
    cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
    auto* b = cfg.add_bridges();
    b->set_name("dfx");
    b->mutable_dfx()->mutable_upstream()->set_url(o.url);
    absl::Status defaults = config::ApplyConfigDefaults(&cfg);
    ASSERT_TRUE(defaults.ok()) << defaults;
    daemon::DaemonOptions dopts;
    dopts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
    absl::Status started = daemon_->Start();
    ASSERT_TRUE(started.ok()) << started;
    ASSERT_NE(bridge_, nullptr);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::DfxService::NewStub(channel_);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
      daemon_.reset();
    }
    if (proxy_ != nullptr) proxy_->Stop();
    if (emulator_ != nullptr) emulator_->Stop();
  }

  std::string CreateMeasurement() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::CreateMeasurementRequest req;
    req.set_study_id("study-1");
    v1::CreateMeasurementResponse resp;
    grpc::Status st = stub_->CreateMeasurement(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.measurement_id();
  }

  // Measures chunks 0..count-1 over as many streams as needed (at most 10).
  Measured Measure(const std::string& mid, uint32_t count, const Hooks& hooks = {}) {
    Measured out;
    uint32_t next = 0;
    for (int attempt = 0; attempt < 10 && next < count; ++attempt) {
      EXPECT_TRUE(WaitFor([&] { return bridge_->Serving(); }, 20s)) << "bridge never served again";
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + 30s);
      auto stream = stub_->StreamMeasurement(&ctx);
      bool first = true;
      uint32_t on_stream = 0;
      while (next < count) {
        v1::MeasurementChunk c = Chunk(next, count);
        if (first) c.set_measurement_id(mid);
        first = false;
        if (!stream->Write(c)) break;
        bool accepted = false;
        v1::MeasurementEvent ev;
        while (!accepted && stream->Read(&ev)) {
          if (!ev.has_chunk_accepted()) continue;
          // chunk_order counts on this stream; upstream_chunk_order is the measurement's.
          EXPECT_EQ(ev.chunk_accepted().chunk_order(), on_stream);
          EXPECT_EQ(ev.chunk_accepted().upstream_chunk_order(), next);
          out.acked.push_back(static_cast<uint32_t>(ev.chunk_accepted().upstream_chunk_order()));
          accepted = true;
        }
        if (!accepted) break;
        if (hooks.after_ack) hooks.after_ack(next);
        ++next;
        ++on_stream;
      }
      stream->WritesDone();
      v1::MeasurementEvent ev;
      while (stream->Read(&ev)) {
      }
      grpc::Status st = stream->Finish();
      if (st.ok() && next == count) {
        out.complete = true;
        break;
      }
      out.failures.push_back(st);
      out.failed_at.push_back(Clock::now());
      if (hooks.on_failure) hooks.on_failure(st);
      if (hooks.resume_at) next = hooks.resume_at(next);
    }
    return out;
  }

  // A SubscribeResults call read on its own thread until the LAST result ends it.
  struct Subscriber {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::SubscribeResultsResponse>> reader;
    SubscriberLog log;
    std::thread thread;
  };
  std::unique_ptr<Subscriber> Subscribe(const std::string& mid) {
    auto s = std::make_unique<Subscriber>();
    s->ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    v1::SubscribeResultsRequest req;
    req.set_measurement_id(mid);
    s->reader = stub_->SubscribeResults(&s->ctx, req);
    s->reader->WaitForInitialMetadata();
    s->thread = std::thread([p = s.get()] {
      v1::SubscribeResultsResponse res;
      while (p->reader->Read(&res)) {
        for (const auto& r : res.results()) p->log.results.emplace_back(ResultOrder(r), r.after_reconnect());
      }
      p->log.status = p->reader->Finish();
    });
    return s;
  }
  static SubscriberLog Finish(Subscriber& s) {
    s.thread.join();
    return s.log;
  }

  // No acknowledged chunk lost or duplicated; the emulator holds exactly 0..count-1.
  // `unacked`: chunks whose acknowledgement was lost to the fault (recorded, never acked).
  void ExpectExactlyOnce(const std::string& mid, const Measured& m, uint32_t count,
                         const std::set<int>& unacked = {}) {
    EXPECT_TRUE(m.complete);
    std::map<int, int> recorded;
    for (const auto& c : emulator_->chunks()) {
      EXPECT_EQ(c.measurement_id, mid);
      ++recorded[c.chunk_order];
    }
    std::map<int, int> acked;
    for (uint32_t o : m.acked) ++acked[static_cast<int>(o)];
    for (const auto& [order, n] : acked) {
      EXPECT_EQ(n, 1) << "chunk " << order << " acknowledged " << n << " times";
      EXPECT_EQ(recorded[order], 1) << "acknowledged chunk " << order << " recorded "
                                    << recorded[order] << " times upstream";
    }
    for (int order : unacked) {
      EXPECT_EQ(acked.count(order), 0u) << order;
      EXPECT_EQ(recorded[order], 1) << "chunk " << order << " of unknown outcome recorded "
                                    << recorded[order] << " times upstream";
    }
    EXPECT_EQ(acked.size() + unacked.size(), count);
    EXPECT_EQ(recorded.size(), count);
  }

  // Every gap told: results never repeat, come from recorded chunks, and the first
  // result for a chunk after `fault_after` (the last chunk acknowledged before the
  // fault) is marked after_reconnect, as is any result following a missing one.
  void ExpectGapsTold(const SubscriberLog& log, int fault_after, uint32_t count) {
    EXPECT_TRUE(log.status.ok()) << log.status.error_message();
    ASSERT_FALSE(log.results.empty());
    std::map<int, int> seen;
    int prev = -1;
    bool first_after_fault = true;
    for (const auto& [order, after_reconnect] : log.results) {
      ASSERT_GE(order, 0);
      EXPECT_EQ(++seen[order], 1) << "result for chunk " << order << " delivered twice";
      if (order > prev + 1) {
        EXPECT_TRUE(after_reconnect) << "results for chunks " << prev + 1 << ".." << order - 1
                                     << " were lost without telling the subscriber";
      }
      if (fault_after >= 0 && order > fault_after && first_after_fault) {
        EXPECT_TRUE(after_reconnect) << "first result after the fault (chunk " << order << ")";
        first_after_fault = false;
      }
      if (fault_after >= 0 && order <= fault_after) {
        EXPECT_FALSE(after_reconnect) << order;
      }
      prev = order;
    }
    EXPECT_EQ(log.results.back().first, static_cast<int>(count) - 1);
  }

  grpc::Status CallAction() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::CallRequest req;
    req.set_action_id("0100");
    v1::CallResponse resp;
    return stub_->Call(&ctx, req, &resp);
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_;
  core::BridgeRegistry registry_;
  std::unique_ptr<emulator::DfxEmulator> emulator_;
  std::unique_ptr<FaultProxy> proxy_;
  std::unique_ptr<daemon::Daemon> daemon_;
  core::Bridge* bridge_ = nullptr;  // owned by daemon_
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DfxService::Stub> stub_;
};

constexpr uint32_t kChunks = 8;

// The upstream connection is reset between two chunks: RST towards the bridge, or
// towards the upstream (the bridge then sees the proxy's FIN without a close frame).
class DfxResetTest : public DfxFaultTest, public ::testing::WithParamInterface<Direction> {};

TEST_P(DfxResetTest, ResetMidStream) {
  Start();
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  const uint64_t accepted_before = proxy_->counters().connections_accepted;
  constexpr uint32_t kFaultAfter = 3;
  Hooks hooks;
  hooks.after_ack = [&](uint32_t order) {
    if (order != kFaultAfter) return;
    proxy_->SetMode(GetParam(), Mode::kReset);
    ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == 0; }));
    proxy_->Heal();
  };
  Measured m = Measure(mid, kChunks, hooks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_GT(proxy_->counters().connections_accepted, accepted_before);
  EXPECT_GE(emulator_->logins(), 2);
  for (const auto& st : m.failures) {
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  }
  ExpectGapsTold(Finish(*sub), kFaultAfter, kChunks);
  EXPECT_TRUE(CallAction().ok());
}

INSTANTIATE_TEST_SUITE_P(BothDirections, DfxResetTest,
                         ::testing::Values(Direction::kUpstreamToClient,
                                           Direction::kClientToUpstream),
                         [](const ::testing::TestParamInfo<Direction>& info) {
                           return info.param == Direction::kUpstreamToClient ? "TowardsTheBridge"
                                                                             : "TowardsTheUpstream";
                         });

// Reset while a chunk is in flight: the upstream recorded it, its answer never came
// back. The stream ends UNAVAILABLE / OUTCOME_UNKNOWN, the bridge never resends the
// chunk, and the upstream holds it exactly once; its result is a gap the subscriber is
// told about.
TEST_F(DfxFaultTest, ResetWithAChunkInFlightNeverResendsIt) {
  Start();
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  constexpr uint32_t kInFlight = 4;
  std::thread injector;
  Hooks hooks;
  hooks.after_ack = [&](uint32_t order) {
    if (order + 1 != kInFlight) return;
    // Answers (and results) to the next chunk are held long enough for the reset to
    // come first.
    emulator_->SetAnswerDelay(5s);
    injector = std::thread([&] {
      ASSERT_TRUE(WaitFor([&] { return emulator_->chunks().size() == kInFlight + 1; }));
      emulator_->SetAnswerDelay(0ms);
      proxy_->SetMode(Direction::kUpstreamToClient, Mode::kReset);
      ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == 0; }));
      proxy_->Heal();
    });
  };
  int resumed = 0;
  hooks.resume_at = [&](uint32_t next) {
    ++resumed;
    EXPECT_EQ(next, kInFlight);
    return next + 1;
  };
  Measured m = Measure(mid, kChunks, hooks);
  if (injector.joinable()) injector.join();
  ASSERT_EQ(resumed, 1);
  ASSERT_EQ(m.failures.size(), 1u);
  EXPECT_EQ(m.failures[0].error_code(), grpc::StatusCode::UNAVAILABLE) << m.failures[0].error_message();
  EXPECT_EQ(Reason(m.failures[0]), "OUTCOME_UNKNOWN") << m.failures[0].error_message();
  ExpectExactlyOnce(mid, m, kChunks, {static_cast<int>(kInFlight)});
  // One frame per chunk the client wrote: nothing was resent behind its back.
  EXPECT_EQ(emulator_->frames_received("0506"), static_cast<int>(kChunks));
  ExpectGapsTold(Finish(*sub), kInFlight - 1, kChunks);
}

// Both directions black-holed mid-stream: the sockets stay open and nothing passes, so
// only the WebSocket keepalive can notice. The chunk in flight is never acknowledged
// (it never arrived), the stream ends within ping interval + pong timeout, and the
// client resumes with it once healed.
TEST_F(DfxFaultTest, BlackHoleDetectedWithinTheHeartbeatDeadline) {
  constexpr auto kPing = 200ms;
  constexpr auto kPong = 400ms;
  Start([&](dfx::DfxBridgeOptions& o) {
    o.connection.keepalive.ping_interval = kPing;
    o.connection.keepalive.pong_timeout = kPong;
    o.connection.handshake_timeout = 1s;
  });
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  constexpr uint32_t kFaultAfter = 2;
  std::optional<Clock::time_point> holed_at;
  Hooks hooks;
  hooks.after_ack = [&](uint32_t order) {
    if (order != kFaultAfter || holed_at) return;
    proxy_->SetMode(Direction::kClientToUpstream, Mode::kBlackHole);
    proxy_->SetMode(Direction::kUpstreamToClient, Mode::kBlackHole);
    holed_at = Clock::now();
  };
  hooks.on_failure = [&](const grpc::Status&) { proxy_->Heal(); };
  Measured m = Measure(mid, kChunks, hooks);
  ASSERT_TRUE(holed_at.has_value());
  ASSERT_FALSE(m.failures.empty()) << "the black hole went unnoticed";
  auto detected = m.failed_at.front() - *holed_at;
  RecordProperty("detected_ms", static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(detected).count()));
  // The deadline is ping interval + pong timeout; the margin is for a loaded machine
  // (without keepalive the stream would wait for its 30 s request timeout).
  EXPECT_LE(detected, kPing + kPong + 3s)
      << std::chrono::duration_cast<std::chrono::milliseconds>(detected).count() << " ms";
  EXPECT_EQ(m.failures.front().error_code(), grpc::StatusCode::UNAVAILABLE)
      << m.failures.front().error_message();
  EXPECT_EQ(Reason(m.failures.front()), "OUTCOME_UNKNOWN") << m.failures.front().error_message();
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_GT(proxy_->counters().bytes_dropped, 0u);
  ExpectGapsTold(Finish(*sub), kFaultAfter, kChunks);
  EXPECT_TRUE(CallAction().ok());
}

// Every byte both ways in 1-byte writes: frames and handshakes arrive in pieces and
// everything still works, on one connection, with no gap reported.
TEST_F(DfxFaultTest, SlicingChangesNothing) {
  Start(nullptr, false, [](FaultProxy& proxy) {
    Shaping slice;
    slice.slice = true;
    proxy.SetShaping(Direction::kClientToUpstream, slice);
    proxy.SetShaping(Direction::kUpstreamToClient, slice);
  });
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  Measured m = Measure(mid, kChunks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_TRUE(m.failures.empty());
  SubscriberLog log = Finish(*sub);
  ExpectGapsTold(log, -1, kChunks);
  EXPECT_EQ(log.results.size(), kChunks);
  for (const auto& [order, after_reconnect] : log.results) EXPECT_FALSE(after_reconnect) << order;
  EXPECT_TRUE(CallAction().ok());
  EXPECT_EQ(emulator_->logins(), 1);
  // Every byte went on its own (the counters move just after each write completes).
  EXPECT_TRUE(WaitFor([&] {
    ProxyCounters c = proxy_->counters();
    return c.writes_upstream_to_client == c.bytes_upstream_to_client &&
           c.writes_client_to_upstream == c.bytes_client_to_upstream;
  }));
  EXPECT_GT(proxy_->counters().bytes_upstream_to_client, 1000u);
}

// A TLS handshake held back (the server's first bytes stalled) but within the
// handshake timeout: the bridge waits, connects once, and works.
TEST_F(DfxFaultTest, SlowTlsHandshakeWithinTheTimeoutConnectsOnce) {
  auto started = Clock::now();
  Start([](dfx::DfxBridgeOptions& o) { o.connection.handshake_timeout = 5s; }, /*tls=*/true,
        [](FaultProxy& proxy) {
          Shaping stall;
          stall.stall_bytes = 64 * 1024;  // the whole server flight and the upgrade answer
          stall.stall_for = 500ms;
          proxy.SetShaping(Direction::kUpstreamToClient, stall);
        });
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }, 20s));
  EXPECT_GE(Clock::now() - started, 500ms);  // the stall was in the way
  const uint64_t accepted = proxy_->counters().connections_accepted;
  Measured m = Measure(mid, kChunks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_TRUE(m.failures.empty());
  EXPECT_EQ(emulator_->logins(), 1);
  EXPECT_EQ(proxy_->counters().connections_accepted, accepted) << "the bridge reconnected";
}

// A TLS handshake stalled beyond the handshake timeout: the bridge gives up on each
// attempt, retries with backoff and is not serving; healed, it serves and works.
TEST_F(DfxFaultTest, StalledTlsHandshakeIsRetriedAndRecovers) {
  Start(
      [&](dfx::DfxBridgeOptions& o) {
        o.connection.handshake_timeout = 300ms;
        o.connection.connect_timeout = 1s;
      },
      /*tls=*/true,
      [](FaultProxy& proxy) {
        Shaping stall;
        stall.stall_bytes = 64 * 1024;
        stall.stall_for = 10s;  // far beyond the handshake timeout
        proxy.SetShaping(Direction::kUpstreamToClient, stall);
      });
  // Several attempts time out, none succeeds.
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_accepted >= 3; }, 20s));
  EXPECT_FALSE(bridge_->Serving());
  const int logins = emulator_->logins();
  EXPECT_EQ(logins, 0);
  proxy_->Heal();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }, 20s));
  EXPECT_EQ(emulator_->logins(), logins + 1);
  std::string mid = CreateMeasurement();
  Measured m = Measure(mid, kChunks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_TRUE(m.failures.empty());
  EXPECT_TRUE(CallAction().ok());
}

// --- Close codes from the upstream -----------------------------------------------------
//
// Choices (the DFX page names no close codes; also in docs/bridges/dfx.md):
//  - 1001 (going away: a deploy or restart), 1011 (internal error) and a close frame
//    without a code (reported as 1005) are a lost connection like any other: reconnect
//    under the normal backoff, nothing in flight resent (OUTCOME_UNKNOWN), subscriptions
//    restored with a gap mark.
//  - 1008 (policy violation) is what a gateway sends for a credential it no longer
//    accepts: the default classification takes it as a refused credential, so the session
//    retries under the slow auth backoff (never a fast reconnect loop) with the token read
//    again, and callers learn UNAUTHENTICATED meanwhile.

class DfxCloseCodeTest : public DfxFaultTest, public ::testing::WithParamInterface<int> {};

// The upstream closes the connection between two chunks with the code under test.
TEST_P(DfxCloseCodeTest, CloseBetweenChunksReconnectsAndLosesNothing) {
  Start();
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  const int logins_before = emulator_->logins();
  constexpr uint32_t kFaultAfter = 3;
  Hooks hooks;
  hooks.after_ack = [&](uint32_t order) {
    if (order != kFaultAfter) return;
    const size_t ended = emulator_->close_codes().size();
    emulator_->CloseAll(GetParam(), GetParam() == 0 ? "" : "closing");
    ASSERT_TRUE(WaitFor([&] { return emulator_->close_codes().size() > ended; }));
  };
  Measured m = Measure(mid, kChunks, hooks);
  ExpectExactlyOnce(mid, m, kChunks);
  for (const auto& st : m.failures) {
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  }
  EXPECT_GE(emulator_->logins(), logins_before + 1);
  ExpectGapsTold(Finish(*sub), kFaultAfter, kChunks);
  EXPECT_TRUE(CallAction().ok());
  EXPECT_TRUE(bridge_->Serving());
}

INSTANTIATE_TEST_SUITE_P(Codes, DfxCloseCodeTest, ::testing::Values(1001, 1011, 0),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 0 ? std::string("NoCode")
                                                  : absl::StrCat("Code", info.param);
                         });

// 1008 after every login, for a while: the bridge backs off under auth_backoff (here
// 300 ms doubling to 5 s; 5 s to 5 min by default), not the normal 20 ms backoff, so the
// logins over a 3 s window stay a handful; callers learn UNAUTHENTICATED. When the
// upstream stops, the session comes back on its own.
TEST_F(DfxFaultTest, PolicyViolationCloseIsNotAFastReconnectLoop) {
  Start([](dfx::DfxBridgeOptions& o) {
    o.connection.auth_backoff = core::BackoffPolicy{300ms, 5s, 2.0};
  });
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  ASSERT_TRUE(CallAction().ok());
  emulator_->SetCloseAfterLogin(1008, "policy violation");
  emulator_->CloseAll(1008, "policy violation");
  ASSERT_TRUE(WaitFor([&] { return !bridge_->Serving(); }));
  const int logins_at = emulator_->logins();
  const auto start = Clock::now();
  WaitFor([&] { return Clock::now() - start >= 3s; }, 4s);  // the measuring window
  const int logins = emulator_->logins() - logins_at;
  RecordProperty("logins_in_3s", logins);
  std::printf("1008 after every login: %d logins in 3 s\n", logins);
  // At the normal backoff (20 ms, cap 200 ms) this would be ~30; a loop, thousands.
  EXPECT_LE(logins, 10) << "1008 became a fast reconnect loop";
  grpc::Status refused = CallAction();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED) << refused.error_message();
  emulator_->SetCloseAfterLogin(-1);
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }, 20s));
  EXPECT_TRUE(WaitFor([&] { return CallAction().ok(); }, 20s));
}

// --- A slow gRPC consumer ----------------------------------------------------------------

// Two subscribers share a measurement's results; one never reads (its HTTP/2 window is
// small, so gRPC cannot absorb the results for it). It is ended RESOURCE_EXHAUSTED
// SLOW_CONSUMER once subscriber_queue results wait for it, and learns so when it reads
// again; the other gets every result in order and ends OK; memory held for the slow one
// stays bounded by the queue (what it received is far below what was produced).
TEST_F(DfxFaultTest, SlowSubscriberIsEndedAloneAndTold) {
  // The queue leaves the fast subscriber room for a loaded machine (with 8, a reader
  // thread descheduled for ~80 ms of results was ended too, 1 run in 30 under load).
  constexpr size_t kQueue = 32;
  constexpr uint32_t kMany = 160;
  Start([](dfx::DfxBridgeOptions& o) { o.subscriber_queue = kQueue; });
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto fast = Subscribe(mid);
  // The slow one: its own connection, a tiny flow-control window, never read until the end.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto slow_channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                                grpc::InsecureChannelCredentials(), args);
  auto slow_stub = v1::DfxService::NewStub(slow_channel);
  grpc::ClientContext slow_ctx;
  slow_ctx.set_deadline(std::chrono::system_clock::now() + 60s);
  v1::SubscribeResultsRequest req;
  req.set_measurement_id(mid);
  auto slow = slow_stub->SubscribeResults(&slow_ctx, req);
  slow->WaitForInitialMetadata();

  Measured m = Measure(mid, kMany);
  ExpectExactlyOnce(mid, m, kMany);
  SubscriberLog fast_log = Finish(*fast);
  ExpectGapsTold(fast_log, -1, kMany);
  EXPECT_EQ(fast_log.results.size(), kMany) << "the fast subscriber was held back or lost results";

  // Now the slow one reads what gRPC held for it, then its status.
  size_t received = 0;
  v1::SubscribeResultsResponse res;
  while (slow->Read(&res)) received += static_cast<size_t>(res.results_size());
  grpc::Status st = slow->Finish();
  RecordProperty("slow_received", static_cast<int>(received));
  std::printf("slow subscriber: %zu of %u results reached it before SLOW_CONSUMER\n", received, kMany);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  EXPECT_EQ(Reason(st), "SLOW_CONSUMER") << st.error_message();
  EXPECT_LT(received, kMany);
  EXPECT_TRUE(CallAction().ok());
}

// --- Token rotation through a mounted file -----------------------------------------------

// A Kubernetes Secret volume: the key is a symlink through "..data", which points at a
// timestamped directory; an update writes a new directory and renames a new "..data"
// symlink over the old one (atomic), then removes the old directory.
class MountedSecret {
 public:
  explicit MountedSecret(const std::string& value) { Write(value); }
  std::string path() const { return dir_.path() + "/token"; }
  void Write(const std::string& value) {
    namespace fs = std::filesystem;
    const std::string stamp = absl::StrCat("..2026_12_01_", ++version_);
    fs::create_directory(dir_.path() + "/" + stamp);
    dir_.WriteFile(stamp + "/token", value + "\n");
    fs::create_symlink(stamp, dir_.path() + "/..data_tmp");
    fs::rename(dir_.path() + "/..data_tmp", dir_.path() + "/..data");
    if (!fs::exists(fs::symlink_status(path()))) fs::create_symlink("..data/token", path());
    if (!previous_.empty()) fs::remove_all(dir_.path() + "/" + previous_);
    previous_ = stamp;
  }

 private:
  testing::TempDir dir_;
  int version_ = 0;
  std::string previous_;
};

std::shared_ptr<core::SecretSource> FileSecret(const std::string& path) {
  config::v1::Secret secret;
  secret.set_file(path);
  auto source = core::SecretSource::Create(secret);
  EXPECT_TRUE(source.ok()) << source.status();
  return source.ok() ? *source : nullptr;
}

// The mounted token is refused (revoked); the Secret is updated; the bridge logs in with
// the new one on its own (no restart, no call needed) and serves.
TEST_F(DfxFaultTest, RotatedMountedTokenReplacesARefusedOne) {
  MountedSecret secret("bad-s3cr3t-revoked");  // the emulator refuses "bad..." tokens
  Start([&](dfx::DfxBridgeOptions& o) {
    o.default_token = FileSecret(secret.path());
    o.connection.auth_backoff = core::BackoffPolicy{100ms, 500ms, 2.0};
  });
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_accepted >= 2; }));
  EXPECT_FALSE(bridge_->Serving());
  EXPECT_EQ(emulator_->logins(), 0);
  grpc::Status refused = CallAction();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAUTHENTICATED) << refused.error_message();
  ASSERT_EQ(bridge_->ListSessions().size(), 1u);
  secret.Write("dfx-s3cr3t-rotated");
  // The bridge serves with the new token: one ready session on one connection. Either
  // the pool replaced the refused session with one for the new token, or the refused
  // session's own retry began after the refresher had re-read the file and logged in
  // with the new token, and the pool keeps it as the new token's session.
  auto serving_on_one_session = [&] {
    const auto now = bridge_->ListSessions();
    return now.size() == 1 && now[0].state() == admin::v1::SESSION_STATE_READY &&
           emulator_->open_connections() == 1 && bridge_->Serving();
  };
  ASSERT_TRUE(WaitFor(serving_on_one_session, 20s)) << "the rotated token was not picked up";
  // A call takes the default session through the pool, which sees the rotation by now if
  // it had not (the session logged in with the value the refresher read).
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor(serving_on_one_session, 20s));
  // One login with the new token, and at most one more: a retry of the refused session
  // that began just before the refresher re-read the file reads the token as it logs in
  // (the new one), but the pool cannot tell and replaces it.
  const int logins = emulator_->logins();
  EXPECT_GE(logins, 1);
  EXPECT_LE(logins, 2);
  Measured m = Measure(mid, kChunks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_EQ(emulator_->logins(), logins) << "logged in again after serving";
}

// Rotated while a measurement streams: the stream goes on (its measurement belongs to the
// old token's session, which finishes its calls before closing), new calls use the new
// token's session, and no chunk is lost or duplicated.
TEST_F(DfxFaultTest, RotatedMountedTokenDuringAMeasurementLosesNothing) {
  MountedSecret secret("dfx-s3cr3t-before");
  Start([&](dfx::DfxBridgeOptions& o) { o.default_token = FileSecret(secret.path()); });
  std::string mid = CreateMeasurement();
  ASSERT_TRUE(WaitFor([&] { return bridge_->Serving(); }));
  auto sub = Subscribe(mid);
  std::string first_session;
  Hooks hooks;
  hooks.after_ack = [&](uint32_t order) {
    if (order != 2) return;
    auto before = bridge_->ListSessions();
    ASSERT_EQ(before.size(), 1u);
    first_session = before[0].id();
    secret.Write("dfx-s3cr3t-after");
    // The new token's session is up (the refresher re-reads the file every second).
    ASSERT_TRUE(WaitFor([&] {
      for (const auto& s : bridge_->ListSessions()) {
        if (s.id() != first_session && s.state() == admin::v1::SESSION_STATE_READY) return true;
      }
      return false;
    }, 20s));
  };
  Measured m = Measure(mid, kChunks, hooks);
  ExpectExactlyOnce(mid, m, kChunks);
  EXPECT_TRUE(m.failures.empty()) << m.failures.front().error_message();
  ExpectGapsTold(Finish(*sub), -1, kChunks);
  EXPECT_EQ(emulator_->logins(), 2);
  // The old session closes once its calls are done; the new one serves.
  EXPECT_TRUE(WaitFor([&] {
    auto now = bridge_->ListSessions();
    return now.size() == 1 && now[0].id() != first_session;
  }));
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
  EXPECT_TRUE(bridge_->Serving());
  EXPECT_TRUE(CallAction().ok());
}

}  // namespace
}  // namespace wsbridge::faults
