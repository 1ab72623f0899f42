// NlxEmulator over real sockets: key checks at the upgrade, the ack, turns and answers,
// resume, pushes, fault switches and observations, driven by a plain Beast client on
// 127.0.0.1.
#include "tests/upstreams/nlx_emulator.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <chrono>
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

const std::string kKeys =
    "apiKey=nlx-emulator-api-key&deploymentKey=nlx-emulator-deployment"
    "&channelKey=nlx-emulator-channel-en-US";

std::string TextTurn(const std::string& text) {
  json::object o;
  o["request"].emplace_object()["unstructured"].emplace_object()["text"] = text;
  return json::serialize(o);
}

// A blocking client, one per test connection. Reads give up after 10 s (SO_RCVTIMEO),
// so a missing frame fails the test instead of hanging it.
template <class Stream>
class Client {
 public:
  template <class... Args>
  explicit Client(Args&&... args) : ws_(ioc_, std::forward<Args>(args)...) {}

  // Connects and upgrades on `target`; returns the HTTP status of the upgrade answer.
  int Connect(uint16_t port, const std::string& target) {
    tcp::resolver resolver(ioc_);
    auto& sock = beast::get_lowest_layer(ws_);
    net::connect(sock, resolver.resolve("127.0.0.1", std::to_string(port)));
    timeval tv{10, 0};
    setsockopt(sock.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if constexpr (!std::is_same_v<Stream, tcp::socket>) {
      ws_.next_layer().handshake(ssl::stream_base::client);
    }
    beast::error_code ec;
    ws_.handshake(response_, "127.0.0.1", target, ec);
    return response_.result_int();
  }
  int ConnectWithKeys(uint16_t port, const std::string& extra = "") {
    return Connect(port, "/?" + kKeys + (extra.empty() ? "" : "&" + extra));
  }
  const websocket::response_type& response() const { return response_; }

  void Send(const std::string& text) {
    ws_.text(true);
    ws_.write(net::buffer(text));
  }
  // For writes the server may cut short.
  void Send(const std::string& text, beast::error_code* ec) {
    ws_.text(true);
    ws_.write(net::buffer(text), *ec);
  }
  void SendBinary(const std::string& bytes) {
    ws_.binary(true);
    ws_.write(net::buffer(bytes));
  }
  // Next frame, or "" with *ec set when the connection ended.
  std::string Read(beast::error_code* ec) {
    beast::flat_buffer buf;
    ws_.read(buf, *ec);
    if (*ec) return "";
    EXPECT_TRUE(ws_.got_text());
    return beast::buffers_to_string(buf.data());
  }
  json::object Next() {
    beast::error_code ec;
    std::string frame = Read(&ec);
    EXPECT_FALSE(ec) << ec.message();
    if (ec) return {};
    return json::parse(frame).as_object();
  }
  // Reads the ack and returns its conversation id.
  std::string Ack() {
    json::object ack = Next();
    EXPECT_EQ(ack.size(), 1u);
    auto it = ack.find("conversationId");
    return it != ack.end() && it->value().is_string() ? std::string(it->value().get_string()) : "";
  }
  json::object Turn(const std::string& text) {
    Send(TextTurn(text));
    return Next();
  }
  websocket::close_reason reason() const { return ws_.reason(); }
  void Close(uint16_t code = websocket::close_code::normal) { ws_.close(code); }

 private:
  net::io_context ioc_;
  websocket::stream<Stream> ws_;
  websocket::response_type response_;
};

using PlainClient = Client<tcp::socket>;

class NlxEmulatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    emulator_ = std::make_unique<NlxEmulator>(NlxEmulatorOptions{});
    ASSERT_TRUE(emulator_->Start().ok());
  }
  std::unique_ptr<NlxEmulator> emulator_;
};

TEST_F(NlxEmulatorTest, UrlIsLoopbackWithPort) {
  EXPECT_EQ(emulator_->url(), "ws://127.0.0.1:" + std::to_string(emulator_->port()));
  NlxEmulatorOptions o;
  o.listen = "0.0.0.0:0";
  NlxEmulator e(o);
  EXPECT_EQ(e.Start().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(NlxEmulatorTest, ConversationOverTheWire) {
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port(), "languageCode=en-US"), 101);
  // The ack comes first, unasked.
  std::string id = c.Ack();
  ASSERT_EQ(id.size(), 36u);
  json::object r = c.Turn("Book a flight to London");
  EXPECT_EQ(r.at("conversationId"), json::value(id));
  EXPECT_EQ(r.at("messages").at(0).at("text"), "Turn 1: you said \"Book a flight to London\"");
  EXPECT_EQ(r.at("messages").at(0).at("type"), "text");
  r = c.Turn("choices");
  EXPECT_EQ(r.at("messages").at(0).at("choices").as_array().size(), 2u);
  r = c.Turn("multi");
  EXPECT_EQ(r.at("messages").as_array().size(), 3u);
  EXPECT_EQ(r.at("emulator").at("turn"), 3);
  EXPECT_EQ(emulator_->turns_received(id), 3);
  EXPECT_EQ(emulator_->handshakes(), 1);
  EXPECT_EQ(emulator_->frames_before_ack(), 0);
  EXPECT_EQ(emulator_->connections_for(id), 1);
  c.Close();
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
  EXPECT_EQ(emulator_->close_codes(), std::vector<int>{1000});
}

TEST_F(NlxEmulatorTest, WrongOrMissingKeysAre401WithAMessage) {
  PlainClient missing;
  EXPECT_EQ(missing.Connect(emulator_->port(), "/?apiKey=nlx-emulator-api-key"), 401);
  EXPECT_THAT(missing.response().body(), HasSubstr("deploymentKey is missing"));
  PlainClient wrong;
  EXPECT_EQ(wrong.Connect(emulator_->port(),
                          "/?apiKey=stolen&deploymentKey=nlx-emulator-deployment"
                          "&channelKey=nlx-emulator-channel-en-US"),
            401);
  EXPECT_THAT(wrong.response().body(), HasSubstr("apiKey is not valid"));
  EXPECT_THAT(wrong.response().body(), ::testing::Not(HasSubstr("stolen")));
  EXPECT_EQ(emulator_->handshakes(), 2);
  EXPECT_EQ(emulator_->refused_handshakes(), 2);
  EXPECT_EQ(emulator_->conversations(), 0);
}

TEST_F(NlxEmulatorTest, ResumesByIdOnANewSocket) {
  std::string id;
  {
    PlainClient first;
    ASSERT_EQ(first.ConnectWithKeys(emulator_->port()), 101);
    id = first.Ack();
    first.Turn("one");
  }  // the socket just goes away
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
  PlainClient second;
  ASSERT_EQ(second.ConnectWithKeys(emulator_->port(), "conversationId=" + id), 101);
  EXPECT_EQ(second.Ack(), id);
  EXPECT_EQ(second.Turn("two").at("emulator").at("turn"), 2);
  EXPECT_EQ(emulator_->turns_received(id), 2);
  EXPECT_EQ(emulator_->conversations(), 1);
  // An id the emulator never issued starts a conversation under it.
  PlainClient third;
  ASSERT_EQ(third.ConnectWithKeys(emulator_->port(), "conversationId=made-up-1"), 101);
  EXPECT_EQ(third.Ack(), "made-up-1");
  EXPECT_EQ(emulator_->conversation_ids(), (std::vector<std::string>{id, "made-up-1"}));
}

TEST_F(NlxEmulatorTest, AckDelayHoldsTheAckBack) {
  emulator_->SetAckDelay(milliseconds(150));
  PlainClient c;
  auto start = std::chrono::steady_clock::now();
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  EXPECT_FALSE(c.Ack().empty());
  // A lower bound only: the emulator may be later under load, never earlier.
  EXPECT_GE(std::chrono::steady_clock::now() - start, milliseconds(150));
}

TEST_F(NlxEmulatorTest, WithheldAckMeansTheAnswerComesFirstAndIsCounted) {
  emulator_->SetWithholdAck(true);
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  json::object r = c.Turn("too early");
  EXPECT_TRUE(r.contains("messages"));  // not an ack: none was sent
  EXPECT_EQ(emulator_->frames_before_ack(), 1);
}

TEST_F(NlxEmulatorTest, DropNextTurnCutsTheSocketAfterCountingTheTurn) {
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  std::string id = c.Ack();
  emulator_->DropNextTurns(1);
  c.Send(TextTurn("lost"));
  beast::error_code ec;
  EXPECT_EQ(c.Read(&ec), "");
  EXPECT_TRUE(ec);
  EXPECT_NE(ec, websocket::error::closed) << "expected an abrupt end, got a close frame";
  EXPECT_EQ(emulator_->turns_received(id), 1);
  ASSERT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
  EXPECT_EQ(emulator_->close_codes(), std::vector<int>{0});
  // The conversation goes on from a new socket.
  PlainClient again;
  ASSERT_EQ(again.ConnectWithKeys(emulator_->port(), "conversationId=" + id), 101);
  EXPECT_EQ(again.Ack(), id);
  EXPECT_EQ(again.Turn("next").at("emulator").at("turn"), 2);
}

TEST_F(NlxEmulatorTest, RefusedUpgradesAndRecovery) {
  emulator_->SetRefuseUpgrades(503);
  PlainClient refused;
  EXPECT_EQ(refused.ConnectWithKeys(emulator_->port()), 503);
  emulator_->SetRefuseUpgrades(0);
  PlainClient ok;
  EXPECT_EQ(ok.ConnectWithKeys(emulator_->port()), 101);
  EXPECT_EQ(emulator_->refused_handshakes(), 1);
}

TEST_F(NlxEmulatorTest, PushesAnswerDelayAndErrors) {
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  std::string id = c.Ack();
  EXPECT_EQ(emulator_->Push(id, "Hi, this is Sam from support"), 1);
  json::object pushed = c.Next();
  EXPECT_EQ(pushed.at("messages").at(0).at("text"), "Hi, this is Sam from support");
  EXPECT_EQ(pushed.at("emulatorPush"), true);
  EXPECT_EQ(emulator_->Push("no-such-conversation", "x"), 0);

  emulator_->SetAnswerDelay(milliseconds(30));
  EXPECT_EQ(c.Turn("slow").at("emulator").at("turn"), 1);
  json::object err = c.Turn("error");
  EXPECT_EQ(err.at("message"), "Internal server error");
  c.SendBinary(TextTurn("binary"));
  EXPECT_THAT(std::string(c.Next().at("message").as_string()), HasSubstr("text frame"));
  EXPECT_EQ(emulator_->invalid_frames(), 1);

  EXPECT_EQ(emulator_->PushRaw(id, "not json at all"), 1);
  beast::error_code ec;
  EXPECT_EQ(c.Read(&ec), "not json at all");
  EXPECT_EQ(emulator_->Close(id, 1001, "Going away"), 1);
  c.Read(&ec);
  EXPECT_EQ(ec, websocket::error::closed);
  EXPECT_EQ(c.reason().code, 1001);
}

TEST_F(NlxEmulatorTest, TurnsRecordWhatTheClientSent) {
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  std::string id = c.Ack();
  const std::string turn =
      R"({"request":{"unstructured":{"text":"hi"}},"userId":"u-1","context":{"tier":"gold"}})";
  c.Send(turn);
  json::object r = c.Next();
  EXPECT_EQ(r.at("emulator").at("userId"), "u-1");
  EXPECT_EQ(r.at("emulator").at("context").at("tier"), "gold");
  std::vector<NlxTurnRecord> turns = emulator_->turns(id);
  ASSERT_EQ(turns.size(), 1u);
  EXPECT_EQ(turns[0].json, turn);
  EXPECT_EQ(emulator_->total_turns(), 1);
}

TEST_F(NlxEmulatorTest, MessagesOverApiGatewaysLimitCloseTheSocket) {
  PlainClient c;
  ASSERT_EQ(c.ConnectWithKeys(emulator_->port()), 101);
  std::string id = c.Ack();
  beast::error_code ec;
  c.Send(TextTurn(std::string(130 << 10, 'x')), &ec);
  if (!ec) c.Read(&ec);
  EXPECT_TRUE(ec);
  EXPECT_EQ(emulator_->turns_received(id), 0);
}

TEST_F(NlxEmulatorTest, ManyConversationsStayApart) {
  constexpr int kN = 20;
  std::vector<std::unique_ptr<PlainClient>> clients;
  std::vector<std::string> ids;
  for (int i = 0; i < kN; ++i) {
    clients.push_back(std::make_unique<PlainClient>());
    ASSERT_EQ(clients.back()->ConnectWithKeys(emulator_->port()), 101);
    ids.push_back(clients.back()->Ack());
  }
  for (int i = 0; i < kN; ++i) clients[i]->Send(TextTurn("from " + std::to_string(i)));
  for (int i = 0; i < kN; ++i) {
    json::object r = clients[i]->Next();
    EXPECT_EQ(r.at("conversationId"), json::value(ids[i]));
    EXPECT_EQ(r.at("messages").at(0).at("text"),
              json::value("Turn 1: you said \"from " + std::to_string(i) + "\""));
  }
  EXPECT_EQ(emulator_->conversations(), kN);
  EXPECT_EQ(emulator_->open_connections(), kN);
  clients.clear();
  EXPECT_TRUE(WaitFor([&] { return emulator_->open_connections() == 0; }));
}

TEST(NlxEmulatorTlsTest, ServesWss) {
  wsbridge::testing::TestPki pki;
  auto ca = pki.MakeCa("nlx emulator test ca");
  auto leaf = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  NlxEmulatorOptions o;
  o.tls = true;
  o.cert_pem = leaf.cert_pem;
  o.key_pem = leaf.key_pem;
  NlxEmulator e(o);
  ASSERT_TRUE(e.Start().ok());
  EXPECT_EQ(e.url(), "wss://127.0.0.1:" + std::to_string(e.port()));
  ssl::context ctx(ssl::context::tls_client);
  ctx.add_certificate_authority(net::buffer(ca.cert_pem));
  ctx.set_verify_mode(ssl::verify_peer);
  Client<ssl::stream<tcp::socket>> c(ctx);
  ASSERT_EQ(c.ConnectWithKeys(e.port()), 101);
  EXPECT_FALSE(c.Ack().empty());
  EXPECT_TRUE(c.Turn("over tls").contains("messages"));
}

}  // namespace
}  // namespace wsbridge::emulator
