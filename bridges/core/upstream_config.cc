#include "bridges/core/upstream_config.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {
namespace {

// Secrets are tokens and keys, never large; a bigger file is almost surely the wrong one.
constexpr size_t kMaxSecretFileBytes = 64 * 1024;

std::string Quoted(absl::string_view s) { return absl::StrCat("\"", s, "\""); }

}  // namespace

Duration DurationOr(const google::protobuf::Duration& d, Duration unset) {
  if (d.seconds() == 0 && d.nanos() == 0) return unset;
  return std::chrono::seconds(d.seconds()) + std::chrono::nanoseconds(d.nanos());
}

absl::Status FileError(int err, std::string_view what, const std::string& path) {
  std::string message = absl::StrCat("cannot read ", absl::string_view(what.data(), what.size()),
                                     what.empty() ? "" : " ", Quoted(path), ": ",
                                     std::strerror(err), " (check the path and permissions)");
  switch (err) {
    case ENOENT:
    case ENOTDIR: return absl::NotFoundError(std::move(message));
    case EACCES:
    case EPERM: return absl::PermissionDeniedError(std::move(message));
    default: return absl::FailedPreconditionError(std::move(message));
  }
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes,
                                          std::string_view what) {
  const absl::string_view w(what.data(), what.size());
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return FileError(errno, what, path);
  }
  std::string data;
  char buf[8192];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return FileError(err, what, path);
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > max_bytes) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(w, " ", Quoted(path), " is larger than ",
                                                     max_bytes, " bytes (is it the right file?)"));
    }
  }
  ::close(fd);
  return data;
}

absl::StatusOr<std::string> ResolveSecret(const config::v1::Secret& secret) {
  std::string value;
  switch (secret.source_case()) {
    case config::v1::Secret::kEnv: {
      const std::string& name = secret.env();
      if (name.empty()) {
        return absl::InvalidArgumentError(
            "the environment variable name is empty (write env: VARIABLE_NAME)");
      }
      const char* v = std::getenv(name.c_str());
      if (v == nullptr) {
        return absl::NotFoundError(absl::StrCat("environment variable ", Quoted(name),
                                                " is not set (export it before starting "
                                                "wsbridged, or use file:)"));
      }
      value = v;
      if (value.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("environment variable ", Quoted(name),
                                                       " is empty (give it the secret's value)"));
      }
      break;
    }
    case config::v1::Secret::kFile: {
      const std::string& path = secret.file();
      if (path.empty()) {
        return absl::InvalidArgumentError("the file path is empty (write file: /path/to/secret)");
      }
      absl::StatusOr<std::string> data = ReadSmallFile(path, kMaxSecretFileBytes, "secret file");
      if (!data.ok()) return data.status();
      value = std::move(*data);
      if (absl::EndsWith(value, "\r\n")) {
        value.resize(value.size() - 2);
      } else if (absl::EndsWith(value, "\n")) {
        value.pop_back();
      }
      if (value.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("secret file ", Quoted(path),
                                                       " is empty (write the secret into it)"));
      }
      break;
    }
    case config::v1::Secret::kValue:
      if (secret.value().empty()) {
        return absl::InvalidArgumentError("the inline value is empty (write the secret, or use "
                                          "env: or file:)");
      }
      value = secret.value();
      break;
    case config::v1::Secret::SOURCE_NOT_SET:
      return absl::InvalidArgumentError(
          "no source is set (write one of env: VARIABLE, file: /path or value: ...)");
  }
  log::RegisterSecret(value);
  return value;
}

// --- SecretSource ---

absl::StatusOr<std::shared_ptr<SecretSource>> SecretSource::Create(config::v1::Secret secret) {
  absl::StatusOr<std::string> first = ResolveSecret(secret);
  if (!first.ok()) return first.status();
  const bool refreshable = secret.source_case() != config::v1::Secret::kValue;
  std::shared_ptr<SecretSource> s(new SecretSource(std::move(secret), refreshable));
  s->Set(*std::move(first));
  return s;
}

std::shared_ptr<SecretSource> SecretSource::Fixed(std::string value) {
  std::shared_ptr<SecretSource> s(new SecretSource(config::v1::Secret(), false));
  // Redacted while the source lives: per-call credentials come and go with their
  // sessions, and the set of redacted values must not grow with every one ever seen.
  s->redaction_ = log::RegisterSecretWhileHeld(value);
  s->Set(std::move(value));
  return s;
}

absl::StatusOr<std::string> SecretSource::Current() const {
  absl::MutexLock lock(&mu_);
  return value_;
}

void SecretSource::Refresh() {
  if (refreshable_) Set(ResolveSecret(secret_));
}

void SecretSource::Set(absl::StatusOr<std::string> value) {
  absl::MutexLock lock(&mu_);
  const bool same = value.ok() == value_.ok() &&
                    (value.ok() ? *value == *value_ : value.status() == value_.status());
  if (same && version_.load() != 0) return;
  value_ = std::move(value);
  version_.fetch_add(1, std::memory_order_acq_rel);
}

// --- SecretRefresher ---

SecretRefresher::SecretRefresher(Duration interval) : interval_(interval) {}

SecretRefresher::~SecretRefresher() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void SecretRefresher::Watch(std::shared_ptr<SecretSource> source) {
  if (source == nullptr || !source->refreshable()) return;
  absl::MutexLock lock(&mu_);
  sources_.push_back(std::move(source));
  if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
}

void SecretRefresher::RefreshNow() {
  absl::MutexLock lock(&mu_);
  kick_ = true;
}

void SecretRefresher::Run() {
  for (;;) {
    std::vector<std::shared_ptr<SecretSource>> sources;
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || kick_; };
      mu_.AwaitWithTimeout(absl::Condition(&wake), absl::FromChrono(interval_));
      if (stop_) return;
      kick_ = false;
      sources = sources_;
    }
    for (auto& s : sources) s->Refresh();
  }
}

// --- URL and connection options ---

absl::Status CheckUpstreamUrl(const config::v1::UpstreamConfig& upstream) {
  const std::string& url = upstream.url();
  std::string shown = Quoted(log::RedactUrl(url));
  size_t sep = url.find("://");
  std::string scheme = absl::AsciiStrToLower(url.substr(0, sep == std::string::npos ? 0 : sep));
  if (sep == std::string::npos || (scheme != "ws" && scheme != "wss")) {
    return absl::InvalidArgumentError(
        absl::StrCat(shown, " is not a ws:// or wss:// URL (write e.g. wss://host/path)"));
  }
  absl::string_view rest = absl::string_view(url).substr(sep + 3);
  absl::string_view authority = rest.substr(0, rest.find_first_of("/?#"));
  if (authority.find('@') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        shown, " carries user info (put credentials in a Secret, not in the URL)"));
  }
  absl::string_view host = authority;
  absl::string_view port;
  if (absl::StartsWith(authority, "[")) {
    size_t close = authority.find(']');
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(shown, " has an unclosed IPv6 bracket"));
    }
    host = authority.substr(1, close - 1);
    absl::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') {
        return absl::InvalidArgumentError(absl::StrCat(shown, " has a malformed host"));
      }
      port = after.substr(1);
    }
  } else if (size_t colon = authority.rfind(':'); colon != absl::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
  }
  if (host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(shown, " has no host"));
  }
  uint32_t port_number = 0;
  if (authority.back() == ':' ||
      (!port.empty() && (port.find_first_not_of("0123456789") != absl::string_view::npos ||
                         port.size() > 5 || !absl::SimpleAtoi(port, &port_number) ||
                         port_number == 0 || port_number > 65535))) {
    return absl::InvalidArgumentError(
        absl::StrCat(shown, " has an invalid port (use 1 to 65535)"));
  }
  if (scheme == "ws" && !upstream.allow_plaintext()) {
    return absl::InvalidArgumentError(absl::StrCat(
        shown, " is plaintext (use wss://, or set allow_plaintext: true for local emulators "
               "and tests only)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ConnectionOptions> ToConnectionOptions(const config::v1::UpstreamConfig& u,
                                                      std::string name) {
  if (absl::Status s = CheckUpstreamUrl(u); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": url: ", s.message()));
  }
  ConnectionOptions o;
  o.name = std::move(name);
  o.allow_plaintext = u.allow_plaintext();
  o.tls.verify_peer = !u.tls().insecure_skip_verify();
  o.tls.ca_file = u.tls().ca_file();
  o.tls.server_name = u.tls().server_name();
  o.tls.cert_file = u.tls().cert_file();
  o.tls.key_file = u.tls().key_file();
  o.connect_timeout = DurationOr(u.connect_timeout(), o.connect_timeout);
  o.handshake_timeout = DurationOr(u.handshake_timeout(), o.handshake_timeout);
  o.close_timeout = DurationOr(u.close_timeout(), o.close_timeout);
  if (u.max_message_bytes() != 0) o.max_message_bytes = u.max_message_bytes();
  if (u.send_queue_messages() != 0) o.send_queue_max_messages = u.send_queue_messages();
  if (u.send_queue_bytes() != 0) o.send_queue_max_bytes = u.send_queue_bytes();
  const config::v1::KeepaliveConfig& k = u.keepalive();
  o.keepalive.ping_interval =
      k.disabled() ? Duration::zero() : DurationOr(k.ping_interval(), o.keepalive.ping_interval);
  o.keepalive.pong_timeout = DurationOr(k.pong_timeout(), o.keepalive.pong_timeout);
  o.keepalive.heartbeat_interval =
      DurationOr(k.heartbeat_interval(), o.keepalive.heartbeat_interval);
  const config::v1::BackoffConfig& b = u.backoff();
  o.backoff.initial = DurationOr(b.initial(), o.backoff.initial);
  o.backoff.max = DurationOr(b.max(), o.backoff.max);
  if (b.multiplier() != 0) o.backoff.multiplier = b.multiplier();
  o.backoff.reset_after = DurationOr(b.reset_after(), o.backoff.reset_after);
  if (o.backoff.max < o.backoff.initial) {
    return absl::InvalidArgumentError(
        absl::StrCat(o.name, ": backoff.max is shorter than backoff.initial (raise max)"));
  }
  return o;
}

std::vector<std::pair<std::string, std::string>> UpstreamHeaders(
    const config::v1::UpstreamConfig& upstream) {
  std::map<std::string, std::string> sorted(upstream.headers().begin(), upstream.headers().end());
  return {sorted.begin(), sorted.end()};
}

}  // namespace wsbridge::core

namespace wsbridge::core {

absl::StatusOr<UpstreamEndpoint> ToEndpoint(const config::v1::UpstreamConfig& upstream,
                                            std::string name) {
  if (absl::Status st = CheckUpstreamUrl(upstream); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("upstream.url: ", st.message()));
  }
  absl::StatusOr<ConnectionOptions> conn = ToConnectionOptions(upstream, std::move(name));
  if (!conn.ok()) return conn.status();
  UpstreamEndpoint e;
  e.url = upstream.url();
  e.headers = UpstreamHeaders(upstream);
  e.connection = *std::move(conn);
  e.connection.reconnect = true;
  return e;
}

absl::StatusOr<std::shared_ptr<SecretSource>> LoadSecret(const config::v1::Secret& secret,
                                                         std::string_view field) {
  absl::StatusOr<std::shared_ptr<SecretSource>> s = SecretSource::Create(secret);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(Av(field), ": ", s.status().message()));
  }
  return s;
}

}  // namespace wsbridge::core
