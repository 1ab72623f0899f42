// The upstream connection against a real WebSocket server on 127.0.0.1 (ws:// and wss://
// with certificates generated for the run).
#include "bridges/core/connection.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::core {
namespace {

namespace net = boost::asio;
using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::WaitFor;
using upstreams::HandshakeInfo;
using upstreams::WsServer;
using upstreams::WsServerConnection;
using upstreams::WsServerHandler;
using upstreams::WsServerOptions;

constexpr auto kDeadline = seconds(20);

bool Contains(absl::string_view haystack, absl::string_view needle) {
  return absl::StrContains(haystack, needle);
}

// ---- The fake upstream's side: records everything, behaviour set per test. ----

struct Upstream {
  struct Closed {
    absl::Status status;
    uint16_t code;
  };

  absl::Mutex mu;
  std::vector<HandshakeInfo> handshakes ABSL_GUARDED_BY(mu);
  std::vector<std::shared_ptr<WsServerConnection>> conns ABSL_GUARDED_BY(mu);
  std::vector<std::pair<std::string, bool>> messages ABSL_GUARDED_BY(mu);
  std::vector<Closed> closes ABSL_GUARDED_BY(mu);

  // Set before the server starts.
  std::function<absl::Status(const HandshakeInfo&, std::string*)> on_handshake;
  std::function<void(const std::shared_ptr<WsServerConnection>&, int index)> on_open;
  bool echo = false;

  std::unique_ptr<WsServer> server;

  void Start(WsServerOptions options = {}) {
    WsServerHandler h;
    h.on_handshake = [this](const HandshakeInfo& info, std::string* sub) {
      {
        absl::MutexLock lock(&mu);
        handshakes.push_back(info);
      }
      return on_handshake ? on_handshake(info, sub) : absl::OkStatus();
    };
    h.on_open = [this](const std::shared_ptr<WsServerConnection>& c) {
      int index;
      {
        absl::MutexLock lock(&mu);
        index = static_cast<int>(conns.size());
        conns.push_back(c);
      }
      if (on_open) on_open(c, index);
    };
    h.on_message = [this](const std::shared_ptr<WsServerConnection>& c, std::string_view data, bool binary) {
      {
        absl::MutexLock lock(&mu);
        messages.emplace_back(std::string(data), binary);
      }
      if (echo) c->Send(std::string(data), binary);
    };
    h.on_close = [this](const std::shared_ptr<WsServerConnection>& c, const absl::Status& st) {
      absl::MutexLock lock(&mu);
      closes.push_back({st, c->remote_close_code()});
    };
    server = std::make_unique<WsServer>(std::move(options), std::move(h));
    ASSERT_TRUE(server->Start().ok());
  }

  size_t handshake_count() {
    absl::MutexLock lock(&mu);
    return handshakes.size();
  }
  size_t message_count() {
    absl::MutexLock lock(&mu);
    return messages.size();
  }
  size_t close_count() {
    absl::MutexLock lock(&mu);
    return closes.size();
  }
  std::shared_ptr<WsServerConnection> conn(size_t i) {
    absl::MutexLock lock(&mu);
    return i < conns.size() ? conns[i] : nullptr;
  }
};

// ---- The protocol session's side. ----

class TestHandler : public ConnectionHandler {
 public:
  struct Disconnect {
    absl::Status status;
    bool will_retry;
    std::chrono::steady_clock::time_point at;
    DisconnectInfo info;
    int64_t retry_delay_ms;  // stats().retry_delay_ms as the callback saw it
  };

  // Builds the request for the n-th attempt (1-based).
  std::function<absl::StatusOr<HandshakeRequest>(int n)> make_request;
  bool auto_ready = true;
  // Pauses reads from inside every message's callback.
  std::atomic<bool> pause_on_message{false};
  std::weak_ptr<Connection> conn;
  // When set, overrides Classify; it also sees what Classify was given.
  std::function<DisconnectKind(const DisconnectInfo&)> classify;

  absl::StatusOr<HandshakeRequest> PrepareHandshake() override {
    int n;
    {
      absl::MutexLock lock(&mu_);
      n = ++prepares_;
      prepare_times_.push_back(std::chrono::steady_clock::now());
    }
    return make_request(n);
  }
  void OnOpen(std::string_view subprotocol) override {
    {
      absl::MutexLock lock(&mu_);
      opens_.emplace_back(subprotocol);
    }
    if (auto c = conn.lock(); c && auto_ready) c->MarkReady();
  }
  void OnMessage(std::string_view payload, bool binary) override {
    {
      absl::MutexLock lock(&mu_);
      messages_.emplace_back(std::string(payload), binary);
    }
    if (auto c = conn.lock(); c && pause_on_message) c->PauseReads();
  }
  void OnDisconnected(const DisconnectInfo& info, bool will_retry) override {
    // On the strand: the scheduled attempt cannot start before this returns, so the
    // delay read here is the one that attempt waits.
    const auto c = conn.lock();
    const int64_t delay_ms = c ? c->stats().retry_delay_ms.load() : -1;
    absl::MutexLock lock(&mu_);
    disconnects_.push_back({info.reason, will_retry, std::chrono::steady_clock::now(), info, delay_ms});
  }
  DisconnectKind Classify(const DisconnectInfo& info) override {
    return classify ? classify(info) : ConnectionHandler::Classify(info);
  }
  void OnHeartbeat() override {
    absl::MutexLock lock(&mu_);
    ++heartbeats_;
  }
  void OnWritable() override {
    absl::MutexLock lock(&mu_);
    ++writables_;
  }

  int prepares() {
    absl::MutexLock lock(&mu_);
    return prepares_;
  }
  std::vector<std::chrono::steady_clock::time_point> prepare_times() {
    absl::MutexLock lock(&mu_);
    return prepare_times_;
  }
  std::vector<std::string> opens() {
    absl::MutexLock lock(&mu_);
    return opens_;
  }
  std::vector<std::pair<std::string, bool>> messages() {
    absl::MutexLock lock(&mu_);
    return messages_;
  }
  std::vector<Disconnect> disconnects() {
    absl::MutexLock lock(&mu_);
    return disconnects_;
  }
  size_t disconnect_count() {
    absl::MutexLock lock(&mu_);
    return disconnects_.size();
  }
  int heartbeats() {
    absl::MutexLock lock(&mu_);
    return heartbeats_;
  }
  int writables() {
    absl::MutexLock lock(&mu_);
    return writables_;
  }

 private:
  absl::Mutex mu_;
  int prepares_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::chrono::steady_clock::time_point> prepare_times_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> opens_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<std::string, bool>> messages_ ABSL_GUARDED_BY(mu_);
  std::vector<Disconnect> disconnects_ ABSL_GUARDED_BY(mu_);
  int heartbeats_ ABSL_GUARDED_BY(mu_) = 0;
  int writables_ ABSL_GUARDED_BY(mu_) = 0;
};

class ConnectionTest : public ::testing::Test {
 protected:
  ConnectionTest()
      : work_(net::make_work_guard(ioc_)),
        strand_(net::make_strand(net::any_io_executor(ioc_.get_executor()))),
        thread_([this] { ioc_.run(); }) {}

  ~ConnectionTest() override {
    if (conn_) {
      OnStrand([&] { conn_->Close(1000, "test over"); });
      EXPECT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kClosed; }, kDeadline));
    }
    upstream_.server.reset();  // stops it; no more server callbacks
    work_.reset();
    ioc_.stop();
    thread_.join();
    conn_.reset();
  }

  // Runs `f` on the connection's strand and waits for it.
  template <class F>
  auto OnStrand(F f) -> decltype(f()) {
    std::packaged_task<decltype(f())()> task(std::move(f));
    auto result = task.get_future();
    net::post(strand_, [&task] { task(); });
    return result.get();
  }

  ConnectionOptions PlainOptions() {
    ConnectionOptions o;
    o.name = "test/upstream";
    o.allow_plaintext = true;
    o.connect_timeout = seconds(5);
    o.handshake_timeout = seconds(5);
    o.close_timeout = seconds(5);
    o.keepalive.ping_interval = Duration::zero();
    o.backoff.initial = milliseconds(10);
    o.backoff.max = milliseconds(100);
    return o;
  }

  void SetUrl(std::string url, std::vector<std::string> subprotocols = {}) {
    handler_->make_request = [url, subprotocols](int) -> absl::StatusOr<HandshakeRequest> {
      HandshakeRequest r;
      r.url = url;
      r.subprotocols = subprotocols;
      return r;
    };
  }

  void StartConnection(ConnectionOptions options) {
    conn_ = Connection::Create(strand_, std::move(options), handler_);
    handler_->conn = conn_;
    OnStrand([&] { conn_->Start(); });
  }

  // Queues `count` messages of sizes around the frame-length and TLS-record boundaries,
  // text and binary alternating, in one turn of the strand, so that all but the first
  // wait for the write in flight and leave together (ConnectionImpl::DoWriteBatch, up
  // to 32 frames or 64 KiB a write): the echo server sends back each one intact and in
  // order.
  // The upstream drops the connection while reads are paused: nothing is heard until
  // reads resume, then the drop. Paused, the connection's receive still waits on the
  // socket (ReadAhead) and takes the end of the stream (by the time the server has
  // closed, it has nearly always arrived); it must be kept for the resume, since Asio
  // reads a socket that reported its end again only after another readiness edge.
  void ExpectADropWhilePausedReportedOnceResumed() {
    ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 1; }, kDeadline));
    ASSERT_TRUE(WaitServerConn(0));
    upstream_.conn(0)->Send("before the pause", false);
    ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == 1; }, kDeadline));
    OnStrand([&] { conn_->PauseReads(); });
    upstream_.conn(0)->Drop();
    ASSERT_TRUE(WaitFor(
        [&] {
          absl::MutexLock lock(&upstream_.mu);
          return upstream_.closes.size() == 1;
        },
        kDeadline));
    OnStrand([] {});
    EXPECT_EQ(handler_->disconnect_count(), 0u);
    OnStrand([&] { conn_->ResumeReads(); });
    ASSERT_TRUE(WaitFor([&] { return handler_->disconnect_count() >= 1; }, kDeadline))
        << "the drop was not reported after reads resumed";
    EXPECT_EQ(handler_->messages().size(), 1u);
    const auto d = handler_->disconnects()[0];
    EXPECT_TRUE(d.info.was_open);
    EXPECT_EQ(d.status.code(), absl::StatusCode::kUnavailable) << d.status;
    EXPECT_TRUE(d.will_retry);
  }

  void ExpectABurstEchoedWholeAndInOrder(size_t count) {
    const std::vector<size_t> sizes = {0, 1, 125, 126, 127, 65535, 65536, 70000, 3, 16384, 16385, 40};
    std::vector<std::pair<std::string, bool>> sent;
    for (size_t i = 0; i < count; ++i) {
      std::string payload(sizes[i % sizes.size()], '\0');
      for (size_t j = 0; j < payload.size(); ++j) payload[j] = static_cast<char>((i * 131 + j * 7) & 0xff);
      const bool binary = (i % 2) == 0;
      if (!binary) {
        for (char& c : payload) c = static_cast<char>('a' + (static_cast<unsigned char>(c) % 26));
      }
      sent.emplace_back(std::move(payload), binary);
    }
    const size_t before = handler_->messages().size();
    const uint64_t frames_before = conn_->stats().frames_out.load();
    ASSERT_TRUE(OnStrand([&] {
      for (const auto& [payload, binary] : sent) {
        if (absl::Status st = conn_->Send(payload, binary); !st.ok()) return st;
      }
      return absl::OkStatus();
    }).ok());
    ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == before + count; }, kDeadline))
        << handler_->messages().size() - before << " of " << count;
    const auto got = handler_->messages();
    for (size_t i = 0; i < count; ++i) {
      const auto& [payload, binary] = got[before + i];
      EXPECT_EQ(payload.size(), sent[i].first.size()) << "message " << i;
      EXPECT_TRUE(payload == sent[i].first) << "message " << i << " differs";
      EXPECT_EQ(binary, sent[i].second) << "message " << i;
    }
    EXPECT_EQ(conn_->stats().frames_out.load() - frames_before, count);
  }

  bool WaitDisconnects(size_t n) {
    return WaitFor([&] { return handler_->disconnect_count() >= n; }, kDeadline);
  }

  // The client sees its side open (and may become ready) before the server's io thread
  // has run on_open, which records the server side: wait for it before using conn(i).
  bool WaitServerConn(size_t i) {
    return WaitFor([&] { return upstream_.conn(i) != nullptr; }, kDeadline);
  }

  // Backoff caps of 10 ms for the first failure, then 1000 s, so that only a reset after a
  // healthy period makes a later reconnect fast (`o` sets the rest). The first connection
  // is dropped at once; returns once the second is ready, with when it became ready.
  void ReadyAfterOneDrop(ConnectionOptions o, int64_t* ready_since) {
    upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
      if (index == 0) c->Drop();
    };
    upstream_.Start();
    SetUrl(upstream_.server->url());
    o.backoff.initial = milliseconds(10);
    o.backoff.multiplier = 100000;
    o.backoff.max = seconds(1000);
    StartConnection(o);
    ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() == 2 && conn_->state() == ConnectionState::kReady; },
                        kDeadline));
    *ready_since = conn_->stats().ready_since_unix_ms.load();
    ASSERT_GT(*ready_since, 0) << "ready without the time it became ready";
  }

  // Drops the second connection (ReadyAfterOneDrop); its retry must come under a reset
  // backoff (without the reset the delay is drawn from [0, 1000 s]).
  void DropAndExpectTheBackoffReset(const std::string& why) {
    ASSERT_TRUE(WaitServerConn(1));
    upstream_.conn(1)->Drop();
    ASSERT_TRUE(WaitDisconnects(2));
    EXPECT_LE(handler_->disconnects()[1].retry_delay_ms, 10) << why;
  }

  // A normal backoff so slow that a retry under it never comes during a test, and a
  // quick auth backoff: which one applied shows in retry_delay_ms and in whether the
  // next attempt comes at all, never in wall time.
  ConnectionOptions AuthPolicyOptions() {
    ConnectionOptions o = PlainOptions();
    o.backoff.initial = seconds(1000);
    o.backoff.max = seconds(1000);
    o.auth_backoff.initial = milliseconds(20);
    o.auth_backoff.max = milliseconds(kAuthMaxMs);
    return o;
  }
  static constexpr int64_t kAuthMaxMs = 40;

  // The upstream refuses every upgrade with `refusal` until the handler sends the fixed
  // secret, which it does once secret_fixed_ is set.
  void RefuseUntilTheSecretIsFixed(absl::Status refusal) {
    upstream_.on_handshake = [refusal](const HandshakeInfo& info, std::string*) {
      return info.Header("Authorization") == "Bearer good" ? absl::OkStatus() : refusal;
    };
    upstream_.Start();
    handler_->make_request = [this](int) -> absl::StatusOr<HandshakeRequest> {
      HandshakeRequest r;
      r.url = upstream_.server->url();
      r.headers = {{"Authorization", secret_fixed_.load() ? "Bearer good" : "Bearer bad"}};
      return r;
    };
  }

  void ExpectAuthRefusedUpgrade(absl::Status refusal, int http_status) {
    RefuseUntilTheSecretIsFixed(refusal);
    StartConnection(AuthPolicyOptions());
    // It retries on its own, under the auth backoff (the normal one would wait ~1000 s).
    ASSERT_TRUE(WaitDisconnects(3));
    const auto ds = handler_->disconnects();
    for (const auto& d : ds) {
      EXPECT_EQ(d.info.kind, DisconnectKind::kAuthRefused) << ToString(d.info.kind) << " " << d.status;
      EXPECT_EQ(d.info.http_status, http_status) << d.status;
      EXPECT_EQ(d.status.code(), refusal.code()) << d.status;
      EXPECT_EQ(d.info.close_code, 0);
      EXPECT_FALSE(d.info.was_open);
      EXPECT_TRUE(d.will_retry);
      EXPECT_GE(d.retry_delay_ms, 1);
      EXPECT_LE(d.retry_delay_ms, kAuthMaxMs) << "not the auth backoff";
    }
    EXPECT_GE(conn_->stats().auth_refusals.load(), ds.size());
    EXPECT_TRUE(handler_->opens().empty());
    // The secret is fixed: a later attempt re-reads it and opens, with nobody asking.
    secret_fixed_ = true;
    ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
        << conn_->last_error();
    EXPECT_EQ(conn_->stats().retry_delay_ms.load(), 0);
    EXPECT_EQ(handler_->opens().size(), 1u);
  }

  std::atomic<bool> secret_fixed_{false};

  net::io_context ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  Connection::Strand strand_;
  std::thread thread_;
  Upstream upstream_;
  std::shared_ptr<TestHandler> handler_ = std::make_shared<TestHandler>();
  std::shared_ptr<Connection> conn_;
};

TEST_F(ConnectionTest, HandshakeCarriesPathQueryHeadersAndSubprotocol) {
  upstream_.echo = true;
  upstream_.on_handshake = [](const HandshakeInfo& info, std::string* sub) {
    if (info.Header("X-Api-Key") != "key-1") return absl::UnauthenticatedError("missing X-Api-Key");
    for (const auto& p : info.requested_subprotocols) {
      if (p == "json") *sub = "json";
    }
    return absl::OkStatus();
  };
  upstream_.Start();
  handler_->make_request = [&](int) -> absl::StatusOr<HandshakeRequest> {
    HandshakeRequest r;
    r.url = upstream_.server->url() + "/v1/stream?token=sekret-token&region=eu";
    r.headers = {{"X-Api-Key", "key-1"}, {"X-Client", "wsbridge-test"}};
    r.subprotocols = {"v2.proto", "json"};
    return r;
  };
  StartConnection(PlainOptions());

  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  EXPECT_EQ(handler_->opens(), std::vector<std::string>{"json"});
  {
    absl::MutexLock lock(&upstream_.mu);
    ASSERT_EQ(upstream_.handshakes.size(), 1u);
    const HandshakeInfo& info = upstream_.handshakes[0];
    EXPECT_EQ(info.target, "/v1/stream?token=sekret-token&region=eu");
    EXPECT_EQ(info.Header("x-client"), "wsbridge-test");
    EXPECT_EQ(info.requested_subprotocols, (std::vector<std::string>{"v2.proto", "json"}));
    EXPECT_TRUE(absl::StrContains(info.Header("Host"), "127.0.0.1:"));
  }
  // The credential never shows in target().
  EXPECT_FALSE(Contains(conn_->target(), "sekret-token")) << conn_->target();
  // Every query value but a short allow-list is redacted (log::RedactUrl).
  EXPECT_TRUE(Contains(conn_->target(), "region=[redacted]")) << conn_->target();
  EXPECT_TRUE(Contains(conn_->target(), "/v1/stream")) << conn_->target();

  // Text and binary frames round-trip through the echoing upstream.
  const std::string binary_payload("\x00\x01\xff", 3);
  EXPECT_TRUE(OnStrand([&] { return conn_->Send("hello", false); }).ok());
  EXPECT_TRUE(OnStrand([&] { return conn_->Send(binary_payload, true); }).ok());
  ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == 2; }, kDeadline));
  const auto got = handler_->messages();
  EXPECT_EQ(got[0], std::make_pair(std::string("hello"), false));
  EXPECT_EQ(got[1], std::make_pair(binary_payload, true));
  // The write completion is not ordered against the echo's arrival: wait for it.
  EXPECT_TRUE(WaitFor(
      [&] { return conn_->stats().frames_out.load() == 2u && conn_->stats().bytes_out.load() == 8u; }, kDeadline));
  EXPECT_EQ(conn_->stats().frames_in.load(), 2u);
  EXPECT_EQ(conn_->stats().bytes_out.load(), 8u);
  EXPECT_GT(conn_->stats().ready_since_unix_ms.load(), 0);
  EXPECT_EQ(conn_->stats().attempts.load(), 1u);
  EXPECT_EQ(conn_->stats().reconnects.load(), 0u);
}

TEST_F(ConnectionTest, SubprotocolNotAcceptedByTheServerIsAnError) {
  upstream_.Start();  // accepts without selecting any subprotocol
  SetUrl(upstream_.server->url(), {"json"});
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kFailedPrecondition) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "subprotocol")) << d.status;
  EXPECT_TRUE(d.will_retry);
  EXPECT_TRUE(handler_->opens().empty());
}

TEST_F(ConnectionTest, RefusedUpgradeMapsTheHttpStatus) {
  upstream_.on_handshake = [](const HandshakeInfo&, std::string*) {
    return absl::UnauthenticatedError("token expired");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kUnauthenticated) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "401")) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "token expired")) << d.status;
  EXPECT_TRUE(d.will_retry);
}

TEST_F(ConnectionTest, PlaintextIsRefusedUnlessAllowed) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.allow_plaintext = false;
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kFailedPrecondition) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "allow_plaintext")) << d.status;
  EXPECT_FALSE(d.will_retry);
  EXPECT_EQ(conn_->state(), ConnectionState::kClosed);
  EXPECT_EQ(upstream_.handshake_count(), 0u);
  EXPECT_TRUE(Contains(conn_->last_error(), "allow_plaintext"));
}

TEST_F(ConnectionTest, BadUrlFailsTheAttemptWithAClearError) {
  SetUrl("http://127.0.0.1:1/");
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kInvalidArgument) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "wss://")) << d.status;
}

class TlsConnectionTest : public ConnectionTest {
 protected:
  void StartTlsServer(bool require_client_cert = false) {
    ca_ = pki_.MakeCa("wsbridge test CA");
    other_ca_ = pki_.MakeCa("unrelated CA");
    server_cert_ = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1", "upstream.test"});
    WsServerOptions o;
    o.tls = true;
    if (require_client_cert) o.client_ca_pem = ca_.cert_pem;
    o.cert_pem = server_cert_.cert_pem;
    o.key_pem = server_cert_.key_pem;
    upstream_.echo = true;
    upstream_.Start(o);
  }
  ConnectionOptions TlsOptionsFor(std::string ca_file) {
    ConnectionOptions o = PlainOptions();
    o.allow_plaintext = false;
    o.tls.ca_file = std::move(ca_file);
    return o;
  }

  // Sends `text` on conn_ and waits for the echo server's copy.
  void ExpectEcho(const std::string& text) {
    EXPECT_TRUE(OnStrand([&] { return conn_->Send(text, false); }).ok());
    ASSERT_TRUE(WaitFor([&] { return !handler_->messages().empty(); }, kDeadline));
    EXPECT_EQ(handler_->messages().back().first, text);
  }

  // conn_ (ready) drops its socket and connects again: true once the server saw the
  // second handshake and conn_ is ready again.
  bool ReconnectUntilReadyAgain() {
    OnStrand([&] { conn_->Reconnect(absl::UnavailableError("test reconnect")); });
    return WaitFor(
        [&] { return upstream_.handshake_count() == 2 && conn_->state() == ConnectionState::kReady; }, kDeadline);
  }

  testing::TestPki pki_;
  testing::CertAndKey ca_, other_ca_, server_cert_;
};

TEST_F(TlsConnectionTest, VerifiedTlsConnectsAndExchangesFrames) {
  StartTlsServer();
  ASSERT_TRUE(Contains(upstream_.server->url(), "wss://"));
  SetUrl(upstream_.server->url() + "/feed");
  StartConnection(TlsOptionsFor(ca_.cert_file));
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  ExpectEcho("over tls");
}

// Incoming messages are read in parts (a small first part, then the rest) and outgoing
// ones are masked through a buffer sized to each message: every size around those
// boundaries, up to several TLS records, comes back intact and in order.
TEST_F(TlsConnectionTest, MessagesOfEverySizeRoundTripIntactAndInOrder) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = TlsOptionsFor(ca_.cert_file);
  o.max_message_bytes = 1 << 20;
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  const std::vector<size_t> sizes = {0,    1,    63,   64,   65,    511,   512,   513,  1535,
                                     1536, 1537, 4095, 4096, 4097,  8191,  8192,  8193, 16384,
                                     16385, 70000, 300000, 5, 100000, 2};
  std::vector<std::pair<std::string, bool>> sent;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string payload(sizes[i], '\0');
    for (size_t j = 0; j < payload.size(); ++j) payload[j] = static_cast<char>((i * 131 + j * 7) & 0xff);
    const bool binary = (i % 2) == 0;
    if (!binary) {
      for (char& c : payload) c = static_cast<char>('a' + (static_cast<unsigned char>(c) % 26));
    }
    sent.emplace_back(payload, binary);
    ASSERT_TRUE(OnStrand([&] { return conn_->Send(payload, binary); }).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == sizes.size(); }, kDeadline))
      << handler_->messages().size();
  const auto got = handler_->messages();
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(got[i].first.size(), sizes[i]) << "message " << i;
    EXPECT_TRUE(got[i].first == sent[i].first) << "message " << i << " of " << sizes[i] << " bytes differs";
    EXPECT_EQ(got[i].second, sent[i].second) << "message " << i;
  }
  EXPECT_EQ(conn_->stats().frames_in.load(), sizes.size());
}

TEST_F(TlsConnectionTest, MessagesQueuedTogetherLeaveTogetherIntactAndInOrder) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(ca_.cert_file));
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  ExpectABurstEchoedWholeAndInOrder(200);
  ExpectABurstEchoedWholeAndInOrder(2);
}

TEST_F(TlsConnectionTest, ADropWhileReadsArePausedIsReportedOnceTheyResume) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  StartConnection(TlsOptionsFor(ca_.cert_file));
  ExpectADropWhilePausedReportedOnceResumed();
}

// The next attempt resumes the TLS session of the previous one (the server's ticket)
// instead of a full handshake, and the resumed connection carries frames.
TEST_F(TlsConnectionTest, ReconnectResumesTheTlsSession) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(ca_.cert_file));
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  ASSERT_TRUE(ReconnectUntilReadyAgain()) << conn_->last_error();
  {
    absl::MutexLock lock(&upstream_.mu);
    EXPECT_FALSE(upstream_.handshakes[0].tls_resumed);
    EXPECT_TRUE(upstream_.handshakes[1].tls_resumed);
  }
  ExpectEcho("resumed");
}

// The override is the name verified (and sent as SNI). A session verified for one name
// is never offered under another: the other name gets a full handshake, whose
// certificate check refuses a name the certificate does not carry and accepts one it
// does (without resuming).
TEST_F(TlsConnectionTest, ServerNameOverrideIsVerifiedAndSessionsResumeOnlyUnderIt) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  ConnectionOptions verified = TlsOptionsFor(ca_.cert_file);
  verified.tls.server_name = "upstream.test";
  StartConnection(verified);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();

  // Another connection of the same TLS context, under `server_name`; closed before it returns.
  auto connect_as = [&](const std::string& server_name, bool expect_ready) {
    auto handler = std::make_shared<TestHandler>();
    handler->make_request = handler_->make_request;
    ConnectionOptions o = verified;
    o.tls.server_name = server_name;
    o.reconnect = false;
    auto conn = Connection::Create(strand_, o, handler);
    handler->conn = conn;
    OnStrand([&] { conn->Start(); });
    if (expect_ready) {
      EXPECT_TRUE(WaitFor([&] { return conn->state() == ConnectionState::kReady; }, kDeadline))
          << conn->last_error();
      OnStrand([&] { conn->Close(1000, "done"); });
    }
    // The state turns kClosed just before the handler hears of it.
    EXPECT_TRUE(WaitFor([&] { return conn->state() == ConnectionState::kClosed && handler->disconnect_count() == 1; },
                        kDeadline));
    return handler;
  };
  const auto refused = connect_as("evil.example", /*expect_ready=*/false);
  ASSERT_EQ(refused->disconnects().size(), 1u);
  EXPECT_TRUE(Contains(refused->disconnects()[0].status.message(), "hostname mismatch"))
      << refused->disconnects()[0].status;
  EXPECT_TRUE(refused->opens().empty());
  EXPECT_EQ(upstream_.handshake_count(), 1u);

  connect_as("localhost", /*expect_ready=*/true);
  connect_as("upstream.test", /*expect_ready=*/true);
  absl::MutexLock lock(&upstream_.mu);
  ASSERT_EQ(upstream_.handshakes.size(), 3u);
  EXPECT_FALSE(upstream_.handshakes[0].tls_resumed);
  EXPECT_FALSE(upstream_.handshakes[1].tls_resumed);  // localhost: not the name verified first
  EXPECT_TRUE(upstream_.handshakes[2].tls_resumed);   // upstream.test again
}

TEST_F(TlsConnectionTest, WrongHostnameIsRefused) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = TlsOptionsFor(ca_.cert_file);
  o.tls.server_name = "evil.example";
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kUnavailable) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "TLS handshake")) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "hostname mismatch")) << d.status;
  EXPECT_TRUE(d.will_retry);
  EXPECT_TRUE(handler_->opens().empty());
  EXPECT_EQ(upstream_.handshake_count(), 0u);
}

TEST_F(TlsConnectionTest, SilentServerTimesOutTheTlsHandshake) {
  ca_ = pki_.MakeCa("wsbridge test CA");
  // A listener that never accepts: the kernel completes TCP, nobody answers the hello.
  net::io_context listen_ioc;
  net::ip::tcp::acceptor silent(listen_ioc, {net::ip::make_address("127.0.0.1"), 0});
  SetUrl(absl::StrCat("wss://127.0.0.1:", silent.local_endpoint().port(), "/"));
  ConnectionOptions o = TlsOptionsFor(ca_.cert_file);
  o.handshake_timeout = milliseconds(200);
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kDeadlineExceeded) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "TLS handshake")) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "timed out")) << d.status;
  EXPECT_TRUE(d.will_retry);
  EXPECT_TRUE(handler_->opens().empty());
}

TEST_F(TlsConnectionTest, UnknownCaIsRefused) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(other_ca_.cert_file));
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_TRUE(Contains(d.status.message(), "certificate verify failed")) << d.status;
  EXPECT_TRUE(handler_->opens().empty());
  EXPECT_EQ(upstream_.handshake_count(), 0u);
}

TEST_F(TlsConnectionTest, SystemTrustStoreDoesNotTrustTheTestCa) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(""));  // default trust store
  ASSERT_TRUE(WaitDisconnects(1));
  EXPECT_TRUE(Contains(handler_->disconnects()[0].status.message(), "TLS handshake"));
  EXPECT_TRUE(handler_->opens().empty());
}

TEST_F(TlsConnectionTest, VerificationOffAcceptsAnUnknownCaOnlyWhenConfigured) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = TlsOptionsFor(other_ca_.cert_file);
  o.tls.verify_peer = false;
  o.tls.server_name = "evil.example";
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
}

// Also after a reconnect, which resumes the session: the server that requires a
// certificate accepts the resumed one without a new certificate.
TEST_F(TlsConnectionTest, ClientCertificateIsPresentedWhenConfigured) {
  StartTlsServer(/*require_client_cert=*/true);
  const testing::CertAndKey client = pki_.IssueClientCert(ca_, "wsbridge-client");
  SetUrl(upstream_.server->url());
  ConnectionOptions o = TlsOptionsFor(ca_.cert_file);
  o.tls.cert_file = client.cert_file;
  o.tls.key_file = client.key_file;
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  ASSERT_TRUE(ReconnectUntilReadyAgain()) << conn_->last_error();
  absl::MutexLock lock(&upstream_.mu);
  EXPECT_TRUE(upstream_.handshakes[1].tls_resumed);
}

TEST_F(TlsConnectionTest, ServerRequiringAClientCertificateRefusesNone) {
  StartTlsServer(/*require_client_cert=*/true);
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(ca_.cert_file));
  ASSERT_TRUE(WaitDisconnects(1));
  EXPECT_TRUE(handler_->disconnects()[0].will_retry);
  EXPECT_TRUE(handler_->opens().empty());
  EXPECT_EQ(upstream_.handshake_count(), 0u);
}

TEST_F(TlsConnectionTest, MissingCaFileIsAClearError) {
  StartTlsServer();
  SetUrl(upstream_.server->url());
  StartConnection(TlsOptionsFor(pki_.dir().path() + "/no-such-ca.pem"));
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kFailedPrecondition) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "no-such-ca.pem")) << d.status;
}

TEST_F(ConnectionTest, MessagesQueuedTogetherLeaveTogetherIntactAndInOrder) {
  upstream_.echo = true;
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  ExpectABurstEchoedWholeAndInOrder(200);
  ExpectABurstEchoedWholeAndInOrder(2);
}

TEST_F(ConnectionTest, ServerDropReconnectsWithBackoffAndFreshCredentials) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index < 3) c->Drop();
  };
  upstream_.Start();
  handler_->make_request = [&](int n) -> absl::StatusOr<HandshakeRequest> {
    HandshakeRequest r;
    r.url = upstream_.server->url() + "/?token=t" + std::to_string(n);
    r.headers = {{"Authorization", "Bearer rotating-" + std::to_string(n)}};
    return r;
  };
  ConnectionOptions o = PlainOptions();
  o.backoff.initial = milliseconds(20);
  o.backoff.max = milliseconds(200);
  StartConnection(o);

  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady && upstream_.handshake_count() == 4; },
                      kDeadline));
  {
    absl::MutexLock lock(&upstream_.mu);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(upstream_.handshakes[i].Header("Authorization"), "Bearer rotating-" + std::to_string(i + 1));
      EXPECT_EQ(upstream_.handshakes[i].target, "/?token=t" + std::to_string(i + 1));
    }
  }
  EXPECT_EQ(handler_->prepares(), 4);
  EXPECT_EQ(conn_->stats().attempts.load(), 4u);
  EXPECT_EQ(conn_->stats().reconnects.load(), 3u);
  const auto disconnects = handler_->disconnects();
  ASSERT_EQ(disconnects.size(), 3u);
  const auto prepares = handler_->prepare_times();
  for (size_t i = 0; i < disconnects.size(); ++i) {
    EXPECT_EQ(disconnects[i].status.code(), absl::StatusCode::kUnavailable) << disconnects[i].status;
    EXPECT_TRUE(disconnects[i].will_retry);
    // The next attempt came after the disconnect, after a backoff delay under the cap.
    EXPECT_GE(prepares[i + 1], disconnects[i].at);
    EXPECT_GE(disconnects[i].retry_delay_ms, 1);
    EXPECT_LE(disconnects[i].retry_delay_ms, 200);
  }
  EXPECT_EQ(handler_->opens().size(), 4u);
}

TEST_F(ConnectionTest, FailedPrepareHandshakeBacksOffWithoutTouchingTheNetwork) {
  upstream_.Start();
  handler_->make_request = [&](int n) -> absl::StatusOr<HandshakeRequest> {
    if (n < 3) return absl::UnavailableError("secret store unreachable");
    HandshakeRequest r;
    r.url = upstream_.server->url();
    return r;
  };
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));
  EXPECT_EQ(upstream_.handshake_count(), 1u);
  ASSERT_EQ(handler_->disconnects().size(), 2u);
  EXPECT_TRUE(Contains(handler_->disconnects()[0].status.message(), "secret store unreachable"));
}

TEST_F(ConnectionTest, SilentPeerIsDetectedAsDead) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->SetSilent(true);
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.keepalive.ping_interval = milliseconds(100);
  o.keepalive.pong_timeout = milliseconds(200);
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kDeadlineExceeded) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "no pong")) << d.status;
  EXPECT_TRUE(d.will_retry);
  // The next connection answers pings and becomes ready again. (>= 2: on a loaded
  // machine a 200 ms pong deadline can also end a healthy connection.)
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

TEST_F(ConnectionTest, OversizeMessageIsAClearErrorAndReconnects) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Send(std::string(4096, 'x'), false);
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.max_message_bytes = 1024;
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.status.code(), absl::StatusCode::kResourceExhausted) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "max_message_bytes")) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "1024")) << d.status;
  EXPECT_TRUE(d.will_retry);
  EXPECT_TRUE(handler_->messages().empty());
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() == 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

TEST_F(ConnectionTest, CloseSendsTheCodeAndDoesNotReconnect) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));
  OnStrand([&] { conn_->Close(1001, "going away"); });
  ASSERT_TRUE(WaitFor([&] { return upstream_.close_count() == 1; }, kDeadline));
  {
    absl::MutexLock lock(&upstream_.mu);
    EXPECT_TRUE(upstream_.closes[0].status.ok()) << upstream_.closes[0].status;
    EXPECT_EQ(upstream_.closes[0].code, 1001);
  }
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kClosed; }, kDeadline));
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects().back();
  EXPECT_FALSE(d.will_retry);
  EXPECT_EQ(d.status.code(), absl::StatusCode::kCancelled) << d.status;
  EXPECT_EQ(d.info.kind, DisconnectKind::kClosedByUs) << ToString(d.info.kind);
  EXPECT_TRUE(d.info.was_open);
  EXPECT_EQ(d.retry_delay_ms, 0);
  // Closed for good: sending fails, a reconnect request is ignored.
  EXPECT_EQ(OnStrand([&] { return conn_->Send("late", false); }).code(), absl::StatusCode::kFailedPrecondition);
  OnStrand([&] { conn_->Reconnect(absl::UnavailableError("try again")); });
  EXPECT_EQ(conn_->state(), ConnectionState::kClosed);
  EXPECT_EQ(upstream_.handshake_count(), 1u);
  EXPECT_EQ(conn_->stats().attempts.load(), 1u);
}

TEST_F(ConnectionTest, ServerCloseReconnects) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(1012, "service restart");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_TRUE(Contains(d.status.message(), "1012")) << d.status;
  EXPECT_TRUE(d.will_retry);
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() == 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

TEST_F(ConnectionTest, FullSendQueueRefusesThenSignalsWritable) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int) { c->SetSilent(true); };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.send_queue_max_messages = 8;
  o.send_queue_max_bytes = 1 << 20;
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));

  // The upstream reads nothing, so socket buffers fill and then the queue does.
  const std::string chunk(64 * 1024, 'q');
  int accepted = 0;
  absl::Status refused;
  const auto deadline = std::chrono::steady_clock::now() + kDeadline;
  while (refused.ok() && std::chrono::steady_clock::now() < deadline && accepted < 20000) {
    absl::Status st = OnStrand([&] { return conn_->Send(chunk, true); });
    if (st.ok()) {
      ++accepted;
    } else {
      refused = st;
    }
  }
  ASSERT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_TRUE(Contains(refused.message(), "OnWritable")) << refused;
  EXPECT_LE(OnStrand([&] { return conn_->queued_messages(); }), 8u);

  ASSERT_TRUE(WaitServerConn(0));
  upstream_.conn(0)->SetSilent(false);
  ASSERT_TRUE(WaitFor([&] { return handler_->writables() >= 1; }, kDeadline));
  // Nothing accepted was lost or reordered into oblivion.
  ASSERT_TRUE(WaitFor([&] { return upstream_.message_count() == static_cast<size_t>(accepted); }, kDeadline));
  // The server can read the last message before the client's write completion ran.
  EXPECT_TRUE(WaitFor([&] { return conn_->stats().frames_out.load() == static_cast<uint64_t>(accepted); }, kDeadline))
      << conn_->stats().frames_out.load() << " of " << accepted;
  EXPECT_TRUE(OnStrand([&] { return conn_->Send(chunk, true); }).ok());
}

TEST_F(ConnectionTest, HeartbeatsFireWhileReady) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.keepalive.heartbeat_interval = milliseconds(20);
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return handler_->heartbeats() >= 3; }, kDeadline));
  EXPECT_EQ(conn_->state(), ConnectionState::kReady);
}

TEST_F(ConnectionTest, NoHeartbeatsBeforeReady) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  ConnectionOptions o = PlainOptions();
  o.keepalive.heartbeat_interval = milliseconds(5);
  o.keepalive.ping_interval = milliseconds(5);
  o.keepalive.pong_timeout = seconds(5);
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 1; }, kDeadline));
  OnStrand([&] { conn_->MarkAuthenticating(); });
  EXPECT_EQ(conn_->state(), ConnectionState::kAuthenticating);
  EXPECT_EQ(handler_->heartbeats(), 0);
  OnStrand([&] { conn_->MarkReady(); });
  ASSERT_TRUE(WaitFor([&] { return handler_->heartbeats() >= 1; }, kDeadline));
}

TEST_F(ConnectionTest, PausedReadsDeliverNothingUntilResumed) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  ConnectionOptions o = PlainOptions();
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 1; }, kDeadline));
  // Paused before anything arrived: no read is waiting, so nothing is delivered.
  OnStrand([&] { conn_->PauseReads(); });
  ASSERT_TRUE(WaitServerConn(0));
  upstream_.conn(0)->Send("first", false);
  upstream_.conn(0)->Send("second", false);
  upstream_.conn(0)->Send("third", false);
  OnStrand([] {});
  EXPECT_EQ(handler_->messages().size(), 0u);
  OnStrand([&] { conn_->ResumeReads(); });
  ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == 3; }, kDeadline));
  EXPECT_EQ(handler_->messages()[0].first, "first");
  EXPECT_EQ(handler_->messages()[1].first, "second");
  EXPECT_EQ(handler_->messages()[2].first, "third");
  // Paused inside a message's callback: the messages already read wait, in order.
  handler_->pause_on_message = true;
  upstream_.conn(0)->Send("fourth", false);
  upstream_.conn(0)->Send("fifth", false);
  ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == 4; }, kDeadline));
  OnStrand([] {});
  EXPECT_EQ(handler_->messages().size(), 4u);
  handler_->pause_on_message = false;
  OnStrand([&] { conn_->ResumeReads(); });
  ASSERT_TRUE(WaitFor([&] { return handler_->messages().size() == 5; }, kDeadline));
  EXPECT_EQ(handler_->messages()[3].first, "fourth");
  EXPECT_EQ(handler_->messages()[4].first, "fifth");
}

TEST_F(ConnectionTest, ADropWhileReadsArePausedIsReportedOnceTheyResume) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  StartConnection(PlainOptions());
  ExpectADropWhilePausedReportedOnceResumed();
}

TEST_F(ConnectionTest, BackoffResetsAfterAHealthyPeriod) {
  ConnectionOptions o = PlainOptions();
  o.backoff.reset_after = milliseconds(100);
  int64_t ready_since = 0;
  ASSERT_NO_FATAL_FAILURE(ReadyAfterOneDrop(o, &ready_since));
  // Healthy for ten times reset_after (slack for the timer on a loaded machine).
  ASSERT_TRUE(WaitFor([&] { return absl::ToUnixMillis(absl::Now()) - ready_since > 1000; }, kDeadline));
  ASSERT_NO_FATAL_FAILURE(DropAndExpectTheBackoffReset("backoff was not reset after the healthy period"));
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() == 3 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

// One timer serves every slot: a heartbeat that fires and re-arms itself (2 s on) must
// not push back the healthy period that ends before that (at 2.1 s). It used to: the
// backoff was reset only at the next heartbeat, 4 s after the connection became ready.
TEST_F(ConnectionTest, ARearmedHeartbeatDoesNotDelayTheHealthyPeriod) {
  ConnectionOptions o = PlainOptions();
  o.backoff.reset_after = milliseconds(2100);
  o.keepalive.heartbeat_interval = seconds(2);
  int64_t ready_since = 0;
  ASSERT_NO_FATAL_FAILURE(ReadyAfterOneDrop(o, &ready_since));
  // Past the first heartbeat (2 s) and the healthy period (2.1 s), well before the second
  // heartbeat (4 s).
  ASSERT_TRUE(WaitFor([&] { return handler_->heartbeats() >= 1; }, kDeadline));
  ASSERT_TRUE(WaitFor([&] { return absl::ToUnixMillis(absl::Now()) - ready_since > 3000; }, kDeadline));
  ASSERT_NO_FATAL_FAILURE(DropAndExpectTheBackoffReset("the healthy period ended late"));
}

TEST_F(ConnectionTest, ReconnectKeepsTheBackoffGrowing) {
  // A rejected login: the handler calls Reconnect on every open. With caps of 10 ms and
  // then 1000 s, the third attempt must not come quickly.
  upstream_.Start();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  ConnectionOptions o = PlainOptions();
  o.backoff.initial = milliseconds(10);
  o.backoff.multiplier = 100000;
  o.backoff.max = seconds(1000);
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 1; }, kDeadline));
  OnStrand([&] { conn_->Reconnect(absl::UnauthenticatedError("login rejected")); });
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 2; }, kDeadline));
  OnStrand([&] { conn_->Reconnect(absl::UnauthenticatedError("login rejected")); });
  EXPECT_EQ(conn_->state(), ConnectionState::kBackingOff);
  const auto d = handler_->disconnects();
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[1].status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(d[1].will_retry);
  EXPECT_TRUE(Contains(conn_->last_error(), "login rejected"));
  // A second Reconnect while backing off does not start another attempt.
  OnStrand([&] { conn_->Reconnect(absl::UnauthenticatedError("again")); });
  EXPECT_EQ(handler_->disconnects().size(), 2u);
  EXPECT_EQ(handler_->prepares(), 2);
}

TEST_F(ConnectionTest, ConnectionRefusedIsRetried) {
  // A port that nothing listens on: bind a server, note its port, stop it.
  upstream_.Start();
  const std::string url = upstream_.server->url();
  upstream_.server->Stop();
  SetUrl(url);
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitDisconnects(2));
  for (const auto& d : handler_->disconnects()) {
    EXPECT_EQ(d.status.code(), absl::StatusCode::kUnavailable) << d.status;
    EXPECT_TRUE(d.will_retry);
  }
  EXPECT_GE(conn_->stats().attempts.load(), 2u);
}

// A host name goes through the resolver (an address is dialled without one); "localhost"
// may also resolve to ::1, where nothing listens: the next address is tried.
TEST_F(ConnectionTest, HostNameIsResolved) {
  upstream_.Start();
  SetUrl(absl::StrCat("ws://localhost:", upstream_.server->port(), "/by-name"));
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline))
      << conn_->last_error();
  absl::MutexLock lock(&upstream_.mu);
  ASSERT_EQ(upstream_.handshakes.size(), 1u);
  EXPECT_EQ(upstream_.handshakes[0].target, "/by-name");
}

TEST_F(ConnectionTest, NoReconnectWhenDisabled) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int) { c->Drop(); };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();
  o.reconnect = false;
  StartConnection(o);
  // The state turns CLOSED on the strand just before OnDisconnected runs there: wait for
  // both.
  ASSERT_TRUE(WaitFor([&] {
    return conn_->state() == ConnectionState::kClosed && !handler_->disconnects().empty();
  }, kDeadline));
  ASSERT_EQ(handler_->disconnects().size(), 1u);
  EXPECT_FALSE(handler_->disconnects()[0].will_retry);
}

// ---- Refusals reach the handler as such and choose the retry policy. ----

TEST(ClassifyDisconnect, DefaultTable) {
  EXPECT_EQ(ClassifyDisconnect(401, 0, false), DisconnectKind::kAuthRefused);
  EXPECT_EQ(ClassifyDisconnect(403, 0, true), DisconnectKind::kAuthRefused);
  EXPECT_EQ(ClassifyDisconnect(429, 0, false), DisconnectKind::kSlowDown);
  EXPECT_EQ(ClassifyDisconnect(503, 0, true), DisconnectKind::kSlowDown);
  EXPECT_EQ(ClassifyDisconnect(503, 0, false), DisconnectKind::kError);
  EXPECT_EQ(ClassifyDisconnect(400, 0, false), DisconnectKind::kError);
  EXPECT_EQ(ClassifyDisconnect(404, 0, true), DisconnectKind::kError);
  for (uint16_t code : {1008, 4001, 4003, 4401, 4403}) {
    EXPECT_EQ(ClassifyDisconnect(0, code, false), DisconnectKind::kAuthRefused) << code;
  }
  EXPECT_EQ(ClassifyDisconnect(0, 1013, false), DisconnectKind::kSlowDown);
  EXPECT_EQ(ClassifyDisconnect(0, 4429, false), DisconnectKind::kSlowDown);
  for (uint16_t code : {1000, 1001, 1005, 1011, 1012, 4000, 4999}) {
    EXPECT_EQ(ClassifyDisconnect(0, code, false), DisconnectKind::kClosedByPeer) << code;
  }
  EXPECT_EQ(ClassifyDisconnect(0, 0, false), DisconnectKind::kError);
  EXPECT_EQ(ToString(DisconnectKind::kAuthRefused), "AUTH_REFUSED");
}

TEST_F(ConnectionTest, Upgrade401IsAuthRefusedAndRetriesSlowlyUntilTheSecretIsFixed) {
  ExpectAuthRefusedUpgrade(absl::UnauthenticatedError("token expired"), 401);
}

TEST_F(ConnectionTest, Upgrade403IsAuthRefusedAndRetriesSlowlyUntilTheSecretIsFixed) {
  ExpectAuthRefusedUpgrade(absl::PermissionDeniedError("key lacks the stream scope"), 403);
}

TEST_F(ConnectionTest, ServerClose4401IsAuthRefused) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(4401, "token revoked");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(AuthPolicyOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.info.kind, DisconnectKind::kAuthRefused) << ToString(d.info.kind) << " " << d.status;
  EXPECT_EQ(d.info.close_code, 4401);
  EXPECT_EQ(d.info.close_reason, "token revoked");
  EXPECT_EQ(d.info.http_status, 0);
  EXPECT_TRUE(d.info.was_open);
  EXPECT_TRUE(Contains(d.status.message(), "4401")) << d.status;
  EXPECT_TRUE(d.will_retry);
  EXPECT_LE(d.retry_delay_ms, kAuthMaxMs) << "not the auth backoff";
  EXPECT_EQ(conn_->stats().auth_refusals.load(), 1u);
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

TEST_F(ConnectionTest, ServerClose1013IsSlowDownAndWaitsAtLeastTheSlowDownDelay) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(1013, "overloaded");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();  // normal backoff <= 100 ms
  o.slow_down_delay = milliseconds(300);
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.info.kind, DisconnectKind::kSlowDown) << ToString(d.info.kind) << " " << d.status;
  EXPECT_EQ(d.info.close_code, 1013);
  EXPECT_EQ(d.info.close_reason, "overloaded");
  EXPECT_TRUE(d.info.was_open);
  EXPECT_TRUE(d.will_retry);
  EXPECT_GE(d.retry_delay_ms, 300);
  EXPECT_EQ(conn_->stats().auth_refusals.load(), 0u);
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
}

TEST_F(ConnectionTest, Upgrade429WithRetryAfterIsSlowDownAndHonoursItUpToTheCap) {
  std::atomic<int> handshakes{0};
  upstream_.on_handshake = [&](const HandshakeInfo&, std::string*) {
    if (handshakes.fetch_add(1) == 0) {
      return upstreams::WithRetryAfter(absl::ResourceExhaustedError("rate limited"), 3600);
    }
    return absl::OkStatus();
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();  // normal backoff <= 100 ms
  o.slow_down_delay = milliseconds(50);
  o.max_retry_after = seconds(1);
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.info.kind, DisconnectKind::kSlowDown) << ToString(d.info.kind) << " " << d.status;
  EXPECT_EQ(d.info.http_status, 429);
  EXPECT_TRUE(Contains(d.info.http_body, "rate limited")) << d.info.http_body;
  EXPECT_EQ(d.info.retry_after, seconds(3600));
  EXPECT_EQ(d.status.code(), absl::StatusCode::kResourceExhausted) << d.status;
  EXPECT_TRUE(Contains(d.status.message(), "Retry-After")) << d.status;
  EXPECT_FALSE(d.info.was_open);
  // max(normal <= 100 ms, slow_down_delay 50 ms, min(Retry-After 1 h, max_retry_after 1 s)).
  EXPECT_EQ(d.retry_delay_ms, 1000);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));
}

TEST_F(ConnectionTest, Upgrade503IsSlowDownOnlyWithRetryAfter) {
  std::atomic<int> handshakes{0};
  upstream_.on_handshake = [&](const HandshakeInfo&, std::string*) {
    switch (handshakes.fetch_add(1)) {
      case 0:
        return absl::UnavailableError("maintenance");
      case 1:
        return upstreams::WithRetryAfter(absl::UnavailableError("maintenance"), 1);
      default:
        return absl::OkStatus();
    }
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = PlainOptions();  // normal backoff <= 100 ms
  o.slow_down_delay = milliseconds(50);
  StartConnection(o);
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));
  const auto ds = handler_->disconnects();
  ASSERT_EQ(ds.size(), 2u);
  EXPECT_EQ(ds[0].info.kind, DisconnectKind::kError) << ToString(ds[0].info.kind);
  EXPECT_EQ(ds[0].info.http_status, 503);
  EXPECT_EQ(ds[0].info.retry_after, Duration::zero());
  EXPECT_LE(ds[0].retry_delay_ms, 100);
  EXPECT_EQ(ds[1].info.kind, DisconnectKind::kSlowDown) << ToString(ds[1].info.kind);
  EXPECT_EQ(ds[1].info.http_status, 503);
  EXPECT_EQ(ds[1].info.retry_after, seconds(1));
  EXPECT_GE(ds[1].retry_delay_ms, 1000);
}

TEST_F(ConnectionTest, ServerCloseWithOtherCodesIsClosedByPeerWithTheCode) {
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(1000, "bye");
    if (index == 1) c->Close(1011, "internal error");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 3 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
  const auto ds = handler_->disconnects();
  ASSERT_EQ(ds.size(), 2u);
  EXPECT_EQ(ds[0].info.kind, DisconnectKind::kClosedByPeer) << ToString(ds[0].info.kind);
  EXPECT_EQ(ds[0].info.close_code, 1000);
  EXPECT_EQ(ds[0].info.close_reason, "bye");
  EXPECT_EQ(ds[1].info.kind, DisconnectKind::kClosedByPeer) << ToString(ds[1].info.kind);
  EXPECT_EQ(ds[1].info.close_code, 1011);
  EXPECT_EQ(ds[1].info.close_reason, "internal error");
  for (const auto& d : ds) {
    EXPECT_TRUE(d.info.was_open);
    EXPECT_TRUE(d.will_retry);
    EXPECT_LE(d.retry_delay_ms, 100);  // the normal backoff
  }
  EXPECT_EQ(conn_->stats().auth_refusals.load(), 0u);
}

TEST_F(ConnectionTest, ReconnectWithAuthRefusedUsesTheAuthBackoff) {
  // A protocol-level login refusal: the WebSocket opened, the login answer said no.
  upstream_.Start();
  SetUrl(upstream_.server->url());
  handler_->auto_ready = false;
  StartConnection(AuthPolicyOptions());
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 1; }, kDeadline));
  OnStrand([&] {
    conn_->Reconnect(absl::UnauthenticatedError("login rejected"), DisconnectKind::kAuthRefused);
  });
  ASSERT_EQ(handler_->disconnects().size(), 1u);
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.info.kind, DisconnectKind::kAuthRefused) << ToString(d.info.kind);
  EXPECT_TRUE(d.info.was_open);
  EXPECT_TRUE(d.will_retry);
  EXPECT_LE(d.retry_delay_ms, kAuthMaxMs) << "not the auth backoff";
  EXPECT_EQ(conn_->stats().auth_refusals.load(), 1u);
  // Retried on its own (under the normal backoff that would take ~1000 s).
  ASSERT_TRUE(WaitFor([&] { return handler_->opens().size() == 2; }, kDeadline));
}

TEST_F(ConnectionTest, HandlerClassifyOverrideIsHonoured) {
  // A protocol whose "bad API key" close code is 4999.
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(4999, "bad api key");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  std::vector<DisconnectInfo> seen;  // written on the strand, read after the waits below
  handler_->classify = [&seen](const DisconnectInfo& info) {
    seen.push_back(info);
    if (info.close_code == 4999) return DisconnectKind::kAuthRefused;
    return ClassifyDisconnect(info.http_status, info.close_code, info.retry_after > Duration::zero());
  };
  StartConnection(AuthPolicyOptions());
  ASSERT_TRUE(WaitDisconnects(1));
  const auto d = handler_->disconnects()[0];
  EXPECT_EQ(d.info.kind, DisconnectKind::kAuthRefused) << ToString(d.info.kind);
  EXPECT_EQ(d.info.close_code, 4999);
  EXPECT_LE(d.retry_delay_ms, kAuthMaxMs) << "not the auth backoff";
  EXPECT_EQ(conn_->stats().auth_refusals.load(), 1u);
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
  OnStrand([&] {
    ASSERT_EQ(seen.size(), 1u);
    EXPECT_EQ(seen[0].kind, DisconnectKind::kError);  // still unset when asked
    EXPECT_EQ(seen[0].close_code, 4999);
    EXPECT_EQ(seen[0].close_reason, "bad api key");
  });
}

TEST_F(ConnectionTest, HealthyPeriodResetsTheAuthBackoff) {
  // Auth caps: 10 ms for the first refusal, then 1000 s. Only a reset makes the delay
  // after the second refusal small again.
  upstream_.on_open = [](const std::shared_ptr<WsServerConnection>& c, int index) {
    if (index == 0) c->Close(4401, "token revoked");
  };
  upstream_.Start();
  SetUrl(upstream_.server->url());
  ConnectionOptions o = AuthPolicyOptions();
  o.auth_backoff.initial = milliseconds(10);
  o.auth_backoff.multiplier = 100000;
  o.auth_backoff.max = seconds(1000);
  o.backoff.reset_after = milliseconds(100);
  StartConnection(o);
  ASSERT_TRUE(WaitDisconnects(1));
  EXPECT_LE(handler_->disconnects()[0].retry_delay_ms, 10);
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshake_count() >= 2 && conn_->state() == ConnectionState::kReady; },
                      kDeadline));
  // Healthy for ten times reset_after (slack for a loaded machine).
  const int64_t ready_since = conn_->stats().ready_since_unix_ms.load();
  ASSERT_GT(ready_since, 0) << "ready without the time it became ready";
  ASSERT_TRUE(WaitFor([&] { return absl::ToUnixMillis(absl::Now()) - ready_since > 1000; }, kDeadline));
  ASSERT_TRUE(WaitFor([&] { return upstream_.conn(1) != nullptr; }, kDeadline));
  upstream_.conn(1)->Close(4401, "token revoked again");
  ASSERT_TRUE(WaitDisconnects(2));
  const auto d = handler_->disconnects()[1];
  EXPECT_EQ(d.info.kind, DisconnectKind::kAuthRefused) << ToString(d.info.kind);
  EXPECT_LE(d.retry_delay_ms, 10) << "the auth backoff was not reset after the healthy period";
}

TEST_F(ConnectionTest, StopsWhenTheHandlerIsGone) {
  upstream_.Start();
  SetUrl(upstream_.server->url());
  StartConnection(PlainOptions());
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kReady; }, kDeadline));
  handler_.reset();
  ASSERT_TRUE(WaitServerConn(0));
  upstream_.conn(0)->Drop();
  ASSERT_TRUE(WaitFor([&] { return conn_->state() == ConnectionState::kClosed; }, kDeadline));
  EXPECT_EQ(upstream_.handshake_count(), 1u);
}

TEST(WsServer, RefusesNonLoopbackAddresses) {
  WsServerOptions o;
  o.listen = "0.0.0.0:0";
  WsServer server(o, {});
  const absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(Contains(st.message(), "loopback")) << st;
  o.listen = "no-port";
  WsServer bad(o, {});
  EXPECT_EQ(bad.Start().code(), absl::StatusCode::kInvalidArgument);
}

TEST(WsServer, TlsNeedsCertificateAndKey) {
  WsServerOptions o;
  o.tls = true;
  WsServer server(o, {});
  EXPECT_EQ(server.Start().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace wsbridge::core
