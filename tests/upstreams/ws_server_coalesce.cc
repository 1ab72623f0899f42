// Write coalescing for the test server's transports (WsServerOptions::coalesce_writes; see
// ws_server_stream.h). A write is copied into a buffer and reported done at once; one write
// to the transport at a time carries everything buffered since the previous one. While
// the peer keeps up, each frame still leaves by itself, as soon as it is written; when
// frames come faster than the socket takes them, they leave together, many to a TLS
// record and a TCP segment, as a busy production server's do. The session puts its data
// frames straight into the buffer (Append), ordered with the WebSocket layer's own frames
// (pongs, the close). Nothing is held back: like the session's queue without coalescing,
// the buffer grows while a peer does not read.
#include <boost/asio/post.hpp>
#include <boost/beast/core/bind_handler.hpp>

#include <memory>
#include <string>
#include <utility>
#include <deque>

#include "tests/upstreams/ws_server_stream.h"

namespace wsbridge::upstreams {
namespace {

class CoalescingTransport final : public Transport {
 public:
  explicit CoalescingTransport(std::unique_ptr<Transport> inner) : state_(std::make_shared<State>()) {
    state_->inner = std::move(inner);
    state_->owner = this;
  }
  // The session that owns this is gone. A write still in flight keeps the inner transport
  // (its stream's state is in use until the write completes) but nothing else: its
  // handler sees the owner gone. The socket is normally closed already (the session
  // finished); closing it here ends such a write at once.
  ~CoalescingTransport() override {
    state_->owner = nullptr;
    if (state_->flushing) {
      error_code ignored;
      state_->inner->tcp().socket().close(ignored);
    }
  }

  beast::tcp_stream& tcp() override { return inner().tcp(); }
  void ReadSome(MutableBuffers buffers, IoHandler handler) override {
    inner().ReadSome(buffers, std::move(handler));
  }
  void Handshake(DoneHandler handler) override { inner().Handshake(std::move(handler)); }
  void SetGated(bool gated) override { inner().SetGated(gated); }
  bool Resumed() override { return inner().Resumed(); }

  void WriteSome(ConstBuffers buffers, IoHandler handler) override {
    State& s = *state_;
    if (s.error) return Complete(std::move(handler), s.error, 0);
    std::size_t n = 0;
    for (const auto& b : buffers) {
      s.next.append(static_cast<const char*>(b.data()), b.size());
      n += b.size();
    }
    if (!s.flushing) StartFlush();
    Complete(std::move(handler), {}, n);
  }

  bool Append(std::string_view head, std::string_view body) override {
    State& s = *state_;
    if (s.error) return true;  // the connection is failing; its read ends the session
    s.next.append(head).append(body);
    if (!s.flushing) StartFlush();
    return true;
  }

  // The WebSocket close frame (like every frame) is in the buffer: it leaves first.
  void Teardown(beast::role_type role, DoneHandler handler) override {
    Flush(OnStrand<void(error_code)>(
        tcp().get_executor(), [this, role, h = std::move(handler)](error_code ec) mutable {
          if (ec) return std::move(h)(ec);
          inner().Teardown(role, std::move(h));
        }));
  }

  void Flush(DoneHandler handler) override {
    State& s = *state_;
    if (s.error || (!s.flushing && s.next.empty())) {
      const error_code ec = s.error;
      net::post(tcp().get_executor(), beast::bind_front_handler(std::move(handler), ec));
      return;
    }
    s.flushed.push_back(std::move(handler));
  }

 private:
  struct State {
    // Owned here, not by the CoalescingTransport: a write in flight holds the State.
    std::unique_ptr<Transport> inner;
    CoalescingTransport* owner = nullptr;
    std::string writing;  // in flight: writing[written..]
    std::size_t written = 0;
    std::string next;  // buffered while a write is in flight
    bool flushing = false;
    error_code error;  // the first failed write; every later write fails with it
    std::deque<DoneHandler> flushed;  // Flush() callers waiting for the buffer to empty
  };

  void Complete(IoHandler handler, error_code ec, std::size_t n) {
    net::post(tcp().get_executor(), beast::bind_front_handler(std::move(handler), ec, n));
  }

  void StartFlush() {
    State& s = *state_;
    s.flushing = true;
    s.writing.swap(s.next);
    s.next.clear();
    s.written = 0;
    WriteMore();
  }

  void WriteMore() {
    State& s = *state_;
    inner().WriteSome(ConstBuffers::From(net::buffer(s.writing.data() + s.written,
                                                     s.writing.size() - s.written)),
                      OnStrand<void(error_code, std::size_t)>(
                          tcp().get_executor(),
                          [st = state_](error_code ec, std::size_t n) {
                            if (st->owner != nullptr) st->owner->OnWritten(ec, n);
                          }));
  }

  void OnWritten(error_code ec, std::size_t n) {
    State& s = *state_;
    if (!ec) {
      s.written += n;
      if (s.written < s.writing.size()) return WriteMore();
      if (!s.next.empty()) return StartFlush();
    } else {
      s.error = ec;
      s.next.clear();
    }
    s.flushing = false;
    s.writing.clear();
    std::deque<DoneHandler> waiting;
    waiting.swap(s.flushed);
    for (auto& h : waiting) {
      net::post(tcp().get_executor(), beast::bind_front_handler(std::move(h), s.error));
    }
  }

  Transport& inner() { return *state_->inner; }

  std::shared_ptr<State> state_;
};

}  // namespace

std::unique_ptr<Transport> MakeCoalescingTransport(std::unique_ptr<Transport> inner) {
  return std::make_unique<CoalescingTransport>(std::move(inner));
}

}  // namespace wsbridge::upstreams
