// An in-process Emogg WebSocket API for tests and the demo: the EmoggProtocol state
// machine served over ws:// or wss:// on loopback (text frames, no subprotocol, any
// path: the real one is /ws/v1), with fault switches and observations. Thread-safe.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_EMOGG_EMULATOR_H_
#define WSBRIDGE_TESTS_UPSTREAMS_EMOGG_EMULATOR_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tests/upstreams/emogg_protocol.h"

namespace wsbridge::emulator {

struct EmoggEmulatorOptions {
  std::string listen = "127.0.0.1:0";
  bool tls = false;
  std::string cert_pem, key_pem;  // wss when tls
  // The protocol's rules (tokens, idle and auth timeouts, rate limit, subscription
  // limits, event interval, timestamp form). id_seed 0 = drawn at random (the default
  // fixed seed keeps tests reproducible).
  EmoggProtocolOptions protocol;
};

class EmoggEmulator {
 public:
  explicit EmoggEmulator(EmoggEmulatorOptions options);
  ~EmoggEmulator();  // Stop()s
  EmoggEmulator(const EmoggEmulator&) = delete;
  EmoggEmulator& operator=(const EmoggEmulator&) = delete;

  // INVALID_ARGUMENT for a non-loopback listen address or bad TLS material.
  absl::Status Start();
  // ws://127.0.0.1:PORT/ws/v1 or wss://...: the path Emogg serves (any path is accepted).
  std::string url() const;
  uint16_t port() const;
  void Stop();  // idempotent

  // --- Test controls. ---
  // One event now on every subscription of (channel, key); key "" = every key.
  void EmitNow(std::string_view channel, std::string_view key = "");
  void SetWorkerState(std::string_view session_id, std::string_view state);
  // A raw text frame to every authenticated connection (malformed events, events of
  // unknown subscriptions).
  void SendRaw(std::string text);
  // Drops every connection (no close frame).
  void DropAll();
  // Closes every open connection with a close frame of `code` (1001, 1008, 1011...).
  void CloseAll(uint16_t code, std::string reason);
  // The token stops being accepted; connections authenticated with it are answered 401
  // and closed 1008 "Unauthorized" at once.
  void RevokeToken(std::string token);

  // --- Fault switches (take effect for new frames). ---
  void SetDropAfterFrames(int n);  // drop on a connection's n-th frame; -1 = off
  void SetRefuseAuth(bool refuse);  // every auth:token answered 401 (and closed)
  // Every successful auth is answered, then the connection closed with `code` (0 = off).
  void SetCloseAfterAuth(uint16_t code, std::string reason);
  // Silent: the sockets stop reading and writing (WebSocket pings go unanswered) and the
  // protocol answers and emits nothing, like a hung server; false resumes.
  void SetSilent(bool silent);
  void SetAnswerDelay(std::chrono::milliseconds d);
  void SetRateLimit(int max_messages, std::chrono::milliseconds window);
  void SetEventInterval(std::optional<std::chrono::milliseconds> interval);

  // --- Observations. ---
  int open_connections() const;
  int authenticated_connections() const;
  int auth_successes() const;
  int auth_failures() const;
  int frames_before_auth() const;
  int requests(std::string_view path) const;
  int active_subscriptions() const;
  int subscriptions_of(std::string_view channel, std::string_view key) const;
  int events_sent() const;
  int answers_with_status(int status) const;
  // Close codes the server sent (1008 after 401/405/429, 1000 on idle), in order.
  std::vector<int> server_close_codes() const;
  // Close codes clients sent on connections that have ended, in order; 0 for a
  // connection that ended without a close frame from the client.
  std::vector<int> client_close_codes() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_EMOGG_EMULATOR_H_
