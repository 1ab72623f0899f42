// EmoggEmulator over real sockets: the page's rules, fault switches and observations,
// driven by a plain Beast WebSocket client on 127.0.0.1. Every read has a deadline.
#include "tests/upstreams/emogg_emulator.h"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace wsbridge::emulator {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace json = boost::json;
using net::ip::tcp;
using std::chrono::milliseconds;
using wsbridge::testing::WaitFor;

constexpr milliseconds kDeadline{10000};

// How a read ended.
enum class End { kFrame, kClosed, kDropped, kTimeout };

// A client with deadlines: each operation runs the client's own io_context for at most
// the given time. After a timeout or an error the stream is not used again.
class Client {
 public:
  Client() : ws_(ioc_) {
    ws_.control_callback([this](websocket::frame_type kind, beast::string_view) {
      if (kind == websocket::frame_type::pong) ++pongs_;
    });
  }

  void Connect(uint16_t port) {
    tcp::resolver resolver(ioc_);
    net::connect(ws_.next_layer(), resolver.resolve("127.0.0.1", std::to_string(port)));
    ws_.handshake("127.0.0.1", "/ws/v1");
    ws_.text(true);
  }

  void Send(std::string_view text) { ws_.write(net::buffer(text)); }

  // The next data frame into *frame, or how the connection ended.
  End Read(std::string* frame, milliseconds timeout = kDeadline) {
    beast::flat_buffer buf;
    std::optional<beast::error_code> result;
    ws_.async_read(buf, [&](beast::error_code ec, size_t) { result = ec; });
    ioc_.restart();
    ioc_.run_for(timeout);
    if (!result) {
      beast::get_lowest_layer(ws_).cancel();
      ioc_.restart();
      ioc_.run();
      return End::kTimeout;
    }
    if (*result == websocket::error::closed) return End::kClosed;
    if (*result) return End::kDropped;
    *frame = beast::buffers_to_string(buf.data());
    return End::kFrame;
  }

  json::value Next() {
    std::string frame;
    End end = Read(&frame);
    EXPECT_EQ(end, End::kFrame) << "no frame arrived";
    if (end != End::kFrame) return json::value();
    return json::parse(frame);
  }
  json::value Call(std::string_view text) {
    Send(text);
    return Next();
  }
  // Reads until the connection ends (skipping frames); how it ended.
  End WaitEnd(milliseconds timeout = kDeadline) {
    std::string frame;
    End end;
    while ((end = Read(&frame, timeout)) == End::kFrame) {
    }
    return end;
  }
  void Auth(std::string_view token = "tok") {
    json::value v = Call(std::string(R"({"id":"auth","path":"auth:token","body":{"token":")") +
                         std::string(token) + "\"}}");
    ASSERT_TRUE(v.is_object()) << v;
    ASSERT_EQ(v.at("status").as_int64(), 200) << v;
  }
  // Sends a WebSocket ping and waits for its pong (true), or `timeout`.
  bool PingPong(milliseconds timeout) {
    const int before = pongs_;
    ws_.ping({});
    beast::flat_buffer buf;
    bool read_done = false;
    ws_.async_read(buf, [&](beast::error_code, size_t) { read_done = true; });
    ioc_.restart();
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (pongs_ == before && !read_done && std::chrono::steady_clock::now() < deadline) {
      ioc_.run_one_for(milliseconds(10));
    }
    beast::get_lowest_layer(ws_).cancel();
    ioc_.restart();
    ioc_.run();
    return pongs_ > before;
  }
  websocket::close_reason reason() const { return ws_.reason(); }
  void Close(websocket::close_code code) { ws_.close(code); }

 private:
  net::io_context ioc_;
  websocket::stream<tcp::socket> ws_;
  int pongs_ = 0;
};

class EmoggEmulatorTest : public ::testing::Test {
 protected:
  void Start(EmoggEmulatorOptions o = {}) {
    if (o.protocol.tokens.empty()) o.protocol.tokens = {"tok"};
    emulator_ = std::make_unique<EmoggEmulator>(o);
    ASSERT_TRUE(emulator_->Start().ok());
  }
  std::unique_ptr<Client> Connected() {
    auto c = std::make_unique<Client>();
    c->Connect(emulator_->port());
    return c;
  }
  std::unique_ptr<EmoggEmulator> emulator_;
};

TEST_F(EmoggEmulatorTest, AuthenticatesThenAnswersRequestsById) {
  Start();
  EXPECT_EQ(emulator_->url(), "ws://127.0.0.1:" + std::to_string(emulator_->port()) + "/ws/v1");
  auto c = Connected();
  c->Auth();
  EXPECT_EQ(emulator_->auth_successes(), 1);
  // Several requests in flight; each answer carries its request's id (the slow one is
  // normally last, but the order is not asserted: under load the sends may be slower
  // than its 50 ms).
  c->Send(R"({"id":"a","path":"emulator:slow","body":{"ms":50}})");
  c->Send(R"({"id":"b","path":"ping"})");
  c->Send(R"({"id":3,"path":"sessions:get","body":{"sessionId":"s1"}})");
  std::map<std::string, json::value> by_id;
  for (int i = 0; i < 3; ++i) {
    json::value v = c->Next();
    ASSERT_TRUE(v.is_object()) << v;
    by_id[json::serialize(v.at("id"))] = v;
  }
  ASSERT_EQ(by_id.size(), 3u);
  json::value b = by_id["\"b\""];
  EXPECT_EQ(b.at("path").as_string(), "ping");
  EXPECT_TRUE(b.at("body").at("ts").is_string());
  json::value three = by_id["3"];
  EXPECT_EQ(three.at("path").as_string(), "sessions:get");
  EXPECT_EQ(three.at("body").at("name").as_string(), "Session s1");
  EXPECT_EQ(by_id["\"a\""].at("path").as_string(), "emulator:slow");
  // Errors that do not close.
  json::value nf = c->Call(R"({"id":"n","path":"no:such"})");
  EXPECT_EQ(nf.at("status").as_int64(), 404);
  EXPECT_TRUE(nf.at("error").as_bool());
  EXPECT_EQ(c->Call(R"({"id":"f","path":"emulator:fail"})").at("status").as_int64(), 500);
  EXPECT_EQ(c->Call(R"({"id":"q","path":"sessions:get","body":{}})").at("status").as_int64(), 400);
  EXPECT_EQ(c->Call(R"({"id":"p","path":"ping"})").at("status").as_int64(), 200);
  EXPECT_EQ(emulator_->requests("ping"), 2);
  EXPECT_EQ(emulator_->requests("auth:token"), 1);
  EXPECT_TRUE(emulator_->server_close_codes().empty());
}

TEST_F(EmoggEmulatorTest, AnythingBeforeAuthIsTerminated) {
  Start();
  auto c = Connected();
  c->Send(R"({"id":1,"path":"ping"})");
  EXPECT_EQ(c->WaitEnd(), End::kDropped);
  EXPECT_TRUE(WaitFor([&] { return emulator_->frames_before_auth() == 1; }));
  EXPECT_EQ(emulator_->auth_successes(), 0);
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
}

TEST_F(EmoggEmulatorTest, RefusedTokenAnswers401ThenCloses) {
  Start();
  auto c = Connected();
  json::value v = c->Call(R"({"id":1,"path":"auth:token","body":{"token":"wrong"}})");
  EXPECT_EQ(v.at("status").as_int64(), 401);
  EXPECT_EQ(v.at("data").at("message").as_string(), "Invalid token");
  EXPECT_EQ(c->WaitEnd(), End::kClosed);
  EXPECT_EQ(c->reason().code, 1008);
  EXPECT_EQ(emulator_->auth_failures(), 1);
  // The fault switch refuses the right token too.
  emulator_->SetRefuseAuth(true);
  auto d = Connected();
  EXPECT_EQ(d->Call(R"({"path":"auth:token","body":{"token":"tok"}})").at("status").as_int64(), 401);
  EXPECT_EQ(d->WaitEnd(), End::kClosed);
}

TEST_F(EmoggEmulatorTest, InvalidJsonAnswers405ThenCloses) {
  Start();
  for (const char* bad : {"{not json", R"({"id":1,"path":"ping","body":[]})"}) {
    auto c = Connected();
    c->Auth();
    json::value v = c->Call(bad);
    EXPECT_EQ(v.at("status").as_int64(), 405) << bad;
    EXPECT_TRUE(v.at("error").as_bool());
    EXPECT_EQ(c->WaitEnd(), End::kClosed) << bad;
    EXPECT_EQ(c->reason().code, 1008);
  }
  EXPECT_EQ(emulator_->server_close_codes(), (std::vector<int>{1008, 1008}));
}

TEST_F(EmoggEmulatorTest, RateLimitAnswers429AndCloses) {
  EmoggEmulatorOptions o;
  o.protocol.max_messages = 3;
  o.protocol.rate_window = milliseconds(60000);
  Start(o);
  auto c = Connected();
  c->Auth();  // 1
  EXPECT_EQ(c->Call(R"({"id":"1","path":"ping"})").at("status").as_int64(), 200);
  EXPECT_EQ(c->Call(R"({"id":"2","path":"ping"})").at("status").as_int64(), 200);
  json::value v = c->Call(R"({"id":"3","path":"ping"})");
  EXPECT_EQ(v.at("status").as_int64(), 429);
  EXPECT_EQ(v.at("id").as_string(), "3");
  EXPECT_EQ(c->WaitEnd(), End::kClosed);
  EXPECT_EQ(c->reason().code, 1008);
  // The limit is the user's: a new connection with the same token is refused at auth.
  auto d = Connected();
  EXPECT_EQ(d->Call(R"({"path":"auth:token","body":{"token":"tok"}})").at("status").as_int64(), 429);
  EXPECT_EQ(d->WaitEnd(), End::kClosed);
  EXPECT_EQ(emulator_->answers_with_status(429), 2);
}

TEST_F(EmoggEmulatorTest, SubscriptionsStreamEventsUntilUnsubscribed) {
  EmoggEmulatorOptions o;
  o.protocol.event_interval = milliseconds(20);
  Start(o);
  auto c = Connected();
  c->Auth();
  json::value sub = c->Call(
      R"({"id":"s","path":"channels:subscribe","body":{"channel":"session_emotions_counts","key":"66151895e00a857bd76f889d:10s"}})");
  ASSERT_EQ(sub.at("status").as_int64(), 200) << sub;
  std::string id(sub.at("body").at("subscriptionId").as_string());
  EXPECT_EQ(emulator_->subscriptions_of("session_emotions_counts", "66151895e00a857bd76f889d:10s"), 1);
  for (int i = 0; i < 3; ++i) {
    json::value e = c->Next();
    ASSERT_TRUE(e.is_array()) << e;
    ASSERT_EQ(e.as_array().size(), 4u);
    EXPECT_EQ(e.at(0).as_string(), id);
    EXPECT_TRUE(e.at(1).is_int64());
    EXPECT_EQ(e.at(2).as_string(), "sec");
    EXPECT_EQ(e.at(3).at(0).at("seq").as_int64(), i + 1);
  }
  c->Send(R"({"id":"u","path":"channels:unsubscribe","body":{"subscriptionId":")" + id + "\"}}");
  // Events already on the way may still arrive; then the answer.
  json::value v;
  do {
    v = c->Next();
  } while (v.is_array());
  EXPECT_EQ(v.at("id").as_string(), "u");
  EXPECT_EQ(v.at("status").as_int64(), 200);
  EXPECT_EQ(emulator_->active_subscriptions(), 0);
  std::string frame;
  EXPECT_EQ(c->Read(&frame, milliseconds(200)), End::kTimeout) << frame;
}

TEST_F(EmoggEmulatorTest, EmitNowAndWorkerStateReachSubscribers) {
  Start();  // no periodic events at the default 10 s frequency within this test
  auto c = Connected();
  c->Auth();
  json::value sub = c->Call(
      R"({"id":"s","path":"channels:subscribe","body":{"channel":"session_emotions_intensities","key":"s1:10m"}})");
  std::string id(sub.at("body").at("subscriptionId").as_string());
  emulator_->EmitNow("session_emotions_intensities");
  json::value e = c->Next();
  EXPECT_EQ(e.at(0).as_string(), id);
  EXPECT_EQ(e.at(2).as_string(), "sei");

  c->Send(R"({"id":"w","path":"channels:subscribe","body":{"channel":"session_worker_state","key":"s1"}})");
  json::value ack = c->Next();
  ASSERT_EQ(ack.at("status").as_int64(), 200);
  json::value state = c->Next();
  EXPECT_EQ(state.at(0).as_string(), ack.at("body").at("subscriptionId").as_string());
  EXPECT_EQ(state.at(3), json::parse(R"(["working"])"));
  emulator_->SetWorkerState("s1", "finished");
  EXPECT_EQ(c->Next().at(3), json::parse(R"(["finished"])"));
}

TEST_F(EmoggEmulatorTest, IdleConnectionsAreClosedUnlessTheClientPings) {
  EmoggEmulatorOptions o;
  o.protocol.idle_timeout = milliseconds(1500);
  Start(o);
  auto idle = Connected();
  idle->Auth();
  auto busy = Connected();
  busy->Auth();
  const auto until = std::chrono::steady_clock::now() + milliseconds(3200);
  while (std::chrono::steady_clock::now() < until) {
    ASSERT_EQ(busy->Call(R"({"path":"ping"})").at("status").as_int64(), 200);
    // The cadence of the client's heartbeat, not a wait for a condition.
    std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_EQ(idle->WaitEnd(), End::kClosed);
  EXPECT_EQ(idle->reason().code, 1000);
  EXPECT_EQ(std::string(idle->reason().reason.data(), idle->reason().reason.size()), "Idle timeout");
  EXPECT_EQ(busy->Call(R"({"path":"ping"})").at("status").as_int64(), 200);
  EXPECT_EQ(emulator_->authenticated_connections(), 1);
}

TEST_F(EmoggEmulatorTest, UnauthenticatedConnectionsAreDropped) {
  EmoggEmulatorOptions o;
  o.protocol.auth_timeout = milliseconds(200);
  Start(o);
  auto c = Connected();
  EXPECT_EQ(c->WaitEnd(), End::kDropped);
}

TEST_F(EmoggEmulatorTest, AnswersWebSocketPingsUnlessSilent) {
  Start();
  auto c = Connected();
  c->Auth();
  EXPECT_TRUE(c->PingPong(kDeadline));
  auto d = Connected();
  d->Auth();
  emulator_->SetSilent(true);
  d->Send(R"({"id":"p","path":"ping"})");
  std::string frame;
  EXPECT_EQ(d->Read(&frame, milliseconds(300)), End::kTimeout) << frame;
  auto e = Connected();  // new connections are silent too
  e->Send(R"({"path":"auth:token","body":{"token":"tok"}})");
  EXPECT_FALSE(e->PingPong(milliseconds(300)));
  EXPECT_EQ(emulator_->requests("ping"), 0);  // the silent server took nothing in
  emulator_->SetSilent(false);
  auto f = Connected();
  f->Auth();
}

TEST_F(EmoggEmulatorTest, RawFramesReachAuthenticatedConnections) {
  Start();
  auto authed = Connected();
  authed->Auth();
  auto fresh = Connected();
  emulator_->SendRaw(R"(["nobody-subscribed",1712675148150,"sec",[{}]])");
  emulator_->SendRaw("[\"truncated\",");
  json::value unknown = authed->Next();
  EXPECT_EQ(unknown.at(0).as_string(), "nobody-subscribed");
  std::string frame;
  ASSERT_EQ(authed->Read(&frame), End::kFrame);
  EXPECT_EQ(frame, "[\"truncated\",");
  EXPECT_EQ(fresh->Read(&frame, milliseconds(200)), End::kTimeout);
}

TEST_F(EmoggEmulatorTest, DropSwitchesAndCloseCodes) {
  Start();
  auto a = Connected();
  a->Auth();
  emulator_->SetDropAfterFrames(2);
  a->Send(R"({"path":"ping"})");
  EXPECT_EQ(a->WaitEnd(), End::kDropped);
  emulator_->SetDropAfterFrames(-1);
  auto b = Connected();
  b->Auth();
  auto c = Connected();
  c->Auth();
  emulator_->DropAll();
  EXPECT_EQ(b->WaitEnd(), End::kDropped);
  EXPECT_EQ(c->WaitEnd(), End::kDropped);
  auto d = Connected();
  d->Auth();
  d->Close(websocket::close_code::going_away);
  ASSERT_TRUE(WaitFor([&] { return emulator_->client_close_codes().size() == 4; }));
  std::vector<int> codes = emulator_->client_close_codes();
  EXPECT_EQ(std::count(codes.begin(), codes.end(), 1001), 1);
  EXPECT_EQ(std::count(codes.begin(), codes.end(), 0), 3);
}

// Starts one asynchronous operation and runs `ioc` until it completes or the deadline
// passes (timed_out).
template <class Start>
beast::error_code Await(net::io_context& ioc, Start start) {
  std::optional<beast::error_code> result;
  start([&](beast::error_code ec, auto&&...) { result = ec; });
  ioc.restart();
  ioc.run_for(kDeadline);
  if (!result) {
    ioc.stop();
    return net::error::timed_out;
  }
  return *result;
}

TEST(EmoggEmulatorTlsTest, ServesWss) {
  wsbridge::testing::TestPki pki;
  auto ca = pki.MakeCa("emogg emulator test ca");
  auto leaf = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  EmoggEmulatorOptions o;
  o.tls = true;
  o.cert_pem = leaf.cert_pem;
  o.key_pem = leaf.key_pem;
  o.protocol.tokens = {"tok"};
  EmoggEmulator e(o);
  ASSERT_TRUE(e.Start().ok());
  EXPECT_EQ(e.url(), "wss://127.0.0.1:" + std::to_string(e.port()) + "/ws/v1");

  net::io_context ioc;
  net::ssl::context ctx(net::ssl::context::tls_client);
  ctx.add_certificate_authority(net::buffer(ca.cert_pem));
  ctx.set_verify_mode(net::ssl::verify_peer);
  websocket::stream<beast::ssl_stream<tcp::socket>> ws(ioc, ctx);
  tcp::endpoint server(net::ip::make_address("127.0.0.1"), e.port());
  ASSERT_FALSE(Await(ioc, [&](auto h) { beast::get_lowest_layer(ws).async_connect(server, h); }));
  ASSERT_FALSE(Await(ioc, [&](auto h) {
    ws.next_layer().async_handshake(net::ssl::stream_base::client, h);
  }));
  ASSERT_FALSE(Await(ioc, [&](auto h) { ws.async_handshake("127.0.0.1", "/ws/v1", h); }));
  ws.text(true);
  const std::string auth = R"({"id":"a","path":"auth:token","body":{"token":"tok"}})";
  ASSERT_FALSE(Await(ioc, [&](auto h) { ws.async_write(net::buffer(auth), h); }));
  beast::flat_buffer buf;
  ASSERT_FALSE(Await(ioc, [&](auto h) { ws.async_read(buf, h); }));
  json::value v = json::parse(beast::buffers_to_string(buf.data()));
  EXPECT_EQ(v.at("status").as_int64(), 200);
  EXPECT_EQ(v.at("id").as_string(), "a");
  EXPECT_EQ(e.auth_successes(), 1);
}

}  // namespace
}  // namespace wsbridge::emulator
