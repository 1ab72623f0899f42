// Shared test helpers: temp dirs, condition polling and an in-memory test PKI.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace wsbridge::testing {

// Polls `condition` every millisecond or so until it holds or `timeout` passes.
// Returns whether it held. For waiting on effects in other threads; never a sleep.
bool WaitFor(const std::function<bool()>& condition,
             std::chrono::milliseconds timeout = std::chrono::seconds(10));

struct HttpResponse {
  int status = 0;
  std::string headers;  // raw header block
  std::string body;
};

// One HTTP/1.1 request to 127.0.0.1:port with `Connection: close`; reads the whole
// answer (each read bounded by 10 s).
absl::StatusOr<HttpResponse> HttpRequest(int port, const std::string& method,
                                         const std::string& target);

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // Writes `content` to path()/name and returns the full path. Throws on failure.
  std::string WriteFile(std::string_view name, std::string_view content) const;

 private:
  std::string path_;
};

// A certificate with its private key, as PEM text and as files in the PKI's TempDir.
struct CertAndKey {
  std::string name;
  std::string cert_pem;
  std::string key_pem;
  std::string cert_file;
  std::string key_file;
};

// When a certificate is valid, relative to now: from an hour ago for a day by default.
// An expired one: {.not_before = -48h, .not_after = -24h}.
struct CertValidity {
  std::chrono::seconds not_before = std::chrono::hours(-1);
  std::chrono::seconds not_after = std::chrono::hours(24);
};

// Test certificate authorities and leaf certificates generated in memory with OpenSSL
// (EC P-256, SHA-256, valid from an hour ago for a day unless told otherwise). Failures
// throw std::runtime_error.
class TestPki {
 public:
  TestPki() = default;

  const TempDir& dir() const { return dir_; }

  // A self-signed CA. Two CAs made here are unrelated (different keys and names).
  CertAndKey MakeCa(std::string_view name);
  // A server certificate signed by `ca`. Each entry of `hosts` becomes a subjectAltName:
  // an IP address entry when it parses as one, a DNS entry otherwise. The first one is
  // also the subject CN. Use {"localhost", "127.0.0.1"} plus any other name you need; a
  // certificate for the wrong host is one whose `hosts` leave out the name dialled
  // (e.g. {"wrong.example"} for a client connecting to 127.0.0.1).
  CertAndKey IssueServerCert(const CertAndKey& ca, const std::vector<std::string>& hosts,
                             CertValidity validity = {});
  // A client certificate (extendedKeyUsage clientAuth) with subject CN `common_name`.
  CertAndKey IssueClientCert(const CertAndKey& ca, std::string_view common_name);

 private:
  CertAndKey Save(std::string name, std::string cert_pem, std::string key_pem);

  TempDir dir_;
  int counter_ = 0;
};

}  // namespace wsbridge::testing
