// Small real clients used by the daemon tests: gRPC server reflection (v1alpha) and
// health checks (HTTP/1.1 over a plain socket is in tests/support).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/channel.h>

#include "absl/status/statusor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/support/test_support.h"

namespace wsbridge::daemontest {

using wsbridge::testing::HttpRequest;
using wsbridge::testing::HttpResponse;

// Names from a list_services reflection request; `authorization` (e.g. "Bearer x") is
// sent as metadata when not empty.
absl::StatusOr<std::vector<std::string>> ReflectionListServices(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& authorization = "");
// file_containing_symbol: the serialized FileDescriptorProtos, or the server's error
// (NOT_FOUND etc.) as a status.
absl::StatusOr<std::vector<std::string>> ReflectionFileContainingSymbol(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& symbol);

// An open reflection stream that has answered one list_services request and stays open
// until Finish() (a long-lived client call for drain tests).
class OpenReflectionStream {
 public:
  explicit OpenReflectionStream(const std::shared_ptr<grpc::Channel>& channel);
  ~OpenReflectionStream();
  // Whether the first answer arrived.
  bool ok() const { return ok_; }
  // Waits for the server to end the stream and returns its status.
  grpc::Status Finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
  bool ok_ = false;
};

// Health.Check; the gRPC status on failure.
absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service = "",
    std::chrono::milliseconds timeout = std::chrono::seconds(5));

}  // namespace wsbridge::daemontest
