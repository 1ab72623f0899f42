// One upstream DFX session: a WebSocket connection logged in with one device token,
// shared by every call that uses that token. An actor: all its state lives on the
// connection's strand; the methods below may be called from any thread and post.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/connection.h"
#include "bridges/core/metrics.h"
#include "bridges/dfx/codec.h"
#include "wsbridge/admin/v1/admin.pb.h"
#include "wsbridge/dfx/v1/dfx.pb.h"

namespace wsbridge::dfx {

using Clock = std::chrono::steady_clock;

struct SessionOptions {
  std::string bridge_name;
  std::string session_id;  // "<bridge>/<first 8 hex of the token hash>"
  core::ConnectionOptions connection;
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  // Device token, re-read before every login so rotated secrets take effect.
  std::function<absl::StatusOr<std::string>()> token;
  // Upstream answer deadline when the caller set none (and for login).
  core::Duration request_timeout = std::chrono::seconds(30);
  // Pause before a chunk answered RATE_LIMIT is sent again.
  core::Duration rate_limit_retry = std::chrono::seconds(1);
  // RATE_LIMIT answers to one chunk before its stream ends with RESOURCE_EXHAUSTED.
  int max_rate_limit_retries = 20;
  // Real-time pacing: no window of this length carries more data than its length.
  // The upstream's window is 5 s; tests shorten it together with the emulator's.
  bool pacing = true;
  core::Duration pacing_window = std::chrono::seconds(5);
  // After a refused login, calls fail at once with UNAUTHENTICATED for this long
  // instead of logging in again (no tight retry loop against a bad token).
  core::Duration auth_retry_delay = std::chrono::seconds(30);
  // Metrics (owned by the registry; may be null in unit tests).
  core::Counter* malformed_frames = nullptr;
  core::Counter* unrouted_frames = nullptr;
  core::Histogram* rtt = nullptr;
  // Called (from the strand) when the session's readiness changes.
  std::function<void()> health_changed;
};

struct Response {
  int status = 0;
  std::string body;
};

struct ChunkRequest {
  std::string measurement_id;
  std::string_view stage;  // "FIRST", "CHUNK" or "LAST" (static storage)
  bool ignore = false;
  std::string payload;     // raw bytes; base64-encoded on the wire
  uint32_t duration_ms = 0;
};

using ResultPtr = std::shared_ptr<const wsbridge::dfx::v1::MeasurementResult>;

// A subscriber of one measurement's results. Called on the session strand; must not
// block (queue and return).
class ResultSink {
 public:
  virtual ~ResultSink() = default;
  // The upstream acknowledged the subscription (may be called again after a restore).
  virtual void OnSubscribed() = 0;
  virtual void OnResult(const ResultPtr& result, const ResultInfo& info) = 0;
  // The subscription ended (upstream error, session closed). No calls follow.
  virtual void OnSubscriptionEnded(const absl::Status& status) = 0;
};

class Session {
 public:
  using ResponseCallback = std::function<void(absl::StatusOr<Response>)>;
  using ChunkCallback = std::function<void(absl::StatusOr<ChunkAnswer>)>;

  static std::shared_ptr<Session> Create(boost::asio::any_io_executor executor,
                                         SessionOptions options);
  virtual ~Session() = default;

  // Connects now rather than on first use.
  virtual void Start() = 0;

  // Sends one request once logged in; `done` runs exactly once on the strand (unless
  // cancelled first). Returns an id for Cancel(). A request in flight when the
  // connection drops fails with UNAVAILABLE (outcome unknown); it is never resent.
  virtual uint64_t Request(std::string action, std::string body, Clock::time_point deadline,
                           ResponseCallback done) = 0;
  // Sends one measurement chunk: after login, paced to real time, retried after
  // RATE_LIMIT. A chunk in flight when the connection drops fails with UNAVAILABLE
  // and reason OUTCOME_UNKNOWN.
  virtual uint64_t SendChunk(ChunkRequest chunk, ChunkCallback done) = 0;
  // Drops a request or chunk; its callback is not called.
  virtual void Cancel(uint64_t id) = 0;

  // Adds a subscriber of a measurement's results; every subscriber of a measurement
  // shares one upstream subscription. Returns the subscriber id.
  virtual uint64_t Subscribe(std::string measurement_id, std::shared_ptr<ResultSink> sink) = 0;
  // Removes the subscriber. DFX has no unsubscribe action: the last one leaving drops
  // the routing entry, and later results for it are dropped and counted.
  virtual void Unsubscribe(std::string measurement_id, uint64_t subscriber_id) = 0;

  // Ends everything with UNAVAILABLE and closes the connection with `code`. `done`
  // runs once the connection is closed. Idempotent.
  virtual void Close(uint16_t code, std::string reason, std::function<void()> done) = 0;

  // --- Any thread. ---
  virtual const std::string& id() const = 0;
  virtual bool ready() const = 0;
  virtual wsbridge::admin::v1::Session Describe() const = 0;

  // Calls holding the session; the bridge closes sessions that stay at zero too long.
  std::atomic<int> leases{0};
  std::atomic<int64_t> idle_since_ns{0};
  bool pinned = false;  // the configured token's session: never closed for idleness
};

}  // namespace wsbridge::dfx
