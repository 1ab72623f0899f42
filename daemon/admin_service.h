// wsbridge.admin.v1.AdminService: lists and closes the bridges' upstream sessions.
#pragma once

#include <vector>

#include "bridges/core/bridge.h"
#include "daemon/auth.h"
#include "wsbridge/admin/v1/admin.grpc.pb.h"

namespace wsbridge::daemon {

class AdminServiceImpl final : public wsbridge::admin::v1::AdminService::CallbackService {
 public:
  // `bridges` must outlive the service.
  AdminServiceImpl(std::vector<core::Bridge*> bridges, Authorizer authorize);

  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const wsbridge::admin::v1::ListSessionsRequest* request,
                                         wsbridge::admin::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* context,
                                         const wsbridge::admin::v1::CloseSessionRequest* request,
                                         wsbridge::admin::v1::CloseSessionResponse* response) override;

 private:
  std::string BridgeNames() const;

  std::vector<core::Bridge*> bridges_;
  Authorizer authorize_;
};

}  // namespace wsbridge::daemon
