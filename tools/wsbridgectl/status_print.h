// How wsbridgectl reports a non-OK gRPC status and, with -v, response metadata.
#pragma once

#include <map>
#include <ostream>
#include <string>

#include <grpcpp/support/status.h>
#include <grpcpp/support/string_ref.h>

namespace wsbridge::ctl {

// "NOT_FOUND", "UNAVAILABLE", ...
std::string StatusCodeName(grpc::StatusCode code);

// "CODE: message", then the google.rpc.Status details from the grpc-status-details-bin
// trailer when present: an ErrorInfo as `  reason:` / `  domain:` / `  metadata: k=v`
// lines, any other detail as `  detail <type>: <json>`.
void PrintStatus(const grpc::Status& status, std::ostream& out);

// `prefix key: value` lines (binary values in base64), for -v.
void PrintMetadata(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                   const std::string& prefix, std::ostream& out);

}  // namespace wsbridge::ctl
