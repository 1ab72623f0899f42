// The DFX bridge: sessions keyed by device token, and the wsbridge.dfx.v1.DfxService
// gRPC face. Only the factory knows the config; this takes plain options so tests
// can build it with short windows.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/core/connection.h"

namespace wsbridge::dfx {

inline constexpr std::string_view kDeviceTokenMetadata = "x-dfx-device-token";

struct DfxBridgeOptions {
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  core::ConnectionOptions connection;
  // Device token of calls that carry none; null = every call must carry one.
  std::function<absl::StatusOr<std::string>()> default_token;
  bool allow_call_token = false;
  core::Duration request_timeout = std::chrono::seconds(30);
  core::Duration idle_session_timeout = std::chrono::minutes(5);
  core::Duration rate_limit_retry = std::chrono::seconds(1);
  // RATE_LIMIT answers to one chunk before its stream ends with RESOURCE_EXHAUSTED.
  int max_rate_limit_retries = 20;
  bool pacing = true;
  // The upstream's rate window (5 s). Internal: tests shorten it.
  core::Duration pacing_window = std::chrono::seconds(5);
  core::Duration auth_retry_delay = std::chrono::seconds(30);
  uint32_t max_sessions = 1000;
  // Results queued per subscriber before a slow subscriber's stream is ended with
  // RESOURCE_EXHAUSTED (the other subscribers are not held back).
  size_t subscriber_queue = 256;
};

absl::StatusOr<std::unique_ptr<core::Bridge>> NewDfxBridge(DfxBridgeOptions options,
                                                           const core::BridgeContext& context);

}  // namespace wsbridge::dfx
