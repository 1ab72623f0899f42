// EmoggBridge: the wsbridge.emogg.v1.EmoggService handlers on the bridge toolkit.
// Sessions, pool, admission, drain and the call state machines are core's; what is here
// is Emogg: which frame each RPC sends, how answers and closes map to statuses, and the
// shared channel streams (subscribed, events, gaps, replays).
#include <algorithm>
#include <map>
#include <memory>
#include <optional>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/grpc_calls.h"
#include "bridges/core/status.h"
#include "bridges/emogg/codec.h"
#include "bridges/emogg/emogg_bridge.h"
#include "bridges/emogg/protocol.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::emogg {
namespace {

using core::Lease;
using UpdatePtr = std::shared_ptr<const v1::SubscriptionUpdate>;

constexpr std::string_view kRequestMethod = "/wsbridge.emogg.v1.EmoggService/Request";
constexpr std::string_view kSubscribeMethod = "/wsbridge.emogg.v1.EmoggService/Subscribe";

using EmoggServiceBase = v1::EmoggService::WithAsyncMethod_Request<
    v1::EmoggService::WithAsyncMethod_Subscribe<v1::EmoggService::Service>>;

// Calls requested ahead on each completion queue, per method.
constexpr int kOutstandingRequests = 16;
constexpr int kOutstandingSubscribes = 8;
// SubscribeResponse limits (documented in emogg.proto).
constexpr int kMaxUpdatesPerMessage = 64;
constexpr size_t kMaxBatchBytes = 1 << 20;

void ToTimestamp(std::chrono::system_clock::time_point t, google::protobuf::Timestamp* ts) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  int64_t secs = ns / 1000000000;
  int64_t rem = ns % 1000000000;
  if (rem < 0) {
    rem += 1000000000;
    --secs;
  }
  ts->set_seconds(secs);
  ts->set_nanos(static_cast<int32_t>(rem));
}

class EmoggBridge final : public core::BridgeBase, public EmoggServiceBase {
 public:
  EmoggBridge(EmoggBridgeOptions options, core::BridgeContext context)
      : BridgeBase(std::move(context), "Emogg", {std::string(v1::EmoggService::service_full_name())}),
        options_(std::move(options)) {
    InitPool(
        {.max_sessions = options_.max_sessions, .idle_timeout = options_.idle_session_timeout},
        [this](const std::string& id, std::shared_ptr<core::SecretSource> token, bool pinned) {
          return NewSession(id, std::move(token), pinned);
        },
        core::CredentialPolicy{std::string(kTokenMetadataKey), options_.allow_call_token},
        options_.default_token);
    set_max_open_calls(options_.max_open_calls);
  }

  std::vector<grpc::Service*> Services() override { return {this}; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<core::CqLoop*>& loops) override;

  const EmoggBridgeOptions& options() const { return options_; }

  // The notes of the session with this id (a fresh, empty one when it is gone).
  std::shared_ptr<SessionNotes> Notes(const std::string& session_id) {
    absl::MutexLock lock(&mu_);
    auto it = notes_.find(session_id);
    if (it != notes_.end()) {
      if (auto n = it->second.lock()) return n;
    }
    return std::make_shared<SessionNotes>();
  }

 private:
  std::shared_ptr<core::UpstreamSession> NewSession(const std::string& id,
                                                    std::shared_ptr<core::SecretSource> token,
                                                    bool pinned) {
    core::SessionOptions so = BaseSessionOptions(
        id, pinned, options_.connection, kErrorDomain, [this](core::ConnectionOptions& c) {
          // The protocol's heartbeat check runs on this tick (ping after silence, answer
          // deadline); WebSocket pings from upstream.keepalive run as well.
          c.keepalive.heartbeat_interval =
              HeartbeatTick(options_.heartbeat_interval, options_.heartbeat_timeout);
          // After a 429 close: at least one upstream window. After a refused token:
          // retries no more often than auth_retry_pause (the protocol also refuses
          // earlier attempts).
          c.slow_down_delay = options_.retry_after_429;
          // A refused token is tried again once per auth_retry_pause (the jittered delay,
          // then the protocol holds attempts until the pause since the refusal has passed).
          c.auth_backoff = {options_.auth_retry_pause, options_.auth_retry_pause, 1.0};
        });
    so.request_timeout = options_.request_timeout;
    so.login_timeout = options_.auth_timeout;
    so.subscribe_timeout = options_.subscribe_timeout;
    so.max_pending = options_.max_pending_requests;

    auto notes = std::make_shared<SessionNotes>();
    {
      absl::MutexLock lock(&mu_);
      for (auto it = notes_.begin(); it != notes_.end();) {
        it = it->second.expired() ? notes_.erase(it) : std::next(it);
      }
      notes_[id] = notes;
    }
    ProtocolOptions po;
    po.url = options_.url;
    po.headers = options_.headers;
    po.token = std::move(token);
    po.notes = std::move(notes);
    po.heartbeat_interval = options_.heartbeat_interval;
    po.heartbeat_timeout = options_.heartbeat_timeout;
    po.rate_limit = options_.rate_limit;
    po.limits = options_.limits;
    po.retry_after_429 = options_.retry_after_429;
    po.auth_retry_pause = options_.auth_retry_pause;
    return core::UpstreamSession::Create(SessionExecutor(), std::move(so),
                                         std::make_unique<Protocol>(std::move(po)));
  }

  EmoggBridgeOptions options_;
  absl::Mutex mu_;
  // Held by each session's protocol; weak here so a closed session's notes go with it.
  std::map<std::string, std::weak_ptr<SessionNotes>> notes_ ABSL_GUARDED_BY(mu_);
};

// The final status of a request or stream: what the session reports, with what Emogg
// specifics add (on the session strand, where the notes are current).
//  - OUTCOME_UNKNOWN: which path, and the closing status that cut it off, if any.
//  - A refused token (401) is TOKEN_REFUSED, however the session learnt it.
//  - A request that never left because the client-side rate limit had no room before
//    its deadline is RESOURCE_EXHAUSTED CLIENT_RATE_LIMITED (and was never sent).
absl::Status Finalize(const absl::Status& st, std::string_view path, bool sent,
                      const SessionNotes& notes) {
  if (st.ok()) return st;
  const std::string reason = core::ErrorReason(st);
  if (reason == "OUTCOME_UNKNOWN") {
    std::map<std::string, std::string> md;
    if (!path.empty()) md["path"] = std::string(path);
    std::string message(st.message());
    if (std::optional<SessionNotes::Closing> c = notes.closing(); c.has_value()) {
      md["close_status"] = absl::StrCat(c->status);
      absl::StrAppend(&message, " (Emogg closed the connection after answering \"", c->path,
                      "\" with status ", c->status, ")");
    } else if (const int code = notes.close_code(); code != 0) {
      absl::StrAppend(&message, " (Emogg closed the connection with code ", code, ")");
    }
    if (const int code = notes.close_code(); code != 0) md["close_code"] = absl::StrCat(code);
    return core::WithErrorInfo(absl::Status(st.code(), message), "OUTCOME_UNKNOWN", kErrorDomain, md);
  }
  if (st.code() == absl::StatusCode::kUnauthenticated && reason == "AUTH_REFUSED") {
    return core::WithErrorInfo(absl::Status(st.code(), st.message()), "TOKEN_REFUSED", kErrorDomain);
  }
  if (st.code() == absl::StatusCode::kDeadlineExceeded && !sent && !path.empty() &&
      notes.rate_limited()) {
    return core::WithErrorInfo(
        absl::ResourceExhaustedError(absl::StrCat(
            "the request to \"", Av(path),
            "\" was not sent: the client-side rate limit (rate_limit.max_messages per "
            "rate_limit.window, kept under Emogg's own) had no room for it before the call's "
            "deadline; it was never sent, so retry later or with a longer deadline")),
        "CLIENT_RATE_LIMITED", kErrorDomain, {{"path", std::string(path)}});
  }
  return st;
}

// After Emogg answered 429 the session connects again only after retry_after_429 (60 s):
// the upstream is as good as down for that long, so requests fail fast (UNAVAILABLE,
// saying since and until when) as they do while it is unreachable, unless their caller
// asked to wait (they then queue, bounded by max_pending_requests and their deadline).
// Subscriptions are not refused: they stay open and are restored with a gap.
absl::Status FailFastWhilePaused(const SessionNotes& notes, const grpc::ServerContextBase& ctx) {
  std::optional<SessionNotes::Pause> p = notes.pause();
  const auto now = std::chrono::system_clock::now();
  if (!p.has_value() || now >= p->until || core::CallerAsksToWait(ctx)) return absl::OkStatus();
  auto utc = [](std::chrono::system_clock::time_point t) {
    return absl::FormatTime("%H:%M:%SZ", absl::FromChrono(t), absl::UTCTimeZone());
  };
  const int64_t left = std::chrono::ceil<std::chrono::seconds>(p->until - now).count();
  return core::WithErrorInfo(
      absl::UnavailableError(absl::StrCat(
          "Emogg answered 429 (too many requests)",
          p->path.empty() ? std::string() : absl::StrCat(" to \"", Av(p->path), "\""), " at ",
          utc(p->since), "; the bridge does not connect again before ", utc(p->until), " (", left,
          " s, rate_limit.retry_after_429). Retry then, or send \"",
          Av(core::kWaitForReadyMetadata), ": true\" metadata to wait")),
      "UPSTREAM_RATE_LIMITED", kErrorDomain,
      {{"retry_at", utc(p->until)}});
}

// The session's deadline for a caller's request: a little before the caller's own, so
// that a request the rate limiter held back is answered CLIENT_RATE_LIMITED (it was never
// sent) while the caller still listens, rather than ending in the caller's own
// DEADLINE_EXCEEDED that says nothing about it.
core::Clock::time_point AnswerBy(core::Clock::time_point deadline) {
  if (deadline == core::Clock::time_point::max()) return deadline;
  const core::Clock::time_point now = core::Clock::now();
  if (deadline <= now) return deadline;
  const core::Duration margin =
      std::min<core::Duration>(std::chrono::milliseconds(200), (deadline - now) / 10);
  return deadline - margin;
}

absl::Status ValidateRequest(const v1::RequestRequest& req) {
  if (absl::Status st = ValidatePath(req.path()); !st.ok()) return st;
  if (IsReservedPath(req.path())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "path \"", req.path(), "\" is managed by the bridge: ",
        req.path() == kPathAuth
            ? "it authenticates every connection with the configured or x-emogg-token token"
            : "channel subscriptions go through Subscribe, so they are shared and restored"));
  }
  return ValidateRequestBody(req.json_body());
}

// ---------------------------------------------------------------------------------
// Request on the completion-queue API: matched, admitted and sent on its CqLoop thread;
// the session's strand posts the answer back to that thread.
class AsyncRequest final
    : public core::AsyncUnaryCall<AsyncRequest, v1::RequestRequest, v1::RequestResponse> {
 public:
  AsyncRequest(EmoggBridge* bridge, core::CqLoop* loop) : AsyncUnaryCall(bridge, loop, kRequestMethod) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* emogg = static_cast<EmoggBridge*>(bridge);
    auto c = std::make_shared<AsyncRequest>(emogg, loop);
    Start(c, c->done_tag(), [&] {
      emogg->RequestRequest(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                            c->matched_tag());
    });
  }

  void OnAdmitted() {
    if (absl::Status st = ValidateRequest(req_); !st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    auto* emogg = static_cast<EmoggBridge*>(bridge_);
    std::shared_ptr<SessionNotes> notes = emogg->Notes(lease_->id());
    if (absl::Status st = FailFastWhilePaused(*notes, ctx_); !st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    auto sent = std::make_shared<bool>(false);  // strand only: encode and done run there
    core::Request r;
    r.what = absl::StrCat("the request to \"", req_.path(), "\"");
    r.deadline = AnswerBy(core::SteadyDeadline(ctx_));
    r.gated = emogg->options().rate_limit;
    r.gate_cost = 1;
    r.encode = [path = req_.path(), body = std::move(*req_.mutable_json_body()),
                sent](std::string_view route) -> absl::StatusOr<core::Outbound> {
      *sent = true;
      return core::Outbound{EncodeRequest(route, path, body), false};
    };
    upstream_op_ = lease_->Send(
        std::move(r), [c = shared_from_this(), notes = std::move(notes), sent,
                       path = req_.path()](absl::StatusOr<core::Reply> answer) mutable {
          absl::Status st = answer.ok() ? absl::OkStatus() : Finalize(answer.status(), path, *sent, *notes);
          c->Respond([&st, &answer](AsyncRequest& call) {
            if (!st.ok()) return core::ToGrpcStatus(st);
            if (answer->payload == nullptr) {
              return core::ToGrpcStatus(absl::InternalError("Emogg's answer had no payload"));
            }
            const auto& a = static_cast<const Answer&>(*answer->payload);
            call.resp_.set_status(static_cast<uint32_t>(a.status));
            call.resp_.set_json_body(a.body);
            call.resp_.set_path(a.path);
            return grpc::Status::OK;
          });
        });
  }
};

// ---------------------------------------------------------------------------------
// Subscribe on the completion-queue API: the session's strand pushes updates (one
// shared, built-once event per subscriber); core's AsyncServerStream batches and writes
// them on the loop thread, bounded per stream (SLOW_CONSUMER).
class AsyncSubscribeStream final
    : public core::AsyncServerStream<AsyncSubscribeStream, v1::SubscribeRequest,
                                     v1::SubscribeResponse, UpdatePtr>,
      public core::EventSink {
 public:
  AsyncSubscribeStream(EmoggBridge* bridge, core::CqLoop* loop)
      : AsyncServerStream(bridge, loop, kSubscribeMethod, bridge->options().subscriber_queue,
                          "updates", kErrorDomain) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* emogg = static_cast<EmoggBridge*>(bridge);
    auto s = std::make_shared<AsyncSubscribeStream>(emogg, loop);
    Start(s, s->done_tag(), [&] {
      emogg->RequestSubscribe(&s->ctx_, &s->req_, &s->writer_, loop->cq(), loop->cq(),
                              s->matched_tag());
    });
  }

  static bool Append(v1::SubscribeResponse* m, const UpdatePtr& u, size_t* bytes) {
    if (m->updates_size() >= kMaxUpdatesPerMessage) return false;
    const size_t size = u->has_event() ? u->event().json_data().size() + 64 : 64;
    if (m->updates_size() > 0 && *bytes + size > kMaxBatchBytes) return false;
    *bytes += size;
    *m->add_updates() = *u;
    return true;
  }

  void OnAdmitted() {
    absl::Status st = ValidateChannel(req_.channel());
    if (st.ok()) st = ValidateKey(req_.key());
    if (!st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    auto* emogg = static_cast<EmoggBridge*>(bridge_);
    notes_ = emogg->Notes(lease_->id());
    key_ = SubscriptionKey(req_.channel(), req_.key());
    subscription_id_ = SubscriptionIdFor(lease_->id(), req_.channel(), req_.key());
    const uint32_t max = emogg->options().max_subscriptions_per_session;
    if (!notes_->AddSubscriber(key_, max)) {
      FinishWith(core::ToGrpcStatus(core::WithErrorInfo(
          absl::ResourceExhaustedError(absl::StrCat(
              "this Emogg session already holds ", max,
              " channel subscriptions (max_subscriptions_per_session; Emogg allows 5 per "
              "connection); leave one, or share one by subscribing to the same channel and key")),
          "TOO_MANY_SUBSCRIPTIONS", kErrorDomain)));
      return;
    }
    counted_ = true;
    auto params = std::make_shared<ChannelParams>();
    params->channel = req_.channel();
    params->key = req_.key();
    params->subscription_id = subscription_id_;
    sink_id_ = lease_->Subscribe(key_, std::move(params), shared_from_this());
  }

  // Stops routing events here: the last subscriber leaving releases the upstream one.
  void Release() {
    if (sink_id_ != 0 && lease_) lease_->Unsubscribe(key_, sink_id_);
    if (counted_) notes_->RemoveSubscriber(key_);
    counted_ = false;
  }

  // --- core::EventSink (session strand). ---
  void OnSubscribed(const core::SubscribedInfo& info) override {
    if (!activated_) {
      activated_ = true;
      auto u = std::make_shared<v1::SubscriptionUpdate>();
      v1::Subscribed* s = u->mutable_subscribed();
      s->set_subscription_id(subscription_id_);
      s->set_channel(req_.channel());
      s->set_key(req_.key());
      Push(std::move(u));
      Activated();
      // A late joiner of a channel that sends its last state on subscribe gets the last
      // event the shared subscription saw, as its own subscription would have.
      if (!info.restored && ReplaysLastEventOnSubscribe(req_.channel())) {
        if (UpdatePtr last = notes_->last_event(key_); last != nullptr) {
          auto copy = std::make_shared<v1::SubscriptionUpdate>(*last);
          copy->mutable_event()->set_replayed(true);
          Push(std::move(copy));
        }
      }
    }
    if (info.restored) {
      auto u = std::make_shared<v1::SubscriptionUpdate>();
      v1::Gap* g = u->mutable_gap();
      g->set_subscription_id(subscription_id_);
      ToTimestamp(info.gap_from, g->mutable_from());
      ToTimestamp(info.gap_to, g->mutable_to());
      g->set_last_event_timestamp_raw(last_timestamp_raw_);
      g->set_reason(notes_->loss_reason());
      Push(std::move(u));
    }
  }
  void OnEvent(const core::PayloadPtr& event, bool /*after_gap*/) override {
    const auto& e = static_cast<const ChannelEvent&>(*event);
    last_timestamp_raw_ = e.update->event().timestamp_raw();
    Push(e.update);
  }
  // Events that arrived before the end reach the caller first.
  void OnEnded(const absl::Status& status) override {
    EndAfterQueued(Finalize(status, "", false, *notes_));
  }

 private:
  std::shared_ptr<SessionNotes> notes_;
  std::string key_;
  std::string subscription_id_;
  uint64_t sink_id_ = 0;
  bool counted_ = false;
  // Session strand only.
  bool activated_ = false;
  std::string last_timestamp_raw_;
};

void EmoggBridge::ServeAsync(const std::vector<core::CqLoop*>& loops) {
  for (core::CqLoop* loop : loops) {
    for (int i = 0; i < kOutstandingSubscribes; ++i) AsyncSubscribeStream::Request(this, loop);
    for (int i = 0; i < kOutstandingRequests; ++i) AsyncRequest::Request(this, loop);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::Bridge>> NewEmoggBridge(EmoggBridgeOptions options,
                                                             const core::BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("emogg: upstream url is required");
  if (options.default_token == nullptr && !options.allow_call_token) {
    return absl::InvalidArgumentError(
        "emogg: set token, or allow_call_token so calls can bring their own (x-emogg-token)");
  }
  if (!context.executor) return absl::InvalidArgumentError("emogg: no executor in the context");
  return std::unique_ptr<core::Bridge>(new EmoggBridge(std::move(options), context));
}

}  // namespace wsbridge::emogg
