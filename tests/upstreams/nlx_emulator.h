// An in-process NLX WebSocket service for tests and the demo: the NlxProtocol state
// machine (see nlx_protocol.h for every rule) served over ws:// or wss:// on loopback,
// with fault switches and observations for tests. Thread-safe.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_NLX_EMULATOR_H_
#define WSBRIDGE_TESTS_UPSTREAMS_NLX_EMULATOR_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tests/upstreams/nlx_protocol.h"

namespace wsbridge::emulator {

struct NlxEmulatorOptions {
  std::string listen = "127.0.0.1:0";
  // The accepted keys (channel_key with its language suffix).
  std::string api_key = "nlx-emulator-api-key";
  std::string deployment_key = "nlx-emulator-deployment";
  std::string channel_key = "nlx-emulator-channel-en-US";
  bool tls = false;
  std::string cert_pem, key_pem;  // wss when tls
  // API Gateway takes messages up to 128 KiB; larger ones close the socket (1009).
  size_t max_message_bytes = 128u << 10;
};

class NlxEmulator {
 public:
  explicit NlxEmulator(NlxEmulatorOptions options);
  ~NlxEmulator();  // Stop()s
  NlxEmulator(const NlxEmulator&) = delete;
  NlxEmulator& operator=(const NlxEmulator&) = delete;

  // INVALID_ARGUMENT for a non-loopback listen address or bad TLS material.
  absl::Status Start();
  std::string url() const;  // ws://127.0.0.1:PORT or wss://127.0.0.1:PORT
  uint16_t port() const;
  void Stop();  // idempotent

  // Fault switches (take effect for new events).
  // Refuse every upgrade with this HTTP status (503, 429, 403, ...); 0 = accept again.
  void SetRefuseUpgrades(int http_status);
  // Send the {"conversationId"} ack this long after the upgrade.
  void SetAckDelay(std::chrono::milliseconds d);
  // Never send the ack on sockets opened from now on (ack deadline tests).
  void SetWithholdAck(bool withhold);
  // Send each turn's answer this long after the turn arrived.
  void SetAnswerDelay(std::chrono::milliseconds d);
  // The next `n` turns are received and counted, then their socket is dropped (no close
  // frame) before any answer.
  void DropNextTurns(int n);
  // Accept only this API key on upgrades from now on (a rotated key); open sockets stay.
  void SetApiKey(std::string key);

  // Pushes. Each returns how many sockets it went to.
  // An unsolicited response with one message to every socket of the conversation.
  int Push(std::string_view conversation_id, std::string_view text);
  // A raw text frame to every socket of the conversation ("" = every open socket).
  int PushRaw(std::string_view conversation_id, std::string text);
  // Drop every socket of the conversation ("" = all), no close frame.
  int Drop(std::string_view conversation_id);
  // Close every socket of the conversation ("" = all) with this close code.
  int Close(std::string_view conversation_id, uint16_t code, std::string reason);

  // Observations.
  int handshakes() const;          // upgrade requests, refused ones included
  int refused_handshakes() const;
  int open_connections() const;
  int connections_for(std::string_view conversation_id) const;
  int conversations() const;
  bool knows(std::string_view conversation_id) const;
  std::vector<std::string> conversation_ids() const;  // in creation order
  int turns_received(std::string_view conversation_id) const;
  std::vector<NlxTurnRecord> turns(std::string_view conversation_id) const;
  // Drops the turns' records, keeping turns_received (the soak's long runs).
  void ForgetTurns(std::string_view conversation_id);
  int total_turns() const;
  int invalid_frames() const;
  // Frames that arrived before their socket's ack was due: a client must wait for it.
  int frames_before_ack() const;
  // Close codes clients sent on connections that have ended, in order; 0 for a
  // connection that ended without a close handshake (dropped).
  std::vector<int> close_codes() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_NLX_EMULATOR_H_
