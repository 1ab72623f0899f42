// The only daemon translation unit that uses Beast.
#include "daemon/admin_http.h"

#include <chrono>
#include <list>
#include <utility>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/log.h"

namespace wsbridge::daemon {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr size_t kHeaderLimit = 8 * 1024;
constexpr size_t kBodyLimit = 4 * 1024;
// Time allowed to read a request (and to sit idle between keep-alive requests) and to
// write a response.
constexpr std::chrono::seconds kIoTimeout{10};

class Connection;

// State shared by the listener and its connections, so Stop() can reach them.
struct Shared {
  AdminHttpHandlers handlers;
  absl::Mutex mu;
  bool stopped ABSL_GUARDED_BY(mu) = false;
  std::list<std::weak_ptr<Connection>> connections ABSL_GUARDED_BY(mu);
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(tcp::socket socket, std::shared_ptr<Shared> shared)
      : stream_(std::move(socket)), shared_(std::move(shared)) {}

  void Run(std::list<std::weak_ptr<Connection>>::iterator self) {
    self_ = self;
    DoRead();
  }

  // From any thread.
  void Close() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
      self->stream_.close();
    });
  }

  ~Connection() {
    absl::MutexLock lock(&shared_->mu);
    if (registered_) shared_->connections.erase(self_);
  }

  void set_registered() { registered_ = true; }

 private:
  void DoRead() {
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(kBodyLimit);
    stream_.expires_after(kIoTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnRead(ec);
                     });
  }

  void OnRead(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec == asio::error::operation_aborted || ec == asio::error::connection_reset ||
        ec == asio::error::eof) {
      return Shutdown();
    }
    if (ec) {
      // A malformed or oversized request: answer once, then close.
      http::status status = (ec == http::error::header_limit || ec == http::error::body_limit)
                                ? http::status::payload_too_large
                                : http::status::bad_request;
      return Respond(status, absl::StrCat("bad request: ", ec.message(), "\n"), 11, false, {});
    }
    const auto& request = parser_->get();
    const unsigned version = request.version();
    const bool keep_alive = request.keep_alive();
    if (request.method() != http::verb::get) {
      return Respond(http::status::method_not_allowed, "only GET is allowed\n", version,
                     keep_alive, "GET");
    }
    std::string_view target(request.target().data(), request.target().size());
    target = target.substr(0, target.find('?'));
    if (target == "/healthz") {
      return Respond(http::status::ok, "ok\n", version, keep_alive, {});
    }
    if (target == "/readyz") {
      std::string reason;
      if (shared_->handlers.ready(reason)) {
        return Respond(http::status::ok, "ready\n", version, keep_alive, {});
      }
      return Respond(http::status::service_unavailable, absl::StrCat("not ready: ", reason, "\n"),
                     version, keep_alive, {});
    }
    if (target == "/metrics") {
      return Respond(http::status::ok, shared_->handlers.metrics(), version, keep_alive, {},
                     "text/plain; version=0.0.4; charset=utf-8");
    }
    return Respond(http::status::not_found,
                   "not found: try /metrics, /healthz or /readyz\n", version, keep_alive, {});
  }

  void Respond(http::status status, std::string body, unsigned version, bool keep_alive,
               std::string_view allow,
               std::string_view content_type = "text/plain; charset=utf-8") {
    response_ = {};
    response_.result(status);
    response_.version(version);
    response_.set(http::field::server, "wsbridged");
    response_.set(http::field::content_type, content_type);
    response_.set(http::field::cache_control, "no-store");
    if (!allow.empty()) response_.set(http::field::allow, allow);
    response_.body() = std::move(body);
    response_.keep_alive(keep_alive);
    response_.prepare_payload();
    stream_.expires_after(kIoTimeout);
    http::async_write(stream_, response_,
                      [self = shared_from_this(), keep_alive](beast::error_code ec, size_t) {
                        if (ec || !keep_alive) return self->Shutdown();
                        self->DoRead();
                      });
  }

  void Shutdown() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  std::shared_ptr<Shared> shared_;
  beast::flat_buffer buffer_{kHeaderLimit};
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
  std::list<std::weak_ptr<Connection>>::iterator self_;
  bool registered_ = false;
};

class Listener final : public AdminHttpServer, public std::enable_shared_from_this<Listener> {
 public:
  Listener(asio::any_io_executor executor, std::shared_ptr<Shared> shared)
      : executor_(executor), acceptor_(asio::make_strand(executor)), shared_(std::move(shared)) {}

  absl::Status Bind(const std::string& listen) {
    size_t colon = listen.rfind(':');
    uint32_t port = 0;
    if (colon == std::string_view::npos || !absl::SimpleAtoi(absl::string_view(listen.data() + colon + 1, listen.size() - colon - 1), &port) ||
        port > 65535) {
      return absl::InvalidArgumentError(absl::StrCat(
          "admin.listen: \"", listen, "\" is not host:port (e.g. \"127.0.0.1:9090\")"));
    }
    std::string host(listen.substr(0, colon));
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    beast::error_code ec;
    auto address = asio::ip::make_address(host.empty() ? "0.0.0.0" : host, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat(
          "admin.listen: \"", host, "\" is not an IP address (use e.g. 127.0.0.1 or 0.0.0.0)"));
    }
    tcp::endpoint endpoint(address, static_cast<uint16_t>(port));
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("admin.listen: cannot listen on ", listen, ": ", ec.message()));
    }
    local_ = acceptor_.local_endpoint(ec);
    return absl::OkStatus();
  }

  void Accept() {
    acceptor_.async_accept(asio::make_strand(executor_),
                           [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
                             self->OnAccept(ec, std::move(socket));
                           });
  }

  uint16_t port() const override { return local_.port(); }
  std::string address() const override {
    if (local_.address().is_v6()) {
      return absl::StrCat("[", local_.address().to_string(), "]:", local_.port());
    }
    return absl::StrCat(local_.address().to_string(), ":", local_.port());
  }

  void Stop() override {
    std::vector<std::shared_ptr<Connection>> open;
    {
      absl::MutexLock lock(&shared_->mu);
      if (shared_->stopped) return;
      shared_->stopped = true;
      for (auto& weak : shared_->connections) {
        if (auto connection = weak.lock()) open.push_back(std::move(connection));
      }
    }
    asio::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->acceptor_.close(ignored);
    });
    for (auto& connection : open) connection->Close();
  }

 private:
  void OnAccept(beast::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (!ec) {
      beast::error_code ignored;
      socket.set_option(tcp::no_delay(true), ignored);
      auto connection = std::make_shared<Connection>(std::move(socket), shared_);
      std::list<std::weak_ptr<Connection>>::iterator it;
      {
        absl::MutexLock lock(&shared_->mu);
        if (shared_->stopped) return;
        it = shared_->connections.insert(shared_->connections.end(), connection);
        connection->set_registered();
      }
      connection->Run(it);
    } else {
      log::Warn("admin", "accept failed", {{"error", ec.message()}});
    }
    Accept();
  }

  asio::any_io_executor executor_;
  tcp::acceptor acceptor_;
  std::shared_ptr<Shared> shared_;
  tcp::endpoint local_;
};

// Owns the listener; the listener itself is shared with its pending accept.
class Handle final : public AdminHttpServer {
 public:
  explicit Handle(std::shared_ptr<Listener> listener) : listener_(std::move(listener)) {}
  ~Handle() override { listener_->Stop(); }
  uint16_t port() const override { return listener_->port(); }
  std::string address() const override { return listener_->address(); }
  void Stop() override { listener_->Stop(); }

 private:
  std::shared_ptr<Listener> listener_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AdminHttpServer>> StartAdminHttpServer(
    boost::asio::any_io_executor executor, std::string_view listen, AdminHttpHandlers handlers) {
  auto shared = std::make_shared<Shared>();
  shared->handlers = std::move(handlers);
  auto listener = std::make_shared<Listener>(executor, shared);
  if (absl::Status status = listener->Bind(std::string(listen)); !status.ok()) return status;
  listener->Accept();
  return std::make_unique<Handle>(std::move(listener));
}

}  // namespace wsbridge::daemon
