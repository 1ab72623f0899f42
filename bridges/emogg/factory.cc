#include "bridges/emogg/factory.h"

#include "absl/strings/str_cat.h"
#include "bridges/core/upstream_config.h"
#include "bridges/emogg/codec.h"

namespace wsbridge::emogg {

absl::StatusOr<EmoggBridgeOptions> OptionsFromConfig(const config::v1::EmoggBridgeConfig& cfg,
                                                     std::string_view bridge_name) {
  // Absent upstream: Emogg's public endpoint with verified TLS and the defaults.
  config::v1::UpstreamConfig upstream = cfg.upstream();
  if (!cfg.has_upstream()) upstream.set_url(std::string(kDefaultUrl));
  if (upstream.url().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "upstream.url: required when upstream is given (Emogg's is ", Av(kDefaultUrl), ")"));
  }
  absl::StatusOr<core::UpstreamEndpoint> endpoint =
      core::ToEndpoint(upstream, std::string(bridge_name));
  if (!endpoint.ok()) return endpoint.status();
  EmoggBridgeOptions o;
  static_cast<core::UpstreamEndpoint&>(o) = *std::move(endpoint);
  if (cfg.has_token()) {
    absl::StatusOr<std::shared_ptr<core::SecretSource>> t = core::LoadSecret(cfg.token(), "token");
    if (!t.ok()) return t.status();
    o.default_token = *std::move(t);
  }
  o.allow_call_token = cfg.allow_call_token();
  if (!o.default_token && !o.allow_call_token) {
    return absl::InvalidArgumentError(
        "token: required unless allow_call_token is set (then every call must carry "
        "x-emogg-token metadata)");
  }
  o.request_timeout = core::DurationOr(cfg.request_timeout(), std::chrono::seconds(30));
  o.idle_session_timeout = core::DurationOr(cfg.idle_session_timeout(), std::chrono::minutes(5));
  if (cfg.max_sessions() != 0) o.max_sessions = cfg.max_sessions();
  if (cfg.subscriber_queue() != 0) o.subscriber_queue = cfg.subscriber_queue();
  if (cfg.max_subscriptions_per_session() != 0) {
    o.max_subscriptions_per_session = cfg.max_subscriptions_per_session();
  }
  if (cfg.max_pending_requests() != 0) o.max_pending_requests = cfg.max_pending_requests();
  o.auth_timeout = core::DurationOr(cfg.auth_timeout(), std::chrono::seconds(10));
  o.auth_retry_pause = core::DurationOr(cfg.auth_retry_pause(), std::chrono::seconds(30));
  o.subscribe_timeout = core::DurationOr(cfg.subscribe_timeout(), std::chrono::seconds(10));

  const config::v1::EmoggHeartbeatConfig& hb = cfg.heartbeat();
  o.heartbeat_interval = hb.disabled() ? core::Duration::zero()
                                       : core::DurationOr(hb.interval(), std::chrono::seconds(30));
  o.heartbeat_timeout = core::DurationOr(hb.timeout(), std::chrono::seconds(10));

  // Client-side limit: 70 messages per 60 s with 8 kept for the session's own messages
  // (Emogg allows 80 per 60 s per user); see EmoggRateLimitConfig.
  const config::v1::EmoggRateLimitConfig& rl = cfg.rate_limit();
  o.rate_limit = !rl.disabled();
  o.limits.max_messages = rl.max_messages() != 0 ? rl.max_messages() : 70;
  o.limits.window = std::chrono::duration_cast<RateLimiter::Clock::duration>(
      core::DurationOr(rl.window(), std::chrono::seconds(60)));
  o.limits.control_reserve = rl.control_reserve() != 0 ? rl.control_reserve() : 8;
  if (o.limits.control_reserve >= o.limits.max_messages) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rate_limit.control_reserve (", o.limits.control_reserve,
        ") must be below rate_limit.max_messages (", o.limits.max_messages,
        "): callers' requests would never be sent"));
  }
  o.retry_after_429 = core::DurationOr(rl.retry_after_429(), std::chrono::seconds(60));
  return o;
}

void RegisterFactory(core::BridgeRegistry& registry) {
  core::RegisterConfigFactory<config::v1::EmoggBridgeConfig>(registry, "emogg", OptionsFromConfig,
      NewEmoggBridge);
}

}  // namespace wsbridge::emogg
