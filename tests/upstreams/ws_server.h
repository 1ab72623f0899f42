// A small WebSocket server (ws:// and wss://, loopback only) that test upstreams and
// emulators are built on. It owns its io threads; every connection is an actor on its
// own strand. Handler callbacks run on io threads (concurrently for different
// connections, serialized per connection), so handlers must synchronize shared state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace wsbridge::upstreams {

struct HandshakeInfo {
  std::string target;  // path?query, as sent by the client
  std::vector<std::pair<std::string, std::string>> headers;
  std::vector<std::string> requested_subprotocols;
  // The TLS handshake resumed an earlier session instead of a full handshake (wss only).
  bool tls_resumed = false;

  // First header value with this name (case-insensitive), or "" when absent.
  std::string Header(std::string_view name) const;
};

// A plain HTTP request (not a WebSocket upgrade), for WsServerHandler::on_http.
struct HttpRequest {
  std::string method;  // e.g. "POST"
  std::string target;  // path?query
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;

  // First header value with this name (case-insensitive), or "" when absent.
  std::string Header(std::string_view name) const;
};

// The answer to an HttpRequest. The server sets Content-Length, Server and, unless
// given, Content-Type: application/json.
struct HttpResponse {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
};

struct WsServerOptions {
  std::string listen = "127.0.0.1:0";  // host:port; host must be a loopback address
  bool tls = false;
  std::string cert_pem, key_pem;  // server certificate chain and key (PEM text) when tls
  // When set (PEM CA certificates), TLS clients must present a certificate it signed.
  std::string client_ca_pem;
  // The newest TLS version offered, as OpenSSL numbers it (TLS1_1_VERSION = 0x0302); 0 =
  // no cap (TLS 1.2 and 1.3). A cap below 1.2 also enables TLS 1.0 and 1.1 (OpenSSL's
  // security level 0), so the server offers only those: an outdated upstream.
  int tls_max_version = 0;
  size_t max_message_bytes = 16u << 20;
  // Largest body of a plain HTTP request (on_http); larger ones are answered 413 and
  // the connection is closed.
  size_t max_http_body_bytes = 64u << 10;
  // Whether a plain HTTP connection may carry further requests (HTTP/1.1 keep-alive,
  // unless the client says "Connection: close"). Off: every answer closes it.
  bool http_keep_alive = true;
  int threads = 1;
  // Buffer each connection's writes; one write to the socket at a time carries all that
  // is buffered (while one is in flight, later frames wait and then leave together), as a
  // busy production server's writes do, and Send() frames its messages itself instead of
  // through the WebSocket layer. For load generators: one socket write per frame costs a
  // sender more than the bridge under test spends per frame. Off: one socket write per
  // frame, each done when the socket took it.
  bool coalesce_writes = false;
};

// All methods are thread-safe (they post to the connection's strand) and may be called
// after the connection closed (then they do nothing). Do not use after the WsServer that
// created it is destroyed.
class WsServerConnection {
 public:
  virtual ~WsServerConnection() = default;
  virtual uint64_t id() const = 0;
  virtual const HandshakeInfo& handshake() const = 0;
  virtual void Send(std::string data, bool binary) = 0;
  // Close handshake; queued messages are written first.
  virtual void Close(uint16_t code, std::string reason) = 0;
  // Abrupt: closes the TCP socket, no close frame.
  virtual void Drop() = 0;
  // Like Drop(), once the messages already queued by Send() were written (a server that
  // dies right after flushing what it sent).
  virtual void DropAfterWrites() = 0;
  // Stop reading (so pings go unanswered and the peer's writes back up) and stop sending;
  // SetSilent(false) resumes both.
  virtual void SetSilent(bool silent) = 0;
  // Close code the peer sent in its close frame; 0 until one arrived. Any thread.
  virtual uint16_t remote_close_code() const = 0;
};

// Marks an on_handshake refusal so the response carries "Retry-After: <seconds>" (kept as
// a payload of the status, so on_handshake's signature stays as it is).
absl::Status WithRetryAfter(absl::Status refusal, int seconds);

struct WsServerHandler {
  // Return an error to refuse the upgrade (HTTP status by code: UNAUTHENTICATED->401,
  // PERMISSION_DENIED->403, RESOURCE_EXHAUSTED->429, UNAVAILABLE->503, else 400; the
  // status message is the response body; see WithRetryAfter); set *subprotocol to the
  // accepted one (or leave it empty). Unset: accept everything and select no subprotocol.
  std::function<absl::Status(const HandshakeInfo&, std::string* subprotocol)> on_handshake;
  std::function<void(const std::shared_ptr<WsServerConnection>&)> on_open;
  std::function<void(const std::shared_ptr<WsServerConnection>&, std::string_view data, bool binary)>
      on_message;
  // Once per opened connection. OK after a clean close handshake (see
  // remote_close_code()); otherwise the error that ended the connection.
  std::function<void(const std::shared_ptr<WsServerConnection>&, const absl::Status&)> on_close;
  // Requests that are not WebSocket upgrades (e.g. a REST login on the same port as the
  // socket), on an io thread. Unset: they are refused with 400.
  std::function<HttpResponse(const HttpRequest&)> on_http;
};

class WsServer {
 public:
  WsServer(WsServerOptions options, WsServerHandler handler);
  ~WsServer();  // Stop()s
  WsServer(const WsServer&) = delete;
  WsServer& operator=(const WsServer&) = delete;

  // Binds, listens and starts the io threads. INVALID_ARGUMENT for a non-loopback or
  // malformed listen address or bad TLS material; UNAVAILABLE when binding fails.
  absl::Status Start();
  // Closes the listener and every connection, then joins the io threads. Idempotent.
  void Stop();

  uint16_t port() const;
  std::string url() const;  // ws://127.0.0.1:PORT or wss://127.0.0.1:PORT
  size_t open_connections() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::upstreams
