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

std::string CutText(std::string_view text, size_t limit) {
  if (text.size() <= limit) return std::string(text);
  size_t end = limit;
  // Back off continuation bytes (10xxxxxx) so a multi-byte character is never split:
  // proto3 strings must stay valid UTF-8.
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  std::string out(text.substr(0, end));
  out += " ...[cut: ";
  out += std::to_string(text.size());
  out += " bytes in all]";
  return out;
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  auto code = static_cast<grpc::StatusCode>(status.code());
  // Upstream text (ids, error descriptions) may be any length: cut here, at the edge.
  std::string message = CutText(
      std::string_view(status.message().data(), status.message().size()), kMaxGrpcMessageBytes);
  auto payload = status.GetPayload(kTypeUrl);
  if (!payload) return grpc::Status(code, message);
  google::rpc::ErrorInfo info;
  if (!info.ParseFromString(std::string(*payload))) {
    return grpc::Status(code, message);
  }
  google::rpc::ErrorInfo sent;
  sent.set_reason(CutText(info.reason(), kMaxErrorInfoValueBytes));
  sent.set_domain(CutText(info.domain(), kMaxErrorInfoValueBytes));
  // Map order is unspecified; sort the keys so the same entries are kept every time.
  std::map<std::string, std::string> sorted(info.metadata().begin(), info.metadata().end());
  size_t kept = 0;
  for (const auto& [key, value] : sorted) {
    if (kept++ == kMaxErrorInfoEntries) break;
    (*sent.mutable_metadata())[CutText(key, kMaxErrorInfoValueBytes)] =
        CutText(value, kMaxErrorInfoValueBytes);
  }
  google::rpc::Status details;
  details.set_code(static_cast<int>(code));
  details.set_message(message);
  auto* any = details.add_details();
  any->set_type_url(std::string(kErrorInfoTypeUrl));
  any->set_value(sent.SerializeAsString());
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
