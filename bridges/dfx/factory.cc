#include "bridges/dfx/factory.h"

#include "bridges/core/upstream_config.h"

namespace wsbridge::dfx {

absl::StatusOr<DfxBridgeOptions> OptionsFromConfig(const config::v1::DfxBridgeConfig& cfg,
                                                   std::string_view bridge_name) {
  if (!cfg.has_upstream()) {
    return absl::InvalidArgumentError("upstream: required (the DFX WebSocket URL)");
  }
  absl::StatusOr<core::UpstreamEndpoint> endpoint =
      core::ToEndpoint(cfg.upstream(), std::string(bridge_name));
  if (!endpoint.ok()) return endpoint.status();
  DfxBridgeOptions o;
  static_cast<core::UpstreamEndpoint&>(o) = *std::move(endpoint);
  if (cfg.has_device_token()) {
    absl::StatusOr<std::shared_ptr<core::SecretSource>> t =
        core::LoadSecret(cfg.device_token(), "device_token");
    if (!t.ok()) return t.status();
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
  if (cfg.subscriber_queue() != 0) o.subscriber_queue = cfg.subscriber_queue();
  return o;
}

void RegisterFactory(core::BridgeRegistry& registry) {
  core::RegisterConfigFactory<config::v1::DfxBridgeConfig>(registry, "dfx", OptionsFromConfig,
                                                           NewDfxBridge);
}

}  // namespace wsbridge::dfx
