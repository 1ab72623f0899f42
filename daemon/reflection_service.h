// gRPC server reflection (v1alpha) served by the daemon itself rather than by gRPC's
// reflection plugin, so that it goes through the bearer-token check like every other
// call: reflection describes every API and message of the daemon. Served on the
// daemon's CqLoops (see async_unary.h for why).
#pragma once

#include <string>
#include <vector>

#include "bridges/core/cq_loop.h"
#include "daemon/auth.h"
#include "daemon/rpc_metrics.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace wsbridge::daemon {

class ReflectionService final : public grpc::reflection::v1alpha::ServerReflection::AsyncService {
 public:
  // `services`: the fully-qualified names list_services answers with. `authorize` is
  // checked once when the stream opens (a failure ends it before any answer).
  ReflectionService(std::vector<std::string> services, Authorizer authorize);

  // Starts taking streams on `loops` (once the server has started; they outlive it),
  // each counted by `tracker`.
  void Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker);
  RpcTracker* tracker() const { return tracker_; }

  // The answer to one request.
  grpc::reflection::v1alpha::ServerReflectionResponse Answer(
      const grpc::reflection::v1alpha::ServerReflectionRequest& request) const;
  const Authorizer& authorize() const { return authorize_; }

 private:
  std::vector<std::string> services_;
  Authorizer authorize_;
  RpcTracker* tracker_ = nullptr;  // set by Serve, before any call
};

}  // namespace wsbridge::daemon
