// core::HttpClient against the test server's plain-HTTP handler (on_http), over
// http:// and https:// (a test CA): request fields, any status as an answer, the
// deadline, the answer size bound, TLS verification, plaintext refusal, and that no
// request header or body reaches an error message.
#include "bridges/core/http_client.h"

#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::core {
namespace {

namespace net = boost::asio;
using namespace std::chrono_literals;
using upstreams::HttpRequest;
using upstreams::HttpResponse;
using upstreams::WsServer;
using upstreams::WsServerHandler;
using upstreams::WsServerOptions;

class HttpClientTest : public ::testing::Test {
 protected:
  HttpClientTest() : work_(net::make_work_guard(ioc_)), thread_([this] { ioc_.run(); }) {}
  ~HttpClientTest() override {
    if (!release_.HasBeenNotified()) release_.Notify();  // before Stop joins its threads
    if (server_) server_->Stop();
    work_.reset();
    ioc_.stop();
    thread_.join();
  }

  void StartServer(bool tls, std::string big_body = "") {
    WsServerOptions o;
    o.threads = 2;
    if (tls) {
      ca_ = pki_.MakeCa("test-ca");
      CertAndKeyServer();
      o.tls = true;
      o.cert_pem = server_cert_.cert_pem;
      o.key_pem = server_cert_.key_pem;
    }
    WsServerHandler h;
    h.on_http = [this, big_body](const HttpRequest& req) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        requests_.push_back(req);
      }
      HttpResponse res;
      if (req.target.rfind("/hang", 0) == 0) {
        release_.WaitForNotification();
        return res;
      }
      if (req.target == "/big") {
        res.body = big_body;
        return res;
      }
      res.status = req.target == "/missing" ? 404 : 201;
      res.body = absl::StrCat(R"({"echo":)", req.body.empty() ? "null" : req.body, "}");
      return res;
    };
    server_ = std::make_unique<WsServer>(std::move(o), std::move(h));
    ASSERT_TRUE(server_->Start().ok());
  }

  void CertAndKeyServer() { server_cert_ = pki_.IssueServerCert(ca_, {"localhost", "127.0.0.1"}); }

  std::string Base(bool tls, std::string_view host = "127.0.0.1") const {
    return absl::StrCat(tls ? "https://" : "http://", std::string(host), ":", server_->port());
  }

  absl::StatusOr<HttpAnswer> Post(HttpClient& client, const std::string& url, std::string body,
                                  std::vector<std::pair<std::string, std::string>> headers = {}) {
    std::promise<absl::StatusOr<HttpAnswer>> p;
    auto f = p.get_future();
    client.PostJson(url, std::move(body), std::move(headers),
                    [&p](absl::StatusOr<HttpAnswer> a) { p.set_value(std::move(a)); });
    EXPECT_EQ(f.wait_for(20s), std::future_status::ready);
    return f.get();
  }

  std::shared_ptr<HttpClient> Client(bool plaintext, TlsOptions tls = {}, Duration timeout = 10s,
                                     size_t max_body = 1 << 20) {
    HttpClientOptions o;
    o.name = "test";
    o.allow_plaintext = plaintext;
    o.tls = std::move(tls);
    o.timeout = timeout;
    o.max_response_bytes = max_body;
    return HttpClient::Create(ioc_.get_executor(), std::move(o));
  }

  std::vector<HttpRequest> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

  net::io_context ioc_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::thread thread_;
  testing::TestPki pki_;
  testing::CertAndKey ca_, server_cert_;
  std::unique_ptr<WsServer> server_;
  absl::Notification release_;
  std::mutex mu_;
  std::vector<HttpRequest> requests_;
};

TEST_F(HttpClientTest, PostsJsonOverPlainHttpAndReturnsStatusAndBody) {
  StartServer(false);
  auto client = Client(true);
  absl::StatusOr<HttpAnswer> a = Post(*client, Base(false) + "/api/chats?x=1", R"({"agent_id":"a1"})",
                                      {{"Authorization", "Bearer secret-token-1"}});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->status, 201);
  EXPECT_EQ(a->body, R"({"echo":{"agent_id":"a1"}})");
  EXPECT_EQ(a->content_type, "application/json");
  std::vector<HttpRequest> reqs = requests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0].method, "POST");
  EXPECT_EQ(reqs[0].target, "/api/chats?x=1");
  EXPECT_EQ(reqs[0].body, R"({"agent_id":"a1"})");
  EXPECT_EQ(reqs[0].Header("authorization"), "Bearer secret-token-1");
  EXPECT_EQ(reqs[0].Header("content-type"), "application/json");
  EXPECT_EQ(reqs[0].Header("accept"), "application/json");
  EXPECT_EQ(reqs[0].Header("host"), absl::StrCat("127.0.0.1:", server_->port()));
}

TEST_F(HttpClientTest, AnErrorStatusIsAnAnswerNotAFailure) {
  StartServer(false);
  auto client = Client(true);
  absl::StatusOr<HttpAnswer> a = Post(*client, Base(false) + "/missing", "{}");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->status, 404);
}

TEST_F(HttpClientTest, HttpsWithTheConfiguredCaAndServerName) {
  StartServer(true);
  TlsOptions tls;
  tls.ca_file = ca_.cert_file;
  auto client = Client(false, tls);
  absl::StatusOr<HttpAnswer> a = Post(*client, Base(true) + "/api/auth/login",
                                      R"({"email":"a@b.c","password":"pw-secret-1"})");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->status, 201);
  // server_name replaces the URL host for SNI and the certificate check.
  tls.server_name = "localhost";
  auto named = Client(false, tls);
  a = Post(*named, Base(true) + "/x", "{}");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(requests().size(), 2u);
}

TEST_F(HttpClientTest, HttpsRefusesAServerTheCaDidNotSign) {
  StartServer(true);
  testing::CertAndKey other = pki_.MakeCa("other-ca");
  TlsOptions tls;
  tls.ca_file = other.cert_file;
  auto client = Client(false, tls);
  absl::StatusOr<HttpAnswer> a =
      Post(*client, Base(true) + "/api/auth/login", R"({"password":"pw-secret-2"})");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable) << a.status();
  EXPECT_NE(a.status().message().find("TLS handshake"), std::string::npos) << a.status();
  EXPECT_EQ(a.status().message().find("pw-secret-2"), std::string::npos);
  EXPECT_TRUE(requests().empty());
  // A wrong server name fails the same check.
  tls.ca_file = ca_.cert_file;
  tls.server_name = "not-this-host.example";
  a = Post(*Client(false, tls), Base(true) + "/x", "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable) << a.status();
  // Without verification the same server is accepted.
  TlsOptions insecure;
  insecure.verify_peer = false;
  a = Post(*Client(false, insecure), Base(true) + "/x", "{}");
  ASSERT_TRUE(a.ok()) << a.status();
}

TEST_F(HttpClientTest, RefusesPlaintextUnlessAllowed) {
  StartServer(false);
  auto client = Client(false);
  absl::StatusOr<HttpAnswer> a = Post(*client, Base(false) + "/x", "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition) << a.status();
  EXPECT_NE(a.status().message().find("allow_plaintext"), std::string::npos);
  a = Post(*client, "ftp://127.0.0.1/x", "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
  EXPECT_TRUE(requests().empty());
}

TEST_F(HttpClientTest, TheDeadlineEndsAnExchangeTheServerNeverAnswers) {
  StartServer(false);
  auto client = Client(true, {}, 150ms);
  absl::StatusOr<HttpAnswer> a = Post(*client, Base(false) + "/hang?token=tok-secret-3", "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDeadlineExceeded) << a.status();
  // The URL in the message is redacted.
  EXPECT_EQ(a.status().message().find("tok-secret-3"), std::string::npos) << a.status();
}

TEST_F(HttpClientTest, AnAnswerLargerThanTheBoundIsRefused) {
  StartServer(false, std::string(5000, 'x'));
  absl::StatusOr<HttpAnswer> a = Post(*Client(true, {}, 10s, 4096), Base(false) + "/big", "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
  a = Post(*Client(true, {}, 10s, 8192), Base(false) + "/big", "{}");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->body.size(), 5000u);
}

TEST_F(HttpClientTest, ANothingListeningPortIsUnavailable) {
  StartServer(false);
  const std::string url = Base(false) + "/x";
  server_->Stop();
  absl::StatusOr<HttpAnswer> a = Post(*Client(true), url, "{}");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kUnavailable) << a.status();
  EXPECT_NE(a.status().message().find("connecting"), std::string::npos) << a.status();
}

TEST_F(HttpClientTest, ConcurrentRequestsEachGetTheirOwnAnswer) {
  StartServer(false);
  auto client = Client(true);
  constexpr int kN = 20;
  std::vector<std::promise<absl::StatusOr<HttpAnswer>>> ps(kN);
  for (int i = 0; i < kN; ++i) {
    client->PostJson(absl::StrCat(Base(false), "/n"), absl::StrCat(i), {},
                     [&ps, i](absl::StatusOr<HttpAnswer> a) { ps[i].set_value(std::move(a)); });
  }
  for (int i = 0; i < kN; ++i) {
    auto f = ps[i].get_future();
    ASSERT_EQ(f.wait_for(20s), std::future_status::ready);
    absl::StatusOr<HttpAnswer> a = f.get();
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->body, absl::StrCat(R"({"echo":)", i, "}"));
  }
}

}  // namespace
}  // namespace wsbridge::core
