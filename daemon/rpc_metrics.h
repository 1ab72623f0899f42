// Counts gRPC calls by method and status code (wsbridge_grpc_requests_total) with a
// server interceptor, and tracks the calls in flight so that the drain can end early
// once no client call is left.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>

#include <grpcpp/support/server_interceptor.h>
#include <grpcpp/support/status.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "bridges/core/metrics.h"

namespace wsbridge::daemon {

// Also the CallObserver of bridges that report their own calls (their services are
// left out of the interceptor).
class RpcTracker final : public core::CallObserver {
 public:
  // `known_services`: full service names whose methods become label values; any other
  // method (a caller can send any path) is counted as "unknown" to bound cardinality.
  RpcTracker(core::MetricsRegistry* metrics, std::set<std::string, std::less<>> known_services);

  // The label for a ":path" like "/pkg.Service/Method".
  std::string MethodLabel(std::string_view path) const;
  // Health checks do not hold the drain open; every other call does.
  static bool HoldsDrain(std::string_view path);

  void Started(bool holds_drain);
  void Finished(bool holds_drain);
  // core::CallObserver: a bridge's call (holds the drain).
  void Started() override;
  void Finished(std::string_view method, grpc::StatusCode code) override;
  void Record(const std::string& method_label, grpc::StatusCode code);
  // Open calls that hold the drain open.
  int64_t draining_calls() const { return draining_calls_.load(std::memory_order_acquire); }
  int64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }

 private:
  // The counter of a bridge's method and status code. A bridge's call ends through
  // Finished(method, code) on every call, so the registry lookup (the label built and
  // escaped, the registry's map searched under its lock) is made once per method and
  // code, not once per call (docs/performance.md, round 13).
  core::Counter* CounterFor(std::string_view method, grpc::StatusCode code);
  // wsbridge_grpc_requests_total{method, code}, looked up in the registry.
  core::Counter& RequestsCounter(const std::string& method_label, grpc::StatusCode code);

  static constexpr int kCodes = 17;  // grpc::StatusCode OK (0) .. UNAUTHENTICATED (16)
  // Bridges' methods are a fixed set; the bound only guards against a bridge that
  // passes something else.
  static constexpr std::size_t kMaxCachedMethods = 256;

  core::MetricsRegistry* metrics_;
  std::set<std::string, std::less<>> known_services_;
  absl::Mutex cache_mu_;
  std::map<std::string, std::array<core::Counter*, kCodes>, std::less<>> counters_ ABSL_GUARDED_BY(cache_mu_);
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> draining_calls_{0};
};

// One counted call: a call of the daemon's own services (health, admin, reflection),
// which are served without the interceptor, or, held by the interceptor, a call of an
// unknown method. With a
// server interceptor, gRPC 1.51 hands every completion of a completion-queue call back
// to its queue a second time (an empty batch after the interception), and when that
// completion is drained after the queue's shutdown the empty batch aborts the process
// (health Watch streams, cancelled by the server's shutdown, met it). Started when
// made; recorded when its status is sent (as the interceptor does, before the caller
// can see it), or CANCELLED when destroyed without one; finished when destroyed.
class CountedCall {
 public:
  // `tracker` may be null (nothing is counted).
  CountedCall(RpcTracker* tracker, std::string_view path);
  ~CountedCall();
  CountedCall(const CountedCall&) = delete;
  CountedCall& operator=(const CountedCall&) = delete;
  // The status the call is finished with, just before it is sent (the first counts).
  void Sent(grpc::StatusCode code);

 private:
  RpcTracker* tracker_;
  std::string label_;
  bool holds_drain_;
  // Atomic for the interceptor: gRPC runs a call's interceptor for each batch on
  // whichever thread completes it, so the send-status batch and the call's completion can
  // run at once on two threads, and the destructor on a third.
  std::atomic<bool> recorded_{false};
};

// "OK", "UNAVAILABLE", ...
std::string_view StatusCodeName(grpc::StatusCode code);

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcMetricsInterceptorFactory(std::shared_ptr<RpcTracker> tracker,
                                 std::set<std::string, std::less<>> self_observed);

}  // namespace wsbridge::daemon
