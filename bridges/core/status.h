// Errors are absl::Status inside the daemon and grpc::Status at the edge. An upstream's
// own error code travels as a google.rpc.ErrorInfo payload on the absl::Status and ends
// up in the grpc-status-details-bin trailer, so clients can branch on `reason`.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <string_view>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace wsbridge::core {

inline constexpr std::string_view kErrorInfoTypeUrl =
    "type.googleapis.com/google.rpc.ErrorInfo";

// Returns `status` carrying an ErrorInfo{reason, domain, metadata} payload.
absl::Status WithErrorInfo(absl::Status status, std::string_view reason,
                           std::string_view domain,
                           const std::map<std::string, std::string>& metadata = {});

// The ErrorInfo reason attached to `status`, or "" when none.
std::string ErrorReason(const absl::Status& status);

// Longest error message, and longest ErrorInfo metadata value, sent to a caller. Both
// travel in the trailers (the message twice: grpc-message and the details), and a
// trailer block above the caller's limit (8 KiB by default) would replace the real
// code with RESOURCE_EXHAUSTED; longer texts are cut and say so.
inline constexpr size_t kMaxGrpcMessageBytes = 1024;
inline constexpr size_t kMaxErrorInfoValueBytes = 128;
// At most this many ErrorInfo metadata entries are sent (in key order).
inline constexpr size_t kMaxErrorInfoEntries = 8;

// `text` if it is at most `limit` bytes, else its first bytes (cut on a UTF-8
// character boundary) followed by " ...[cut: N bytes in all]".
std::string CutText(std::string_view text, size_t limit);

// absl -> grpc, with ErrorInfo (if any) serialized into google.rpc.Status details.
// The message and the ErrorInfo metadata values are cut to the limits above.
grpc::Status ToGrpcStatus(const absl::Status& status);

// grpc -> absl, ErrorInfo payload restored from the details (used by tests and
// clients of our own services).
absl::Status FromGrpcStatus(const grpc::Status& status);

// The gRPC code for an upstream's HTTP-like status (400 INVALID_ARGUMENT, 401
// UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 409 ABORTED, 412
// FAILED_PRECONDITION, 422 INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 501 UNIMPLEMENTED,
// 502-504 UNAVAILABLE, other 5xx INTERNAL, else UNKNOWN). Bridges map their protocol's own
// error codes first and fall back to this.
absl::StatusCode CodeForHttpStatus(int status);

}  // namespace wsbridge::core
