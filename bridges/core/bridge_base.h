// BridgeBase: the core::Bridge plumbing every bridge shares — drain, shutdown, health,
// admin, call accounting and admission, the session pool and its metrics — so a bridge
// is its protocol, its handlers and a factory.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/server_context.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "bridges/core/metrics.h"
#include "bridges/core/session_pool.h"

namespace wsbridge::core {

// Metadata by which a caller opts into waiting for an unreachable upstream. The C++
// server cannot see the client's wait_for_ready flag (it is not sent on the wire), so
// callers say it in metadata: "true" waits (bounded by max_waiting_calls and the
// session's request_timeout); anything else fails fast with UNAVAILABLE.
inline constexpr std::string_view kWaitForReadyMetadata = "x-wsbridge-wait-for-ready";

// Where a call's upstream credential comes from.
struct CredentialPolicy {
  // Metadata key of a per-call credential (e.g. "x-dfx-device-token"); "" = none.
  std::string metadata_key;
  // Whether calls may carry one (multi-tenant use).
  bool allow_per_call = false;
};

class BridgeBase : public Bridge {
 public:
  // `upstream` names the API in messages ("DFX").
  BridgeBase(BridgeContext context, std::string upstream, std::vector<std::string> service_names);
  ~BridgeBase() override;

  // --- Bridge ---
  const std::string& name() const override { return context_.name; }
  std::vector<std::string> ServiceNames() const override { return service_names_; }
  // Calls report themselves through CallAccount, so the daemon's interceptor (which
  // doubles gRPC's completion work per operation) stays off these services.
  bool ObservesOwnCalls() const override { return context_.calls != nullptr; }
  void Start() override { pool_->Start(); }
  void BeginDrain() override { draining_.store(true); }
  void Shutdown(const grpc::Status& status, std::function<void()> done) override;
  bool Serving() const override { return !draining_.load() && pool_->DefaultReady(); }
  std::vector<admin::v1::Session> ListSessions() const override { return pool_->List(); }
  absl::Status CloseSession(std::string_view session_id) override {
    return pool_->Close(session_id);
  }

  // --- For the bridge's calls (any thread). ---
  const BridgeContext& context() const { return context_; }
  const std::string& upstream() const { return upstream_; }
  ActiveCalls& calls() { return calls_; }
  SessionPool& pool() { return *pool_; }
  bool draining() const { return draining_.load(); }
  void CallStarted();
  void CallFinished(std::string_view method, grpc::StatusCode code);
  // Admission every call passes first (after registering with calls()): the drain, the
  // bound on open calls, then the caller's own credentials.
  absl::Status Admit(const grpc::ServerContextBase& ctx) const;
  // Open calls beyond which new ones fail RESOURCE_EXHAUSTED at once. Every open call
  // holds at most one entry in its completion-queue loop's mailbox, so this also bounds
  // the mailboxes.
  void set_max_open_calls(size_t n) { max_open_calls_ = n; }
  // The bridge's own bound on calls waiting for an unreachable upstream; the daemon
  // config's `limits.max_waiting_calls` (always set when loaded from YAML) wins over it.
  void set_max_waiting_calls(size_t n) {
    max_waiting_calls_ = context_.limits.max_waiting_calls.value_or(n);
  }
  // The session for a call that passed Admit and validation: the per-call credential
  // from metadata when present (and allowed), else the default one.
  absl::StatusOr<Lease> SessionFor(const grpc::ServerContextBase& ctx);
  // The reachability check SessionFor applies, for bridges that acquire sessions
  // themselves: OK while `lease`'s upstream is reachable, or when the caller asked to wait
  // (`lease` then holds one of max_waiting_calls until released); else UNAVAILABLE saying
  // since when the upstream is down (RESOURCE_EXHAUSTED beyond max_waiting_calls).
  absl::Status WaitOrFailFast(const grpc::ServerContextBase& ctx, Lease& lease);
  // UNAVAILABLE "shutting down; retry on another instance".
  absl::Status ShuttingDown() const;
  // The executor for a new upstream session (the io threads in turn).
  boost::asio::any_io_executor SessionExecutor() const {
    return context_.session_executor ? context_.session_executor() : context_.executor;
  }
  // Session options every session of this bridge shares (metrics, names, health), with
  // `connection` named `id` and the bridge's ErrorInfo domain. `connection` is the
  // bridge's own options member: every session shares one copy of it.
  // `adjust` (optional) changes the shared copy once, when it is made: what the bridge
  // sets for all its connections (heartbeat tick, auth backoff), never per session.
  SessionOptions BaseSessionOptions(const std::string& id, bool pinned,
                                    const ConnectionOptions& connection,
                                    std::string_view error_domain,
                                    const std::function<void(ConnectionOptions&)>& adjust = nullptr);

 protected:
  // Called once by the derived constructor.
  void InitPool(SessionPoolOptions options, SessionPool::SessionFactory factory,
                CredentialPolicy credentials, std::shared_ptr<SecretSource> default_credential);

 private:
  // SessionFor without the reachability check.
  absl::StatusOr<Lease> CredentialSession(const grpc::ServerContextBase& ctx);
  void HealthChanged() {
    if (context_.health_changed) context_.health_changed();
  }

  const BridgeContext context_;
  const std::string upstream_;
  const std::vector<std::string> service_names_;
  CredentialPolicy credentials_;
  Counter* malformed_ = nullptr;
  Counter* unrouted_ = nullptr;
  Histogram* rtt_ = nullptr;
  ActiveCalls calls_;
  std::atomic<bool> draining_{false};
  size_t max_open_calls_ = 100000;
  // Calls that asked to wait for an unreachable upstream ("x-wsbridge-wait-for-ready:
  // true" metadata) beyond which new ones fail RESOURCE_EXHAUSTED; the rest fail fast.
  size_t max_waiting_calls_ = context_.limits.max_waiting_calls.value_or(1000);
  std::shared_ptr<std::atomic<size_t>> waiting_calls_ = std::make_shared<std::atomic<size_t>>(0);
  // One copy of the connection options for every session (BaseSessionOptions), made from
  // the bridge's own options the first time.
  absl::Mutex shared_connection_mu_;
  const ConnectionOptions* shared_connection_source_ ABSL_GUARDED_BY(shared_connection_mu_) = nullptr;
  std::shared_ptr<const ConnectionOptions> shared_connection_ ABSL_GUARDED_BY(shared_connection_mu_);
  std::unique_ptr<SessionPool> pool_;
  // The pinned sessions' SessionSettings::health_changed (one for all).
  const std::shared_ptr<const std::function<void()>> health_changed_ =
      std::make_shared<const std::function<void()>>([this] { HealthChanged(); });
};

// Per-call accounting: started when made, finished with the first status the call was
// finished with (CANCELLED when it never was).
class CallAccount {
 public:
  CallAccount(BridgeBase* bridge, std::string_view method) : bridge_(bridge), method_(method) {
    bridge_->CallStarted();
  }
  void Finishing(grpc::StatusCode code) {
    int unset = -1;
    code_.compare_exchange_strong(unset, static_cast<int>(code));
  }
  // The caller cancelled (its deadline, its cancel, a broken connection) before the
  // status reached it: an OK decided meanwhile is counted CANCELLED (an error the server
  // decided is kept; no status at all counts CANCELLED already).
  void CancelledByCaller() {
    int ok = static_cast<int>(grpc::StatusCode::OK);
    code_.compare_exchange_strong(ok, static_cast<int>(grpc::StatusCode::CANCELLED));
  }
  void Done() {
    const int c = code_.load();
    bridge_->CallFinished(method_, c < 0 ? grpc::StatusCode::CANCELLED
                                         : static_cast<grpc::StatusCode>(c));
  }

 private:
  BridgeBase* bridge_;
  std::string_view method_;
  std::atomic<int> code_{-1};
};

// Whether the caller sent kWaitForReadyMetadata "true" (it waits for an unreachable
// upstream instead of failing fast).
bool CallerAsksToWait(const grpc::ServerContextBase& ctx);

// Who a call comes from, for per-caller limits: its peer address without the port
// ("ipv4:10.1.2.3"); every caller over one Unix socket shares one identity.
std::string CallerIdentity(const grpc::ServerContextBase& ctx);

// The gRPC deadline of a call on the steady clock (max when none).
Clock::time_point SteadyDeadline(const grpc::ServerContextBase& ctx);

}  // namespace wsbridge::core
