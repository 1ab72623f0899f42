#include "bridges/dfx/factory.h"

#include "absl/strings/str_cat.h"
#include "bridges/core/upstream_config.h"

namespace wsbridge::dfx {

absl::StatusOr<DfxBridgeOptions> OptionsFromConfig(const config::v1::DfxBridgeConfig& cfg,
                                                   std::string_view bridge_name) {
  if (!cfg.has_upstream()) {
    return absl::InvalidArgumentError("upstream: required (the DFX WebSocket URL)");
  }
  if (absl::Status st = core::CheckUpstreamUrl(cfg.upstream()); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("upstream.url: ", st.message()));
  }
  absl::StatusOr<core::ConnectionOptions> conn =
      core::ToConnectionOptions(cfg.upstream(), std::string(bridge_name));
  if (!conn.ok()) return conn.status();
  DfxBridgeOptions o;
  o.url = cfg.upstream().url();
  o.headers = core::UpstreamHeaders(cfg.upstream());
  o.connection = *std::move(conn);
  o.connection.reconnect = true;
  if (cfg.has_device_token()) {
    // Read now so a missing variable or file is a start-up error; then kept current off
    // the io threads, so rotated tokens take effect.
    absl::StatusOr<std::shared_ptr<core::SecretSource>> t =
        core::SecretSource::Create(cfg.device_token());
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("device_token: ", t.status().message()));
    }
    o.default_token = *std::move(t);
  }
  o.allow_call_token = cfg.allow_call_token();
  if (!o.default_token && !o.allow_call_token) {
    return absl::InvalidArgumentError(
        "device_token: required unless allow_call_token is set (then every call must carry "
        "x-dfx-device-token metadata)");
  }
  o.request_timeout = core::DurationOr(cfg.request_timeout(), std::chrono::seconds(30));
  o.idle_session_timeout = core::DurationOr(cfg.idle_session_timeout(), std::chrono::minutes(5));
  o.rate_limit_retry = core::DurationOr(cfg.rate_limit_retry(), std::chrono::seconds(1));
  o.pacing = !cfg.disable_pacing();
  if (cfg.max_sessions() != 0) o.max_sessions = cfg.max_sessions();
  return o;
}

void RegisterFactory(core::BridgeRegistry& registry) {
  registry.Register(
      config::v1::DfxBridgeConfig::descriptor()->full_name(),
      [](const google::protobuf::Message& message,
         const core::BridgeContext& context) -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
        const auto* cfg = dynamic_cast<const config::v1::DfxBridgeConfig*>(&message);
        if (cfg == nullptr) {
          return absl::InvalidArgumentError(absl::StrCat(
              "dfx bridge \"", context.name, "\": expected a DfxBridgeConfig, got ",
              message.GetDescriptor()->full_name()));
        }
        absl::StatusOr<DfxBridgeOptions> options = OptionsFromConfig(*cfg, context.name);
        if (!options.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("dfx bridge \"", context.name, "\": ", options.status().message()));
        }
        return NewDfxBridge(*std::move(options), context);
      });
}

}  // namespace wsbridge::dfx
