// DfxBridge: session registry, drain/shutdown, admin, and the gRPC reactors.
#include <openssl/sha.h>

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <grpcpp/grpcpp.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"
#include "bridges/dfx/codec.h"
#include "bridges/dfx/dfx_bridge.h"
#include "bridges/dfx/session.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::dfx {
namespace {

namespace asio = boost::asio;
using v1::MeasurementEvent;
using v1::MeasurementResult;

constexpr std::string_view kLog = "dfx";
constexpr std::chrono::seconds kDefaultTokenRecheck{1};

std::string TokenHash(std::string_view token) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

Clock::time_point SteadyDeadline(const grpc::ServerContextBase& ctx) {
  auto d = ctx.deadline();
  if (d == std::chrono::system_clock::time_point::max()) return Clock::time_point::max();
  auto left = d - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

std::string_view StageName(v1::Stage stage) {
  switch (stage) {
    case v1::STAGE_FIRST: return "FIRST";
    case v1::STAGE_CHUNK: return "CHUNK";
    case v1::STAGE_LAST: return "LAST";
    default: return "";
  }
}

class DfxBridge;

// A call's hold on a session; releasing the last one starts the idle clock.
class Lease {
 public:
  Lease() = default;
  explicit Lease(std::shared_ptr<Session> s) : session_(std::move(s)) {}
  Lease(Lease&& o) noexcept : session_(std::move(o.session_)) {}
  Lease& operator=(Lease&& o) noexcept {
    Release();
    session_ = std::move(o.session_);
    return *this;
  }
  ~Lease() { Release(); }
  Session* operator->() const { return session_.get(); }
  const std::shared_ptr<Session>& get() const { return session_; }
  void Release() {
    if (session_ == nullptr) return;
    if (session_->leases.fetch_sub(1) == 1) {
      session_->idle_since_ns.store(Clock::now().time_since_epoch().count());
    }
    session_.reset();
  }

 private:
  std::shared_ptr<Session> session_;
};

// The hot paths on the completion-queue API: Call (latency, AsyncCall) and
// SubscribeResults (fan-out, AsyncResultsStream); CreateMeasurement and
// StreamMeasurement on the callback API.
using DfxServiceBase = v1::DfxService::WithAsyncMethod_Call<
    v1::DfxService::WithCallbackMethod_CreateMeasurement<v1::DfxService::WithAsyncMethod_SubscribeResults<
        v1::DfxService::WithCallbackMethod_StreamMeasurement<v1::DfxService::Service>>>>;

// Calls requested ahead on each completion queue, per async method.
constexpr int kOutstandingSubscribeRequests = 8;
constexpr int kOutstandingCallRequests = 16;

class DfxBridge final : public core::Bridge, public DfxServiceBase {
 public:
  DfxBridge(DfxBridgeOptions options, core::BridgeContext context)
      : options_(std::move(options)),
        context_(std::move(context)),
        strand_(asio::make_strand(context_.executor)),
        sweep_timer_(strand_) {
    if (context_.metrics != nullptr) {
      core::Labels labels = {{"bridge", context_.name}};
      malformed_ = &context_.metrics->GetCounter(
          "wsbridge_upstream_malformed_frames_total",
          "Upstream frames that could not be parsed and were dropped.", labels);
      unrouted_ = &context_.metrics->GetCounter(
          "wsbridge_upstream_unrouted_frames_total",
          "Upstream answers or results for no open request or subscription (dropped).", labels);
      rtt_ = &context_.metrics->GetHistogram("wsbridge_upstream_rtt_seconds",
                                             "Upstream request round-trip time.", labels);
    }
  }

  // --- core::Bridge ---
  const std::string& name() const override { return context_.name; }
  std::vector<grpc::Service*> Services() override { return {this}; }
  std::vector<std::string> ServiceNames() const override {
    return {std::string(v1::DfxService::service_full_name())};
  }
  // Every reactor reports itself (CallAccount), so the daemon's interceptor, which
  // doubles gRPC's completion work per operation, stays off this service.
  bool ObservesOwnCalls() const override { return context_.calls != nullptr; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<core::CqLoop*>& loops) override;
  void CallStarted() {
    if (context_.calls != nullptr) context_.calls->Started();
  }
  void CallFinished(std::string_view method, grpc::StatusCode code) {
    if (context_.calls != nullptr) context_.calls->Finished(method, code);
  }

  void Start() override {
    if (options_.default_token) {
      absl::StatusOr<Lease> s = DefaultSession();
      if (!s.ok()) {
        log::Warn(kLog, "could not start the default DFX session",
                  {{"bridge", context_.name}, {"error", s.status().ToString()}});
      }
    }
    ScheduleSweep();
  }

  void BeginDrain() override { draining_.store(true); }

  void Shutdown(const grpc::Status& status, std::function<void()> done) override {
    draining_.store(true);
    std::map<std::string, std::shared_ptr<Session>> sessions;
    {
      absl::MutexLock lock(&mu_);
      if (shut_down_) {
        // Idempotent: report done once the first shutdown finished.
        if (done) shutdown_waiters_.push_back(std::move(done));
        if (shutdown_complete_) FlushShutdownWaitersLocked();
        return;
      }
      shut_down_ = true;
      if (done) shutdown_waiters_.push_back(std::move(done));
      sessions = std::move(sessions_);
      sessions_.clear();
    }
    asio::post(strand_, [this] { sweep_timer_.cancel(); });
    calls_.AbortAll(status);
    auto remaining = std::make_shared<std::atomic<size_t>>(sessions.size() + 1);
    auto finished = [this, remaining] {
      if (remaining->fetch_sub(1) != 1) return;
      absl::MutexLock lock(&mu_);
      shutdown_complete_ = true;
      FlushShutdownWaitersLocked();
    };
    for (auto& [key, s] : sessions) s->Close(1001, "going away", finished);
    health();
    finished();
  }

  bool Serving() const override {
    if (draining_.load()) return false;
    if (!options_.default_token) return true;
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(default_key_);
    return it != sessions_.end() && it->second->ready();
  }

  std::vector<admin::v1::Session> ListSessions() const override {
    std::vector<std::shared_ptr<Session>> sessions;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& [k, s] : sessions_) sessions.push_back(s);
    }
    std::vector<admin::v1::Session> out;
    for (const auto& s : sessions) out.push_back(s->Describe());
    return out;
  }

  absl::Status CloseSession(std::string_view session_id) override {
    std::shared_ptr<Session> victim;
    bool was_default = false;
    {
      absl::MutexLock lock(&mu_);
      for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
        if (it->second->id() == session_id) {
          victim = it->second;
          was_default = it->first == default_key_;
          sessions_.erase(it);
          break;
        }
      }
    }
    if (victim == nullptr) {
      return absl::NotFoundError(absl::StrCat("no DFX session with id \"", Av(session_id), "\""));
    }
    victim->Close(1001, "closed by an operator", nullptr);
    if (was_default && !draining_.load()) (void)DefaultSession();  // keep it always on
    health();
    return absl::OkStatus();
  }

  // --- Used by the reactors. ---
  core::ActiveCalls& calls() { return calls_; }
  const DfxBridgeOptions& options() const { return options_; }

  // Authorization, drain and session lookup for one call.
  absl::StatusOr<Lease> Admit(const grpc::ServerContextBase& ctx) {
    if (draining_.load()) {
      return absl::UnavailableError("the DFX bridge is shutting down; retry on another instance");
    }
    if (context_.authorize) {
      grpc::Status auth = context_.authorize(ctx);
      if (!auth.ok()) {
        return absl::Status(static_cast<absl::StatusCode>(auth.error_code()),
                            auth.error_message());
      }
    }
    const auto& md = ctx.client_metadata();
    auto it = md.find(grpc::string_ref(kDeviceTokenMetadata.data(), kDeviceTokenMetadata.size()));
    if (it == md.end()) {
      if (!options_.default_token) {
        return absl::UnauthenticatedError(absl::StrCat(
            "no device token: this bridge has no configured token, send one in the \"",
            Av(kDeviceTokenMetadata), "\" metadata"));
      }
      return DefaultSession();
    }
    if (!options_.allow_call_token) {
      return absl::PermissionDeniedError(absl::StrCat(
          "this bridge does not accept per-call device tokens (\"", Av(kDeviceTokenMetadata),
          "\" metadata); remove it, or set allow_call_token in the bridge config"));
    }
    std::string token(it->second.data(), it->second.size());
    if (token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the \"", Av(kDeviceTokenMetadata), "\" metadata is empty"));
    }
    return SessionFor(TokenHash(token), [token] { return absl::StatusOr<std::string>(token); },
                      false);
  }

 private:
  // The configured token is re-read (file, env) and hashed at most once per
  // kDefaultTokenRecheck, not on every call: a rotated secret moves calls to a new
  // session within that time. Errors are not cached.
  absl::StatusOr<Lease> DefaultSession() {
    const Clock::time_point now = Clock::now();
    std::string key;
    {
      absl::MutexLock lock(&default_mu_);
      if (!default_cached_key_.empty() && now - default_checked_ < kDefaultTokenRecheck) {
        key = default_cached_key_;
      }
    }
    if (key.empty()) {
      absl::StatusOr<std::string> token = options_.default_token();
      if (!token.ok()) {
        return absl::UnavailableError(absl::StrCat(
            "the configured DFX device token is unusable: ", token.status().message()));
      }
      key = TokenHash(*token);
      absl::MutexLock lock(&default_mu_);
      default_cached_key_ = key;
      default_checked_ = now;
    }
    return SessionFor(key, options_.default_token, true);
  }

  // `token` is copied into the session only when one is created.
  absl::StatusOr<Lease> SessionFor(const std::string& key,
                                   const std::function<absl::StatusOr<std::string>()>& token,
                                   bool pinned) {
    std::shared_ptr<Session> session;
    bool created = false;
    {
      absl::MutexLock lock(&mu_);
      if (shut_down_) return absl::UnavailableError("the DFX bridge is shut down");
      if (pinned && default_key_ != key) default_key_ = key;
      auto it = sessions_.find(key);
      if (it != sessions_.end()) {
        session = it->second;
      } else {
        if (sessions_.size() >= options_.max_sessions) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "the DFX bridge already holds its maximum of ", options_.max_sessions,
              " upstream sessions (one per device token); retry later or raise max_sessions"));
        }
        SessionOptions so;
        so.bridge_name = context_.name;
        so.session_id = absl::StrCat(context_.name, "/", key.substr(0, 8));
        so.connection = options_.connection;
        so.connection.name = so.session_id;
        so.url = options_.url;
        so.headers = options_.headers;
        so.token = token;
        so.request_timeout = options_.request_timeout;
        so.rate_limit_retry = options_.rate_limit_retry;
        so.max_rate_limit_retries = options_.max_rate_limit_retries;
        so.pacing = options_.pacing;
        so.pacing_window = options_.pacing_window;
        so.auth_retry_delay = options_.auth_retry_delay;
        so.malformed_frames = malformed_;
        so.unrouted_frames = unrouted_;
        so.rtt = rtt_;
        if (pinned) so.health_changed = [this] { health(); };
        session = Session::Create(
            context_.session_executor ? context_.session_executor() : context_.executor, std::move(so));
        session->pinned = pinned;
        session->idle_since_ns.store(Clock::now().time_since_epoch().count());
        sessions_.emplace(key, session);
        created = true;
      }
      session->leases.fetch_add(1);
    }
    if (created && pinned) session->Start();
    return Lease(std::move(session));
  }

  void health() {
    if (context_.health_changed) context_.health_changed();
  }

  void FlushShutdownWaitersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::function<void()>> waiters = std::move(shutdown_waiters_);
    shutdown_waiters_.clear();
    // Run outside the critical section would be nicer; these only signal.
    for (auto& w : waiters) asio::post(context_.executor, std::move(w));
  }

  void ScheduleSweep() {
    auto every = std::clamp<core::Duration>(options_.idle_session_timeout / 4,
                                            std::chrono::milliseconds(50), std::chrono::seconds(10));
    asio::post(strand_, [this, every] {
      sweep_timer_.expires_after(every);
      sweep_timer_.async_wait([this](const boost::system::error_code& ec) {
        if (ec) return;
        Sweep();
        {
          absl::MutexLock lock(&mu_);
          if (shut_down_) return;
        }
        ScheduleSweep();
      });
    });
  }

  // Closes sessions no call has held for idle_session_timeout.
  void Sweep() {
    std::vector<std::shared_ptr<Session>> idle;
    int64_t now = Clock::now().time_since_epoch().count();
    int64_t limit = std::chrono::duration_cast<Clock::duration>(options_.idle_session_timeout).count();
    {
      absl::MutexLock lock(&mu_);
      for (auto it = sessions_.begin(); it != sessions_.end();) {
        Session& s = *it->second;
        if (!s.pinned && s.leases.load() == 0 && now - s.idle_since_ns.load() >= limit) {
          idle.push_back(it->second);
          it = sessions_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& s : idle) {
      log::Info(kLog, "closing idle DFX session", {{"session", s->id()}});
      s->Close(1000, "idle", nullptr);
    }
  }

  // --- gRPC methods (defined below). ---
  grpc::ServerUnaryReactor* CreateMeasurement(grpc::CallbackServerContext* ctx,
                                              const v1::CreateMeasurementRequest* req,
                                              v1::CreateMeasurementResponse* resp) override;
  grpc::ServerBidiReactor<v1::MeasurementChunk, MeasurementEvent>* StreamMeasurement(
      grpc::CallbackServerContext* ctx) override;

  DfxBridgeOptions options_;
  core::BridgeContext context_;
  core::Counter* malformed_ = nullptr;
  core::Counter* unrouted_ = nullptr;
  core::Histogram* rtt_ = nullptr;
  core::ActiveCalls calls_;
  std::atomic<bool> draining_{false};
  asio::strand<asio::any_io_executor> strand_;
  asio::steady_timer sweep_timer_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  std::string default_key_ ABSL_GUARDED_BY(mu_);
  absl::Mutex default_mu_;
  std::string default_cached_key_ ABSL_GUARDED_BY(default_mu_);
  Clock::time_point default_checked_ ABSL_GUARDED_BY(default_mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  bool shutdown_complete_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::function<void()>> shutdown_waiters_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------
// Call accounting: started when the reactor is made, finished in OnDone with the
// status the call was finished with (CANCELLED when it never was).

constexpr std::string_view kCallMethod = "/wsbridge.dfx.v1.DfxService/Call";
constexpr std::string_view kCreateMeasurementMethod = "/wsbridge.dfx.v1.DfxService/CreateMeasurement";
constexpr std::string_view kSubscribeResultsMethod = "/wsbridge.dfx.v1.DfxService/SubscribeResults";
constexpr std::string_view kStreamMeasurementMethod = "/wsbridge.dfx.v1.DfxService/StreamMeasurement";

class CallAccount {
 public:
  CallAccount(DfxBridge* bridge, std::string_view method) : bridge_(bridge), method_(method) {
    bridge_->CallStarted();
  }
  // The first status a call is finished with is the one counted.
  void Finishing(grpc::StatusCode code) {
    int unset = -1;
    code_.compare_exchange_strong(unset, static_cast<int>(code));
  }
  void Done() {
    const int c = code_.load();
    bridge_->CallFinished(method_, c < 0 ? grpc::StatusCode::CANCELLED : static_cast<grpc::StatusCode>(c));
  }

 private:
  DfxBridge* bridge_;
  std::string_view method_;
  std::atomic<int> code_{-1};
};

// ---------------------------------------------------------------------------------
// Unary calls.

// Finishes a unary call exactly once, from whichever thread gets there first; the
// session's callback may outlive the reactor, so it holds this, not the reactor.
class UnaryState {
 public:
  explicit UnaryState(grpc::ServerUnaryReactor* r) : reactor_(r) {}
  // `fill` writes the response before finishing OK; skipped when already finished.
  void Finish(const grpc::Status& status, const std::function<void()>& fill = nullptr) {
    grpc::ServerUnaryReactor* r;
    {
      absl::MutexLock lock(&mu_);
      if (reactor_ == nullptr) return;
      r = reactor_;
      reactor_ = nullptr;
      if (status.ok() && fill) fill();
      code_.store(static_cast<int>(status.error_code()));
    }
    r->Finish(status);
  }
  // The status the call was finished with; -1 while unfinished.
  int code() const { return code_.load(); }
  std::atomic<uint64_t> op_id{0};

 private:
  absl::Mutex mu_;
  grpc::ServerUnaryReactor* reactor_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> code_{-1};
};

class UnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  UnaryReactor(DfxBridge* bridge, std::string_view method)
      : bridge_(bridge), state_(std::make_shared<UnaryState>(this)), account_(bridge, method) {}

  // Admits the call (or finishes it). Returns false when finished already.
  bool Admit(grpc::CallbackServerContext* ctx) {
    call_id_ = bridge_->calls().Add(
        [s = state_](const grpc::Status& st) { s->Finish(st); });
    if (call_id_ == 0) {
      state_->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                  "the DFX bridge is shutting down; retry on another instance"));
      return false;
    }
    absl::StatusOr<Lease> lease = bridge_->Admit(*ctx);
    if (!lease.ok()) {
      state_->Finish(core::ToGrpcStatus(lease.status()));
      return false;
    }
    lease_ = std::move(*lease);
    return true;
  }
  void Fail(const absl::Status& st) { state_->Finish(core::ToGrpcStatus(st)); }
  const std::shared_ptr<UnaryState>& state() const { return state_; }
  Session* session() const { return lease_.get().get(); }

  void OnCancel() override {
    if (lease_.get() != nullptr && state_->op_id.load() != 0) lease_->Cancel(state_->op_id.load());
    state_->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
  }
  void OnDone() override {
    if (state_->code() >= 0) account_.Finishing(static_cast<grpc::StatusCode>(state_->code()));
    account_.Done();
    if (call_id_ != 0) bridge_->calls().Remove(call_id_);
    delete this;
  }

 private:
  DfxBridge* bridge_;
  std::shared_ptr<UnaryState> state_;
  core::ActiveCalls::Id call_id_ = 0;
  Lease lease_;
  CallAccount account_;
};

// What Call accepts: any action id but the ones with their own RPC, with a JSON object
// body (empty = {}).
absl::Status ValidateCall(const v1::CallRequest& req) {
  if (absl::Status st = ValidateActionId(req.action_id()); !st.ok()) return st;
  const std::string& action = req.action_id();
  if (action == kActionLogin) {
    return absl::InvalidArgumentError(
        "action 0718 (login) is managed by the bridge: it logs in with the device token on "
        "every connect");
  }
  if (action == kActionSubscribeResults) {
    return absl::InvalidArgumentError(
        "action 0510 (subscribe to results) streams results: use SubscribeResults");
  }
  if (action == kActionMeasurementData) {
    return absl::InvalidArgumentError(
        "action 0506 (measurement data) must be ordered and paced: use StreamMeasurement");
  }
  if (!req.json_body().empty()) return ValidateJsonObject(req.json_body());
  return absl::OkStatus();
}

// What every DFX call served on the completion-queue API shares: it owns itself
// (self_) from its request until gRPC has returned every tag it was given (the done
// tag and `ops_` more), admits itself once matched, and is touched only on its CqLoop
// thread. `Derived` has FinishWith(const grpc::Status&) and the tags.
template <typename Derived>
class AsyncCallBase : public std::enable_shared_from_this<Derived> {
 protected:
  AsyncCallBase(DfxBridge* bridge, core::CqLoop* loop, std::string_view method)
      : bridge_(bridge), loop_(loop), method_(method) {}

  // Starts `call`: the done tag, then `request` (gRPC's Request<Method>) unless the
  // loop is shutting down.
  template <typename Request>
  static void Start(std::shared_ptr<Derived> call, core::CqTag* done_tag, Request&& request) {
    call->self_ = call;
    call->ctx_.AsyncNotifyWhenDone(done_tag);
    if (!call->loop_->RunIfAccepting(std::forward<Request>(request))) call->self_.reset();
  }

  // On the matched tag: requests the next call, registers this one (accounting, drain)
  // and admits it. The lease, or nullopt when the call was never matched (server
  // shutdown) or has been finished with an error.
  std::optional<Lease> AdmitMatched(bool ok) {
    if (!ok) {
      self_.reset();
      return std::nullopt;
    }
    matched_ = true;
    Derived::Request(bridge_, loop_);  // keep a request outstanding for the next caller
    account_.emplace(bridge_, method_);
    call_id_ = bridge_->calls().Add([w = this->weak_from_this(), loop = loop_](const grpc::Status& st) {
      loop->Post([w, st] {
        if (auto c = w.lock()) c->FinishWith(st);
      });
    });
    if (call_id_ == 0) {
      Self().FinishWith(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "the DFX bridge is shutting down; retry on another instance"));
      return std::nullopt;
    }
    absl::StatusOr<Lease> lease = bridge_->Admit(ctx_);
    if (!lease.ok()) {
      Self().FinishWith(core::ToGrpcStatus(lease.status()));
      return std::nullopt;
    }
    return std::move(*lease);
  }

  // On the done tag: the call is over (finished, or cancelled by the caller or the
  // server). Releases what admission took; the object goes once no tag is out.
  void EndCall(Lease& lease) {
    done_ = true;
    finished_ = true;
    lease.Release();
    if (call_id_ != 0) bridge_->calls().Remove(call_id_);
    if (account_.has_value()) account_->Done();
    MaybeRelease();
  }

  void Finishing(const grpc::Status& status) {
    if (account_.has_value()) account_->Finishing(status.error_code());
  }
  void OpStarted() { ++ops_; }
  void OpReturned() {
    --ops_;
    MaybeRelease();
  }

  DfxBridge* bridge_;
  core::CqLoop* loop_;
  grpc::ServerContext ctx_;
  bool matched_ = false;
  bool finished_ = false;  // a Finish is started, or none is needed any more
  bool done_ = false;

 private:
  Derived& Self() { return static_cast<Derived&>(*this); }
  void MaybeRelease() {
    if (done_ && ops_ == 0) self_.reset();
  }

  std::string_view method_;
  std::shared_ptr<Derived> self_;
  std::optional<CallAccount> account_;
  core::ActiveCalls::Id call_id_ = 0;
  int ops_ = 0;  // operations gRPC has not returned yet (besides the done tag)
};

// Call on the completion-queue API, the latency path: matched, admitted and sent on
// its CqLoop thread; the session's strand posts the answer back to that thread, which
// finishes the call.
class AsyncCall final : public AsyncCallBase<AsyncCall> {
 public:
  AsyncCall(DfxBridge* bridge, core::CqLoop* loop)
      : AsyncCallBase(bridge, loop, kCallMethod), responder_(&ctx_) {}

  // Asks gRPC for the next Call on `loop` (any thread).
  static void Request(DfxBridge* bridge, core::CqLoop* loop) {
    auto c = std::make_shared<AsyncCall>(bridge, loop);
    Start(c, &c->done_tag_, [&] {
      bridge->RequestCall(&c->ctx_, &c->req_, &c->responder_, loop->cq(), loop->cq(),
                          &c->matched_tag_);
    });
  }

 private:
  friend class AsyncCallBase<AsyncCall>;

  void OnMatched(bool ok) {
    std::optional<Lease> lease = AdmitMatched(ok);
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    if (absl::Status st = ValidateCall(req_); !st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    std::string body = req_.json_body().empty() ? "{}" : std::move(*req_.mutable_json_body());
    op_id_ = lease_->Request(
        req_.action_id(), std::move(body), SteadyDeadline(ctx_),
        [c = shared_from_this()](absl::StatusOr<Response> answer) mutable {
          core::CqLoop* loop = c->loop_;
          loop->Post([c = std::move(c), answer = std::move(answer)]() mutable {
            c->Answer(std::move(answer));
          });
        });
  }

  void Answer(absl::StatusOr<Response> answer) {
    if (finished_) return;
    if (!answer.ok()) {
      FinishWith(core::ToGrpcStatus(answer.status()));
      return;
    }
    resp_.set_status(static_cast<uint32_t>(answer->status));
    resp_.set_json_body(std::move(answer->body));
    FinishWith(grpc::Status::OK);
  }

  void FinishWith(const grpc::Status& status) {
    if (!matched_ || finished_ || done_) return;
    finished_ = true;
    Finishing(status);
    OpStarted();
    if (status.ok()) {
      responder_.Finish(resp_, status, &finish_tag_);
    } else {
      responder_.FinishWithError(status, &finish_tag_);
    }
  }

  void OnFinished(bool /*ok*/) { OpReturned(); }

  // Cancelled before the answer: the upstream request is dropped (a late answer is
  // ignored).
  void OnDone(bool /*ok*/) {
    if (!finished_ && op_id_ != 0 && lease_.get() != nullptr) lease_->Cancel(op_id_);
    EndCall(lease_);
  }

  v1::CallRequest req_;
  v1::CallResponse resp_;
  grpc::ServerAsyncResponseWriter<v1::CallResponse> responder_;
  core::MemberTag<AsyncCall, &AsyncCall::OnMatched> matched_tag_{this};
  core::MemberTag<AsyncCall, &AsyncCall::OnFinished> finish_tag_{this};
  core::MemberTag<AsyncCall, &AsyncCall::OnDone> done_tag_{this};
  Lease lease_;
  uint64_t op_id_ = 0;
};

grpc::ServerUnaryReactor* DfxBridge::CreateMeasurement(grpc::CallbackServerContext* ctx,
                                                       const v1::CreateMeasurementRequest* req,
                                                       v1::CreateMeasurementResponse* resp) {
  auto* r = new UnaryReactor(this, kCreateMeasurementMethod);
  if (!r->Admit(ctx)) return r;
  if (req->study_id().empty()) {
    r->Fail(absl::InvalidArgumentError("study_id is required: the DFX study to measure with"));
    return r;
  }
  CreateMeasurementParams p;
  p.study_id = req->study_id();
  p.resolution = req->resolution();
  p.user_profile_id = req->user_profile_id();
  p.partner_id = req->partner_id();
  r->state()->op_id.store(r->session()->Request(
      std::string(kActionCreateMeasurement), CreateMeasurementBody(p), SteadyDeadline(*ctx),
      [s = r->state(), resp](absl::StatusOr<Response> answer) {
        if (!answer.ok()) {
          s->Finish(core::ToGrpcStatus(answer.status()));
          return;
        }
        if (answer->status / 100 != 2) {
          s->Finish(core::ToGrpcStatus(
              UpstreamError(answer->status, answer->body, "create measurement (0504)")));
          return;
        }
        absl::StatusOr<std::string> id = ParseCreatedId(answer->body);
        if (!id.ok()) {
          s->Finish(core::ToGrpcStatus(id.status()));
          return;
        }
        s->Finish(grpc::Status::OK, [&] { resp->set_measurement_id(*id); });
      }));
  return r;
}

// ---------------------------------------------------------------------------------
// Streams. Both keep a bounded queue of messages with one write in flight, and start
// gRPC operations outside their mutex (reactions may run inline).

template <typename Msg>
class Outbox {
 public:
  // The message to start writing now, or null when a write is in flight.
  const Msg* Push(std::shared_ptr<const Msg> m) {
    queue_.push_back(std::move(m));
    if (writing_) return nullptr;
    writing_ = true;
    return queue_.front().get();
  }
  const Msg* WriteDone() {
    if (!queue_.empty()) queue_.pop_front();
    if (queue_.empty()) {
      writing_ = false;
      return nullptr;
    }
    return queue_.front().get();
  }
  bool idle() const { return !writing_; }
  size_t size() const { return queue_.size(); }

 private:
  std::deque<std::shared_ptr<const Msg>> queue_;
  bool writing_ = false;
};

// What to do with gRPC once the mutex is released.
template <typename Msg>
struct Actions {
  const Msg* write = nullptr;
  bool read = false;
  std::optional<grpc::Status> finish;
};

// SubscribeResultsResponse limits (documented in dfx.proto).
constexpr int kMaxResultsPerMessage = 64;
constexpr size_t kMaxBatchBytes = 1 << 20;

absl::Status SlowConsumer(size_t limit) {
  return core::WithErrorInfo(
      absl::ResourceExhaustedError(absl::StrCat(
          "this stream fell ", limit,
          " results behind; it was ended so other subscribers are not held back. Read "
          "faster or subscribe again")),
      "SLOW_CONSUMER", kErrorDomain);
}

// SubscribeResults on the completion-queue API (see bridges/core/cq_loop.h for why).
// The session's strand reaches the stream through CqLoop::Post, gRPC through the tags;
// both run on the stream's loop thread.
class AsyncResultsStream final : public AsyncCallBase<AsyncResultsStream>, public ResultSink {
 public:
  AsyncResultsStream(DfxBridge* bridge, core::CqLoop* loop)
      : AsyncCallBase(bridge, loop, kSubscribeResultsMethod), writer_(&ctx_) {}

  // Asks gRPC for the next SubscribeResults call on `loop` (any thread).
  static void Request(DfxBridge* bridge, core::CqLoop* loop) {
    auto s = std::make_shared<AsyncResultsStream>(bridge, loop);
    Start(s, &s->done_tag_, [&] {
      bridge->RequestSubscribeResults(&s->ctx_, &s->req_, &s->writer_, loop->cq(), loop->cq(),
                                      &s->matched_tag_);
    });
  }

  // ResultSink (session strand): hand over to the loop thread.
  void OnSubscribed() override {
    loop_->Post([s = shared_from_this()] { s->Subscribed(); });
  }
  void OnResult(const ResultPtr& result, const ResultInfo& info) override {
    loop_->Post([s = shared_from_this(), result, complete = info.complete] {
      s->Result(result, complete);
    });
  }
  void OnSubscriptionEnded(const absl::Status& status) override {
    loop_->Post([s = shared_from_this(), status] {
      s->subscribed_ = false;
      s->FinishWith(core::ToGrpcStatus(status));
    });
  }

 private:
  friend class AsyncCallBase<AsyncResultsStream>;

  // --- gRPC tags (loop thread). ---
  void OnMatched(bool ok) {
    std::optional<Lease> lease = AdmitMatched(ok);
    if (!lease.has_value()) return;
    if (req_.measurement_id().empty()) {
      FinishWith(core::ToGrpcStatus(
          absl::InvalidArgumentError("measurement_id is required (from CreateMeasurement)")));
      return;
    }
    lease_ = std::move(*lease);
    mid_ = req_.measurement_id();
    sub_id_ = lease_->Subscribe(mid_, shared_from_this());
    subscribed_ = true;
  }

  // Initial metadata and writes: one in flight at a time.
  void OnWritten(bool ok) {
    writing_ = false;
    if (!ok) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke"));
    } else {
      WriteNext();
    }
    OpReturned();
  }

  void OnFinished(bool /*ok*/) { OpReturned(); }

  void OnDone(bool /*ok*/) {
    Unsubscribe();
    EndCall(lease_);
  }

  // --- Loop thread. ---
  void Subscribed() {
    if (finished_ || sent_metadata_ || writing_) return;
    // Initial metadata tells the caller the upstream subscription is active.
    sent_metadata_ = true;
    writing_ = true;
    OpStarted();
    writer_.SendInitialMetadata(&write_tag_);
  }

  void Result(const ResultPtr& result, bool complete) {
    if (finished_ || finish_after_.has_value()) return;
    if (pending_.size() >= bridge_->options().subscriber_queue) {
      FinishWith(core::ToGrpcStatus(SlowConsumer(bridge_->options().subscriber_queue)));
      return;
    }
    sent_metadata_ = true;  // a write sends it
    pending_.push_back(result);
    if (complete) {
      // The measurement's last result: end cleanly once it is written.
      finish_after_ = grpc::Status::OK;
      Unsubscribe();
    }
    if (!writing_) WriteNext();
  }

  // Writes the queued results (up to a batch) or, with none left, a pending finish.
  void WriteNext() {
    if (writing_ || finish_started_) return;
    if (pending_.empty()) {
      if (finish_after_.has_value()) {
        finished_ = true;
        StartFinish(*finish_after_);
      }
      return;
    }
    batch_.Clear();
    size_t bytes = 0;
    while (!pending_.empty() && batch_.results_size() < kMaxResultsPerMessage &&
           (batch_.results_size() == 0 ||
            bytes + pending_.front()->json_body().size() <= kMaxBatchBytes)) {
      bytes += pending_.front()->json_body().size();
      *batch_.add_results() = *pending_.front();
      pending_.pop_front();
    }
    writing_ = true;
    OpStarted();
    writer_.Write(batch_, &write_tag_);
  }

  // Ends the call with `status` (the first status wins; it replaces the OK a complete
  // measurement queued), dropping unwritten results, once a write in flight is done.
  void FinishWith(const grpc::Status& status) {
    if (!matched_ || finished_ || done_) return;
    finished_ = true;
    Unsubscribe();
    pending_.clear();
    finish_after_ = status;
    WriteNext();  // finishes now unless a write is in flight; OnWritten comes back here
  }

  void StartFinish(const grpc::Status& status) {
    if (finish_started_ || done_) return;
    finish_started_ = true;
    Finishing(status);
    OpStarted();
    writer_.Finish(status, &finish_tag_);
  }

  // Stops routing results here: the last subscriber leaving releases the upstream one.
  void Unsubscribe() {
    if (subscribed_ && lease_.get() != nullptr) {
      lease_->Unsubscribe(mid_, sub_id_);
    }
    subscribed_ = false;
  }

  v1::SubscribeResultsRequest req_;
  grpc::ServerAsyncWriter<v1::SubscribeResultsResponse> writer_;
  core::MemberTag<AsyncResultsStream, &AsyncResultsStream::OnMatched> matched_tag_{this};
  core::MemberTag<AsyncResultsStream, &AsyncResultsStream::OnWritten> write_tag_{this};
  core::MemberTag<AsyncResultsStream, &AsyncResultsStream::OnFinished> finish_tag_{this};
  core::MemberTag<AsyncResultsStream, &AsyncResultsStream::OnDone> done_tag_{this};
  Lease lease_;
  std::string mid_;
  uint64_t sub_id_ = 0;
  bool subscribed_ = false;
  bool sent_metadata_ = false;
  bool writing_ = false;
  bool finish_started_ = false;
  // The status to finish with once nothing is left to write: OK after a complete
  // measurement's last result, or FinishWith's.
  std::optional<grpc::Status> finish_after_;
  std::deque<ResultPtr> pending_;              // not yet in a message
  v1::SubscribeResultsResponse batch_;         // the message in flight
};

void DfxBridge::ServeAsync(const std::vector<core::CqLoop*>& loops) {
  // A few requests outstanding per queue, so that a burst of new subscribers does not
  // wait for each match to request the next.
  for (core::CqLoop* loop : loops) {
    for (int i = 0; i < kOutstandingSubscribeRequests; ++i) AsyncResultsStream::Request(this, loop);
    for (int i = 0; i < kOutstandingCallRequests; ++i) AsyncCall::Request(this, loop);
  }
}

class MeasurementStream final
    : public grpc::ServerBidiReactor<v1::MeasurementChunk, MeasurementEvent>,
      public ResultSink,
      public std::enable_shared_from_this<MeasurementStream> {
 public:
  MeasurementStream(DfxBridge* bridge, grpc::CallbackServerContext* ctx)
      : bridge_(bridge), ctx_(ctx), account_(bridge, kStreamMeasurementMethod) {}

  void Begin() {
    self_ = shared_from_this();
    call_id_ = bridge_->calls().Add([w = weak_from_this()](const grpc::Status& st) {
      if (auto s = w.lock()) s->FinishWith(st);
    });
    if (call_id_ == 0) {
      FinishWith(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the DFX bridge is shutting down"));
      return;
    }
    absl::StatusOr<Lease> lease = bridge_->Admit(*ctx_);
    if (!lease.ok()) {
      FinishWith(core::ToGrpcStatus(lease.status()));
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      lease_ = std::move(*lease);
    }
    StartRead(&chunk_);
  }

  // gRPC.
  void OnReadDone(bool ok) override {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      if (!ok) {
        half_closed_ = true;
        MaybeCompleteLocked(a);
      } else {
        absl::Status st = AcceptChunkLocked();
        if (!st.ok()) FailLocked(st, a);
      }
    }
    Run(a);
  }

  void OnWriteDone(bool ok) override {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      if (!ok) {
        a.finish = grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke");
        MarkFinishedLocked();
      } else {
        a.write = outbox_.WriteDone();
        if (a.write == nullptr && pending_finish_.has_value()) {
          a.finish = *pending_finish_;
          MarkFinishedLocked();
        }
      }
    }
    Run(a);
  }

  void OnCancel() override {
    FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&mu_);
      MarkFinishedLocked();
      lease_.Release();
    }
    account_.Done();
    bridge_->calls().Remove(call_id_);
    self_.reset();
  }

  // ResultSink (session strand).
  void OnSubscribed() override {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || sub_active_) return;
      sub_active_ = true;
      if (held_.has_value()) {
        ChunkRequest c = std::move(*held_);
        held_.reset();
        SendLocked(std::move(c));
      }
    }
    Run(a);
  }

  void OnResult(const ResultPtr& result, const ResultInfo& info) override {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      if (info.chunk_order.has_value()) seen_orders_.insert(*info.chunk_order);
      if (!info.measurement_data_id.empty()) seen_ids_.insert(info.measurement_data_id);
      if (info.complete) seen_complete_ = true;
      if (outbox_.size() >= bridge_->options().subscriber_queue) {
        FailLocked(SlowConsumer(bridge_->options().subscriber_queue), a);
      } else {
        auto ev = std::make_shared<MeasurementEvent>();
        *ev->mutable_result() = *result;
        a.write = outbox_.Push(std::move(ev));
        MaybeCompleteLocked(a);
      }
    }
    Run(a);
  }

  void OnSubscriptionEnded(const absl::Status& status) override {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      subscribed_ = false;
      if (finished_ || pending_finish_.has_value()) return;
      FailLocked(status, a);
    }
    Run(a);
  }

 private:
  // Validates the chunk just read and sends it (or holds it until subscribed).
  absl::Status AcceptChunkLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (last_sent_) {
      return absl::FailedPreconditionError(
          "a chunk arrived after the LAST chunk; start a new stream for a new measurement");
    }
    if (mid_.empty()) {
      if (chunk_.measurement_id().empty()) {
        return absl::InvalidArgumentError(
            "the first message must carry measurement_id (from CreateMeasurement)");
      }
      mid_ = chunk_.measurement_id();
      subscribe_ = chunk_.subscribe_results();
    }
    std::string_view stage = StageName(chunk_.stage());
    if (stage.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", next_index_, ": stage must be STAGE_FIRST, STAGE_CHUNK or STAGE_LAST"));
    }
    if (chunk_.payload().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", next_index_, ": payload is empty (pass the SDK's chunk bytes)"));
    }
    if (chunk_.duration_ms() == 0 && bridge_->options().pacing) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", next_index_,
          ": duration_ms is required (the real time the chunk covers; used to pace uploads)"));
    }
    ChunkRequest c;
    c.measurement_id = mid_;
    c.stage = stage;
    c.ignore = chunk_.ignore();
    c.payload = std::move(*chunk_.mutable_payload());
    c.duration_ms = chunk_.duration_ms();
    current_is_last_ = chunk_.stage() == v1::STAGE_LAST;
    current_ignore_ = chunk_.ignore();
    if (subscribe_ && !subscribed_ && !sub_requested_) {
      sub_requested_ = true;
      subscribed_ = true;
      held_ = std::move(c);  // sent once the subscription is active: no result is missed
      sub_id_ = lease_->Subscribe(mid_, shared_from_this());
      return absl::OkStatus();
    }
    SendLocked(std::move(c));
    return absl::OkStatus();
  }

  void SendLocked(ChunkRequest c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    in_flight_ = true;
    chunk_op_ = lease_->SendChunk(
        std::move(c), [w = weak_from_this()](absl::StatusOr<ChunkAnswer> answer) {
          if (auto s = w.lock()) s->OnChunkAnswer(std::move(answer));
        });
  }

  void OnChunkAnswer(absl::StatusOr<ChunkAnswer> answer) {
    Actions<MeasurementEvent> a;
    {
      absl::MutexLock lock(&mu_);
      in_flight_ = false;
      chunk_op_ = 0;
      if (finished_) return;
      if (!answer.ok()) {
        FailLocked(answer.status(), a);
      } else {
        last_acked_ = static_cast<int64_t>(next_index_);
        last_data_id_ = answer->measurement_data_id;
        auto ev = std::make_shared<MeasurementEvent>();
        v1::ChunkAccepted* acc = ev->mutable_chunk_accepted();
        acc->set_chunk_order(next_index_);
        acc->set_measurement_data_id(answer->measurement_data_id);
        if (answer->chunk_order.has_value()) acc->set_upstream_chunk_order(*answer->chunk_order);
        ++next_index_;
        a.write = outbox_.Push(std::move(ev));
        if (current_is_last_) {
          last_sent_ = true;
          last_upstream_order_ = answer->chunk_order;
          awaiting_final_ = subscribe_ && !current_ignore_;
          MaybeCompleteLocked(a);
        } else if (!half_closed_) {
          a.read = true;
        } else {
          MaybeCompleteLocked(a);
        }
      }
    }
    Run(a);
  }

  // Ends the stream OK when nothing is left to do: after LAST (and its result, when
  // subscribed) or after the caller's half-close with no chunk outstanding.
  void MaybeCompleteLocked(Actions<MeasurementEvent>& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (pending_finish_.has_value() || in_flight_ || held_.has_value()) return;
    if (awaiting_final_) {
      bool got = (last_upstream_order_.has_value() && seen_orders_.contains(*last_upstream_order_)) ||
                 (!last_data_id_.empty() && seen_ids_.contains(last_data_id_)) ||
                 seen_complete_;
      if (!got) return;
      awaiting_final_ = false;
    }
    if (!last_sent_ && !half_closed_) return;
    CompleteLocked(grpc::Status::OK, a);
  }

  // Finishes once queued events are written.
  void CompleteLocked(const grpc::Status& st, Actions<MeasurementEvent>& a)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (pending_finish_.has_value()) return;
    pending_finish_ = st;
    ReleaseUpstreamLocked();
    if (outbox_.idle() && a.write == nullptr) {
      a.finish = st;
      MarkFinishedLocked();
    }
  }

  // Errors end the stream at once, naming the last chunk the upstream acknowledged
  // so the caller knows exactly where it stands.
  void FailLocked(const absl::Status& st, Actions<MeasurementEvent>& a)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::string reason = core::ErrorReason(st);
    if (reason.empty()) reason = absl::StatusCodeToString(st.code());
    std::map<std::string, std::string> md = {
        {"last_acked_chunk_order", absl::StrCat(last_acked_)},
        {"measurement_id", mid_}};
    if (!last_data_id_.empty()) md["last_acked_measurement_data_id"] = last_data_id_;
    absl::Status detailed = core::WithErrorInfo(
        absl::Status(st.code(), absl::StrCat(st.message(), " (last chunk acknowledged upstream: ",
                                             last_acked_ < 0 ? std::string("none")
                                                             : absl::StrCat(last_acked_),
                                             ")")),
        reason, kErrorDomain, md);
    a.write = nullptr;
    a.read = false;
    a.finish = core::ToGrpcStatus(detailed);
    MarkFinishedLocked();
  }

  void FinishWith(const grpc::Status& st) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      MarkFinishedLocked();
    }
    account_.Finishing(st.error_code());
    Finish(st);
  }

  void ReleaseUpstreamLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (lease_.get() == nullptr) return;
    if (chunk_op_ != 0) {
      lease_->Cancel(chunk_op_);
      chunk_op_ = 0;
    }
    if (subscribed_) {
      lease_->Unsubscribe(mid_, sub_id_);
      subscribed_ = false;
    }
  }

  void MarkFinishedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    ReleaseUpstreamLocked();
  }

  void Run(const Actions<MeasurementEvent>& a) {
    if (a.write != nullptr) StartWrite(a.write);
    if (a.read) StartRead(&chunk_);
    if (a.finish.has_value()) {
      account_.Finishing(a.finish->error_code());
      Finish(*a.finish);
    }
  }

  DfxBridge* bridge_;
  grpc::CallbackServerContext* ctx_;
  CallAccount account_;
  std::shared_ptr<MeasurementStream> self_;
  core::ActiveCalls::Id call_id_ = 0;
  v1::MeasurementChunk chunk_;

  absl::Mutex mu_;
  Lease lease_ ABSL_GUARDED_BY(mu_);
  std::string mid_;
  bool subscribe_ = false;
  bool sub_requested_ = false;
  bool subscribed_ = false;  // we hold a subscriber id on the session
  bool sub_active_ = false;
  uint64_t sub_id_ = 0;
  std::optional<ChunkRequest> held_;
  bool in_flight_ = false;
  uint64_t chunk_op_ = 0;
  bool current_is_last_ = false;
  bool current_ignore_ = false;
  uint32_t next_index_ = 0;
  int64_t last_acked_ = -1;
  std::string last_data_id_;
  std::optional<int64_t> last_upstream_order_;
  bool last_sent_ = false;
  bool awaiting_final_ = false;
  bool half_closed_ = false;
  std::set<int64_t> seen_orders_;
  std::set<std::string> seen_ids_;
  bool seen_complete_ = false;
  std::optional<grpc::Status> pending_finish_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  Outbox<MeasurementEvent> outbox_ ABSL_GUARDED_BY(mu_);
};

grpc::ServerBidiReactor<v1::MeasurementChunk, MeasurementEvent>* DfxBridge::StreamMeasurement(
    grpc::CallbackServerContext* ctx) {
  auto r = std::make_shared<MeasurementStream>(this, ctx);
  r->Begin();
  return r.get();
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::Bridge>> NewDfxBridge(DfxBridgeOptions options,
                                                           const core::BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("dfx: upstream url is required");
  if (!options.default_token && !options.allow_call_token) {
    return absl::InvalidArgumentError(
        "dfx: set device_token, or allow_call_token so calls can bring their own");
  }
  if (options.max_sessions == 0) options.max_sessions = 1000;
  if (!context.executor) return absl::InvalidArgumentError("dfx: no executor in the context");
  return std::unique_ptr<core::Bridge>(new DfxBridge(std::move(options), context));
}

}  // namespace wsbridge::dfx
