// gRPC server reflection (v1alpha) served by the daemon itself rather than by gRPC's
// reflection plugin, so that it goes through the bearer-token check like every other
// call: reflection describes every API and message of the daemon.
#pragma once

#include <string>
#include <vector>

#include "daemon/auth.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace wsbridge::daemon {

class ReflectionService final : public grpc::reflection::v1alpha::ServerReflection::Service {
 public:
  // `services`: the fully-qualified names list_services answers with. `authorize` is
  // checked once when the stream opens (a failure ends it before any answer).
  ReflectionService(std::vector<std::string> services, Authorizer authorize);

  grpc::Status ServerReflectionInfo(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<grpc::reflection::v1alpha::ServerReflectionResponse,
                               grpc::reflection::v1alpha::ServerReflectionRequest>* stream)
      override;

 private:
  std::vector<std::string> services_;
  Authorizer authorize_;
};

}  // namespace wsbridge::daemon
