// The byte stream under the test server's WebSocket and HTTP layers (internal to
// ws_server*.cc): TCP, or TLS over TCP, each with a gate that can hold reads and writes
// back. Completion handlers are type-erased here (asio::any_completion_handler, whose
// default allocator recycles the memory per thread), so the WebSocket and HTTP code is
// compiled once for both transports (ws_server_session.cc) and each transport's own
// operations once, in its own file (ws_server_plain.cc, ws_server_tls.cc). Instantiated
// per handler and per stream type, the same session took 3.5 minutes of CPU to compile in
// each of the three CI builds.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_STREAM_H_
#define WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_STREAM_H_

#include <array>
#include <cstddef>
#include <memory>
#include <string_view>
#include <utility>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core/bind_handler.hpp>
#include <boost/beast/core/role.hpp>
#include <boost/beast/core/tcp_stream.hpp>

#include "tests/upstreams/ws_server_impl.h"

namespace wsbridge::upstreams {

// At most kMax buffers of a buffer sequence, copied by value: itself a buffer sequence
// whose storage lives in the operation that holds it. A longer sequence is written or
// read in part, which read_some/write_some allow; the WebSocket layer loops.
template <class Buffer>
struct BufferList {
  static constexpr std::size_t kMax = 16;
  std::array<Buffer, kMax> items{};
  std::size_t n = 0;

  const Buffer* begin() const { return items.data(); }
  const Buffer* end() const { return items.data() + n; }

  template <class Sequence>
  static BufferList From(const Sequence& seq) {
    BufferList list;
    for (auto it = net::buffer_sequence_begin(seq), e = net::buffer_sequence_end(seq);
         it != e && list.n < kMax; ++it) {
      Buffer b(*it);
      if (b.size() != 0) list.items[list.n++] = b;
    }
    return list;
  }
};
using MutableBuffers = BufferList<net::mutable_buffer>;
using ConstBuffers = BufferList<net::const_buffer>;
// An erased handler bound to the session's strand, where every handler of a session
// runs. The binding is needed, not only tidy: Boost 1.81's any_completion_executor does
// not take blocking.never, which Asio's and Beast's operations ask of a handler's
// executor when they post a completion.
template <class Signature>
using StrandHandler =
    net::executor_binder<net::any_completion_handler<Signature>, net::any_io_executor>;
using IoHandler = StrandHandler<void(error_code, std::size_t)>;
using DoneHandler = StrandHandler<void(error_code)>;
template <class Signature, class Handler>
StrandHandler<Signature> OnStrand(const net::any_io_executor& strand, Handler&& handler) {
  return net::bind_executor(strand,
                            net::any_completion_handler<Signature>(std::forward<Handler>(handler)));
}

// One transport, plain or TLS.
class Transport {
 public:
  virtual ~Transport() = default;
  virtual beast::tcp_stream& tcp() = 0;
  virtual void ReadSome(MutableBuffers buffers, IoHandler handler) = 0;
  virtual void WriteSome(ConstBuffers buffers, IoHandler handler) = 0;
  // The server side of the TLS handshake; plain transports complete it at once (posted).
  virtual void Handshake(DoneHandler handler) = 0;
  // The WebSocket layer's teardown after a close: TLS close_notify, then the TCP shutdown.
  virtual void Teardown(beast::role_type role, DoneHandler handler) = 0;
  // While gated, reads and writes wait (a "silent" peer); see GatedStream.
  virtual void SetGated(bool gated) = 0;
  // Whether the TLS handshake resumed a session (false for plain transports).
  virtual bool Resumed() = 0;
  // Completes once every byte written so far has been handed to the socket (at once,
  // posted, for transports that hold nothing back; see MakeCoalescingTransport).
  virtual void Flush(DoneHandler handler) {
    net::post(tcp().get_executor(), beast::bind_front_handler(std::move(handler), error_code{}));
  }
  // Writes `head` then `body` after everything written so far, with no completion to wait
  // for; false when the transport cannot (only a coalescing one can). On the strand, and
  // never while the WebSocket layer is writing a message (its frames would interleave).
  virtual bool Append(std::string_view /*head*/, std::string_view /*body*/) { return false; }
};
std::unique_ptr<Transport> MakePlainTransport(tcp::socket socket);
std::unique_ptr<Transport> MakeTlsTransport(tcp::socket socket, ssl::context& ctx);
// WsServerOptions::coalesce_writes (ws_server_coalesce.cc): writes are buffered and
// reported done at once, and one write to `inner` at a time carries all that is buffered.
std::unique_ptr<Transport> MakeCoalescingTransport(std::unique_ptr<Transport> inner);

// The AsyncStream the WebSocket layer is instantiated with.
class ServerStream {
 public:
  using executor_type = net::any_io_executor;

  explicit ServerStream(std::unique_ptr<Transport> t)
      : t_(std::move(t)), ex_(t_->tcp().get_executor()) {}

  executor_type get_executor() const noexcept { return ex_; }
  Transport& transport() { return *t_; }

  template <class Buffers, class Token>
  auto async_read_some(const Buffers& buffers, Token&& token) {
    return net::async_initiate<Token, void(error_code, std::size_t)>(
        [this](auto handler, MutableBuffers b) {
          t_->ReadSome(b, OnStrand<void(error_code, std::size_t)>(ex_, std::move(handler)));
        },
        token, MutableBuffers::From(buffers));
  }
  template <class Buffers, class Token>
  auto async_write_some(const Buffers& buffers, Token&& token) {
    return net::async_initiate<Token, void(error_code, std::size_t)>(
        [this](auto handler, ConstBuffers b) {
          t_->WriteSome(b, OnStrand<void(error_code, std::size_t)>(ex_, std::move(handler)));
        },
        token, ConstBuffers::From(buffers));
  }

 private:
  std::unique_ptr<Transport> t_;
  executor_type ex_;
};

// Beast's hooks, found by ADL: closing the socket (a failed WebSocket operation) and the
// WebSocket teardown (asynchronous only: the server makes no blocking calls).
inline void beast_close_socket(ServerStream& s) { s.transport().tcp().close(); }
template <class Handler>
void async_teardown(beast::role_type role, ServerStream& s, Handler&& handler) {
  s.transport().Teardown(role, OnStrand<void(error_code)>(s.get_executor(),
                                                         std::forward<Handler>(handler)));
}

}  // namespace wsbridge::upstreams

#endif  // WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_STREAM_H_
