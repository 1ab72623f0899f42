// The test server's TLS transport (see ws_server_stream.h).
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket/ssl.hpp>

#include "tests/upstreams/ws_server_gate.h"
#include "tests/upstreams/ws_server_stream.h"

namespace wsbridge::upstreams {
namespace {

class TlsTransport final : public Transport {
 public:
  TlsTransport(tcp::socket socket, ssl::context& ctx) : s_(std::move(socket), ctx) {}

  beast::tcp_stream& tcp() override { return s_.next_layer().next_layer(); }
  void ReadSome(MutableBuffers buffers, IoHandler handler) override {
    s_.async_read_some(buffers, std::move(handler));
  }
  void WriteSome(ConstBuffers buffers, IoHandler handler) override {
    s_.async_write_some(buffers, std::move(handler));
  }
  void Handshake(DoneHandler handler) override {
    s_.async_handshake(ssl::stream_base::server, std::move(handler));
  }
  void Teardown(beast::role_type role, DoneHandler handler) override {
    using beast::websocket::async_teardown;
    async_teardown(role, s_, std::move(handler));
  }
  void SetGated(bool gated) override { s_.next_layer().SetGated(gated); }
  bool Resumed() override { return SSL_session_reused(s_.native_handle()) == 1; }

 private:
  beast::ssl_stream<GatedStream<beast::tcp_stream>> s_;
};

}  // namespace

std::unique_ptr<Transport> MakeTlsTransport(tcp::socket socket, ssl::context& ctx) {
  return std::make_unique<TlsTransport>(std::move(socket), ctx);
}

}  // namespace wsbridge::upstreams
