// A complete bridge on the toolkit over the fake protocol (fake_protocol.h): BridgeBase
// plus one handler per call helper of grpc_calls.h. With fake_protocol.h it is the
// template a new bridge copies (docs/writing-a-bridge.md); the toolkit's gRPC side is
// tested through it (bridge_base_test.cc, grpc_calls_test.cc).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "bridges/core/bridge.h"
#include "bridges/core/connection.h"
#include "bridges/core/upstream_config.h"
#include "daemon/daemon.h"
#include "fake_service.grpc.pb.h"
#include "wsbridge/config/v1/daemon.pb.h"

namespace wsbridge::core::testing {

inline constexpr std::string_view kFakeTokenMetadata = "x-fake-token";

struct FakeBridgeOptions {
  std::string url;
  ConnectionOptions connection;
  // Token of calls that carry none; null = every call must carry one.
  std::shared_ptr<SecretSource> default_token;
  bool allow_per_call = true;
  bool login = true;
  Duration request_timeout = std::chrono::seconds(5);
  Duration idle_session_timeout = std::chrono::minutes(5);
  uint32_t max_sessions = 100;
  size_t max_open_calls = 100000;
  // Events queued per Watch stream before SLOW_CONSUMER.
  size_t subscriber_queue = 64;
};

absl::StatusOr<std::unique_ptr<Bridge>> NewFakeBridge(FakeBridgeOptions options,
                                                      const BridgeContext& context);

// The real daemon (gRPC server, completion-queue loops, io threads) serving one fake
// bridge named "fake", for tests of the gRPC side.
class FakeDaemon {
 public:
  FakeDaemon() = default;
  ~FakeDaemon() { Stop(); }

  // `tweak` may change the daemon config (e.g. server.auth_token).
  absl::Status Start(FakeBridgeOptions options,
                     const std::function<void(config::v1::DaemonConfig&)>& tweak = nullptr);
  // RequestShutdown + Wait (idempotent).
  void Stop();

  Bridge& bridge() { return *bridge_; }
  daemon::Daemon& daemon() { return *daemon_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  coretest::v1::FakeService::Stub& stub() { return *stub_; }
  // Blocks every completion-queue loop of the bridge until `release` is notified: calls
  // arriving meanwhile wait to be matched, as on a saturated daemon.
  void HoldLoops(std::shared_ptr<absl::Notification> release);
  // Blocks the io thread the bridge's next session would run on (with runtime.io_threads
  // = 1: every session's) until `release` is notified; `busy` is notified once it holds.
  void HoldIoThread(std::shared_ptr<absl::Notification> busy,
                    std::shared_ptr<absl::Notification> release);
  // Calls matched and not yet done on the bridge's completion-queue loops.
  int CallsOpen() const;
  // Upstream sessions the bridge holds (admin view).
  size_t sessions() const { return bridge_->ListSessions().size(); }

 private:
  BridgeRegistry registry_;
  Bridge* bridge_ = nullptr;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<coretest::v1::FakeService::Stub> stub_;
};

}  // namespace wsbridge::core::testing
