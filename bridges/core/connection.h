// One upstream WebSocket connection (ws:// or wss://) that every bridge drives.
//
// It is an actor: everything runs on the strand it is given, which it shares with the
// protocol session that owns it, so the session calls Send()/MarkReady() synchronously
// from its own handlers. It connects (TCP, TLS, WebSocket handshake, each under a
// timeout), keeps the connection alive (WebSocket pings with a pong deadline plus a
// protocol heartbeat hook), writes from a bounded queue with one write in flight, and
// reconnects with capped exponential backoff and full jitter until Close(). A refused
// credential (HTTP 401/403, an auth close code, or Reconnect(..., kAuthRefused)) retries
// under the slower auth_backoff; "slow down" (429, 503 + Retry-After, close 1013) waits at
// least slow_down_delay and the upstream's Retry-After.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/strand.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/backoff.h"

namespace wsbridge::core {

enum class ConnectionState : int {
  kIdle = 0,        // created, not started
  kConnecting,      // TCP/TLS/WebSocket handshake in progress
  kAuthenticating,  // socket open, protocol login in progress
  kReady,           // usable
  kBackingOff,      // waiting before the next attempt
  kClosed,          // closed for good
};
std::string_view ToString(ConnectionState s);

// What ended a connection attempt or an open connection; decides the retry policy.
enum class DisconnectKind {
  kError,         // network error, timeout, protocol error, refused upgrade with another status
  kClosedByPeer,  // the upstream sent a close frame with a code not classified below
  kAuthRefused,   // upgrade refused 401/403, or a close code that means "credentials refused"
  kSlowDown,      // upgrade refused 429 (or 503 with Retry-After), or close 1013 "try again later"
  kClosedByUs,    // Close() was called
};
std::string_view ToString(DisconnectKind k);

// Why a connection attempt or an open connection ended. Handed to the handler.
struct DisconnectInfo {
  absl::Status reason;  // readable, credentials redacted
  DisconnectKind kind = DisconnectKind::kError;
  int http_status = 0;       // status of a refused WebSocket upgrade (e.g. 401); 0 otherwise
  std::string http_body;     // its body: first 200 bytes, trimmed, credentials redacted
  uint16_t close_code = 0;   // code of the upstream's close frame; 0 when none came (a close
                             // frame without a code reports 1005, as RFC 6455 7.1.5 says)
  std::string close_reason;  // the upstream's close reason text (credentials redacted)
  Duration retry_after{0};   // from a refused upgrade's Retry-After header (seconds form); 0 = none
  bool was_open = false;     // the WebSocket had opened before it ended
};

// Default classification: 401/403 upgrade or close codes 1008, 4001, 4003, 4401, 4403
// -> kAuthRefused; 429 upgrade, 503 upgrade with Retry-After, close 1013 or 4429 -> kSlowDown;
// any other close frame -> kClosedByPeer; else kError.
DisconnectKind ClassifyDisconnect(int http_status, uint16_t close_code, bool has_retry_after);

struct TlsOptions {
  bool verify_peer = true;
  std::string ca_file;      // PEM bundle; empty = system default trust store
  std::string server_name;  // SNI + hostname check; empty = URL host
  std::string cert_file;    // optional client certificate (PEM)
  std::string key_file;
};

struct KeepaliveOptions {
  // WebSocket ping cadence; zero disables pings.
  Duration ping_interval = std::chrono::seconds(20);
  // Dead peer: nothing at all received for this long after a ping was sent.
  Duration pong_timeout = std::chrono::seconds(10);
  // Cadence of ConnectionHandler::OnHeartbeat while ready; zero disables it.
  Duration heartbeat_interval = Duration::zero();
};

// What one connection attempt uses. Produced by the handler before every attempt, so
// credentials (query parameters, headers) are re-read each time.
struct HandshakeRequest {
  std::string url;  // ws://host[:port]/path?query  or  wss://...
  std::vector<std::pair<std::string, std::string>> headers;
  std::vector<std::string> subprotocols;
};

struct ConnectionOptions {
  std::string name;  // for logs, e.g. "dfx/default"
  bool allow_plaintext = false;
  TlsOptions tls;
  Duration connect_timeout = std::chrono::seconds(10);
  Duration handshake_timeout = std::chrono::seconds(10);  // TLS and WS, each
  Duration close_timeout = std::chrono::seconds(5);
  size_t max_message_bytes = 1 << 20;
  size_t send_queue_max_messages = 1024;
  size_t send_queue_max_bytes = 16u << 20;
  KeepaliveOptions keepalive;
  BackoffPolicy backoff;
  // Used instead of `backoff` after kAuthRefused: a bad credential never makes a hot
  // loop, yet the connection keeps retrying on its own (PrepareHandshake runs again, so
  // a fixed secret is picked up). Its reset_after is not used: a healthy period of
  // backoff.reset_after resets both policies.
  BackoffPolicy auth_backoff = {std::chrono::seconds(5), std::chrono::minutes(5), 2.0};
  // After kSlowDown the next attempt waits max(backoff delay, slow_down_delay, Retry-After).
  Duration slow_down_delay = std::chrono::seconds(30);
  // The longest Retry-After honoured: a buggy or hostile upstream cannot park the
  // connection for days.
  Duration max_retry_after = std::chrono::minutes(10);
  bool reconnect = true;
};

// Counters readable from any thread (admin, metrics).
struct ConnectionStats {
  std::atomic<uint64_t> frames_in{0};
  std::atomic<uint64_t> frames_out{0};
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  std::atomic<uint64_t> reconnects{0};  // successful opens after the first
  std::atomic<uint64_t> attempts{0};    // connection attempts started
  // Unix ms when the connection last became ready; 0 when not ready.
  std::atomic<int64_t> ready_since_unix_ms{0};
  // Delay of the currently scheduled attempt in ms (rounded up, at least 1); 0 when none
  // is scheduled.
  std::atomic<int64_t> retry_delay_ms{0};
  // Disconnects classified kAuthRefused (refused upgrades, close codes, Reconnect calls).
  std::atomic<uint64_t> auth_refusals{0};
};

// Implemented by the protocol session. Every callback runs on the connection's strand.
class ConnectionHandler {
 public:
  virtual ~ConnectionHandler() = default;
  // Before each attempt: build the URL, headers and subprotocols (re-reading secrets).
  // An error fails the attempt (and backs off) without touching the network.
  virtual absl::StatusOr<HandshakeRequest> PrepareHandshake() = 0;
  // The WebSocket handshake completed. The handler now either logs in (call
  // Connection::MarkAuthenticating, send, later MarkReady) or calls MarkReady at once.
  virtual void OnOpen(std::string_view negotiated_subprotocol) = 0;
  virtual void OnMessage(std::string_view payload, bool binary) = 0;
  // The connection closed or an attempt failed. `will_retry`: a reconnect is scheduled
  // (stats().retry_delay_ms holds its delay).
  virtual void OnDisconnected(const DisconnectInfo& info, bool will_retry) = 0;
  // Decides info.kind for an upgrade refusal, a close frame from the upstream or a lost
  // connection (not for Close() or Reconnect(), whose kind is given). Called with kind
  // still unset; protocols override it for their own close codes.
  virtual DisconnectKind Classify(const DisconnectInfo& info) {
    return ClassifyDisconnect(info.http_status, info.close_code, info.retry_after > Duration::zero());
  }
  // Protocol-level heartbeat cadence (KeepaliveOptions::heartbeat_interval) while ready.
  virtual void OnHeartbeat() {}
  // The send queue fell to half its limit after a Send() was refused.
  virtual void OnWritable() {}
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Strand = boost::asio::strand<boost::asio::any_io_executor>;

  // `handler` is held weakly; the connection stops calling it once it is gone.
  static std::shared_ptr<Connection> Create(Strand strand, ConnectionOptions options,
                                            std::weak_ptr<ConnectionHandler> handler);
  // With options shared by many connections (every session of a bridge holds the same
  // ones: one copy instead of one per connection); `name` is this one's, for logs.
  static std::shared_ptr<Connection> Create(Strand strand,
                                            std::shared_ptr<const ConnectionOptions> options,
                                            std::string name, std::weak_ptr<ConnectionHandler> handler);
  virtual ~Connection() = default;

  // --- Strand only. ---
  virtual void Start() = 0;
  // Queues one message. OK, or RESOURCE_EXHAUSTED when the queue is full (back-pressure;
  // OnWritable follows), or FAILED_PRECONDITION when the socket is not open.
  virtual absl::Status Send(std::string payload, bool binary) = 0;
  virtual void MarkAuthenticating() = 0;
  // Marks the connection usable; starts the healthy-period timer that resets backoff.
  virtual void MarkReady() = 0;
  // Drops the current socket (no close handshake wait) and reconnects after backoff.
  // Used for protocol errors and rejected logins: a session whose login was refused
  // passes kAuthRefused (auth_backoff applies), kSlowDown for "too many requests".
  virtual void Reconnect(const absl::Status& reason, DisconnectKind kind = DisconnectKind::kError) = 0;
  // Orderly close with `code` (1000 normal, 1001 going away); no reconnect afterwards.
  virtual void Close(uint16_t code, std::string_view reason) = 0;
  // Flow control towards the upstream: stop/restart reading frames.
  virtual void PauseReads() = 0;
  virtual void ResumeReads() = 0;
  virtual size_t queued_messages() const = 0;

  // --- Any thread. ---
  virtual ConnectionState state() const = 0;
  virtual const ConnectionStats& stats() const = 0;
  // Shared options: their `name` is not this connection's (see name()).
  virtual const ConnectionOptions& options() const = 0;
  virtual const std::string& name() const = 0;
  // Last failure reason ("" when none); thread-safe copy.
  virtual std::string last_error() const = 0;
  // Current attempt's URL with credential query values redacted.
  virtual std::string target() const = 0;
  virtual const Strand& strand() const = 0;
};

}  // namespace wsbridge::core
