// One bridge inside the real daemon (its gRPC server, its registry building the bridge
// through a factory) for fault scenarios. The test builds the bridge's options in code
// (timings scaled down, URL pointing at the fault proxy) and the harness registers a
// factory that builds exactly those, so the daemon's own config only names the bridge.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"

namespace wsbridge::faults {

// The reason of the google.rpc.ErrorInfo in a status's details ("" when none).
std::string ErrorReason(const grpc::Status& status);
// One metadata entry of that ErrorInfo ("" when absent).
std::string ErrorMetadata(const grpc::Status& status, const std::string& key);

// The process's resident set size, in bytes (the daemon runs in the test process).
int64_t ResidentBytes();
// Whether no upstream session of `bridge` holds a request: every call's request ended.
bool NoRequestsHeld(const core::Bridge& bridge);

// Every secret a scenario uses contains this marker (e.g. "tok-s3cr3t-1"). The harness
// checks that it never appears in what the daemon shows anyone: every log line (at debug
// level), every status and error detail a caller on the harness's channels receives,
// the metrics and the admin view of the sessions. A hit fails the test.
inline constexpr char kSecretMarker[] = "s3cr3t";

class DaemonHarness {
 public:
  // Builds the bridge under test from the daemon's config entry it was given.
  using Make = std::function<absl::StatusOr<std::unique_ptr<core::Bridge>>(const core::BridgeContext&)>;
  // Fills the daemon config's bridge entry (name is set; set the oneof and its url).
  using Describe = std::function<void(config::v1::BridgeConfig&)>;

  DaemonHarness() = default;
  ~DaemonHarness();
  DaemonHarness(const DaemonHarness&) = delete;
  DaemonHarness& operator=(const DaemonHarness&) = delete;

  // Starts the daemon with one bridge named `name`; `tweak_config` may change the rest
  // of the daemon's config (shutdown timings, limits) before defaults are applied.
  absl::Status Start(const std::string& name, const Describe& describe, Make make,
                     const std::function<void(config::v1::DaemonConfig&)>& tweak_config = nullptr);
  // Starts the drain (as SIGTERM does) without waiting.
  void RequestShutdown();
  // Drains and stops; idempotent. Called by the destructor.
  void Stop();

  core::Bridge* bridge() const { return bridge_; }
  daemon::Daemon& daemon() { return *daemon_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // A fresh channel (its own HTTP/2 connection), e.g. for a second caller.
  std::shared_ptr<grpc::Channel> NewChannel();

  // Where the secret marker was seen so far ("log: <line>", "status: <message>", ...).
  // Stop() adds the metrics and the admin view, then fails the test if there is any.
  std::vector<std::string> SecretLeaks() const;
  // Records what a caller was shown (the channels' interceptor calls it).
  void Saw(const std::string& where, const std::string& text);

 private:
  mutable absl::Mutex mu_;
  std::vector<std::string> leaks_ ABSL_GUARDED_BY(mu_);
  bool observing_ = false;
  core::BridgeRegistry registry_;
  std::unique_ptr<daemon::Daemon> daemon_;
  core::Bridge* bridge_ = nullptr;  // owned by daemon_
  std::shared_ptr<grpc::Channel> channel_;
};

}  // namespace wsbridge::faults
