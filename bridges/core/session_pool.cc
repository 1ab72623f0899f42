#include "bridges/core/session_pool.h"

#include <algorithm>

#include <openssl/sha.h>

#include <boost/asio/post.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {
namespace {

namespace asio = boost::asio;
constexpr std::string_view kLog = "pool";

int64_t NowNs() { return Clock::now().time_since_epoch().count(); }

}  // namespace

void Lease::Release() {
  hold_.reset();
  if (session_ == nullptr) return;
  if (session_->leases.fetch_sub(1) == 1) session_->idle_since_ns.store(NowNs());
  session_.reset();
}

std::string CredentialKey(std::string_view credential) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(credential.data()), credential.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

namespace {

// An unset check interval: a quarter of the idle timeout, within [20 ms, 1 s].
SessionPoolOptions WithCheckInterval(SessionPoolOptions o) {
  if (o.check_interval <= Duration::zero()) {
    o.check_interval = std::clamp<Duration>(o.idle_timeout / 4, std::chrono::milliseconds(20),
                                            std::chrono::seconds(1));
  }
  return o;
}

}  // namespace

SessionPool::SessionPool(SessionPoolOptions options, asio::any_io_executor executor,
                         SessionFactory factory, std::function<void()> health_changed)
    : options_(WithCheckInterval(std::move(options))),
      factory_(std::move(factory)),
      health_changed_(std::move(health_changed)),
      strand_(asio::make_strand(executor)),
      timer_(strand_) {}

SessionPool::~SessionPool() = default;

void SessionPool::SetDefault(std::shared_ptr<SecretSource> credential) {
  default_ = std::move(credential);
  refresher_.Watch(default_);
}

void SessionPool::Start() {
  if (default_ != nullptr) {
    if (absl::StatusOr<Lease> l = AcquireDefault(); !l.ok()) {
      log::Warn(kLog, "could not start the default session",
                {{"bridge", options_.bridge}, {"error", l.status().ToString()}});
    }
  }
  ScheduleCheck();
}

absl::StatusOr<std::string> SessionPool::DefaultKey() {
  const uint64_t version = default_->version();
  {
    absl::MutexLock lock(&mu_);
    if (version == default_version_ && !default_key_.empty()) return default_key_;
  }
  absl::StatusOr<std::string> value = default_->Current();
  if (!value.ok()) {
    return absl::UnavailableError(absl::StrCat("the configured ", options_.upstream,
                                               " credential is unusable: ",
                                               value.status().message()));
  }
  std::string key = CredentialKey(*value);
  // Whether `value` is the value of `version` (SecretSource::Set bumps the version inside
  // the lock Current() takes): only then may a session's attempt at `version` be taken to
  // have used it.
  const bool value_of_version = default_->version() == version;
  std::shared_ptr<UpstreamSession> retired;
  std::string kept;  // the id of a default session kept under the new key
  {
    absl::MutexLock lock(&mu_);
    default_version_ = version;
    if (key == default_key_) return key;
    if (auto it = sessions_.find(default_key_);
        value_of_version && it != sessions_.end() && it->second.pinned &&
        !sessions_.contains(key) &&
        it->second.session->tracked_credential == default_ &&
        it->second.session->attempt_credential_version.load() == version) {
      // Rotated, but the default session has already begun attempting with the new
      // value: it reads the secret at each connection attempt, so a reconnect between
      // the refresher's re-read and this check (a dropped connection, or the retry after
      // the old value was refused) logged in with the new one. It becomes the new value's
      // session: a second session would log in again only for this one to be closed,
      // and the bridge's health would flicker meanwhile. Its id still names the key it
      // was created for (UniqueIdLocked keeps ids apart should that value come back).
      auto node = sessions_.extract(it);
      node.key() = key;
      if (!node.mapped().rekeyed) ++rekeyed_;
      node.mapped().rekeyed = true;
      kept = node.mapped().session->id();
      sessions_.insert(std::move(node));
    } else if (it != sessions_.end()) {
      // Rotated: the old default session stops being pinned, drains and closes.
      it->second.pinned = false;
      if (!it->second.draining) ++draining_;
      it->second.draining = true;
      if (it->second.session->leases.load() == 0) {
        retired = it->second.session;
        EraseLocked(it);
      }
    }
    default_key_ = key;
  }
  if (!kept.empty()) {
    log::Info(kLog, "the default credential changed; its session already uses the new value",
              {{"session", kept}});
  }
  if (retired != nullptr) {
    log::Info(kLog, "the default credential changed; closing its old session",
              {{"session", retired->id()}});
    retired->Close(1000, "credential rotated", nullptr);
  }
  return key;
}

absl::StatusOr<Lease> SessionPool::AcquireDefault() {
  if (default_ == nullptr) {
    return absl::FailedPreconditionError("this bridge has no default credential");
  }
  absl::StatusOr<std::string> key = DefaultKey();
  if (!key.ok()) return key.status();
  std::shared_ptr<UpstreamSession> started;
  absl::StatusOr<Lease> lease;
  {
    absl::MutexLock lock(&mu_);
    lease = AcquireLocked(*key, [this] { return default_; }, true, &started);
  }
  if (started != nullptr) {
    started->Start();
    if (health_changed_) health_changed_();
  }
  return lease;
}

absl::StatusOr<Lease> SessionPool::Acquire(const std::string& key, std::string_view credential,
                                           std::string_view caller) {
  std::vector<std::shared_ptr<UpstreamSession>> refused;
  absl::StatusOr<Lease> lease;
  {
    absl::MutexLock lock(&mu_);
    const Clock::time_point now = Clock::now();
    // This credential's own session, if the upstream refused it: O(log n) per call. The
    // whole pool is swept only when it is full (below) and on the pool's check.
    if (auto s = sessions_.find(key); s != sessions_.end() && !s->second.pinned &&
                                      s->second.session->auth_refused()) {
      RememberRefusalLocked(s->first, *s->second.session, now);
      refused.push_back(s->second.session);
      EraseLocked(s);
    }
    if (sessions_.find(key) == sessions_.end() && LiveLocked() >= options_.max_sessions) {
      std::vector<std::shared_ptr<UpstreamSession>> more = SweepRefusedLocked(now);
      refused.insert(refused.end(), more.begin(), more.end());
    }
    if (auto it = refused_.find(key); it != refused_.end() && it->second.until <= now) {
      refused_.erase(it);  // expired: one fresh attempt
    }
    if (auto it = refused_.find(key); it != refused_.end()) {
      // The upstream's own refusal (code, ErrorInfo), saying it was remembered.
      const auto left = std::chrono::ceil<std::chrono::seconds>(it->second.until - now);
      const absl::Status& was = it->second.status;
      absl::Status st(was.ok() ? absl::StatusCode::kUnauthenticated : was.code(),
                      absl::StrCat(was.ok() ? absl::StrCat("the ", options_.upstream,
                                                           " upstream refused this credential")
                                            : std::string(was.message()),
                                   " [remembered: not tried again for another ", left.count(),
                                   " s]"));
      was.ForEachPayload(
          [&st](absl::string_view url, const absl::Cord& payload) { st.SetPayload(url, payload); });
      lease = std::move(st);
    } else {
      lease = AcquireLocked(
          key, [credential] { return SecretSource::Fixed(std::string(credential)); }, false,
          nullptr, caller);
    }
  }
  CloseRefused(std::move(refused));
  return lease;
}

void SessionPool::RememberRefusalLocked(const std::string& key, const UpstreamSession& session,
                                        Clock::time_point now) {
  // Bounded: at most max_sessions refusals are remembered (the oldest expire first).
  if (refused_.size() < options_.max_sessions) {
    refused_[key] = {now + options_.refusal_memory, session.AuthRefusal()};
  }
}

SessionPool::Sessions::iterator SessionPool::EraseLocked(Sessions::iterator it) {
  if (it->second.draining) --draining_;
  if (it->second.rekeyed) --rekeyed_;
  return sessions_.erase(it);
}

std::string SessionPool::UniqueIdLocked(std::string id) const {
  // Only a session kept across a rotation carries an id that is not its key's (DefaultKey),
  // so only then can a new session's id be taken: O(sessions) in that case alone.
  if (rekeyed_ == 0) return id;
  const std::string base = id;
  for (int n = 2;; ++n) {
    const bool taken = std::any_of(sessions_.begin(), sessions_.end(), [&](const auto& kv) {
      return kv.second.session->id() == id;
    });
    if (!taken) return id;
    id = absl::StrCat(base, "-", n);
  }
}

std::vector<std::shared_ptr<UpstreamSession>> SessionPool::SweepRefusedLocked(
    Clock::time_point now) {
  for (auto it = refused_.begin(); it != refused_.end();) {
    it = it->second.until <= now ? refused_.erase(it) : std::next(it);
  }
  std::vector<std::shared_ptr<UpstreamSession>> out;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    // The default credential's session stays: it drives health and retries on its own.
    if (it->second.pinned || !it->second.session->auth_refused()) {
      ++it;
      continue;
    }
    RememberRefusalLocked(it->first, *it->second.session, now);
    out.push_back(it->second.session);
    it = EraseLocked(it);
  }
  return out;
}

void SessionPool::CloseRefused(std::vector<std::shared_ptr<UpstreamSession>> refused) {
  for (auto& s : refused) {
    log::Info(kLog, "closing an upstream session whose credential was refused",
              {{"session", s->id()}});
    s->Close(1000, "credential refused", nullptr);
  }
}

absl::StatusOr<Lease> SessionPool::AcquireLocked(
    const std::string& key, const std::function<std::shared_ptr<SecretSource>()>& credential,
                                                 bool pinned,
                                                 std::shared_ptr<UpstreamSession>* started,
                                                 std::string_view caller) {
  if (shut_down_) {
    return absl::UnavailableError(absl::StrCat("the ", options_.upstream,
                                               " bridge is shutting down; retry on another "
                                               "instance"));
  }
  auto it = sessions_.find(key);
  if (it == sessions_.end()) {
    // Former defaults still draining their calls do not hold a slot.
    if (LiveLocked() >= options_.max_sessions) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the ", options_.upstream, " bridge already holds its maximum of ",
          options_.max_sessions,
          " upstream sessions (one per credential); retry later or raise max_sessions"));
    }
    if (!caller.empty() && options_.max_sessions_per_caller > 0) {
      size_t mine = 0;
      for (const auto& [k, e] : sessions_) mine += !e.draining && e.caller == caller ? 1 : 0;
      if (mine >= options_.max_sessions_per_caller) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "this caller (", Av(caller), ") already holds its maximum of ",
            options_.max_sessions_per_caller, " ", options_.upstream,
            " upstream sessions (max_sessions_per_caller, one per credential); reuse a "
            "credential, wait for idle sessions to close, or raise max_sessions_per_caller"));
      }
    }
    std::string id = UniqueIdLocked(absl::StrCat(options_.bridge, "/", key.substr(0, 8)));
    Entry e;
    // Kept only for the per-caller limit (it costs memory per session otherwise).
    if (options_.max_sessions_per_caller > 0) e.caller = std::string(caller);
    std::shared_ptr<SecretSource> source = credential();
    e.session = factory_(id, source, pinned);
    // Before anything can start it (see DefaultKey's use of it).
    if (pinned) e.session->tracked_credential = std::move(source);
    e.pinned = pinned;
    e.session->idle_since_ns.store(NowNs());
    it = sessions_.emplace(key, std::move(e)).first;
    if (pinned && started != nullptr) *started = it->second.session;
  } else if (pinned) {
    it->second.pinned = true;
    if (it->second.draining) --draining_;
    it->second.draining = false;
  }
  it->second.session->leases.fetch_add(1);
  return Lease(it->second.session);
}

bool SessionPool::DefaultReady() const {
  if (default_ == nullptr) return true;
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(default_key_);
  return it != sessions_.end() && it->second.session->ready();
}

std::vector<admin::v1::Session> SessionPool::List() const {
  std::vector<std::shared_ptr<UpstreamSession>> sessions;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [k, e] : sessions_) sessions.push_back(e.session);
  }
  std::vector<admin::v1::Session> out;
  out.reserve(sessions.size());
  for (const auto& s : sessions) out.push_back(s->Describe());
  return out;
}

absl::Status SessionPool::Close(std::string_view session_id) {
  std::shared_ptr<UpstreamSession> victim;
  bool was_default = false;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
      if (it->second.session->id() == session_id) {
        victim = it->second.session;
        was_default = it->first == default_key_;
        EraseLocked(it);
        break;
      }
    }
  }
  if (victim == nullptr) {
    return absl::NotFoundError(absl::StrCat("no ", options_.upstream, " session with id \"",
                                            Av(session_id), "\" (list them with ListSessions)"));
  }
  victim->Close(1001, "closed by an operator", nullptr);
  if (was_default) (void)AcquireDefault();  // always on
  if (health_changed_) health_changed_();
  return absl::OkStatus();
}

void SessionPool::Shutdown(std::function<void()> done) {
  std::map<std::string, Entry> sessions;
  {
    absl::MutexLock lock(&mu_);
    if (done) shutdown_waiters_.push_back(std::move(done));
    if (shut_down_) {
      if (shutdown_complete_) {
        for (auto& w : shutdown_waiters_) asio::post(strand_, std::move(w));
        shutdown_waiters_.clear();
      }
      return;
    }
    shut_down_ = true;
    sessions = std::move(sessions_);
    sessions_.clear();
    draining_ = 0;
    rekeyed_ = 0;
  }
  auto remaining = std::make_shared<std::atomic<size_t>>(sessions.size() + 1);
  auto finished = [this, remaining] {
    if (remaining->fetch_sub(1) != 1) return;
    std::vector<std::function<void()>> waiters;
    {
      absl::MutexLock lock(&mu_);
      shutdown_complete_ = true;
      waiters = std::move(shutdown_waiters_);
      shutdown_waiters_.clear();
    }
    for (auto& w : waiters) w();
  };
  for (auto& [key, e] : sessions) e.session->Close(1001, "going away", finished);
  if (health_changed_) health_changed_();
  // The check timer is cancelled on the strand, and the shutdown counts as complete only
  // once no check can run any more: at once when no wait is pending, else when the
  // pending wait's handler runs (cancelled, or already expired and queued behind this).
  // Nothing touches the pool after that, so the owner may destroy it once `done` ran.
  asio::post(strand_, [this, finished] {
    if (!check_armed_) return finished();
    check_finished_ = finished;
    timer_.cancel();
  });
}

size_t SessionPool::size() const {
  absl::MutexLock lock(&mu_);
  return sessions_.size();
}

void SessionPool::ScheduleCheck() {
  asio::post(strand_, [this] { ArmCheck(); });
}

// On the strand, as Shutdown's cancel is: a check re-arms the timer right there, never
// through a post that could run after the shutdown completed.
void SessionPool::ArmCheck() {
  {
    // Shutdown's cancel may have run on the strand already: arm nothing after it.
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
  }
  check_armed_ = true;
  timer_.expires_after(options_.check_interval);
  timer_.async_wait([this](const boost::system::error_code& ec) {
    check_armed_ = false;
    if (check_finished_) {
      // Shutdown is waiting for this wait to end; after this call the pool may be gone.
      const std::function<void()> finished = std::move(check_finished_);
      return finished();
    }
    if (ec) return;
    Check();
    ArmCheck();
  });
}

// Closes sessions no call has held for idle_timeout, and former defaults no call holds;
// follows a rotated default credential even while no call arrives.
void SessionPool::Check() {
  if (default_ != nullptr) {
    bool need_default;
    {
      absl::MutexLock lock(&mu_);
      need_default = !shut_down_ && (default_version_ != default_->version() ||
                                     !sessions_.contains(default_key_));
    }
    if (need_default) (void)AcquireDefault();
  }
  {
    std::vector<std::shared_ptr<UpstreamSession>> refused;
    {
      absl::MutexLock lock(&mu_);
      refused = SweepRefusedLocked(Clock::now());
    }
    CloseRefused(std::move(refused));
  }
  std::vector<std::shared_ptr<UpstreamSession>> idle;
  const int64_t now = NowNs();
  const int64_t limit = std::chrono::duration_cast<Clock::duration>(options_.idle_timeout).count();
  {
    absl::MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      const Entry& e = it->second;
      const bool unused = e.session->leases.load() == 0;
      if (!e.pinned && unused &&
          (e.draining || now - e.session->idle_since_ns.load() >= limit)) {
        idle.push_back(e.session);
        it = EraseLocked(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& s : idle) {
    log::Info(kLog, "closing an unused upstream session", {{"session", s->id()}});
    s->Close(1000, "idle", nullptr);
  }
}

}  // namespace wsbridge::core
