// The test server's plain TCP transport (see ws_server_stream.h).
#include <boost/beast/core/tcp_stream.hpp>

#include "tests/upstreams/ws_server_gate.h"
#include "tests/upstreams/ws_server_stream.h"

namespace wsbridge::upstreams {
namespace {

class PlainTransport final : public Transport {
 public:
  explicit PlainTransport(tcp::socket socket) : s_(std::move(socket)) {}

  beast::tcp_stream& tcp() override { return s_.next_layer(); }
  void ReadSome(MutableBuffers buffers, IoHandler handler) override {
    s_.async_read_some(buffers, std::move(handler));
  }
  void WriteSome(ConstBuffers buffers, IoHandler handler) override {
    s_.async_write_some(buffers, std::move(handler));
  }
  void Handshake(DoneHandler handler) override {
    net::post(s_.get_executor(), [h = std::move(handler)]() mutable { std::move(h)(error_code{}); });
  }
  void Teardown(beast::role_type role, DoneHandler handler) override {
    async_teardown(role, s_, std::move(handler));
  }
  void SetGated(bool gated) override { s_.SetGated(gated); }
  bool Resumed() override { return false; }

 private:
  GatedStream<beast::tcp_stream> s_;
};

}  // namespace

std::unique_ptr<Transport> MakePlainTransport(tcp::socket socket) {
  return std::make_unique<PlainTransport>(std::move(socket));
}

}  // namespace wsbridge::upstreams
