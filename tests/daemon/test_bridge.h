// A real core::Bridge for the daemon's framework tests: serves TestService (Echo and a
// Watch stream that stays open), reports sessions set by the test, and follows the
// drain/shutdown contract through core::ActiveCalls.
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "daemon_test.grpc.pb.h"

namespace wsbridge::daemontest {

class TestBridge final : public core::Bridge {
 public:
  explicit TestBridge(core::BridgeContext context);

  const std::string& name() const override { return context_.name; }
  std::vector<grpc::Service*> Services() override { return {&service_}; }
  std::vector<std::string> ServiceNames() const override {
    return {std::string(v1::TestService::service_full_name())};
  }
  void Start() override { started_ = true; }
  void BeginDrain() override { draining_ = true; }
  void Shutdown(const grpc::Status& status, std::function<void()> done) override;
  bool Serving() const override { return serving_.load(); }
  std::vector<wsbridge::admin::v1::Session> ListSessions() const override;
  absl::Status CloseSession(std::string_view session_id) override;

  // Test controls and observations.
  void SetServing(bool serving);
  void AddSession(wsbridge::admin::v1::Session session);
  bool started() const { return started_.load(); }
  bool draining() const { return draining_.load(); }
  bool shut_down() const { return shut_down_.load(); }
  size_t open_calls() const { return calls_.size(); }
  std::vector<std::string> closed_sessions() const;

 private:
  class Service;
  friend class Service;

  core::BridgeContext context_;
  std::unique_ptr<grpc::Service> service_holder_;
  grpc::Service& service_;
  core::ActiveCalls calls_;
  std::atomic<bool> serving_{true};
  std::atomic<bool> started_{false};
  std::atomic<bool> draining_{false};
  std::atomic<bool> shut_down_{false};
  mutable absl::Mutex mu_;
  std::vector<wsbridge::admin::v1::Session> sessions_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> closed_ ABSL_GUARDED_BY(mu_);
};

// Registers a factory that builds TestBridges for `bridges[].dfx` entries (the config
// schema's only bridge kind), so the tests need no upstream. Each built bridge is
// appended to `*built`.
void RegisterTestBridge(core::BridgeRegistry& registry, std::vector<TestBridge*>* built);

}  // namespace wsbridge::daemontest
