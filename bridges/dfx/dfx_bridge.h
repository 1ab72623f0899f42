// The DFX bridge: sessions keyed by device token, and the wsbridge.dfx.v1.DfxService
// gRPC face. Only the factory knows the config; this takes plain options so tests
// can build it with short windows.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/core/connection.h"
#include "bridges/core/upstream_config.h"

namespace wsbridge::dfx {

inline constexpr std::string_view kDeviceTokenMetadata = "x-dfx-device-token";

struct DfxBridgeOptions : core::UpstreamEndpoint {
  // Device token of calls that carry none; null = every call must carry one. Kept
  // current by the pool's refresher (file and env secrets are re-read every second).
  std::shared_ptr<core::SecretSource> default_token;
  bool allow_call_token = false;
  core::Duration request_timeout = std::chrono::seconds(30);
  // Bound on the results subscription's acknowledgement (0510).
  core::Duration subscribe_timeout = std::chrono::seconds(30);
  core::Duration idle_session_timeout = std::chrono::minutes(5);
  core::Duration rate_limit_retry = std::chrono::seconds(1);
  // RATE_LIMIT answers to one chunk before its stream ends with RESOURCE_EXHAUSTED.
  int max_rate_limit_retries = 20;
  bool pacing = true;
  // The upstream's rate window (5 s). Internal: tests shorten it.
  std::chrono::milliseconds pacing_window{5000};
  uint32_t max_sessions = 1000;
  // Requests and chunks waiting per session (not yet sent) beyond which new ones fail
  // RESOURCE_EXHAUSTED.
  size_t max_pending_requests = 4096;
  // Open gRPC calls beyond which new ones fail RESOURCE_EXHAUSTED.
  size_t max_open_calls = 100000;
  // Results queued per subscriber before a slow subscriber's stream is ended with
  // RESOURCE_EXHAUSTED (the other subscribers are not held back).
  size_t subscriber_queue = 256;
};

absl::StatusOr<std::unique_ptr<core::Bridge>> NewDfxBridge(DfxBridgeOptions options,
                                                           const core::BridgeContext& context);

}  // namespace wsbridge::dfx
