// grpc.health.v1.Health (Check and Watch) served by the daemon on its CqLoops, in place
// of gRPC's default health service, which is a callback-API service (see async_unary.h
// for why the daemon registers none).
//
// Behaves as gRPC's default service does: Check answers the status set for a service
// name, NOT_FOUND for a name never set; Watch sends the current status at once
// (SERVICE_UNKNOWN for a name never set) and then every change, the latest one when
// several come while a write is in flight; after Shutdown() every name is NOT_SERVING
// and stays so. One difference: "" (the whole daemon) is NOT_SERVING until the daemon
// first publishes its health, where gRPC's service starts it SERVING.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bridges/core/cq_loop.h"
#include "daemon/rpc_metrics.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace wsbridge::daemon {

class HealthWatch;

class HealthService final : public grpc::health::v1::Health::AsyncService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  HealthService();
  ~HealthService() override;

  // Starts taking calls on `loops` (once the server has started; they outlive it), each
  // counted by `tracker`.
  void Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker);

  // Any thread. Ignored after Shutdown().
  void SetServingStatus(const std::string& service, bool serving);
  // Every name NOT_SERVING from now on (the drain). Idempotent.
  void Shutdown();

  // Check's answer for `service`.
  grpc::Status AnswerCheck(const std::string& service, grpc::health::v1::HealthCheckResponse* response) const;

 private:
  friend class HealthWatch;
  // What Watch reports for `service` now.
  ServingStatus WatchStatus(const std::string& service) const;
  uint64_t AddWatch(const std::string& service, std::weak_ptr<HealthWatch> watch);
  void RemoveWatch(uint64_t id);
  // Tells the watches of `service` (of every name when null) that it may have changed.
  void Notify(const std::string* service);

  RpcTracker* tracker_ = nullptr;  // set by Serve, before any call
  mutable absl::Mutex mu_;
  std::map<std::string, ServingStatus> statuses_ ABSL_GUARDED_BY(mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  struct Watcher {
    std::string service;
    std::weak_ptr<HealthWatch> watch;
  };
  std::map<uint64_t, Watcher> watches_ ABSL_GUARDED_BY(mu_);
  uint64_t next_watch_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace wsbridge::daemon
