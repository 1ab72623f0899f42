#include "test_bridge.h"

#include <memory>

#include <boost/asio/post.hpp>

#include "absl/strings/str_cat.h"
#include "bridges/core/status.h"

namespace wsbridge::daemontest {

namespace {

// Guarded pointer from ActiveCalls' abort callback to a reactor that may already be
// gone (the abort can race with the call's own end).
struct CallSlot {
  absl::Mutex mu;
  grpc::ServerWriteReactor<v1::Event>* reactor ABSL_GUARDED_BY(mu) = nullptr;
  bool finished ABSL_GUARDED_BY(mu) = false;
};

class WatchReactor final : public grpc::ServerWriteReactor<v1::Event> {
 public:
  WatchReactor(core::ActiveCalls& calls, grpc::Status admission)
      : calls_(calls), slot_(std::make_shared<CallSlot>()) {
    {
      absl::MutexLock lock(&slot_->mu);
      slot_->reactor = this;
    }
    if (!admission.ok()) {
      FinishOnce(admission);
      return;
    }
    id_ = calls_.Add([slot = slot_](const grpc::Status& status) {
      absl::MutexLock lock(&slot->mu);
      if (slot->reactor != nullptr && !slot->finished) {
        slot->finished = true;
        slot->reactor->Finish(status);
      }
    });
    if (id_ == 0) {
      FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
      return;
    }
    event_.set_text("watching");
    StartWrite(&event_);
  }

  void OnWriteDone(bool) override {}
  void OnCancel() override { FinishOnce(grpc::Status::CANCELLED); }
  void OnDone() override {
    {
      absl::MutexLock lock(&slot_->mu);
      slot_->reactor = nullptr;
    }
    if (id_ != 0) calls_.Remove(id_);
    delete this;
  }

 private:
  void FinishOnce(const grpc::Status& status) {
    absl::MutexLock lock(&slot_->mu);
    if (slot_->finished) return;
    slot_->finished = true;
    Finish(status);
  }

  core::ActiveCalls& calls_;
  std::shared_ptr<CallSlot> slot_;
  core::ActiveCalls::Id id_ = 0;
  v1::Event event_;
};

}  // namespace

class TestBridge::Service final : public v1::TestService::CallbackService {
 public:
  explicit Service(TestBridge* bridge) : bridge_(bridge) {}

  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* context,
                                 const v1::EchoRequest* request,
                                 v1::EchoResponse* response) override {
    auto* reactor = context->DefaultReactor();
    grpc::Status status = Admit(*context);
    constexpr std::string_view kMissing = "missing:";
    if (status.ok() && request->text().starts_with(kMissing)) {
      // An upstream-style NOT_FOUND that quotes the caller's id, through the edge
      // conversion every bridge uses.
      const std::string id = request->text().substr(kMissing.size());
      status = core::ToGrpcStatus(core::WithErrorInfo(
          absl::NotFoundError(absl::StrCat("no measurement \"", id, "\" on the upstream")),
          "MEASUREMENT_NOT_FOUND", "test.wsbridge.dev", {{"measurement_id", id}}));
    } else if (status.ok()) {
      response->set_text(request->text());
    }
    reactor->Finish(status);
    return reactor;
  }

  grpc::ServerWriteReactor<v1::Event>* Watch(grpc::CallbackServerContext* context,
                                            const v1::WatchRequest*) override {
    return new WatchReactor(bridge_->calls_, Admit(*context));
  }

 private:
  grpc::Status Admit(const grpc::CallbackServerContext& context) {
    if (grpc::Status auth = bridge_->context_.authorize(context); !auth.ok()) return auth;
    if (bridge_->draining_) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is draining; retry elsewhere");
    }
    return grpc::Status::OK;
  }

  TestBridge* bridge_;
};

TestBridge::TestBridge(core::BridgeContext context)
    : context_(std::move(context)),
      service_holder_(std::make_unique<Service>(this)),
      service_(*service_holder_) {}

void TestBridge::Shutdown(const grpc::Status& status, std::function<void()> done) {
  draining_ = true;
  calls_.AbortAll(status);
  shut_down_ = true;
  // `done` may come from any thread; use the io executor like a real bridge would.
  boost::asio::post(context_.executor, std::move(done));
}

std::vector<wsbridge::admin::v1::Session> TestBridge::ListSessions() const {
  absl::MutexLock lock(&mu_);
  return sessions_;
}

absl::Status TestBridge::CloseSession(std::string_view session_id) {
  absl::MutexLock lock(&mu_);
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (it->id() == session_id) {
      closed_.push_back(it->id());
      sessions_.erase(it);
      return absl::OkStatus();
    }
  }
  return absl::NotFoundError(absl::StrCat("no session \"", std::string(session_id), "\""));
}

void TestBridge::SetServing(bool serving) {
  serving_ = serving;
  context_.health_changed();
}

void TestBridge::AddSession(wsbridge::admin::v1::Session session) {
  absl::MutexLock lock(&mu_);
  session.set_bridge(context_.name);
  sessions_.push_back(std::move(session));
}

std::vector<std::string> TestBridge::closed_sessions() const {
  absl::MutexLock lock(&mu_);
  return closed_;
}

void RegisterTestBridge(core::BridgeRegistry& registry, std::vector<TestBridge*>* built) {
  registry.Register("wsbridge.config.v1.DfxBridgeConfig",
                    [built](const google::protobuf::Message&, const core::BridgeContext& context)
                        -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                      auto bridge = std::make_unique<TestBridge>(context);
                      built->push_back(bridge.get());
                      return std::unique_ptr<core::Bridge>(std::move(bridge));
                    });
}

}  // namespace wsbridge::daemontest
