// A blocking WebSocket client (ws:// or wss://) for the direct WebSocket leg of the
// benchmark and for controlling the bench upstream. Beast stays inside ws_client.cc.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace wsbridge::bench {

class WsClient {
 public:
  // `url`: ws://127.0.0.1:PORT or wss://127.0.0.1:PORT (verified against `ca_file`).
  // Sends subprotocol `json`, binary frames, TCP_NODELAY.
  static absl::StatusOr<std::unique_ptr<WsClient>> Connect(const std::string& url,
                                                           const std::string& ca_file);
  virtual ~WsClient() = default;
  virtual absl::Status Write(std::string_view data) = 0;
  virtual absl::StatusOr<std::string> Read() = 0;
  // Write one frame and read frames until one starts with `request_id` (10 chars).
  absl::StatusOr<std::string> RoundTrip(std::string_view frame);
};

}  // namespace wsbridge::bench
