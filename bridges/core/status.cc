#include "bridges/core/status.h"

#include "absl/strings/cord.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace wsbridge::core {
namespace {
// Debian's abseil is built without std::string_view aliasing: absl::string_view is its own type.
const absl::string_view kTypeUrl(kErrorInfoTypeUrl.data(), kErrorInfoTypeUrl.size());
}  // namespace

absl::Status WithErrorInfo(absl::Status status, std::string_view reason, std::string_view domain,
                           const std::map<std::string, std::string>& metadata) {
  if (status.ok()) return status;
  google::rpc::ErrorInfo info;
  info.set_reason(std::string(reason));
  info.set_domain(std::string(domain));
  for (const auto& [k, v] : metadata) (*info.mutable_metadata())[k] = v;
  status.SetPayload(kTypeUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

std::string ErrorReason(const absl::Status& status) {
  auto payload = status.GetPayload(kTypeUrl);
  if (!payload) return "";
  google::rpc::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) return "";
  return info.reason();
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  auto payload = status.GetPayload(kTypeUrl);
  if (!payload) return grpc::Status(code, message);
  google::rpc::Status details;
  details.set_code(static_cast<int>(code));
  details.set_message(message);
  auto* any = details.add_details();
  any->set_type_url(std::string(kErrorInfoTypeUrl));
  any->set_value(std::string(*payload));
  return grpc::Status(code, message, details.SerializeAsString());
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status out(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  google::rpc::Status details;
  if (!status.error_details().empty() && details.ParseFromString(status.error_details())) {
    for (const auto& any : details.details()) {
      if (any.type_url() == kErrorInfoTypeUrl) out.SetPayload(kTypeUrl, absl::Cord(any.value()));
    }
  }
  return out;
}

absl::StatusCode CodeForHttpStatus(int status) {
  switch (status) {
    case 400: case 422: return absl::StatusCode::kInvalidArgument;
    case 401: return absl::StatusCode::kUnauthenticated;
    case 403: return absl::StatusCode::kPermissionDenied;
    case 404: return absl::StatusCode::kNotFound;
    case 409: return absl::StatusCode::kAborted;
    case 412: return absl::StatusCode::kFailedPrecondition;
    case 429: return absl::StatusCode::kResourceExhausted;
    case 501: return absl::StatusCode::kUnimplemented;
    case 502: case 503: case 504: return absl::StatusCode::kUnavailable;
    default: break;
  }
  return status >= 500 ? absl::StatusCode::kInternal : absl::StatusCode::kUnknown;
}

}  // namespace wsbridge::core
