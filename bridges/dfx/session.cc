#include "bridges/dfx/session.h"

#include <algorithm>
#include <list>
#include <map>
#include <optional>
#include <random>

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::dfx {
namespace {

namespace asio = boost::asio;
using Strand = core::Connection::Strand;
using std::chrono::milliseconds;

constexpr std::string_view kLog = "dfx";

class SessionImpl;

// Forwards one connection's callbacks tagged with its generation, so that callbacks
// from a connection the session already replaced are ignored.
class Link final : public core::ConnectionHandler {
 public:
  Link(std::weak_ptr<SessionImpl> session, uint64_t generation)
      : session_(std::move(session)), generation_(generation) {}
  absl::StatusOr<core::HandshakeRequest> PrepareHandshake() override;
  void OnOpen(std::string_view subprotocol) override;
  void OnMessage(std::string_view payload, bool binary) override;
  void OnDisconnected(const core::DisconnectInfo& info, bool will_retry) override;

 private:
  std::weak_ptr<SessionImpl> session_;
  uint64_t generation_;
};

enum class State { kIdle, kConnecting, kLoggingIn, kReady, kAuthFailed, kClosed };

struct Op {
  uint64_t id = 0;
  bool is_chunk = false;
  std::string action;
  std::string body;
  ChunkRequest chunk;
  int rate_limited = 0;
  Clock::time_point deadline = Clock::time_point::max();
  Clock::time_point not_before{};
  std::string rid;  // set while in flight
  Clock::time_point sent_at{};
  Session::ResponseCallback done;
  Session::ChunkCallback chunk_done;
  // When the op fails with DEADLINE_EXCEEDED unless answered; max = no deadline armed.
  Clock::time_point expires = Clock::time_point::max();
};

// Data sent for pacing: counted until `acked` + window has passed.
struct PaceEntry {
  uint64_t op_id;
  milliseconds duration;
  std::optional<Clock::time_point> acked;
};

struct Subscription {
  std::string rid;  // current upstream subscription request id ("" = not sent)
  bool acked = false;
  bool after_reconnect = false;
  std::map<uint64_t, std::shared_ptr<ResultSink>> sinks;
};

absl::Status OutcomeUnknown(std::string_view what) {
  return core::WithErrorInfo(
      absl::UnavailableError(absl::StrCat(
          "the connection to the DFX upstream was lost before ", Av(what),
          " was answered; it may or may not have been executed (outcome unknown) and was "
          "not resent")),
      "OUTCOME_UNKNOWN", kErrorDomain);
}

class SessionImpl final : public Session, public std::enable_shared_from_this<SessionImpl> {
 public:
  SessionImpl(asio::any_io_executor executor, SessionOptions options)
      : strand_(asio::make_strand(executor)),
        options_(std::move(options)),
        // On the io executor with handlers bound to the strand (see connection.cc).
        pace_timer_(strand_.get_inner_executor()),
        login_timer_(strand_.get_inner_executor()),
        deadline_timer_(strand_.get_inner_executor()),
        rng_(core::Rng::FromEntropy()) {}

  // --- Session, any thread. ---
  void Start() override {
    Post([](SessionImpl& s) { s.EnsureConnected(); });
  }

  uint64_t Request(std::string action, std::string body, Clock::time_point deadline,
                   ResponseCallback done) override {
    auto op = std::make_unique<Op>();
    op->id = next_op_.fetch_add(1);
    op->action = std::move(action);
    op->body = std::move(body);
    op->deadline = std::min(deadline, Clock::now() + options_.request_timeout);
    op->done = std::move(done);
    uint64_t id = op->id;
    Post([op = std::move(op)](SessionImpl& s) mutable { s.AddOp(std::move(op)); });
    return id;
  }

  uint64_t SendChunk(ChunkRequest chunk, ChunkCallback done) override {
    auto op = std::make_unique<Op>();
    op->id = next_op_.fetch_add(1);
    op->is_chunk = true;
    op->action = std::string(kActionMeasurementData);
    op->chunk = std::move(chunk);
    op->chunk_done = std::move(done);
    uint64_t id = op->id;
    Post([op = std::move(op)](SessionImpl& s) mutable { s.AddOp(std::move(op)); });
    return id;
  }

  void Cancel(uint64_t id) override {
    Post([id](SessionImpl& s) { s.DropOp(id); });
  }

  uint64_t Subscribe(std::string measurement_id, std::shared_ptr<ResultSink> sink) override {
    uint64_t id = next_op_.fetch_add(1);
    Post([id, mid = std::move(measurement_id), sink = std::move(sink)](SessionImpl& s) mutable {
      s.AddSubscriber(mid, id, std::move(sink));
    });
    return id;
  }

  void Unsubscribe(std::string measurement_id, uint64_t subscriber_id) override {
    Post([mid = std::move(measurement_id), subscriber_id](SessionImpl& s) {
      s.RemoveSubscriber(mid, subscriber_id);
    });
  }

  void Close(uint16_t code, std::string reason, std::function<void()> done) override {
    Post([code, reason = std::move(reason), done = std::move(done)](SessionImpl& s) mutable {
      s.DoClose(code, reason, std::move(done));
    });
  }

  const std::string& id() const override { return options_.session_id; }
  bool ready() const override { return ready_.load(); }

  admin::v1::Session Describe() const override {
    admin::v1::Session out;
    out.set_id(options_.session_id);
    out.set_bridge(options_.bridge_name);
    out.set_in_flight_requests(static_cast<uint32_t>(in_flight_.load()));
    out.set_subscribers(static_cast<uint32_t>(subscribers_.load()));
    std::shared_ptr<core::Connection> conn;
    {
      absl::MutexLock lock(&mu_);
      conn = connection_snapshot_;
      out.set_last_error(last_error_);
    }
    if (conn == nullptr) {
      out.set_target(log::RedactUrl(options_.url));
      out.set_state(closed_flag_.load() ? admin::v1::SESSION_STATE_CLOSED
                                        : admin::v1::SESSION_STATE_IDLE);
      return out;
    }
    out.set_target(conn->target());
    switch (conn->state()) {
      case core::ConnectionState::kIdle: out.set_state(admin::v1::SESSION_STATE_IDLE); break;
      case core::ConnectionState::kConnecting:
        out.set_state(admin::v1::SESSION_STATE_CONNECTING);
        break;
      case core::ConnectionState::kAuthenticating:
        out.set_state(admin::v1::SESSION_STATE_AUTHENTICATING);
        break;
      case core::ConnectionState::kReady: out.set_state(admin::v1::SESSION_STATE_READY); break;
      case core::ConnectionState::kBackingOff:
        out.set_state(admin::v1::SESSION_STATE_BACKING_OFF);
        break;
      case core::ConnectionState::kClosed: out.set_state(admin::v1::SESSION_STATE_CLOSED); break;
    }
    const core::ConnectionStats& st = conn->stats();
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
  absl::StatusOr<core::HandshakeRequest> PrepareHandshake(uint64_t gen) {
    if (gen != generation_) return absl::CancelledError("connection replaced");
    core::HandshakeRequest req;
    req.url = options_.url;
    req.headers = options_.headers;
    req.subprotocols = {std::string(kSubprotocol)};
    return req;
  }

  void OnOpen(uint64_t gen, std::string_view subprotocol) {
    if (gen != generation_ || connection_ == nullptr) return;
    if (!subprotocol.empty() && subprotocol != kSubprotocol) {
      log::Warn(kLog, "upstream negotiated an unexpected subprotocol",
                {{"session", options_.session_id}, {"subprotocol", std::string(subprotocol)}});
    }
    absl::StatusOr<std::string> token = options_.token();
    if (!token.ok() || token->empty()) {
      absl::Status why = token.ok() ? absl::FailedPreconditionError("device token is empty")
                                    : token.status();
      SetLastError(why.ToString());
      connection_->Reconnect(why);
      return;
    }
    state_ = State::kLoggingIn;
    connection_->MarkAuthenticating();
    login_rid_ = NewRid(kActionLogin);
    login_sent_ = Clock::now();
    absl::Status sent =
        connection_->Send(EncodeRequest(kActionLogin, login_rid_, LoginBody(*token)), true);
    if (!sent.ok()) {
      connection_->Reconnect(sent);
      return;
    }
    login_timer_.expires_after(options_.request_timeout);
    login_timer_.async_wait(asio::bind_executor(strand_, [w = weak_from_this(), gen](const boost::system::error_code& ec) {
      auto s = w.lock();
      if (ec || s == nullptr || gen != s->generation_ || s->state_ != State::kLoggingIn) return;
      if (s->connection_ != nullptr) {
        s->connection_->Reconnect(absl::DeadlineExceededError("login (0718) was not answered"));
      }
    }));
  }

  void OnMessage(uint64_t gen, std::string_view payload) {
    if (gen != generation_) return;
    absl::StatusOr<ResponseFrame> frame = ParseResponse(payload);
    if (!frame.ok()) {
      if (options_.malformed_frames != nullptr) options_.malformed_frames->Inc();
      log::Warn(kLog, "dropped a malformed upstream frame",
                {{"session", options_.session_id},
                 {"bytes", absl::StrCat(payload.size())},
                 {"error", std::string(frame.status().message())}});
      return;
    }
    if (state_ == State::kLoggingIn && frame->request_id == login_rid_) {
      OnLoginAnswer(*frame);
      return;
    }
    if (auto it = sub_rids_.find(frame->request_id); it != sub_rids_.end()) {
      OnSubscriptionFrame(it->second, *frame);
      return;
    }
    if (auto it = rid_to_op_.find(frame->request_id); it != rid_to_op_.end()) {
      uint64_t op_id = it->second;
      rid_to_op_.erase(it);
      OnAnswer(op_id, *frame);
      return;
    }
    if (options_.unrouted_frames != nullptr) options_.unrouted_frames->Inc();
    log::Debug(kLog, "dropped an upstream frame for no open request",
               {{"session", options_.session_id},
                {"request_id", std::string(frame->request_id)}});
  }

  void OnDisconnected(uint64_t gen, const absl::Status& reason, bool will_retry) {
    if (gen != generation_) return;
    login_timer_.cancel();
    SetLastError(reason.ToString());
    bool was_ready = state_ == State::kReady;
    SetReady(false);
    // Requests and chunks in flight may have executed upstream: never resend them.
    std::vector<uint64_t> in_flight;
    for (const auto& [rid, id] : rid_to_op_) in_flight.push_back(id);
    rid_to_op_.clear();
    Clock::time_point now = Clock::now();
    for (uint64_t id : in_flight) {
      auto it = ops_.find(id);
      if (it == ops_.end()) continue;
      std::unique_ptr<Op> op = std::move(it->second);
      ops_.erase(it);
      UpdateCounts();
      if (op->is_chunk) {
        MarkPaceAcked(op->id, now);  // it may have counted upstream
        op->chunk_done(OutcomeUnknown("the measurement chunk"));
      } else {
        op->done(OutcomeUnknown(absl::StrCat("the request (action ", op->action, ")")));
      }
    }
    for (auto& [mid, sub] : subs_) {
      if (was_ready || sub.acked) sub.after_reconnect = true;
      sub.acked = false;
      sub.rid.clear();
    }
    sub_rids_.clear();
    if (will_retry) {
      if (state_ != State::kClosed) state_ = State::kConnecting;
      return;
    }
    // Closed for good (by us, or the connection gave up).
    std::shared_ptr<core::Connection> old = std::move(connection_);
    SetConnection(nullptr);
    if (state_ == State::kClosed) {
      FinishClose();
      return;
    }
    state_ = State::kIdle;
    FailAll(absl::UnavailableError(
        absl::StrCat("the DFX upstream connection closed: ", log::Redact(Sv(reason.message())))));
  }

 private:
  friend class Link;

  template <typename F>
  void Post(F&& f) {
    asio::post(strand_, [self = shared_from_this(), f = std::forward<F>(f)]() mutable {
      f(*self);
    });
  }

  void SetReady(bool ready) {
    if (ready_.exchange(ready) != ready && options_.health_changed) options_.health_changed();
  }

  void SetLastError(std::string e) {
    absl::MutexLock lock(&mu_);
    last_error_ = log::Redact(e);
  }

  void SetConnection(std::shared_ptr<core::Connection> c) {
    absl::MutexLock lock(&mu_);
    connection_snapshot_ = std::move(c);
  }

  void UpdateCounts() {
    in_flight_.store(static_cast<int>(ops_.size()));
    size_t n = 0;
    for (const auto& [mid, sub] : subs_) n += sub.sinks.size();
    subscribers_.store(static_cast<int>(n));
  }

  std::string NewRid(std::string_view action) {
    for (;;) {
      std::string rid = MakeRequestId(action, rng_);
      if (rid != login_rid_ && !rid_to_op_.contains(rid) && !sub_rids_.contains(rid)) return rid;
    }
  }

  // A non-OK status when the session cannot take work now; OK otherwise.
  absl::Status Usable() {
    if (state_ == State::kClosed) {
      return absl::UnavailableError("the DFX session is closed; retry to open a new one");
    }
    if (state_ == State::kAuthFailed) {
      if (Clock::now() < auth_failed_until_) return auth_status_;
      state_ = State::kIdle;
    }
    return absl::OkStatus();
  }

  void EnsureConnected() {
    if (state_ != State::kIdle || connection_ != nullptr) return;
    ++generation_;
    auto link = std::make_shared<Link>(weak_from_this(), generation_);
    link_ = link;
    connection_ = core::Connection::Create(strand_, options_.connection, link);
    SetConnection(connection_);
    state_ = State::kConnecting;
    connection_->Start();
  }

  void AddOp(std::unique_ptr<Op> op) {
    if (absl::Status st = Usable(); !st.ok()) {
      if (op->is_chunk) {
        op->chunk_done(st);
      } else {
        op->done(st);
      }
      return;
    }
    if (!op->is_chunk) ArmDeadline(*op, op->deadline);
    uint64_t id = op->id;
    ops_.emplace(id, std::move(op));
    waiting_.push_back(id);
    UpdateCounts();
    Pump();
  }

  // One timer per session, not one per op: it is armed for the earliest deadline and
  // only re-armed when a new op expires sooner (most ops share the default timeout, so
  // a call usually touches no timer at all). When it fires, every expired op fails and
  // the timer moves on to the next earliest.
  void ArmDeadline(Op& op, Clock::time_point deadline) {
    op.expires = deadline;
    if (deadline < deadline_armed_) ArmDeadlineTimer(deadline);
  }

  void ArmDeadlineTimer(Clock::time_point at) {
    deadline_armed_ = at;
    deadline_timer_.expires_at(at);
    deadline_timer_.async_wait(asio::bind_executor(
        strand_, [w = weak_from_this()](const boost::system::error_code& ec) {
          auto s = w.lock();
          if (ec || s == nullptr) return;
          s->OnDeadlineTimer();
        }));
  }

  void OnDeadlineTimer() {
    deadline_armed_ = Clock::time_point::max();
    const Clock::time_point now = Clock::now();
    std::vector<uint64_t> expired;
    Clock::time_point next = Clock::time_point::max();
    for (const auto& [id, op] : ops_) {
      if (op->expires <= now) {
        expired.push_back(id);
      } else {
        next = std::min(next, op->expires);
      }
    }
    for (uint64_t id : expired) OnDeadline(id);
    // OnDeadline may have re-armed for a newer op; keep whichever is earlier.
    if (next < deadline_armed_) ArmDeadlineTimer(next);
  }

  void OnDeadline(uint64_t id) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;
    std::unique_ptr<Op> op = std::move(it->second);
    ops_.erase(it);
    if (!op->rid.empty()) rid_to_op_.erase(op->rid);  // a late answer is dropped
    UpdateCounts();
    if (op->is_chunk) {
      MarkPaceAcked(op->id, Clock::now());
      op->chunk_done(core::WithErrorInfo(
          absl::DeadlineExceededError(
              "the DFX upstream did not answer the measurement chunk in time; its outcome "
              "is unknown"),
          "OUTCOME_UNKNOWN", kErrorDomain));
    } else {
      op->done(absl::DeadlineExceededError(absl::StrCat(
          "no answer from the DFX upstream to action ", op->action,
          op->rid.empty() ? " (it was not sent: the session was not ready in time)"
                          : " before the deadline; its outcome is unknown")));
    }
    Pump();
  }

  void DropOp(uint64_t id) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;
    if (!it->second->rid.empty()) {
      rid_to_op_.erase(it->second->rid);
      if (it->second->is_chunk) MarkPaceAcked(id, Clock::now());
    } else {
      RemovePace(id);
    }
    ops_.erase(it);
    UpdateCounts();
    Pump();
  }

  // Pacing: the earliest time a chunk of `d` may be sent, or nullopt while it must
  // wait for the answer to a chunk in flight. Chunks count from their send until
  // window after their answer: the upstream received them somewhere in between.
  std::optional<Clock::time_point> PaceTime(milliseconds d, Clock::time_point now) {
    if (!options_.pacing) return now;
    const auto window = std::chrono::duration_cast<milliseconds>(options_.pacing_window);
    std::erase_if(pace_, [&](const PaceEntry& e) { return e.acked && *e.acked + window <= now; });
    milliseconds unacked{0}, total = d;
    std::vector<const PaceEntry*> acked;
    for (const PaceEntry& e : pace_) {
      total += e.duration;
      if (e.acked) {
        acked.push_back(&e);
      } else {
        unacked += e.duration;
      }
    }
    if (total <= window || pace_.empty()) return now;
    if (unacked > milliseconds(0) && unacked + d > window) return std::nullopt;
    std::sort(acked.begin(), acked.end(),
              [](const PaceEntry* a, const PaceEntry* b) { return *a->acked < *b->acked; });
    for (const PaceEntry* e : acked) {
      total -= e->duration;
      // One extra millisecond keeps us off the window's edge.
      if (total <= window || e == acked.back()) return *e->acked + window + milliseconds(1);
    }
    return std::nullopt;
  }

  void MarkPaceAcked(uint64_t id, Clock::time_point t) {
    for (PaceEntry& e : pace_) {
      if (e.op_id == id && !e.acked) e.acked = t;
    }
  }

  void RemovePace(uint64_t id) {
    std::erase_if(pace_, [id](const PaceEntry& e) { return e.op_id == id; });
  }

  void Pump() {
    if (state_ == State::kClosed) return;
    if (state_ != State::kReady) {
      if (!waiting_.empty() || !subs_.empty()) EnsureConnected();
      return;
    }
    Clock::time_point now = Clock::now();
    std::optional<Clock::time_point> wake;
    bool chunks_blocked = false;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      auto found = ops_.find(*it);
      if (found == ops_.end()) {
        it = waiting_.erase(it);
        continue;
      }
      Op& op = *found->second;
      if (op.is_chunk) {
        if (chunks_blocked) {
          ++it;
          continue;
        }
        std::optional<Clock::time_point> when =
            op.not_before > now ? std::optional(op.not_before)
                                : PaceTime(milliseconds(op.chunk.duration_ms), now);
        if (!when.has_value() || *when > now) {
          chunks_blocked = true;  // chunks leave in the order they came
          if (when.has_value()) wake = wake ? std::min(*wake, *when) : *when;
          ++it;
          continue;
        }
      }
      it = waiting_.erase(it);
      SendOp(op);
      if (state_ != State::kReady) return;
    }
    if (wake.has_value()) {
      pace_timer_.expires_at(*wake);
      pace_timer_.async_wait(asio::bind_executor(strand_, [w = weak_from_this()](const boost::system::error_code& ec) {
        auto s = w.lock();
        if (!ec && s != nullptr) s->Pump();
      }));
    }
  }

  void SendOp(Op& op) {
    op.rid = NewRid(op.action);
    std::string frame;
    if (op.is_chunk) {
      frame = EncodeRequest(op.action, op.rid,
                            MeasurementDataBody(op.chunk.measurement_id, op.chunk.stage,
                                                op.chunk.ignore, op.chunk.payload));
    } else {
      frame = EncodeRequest(op.action, op.rid, op.body);
    }
    absl::Status sent = connection_->Send(std::move(frame), true);
    if (!sent.ok()) {
      uint64_t id = op.id;
      auto it = ops_.find(id);
      std::unique_ptr<Op> owned = std::move(it->second);
      ops_.erase(it);
      UpdateCounts();
      absl::Status st = sent.code() == absl::StatusCode::kResourceExhausted
                            ? absl::ResourceExhaustedError(
                                  "the DFX upstream send queue is full; retry later")
                            : absl::UnavailableError("the DFX upstream connection is not open");
      if (owned->is_chunk) {
        owned->chunk_done(st);
      } else {
        owned->done(st);
      }
      return;
    }
    op.sent_at = Clock::now();
    rid_to_op_[op.rid] = op.id;
    if (op.is_chunk) {
      pace_.push_back(PaceEntry{op.id, milliseconds(op.chunk.duration_ms), std::nullopt});
      ArmDeadline(op, op.sent_at + options_.request_timeout);
    }
  }

  void OnAnswer(uint64_t op_id, const ResponseFrame& frame) {
    auto it = ops_.find(op_id);
    if (it == ops_.end()) return;
    Clock::time_point now = Clock::now();
    if (options_.rtt != nullptr) {
      options_.rtt->Observe(std::chrono::duration<double>(now - it->second->sent_at).count());
    }
    if (!it->second->is_chunk) {
      std::unique_ptr<Op> op = std::move(it->second);
      ops_.erase(it);
      UpdateCounts();
      op->done(Response{frame.status, std::string(frame.body)});
      Pump();
      return;
    }
    Op& op = *it->second;
    op.expires = Clock::time_point::max();
    if (frame.status / 100 == 2) {
      MarkPaceAcked(op_id, now);
      absl::StatusOr<ChunkAnswer> answer = ParseChunkAnswer(frame.body);
      std::unique_ptr<Op> owned = std::move(it->second);
      ops_.erase(it);
      UpdateCounts();
      owned->chunk_done(std::move(answer));
      Pump();
      return;
    }
    RemovePace(op_id);  // not accepted, so it does not count
    ErrorBody err = ParseErrorBody(frame.body);
    bool rate_limited = err.code == "RATE_LIMIT" || (err.code.empty() && frame.status == 429);
    if (rate_limited && op.rate_limited < options_.max_rate_limit_retries) {
      ++op.rate_limited;
      op.rid.clear();
      op.not_before = now + options_.rate_limit_retry;
      waiting_.push_front(op_id);
      log::Debug(kLog, "chunk rate-limited; retrying after a pause",
                 {{"session", options_.session_id}});
      Pump();
      return;
    }
    std::unique_ptr<Op> owned = std::move(it->second);
    ops_.erase(it);
    UpdateCounts();
    owned->chunk_done(UpstreamError(frame.status, frame.body, "measurement data (0506)"));
    Pump();
  }

  void OnLoginAnswer(const ResponseFrame& frame) {
    login_timer_.cancel();
    login_rid_.clear();
    if (options_.rtt != nullptr) {
      options_.rtt->Observe(std::chrono::duration<double>(Clock::now() - login_sent_).count());
    }
    if (frame.status / 100 == 2) {
      state_ = State::kReady;
      connection_->MarkReady();
      SetReady(true);
      for (auto& [mid, sub] : subs_) SendSubscribe(mid, sub);
      Pump();
      return;
    }
    absl::Status err = UpstreamError(frame.status, frame.body, "login with the device token (0718)");
    if (frame.status == 401 || frame.status == 403 ||
        err.code() == absl::StatusCode::kUnauthenticated) {
      // Refused token: fail callers now and stay away for a while instead of retrying.
      auth_status_ = absl::Status(absl::StatusCode::kUnauthenticated, err.message());
      auth_status_ = core::WithErrorInfo(
          auth_status_, core::ErrorReason(err).empty() ? "INVALID_TOKEN" : core::ErrorReason(err),
          kErrorDomain);
      auth_failed_until_ = Clock::now() + options_.auth_retry_delay;
      state_ = State::kAuthFailed;
      SetLastError(std::string(auth_status_.message()));
      log::Warn(kLog, "the DFX upstream refused the device token",
                {{"session", options_.session_id}});
      std::shared_ptr<core::Connection> old = std::move(connection_);
      SetConnection(nullptr);
      ++generation_;  // ignore the old connection's callbacks
      old->Close(1000, "login refused");
      FailAll(auth_status_);
      return;
    }
    // Transient (e.g. 5xx): try again with backoff.
    connection_->Reconnect(err);
  }

  void FailAll(const absl::Status& status) {
    std::map<uint64_t, std::unique_ptr<Op>> ops = std::move(ops_);
    ops_.clear();
    waiting_.clear();
    rid_to_op_.clear();
    pace_.clear();
    std::map<std::string, Subscription> subs = std::move(subs_);
    subs_.clear();
    sub_rids_.clear();
    UpdateCounts();
    for (auto& [id, op] : ops) {
      if (op->is_chunk) {
        op->chunk_done(status);
      } else {
        op->done(status);
      }
    }
    for (auto& [mid, sub] : subs) {
      for (auto& [sid, sink] : sub.sinks) sink->OnSubscriptionEnded(status);
    }
  }

  // --- Subscriptions. ---
  void AddSubscriber(const std::string& mid, uint64_t id, std::shared_ptr<ResultSink> sink) {
    if (absl::Status st = Usable(); !st.ok()) {
      sink->OnSubscriptionEnded(st);
      return;
    }
    auto [it, created] = subs_.try_emplace(mid);
    it->second.sinks.emplace(id, sink);
    UpdateCounts();
    if (!created) {
      if (it->second.acked) sink->OnSubscribed();
      return;
    }
    if (state_ == State::kReady) {
      SendSubscribe(mid, it->second);
    } else {
      EnsureConnected();
    }
  }

  void RemoveSubscriber(const std::string& mid, uint64_t id) {
    auto it = subs_.find(mid);
    if (it == subs_.end()) return;
    it->second.sinks.erase(id);
    if (it->second.sinks.empty()) {
      // No unsubscribe action upstream: forget the request id; later frames are dropped.
      if (!it->second.rid.empty()) sub_rids_.erase(it->second.rid);
      subs_.erase(it);
    }
    UpdateCounts();
  }

  void SendSubscribe(const std::string& mid, Subscription& sub) {
    if (!sub.rid.empty()) sub_rids_.erase(sub.rid);
    sub.rid = NewRid(kActionSubscribeResults);
    sub.acked = false;
    absl::Status sent = connection_->Send(
        EncodeRequest(kActionSubscribeResults, sub.rid, SubscribeResultsBody(mid, sub.rid)), true);
    if (!sent.ok()) {
      EndSubscription(mid, absl::UnavailableError(
                               "could not send the results subscription (0510) upstream"));
      return;
    }
    sub_rids_[sub.rid] = mid;
  }

  void EndSubscription(const std::string& mid, const absl::Status& status) {
    auto it = subs_.find(mid);
    if (it == subs_.end()) return;
    Subscription sub = std::move(it->second);
    subs_.erase(it);
    if (!sub.rid.empty()) sub_rids_.erase(sub.rid);
    UpdateCounts();
    for (auto& [sid, sink] : sub.sinks) sink->OnSubscriptionEnded(status);
  }

  void OnSubscriptionFrame(const std::string& mid, const ResponseFrame& frame) {
    auto it = subs_.find(mid);
    if (it == subs_.end()) return;
    Subscription& sub = it->second;
    if (frame.status / 100 != 2) {
      EndSubscription(mid, UpstreamError(frame.status, frame.body, "results subscription (0510)"));
      return;
    }
    bool is_ack = !sub.acked && (frame.body.empty() || IsEmptyObject(frame.body));
    if (!sub.acked) {
      sub.acked = true;
      std::vector<std::shared_ptr<ResultSink>> sinks;
      for (auto& [sid, sink] : sub.sinks) sinks.push_back(sink);
      for (auto& sink : sinks) sink->OnSubscribed();
      if (is_ack) return;
    }
    auto result = std::make_shared<v1::MeasurementResult>();
    result->set_measurement_id(mid);
    result->set_json_body(std::string(frame.body));
    result->set_after_reconnect(sub.after_reconnect);
    sub.after_reconnect = false;
    ResultInfo info = ParseResultInfo(frame.body);
    ResultPtr shared = std::move(result);
    std::vector<std::shared_ptr<ResultSink>> sinks;
    for (auto& [sid, sink] : sub.sinks) sinks.push_back(sink);
    for (auto& sink : sinks) sink->OnResult(shared, info);
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
    pace_timer_.cancel();
    login_timer_.cancel();
    deadline_timer_.cancel();
    deadline_armed_ = Clock::time_point::max();
    FailAll(absl::UnavailableError(absl::StrCat("the DFX session was closed: ", reason)));
    if (connection_ == nullptr) {
      FinishClose();
      return;
    }
    connection_->Close(code, reason);
    // The connection reports its end through OnDisconnected; don't wait forever.
    close_timer_ = std::make_unique<asio::steady_timer>(strand_.get_inner_executor());
    close_timer_->expires_after(options_.connection.close_timeout + std::chrono::seconds(1));
    close_timer_->async_wait(asio::bind_executor(strand_, [w = weak_from_this()](const boost::system::error_code& ec) {
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

  Strand strand_;
  SessionOptions options_;
  std::atomic<uint64_t> next_op_{1};
  std::atomic<bool> ready_{false};
  std::atomic<bool> closed_flag_{false};
  std::atomic<int> in_flight_{0};
  std::atomic<int> subscribers_{0};

  mutable absl::Mutex mu_;
  std::shared_ptr<core::Connection> connection_snapshot_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);

  // Strand only.
  State state_ = State::kIdle;
  uint64_t generation_ = 0;
  std::shared_ptr<core::Connection> connection_;
  std::shared_ptr<Link> link_;
  std::string login_rid_;
  Clock::time_point login_sent_{};
  absl::Status auth_status_;
  Clock::time_point auth_failed_until_{};
  std::map<uint64_t, std::unique_ptr<Op>> ops_;
  std::list<uint64_t> waiting_;  // not a deque: no allocation while empty
  std::map<std::string, uint64_t, std::less<>> rid_to_op_;
  std::vector<PaceEntry> pace_;
  std::map<std::string, Subscription> subs_;
  std::map<std::string, std::string, std::less<>> sub_rids_;
  asio::steady_timer pace_timer_;
  asio::steady_timer login_timer_;
  asio::steady_timer deadline_timer_;
  Clock::time_point deadline_armed_ = Clock::time_point::max();
  std::unique_ptr<asio::steady_timer> close_timer_;
  std::vector<std::function<void()>> close_waiters_;
  std::shared_ptr<SessionImpl> close_self_;
  core::Rng rng_;
};

absl::StatusOr<core::HandshakeRequest> Link::PrepareHandshake() {
  auto s = session_.lock();
  if (s == nullptr) return absl::CancelledError("session gone");
  return s->PrepareHandshake(generation_);
}
void Link::OnOpen(std::string_view subprotocol) {
  if (auto s = session_.lock()) s->OnOpen(generation_, subprotocol);
}
void Link::OnMessage(std::string_view payload, bool /*binary*/) {
  if (auto s = session_.lock()) s->OnMessage(generation_, payload);
}
void Link::OnDisconnected(const core::DisconnectInfo& info, bool will_retry) {
  if (auto s = session_.lock()) s->OnDisconnected(generation_, info.reason, will_retry);
}

}  // namespace

std::shared_ptr<Session> Session::Create(asio::any_io_executor executor, SessionOptions options) {
  return std::make_shared<SessionImpl>(std::move(executor), std::move(options));
}

}  // namespace wsbridge::dfx
