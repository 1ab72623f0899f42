// The Emogg bridge: sessions keyed by token, and the wsbridge.emogg.v1.EmoggService gRPC
// face. Only the factory knows the config; this takes plain options so tests can build
// it with short windows.
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
#include "bridges/emogg/rate_limiter.h"

namespace wsbridge::emogg {

struct EmoggBridgeOptions : core::UpstreamEndpoint {
  // Token of calls that carry none; null = every call must carry one (x-emogg-token).
  std::shared_ptr<core::SecretSource> default_token;
  bool allow_call_token = false;
  core::Duration request_timeout = std::chrono::seconds(30);
  core::Duration idle_session_timeout = std::chrono::minutes(5);
  uint32_t max_sessions = 1000;
  size_t subscriber_queue = 256;
  uint32_t max_subscriptions_per_session = 5;
  size_t max_pending_requests = 4096;
  size_t max_open_calls = 100000;
  core::Duration auth_timeout = std::chrono::seconds(10);
  core::Duration auth_retry_pause = std::chrono::seconds(30);
  core::Duration subscribe_timeout = std::chrono::seconds(10);
  // `ping` after this much silence from Emogg (zero: no pings); unanswered for
  // heartbeat_timeout = a dead server.
  core::Duration heartbeat_interval = std::chrono::seconds(30);
  core::Duration heartbeat_timeout = std::chrono::seconds(10);
  // Client-side rate limit (per session).
  bool rate_limit = true;
  RateLimiter::Options limits;
  core::Duration retry_after_429 = std::chrono::seconds(60);
};

absl::StatusOr<std::unique_ptr<core::Bridge>> NewEmoggBridge(EmoggBridgeOptions options,
                                                             const core::BridgeContext& context);

}  // namespace wsbridge::emogg
