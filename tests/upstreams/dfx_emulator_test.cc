// DfxEmulator over real sockets: handshake rules, the wire format, fault switches and
// observations, driven by a plain Beast client on 127.0.0.1.
#include "tests/upstreams/dfx_emulator.h"

#include <memory>
#include <string>

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

struct Reply {
  std::string request_id;
  int status = 0;
  json::object body;
};

Reply Parse(const std::string& frame) {
  Reply r;
  EXPECT_GE(frame.size(), 13u) << frame;
  if (frame.size() < 13) return r;
  r.request_id = frame.substr(0, 10);
  r.status = std::stoi(frame.substr(10, 3));
  r.body = json::parse(frame.substr(13)).as_object();
  return r;
}

std::string Str(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  return it != o.end() && it->value().is_string() ? std::string(it->value().get_string())
                                                   : "<absent>";
}

std::string Base64(std::string_view in) {
  std::string out;
  out.resize(beast::detail::base64::encoded_size(in.size()));
  out.resize(beast::detail::base64::encode(out.data(), in.data(), in.size()));
  return out;
}

// A blocking client, one per test connection.
template <class Stream>
class Client {
 public:
  template <class... Args>
  explicit Client(Args&&... args) : ws_(ioc_, std::forward<Args>(args)...) {}

  // Connects and upgrades; returns the HTTP status of the upgrade answer.
  int Connect(uint16_t port, const char* subprotocol = "json") {
    tcp::resolver resolver(ioc_);
    net::connect(beast::get_lowest_layer(ws_), resolver.resolve("127.0.0.1", std::to_string(port)));
    if constexpr (!std::is_same_v<Stream, tcp::socket>) {
      ws_.next_layer().handshake(ssl::stream_base::client);
    }
    if (subprotocol != nullptr) {
      ws_.set_option(websocket::stream_base::decorator([subprotocol](websocket::request_type& req) {
        req.set(http::field::sec_websocket_protocol, subprotocol);
      }));
    }
    ws_.binary(true);
    beast::error_code ec;
    ws_.handshake(response_, "127.0.0.1", "/", ec);
    return response_.result_int();
  }
  const websocket::response_type& response() const { return response_; }

  void Send(std::string_view action, std::string_view rid, std::string_view body) {
    std::string frame = std::string(action) + std::string(rid) + std::string(body);
    ws_.write(net::buffer(frame));
  }
  void SendRaw(std::string_view bytes) { ws_.write(net::buffer(bytes)); }
  // Next frame, or "" with *ec set when the connection ended.
  std::string Read(beast::error_code* ec) {
    beast::flat_buffer buf;
    ws_.read(buf, *ec);
    if (*ec) return "";
    EXPECT_TRUE(ws_.got_binary());
    return beast::buffers_to_string(buf.data());
  }
  Reply Next() {
    beast::error_code ec;
    std::string frame = Read(&ec);
    EXPECT_FALSE(ec) << ec.message();
    return Parse(frame);
  }
  Reply Call(std::string_view action, std::string_view rid, std::string_view body) {
    Send(action, rid, body);
    return Next();
  }
  websocket::close_reason reason() const { return ws_.reason(); }
  void Close() { ws_.close(websocket::close_code::normal); }

 private:
  net::io_context ioc_;
  websocket::stream<Stream> ws_;
  websocket::response_type response_;
};

using PlainClient = Client<tcp::socket>;

class DfxEmulatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DfxEmulatorOptions o;
    o.tokens = {"device-token"};
    emulator_ = std::make_unique<DfxEmulator>(o);
    ASSERT_TRUE(emulator_->Start().ok());
  }
  void Login(PlainClient& c) {
    ASSERT_EQ(c.Connect(emulator_->port()), 101);
    ASSERT_EQ(c.Call("0718", "0718abcdef", R"({"Token":"device-token"})").status, 200);
  }
  std::string Chunk(const std::string& mid, const char* action, uint32_t order, uint32_t ms) {
    return R"({"Params":{"ID":")" + mid + R"("},"Action":")" + action + R"(","Payload":")" +
           Base64(MakeEmulatorChunk(order, ms, "body")) + R"("})";
  }
  std::unique_ptr<DfxEmulator> emulator_;
};

TEST_F(DfxEmulatorTest, UrlIsLoopbackWithPort) {
  EXPECT_EQ(emulator_->url(), "ws://127.0.0.1:" + std::to_string(emulator_->port()));
  EXPECT_NE(emulator_->port(), 0);
}

TEST_F(DfxEmulatorTest, RefusesNonLoopbackListen) {
  DfxEmulatorOptions o;
  o.listen = "0.0.0.0:0";
  DfxEmulator e(o);
  absl::Status st = e.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
}

TEST_F(DfxEmulatorTest, HandshakeNeedsJsonSubprotocol) {
  PlainClient without;
  EXPECT_EQ(without.Connect(emulator_->port(), nullptr), 400);
  EXPECT_THAT(without.response().body(), HasSubstr("json"));
  PlainClient other;
  EXPECT_EQ(other.Connect(emulator_->port(), "xml"), 400);
  PlainClient with;
  EXPECT_EQ(with.Connect(emulator_->port(), "xml, json"), 101);
  EXPECT_EQ(with.response()[http::field::sec_websocket_protocol], "json");
}

TEST_F(DfxEmulatorTest, MeasurementOverTheWire) {
  PlainClient c;
  ASSERT_EQ(c.Connect(emulator_->port()), 101);
  EXPECT_EQ(c.Call("0504", "0504abcdef", R"({"StudyID":"s"})").status, 401);
  Reply login = c.Call("0718", "0718abcdef", R"({"Token":"device-token"})");
  EXPECT_EQ(login.request_id, "0718abcdef");
  EXPECT_EQ(login.status, 200);
  Reply created = c.Call("0504", "0504abcdef", R"({"StudyID":"s"})");
  ASSERT_EQ(created.status, 200);
  std::string mid = Str(created.body, "ID");
  ASSERT_EQ(c.Call("0510", "0510subscr", R"({"Params":{"ID":")" + mid + R"("},"RequestID":"0510subscr"})").status, 200);
  EXPECT_TRUE(WaitFor([&] { return emulator_->active_subscriptions() == 1; }));

  // Results come after the chunk's answer, on the subscription's request id.
  emulator_->SetResultDelay(milliseconds(20));
  c.Send("0506", "0506aaaaaa", Chunk(mid, "FIRST::PROCESS", 0, 100));
  Reply ack = c.Next();
  EXPECT_EQ(ack.request_id, "0506aaaaaa");
  EXPECT_EQ(ack.status, 200);
  Reply result = c.Next();
  EXPECT_EQ(result.request_id, "0510subscr");
  EXPECT_EQ(Str(result.body, "ID"), mid);
  EXPECT_FALSE(result.body.contains("Status"));  // no invented marker

  emulator_->SetAnswerDelay(milliseconds(10));
  Reply bad = c.Call("0506", "0506bbbbbb", Chunk(mid, "CHUNK::PROCESS", 5, 100));
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(Str(bad.body, "Code"), "MISALIGNED_CHUNK");
  c.Send("0506", "0506cccccc", Chunk(mid, "LAST::PROCESS", 1, 100));
  EXPECT_EQ(c.Next().request_id, "0506cccccc");
  Reply last = c.Next();
  EXPECT_EQ(last.request_id, "0510subscr");
  EXPECT_EQ(last.body.at("ChunkOrder").to_number<int>(), 1);

  EXPECT_EQ(emulator_->chunks().size(), 2u);
  EXPECT_EQ(emulator_->frames_received("0506"), 3);
  EXPECT_EQ(emulator_->logins(), 1);
  EXPECT_EQ(emulator_->MaxDataMsInWindow(), 200);
  c.Close();
  EXPECT_TRUE(WaitFor([&] {
    return emulator_->open_connections() == 0 && emulator_->active_subscriptions() == 0;
  }));
}

TEST_F(DfxEmulatorTest, DropAfterFramesCutsTheSocketWithoutCloseFrame) {
  emulator_->SetDropAfterFrames(2);
  PlainClient c;
  Login(c);
  c.Send("0504", "0504abcdef", R"({"StudyID":"s"})");
  beast::error_code ec;
  EXPECT_EQ(c.Read(&ec), "");
  EXPECT_TRUE(ec);
  EXPECT_NE(ec, websocket::error::closed) << "expected an abrupt end, got a close frame";
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
}

TEST_F(DfxEmulatorTest, ShortFrameClosesWithProtocolError) {
  PlainClient c;
  ASSERT_EQ(c.Connect(emulator_->port()), 101);
  c.SendRaw("0718");
  beast::error_code ec;
  c.Read(&ec);
  EXPECT_EQ(ec, websocket::error::closed);
  EXPECT_EQ(c.reason().code, 1002);
}

TEST_F(DfxEmulatorTest, RefuseLoginAndSendRaw) {
  emulator_->SetRefuseLogin(true);
  PlainClient c;
  ASSERT_EQ(c.Connect(emulator_->port()), 101);
  Reply r = c.Call("0718", "0718abcdef", R"({"Token":"device-token"})");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_TOKEN");
  EXPECT_EQ(emulator_->logins(), 0);
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 1; }));
  emulator_->SendRaw(std::string("\x01\x02garbage", 9));
  beast::error_code ec;
  EXPECT_EQ(c.Read(&ec), std::string("\x01\x02garbage", 9));
  EXPECT_FALSE(ec);
}

TEST(DfxEmulatorTlsTest, ServesWss) {
  wsbridge::testing::TestPki pki;
  auto ca = pki.MakeCa("emulator test ca");
  auto leaf = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  DfxEmulatorOptions o;
  o.tls = true;
  o.cert_pem = leaf.cert_pem;
  o.key_pem = leaf.key_pem;
  DfxEmulator e(o);
  ASSERT_TRUE(e.Start().ok());
  EXPECT_EQ(e.url(), "wss://127.0.0.1:" + std::to_string(e.port()));

  ssl::context ctx(ssl::context::tls_client);
  ctx.add_certificate_authority(net::buffer(ca.cert_pem));
  ctx.set_verify_mode(ssl::verify_peer);
  Client<ssl::stream<tcp::socket>> c(ctx);
  ASSERT_EQ(c.Connect(e.port()), 101);
  EXPECT_EQ(c.Call("0718", "0718abcdef", R"({"Token":"any"})").status, 200);
  EXPECT_EQ(c.Call("0718", "0718abcdeg", R"({"Token":"bad-one"})").status, 401);
}

}  // namespace
}  // namespace wsbridge::emulator
