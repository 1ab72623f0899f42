#include "daemon/admin_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "bridges/core/status.h"
#include "daemon/async_unary.h"

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

void AdminServiceImpl::Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker) {
  using ListCall = InlineUnaryCall<ListSessionsRequest, ListSessionsResponse>;
  using CloseCall = InlineUnaryCall<CloseSessionRequest, CloseSessionResponse>;
  auto list = std::make_shared<const ListCall::Method>(ListCall::Method{
      [this](grpc::ServerContext* ctx, ListSessionsRequest* req,
             grpc::ServerAsyncResponseWriter<ListSessionsResponse>* responder,
             grpc::ServerCompletionQueue* cq, void* tag) {
        RequestListSessions(ctx, req, responder, cq, cq, tag);
      },
      [this](grpc::ServerContext& ctx, const ListSessionsRequest& req, ListSessionsResponse* resp) {
        return AnswerListSessions(ctx, req, resp);
      },
      "/wsbridge.admin.v1.AdminService/ListSessions", tracker});
  auto close = std::make_shared<const CloseCall::Method>(CloseCall::Method{
      [this](grpc::ServerContext* ctx, CloseSessionRequest* req,
             grpc::ServerAsyncResponseWriter<CloseSessionResponse>* responder,
             grpc::ServerCompletionQueue* cq, void* tag) {
        RequestCloseSession(ctx, req, responder, cq, cq, tag);
      },
      [this](grpc::ServerContext& ctx, const CloseSessionRequest& req, CloseSessionResponse*) {
        return AnswerCloseSession(ctx, req);
      },
      "/wsbridge.admin.v1.AdminService/CloseSession", tracker});
  for (core::CqLoop* loop : loops) {
    ListCall::Serve(list, loop);
    CloseCall::Serve(close, loop);
  }
}

grpc::Status AdminServiceImpl::AnswerListSessions(const grpc::ServerContext& context,
                                                  const ListSessionsRequest& request,
                                                  ListSessionsResponse* response) const {
  if (grpc::Status auth = authorize_(context); !auth.ok()) return auth;
  bool found = request.bridge().empty();
  for (core::Bridge* bridge : bridges_) {
    if (!request.bridge().empty() && bridge->name() != request.bridge()) continue;
    found = true;
    for (auto& session : bridge->ListSessions()) {
      *response->add_sessions() = std::move(session);
    }
  }
  if (!found) {
    return grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("no bridge named \"", request.bridge(), "\"; bridges: ", BridgeNames()));
  }
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::AnswerCloseSession(const grpc::ServerContext& context,
                                                  const CloseSessionRequest& request) const {
  if (grpc::Status auth = authorize_(context); !auth.ok()) return auth;
  const std::string& id = request.id();
  if (id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "id is empty: pass a session id from ListSessions, e.g. "
                        "\"<bridge>/<session>\"");
  }
  // Session ids are "<bridge>/<rest>": the prefix picks the bridge.
  size_t slash = id.find('/');
  const std::string bridge_name = slash == std::string::npos ? "" : id.substr(0, slash);
  for (core::Bridge* bridge : bridges_) {
    if (bridge->name() != bridge_name) continue;
    return core::ToGrpcStatus(bridge->CloseSession(std::string_view(id)));
  }
  return grpc::Status(
      grpc::StatusCode::NOT_FOUND,
      absl::StrCat("no session \"", id,
                   "\": ids have the form \"<bridge>/<session>\" (see ListSessions); bridges: ",
                   BridgeNames()));
}

}  // namespace wsbridge::daemon
