#include "daemon/health_service.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "daemon/async_unary.h"

namespace wsbridge::daemon {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch stream, on its loop thread only: it writes the watched name's status when
// it changes, one write at a time (a change during a write is picked up after it, and
// only the latest status is written). It owns itself from its request until gRPC has
// returned its done tag and every write; the caller going away (or the server shutting
// down) ends it through the done tag.
class HealthWatch final : public std::enable_shared_from_this<HealthWatch> {
 public:
  HealthWatch(HealthService* service, core::CqLoop* loop)
      : service_(service), loop_(loop), writer_(&ctx_) {}

  static void Serve(HealthService* service, core::CqLoop* loop) {
    auto w = std::make_shared<HealthWatch>(service, loop);
    w->self_ = w;
    w->ctx_.AsyncNotifyWhenDone(&w->done_tag_);
    const bool asked = loop->RunIfAccepting([&] {
      service->RequestWatch(&w->ctx_, &w->req_, &w->writer_, loop->cq(), loop->cq(), &w->matched_tag_);
    });
    if (!asked) w->self_.reset();
  }

  // Any thread: the watched status may have changed.
  void Changed() {
    loop_->Post([w = weak_from_this()] {
      if (auto s = w.lock()) s->WriteLatest();
    });
  }

 private:
  void OnMatched(bool ok) {
    if (!ok) {  // the server shut down before a caller came; no done tag follows
      self_.reset();
      return;
    }
    matched_ = true;
    counted_.emplace(service_->tracker_, "/grpc.health.v1.Health/Watch");
    Serve(service_, loop_);  // the next caller
    id_ = service_->AddWatch(req_.service(), weak_from_this());
    WriteLatest();
  }

  void WriteLatest() {
    if (!matched_ || done_ || broken_ || writing_) return;
    const HealthService::ServingStatus now = service_->WatchStatus(req_.service());
    if (sent_any_ && now == sent_) return;
    sent_any_ = true;
    sent_ = now;
    response_.set_status(now);
    writing_ = true;
    writer_.Write(response_, &write_tag_);
  }

  void OnWritten(bool ok) {
    writing_ = false;
    if (!ok) {
      broken_ = true;  // the call is over; its done tag comes next
    } else {
      WriteLatest();
    }
    MaybeRelease();
  }

  void OnDone(bool /*ok*/) {
    done_ = true;
    service_->RemoveWatch(id_);
    MaybeRelease();
  }

  void MaybeRelease() {
    if (done_ && !writing_) self_.reset();
  }

  HealthService* service_;
  core::CqLoop* loop_;
  grpc::ServerContext ctx_;
  HealthCheckRequest req_;
  HealthCheckResponse response_;
  grpc::ServerAsyncWriter<HealthCheckResponse> writer_;
  std::shared_ptr<HealthWatch> self_;
  // The daemon ends a watch only by cancelling it (counted CANCELLED), as gRPC's did.
  std::optional<CountedCall> counted_;
  uint64_t id_ = 0;
  bool matched_ = false;
  bool done_ = false;
  bool broken_ = false;
  bool writing_ = false;
  bool sent_any_ = false;
  HealthService::ServingStatus sent_ = HealthCheckResponse::UNKNOWN;
  core::MemberTag<HealthWatch, &HealthWatch::OnMatched> matched_tag_{this};
  core::MemberTag<HealthWatch, &HealthWatch::OnWritten> write_tag_{this};
  core::MemberTag<HealthWatch, &HealthWatch::OnDone> done_tag_{this};
};

HealthService::HealthService() {
  absl::MutexLock lock(&mu_);
  statuses_[""] = HealthCheckResponse::NOT_SERVING;
}

HealthService::~HealthService() = default;

void HealthService::Serve(const std::vector<core::CqLoop*>& loops, RpcTracker* tracker) {
  tracker_ = tracker;
  using CheckCall = InlineUnaryCall<HealthCheckRequest, HealthCheckResponse>;
  auto check = std::make_shared<const CheckCall::Method>(CheckCall::Method{
      [this](grpc::ServerContext* ctx, HealthCheckRequest* req,
             grpc::ServerAsyncResponseWriter<HealthCheckResponse>* responder,
             grpc::ServerCompletionQueue* cq, void* tag) { RequestCheck(ctx, req, responder, cq, cq, tag); },
      [this](grpc::ServerContext&, const HealthCheckRequest& req, HealthCheckResponse* resp) {
        return AnswerCheck(req.service(), resp);
      },
      "/grpc.health.v1.Health/Check", tracker});
  for (core::CqLoop* loop : loops) {
    CheckCall::Serve(check, loop);
    HealthWatch::Serve(this, loop);
  }
}

void HealthService::SetServingStatus(const std::string& service, bool serving) {
  const ServingStatus status = serving ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    auto [it, inserted] = statuses_.emplace(service, status);
    if (!inserted) {
      if (it->second == status) return;
      it->second = status;
    }
  }
  Notify(&service);
}

void HealthService::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    for (auto& [name, status] : statuses_) status = HealthCheckResponse::NOT_SERVING;
  }
  Notify(nullptr);
}

grpc::Status HealthService::AnswerCheck(const std::string& service, HealthCheckResponse* response) const {
  absl::MutexLock lock(&mu_);
  auto it = statuses_.find(service);
  if (it == statuses_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("service name unknown: \"", service,
                                     "\" is not served here; ask for \"\" (the whole daemon) or a "
                                     "service the daemon serves (see server reflection)"));
  }
  response->set_status(it->second);
  return grpc::Status::OK;
}

HealthService::ServingStatus HealthService::WatchStatus(const std::string& service) const {
  absl::MutexLock lock(&mu_);
  auto it = statuses_.find(service);
  return it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

uint64_t HealthService::AddWatch(const std::string& service, std::weak_ptr<HealthWatch> watch) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_watch_++;
  watches_.emplace(id, Watcher{service, std::move(watch)});
  return id;
}

void HealthService::RemoveWatch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  watches_.erase(id);
}

void HealthService::Notify(const std::string* service) {
  std::vector<std::shared_ptr<HealthWatch>> told;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, w] : watches_) {
      if (service != nullptr && w.service != *service) continue;
      if (auto watch = w.watch.lock()) told.push_back(std::move(watch));
    }
  }
  // Outside the lock: the watch reads the status again on its loop thread.
  for (const auto& watch : told) watch->Changed();
}

}  // namespace wsbridge::daemon
