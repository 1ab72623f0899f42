#include "bridges/nlx/protocol.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::nlx {
namespace {

constexpr std::string_view kLog = "nlx";

std::string Fmt(core::Duration d) { return absl::FormatDuration(absl::FromChrono(d)); }

std::string AliasOf(std::string_view tenant, std::string_view id) {
  return absl::StrCat(Av(tenant), "#", Av(id));
}

// Keeps the code and text only (the connection logs a PrepareHandshake error as text).
absl::Status Plain(const absl::Status& st) { return absl::Status(st.code(), st.message()); }

}  // namespace

std::string RefusalKey(std::string_view tenant, const KeySources& keys) {
  auto v = [](const std::shared_ptr<core::SecretSource>& s) { return s ? s->version() : 0; };
  return absl::StrCat(Av(tenant), ":", v(keys.api_key), ".", v(keys.deployment_key), ".",
                      v(keys.channel_key));
}

std::string ConversationRefusalKey(std::string_view tenant, const KeySources& keys,
                                   std::string_view conversation_id) {
  return absl::StrCat(RefusalKey(tenant, keys), "#", Av(conversation_id));
}

// ---------------------------------------------------------------------------------
// Conversation.

std::string Conversation::id() const {
  absl::MutexLock lock(&mu_);
  return id_;
}

bool Conversation::acknowledged() const {
  absl::MutexLock lock(&mu_);
  return acknowledged_;
}

absl::Status Conversation::open_error() const {
  absl::MutexLock lock(&mu_);
  return open_error_;
}

uint64_t Conversation::WatchOpen(std::function<void(const absl::Status&)> fn) {
  absl::MutexLock lock(&mu_);
  if (acknowledged_ || !open_error_.ok()) return 0;
  const uint64_t id = next_watch_++;
  watchers_.emplace(id, std::move(fn));
  return id;
}

void Conversation::Unwatch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  watchers_.erase(id);
}

std::string Conversation::last_disconnect() const {
  absl::MutexLock lock(&mu_);
  return last_disconnect_;
}

void Conversation::Acknowledged(std::string id) {
  absl::MutexLock lock(&mu_);
  id_ = std::move(id);
  acknowledged_ = true;
  watchers_.clear();
}

void Conversation::Disconnected(std::string why) {
  absl::MutexLock lock(&mu_);
  last_disconnect_ = std::move(why);
}



void Conversation::OpenFailed(absl::Status status) {
  std::map<uint64_t, std::function<void(const absl::Status&)>> watchers;
  {
    absl::MutexLock lock(&mu_);
    if (acknowledged_ || !open_error_.ok()) return;
    open_error_ = status;
    watchers = std::move(watchers_);
    watchers_.clear();
  }
  for (auto& [id, fn] : watchers) fn(status);
}

// ---------------------------------------------------------------------------------
// Registry.

std::string Registry::NewPoolKey() {
  absl::MutexLock lock(&mu_);
  return absl::StrFormat("%08x", next_key_++);
}

std::string Registry::PoolKeyFor(std::string_view tenant, std::string_view id) {
  const std::string alias = AliasOf(tenant, id);
  absl::MutexLock lock(&mu_);
  auto it = aliases_.find(alias);
  if (it != aliases_.end()) return it->second;
  std::string key = absl::StrFormat("%08x", next_key_++);
  aliases_.emplace(alias, key);
  return key;
}

void Registry::Alias(std::string_view tenant, std::string_view id, const std::string& pool_key) {
  absl::MutexLock lock(&mu_);
  aliases_[AliasOf(tenant, id)] = pool_key;
}

void Registry::Put(const std::string& pool_key, std::shared_ptr<Conversation> conversation) {
  absl::MutexLock lock(&mu_);
  by_key_[pool_key] = std::move(conversation);
}

std::shared_ptr<Conversation> Registry::Get(const std::string& pool_key) const {
  absl::MutexLock lock(&mu_);
  auto it = by_key_.find(pool_key);
  return it == by_key_.end() ? nullptr : it->second;
}

void Registry::Forget(const std::string& pool_key, const Conversation* conversation) {
  absl::MutexLock lock(&mu_);
  auto it = by_key_.find(pool_key);
  if (it == by_key_.end() || it->second.get() != conversation) return;  // a newer session
  by_key_.erase(it);
  for (auto a = aliases_.begin(); a != aliases_.end();) {
    a = a->second == pool_key ? aliases_.erase(a) : std::next(a);
  }
}

void Registry::Refuse(const std::string& refusal_key, absl::Status status,
                      core::Clock::time_point until) {
  absl::MutexLock lock(&mu_);
  // Expired ones go first, so the map stays as small as the set of refused keys.
  const core::Clock::time_point now = core::Clock::now();
  for (auto it = refusals_.begin(); it != refusals_.end();) {
    it = it->second.until <= now ? refusals_.erase(it) : std::next(it);
  }
  refusals_[refusal_key] = Refusal{std::move(status), until};
}

absl::Status Registry::Refused(const std::string& refusal_key, core::Clock::time_point now) const {
  absl::MutexLock lock(&mu_);
  auto it = refusals_.find(refusal_key);
  if (it == refusals_.end() || it->second.until <= now) return absl::OkStatus();
  return it->second.status;
}

size_t Registry::aliases() const {
  absl::MutexLock lock(&mu_);
  return aliases_.size();
}

// ---------------------------------------------------------------------------------
// Protocol.

Protocol::~Protocol() {
  options_.registry->Forget(options_.pool_key, options_.conversation.get());
}

void Protocol::FailOpen(absl::Status st) {
  log::Warn(kLog, "the conversation could not be opened",
            {{"pool_key", options_.pool_key}, {"error", std::string(st.message())}});
  options_.conversation->OpenFailed(std::move(st));
}

absl::StatusOr<core::HandshakeRequest> Protocol::PrepareHandshake() {
  Conversation& conv = *options_.conversation;
  const core::Clock::time_point now = options_.now();
  if (attempts_ > 0 && !conv.acknowledged() && conv.open_error().ok()) {
    // The first open did not reach the ack: it fails (the calls waiting on it learn
    // why) instead of retrying a conversation that never existed.
    absl::Status why = last_failure_;
    if (awaiting_ack_ && now - opened_at_ >= options_.ack_timeout) {
      why = core::WithErrorInfo(
          absl::UnavailableError(absl::StrCat(
              "NLX opened the socket but sent no {\"conversationId\"} acknowledgement within ",
              Fmt(options_.ack_timeout), " (ack_timeout); nothing was sent; retry later")),
          kReasonAckTimeout, kErrorDomain);
    } else if (why.ok()) {
      why = core::WithErrorInfo(
          absl::UnavailableError("the connection to NLX failed before it acknowledged the "
                                 "conversation; nothing was sent; retry later"),
          kReasonUpgradeRefused, kErrorDomain);
    }
    FailOpen(why);
  }
  awaiting_ack_ = false;
  last_failure_ = absl::OkStatus();
  prepare_status_ = conv.open_error();
  if (!prepare_status_.ok()) return Plain(prepare_status_);
  if (absl::Status refused =
          options_.registry->Refused(RefusalKey(options_.tenant, options_.keys), now);
      !refused.ok()) {
    prepare_status_ = refused;
    return Plain(refused);
  }
  if (absl::Status refused = options_.registry->Refused(
          ConversationRefusalKey(options_.tenant, options_.keys, conv.id()), now);
      !refused.ok()) {
    prepare_status_ = refused;  // a 1008 close (see Classify)
    return Plain(refused);
  }
  Keys keys;
  const std::pair<const std::shared_ptr<core::SecretSource>*, std::string*> parts[] = {
      {&options_.keys.api_key, &keys.api_key},
      {&options_.keys.deployment_key, &keys.deployment_key},
      {&options_.keys.channel_key, &keys.channel_key}};
  for (const auto& [source, value] : parts) {
    if (*source == nullptr) continue;  // empty: ValidateKeys names it
    absl::StatusOr<std::string> v = (*source)->Current();
    if (!v.ok()) {
      prepare_status_ = core::WithErrorInfo(
          absl::UnauthenticatedError(absl::StrCat("an NLX key cannot be read: ", v.status().message())),
          kReasonKeysMissing, kErrorDomain);
      return Plain(prepare_status_);
    }
    *value = *std::move(v);
  }
  absl::StatusOr<std::string> url =
      UpgradeUrl(options_.url, keys, conv.id(), options_.language);
  if (!url.ok()) {
    prepare_status_ = url.status();
    return Plain(prepare_status_);
  }
  ++attempts_;
  core::HandshakeRequest req;
  req.url = *std::move(url);
  req.headers = options_.headers;
  return req;
}

absl::StatusOr<core::LoginPlan> Protocol::OnOpen(std::string_view /*subprotocol*/) {
  gate_.Reset();
  awaiting_ack_ = true;
  opened_at_ = options_.now();
  core::LoginPlan plan;
  plan.wait = true;  // nothing may be sent before {"conversationId"}
  return plan;
}

core::Inbound Protocol::Decode(std::string_view text, bool binary) {
  core::Inbound in;
  if (binary) {
    in.kind = core::Inbound::Kind::kMalformed;
    in.status = absl::InvalidArgumentError("NLX sent a binary frame; its messages are JSON text");
    return in;
  }
  absl::StatusOr<Frame> frame = DecodeFrame(text);
  if (!frame.ok()) {
    if (awaiting_ack_) {
      in.kind = core::Inbound::Kind::kMalformed;
      in.status = frame.status();
      return in;
    }
    // Not JSON (or a modelled field of the wrong type): Converse shows it as it came.
    auto p = std::make_shared<FramePayload>();
    p->frame.kind = FrameKind::kUnknown;
    p->frame.raw = std::string(text);
    in.kind = core::Inbound::Kind::kEvent;
    in.route = std::string(kConversationRoute);
    in.payload = std::move(p);
    return in;
  }
  if (awaiting_ack_) {
    switch (frame->kind) {
      case FrameKind::kAck: {
        awaiting_ack_ = false;
        const std::string asked = options_.conversation->id();
        if (!asked.empty() && asked != frame->conversation_id) {
          // NLX's id wins (it is the one NLX routes by); the calls report it.
          log::Info(kLog, "NLX acknowledged another conversation id than the one resumed",
                    {{"asked", asked}, {"acknowledged", frame->conversation_id}});
        }
        options_.conversation->Acknowledged(frame->conversation_id);
        options_.registry->Alias(options_.tenant, frame->conversation_id, options_.pool_key);
        in.kind = core::Inbound::Kind::kLogin;
        return in;
      }
      case FrameKind::kError:
        // An error instead of the ack: "Forbidden"/"Unauthorized" count as refused keys
        // (the session's auth path); anything else is retried.
        in.kind = core::Inbound::Kind::kLogin;
        in.status = ErrorFrameStatus(*frame, "the connection");
        return in;
      default:
        in.kind = core::Inbound::Kind::kMalformed;
        in.status = absl::InvalidArgumentError(absl::StrCat(
            "NLX sent a ", Av(FrameKindName(frame->kind)),
            " frame before the {\"conversationId\"} acknowledgement"));
        return in;
    }
  }
  switch (frame->kind) {
    case FrameKind::kAck:
      in.kind = core::Inbound::Kind::kIgnore;  // a repeated ack says nothing new
      return in;
    case FrameKind::kResponse:
    case FrameKind::kError:
      if (gate_.busy()) {
        // The turn in flight (sent without a route: answered in send order).
        in.kind = core::Inbound::Kind::kReply;
        if (frame->kind == FrameKind::kError) {
          in.status = ErrorFrameStatus(*frame, "the turn");
          in.status.SetPayload(Av(kUpstreamJsonPayload), absl::Cord(Av(frame->raw)));
          return in;
        }
        break;
      }
      if (gate_.stale()) {
        // The late answer to an abandoned turn; the socket is replaced shortly.
        in.kind = core::Inbound::Kind::kIgnore;
        return in;
      }
      in.kind = core::Inbound::Kind::kEvent;  // unsolicited
      in.route = std::string(kConversationRoute);
      break;
    case FrameKind::kUnknown:
      in.kind = core::Inbound::Kind::kEvent;
      in.route = std::string(kConversationRoute);
      break;
  }
  auto p = std::make_shared<FramePayload>();
  p->frame = *std::move(frame);
  in.payload = std::move(p);
  return in;
}

absl::Status Protocol::CheckAlive() {
  if (gate_.stale()) {
    return absl::AbortedError(
        "a turn was abandoned without its response (deadline or cancel); replacing the socket so "
        "its late response cannot be taken for the next turn's");
  }
  return absl::OkStatus();
}

core::DisconnectKind Protocol::Classify(const core::DisconnectInfo& info) {
  // A PrepareHandshake that refused to connect is no socket end: what NLX said last stays.
  const bool reached_network = prepare_status_.ok();
  if (reached_network && !info.reason.ok()) {
    options_.conversation->Disconnected(std::string(info.reason.message()));
  }
  const core::DisconnectKind kind = ClassifyEnd(info);
  if (kind == core::DisconnectKind::kAuthRefused && reached_network && info.close_code == 1008) {
    // Remembered for this conversation and these keys' versions: its calls fail at once
    // (quoting the close) and its socket stays shut for auth_retry_after, however short
    // the connection's jittered auth backoff; a rotated key is tried at once.
    options_.registry->Refuse(
        ConversationRefusalKey(options_.tenant, options_.keys, options_.conversation->id()),
        core::WithErrorInfo(
            absl::UnauthenticatedError(absl::StrCat(
                "NLX refused this conversation's keys: ", info.reason.message(),
                "; not retried for auth_retry_after (", Fmt(options_.auth_retry_after),
                ") unless a key is rotated")),
            kReasonKeysRefused, kErrorDomain),
        options_.now() + options_.auth_retry_after);
  }
  return kind;
}

// Close codes (choice: the page names none; API Gateway's documented ones):
//  - 1001 going away (API Gateway's 10-minute idle and 2-hour limits, a redeploy) and
//    1011 internal error: NLX dropped the socket, not the conversation. Reconnect with
//    the upstream backoff (jittered, reset only after a healthy period, so a server that
//    accepts and closes at once is no hot loop) and the same conversationId; the turn in
//    flight fails OUTCOME_UNKNOWN quoting the code; Converse gets `reconnected`.
//  - No close frame (a TCP drop, a reset): the same.
//  - 1008 policy violation: NLX no longer accepts this socket's keys (revoked or rotated
//    on its side). Core's kAuthRefused: the calls on this conversation end at once with
//    UNAUTHENTICATED KEYS_REFUSED quoting the code; the refusal is remembered for this
//    conversation and these keys' versions for auth_retry_after (calls on it fail
//    without an upstream attempt, its socket is not reopened), so there is no loop; a
//    rotated key is tried at once. Not recorded for the keys as a whole: other
//    conversations go on, and an upgrade's 401/403 is the authority on the keys.
//  - 1013 try again later: core's slow-down delay.
core::DisconnectKind Protocol::ClassifyEnd(const core::DisconnectInfo& info) {
  if (info.http_status != 0) {
    absl::Status st = UpgradeRefusedStatus(info.http_status, info.http_body);
    last_failure_ = st;
    if (info.http_status == 401 || info.http_status == 403) {
      // Every session with these keys fails at once for auth_retry_after.
      options_.registry->Refuse(RefusalKey(options_.tenant, options_.keys), st,
                                options_.now() + options_.auth_retry_after);
      if (!options_.conversation->acknowledged()) FailOpen(st);
      return core::DisconnectKind::kAuthRefused;
    }
  } else if (info.close_code == 0 && !prepare_status_.ok()) {
    // PrepareHandshake failed: refused or unusable keys wait on the auth backoff.
    const absl::StatusCode code = prepare_status_.code();
    if (code == absl::StatusCode::kUnauthenticated || code == absl::StatusCode::kInvalidArgument ||
        code == absl::StatusCode::kPermissionDenied) {
      return core::DisconnectKind::kAuthRefused;
    }
    return core::DisconnectKind::kError;
  } else if (!info.reason.ok()) {
    last_failure_ = core::WithErrorInfo(
        absl::UnavailableError(absl::StrCat("the connection to NLX failed before it acknowledged "
                                            "the conversation: ",
                                            info.reason.message(), "; nothing was sent; retry later")),
        kReasonUpgradeRefused, kErrorDomain);
  }
  if (info.http_status == 0 && info.close_code == 1008) return core::DisconnectKind::kAuthRefused;
  return core::ClassifyDisconnect(info.http_status, info.close_code,
                                  info.retry_after > core::Duration::zero());
}

}  // namespace wsbridge::nlx
