#include "bridges/core/bridge_base.h"

#include "bridges/core/grpc_calls.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {

BridgeBase::BridgeBase(BridgeContext context, std::string upstream,
                       std::vector<std::string> service_names)
    : context_(std::move(context)),
      upstream_(std::move(upstream)),
      service_names_(std::move(service_names)) {
  if (context_.metrics != nullptr) {
    Labels labels = {{"bridge", context_.name}};
    malformed_ = &context_.metrics->GetCounter(
        "wsbridge_upstream_malformed_frames_total",
        "Upstream frames that could not be parsed and were dropped.", labels);
    unrouted_ = &context_.metrics->GetCounter(
        "wsbridge_upstream_unrouted_frames_total",
        "Upstream answers or events for no open request or subscription (dropped).", labels);
    rtt_ = &context_.metrics->GetHistogram("wsbridge_upstream_rtt_seconds",
                                           "Upstream request round-trip time.", labels);
  }
}

BridgeBase::~BridgeBase() = default;

void BridgeBase::InitPool(SessionPoolOptions options, SessionPool::SessionFactory factory,
                          CredentialPolicy credentials,
                          std::shared_ptr<SecretSource> default_credential) {
  options.bridge = context_.name;
  options.upstream = upstream_;
  const CallerLimits& limits = context_.limits;
  if (limits.refusal_memory.has_value()) {
    options.refusal_memory = std::chrono::duration_cast<Duration>(*limits.refusal_memory);
  }
  if (limits.max_sessions_per_caller.has_value()) {
    options.max_sessions_per_caller = *limits.max_sessions_per_caller;
  }
  credentials_ = std::move(credentials);
  pool_ = std::make_unique<SessionPool>(std::move(options), context_.executor, std::move(factory),
                                        [this] { HealthChanged(); });
  if (default_credential != nullptr) pool_->SetDefault(std::move(default_credential));
}

void BridgeBase::Shutdown(const grpc::Status& status, std::function<void()> done) {
  draining_.store(true);
  calls_.AbortAll(status);
  pool_->Shutdown(std::move(done));
}

void BridgeBase::CallStarted() {
  if (context_.calls != nullptr) context_.calls->Started();
}

void BridgeBase::CallFinished(std::string_view method, grpc::StatusCode code) {
  if (context_.calls != nullptr) context_.calls->Finished(method, code);
}

absl::Status BridgeBase::ShuttingDown() const {
  return absl::UnavailableError(
      absl::StrCat("the ", upstream_, " bridge is shutting down; retry on another instance"));
}

absl::Status BridgeBase::Admit(const grpc::ServerContextBase& ctx) const {
  if (draining_.load()) return ShuttingDown();
  if (calls_.size() > max_open_calls_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the ", upstream_, " bridge already has ", max_open_calls_,
        " open calls (max_open_calls); retry later or spread the load over more instances"));
  }
  if (ctx.deadline() <= std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError(
        "the call's deadline had passed when it arrived; nothing was sent upstream");
  }
  if (context_.authorize) {
    grpc::Status auth = context_.authorize(ctx);
    if (!auth.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(auth.error_code()), auth.error_message());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Lease> BridgeBase::SessionFor(const grpc::ServerContextBase& ctx) {
  absl::StatusOr<Lease> lease = CredentialSession(ctx);
  if (!lease.ok() || !*lease) return lease;
  if (absl::Status st = WaitOrFailFast(ctx, *lease); !st.ok()) return st;
  return lease;
}

absl::Status BridgeBase::WaitOrFailFast(const grpc::ServerContextBase& ctx, Lease& lease) {
  absl::Status down = lease->Unreachable();
  if (down.ok()) return down;
  // The upstream is down: fail fast unless the caller asked to wait, and bound those.
  if (!CallerAsksToWait(ctx)) return down;
  if (waiting_calls_->fetch_add(1) >= max_waiting_calls_) {
    waiting_calls_->fetch_sub(1);
    return absl::ResourceExhaustedError(absl::StrCat(
        "the ", upstream_, " bridge already has ", max_waiting_calls_,
        " calls waiting for its unreachable upstream (max_waiting_calls); ", down.message()));
  }
  std::shared_ptr<std::atomic<size_t>> count = waiting_calls_;
  lease.Hold(std::shared_ptr<void>(nullptr, [count](void*) { count->fetch_sub(1); }));
  return absl::OkStatus();
}

absl::StatusOr<Lease> BridgeBase::CredentialSession(const grpc::ServerContextBase& ctx) {
  const std::string& key = credentials_.metadata_key;
  const auto& md = ctx.client_metadata();
  auto it = key.empty() ? md.end() : md.find(grpc::string_ref(key.data(), key.size()));
  if (it == md.end()) {
    if (!pool_->has_default()) {
      return absl::UnauthenticatedError(absl::StrCat(
          "no credential: this ", upstream_, " bridge has no configured one; send it in the \"",
          Av(key), "\" metadata"));
    }
    return pool_->AcquireDefault();
  }
  if (!credentials_.allow_per_call) {
    return absl::PermissionDeniedError(absl::StrCat(
        "this bridge does not accept per-call credentials (\"", Av(key),
        "\" metadata); remove it, or allow them in the bridge config"));
  }
  std::string_view value(it->second.data(), it->second.size());
  if (value.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("the \"", Av(key), "\" metadata is empty"));
  }
  return pool_->Acquire(CredentialKey(value), value, CallerIdentity(ctx));
}

SessionOptions BridgeBase::BaseSessionOptions(const std::string& id, bool pinned,
                                              const ConnectionOptions& connection,
                                              std::string_view error_domain,
                                              const std::function<void(ConnectionOptions&)>& adjust) {
  SessionOptions so;
  so.bridge = context_.name;
  so.id = id;
  so.error_domain = std::string(error_domain);
  {
    absl::MutexLock lock(&shared_connection_mu_);
    if (shared_connection_source_ != &connection || shared_connection_ == nullptr) {
      auto shared = std::make_shared<ConnectionOptions>(connection);
      if (adjust) adjust(*shared);
      shared_connection_ = std::move(shared);
      shared_connection_source_ = &connection;
    }
    so.shared_connection = shared_connection_;  // the connection is named `id`
  }
  so.upstream = upstream_;
  so.malformed_frames = malformed_;
  so.unrouted_frames = unrouted_;
  so.rtt = rtt_;
  if (pinned) so.health_changed = health_changed_;
  return so;
}

bool CallerAsksToWait(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  auto w = md.find(grpc::string_ref(kWaitForReadyMetadata.data(), kWaitForReadyMetadata.size()));
  return w != md.end() && std::string_view(w->second.data(), w->second.size()) == "true";
}

std::string CallerIdentity(const grpc::ServerContextBase& ctx) {
  // "ipv4:10.1.2.3:45678" -> "ipv4:10.1.2.3"; "unix:/run/x.sock" stays (one identity).
  std::string peer = ctx.peer();
  if (absl::StartsWith(peer, "ipv4:") || absl::StartsWith(peer, "ipv6:")) {
    if (size_t colon = peer.rfind(':'); colon != std::string::npos && colon > 4) {
      peer.resize(colon);
    }
  }
  return peer;
}

Clock::time_point SteadyDeadline(const grpc::ServerContextBase& ctx) {
  auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  auto left = d - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

absl::Status SlowConsumer(size_t limit, std::string_view items, std::string_view domain) {
  return WithErrorInfo(
      absl::ResourceExhaustedError(absl::StrCat(
          "this stream fell ", limit, " ", Av(items),
          " behind; it was ended so other subscribers are not held back. Read faster or "
          "subscribe again")),
      "SLOW_CONSUMER", domain);
}

}  // namespace wsbridge::core
