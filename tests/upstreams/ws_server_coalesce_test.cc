// WsServerOptions::coalesce_writes, over ws:// and wss://: frames the session writes itself
// and the WebSocket layer's own (pongs, the close) reach a standard client whole and in
// order, whatever their size; and a close and DropAfterWrites still deliver what was sent
// first. (What coalescing saves is measured by the bench, whose upstream uses it.)
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <gtest/gtest.h>

#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::upstreams {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace ssl = net::ssl;
using net::ip::tcp;

// Sizes on each side of the frame header's length encodings (7 bits, 16 bits, 64 bits).
const std::vector<size_t> kSizes = {0, 1, 125, 126, 127, 65535, 65536, 300000};

std::string Body(size_t size, int i) {
  std::string s(size, static_cast<char>('a' + i % 26));
  if (size >= 8) s.replace(0, 8, std::to_string(10000000 + i));
  return s;
}

// A standard (Beast) client over plain TCP or TLS, with blocking calls.
class Client {
 public:
  Client(bool tls, const std::string& ca_pem, uint16_t port) : ctx_(ssl::context::tls_client) {
    const tcp::endpoint ep(net::ip::make_address("127.0.0.1"), port);
    if (tls) {
      ctx_.add_certificate_authority(net::buffer(ca_pem));
      ctx_.set_verify_mode(ssl::verify_peer);
      wss_.emplace(ioc_, ctx_);
      beast::get_lowest_layer(*wss_).connect(ep);
      wss_->next_layer().handshake(ssl::stream_base::client);
      wss_->handshake("127.0.0.1", "/");
    } else {
      ws_.emplace(ioc_);
      ws_->next_layer().connect(ep);
      ws_->handshake("127.0.0.1", "/");
    }
  }

  // One message; false (with *ec) when the connection ended instead.
  bool Read(std::string* data, bool* binary, beast::error_code* ec) {
    beast::flat_buffer buf;
    if (ws_) {
      ws_->read(buf, *ec);
      *binary = ws_->got_binary();
    } else {
      wss_->read(buf, *ec);
      *binary = wss_->got_binary();
    }
    if (*ec) return false;
    *data = beast::buffers_to_string(buf.data());
    return true;
  }
  void Ping() { ws_ ? ws_->ping({}) : wss_->ping({}); }
  void Write(std::string_view text) {
    ws_ ? (void)ws_->write(net::buffer(text)) : (void)wss_->write(net::buffer(text));
  }
  template <class F>
  void OnControl(F f) {
    ws_ ? ws_->control_callback(f) : wss_->control_callback(f);
  }
  uint16_t CloseCode() { return static_cast<uint16_t>(ws_ ? ws_->reason().code : wss_->reason().code); }

 private:
  net::io_context ioc_;
  ssl::context ctx_;
  std::optional<websocket::stream<beast::tcp_stream>> ws_;
  std::optional<websocket::stream<beast::ssl_stream<beast::tcp_stream>>> wss_;
};

class WsServerCoalesceTest : public ::testing::TestWithParam<bool> {
 protected:
  // `on_open` runs with every new connection; the server coalesces its writes.
  using ConnPtr = std::shared_ptr<WsServerConnection>;
  void StartServer(std::function<void(const ConnPtr&)> on_open,
                   std::function<void(const ConnPtr&, std::string_view)> on_message = {}) {
    WsServerOptions o;
    o.coalesce_writes = true;
    if (GetParam()) {
      ca_ = pki_.MakeCa("ca");
      auto leaf = pki_.IssueServerCert(ca_, {"127.0.0.1"});
      o.tls = true;
      o.cert_pem = leaf.cert_pem;
      o.key_pem = leaf.key_pem;
    }
    WsServerHandler h;
    h.on_open = std::move(on_open);
    if (on_message) {
      h.on_message = [f = std::move(on_message)](const ConnPtr& c, std::string_view d, bool) { f(c, d); };
    }
    server_ = std::make_unique<WsServer>(std::move(o), std::move(h));
    ASSERT_TRUE(server_->Start().ok());
  }
  std::unique_ptr<Client> Connect() {
    return std::make_unique<Client>(GetParam(), ca_.cert_pem, server_->port());
  }

  wsbridge::testing::TestPki pki_;
  wsbridge::testing::CertAndKey ca_;
  std::unique_ptr<WsServer> server_;
};

TEST_P(WsServerCoalesceTest, EveryFrameArrivesWholeAndInOrderThenTheClose) {
  constexpr int kRounds = 40;
  // Half the messages at once; the other half and the close when the client asks (after
  // its ping, which the WebSocket layer answers in between the session's own frames).
  auto send_half = [](const std::shared_ptr<WsServerConnection>& c, int first) {
    int i = first;
    for (int r = 0; r < kRounds / 2; ++r) {
      for (size_t size : kSizes) {
        c->Send(Body(size, i), /*binary=*/i % 2 == 0);
        ++i;
      }
    }
  };
  const int half = kRounds / 2 * static_cast<int>(kSizes.size());
  StartServer([&](const std::shared_ptr<WsServerConnection>& c) { send_half(c, 0); },
              [&](const std::shared_ptr<WsServerConnection>& c, std::string_view) {
                send_half(c, half);
                c->Close(4001, "done");
              });
  auto client = Connect();
  int pongs = 0;
  client->OnControl([&](websocket::frame_type kind, beast::string_view) {
    if (kind == websocket::frame_type::pong) ++pongs;
  });
  client->Ping();
  client->Write("more");
  std::string data;
  bool binary = false;
  beast::error_code ec;
  for (int i = 0; i < 2 * half; ++i) {
    const size_t size = kSizes[static_cast<size_t>(i) % kSizes.size()];
    ASSERT_TRUE(client->Read(&data, &binary, &ec)) << "message " << i << ": " << ec.message();
    ASSERT_EQ(data, Body(size, i)) << "message " << i << " (" << size << " bytes)";
    ASSERT_EQ(binary, i % 2 == 0) << "message " << i;
  }
  EXPECT_FALSE(client->Read(&data, &binary, &ec));
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(client->CloseCode(), 4001);
  EXPECT_EQ(pongs, 1);
}

TEST_P(WsServerCoalesceTest, DropAfterWritesDeliversWhatWasSentThenDrops) {
  constexpr int kMessages = 2000;
  StartServer([](const std::shared_ptr<WsServerConnection>& c) {
    for (int i = 0; i < kMessages; ++i) c->Send(Body(1000, i), false);
    c->DropAfterWrites();
  });
  auto client = Connect();
  std::string data;
  bool binary = false;
  beast::error_code ec;
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_TRUE(client->Read(&data, &binary, &ec)) << "message " << i << ": " << ec.message();
    ASSERT_EQ(data, Body(1000, i)) << "message " << i;
  }
  EXPECT_FALSE(client->Read(&data, &binary, &ec));
  EXPECT_NE(ec, websocket::error::closed) << "dropped, not closed";
}

INSTANTIATE_TEST_SUITE_P(Transports, WsServerCoalesceTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? std::string("Tls") : std::string("Plain");
                         });

}  // namespace
}  // namespace wsbridge::upstreams
