#include "clients.h"

#include <grpcpp/client_context.h>
#include <grpcpp/impl/codegen/rpc_method.h>
#include <grpcpp/support/sync_stream.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/status.h"
#include "reflection_wire.pb.h"

namespace wsbridge::daemontest {

namespace refl = wsbridge::daemontest::reflection;

namespace {

absl::StatusOr<refl::ServerReflectionResponse> ReflectionCall(
    const std::shared_ptr<grpc::Channel>& channel, const refl::ServerReflectionRequest& request,
    const std::string& authorization = "") {
  // The generated stub would do the same; the copies keep these clients independent of
  // the daemon's own reflection classes, as any outside client is.
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  std::unique_ptr<grpc::ClientReaderWriter<refl::ServerReflectionRequest,
                                           refl::ServerReflectionResponse>>
      stream(grpc::internal::ClientReaderWriterFactory<
             refl::ServerReflectionRequest, refl::ServerReflectionResponse>::Create(channel.get(),
                                                                                    method,
                                                                                    &context));
  refl::ServerReflectionResponse response;
  bool wrote = stream->Write(request);
  stream->WritesDone();
  bool read = wrote && stream->Read(&response);
  grpc::Status status = stream->Finish();
  if (!status.ok()) return core::FromGrpcStatus(status);
  if (!read) return absl::DataLossError("reflection stream ended without an answer");
  return response;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ReflectionListServices(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& authorization) {
  refl::ServerReflectionRequest request;
  request.set_list_services("*");
  auto response = ReflectionCall(channel, request, authorization);
  if (!response.ok()) return response.status();
  if (!response->has_list_services_response()) {
    return absl::DataLossError(absl::StrCat("unexpected answer: ", response->DebugString()));
  }
  std::vector<std::string> names;
  for (const auto& s : response->list_services_response().service()) names.push_back(s.name());
  return names;
}

absl::StatusOr<std::vector<std::string>> ReflectionFileContainingSymbol(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& symbol) {
  refl::ServerReflectionRequest request;
  request.set_file_containing_symbol(symbol);
  auto response = ReflectionCall(channel, request);
  if (!response.ok()) return response.status();
  if (response->has_error_response()) {
    return absl::Status(static_cast<absl::StatusCode>(response->error_response().error_code()),
                        response->error_response().error_message());
  }
  if (!response->has_file_descriptor_response()) {
    return absl::DataLossError(absl::StrCat("unexpected answer: ", response->DebugString()));
  }
  const auto& files = response->file_descriptor_response().file_descriptor_proto();
  return std::vector<std::string>(files.begin(), files.end());
}

using ReflectionReaderWriter =
    grpc::ClientReaderWriter<refl::ServerReflectionRequest, refl::ServerReflectionResponse>;

struct OpenReflectionStream::State {
  grpc::ClientContext context;
  std::unique_ptr<ReflectionReaderWriter> stream;
  bool finished = false;
};

OpenReflectionStream::OpenReflectionStream(const std::shared_ptr<grpc::Channel>& channel)
    : state_(std::make_unique<State>()) {
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  state_->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  state_->stream.reset(grpc::internal::ClientReaderWriterFactory<
                       refl::ServerReflectionRequest,
                       refl::ServerReflectionResponse>::Create(channel.get(), method,
                                                               &state_->context));
  refl::ServerReflectionRequest request;
  request.set_list_services("*");
  refl::ServerReflectionResponse response;
  ok_ = state_->stream->Write(request) && state_->stream->Read(&response) &&
        response.has_list_services_response();
}

OpenReflectionStream::~OpenReflectionStream() {
  if (!state_->finished) {
    state_->context.TryCancel();
    state_->stream->Finish();
  }
}

grpc::Status OpenReflectionStream::Finish() {
  refl::ServerReflectionResponse response;
  while (state_->stream->Read(&response)) {
  }
  state_->finished = true;
  return state_->stream->Finish();
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
    std::chrono::milliseconds timeout) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return core::FromGrpcStatus(status);
  return response.status();
}

}  // namespace wsbridge::daemontest
