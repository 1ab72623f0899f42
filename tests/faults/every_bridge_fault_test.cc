// Fault scenarios every bridge must survive, each run for DFX, NLX, Emogg and Nexora: the
// bridge inside the real daemon (DaemonHarness), its emulator behind the fault proxy.
//  - Bad TLS (wrong host, unknown CA, expired certificate, an upstream offering only
//    TLS <= 1.1) is refused: no WebSocket ever opens upstream, callers get UNAVAILABLE
//    naming the TLS problem, and the attempts over a window are bounded by the backoff.
//  - An upstream refusing every connection for many backoff periods: the backoff grows
//    to its cap and stays there, calls fail fast, health says NOT_SERVING where the
//    bridge holds an always-on session, and the bridge recovers on its own.
//  - Every upstream session dropped at once: the reconnects are spread by the backoff's
//    jitter, and every session comes back.
//  - The drain (SIGTERM) with live streams: each ends UNAVAILABLE "shutting down" (DFX
//    measurement streams name the last acknowledged chunk), nothing accepted is lost,
//    the daemon stops within its deadline.
// Every credential contains "s3cr3t" (the suite-wide secret grep looks for it).
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

#include <openssl/ssl.h>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

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
#include "tests/faults/bridge_kits.h"
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
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

// --- The fixture -------------------------------------------------------------------------

// Timestamps of the connections the proxy accepts, sampled from its counters on a
// thread of its own (a sample every ~200 us; an interval is good to about that).
class AcceptLog {
 public:
  explicit AcceptLog(const FaultProxy& proxy) : proxy_(proxy) {
    // Counted from now, not from whenever the thread gets to run.
    const uint64_t start = proxy_.counters().connections_accepted;
    thread_ = std::thread([this, start] {
      uint64_t seen = start;
      while (!stop_.load()) {
        const uint64_t now = proxy_.counters().connections_accepted;
        if (now != seen) {
          std::lock_guard<std::mutex> lock(mu_);
          for (uint64_t i = seen; i < now; ++i) times_.push_back(Clock::now());
          seen = now;
        }
        std::this_thread::sleep_for(200us);  // sampling cadence, not a wait for an effect
      }
    });
  }
  ~AcceptLog() {
    stop_.store(true);
    thread_.join();
  }
  std::vector<Clock::time_point> times() const {
    std::lock_guard<std::mutex> lock(mu_);
    return times_;
  }
  size_t count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return times_.size();
  }

 private:
  const FaultProxy& proxy_;
  mutable std::mutex mu_;
  std::vector<Clock::time_point> times_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

struct Spread {
  double min_ms = 0, median_ms = 0, max_ms = 0, mean_ms = 0;
};
Spread Summarize(std::vector<double> v) {
  Spread s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.min_ms = v.front();
  s.max_ms = v.back();
  s.median_ms = v[v.size() / 2];
  s.mean_ms = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  return s;
}
std::vector<double> Intervals(const std::vector<Clock::time_point>& t) {
  std::vector<double> out;
  for (size_t i = 1; i < t.size(); ++i) {
    out.push_back(std::chrono::duration<double, std::milli>(t[i] - t[i - 1]).count());
  }
  return out;
}

class EveryBridgeFaultTest : public ::testing::TestWithParam<Kit> {
 protected:
  const Kit& kit() const { return GetParam(); }

  // Upstream (with `tls` when set), the proxy in front, the bridge in the daemon.
  void Start(const TlsServe* tls = nullptr, const std::string& ca_file = "",
             std::function<void(Settings&)> tweak = nullptr,
             std::function<void(FaultProxy&)> faults = nullptr) {
    auto up = kit().start_upstream(tls);
    ASSERT_TRUE(up.ok()) << up.status();
    upstream_ = *std::move(up);
    proxy_ = std::make_unique<FaultProxy>(upstream_->port());
    ASSERT_TRUE(proxy_->Start().ok());
    if (faults) faults(*proxy_);
    settings_.url = absl::StrCat(tls != nullptr ? "wss" : "ws", "://127.0.0.1:", proxy_->port());
    settings_.ca_file = ca_file;
    if (tweak) tweak(settings_);
    const Settings s = settings_;
    const Kit k = kit();
    harness_ = std::make_unique<DaemonHarness>();
    absl::Status started = harness_->Start(
        kit().name, [k, s](config::v1::BridgeConfig& b) { k.describe(b, s.url); },
        [k, s](const core::BridgeContext& ctx) { return k.make(s, ctx); });
    ASSERT_TRUE(started.ok()) << started;
    health_ = grpc::health::v1::Health::NewStub(harness_->channel());
  }

  void TearDown() override {
    if (harness_ != nullptr) harness_->Stop();
    if (proxy_ != nullptr) proxy_->Stop();
    upstream_.reset();
  }

  // The daemon's health service for the bridge's service.
  grpc::health::v1::HealthCheckResponse::ServingStatus Health() {
    grpc::ClientContext ctx;
    Deadline(ctx, 10s);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(kit().service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status st = health_->Check(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.status();
  }

  grpc::Status Probe(int caller = -1, bool wait = false) {
    return kit().probe(harness_->channel(), caller, wait);
  }

  testing::TestPki pki_;
  Settings settings_;
  std::unique_ptr<Upstream> upstream_;
  std::unique_ptr<FaultProxy> proxy_;
  std::unique_ptr<DaemonHarness> harness_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
};


// --- Bad TLS -----------------------------------------------------------------------------

enum class BadTls { kWrongHost, kUnknownCa, kExpired, kTls11 };

class EveryBridgeBadTlsTest : public EveryBridgeFaultTest {
 protected:
  // Bad TLS: refused, named, no hot loop; never a WebSocket upstream.
  void CheckBadTls(BadTls bad) {
    FaultProxy& proxy = *proxy_;
    // An always-on session's first attempt fails (per-call bridges have none yet)...
    if (kit().base_sessions > 0) {
      ASSERT_TRUE(WaitFor([&] { return proxy.counters().connections_accepted >= 1; }, 20s));
    }
    // ...and the caller learns why: UNAVAILABLE, naming the TLS problem. A per-call bridge
    // makes the call's session here: the call waits through its first attempts (for the
    // session's request timeout, 2 s here), then is told.
    grpc::Status st = Probe();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    const std::string& m = st.error_message();
    EXPECT_TRUE(absl::StrContains(m, "TLS")) << m;
    switch (bad) {
      case BadTls::kWrongHost:
      case BadTls::kUnknownCa:
      case BadTls::kExpired:
        EXPECT_TRUE(absl::StrContains(m, "certificate")) << m;
        break;
      case BadTls::kTls11:
        EXPECT_TRUE(absl::StrContains(m, "version") || absl::StrContains(m, "protocol")) << m;
        break;
    }
    if (bad == BadTls::kExpired) {
      EXPECT_TRUE(absl::StrContains(m, "expired")) << m;
    }
    if (bad == BadTls::kWrongHost) {
      EXPECT_TRUE(absl::StrContains(m, "mismatch") || absl::StrContains(m, "host")) << m;
    }
    std::printf("[%s] %s\n", kit().name.c_str(), m.c_str());
    // No hot loop: over a window of 2 s, attempts stay within what the backoff allows
    // (initial 20 ms, cap 200 ms, full jitter: ~20-30 per session; a loop makes
    // thousands). An always-on session keeps trying; a per-call one tries while a call
    // wants it (NLX closes a conversation that never opened, Nexora retries a chat until
    // it idles out).
    const uint64_t before = proxy.counters().connections_accepted;
    const auto start = Clock::now();
    WaitFor([&] { return Clock::now() - start >= 2s; }, 3s);  // a measuring window
    const uint64_t attempts = proxy.counters().connections_accepted - before;
    RecordProperty("attempts_in_2s", static_cast<int>(attempts));
    std::printf("[%s] %llu attempts in 2 s (%llu in all)\n", kit().name.c_str(),
                static_cast<unsigned long long>(attempts),
                static_cast<unsigned long long>(proxy.counters().connections_accepted));
    EXPECT_LT(attempts, 100u) << "a reconnect loop";
    EXPECT_LT(proxy.counters().connections_accepted, 200u) << "a reconnect loop";
    if (kit().always_on_session) {
      EXPECT_GE(attempts, 1u) << "the bridge stopped retrying";
    }
    // Nothing ever got past TLS.
    EXPECT_EQ(kit().past_tls(*upstream_), 0);
    // Never served: health says so where an always-on session decides it.
    if (kit().always_on_session) {
      EXPECT_FALSE(harness_->bridge()->Serving());
      EXPECT_EQ(Health(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
    }
  }
};

void ShortRequestTimeout(Settings& s) { s.request_timeout = 2s; }

TEST_P(EveryBridgeBadTlsTest, WrongHostIsRefused) {
  auto ca = pki_.MakeCa("bad-tls-ca");
  auto cert = pki_.IssueServerCert(ca, {"wrong.example"});
  TlsServe tls{cert.cert_pem, cert.key_pem, 0};
  Start(&tls, ca.cert_file, ShortRequestTimeout);
  CheckBadTls(BadTls::kWrongHost);
}

TEST_P(EveryBridgeBadTlsTest, UnknownCaIsRefused) {
  auto trusted = pki_.MakeCa("trusted-ca");
  auto other = pki_.MakeCa("unknown-ca");
  auto cert = pki_.IssueServerCert(other, {"localhost", "127.0.0.1"});
  TlsServe tls{cert.cert_pem, cert.key_pem, 0};
  Start(&tls, trusted.cert_file, ShortRequestTimeout);
  CheckBadTls(BadTls::kUnknownCa);
}

TEST_P(EveryBridgeBadTlsTest, ExpiredCertificateIsRefused) {
  auto ca = pki_.MakeCa("bad-tls-ca");
  auto cert = pki_.IssueServerCert(ca, {"localhost", "127.0.0.1"},
                                   testing::CertValidity{std::chrono::hours(-48), std::chrono::hours(-24)});
  TlsServe tls{cert.cert_pem, cert.key_pem, 0};
  Start(&tls, ca.cert_file, ShortRequestTimeout);
  CheckBadTls(BadTls::kExpired);
}

TEST_P(EveryBridgeBadTlsTest, UpstreamOfferingOnlyTls11IsRefused) {
  auto ca = pki_.MakeCa("bad-tls-ca");
  auto cert = pki_.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  TlsServe tls{cert.cert_pem, cert.key_pem, TLS1_1_VERSION};
  Start(&tls, ca.cert_file, ShortRequestTimeout);
  CheckBadTls(BadTls::kTls11);
}

// --- Refusing for "minutes" --------------------------------------------------------------

// Every connection is reset for many backoff periods (cap 200 ms, for ~6 s): the attempt
// intervals grow to the cap and stay under it, calls fail fast (UNAVAILABLE, "since"),
// health says NOT_SERVING for an always-on session; healed, the bridge serves on its own.
TEST_P(EveryBridgeFaultTest, RefusingForMinutesCapsTheBackoffAndRecovers) {
  Start();
  if (kit().always_on_session) {
    ASSERT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }));
    EXPECT_EQ(Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  // Works before the outage. One session is watched: the configured credential's, or
  // for per-call bridges conversation/chat 0 (made here; it retries while it lives).
  const int who = kit().always_on_session ? -1 : 0;
  grpc::Status before = Probe(who);
  ASSERT_TRUE(before.ok()) << before.error_message();

  AcceptLog log(*proxy_);
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kReset);
  const auto outage_start = Clock::now();
  ASSERT_TRUE(WaitFor([&] { return log.count() >= 3; }, 20s)) << "the bridge does not retry";
  if (kit().always_on_session) {
    EXPECT_TRUE(WaitFor([&] { return !harness_->bridge()->Serving(); }));
    EXPECT_TRUE(WaitFor([&] {
      return Health() == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
    }));
  }
  // Calls fail fast while it is down, saying since when.
  const auto call_start = Clock::now();
  grpc::Status down = Probe(who);
  const auto call_took = Clock::now() - call_start;
  EXPECT_EQ(down.error_code(), grpc::StatusCode::UNAVAILABLE) << down.error_message();
  EXPECT_TRUE(absl::StrContains(down.error_message(), "unreachable since")) << down.error_message();
  // Fast: refused at admission, not after waiting out the session's 5 s request timeout
  // (that answer says it waited). The time is recorded, not asserted.
  EXPECT_FALSE(absl::StrContains(down.error_message(), "waited")) << down.error_message();
  RecordProperty("fail_fast_ms", static_cast<int>(std::chrono::duration_cast<Ms>(call_took).count()));
  // Many backoff periods.
  WaitFor([&] { return Clock::now() - outage_start >= 6s; }, 7s);  // the outage's length
  const std::vector<Clock::time_point> attempts = log.times();
  proxy_->Heal();
  ASSERT_GE(attempts.size(), 10u);
  // The intervals: the first ones under the small caps, the later ones jittered under
  // 200 ms (mean ~100 ms plus the attempt's own time). Asserted only from below (a busy
  // machine makes intervals longer, never shorter): after the ramp the mean interval is
  // at least a quarter of the cap, so the backoff did grow; and the attempt count over
  // the outage stays bounded.
  std::vector<double> all = Intervals(attempts);
  std::vector<double> late(all.begin() + static_cast<long>(all.size() / 2), all.end());
  std::vector<double> early(all.begin(), all.begin() + std::min<long>(4, static_cast<long>(all.size())));
  Spread e = Summarize(early), l = Summarize(late);
  RecordProperty("attempts", static_cast<int>(attempts.size()));
  RecordProperty("early_mean_ms", static_cast<int>(e.mean_ms));
  RecordProperty("late_min_ms", static_cast<int>(l.min_ms));
  RecordProperty("late_median_ms", static_cast<int>(l.median_ms));
  RecordProperty("late_mean_ms", static_cast<int>(l.mean_ms));
  RecordProperty("late_max_ms", static_cast<int>(l.max_ms));
  std::printf("[%s] backoff intervals: first 4 mean %.1f ms; later %zu: min %.1f median %.1f mean %.1f max %.1f ms\n",
              kit().name.c_str(), e.mean_ms, late.size(), l.min_ms, l.median_ms, l.mean_ms, l.max_ms);
  EXPECT_GE(l.mean_ms, 50.0) << "the backoff did not grow towards its 200 ms cap";
  EXPECT_LT(attempts.size(), 200u) << "a reconnect loop";

  // Recovers on its own: serving again (health too), calls work.
  if (kit().always_on_session) {
    ASSERT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }, 20s));
    EXPECT_TRUE(WaitFor([&] {
      return Health() == grpc::health::v1::HealthCheckResponse::SERVING;
    }));
  }
  grpc::Status after = Probe(who, /*wait_for_ready=*/true);
  EXPECT_TRUE(after.ok()) << after.error_message();
  EXPECT_TRUE(WaitFor([&] { return Probe(who).ok(); }, 20s));
}

// --- All sessions dropped at once ---------------------------------------------------------

// 50 upstream sessions (per-call credentials, conversations or chats) reset together:
// their reconnects are spread by the backoff's full jitter (not all at once), and all of
// them come back.
TEST_P(EveryBridgeFaultTest, AllSessionsDroppedAtOnceReconnectSpreadOut) {
  constexpr int kSessions = 50;
  Start(nullptr, "", [](Settings& s) {
    // Jitter under a 500 ms first cap: what a reconnect storm is spread over.
    s.backoff = core::BackoffPolicy{500ms, 2s, 2.0, 30s};
  });
  if (kit().always_on_session) {
    ASSERT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }));
  }
  for (int i = 0; i < kSessions; ++i) {
    grpc::Status st = Probe(i);
    ASSERT_TRUE(st.ok()) << i << ": " << st.error_message();
  }
  const int total = kSessions + kit().base_sessions;
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == static_cast<uint64_t>(total); }))
      << proxy_->counters().connections_open;

  AcceptLog log(*proxy_);
  proxy_->SetMode(Direction::kUpstreamToClient, Mode::kReset);
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open == 0; }));
  const auto dropped_at = Clock::now();
  proxy_->Heal();
  // Every session back (a generous deadline: the first cap is 500 ms).
  ASSERT_TRUE(WaitFor([&] { return proxy_->counters().connections_open >= static_cast<uint64_t>(total); }, 30s))
      << proxy_->counters().connections_open << " of " << total;
  // The log samples the proxy's counters: let it see the last accept too.
  ASSERT_TRUE(WaitFor([&] { return log.count() >= static_cast<size_t>(total); }));
  std::vector<Clock::time_point> t = log.times();
  std::vector<double> after;
  for (const auto& x : t) after.push_back(std::chrono::duration<double, std::milli>(x - dropped_at).count());
  Spread s = Summarize(after);
  const double spread = s.max_ms - s.min_ms;
  RecordProperty("reconnect_min_ms", static_cast<int>(s.min_ms));
  RecordProperty("reconnect_median_ms", static_cast<int>(s.median_ms));
  RecordProperty("reconnect_max_ms", static_cast<int>(s.max_ms));
  std::printf("[%s] %zu reconnects after the drop: min %.1f median %.1f max %.1f ms (spread %.1f ms)\n",
              kit().name.c_str(), t.size(), s.min_ms, s.median_ms, s.max_ms, spread);
  // Not synchronized: uniform jitter over 500 ms spreads 50 attempts over hundreds of ms;
  // in lockstep they would all land within a millisecond or so.
  EXPECT_GT(spread, 50.0) << "reconnects not spread";
  // And the sessions work.
  for (int i = 0; i < kSessions; i += 7) {
    grpc::Status st = Probe(i, /*wait_for_ready=*/true);
    EXPECT_TRUE(st.ok()) << i << ": " << st.error_message();
  }
}

// --- SIGTERM during live streams ----------------------------------------------------------

// Live streams (with accepted work on them) when the drain starts: each ends UNAVAILABLE
// "shutting down" after the drain timeout, with what the bridge documents; nothing that
// was accepted is lost; the daemon stops within its deadline.
TEST_P(EveryBridgeFaultTest, DrainWithLiveStreams) {
  Start();
  if (kit().always_on_session) {
    ASSERT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }));
  }
  std::vector<std::unique_ptr<LiveStream>> streams;
  for (int i = 1; i <= 3; ++i) {
    auto ch = harness_->NewChannel();
    streams.push_back(kit().open_stream(ch, *upstream_, i));
    channels_.push_back(ch);
  }
  const auto signalled = Clock::now();
  harness_->RequestShutdown();
  std::vector<grpc::Status> ended;
  for (auto& s : streams) ended.push_back(s->finish());
  harness_->Stop();
  const auto stopped = Clock::now();
  RecordProperty("stop_ms", static_cast<int>(std::chrono::duration_cast<Ms>(stopped - signalled).count()));
  EXPECT_LT(stopped - signalled, 10s + 5s) << "the daemon overran its 10 s deadline";
  for (size_t i = 0; i < streams.size(); ++i) {
    EXPECT_EQ(ended[i].error_code(), grpc::StatusCode::UNAVAILABLE) << ended[i].error_message();
    EXPECT_TRUE(absl::StrContains(ended[i].error_message(), "shutting down")) << ended[i].error_message();
    streams[i]->check(ended[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Bridges, EveryBridgeFaultTest,
                         ::testing::ValuesIn(AllKits()), KitName);
INSTANTIATE_TEST_SUITE_P(Bridges, EveryBridgeBadTlsTest,
                         ::testing::ValuesIn(AllKits()), KitName);

}  // namespace
}  // namespace wsbridge::faults
