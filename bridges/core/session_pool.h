// SessionPool: a bridge's upstream sessions keyed by credential (or by whatever a
// protocol keys them on: a conversation, a chat), with a cap, idle expiry, the
// always-on session of the configured default credential, and admin list/close.
//
// The default credential is a SecretSource. Its session is pinned (never closed for
// idleness) and drives the bridge's health. When the secret changes (rotation through
// a mounted file or env), the next call, or the pool's own check within a second, moves
// to a session for the new value; the old one stops being the default, drains (its
// calls go on) and closes as soon as no call holds it. If the default session has
// already reconnected with the new value by then, it stays the default instead.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"
#include "wsbridge/admin/v1/admin.pb.h"

namespace wsbridge::core {

// A call's hold on a session; releasing the last one starts the idle clock.
class Lease {
 public:
  Lease() = default;
  explicit Lease(std::shared_ptr<UpstreamSession> s) : session_(std::move(s)) {}
  Lease(Lease&& o) noexcept : session_(std::move(o.session_)), hold_(std::move(o.hold_)) {}
  Lease& operator=(Lease&& o) noexcept {
    if (this != &o) {
      Release();
      session_ = std::move(o.session_);
      hold_ = std::move(o.hold_);
    }
    return *this;
  }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() { Release(); }

  UpstreamSession* operator->() const { return session_.get(); }
  UpstreamSession* get() const { return session_.get(); }
  explicit operator bool() const { return session_ != nullptr; }
  void Release();
  // Something released with the lease (e.g. a slot of a bounded count of waiting calls).
  void Hold(std::shared_ptr<void> hold) { hold_ = std::move(hold); }

 private:
  std::shared_ptr<UpstreamSession> session_;
  std::shared_ptr<void> hold_;
};

// The SHA-256 of a credential as hex: the session key for per-credential pools (never
// the credential itself, which must not reach admin output or logs).
std::string CredentialKey(std::string_view credential);

struct SessionPoolOptions {
  // Filled in by BridgeBase::InitPool; bridges set the limits below (designated
  // initializers, so these carry initializers too).
  std::string bridge{};    // instance name, for ids and messages
  std::string upstream{};  // "DFX", for messages
  uint32_t max_sessions = 1000;
  Duration idle_timeout = std::chrono::minutes(5);
  // How often the pool checks the default credential and idle sessions on its own;
  // zero = a quarter of idle_timeout, within [20 ms, 1 s].
  Duration check_interval = Duration::zero();
  // A per-call credential the upstream refused: its session is closed and its slot freed
  // at once, and calls with it fail UNAUTHENTICATED for this long without reconnecting
  // (a bogus token hammering the bridge does not cost an upstream attempt per call).
  Duration refusal_memory = std::chrono::seconds(10);
  // Sessions one caller (Acquire's `caller`) may hold, so that one caller cannot take
  // every slot; 0 = only max_sessions applies.
  uint32_t max_sessions_per_caller = 0;
};

class SessionPool {
 public:
  // Makes the session for `key`, logging in with `credential`. `id` is the admin id
  // ("<bridge>/<first 8 of key>"); `pinned`: the default credential's session (it
  // drives health: call `health_changed` when its readiness changes).
  using SessionFactory = std::function<std::shared_ptr<UpstreamSession>(
      const std::string& id, std::shared_ptr<SecretSource> credential, bool pinned)>;

  SessionPool(SessionPoolOptions options, boost::asio::any_io_executor executor,
              SessionFactory factory, std::function<void()> health_changed);
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // The default credential (optional): its session starts with Start() and is kept on.
  // The refresher re-reads it off the io threads.
  void SetDefault(std::shared_ptr<SecretSource> credential);
  bool has_default() const { return default_ != nullptr; }

  // Starts the default session and the periodic check.
  void Start();

  // The session of the default credential. UNAVAILABLE when the secret cannot be read.
  absl::StatusOr<Lease> AcquireDefault();
  // The session for `key` (created when absent, logging in with `credential`, which is
  // then registered for log redaction). RESOURCE_EXHAUSTED at max_sessions.
  // `caller` ("" = none) identifies who asked, for max_sessions_per_caller: the session
  // counts against the caller that created it.
  absl::StatusOr<Lease> Acquire(const std::string& key, std::string_view credential,
                                std::string_view caller = "");

  // Whether the default session is logged in (true when there is no default).
  bool DefaultReady() const;
  std::vector<admin::v1::Session> List() const;
  // NOT_FOUND for an unknown id. A closed default session is replaced at once.
  absl::Status Close(std::string_view session_id);
  // Closes every session with 1001; `done` (any thread) once all are closed and the
  // pool's check timer is stopped (the pool may be destroyed from then on). Later
  // Acquire calls fail UNAVAILABLE. Idempotent.
  void Shutdown(std::function<void()> done);
  size_t size() const;
  // Re-reads the default credential now (tests).
  void RefreshSecretsNow() { refresher_.RefreshNow(); }

 private:
  struct Entry {
    std::shared_ptr<UpstreamSession> session;
    bool pinned = false;
    bool draining = false;  // a former default: closes once no call holds it
    bool rekeyed = false;   // kept across a rotation: its id names another key (DefaultKey)
    std::string caller;     // who created it (only with max_sessions_per_caller)
  };

  using Sessions = std::map<std::string, Entry>;
  // Sessions holding a slot (former defaults still draining do not): O(1).
  size_t LiveLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return sessions_.size() - draining_;
  }
  Sessions::iterator EraseLocked(Sessions::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `id`, or `id`-2, -3, ... when a live session already has it.
  std::string UniqueIdLocked(std::string id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RememberRefusalLocked(const std::string& key, const UpstreamSession& session,
                             Clock::time_point now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `credential` makes the session's credential when it is created.
  absl::StatusOr<Lease> AcquireLocked(const std::string& key,
                                      const std::function<std::shared_ptr<SecretSource>()>& credential,
                                      bool pinned, std::shared_ptr<UpstreamSession>* started,
                                      std::string_view caller = "")
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The default session's key for the secret's current value (re-hashed only when its
  // version changed); moves the pin when it changed.
  absl::StatusOr<std::string> DefaultKey();
  // Closes per-call sessions whose credential the upstream refused and remembers the
  // refusal for refusal_memory; forgets expired refusals.
  std::vector<std::shared_ptr<UpstreamSession>> SweepRefusedLocked(Clock::time_point now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseRefused(std::vector<std::shared_ptr<UpstreamSession>> refused);
  void ScheduleCheck();
  void ArmCheck();
  void Check();

  const SessionPoolOptions options_;
  SessionFactory factory_;
  std::function<void()> health_changed_;
  std::shared_ptr<SecretSource> default_;
  SecretRefresher refresher_;
  boost::asio::strand<boost::asio::any_io_executor> strand_;
  boost::asio::steady_timer timer_;
  // Strand only: a check wait is pending; Shutdown's completion, when it waits for it.
  bool check_armed_ = false;
  std::function<void()> check_finished_;

  mutable absl::Mutex mu_;
  Sessions sessions_ ABSL_GUARDED_BY(mu_);
  size_t draining_ ABSL_GUARDED_BY(mu_) = 0;  // entries of sessions_ with draining set
  size_t rekeyed_ ABSL_GUARDED_BY(mu_) = 0;   // entries of sessions_ with rekeyed set
  struct Refusal {
    Clock::time_point until;
    absl::Status status;  // what the upstream's refusal told callers
  };
  std::map<std::string, Refusal> refused_ ABSL_GUARDED_BY(mu_);
  std::string default_key_ ABSL_GUARDED_BY(mu_);
  uint64_t default_version_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_complete_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::function<void()>> shutdown_waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace wsbridge::core
