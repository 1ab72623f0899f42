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
//  - A 401 at the upgrade with a refreshable token (email + password): one login, then
//    a reconnect with the new JWT; a second 401 in a row stands as a refusal.
#pragma once

#include <chrono>
#include <functional>
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
};

// A fixed token or a configured API key (re-read from its SecretSource on every call).
class StaticToken final : public TokenSource {
 public:
  explicit StaticToken(std::shared_ptr<core::SecretSource> source) : source_(std::move(source)) {}
  absl::StatusOr<Token> Current() override;
  void WithToken(std::function<void(absl::StatusOr<Token>)> done) override { done(Current()); }
  bool Refresh(uint64_t) override { return false; }

 private:
  std::shared_ptr<core::SecretSource> source_;
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

struct ProtocolOptions {
  std::string url;  // ws(s)://host[:port][/prefix]
  std::string chat_id;
  std::vector<std::pair<std::string, std::string>> headers;
  std::shared_ptr<TokenSource> token;
  core::Duration ping_interval = std::chrono::seconds(20);
  core::Duration pong_timeout = std::chrono::seconds(10);
  // The clock (tests pass their own).
  std::function<core::Clock::time_point()> now = [] { return core::Clock::now(); };
};

class Protocol final : public core::Protocol {
 public:
  explicit Protocol(ProtocolOptions options);

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
  core::Clock::time_point last_rx_{};
  std::optional<core::Clock::time_point> ping_sent_;
};

}  // namespace wsbridge::nexora
