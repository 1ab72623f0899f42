#include "tests/faults/daemon_harness.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace wsbridge::faults {
namespace {

bool FindErrorInfo(const grpc::Status& status, google::rpc::ErrorInfo* info) {
  google::rpc::Status s;
  if (!s.ParseFromString(status.error_details())) return false;
  for (const auto& any : s.details()) {
    if (any.UnpackTo(info)) return true;
  }
  return false;
}

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
  if (absl::Status st = config::ApplyConfigDefaults(&cfg); !st.ok()) return st;
  daemon::DaemonOptions dopts;
  dopts.configure_logging = false;
  daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
  if (absl::Status st = daemon_->Start(); !st.ok()) return st;
  if (bridge_ == nullptr) return absl::InternalError("the daemon did not build the bridge");
  channel_ = NewChannel();
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> DaemonHarness::NewChannel() const {
  grpc::ChannelArguments args;
  // A channel of its own: gRPC would otherwise share one subchannel per target.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials(), args);
}

void DaemonHarness::RequestShutdown() {
  if (daemon_ != nullptr) daemon_->RequestShutdown();
}

void DaemonHarness::Stop() {
  if (daemon_ == nullptr) return;
  daemon_->RequestShutdown();
  daemon_->Wait();
  daemon_.reset();
  bridge_ = nullptr;
}

}  // namespace wsbridge::faults
