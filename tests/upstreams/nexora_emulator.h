// An in-process Nexora agent-chat service for tests and the demo: the NexoraProtocol
// state machine served over ws:// or wss:// on loopback, with its HTTP(S) endpoints
// (POST /api/auth/login, POST /api/chats) on the same port, fault switches and
// observations for tests. Thread-safe.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_NEXORA_EMULATOR_H_
#define WSBRIDGE_TESTS_UPSTREAMS_NEXORA_EMULATOR_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tests/upstreams/nexora_protocol.h"

namespace wsbridge::emulator {

struct NexoraEmulatorOptions {
  std::string listen = "127.0.0.1:0";
  bool tls = false;
  std::string cert_pem{}, key_pem{};  // wss:// and https:// when tls
  // Accepted API keys; empty = any key starting "nxr_" but not "nxr_bad".
  std::vector<std::string> api_keys{};
  // Accounts for the login endpoint: email -> password.
  std::map<std::string, std::string> users{};
  // Accepted agent ids for POST /api/chats; empty = any.
  std::vector<std::string> agents{};
  std::chrono::milliseconds jwt_lifetime{std::chrono::minutes(15)};
  // Pause between the events of an answer.
  std::chrono::milliseconds step_delay{2};
  // Refuse sockets for chats not created through POST /api/chats.
  bool known_chats_only = false;
};

class NexoraEmulator {
 public:
  explicit NexoraEmulator(NexoraEmulatorOptions options);
  ~NexoraEmulator();  // Stop()s
  NexoraEmulator(const NexoraEmulator&) = delete;
  NexoraEmulator& operator=(const NexoraEmulator&) = delete;

  // INVALID_ARGUMENT for a non-loopback listen address or bad TLS material.
  absl::Status Start();
  std::string url() const;       // ws://127.0.0.1:PORT or wss://127.0.0.1:PORT
  std::string http_url() const;  // http://127.0.0.1:PORT or https://127.0.0.1:PORT
  uint16_t port() const;
  void Stop();  // idempotent

  // Scripts and fault switches (NexoraProtocol); they apply to answers started later.
  void SetScript(std::vector<NexoraScriptStep> steps);
  void InjectError(std::string code, std::string message, int after_steps = 0, int count = 1);
  void DropMidAnswer(int after_steps, int count = 1);
  void ClearFaults();
  void SetAnswerPings(bool answer);
  void SetFinishAfterDrop(bool finish);
  void SetJwtLifetime(std::chrono::milliseconds d);
  void SetApiKeys(std::vector<std::string> keys);
  // Refuse the next `count` upgrades (-1: all until ClearFaults) with HTTP `status`: 429
  // and 503 as such (Retry-After when `retry_after_s` > 0), any other status as 400 (the
  // test server's limit, like the protocol's 404s).
  void RefuseUpgrades(int status, std::string message, int count, int retry_after_s = 0);
  void SetStepDelay(std::chrono::milliseconds d);
  // Drop every open socket of a chat (all chats when empty), no close frame.
  void DropSockets(std::string_view chat_id = {});
  // Send a raw text frame to every open socket of a chat (all when empty).
  void Broadcast(std::string text, std::string_view chat_id = {});
  // Close every open socket of a chat (all when empty) with a close frame and `code`.
  void CloseSockets(uint16_t code, std::string reason, std::string_view chat_id = {});

  // Observations.
  int messages_received(std::string_view client_message_id) const;
  std::vector<std::string> received_ids() const;
  int answers_started() const;
  int duplicates_sent() const;
  int logins() const;
  int refused_logins() const;
  int refused_upgrades() const;
  int upgrades() const;  // upgrade requests, accepted or refused
  int chats_created() const;
  int pings() const;
  int open_sockets(std::string_view chat_id) const;
  int open_sockets() const;
  int chats_with_sockets() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_NEXORA_EMULATOR_H_
