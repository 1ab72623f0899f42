// WsServer's plain HTTP requests (on_http) beside WebSocket upgrades on one port:
// request and answer fields, keep-alive, Connection: close, the body limit, and HTTPS.
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::upstreams {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace ssl = net::ssl;
using net::ip::tcp;

http::request<http::string_body> Post(std::string target, std::string body) {
  http::request<http::string_body> req(http::verb::post, target, 11);
  req.set(http::field::host, "127.0.0.1");
  req.set(http::field::content_type, "application/json");
  req.set(http::field::authorization, "Bearer t0k");
  req.body() = std::move(body);
  req.prepare_payload();
  return req;
}

class WsServerHttpTest : public ::testing::Test {
 protected:
  void StartServer(WsServerOptions o = {}) {
    WsServerHandler h;
    h.on_http = [this](const HttpRequest& req) {
      std::lock_guard<std::mutex> lock(mu_);
      requests_.push_back(req);
      HttpResponse res;
      res.status = req.target == "/missing" ? 404 : 201;
      res.headers.emplace_back("X-Seen", std::to_string(requests_.size()));
      res.body = R"({"echo":")" + req.body + R"("})";
      return res;
    };
    h.on_open = [this](const std::shared_ptr<WsServerConnection>&) { opened_.fetch_add(1); };
    server_ = std::make_unique<WsServer>(std::move(o), std::move(h));
    ASSERT_TRUE(server_->Start().ok());
  }
  std::vector<HttpRequest> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

  net::io_context ioc_;
  std::unique_ptr<WsServer> server_;
  std::mutex mu_;
  std::vector<HttpRequest> requests_;
  std::atomic<int> opened_{0};
};

TEST_F(WsServerHttpTest, PlainRequestsReachOnHttpAndCarryItsAnswer) {
  StartServer();
  beast::tcp_stream s(ioc_);
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  http::write(s, Post("/api/chats?x=1", "hello"));
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(s, buf, res);
  EXPECT_EQ(res.result_int(), 201);
  EXPECT_EQ(res.body(), R"({"echo":"hello"})");
  EXPECT_EQ(res[http::field::content_type], "application/json");
  EXPECT_EQ(res["X-Seen"], "1");
  ASSERT_EQ(requests().size(), 1u);
  const HttpRequest r = requests()[0];
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.target, "/api/chats?x=1");
  EXPECT_EQ(r.body, "hello");
  EXPECT_EQ(r.Header("authorization"), "Bearer t0k");
  EXPECT_EQ(r.Header("absent"), "");
  EXPECT_EQ(opened_.load(), 0);  // no WebSocket was opened for it
}

TEST_F(WsServerHttpTest, KeepAliveServesSeveralRequestsThenAnUpgradeOnTheSamePort) {
  StartServer();
  beast::tcp_stream s(ioc_);
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  beast::flat_buffer buf;
  for (int i = 1; i <= 3; ++i) {
    http::write(s, Post(i == 2 ? "/missing" : "/ok", absl::StrCat("b", i)));
    http::response<http::string_body> res;
    http::read(s, buf, res);
    EXPECT_EQ(res.result_int(), i == 2 ? 404 : 201);
    EXPECT_EQ(res["X-Seen"], std::to_string(i));
    EXPECT_TRUE(res.keep_alive());
  }
  websocket::stream<tcp::socket> ws(ioc_);
  ws.next_layer().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  ws.handshake("127.0.0.1", "/api/ws/c");
  EXPECT_TRUE(wsbridge::testing::WaitFor([&] { return opened_.load() == 1; }));
  EXPECT_EQ(requests().size(), 3u);
  ws.close(websocket::close_code::normal);
}

TEST_F(WsServerHttpTest, ConnectionCloseAndKeepAliveOffEndTheConnection) {
  for (bool keep_alive_option : {true, false}) {
    WsServerOptions o;
    o.http_keep_alive = keep_alive_option;
    StartServer(o);
    beast::tcp_stream s(ioc_);
    s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
    auto req = Post("/ok", "x");
    if (keep_alive_option) req.keep_alive(false);  // the client asks for close
    http::write(s, req);
    beast::flat_buffer buf;
    http::response<http::string_body> res;
    http::read(s, buf, res);
    EXPECT_EQ(res.result_int(), 201);
    EXPECT_FALSE(res.keep_alive());
    // The server closes: the next read ends with EOF.
    char byte;
    beast::error_code ec;
    s.socket().read_some(net::buffer(&byte, 1), ec);
    EXPECT_EQ(ec, net::error::eof) << ec.message();
    server_->Stop();
  }
}

TEST_F(WsServerHttpTest, OversizedBodyIsRefusedWith413WithoutReachingTheHandler) {
  WsServerOptions o;
  o.max_http_body_bytes = 1024;
  StartServer(o);
  beast::tcp_stream s(ioc_);
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  // Headers only: the limit applies as soon as Content-Length is read.
  const std::string head =
      "POST /api/chats HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
  net::write(s.socket(), net::buffer(head));
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(s, buf, res);
  EXPECT_EQ(res.result_int(), 413);
  EXPECT_TRUE(requests().empty());
  // Within the limit is served.
  beast::tcp_stream s2(ioc_);
  s2.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  http::write(s2, Post("/ok", std::string(1000, 'a')));
  http::response<http::string_body> res2;
  http::read(s2, buf, res2);
  EXPECT_EQ(res2.result_int(), 201);
}

TEST_F(WsServerHttpTest, WithoutOnHttpPlainRequestsAreRefused) {
  WsServer server(WsServerOptions{}, WsServerHandler{});
  ASSERT_TRUE(server.Start().ok());
  beast::tcp_stream s(ioc_);
  s.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server.port()));
  http::write(s, Post("/api/chats", "{}"));
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(s, buf, res);
  EXPECT_EQ(res.result_int(), 400);
}

TEST_F(WsServerHttpTest, HttpsOnTheWssPort) {
  wsbridge::testing::TestPki pki;
  auto ca = pki.MakeCa("ca");
  auto leaf = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  WsServerOptions o;
  o.tls = true;
  o.cert_pem = leaf.cert_pem;
  o.key_pem = leaf.key_pem;
  StartServer(o);
  ssl::context ctx(ssl::context::tls_client);
  ctx.add_certificate_authority(net::buffer(ca.cert_pem));
  ctx.set_verify_mode(ssl::verify_peer);
  beast::ssl_stream<beast::tcp_stream> s(ioc_, ctx);
  beast::get_lowest_layer(s).connect(
      tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
  s.handshake(ssl::stream_base::client);
  http::write(s, Post("/api/auth/login", "creds"));
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(s, buf, res);
  EXPECT_EQ(res.result_int(), 201);
  EXPECT_EQ(res.body(), R"({"echo":"creds"})");
  ASSERT_EQ(requests().size(), 1u);
  EXPECT_EQ(requests()[0].target, "/api/auth/login");
}

// Not HTTP, but the same kind of additive test-server switch the Nexora emulator needs:
// "drop after n events" must deliver the n events first.
TEST(WsServerDropTest, DropAfterWritesDeliversWhatWasQueuedThenDrops) {
  constexpr int kMessages = 200;
  WsServerHandler h;
  h.on_open = [](const std::shared_ptr<WsServerConnection>& c) {
    for (int i = 0; i < kMessages; ++i) c->Send(std::string(1000, 'a' + i % 26), false);
    c->DropAfterWrites();
  };
  WsServer server(WsServerOptions{}, std::move(h));
  ASSERT_TRUE(server.Start().ok());
  net::io_context ioc;
  websocket::stream<tcp::socket> ws(ioc);
  ws.next_layer().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server.port()));
  ws.handshake("127.0.0.1", "/");
  int received = 0;
  beast::error_code ec;
  for (;;) {
    beast::flat_buffer buf;
    ws.read(buf, ec);
    if (ec) break;
    EXPECT_EQ(beast::buffers_to_string(buf.data()), std::string(1000, 'a' + received % 26));
    ++received;
  }
  EXPECT_EQ(received, kMessages);
  EXPECT_NE(ec, websocket::error::closed) << "a drop sends no close frame";
}

}  // namespace
}  // namespace wsbridge::upstreams
