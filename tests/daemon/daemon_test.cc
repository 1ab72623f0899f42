// In-process tests of the daemon: a real gRPC server on 127.0.0.1:0 (and Unix sockets),
// real clients, a real test bridge.
#include "daemon/daemon.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <optional>
#include <thread>

#include <google/protobuf/descriptor.pb.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "bridges/core/status.h"
#include "clients.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "daemon/auth.h"
#include "daemon/rpc_metrics.h"
#include "daemon_test.grpc.pb.h"
#include "test_bridge.h"
#include "tests/support/test_support.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"

namespace wsbridge::daemontest {
namespace {

using grpc::health::v1::HealthCheckResponse;
using wsbridge::config::v1::DaemonConfig;
using wsbridge::testing::TempDir;
using wsbridge::testing::TestPki;
using wsbridge::testing::WaitFor;

constexpr char kTestService[] = "wsbridge.daemontest.v1.TestService";

DaemonConfig BaseConfig() {
  DaemonConfig config;
  config.mutable_server()->set_listen("127.0.0.1:0");
  config.mutable_admin()->set_listen("127.0.0.1:0");
  config.mutable_shutdown()->mutable_drain_timeout()->set_seconds(5);
  config.mutable_shutdown()->mutable_deadline()->set_seconds(20);
  auto* bridge = config.add_bridges();
  bridge->set_name("test");
  bridge->mutable_dfx();
  return config;
}

class DaemonTest : public ::testing::Test {
 protected:
  DaemonTest() { RegisterTestBridge(registry_, &bridges_); }
  ~DaemonTest() override { daemon_.reset(); }

  absl::Status Start(DaemonConfig config) {
    daemon_ = std::make_unique<daemon::Daemon>(std::move(config), registry_,
                                               daemon::DaemonOptions{.configure_logging = false});
    return daemon_->Start();
  }
  void StartOrDie(DaemonConfig config = BaseConfig()) {
    absl::Status status = Start(std::move(config));
    ASSERT_TRUE(status.ok()) << status;
  }
  std::shared_ptr<grpc::Channel> Channel() {
    return grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                               grpc::InsecureChannelCredentials());
  }
  TestBridge& bridge() { return *bridges_.at(0); }
  std::string Metrics() {
    auto response = HttpRequest(daemon_->admin_port(), "GET", "/metrics");
    EXPECT_TRUE(response.ok()) << response.status();
    return response.ok() ? response->body : "";
  }

  core::BridgeRegistry registry_;
  std::vector<TestBridge*> bridges_;
  std::unique_ptr<daemon::Daemon> daemon_;
};

grpc::Status Echo(const std::shared_ptr<grpc::Channel>& channel, const std::string& text,
                  const std::string& authorization = "", std::string* reply = nullptr) {
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  v1::EchoRequest request;
  request.set_text(text);
  v1::EchoResponse response;
  grpc::Status status = stub->Echo(&context, request, &response);
  if (reply != nullptr) *reply = response.text();
  return status;
}

TEST_F(DaemonTest, HealthIsServingOverallAndPerService) {
  StartOrDie();
  EXPECT_TRUE(bridge().started());
  EXPECT_TRUE(daemon_->ready());
  auto channel = Channel();
  EXPECT_EQ(CheckHealth(channel, "").value(), HealthCheckResponse::SERVING);
  EXPECT_EQ(CheckHealth(channel, kTestService).value(), HealthCheckResponse::SERVING);
  EXPECT_EQ(CheckHealth(channel, "wsbridge.admin.v1.AdminService").value(),
            HealthCheckResponse::SERVING);
  EXPECT_EQ(CheckHealth(channel, "no.such.Service").status().code(), absl::StatusCode::kNotFound);
  std::string reply;
  EXPECT_TRUE(Echo(channel, "hi", "", &reply).ok());
  EXPECT_EQ(reply, "hi");
}

TEST_F(DaemonTest, HealthAndReadinessFollowBridgeServing) {
  StartOrDie();
  auto channel = Channel();
  bridge().SetServing(false);
  EXPECT_TRUE(WaitFor([&] {
    return CheckHealth(channel, "").value_or(HealthCheckResponse::UNKNOWN) ==
               HealthCheckResponse::NOT_SERVING &&
           CheckHealth(channel, kTestService).value_or(HealthCheckResponse::UNKNOWN) ==
               HealthCheckResponse::NOT_SERVING;
  }));
  // The daemon's health poll publishes health first and readiness right after, on its
  // own thread: readiness may lag the health status just seen.
  absl::StatusOr<HttpResponse> readyz;
  EXPECT_TRUE(WaitFor([&] {
    readyz = HttpRequest(daemon_->admin_port(), "GET", "/readyz");
    return readyz.ok() && readyz->status == 503;
  })) << (readyz.ok() ? std::to_string(readyz->status) : readyz.status().ToString());
  ASSERT_TRUE(readyz.ok()) << readyz.status();
  EXPECT_NE(readyz->body.find("test"), std::string::npos) << readyz->body;
  // Liveness does not depend on the upstream.
  EXPECT_EQ(HttpRequest(daemon_->admin_port(), "GET", "/healthz")->status, 200);

  bridge().SetServing(true);
  EXPECT_TRUE(WaitFor([&] {
    return CheckHealth(channel, "").value_or(HealthCheckResponse::UNKNOWN) ==
           HealthCheckResponse::SERVING;
  }));
  EXPECT_TRUE(WaitFor([&] {
    auto r = HttpRequest(daemon_->admin_port(), "GET", "/readyz");
    return r.ok() && r->status == 200;
  }));
}

// grpc.health.v1.Health/Watch (served by the daemon on its completion queues): the
// current status at once, then each change, and NOT_SERVING once the drain begins; the
// stream ends when the server stops.
TEST_F(DaemonTest, HealthWatchSendsEachChangeAndTheDrain) {
  StartOrDie();
  auto stub = grpc::health::v1::Health::NewStub(Channel());
  struct Watch {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> reader;
    // The next status sent (UNKNOWN when the stream ended).
    HealthCheckResponse::ServingStatus Next() {
      HealthCheckResponse response;
      return reader->Read(&response) ? response.status() : HealthCheckResponse::UNKNOWN;
    }
  };
  auto open = [&](const std::string& service) {
    auto w = std::make_unique<Watch>();
    // The deadline bounds every Read below.
    w->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    w->reader = stub->Watch(&w->context, request);
    return w;
  };
  auto overall = open("");
  auto service = open(kTestService);
  auto unknown = open("no.such.Service");
  EXPECT_EQ(overall->Next(), HealthCheckResponse::SERVING);
  EXPECT_EQ(service->Next(), HealthCheckResponse::SERVING);
  EXPECT_EQ(unknown->Next(), HealthCheckResponse::SERVICE_UNKNOWN);

  bridge().SetServing(false);
  EXPECT_EQ(overall->Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(service->Next(), HealthCheckResponse::NOT_SERVING);
  bridge().SetServing(true);
  EXPECT_EQ(overall->Next(), HealthCheckResponse::SERVING);
  EXPECT_EQ(service->Next(), HealthCheckResponse::SERVING);

  daemon_->RequestShutdown();
  EXPECT_EQ(overall->Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(service->Next(), HealthCheckResponse::NOT_SERVING);
  daemon_->Wait();
  for (Watch* w : {overall.get(), service.get(), unknown.get()}) {
    EXPECT_EQ(w->Next(), HealthCheckResponse::UNKNOWN);  // ended
    EXPECT_NE(w->reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
}

TEST_F(DaemonTest, ReflectionListsServicesAndResolvesSymbols) {
  StartOrDie();
  auto channel = Channel();
  auto services = ReflectionListServices(channel);
  ASSERT_TRUE(services.ok()) << services.status();
  for (const char* name : {"grpc.health.v1.Health", "wsbridge.admin.v1.AdminService", kTestService,
                           "grpc.reflection.v1alpha.ServerReflection"}) {
    EXPECT_NE(std::find(services->begin(), services->end(), name), services->end()) << name;
  }
  struct Lookup {
    const char* symbol;
    const char* file;
  };
  for (const Lookup& lookup : {Lookup{"wsbridge.admin.v1.AdminService", "wsbridge/admin/v1/admin.proto"},
                               Lookup{"wsbridge.admin.v1.Session", "wsbridge/admin/v1/admin.proto"},
                               Lookup{"grpc.health.v1.Health", "grpc/health/v1/health.proto"},
                               Lookup{kTestService, "daemon_test.proto"},
                               Lookup{"wsbridge.dfx.v1.DfxService", "wsbridge/dfx/v1/dfx.proto"}}) {
    auto files = ReflectionFileContainingSymbol(channel, lookup.symbol);
    ASSERT_TRUE(files.ok()) << lookup.symbol << ": " << files.status();
    ASSERT_FALSE(files->empty()) << lookup.symbol;
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(files->front()));
    EXPECT_EQ(file.name(), lookup.file) << lookup.symbol;
  }
  EXPECT_EQ(ReflectionFileContainingSymbol(channel, "no.such.Symbol").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(DaemonTest, BearerTokenIsRequiredExceptForHealth) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_auth_token()->set_value("s3cret-token");
  StartOrDie(config);
  auto channel = Channel();

  grpc::Status missing = Echo(channel, "x");
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(missing.error_message().find("authorization: Bearer"), std::string::npos)
      << missing.error_message();
  grpc::Status wrong = Echo(channel, "x", "Bearer wrong-token");
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(wrong.error_message().find("wrong-token"), std::string::npos);
  EXPECT_EQ(wrong.error_message().find("s3cret"), std::string::npos);
  EXPECT_EQ(Echo(channel, "x", "Basic s3cret-token").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Echo(channel, "x", "Bearer s3cret-token-and-more").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Echo(channel, "x", "Bearer s3cret-token").ok());
  EXPECT_TRUE(Echo(channel, "x", "bearer s3cret-token").ok());

  EXPECT_EQ(CheckHealth(channel, "").value(), HealthCheckResponse::SERVING);

  auto admin = wsbridge::admin::v1::AdminService::NewStub(channel);
  {
    grpc::ClientContext context;
    wsbridge::admin::v1::ListSessionsResponse response;
    EXPECT_EQ(admin->ListSessions(&context, {}, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer s3cret-token");
    wsbridge::admin::v1::ListSessionsResponse response;
    EXPECT_TRUE(admin->ListSessions(&context, {}, &response).ok());
  }
  const std::string metrics = Metrics();
  EXPECT_NE(metrics.find("wsbridge_grpc_requests_total{method=\"/wsbridge.daemontest.v1.TestService/"
                         "Echo\",code=\"UNAUTHENTICATED\"} 4"),
            std::string::npos)
      << metrics;
}

TEST(AuthTest, ConstantTimeEquals) {
  EXPECT_TRUE(daemon::ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(daemon::ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(daemon::ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(daemon::ConstantTimeEquals("", "a"));
  EXPECT_TRUE(daemon::ConstantTimeEquals("", ""));
}

TEST(RpcTrackerTest, UnknownMethodsShareOneLabel) {
  daemon::RpcTracker tracker(nullptr, {"a.B"});
  EXPECT_EQ(tracker.MethodLabel("/a.B/C"), "/a.B/C");
  EXPECT_EQ(tracker.MethodLabel("/x.Y/Z"), "unknown");
  EXPECT_EQ(tracker.MethodLabel("/a.B/C/D"), "unknown");
  EXPECT_EQ(tracker.MethodLabel("garbage"), "unknown");
  EXPECT_EQ(tracker.MethodLabel(""), "unknown");
  EXPECT_FALSE(daemon::RpcTracker::HoldsDrain("/grpc.health.v1.Health/Watch"));
  EXPECT_TRUE(daemon::RpcTracker::HoldsDrain("/a.B/C"));
  EXPECT_TRUE(
      daemon::RpcTracker::HoldsDrain("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
}

// A bridge's calls end through Finished(method, code), which keeps each method's and
// code's counter after the first: every call still lands on the counter of its own
// method and code, and in_flight returns to 0.
TEST(RpcTrackerTest, BridgeCallsAreCountedByMethodAndCode) {
  core::MetricsRegistry registry;
  daemon::RpcTracker tracker(&registry, {"a.B"});
  auto count = [&](const std::string& method, const std::string& code) {
    return registry.GetCounter("wsbridge_grpc_requests_total", "", {{"method", method}, {"code", code}}).value();
  };
  const std::vector<std::pair<std::string, grpc::StatusCode>> calls = {
      {"/a.B/C", grpc::StatusCode::OK},          {"/a.B/C", grpc::StatusCode::OK},
      {"/a.B/C", grpc::StatusCode::UNAVAILABLE}, {"/a.B/D", grpc::StatusCode::OK},
      {"/x.Y/Z", grpc::StatusCode::OK},          {"/a.B/C", grpc::StatusCode::OK},
      {"/a.B/C", static_cast<grpc::StatusCode>(20)}};
  for (const auto& [method, code] : calls) {
    tracker.Started();
    tracker.Finished(method, code);
  }
  EXPECT_EQ(count("/a.B/C", "OK"), 3u);
  EXPECT_EQ(count("/a.B/C", "UNAVAILABLE"), 1u);
  EXPECT_EQ(count("/a.B/C", "UNKNOWN"), 1u);  // a code outside gRPC's range
  EXPECT_EQ(count("/a.B/D", "OK"), 1u);
  EXPECT_EQ(count("unknown", "OK"), 1u);
  EXPECT_EQ(count("/a.B/D", "UNAVAILABLE"), 0u);
  EXPECT_EQ(tracker.in_flight(), 0);
  EXPECT_EQ(tracker.draining_calls(), 0);
}

std::shared_ptr<grpc::Channel> TlsChannel(int port, const std::string& ca_pem,
                                          const std::string& cert_pem = "",
                                          const std::string& key_pem = "") {
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = ca_pem;
  options.pem_cert_chain = cert_pem;
  options.pem_private_key = key_pem;
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), grpc::SslCredentials(options),
                                   args);
}

TEST_F(DaemonTest, TlsForCallers) {
  TestPki pki;
  auto ca = pki.MakeCa("server-ca");
  auto server = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_tls()->set_cert_file(server.cert_file);
  config.mutable_server()->mutable_tls()->set_key_file(server.key_file);
  StartOrDie(config);

  EXPECT_TRUE(Echo(TlsChannel(daemon_->grpc_port(), ca.cert_pem), "x").ok());
  EXPECT_FALSE(Echo(Channel(), "x").ok()) << "plaintext must be refused";
  auto other_ca = pki.MakeCa("other-ca");
  EXPECT_FALSE(Echo(TlsChannel(daemon_->grpc_port(), other_ca.cert_pem), "x").ok())
      << "a server certificate from another CA must not verify";
}

TEST_F(DaemonTest, MutualTlsRequiresAClientCertificateFromTheConfiguredCa) {
  TestPki pki;
  auto ca = pki.MakeCa("server-ca");
  auto server = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  auto client_ca = pki.MakeCa("client-ca");
  auto client = pki.IssueClientCert(client_ca, "good-client");
  auto rogue_ca = pki.MakeCa("rogue-ca");
  auto rogue = pki.IssueClientCert(rogue_ca, "rogue-client");
  DaemonConfig config = BaseConfig();
  auto* tls = config.mutable_server()->mutable_tls();
  tls->set_cert_file(server.cert_file);
  tls->set_key_file(server.key_file);
  tls->set_client_ca_file(client_ca.cert_file);
  tls->set_require_client_cert(true);
  StartOrDie(config);

  const int port = daemon_->grpc_port();
  EXPECT_TRUE(Echo(TlsChannel(port, ca.cert_pem, client.cert_pem, client.key_pem), "x").ok());
  EXPECT_FALSE(Echo(TlsChannel(port, ca.cert_pem), "x").ok()) << "no client certificate";
  EXPECT_FALSE(Echo(TlsChannel(port, ca.cert_pem, rogue.cert_pem, rogue.key_pem), "x").ok())
      << "client certificate from an unknown CA";
}

TEST_F(DaemonTest, RequireClientCertWithoutCaIsAConfigError) {
  TestPki pki;
  auto ca = pki.MakeCa("server-ca");
  auto server = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  DaemonConfig config = BaseConfig();
  auto* tls = config.mutable_server()->mutable_tls();
  tls->set_cert_file(server.cert_file);
  tls->set_key_file(server.key_file);
  tls->set_require_client_cert(true);
  absl::Status status = Start(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("client_ca_file"), std::string::npos) << status;
}

TEST_F(DaemonTest, UnreadableCertificateIsAClearError) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_tls()->set_cert_file("/nonexistent/cert.pem");
  config.mutable_server()->mutable_tls()->set_key_file("/nonexistent/key.pem");
  absl::Status status = Start(config);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("server.tls.cert_file"), std::string::npos) << status;
  EXPECT_NE(status.message().find("/nonexistent/cert.pem"), std::string::npos) << status;
}

TEST_F(DaemonTest, UnixSocketWithFileModeIsRemovedAtExit) {
  TempDir dir;
  const std::string path = dir.path() + "/run/wsbridged.sock";  // parent created on start
  DaemonConfig config = BaseConfig();
  config.mutable_server()->clear_listen();
  config.mutable_server()->set_unix_socket(path);
  config.mutable_server()->set_unix_socket_mode("0600");
  StartOrDie(config);
  EXPECT_EQ(daemon_->grpc_port(), 0);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << std::strerror(errno);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  auto channel = grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials());
  EXPECT_EQ(CheckHealth(channel, "").value(), HealthCheckResponse::SERVING);
  EXPECT_TRUE(Echo(channel, "over unix").ok());
  EXPECT_NE(daemon_->ListeningJson().find(path), std::string::npos);

  daemon_->RequestShutdown();
  daemon_->Wait();
  EXPECT_NE(lstat(path.c_str(), &st), 0) << "socket file left behind";
}

TEST_F(DaemonTest, StaleUnixSocketIsReplaced) {
  TempDir dir;
  const std::string path = dir.path() + "/stale.sock";
  {
    // A socket file whose listener is gone, as after a crash.
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    close(fd);
  }
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_unix_socket(path);
  StartOrDie(config);
  auto channel = grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials());
  EXPECT_EQ(CheckHealth(channel, "").value(), HealthCheckResponse::SERVING);
}

TEST_F(DaemonTest, UnixSocketPathThatIsNotASocketIsRefused) {
  TempDir dir;
  const std::string path = dir.WriteFile("precious.txt", "do not delete");
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_unix_socket(path);
  absl::Status status = Start(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("not a socket"), std::string::npos) << status;
  struct stat st {};
  EXPECT_EQ(stat(path.c_str(), &st), 0) << "the file must be left alone";
}

TEST_F(DaemonTest, NoListenerIsAConfigError) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->clear_listen();
  absl::Status status = Start(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("unix_socket"), std::string::npos) << status;
}

TEST_F(DaemonTest, BadAdminListenAddressIsAConfigError) {
  DaemonConfig config = BaseConfig();
  config.mutable_admin()->set_listen("not-an-address");
  absl::Status status = Start(config);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("admin.listen"), std::string::npos) << status;
}

TEST_F(DaemonTest, TwoBridgesServingTheSameApiAreRefused) {
  DaemonConfig config = BaseConfig();
  auto* second = config.add_bridges();
  second->set_name("again");
  second->mutable_dfx();
  absl::Status status = Start(config);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("both serve"), std::string::npos) << status;
}

TEST_F(DaemonTest, BridgeKindWithoutFactoryIsAConfigError) {
  core::BridgeRegistry empty;
  daemon::Daemon daemon(BaseConfig(), empty, {.configure_logging = false});
  absl::Status status = daemon.Start();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("bridges[0].dfx"), std::string::npos) << status;
}

TEST_F(DaemonTest, MaxMessageSizeIsEnforced) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_max_message_bytes(1024);
  StartOrDie(config);
  EXPECT_TRUE(Echo(Channel(), std::string(100, 'a')).ok());
  EXPECT_EQ(Echo(Channel(), std::string(4096, 'a')).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST_F(DaemonTest, AdminHttpServesMetricsHealthAndReadiness) {
  StartOrDie();
  const int port = daemon_->admin_port();
  ASSERT_NE(port, 0);
  auto healthz = HttpRequest(port, "GET", "/healthz");
  ASSERT_TRUE(healthz.ok()) << healthz.status();
  EXPECT_EQ(healthz->status, 200);
  EXPECT_EQ(HttpRequest(port, "GET", "/readyz")->status, 200);
  EXPECT_EQ(HttpRequest(port, "GET", "/readyz?verbose=1")->status, 200);
  EXPECT_EQ(HttpRequest(port, "GET", "/nope")->status, 404);
  auto post = HttpRequest(port, "POST", "/metrics");
  ASSERT_TRUE(post.ok());
  EXPECT_EQ(post->status, 405);
  EXPECT_NE(post->headers.find("Allow: GET"), std::string::npos) << post->headers;

  wsbridge::admin::v1::Session ready;
  ready.set_id("test/a");
  ready.set_state(wsbridge::admin::v1::SESSION_STATE_READY);
  ready.set_frames_in(7);
  ready.set_frames_out(3);
  ready.set_bytes_in(700);
  ready.set_bytes_out(300);
  ready.set_reconnects(2);
  bridge().AddSession(ready);
  wsbridge::admin::v1::Session backing_off;
  backing_off.set_id("test/b");
  backing_off.set_state(wsbridge::admin::v1::SESSION_STATE_BACKING_OFF);
  backing_off.set_frames_in(1);
  backing_off.set_reconnects(5);
  bridge().AddSession(backing_off);

  auto channel = Channel();
  ASSERT_TRUE(Echo(channel, "x").ok());
  ASSERT_TRUE(Echo(channel, "y").ok());
  ASSERT_FALSE(CheckHealth(channel, "no.such.Service").ok());

  auto metrics = HttpRequest(port, "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_EQ(metrics->status, 200);
  EXPECT_NE(metrics->headers.find("text/plain; version=0.0.4"), std::string::npos);
  const std::string& text = metrics->body;
  for (const char* line : {
           "wsbridge_grpc_requests_total{method=\"/wsbridge.daemontest.v1.TestService/Echo\","
           "code=\"OK\"} 2",
           "wsbridge_grpc_requests_total{method=\"/grpc.health.v1.Health/Check\","
           "code=\"NOT_FOUND\"} 1",
           "wsbridge_sessions{bridge=\"test\",state=\"ready\"} 1",
           "wsbridge_sessions{bridge=\"test\",state=\"backing_off\"} 1",
           "wsbridge_session_reconnects_total{bridge=\"test\"} 7",
           "wsbridge_upstream_frames_total{bridge=\"test\",direction=\"in\"} 8",
           "wsbridge_upstream_frames_total{bridge=\"test\",direction=\"out\"} 3",
           "wsbridge_upstream_bytes_total{bridge=\"test\",direction=\"in\"} 700",
           "wsbridge_upstream_bytes_total{bridge=\"test\",direction=\"out\"} 300",
           "# TYPE wsbridge_sessions gauge",
           "wsbridge_ready 1",
           "wsbridge_bridge_serving{bridge=\"test\"} 1",
       }) {
    EXPECT_NE(text.find(line), std::string::npos) << line << "\n" << text;
  }
}

TEST_F(DaemonTest, AdminServiceListsAndClosesSessions) {
  StartOrDie();
  wsbridge::admin::v1::Session a;
  a.set_id("test/a");
  a.set_state(wsbridge::admin::v1::SESSION_STATE_READY);
  bridge().AddSession(a);
  wsbridge::admin::v1::Session b;
  b.set_id("test/b");
  bridge().AddSession(b);
  auto admin = wsbridge::admin::v1::AdminService::NewStub(Channel());

  auto list = [&](const std::string& filter, wsbridge::admin::v1::ListSessionsResponse* out) {
    grpc::ClientContext context;
    wsbridge::admin::v1::ListSessionsRequest request;
    request.set_bridge(filter);
    return admin->ListSessions(&context, request, out);
  };
  auto close_session = [&](const std::string& id) {
    grpc::ClientContext context;
    wsbridge::admin::v1::CloseSessionRequest request;
    request.set_id(id);
    wsbridge::admin::v1::CloseSessionResponse response;
    return admin->CloseSession(&context, request, &response);
  };

  wsbridge::admin::v1::ListSessionsResponse all;
  ASSERT_TRUE(list("", &all).ok());
  ASSERT_EQ(all.sessions_size(), 2);
  EXPECT_EQ(all.sessions(0).id(), "test/a");
  EXPECT_EQ(all.sessions(0).bridge(), "test");
  wsbridge::admin::v1::ListSessionsResponse filtered;
  ASSERT_TRUE(list("test", &filtered).ok());
  EXPECT_EQ(filtered.sessions_size(), 2);
  wsbridge::admin::v1::ListSessionsResponse none;
  grpc::Status unknown_bridge = list("other", &none);
  EXPECT_EQ(unknown_bridge.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(unknown_bridge.error_message().find("test"), std::string::npos)
      << "should name the bridges that exist: " << unknown_bridge.error_message();

  EXPECT_TRUE(close_session("test/a").ok());
  EXPECT_EQ(bridge().closed_sessions(), std::vector<std::string>{"test/a"});
  wsbridge::admin::v1::ListSessionsResponse after;
  ASSERT_TRUE(list("", &after).ok());
  ASSERT_EQ(after.sessions_size(), 1);
  EXPECT_EQ(after.sessions(0).id(), "test/b");

  EXPECT_EQ(close_session("test/zzz").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(close_session("other/x").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(close_session("no-slash").error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::Status empty = close_session("");
  EXPECT_EQ(empty.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(empty.error_message().find("id"), std::string::npos);
}

TEST_F(DaemonTest, DrainRefusesNewCallsThenEndsOpenStreams) {
  DaemonConfig config = BaseConfig();
  // Long enough that the checks below run while the stream is still draining.
  config.mutable_shutdown()->mutable_drain_timeout()->set_seconds(5);
  config.mutable_shutdown()->mutable_deadline()->set_seconds(30);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext watch_context;
  auto watch = stub->Watch(&watch_context, v1::WatchRequest());
  v1::Event event;
  ASSERT_TRUE(watch->Read(&event));
  EXPECT_EQ(event.text(), "watching");
  EXPECT_EQ(bridge().open_calls(), 1u);

  daemon_->RequestShutdown();
  std::thread waiter([&] { daemon_->Wait(); });

  EXPECT_TRUE(WaitFor([&] {
    return CheckHealth(channel, "").value_or(HealthCheckResponse::UNKNOWN) ==
           HealthCheckResponse::NOT_SERVING;
  }));
  EXPECT_EQ(CheckHealth(channel, kTestService).value_or(HealthCheckResponse::UNKNOWN),
            HealthCheckResponse::NOT_SERVING);
  // Health goes NOT_SERVING before the daemon's control thread tells the bridges to drain.
  EXPECT_TRUE(WaitFor([&] { return bridge().draining(); }));
  EXPECT_FALSE(daemon_->ready());
  auto readyz = HttpRequest(daemon_->admin_port(), "GET", "/readyz");
  ASSERT_TRUE(readyz.ok()) << readyz.status();
  EXPECT_EQ(readyz->status, 503);
  EXPECT_NE(readyz->body.find("draining"), std::string::npos) << readyz->body;
  EXPECT_EQ(Echo(channel, "late").error_code(), grpc::StatusCode::UNAVAILABLE);
  // The open stream is still running: it gets the drain timeout.
  EXPECT_FALSE(bridge().shut_down());
  EXPECT_EQ(bridge().open_calls(), 1u);

  EXPECT_FALSE(watch->Read(&event));
  grpc::Status ended = watch->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ended.error_message(), "server shutting down");
  waiter.join();
  EXPECT_TRUE(bridge().shut_down());
}

TEST_F(DaemonTest, ShutdownWithoutOpenCallsEndsAndIsIdempotent) {
  StartOrDie();
  daemon_->RequestShutdown();
  daemon_->RequestShutdown();
  daemon_->Wait();
  EXPECT_TRUE(bridge().shut_down());
  EXPECT_FALSE(daemon_->ready());
  daemon_->Wait();  // returns at once once finished
}


// Issue #14, item 3: metadata above the limit fails that call alone; before the limit was
// announced, a 9 KB header block was a connection error that ended every call on it.
TEST_F(DaemonTest, OversizeMetadataFailsThatCallAloneAndTheConnectionGoesOn) {
  DaemonConfig config = BaseConfig();
  config.mutable_shutdown()->mutable_drain_timeout()->set_seconds(0);
  config.mutable_shutdown()->mutable_drain_timeout()->set_nanos(200'000'000);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext watch_context;
  auto watch = stub->Watch(&watch_context, v1::WatchRequest());
  v1::Event event;
  ASSERT_TRUE(watch->Read(&event));

  auto echo_with_metadata = [&](size_t bytes) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    context.AddMetadata("x-padding", std::string(bytes, 'p'));
    v1::EchoRequest request;
    request.set_text("padded");
    v1::EchoResponse response;
    return stub->Echo(&context, request, &response);
  };
  // Within the default limit (16 KiB).
  grpc::Status nine_kb = echo_with_metadata(9 * 1024);
  EXPECT_TRUE(nine_kb.ok()) << nine_kb.error_code() << " " << nine_kb.error_message();
  grpc::Status oversize = echo_with_metadata(40 * 1024);
  EXPECT_EQ(oversize.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << oversize.error_message();
  EXPECT_NE(oversize.error_message().find("server.max_metadata_bytes"), std::string::npos)
      << oversize.error_message();
  EXPECT_TRUE(Echo(channel, "after").ok());

  // The stream opened first was never touched: it ends only when the daemon ends it.
  daemon_->RequestShutdown();
  EXPECT_FALSE(watch->Read(&event));
  grpc::Status ended = watch->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ended.error_message(), "server shutting down");
}

TEST_F(DaemonTest, ConfiguredMetadataLimitIsEnforcedPerCall) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_max_metadata_bytes(4096);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  auto echo_with_metadata = [&](size_t bytes) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    context.AddMetadata("x-padding", std::string(bytes, 'p'));
    v1::EchoResponse response;
    return stub->Echo(&context, v1::EchoRequest(), &response);
  };
  EXPECT_TRUE(echo_with_metadata(2 * 1024).ok());
  EXPECT_EQ(echo_with_metadata(6 * 1024).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(echo_with_metadata(2 * 1024).ok());
}

// Issue #14, item 4: reflection answered without the token.
TEST_F(DaemonTest, ReflectionNeedsTheBearerTokenUnlessOpenedInTheConfig) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_auth_token()->set_value("s3cret-token");
  StartOrDie(config);
  auto channel = Channel();
  auto refused = ReflectionListServices(channel);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated) << refused.status();
  EXPECT_EQ(ReflectionListServices(channel, "Bearer wrong-token").status().code(),
            absl::StatusCode::kUnauthenticated);
  auto allowed = ReflectionListServices(channel, "Bearer s3cret-token");
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  EXPECT_NE(std::find(allowed->begin(), allowed->end(), kTestService), allowed->end());

  daemon_.reset();
  bridges_.clear();
  config.mutable_server()->set_reflection_without_token(true);
  StartOrDie(config);
  channel = Channel();
  auto open = ReflectionListServices(channel);
  ASSERT_TRUE(open.ok()) << open.status();
  EXPECT_NE(std::find(open->begin(), open->end(), kTestService), open->end());
  // Only reflection is opened.
  EXPECT_EQ(Echo(channel, "x").error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

// Issue #14, item 6: a 6,000-char id echoed into the error made the trailers too large
// for the caller, who saw RESOURCE_EXHAUSTED instead of NOT_FOUND.
TEST_F(DaemonTest, LongUpstreamErrorTextIsCutAndTheCodeSurvives) {
  StartOrDie();
  auto channel = Channel();
  std::string reply;
  grpc::Status shortish = Echo(channel, "missing:m-1", "", &reply);
  EXPECT_EQ(shortish.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(shortish.error_message(), "no measurement \"m-1\" on the upstream");

  const std::string id(6000, 'i');
  grpc::Status status = Echo(channel, "missing:" + id);
  ASSERT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message().size()
                                                              << " " << status.error_message();
  EXPECT_LE(status.error_message().size(), core::kMaxGrpcMessageBytes + 40);
  EXPECT_NE(status.error_message().find("no measurement \"iiii"), std::string::npos);
  const size_t full = absl::StrCat("no measurement \"", id, "\" on the upstream").size();
  EXPECT_NE(status.error_message().find(absl::StrCat("...[cut: ", full, " bytes in all]")),
            std::string::npos)
      << status.error_message().substr(status.error_message().size() - 60);
  absl::Status back = core::FromGrpcStatus(status);
  EXPECT_EQ(core::ErrorReason(back), "MEASUREMENT_NOT_FOUND");
  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(status.error_details()));
  ASSERT_EQ(details.details_size(), 1);
  google::rpc::ErrorInfo info;
  ASSERT_TRUE(info.ParseFromString(details.details(0).value()));
  const std::string& shown_id = info.metadata().at("measurement_id");
  EXPECT_LE(shown_id.size(), core::kMaxErrorInfoValueBytes + 40);
  EXPECT_EQ(shown_id.substr(0, 10), std::string(10, 'i'));
  EXPECT_NE(shown_id.find("[cut: 6000 bytes in all]"), std::string::npos) << shown_id;
}

// Issue #14, item 7: under umask 000 the socket was 0777 until the chmod and its new
// parent directory stayed 0777.
TEST_F(DaemonTest, UnixSocketAndItsNewDirectoriesHaveTheirFinalModeUnderUmaskZero) {
  TempDir dir;
  const std::string parent = dir.path() + "/run/wsbridge";
  const std::string path = parent + "/wsbridged.sock";
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_unix_socket(path);
  config.mutable_server()->set_unix_socket_mode("0660");

  const mode_t previous = umask(0);
  // Watches the path while the daemon starts: every mode bit the socket ever showed.
  std::atomic<bool> stop{false};
  std::atomic<unsigned> seen_bits{0};
  std::atomic<int> sightings{0};
  std::thread watcher([&] {
    while (!stop.load()) {
      struct stat st {};
      if (lstat(path.c_str(), &st) == 0) {
        seen_bits.fetch_or(st.st_mode & 07777);
        sightings.fetch_add(1);
      }
    }
  });
  absl::Status started = Start(config);
  // Keep watching until the socket has been seen, so the loop ran over the start-up.
  WaitFor([&] { return sightings.load() > 0; });
  stop = true;
  watcher.join();
  umask(previous);
  ASSERT_TRUE(started.ok()) << started;

  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << std::strerror(errno);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  EXPECT_EQ(seen_bits.load() & ~0660u, 0u) << "socket was seen with mode bits " << std::oct
                                           << seen_bits.load();
  for (const std::string& d : {dir.path() + "/run", parent}) {
    ASSERT_EQ(stat(d.c_str(), &st), 0) << d;
    EXPECT_EQ(st.st_mode & 07777, 0770u) << d << " has mode " << std::oct << (st.st_mode & 07777);
  }
  auto channel = grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials());
  EXPECT_EQ(CheckHealth(channel, "").value(), HealthCheckResponse::SERVING);
}

// Issue #14, item 10: idle caller connections were never closed.
TEST_F(DaemonTest, IdleConnectionIsClosedAfterMaxIdle) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_connections()->mutable_max_idle()->set_nanos(300'000'000);
  StartOrDie(config);
  auto channel = Channel();
  ASSERT_TRUE(Echo(channel, "hi").ok());
  // The server's GOAWAY after max_idle without calls takes the client channel to IDLE.
  EXPECT_TRUE(WaitFor([&] { return channel->GetState(false) == GRPC_CHANNEL_IDLE; },
                      std::chrono::seconds(20)))
      << "channel state " << channel->GetState(false);
  // A gRPC client just reconnects on its next call.
  EXPECT_TRUE(Echo(channel, "again").ok());
}

// Issue #14, item 10: a caller that stops answering keepalive pings (a peer that vanished
// while its TCP connection looks open, or a process stalled as a whole) is disconnected
// keepalive_timeout after an unanswered ping. The caller here speaks raw HTTP/2: the
// preface, SETTINGS acknowledged, PINGs never.
TEST_F(DaemonTest, ACallerThatStopsAnsweringPingsIsDisconnected) {
  DaemonConfig config = BaseConfig();
  auto* c = config.mutable_server()->mutable_connections();
  c->mutable_keepalive_time()->set_nanos(200'000'000);
  c->mutable_keepalive_timeout()->set_nanos(300'000'000);
  c->mutable_max_idle()->set_seconds(0);  // off: only keepalive may close the connection
  StartOrDie(config);

  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(daemon_->grpc_port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << std::strerror(errno);
  // Reads wait at most 100 ms each, so the loop below checks its deadline.
  timeval tv{0, 100'000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  auto send_all = [fd](const std::string& bytes) {
    return ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
  };
  const std::string kSettings("\0\0\0\x04\0\0\0\0\0", 9);     // empty SETTINGS
  const std::string kSettingsAck("\0\0\0\x04\x01\0\0\0\0", 9);  // its ACK
  ASSERT_TRUE(send_all(std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + kSettings));

  std::string in;
  int pings = 0;
  bool closed = false;
  std::optional<std::chrono::steady_clock::time_point> first_ping;
  std::chrono::steady_clock::time_point closed_at;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!closed && std::chrono::steady_clock::now() < deadline) {
    char buf[4096];
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      closed = true;
      closed_at = std::chrono::steady_clock::now();
      break;
    }
    if (n > 0) in.append(buf, static_cast<size_t>(n));
    // Whole frames: 3-byte length, type, flags, 4-byte stream id, payload.
    while (in.size() >= 9) {
      const size_t len = (static_cast<uint8_t>(in[0]) << 16) | (static_cast<uint8_t>(in[1]) << 8) |
                         static_cast<uint8_t>(in[2]);
      if (in.size() < 9 + len) break;
      const uint8_t type = static_cast<uint8_t>(in[3]);
      const uint8_t flags = static_cast<uint8_t>(in[4]);
      if (type == 0x4 && (flags & 0x1) == 0) {
        ASSERT_TRUE(send_all(kSettingsAck));
      }
      if (type == 0x6 && (flags & 0x1) == 0) {
        ++pings;
        if (!first_ping) first_ping = std::chrono::steady_clock::now();
      }
      in.erase(0, 9 + len);
    }
  }
  ::close(fd);
  EXPECT_GE(pings, 1) << "the daemon sent no keepalive ping";
  ASSERT_TRUE(closed) << "a caller that never answered " << pings << " pings kept its connection";
  ASSERT_TRUE(first_ping.has_value());
  // Not before the timeout (a lower bound only: a busy machine closes later, never sooner).
  EXPECT_GE(closed_at - *first_ping, std::chrono::milliseconds(250));
  // Callers that answer pings (every gRPC client) are served as before.
  EXPECT_TRUE(Echo(Channel(), "still here").ok());
}

// The cap on one connection: streams beyond max_concurrent_streams wait in the caller's
// client until one ends; the server never holds more.
// The value of an unlabelled metric in the admin endpoint's text, or -1.
int64_t MetricValue(const std::string& text, const std::string& name) {
  const std::string key = "\n" + name + " ";
  const size_t at = text.find(key);
  if (at == std::string::npos) return -1;
  return std::strtoll(text.c_str() + at + key.size(), nullptr, 10);
}

// Issue #14, item 10: caller connections are capped (server.connections.max_connections,
// over TCP and the Unix socket together). One more is closed as soon as it is accepted:
// that caller's call fails UNAVAILABLE, the connections already open go on, the refusal
// is counted, and once a connection has closed a new caller gets in again.
TEST_F(DaemonTest, ConnectionsBeyondTheCapAreRefusedAndTheOpenOnesGoOn) {
  TempDir dir;
  const std::string path = dir.path() + "/wsbridged.sock";
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_unix_socket(path);
  config.mutable_server()->mutable_connections()->set_max_connections(2);
  StartOrDie(config);
  // Each channel its own connection (gRPC shares one between identical channels).
  auto own_connection = [] {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return args;
  };
  auto tcp = [&] {
    return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                     grpc::InsecureChannelCredentials(), own_connection());
  };
  auto first = tcp();
  ASSERT_TRUE(Echo(first, "one").ok());
  auto over_unix = grpc::CreateCustomChannel("unix:" + path, grpc::InsecureChannelCredentials(),
                                             own_connection());
  ASSERT_TRUE(Echo(over_unix, "two").ok());
  EXPECT_EQ(MetricValue(Metrics(), "wsbridge_server_connections_refused_total"), 0);

  auto third = tcp();
  grpc::Status refused = Echo(third, "three");
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  const std::string metrics = Metrics();
  EXPECT_GE(MetricValue(metrics, "wsbridge_server_connections_refused_total"), 1) << metrics;
  EXPECT_EQ(MetricValue(metrics, "wsbridge_server_connections"), 2) << metrics;
  EXPECT_TRUE(Echo(first, "still here").ok());
  EXPECT_TRUE(Echo(over_unix, "still here").ok());

  // One caller leaves: the gauge says so within a second or so (no new connection
  // needed), and its place is free.
  third.reset();
  first.reset();
  EXPECT_TRUE(WaitFor([&] { return MetricValue(Metrics(), "wsbridge_server_connections") == 1; },
                      std::chrono::seconds(20)));
  EXPECT_TRUE(Echo(tcp(), "four").ok());
  EXPECT_TRUE(Echo(over_unix, "and still here").ok());
}

TEST_F(DaemonTest, StreamsBeyondTheCapWaitForAFreeOne) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->set_max_concurrent_streams(2);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext first_context;
  grpc::ClientContext second_context;
  auto first = stub->Watch(&first_context, v1::WatchRequest());
  auto second = stub->Watch(&second_context, v1::WatchRequest());
  v1::Event event;
  ASSERT_TRUE(first->Read(&event));
  ASSERT_TRUE(second->Read(&event));
  EXPECT_EQ(bridge().open_calls(), 2u);

  // A third call on the same connection is not started while both streams are open.
  grpc::ClientContext waiting;
  waiting.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  v1::EchoRequest request;
  request.set_text("third");
  v1::EchoResponse response;
  EXPECT_EQ(stub->Echo(&waiting, request, &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(bridge().open_calls(), 2u);

  first_context.TryCancel();
  first->Finish();
  EXPECT_TRUE(Echo(channel, "third").ok());
  second_context.TryCancel();
  second->Finish();
}

TEST_F(DaemonTest, ConnectionIsClosedAfterMaxAgeAndGraceEvenWithAnOpenStream) {
  DaemonConfig config = BaseConfig();
  auto* connections = config.mutable_server()->mutable_connections();
  connections->mutable_max_age()->set_nanos(300'000'000);
  connections->mutable_max_age_grace()->set_nanos(200'000'000);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext watch_context;
  // Only a bound for the test: the server ends the stream long before.
  watch_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto watch = stub->Watch(&watch_context, v1::WatchRequest());
  v1::Event event;
  ASSERT_TRUE(watch->Read(&event));
  EXPECT_FALSE(watch->Read(&event));
  grpc::Status ended = watch->Finish();
  EXPECT_NE(ended.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << ended.error_message();
  EXPECT_NE(ended.error_code(), grpc::StatusCode::OK);
  // The caller reconnects for its next call.
  EXPECT_TRUE(Echo(channel, "again").ok());
}

TEST_F(DaemonTest, ConnectionWithAnOpenStreamIsNotIdle) {
  DaemonConfig config = BaseConfig();
  config.mutable_server()->mutable_connections()->mutable_max_idle()->set_nanos(200'000'000);
  StartOrDie(config);
  auto channel = Channel();
  auto stub = v1::TestService::NewStub(channel);
  grpc::ClientContext watch_context;
  auto watch = stub->Watch(&watch_context, v1::WatchRequest());
  v1::Event event;
  ASSERT_TRUE(watch->Read(&event));
  // A second, idle connection (its own channel arguments keep it apart) is closed...
  grpc::ChannelArguments args;
  args.SetInt("wsbridge.test.separate_connection", 1);
  auto idle = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                        grpc::InsecureChannelCredentials(), args);
  ASSERT_TRUE(Echo(idle, "hi").ok());
  EXPECT_TRUE(WaitFor([&] { return idle->GetState(false) == GRPC_CHANNEL_IDLE; },
                      std::chrono::seconds(20)));
  // ... while the one holding a stream still is READY and its stream open.
  EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
  EXPECT_EQ(bridge().open_calls(), 1u);
  watch_context.TryCancel();
  watch->Finish();
}

}  // namespace
}  // namespace wsbridge::daemontest
