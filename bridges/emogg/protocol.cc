#include "bridges/emogg/protocol.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::emogg {
namespace {

using core::Clock;
using core::DisconnectKind;

constexpr uint16_t kPolicyViolation = 1008;

std::string Fmt(core::Duration d) { return absl::FormatDuration(absl::FromChrono(d)); }

std::string RedactMessage(std::string_view s) { return log::Redact(s); }

void SetTimestamp(int64_t ms, google::protobuf::Timestamp* ts) {
  int64_t secs = ms / 1000;
  int64_t rem = ms % 1000;
  if (rem < 0) {
    rem += 1000;
    --secs;
  }
  ts->set_seconds(secs);
  ts->set_nanos(static_cast<int32_t>(rem * 1000000));
}

}  // namespace

std::string SubscriptionKey(std::string_view channel, std::string_view key) {
  // Channels are checked to hold no control characters, so '\n' separates them.
  return absl::StrCat(Av(channel), "\n", Av(key));
}

std::string SubscriptionIdFor(std::string_view session_id, std::string_view channel,
                              std::string_view key) {
  // FNV-1a over the three parts: stable for the process and the same for every caller.
  uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&h](std::string_view s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 0x100000001b3ULL;
    }
    h ^= 0xff;
    h *= 0x100000001b3ULL;
  };
  mix(session_id);
  mix(channel);
  mix(key);
  return absl::StrFormat("sub_%016x", h);
}

core::Duration HeartbeatTick(core::Duration interval, core::Duration timeout) {
  if (interval <= core::Duration::zero()) return core::Duration::zero();
  return std::clamp<core::Duration>(std::min(interval, timeout) / 4, std::chrono::milliseconds(5),
                                    std::chrono::seconds(5));
}

// --- SessionNotes ----------------------------------------------------------------------

void SessionNotes::SetClosing(std::optional<Closing> c) {
  absl::MutexLock lock(&mu_);
  closing_ = std::move(c);
}
std::optional<SessionNotes::Closing> SessionNotes::closing() const {
  absl::MutexLock lock(&mu_);
  return closing_;
}
void SessionNotes::SetLossReason(std::string reason) {
  absl::MutexLock lock(&mu_);
  loss_reason_ = std::move(reason);
}
std::string SessionNotes::loss_reason() const {
  absl::MutexLock lock(&mu_);
  return loss_reason_;
}
void SessionNotes::SetPause(std::optional<Pause> p) {
  absl::MutexLock lock(&mu_);
  pause_ = std::move(p);
}
std::optional<SessionNotes::Pause> SessionNotes::pause() const {
  absl::MutexLock lock(&mu_);
  return pause_;
}
void SessionNotes::SetLastEvent(const std::string& key,
                                std::shared_ptr<const v1::SubscriptionUpdate> ev) {
  absl::MutexLock lock(&mu_);
  if (ev == nullptr) {
    last_events_.erase(key);
  } else {
    last_events_[key] = std::move(ev);
  }
}
std::shared_ptr<const v1::SubscriptionUpdate> SessionNotes::last_event(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  auto it = last_events_.find(key);
  return it == last_events_.end() ? nullptr : it->second;
}
bool SessionNotes::AddSubscriber(const std::string& key, uint32_t max) {
  absl::MutexLock lock(&mu_);
  auto it = subscribers_.find(key);
  if (it != subscribers_.end()) {
    ++it->second;
    return true;
  }
  if (subscribers_.size() >= max) return false;
  subscribers_.emplace(key, 1);
  return true;
}
bool SessionNotes::HasSubscribers(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  return subscribers_.contains(key);
}
void SessionNotes::RemoveSubscriber(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto it = subscribers_.find(key);
  if (it == subscribers_.end()) return;
  if (--it->second <= 0) subscribers_.erase(it);
}

// --- Protocol --------------------------------------------------------------------------

// Each send counts for its window plus a twentieth: Emogg sees a send when it arrives,
// and a full window sent just after the previous one left ours would otherwise meet it
// in Emogg's window whenever the earlier one was delayed on the way.
namespace {
RateLimiter::Options WithDelaySlack(RateLimiter::Options o) {
  o.window += o.window / 20;
  return o;
}
}  // namespace

Protocol::Protocol(ProtocolOptions options)
    : options_(std::move(options)),
      rng_(core::Rng::FromEntropy()),
      ids_(rng_),
      limiter_(WithDelaySlack(options_.limits)) {
  if (options_.notes == nullptr) options_.notes = std::make_shared<SessionNotes>();
}

absl::StatusOr<core::HandshakeRequest> Protocol::PrepareHandshake() {
  if (pause_kind_ == DisconnectKind::kAuthRefused && TokenRotated()) ForgetRefusalOfOldToken();
  if (Clock::now() < not_before_) {
    // Local only: no connection is opened while Emogg asked us to stay away.
    refused_attempt_ = true;
    return pause_status_;
  }
  core::HandshakeRequest req;
  req.url = options_.url;
  req.headers = options_.headers;
  return req;
}

absl::StatusOr<core::LoginPlan> Protocol::OnOpen(std::string_view /*subprotocol*/) {
  const Clock::time_point now = Clock::now();
  last_inbound_ = now;
  ping_sent_.reset();
  ping_id_.clear();
  closing_.reset();
  options_.notes->SetClosing(std::nullopt);
  options_.notes->SetCloseCode(0);
  pending_subs_.clear();
  subs_.clear();
  latest_route_.clear();
  orphans_.clear();
  // The cached value: the refresher re-reads file and env secrets off this thread. The
  // version is read first, so a rotation in between is taken for one (harmless: one
  // reconnect with the normal backoff instead of the refusal pause).
  token_version_ = options_.token->version();
  absl::StatusOr<std::string> token = options_.token->Current();
  if (!token.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the Emogg token cannot be read: ", token.status().message()));
  }
  if (token->empty()) {
    return absl::FailedPreconditionError("the Emogg token is empty; set the token secret");
  }
  // Emogg terminates a connection whose first message is not auth:token, so the plan
  // is exactly that frame, and the session sends nothing else until its answer.
  CountControl(now);
  core::LoginPlan plan;
  plan.frames.push_back({EncodeAuth(ids_.Next(), *token), false});
  plan.wait = true;
  return plan;
}

void Protocol::CountControl(Clock::time_point now) {
  if (options_.rate_limit) limiter_.Record(now);
}

void Protocol::NotePause(std::string_view path) {
  const auto wall = std::chrono::system_clock::now();
  options_.notes->SetPause(SessionNotes::Pause{
      wall,
      wall + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                 options_.retry_after_429),
      std::string(path)});
}

void Protocol::NoteRefusal(Clock::time_point now, std::string_view what,
                           std::map<std::string, std::string> metadata) {
  not_before_ = std::max(not_before_, now + options_.auth_retry_pause);
  pause_kind_ = DisconnectKind::kAuthRefused;
  pause_status_ = core::WithErrorInfo(
      absl::UnauthenticatedError(absl::StrCat("Emogg refused the token (", Av(what),
                                              "); the bridge tries it again after ",
                                              Fmt(options_.auth_retry_pause),
                                              " (auth_retry_pause)")),
      "TOKEN_REFUSED", kErrorDomain, metadata);
}

void Protocol::ForgetRefusalOfOldToken() {
  if (pause_kind_ != DisconnectKind::kAuthRefused) return;
  not_before_ = {};
  pause_kind_ = DisconnectKind::kError;
  pause_status_ = absl::OkStatus();
}

core::Inbound Protocol::Decode(std::string_view payload, bool /*binary*/) {
  const Clock::time_point now = Clock::now();
  last_inbound_ = now;
  core::Inbound in;
  Frame f = DecodeFrame(payload);
  if (f.kind == FrameKind::kMalformed) {
    in.kind = core::Inbound::Kind::kMalformed;
    in.status = absl::InvalidArgumentError(f.reason);
    return in;
  }
  if (f.kind == FrameKind::kEvent) return DecodeEvent(f);

  // An answer. A closing status is remembered before anything else: the close that
  // follows is classified by it, and the requests it cuts off name it.
  if (StatusClosesConnection(f.status) && !closing_.has_value()) {
    closing_ = SessionNotes::Closing{f.status, f.path};
    options_.notes->SetClosing(closing_);
    if (f.status == 429) {
      // One whole upstream window before anything else is sent.
      limiter_.BlockUntil(now + options_.retry_after_429);
      not_before_ = std::max(not_before_, now + options_.retry_after_429);
      NotePause(f.path);
      pause_kind_ = DisconnectKind::kSlowDown;
      pause_status_ = core::WithErrorInfo(
          absl::ResourceExhaustedError(absl::StrCat(
              "Emogg answered 429 (too many requests); the bridge waits ",
              Fmt(options_.retry_after_429),
              " (rate_limit.retry_after_429) before it connects again")),
          "TOO_MANY_REQUESTS", kErrorDomain);
    } else if (f.status == 401 && !TokenRotated()) {
      // (A 401 after the token was rotated concerns the old value: no pause; Classify
      // and the login answer below reconnect with the new one.)
      NoteRefusal(now, absl::StrCat("401 to \"", f.path, "\""),
                  {{"upstream_status", "401"}, {"path", f.path}});
    }
  }

  if (f.kind == FrameKind::kAuthAnswer) {
    in.kind = core::Inbound::Kind::kLogin;
    if (!f.is_error()) {
      options_.notes->SetPause(std::nullopt);
      return in;
    }
    if (f.status == 401 && TokenRotated()) {
      // The old value was refused while the new one was being read: not a refusal of
      // the configured token, so the session reconnects at once with the new one.
      in.status = absl::UnavailableError(
          "Emogg refused the token as it was before a rotation; reconnecting with the new one");
    } else if (f.status == 401) {
      in.status = pause_status_;  // TOKEN_REFUSED: the session treats it as a refusal
    } else {
      in.status = UpstreamError(f, RedactMessage);
    }
    return in;
  }
  if (f.kind == FrameKind::kPingAnswer && (!f.has_id || f.id == ping_id_)) {
    // The heartbeat's answer (Emogg may answer with "id": null, like auth's).
    ping_sent_.reset();
    in.kind = core::Inbound::Kind::kHeartbeat;
    return in;
  }
  return DecodeAnswer(f);
}

core::Inbound Protocol::DecodeAnswer(const Frame& f) {
  core::Inbound in;
  in.kind = core::Inbound::Kind::kReply;
  in.route = f.id;  // "" (no id) routes nowhere: counted as unrouted
  if (f.path == kPathSubscribe) {
    auto pending = pending_subs_.find(f.id);
    std::shared_ptr<const ChannelParams> params;
    if (pending != pending_subs_.end()) {
      params = pending->second;
      pending_subs_.erase(pending);
    }
    if (f.is_error()) {
      in.status = UpstreamError(f, RedactMessage);
      return in;
    }
    if (f.subscribed_id.empty()) {
      in.status = core::WithErrorInfo(
          absl::InternalError("Emogg answered channels:subscribe without a subscriptionId"),
          "NO_SUBSCRIPTION_ID", kErrorDomain);
      return in;
    }
    if (params != nullptr) {
      const std::string key = SubscriptionKey(params->channel, params->key);
      auto latest = latest_route_.find(key);
      if (latest == latest_route_.end() || latest->second != f.id ||
          !options_.notes->HasSubscribers(key)) {
        // Acknowledged after its subscribers left (the session has forgotten it), or
        // superseded by a newer subscribe: release it so it does not hold one of
        // Emogg's per-connection slots until the connection ends.
        orphans_.push_back(f.subscribed_id);
        in.kind = core::Inbound::Kind::kIgnore;
        return in;
      }
      subs_[f.subscribed_id] = std::move(params);
    }
    in.event_route = f.subscribed_id;
    in.bare = true;
    return in;
  }
  if (f.is_error()) {
    in.status = UpstreamError(f, RedactMessage);
    return in;
  }
  auto a = std::make_shared<Answer>();
  a->status = f.status;
  a->path = f.path;
  a->body = std::string(f.body);
  in.payload = std::move(a);
  return in;
}

core::Inbound Protocol::DecodeEvent(const Frame& f) {
  core::Inbound in;
  in.kind = core::Inbound::Kind::kEvent;
  in.route = f.subscription_id;
  auto it = subs_.find(f.subscription_id);
  if (it == subs_.end()) return in;  // not ours (any more): the session counts it
  const ChannelParams& p = *it->second;
  auto update = std::make_shared<v1::SubscriptionUpdate>();
  v1::Event* ev = update->mutable_event();
  ev->set_subscription_id(p.subscription_id);
  if (f.timestamp_ms.has_value()) SetTimestamp(*f.timestamp_ms, ev->mutable_timestamp());
  ev->set_timestamp_raw(std::string(f.timestamp_raw));
  ev->set_type(f.type);
  ev->set_json_data(std::string(f.event_data));
  ev->set_upstream_subscription_id(f.subscription_id);
  if (ReplaysLastEventOnSubscribe(p.channel)) {
    options_.notes->SetLastEvent(SubscriptionKey(p.channel, p.key), update);
  }
  auto e = std::make_shared<ChannelEvent>();
  e->update = std::move(update);
  in.payload = std::move(e);
  return in;
}

std::string Protocol::NewRoute(std::string_view /*hint*/) {
  // Never "": every Emogg answer is matched by id.
  return ids_.Next();
}

absl::StatusOr<core::Outbound> Protocol::EncodeSubscribe(const std::string& key,
                                                         const core::PayloadPtr& params,
                                                         std::string_view route) {
  auto p = std::static_pointer_cast<const ChannelParams>(params);
  if (p == nullptr) return absl::InternalError("subscription without channel parameters");
  // A new upstream subscription sends its own last state: nothing old is replayed.
  options_.notes->SetLastEvent(key, nullptr);
  pending_subs_[std::string(route)] = p;
  latest_route_[key] = std::string(route);
  CountControl(Clock::now());
  return core::Outbound{emogg::EncodeSubscribe(route, p->channel, p->key), false};
}

std::optional<core::Outbound> Protocol::EncodeUnsubscribe(const std::string& key,
                                                          std::string_view event_route,
                                                          std::string_view route) {
  if (auto it = subs_.find(event_route); it != subs_.end()) subs_.erase(it);
  options_.notes->SetLastEvent(key, nullptr);
  CountControl(Clock::now());
  return core::Outbound{emogg::EncodeUnsubscribe(route, event_route), false};
}

std::optional<core::Outbound> Protocol::Heartbeat() {
  if (options_.heartbeat_interval <= core::Duration::zero()) return std::nullopt;
  const Clock::time_point now = Clock::now();
  if (!orphans_.empty() &&
      (!options_.rate_limit || limiter_.NextAllowed(RateLimiter::Priority::kControl, now) <= now)) {
    // One per tick; its answer goes nowhere (counted as unrouted).
    std::string orphan = std::move(orphans_.back());
    orphans_.pop_back();
    CountControl(now);
    return core::Outbound{emogg::EncodeUnsubscribe(ids_.Next(), orphan), false};
  }
  if (ping_sent_.has_value()) {
    if (last_inbound_ < *ping_sent_) return std::nullopt;  // still waiting for an answer
    ping_sent_.reset();
  }
  // Busy sessions never ping: answers and events already restart Emogg's idle timer.
  if (now - last_inbound_ < options_.heartbeat_interval) return std::nullopt;
  if (options_.rate_limit && limiter_.NextAllowed(RateLimiter::Priority::kControl, now) > now) {
    return std::nullopt;  // the window is full; the next tick tries again
  }
  CountControl(now);
  ping_id_ = ids_.Next();
  ping_sent_ = now;
  return core::Outbound{EncodePing(ping_id_), false};
}

absl::Status Protocol::CheckAlive() {
  if (!ping_sent_.has_value() || last_inbound_ >= *ping_sent_) return absl::OkStatus();
  if (Clock::now() - *ping_sent_ < options_.heartbeat_timeout) return absl::OkStatus();
  ping_sent_.reset();
  absl::Status st = absl::UnavailableError(absl::StrCat(
      "no answer from Emogg to a ping within ", Fmt(options_.heartbeat_timeout),
      " (heartbeat.timeout): the server looks dead"));
  options_.notes->SetLossReason(std::string(st.message()));
  return st;
}

// What each way of losing the connection does (Emogg's pages name no close codes, so
// every code is read as what it says in RFC 6455, never as more):
//  - after a closing answer (401, 405, 429) the close is its consequence, whatever its
//    code: 401 a refused token (calls fail TOKEN_REFUSED at once, the token is tried
//    again after auth_retry_pause), 429 slow down (nothing before retry_after_429;
//    requests fail fast meanwhile), 405 an ordinary close;
//  - 1008 policy violation without one: "Unauthorized" is a refused token and "Too Many
//    Requests" a slow down (the status titles Emogg's closes carry); any other 1008 is
//    an ordinary close: the next auth:token tells whether the token is the problem (a
//    401 then takes the refused-token path), so a policy close cannot become a fast loop
//    of refused logins, and repeated closes of accepted logins back off exponentially
//    (the backoff resets only after a connection stayed up for backoff.reset_after);
//  - 1001 going away (a server restarting), 1011 internal error, 1000 and any other
//    code: an ordinary close, reconnected with the normal backoff (1011 like a 500:
//    worth a retry); 1013 try again later is a slow down;
//  - no close frame (a drop, a reset, a dead server): the same, with no code.
// In-flight requests end OUTCOME_UNKNOWN with the close code (close_code) when there
// was one; subscriptions are restored with a gap whose reason names it.
DisconnectKind Protocol::Classify(const core::DisconnectInfo& info) {
  if (refused_attempt_) {
    refused_attempt_ = false;
    return pause_kind_;
  }
  DisconnectKind kind;
  if (closing_.has_value()) {
    // Emogg answered a closing status first; the close that follows is its consequence.
    kind = closing_->status == 401   ? DisconnectKind::kAuthRefused
           : closing_->status == 429 ? DisconnectKind::kSlowDown
                                     : DisconnectKind::kClosedByPeer;
  } else if (info.close_code == kPolicyViolation) {
    kind = info.close_reason == "Unauthorized"        ? DisconnectKind::kAuthRefused
           : info.close_reason == "Too Many Requests" ? DisconnectKind::kSlowDown
                                                      : DisconnectKind::kClosedByPeer;
  } else {
    kind = core::ClassifyDisconnect(info.http_status, info.close_code,
                                    info.retry_after > core::Duration::zero());
  }
  // A refusal that arrives after the token was rotated (the file or variable changed
  // since this connection authenticated) concerns the old value: reconnect with the new
  // one under the normal backoff, and keep the subscriptions (they are restored with a
  // gap) instead of failing everything as a refused token.
  const bool rotated = kind == DisconnectKind::kAuthRefused && TokenRotated();
  if (rotated) {
    kind = DisconnectKind::kClosedByPeer;
    ForgetRefusalOfOldToken();
  } else if (kind == DisconnectKind::kAuthRefused && !closing_.has_value()) {
    // A refusing close without a 401 answer: the same pause as after one, so no
    // connection is opened before auth_retry_pause whatever the backoff's jitter drew.
    NoteRefusal(Clock::now(), absl::StrCat("close ", info.close_code, " \"", info.close_reason, "\""),
                {{"close_code", absl::StrCat(info.close_code)}});
  }
  if (kind == DisconnectKind::kSlowDown && !closing_.has_value()) {
    // A slow-down close without a 429 answer: the connection waits slow_down_delay
    // (retry_after_429) all the same, and requests fail fast meanwhile.
    NotePause("");
  }
  if (info.was_open) {
    options_.notes->SetCloseCode(info.close_code);
    std::string reason =
        closing_.has_value()
            ? absl::StrCat("Emogg closed the connection after answering \"", closing_->path,
                           "\" with status ", closing_->status)
            : std::string(info.reason.message());
    if (rotated) absl::StrAppend(&reason, "; the token had been rotated, the new one is used");
    options_.notes->SetLossReason(std::move(reason));
  }
  return kind;
}

std::optional<core::Clock::time_point> Protocol::When(uint64_t /*cost*/, Clock::time_point now) {
  const Clock::time_point at = limiter_.NextAllowed(RateLimiter::Priority::kRequest, now);
  options_.notes->SetRateLimited(at > now);
  return at;
}

void Protocol::Sent(uint64_t /*id*/, uint64_t /*cost*/, Clock::time_point now) {
  if (!limiter_.TryAcquire(RateLimiter::Priority::kRequest, now)) limiter_.Record(now);
}

}  // namespace wsbridge::emogg
