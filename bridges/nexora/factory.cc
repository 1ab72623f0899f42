#include "bridges/nexora/factory.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/upstream_config.h"
#include "bridges/nexora/codec.h"

namespace wsbridge::nexora {
absl::StatusOr<NexoraBridgeOptions> OptionsFromConfig(const config::v1::NexoraBridgeConfig& cfg,
                                                      std::string_view bridge_name) {
  if (!cfg.has_upstream()) {
    return absl::InvalidArgumentError(
        "upstream: required (the Nexora instance's WebSocket root, e.g. wss://nexora.example.com)");
  }
  if (absl::StrContains(cfg.upstream().url(), "?")) {
    return absl::InvalidArgumentError(
        "upstream.url: must not carry a query (the bridge adds /api/ws/{chat_id}?token=...)");
  }
  absl::StatusOr<core::UpstreamEndpoint> endpoint =
      core::ToEndpoint(cfg.upstream(), std::string(bridge_name));
  if (!endpoint.ok()) return endpoint.status();
  NexoraBridgeOptions o;
  static_cast<core::UpstreamEndpoint&>(o) = *std::move(endpoint);
  while (!o.url.empty() && o.url.back() == '/') o.url.pop_back();

  // The HTTP endpoints: the configured base, or the socket URL's scheme swapped.
  if (!cfg.http_base_url().empty()) {
    const std::string& b = cfg.http_base_url();
    const bool https = absl::StartsWithIgnoreCase(b, "https://");
    if (!https && !absl::StartsWithIgnoreCase(b, "http://")) {
      return absl::InvalidArgumentError("http_base_url: must start with https:// (or http://)");
    }
    if (!https && !o.connection.allow_plaintext) {
      return absl::InvalidArgumentError(
          "http_base_url: http:// needs upstream.allow_plaintext (only for local emulators and "
          "tests); use https://");
    }
    if (absl::StrContains(b, "@") || absl::StrContains(b, "?")) {
      return absl::InvalidArgumentError("http_base_url: must not carry user:password@ or a query");
    }
    o.http_base_url = b;
  } else if (absl::StatusOr<std::string> b = HttpBaseUrl(o.url); !b.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("upstream.url: ", b.status().message()));
  }

  // Credentials: an API key, or email + password, or per-call tokens only.
  if (cfg.has_api_key() && (cfg.has_email() || cfg.has_password())) {
    return absl::InvalidArgumentError(
        "api_key and email/password are alternatives: set the API key, or the account the "
        "bridge logs in with, not both");
  }
  if (cfg.has_email() != cfg.has_password()) {
    return absl::InvalidArgumentError(absl::StrCat(
        cfg.has_email() ? "password" : "email",
        ": required with ", cfg.has_email() ? "email" : "password",
        " (the bridge logs in with both through POST /api/auth/login)"));
  }
  if (cfg.has_api_key()) {
    absl::StatusOr<std::shared_ptr<core::SecretSource>> k = core::LoadSecret(cfg.api_key(), "api_key");
    if (!k.ok()) return k.status();
    o.api_key = *std::move(k);
  }
  if (cfg.has_email()) {
    absl::StatusOr<std::shared_ptr<core::SecretSource>> e = core::LoadSecret(cfg.email(), "email");
    if (!e.ok()) return e.status();
    absl::StatusOr<std::shared_ptr<core::SecretSource>> p = core::LoadSecret(cfg.password(), "password");
    if (!p.ok()) return p.status();
    o.email = *std::move(e);
    o.password = *std::move(p);
  }
  o.allow_call_token = cfg.allow_call_token();
  if (o.api_key == nullptr && o.email == nullptr && !o.allow_call_token) {
    return absl::InvalidArgumentError(
        "no credential: set api_key, or email and password, or allow_call_token: true (then "
        "every call must carry x-nexora-token metadata)");
  }

  o.idle_chat_timeout = core::DurationOr(cfg.idle_chat_timeout(), std::chrono::minutes(5));
  o.ping_interval = core::DurationOr(cfg.ping_interval(), std::chrono::seconds(20));
  o.pong_timeout = core::DurationOr(cfg.pong_timeout(), std::chrono::seconds(10));
  o.http_timeout = core::DurationOr(cfg.http_timeout(), std::chrono::seconds(30));
  o.answer_idle_timeout = core::DurationOr(cfg.answer_idle_timeout(), std::chrono::seconds(120));
  o.auth_retry_after = core::DurationOr(cfg.auth_retry_after(), std::chrono::seconds(30));
  if (cfg.max_chats() != 0) o.max_chats = cfg.max_chats();
  if (cfg.max_resends() != 0) o.max_resends = cfg.max_resends();
  if (cfg.max_pending_messages_per_chat() != 0) {
    o.max_pending_messages_per_chat = cfg.max_pending_messages_per_chat();
  }
  if (cfg.max_content_bytes() != 0) o.max_content_bytes = cfg.max_content_bytes();
  // A refused token is retried after auth_retry_after (with full jitter, never sooner
  // on average than half of it), not on the connection's default auth backoff.
  o.connection.auth_backoff = {o.auth_retry_after, o.auth_retry_after, 1.0,
                               o.connection.auth_backoff.reset_after};
  return o;
}

void RegisterFactory(core::BridgeRegistry& registry) {
  core::RegisterConfigFactory<config::v1::NexoraBridgeConfig>(registry, "nexora", OptionsFromConfig,
      NewNexoraBridge);
}

}  // namespace wsbridge::nexora
