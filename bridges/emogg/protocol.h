// The Emogg protocol on the bridge toolkit: how an Emogg session opens (no subprotocol),
// logs in (`auth:token` first, nothing else until its answer), decodes each frame once,
// routes answers by id (the auth and ping answers by path), subscribes to channels
// (`channels:subscribe` answers carry the upstream subscription id its events will
// carry), keeps the session alive (the `ping` endpoint after a silence, with an answer
// deadline), classifies Emogg's closing statuses and paces every send with the
// client-side RateLimiter. Strand-only, like every core::Protocol.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bridges/core/rng.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"
#include "bridges/emogg/codec.h"
#include "bridges/emogg/rate_limiter.h"
#include "wsbridge/emogg/v1/emogg.pb.h"

namespace wsbridge::emogg {

// A 2xx answer to a request, as the session hands it to the service.
struct Answer final : core::Payload {
  int status = 0;
  std::string path;
  std::string body;  // JSON text as sent; "" when the answer had none
};

// One channel event, built once and shared by every subscriber of the subscription.
struct ChannelEvent final : core::Payload {
  std::shared_ptr<const v1::SubscriptionUpdate> update;  // update.event
};

// What a subscription is: the parameters of the first subscriber (core::Subscribe).
struct ChannelParams final : core::Payload {
  std::string channel;
  std::string key;
  std::string subscription_id;  // the bridge's stable id (SubscriptionIdFor)
};

// The core subscription key of (channel, key): callers with byte-equal channel and key
// share one upstream subscription.
std::string SubscriptionKey(std::string_view channel, std::string_view key);
// The bridge's stable subscription id for (channel, key) on one session: the same for
// every caller sharing it and across reconnects.
std::string SubscriptionIdFor(std::string_view session_id, std::string_view channel,
                              std::string_view key);

// What a session's protocol learns that its calls need as well (the service reads it
// from gRPC threads and session strands). Thread-safe.
class SessionNotes {
 public:
  // The answer with a closing status (401/405/429) on the current connection, if any:
  // the other requests it cut off name it.
  struct Closing {
    int status = 0;
    std::string path;
  };
  void SetClosing(std::optional<Closing> c);
  std::optional<Closing> closing() const;

  // Why the connection was lost last (a gap's reason).
  void SetLossReason(std::string reason);
  std::string loss_reason() const;

  // The close code of the close frame that ended the current connection (1001, 1011...);
  // 0 while it is open, or when it ended without one (a drop, a dead server). Callers
  // whose request it cut off see it.
  void SetCloseCode(int code) { close_code_.store(code); }
  int close_code() const { return close_code_.load(); }

  // After Emogg answered 429 the bridge stays away until `until` (retry_after_429):
  // requests fail fast meanwhile unless their caller asked to wait. Cleared by the next
  // successful auth.
  struct Pause {
    std::chrono::system_clock::time_point since, until;
    std::string path;  // the request Emogg answered 429
  };
  void SetPause(std::optional<Pause> p);
  std::optional<Pause> pause() const;

  // Whether the rate limiter is holding caller requests back right now.
  void SetRateLimited(bool limited) { rate_limited_.store(limited); }
  bool rate_limited() const { return rate_limited_.load(); }

  // The last event of a subscription whose channel replays its last state on subscribe
  // (for late joiners); null when none.
  void SetLastEvent(const std::string& key, std::shared_ptr<const v1::SubscriptionUpdate> ev);
  std::shared_ptr<const v1::SubscriptionUpdate> last_event(const std::string& key) const;

  // Subscribe streams per subscription key, so that a session never holds more than
  // `max` upstream subscriptions. False (nothing added) when `key` would be one too many.
  bool AddSubscriber(const std::string& key, uint32_t max);
  void RemoveSubscriber(const std::string& key);
  bool HasSubscribers(const std::string& key) const;

 private:
  mutable absl::Mutex mu_;
  std::optional<Closing> closing_ ABSL_GUARDED_BY(mu_);
  std::string loss_reason_ ABSL_GUARDED_BY(mu_);
  std::optional<Pause> pause_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> close_code_{0};
  std::map<std::string, std::shared_ptr<const v1::SubscriptionUpdate>> last_events_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> subscribers_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> rate_limited_{false};
};

struct ProtocolOptions {
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  std::shared_ptr<core::SecretSource> token;
  std::shared_ptr<SessionNotes> notes;
  // Heartbeat: a `ping` after this much silence from Emogg; an unanswered one after
  // `heartbeat_timeout` means a dead server. Zero interval: no pings.
  core::Duration heartbeat_interval = std::chrono::seconds(30);
  core::Duration heartbeat_timeout = std::chrono::seconds(10);
  // Client-side limit; disabled = no gate (pings and session messages are still sent).
  bool rate_limit = true;
  RateLimiter::Options limits;
  // Least pause before authenticating again after Emogg answered 429 (the connection's
  // slow_down_delay covers closes; this covers a 429 to the auth message itself).
  core::Duration retry_after_429 = std::chrono::seconds(60);
  // After a refused token (401), no connection attempt for this long.
  core::Duration auth_retry_pause = std::chrono::seconds(30);
};

// The cadence at which the session asks the protocol about heartbeats: a fraction of
// the interval and timeout, so a ping leaves within interval + tick of silence and a
// dead server is found within timeout + tick.
core::Duration HeartbeatTick(core::Duration interval, core::Duration timeout);

class Protocol final : public core::Protocol, private core::SendGate {
 public:
  explicit Protocol(ProtocolOptions options);

  absl::StatusOr<core::HandshakeRequest> PrepareHandshake() override;
  absl::StatusOr<core::LoginPlan> OnOpen(std::string_view subprotocol) override;
  core::Inbound Decode(std::string_view frame, bool binary) override;
  std::string NewRoute(std::string_view hint) override;
  absl::StatusOr<core::Outbound> EncodeSubscribe(const std::string& key,
                                                 const core::PayloadPtr& params,
                                                 std::string_view route) override;
  std::optional<core::Outbound> EncodeUnsubscribe(const std::string& key,
                                                  std::string_view event_route,
                                                  std::string_view route) override;
  std::optional<core::Outbound> Heartbeat() override;
  absl::Status CheckAlive() override;
  core::DisconnectKind Classify(const core::DisconnectInfo& info) override;
  core::SendGate* gate() override { return options_.rate_limit ? this : nullptr; }

 private:
  // core::SendGate: caller requests, one message each.
  std::optional<core::Clock::time_point> When(uint64_t cost, core::Clock::time_point now) override;
  void Sent(uint64_t id, uint64_t cost, core::Clock::time_point now) override;
  void Answered(uint64_t, bool, core::Clock::time_point) override {}
  void Abandoned(uint64_t, core::Clock::time_point) override {}

  // Counts a session message (auth, subscribe, unsubscribe, ping) in the window.
  void CountControl(core::Clock::time_point now);
  // Whether the token changed since this connection authenticated with it.
  bool TokenRotated() const { return options_.token->version() != token_version_; }
  // A refusal of a token that has since been rotated: the pause it set is lifted, so the
  // new value is tried with the normal backoff instead of after auth_retry_pause.
  void ForgetRefusalOfOldToken();
  // A refused token: no connection attempt before auth_retry_pause, and the status
  // refused attempts report meanwhile (TOKEN_REFUSED, naming `what`).
  void NoteRefusal(core::Clock::time_point now, std::string_view what,
                   std::map<std::string, std::string> metadata);
  // Tells callers (SessionNotes::pause) that the bridge stays away for retry_after_429.
  void NotePause(std::string_view path);
  core::Inbound DecodeAnswer(const Frame& frame);
  core::Inbound DecodeEvent(const Frame& frame);

  ProtocolOptions options_;
  core::Rng rng_;
  RequestIdGenerator ids_;
  RateLimiter limiter_;

  // --- Per connection. ---
  core::Clock::time_point last_inbound_{};
  std::optional<core::Clock::time_point> ping_sent_;
  std::string ping_id_;
  // The first closing status (401/405/429) Emogg answered on this connection.
  std::optional<SessionNotes::Closing> closing_;
  // The token's version (SecretSource::version) this connection authenticated with: a
  // refusal that arrives after the token was rotated concerns the old value, so it
  // does not hold the new one back (see TokenRotated).
  uint64_t token_version_ = 0;
  // Subscribe requests awaiting their answer: route -> params.
  std::map<std::string, std::shared_ptr<const ChannelParams>, std::less<>> pending_subs_;
  // Upstream subscription id -> params.
  std::map<std::string, std::shared_ptr<const ChannelParams>, std::less<>> subs_;
  // The route of the latest subscribe request per subscription key.
  std::map<std::string, std::string> latest_route_;
  // Upstream subscriptions nobody wants any more (acknowledged after their subscribers
  // left, or superseded): unsubscribed on the next heartbeat ticks.
  std::vector<std::string> orphans_;

  // --- Across connections. ---
  // No connection attempt before this (after a 401 or a 429 to the auth message), and
  // the kind a refused attempt is classified as.
  core::Clock::time_point not_before_{};
  core::DisconnectKind pause_kind_ = core::DisconnectKind::kError;
  absl::Status pause_status_;
  bool refused_attempt_ = false;
};

}  // namespace wsbridge::emogg
