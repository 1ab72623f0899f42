// The Nexora chat socket on the bridge toolkit: one core::UpstreamSession per chat (and
// credential), with this Protocol. Strand-only, like every core::Protocol; the token
// sources are shared by the sessions of one credential and are thread-safe.
//
//  - No login frame: the token travels in the upgrade URL's query and the socket is
//    usable as soon as the upgrade succeeds. The target is built on every attempt, so a
//    fresh JWT is used after a re-login.
//  - Replies are matched by send order: one message is in flight per chat (the gate
//    below), so every event without an id belongs to it; `done`, `error` and `duplicate`
//    end it. Events arriving while nothing is in flight go to the chat's sinks (Chat
//    streams) under kChatRoute, or are counted as unrouted.
//  - Heartbeat: a JSON ping on a quiet socket every ping_interval; a socket that sends
//    nothing for pong_timeout after a ping is dead (CheckAlive fails; the session
//    reconnects and resends the message in flight).
//  - A 401 at the upgrade, or an auth close code on an open socket (1008 policy
//    violation, 4001, 4401), with a token that may have changed (email + password: one
//    login; an API key file or env that was re-read with a new value): one reconnect
//    with the new token at the normal pace; otherwise, or a second time in a row, the
//    refusal stands (auth_retry_after between attempts, calls fail UNAUTHENTICATED).
//  - Other close codes (1001 going away, 1011 internal error, 1000, a drop without a
//    close frame): reconnect with the normal backoff and resend the message in flight
//    with its client_message_id (bounded by max_resends); the close code and reason are
//    kept for the messages a caller may see (ChatLink::LastDrop).
//  - An upgrade refused with another 4xx (400/404 for an unknown chat, 409, 410, 422):
//    no retry fixes it, so every message waiting for the socket fails at once with the
//    status mapped from the HTTP one and new ones fail with it until a socket opens.
//    429 (and 503 with Retry-After) fail the waiting messages at once too (the next
//    attempt waits for the upstream's slow-down delay); 5xx, network and TLS failures
//    after kAttemptsBeforeFailing attempts. Messages whose callers asked to wait
//    (x-wsbridge-wait-for-ready: true) wait through both instead.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/http_client.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"
#include "bridges/nexora/codec.h"

namespace wsbridge::nexora {

// The subscription key (and event route) of a chat's sinks: a local subscription, so
// nothing is sent upstream for it.
inline constexpr std::string_view kChatRoute = "chat";

// A decoded server event, as replies and chat events carry it.
struct EventPayload final : core::Payload {
  Event event;
};

// A token to connect with and its generation (bumps when a login replaces it).
struct Token {
  std::string value;
  uint64_t generation = 0;
};

// Where a chat socket's token comes from. Thread-safe; never blocks.
class TokenSource {
 public:
  virtual ~TokenSource() = default;
  // The token to connect with now. UNAVAILABLE while a login is under way (retry
  // shortly); UNAUTHENTICATED when the credential was refused.
  virtual absl::StatusOr<Token> Current() = 0;
  // `done` with a token once one is available (at once when it is), or the error that
  // prevents one. Runs on the calling thread or an io thread.
  virtual void WithToken(std::function<void(absl::StatusOr<Token>)> done) = 0;
  // The upstream refused token `generation` (401 at the upgrade): true when a fresh one
  // is being (or was already) obtained, so a quick retry may succeed; false when the
  // refusal stands (a fixed key, or a login within the hold after a refused one).
  virtual bool Refresh(uint64_t generation) = 0;
  // Changes whenever the configured secrets behind the token change (a rotated key or
  // password file), so a refusal of the old one need not be waited out.
  virtual uint64_t Epoch() const = 0;
};

// A fixed token or a configured API key (re-read from its SecretSource on every call;
// the generation is the source's version).
class StaticToken final : public TokenSource {
 public:
  // `reread` (optional) asks the secret's refresher to read it again now (a refusal may
  // mean the key was rotated and its file already replaced).
  explicit StaticToken(std::shared_ptr<core::SecretSource> source,
                       std::function<void()> reread = nullptr)
      : source_(std::move(source)), reread_(std::move(reread)) {}
  absl::StatusOr<Token> Current() override;
  void WithToken(std::function<void(absl::StatusOr<Token>)> done) override { done(Current()); }
  // A key read since the refused one was used: retry with it at once.
  bool Refresh(uint64_t generation) override;
  uint64_t Epoch() const override { return source_->version(); }

 private:
  std::shared_ptr<core::SecretSource> source_;
  std::function<void()> reread_;
};

// A JWT from POST /api/auth/login with the configured email and password. One login at
// a time for every session of the account (single-flight); a refused login holds for
// `retry_after` (calls fail UNAUTHENTICATED meanwhile: no login storm), unless the
// email or password secret changed.
class LoginToken final : public TokenSource, public std::enable_shared_from_this<LoginToken> {
 public:
  struct Options {
    std::string login_url;  // <http base>/api/auth/login
    std::shared_ptr<core::SecretSource> email, password;
    std::shared_ptr<core::HttpClient> http;
    core::Duration retry_after = std::chrono::seconds(30);
  };
  explicit LoginToken(Options options) : options_(std::move(options)) {}

  absl::StatusOr<Token> Current() override;
  void WithToken(std::function<void(absl::StatusOr<Token>)> done) override;
  bool Refresh(uint64_t generation) override;
  uint64_t Epoch() const override { return SecretsVersion(); }

  // Logins answered 2xx, and refused (tests, admin).
  int logins() const;

 private:
  // Starts a login unless one runs. Requires mu_.
  void StartLoginLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnLogin(absl::StatusOr<core::HttpAnswer> answer, uint64_t secrets_version);
  uint64_t SecretsVersion() const;

  const Options options_;
  mutable absl::Mutex mu_;
  std::string token_ ABSL_GUARDED_BY(mu_);  // "" = none usable
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool in_flight_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status refused_ ABSL_GUARDED_BY(mu_);  // the last login's refusal, while it holds
  std::chrono::steady_clock::time_point refused_until_ ABSL_GUARDED_BY(mu_){};
  uint64_t refused_secrets_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status last_error_ ABSL_GUARDED_BY(mu_);  // a transient failure of the last login
  std::vector<std::function<void(absl::StatusOr<Token>)>> waiters_ ABSL_GUARDED_BY(mu_);
  int logins_ ABSL_GUARDED_BY(mu_) = 0;
};

// At most one message in flight per chat socket. A message abandoned while its socket
// stays open (its caller's deadline, a cancel) leaves the gate shut until the socket is
// replaced: the rest of its answer would otherwise be taken for the next message's.
class OneInFlight final : public core::SendGate {
 public:
  std::optional<core::Clock::time_point> When(uint64_t, core::Clock::time_point now) override {
    if (busy_ || stale_) return std::nullopt;
    return now;
  }
  void Sent(uint64_t, uint64_t, core::Clock::time_point) override { busy_ = true; }
  void Answered(uint64_t, bool, core::Clock::time_point) override { busy_ = false; }
  void Abandoned(uint64_t, core::Clock::time_point) override {
    busy_ = false;
    stale_ = true;
  }
  // A new socket: nothing of an old answer can arrive on it.
  void Reset() { busy_ = stale_ = false; }
  bool busy() const { return busy_; }
  bool stale() const { return stale_; }

 private:
  bool busy_ = false;
  bool stale_ = false;
};

// Failed socket attempts in a row after which messages waiting for the socket fail
// UNAVAILABLE (unless their callers asked to wait): the first attempt and two retries.
inline constexpr int kAttemptsBeforeFailing = 3;

// What the calls of one chat socket learn from its connection attempts. Shared by the
// session's Protocol (which reports, on the strand) and the calls (any thread).
class ChatLink {
 public:
  using Fail = std::function<void(const absl::Status&)>;
  // A message of a call, from when it is queued until its answer ended: `fail` ends the
  // call (once) when no socket can be opened for it. `sent` (the message's "sent at
  // least once" flag) must outlive the registration. Returns the id for Remove.
  uint64_t Add(bool wait_for_ready, const std::atomic<bool>* sent, Fail fail);
  void Remove(uint64_t id);
  // The chat's standing refusal (OK = none): an upgrade refused with a status no retry
  // fixes, until a socket opens again. New messages fail with it at once.
  absl::Status Refusal() const;
  // Why the last open socket ended ("" = none yet), e.g. "upstream closed the connection
  // (code 1011: internal error)".
  std::string LastDrop() const;

  // --- The protocol's side. ---
  void Opened();
  void Dropped(std::string why);
  void SetRefusal(absl::Status refusal);
  // Ends registered messages with `status`: all of them when `definitive` (the chat was
  // refused); else only those never sent whose callers did not ask to wait (a message
  // sent before its socket dropped waits for its resend, bounded by answer_idle_timeout
  // and max_resends).
  void FailWaiting(const absl::Status& status, bool definitive);

 private:
  struct Waiter {
    bool wait_for_ready = false;
    const std::atomic<bool>* sent = nullptr;
    Fail fail;
  };
  mutable absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, Waiter> waiters_ ABSL_GUARDED_BY(mu_);
  absl::Status refusal_ ABSL_GUARDED_BY(mu_);
  std::string last_drop_ ABSL_GUARDED_BY(mu_);
};

// Chat sockets of one bridge that cannot reach Nexora (network, TLS, 5xx, 429): the
// bridge is NOT_SERVING while any is. Thread-safe.
class UpstreamHealth {
 public:
  explicit UpstreamHealth(std::function<void()> changed) : changed_(std::move(changed)) {}
  void SetFailing(bool& failing, bool now);
  bool serving() const { return failing_.load() == 0; }

 private:
  std::function<void()> changed_;
  std::atomic<int> failing_{0};
};

struct ProtocolOptions {
  std::string url;  // ws(s)://host[:port][/prefix]
  std::string chat_id;
  std::vector<std::pair<std::string, std::string>> headers;
  std::shared_ptr<TokenSource> token;
  core::Duration ping_interval = std::chrono::seconds(20);
  core::Duration pong_timeout = std::chrono::seconds(10);
  // Both optional: the chat's calls, and the bridge's upstream health.
  std::shared_ptr<ChatLink> link;
  std::shared_ptr<UpstreamHealth> health;
  // The clock (tests pass their own).
  std::function<core::Clock::time_point()> now = [] { return core::Clock::now(); };
};

class Protocol final : public core::Protocol {
 public:
  explicit Protocol(ProtocolOptions options);
  ~Protocol() override;

  absl::StatusOr<core::HandshakeRequest> PrepareHandshake() override;
  absl::StatusOr<core::LoginPlan> OnOpen(std::string_view subprotocol) override;
  core::Inbound Decode(std::string_view frame, bool binary) override;
  std::string NewRoute(std::string_view) override { return ""; }
  // Chat sinks: local, nothing is sent upstream.
  absl::StatusOr<core::Outbound> EncodeSubscribe(const std::string&, const core::PayloadPtr&,
                                                 std::string_view) override {
    return core::Outbound{};
  }
  std::optional<core::Outbound> Heartbeat() override;
  absl::Status CheckAlive() override;
  core::DisconnectKind Classify(const core::DisconnectInfo& info) override;
  core::SendGate* gate() override { return &gate_; }

 private:
  ProtocolOptions options_;
  std::string base_;       // scheme://authority of the URL
  std::string base_path_;  // its path prefix
  OneInFlight gate_;
  uint64_t generation_ = 0;         // of the token used by the current attempt
  absl::Status prepare_status_;     // why the last PrepareHandshake failed
  bool refreshed_ = false;          // a re-login already followed a 401 since the last open
  int failed_attempts_ = 0;         // attempts in a row that never opened
  bool failing_ = false;            // counted in options_.health
  core::Clock::time_point last_rx_{};
  std::optional<core::Clock::time_point> ping_sent_;
};

}  // namespace wsbridge::nexora
