#include "daemon/reflection_service.h"

#include <set>
#include <utility>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

namespace wsbridge::daemon {
namespace {

namespace pb = google::protobuf;
using grpc::reflection::v1alpha::ServerReflectionRequest;
using grpc::reflection::v1alpha::ServerReflectionResponse;

void SetError(ServerReflectionResponse& response, grpc::StatusCode code, const char* message) {
  response.mutable_error_response()->set_error_code(static_cast<int>(code));
  response.mutable_error_response()->set_error_message(message);
}

// The file, then every file it depends on that this answer does not hold yet (what
// clients need to build the descriptors; the same order gRPC's own reflection uses).
void AddFile(const pb::FileDescriptor* file, ServerReflectionResponse& response,
             std::set<std::string>& seen) {
  if (!seen.insert(file->name()).second) return;
  pb::FileDescriptorProto proto;
  file->CopyTo(&proto);
  response.mutable_file_descriptor_response()->add_file_descriptor_proto(
      proto.SerializeAsString());
  for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), response, seen);
}

void Answer(const ServerReflectionRequest& request, const std::vector<std::string>& services,
            ServerReflectionResponse& response) {
  // Every descriptor linked into the binary (wsbridged links all of its protos whole).
  const pb::DescriptorPool* pool = pb::DescriptorPool::generated_pool();
  std::set<std::string> seen;
  switch (request.message_request_case()) {
    case ServerReflectionRequest::kFileByFilename: {
      const pb::FileDescriptor* file = pool->FindFileByName(request.file_by_filename());
      if (file == nullptr) return SetError(response, grpc::StatusCode::NOT_FOUND, "File not found.");
      return AddFile(file, response, seen);
    }
    case ServerReflectionRequest::kFileContainingSymbol: {
      const pb::FileDescriptor* file =
          pool->FindFileContainingSymbol(request.file_containing_symbol());
      if (file == nullptr) {
        return SetError(response, grpc::StatusCode::NOT_FOUND, "Symbol not found.");
      }
      return AddFile(file, response, seen);
    }
    case ServerReflectionRequest::kFileContainingExtension: {
      const auto& ext = request.file_containing_extension();
      const pb::Descriptor* type = pool->FindMessageTypeByName(ext.containing_type());
      if (type == nullptr) return SetError(response, grpc::StatusCode::NOT_FOUND, "Type not found.");
      const pb::FieldDescriptor* field = pool->FindExtensionByNumber(type, ext.extension_number());
      if (field == nullptr) {
        return SetError(response, grpc::StatusCode::NOT_FOUND, "Extension not found.");
      }
      return AddFile(field->file(), response, seen);
    }
    case ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const pb::Descriptor* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) return SetError(response, grpc::StatusCode::NOT_FOUND, "Type not found.");
      std::vector<const pb::FieldDescriptor*> extensions;
      pool->FindAllExtensions(type, &extensions);
      auto* numbers = response.mutable_all_extension_numbers_response();
      numbers->set_base_type_name(type->full_name());
      for (const auto* e : extensions) numbers->add_extension_number(e->number());
      return;
    }
    case ServerReflectionRequest::kListServices: {
      auto* list = response.mutable_list_services_response();
      for (const auto& name : services) list->add_service()->set_name(name);
      return;
    }
    case ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
      break;
  }
  SetError(response, grpc::StatusCode::UNIMPLEMENTED, "Unknown reflection request.");
}

}  // namespace

ReflectionService::ReflectionService(std::vector<std::string> services, Authorizer authorize)
    : services_(std::move(services)), authorize_(std::move(authorize)) {}

grpc::Status ReflectionService::ServerReflectionInfo(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<ServerReflectionResponse, ServerReflectionRequest>* stream) {
  if (grpc::Status auth = authorize_(*context); !auth.ok()) return auth;
  ServerReflectionRequest request;
  while (stream->Read(&request)) {
    ServerReflectionResponse response;
    response.set_valid_host(request.host());
    *response.mutable_original_request() = request;
    Answer(request, services_, response);
    if (!stream->Write(response)) break;
  }
  return grpc::Status::OK;
}

}  // namespace wsbridge::daemon
