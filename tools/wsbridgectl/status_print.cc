#include "tools/wsbridgectl/status_print.h"

#include <algorithm>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace wsbridge::ctl {

std::string StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "CODE_" + std::to_string(static_cast<int>(code));
  }
}

void PrintStatus(const grpc::Status& status, std::ostream& out) {
  out << StatusCodeName(status.error_code()) << ": " << status.error_message() << "\n";
  if (status.error_details().empty()) return;
  google::rpc::Status details;
  if (!details.ParseFromString(status.error_details())) {
    out << "  (status details present but not a google.rpc.Status)\n";
    return;
  }
  for (const auto& any : details.details()) {
    google::rpc::ErrorInfo info;
    if (any.Is<google::rpc::ErrorInfo>() && any.UnpackTo(&info)) {
      out << "  reason: " << info.reason() << "\n";
      out << "  domain: " << info.domain() << "\n";
      std::vector<std::pair<std::string, std::string>> metadata(info.metadata().begin(),
                                                                info.metadata().end());
      std::sort(metadata.begin(), metadata.end());
      for (const auto& [key, value] : metadata) {
        out << "  metadata: " << key << "=" << value << "\n";
      }
      continue;
    }
    // Other detail types of google/rpc/error_details.proto print as JSON; unknown ones
    // by type only.
    std::string json;
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    if (google::protobuf::util::MessageToJsonString(any, &json, options).ok()) {
      out << "  detail: " << json << "\n";
    } else {
      out << "  detail: " << any.type_url() << " (" << any.value().size() << " bytes)\n";
    }
  }
}

void PrintMetadata(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                   const std::string& prefix, std::ostream& out) {
  for (const auto& [key, value] : metadata) {
    std::string k(key.data(), key.size());
    std::string v(value.data(), value.size());
    if (absl::EndsWith(k, "-bin")) v = absl::Base64Escape(v);
    out << prefix << k << ": " << v << "\n";
  }
}

}  // namespace wsbridge::ctl
