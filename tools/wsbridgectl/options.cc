#include "tools/wsbridgectl/options.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "absl/strings/str_cat.h"

namespace wsbridge::ctl {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot read \"", path, "\": ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const GlobalOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.ca_file.empty()) {
      auto ca = ReadFile(options.ca_file, "--ca");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *std::move(ca);
    }
    if (!options.cert_file.empty()) {
      auto cert = ReadFile(options.cert_file, "--cert");
      if (!cert.ok()) return cert.status();
      auto key = ReadFile(options.key_file, "--key");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  // For a daemon reached by an address its certificate does not name (a pod IP).
  if (options.tls && !options.server_name.empty()) {
    args.SetSslTargetNameOverride(options.server_name);
  }
  // Responses as large as the daemon may send (its max_message_bytes is at most 256 MiB).
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(options.target, credentials, args);
}

void PrepareContext(const GlobalOptions& options, bool streaming, grpc::ClientContext& context) {
  if (!options.token.empty()) context.AddMetadata("authorization", "Bearer " + options.token);
  for (const auto& [key, value] : options.headers) context.AddMetadata(key, value);
  if (options.timeout_seconds.has_value() || !streaming) {
    const double seconds = options.timeout_seconds.value_or(kDefaultTimeoutSeconds);
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(
                             std::chrono::duration<double>(seconds)));
  }
}

}  // namespace wsbridge::ctl
