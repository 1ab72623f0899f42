// One WebSocket (or plain HTTP) connection of the test server, over TCP or TLS; each
// stream type is compiled in its own file (ws_server_plain.cc, ws_server_tls.cc).
#ifndef WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_SESSION_H_
#define WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_SESSION_H_

#include <deque>
#include <type_traits>

#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/upstreams/ws_server_impl.h"

namespace wsbridge::upstreams {

namespace http = beast::http;
namespace websocket = beast::websocket;

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
  using websocket::teardown;
  teardown(role, s.next_layer(), ec);
}
template <class Next, class Handler>
void async_teardown(beast::role_type role, GatedStream<Next>& s, Handler&& handler) {
  using websocket::async_teardown;
  async_teardown(role, s.next_layer(), std::forward<Handler>(handler));
}

inline int HttpStatusFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    default:
      return 400;
  }
}


// The Retry-After value WithRetryAfter attached to a refusal; "" when none.
inline std::string RetryAfterOf(const absl::Status& s) {
  const auto v = s.GetPayload(kRetryAfterPayload);  // absl::optional on Debian
  return v ? std::string(*v) : std::string();
}

template <bool kTls>
class WsServer::Impl::Session : public WsServer::Impl::SessionBase,
                                public std::enable_shared_from_this<Session<kTls>> {
  using Gated = GatedStream<beast::tcp_stream>;
  using Next = std::conditional_t<kTls, beast::ssl_stream<Gated>, Gated>;

 public:
  Session(Impl* core, tcp::socket socket, uint64_t id)
      : core_(core),
        alive_(core->alive),
        id_(id),
        handle_(std::make_shared<Handle>(id, core->alive)),
        info_(handle_->info_),
        ws_(MakeWs(core, std::move(socket))) {}

  // Called right after construction (shared_from_this needs a live shared_ptr).
  void Attach() { handle_->session_ = this->weak_from_this(); }

  void Start() override {
    net::dispatch(strand(), [self = this->shared_from_this()] {
      if constexpr (kTls) {
        beast::get_lowest_layer(self->ws_).expires_after(kHandshakeTimeout);
        self->ws_.next_layer().async_handshake(
            ssl::stream_base::server, [self](error_code ec) { self->OnTls(ec); });
      } else {
        self->DoReadRequest();
      }
    });
  }

  void Send(std::string data, bool binary) override {
    Post([data = std::move(data), binary](Session& s) mutable {
      if (s.finished_ || s.close_requested_ || !s.opened_) return;
      s.queue_.push_back({std::move(data), binary});
      if (!s.writing_) s.DoWrite();
    });
  }

  void Close(uint16_t code, std::string reason) override {
    Post([code, reason = std::move(reason)](Session& s) {
      if (s.finished_ || s.close_requested_) return;
      s.close_requested_ = true;
      s.close_reason_ = websocket::close_reason(static_cast<websocket::close_code>(code), reason);
      if (!s.opened_) {
        s.Finish(absl::CancelledError("closed by the server before the handshake"));
      } else if (!s.writing_) {
        s.DoClose();
      }
    });
  }

  void Drop() override {
    Post([](Session& s) { s.Finish(absl::UnavailableError("connection dropped by the server")); });
  }

  void DropAfterWrites() override {
    Post([](Session& s) {
      if (s.writing_ || !s.queue_.empty()) {
        s.drop_after_writes_ = true;  // OnWrite drops once the queue is empty
      } else {
        s.Finish(absl::UnavailableError("connection dropped by the server"));
      }
    });
  }

  void SetSilent(bool silent) override {
    Post([silent](Session& s) {
      if (s.finished_) return;
      s.gate().SetGated(silent);
    });
  }

 private:
  static websocket::stream<Next> MakeWs(Impl* core, tcp::socket socket) {
    if constexpr (kTls) {
      return websocket::stream<Next>(std::move(socket), *core->ssl_ctx);
    } else {
      return websocket::stream<Next>(std::move(socket));
    }
  }

  auto strand() { return ws_.get_executor(); }
  Gated& gate() {
    if constexpr (kTls) {
      return ws_.next_layer().next_layer();
    } else {
      return ws_.next_layer();
    }
  }

  template <class F>
  void Post(F&& f) {
    if (!alive_->load()) return;
    net::post(strand(), [self = this->shared_from_this(), f = std::forward<F>(f)]() mutable {
      f(*self);
    });
  }

  void OnTls(error_code ec) {
    if (ec) return Finish(absl::UnavailableError(absl::StrCat("TLS handshake: ", ec.message())));
    DoReadRequest();
  }

  void DoReadRequest() {
    beast::get_lowest_layer(ws_).expires_after(kHandshakeTimeout);
    parser_.emplace();
    parser_->header_limit(16 * 1024);
    parser_->body_limit(core_->options.max_http_body_bytes);
    http::async_read(ws_.next_layer(), buffer_, *parser_,
                     [self = this->shared_from_this()](error_code ec, std::size_t) {
                       self->OnRequest(ec);
                     });
  }

  void OnRequest(error_code ec) {
    if (ec == http::error::body_limit && core_->handler.on_http) {
      return Refuse(413, "request body too large");
    }
    if (ec) return Finish(absl::UnavailableError(absl::StrCat("reading the upgrade request: ", ec.message())));
    request_ = parser_->release();
    parser_.reset();
    if (!websocket::is_upgrade(request_)) {
      if (core_->handler.on_http) return ServeHttp();
      return Refuse(400, "expected a WebSocket upgrade request");
    }
    info_.target = std::string(request_.target());
    if constexpr (kTls) info_.tls_resumed = SSL_session_reused(ws_.next_layer().native_handle()) == 1;
    for (const auto& field : request_) {
      info_.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
    }
    const auto range = request_.equal_range(http::field::sec_websocket_protocol);
    for (auto it = range.first; it != range.second; ++it) {
      const auto value = it->value();
      for (absl::string_view p : absl::StrSplit(absl::string_view(value.data(), value.size()), ',')) {
        p = absl::StripAsciiWhitespace(p);
        if (!p.empty()) info_.requested_subprotocols.emplace_back(p);
      }
    }
    std::string subprotocol;
    if (core_->handler.on_handshake) {
      absl::Status st = core_->handler.on_handshake(info_, &subprotocol);
      if (!st.ok()) return Refuse(HttpStatusFor(st), std::string(st.message()), RetryAfterOf(st));
    }
    beast::get_lowest_layer(ws_).expires_never();
    websocket::stream_base::timeout timeouts{};
    timeouts.handshake_timeout = kHandshakeTimeout;
    timeouts.idle_timeout = websocket::stream_base::none();
    timeouts.keep_alive_pings = false;
    ws_.set_option(timeouts);
    ws_.read_message_max(core_->options.max_message_bytes);
    ws_.set_option(websocket::stream_base::decorator(
        [subprotocol](websocket::response_type& res) {
          res.set(http::field::server, "wsbridge-test-upstream");
          if (!subprotocol.empty()) res.set(http::field::sec_websocket_protocol, subprotocol);
        }));
    ws_.async_accept(request_, [self = this->shared_from_this()](error_code ec) {
      self->OnAccept(ec);
    });
  }

  // A plain HTTP request, answered by on_http; the connection then reads the next
  // request (keep-alive) or closes.
  void ServeHttp() {
    HttpRequest req;
    req.method = std::string(request_.method_string());
    req.target = std::string(request_.target());
    for (const auto& field : request_) {
      req.headers.emplace_back(std::string(field.name_string()), std::string(field.value()));
    }
    req.body = std::move(request_.body());
    HttpResponse answer = core_->handler.on_http(req);
    const bool keep_alive = core_->options.http_keep_alive && request_.keep_alive();
    response_.emplace();
    response_->version(request_.version());
    response_->result(answer.status >= 100 && answer.status <= 999
                          ? static_cast<unsigned>(answer.status) : 500u);
    response_->set(http::field::server, "wsbridge-test-upstream");
    bool has_type = false;
    for (const auto& [name, value] : answer.headers) {
      response_->insert(name, value);
      has_type = has_type || absl::EqualsIgnoreCase(name, "content-type");
    }
    if (!has_type) response_->set(http::field::content_type, "application/json");
    response_->keep_alive(keep_alive);
    response_->body() = std::move(answer.body);
    response_->prepare_payload();
    http::async_write(ws_.next_layer(), *response_,
                      [self = this->shared_from_this(), keep_alive](error_code ec, std::size_t) {
                        if (ec || !keep_alive) return self->Finish(absl::OkStatus());
                        self->DoReadRequest();
                      });
  }

  void Refuse(int status, std::string body, std::string retry_after = {}) {
    response_.emplace();
    if (!retry_after.empty()) response_->set(http::field::retry_after, retry_after);
    response_->result(static_cast<http::status>(status));
    response_->version(request_.version());
    response_->set(http::field::server, "wsbridge-test-upstream");
    response_->set(http::field::content_type, "text/plain");
    response_->keep_alive(false);
    response_->body() = std::move(body);
    response_->prepare_payload();
    http::async_write(ws_.next_layer(), *response_,
                      [self = this->shared_from_this()](error_code, std::size_t) {
                        self->Finish(absl::PermissionDeniedError("upgrade refused"));
                      });
  }

  void OnAccept(error_code ec) {
    if (ec) return Finish(absl::UnavailableError(absl::StrCat("WebSocket accept: ", ec.message())));
    if (finished_) return;
    opened_ = true;
    core_->open.fetch_add(1);
    if (core_->handler.on_open) core_->handler.on_open(handle_);
    if (close_requested_ && !writing_ && !finished_) DoClose();
    DoRead();
  }

  void DoRead() {
    if (finished_) return;
    ws_.async_read(read_buffer_, [self = this->shared_from_this()](error_code ec, std::size_t) {
      self->OnRead(ec);
    });
  }

  void OnRead(error_code ec) {
    if (ec) return OnError(ec);
    if (finished_) return;
    std::string data = beast::buffers_to_string(read_buffer_.data());
    read_buffer_.consume(read_buffer_.size());
    if (core_->handler.on_message) {
      core_->handler.on_message(handle_, data, ws_.got_binary());
    }
    DoRead();
  }

  void DoWrite() {
    writing_ = true;
    ws_.binary(queue_.front().second);
    ws_.async_write(net::buffer(queue_.front().first),
                    [self = this->shared_from_this()](error_code ec, std::size_t) {
                      self->OnWrite(ec);
                    });
  }

  void OnWrite(error_code ec) {
    writing_ = false;
    if (ec) return OnError(ec);
    if (finished_) return;
    queue_.pop_front();
    if (!queue_.empty()) return DoWrite();
    if (drop_after_writes_) return Finish(absl::UnavailableError("connection dropped by the server"));
    if (close_requested_) DoClose();
  }

  void DoClose() {
    if (closing_) return;
    closing_ = true;
    ws_.async_close(close_reason_, [self = this->shared_from_this()](error_code ec) {
      // The pending read normally finishes the session; this covers a close that failed.
      if (ec) self->OnError(ec);
    });
  }

  void OnError(error_code ec) {
    if (ec == websocket::error::closed) {
      handle_->close_code_.store(ws_.reason().code);
      return Finish(absl::OkStatus());
    }
    if (closing_ && ec == net::error::operation_aborted) {
      return Finish(absl::OkStatus());
    }
    Finish(absl::UnavailableError(ec.message()));
  }

  void Finish(absl::Status status) {
    if (finished_) return;
    finished_ = true;
    gate().SetGated(false);
    error_code ignored;
    beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ignored);
    beast::get_lowest_layer(ws_).close();
    queue_.clear();
    if (opened_) {
      core_->open.fetch_sub(1);
      if (core_->handler.on_close) core_->handler.on_close(handle_, status);
    }
    core_->Remove(id_);
  }

  Impl* const core_;
  const std::shared_ptr<std::atomic<bool>> alive_;
  const uint64_t id_;
  const std::shared_ptr<Handle> handle_;
  HandshakeInfo& info_;  // the handle's, filled in during the upgrade
  websocket::stream<Next> ws_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::request<http::string_body> request_;
  std::optional<http::response<http::string_body>> response_;
  beast::flat_buffer read_buffer_;
  std::deque<std::pair<std::string, bool>> queue_;
  websocket::close_reason close_reason_;
  bool opened_ = false;
  bool writing_ = false;
  bool close_requested_ = false;
  bool closing_ = false;
  bool finished_ = false;
  bool drop_after_writes_ = false;
};

}  // namespace wsbridge::upstreams

#endif  // WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_SESSION_H_
