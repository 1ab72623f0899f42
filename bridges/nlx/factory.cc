#include "bridges/nlx/factory.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/upstream_config.h"
#include "bridges/nlx/codec.h"

namespace wsbridge::nlx {
absl::StatusOr<NlxBridgeOptions> OptionsFromConfig(const config::v1::NlxBridgeConfig& cfg,
                                                   std::string_view bridge_name) {
  // No url (the loader fills an absent upstream with its defaults): NLX's endpoint, with
  // verified TLS.
  config::v1::UpstreamConfig upstream = cfg.upstream();
  if (upstream.url().empty()) upstream.set_url(std::string(kDefaultUrl));
  if (absl::StrContains(upstream.url(), "#")) {
    return absl::InvalidArgumentError("upstream.url: must not carry a fragment (#...)");
  }
  for (std::string_view k : {"apiKey=", "deploymentKey=", "channelKey=", "conversationId="}) {
    if (absl::StrContains(upstream.url(), Av(k))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "upstream.url: must not carry ", Av(k.substr(0, k.size() - 1)),
          " (the bridge adds the keys from api_key, deployment_key and channel_key, and the "
          "conversation per call)"));
    }
  }
  absl::StatusOr<core::UpstreamEndpoint> endpoint = core::ToEndpoint(upstream, std::string(bridge_name));
  if (!endpoint.ok()) return endpoint.status();
  NlxBridgeOptions o;
  static_cast<core::UpstreamEndpoint&>(o) = *std::move(endpoint);

  struct Part {
    bool set;
    const config::v1::Secret* secret;
    std::string_view field;
    std::shared_ptr<core::SecretSource>* out;
  };
  const Part parts[] = {{cfg.has_api_key(), &cfg.api_key(), "api_key", &o.api_key},
                        {cfg.has_deployment_key(), &cfg.deployment_key(), "deployment_key", &o.deployment_key},
                        {cfg.has_channel_key(), &cfg.channel_key(), "channel_key", &o.channel_key}};
  for (const Part& p : parts) {
    if (!p.set) {
      if (!cfg.allow_call_keys()) {
        return absl::InvalidArgumentError(absl::StrCat(
            Av(p.field), ": required (set all three keys, or allow_call_keys: true so calls "
            "bring the missing ones in x-nlx-* metadata)"));
      }
      continue;
    }
    absl::StatusOr<std::shared_ptr<core::SecretSource>> s = core::LoadSecret(*p.secret, p.field);
    if (!s.ok()) return s.status();
    *p.out = *std::move(s);
  }
  o.language = cfg.language();
  if (o.language.size() > 35 ||
      !std::all_of(o.language.begin(), o.language.end(),
                   [](char c) { return absl::ascii_isalnum(c) || c == '-' || c == '_'; })) {
    return absl::InvalidArgumentError(absl::StrCat(
        "language: \"", o.language, "\" is not a language code such as en-US"));
  }
  o.allow_call_keys = cfg.allow_call_keys();
  o.ack_timeout = core::DurationOr(cfg.ack_timeout(), std::chrono::seconds(10));
  o.turn_timeout = core::DurationOr(cfg.turn_timeout(), std::chrono::seconds(30));
  o.idle_conversation_timeout = core::DurationOr(cfg.idle_conversation_timeout(), std::chrono::seconds(30));
  o.auth_retry_after = core::DurationOr(cfg.auth_retry_after(), std::chrono::seconds(30));
  if (cfg.max_conversations() != 0) o.max_conversations = cfg.max_conversations();
  if (cfg.max_pending_turns() != 0) o.max_pending_turns = cfg.max_pending_turns();
  if (cfg.max_turn_bytes() != 0) o.max_turn_bytes = cfg.max_turn_bytes();
  if (cfg.stream_queue() != 0) o.stream_queue = cfg.stream_queue();
  // Refused keys are retried after auth_retry_after (full jitter), not on the
  // connection's default auth backoff.
  o.connection.auth_backoff = {o.auth_retry_after, o.auth_retry_after, 1.0,
                               o.connection.auth_backoff.reset_after};
  return o;
}

void RegisterFactory(core::BridgeRegistry& registry) {
  core::RegisterConfigFactory<config::v1::NlxBridgeConfig>(registry, "nlx", OptionsFromConfig,
      NewNlxBridge);
}

}  // namespace wsbridge::nlx
