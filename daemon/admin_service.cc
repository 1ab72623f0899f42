#include "daemon/admin_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "bridges/core/status.h"

namespace wsbridge::daemon {

using wsbridge::admin::v1::CloseSessionRequest;
using wsbridge::admin::v1::CloseSessionResponse;
using wsbridge::admin::v1::ListSessionsRequest;
using wsbridge::admin::v1::ListSessionsResponse;

AdminServiceImpl::AdminServiceImpl(std::vector<core::Bridge*> bridges, Authorizer authorize)
    : bridges_(std::move(bridges)), authorize_(std::move(authorize)) {}

std::string AdminServiceImpl::BridgeNames() const {
  if (bridges_.empty()) return "(none configured)";
  return absl::StrJoin(bridges_, ", ", [](std::string* out, const core::Bridge* b) {
    out->append(b->name());
  });
}

grpc::ServerUnaryReactor* AdminServiceImpl::ListSessions(grpc::CallbackServerContext* context,
                                                         const ListSessionsRequest* request,
                                                         ListSessionsResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (grpc::Status auth = authorize_(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  bool found = request->bridge().empty();
  for (core::Bridge* bridge : bridges_) {
    if (!request->bridge().empty() && bridge->name() != request->bridge()) continue;
    found = true;
    for (auto& session : bridge->ListSessions()) {
      *response->add_sessions() = std::move(session);
    }
  }
  if (!found) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("no bridge named \"", request->bridge(), "\"; bridges: ", BridgeNames())));
    return reactor;
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminServiceImpl::CloseSession(grpc::CallbackServerContext* context,
                                                         const CloseSessionRequest* request,
                                                         CloseSessionResponse* /*response*/) {
  auto* reactor = context->DefaultReactor();
  if (grpc::Status auth = authorize_(*context); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  const std::string& id = request->id();
  if (id.empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "id is empty: pass a session id from ListSessions, e.g. "
                                 "\"<bridge>/<session>\""));
    return reactor;
  }
  // Session ids are "<bridge>/<rest>": the prefix picks the bridge.
  size_t slash = id.find('/');
  const std::string bridge_name = slash == std::string::npos ? "" : id.substr(0, slash);
  for (core::Bridge* bridge : bridges_) {
    if (bridge->name() != bridge_name) continue;
    reactor->Finish(core::ToGrpcStatus(bridge->CloseSession(std::string_view(id))));
    return reactor;
  }
  reactor->Finish(grpc::Status(
      grpc::StatusCode::NOT_FOUND,
      absl::StrCat("no session \"", id,
                   "\": ids have the form \"<bridge>/<session>\" (see ListSessions); bridges: ",
                   BridgeNames())));
  return reactor;
}

}  // namespace wsbridge::daemon
