// The test server's plain TCP transport (see ws_server_stream.h).
#include <boost/beast/core/tcp_stream.hpp>

#include <boost/asio/bind_executor.hpp>

#include "tests/upstreams/ws_server_gate.h"
#include "tests/upstreams/ws_server_stream.h"

namespace wsbridge::upstreams {
namespace {

class PlainTransport final : public Transport {
 public:
  explicit PlainTransport(tcp::socket socket) : s_(std::move(socket)) {}

  beast::tcp_stream& tcp() override { return s_.next_layer(); }
  void ReadSome(MutableBuffers buffers, IoHandler handler) override {
    s_.async_read_some(buffers, Bound(std::move(handler)));
  }
  void WriteSome(ConstBuffers buffers, IoHandler handler) override {
    s_.async_write_some(buffers, Bound(std::move(handler)));
  }
  void Handshake(DoneHandler handler) override {
    net::post(s_.get_executor(), [h = std::move(handler)]() mutable { std::move(h)(error_code{}); });
  }
  void Teardown(beast::role_type role, DoneHandler handler) override {
    async_teardown(role, s_, Bound(std::move(handler)));
  }
  void SetGated(bool gated) override { s_.SetGated(gated); }
  bool Resumed() override { return false; }

 private:
  // Boost 1.81's any_completion_executor does not take blocking.never, which the
  // operations below ask of their handler's executor when they post a completion: the
  // handler runs on the session's strand, as every handler of the session does.
  template <class Handler>
  net::executor_binder<Handler, net::any_io_executor> Bound(Handler h) {
    return net::bind_executor(s_.get_executor(), std::move(h));
  }

  GatedStream<beast::tcp_stream> s_;
};

}  // namespace

std::unique_ptr<Transport> MakePlainTransport(tcp::socket socket) {
  return std::make_unique<PlainTransport>(std::move(socket));
}

}  // namespace wsbridge::upstreams
