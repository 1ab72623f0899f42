// The Nexora bridge: one upstream socket per chat (and credential), and the
// wsbridge.nexora.v1.NexoraService gRPC face. Only the factory knows the config; this
// takes plain options so tests can build it with short timeouts.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/core/connection.h"
#include "bridges/core/upstream_config.h"

namespace wsbridge::nexora {

inline constexpr std::string_view kTokenMetadata = "x-nexora-token";

// url: ws(s)://host[:port][/prefix].
struct NexoraBridgeOptions : core::UpstreamEndpoint {
  std::string http_base_url;  // "" = url with wss:// -> https:// (ws:// -> http://)
  // The configured credential: an API key, or email + password (a JWT through the login
  // endpoint), or none (then every call carries x-nexora-token). Kept current by a
  // refresher (file and env secrets are re-read every second).
  std::shared_ptr<core::SecretSource> api_key;
  std::shared_ptr<core::SecretSource> email, password;
  bool allow_call_token = false;
  core::Duration idle_chat_timeout = std::chrono::minutes(5);
  core::Duration ping_interval = std::chrono::seconds(20);
  core::Duration pong_timeout = std::chrono::seconds(10);
  core::Duration http_timeout = std::chrono::seconds(30);
  core::Duration answer_idle_timeout = std::chrono::seconds(120);
  core::Duration auth_retry_after = std::chrono::seconds(30);
  uint32_t max_chats = 1000;
  uint32_t max_resends = 5;
  uint32_t max_pending_messages_per_chat = 64;
  uint32_t max_content_bytes = 256 * 1024;
  // Open gRPC calls beyond which new ones fail RESOURCE_EXHAUSTED.
  size_t max_open_calls = 100000;
  // Events queued for one stream before it ends RESOURCE_EXHAUSTED SLOW_CONSUMER.
  size_t stream_queue = 4096;
};

absl::StatusOr<std::unique_ptr<core::Bridge>> NewNexoraBridge(NexoraBridgeOptions options,
                                                              const core::BridgeContext& context);

}  // namespace wsbridge::nexora
