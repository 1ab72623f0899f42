#include "tests/faults/daemon_harness.h"

#include <unistd.h>

#include <cstdio>

#include <utility>

#include <grpcpp/support/client_interceptor.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "bridges/core/log.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace wsbridge::faults {

int64_t ResidentBytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<int64_t>(resident) * ::sysconf(_SC_PAGESIZE);
}

bool NoRequestsHeld(const core::Bridge& bridge) {
  for (const auto& s : bridge.ListSessions()) {
    if (s.in_flight_requests() != 0) return false;
  }
  return true;
}
namespace {

bool FindErrorInfo(const grpc::Status& status, google::rpc::ErrorInfo* info) {
  google::rpc::Status s;
  if (!s.ParseFromString(status.error_details())) return false;
  for (const auto& any : s.details()) {
    if (any.UnpackTo(info)) return true;
  }
  return false;
}

// Shows the harness every status a call on its channels ends with.
class StatusWatcher final : public grpc::experimental::Interceptor {
 public:
  StatusWatcher(DaemonHarness* harness, grpc::experimental::ClientRpcInfo* info)
      : harness_(harness), method_(info->method()) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::POST_RECV_STATUS)) {
      const grpc::Status* st = methods->GetRecvStatus();
      if (st != nullptr) {
        harness_->Saw(absl::StrCat("status of ", method_), st->error_message());
        harness_->Saw(absl::StrCat("error details of ", method_), st->error_details());
      }
    }
    methods->Proceed();
  }

 private:
  DaemonHarness* harness_;
  std::string method_;
};

class StatusWatcherFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit StatusWatcherFactory(DaemonHarness* harness) : harness_(harness) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new StatusWatcher(harness_, info);
  }

 private:
  DaemonHarness* harness_;
};

}  // namespace

std::string ErrorReason(const grpc::Status& status) {
  google::rpc::ErrorInfo info;
  return FindErrorInfo(status, &info) ? info.reason() : "";
}

std::string ErrorMetadata(const grpc::Status& status, const std::string& key) {
  google::rpc::ErrorInfo info;
  if (!FindErrorInfo(status, &info)) return "";
  auto it = info.metadata().find(key);
  return it == info.metadata().end() ? "" : it->second;
}

DaemonHarness::~DaemonHarness() { Stop(); }

absl::Status DaemonHarness::Start(const std::string& name, const Describe& describe, Make make,
                                  const std::function<void(config::v1::DaemonConfig&)>& tweak_config) {
  config::v1::DaemonConfig cfg;
  cfg.mutable_server()->set_listen("127.0.0.1:0");
  cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
  cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
  auto* b = cfg.add_bridges();
  b->set_name(name);
  describe(*b);
  // The registry is keyed by the type of the bridge entry's config message.
  const auto* oneof = b->GetDescriptor()->FindOneofByName("kind");
  const auto* field = b->GetReflection()->GetOneofFieldDescriptor(*b, oneof);
  if (field == nullptr) return absl::InvalidArgumentError("describe() set no bridge kind");
  registry_.Register(field->message_type()->full_name(),
                     [this, make = std::move(make)](const google::protobuf::Message&,
                                                    const core::BridgeContext& ctx)
                         -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                       auto bridge = make(ctx);
                       if (bridge.ok()) bridge_ = bridge->get();
                       return bridge;
                     });
  if (tweak_config) tweak_config(cfg);
  // Debug level, so that every line the daemon could write is checked for secrets.
  log::Configure(log::Level::kDebug, /*json=*/false);
  log::SetObserver([this](std::string_view line) { Saw("log", std::string(line)); });
  observing_ = true;
  if (absl::Status st = config::ApplyConfigDefaults(&cfg); !st.ok()) return st;
  daemon::DaemonOptions dopts;
  dopts.configure_logging = false;
  daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
  if (absl::Status st = daemon_->Start(); !st.ok()) return st;
  if (bridge_ == nullptr) return absl::InternalError("the daemon did not build the bridge");
  channel_ = NewChannel();
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> DaemonHarness::NewChannel() {
  grpc::ChannelArguments args;
  // A channel of its own: gRPC would otherwise share one subchannel per target.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> watchers;
  watchers.push_back(std::make_unique<StatusWatcherFactory>(this));
  return grpc::experimental::CreateCustomChannelWithInterceptors(
      absl::StrCat("127.0.0.1:", daemon_->grpc_port()), grpc::InsecureChannelCredentials(), args,
      std::move(watchers));
}

void DaemonHarness::Saw(const std::string& where, const std::string& text) {
  if (!absl::StrContains(text, kSecretMarker)) return;
  absl::MutexLock lock(&mu_);
  // The text itself is not repeated: it holds the secret.
  leaks_.push_back(absl::StrCat(where, " (", text.size(), " bytes)"));
}

std::vector<std::string> DaemonHarness::SecretLeaks() const {
  absl::MutexLock lock(&mu_);
  return leaks_;
}

void DaemonHarness::RequestShutdown() {
  if (daemon_ != nullptr) daemon_->RequestShutdown();
}

void DaemonHarness::Stop() {
  if (daemon_ == nullptr) return;
  Saw("metrics", daemon_->metrics().Render());
  if (bridge_ != nullptr) {
    for (const auto& session : bridge_->ListSessions()) Saw("admin session", session.DebugString());
  }
  daemon_->RequestShutdown();
  daemon_->Wait();
  daemon_.reset();
  bridge_ = nullptr;
  if (observing_) {
    log::SetObserver(nullptr);
    log::Configure(log::Level::kInfo, /*json=*/false);
    observing_ = false;
  }
  std::vector<std::string> leaks = SecretLeaks();
  EXPECT_TRUE(leaks.empty()) << "a secret (marked \"" << kSecretMarker
                             << "\") was shown in: " << absl::StrJoin(leaks, "; ");
}

}  // namespace wsbridge::faults
