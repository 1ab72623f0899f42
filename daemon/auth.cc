#include "daemon/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <memory>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"

namespace wsbridge::daemon {

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Comparing digests keeps the time independent of where, and whether, the lengths
  // differ.
  unsigned char da[SHA256_DIGEST_LENGTH];
  unsigned char db[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(a.data()), a.size(), da);
  SHA256(reinterpret_cast<const unsigned char*>(b.data()), b.size(), db);
  return CRYPTO_memcmp(da, db, sizeof(da)) == 0;
}

Authorizer WithMetadataLimit(Authorizer inner, size_t max_bytes) {
  return [inner = std::move(inner), max_bytes](const grpc::ServerContextBase& context) {
    size_t total = 0;
    for (const auto& [key, value] : context.client_metadata()) {
      total += key.size() + value.size() + 32;
    }
    if (total > max_bytes) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("the call's metadata is ", total,
                                       " bytes, above this server's limit of ", max_bytes,
                                       " (server.max_metadata_bytes); send smaller headers"));
    }
    return inner(context);
  };
}

Authorizer MakeBearerAuthorizer(std::string token) {
  if (token.empty()) {
    return [](const grpc::ServerContextBase&) { return grpc::Status::OK; };
  }
  auto expected = std::make_shared<const std::string>(std::move(token));
  return [expected](const grpc::ServerContextBase& context) {
    const auto& metadata = context.client_metadata();
    auto it = metadata.find("authorization");
    if (it == metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "this server requires a bearer token: send `authorization: Bearer "
                          "<token>` metadata");
    }
    std::string_view value(it->second.data(), it->second.size());
    constexpr std::string_view kScheme = "bearer ";
    if (value.size() <= kScheme.size() ||
        !absl::EqualsIgnoreCase(absl::string_view(value.data(), kScheme.size()),
                                absl::string_view(kScheme.data(), kScheme.size()))) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "authorization metadata must have the form `Bearer <token>`");
    }
    absl::string_view presented = absl::StripAsciiWhitespace(
        absl::string_view(value.data() + kScheme.size(), value.size() - kScheme.size()));
    if (!ConstantTimeEquals(std::string_view(presented.data(), presented.size()), *expected)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "bearer token rejected: check the token configured for this client");
    }
    return grpc::Status::OK;
  };
}

}  // namespace wsbridge::daemon
