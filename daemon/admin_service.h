// wsbridge.admin.v1.AdminService: lists and closes the bridges' upstream sessions.
// Served on the daemon's CqLoops (see async_unary.h for why).
#pragma once

#include <string>
#include <vector>

#include "bridges/core/bridge.h"
#include "bridges/core/cq_loop.h"
#include "daemon/auth.h"
#include "daemon/rpc_metrics.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"

namespace wsbridge::daemon {

class AdminServiceImpl final : public wsbridge::admin::v1::AdminService::AsyncService {
 public:
  // `bridges` must outlive the service.
  AdminServiceImpl(std::vector<core::Bridge*> bridges, Authorizer authorize);

  // Starts taking calls on `loops` (once the server has started; they outlive it), each
  // counted by `tracker`.
  void Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker);

  grpc::Status AnswerListSessions(const grpc::ServerContext& context,
                                  const wsbridge::admin::v1::ListSessionsRequest& request,
                                  wsbridge::admin::v1::ListSessionsResponse* response) const;
  grpc::Status AnswerCloseSession(const grpc::ServerContext& context,
                                  const wsbridge::admin::v1::CloseSessionRequest& request) const;

 private:
  std::string BridgeNames() const;

  std::vector<core::Bridge*> bridges_;
  Authorizer authorize_;
};

}  // namespace wsbridge::daemon
