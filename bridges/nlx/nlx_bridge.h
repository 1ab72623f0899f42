// The NLX bridge: one upstream socket per conversation, and the
// wsbridge.nlx.v1.NlxService gRPC face. Only the factory knows the config; this takes
// plain options so tests can build it with short timeouts.
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
#include "bridges/nlx/codec.h"

namespace wsbridge::nlx {

// url: ws(s)://host[:port][/path][?query], NLX's own by default.
struct NlxBridgeOptions : core::UpstreamEndpoint {
  NlxBridgeOptions() { url = std::string(kDefaultUrl); }
  // The configured keys (null = none: calls must carry that key in metadata). Kept
  // current by a refresher (file and env secrets are re-read every second) and read on
  // every connection attempt.
  std::shared_ptr<core::SecretSource> api_key, deployment_key, channel_key;
  std::string language;
  bool allow_call_keys = false;
  core::Duration ack_timeout = std::chrono::seconds(10);
  core::Duration turn_timeout = std::chrono::seconds(30);
  core::Duration idle_conversation_timeout = std::chrono::seconds(30);
  core::Duration auth_retry_after = std::chrono::seconds(30);
  uint32_t max_conversations = 1000;
  uint32_t max_pending_turns = 16;
  uint32_t max_turn_bytes = 128u << 10;
  // Converse events queued before the stream ends RESOURCE_EXHAUSTED SLOW_CONSUMER.
  uint32_t stream_queue = 256;
  // Open gRPC calls beyond which new ones fail RESOURCE_EXHAUSTED.
  size_t max_open_calls = 100000;
  // How soon a socket whose turn was abandoned (deadline, cancel) is replaced: the
  // session's heartbeat tick, on which Protocol::CheckAlive runs.
  core::Duration check_interval = std::chrono::milliseconds(500);
};

absl::StatusOr<std::unique_ptr<core::Bridge>> NewNlxBridge(NlxBridgeOptions options,
                                                           const core::BridgeContext& context);

}  // namespace wsbridge::nlx
