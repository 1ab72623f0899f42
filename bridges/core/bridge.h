// The interface every bridge implements, the context the daemon hands it, and the
// registry of bridge factories. A bridge's logic never reads the daemon's config: its
// factory receives the bridge's own typed config message and builds it.
#pragma once

#include <cstdint>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <google/protobuf/message.h>
#include <grpcpp/impl/service_type.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/metrics.h"
#include "wsbridge/admin/v1/admin.pb.h"

namespace wsbridge::core {

class CqLoop;

// Per-call accounting (the daemon's request counters and the drain's count of open
// calls) for bridges that report their own calls instead of going through the daemon's
// server interceptor: an interceptor costs gRPC a second completion round trip for
// every operation of the call (measured: ~28 us of CPU per unary call).
class CallObserver {
 public:
  virtual ~CallObserver() = default;
  // A call began; it holds the drain open until Finished.
  virtual void Started() = 0;
  // `method` is the full path ("/wsbridge.dfx.v1.DfxService/Call"); `code` the status
  // the call ended with (CANCELLED when it was cancelled before finishing).
  virtual void Finished(std::string_view method, grpc::StatusCode code) = 0;
};

// Limits on what callers can make any bridge hold, from the daemon config's
// `bridges[].limits` (CallerLimits in daemon.proto). Unset: the bridge's own value.
struct CallerLimits {
  std::optional<size_t> max_waiting_calls;
  std::optional<std::chrono::nanoseconds> refusal_memory;
  std::optional<uint32_t> max_sessions_per_caller;
};

// What the daemon gives a bridge.
struct BridgeContext {
  std::string name;                       // instance name from config
  boost::asio::any_io_executor executor;  // the first io thread; for bridge-wide strands
  // The executor for a new upstream session: the io threads in turn. Each io thread
  // runs its own event loop, so a session's work never migrates between threads and a
  // post wakes exactly the one thread that will run it. Unset: use `executor`.
  std::function<boost::asio::any_io_executor()> session_executor;
  MetricsRegistry* metrics = nullptr;
  // Checks caller credentials (bearer token) of a call. OK when no check is configured.
  std::function<grpc::Status(const grpc::ServerContextBase&)> authorize;
  // Tell the daemon that Serving() may have changed (it re-publishes health).
  std::function<void()> health_changed;
  // Where a bridge whose ObservesOwnCalls() is true reports its calls; never null then.
  CallObserver* calls = nullptr;
  // Applied by BridgeBase over the bridge's own defaults.
  CallerLimits limits;
};

class Bridge {
 public:
  virtual ~Bridge() = default;
  virtual const std::string& name() const = 0;
  // Callback services to register on the gRPC server; owned by the bridge.
  virtual std::vector<grpc::Service*> Services() = 0;
  // Full gRPC service names, for per-service health ("wsbridge.dfx.v1.DfxService").
  virtual std::vector<std::string> ServiceNames() const = 0;
  // True when the bridge reports every call of its services to BridgeContext::calls;
  // the daemon then leaves those services out of its interceptor.
  virtual bool ObservesOwnCalls() const { return false; }
  // True when some of the bridge's methods are served on the completion-queue API:
  // the daemon then adds completion queues to the server (runtime.grpc_cq_threads),
  // each drained by its own CqLoop, and calls ServeAsync once the server has started.
  virtual bool UsesCompletionQueues() const { return false; }
  // Start requesting calls on `loops` (they outlive every call). Called once, right
  // after the server started.
  virtual void ServeAsync(const std::vector<CqLoop*>& loops) { (void)loops; }
  // Starts upstream sessions that are configured to be always on.
  virtual void Start() = 0;
  // New calls are refused with UNAVAILABLE; open calls go on.
  virtual void BeginDrain() = 0;
  // Ends every open call with `status`, closes upstream sessions with 1001 and calls
  // `done` (from any thread) once they are closed. Idempotent.
  virtual void Shutdown(const grpc::Status& status, std::function<void()> done) = 0;
  // Whether the upstream is usable (health). A bridge with lazily created sessions is
  // serving while it can create them.
  virtual bool Serving() const = 0;
  virtual std::vector<wsbridge::admin::v1::Session> ListSessions() const = 0;
  // NOT_FOUND for an unknown id.
  virtual absl::Status CloseSession(std::string_view session_id) = 0;
};

using BridgeFactory = std::function<absl::StatusOr<std::unique_ptr<Bridge>>(
    const google::protobuf::Message& config, const BridgeContext& context)>;

// Factories keyed by the full name of their config message type
// (e.g. "wsbridge.config.v1.DfxBridgeConfig").
class BridgeRegistry {
 public:
  static BridgeRegistry& Global();
  void Register(std::string config_type, BridgeFactory factory);
  const BridgeFactory* Find(std::string_view config_type) const;
  std::vector<std::string> Types() const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, BridgeFactory, std::less<>> factories_ ABSL_GUARDED_BY(mu_);
};

// Registers the factory of the bridges configured by `Config` (one bridge kind, e.g.
// "dfx"): `to_options(const Config&, std::string_view bridge_name)` checks the config and
// returns the bridge's options (StatusOr), `make(Options, const BridgeContext&)` builds
// the bridge. Errors name the kind and the bridge: dfx bridge "main": upstream.url: ...
template <typename Config, typename ToOptions, typename Make>
void RegisterConfigFactory(BridgeRegistry& registry, std::string_view kind, ToOptions to_options,
                           Make make) {
  registry.Register(
      Config::descriptor()->full_name(),
      [kind = std::string(kind), to_options, make](
          const google::protobuf::Message& message,
          const BridgeContext& context) -> absl::StatusOr<std::unique_ptr<Bridge>> {
        const std::string prefix = kind + " bridge \"" + context.name + "\": ";
        const auto* cfg = dynamic_cast<const Config*>(&message);
        if (cfg == nullptr) {
          return absl::InvalidArgumentError(prefix + "expected " + Config::descriptor()->full_name() +
                                            ", got " + message.GetDescriptor()->full_name());
        }
        auto options = to_options(*cfg, context.name);
        if (!options.ok()) {
          return absl::InvalidArgumentError(prefix + std::string(options.status().message()));
        }
        return make(*std::move(options), context);
      });
}

// Registers every bridge built into this binary. Explicit (not static
// self-registration), because the linker drops unreferenced registration objects.
void RegisterBuiltinBridges(BridgeRegistry& registry);

// Open calls of a bridge, so that drain/shutdown can end them. A reactor adds itself
// when it starts and removes itself in OnDone; `abort` must be thread-safe, end the
// call with the given status, and may be called at most once.
class ActiveCalls {
 public:
  using Id = uint64_t;
  // Returns 0 (and does not add) when already shut down: the caller must finish with
  // UNAVAILABLE at once.
  Id Add(std::function<void(const grpc::Status&)> abort);
  void Remove(Id id);
  // Aborts every open call; later Add() calls return 0.
  void AbortAll(const grpc::Status& status);
  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  Id next_ ABSL_GUARDED_BY(mu_) = 1;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::map<Id, std::function<void(const grpc::Status&)>> calls_ ABSL_GUARDED_BY(mu_);
};

}  // namespace wsbridge::core
