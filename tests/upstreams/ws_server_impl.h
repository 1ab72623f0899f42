// The WebSocket test server's shared state (internal to ws_server*.cc).
#ifndef WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_IMPL_H_
#define WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_IMPL_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core/error.hpp>

#include "tests/upstreams/ws_server.h"

namespace wsbridge::upstreams {


namespace net = boost::asio;
namespace beast = boost::beast;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using beast::error_code;

constexpr auto kHandshakeTimeout = std::chrono::seconds(10);
constexpr auto kStopGrace = std::chrono::seconds(5);

inline constexpr char kRetryAfterPayload[] = "wsbridge.test/retry-after";

struct WsServer::Impl {
  // The actor that owns the stream; lives only inside the io_context.
  class SessionBase {
   public:
    virtual ~SessionBase() = default;
    virtual void Start() = 0;
    virtual void Send(std::string data, bool binary) = 0;
    virtual void Close(uint16_t code, std::string reason) = 0;
    virtual void Drop() = 0;
    virtual void DropAfterWrites() = 0;
    virtual void SetSilent(bool silent) = 0;
  };
  // What handlers get: safe to keep after the session (and the server) are gone, because
  // it refers to the session weakly and never owns the stream.
  class Handle final : public WsServerConnection {
   public:
    Handle(uint64_t id, std::shared_ptr<std::atomic<bool>> alive) : id_(id), alive_(std::move(alive)) {}
    uint64_t id() const override { return id_; }
    const HandshakeInfo& handshake() const override { return info_; }
    uint16_t remote_close_code() const override { return close_code_.load(); }
    void Send(std::string data, bool binary) override {
      if (auto s = Lock()) s->Send(std::move(data), binary);
    }
    void Close(uint16_t code, std::string reason) override {
      if (auto s = Lock()) s->Close(code, std::move(reason));
    }
    void Drop() override {
      if (auto s = Lock()) s->Drop();
    }
    void DropAfterWrites() override {
      if (auto s = Lock()) s->DropAfterWrites();
    }
    void SetSilent(bool silent) override {
      if (auto s = Lock()) s->SetSilent(silent);
    }

    HandshakeInfo info_;  // written once, before any handler sees this handle
    std::atomic<uint16_t> close_code_{0};
    std::weak_ptr<SessionBase> session_;

   private:
    std::shared_ptr<SessionBase> Lock() const {
      if (!alive_->load()) return nullptr;
      return session_.lock();
    }
    const uint64_t id_;
    const std::shared_ptr<std::atomic<bool>> alive_;
  };
  // ws_server_session.cc; over a plain or TLS transport (ws_server_stream.h) as
  // options.tls says.
  class Session;
  static std::shared_ptr<SessionBase> MakeSession(Impl* core, tcp::socket socket, uint64_t id);

  Impl(WsServerOptions o, WsServerHandler h) : options(std::move(o)), handler(std::move(h)) {}

  void DoAccept();
  void OnAccept(error_code ec, tcp::socket socket);
  void Remove(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    sessions.erase(id);
    cv.notify_all();
  }

  const WsServerOptions options;
  const WsServerHandler handler;
  std::optional<ssl::context> ssl_ctx;  // destroyed after ioc (declared before it)
  // Checked by connections before posting, so that a handle kept past Stop() is inert.
  std::shared_ptr<std::atomic<bool>> alive = std::make_shared<std::atomic<bool>>(true);
  net::io_context ioc;
  std::optional<tcp::acceptor> acceptor;
  std::optional<net::steady_timer> accept_retry;
  std::vector<std::thread> threads;
  uint16_t port = 0;
  std::atomic<uint64_t> next_id{1};
  std::atomic<size_t> open{0};
  std::string url_host;
  bool started = false;
  bool stopped = false;  // guarded by mu once started

  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::weak_ptr<SessionBase>> sessions;  // guarded by mu
};

}  // namespace wsbridge::upstreams

#endif  // WSBRIDGE_TESTS_UPSTREAMS_WS_SERVER_IMPL_H_
