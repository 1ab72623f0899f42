#include "bench/ws_client.h"

#include <optional>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"

namespace wsbridge::bench {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

template <typename Stream>
class Impl : public WsClient {
 public:
  template <typename... Args>
  explicit Impl(std::shared_ptr<void> keep, Args&&... args)
      : keep_(std::move(keep)), ws_(std::forward<Args>(args)...) {}

  websocket::stream<Stream>& ws() { return ws_; }

  absl::Status Write(std::string_view data) override {
    beast::error_code ec;
    ws_.binary(true);
    ws_.write(asio::buffer(data.data(), data.size()), ec);
    if (ec) return absl::UnavailableError(absl::StrCat("ws write: ", ec.message()));
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Read() override {
    beast::error_code ec;
    buffer_.clear();
    ws_.read(buffer_, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("ws read: ", ec.message()));
    return beast::buffers_to_string(buffer_.data());
  }

 private:
  std::shared_ptr<void> keep_;  // the TLS context, which must outlive the stream
  websocket::stream<Stream> ws_;
  beast::flat_buffer buffer_;
};

template <typename Ws>
absl::Status Handshake(Ws& ws, const std::string& host) {
  beast::error_code ec;
  ws.set_option(websocket::stream_base::decorator([](websocket::request_type& req) {
    req.set(beast::http::field::sec_websocket_protocol, "json");
  }));
  ws.handshake(host, "/", ec);
  if (ec) return absl::UnavailableError(absl::StrCat("ws handshake: ", ec.message()));
  ws.read_message_max(64u << 20);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<WsClient>> WsClient::Connect(const std::string& url,
                                                            const std::string& ca_file) {
  auto u = ParseWsUrl(url);
  if (!u.ok()) return u.status();
  // Blocking calls never run the io_context; one shared (never destroyed) one suffices.
  static asio::io_context& ioc = *new asio::io_context;
  tcp::resolver resolver(ioc);
  beast::error_code ec;
  auto endpoints = resolver.resolve(u->host, u->port, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("resolve: ", ec.message()));
  if (!u->tls) {
    auto c = std::make_unique<Impl<tcp::socket>>(nullptr, ioc);
    asio::connect(c->ws().next_layer(), endpoints, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("connect: ", ec.message()));
    c->ws().next_layer().set_option(tcp::no_delay(true));
    if (auto st = Handshake(c->ws(), u->host); !st.ok()) return st;
    return std::unique_ptr<WsClient>(std::move(c));
  }
  auto ctx = std::make_shared<asio::ssl::context>(asio::ssl::context::tls_client);
  ctx->set_verify_mode(asio::ssl::verify_peer);
  if (!ca_file.empty()) {
    ctx->load_verify_file(ca_file, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("ca file: ", ec.message()));
  }
  auto c = std::make_unique<Impl<beast::ssl_stream<tcp::socket>>>(ctx, ioc, *ctx);
  auto& tcp_sock = beast::get_lowest_layer(c->ws());
  asio::connect(tcp_sock, endpoints, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("connect: ", ec.message()));
  tcp_sock.set_option(tcp::no_delay(true));
  c->ws().next_layer().set_verify_callback(asio::ssl::host_name_verification(u->host));
  c->ws().next_layer().handshake(asio::ssl::stream_base::client, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("tls handshake: ", ec.message()));
  if (auto st = Handshake(c->ws(), u->host); !st.ok()) return st;
  return std::unique_ptr<WsClient>(std::move(c));
}

absl::StatusOr<std::string> WsClient::RoundTrip(std::string_view frame) {
  if (auto st = Write(frame); !st.ok()) return st;
  std::string_view rid = frame.substr(4, 10);
  while (true) {
    auto r = Read();
    if (!r.ok()) return r;
    if (std::string_view(*r).substr(0, 10) == rid) return r;
  }
}

}  // namespace wsbridge::bench
