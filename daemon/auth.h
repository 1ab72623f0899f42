// Bearer-token check for callers of the gRPC services.
#pragma once

#include <cstddef>
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

// `inner`, after refusing calls whose metadata (every header: name + value + 32 bytes,
// as HTTP/2 counts a header list) exceeds `max_bytes` with RESOURCE_EXHAUSTED. The
// check fails that call alone, where gRPC's own transport limit ends the connection.
Authorizer WithMetadataLimit(Authorizer inner, size_t max_bytes);

// Compares without data-dependent timing (not even on the length).
bool ConstantTimeEquals(std::string_view a, std::string_view b);

}  // namespace wsbridge::daemon
