#include "bridges/core/upstream_session.h"

#include <algorithm>
#include <list>
#include <map>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/loop_executor.h"
#include "bridges/core/status.h"
#include "bridges/core/strings.h"
#include "bridges/core/upstream_config.h"

namespace wsbridge::core {
namespace {

namespace asio = boost::asio;
using Strand = Connection::Strand;

constexpr std::string_view kLog = "session";


class SessionImpl;

// Forwards one connection's callbacks tagged with its generation, so that callbacks
// from a connection the session already replaced are ignored.
class Link final : public ConnectionHandler {
 public:
  Link(std::weak_ptr<SessionImpl> session, uint64_t generation)
      : session_(std::move(session)), generation_(generation) {}
  absl::StatusOr<HandshakeRequest> PrepareHandshake() override;
  void OnOpen(std::string_view subprotocol) override;
  void OnMessage(std::string_view payload, bool binary) override;
  void OnDisconnected(const DisconnectInfo& info, bool will_retry) override;
  DisconnectKind Classify(const DisconnectInfo& info) override;
  void OnHeartbeat() override;

 private:
  std::weak_ptr<SessionImpl> session_;
  uint64_t generation_;
};

enum class State { kIdle, kConnecting, kLoggingIn, kReady, kClosed };

struct Op {
  uint64_t id = 0;
  Request req;
  ReplyCallback done;
  std::string route;  // while in flight
  bool in_flight = false;
  bool ordered = false;  // in flight without a route: answered in send order
  int retries = 0;
  Clock::time_point queued_at{};
  Clock::time_point sent_at{};
  Clock::time_point not_before{};
  Clock::time_point expires = Clock::time_point::max();
};

struct Sub {
  PayloadPtr params;
  std::map<uint64_t, std::shared_ptr<EventSink>> sinks;
  std::string request_route;  // subscribe request awaiting its answer ("" = none)
  std::string event_route;    // once acknowledged
  bool acked = false;
  bool lost = false;  // was acknowledged on a connection that went away
  std::chrono::system_clock::time_point lost_at{};
  bool after_gap = false;  // the next event is the first after a restore
  Clock::time_point ack_expires = Clock::time_point::max();
};

// One copy of equal settings for every session that has them (a bridge's sessions
// differ only in their id): kept while a session uses it.
std::shared_ptr<const SessionSettings> Intern(SessionSettings settings) {
  settings.id.clear();
  static absl::Mutex mu(absl::kConstInit);
  static auto* kept = new std::vector<std::weak_ptr<const SessionSettings>>();
  absl::MutexLock lock(&mu);
  for (auto it = kept->begin(); it != kept->end();) {
    std::shared_ptr<const SessionSettings> s = it->lock();
    if (s == nullptr) {
      it = kept->erase(it);
    } else if (s->SameAs(settings)) {
      return s;
    } else {
      ++it;
    }
  }
  auto s = std::make_shared<const SessionSettings>(std::move(settings));
  kept->push_back(s);
  return s;
}

class SessionImpl final : public UpstreamSession,
                          public std::enable_shared_from_this<SessionImpl> {
 public:
  SessionImpl(asio::any_io_executor executor, SessionOptions options,
              std::unique_ptr<Protocol> protocol)
      : strand_(asio::make_strand(executor)),
        id_(options.id),
        settings_(Intern(std::move(static_cast<SessionSettings&>(options)))),
        // Shared connection options carry the bridge's name, not this connection's.
        own_connection_name_(options.shared_connection == nullptr && !options.connection.name.empty()),
        connection_options_(options.shared_connection
                                ? std::move(options.shared_connection)
                                : std::make_shared<const ConnectionOptions>(std::move(options.connection))),
        protocol_(std::move(protocol)),
        // On the io executor; its handler goes onto the strand (see Schedule).
        deadline_timer_(strand_.get_inner_executor()) {}

  // --- UpstreamSession, any thread. ---
  void Start() override {
    Post([](SessionImpl& s) { s.EnsureConnected(); });
  }

  uint64_t Send(Request request, ReplyCallback done) override {
    auto op = std::make_unique<Op>();
    op->id = next_id_.fetch_add(1);
    op->req = std::move(request);
    op->done = std::move(done);
    uint64_t id = op->id;
    // Inside an InlineScope (or once an InlineAfterScope closes) an idle strand takes
    // the request on this thread (see loop_executor.h); the io thread is not woken to
    // write it.
    auto add = [self = shared_from_this(), op = std::move(op)]() mutable { self->AddOp(std::move(op)); };
    if (InlineScope::Active() || InlineAfterScope::Holding()) {
      asio::dispatch(strand_, std::move(add));
    } else {
      asio::post(strand_, std::move(add));
    }
    return id;
  }

  void Cancel(uint64_t id) override {
    Post([id](SessionImpl& s) { s.DropOp(id); });
  }

  uint64_t Subscribe(std::string key, PayloadPtr params,
                     std::shared_ptr<EventSink> sink) override {
    uint64_t id = next_id_.fetch_add(1);
    Post([id, key = std::move(key), params = std::move(params),
          sink = std::move(sink)](SessionImpl& s) mutable {
      s.AddSink(key, std::move(params), id, std::move(sink));
    });
    return id;
  }

  void Unsubscribe(std::string key, uint64_t sink_id) override {
    Post([key = std::move(key), sink_id](SessionImpl& s) { s.RemoveSink(key, sink_id); });
  }

  void Close(uint16_t code, std::string reason, std::function<void()> done) override {
    Post([code, reason = std::move(reason), done = std::move(done)](SessionImpl& s) mutable {
      s.DoClose(code, reason, std::move(done));
    });
  }

  const std::string& id() const override { return id_; }
  bool ready() const override { return ready_.load(); }
  bool auth_refused() const override { return auth_refused_flag_.load(); }
  absl::Status AuthRefusal() const override {
    absl::MutexLock lock(&mu_);
    return auth_refusal_;
  }

  absl::Status Unreachable() const override {
    if (!unreachable_.load()) return absl::OkStatus();
    const int64_t since_ms = down_since_ms_.load();
    std::string error;
    {
      absl::MutexLock lock(&mu_);
      error = last_error_;
    }
    const auto since = std::chrono::system_clock::time_point(std::chrono::milliseconds(since_ms));
    const int64_t secs = std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now() - since)
               .count());
    return absl::UnavailableError(absl::StrCat(
        "the ", settings_->upstream, " upstream has been unreachable since ",
        absl::FormatTime("%H:%M:%SZ", absl::FromChrono(since), absl::UTCTimeZone()), " (", secs,
        " s): ", Av(std::string_view(error).substr(0, 300)),
        "; retry later, or send \"x-wsbridge-wait-for-ready: true\" metadata to wait for it"));
  }

  admin::v1::Session Describe() const override {
    admin::v1::Session out;
    out.set_id(id_);
    out.set_bridge(settings_->bridge);
    out.set_in_flight_requests(static_cast<uint32_t>(op_count_.load()));
    out.set_subscribers(static_cast<uint32_t>(sink_count_.load()));
    std::shared_ptr<Connection> conn;
    {
      absl::MutexLock lock(&mu_);
      conn = connection_snapshot_;
      out.set_last_error(last_error_);
    }
    if (conn == nullptr) {
      out.set_state(closed_flag_.load() ? admin::v1::SESSION_STATE_CLOSED
                                        : admin::v1::SESSION_STATE_IDLE);
      return out;
    }
    out.set_target(conn->target());
    switch (conn->state()) {
      case ConnectionState::kIdle: out.set_state(admin::v1::SESSION_STATE_IDLE); break;
      case ConnectionState::kConnecting: out.set_state(admin::v1::SESSION_STATE_CONNECTING); break;
      case ConnectionState::kAuthenticating:
        out.set_state(admin::v1::SESSION_STATE_AUTHENTICATING);
        break;
      case ConnectionState::kReady: out.set_state(admin::v1::SESSION_STATE_READY); break;
      case ConnectionState::kBackingOff:
        out.set_state(admin::v1::SESSION_STATE_BACKING_OFF);
        break;
      case ConnectionState::kClosed: out.set_state(admin::v1::SESSION_STATE_CLOSED); break;
    }
    const ConnectionStats& st = conn->stats();
    int64_t since = st.ready_since_unix_ms.load();
    if (since > 0) {
      out.mutable_connected_since()->set_seconds(since / 1000);
      out.mutable_connected_since()->set_nanos(static_cast<int32_t>((since % 1000) * 1000000));
    }
    out.set_reconnects(st.reconnects.load());
    out.set_frames_in(st.frames_in.load());
    out.set_frames_out(st.frames_out.load());
    out.set_bytes_in(st.bytes_in.load());
    out.set_bytes_out(st.bytes_out.load());
    std::string err = conn->last_error();
    if (!err.empty()) out.set_last_error(err);
    return out;
  }

  // --- Connection callbacks (strand), via Link. ---
  absl::StatusOr<HandshakeRequest> PrepareHandshake(uint64_t gen) {
    if (gen != generation_) return absl::CancelledError("connection replaced");
    if (tracked_credential != nullptr) {
      attempt_credential_version.store(tracked_credential->version());
    }
    return protocol_->PrepareHandshake();
  }

  DisconnectKind Classify(const DisconnectInfo& info) { return protocol_->Classify(info); }

  void OnOpen(uint64_t gen, std::string_view subprotocol) {
    if (gen != generation_ || connection_ == nullptr) return;
    absl::StatusOr<LoginPlan> plan = protocol_->OnOpen(subprotocol);
    if (!plan.ok()) {
      SetLastError(plan.status().ToString());
      // A credential that cannot be read is not the upstream's refusal, but retrying
      // fast cannot fix it either.
      connection_->Reconnect(plan.status(), DisconnectKind::kAuthRefused);
      return;
    }
    for (Outbound& f : plan->frames) {
      absl::Status sent = connection_->Send(std::move(f.frame), f.binary);
      if (!sent.ok()) {
        connection_->Reconnect(sent);
        return;
      }
    }
    if (!plan->wait) {
      OnLoggedIn();
      return;
    }
    state_ = State::kLoggingIn;
    connection_->MarkAuthenticating();
    login_sent_ = Clock::now();
    // The login's deadline is one more expiry for the deadline timer (OnDeadlineTimer
    // checks it while the session is logging in): no timer of its own.
    ArmAt(LoginExpires());
  }

  Clock::time_point LoginExpires() const {
    const Clock::time_point cap = Clock::time_point::max() - std::chrono::hours(24);
    return settings_->login_timeout >= cap - login_sent_
               ? cap
               : login_sent_ + std::chrono::duration_cast<Clock::duration>(settings_->login_timeout);
  }

  void OnMessage(uint64_t gen, std::string_view payload, bool binary) {
    if (gen != generation_) return;
    Inbound in = protocol_->Decode(payload, binary);
    switch (in.kind) {
      case Inbound::Kind::kMalformed:
        if (settings_->malformed_frames != nullptr) settings_->malformed_frames->Inc();
        log::Warn(kLog, "dropped a malformed upstream frame",
                  {{"session", id_},
                   {"bytes", absl::StrCat(payload.size())},
                   {"error", std::string(in.status.message())}});
        return;
      case Inbound::Kind::kHeartbeat:
      case Inbound::Kind::kIgnore:
        return;
      case Inbound::Kind::kLogin:
        if (state_ == State::kLoggingIn) OnLoginAnswer(in);
        return;
      case Inbound::Kind::kEvent:
        if (auto it = sub_routes_.find(in.route); it != sub_routes_.end()) {
          auto sit = subs_.find(it->second);
          if (sit != subs_.end() && sit->second.acked) {
            Deliver(sit->second, in.payload);
            return;
          }
        }
        Unrouted(in.route);
        return;
      case Inbound::Kind::kReply:
        OnReply(std::move(in));
        return;
    }
  }

  void OnDisconnected(uint64_t gen, const DisconnectInfo& info, bool will_retry) {
    if (gen != generation_) return;
    SetLastError(info.reason.ToString());
    const bool was_ready = ready_.load();
    SetReady(false);
    // Down since the first loss; "unreachable" (calls fail fast) once an attempt that
    // never became ready fails: a single drop gets one reconnect attempt of grace.
    int64_t zero = 0;
    down_since_ms_.compare_exchange_strong(
        zero, std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count());
    if (!was_ready && info.kind != DisconnectKind::kAuthRefused) unreachable_.store(true);
    const Clock::time_point now = Clock::now();
    const bool refused = info.kind == DisconnectKind::kAuthRefused;
    if (refused) RefuseAuth(info.reason);
    // Requests in flight may have executed upstream: resend only what the protocol
    // deduplicates; the rest learn that the outcome is unknown.
    std::vector<uint64_t> in_flight;
    for (const auto& [id, op] : ops_) {
      if (op->in_flight) in_flight.push_back(id);
    }
    std::vector<uint64_t> resend;
    for (uint64_t id : in_flight) {
      Op& op = *ops_[id];
      if (SendGate* g = protocol_->gate(); g != nullptr && op.req.gated) g->Abandoned(id, now);
      if (op.req.on_drop == OnDrop::kResend && !refused) {
        ClearRoute(op);
        resend.push_back(id);
        continue;
      }
      Finish(id, WithErrorInfo(
                     absl::UnavailableError(absl::StrCat(
                         "the connection to the ", settings_->upstream, " upstream was lost before ",
                         op.req.what,
                         " was answered; it may or may not have been executed (outcome "
                         "unknown) and was not resent")),
                     "OUTCOME_UNKNOWN", settings_->error_domain));
    }
    // Resent first, in the order they were first sent.
    for (auto it = resend.rbegin(); it != resend.rend(); ++it) waiting_.push_front(*it);
    const auto wall = std::chrono::system_clock::now();
    for (auto& [key, sub] : subs_) {
      if (sub.acked && !sub.lost) {
        sub.lost = true;
        sub.lost_at = wall;
      }
      sub.acked = false;
      sub.request_route.clear();
      sub.event_route.clear();
      sub.ack_expires = Clock::time_point::max();
    }
    sub_routes_.clear();
    op_routes_.clear();
    ordered_.clear();
    if (refused) {
      // Callers learn at once; the connection keeps trying on its own, slowly.
      FailAll(auth_status_, /*keep_subscriptions=*/false);
    }
    if (will_retry) {
      if (state_ != State::kClosed) state_ = State::kConnecting;
      UpdateCounts();
      return;
    }
    // Closed for good (by us, or the connection gave up).
    connection_.reset();
    SetConnection(nullptr);
    if (state_ == State::kClosed) {
      FinishClose();
      return;
    }
    state_ = State::kIdle;
    FailAll(absl::UnavailableError(absl::StrCat("the ", settings_->upstream,
                                                " upstream connection closed: ",
                                                log::Redact(Sv(info.reason.message())))),
            false);
  }

  void OnHeartbeat(uint64_t gen) {
    if (gen != generation_ || state_ != State::kReady) return;
    if (absl::Status alive = protocol_->CheckAlive(); !alive.ok()) {
      connection_->Reconnect(alive);
      return;
    }
    if (std::optional<Outbound> hb = protocol_->Heartbeat(); hb.has_value()) {
      (void)connection_->Send(std::move(hb->frame), hb->binary);
    }
  }

 private:
  template <typename F>
  void Post(F&& f) {
    asio::post(strand_, [self = shared_from_this(), f = std::forward<F>(f)]() mutable {
      f(*self);
    });
  }

  void SetReady(bool ready) {
    if (ready) {
      unreachable_.store(false);
      down_since_ms_.store(0);
    }
    if (ready_.exchange(ready) != ready && settings_->health_changed) (*settings_->health_changed)();
  }
  void SetLastError(std::string e) {
    absl::MutexLock lock(&mu_);
    last_error_ = log::Redact(e);
  }
  void SetConnection(std::shared_ptr<Connection> c) {
    absl::MutexLock lock(&mu_);
    connection_snapshot_ = std::move(c);
  }
  void UpdateCounts() {
    op_count_.store(static_cast<int>(ops_.size()));
    size_t n = 0;
    for (const auto& [key, sub] : subs_) n += sub.sinks.size();
    sink_count_.store(static_cast<int>(n));
  }
  void Unrouted(std::string_view route) {
    if (settings_->unrouted_frames != nullptr) settings_->unrouted_frames->Inc();
    log::Debug(kLog, "dropped an upstream frame for no open request or subscription",
               {{"session", id_}, {"route", std::string(route)}});
  }

  void RefuseAuth(const absl::Status& why) {
    std::string reason = ErrorReason(why);
    auth_status_ = WithErrorInfo(
        absl::UnauthenticatedError(absl::StrCat(
            "the ", settings_->upstream, " upstream refused the credential: ",
            log::Redact(Sv(why.message())),
            " (fix the secret; the bridge retries on its own and picks up a rotated one)")),
        reason.empty() ? "AUTH_REFUSED" : reason, settings_->error_domain);
    {
      absl::MutexLock lock(&mu_);
      auth_refusal_ = auth_status_;
    }
    auth_refused_flag_.store(true);
    SetLastError(std::string(auth_status_.message()));
    log::Warn(kLog, "the upstream refused the credential", {{"session", id_}});
  }

  // A non-OK status when the session cannot take work now.
  absl::Status Usable() const {
    if (state_ == State::kClosed) {
      return absl::UnavailableError(absl::StrCat("the ", settings_->upstream,
                                                 " session is closed; retry to open a new one"));
    }
    if (auth_refused_flag_.load()) return auth_status_;
    return absl::OkStatus();
  }

  void EnsureConnected() {
    if (state_ != State::kIdle || connection_ != nullptr) return;
    ++generation_;
    auto link = std::make_shared<Link>(weak_from_this(), generation_);
    link_ = link;
    connection_ = Connection::Create(strand_, connection_options_,
                                     own_connection_name_ ? connection_options_->name : id_, link);
    SetConnection(connection_);
    state_ = State::kConnecting;
    connection_->Start();
  }

  // --- Requests. ---
  void AddOp(std::unique_ptr<Op> op) {
    if (absl::Status st = Usable(); !st.ok()) {
      op->done(st);
      return;
    }
    if (waiting_.size() >= settings_->max_pending) {
      op->done(absl::ResourceExhaustedError(absl::StrCat(
          "the ", settings_->upstream, " session already has ", settings_->max_pending,
          " requests waiting to be sent (max_pending_requests) while the upstream is ",
          state_ == State::kReady ? "busy" : "not connected", "; retry later")));
      return;
    }
    if (op->req.what.empty()) op->req.what = "the request";
    const Clock::time_point now = Clock::now();
    if (op->req.deadline <= now) {
      op->done(NotSentInTime(op->req.what));
      return;
    }
    op->queued_at = now;
    Arm(*op, std::min(op->req.deadline, now + settings_->request_timeout));
    uint64_t id = op->id;
    ops_.emplace(id, std::move(op));
    waiting_.push_back(id);
    UpdateCounts();
    Pump();
  }

  void DropOp(uint64_t id) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;
    Op& op = *it->second;
    if (op.in_flight) {
      if (SendGate* g = protocol_->gate(); g != nullptr && op.req.gated) g->Abandoned(id, Clock::now());
      ClearRoute(op);
    }
    ops_.erase(it);
    UpdateCounts();
    Pump();
  }

  void ClearRoute(Op& op) {
    if (!op.route.empty()) op_routes_.erase(op.route);
    if (op.ordered) ordered_.remove(op.id);
    op.route.clear();
    op.ordered = false;
    op.in_flight = false;
  }

  // Ends request `id` with `result` (final).
  void Finish(uint64_t id, absl::StatusOr<Reply> result) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;
    std::unique_ptr<Op> op = std::move(it->second);
    ops_.erase(it);
    ClearRoute(*op);
    UpdateCounts();
    op->done(std::move(result));
  }

  // One timer per session, armed for the earliest of two kinds of time: an expiry (a
  // request's or a subscription acknowledgement's deadline, the login's) and the send
  // gate's next opening (Pump). Most requests share the default timeout, so a request
  // usually touches no timer at all; the gate needs no timer of its own.
  void Arm(Op& op, Clock::time_point at) {
    op.expires = at;
    ArmAt(at);
  }
  // An expiry: OnDeadlineTimer looks for what expired at or after `at`.
  void ArmAt(Clock::time_point at) {
    expiry_next_ = std::min(expiry_next_, at);
    Schedule(at);
  }
  // The gate opens at `at`: Pump runs then.
  void WakeAt(Clock::time_point at) {
    wake_next_ = std::min(wake_next_, at);
    Schedule(at);
  }
  void Schedule(Clock::time_point at) {
    if (at >= deadline_armed_) return;
    deadline_armed_ = at;
    deadline_timer_.expires_at(at);
    // Not bound to the strand: a bound handler would hold two copies of the strand for
    // the wait's life (up to request_timeout after a request); this one goes onto the
    // strand when it runs.
    deadline_timer_.async_wait([w = weak_from_this()](const boost::system::error_code& ec) {
      auto s = w.lock();
      if (ec || s == nullptr) return;
      SessionImpl* p = s.get();
      asio::dispatch(p->strand_, [s = std::move(s)] { s->OnDeadlineTimer(); });
    });
  }

  void OnDeadlineTimer() {
    deadline_armed_ = Clock::time_point::max();
    const Clock::time_point now = Clock::now();
    // The gate's wake-up: Pump (below) runs in any case and asks again if it must.
    if (wake_next_ <= now) {
      wake_next_ = Clock::time_point::max();
    } else if (wake_next_ != Clock::time_point::max()) {
      Schedule(wake_next_);
    }
    if (expiry_next_ > now) {
      // Only the gate was due: nothing can have expired.
      if (expiry_next_ != Clock::time_point::max()) Schedule(expiry_next_);
      Pump();
      return;
    }
    expiry_next_ = Clock::time_point::max();
    std::vector<uint64_t> expired;
    Clock::time_point next = Clock::time_point::max();
    for (const auto& [id, op] : ops_) {
      if (op->expires <= now) {
        expired.push_back(id);
      } else {
        next = std::min(next, op->expires);
      }
    }
    std::vector<std::string> unacked;
    for (const auto& [key, sub] : subs_) {
      if (sub.ack_expires <= now) {
        unacked.push_back(key);
      } else {
        next = std::min(next, sub.ack_expires);
      }
    }
    for (uint64_t id : expired) Expire(id, now);
    for (const std::string& key : unacked) {
      EndSubscription(key, absl::DeadlineExceededError(absl::StrCat(
                               "the ", settings_->upstream,
                               " upstream did not acknowledge the subscription within ",
                               absl::FormatDuration(absl::FromChrono(settings_->subscribe_timeout)),
                               "; subscribe again")));
    }
    const bool login_expired = state_ == State::kLoggingIn && LoginExpires() <= now;
    if (state_ == State::kLoggingIn && !login_expired) next = std::min(next, LoginExpires());
    if (next != Clock::time_point::max()) ArmAt(next);
    Pump();
    if (login_expired && state_ == State::kLoggingIn && connection_ != nullptr) {
      connection_->Reconnect(absl::DeadlineExceededError(
          absl::StrCat("the ", settings_->upstream, " upstream did not answer the login within ",
                       absl::FormatDuration(absl::FromChrono(settings_->login_timeout)))));
    }
  }

  void Expire(uint64_t id, Clock::time_point now) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;
    Op& op = *it->second;
    if (!op.in_flight) {
      // The session's bound (request_timeout), not the caller's deadline, ran out while
      // attempts kept failing (it came during the session's first connect, or asked to
      // wait): the upstream being down is the cause, so say so and why (e.g. the TLS
      // error) rather than blame a deadline the caller did not set.
      if (absl::Status down = Unreachable(); !down.ok() && now < op.req.deadline) {
        Finish(id, absl::UnavailableError(absl::StrCat(
                       op.req.what, " waited for the session and nothing was sent: ", down.message())));
        return;
      }
      Finish(id, absl::DeadlineExceededError(absl::StrCat(
                     op.req.what, " was not sent to the ", settings_->upstream,
                     " upstream before its deadline (",
                     state_ == State::kReady ? "it was still waiting its turn"
                                             : "the session was not ready in time",
                     "); nothing was sent")));
      return;
    }
    if (SendGate* g = protocol_->gate(); g != nullptr && op.req.gated) g->Abandoned(id, now);
    Finish(id, WithErrorInfo(absl::DeadlineExceededError(absl::StrCat(
                                 "no answer from the ", settings_->upstream, " upstream to ",
                                 op.req.what, " before the deadline; its outcome is unknown")),
                             "OUTCOME_UNKNOWN", settings_->error_domain));
  }

  std::string FreshRoute(std::string_view hint) {
    for (;;) {
      std::string route = protocol_->NewRoute(hint);
      if (route.empty() || (!op_routes_.contains(route) && !sub_routes_.contains(route))) {
        return route;
      }
    }
  }

  void Pump() {
    if (state_ == State::kClosed) return;
    if (state_ != State::kReady) {
      if (!waiting_.empty() || !subs_.empty()) EnsureConnected();
      return;
    }
    const Clock::time_point now = Clock::now();
    SendGate* gate = protocol_->gate();
    std::optional<Clock::time_point> wake;
    bool gated_blocked = false;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      auto found = ops_.find(*it);
      if (found == ops_.end() || found->second->in_flight) {
        it = waiting_.erase(it);
        continue;
      }
      Op& op = *found->second;
      if (op.req.gated) {
        if (gated_blocked) {
          ++it;
          continue;
        }
        std::optional<Clock::time_point> when =
            op.not_before > now ? std::optional(op.not_before)
            : gate != nullptr   ? gate->When(op.req.gate_cost, now)
                                : std::optional(now);
        if (!when.has_value() || *when > now) {
          gated_blocked = true;  // gated requests leave in the order they came
          if (when.has_value()) wake = wake ? std::min(*wake, *when) : *when;
          ++it;
          continue;
        }
      } else if (op.not_before > now) {
        wake = wake ? std::min(*wake, op.not_before) : op.not_before;
        ++it;
        continue;
      }
      it = waiting_.erase(it);
      SendOp(op, now);
      if (state_ != State::kReady) return;
    }
    if (wake.has_value()) WakeAt(*wake);
  }

  // A request whose caller's deadline has passed is never sent: nobody waits for it.
  static absl::Status NotSentInTime(std::string_view what) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the call's deadline passed before ", Av(what), " was sent upstream; nothing was sent"));
  }

  void SendOp(Op& op, Clock::time_point now) {
    if (op.req.deadline <= now) {
      Finish(op.id, NotSentInTime(op.req.what));
      return;
    }
    std::string route = FreshRoute(op.req.hint);
    absl::StatusOr<Outbound> out = op.req.encode(route);
    if (!out.ok()) {
      Finish(op.id, out.status());
      return;
    }
    if (out->frame.empty()) {  // nothing to send after all
      Finish(op.id, Reply{});
      return;
    }
    absl::Status sent = connection_->Send(std::move(out->frame), out->binary);
    if (!sent.ok()) {
      Finish(op.id, sent.code() == absl::StatusCode::kResourceExhausted
                        ? absl::ResourceExhaustedError(absl::StrCat(
                              "the ", settings_->upstream,
                              " upstream send queue is full (upstream.send_queue_messages / "
                              "send_queue_bytes); retry later"))
                        : absl::UnavailableError(absl::StrCat(
                              "the ", settings_->upstream, " upstream connection is not open")));
      return;
    }
    op.in_flight = true;
    op.sent_at = now;
    op.route = route;
    if (route.empty()) {
      op.ordered = true;
      ordered_.push_back(op.id);
    } else {
      op_routes_[route] = op.id;
    }
    if (op.req.gated) {
      if (SendGate* g = protocol_->gate(); g != nullptr) g->Sent(op.id, op.req.gate_cost, now);
    }
    Arm(op, std::min(op.req.deadline, now + settings_->request_timeout));
  }

  void OnReply(Inbound in) {
    // A send-order answer ("" route) belongs to the oldest request in flight, even when
    // a local subscription (event route "") takes the upstream's unsolicited messages.
    const bool ordered_answer = in.route.empty() && !ordered_.empty();
    if (auto it = sub_routes_.find(in.route); it != sub_routes_.end() && !ordered_answer) {
      const std::string key = it->second;  // a copy: acknowledging remaps the routes
      OnSubscriptionReply(key, std::move(in));
      return;
    }
    uint64_t id = 0;
    if (in.route.empty()) {
      if (!ordered_.empty()) id = ordered_.front();
    } else if (auto it = op_routes_.find(in.route); it != op_routes_.end()) {
      id = it->second;
    }
    auto found = id == 0 ? ops_.end() : ops_.find(id);
    if (found == ops_.end()) {
      // A protocol answering in send order may also push on its own: those frames go to
      // the subscription whose event route is "" (e.g. NLX's unsolicited messages).
      if (in.route.empty()) {
        if (auto sit = sub_routes_.find(""); sit != sub_routes_.end()) {
          auto s = subs_.find(sit->second);
          if (s != subs_.end() && s->second.acked && in.status.ok()) {
            Deliver(s->second, in.payload);
            return;
          }
        }
      }
      Unrouted(in.route);
      return;
    }
    Op& op = *found->second;
    const Clock::time_point now = Clock::now();
    if (settings_->rtt != nullptr && op.in_flight) {
      settings_->rtt->Observe(std::chrono::duration<double>(now - op.sent_at).count());
    }
    SendGate* gate = op.req.gated ? protocol_->gate() : nullptr;
    if (!in.status.ok() && in.retry_after.has_value() && op.retries < op.req.max_retries) {
      ++op.retries;
      if (gate != nullptr) gate->Answered(id, false, now);
      ClearRoute(op);
      op.not_before = now + *in.retry_after;
      waiting_.push_front(id);
      log::Debug(kLog, "the upstream asked for a resend after a pause",
                 {{"session", id_}, {"request", op.req.what}});
      Pump();
      return;
    }
    if (gate != nullptr && in.final) gate->Answered(id, in.status.ok(), now);
    if (!in.status.ok()) {
      Finish(id, in.status);
      Pump();
      return;
    }
    if (!in.final) {
      op.expires = std::min(op.req.deadline, now + settings_->request_timeout);
      ArmAt(op.expires);
      op.done(Reply{std::move(in.payload), false});
      return;
    }
    Finish(id, Reply{std::move(in.payload), true});
    Pump();
  }

  void OnLoginAnswer(const Inbound& in) {
    if (settings_->rtt != nullptr) {
      settings_->rtt->Observe(std::chrono::duration<double>(Clock::now() - login_sent_).count());
    }
    if (in.status.ok()) {
      OnLoggedIn();
      return;
    }
    const absl::StatusCode code = in.status.code();
    if (code == absl::StatusCode::kUnauthenticated || code == absl::StatusCode::kPermissionDenied) {
      // The connection retries on the slow auth backoff, re-reading the credential.
      connection_->Reconnect(in.status, DisconnectKind::kAuthRefused);
      return;
    }
    // Transient (e.g. 5xx): try again with the normal backoff.
    connection_->Reconnect(in.status);
  }

  void OnLoggedIn() {
    state_ = State::kReady;
    auth_refused_flag_.store(false);
    auth_status_ = absl::OkStatus();
    connection_->MarkReady();
    SetReady(true);
    for (auto& [key, sub] : subs_) SendSubscribe(key, sub);
    Pump();
  }

  void FailAll(const absl::Status& status, bool keep_subscriptions) {
    std::map<uint64_t, std::unique_ptr<Op>> ops = std::move(ops_);
    ops_.clear();
    waiting_.clear();
    op_routes_.clear();
    ordered_.clear();
    std::map<std::string, Sub> subs;
    if (!keep_subscriptions) {
      subs = std::move(subs_);
      subs_.clear();
      sub_routes_.clear();
    }
    UpdateCounts();
    for (auto& [id, op] : ops) op->done(status);
    for (auto& [key, sub] : subs) {
      for (auto& [sid, sink] : sub.sinks) sink->OnEnded(status);
    }
  }

  // --- Subscriptions. ---
  void AddSink(const std::string& key, PayloadPtr params, uint64_t id,
               std::shared_ptr<EventSink> sink) {
    if (absl::Status st = Usable(); !st.ok()) {
      sink->OnEnded(st);
      return;
    }
    auto [it, created] = subs_.try_emplace(key);
    it->second.sinks.emplace(id, sink);
    UpdateCounts();
    if (!created) {
      if (it->second.acked) sink->OnSubscribed(SubscribedInfo{});
      return;
    }
    it->second.params = std::move(params);
    if (state_ == State::kReady) {
      SendSubscribe(key, it->second);
    } else {
      EnsureConnected();
    }
  }

  void RemoveSink(const std::string& key, uint64_t id) {
    auto it = subs_.find(key);
    if (it == subs_.end()) return;
    it->second.sinks.erase(id);
    if (it->second.sinks.empty()) {
      Sub& sub = it->second;
      if (sub.acked && state_ == State::kReady) {
        // Released upstream like a request (its answer is then not counted as
        // unrouted), ahead of waiting work; nobody waits for it. A protocol without an
        // unsubscribe encodes nothing and the request ends at once.
        auto op = std::make_unique<Op>();
        op->id = next_id_.fetch_add(1);
        op->req.hint = std::string(protocol_->UnsubscribeHint());
        op->req.what = "the unsubscribe request";
        op->req.encode = [this, key, event_route = sub.event_route](
                             std::string_view route) -> absl::StatusOr<Outbound> {
          return protocol_->EncodeUnsubscribe(key, event_route, route).value_or(Outbound{});
        };
        op->done = [](absl::StatusOr<Reply>) {};
        op->queued_at = Clock::now();
        Arm(*op, op->queued_at + settings_->request_timeout);
        waiting_.push_front(op->id);
        ops_.emplace(op->id, std::move(op));
      }
      // Later frames for its routes are dropped and counted as unrouted.
      ForgetRoutes(sub);
      subs_.erase(it);
    }
    UpdateCounts();
    Pump();
  }

  void ForgetRoutes(const Sub& sub) {
    if (!sub.request_route.empty()) sub_routes_.erase(sub.request_route);
    if (!sub.event_route.empty() || sub.acked) sub_routes_.erase(sub.event_route);
  }

  void SendSubscribe(const std::string& key, Sub& sub) {
    ForgetRoutes(sub);
    sub.acked = false;
    sub.request_route = FreshRoute(protocol_->SubscribeHint());
    absl::StatusOr<Outbound> f = protocol_->EncodeSubscribe(key, sub.params, sub.request_route);
    if (!f.ok()) {
      EndSubscription(key, f.status());
      return;
    }
    if (f->frame.empty()) {
      // Local: active while the session is ready; events carry `key` as their route.
      sub.request_route.clear();
      Acknowledge(key, sub, key);
      return;
    }
    absl::Status sent = connection_->Send(std::move(f->frame), f->binary);
    if (!sent.ok()) {
      EndSubscription(key, absl::UnavailableError(absl::StrCat(
                               "could not send the subscription to the ", settings_->upstream,
                               " upstream: ", sent.message())));
      return;
    }
    sub_routes_[sub.request_route] = key;
    sub.ack_expires = Clock::now() + settings_->subscribe_timeout;
    ArmAt(sub.ack_expires);
  }

  void Acknowledge(const std::string& key, Sub& sub, const std::string& event_route) {
    if (!sub.request_route.empty() && sub.request_route != event_route) {
      sub_routes_.erase(sub.request_route);
    }
    sub.request_route.clear();
    sub.event_route = event_route;
    sub_routes_[event_route] = key;
    sub.acked = true;
    sub.ack_expires = Clock::time_point::max();
    SubscribedInfo info;
    if (sub.lost) {
      info.restored = true;
      info.gap_from = sub.lost_at;
      info.gap_to = std::chrono::system_clock::now();
      sub.lost = false;
      sub.after_gap = true;
    }
    std::vector<std::shared_ptr<EventSink>> sinks;
    for (auto& [sid, sink] : sub.sinks) sinks.push_back(sink);
    for (auto& sink : sinks) sink->OnSubscribed(info);
  }

  void EndSubscription(const std::string& key, const absl::Status& status) {
    auto it = subs_.find(key);
    if (it == subs_.end()) return;
    Sub sub = std::move(it->second);
    subs_.erase(it);
    ForgetRoutes(sub);
    UpdateCounts();
    for (auto& [sid, sink] : sub.sinks) sink->OnEnded(status);
  }

  void OnSubscriptionReply(const std::string& key, Inbound in) {
    auto it = subs_.find(key);
    if (it == subs_.end()) return;
    Sub& sub = it->second;
    if (!in.status.ok()) {
      EndSubscription(key, in.status);
      return;
    }
    if (!sub.acked) {
      Acknowledge(key, sub, in.event_route.empty() ? in.route : in.event_route);
      if (in.bare || in.payload == nullptr) return;
    }
    Deliver(sub, in.payload);
  }

  void Deliver(Sub& sub, const PayloadPtr& event) {
    if (event == nullptr) return;
    const bool after_gap = sub.after_gap;
    sub.after_gap = false;
    // A copy, because a sink may unsubscribe from inside OnEvent. Its storage is kept
    // between events (one allocation per event otherwise); a nested Deliver finds it
    // taken and uses its own.
    std::vector<std::shared_ptr<EventSink>> sinks = std::move(deliver_sinks_);
    sinks.clear();
    for (auto& [sid, sink] : sub.sinks) sinks.push_back(sink);
    for (auto& sink : sinks) sink->OnEvent(event, after_gap);
    sinks.clear();
    deliver_sinks_ = std::move(sinks);
  }

  // --- Close. ---
  void DoClose(uint16_t code, const std::string& reason, std::function<void()> done) {
    if (done) close_waiters_.push_back(std::move(done));
    // Nobody may hold the session while it closes; it keeps itself alive until then.
    close_self_ = shared_from_this();
    if (state_ == State::kClosed) {
      if (connection_ == nullptr) FinishClose();
      return;
    }
    state_ = State::kClosed;
    closed_flag_.store(true);
    SetReady(false);
    deadline_timer_.cancel();
    deadline_armed_ = expiry_next_ = wake_next_ = Clock::time_point::max();
    FailAll(absl::UnavailableError(absl::StrCat("the ", settings_->upstream,
                                                " session was closed: ", reason)),
            false);
    if (connection_ == nullptr) {
      FinishClose();
      return;
    }
    connection_->Close(code, reason);
    // The connection reports its end through OnDisconnected; don't wait forever.
    close_timer_ = std::make_unique<asio::steady_timer>(strand_.get_inner_executor());
    close_timer_->expires_after(connection_options_->close_timeout + std::chrono::seconds(1));
    close_timer_->async_wait(asio::bind_executor(
        strand_, [w = weak_from_this()](const boost::system::error_code& ec) {
          auto s = w.lock();
          if (!ec && s != nullptr) s->FinishClose();
        }));
  }

  void FinishClose() {
    if (close_timer_) close_timer_->cancel();
    std::vector<std::function<void()>> waiters = std::move(close_waiters_);
    close_waiters_.clear();
    for (auto& w : waiters) w();
    close_self_.reset();
  }

  friend class Link;

  Strand strand_;
  const std::string id_;
  const std::shared_ptr<const SessionSettings> settings_;  // shared (Intern), its id empty
  const bool own_connection_name_;  // else the connection is named id_
  const std::shared_ptr<const ConnectionOptions> connection_options_;
  std::unique_ptr<Protocol> protocol_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> ready_{false};
  std::atomic<bool> closed_flag_{false};
  std::atomic<bool> auth_refused_flag_{false};
  std::atomic<bool> unreachable_{false};
  std::atomic<int64_t> down_since_ms_{0};  // wall clock; 0 = not down
  std::atomic<int> op_count_{0};
  std::atomic<int> sink_count_{0};

  mutable absl::Mutex mu_;
  std::shared_ptr<Connection> connection_snapshot_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  absl::Status auth_refusal_ ABSL_GUARDED_BY(mu_);

  // Strand only.
  State state_ = State::kIdle;
  uint64_t generation_ = 0;
  std::shared_ptr<Connection> connection_;
  std::shared_ptr<Link> link_;
  Clock::time_point login_sent_{};
  absl::Status auth_status_;
  std::map<uint64_t, std::unique_ptr<Op>> ops_;
  std::list<uint64_t> waiting_;  // not a deque: no allocation while empty
  std::map<std::string, uint64_t, std::less<>> op_routes_;
  std::list<uint64_t> ordered_;  // in flight without a route, in send order
  std::map<std::string, Sub> subs_;
  std::map<std::string, std::string, std::less<>> sub_routes_;  // route -> subscription key
  // Deliver's copy of a subscription's sinks, kept for its capacity (strand only).
  std::vector<std::shared_ptr<EventSink>> deliver_sinks_;
  asio::steady_timer deadline_timer_;
  Clock::time_point deadline_armed_ = Clock::time_point::max();  // the timer's wait
  Clock::time_point expiry_next_ = Clock::time_point::max();     // earliest expiry armed
  Clock::time_point wake_next_ = Clock::time_point::max();       // the gate's next opening
  std::unique_ptr<asio::steady_timer> close_timer_;
  std::vector<std::function<void()>> close_waiters_;
  std::shared_ptr<SessionImpl> close_self_;
};

absl::StatusOr<HandshakeRequest> Link::PrepareHandshake() {
  auto s = session_.lock();
  if (s == nullptr) return absl::CancelledError("session gone");
  return s->PrepareHandshake(generation_);
}
void Link::OnOpen(std::string_view subprotocol) {
  if (auto s = session_.lock()) s->OnOpen(generation_, subprotocol);
}
void Link::OnMessage(std::string_view payload, bool binary) {
  if (auto s = session_.lock()) s->OnMessage(generation_, payload, binary);
}
void Link::OnDisconnected(const DisconnectInfo& info, bool will_retry) {
  if (auto s = session_.lock()) s->OnDisconnected(generation_, info, will_retry);
}
DisconnectKind Link::Classify(const DisconnectInfo& info) {
  if (auto s = session_.lock()) return s->Classify(info);
  return ConnectionHandler::Classify(info);
}
void Link::OnHeartbeat() {
  if (auto s = session_.lock()) s->OnHeartbeat(generation_);
}

}  // namespace

std::shared_ptr<UpstreamSession> UpstreamSession::Create(asio::any_io_executor executor,
                                                         SessionOptions options,
                                                         std::unique_ptr<Protocol> protocol) {
  return std::make_shared<SessionImpl>(std::move(executor), std::move(options),
                                       std::move(protocol));
}

}  // namespace wsbridge::core
