// Bearer-token check for callers of the gRPC services.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

namespace wsbridge::daemon {

using Authorizer = std::function<grpc::Status(const grpc::ServerContextBase&)>;

// An authorizer requiring `authorization: Bearer <token>` metadata; with an empty
// `token` every call is allowed. Failures are UNAUTHENTICATED and never echo tokens.
Authorizer MakeBearerAuthorizer(std::string token);

// Compares without data-dependent timing (not even on the length).
bool ConstantTimeEquals(std::string_view a, std::string_view b);

}  // namespace wsbridge::daemon
