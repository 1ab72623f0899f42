// A DescriptorDatabase answered by the daemon's server reflection
// (grpc.reflection.v1alpha.ServerReflectionInfo), so a DescriptorPool built on it
// resolves services, methods and messages (with every file they import) on demand.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/descriptor_database.h>
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/sync_stream.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tools/wsbridgectl/options.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace wsbridge::ctl {

class ReflectionDatabase : public google::protobuf::DescriptorDatabase {
 public:
  // One reflection stream is opened on first use and kept for every question.
  ReflectionDatabase(std::shared_ptr<grpc::Channel> channel, const GlobalOptions& options);
  ~ReflectionDatabase() override;

  // Ends the reflection stream (a later question opens a new one), so that it neither
  // outlives its deadline nor holds the daemon's drain open during a long call.
  void Close();

  // Service names the server lists (sorted).
  absl::StatusOr<std::vector<std::string>> ListServices();

  // The first transport or server error met (e.g. UNAVAILABLE: the daemon is not
  // running); OK while every question got an answer, "not found" answers included.
  const grpc::Status& transport_error() const { return transport_error_; }

  bool FindFileByName(const std::string& filename,
                      google::protobuf::FileDescriptorProto* output) override;
  bool FindFileContainingSymbol(const std::string& symbol_name,
                                google::protobuf::FileDescriptorProto* output) override;
  bool FindFileContainingExtension(const std::string& containing_type, int field_number,
                                   google::protobuf::FileDescriptorProto* output) override;

 private:
  using Request = ::grpc::reflection::v1alpha::ServerReflectionRequest;
  using Response = ::grpc::reflection::v1alpha::ServerReflectionResponse;

  // Sends one request on the stream and reads its answer; nullopt after a transport
  // error (kept in transport_error_).
  std::optional<Response> Ask(const Request& request);
  // Caches every FileDescriptorProto of a file_descriptor_response.
  void AddFiles(const Response& response);

  std::shared_ptr<grpc::Channel> channel_;
  const GlobalOptions& options_;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<Request, Response>> stream_;
  grpc::Status transport_error_;
  std::map<std::string, google::protobuf::FileDescriptorProto> files_;
  google::protobuf::SimpleDescriptorDatabase index_;  // symbol -> file over files_
  std::set<std::string> missing_symbols_;
};

// Finds `name` (a service, method, message or enum; "pkg.Service/Method" is accepted
// for methods) in `pool`. nullptr when the server has no such symbol.
struct Symbol {
  const google::protobuf::ServiceDescriptor* service = nullptr;
  const google::protobuf::MethodDescriptor* method = nullptr;
  const google::protobuf::Descriptor* message = nullptr;
  const google::protobuf::EnumDescriptor* enum_type = nullptr;
  bool found() const { return service || method || message || enum_type; }
};
Symbol FindSymbol(const google::protobuf::DescriptorPool& pool, std::string name);

}  // namespace wsbridge::ctl
