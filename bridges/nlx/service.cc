// NlxBridge: the wsbridge.nlx.v1.NlxService handlers on the bridge toolkit. Sessions
// (one per conversation), pool, admission, drain and the call state machines are core's;
// what is here is NLX: which keys a call uses, how conversations are found by id, how
// frames become ConverseEvents, and how failures map to statuses and turn_failed events.
#include <algorithm>
#include <map>
#include <memory>
#include <optional>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/grpc_calls.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"
#include "bridges/nlx/codec.h"
#include "bridges/nlx/nlx_bridge.h"
#include "bridges/nlx/protocol.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

namespace wsbridge::nlx {
namespace {

using core::Lease;
using v1::ConverseEvent;

constexpr std::string_view kSendMethod = "/wsbridge.nlx.v1.NlxService/Send";
constexpr std::string_view kConverseMethod = "/wsbridge.nlx.v1.NlxService/Converse";
// Calls requested ahead on each completion queue, per method.
constexpr int kOutstandingSendRequests = 8;
constexpr int kOutstandingConverseRequests = 4;

// Both methods on the completion-queue API (see core/cq_loop.h for why).
using NlxServiceBase =
    v1::NlxService::WithAsyncMethod_Send<v1::NlxService::WithAsyncMethod_Converse<v1::NlxService::Service>>;

// What the pool's session factory needs beyond the id: the pool's factory gets no key,
// and Acquire calls it synchronously on the calling thread, so this travels beside it.
struct SessionSetup {
  std::string pool_key;
  std::string resume_id;  // "" = a new conversation
  std::string tenant;
  KeySources keys;
};
thread_local const SessionSetup* t_setup = nullptr;

// The keys of a call.
struct CallKeys {
  KeySources sources;
  std::string tenant;  // "default", or a hash of the call's keys
};

// Status mapping of what a session reports for a turn.
absl::Status TurnStatus(const absl::Status& st, std::string_view what, core::Duration turn_timeout) {
  if (st.code() == absl::StatusCode::kDeadlineExceeded && core::ErrorReason(st) != "UPSTREAM_TIMEOUT") {
    return core::WithErrorInfo(
        absl::DeadlineExceededError(absl::StrCat(
            "no response from NLX to ", Av(what), " within its deadline (the call's, or turn_timeout ",
            absl::FormatDuration(absl::FromChrono(turn_timeout)),
            "); it may still have run upstream and was not resent: ", st.message())),
        kReasonTurnTimeout, kErrorDomain);
  }
  if (st.code() == absl::StatusCode::kResourceExhausted && core::ErrorReason(st).empty()) {
    return core::WithErrorInfo(
        absl::ResourceExhaustedError(absl::StrCat(
            "too many turns wait on this conversation (max_pending_turns); wait for responses "
            "first: ", st.message())),
        "TOO_MANY_TURNS", kErrorDomain);
  }
  return st;
}

// The fail-fast status (core's UNAVAILABLE saying since when NLX is unreachable) with
// this bridge's ErrorInfo.
absl::Status Unreachable(const absl::Status& st) {
  if (st.ok() || !core::ErrorReason(st).empty()) return st;
  return core::WithErrorInfo(st, "UPSTREAM_UNREACHABLE", kErrorDomain);
}

// A turn lost to a dropped socket quotes how the socket ended (NLX's close code and
// reason, or the network error), so the caller can tell a 1001 from a reset.
absl::Status WithDisconnect(const absl::Status& st, const Conversation& conversation) {
  if (core::ErrorReason(st) != kReasonOutcomeUnknown) return st;
  const std::string why = conversation.last_disconnect();
  if (why.empty()) return st;
  absl::Status out(st.code(), absl::StrCat(st.message(), " (the socket ended: ", why, ")"));
  st.ForEachPayload([&](absl::string_view key, const absl::Cord& value) { out.SetPayload(key, value); });
  return out;
}

ConverseEvent TurnFailedEvent(uint64_t turn, const absl::Status& st) {
  ConverseEvent e;
  v1::TurnFailed* f = e.mutable_turn_failed();
  f->set_turn(turn);
  f->set_code(static_cast<int32_t>(st.code()));
  f->set_reason(core::ErrorReason(st));
  f->set_message(std::string(st.message()));
  if (auto json = st.GetPayload(Av(kUpstreamJsonPayload)); json.has_value()) {
    f->set_upstream_json(std::string(*json));
  }
  return e;
}

class NlxBridge final : public core::BridgeBase, public NlxServiceBase {
 public:
  NlxBridge(NlxBridgeOptions options, core::BridgeContext context)
      : BridgeBase(std::move(context), "NLX", {std::string(v1::NlxService::service_full_name())}),
        options_(std::move(options)),
        registry_(std::make_shared<Registry>()) {
    for (const auto& k : {options_.api_key, options_.deployment_key, options_.channel_key}) {
      if (k != nullptr) refresher_.Watch(k);
    }
    InitPool(
        {.max_sessions = options_.max_conversations,
         .idle_timeout = options_.idle_conversation_timeout},
        [this](const std::string& id, std::shared_ptr<core::SecretSource>, bool pinned) {
          return NewSession(id, pinned);
        },
        core::CredentialPolicy{std::string(kApiKeyMetadata), options_.allow_call_keys}, nullptr);
    set_max_open_calls(options_.max_open_calls);
  }

  std::vector<grpc::Service*> Services() override { return {this}; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<core::CqLoop*>& loops) override;

  const NlxBridgeOptions& options() const { return options_; }
  Registry& registry() { return *registry_; }

  // The keys of a call: each from its x-nlx-* metadata when present (and allowed), else
  // the configured secret.
  absl::StatusOr<CallKeys> KeysFor(const grpc::ServerContextBase& ctx) const {
    const auto& md = ctx.client_metadata();
    struct Part {
      std::string_view metadata;
      std::string_view field;
      const std::shared_ptr<core::SecretSource>* configured;
      std::shared_ptr<core::SecretSource>* out;
      std::string* value;
    };
    CallKeys keys;
    Keys values;
    const Part parts[] = {
        {kApiKeyMetadata, "api_key", &options_.api_key, &keys.sources.api_key, &values.api_key},
        {kDeploymentKeyMetadata, "deployment_key", &options_.deployment_key,
         &keys.sources.deployment_key, &values.deployment_key},
        {kChannelKeyMetadata, "channel_key", &options_.channel_key, &keys.sources.channel_key,
         &values.channel_key}};
    bool per_call = false;
    for (const Part& p : parts) {
      auto it = md.find(grpc::string_ref(p.metadata.data(), p.metadata.size()));
      if (it != md.end()) {
        if (!options_.allow_call_keys) {
          return core::WithErrorInfo(
              absl::UnauthenticatedError(absl::StrCat(
                  "this bridge does not accept per-call keys (\"", Av(p.metadata),
                  "\" metadata); remove it, or set allow_call_keys in the bridge config")),
              kReasonKeysMissing, kErrorDomain);
        }
        *p.value = std::string(it->second.data(), it->second.size());
        *p.out = core::SecretSource::Fixed(*p.value);  // registered for redaction
        per_call = true;
        continue;
      }
      if (*p.configured == nullptr) {
        return core::WithErrorInfo(
            absl::UnauthenticatedError(absl::StrCat(
                "no NLX ", Av(p.field), ": this bridge has none configured; send it in the \"",
                Av(p.metadata), "\" metadata")),
            kReasonKeysMissing, kErrorDomain);
      }
      absl::StatusOr<std::string> v = (*p.configured)->Current();
      if (!v.ok()) {
        return core::WithErrorInfo(
            absl::UnauthenticatedError(absl::StrCat("the configured NLX ", Av(p.field),
                                                    " cannot be read: ", v.status().message())),
            kReasonKeysMissing, kErrorDomain);
      }
      *p.value = *std::move(v);
      *p.out = *p.configured;
    }
    if (absl::Status st = ValidateKeys(values); !st.ok()) return st;
    keys.tenant = per_call ? core::CredentialKey(absl::StrCat(
                                 values.api_key, "\n", values.deployment_key, "\n",
                                 ChannelKeyWithLanguage(values.channel_key, options_.language)))
                           : "default";
    return keys;
  }

  // The conversation's session: a new conversation (`id` empty) or the one resumed.
  // Fails at once while NLX refuses these keys (no reconnect storm), and while a resumed
  // conversation's socket cannot reach NLX (core's fail-fast: UNAVAILABLE saying since
  // when), unless the call sent x-wsbridge-wait-for-ready: true (bounded by
  // max_waiting_calls). A new conversation is never "unreachable" before its one
  // attempt: that attempt is what finds out (and fails the call, see Protocol).
  absl::StatusOr<Lease> AcquireConversation(const grpc::ServerContextBase& ctx, const std::string& id,
                                            const CallKeys& keys,
                                            std::shared_ptr<Conversation>* conversation) {
    const core::Clock::time_point now = core::Clock::now();
    if (absl::Status refused = registry_->Refused(RefusalKey(keys.tenant, keys.sources), now);
        !refused.ok()) {
      return refused;
    }
    if (!id.empty()) {
      // NLX closed this conversation's socket with 1008 (see Protocol::Classify).
      if (absl::Status refused =
              registry_->Refused(ConversationRefusalKey(keys.tenant, keys.sources, id), now);
          !refused.ok()) {
        return refused;
      }
    }
    SessionSetup setup;
    setup.pool_key = id.empty() ? registry_->NewPoolKey() : registry_->PoolKeyFor(keys.tenant, id);
    setup.resume_id = id;
    setup.tenant = keys.tenant;
    setup.keys = keys.sources;
    absl::StatusOr<Lease> lease;
    for (int attempt = 0; attempt < 2; ++attempt) {
      t_setup = &setup;
      lease = pool().Acquire(setup.pool_key, "");
      t_setup = nullptr;
      if (!lease.ok() && lease.status().code() == absl::StatusCode::kUnauthenticated &&
          attempt == 0) {
        // The pool closed this conversation's socket because NLX refused its keys, and
        // remembers that under the pool key whatever the keys are now. NLX's own memory
        // (checked above: the keys, and this conversation, by secret version) says these
        // keys may be tried, e.g. a rotated one: resume on a fresh pool key.
        setup.pool_key = registry_->NewPoolKey();
        if (!id.empty()) registry_->Alias(keys.tenant, id, setup.pool_key);
        continue;
      }
      if (!lease.ok()) break;
      std::shared_ptr<Conversation> c = registry_->Get(setup.pool_key);
      if (c == nullptr || c->open_error().ok()) break;
      // A socket whose first open failed earlier, left by callers that went away: a
      // fresh one tries again.
      const std::string failed = (*lease)->id();
      *lease = Lease();
      (void)pool().Close(failed);
    }
    if (!lease.ok()) {
      if (lease.status().code() == absl::StatusCode::kResourceExhausted) {
        return core::WithErrorInfo(
            absl::ResourceExhaustedError(absl::StrCat(
                "the NLX bridge already holds its maximum of ", options_.max_conversations,
                " conversation sockets (max_conversations); retry later, or raise "
                "max_conversations (sockets close when their Converse ends, or "
                "idle_conversation_timeout after a Send)")),
            "TOO_MANY_CONVERSATIONS", kErrorDomain);
      }
      return lease.status();
    }
    *conversation = registry_->Get(setup.pool_key);
    if (*conversation == nullptr) {
      return absl::UnavailableError("the NLX conversation closed while it was opened; retry");
    }
    if (absl::Status down = WaitOrFailFast(ctx, *lease); !down.ok()) return Unreachable(down);
    return lease;
  }

  // A session failure as the call sees it: a refusal by NLX with the status recorded for
  // the keys (which names what NLX said), a failed first open with its reason.
  absl::Status CallStatus(const absl::Status& st, const CallKeys& keys,
                          const Conversation* conversation) const {
    if (st.code() == absl::StatusCode::kUnauthenticated) {
      absl::Status refused = registry_->Refused(RefusalKey(keys.tenant, keys.sources), core::Clock::now());
      if (!refused.ok()) return refused;
      if (core::ErrorReason(st) == "AUTH_REFUSED") {
        // The session's own refusal (NLX closed the socket with 1008): keys refused, in
        // this bridge's words; the message quotes the close.
        return core::WithErrorInfo(absl::UnauthenticatedError(st.message()), kReasonKeysRefused,
                                   kErrorDomain);
      }
    }
    if (conversation != nullptr) {
      absl::Status open = conversation->open_error();
      if (!open.ok()) return open;
    }
    return st;
  }

  // Closes the conversation's socket when no other call holds it (`lease` is the last
  // call's, about to be released).
  // Returns whether it closed it.
  bool CloseIfUnused(const Lease& lease, const Conversation& conversation, std::string_view why) {
    if (!lease || lease->leases.load() > 1) return false;
    lease->Close(1000, std::string(why), nullptr);
    // Out of the pool, so a resume opens a fresh socket; unless the pool key already holds
    // a newer session (same admin id), which must stay.
    if (registry_->Get(conversation.pool_key()).get() == &conversation) (void)pool().Close(lease->id());
    return true;
  }

  // The upstream request of one turn.
  core::Request TurnRequest(std::shared_ptr<v1::Turn> turn, std::shared_ptr<Conversation> conv,
                            std::string what, core::Clock::time_point deadline) const {
    core::Request r;
    r.what = what;
    r.gated = true;  // one turn in flight per conversation (Protocol's gate)
    r.gate_cost = 1;
    r.on_drop = core::OnDrop::kFailOutcomeUnknown;  // NLX cannot deduplicate a turn
    r.deadline = deadline;
    r.encode = [turn = std::move(turn), conv = std::move(conv),
                language = options_.language](std::string_view) -> absl::StatusOr<core::Outbound> {
      absl::StatusOr<std::string> frame = EncodeTurn(*turn, conv->id(), language);
      if (!frame.ok()) return frame.status();
      return core::Outbound{*std::move(frame), false};
    };
    return r;
  }

  // Validates a turn the way it will be sent (with a placeholder id of the longest size).
  absl::Status CheckTurn(const v1::Turn& turn) const {
    absl::StatusOr<std::string> frame =
        EncodeTurn(turn, std::string(36, 'x'), options_.language);  // a UUID's length
    if (!frame.ok()) return frame.status();
    if (frame->size() > options_.max_turn_bytes) {
      return core::WithErrorInfo(
          absl::InvalidArgumentError(absl::StrCat("the turn encodes to ", frame->size(),
                                                  " bytes; this bridge sends at most ",
                                                  options_.max_turn_bytes,
                                                  " (max_turn_bytes; NLX takes 128 KiB)")),
          "TURN_TOO_LARGE", kErrorDomain);
    }
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<core::UpstreamSession> NewSession(const std::string& id, bool pinned) {
    core::SessionOptions so = BaseSessionOptions(
        id, pinned, options_.connection, kErrorDomain,
        [this](core::ConnectionOptions& c) { c.keepalive.heartbeat_interval = options_.check_interval; });
    so.request_timeout = options_.turn_timeout;
    so.login_timeout = options_.ack_timeout;
    so.max_pending = std::max<uint32_t>(1, options_.max_pending_turns - 1);  // + the one in flight
    SessionSetup fallback;
    const SessionSetup& setup = t_setup != nullptr ? *t_setup : fallback;
    auto conv = std::make_shared<Conversation>(setup.resume_id, setup.pool_key);
    registry_->Put(setup.pool_key, conv);
    ProtocolOptions po;
    po.url = options_.url;
    po.language = options_.language;
    po.headers = options_.headers;
    po.keys = setup.keys;
    po.tenant = setup.tenant;
    po.pool_key = setup.pool_key;
    po.conversation = std::move(conv);
    po.registry = registry_;
    po.ack_timeout = options_.ack_timeout;
    po.auth_retry_after = options_.auth_retry_after;
    return core::UpstreamSession::Create(SessionExecutor(), std::move(so),
                                         std::make_unique<Protocol>(std::move(po)));
  }

  const NlxBridgeOptions options_;
  std::shared_ptr<Registry> registry_;
  core::SecretRefresher refresher_;
};

// ---------------------------------------------------------------------------------
// Send (completion-queue API): one turn, its response, the call's deadline.
class SendCall final : public core::AsyncUnaryCall<SendCall, v1::SendRequest, v1::SendResponse> {
 public:
  SendCall(NlxBridge* bridge, core::CqLoop* loop) : AsyncUnaryCall(bridge, loop, kSendMethod), nlx_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* b = static_cast<NlxBridge*>(bridge);
    auto c = std::make_shared<SendCall>(b, loop);
    Start(c, c->done_tag(), [&] {
      b->RequestSend(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                     c->matched_tag());
    });
  }

  void OnAdmitted() {
    absl::Status st;
    if (!req_.conversation_id().empty()) st = ValidateConversationId(req_.conversation_id());
    if (st.ok() && !req_.has_turn()) {
      st = core::WithErrorInfo(absl::InvalidArgumentError(
                                   "turn is required: the user turn to send (text or structured)"),
                               kReasonInvalidTurn, kErrorDomain);
    }
    if (st.ok()) st = nlx_->CheckTurn(req_.turn());
    if (!st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    absl::StatusOr<CallKeys> keys = nlx_->KeysFor(ctx_);
    if (!keys.ok()) {
      FinishWith(core::ToGrpcStatus(keys.status()));
      return;
    }
    keys_ = *std::move(keys);
    absl::StatusOr<Lease> lease = nlx_->AcquireConversation(ctx_, req_.conversation_id(), keys_, &conv_);
    if (!lease.ok()) {
      FinishWith(core::ToGrpcStatus(lease.status()));
      return;
    }
    lease_ = *std::move(lease);
    std::weak_ptr<SendCall> w = weak_from_this();
    watch_ = conv_->WatchOpen([w](const absl::Status& st) {
      if (auto c = w.lock()) c->Fail(st);
    });
    if (absl::Status open = conv_->open_error(); !open.ok()) {
      FinishWith(core::ToGrpcStatus(open));
      return;
    }
    core::Clock::time_point deadline = core::SteadyDeadline(ctx_);
    if (deadline == core::Clock::time_point::max()) {
      deadline = core::Clock::now() + nlx_->options().turn_timeout;
    }
    auto turn = std::make_shared<v1::Turn>(std::move(*req_.mutable_turn()));
    upstream_op_ = lease_->Send(
        nlx_->TurnRequest(std::move(turn), conv_, "the turn", deadline),
        [c = shared_from_this()](absl::StatusOr<core::Reply> reply) {
          if (!reply.ok()) {
            c->Fail(reply.status());
            return;
          }
          const Frame& f = static_cast<const FramePayload&>(*reply->payload).frame;
          v1::ConversationResponse response = f.response;
          response.set_turn(1);
          std::string id = c->conv_->id();
          c->Respond([&response, &id](SendCall& call) {
            call.Done();
            call.resp_.set_conversation_id(std::move(id));
            *call.resp_.mutable_response() = std::move(response);
            return grpc::Status::OK;
          });
        });
  }

 private:
  // From the strand (or a watcher): the turn failed. Answered on the loop thread (OnLoop),
  // not here: it may close the conversation's session, whose strand this may be.
  void Fail(const absl::Status& st) {
    absl::Status mapped = nlx_->CallStatus(
        WithDisconnect(TurnStatus(st, "the turn", nlx_->options().turn_timeout), *conv_), keys_,
        conv_.get());
    OnLoop([mapped](SendCall& call) {
      if (!call.conv_->open_error().ok()) {
        call.nlx_->CloseIfUnused(call.lease_, *call.conv_, "the conversation could not be opened");
      }
      call.Done();
      call.FinishWith(core::ToGrpcStatus(mapped));
    });
  }
  // The turn ended: the socket is let go before the caller hears of it, so a call the
  // caller makes next (e.g. a Converse that then ends) sees no other holder.
  void Done() {
    if (watch_ != 0) conv_->Unwatch(watch_);
    watch_ = 0;
    lease_.Release();
  }

  NlxBridge* nlx_;
  CallKeys keys_;
  std::shared_ptr<Conversation> conv_;
  uint64_t watch_ = 0;
};

// ---------------------------------------------------------------------------------
// Converse (completion-queue API, bidi): the first message opens or resumes; turns in,
// events out, in order; half-close ends it after the last response, cancel at once.
// Messages are read on its CqLoop thread; turn answers, conversation events and the
// session's news are handled on the session strand under the stream's lock
// (core::AsyncBidiStream::Locked), which writes the event and resumes a paused read
// right there. Every member below is touched under that lock only.
class ConverseStream final
    : public core::AsyncBidiStream<ConverseStream, v1::ConverseRequest, ConverseEvent>,
      public core::EventSink {
 public:
  friend AsyncBidiStream;  // calls the hooks
  ConverseStream(NlxBridge* bridge, core::CqLoop* loop)
      : AsyncBidiStream(bridge, loop, kConverseMethod), nlx_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* b = static_cast<NlxBridge*>(bridge);
    auto s = std::make_shared<ConverseStream>(b, loop);
    Start(s, s->done_tag(), [&] {
      b->RequestConverse(&s->ctx_, &s->stream_, loop->cq(), loop->cq(), s->matched_tag());
    });
  }

  // core::EventSink (session strand).
  void OnSubscribed(const core::SubscribedInfo& info) override {
    Locked([&](ConverseStream& s) { s.Subscribed(info); });
  }
  void OnEvent(const core::PayloadPtr& event, bool /*after_gap*/) override {
    const Frame& f = static_cast<const FramePayload&>(*event).frame;
    ConverseEvent e;
    if (f.kind == FrameKind::kResponse) {
      *e.mutable_response() = f.response;  // turn 0: unsolicited
    } else {
      e.mutable_unknown()->set_json(f.json());
    }
    Locked([&](ConverseStream& s) { s.PushEvent(std::move(e)); });
  }
  void OnEnded(const absl::Status& status) override {
    Locked([&](ConverseStream& s) { s.Ended(status); });
  }

 private:
  // --- core::AsyncBidiStream hooks (under its lock). ---
  absl::Status Accept() {
    const bool first = conv_ == nullptr;
    ++received_;
    if (first) {
      if (!read_.conversation_id().empty()) {
        if (absl::Status st = ValidateConversationId(read_.conversation_id()); !st.ok()) {
          return absl::Status(st.code(), absl::StrCat("the first message: ", st.message()));
        }
      }
      if (read_.has_turn()) {
        if (absl::Status st = nlx_->CheckTurn(read_.turn()); !st.ok()) {
          return absl::Status(st.code(), absl::StrCat("the first message's turn: ", st.message()));
        }
      }
      absl::StatusOr<CallKeys> keys = nlx_->KeysFor(ctx_);
      if (!keys.ok()) return keys.status();
      keys_ = *std::move(keys);
      std::shared_ptr<Conversation> conv;
      absl::StatusOr<Lease> lease = nlx_->AcquireConversation(ctx_, read_.conversation_id(), keys_, &conv);
      if (!lease.ok()) return lease.status();
      lease_ = *std::move(lease);
      conv_ = std::move(conv);
      resumed_ = !read_.conversation_id().empty();
      asked_ = read_.conversation_id();
      waits_ = core::CallerAsksToWait(ctx_);
      std::weak_ptr<ConverseStream> w = weak_from_this();
      watch_ = conv_->WatchOpen([w](const absl::Status& st) {
        // The first open failed: the stream ends with why (Release closes the socket).
        if (auto s = w.lock()) s->Locked([&](ConverseStream& c) { c.Fail(st); });
      });
      if (absl::Status open = conv_->open_error(); !open.ok()) return open;
      subscribed_ = true;
      sink_id_ = lease_->Subscribe(std::string(kConversationRoute), nullptr, shared_from_this());
      if (!read_.has_turn()) return absl::OkStatus();  // open or resume only
    } else {
      const std::string& id = read_.conversation_id();
      if (!id.empty() && id != asked_ && id != conv_->id()) {
        return core::WithErrorInfo(
            absl::InvalidArgumentError(absl::StrCat(
                "message ", received_, ": conversation_id \"", id, "\" differs from this stream's "
                "conversation \"", conv_->id(), "\" (one stream talks to one conversation; open another)")),
            "CONVERSATION_MISMATCH", kErrorDomain);
      }
    }
    const uint64_t n = ++turns_;
    absl::Status st = read_.has_turn()
                          ? nlx_->CheckTurn(read_.turn())
                          : core::WithErrorInfo(absl::InvalidArgumentError(absl::StrCat(
                                                    "message ", received_,
                                                    ": turn is required on every message after the first")),
                                                kReasonInvalidTurn, kErrorDomain);
    if (st.ok() && !waits_) {
      // NLX has been unreachable since an attempt failed (not just one drop): the turn
      // fails fast rather than wait out turn_timeout; resend it after `reconnected`. A
      // stream opened with x-wsbridge-wait-for-ready: true queues it instead.
      st = Unreachable(lease_->Unreachable());
    }
    if (!st.ok()) {
      PushEvent(TurnFailedEvent(n, st));  // the bridge refused it; the stream goes on
      return absl::OkStatus();
    }
    auto turn = std::make_shared<v1::Turn>(std::move(*read_.mutable_turn()));
    std::weak_ptr<ConverseStream> w = weak_from_this();
    // Converse turns always use turn_timeout (a stream's deadline bounds the whole call).
    const uint64_t op = lease_->Send(
        nlx_->TurnRequest(std::move(turn), conv_, absl::StrCat("turn ", n),
                          core::Clock::now() + nlx_->options().turn_timeout),
        [w, n, conv = conv_](absl::StatusOr<core::Reply> reply) {
          auto s = w.lock();
          if (s == nullptr) return;
          ConverseEvent e;
          if (reply.ok()) {
            *e.mutable_response() = static_cast<const FramePayload&>(*reply->payload).frame.response;
            e.mutable_response()->set_turn(n);
          } else {
            absl::Status st = WithDisconnect(
                TurnStatus(reply.status(), absl::StrCat("turn ", n), s->nlx_->options().turn_timeout),
                *conv);
            if (st.code() == absl::StatusCode::kUnauthenticated) {
              // Keys refused: the conversation is unusable.
              s->Locked([&](ConverseStream& c) { c.Fail(st); });
              return;
            }
            e = TurnFailedEvent(n, st);
          }
          s->Locked([&](ConverseStream& c) { c.TurnEnded(std::move(e), n); });
        });
    open_[op] = n;
    ops_by_turn_[n] = op;
    return absl::OkStatus();
  }

  // Reads the next message only while the conversation has room for another turn.
  void ReadMore() {
    if (open_.size() < nlx_->options().max_pending_turns) {
      StartRead();
    } else {
      read_paused_ = true;
    }
  }

  // Ends OK once the caller half-closed and every turn was answered or failed (after
  // `opened`, when the call opened a conversation at all).
  void MaybeComplete() {
    if (finishing() || !half_closed_ || !open_.empty()) return;
    if (conv_ != nullptr && !opened_) return;
    Complete(grpc::Status::OK);
  }

  void Fail(const absl::Status& st) {
    FinishWith(core::ToGrpcStatus(nlx_->CallStatus(st, keys_, conv_.get())));
  }

  // Drops unsent turns, leaves the conversation's sinks, and closes its socket when no
  // other call holds it. Core calls it when the stream completes or fails and again when
  // the call is done (another call may have let go of the socket by then). The socket is
  // closed at most once: after that a resume may have opened a new one under the same
  // pool key (and admin id).
  void Release() {
    if (!lease_ || closed_) return;
    if (released_) {
      closed_ = nlx_->CloseIfUnused(lease_, *conv_, "the Converse call ended");
      return;
    }
    released_ = true;
    for (const auto& [op, turn] : open_) lease_->Cancel(op);
    open_.clear();
    if (watch_ != 0) conv_->Unwatch(watch_);
    watch_ = 0;
    if (subscribed_) {
      lease_->Unsubscribe(std::string(kConversationRoute), sink_id_);
      subscribed_ = false;
    }
    closed_ = nlx_->CloseIfUnused(lease_, *conv_, "the Converse call ended");
  }

  // --- Session news, on the strand under the lock. ---
  void Subscribed(const core::SubscribedInfo& info) {
    if (finishing()) return;
    ConverseEvent e;
    if (!opened_) {
      opened_ = true;
      e.mutable_opened()->set_conversation_id(conv_->id());
      e.mutable_opened()->set_resumed(resumed_);
      if (watch_ != 0) conv_->Unwatch(watch_);
      watch_ = 0;
    } else if (info.restored) {
      e.mutable_reconnected()->set_attempt(++reconnects_);
      e.mutable_reconnected()->set_conversation_id(conv_->id());
    } else {
      return;
    }
    PushEvent(std::move(e));
    MaybeComplete();
  }

  void Ended(const absl::Status& status) {
    subscribed_ = false;
    if (finishing()) return;
    Fail(status);
  }

  // Turn `n` ended with `e`.
  void TurnEnded(ConverseEvent e, uint64_t n) {
    if (auto it = ops_by_turn_.find(n); it != ops_by_turn_.end()) {
      open_.erase(it->second);
      ops_by_turn_.erase(it);
    }
    PushEvent(std::move(e));
    if (!finishing() && read_paused_ && !half_closed_ && open_.size() < nlx_->options().max_pending_turns) {
      read_paused_ = false;
      StartRead();
    }
    MaybeComplete();
  }

  // Queues `e` unless the stream is ending; a caller `stream_queue` events behind ends
  // it (SLOW_CONSUMER).
  void PushEvent(ConverseEvent e) {
    if (finishing()) return;
    if (queued() >= nlx_->options().stream_queue) {
      Fail(core::SlowConsumer(nlx_->options().stream_queue, "events", kErrorDomain));
      return;
    }
    Push(std::move(e));
  }

  NlxBridge* nlx_;
  CallKeys keys_;
  std::shared_ptr<Conversation> conv_;
  std::string asked_;
  bool resumed_ = false;
  bool waits_ = false;  // x-wsbridge-wait-for-ready: true
  bool opened_ = false;
  uint32_t reconnects_ = 0;
  uint64_t received_ = 0;
  uint64_t turns_ = 0;
  bool released_ = false;  // turns dropped, sink left
  bool closed_ = false;    // the socket was closed
  bool read_paused_ = false;
  bool subscribed_ = false;
  uint64_t sink_id_ = 0;
  uint64_t watch_ = 0;
  // Turns not yet answered: request id -> turn number, and back.
  std::map<uint64_t, uint64_t> open_;
  std::map<uint64_t, uint64_t> ops_by_turn_;
};

void NlxBridge::ServeAsync(const std::vector<core::CqLoop*>& loops) {
  for (core::CqLoop* loop : loops) {
    for (int i = 0; i < kOutstandingSendRequests; ++i) SendCall::Request(this, loop);
    for (int i = 0; i < kOutstandingConverseRequests; ++i) ConverseStream::Request(this, loop);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::Bridge>> NewNlxBridge(NlxBridgeOptions options,
                                                           const core::BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("nlx: upstream url is required");
  if ((options.api_key == nullptr || options.deployment_key == nullptr ||
       options.channel_key == nullptr) &&
      !options.allow_call_keys) {
    return absl::InvalidArgumentError(
        "nlx: set api_key, deployment_key and channel_key, or allow_call_keys so calls can bring "
        "the missing ones in x-nlx-* metadata");
  }
  if (!context.executor) return absl::InvalidArgumentError("nlx: no executor in the context");
  return std::unique_ptr<core::Bridge>(new NlxBridge(std::move(options), context));
}

}  // namespace wsbridge::nlx
