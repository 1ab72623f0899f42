// Upstream config adapters every bridge factory uses: secrets, URL checks and
// UpstreamConfig -> ConnectionOptions. They live in core so that no bridge includes
// daemon/ (the daemon's config loader calls them too).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/connection.h"
#include "wsbridge/config/v1/common.pb.h"

namespace wsbridge::core {

// The status for a failed file access: NOT_FOUND, PERMISSION_DENIED or
// FAILED_PRECONDITION by errno, saying "cannot read <what> "<path>": <reason> (check the
// path and permissions)".
absl::Status FileError(int err, std::string_view what, const std::string& path);

// Reads a whole (small) file with POSIX calls, so directories and oversize files give a
// clear errno-based reason. `what` names the file's role in messages ("secret file").
// Blocking I/O: never call it on an io or completion-queue thread.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes,
                                          std::string_view what);

// The current value of a secret: the environment variable, the file's contents (one
// trailing newline stripped) or the inline value. Errors name the variable or file, never
// the value. On success the value is registered with log::RegisterSecret, so it is
// redacted from every later log line. Blocking for file secrets (see SecretSource).
absl::StatusOr<std::string> ResolveSecret(const config::v1::Secret& secret);

// A secret whose value is kept current off the io and completion-queue threads: Current()
// returns the last value read and never does I/O. Env and file secrets are re-read by a
// SecretRefresher (every second by default), so a rotated Kubernetes Secret takes effect
// within that time without a restart. Thread-safe.
class SecretSource {
 public:
  // Reads the secret once now (blocking; call at start-up, from the factory). The error
  // of that first read is returned, so a missing variable or file is a start-up error.
  static absl::StatusOr<std::shared_ptr<SecretSource>> Create(config::v1::Secret secret);
  // A fixed value that never changes (per-call credentials, tests). Redacted from logs
  // and messages while the source lives.
  static std::shared_ptr<SecretSource> Fixed(std::string value);

  // The last value read, or the last read's error. Never blocks on I/O.
  absl::StatusOr<std::string> Current() const;
  // Bumps whenever Current() changes (value or error), so callers can cache what they
  // derive from it (a hash, a session key) and compare versions cheaply.
  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  // Re-reads now. Blocking for file secrets: only SecretRefresher and start-up call it.
  void Refresh();
  // Whether Refresh() can change anything (env and file secrets).
  bool refreshable() const { return refreshable_; }

 private:
  SecretSource(config::v1::Secret secret, bool refreshable)
      : secret_(std::move(secret)), refreshable_(refreshable) {}
  void Set(absl::StatusOr<std::string> value);

  const config::v1::Secret secret_;
  const bool refreshable_;
  mutable absl::Mutex mu_;
  absl::StatusOr<std::string> value_ ABSL_GUARDED_BY(mu_) = std::string();
  std::atomic<uint64_t> version_{0};
  std::shared_ptr<const void> redaction_;  // Fixed(): the value's redaction
};

// One thread that re-reads its SecretSources every `interval` until destroyed.
class SecretRefresher {
 public:
  explicit SecretRefresher(Duration interval = std::chrono::seconds(1));
  ~SecretRefresher();
  SecretRefresher(const SecretRefresher&) = delete;
  SecretRefresher& operator=(const SecretRefresher&) = delete;

  // Starts watching `source` (no-op for fixed ones); the thread starts with the first.
  void Watch(std::shared_ptr<SecretSource> source);
  // Re-reads every watched source at once (tests, and after an auth refusal).
  void RefreshNow();

 private:
  void Run();

  const Duration interval_;
  absl::Mutex mu_;
  std::vector<std::shared_ptr<SecretSource>> sources_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool kick_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Checks an upstream URL against the config: ws:// or wss:// with a host and a valid
// port, no user info, and ws:// only with allow_plaintext. The message names no field;
// callers prefix theirs.
absl::Status CheckUpstreamUrl(const config::v1::UpstreamConfig& upstream);

// Where and how a bridge reaches its upstream: what every bridge's options start with.
struct UpstreamEndpoint {
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;  // extra handshake headers
  ConnectionOptions connection;
};

// A configured upstream checked and converted: the URL (errors say "upstream.url: ..."),
// reconnecting connection options named `name` in logs, and the headers.
absl::StatusOr<UpstreamEndpoint> ToEndpoint(const config::v1::UpstreamConfig& upstream,
                                            std::string name);

// A configured secret, read once now (a missing variable or file is a start-up error)
// and then kept current off the io threads. Errors are prefixed with `field`.
absl::StatusOr<std::shared_ptr<SecretSource>> LoadSecret(const config::v1::Secret& secret,
                                                         std::string_view field);

// Connection options for one upstream. A field left unset takes the ConnectionOptions
// default (which is the documented default in common.proto). `name` is used in logs,
// e.g. "dfx/default". Headers are not part of ConnectionOptions: the bridge adds
// `upstream.headers()` to its HandshakeRequest (see UpstreamHeaders).
absl::StatusOr<ConnectionOptions> ToConnectionOptions(const config::v1::UpstreamConfig& upstream,
                                                      std::string name);

// A configured duration, or `unset` when the field is not set.
Duration DurationOr(const google::protobuf::Duration& d, Duration unset);

// The configured extra handshake headers, in a stable order.
std::vector<std::pair<std::string, std::string>> UpstreamHeaders(
    const config::v1::UpstreamConfig& upstream);

}  // namespace wsbridge::core
