#include "tools/wsbridgectl/reflection_db.h"

#include <algorithm>
#include <optional>


#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace wsbridge::ctl {

ReflectionDatabase::ReflectionDatabase(std::shared_ptr<grpc::Channel> channel,
                                       const GlobalOptions& options)
    : channel_(std::move(channel)), options_(options) {}

ReflectionDatabase::~ReflectionDatabase() { Close(); }

void ReflectionDatabase::Close() {
  if (stream_ == nullptr) return;
  stream_->WritesDone();
  stream_->Finish();
  stream_.reset();
  context_.reset();
}

std::optional<ReflectionDatabase::Response> ReflectionDatabase::Ask(const Request& request) {
  if (!transport_error_.ok()) return std::nullopt;
  if (stream_ == nullptr) {
    context_ = std::make_unique<grpc::ClientContext>();
    // The whole conversation is one call: it gets the unary deadline (--timeout or 10 s).
    PrepareContext(options_, /*streaming=*/false, *context_);
    // The daemon's own reflection.proto (daemon/proto), the one it serves.
    stream_ = ::grpc::reflection::v1alpha::ServerReflection::NewStub(channel_)
                  ->ServerReflectionInfo(context_.get());
  }
  Response response;
  if (!stream_->Write(request) || !stream_->Read(&response)) {
    grpc::Status status = stream_->Finish();
    stream_.reset();
    transport_error_ =
        status.ok() ? grpc::Status(grpc::StatusCode::UNKNOWN,
                                   "the server ended the reflection stream without an answer")
                    : grpc::Status(status.error_code(),
                                   absl::StrCat("server reflection: ", status.error_message()),
                                   status.error_details());
    return std::nullopt;
  }
  return response;
}

void ReflectionDatabase::AddFiles(const Response& response) {
  for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
    google::protobuf::FileDescriptorProto file;
    if (!file.ParseFromString(bytes)) continue;
    if (files_.count(file.name()) != 0) continue;
    index_.Add(file);
    files_.emplace(file.name(), std::move(file));
  }
}

absl::StatusOr<std::vector<std::string>> ReflectionDatabase::ListServices() {
  Request request;
  request.set_list_services("*");
  auto response = Ask(request);
  if (!response) {
    return absl::Status(static_cast<absl::StatusCode>(transport_error_.error_code()),
                        transport_error_.error_message());
  }
  if (response->has_error_response()) {
    return absl::Status(static_cast<absl::StatusCode>(response->error_response().error_code()),
                        response->error_response().error_message());
  }
  std::vector<std::string> names;
  for (const auto& service : response->list_services_response().service()) {
    names.push_back(service.name());
  }
  std::sort(names.begin(), names.end());
  return names;
}

bool ReflectionDatabase::FindFileByName(const std::string& filename,
                                        google::protobuf::FileDescriptorProto* output) {
  if (auto it = files_.find(filename); it != files_.end()) {
    *output = it->second;
    return true;
  }
  Request request;
  request.set_file_by_filename(filename);
  auto response = Ask(request);
  if (!response || !response->has_file_descriptor_response()) return false;
  AddFiles(*response);
  auto it = files_.find(filename);
  if (it == files_.end()) return false;
  *output = it->second;
  return true;
}

bool ReflectionDatabase::FindFileContainingSymbol(const std::string& symbol_name,
                                                  google::protobuf::FileDescriptorProto* output) {
  if (index_.FindFileContainingSymbol(symbol_name, output)) return true;
  if (missing_symbols_.count(symbol_name) != 0) return false;
  Request request;
  request.set_file_containing_symbol(symbol_name);
  auto response = Ask(request);
  if (!response) return false;
  if (!response->has_file_descriptor_response()) {
    missing_symbols_.insert(symbol_name);
    return false;
  }
  // The answer holds the file and everything it imports.
  AddFiles(*response);
  return index_.FindFileContainingSymbol(symbol_name, output);
}

bool ReflectionDatabase::FindFileContainingExtension(
    const std::string& /*containing_type*/, int /*field_number*/,
    google::protobuf::FileDescriptorProto* /*output*/) {
  // Extensions ride along with the files that define them; nothing asks for them alone.
  return false;
}

Symbol FindSymbol(const google::protobuf::DescriptorPool& pool, std::string name) {
  // "pkg.Service/Method" (the call syntax) and a leading dot both name the same symbol.
  name = absl::StrReplaceAll(name, {{"/", "."}});
  if (!name.empty() && name.front() == '.') name.erase(0, 1);
  Symbol symbol;
  if ((symbol.service = pool.FindServiceByName(name))) return symbol;
  if ((symbol.method = pool.FindMethodByName(name))) return symbol;
  if ((symbol.message = pool.FindMessageTypeByName(name))) return symbol;
  if ((symbol.enum_type = pool.FindEnumTypeByName(name))) return symbol;
  // Servers differ on whether a method is a reflection symbol of its own: ask for the
  // service and look the method up in it.
  if (size_t dot = name.rfind('.'); dot != std::string::npos) {
    if (const auto* service = pool.FindServiceByName(name.substr(0, dot))) {
      symbol.method = service->FindMethodByName(name.substr(dot + 1));
    }
  }
  return symbol;
}

}  // namespace wsbridge::ctl
