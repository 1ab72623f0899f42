#include "daemon/reflection_service.h"

#include <optional>
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

void AnswerInto(const ServerReflectionRequest& request, const std::vector<std::string>& services,
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

// One ServerReflectionInfo stream: admitted once, then each request read is answered
// and written before the next read. Runs on its loop thread only, with one operation in
// flight at a time, so it owns itself from its request to its Finish's completion: a
// caller that goes away fails the read or write in flight, which finishes the stream.
class ReflectionStream final : public core::CqTag {
 public:
  static void Serve(ReflectionService* service, core::CqLoop* loop) {
    auto* s = new ReflectionStream(service, loop);
    const bool asked = loop->RunIfAccepting([s, loop] {
      s->service_->RequestServerReflectionInfo(&s->ctx_, &s->stream_, loop->cq(), loop->cq(), s);
    });
    if (!asked) delete s;
  }

  void Run(bool ok) override {
    switch (step_) {
      case Step::kMatching:
        if (!ok) break;  // the server shut down before a caller came
        counted_.emplace(service_->tracker(),
                         "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
        Serve(service_, loop_);  // the next caller
        if (grpc::Status auth = service_->authorize()(ctx_); !auth.ok()) return Finish(auth);
        return Read();
      case Step::kReading:
        if (!ok) return Finish(grpc::Status::OK);  // the caller is done (or gone)
        response_ = service_->Answer(request_);
        step_ = Step::kWriting;
        stream_.Write(response_, this);
        return;
      case Step::kWriting:
        if (!ok) return Finish(grpc::Status::OK);  // the caller is gone
        return Read();
      case Step::kFinishing:
        break;
    }
    delete this;
  }

 private:
  enum class Step { kMatching, kReading, kWriting, kFinishing };
  ReflectionStream(ReflectionService* service, core::CqLoop* loop)
      : service_(service), loop_(loop), stream_(&ctx_) {}
  ~ReflectionStream() = default;

  void Read() {
    step_ = Step::kReading;
    stream_.Read(&request_, this);
  }
  void Finish(const grpc::Status& status) {
    counted_->Sent(status.error_code());
    step_ = Step::kFinishing;
    stream_.Finish(status, this);
  }

  ReflectionService* service_;
  core::CqLoop* loop_;
  grpc::ServerContext ctx_;
  grpc::ServerAsyncReaderWriter<ServerReflectionResponse, ServerReflectionRequest> stream_;
  ServerReflectionRequest request_;
  ServerReflectionResponse response_;
  std::optional<CountedCall> counted_;  // from the match to the end
  Step step_ = Step::kMatching;
};

}  // namespace

ReflectionService::ReflectionService(std::vector<std::string> services, Authorizer authorize)
    : services_(std::move(services)), authorize_(std::move(authorize)) {}

void ReflectionService::Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker) {
  tracker_ = tracker;
  for (core::CqLoop* loop : loops) ReflectionStream::Serve(this, loop);
}

ServerReflectionResponse ReflectionService::Answer(const ServerReflectionRequest& request) const {
  ServerReflectionResponse response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  AnswerInto(request, services_, response);
  return response;
}

}  // namespace wsbridge::daemon
