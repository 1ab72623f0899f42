// Global flags of wsbridgectl and what they turn into: the channel and the per-call
// context (deadline, bearer token, extra metadata).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include "absl/status/statusor.h"

namespace wsbridge::ctl {

// Per-call deadline when --timeout is not given (unary calls only; streams get none).
inline constexpr double kDefaultTimeoutSeconds = 10;

struct GlobalOptions {
  std::string target;  // host:port or unix:/path
  std::string token;   // sent as `authorization: Bearer <token>` when non-empty
  bool tls = false;
  std::string ca_file, cert_file, key_file;
  std::string server_name;  // TLS: the name the daemon's certificate must carry
  std::optional<double> timeout_seconds;  // --timeout, when given
  std::vector<std::pair<std::string, std::string>> headers;  // -H KEY=VALUE
  bool verbose = false;        // -v: response headers and trailers on stderr
  bool emit_defaults = false;  // --emit-defaults: print fields that hold their default
};

// The channel for `options` (plaintext, TLS or mTLS). Errors name the file at fault.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const GlobalOptions& options);

// Adds the token and -H metadata to `context` and, for unary calls (or any call when
// --timeout was given), the deadline.
void PrepareContext(const GlobalOptions& options, bool streaming, grpc::ClientContext& context);

}  // namespace wsbridge::ctl
