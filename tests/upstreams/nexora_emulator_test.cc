// NexoraEmulator over real sockets: the token check at the upgrade, login and
// create-chat over HTTP(S) on the socket's port, streamed answers, dedup, faults and
// observations, driven by plain Beast WebSocket and HTTP clients on 127.0.0.1.
#include "tests/upstreams/nexora_emulator.h"

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace wsbridge::emulator {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace ssl = net::ssl;
namespace json = boost::json;
using net::ip::tcp;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using wsbridge::testing::WaitFor;

std::string Str(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  return it != o.end() && it->value().is_string() ? std::string(it->value().get_string())
                                                   : "<absent>";
}

std::string Message(std::string_view content, std::string_view id) {
  json::object o;
  o["type"] = "message";
  o["content"] = json::string_view(content.data(), content.size());
  o["client_message_id"] = json::string_view(id.data(), id.size());
  return json::serialize(o);
}

tcp::endpoint Loopback(uint16_t port) {
  return tcp::endpoint(net::ip::make_address("127.0.0.1"), port);
}

struct HttpResult {
  int status = 0;
  json::object body;
};

// One blocking HTTP(S) client connection; keep-alive across Post() calls.
class HttpClient {
 public:
  HttpClient(uint16_t port, ssl::context* tls) {
    if (tls != nullptr) {
      tls_.emplace(ioc_, *tls);
      beast::get_lowest_layer(*tls_).connect(Loopback(port));
      tls_->handshake(ssl::stream_base::client);
    } else {
      plain_.emplace(ioc_);
      plain_->connect(Loopback(port));
    }
  }
  HttpResult Post(std::string target, std::string body, std::string bearer = "") {
    http::request<http::string_body> req(http::verb::post, target, 11);
    req.set(http::field::host, "127.0.0.1");
    req.set(http::field::content_type, "application/json");
    if (!bearer.empty()) req.set(http::field::authorization, "Bearer " + bearer);
    req.body() = std::move(body);
    req.prepare_payload();
    http::response<http::string_body> res;
    if (tls_) {
      http::write(*tls_, req);
      http::read(*tls_, buf_, res);
    } else {
      http::write(*plain_, req);
      http::read(*plain_, buf_, res);
    }
    HttpResult out;
    out.status = res.result_int();
    EXPECT_EQ(res[http::field::content_type], "application/json");
    json::value v = json::parse(res.body());
    if (v.is_object()) out.body = v.as_object();
    return out;
  }

 private:
  net::io_context ioc_;
  std::optional<beast::tcp_stream> plain_;
  std::optional<beast::ssl_stream<beast::tcp_stream>> tls_;
  beast::flat_buffer buf_;
};

// A blocking WebSocket client, one per chat socket.
template <class Stream>
class WsClient {
 public:
  template <class... Args>
  explicit WsClient(Args&&... args) : ws_(ioc_, std::forward<Args>(args)...) {}

  // Connects and upgrades; returns the HTTP status of the upgrade answer.
  int Connect(uint16_t port, const std::string& target) {
    beast::get_lowest_layer(ws_).connect(Loopback(port));
    if constexpr (!std::is_same_v<Stream, tcp::socket>) {
      ws_.next_layer().handshake(ssl::stream_base::client);
    }
    beast::error_code ec;
    ws_.handshake(response_, "127.0.0.1", target, ec);
    return response_.result_int();
  }
  const websocket::response_type& response() const { return response_; }
  void Send(const std::string& text) {
    ws_.text(true);
    ws_.write(net::buffer(text));
  }
  // The next event, or an empty object with *ec set when the connection ended.
  json::object Next(beast::error_code* ec = nullptr) {
    beast::flat_buffer buf;
    beast::error_code local;
    ws_.read(buf, ec != nullptr ? *ec : local);
    if (ec != nullptr && *ec) return {};
    EXPECT_FALSE(local) << local.message();
    if (local) return {};
    EXPECT_TRUE(ws_.got_text());
    return json::parse(beast::buffers_to_string(buf.data())).as_object();
  }
  // Events up to and including the one that ends the answer.
  std::vector<json::object> Answer() {
    std::vector<json::object> out;
    for (;;) {
      out.push_back(Next());
      const std::string type = Str(out.back(), "type");
      if (type == "done" || type == "error" || type == "duplicate" || type == "<absent>") break;
    }
    return out;
  }
  void Close() { ws_.close(websocket::close_code::normal); }

 private:
  net::io_context ioc_;
  websocket::stream<Stream> ws_;
  websocket::response_type response_;
};

using PlainWs = WsClient<tcp::socket>;

std::vector<std::string> Types(const std::vector<json::object>& events) {
  std::vector<std::string> out;
  for (const auto& e : events) out.push_back(Str(e, "type"));
  return out;
}

const std::vector<std::string> kDefaultAnswer = {
    "chunk", "tool_call", "tool_result", "sub_agent_start", "sub_agent_complete",
    "chunk", "chunk",     "done"};

class NexoraEmulatorTest : public ::testing::Test {
 protected:
  void StartEmulator(NexoraEmulatorOptions o = {}) {
    o.users = {{"user@example.com", "password"}};
    emulator_ = std::make_unique<NexoraEmulator>(std::move(o));
    ASSERT_TRUE(emulator_->Start().ok());
  }
  std::string Target(const std::string& chat, const std::string& token = "nxr_key") {
    return "/api/ws/" + chat + "?token=" + token;
  }
  std::unique_ptr<NexoraEmulator> emulator_;
};

TEST_F(NexoraEmulatorTest, UpgradeNeedsAValidToken) {
  NexoraEmulatorOptions o;
  o.api_keys = {"nxr_key"};
  StartEmulator(o);
  PlainWs wrong;
  EXPECT_EQ(wrong.Connect(emulator_->port(), Target("c1", "nxr_wrong")), 401);
  EXPECT_THAT(std::string(wrong.response().body()), HasSubstr("invalid API key"));
  PlainWs none;
  EXPECT_EQ(none.Connect(emulator_->port(), "/api/ws/c1"), 401);
  PlainWs not_a_socket;
  EXPECT_EQ(not_a_socket.Connect(emulator_->port(), "/api/chat/c1?token=nxr_key"), 400);
  PlainWs ok;
  EXPECT_EQ(ok.Connect(emulator_->port(), Target("c1")), 101);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets("c1") == 1; }));
  EXPECT_EQ(emulator_->refused_upgrades(), 3);
  EXPECT_EQ(emulator_->url(), "ws://127.0.0.1:" + std::to_string(emulator_->port()));
  EXPECT_EQ(emulator_->http_url(), "http://127.0.0.1:" + std::to_string(emulator_->port()));
}

TEST_F(NexoraEmulatorTest, LoginCreateChatAndStreamAnAnswerOverTls) {
  wsbridge::testing::TestPki pki;
  auto ca = pki.MakeCa("ca");
  auto leaf = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  NexoraEmulatorOptions o;
  o.tls = true;
  o.cert_pem = leaf.cert_pem;
  o.key_pem = leaf.key_pem;
  o.known_chats_only = true;
  StartEmulator(o);
  EXPECT_EQ(emulator_->url().substr(0, 6), "wss://");
  EXPECT_EQ(emulator_->http_url().substr(0, 8), "https://");
  ssl::context ctx(ssl::context::tls_client);
  ctx.add_certificate_authority(net::buffer(ca.cert_pem));
  ctx.set_verify_mode(ssl::verify_peer);

  // Both requests on one keep-alive HTTPS connection.
  HttpClient https(emulator_->port(), &ctx);
  HttpResult refused = https.Post("/api/auth/login",
                                  R"({"email":"user@example.com","password":"wrong"})");
  EXPECT_EQ(refused.status, 401);
  HttpResult login = https.Post("/api/auth/login",
                                R"({"email":"user@example.com","password":"password"})");
  ASSERT_EQ(login.status, 200);
  const std::string jwt = Str(login.body, "access_token");
  HttpResult unauthenticated = https.Post("/api/chats", R"({"agent_id":"agent-1"})");
  EXPECT_EQ(unauthenticated.status, 401);
  HttpResult chat = https.Post("/api/chats", R"({"agent_id":"agent-1"})", jwt);
  ASSERT_EQ(chat.status, 201);
  const std::string chat_id = Str(chat.body, "id");
  EXPECT_EQ(emulator_->logins(), 1);
  EXPECT_EQ(emulator_->refused_logins(), 1);
  EXPECT_EQ(emulator_->chats_created(), 1);

  WsClient<beast::ssl_stream<tcp::socket>> unknown_chat(ctx);
  EXPECT_EQ(unknown_chat.Connect(emulator_->port(), Target("not-created", jwt)), 400);
  WsClient<beast::ssl_stream<tcp::socket>> ws(ctx);
  ASSERT_EQ(ws.Connect(emulator_->port(), Target(chat_id, jwt)), 101);
  ws.Send(Message("Review the latest deployment logs", "cm-1"));
  std::vector<json::object> answer = ws.Answer();
  EXPECT_EQ(Types(answer), kDefaultAnswer);
  const std::string mid = Str(answer.front(), "message_id");
  EXPECT_EQ(Str(answer.back(), "message_id"), mid);
  EXPECT_EQ(Str(answer[1], "tool"), "github");
  EXPECT_EQ(json::serialize(answer[1].at("input")), R"({"action":"list_issues","repo":"owner/repo"})");
  EXPECT_EQ(Str(answer[5], "content"), " You asked: Review the latest deployment logs.");
  EXPECT_EQ(emulator_->messages_received("cm-1"), 1);
  EXPECT_EQ(emulator_->answers_started(), 1);
  EXPECT_EQ(emulator_->open_sockets(chat_id), 1);
}

TEST_F(NexoraEmulatorTest, ExpiredJwtIsRefusedAtTheUpgradeOnly) {
  NexoraEmulatorOptions o;
  o.jwt_lifetime = milliseconds(300);
  StartEmulator(o);
  HttpClient http(emulator_->port(), nullptr);
  const std::string jwt =
      Str(http.Post("/api/auth/login", R"({"email":"user@example.com","password":"password"})").body,
          "access_token");
  PlainWs before;
  ASSERT_EQ(before.Connect(emulator_->port(), Target("c", jwt)), 101);
  // Upgrades with the same token are refused once it expired.
  std::string body;
  EXPECT_TRUE(WaitFor([&] {
    PlainWs again;
    if (again.Connect(emulator_->port(), Target("c", jwt)) != 401) return false;
    body = again.response().body();
    return true;
  }));
  EXPECT_THAT(body, HasSubstr("expired"));
  // The socket opened before the expiry still works.
  before.Send(R"({"type":"ping"})");
  EXPECT_EQ(Str(before.Next(), "type"), "pong");
  // A fresh login gives a token that is accepted again.
  const std::string fresh =
      Str(http.Post("/api/auth/login", R"({"email":"user@example.com","password":"password"})").body,
          "access_token");
  PlainWs after;
  EXPECT_EQ(after.Connect(emulator_->port(), Target("c", fresh)), 101);
  EXPECT_EQ(emulator_->logins(), 2);
}

TEST_F(NexoraEmulatorTest, DuplicateWhileInProgressAndAfterDone) {
  NexoraEmulatorOptions o;
  o.step_delay = milliseconds(20);
  StartEmulator(o);
  PlainWs first, second;
  ASSERT_EQ(first.Connect(emulator_->port(), Target("chat")), 101);
  ASSERT_EQ(second.Connect(emulator_->port(), Target("chat")), 101);
  first.Send(Message("hello", "cm-1"));
  json::object chunk = first.Next();
  const std::string mid = Str(chunk, "message_id");
  // The answer is in progress (seven more events, 20 ms apart).
  second.Send(Message("hello", "cm-1"));
  json::object dup = second.Next();
  EXPECT_EQ(Str(dup, "type"), "duplicate");
  EXPECT_EQ(Str(dup, "client_message_id"), "cm-1");
  EXPECT_EQ(Str(dup, "message_id"), mid);
  // The original answer still completes on its own socket.
  std::vector<json::object> rest = first.Answer();
  EXPECT_EQ(Str(rest.back(), "type"), "done");
  EXPECT_EQ(Str(rest.back(), "message_id"), mid);
  EXPECT_EQ(rest.size(), kDefaultAnswer.size() - 1);
  first.Send(Message("hello", "cm-1"));
  EXPECT_EQ(Str(first.Next(), "type"), "duplicate");
  EXPECT_EQ(emulator_->answers_started(), 1);
  EXPECT_EQ(emulator_->duplicates_sent(), 2);
  EXPECT_EQ(emulator_->messages_received("cm-1"), 3);
}

TEST_F(NexoraEmulatorTest, DropMidAnswerThenTheResendGetsAWholeAnswer) {
  StartEmulator();
  emulator_->DropMidAnswer(2);
  PlainWs ws;
  ASSERT_EQ(ws.Connect(emulator_->port(), Target("chat")), 101);
  ws.Send(Message("hello", "cm-1"));
  EXPECT_EQ(Str(ws.Next(), "type"), "chunk");
  EXPECT_EQ(Str(ws.Next(), "type"), "tool_call");
  beast::error_code ec;
  ws.Next(&ec);
  EXPECT_TRUE(ec) << "the socket should have been dropped";
  EXPECT_NE(ec, websocket::error::closed);  // no close frame
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets("chat") == 0; }));
  PlainWs again;
  ASSERT_EQ(again.Connect(emulator_->port(), Target("chat")), 101);
  again.Send(Message("hello", "cm-1"));
  EXPECT_EQ(Types(again.Answer()), kDefaultAnswer);
  EXPECT_EQ(emulator_->messages_received("cm-1"), 2);
  EXPECT_EQ(emulator_->answers_started(), 2);
}

TEST_F(NexoraEmulatorTest, ErrorInjectionAndUnknownEventTypes) {
  StartEmulator();
  PlainWs ws;
  ASSERT_EQ(ws.Connect(emulator_->port(), Target("chat")), 101);
  emulator_->InjectError("all_providers_exhausted", "All LLM providers failed", 1);
  ws.Send(Message("a", "cm-1"));
  std::vector<json::object> failed = ws.Answer();
  EXPECT_EQ(Types(failed), (std::vector<std::string>{"chunk", "error"}));
  EXPECT_EQ(Str(failed.back(), "code"), "all_providers_exhausted");
  EXPECT_EQ(Str(failed.back(), "message"), "All LLM providers failed");

  emulator_->SetScript({{R"({"type":"thinking","content":"{{content}}"})"},
                        {R"({"type":"chunk","content":"ok"})"}});
  ws.Send(Message("b", "cm-2"));
  std::vector<json::object> answer = ws.Answer();
  EXPECT_EQ(Types(answer), (std::vector<std::string>{"thinking", "chunk", "done"}));
  EXPECT_EQ(Str(answer[0], "content"), "b");
  // A raw frame pushed by a test reaches the chat's sockets.
  emulator_->Broadcast(R"({"type":"notice","text":"maintenance"})", "chat");
  EXPECT_EQ(Str(ws.Next(), "type"), "notice");
}

TEST_F(NexoraEmulatorTest, PingPongAndSilence) {
  StartEmulator();
  PlainWs ws;
  ASSERT_EQ(ws.Connect(emulator_->port(), Target("chat")), 101);
  ws.Send(R"({"type":"ping"})");
  EXPECT_EQ(Str(ws.Next(), "type"), "pong");
  emulator_->SetAnswerPings(false);
  ws.Send(R"({"type":"ping"})");
  // No pong: the next frame is the answer to a message sent after the ping.
  ws.Send(Message("x", "cm-1"));
  EXPECT_EQ(Str(ws.Next(), "type"), "chunk");
  EXPECT_EQ(emulator_->pings(), 2);
  ws.Send("not json");
  // Events of cm-1 come first; the error for the bad frame is among the next ones.
  bool saw_error = false;
  for (int i = 0; i < 10 && !saw_error; ++i) {
    json::object e = ws.Next();
    saw_error = Str(e, "type") == "error" && Str(e, "code") == "invalid_message";
  }
  EXPECT_TRUE(saw_error);
}

TEST_F(NexoraEmulatorTest, SocketsPerChatAndDropSockets) {
  StartEmulator();
  PlainWs a1, a2, b1;
  ASSERT_EQ(a1.Connect(emulator_->port(), Target("a")), 101);
  ASSERT_EQ(a2.Connect(emulator_->port(), Target("a")), 101);
  ASSERT_EQ(b1.Connect(emulator_->port(), Target("b")), 101);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets() == 3; }));
  EXPECT_EQ(emulator_->open_sockets("a"), 2);
  EXPECT_EQ(emulator_->chats_with_sockets(), 2);
  emulator_->DropSockets("a");
  beast::error_code ec;
  a1.Next(&ec);
  EXPECT_TRUE(ec);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets("a") == 0; }));
  EXPECT_EQ(emulator_->open_sockets("b"), 1);
  b1.Send(R"({"type":"ping"})");
  EXPECT_EQ(Str(b1.Next(), "type"), "pong");
  b1.Close();
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_sockets() == 0; }));
}

}  // namespace
}  // namespace wsbridge::emulator
