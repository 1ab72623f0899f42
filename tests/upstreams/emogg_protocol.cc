#include "tests/upstreams/emogg_protocol.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <ctime>
#include <utility>

#include <boost/json.hpp>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using std::chrono::milliseconds;

constexpr uint16_t kPolicyViolation = 1008;

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::string Base36(uint64_t v) {
  static constexpr char kDigits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
  std::string out;
  do {
    out.insert(out.begin(), kDigits[v % 36]);
    v /= 36;
  } while (v != 0);
  return out;
}

std::string IsoTime(int64_t unix_ms) {
  std::time_t secs = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(unix_ms % 1000));
  return buf;
}

const char* Title(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Malformed Payload";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    default: return "Error";
  }
}

bool ClosesConnection(int status) { return status == 401 || status == 405 || status == 429; }

// The channel pages' ChannelUpdateFrequency values.
std::optional<milliseconds> Frequency(std::string_view f) {
  static const std::array<std::pair<std::string_view, int64_t>, 8> kValues = {{
      {"1s", 1000}, {"3s", 3000}, {"5s", 5000}, {"10s", 10000},
      {"30s", 30000}, {"1m", 60000}, {"5m", 300000}, {"10m", 600000},
  }};
  for (const auto& [name, ms] : kValues) {
    if (name == f) return milliseconds(ms);
  }
  return std::nullopt;
}

const json::string* StringMember(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  if (it == o.end() || !it->value().is_string()) return nullptr;
  return &it->value().get_string();
}

}  // namespace

// A message that passed the structure check.
struct EmoggProtocol::Request {
  json::value id;  // null when absent
  std::string path;
  json::object body;
  bool has_body = false;
};

EmoggProtocol::EmoggProtocol(EmoggProtocolOptions options)
    : options_(std::move(options)), id_state_(options_.id_seed) {}

void EmoggProtocol::OnOpen(uint64_t conn, EmoggTime now) {
  Conn c;
  c.opened = now.mono;
  c.last_sent = now.mono;
  conns_[conn] = std::move(c);
}

void EmoggProtocol::OnClose(uint64_t conn) {
  conns_.erase(conn);
  std::erase_if(delayed_, [&](const Delayed& d) { return d.action.conn == conn; });
}

void EmoggProtocol::SetRateLimit(int max_messages, milliseconds window) {
  options_.max_messages = max_messages;
  options_.rate_window = window;
}

void EmoggProtocol::SetEventInterval(std::optional<milliseconds> interval) {
  options_.event_interval = interval;
}

bool EmoggProtocol::TokenAccepted(std::string_view token) const {
  if (token.empty()) return false;
  if (std::find(revoked_.begin(), revoked_.end(), token) != revoked_.end()) return false;
  if (options_.tokens.empty()) return !token.starts_with("bad");
  return std::find(options_.tokens.begin(), options_.tokens.end(), token) != options_.tokens.end();
}

bool EmoggProtocol::SessionKnown(std::string_view session_id) const {
  if (options_.known_sessions.empty()) return !session_id.starts_with("unknown");
  return std::find(options_.known_sessions.begin(), options_.known_sessions.end(), session_id) !=
         options_.known_sessions.end();
}

// --- Builders ------------------------------------------------------------------------

EmoggAction EmoggProtocol::Send(uint64_t conn, Conn& c, std::string text, EmoggTime now) {
  c.last_sent = now.mono;
  EmoggAction a;
  a.conn = conn;
  a.kind = EmoggAction::Kind::kSend;
  a.text = std::move(text);
  return a;
}

EmoggAction EmoggProtocol::Close(uint64_t conn, Conn& c, uint16_t code, std::string reason) {
  c.closing = true;
  server_close_codes_.push_back(code);
  EmoggAction a;
  a.conn = conn;
  a.kind = EmoggAction::Kind::kClose;
  a.close_code = code;
  a.close_reason = std::move(reason);
  return a;
}

EmoggAction EmoggProtocol::Drop(uint64_t conn, Conn& c) {
  c.closing = true;
  EmoggAction a;
  a.conn = conn;
  a.kind = EmoggAction::Kind::kDrop;
  return a;
}

std::vector<EmoggAction> EmoggProtocol::Answer(uint64_t conn, Conn& c, const Request& req,
                                               int status, std::string body_json, EmoggTime now) {
  json::object o;
  o["id"] = req.id;
  o["path"] = req.path;
  o["status"] = status;
  std::string text = json::serialize(o);
  if (!body_json.empty()) {
    text.pop_back();  // splice the body in as given (echo keeps the caller's bytes' meaning)
    text += ",\"body\":" + body_json + "}";
  }
  ++answers_by_status_[status];
  if (answer_delay_.count() > 0) {
    EmoggAction a;
    a.conn = conn;
    a.text = std::move(text);
    delayed_.push_back(Delayed{now.mono + answer_delay_, delayed_seq_++, std::move(a)});
    return {};
  }
  return {Send(conn, c, std::move(text), now)};
}

std::vector<EmoggAction> EmoggProtocol::Error(uint64_t conn, Conn& c, const Request& req,
                                              int status, std::string_view message,
                                              EmoggTime now) {
  json::object data;
  data["message"] = message;
  json::object o;
  o["error"] = true;
  o["id"] = req.id;
  if (req.path.empty()) {
    o["path"] = nullptr;
  } else {
    o["path"] = req.path;
  }
  o["status"] = status;
  o["data"] = std::move(data);
  ++answers_by_status_[status];
  // Errors are never delayed: a closing status must leave before the close.
  std::vector<EmoggAction> out = {Send(conn, c, json::serialize(o), now)};
  if (ClosesConnection(status)) out.push_back(Close(conn, c, kPolicyViolation, Title(status)));
  return out;
}

// --- Frames --------------------------------------------------------------------------

std::vector<EmoggAction> EmoggProtocol::OnFrame(uint64_t conn, std::string_view frame,
                                                EmoggTime now) {
  auto cit = conns_.find(conn);
  if (cit == conns_.end()) return {};
  Conn& c = cit->second;
  if (c.closing || silent_) return {};
  ++c.frames;
  if (drop_after_frames_ >= 0 && c.frames >= drop_after_frames_) return {Drop(conn, c)};

  // Structure: a JSON object, string path, id number or string (<= 36), body object.
  Request req;
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(frame.data(), frame.size()), ec);
  auto malformed = [&](std::string_view why) {
    ++requests_by_path_[req.path.empty() ? "<malformed>" : req.path];
    return Error(conn, c, req, 405, std::string("Malformed payload: ") + std::string(why), now);
  };
  if (ec) return malformed("the message is not valid JSON");
  if (!v.is_object()) return malformed("the message must be a JSON object");
  json::object& o = v.get_object();
  if (auto it = o.find("id"); it != o.end()) {
    const json::value& id = it->value();
    if (id.is_string() && id.get_string().size() <= 36) {
      req.id = id;
    } else if (id.is_number()) {
      req.id = id;
    } else if (!id.is_null()) {
      return malformed("id must be a number or a string of up to 36 characters");
    }
  }
  const json::string* path = StringMember(o, "path");
  if (path == nullptr || path->empty()) return malformed("path (string) is required");
  req.path = std::string(*path);
  if (auto it = o.find("body"); it != o.end()) {
    if (!it->value().is_object()) return malformed("body must be an object");
    req.body = std::move(it->value().get_object());
    req.has_body = true;
  }
  ++requests_by_path_[req.path];

  if (!c.authed && req.path != "auth:token") {
    // "If your first request is other than an authentication message the connection
    // will be terminated by the server immediately."
    ++frames_before_auth_;
    return {Drop(conn, c)};
  }
  if (req.path == "auth:token") return Auth(conn, c, req, now);
  if (OverRateLimit(c.token, now.mono)) {
    return Error(conn, c, req, 429, "Too many requests", now);
  }
  return Handle(conn, c, req, now);
}

bool EmoggProtocol::OverRateLimit(const std::string& token, EmoggClock::time_point now) {
  std::deque<EmoggClock::time_point>& window = rate_by_token_[token];
  while (!window.empty() && window.front() <= now - options_.rate_window) window.pop_front();
  if (static_cast<int>(window.size()) >= options_.max_messages) return true;
  window.push_back(now);
  return false;
}

std::vector<EmoggAction> EmoggProtocol::Auth(uint64_t conn, Conn& c, const Request& req,
                                             EmoggTime now) {
  const json::string* token = req.has_body ? StringMember(req.body, "token") : nullptr;
  if (refuse_auth_ || token == nullptr || !TokenAccepted(std::string_view(*token))) {
    ++auth_failures_;
    c.authed = false;
    return Error(conn, c, req, 401, "Invalid token", now);
  }
  std::string t(*token);
  if (OverRateLimit(t, now.mono)) return Error(conn, c, req, 429, "Too many requests", now);
  c.authed = true;
  c.token = std::move(t);
  ++auth_successes_;
  std::vector<EmoggAction> out = Answer(conn, c, req, 200, "", now);
  if (close_after_auth_code_ != 0) {
    out.push_back(Close(conn, c, close_after_auth_code_, close_after_auth_reason_));
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::Handle(uint64_t conn, Conn& c, const Request& req,
                                               EmoggTime now) {
  const std::string& p = req.path;
  if (p == "ping") {
    json::object body;
    body["ts"] = IsoTime(now.unix_ms);
    return Answer(conn, c, req, 200, json::serialize(body), now);
  }
  if (p == "channels:subscribe") return Subscribe(conn, c, req, now);
  if (p == "channels:unsubscribe") return Unsubscribe(conn, c, req, now);
  if (p == "sessions:get") return SessionsGet(conn, c, req, now);
  if (p == "emulator:echo") {
    return Answer(conn, c, req, 200, req.has_body ? json::serialize(req.body) : "{}", now);
  }
  if (p == "emulator:fail") return Error(conn, c, req, 500, "Internal server error", now);
  if (p == "emulator:status") {
    // Any error status on demand (401/405/429 close the connection, as for real ones).
    int64_t status = 500;
    if (auto it = req.body.find("status"); it != req.body.end() && it->value().is_int64()) {
      status = std::clamp<int64_t>(it->value().get_int64(), 400, 599);
    }
    const json::string* msg = StringMember(req.body, "message");
    return Error(conn, c, req, static_cast<int>(status),
                 msg != nullptr ? std::string_view(*msg) : std::string_view("Forced error"), now);
  }
  if (p == "emulator:slow") {
    int64_t ms = 0;
    if (auto it = req.body.find("ms"); it != req.body.end() && it->value().is_int64()) {
      ms = std::clamp<int64_t>(it->value().get_int64(), 0, 600000);
    }
    json::object o;
    o["id"] = req.id;
    o["path"] = req.path;
    o["status"] = 200;
    o["body"] = json::object();
    ++answers_by_status_[200];
    EmoggAction a;
    a.conn = conn;
    a.text = json::serialize(o);
    delayed_.push_back(
        Delayed{now.mono + answer_delay_ + milliseconds(ms), delayed_seq_++, std::move(a)});
    return {};
  }
  return Error(conn, c, req, 404, "Path not found", now);
}

std::vector<EmoggAction> EmoggProtocol::SessionsGet(uint64_t conn, Conn& c, const Request& req,
                                                    EmoggTime now) {
  const json::string* sid = StringMember(req.body, "sessionId");
  if (sid == nullptr || sid->empty()) {
    return Error(conn, c, req, 400, "sessionId (string) is required", now);
  }
  if (!SessionKnown(std::string_view(*sid))) return Error(conn, c, req, 404, "Session not found", now);
  json::object body;
  body["id"] = *sid;
  body["name"] = "Session " + std::string(*sid);
  body["status"] = "active";
  return Answer(conn, c, req, 200, json::serialize(body), now);
}

int EmoggProtocol::UserSubscriptions(const std::string& token) const {
  int n = 0;
  for (const auto& [id, c] : conns_) {
    if (c.authed && c.token == token) n += static_cast<int>(c.subs.size());
  }
  return n;
}

std::string EmoggProtocol::NewSubscriptionId(int64_t unix_ms) {
  // Like the pages' "luug96xrbbc594": the time in base 36 and a random tail.
  std::string tail = Base36(SplitMix64(id_state_));
  return Base36(static_cast<uint64_t>(std::max<int64_t>(unix_ms, 0))) + tail.substr(0, 6);
}

std::vector<EmoggAction> EmoggProtocol::Subscribe(uint64_t conn, Conn& c, const Request& req,
                                                  EmoggTime now) {
  const json::string* channel = StringMember(req.body, "channel");
  const json::string* key = StringMember(req.body, "key");
  if (channel == nullptr || key == nullptr) {
    return Error(conn, c, req, 400, "channel and key (strings) are required", now);
  }
  Subscription s;
  s.channel = std::string(*channel);
  s.key = std::string(*key);
  if (s.channel == "session_emotions_counts" || s.channel == "session_emotions_intensities") {
    s.type = s.channel == "session_emotions_counts" ? "sec" : "sei";
    size_t colon = s.key.rfind(':');
    std::optional<milliseconds> freq =
        colon == std::string::npos ? std::nullopt
                                   : Frequency(std::string_view(s.key).substr(colon + 1));
    if (colon == 0 || !freq) {
      return Error(conn, c, req, 400,
                   "key must be sessionId:frequency with frequency one of 1s, 3s, 5s, 10s, "
                   "30s, 1m, 5m, 10m",
                   now);
    }
    s.session_id = s.key.substr(0, colon);
    s.period = *freq;
  } else if (s.channel == "session_worker_state") {
    s.type = "sws";
    if (s.key.empty() || s.key.find(':') != std::string::npos) {
      return Error(conn, c, req, 400, "key must be a sessionId", now);
    }
    s.session_id = s.key;
  } else {
    return Error(conn, c, req, 400, "channel is not one of the available channels", now);
  }
  if (!SessionKnown(s.session_id)) {
    return Error(conn, c, req, 404,
                 "Channel and key combination not found or you do not have permissions for it",
                 now);
  }
  if (static_cast<int>(c.subs.size()) >= options_.max_subscriptions_per_connection) {
    return Error(conn, c, req, 400, "Subscription limit reached for this connection", now);
  }
  if (UserSubscriptions(c.token) >= options_.max_subscriptions_per_user) {
    return Error(conn, c, req, 400, "Subscription limit reached for this user", now);
  }
  std::string id = NewSubscriptionId(now.unix_ms);
  while (c.subs.count(id) != 0) id = NewSubscriptionId(now.unix_ms);
  if (s.type != "sws") {
    milliseconds period = options_.event_interval.value_or(s.period);
    s.next_event = period.count() > 0 ? now.mono + period : EmoggClock::time_point::max();
  } else {
    s.next_event = EmoggClock::time_point::max();
  }
  json::object body;
  body["subscriptionId"] = id;
  std::vector<EmoggAction> out = Answer(conn, c, req, 200, json::serialize(body), now);
  Subscription& stored = c.subs.emplace(id, std::move(s)).first->second;
  if (stored.type == "sws") {
    // "When subscribing to this channel the last known state (if any) for the worker
    // will be sent immediately."
    auto [it, inserted] = worker_state_.try_emplace(stored.session_id, "working");
    std::string frame = EventFrame(id, stored, now.unix_ms, it->second);
    if (answer_delay_.count() > 0) {
      EmoggAction a;
      a.conn = conn;
      a.text = std::move(frame);
      delayed_.push_back(Delayed{now.mono + answer_delay_, delayed_seq_++, std::move(a)});
    } else {
      out.push_back(Send(conn, c, std::move(frame), now));
    }
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::Unsubscribe(uint64_t conn, Conn& c, const Request& req,
                                                    EmoggTime now) {
  const json::string* id = StringMember(req.body, "subscriptionId");
  if (id == nullptr) return Error(conn, c, req, 400, "subscriptionId (string) is required", now);
  auto it = c.subs.find(std::string(*id));
  if (it == c.subs.end()) return Error(conn, c, req, 404, "Subscription not found", now);
  c.subs.erase(it);
  return Answer(conn, c, req, 200, "{}", now);
}

std::string EmoggProtocol::EventFrame(const std::string& sub_id, Subscription& s,
                                      int64_t unix_ms, std::string_view worker_state) {
  ++events_sent_;
  const uint64_t n = ++s.seq;
  json::array data;
  if (s.type == "sws") {
    data.emplace_back(worker_state);
  } else if (s.type == "sec") {
    json::object counts;
    counts["exaltation"] = n % 40;
    counts["focus"] = (n * 7) % 30;
    counts["seq"] = n;
    data.emplace_back(std::move(counts));
  } else {
    json::object intensities;
    json::object focus;
    focus["people"] = 1 + n % 5;
    focus["quantity"] = static_cast<double>(n % 100) / 8.0;
    focus["intensity"] = static_cast<double>(n % 8) / 8.0;
    intensities["focus"] = std::move(focus);
    intensities["seq"] = n;
    data.emplace_back(std::move(intensities));
  }
  json::array event;
  event.emplace_back(sub_id);
  if (options_.iso_timestamps) {
    event.emplace_back(IsoTime(unix_ms));
  } else {
    event.emplace_back(unix_ms);
  }
  event.emplace_back(s.type);
  event.emplace_back(std::move(data));
  return json::serialize(event);
}

// --- Time ----------------------------------------------------------------------------

std::optional<EmoggClock::time_point> EmoggProtocol::NextWakeup() const {
  if (silent_) return std::nullopt;
  std::optional<EmoggClock::time_point> next;
  auto consider = [&](EmoggClock::time_point t) {
    if (!next || t < *next) next = t;
  };
  for (const Delayed& d : delayed_) consider(d.due);
  for (const auto& [id, c] : conns_) {
    if (c.closing) continue;
    if (!c.authed) consider(c.opened + options_.auth_timeout);
    consider(c.last_sent + options_.idle_timeout);
    for (const auto& [sid, s] : c.subs) {
      if (s.next_event != EmoggClock::time_point::max()) consider(s.next_event);
    }
  }
  return next;
}

std::vector<EmoggAction> EmoggProtocol::Advance(EmoggTime now) {
  std::vector<EmoggAction> out;
  if (silent_) return out;
  // Delayed answers first, in due order (ties in the order they were made).
  std::sort(delayed_.begin(), delayed_.end(), [](const Delayed& a, const Delayed& b) {
    return a.due != b.due ? a.due < b.due : a.seq < b.seq;
  });
  size_t released = 0;
  for (; released < delayed_.size() && delayed_[released].due <= now.mono; ++released) {
    EmoggAction& a = delayed_[released].action;
    auto it = conns_.find(a.conn);
    if (it == conns_.end() || it->second.closing) continue;
    out.push_back(Send(a.conn, it->second, std::move(a.text), now));
  }
  delayed_.erase(delayed_.begin(), delayed_.begin() + static_cast<std::ptrdiff_t>(released));

  for (auto& [id, c] : conns_) {
    if (c.closing) continue;
    if (!c.authed && now.mono >= c.opened + options_.auth_timeout) {
      out.push_back(Drop(id, c));
      continue;
    }
    for (auto& [sid, s] : c.subs) {
      if (s.next_event > now.mono) continue;
      milliseconds period = options_.event_interval.value_or(s.period);
      out.push_back(Send(id, c, EventFrame(sid, s, now.unix_ms, ""), now));
      // One event per due tick; a late tick does not emit a burst.
      s.next_event = period.count() > 0 ? std::max(s.next_event + period, now.mono + milliseconds(1))
                                        : EmoggClock::time_point::max();
    }
    if (now.mono >= c.last_sent + options_.idle_timeout) {
      out.push_back(Close(id, c, 1000, "Idle timeout"));
    }
  }
  return out;
}

// --- Test controls -------------------------------------------------------------------

std::vector<EmoggAction> EmoggProtocol::EmitNow(std::string_view channel, std::string_view key,
                                                EmoggTime now) {
  std::vector<EmoggAction> out;
  if (silent_) return out;
  for (auto& [id, c] : conns_) {
    if (c.closing) continue;
    for (auto& [sid, s] : c.subs) {
      if (s.channel != channel || (!key.empty() && s.key != key)) continue;
      std::string_view state;
      if (s.type == "sws") state = worker_state_.try_emplace(s.session_id, "working").first->second;
      out.push_back(Send(id, c, EventFrame(sid, s, now.unix_ms, state), now));
    }
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::SetWorkerState(std::string_view session_id,
                                                       std::string_view state, EmoggTime now) {
  worker_state_[std::string(session_id)] = std::string(state);
  std::vector<EmoggAction> out;
  if (silent_) return out;
  for (auto& [id, c] : conns_) {
    if (c.closing) continue;
    for (auto& [sid, s] : c.subs) {
      if (s.type != "sws" || s.session_id != session_id) continue;
      out.push_back(Send(id, c, EventFrame(sid, s, now.unix_ms, state), now));
    }
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::SendRaw(std::string_view text, EmoggTime now) {
  std::vector<EmoggAction> out;
  for (auto& [id, c] : conns_) {
    if (c.closing || !c.authed) continue;
    out.push_back(Send(id, c, std::string(text), now));
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::DropAll() {
  std::vector<EmoggAction> out;
  for (auto& [id, c] : conns_) {
    if (!c.closing) out.push_back(Drop(id, c));
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::CloseAll(uint16_t code, std::string_view reason) {
  std::vector<EmoggAction> out;
  for (auto& [id, c] : conns_) {
    if (!c.closing) out.push_back(Close(id, c, code, std::string(reason)));
  }
  return out;
}

std::vector<EmoggAction> EmoggProtocol::RevokeToken(std::string_view token, EmoggTime now) {
  revoked_.emplace_back(token);
  std::vector<EmoggAction> out;
  Request auth;
  auth.path = "auth:token";  // the answer names the authentication that no longer holds
  for (auto& [id, c] : conns_) {
    if (c.closing || !c.authed || c.token != token) continue;
    c.authed = false;
    for (EmoggAction& a : Error(id, c, auth, 401, "Token revoked", now)) out.push_back(std::move(a));
  }
  return out;
}

// --- Observations --------------------------------------------------------------------

int EmoggProtocol::authenticated_connections() const {
  int n = 0;
  for (const auto& [id, c] : conns_) n += c.authed && !c.closing ? 1 : 0;
  return n;
}

int EmoggProtocol::requests(std::string_view path) const {
  auto it = requests_by_path_.find(path);
  return it == requests_by_path_.end() ? 0 : it->second;
}

int EmoggProtocol::active_subscriptions() const {
  int n = 0;
  for (const auto& [id, c] : conns_) n += static_cast<int>(c.subs.size());
  return n;
}

int EmoggProtocol::subscriptions_of(std::string_view channel, std::string_view key) const {
  int n = 0;
  for (const auto& [id, c] : conns_) {
    for (const auto& [sid, s] : c.subs) n += s.channel == channel && s.key == key ? 1 : 0;
  }
  return n;
}

int EmoggProtocol::answers_with_status(int status) const {
  auto it = answers_by_status_.find(status);
  return it == answers_by_status_.end() ? 0 : it->second;
}

}  // namespace wsbridge::emulator
