#include "tests/upstreams/ws_server.h"

#include <openssl/ssl.h>

#include <boost/asio/post.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "tests/upstreams/ws_server_impl.h"

namespace wsbridge::upstreams {

absl::Status WithRetryAfter(absl::Status refusal, int seconds) {
  refusal.SetPayload(kRetryAfterPayload, absl::Cord(std::to_string(seconds)));
  return refusal;
}

std::string HttpRequest::Header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (absl::EqualsIgnoreCase(k, absl::string_view(name.data(), name.size()))) return v;
  }
  return "";
}

std::string HandshakeInfo::Header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (absl::EqualsIgnoreCase(k, absl::string_view(name.data(), name.size()))) return v;
  }
  return "";
}

void WsServer::Impl::DoAccept() {
  acceptor->async_accept(net::make_strand(ioc), [this](error_code ec, tcp::socket socket) {
    OnAccept(ec, std::move(socket));
  });
}

void WsServer::Impl::OnAccept(error_code ec, tcp::socket socket) {
  if (!acceptor->is_open() || ec == net::error::operation_aborted) return;
  if (ec) {
    // Out of descriptors and the like: try again shortly instead of spinning.
    accept_retry->expires_after(std::chrono::milliseconds(50));
    accept_retry->async_wait([this](error_code wec) {
      if (!wec && acceptor->is_open()) DoAccept();
    });
    return;
  }
  error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);
  std::shared_ptr<SessionBase> session;
  const uint64_t id = next_id.fetch_add(1);
  {
    // Under the lock so that Stop() either sees this session or refuses it here.
    std::lock_guard<std::mutex> lock(mu);
    if (stopped) return;
    session = MakeSession(this, std::move(socket), id);
    sessions.emplace(id, session);
  }
  session->Start();
  DoAccept();
}

WsServer::WsServer(WsServerOptions options, WsServerHandler handler)
    : impl_(std::make_shared<Impl>(std::move(options), std::move(handler))) {}

WsServer::~WsServer() { Stop(); }

absl::Status WsServer::Start() {
  Impl& m = *impl_;
  if (m.started) return absl::FailedPreconditionError("WsServer already started");
  const std::string& listen = m.options.listen;
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen address \"", listen, "\" must be host:port, e.g. 127.0.0.1:0"));
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";
  int port = 0;
  if (!absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("listen address \"", listen, "\" has a bad port"));
  }
  error_code ec;
  const net::ip::address address = net::ip::make_address(host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen host \"", host, "\" is not an IP address (use 127.0.0.1 or ::1)"));
  }
  if (!address.is_loopback()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "refusing to listen on non-loopback address ", host, ": test upstreams are loopback only"));
  }
  if (m.options.threads < 1) return absl::InvalidArgumentError("threads must be >= 1");

  if (m.options.tls) {
    if (m.options.cert_pem.empty() || m.options.key_pem.empty()) {
      return absl::InvalidArgumentError("tls needs cert_pem and key_pem");
    }
    m.ssl_ctx.emplace(ssl::context::tls_server);
    SSL_CTX* native = m.ssl_ctx->native_handle();
    if (m.options.tls_max_version != 0 && m.options.tls_max_version < TLS1_2_VERSION) {
      // TLS 1.0/1.1 sign with SHA-1/MD5, which security levels above 0 refuse.
      SSL_CTX_set_security_level(native, 0);
      SSL_CTX_set_min_proto_version(native, TLS1_VERSION);
    } else {
      SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION);
    }
    if (m.options.tls_max_version != 0 &&
        SSL_CTX_set_max_proto_version(native, m.options.tls_max_version) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("tls_max_version: unknown TLS version 0x", absl::Hex(m.options.tls_max_version)));
    }
    m.ssl_ctx->set_options(ssl::context::default_workarounds | ssl::context::single_dh_use);
    m.ssl_ctx->use_certificate_chain(net::buffer(m.options.cert_pem), ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("server certificate: ", ec.message()));
    m.ssl_ctx->use_private_key(net::buffer(m.options.key_pem), ssl::context::pem, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("server key: ", ec.message()));
    if (!m.options.client_ca_pem.empty()) {
      m.ssl_ctx->add_certificate_authority(net::buffer(m.options.client_ca_pem), ec);
      if (ec) return absl::InvalidArgumentError(absl::StrCat("client CA: ", ec.message()));
      m.ssl_ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
      // OpenSSL resumes no session of a server that verifies clients unless it has a
      // session id context (the sessions it issued are bound to it).
      static constexpr unsigned char kSessionContext[] = "wsbridge-test-upstream";
      SSL_CTX_set_session_id_context(native, kSessionContext, sizeof kSessionContext - 1);
    }
  }

  m.acceptor.emplace(net::make_strand(m.ioc));
  m.accept_retry.emplace(m.acceptor->get_executor());
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(port));
  m.acceptor->open(endpoint.protocol(), ec);
  if (!ec) m.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) m.acceptor->bind(endpoint, ec);
  if (!ec) m.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    m.acceptor.reset();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen, ": ", ec.message()));
  }
  m.port = m.acceptor->local_endpoint().port();
  m.url_host = address.is_v6() ? absl::StrCat("[", address.to_string(), "]") : address.to_string();
  m.started = true;
  m.DoAccept();
  for (int i = 0; i < m.options.threads; ++i) {
    m.threads.emplace_back([&m] { m.ioc.run(); });
  }
  return absl::OkStatus();
}

void WsServer::Stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopped) return;
    m.stopped = true;
  }
  net::post(m.acceptor->get_executor(), [&m] {
    error_code ignored;
    m.acceptor->close(ignored);
    m.accept_retry->cancel();
  });
  std::vector<std::shared_ptr<Impl::SessionBase>> live;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    for (auto& [id, weak] : m.sessions) {
      if (auto s = weak.lock()) live.push_back(std::move(s));
    }
  }
  for (auto& s : live) s->Drop();
  live.clear();
  {
    std::unique_lock<std::mutex> lock(m.mu);
    m.cv.wait_for(lock, kStopGrace, [&m] { return m.sessions.empty(); });
  }
  m.alive->store(false);
  m.ioc.stop();
  for (auto& t : m.threads) t.join();
  m.threads.clear();
  // The posted close may not have run before stop(); no thread runs now, so close here.
  error_code ignored;
  m.acceptor->close(ignored);
}

uint16_t WsServer::port() const { return impl_->port; }

std::string WsServer::url() const {
  return absl::StrCat(impl_->options.tls ? "wss" : "ws", "://", impl_->url_host, ":", impl_->port);
}

size_t WsServer::open_connections() const { return impl_->open.load(); }

}  // namespace wsbridge::upstreams
