// An in-process DFX (DeepAffex) WebSocket service for tests and the demo: the
// DfxProtocol state machine served over ws:// or wss:// on loopback, with fault
// switches and observations for tests. Thread-safe.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_DFX_EMULATOR_H_
#define WSBRIDGE_TESTS_UPSTREAMS_DFX_EMULATOR_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tests/upstreams/dfx_protocol.h"

namespace wsbridge::emulator {

struct DfxEmulatorOptions {
  std::string listen = "127.0.0.1:0";
  std::vector<std::string> tokens;  // accepted device tokens; empty = any non-empty not starting "bad"
  bool tls = false;
  std::string cert_pem, key_pem;  // wss when tls
  int tls_max_version = 0;        // see WsServerOptions::tls_max_version (0 = no cap)
  std::chrono::milliseconds rate_window{5000};  // sliding window for RATE_LIMIT
};

class DfxEmulator {
 public:
  explicit DfxEmulator(DfxEmulatorOptions options);
  ~DfxEmulator();  // Stop()s
  DfxEmulator(const DfxEmulator&) = delete;
  DfxEmulator& operator=(const DfxEmulator&) = delete;

  // INVALID_ARGUMENT for a non-loopback listen address or bad TLS material.
  absl::Status Start();
  std::string url() const;  // ws://127.0.0.1:PORT or wss://127.0.0.1:PORT
  uint16_t port() const;
  void Stop();  // idempotent

  // Fault switches (take effect for new frames).
  // Drop the TCP connection (no close frame) when the n-th frame arrives on a
  // connection, before processing or answering it; every received frame counts,
  // the login included. -1 = off.
  void SetDropAfterFrames(int n);
  void SetAnswerDelay(std::chrono::milliseconds d);
  // Answer every 0718 with 401 INVALID_TOKEN.
  void SetRefuseLogin(bool refuse);
  // Results are pushed this long after the chunk's answer.
  void SetResultDelay(std::chrono::milliseconds d);
  // Push a raw binary frame to every open connection (malformed-frame tests).
  void SendRaw(std::string bytes);
  // Close handshakes started by the server. `code` 0 sends a close frame without a code
  // (the client reports 1005). CloseAll: every open connection, now (after what was
  // already queued). SetCloseAfterLogin: every connection, right after the answer to its
  // successful login (-1 = off), e.g. 1008 for a server that keeps refusing the session.
  void CloseAll(int code, std::string reason);
  void SetCloseAfterLogin(int code, std::string reason = "");

  // Observations, measured on the emulator's clock.
  using ChunkRecord = DfxChunkRecord;
  std::vector<ChunkRecord> chunks() const;  // accepted chunks, in order
  // Removes and returns one measurement's records (the soak checks each as it ends).
  std::vector<ChunkRecord> TakeChunks(std::string_view measurement_id);
  // Max ms of chunk data received within any rate_window (sliding), across all
  // measurements of a token (the max over tokens).
  int MaxDataMsInWindow() const;
  int open_connections() const;
  int logins() const;  // successful ones
  int connections() const;  // WebSocket connections opened since Start
  // Close codes clients sent on connections that have ended, in order; 0 for a
  // connection that ended without a close handshake.
  std::vector<int> close_codes() const;
  int active_subscriptions() const;
  int frames_received(std::string_view action) const;  // per action id, e.g. "0510"

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_DFX_EMULATOR_H_
