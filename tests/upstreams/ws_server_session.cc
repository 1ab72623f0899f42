// One WebSocket (or plain HTTP) connection of the test server, over either transport
// (ws_server_stream.h): the WebSocket and HTTP code is compiled once, here.
#include <deque>
#include <optional>

#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/upstreams/ws_server_impl.h"
#include "tests/upstreams/ws_server_stream.h"

namespace wsbridge::upstreams {

namespace http = beast::http;
namespace websocket = beast::websocket;

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

class WsServer::Impl::Session : public WsServer::Impl::SessionBase,
                                public std::enable_shared_from_this<Session> {

 public:
  Session(Impl* core, tcp::socket socket, uint64_t id)
      : core_(core),
        alive_(core->alive),
        id_(id),
        handle_(std::make_shared<Handle>(id, core->alive)),
        info_(handle_->info_),
        ws_(MakeTransport(core, std::move(socket))) {}

  // Called right after construction (shared_from_this needs a live shared_ptr).
  void Attach() { handle_->session_ = this->weak_from_this(); }

  void Start() override {
    net::dispatch(strand(), [self = this->shared_from_this()] {
      self->tcp().expires_after(kHandshakeTimeout);
      self->ws_.next_layer().transport().Handshake(
          OnStrand<void(error_code)>(self->strand(), [self](error_code ec) { self->OnHandshake(ec); }));
    });
  }

  void Send(std::string data, bool binary) override {
    Post([data = std::move(data), binary](Session& s) mutable {
      if (s.finished_ || s.close_requested_ || !s.opened_) return;
      if (s.core_->options.coalesce_writes && !s.writing_ && s.queue_.empty() && s.ws_.is_open() &&
          s.AppendFrame(data, binary)) {
        return;
      }
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
        s.DropOnceFlushed();
      }
    });
  }

  void SetSilent(bool silent) override {
    Post([silent](Session& s) {
      if (s.finished_) return;
      s.ws_.next_layer().transport().SetGated(silent);
    });
  }

 private:
  static std::unique_ptr<Transport> MakeTransport(Impl* core, tcp::socket socket) {
    std::unique_ptr<Transport> t = core->options.tls
                                       ? MakeTlsTransport(std::move(socket), *core->ssl_ctx)
                                       : MakePlainTransport(std::move(socket));
    if (core->options.coalesce_writes) t = MakeCoalescingTransport(std::move(t));
    return t;
  }

  net::any_io_executor strand() { return ws_.get_executor(); }
  beast::tcp_stream& tcp() { return ws_.next_layer().transport().tcp(); }

  template <class F>
  void Post(F&& f) {
    if (!alive_->load()) return;
    net::post(strand(), [self = this->shared_from_this(), f = std::forward<F>(f)]() mutable {
      f(*self);
    });
  }

  // Only a TLS handshake can fail: a plain transport completes it at once.
  void OnHandshake(error_code ec) {
    if (ec) return Finish(absl::UnavailableError(absl::StrCat("TLS handshake: ", ec.message())));
    DoReadRequest();
  }

  void DoReadRequest() {
    tcp().expires_after(kHandshakeTimeout);
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
    info_.tls_resumed = ws_.next_layer().transport().Resumed();
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
    tcp().expires_never();
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

  // A whole unmasked frame (RFC 6455 5.2) straight into a coalescing transport's buffer:
  // the WebSocket layer's own write costs more per frame than the bridge under test
  // spends on it. Only between the WebSocket layer's messages (see Send).
  bool AppendFrame(std::string_view data, bool binary) {
    char head[10];
    std::size_t n = 0;
    head[n++] = static_cast<char>(0x80 | (binary ? 0x2 : 0x1));  // FIN, one frame
    const uint64_t size = data.size();
    if (size < 126) {
      head[n++] = static_cast<char>(size);
    } else if (size <= 0xffff) {
      head[n++] = 126;
      head[n++] = static_cast<char>(size >> 8);
      head[n++] = static_cast<char>(size & 0xff);
    } else {
      head[n++] = 127;
      for (int shift = 56; shift >= 0; shift -= 8) head[n++] = static_cast<char>((size >> shift) & 0xff);
    }
    return ws_.next_layer().transport().Append(std::string_view(head, n), data);
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
    if (drop_after_writes_) return DropOnceFlushed();
    if (close_requested_) DoClose();
  }

  // What was written may still be in the transport's buffer (coalesce_writes).
  void DropOnceFlushed() {
    ws_.next_layer().transport().Flush(OnStrand<void(error_code)>(
        strand(), [self = this->shared_from_this()](error_code) {
          self->Finish(absl::UnavailableError("connection dropped by the server"));
        }));
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
    ws_.next_layer().transport().SetGated(false);
    error_code ignored;
    tcp().socket().shutdown(tcp::socket::shutdown_both, ignored);
    tcp().close();
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
  websocket::stream<ServerStream> ws_;
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

std::shared_ptr<WsServer::Impl::SessionBase> WsServer::Impl::MakeSession(Impl* core,
                                                                         tcp::socket socket,
                                                                         uint64_t id) {
  auto s = std::make_shared<Session>(core, std::move(socket), id);
  s->Attach();
  return s;
}

}  // namespace wsbridge::upstreams
