#include "bridges/nexora/protocol.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"
#include "bridges/core/strings.h"

namespace wsbridge::nexora {
namespace {

constexpr std::string_view kLog = "nexora";

std::string Fmt(core::Duration d) { return absl::FormatDuration(absl::FromChrono(d)); }

// A refusal by the upstream (or a credential that cannot be used as configured), as
// opposed to a transient failure worth a quick retry.
bool IsRefusal(absl::StatusCode code) {
  return code == absl::StatusCode::kUnauthenticated ||
         code == absl::StatusCode::kPermissionDenied ||
         code == absl::StatusCode::kInvalidArgument;
}

}  // namespace

// ---------------------------------------------------------------------------------
// Tokens.

absl::StatusOr<Token> StaticToken::Current() {
  absl::StatusOr<std::string> v = source_->Current();
  if (!v.ok()) {
    return absl::UnauthenticatedError(
        absl::StrCat("the configured Nexora API key cannot be read: ", v.status().message()));
  }
  if (v->empty()) return absl::UnauthenticatedError("the Nexora token is empty");
  return Token{*std::move(v), source_->version()};
}

bool StaticToken::Refresh(uint64_t generation) {
  if (source_->version() != generation) return true;  // already re-read with another value
  if (reread_) reread_();  // perhaps rotated: the next attempt (or call) sees it
  return false;
}

uint64_t LoginToken::SecretsVersion() const {
  return (options_.email->version() << 32) ^ options_.password->version();
}

int LoginToken::logins() const {
  absl::MutexLock lock(&mu_);
  return logins_;
}

absl::StatusOr<Token> LoginToken::Current() {
  absl::MutexLock lock(&mu_);
  if (!token_.empty()) return Token{token_, generation_};
  if (!refused_.ok()) {
    if (std::chrono::steady_clock::now() < refused_until_ && SecretsVersion() == refused_secrets_) {
      return refused_;
    }
    refused_ = absl::OkStatus();
  }
  StartLoginLocked();
  if (!refused_.ok()) return refused_;
  std::string text = "waiting for the Nexora login (POST /api/auth/login) to return a token";
  if (!last_error_.ok()) absl::StrAppend(&text, "; the last attempt failed: ", last_error_.message());
  return absl::UnavailableError(text);
}

void LoginToken::WithToken(std::function<void(absl::StatusOr<Token>)> done) {
  absl::StatusOr<Token> now;
  {
    absl::MutexLock lock(&mu_);
    if (!token_.empty()) {
      now = Token{token_, generation_};
    } else if (!refused_.ok() && std::chrono::steady_clock::now() < refused_until_ &&
               SecretsVersion() == refused_secrets_) {
      now = refused_;
    } else {
      refused_ = absl::OkStatus();
      waiters_.push_back(std::move(done));
      StartLoginLocked();
      if (in_flight_) return;
      // Failed before any request (a secret cannot be read).
      done = std::move(waiters_.back());
      waiters_.pop_back();
      now = refused_;
    }
  }
  done(std::move(now));
}

bool LoginToken::Refresh(uint64_t generation) {
  absl::MutexLock lock(&mu_);
  if (generation < generation_ || in_flight_) return true;  // a newer token is (being) made
  if (!refused_.ok() && std::chrono::steady_clock::now() < refused_until_ &&
      SecretsVersion() == refused_secrets_) {
    return false;
  }
  refused_ = absl::OkStatus();
  token_.clear();  // refused: nobody connects with it again
  StartLoginLocked();
  return in_flight_;
}

void LoginToken::StartLoginLocked() {
  if (in_flight_) return;
  absl::StatusOr<std::string> email = options_.email->Current();
  absl::StatusOr<std::string> password = options_.password->Current();
  if (!email.ok() || !password.ok()) {
    refused_ = absl::UnauthenticatedError(absl::StrCat(
        "the Nexora ", email.ok() ? "password" : "email", " secret cannot be read: ",
        (email.ok() ? password.status() : email.status()).message()));
    refused_until_ = std::chrono::steady_clock::now() + options_.retry_after;
    refused_secrets_ = SecretsVersion();
    return;
  }
  in_flight_ = true;
  const uint64_t secrets = SecretsVersion();
  log::Info(kLog, "logging in to get a token", {{"url", log::RedactUrl(options_.login_url)}});
  options_.http->PostJson(options_.login_url, EncodeLoginBody(*email, *password), {},
                          [self = shared_from_this(), secrets](absl::StatusOr<core::HttpAnswer> a) {
                            self->OnLogin(std::move(a), secrets);
                          });
}

void LoginToken::OnLogin(absl::StatusOr<core::HttpAnswer> answer, uint64_t secrets) {
  std::vector<std::function<void(absl::StatusOr<Token>)>> waiters;
  absl::StatusOr<Token> result;
  {
    absl::MutexLock lock(&mu_);
    in_flight_ = false;
    if (!answer.ok()) {
      last_error_ = absl::Status(answer.status().code(),
                                 absl::StrCat("the Nexora login failed: ", answer.status().message()));
      result = last_error_;
    } else if (answer->status / 100 == 2) {
      absl::StatusOr<LoginAnswer> login = DecodeLoginAnswer(answer->body);
      if (!login.ok()) {
        last_error_ = login.status();
        result = last_error_;
      } else {
        // Every later log line and error message shows it as [redacted].
        log::RegisterSecret(login->access_token);
        token_ = std::move(login->access_token);
        ++generation_;
        ++logins_;
        last_error_ = absl::OkStatus();
        result = Token{token_, generation_};
      }
    } else {
      absl::Status st = HttpError(answer->status, answer->body, "login (POST /api/auth/login)");
      if (IsRefusal(st.code())) {
        // Wrong email or password: hold the refusal, no login storm.
        refused_ = st;
        refused_until_ = std::chrono::steady_clock::now() + options_.retry_after;
        refused_secrets_ = secrets;
        log::Warn(kLog, "the login was refused", {{"status", absl::StrCat(answer->status)}});
      } else {
        last_error_ = st;
      }
      result = st;
    }
    waiters = std::move(waiters_);
    waiters_.clear();
  }
  for (auto& w : waiters) w(result);
}

// ---------------------------------------------------------------------------------
// ChatLink and UpstreamHealth.

uint64_t ChatLink::Add(bool wait_for_ready, const std::atomic<bool>* sent, Fail fail) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  waiters_.emplace(id, Waiter{wait_for_ready, sent, std::move(fail)});
  return id;
}

void ChatLink::Remove(uint64_t id) {
  Fail gone;  // destroyed outside the lock: it may hold the last reference to a call
  absl::MutexLock lock(&mu_);
  if (auto it = waiters_.find(id); it != waiters_.end()) {
    gone = std::move(it->second.fail);
    waiters_.erase(it);
  }
}

absl::Status ChatLink::Refusal() const {
  absl::MutexLock lock(&mu_);
  return refusal_;
}

std::string ChatLink::LastDrop() const {
  absl::MutexLock lock(&mu_);
  return last_drop_;
}

void ChatLink::Opened() {
  absl::MutexLock lock(&mu_);
  refusal_ = absl::OkStatus();
}

void ChatLink::Dropped(std::string why) {
  absl::MutexLock lock(&mu_);
  last_drop_ = std::move(why);
}

void ChatLink::SetRefusal(absl::Status refusal) {
  absl::MutexLock lock(&mu_);
  refusal_ = std::move(refusal);
}

void ChatLink::FailWaiting(const absl::Status& status, bool definitive) {
  std::vector<Fail> failing;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      const Waiter& w = it->second;
      if (!definitive && (w.wait_for_ready || (w.sent != nullptr && w.sent->load()))) {
        ++it;
        continue;
      }
      failing.push_back(std::move(it->second.fail));
      it = waiters_.erase(it);
    }
  }
  for (Fail& f : failing) f(status);
}

void UpstreamHealth::SetFailing(bool& failing, bool now) {
  if (failing == now) return;
  failing = now;
  const int before = now ? failing_.fetch_add(1) : failing_.fetch_sub(1);
  // Serving changes only when the first socket starts failing or the last one recovers.
  if ((before == 0 || (before == 1 && !now)) && changed_) changed_();
}

// ---------------------------------------------------------------------------------
// Protocol.

Protocol::Protocol(ProtocolOptions options) : options_(std::move(options)) {
  // Split the URL into scheme://authority and the path prefix (kept before /api/ws).
  const std::string& url = options_.url;
  size_t start = url.find("://");
  start = start == std::string::npos ? 0 : start + 3;
  size_t slash = url.find_first_of("/?#", start);
  base_ = url.substr(0, slash);
  if (slash != std::string::npos && url[slash] == '/') {
    base_path_ = url.substr(slash, url.find_first_of("?#", slash) - slash);
  }
  last_rx_ = options_.now();
}

Protocol::~Protocol() {
  // A closed chat socket no longer counts against the bridge's health.
  if (options_.health != nullptr) options_.health->SetFailing(failing_, false);
}

absl::StatusOr<core::HandshakeRequest> Protocol::PrepareHandshake() {
  prepare_status_ = absl::OkStatus();
  absl::StatusOr<Token> token = options_.token->Current();
  if (!token.ok()) {
    // Without its ErrorInfo payload: the connection logs the reason as text.
    prepare_status_ = absl::Status(token.status().code(), token.status().message());
    return prepare_status_;
  }
  absl::StatusOr<std::string> target = SocketTarget(base_path_, options_.chat_id, token->value);
  if (!target.ok()) {
    prepare_status_ = target.status();
    return target.status();
  }
  generation_ = token->generation;
  core::HandshakeRequest req;
  req.url = absl::StrCat(base_, *target);
  req.headers = options_.headers;
  return req;
}

absl::StatusOr<core::LoginPlan> Protocol::OnOpen(std::string_view /*subprotocol*/) {
  gate_.Reset();
  refreshed_ = false;
  failed_attempts_ = 0;
  if (options_.health != nullptr) options_.health->SetFailing(failing_, false);
  if (options_.link != nullptr) options_.link->Opened();
  last_rx_ = options_.now();
  ping_sent_.reset();
  return core::LoginPlan{};  // the token was in the URL: usable at once
}

core::Inbound Protocol::Decode(std::string_view frame, bool binary) {
  core::Inbound in;
  last_rx_ = options_.now();
  ping_sent_.reset();  // any frame shows the socket is alive
  if (binary) {
    in.kind = core::Inbound::Kind::kMalformed;
    in.status = absl::InvalidArgumentError("Nexora sent a binary frame; its events are JSON text");
    return in;
  }
  absl::StatusOr<Event> ev = DecodeEvent(frame);
  if (!ev.ok()) {
    in.kind = core::Inbound::Kind::kMalformed;
    in.status = ev.status();
    return in;
  }
  if (ev->kind == EventKind::kPong) {
    in.kind = core::Inbound::Kind::kHeartbeat;
    return in;
  }
  auto payload = std::make_shared<EventPayload>();
  const bool ends = ev->ends_answer();
  payload->event = *std::move(ev);
  if (gate_.busy()) {
    // The message in flight (sent without a route: answered in send order).
    in.kind = core::Inbound::Kind::kReply;
    in.final = ends;
    in.payload = std::move(payload);
    return in;
  }
  if (gate_.stale()) {
    // The rest of an answer whose caller went away; the socket is replaced shortly.
    in.kind = core::Inbound::Kind::kIgnore;
    return in;
  }
  in.kind = core::Inbound::Kind::kEvent;
  in.route = std::string(kChatRoute);
  in.payload = std::move(payload);
  return in;
}

std::optional<core::Outbound> Protocol::Heartbeat() {
  const core::Clock::time_point now = options_.now();
  if (ping_sent_.has_value() || now - last_rx_ < options_.ping_interval) return std::nullopt;
  ping_sent_ = now;
  return core::Outbound{std::string(PingFrame()), false};
}

absl::Status Protocol::CheckAlive() {
  if (gate_.stale()) {
    return absl::AbortedError(
        "an answer was abandoned mid-stream (silent past answer_idle_timeout); replacing the "
        "socket so its remaining events cannot be taken for the next message's");
  }
  if (ping_sent_.has_value() && options_.now() - *ping_sent_ >= options_.pong_timeout) {
    return absl::UnavailableError(absl::StrCat("Nexora sent nothing for ", Fmt(options_.pong_timeout),
                                               " after a JSON ping: the socket is dead"));
  }
  return absl::OkStatus();
}

core::DisconnectKind Protocol::Classify(const core::DisconnectInfo& info) {
  if (info.http_status == 0 && info.close_code == 0 && !prepare_status_.ok()) {
    // PrepareHandshake failed: no token yet (a login under way) or a refused one.
    return IsRefusal(prepare_status_.code()) ? core::DisconnectKind::kAuthRefused
                                             : core::DisconnectKind::kError;
  }
  core::DisconnectKind kind = core::ClassifyDisconnect(info.http_status, info.close_code,
                                                       info.retry_after > core::Duration::zero());
  if (info.was_open && options_.link != nullptr) {
    options_.link->Dropped(std::string(info.reason.message()));
  }
  if (kind == core::DisconnectKind::kAuthRefused) {
    // A 401 at the upgrade is an expired or revoked token. Nexora checks the token at the
    // upgrade only, so an open socket closed with 1008 (policy violation; 4001/4401 alike)
    // most plausibly means the same (a revoked key, a JWT the server stopped honouring):
    // with a token that may have changed, one reconnect with the new one at the normal
    // pace (the message in flight is resent); else the refusal stands. 403 (and
    // 4003/4403) forbid this chat to a valid token: no new token helps.
    const bool renewable = info.http_status == 401 || info.close_code == 1008 ||
                           info.close_code == 4001 || info.close_code == 4401;
    if (renewable && !refreshed_ && options_.token->Refresh(generation_)) {
      refreshed_ = true;
      log::Info(kLog, "the token was refused; reconnecting with a fresh one",
                {{"chat", options_.chat_id},
                 {"http_status", absl::StrCat(info.http_status)},
                 {"close_code", absl::StrCat(info.close_code)}});
      return core::DisconnectKind::kError;
    }
    refreshed_ = false;  // after the auth backoff, one more refresh may be tried
    return kind;
  }
  if (info.was_open) return kind;  // a drop: the next attempt (and resend) is the answer
  // An attempt that never opened.
  ++failed_attempts_;
  const int http = info.http_status;
  if (http >= 400 && http < 500 && http != 408 && http != 429) {
    // Refused for this chat (400/404 unknown chat, 409, 410, 422): the upstream answered,
    // so it is reachable; no retry fixes the request, so nobody waits for one.
    absl::Status st = HttpError(http, info.http_body,
                                absl::StrCat("the socket of chat ", options_.chat_id,
                                             " (GET /api/ws/{chat_id})"),
                                "; nothing was sent");
    if (options_.health != nullptr) options_.health->SetFailing(failing_, false);
    if (options_.link != nullptr) {
      options_.link->SetRefusal(st);
      options_.link->FailWaiting(st, /*definitive=*/true);
    }
    return kind;
  }
  if (options_.health != nullptr) options_.health->SetFailing(failing_, true);
  if (options_.link == nullptr) return kind;
  const std::string what =
      absl::StrCat("the socket of chat ", options_.chat_id, " (GET /api/ws/{chat_id})");
  if (kind == core::DisconnectKind::kSlowDown) {
    // 429 (or 503 with Retry-After): the next attempt waits for the slow-down delay, far
    // longer than a caller should wait without asking to.
    options_.link->FailWaiting(
        HttpError(http, info.http_body, what,
                  absl::StrCat("; nothing was sent; retry later",
                               info.retry_after > core::Duration::zero()
                                   ? absl::StrCat(" (Retry-After ", Fmt(info.retry_after), ")")
                                   : "")),
        /*definitive=*/false);
  } else if (failed_attempts_ >= kAttemptsBeforeFailing) {
    const std::string last = http != 0 ? std::string(HttpError(http, info.http_body, what).message())
                                       : std::string(info.reason.message());
    std::map<std::string, std::string> metadata{{"attempts", absl::StrCat(failed_attempts_)}};
    if (http != 0) metadata["upstream_status"] = absl::StrCat(http);
    options_.link->FailWaiting(
        core::WithErrorInfo(
            absl::UnavailableError(absl::StrCat(
                "the socket of chat ", options_.chat_id, " could not be opened in ",
                failed_attempts_, " attempts (last: ", last,
                "); nothing was sent; retry later, or send \"", Av(core::kWaitForReadyMetadata),
                ": true\" metadata to wait for the upstream")),
            "UPSTREAM_UNREACHABLE", kErrorDomain, metadata),
        /*definitive=*/false);
  }
  return kind;
}

}  // namespace wsbridge::nexora
