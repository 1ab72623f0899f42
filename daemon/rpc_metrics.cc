#include "daemon/rpc_metrics.h"

#include <atomic>
#include <utility>


namespace wsbridge::daemon {
namespace {

// The call is counted by the CountedCall it holds: the interceptor lives as long as the
// call.
class RpcMetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(std::shared_ptr<RpcTracker> tracker, std::string_view path)
      : tracker_(std::move(tracker)), call_(tracker_.get(), path) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      call_.Sent(methods->GetSendStatus().error_code());
    }
    methods->Proceed();
  }

 private:
  std::shared_ptr<RpcTracker> tracker_;  // outlives call_
  CountedCall call_;
};

class RpcMetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  RpcMetricsInterceptorFactory(std::shared_ptr<RpcTracker> tracker,
                               std::set<std::string, std::less<>> self_observed)
      : tracker_(std::move(tracker)), self_observed_(std::move(self_observed)) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    std::string_view path = info->method() != nullptr ? info->method() : "";
    // No interceptor at all (null) for services that report their own calls.
    if (path.size() > 1 && self_observed_.contains(path.substr(1, path.find('/', 1) - 1))) {
      return nullptr;
    }
    return new RpcMetricsInterceptor(tracker_, path);
  }

 private:
  std::shared_ptr<RpcTracker> tracker_;
  std::set<std::string, std::less<>> self_observed_;
};

}  // namespace

RpcTracker::RpcTracker(core::MetricsRegistry* metrics,
                       std::set<std::string, std::less<>> known_services)
    : metrics_(metrics), known_services_(std::move(known_services)) {}

std::string RpcTracker::MethodLabel(std::string_view path) const {
  // "/pkg.Service/Method"
  if (path.size() > 1 && path[0] == '/') {
    size_t slash = path.find('/', 1);
    if (slash != std::string_view::npos && slash + 1 < path.size() &&
        path.find('/', slash + 1) == std::string_view::npos &&
        known_services_.contains(path.substr(1, slash - 1))) {
      return std::string(path);
    }
  }
  return "unknown";
}

bool RpcTracker::HoldsDrain(std::string_view path) {
  // Health watchers (load balancers, kubelet) learn NOT_SERVING and go; every other open
  // call, reflection streams included, gets the drain time.
  return !path.starts_with("/grpc.health.v1.Health/");
}

void RpcTracker::Started(bool holds_drain) {
  in_flight_.fetch_add(1, std::memory_order_relaxed);
  if (holds_drain) draining_calls_.fetch_add(1, std::memory_order_acq_rel);
}

void RpcTracker::Finished(bool holds_drain) {
  in_flight_.fetch_sub(1, std::memory_order_relaxed);
  if (holds_drain) draining_calls_.fetch_sub(1, std::memory_order_acq_rel);
}

void RpcTracker::Started() { Started(true); }

void RpcTracker::Finished(std::string_view method, grpc::StatusCode code) {
  if (core::Counter* counter = CounterFor(method, code); counter != nullptr) counter->Inc();
  Finished(true);
}

core::Counter* RpcTracker::CounterFor(std::string_view method, grpc::StatusCode code) {
  if (metrics_ == nullptr) return nullptr;
  int c = static_cast<int>(code);
  if (c < 0 || c >= kCodes) {
    code = grpc::StatusCode::UNKNOWN;  // StatusCodeName's name for it
    c = static_cast<int>(code);
  }
  {
    absl::ReaderMutexLock lock(&cache_mu_);
    if (auto it = counters_.find(method); it != counters_.end() && it->second[c] != nullptr) return it->second[c];
  }
  core::Counter* counter = &RequestsCounter(MethodLabel(method), code);
  absl::MutexLock lock(&cache_mu_);
  auto it = counters_.find(method);
  if (it == counters_.end() && counters_.size() < kMaxCachedMethods) {
    it = counters_.emplace(std::string(method), std::array<core::Counter*, kCodes>{}).first;
  }
  if (it != counters_.end()) it->second[c] = counter;
  return counter;
}

void RpcTracker::Record(const std::string& method_label, grpc::StatusCode code) {
  if (metrics_ == nullptr) return;
  RequestsCounter(method_label, code).Inc();
}

core::Counter& RpcTracker::RequestsCounter(const std::string& method_label, grpc::StatusCode code) {
  return metrics_->GetCounter("wsbridge_grpc_requests_total", "gRPC calls handled, by method and status code.",
                              {{"method", method_label}, {"code", std::string(StatusCodeName(code))}});
}

CountedCall::CountedCall(RpcTracker* tracker, std::string_view path)
    : tracker_(tracker), holds_drain_(RpcTracker::HoldsDrain(path)) {
  if (tracker_ == nullptr) return;
  label_ = tracker_->MethodLabel(path);
  tracker_->Started(holds_drain_);
}

void CountedCall::Sent(grpc::StatusCode code) {
  if (tracker_ == nullptr || recorded_.exchange(true, std::memory_order_acq_rel)) return;
  tracker_->Record(label_, code);
}

CountedCall::~CountedCall() {
  if (tracker_ == nullptr) return;
  if (!recorded_.load(std::memory_order_acquire)) {
    tracker_->Record(label_, grpc::StatusCode::CANCELLED);
  }
  tracker_->Finished(holds_drain_);
}

std::string_view StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeRpcMetricsInterceptorFactory(std::shared_ptr<RpcTracker> tracker,
                                 std::set<std::string, std::less<>> self_observed) {
  return std::make_unique<RpcMetricsInterceptorFactory>(std::move(tracker),
                                                        std::move(self_observed));
}

}  // namespace wsbridge::daemon
