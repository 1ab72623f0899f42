// The gate under the test server's transports (internal to ws_server_plain.cc and
// ws_server_tls.cc).
#ifndef WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_GATE_H_
#define WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_GATE_H_

#include <boost/asio/compose.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/role.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/websocket/teardown.hpp>

#include "tests/upstreams/ws_server_impl.h"

namespace wsbridge::upstreams {

// A stream layer that can hold reads and writes back ("silent" peer). Cancelling a
// pending WebSocket read would fail the stream, so the gate sits below it instead: a
// gated operation waits on a timer that ungating cancels, then proceeds.
template <class Next>
class GatedStream {
 public:
  using executor_type = typename Next::executor_type;
  using lowest_layer_type = typename Next::socket_type;  // for asio::ssl::stream

  template <class... Args>
  explicit GatedStream(Args&&... args)
      : next_(std::forward<Args>(args)...), timer_(next_.get_executor()) {
    timer_.expires_at(net::steady_timer::time_point::max());
  }

  executor_type get_executor() noexcept { return next_.get_executor(); }
  Next& next_layer() { return next_; }
  const Next& next_layer() const { return next_; }
  lowest_layer_type& lowest_layer() { return next_.socket(); }
  const lowest_layer_type& lowest_layer() const { return next_.socket(); }

  void SetGated(bool gated) {
    gated_ = gated;
    if (!gated) timer_.cancel();
  }

  template <class Buffers, class Token>
  auto async_read_some(const Buffers& buffers, Token&& token) {
    return net::async_compose<Token, void(error_code, std::size_t)>(
        Op<Buffers, true>{this, buffers}, token, next_);
  }
  template <class Buffers, class Token>
  auto async_write_some(const Buffers& buffers, Token&& token) {
    return net::async_compose<Token, void(error_code, std::size_t)>(
        Op<Buffers, false>{this, buffers}, token, next_);
  }

 private:
  template <class Buffers, bool kRead>
  struct Op {
    GatedStream* s;
    Buffers buffers;
    bool started = false;

    template <class Self>
    void operator()(Self& self, error_code ec = {}, std::size_t n = 0) {
      if (!started) {
        if (s->gated_) {
          s->timer_.async_wait(std::move(self));
          return;
        }
        started = true;
        if constexpr (kRead) {
          s->next_.async_read_some(buffers, std::move(self));
        } else {
          s->next_.async_write_some(buffers, std::move(self));
        }
        return;
      }
      self.complete(ec, n);
    }
  };

  Next next_;
  net::steady_timer timer_;
  bool gated_ = false;
};

// WebSocket teardown hooks, found by ADL: forward to the wrapped layer.
template <class Next>
void teardown(beast::role_type role, GatedStream<Next>& s, error_code& ec) {
  using beast::websocket::teardown;
  teardown(role, s.next_layer(), ec);
}
template <class Next, class Handler>
void async_teardown(beast::role_type role, GatedStream<Next>& s, Handler&& handler) {
  using beast::websocket::async_teardown;
  async_teardown(role, s.next_layer(), std::forward<Handler>(handler));
}

}  // namespace wsbridge::upstreams

#endif  // WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_GATE_H_
