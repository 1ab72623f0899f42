// NexoraBridge: the wsbridge.nexora.v1.NexoraService handlers on the bridge toolkit.
// Sessions (one per chat and credential), pool, admission, drain and the call state
// machines are core's; what is here is Nexora: which frame each RPC sends, how events
// become ChatEvents, resend bookkeeping, and the HTTP endpoints (login, create chat).
#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <optional>

#include <grpcpp/grpcpp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/grpc_calls.h"
#include "bridges/core/http_client.h"
#include "bridges/core/log.h"
#include "bridges/core/rng.h"
#include "bridges/core/status.h"
#include "bridges/nexora/codec.h"
#include "bridges/nexora/nexora_bridge.h"
#include "bridges/nexora/protocol.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"

namespace wsbridge::nexora {
namespace {

using core::Lease;
using v1::ChatEvent;

constexpr std::string_view kSendMessageMethod = "/wsbridge.nexora.v1.NexoraService/SendMessage";
constexpr std::string_view kChatMethod = "/wsbridge.nexora.v1.NexoraService/Chat";
constexpr std::string_view kCreateChatMethod = "/wsbridge.nexora.v1.NexoraService/CreateChat";
constexpr size_t kMaxAgentIdSize = 128;
// Calls requested ahead on each completion queue, per async method.
constexpr int kOutstandingSendRequests = 8;
constexpr int kOutstandingCreateRequests = 2;
constexpr int kOutstandingChatRequests = 4;

// Every method on the completion-queue API: a callback-API method would make gRPC start
// its own poller threads, which then take turns reading every connection of the server.
using NexoraServiceBase = v1::NexoraService::WithAsyncMethod_SendMessage<
    v1::NexoraService::WithAsyncMethod_CreateChat<
        v1::NexoraService::WithAsyncMethod_Chat<v1::NexoraService::Service>>>;

// The chat a pool Acquire on this thread is for. The pool's session factory gets the
// session's admin id and credential but not its key; Acquire calls the factory
// synchronously on the calling thread, so the chat travels beside it.
thread_local const std::string* t_acquiring_chat = nullptr;

// The credential of a call: a per-call token, or the bridge's configured one.
struct CallCredential {
  std::string token;  // "" = the configured credential
  std::string key;    // pool key part: a hash of the token, or "default"
};

// One message's state, shared by its request (on the session strand) and its call.
struct MessageState {
  std::string cmid;
  bool generated = false;
  std::string message_id;          // strand: Nexora's id of the answer, once known
  int attempts = 0;                // strand: sends so far
  std::atomic<bool> sent{false};   // the frame left at least once
  std::atomic<bool> ended{false};  // its call was told the outcome (reply or ChatLink)
  std::atomic<uint64_t> op{0};     // the session's request id (0 until Send returned)
  uint64_t waiter = 0;             // its ChatLink registration (set before Send)
};

// What a message learns when no socket can be opened for it: `st` as it is for a
// message never sent; for one sent before its socket dropped, the outcome is unknown.
absl::Status NotReopened(const MessageState& m, const absl::Status& st) {
  if (!m.sent.load()) return st;
  return core::WithErrorInfo(
      absl::UnavailableError(absl::StrCat(
          "the message ", m.cmid, " was sent, then its socket dropped and could not be opened "
          "again (", st.message(), "); whether it was answered is unknown: send it again with "
          "the same client_message_id to get the answer or a duplicate")),
      "OUTCOME_UNKNOWN", kErrorDomain);
}

// Validates what both message RPCs carry; generates the client_message_id when empty.
absl::Status ValidateMessage(const std::string& content, const std::string& cmid,
                             uint32_t max_content_bytes) {
  if (content.empty()) {
    return absl::InvalidArgumentError("content is required: the message text to send to the agent");
  }
  if (content.size() > max_content_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("content is ", content.size(),
                                                   " bytes; this bridge accepts at most ",
                                                   max_content_bytes, " (max_content_bytes)"));
  }
  if (!cmid.empty()) {
    if (absl::Status st = ValidateClientMessageId(cmid); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("client_message_id: ", st.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckChatId(const std::string& chat_id) {
  if (chat_id.empty()) {
    return absl::InvalidArgumentError("chat_id is required (from CreateChat, or Nexora's chat UUID)");
  }
  if (absl::Status st = ValidateChatId(chat_id); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("chat_id: ", st.message()));
  }
  return absl::OkStatus();
}

ChatEvent Accepted(const MessageState& m) {
  ChatEvent e;
  e.set_client_message_id(m.cmid);
  e.mutable_accepted()->set_client_message_id(m.cmid);
  e.mutable_accepted()->set_generated(m.generated);
  return e;
}

ChatEvent Restarted(const MessageState& m, int attempt) {
  ChatEvent e;
  e.set_client_message_id(m.cmid);
  e.mutable_restarted()->set_attempt(static_cast<uint32_t>(attempt));
  return e;
}

// A server event as a ChatEvent; `m` (strand) learns the answer's message_id.
ChatEvent ToChatEvent(const Event& ev, MessageState* m) {
  ChatEvent e;
  if (m != nullptr) {
    e.set_client_message_id(m->cmid);
    if (!ev.message_id.empty()) m->message_id = ev.message_id;
    e.set_message_id(m->message_id);
  } else {
    e.set_message_id(ev.message_id);
  }
  switch (ev.kind) {
    case EventKind::kChunk: e.mutable_chunk()->set_content(ev.content); break;
    case EventKind::kToolCall:
      e.mutable_tool_call()->set_tool(ev.tool);
      e.mutable_tool_call()->set_input_json(ev.json);
      break;
    case EventKind::kToolResult:
      e.mutable_tool_result()->set_tool(ev.tool);
      e.mutable_tool_result()->set_result_json(ev.json);
      break;
    case EventKind::kSubAgentStart:
      e.mutable_sub_agent_start()->set_task_id(ev.task_id);
      e.mutable_sub_agent_start()->set_agent_name(ev.agent_name);
      break;
    case EventKind::kSubAgentComplete:
      e.mutable_sub_agent_complete()->set_task_id(ev.task_id);
      e.mutable_sub_agent_complete()->set_result(ev.result);
      break;
    case EventKind::kDone: e.mutable_done(); break;
    case EventKind::kError:
      e.mutable_error()->set_code(ev.code);
      e.mutable_error()->set_message(log::Redact(ev.message));
      e.mutable_error()->set_status_code(static_cast<int32_t>(CodeForUpstreamError(ev.code)));
      break;
    case EventKind::kDuplicate:
      e.mutable_duplicate()->set_message_id(ev.message_id);
      break;
    case EventKind::kPong:
    case EventKind::kUnknown:
      e.mutable_unknown()->set_type(ev.type);
      e.mutable_unknown()->set_json(ev.json);
      break;
  }
  return e;
}

class NexoraBridge final : public core::BridgeBase, public NexoraServiceBase {
 public:
  NexoraBridge(NexoraBridgeOptions options, core::BridgeContext context, std::string http_base)
      : BridgeBase(std::move(context), "Nexora", {std::string(v1::NexoraService::service_full_name())}),
        options_(std::move(options)),
        http_base_(std::move(http_base)),
        health_(std::make_shared<UpstreamHealth>([this] {
          if (this->context().health_changed) this->context().health_changed();
        })) {
    core::HttpClientOptions ho;
    ho.name = this->context().name;
    ho.allow_plaintext = options_.connection.allow_plaintext;
    ho.tls = options_.connection.tls;
    ho.timeout = options_.http_timeout;
    http_ = core::HttpClient::Create(this->context().executor, std::move(ho));
    if (options_.api_key != nullptr) {
      default_token_ = std::make_shared<StaticToken>(options_.api_key,
                                                     [this] { refresher_.RefreshNow(); });
    } else if (options_.email != nullptr && options_.password != nullptr) {
      LoginToken::Options lo;
      lo.login_url = absl::StrCat(http_base_, Av(kLoginPath));
      lo.email = options_.email;
      lo.password = options_.password;
      lo.http = http_;
      lo.retry_after = options_.auth_retry_after;
      login_ = std::make_shared<LoginToken>(std::move(lo));
      default_token_ = login_;
      // The pool's refresher keeps file and env secrets current.
      refresher_.Watch(options_.email);
      refresher_.Watch(options_.password);
    }
    if (options_.api_key != nullptr) refresher_.Watch(options_.api_key);
    // A chat socket whose token was refused is closed by the pool, and the chat is
    // refused from memory (no reconnect storm on a wrong key) for auth_retry_after unless
    // the config's limits.refusal_memory says otherwise; a rotated key is a new pool key
    // (see CredentialFor), so it is tried at once.
    InitPool(
        {.max_sessions = options_.max_chats,
         .idle_timeout = options_.idle_chat_timeout,
         .refusal_memory = options_.auth_retry_after},
        [this](const std::string& id, std::shared_ptr<core::SecretSource> credential, bool pinned) {
          return NewSession(id, std::move(credential), pinned);
        },
        core::CredentialPolicy{std::string(kTokenMetadata), options_.allow_call_token}, nullptr);
    set_max_open_calls(options_.max_open_calls);
  }

  // Not while a chat socket cannot reach Nexora (its attempts fail for network, TLS,
  // 5xx or 429 reasons): a bridge whose sockets are made per chat serves while it can
  // make them. Chat-specific refusals (404 unknown chat) and refused tokens do not count.
  bool Serving() const override { return BridgeBase::Serving() && health_->serving(); }

  std::vector<grpc::Service*> Services() override { return {this}; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<core::CqLoop*>& loops) override;
  void Start() override {
    BridgeBase::Start();
    // Log in now, so the first call does not wait for it.
    if (login_ != nullptr) login_->WithToken([](absl::StatusOr<Token>) {});
  }

  const NexoraBridgeOptions& options() const { return options_; }
  core::HttpClient& http() { return *http_; }
  const std::string& http_base() const { return http_base_; }

  // The credential of a call (x-nexora-token metadata, or the configured one).
  absl::StatusOr<CallCredential> CredentialFor(const grpc::ServerContextBase& ctx) const {
    const auto& md = ctx.client_metadata();
    auto it = md.find(grpc::string_ref(kTokenMetadata.data(), kTokenMetadata.size()));
    if (it == md.end()) {
      if (default_token_ == nullptr) {
        return absl::UnauthenticatedError(absl::StrCat(
            "no credential: this Nexora bridge has no configured api_key or email/password; "
            "send a token (API key or JWT) in the \"", Av(kTokenMetadata), "\" metadata"));
      }
      // The epoch of the configured secrets in the key: after a rotation (a new key or
      // password file) calls move to fresh sockets with the new secret at once, instead
      // of waiting out a refusal of the old one remembered for the chat.
      return CallCredential{"", absl::StrCat("default@", default_token_->Epoch())};
    }
    if (!options_.allow_call_token) {
      return absl::PermissionDeniedError(absl::StrCat(
          "this bridge does not accept per-call tokens (\"", Av(kTokenMetadata),
          "\" metadata); remove it, or set allow_call_token in the bridge config"));
    }
    std::string token(it->second.data(), it->second.size());
    if (token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("the \"", Av(kTokenMetadata), "\" metadata is empty"));
    }
    log::RegisterSecret(token);
    std::string key = core::CredentialKey(token);
    return CallCredential{std::move(token), std::move(key)};
  }

  // The token source of a call's credential.
  std::shared_ptr<TokenSource> TokensFor(const CallCredential& cred) const {
    if (cred.token.empty()) return default_token_;
    return std::make_shared<StaticToken>(core::SecretSource::Fixed(cred.token));
  }

  // The chat's socket for this credential (created on first use), and what its
  // connection attempts tell the call. Fails fast with the chat's standing refusal (its
  // upgrade was refused 400/404...), or while its upstream is unreachable unless the
  // call asked to wait (bounded by the config's limits.max_waiting_calls).
  struct ChatLease {
    Lease lease;
    std::shared_ptr<ChatLink> link;
  };
  absl::StatusOr<ChatLease> AcquireChat(const std::string& chat_id, const CallCredential& cred,
                                        const grpc::ServerContextBase& ctx) {
    t_acquiring_chat = &chat_id;
    absl::StatusOr<Lease> lease = pool().Acquire(absl::StrCat(chat_id, "#", cred.key), cred.token);
    t_acquiring_chat = nullptr;
    if (!lease.ok() && lease.status().code() == absl::StatusCode::kResourceExhausted) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the Nexora bridge already holds its maximum of ", options_.max_chats,
          " chat sockets (max_chats); retry later, or raise max_chats (idle chat sockets close "
          "after idle_chat_timeout)"));
    }
    if (!lease.ok()) return lease.status();
    std::shared_ptr<ChatLink> link = LinkOf(lease->get());
    if (link == nullptr) {
      return absl::UnavailableError("the chat's socket was just closed; retry");
    }
    if (absl::Status refused = link->Refusal(); !refused.ok()) return refused;
    if (absl::Status st = WaitOrFailFast(ctx, *lease); !st.ok()) return st;
    return ChatLease{*std::move(lease), std::move(link)};
  }

  // The upstream request of one message. `restarted` runs on the strand before a resend.
  core::Request MessageRequest(std::shared_ptr<MessageState> m, std::string content,
                               std::shared_ptr<ChatLink> link,
                               std::function<void(int attempt)> restarted) const {
    core::Request r;
    r.what = absl::StrCat("the message ", m->cmid);
    r.gated = true;  // one in flight per chat (Protocol's gate)
    r.gate_cost = 1;
    r.on_drop = core::OnDrop::kResend;  // Nexora deduplicates by client_message_id
    // No total deadline: the session bounds the wait between events
    // (answer_idle_timeout), and a caller that leaves does not abandon an answer mid-way
    // (its remaining events would otherwise be taken for the next message's).
    r.encode = [m, content = std::move(content), restarted = std::move(restarted),
                link = std::move(link), max_resends = static_cast<int>(options_.max_resends)](
                   std::string_view) -> absl::StatusOr<core::Outbound> {
      const int attempt = m->attempts++;
      if (attempt > 0) {
        if (attempt > max_resends) {
          return core::WithErrorInfo(
              absl::UnavailableError(absl::StrCat(
                  "the socket to Nexora dropped ", attempt, " times before the answer to message ",
                  m->cmid, " ended (max_resends ", max_resends, "; last: ", link->LastDrop(),
                  "); whether it was answered is unknown: send it again with the same "
                  "client_message_id to get the answer or a duplicate")),
              "OUTCOME_UNKNOWN", kErrorDomain);
        }
        m->message_id.clear();  // the answer starts over
        restarted(attempt);
      }
      m->sent.store(true);
      return core::Outbound{EncodeSend(content, m->cmid), false};
    };
    return r;
  }

  // A fresh message state (the caller's client_message_id, or a generated UUID).
  std::shared_ptr<MessageState> NewMessage(const std::string& cmid) {
    auto m = std::make_shared<MessageState>();
    if (cmid.empty()) {
      absl::MutexLock lock(&rng_mu_);
      m->cmid = MakeClientMessageId(rng_);
      m->generated = true;
    } else {
      m->cmid = cmid;
    }
    return m;
  }

 private:
  std::shared_ptr<core::UpstreamSession> NewSession(const std::string& id,
                                                    std::shared_ptr<core::SecretSource> credential,
                                                    bool pinned) {
    core::SessionOptions so = BaseSessionOptions(
        id, pinned, options_.connection, kErrorDomain, [this](core::ConnectionOptions& c) {
          // CheckAlive and the JSON ping run on this tick; pings only on a quiet socket.
          c.keepalive.heartbeat_interval =
              std::max<core::Duration>(std::min(options_.ping_interval, options_.pong_timeout) / 2,
                                       std::chrono::milliseconds(5));
          // A refused token is retried after auth_retry_after (full jitter), not on the
          // connection's default auth backoff.
          c.auth_backoff = {options_.auth_retry_after, options_.auth_retry_after, 1.0,
                            c.auth_backoff.reset_after};
        });
    so.request_timeout = options_.answer_idle_timeout;
    so.login_timeout = options_.http_timeout;
    so.max_pending = options_.max_pending_messages_per_chat;
    auto link = std::make_shared<ChatLink>();
    ProtocolOptions po;
    po.url = options_.url;
    po.chat_id = t_acquiring_chat != nullptr ? *t_acquiring_chat : std::string();
    po.headers = options_.headers;
    absl::StatusOr<std::string> value = credential->Current();
    po.token = value.ok() && !value->empty() ? std::make_shared<StaticToken>(std::move(credential))
                                             : default_token_;
    po.ping_interval = options_.ping_interval;
    po.pong_timeout = options_.pong_timeout;
    po.link = link;
    po.health = health_;
    std::shared_ptr<core::UpstreamSession> session = core::UpstreamSession::Create(
        SessionExecutor(), std::move(so), std::make_unique<Protocol>(std::move(po)));
    absl::MutexLock lock(&links_mu_);
    if (links_.size() >= 2 * links_pruned_at_) {
      // Forget sessions that are gone (amortized: the map at most doubles in between).
      std::erase_if(links_, [](const auto& kv) { return kv.second.expired(); });
      links_pruned_at_ = std::max<size_t>(links_.size(), 16);
    }
    links_[session.get()] = link;  // the Protocol (so the session) owns it
    return session;
  }

  // The ChatLink of a session of this bridge (null once the session is gone).
  std::shared_ptr<ChatLink> LinkOf(const core::UpstreamSession* session) {
    absl::MutexLock lock(&links_mu_);
    auto it = links_.find(session);
    return it == links_.end() ? nullptr : it->second.lock();
  }

  const NexoraBridgeOptions options_;
  const std::string http_base_;
  std::shared_ptr<UpstreamHealth> health_;
  std::shared_ptr<core::HttpClient> http_;
  std::shared_ptr<LoginToken> login_;
  std::shared_ptr<TokenSource> default_token_;
  absl::Mutex links_mu_;
  std::map<const core::UpstreamSession*, std::weak_ptr<ChatLink>> links_ ABSL_GUARDED_BY(links_mu_);
  size_t links_pruned_at_ ABSL_GUARDED_BY(links_mu_) = 16;
  core::SecretRefresher refresher_;
  absl::Mutex rng_mu_;
  core::Rng rng_ = core::Rng::FromEntropy();
};

// ---------------------------------------------------------------------------------
// SendMessage on the completion-queue API: the answer's events are pushed from the
// session strand; core's AsyncServerStream writes them on the loop thread.
class SendMessageCall final
    : public core::AsyncServerStream<SendMessageCall, v1::SendMessageRequest, ChatEvent, ChatEvent> {
 public:
  SendMessageCall(NexoraBridge* bridge, core::CqLoop* loop)
      : AsyncServerStream(bridge, loop, kSendMessageMethod, bridge->options().stream_queue, "events",
                          kErrorDomain),
        nexora_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* b = static_cast<NexoraBridge*>(bridge);
    auto c = std::make_shared<SendMessageCall>(b, loop);
    Start(c, c->done_tag(), [&] {
      b->RequestSendMessage(&c->ctx_, &c->req_, &c->writer_, loop->cq(), loop->cq(), c->matched_tag());
    });
  }

  // One event per message.
  static bool Append(ChatEvent* m, const ChatEvent& e, size_t* bytes) {
    if (*bytes > 0) return false;
    *m = e;
    *bytes = 1;
    return true;
  }

  void OnAdmitted() {
    absl::Status st = CheckChatId(req_.chat_id());
    if (st.ok()) {
      st = ValidateMessage(req_.content(), req_.client_message_id(),
                           nexora_->options().max_content_bytes);
    }
    if (!st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    absl::StatusOr<CallCredential> cred = nexora_->CredentialFor(ctx_);
    if (!cred.ok()) {
      FinishWith(core::ToGrpcStatus(cred.status()));
      return;
    }
    absl::StatusOr<NexoraBridge::ChatLease> chat = nexora_->AcquireChat(req_.chat_id(), *cred, ctx_);
    if (!chat.ok()) {
      FinishWith(core::ToGrpcStatus(chat.status()));
      return;
    }
    lease_ = std::move(chat->lease);
    link_ = std::move(chat->link);
    msg_ = nexora_->NewMessage(req_.client_message_id());
    Push(Accepted(*msg_));
    std::shared_ptr<SendMessageCall> self = shared_from_this();
    std::shared_ptr<MessageState> m = msg_;
    core::UpstreamSession* session = lease_.get();
    std::shared_ptr<ChatLink> link = link_;
    // No socket could be opened for the message (the chat's upgrade was refused, or
    // Nexora stayed unreachable): the call ends with why; the request is dropped.
    // Runs on the session's strand, where the session (so `session`) is alive.
    m->waiter = link->Add(core::CallerAsksToWait(ctx_), &m->sent, [self, m, session](const absl::Status& st) {
      if (m->ended.exchange(true)) return;
      if (const uint64_t op = m->op.load(); op != 0) session->Cancel(op);  // else: below
      self->EndAfterQueued(NotReopened(*m, st));
    });
    // The callbacks hold the call until the answer ended, also when its caller left:
    // the answer runs to its end so the chat's next message is not misrouted.
    const uint64_t op = lease_->Send(
        nexora_->MessageRequest(msg_, std::move(*req_.mutable_content()), link,
                                [self, m](int attempt) { self->Push(Restarted(*m, attempt)); }),
        [self, m, link](absl::StatusOr<core::Reply> reply) {
          const bool last = !reply.ok() || reply->final;
          if (last) link->Remove(m->waiter);
          if (last ? m->ended.exchange(true) : m->ended.load()) return;
          if (!reply.ok()) {
            self->EndAfterQueued(reply.status());
            return;
          }
          const Event& ev = static_cast<const EventPayload&>(*reply->payload).event;
          if (ev.kind == EventKind::kError) {
            // A status, not an event (see nexora.proto), after the events before it.
            self->EndAfterQueued(EventError(ev));
            return;
          }
          self->Push(ToChatEvent(ev, m.get()), reply->final);
        });
    m->op.store(op);
    if (m->ended.load()) lease_->Cancel(op);  // failed through the link meanwhile
  }

  // The call ended: a message not yet sent is dropped; one already sent runs to the end
  // of its answer (see MessageRequest).
  void Release() {
    if (msg_ != nullptr && lease_ && !msg_->sent.load()) {
      lease_->Cancel(msg_->op.load());
      link_->Remove(msg_->waiter);
    }
  }

 private:
  NexoraBridge* nexora_;
  std::shared_ptr<MessageState> msg_;
  std::shared_ptr<ChatLink> link_;
};

// ---------------------------------------------------------------------------------
// CreateChat on the completion-queue API: POST /api/chats with the call's token.
class CreateChatCall final
    : public core::AsyncUnaryCall<CreateChatCall, v1::CreateChatRequest, v1::CreateChatResponse> {
 public:
  CreateChatCall(NexoraBridge* bridge, core::CqLoop* loop)
      : AsyncUnaryCall(bridge, loop, kCreateChatMethod), nexora_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* b = static_cast<NexoraBridge*>(bridge);
    auto c = std::make_shared<CreateChatCall>(b, loop);
    Start(c, c->done_tag(), [&] {
      b->RequestCreateChat(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                           c->matched_tag());
    });
  }

  void OnAdmitted() {
    const std::string& agent = req_.agent_id();
    if (agent.empty()) {
      FinishWith(core::ToGrpcStatus(
          absl::InvalidArgumentError("agent_id is required: the Nexora agent (UUID) the chat talks to")));
      return;
    }
    if (agent.size() > kMaxAgentIdSize ||
        std::any_of(agent.begin(), agent.end(), [](char c) { return absl::ascii_iscntrl(c); })) {
      FinishWith(core::ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
          "agent_id must be 1-", kMaxAgentIdSize, " characters without control characters"))));
      return;
    }
    absl::StatusOr<CallCredential> cred = nexora_->CredentialFor(ctx_);
    if (!cred.ok()) {
      FinishWith(core::ToGrpcStatus(cred.status()));
      return;
    }
    tokens_ = nexora_->TokensFor(*cred);
    deadline_ = core::SteadyDeadline(ctx_);
    WithToken(false);
  }

 private:
  void WithToken(bool retried) {
    tokens_->WithToken([c = shared_from_this(), retried](absl::StatusOr<Token> token) {
      if (!token.ok()) {
        c->Respond([&token](CreateChatCall&) { return core::ToGrpcStatus(token.status()); });
        return;
      }
      c->Post(*std::move(token), retried);
    });
  }

  void Post(Token token, bool retried) {
    core::HttpRequestSpec spec;
    spec.url = absl::StrCat(nexora_->http_base(), Av(kChatsPath));
    spec.body = EncodeCreateChatBody(req_.agent_id());
    spec.headers = {{"Authorization", absl::StrCat("Bearer ", token.value)},
                    {"Accept", "application/json"}};
    const core::Duration left = deadline_ - core::Clock::now();
    if (deadline_ != core::Clock::time_point::max() && left < nexora_->options().http_timeout) {
      spec.timeout = std::max<core::Duration>(left, std::chrono::milliseconds(1));
    }
    nexora_->http().Send(std::move(spec), [c = shared_from_this(), generation = token.generation,
                                           retried](absl::StatusOr<core::HttpAnswer> a) {
      if (a.ok() && a->status == 401 && !retried && c->tokens_->Refresh(generation)) {
        c->WithToken(true);  // an expired JWT: log in again once
        return;
      }
      absl::Status st;
      std::string chat_id;
      if (!a.ok()) {
        st = absl::Status(a.status().code(), absl::StrCat("create chat (POST /api/chats): ",
                                                          a.status().message()));
      } else if (a->status / 100 != 2) {
        st = HttpError(a->status, a->body, "create chat (POST /api/chats)");
      } else if (absl::StatusOr<std::string> id = DecodeCreateChatAnswer(a->body); !id.ok()) {
        st = id.status();
      } else {
        chat_id = *std::move(id);
      }
      c->Respond([&st, &chat_id](CreateChatCall& call) {
        if (!st.ok()) return core::ToGrpcStatus(st);
        call.resp_.set_chat_id(std::move(chat_id));
        return grpc::Status::OK;
      });
    });
  }

  NexoraBridge* nexora_;
  std::shared_ptr<TokenSource> tokens_;
  core::Clock::time_point deadline_ = core::Clock::time_point::max();
};

// ---------------------------------------------------------------------------------
// Chat on the completion-queue API (bidi): messages in, answered one after another on
// the chat's socket; every event out; upstream errors are events. Events arriving while
// no message is in flight come through the chat sink (client_message_id empty).
// Messages are read on its CqLoop thread; the answers' events and the chat sink's are
// handled on the session's strand, in its order, under the stream's lock
// (core::AsyncBidiStream::Locked), which starts their writes right there.
class ChatStream final : public core::AsyncBidiStream<ChatStream, v1::ChatRequest, ChatEvent>,
                         public core::EventSink {
 public:
  friend AsyncBidiStream;  // calls the hooks
  ChatStream(NexoraBridge* bridge, core::CqLoop* loop)
      : AsyncBidiStream(bridge, loop, kChatMethod), nexora_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* b = static_cast<NexoraBridge*>(bridge);
    auto s = std::make_shared<ChatStream>(b, loop);
    Start(s, s->done_tag(), [&] {
      b->RequestChat(&s->ctx_, &s->stream_, loop->cq(), loop->cq(), s->matched_tag());
    });
  }

  // core::EventSink (session strand): events while no message is in flight.
  void OnSubscribed(const core::SubscribedInfo&) override {}
  void OnEvent(const core::PayloadPtr& event, bool /*after_gap*/) override {
    Locked([&](ChatStream& s) {
      s.PushEvent(ToChatEvent(static_cast<const EventPayload&>(*event).event, nullptr));
    });
  }
  void OnEnded(const absl::Status& status) override {
    Locked([status](ChatStream& s) {
      s.subscribed_ = false;
      if (!s.finishing()) s.Fail(status);
    });
  }

 private:
  // --- core::AsyncBidiStream hooks (under its lock). ---
  absl::Status Accept() {
    const NexoraBridgeOptions& o = nexora_->options();
    if (chat_.empty()) {
      if (absl::Status st = CheckChatId(read_.chat_id()); !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("the first message: ", st.message()));
      }
    } else if (!read_.chat_id().empty() && read_.chat_id() != chat_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", received_, ": chat_id \"", read_.chat_id(), "\" differs from this stream's chat \"",
          chat_, "\" (one stream talks to one chat; open another stream)"));
    }
    const bool first = chat_.empty();
    if (!(first && read_.content().empty())) {
      if (absl::Status st = ValidateMessage(read_.content(), read_.client_message_id(), o.max_content_bytes);
          !st.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("message ", received_, ": ", st.message()));
      }
    }
    if (first) {
      absl::StatusOr<CallCredential> cred = nexora_->CredentialFor(ctx_);
      if (!cred.ok()) return cred.status();
      absl::StatusOr<NexoraBridge::ChatLease> chat = nexora_->AcquireChat(read_.chat_id(), *cred, ctx_);
      if (!chat.ok()) return chat.status();
      lease_ = std::move(chat->lease);
      link_ = std::move(chat->link);
      chat_ = read_.chat_id();
      subscribed_ = true;
      sink_id_ = lease_->Subscribe(std::string(kChatRoute), nullptr, shared_from_this());
    }
    ++received_;
    if (read_.content().empty()) return absl::OkStatus();  // opened the conversation only
    std::shared_ptr<MessageState> m = nexora_->NewMessage(read_.client_message_id());
    PushEvent(Accepted(*m));
    std::weak_ptr<ChatStream> w = weak_from_this();
    std::shared_ptr<ChatLink> link = link_;
    core::UpstreamSession* session = lease_.get();
    // As in SendMessage; a message that cannot be sent ends the stream, like any
    // transport failure (upstream errors are events).
    m->waiter = link->Add(core::CallerAsksToWait(ctx_), &m->sent, [w, m, session](const absl::Status& st) {
      if (m->ended.exchange(true)) return;
      if (const uint64_t op = m->op.load(); op != 0) session->Cancel(op);  // else: below
      if (auto s = w.lock()) s->Locked([m, st](ChatStream& c) { c.Fail(NotReopened(*m, st)); });
    });
    const uint64_t op = lease_->Send(
        nexora_->MessageRequest(m, std::move(*read_.mutable_content()), link,
                                [w, m](int attempt) {
                                  if (auto s = w.lock()) s->Deliver(Restarted(*m, attempt), nullptr);
                                }),
        [w, m, link](absl::StatusOr<core::Reply> reply) {
          const bool last = !reply.ok() || reply->final;
          if (last) link->Remove(m->waiter);
          if (last ? m->ended.exchange(true) : m->ended.load()) return;
          auto s = w.lock();
          if (s == nullptr) return;
          if (!reply.ok()) {
            s->Locked([st = reply.status()](ChatStream& c) { c.Fail(st); });
            return;
          }
          const Event& ev = static_cast<const EventPayload&>(*reply->payload).event;
          s->Deliver(ToChatEvent(ev, m.get()), reply->final ? m.get() : nullptr);
        });
    m->op.store(op);
    if (m->ended.load()) lease_->Cancel(op);  // failed through the link meanwhile
    open_[op] = m;
    return absl::OkStatus();
  }

  // Ends OK once the caller half-closed and every answer ended.
  void MaybeComplete() {
    if (finishing() || !half_closed_ || !open_.empty()) return;
    Complete(grpc::Status::OK);
  }

  void Fail(const absl::Status& st) { FinishWith(core::ToGrpcStatus(st)); }

  // Drops what has not been sent and leaves the chat sink. Messages already sent run to
  // the end of their answers (see MessageRequest).
  void Release() {
    if (!lease_) return;
    for (auto& [op, m] : open_) {
      if (!m->sent.load()) {
        lease_->Cancel(op);
        link_->Remove(m->waiter);
      }
    }
    open_.clear();
    if (subscribed_) {
      lease_->Unsubscribe(std::string(kChatRoute), sink_id_);
      subscribed_ = false;
    }
  }

  // From the strand: one event of a message; `ended` is the message whose answer ended.
  void Deliver(ChatEvent e, const MessageState* ended) {
    Locked([&](ChatStream& s) {
      if (ended != nullptr) s.open_.erase(ended->op.load());
      s.PushEvent(std::move(e));
      s.MaybeComplete();
    });
  }

  // Under the lock.
  void PushEvent(ChatEvent e) {
    if (finishing()) return;
    if (queued() >= nexora_->options().stream_queue) {
      Fail(core::SlowConsumer(nexora_->options().stream_queue, "events", kErrorDomain));
      return;
    }
    Push(std::move(e));
  }

  NexoraBridge* nexora_;
  // The rest is touched under the stream's lock.
  std::shared_ptr<ChatLink> link_;  // set with lease_
  std::string chat_;
  uint32_t received_ = 0;
  bool subscribed_ = false;
  uint64_t sink_id_ = 0;
  // Messages whose answers have not ended, by request id.
  std::map<uint64_t, std::shared_ptr<MessageState>> open_;
};

void NexoraBridge::ServeAsync(const std::vector<core::CqLoop*>& loops) {
  for (core::CqLoop* loop : loops) {
    for (int i = 0; i < kOutstandingSendRequests; ++i) SendMessageCall::Request(this, loop);
    for (int i = 0; i < kOutstandingCreateRequests; ++i) CreateChatCall::Request(this, loop);
    for (int i = 0; i < kOutstandingChatRequests; ++i) ChatStream::Request(this, loop);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::Bridge>> NewNexoraBridge(NexoraBridgeOptions options,
                                                              const core::BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("nexora: upstream url is required");
  if (options.api_key == nullptr && (options.email == nullptr || options.password == nullptr) &&
      !options.allow_call_token) {
    return absl::InvalidArgumentError(
        "nexora: set api_key, or email and password, or allow_call_token so calls can bring "
        "their own token");
  }
  if (!context.executor) return absl::InvalidArgumentError("nexora: no executor in the context");
  std::string http_base = options.http_base_url;
  if (http_base.empty()) {
    absl::StatusOr<std::string> b = HttpBaseUrl(options.url);
    if (!b.ok()) return absl::InvalidArgumentError(absl::StrCat("nexora: ", b.status().message()));
    http_base = *std::move(b);
  }
  while (!http_base.empty() && http_base.back() == '/') http_base.pop_back();
  return std::unique_ptr<core::Bridge>(new NexoraBridge(std::move(options), context, std::move(http_base)));
}

}  // namespace wsbridge::nexora
