#include "bridges/nexora/protocol.h"

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

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
  if (info.http_status == 401) {
    // An expired JWT: log in again once, then reconnect at the normal pace.
    if (!refreshed_ && options_.token->Refresh(generation_)) {
      refreshed_ = true;
      log::Info(kLog, "the token was refused at the upgrade; logging in again",
                {{"chat", options_.chat_id}});
      return core::DisconnectKind::kError;
    }
    refreshed_ = false;  // after the auth backoff, one more login may be tried
    return core::DisconnectKind::kAuthRefused;
  }
  if (info.http_status == 0 && info.close_code == 0 && !prepare_status_.ok()) {
    // PrepareHandshake failed: no token yet (a login under way) or a refused one.
    return IsRefusal(prepare_status_.code()) ? core::DisconnectKind::kAuthRefused
                                             : core::DisconnectKind::kError;
  }
  return core::ClassifyDisconnect(info.http_status, info.close_code,
                                  info.retry_after > core::Duration::zero());
}

}  // namespace wsbridge::nexora
