#include "tests/upstreams/nexora_protocol.h"

#include <algorithm>
#include <utility>

#include <boost/json.hpp>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using std::chrono::milliseconds;

constexpr std::string_view kSocketPrefix = "/api/ws/";

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding as Starlette does it: %XX is a byte (a malformed escape is kept
// literally); in a query string '+' is a space (parse_qsl), in a path it is a '+'.
std::string PercentDecode(std::string_view in, bool plus_is_space) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '+' && plus_is_space) {
      out.push_back(' ');
    } else if (in[i] == '%' && i + 2 < in.size() && HexValue(in[i + 1]) >= 0 &&
               HexValue(in[i + 2]) >= 0) {
      out.push_back(static_cast<char>(HexValue(in[i + 1]) * 16 + HexValue(in[i + 2])));
      i += 2;
    } else {
      out.push_back(in[i]);
    }
  }
  return out;
}

std::string Base64Url(std::string_view in) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t n = static_cast<uint8_t>(in[i]) << 16 | static_cast<uint8_t>(in[i + 1]) << 8 |
                 static_cast<uint8_t>(in[i + 2]);
    for (int k = 18; k >= 0; k -= 6) out.push_back(kAlphabet[(n >> k) & 63]);
  }
  if (i + 1 == in.size()) {
    uint32_t n = static_cast<uint8_t>(in[i]) << 16;
    out.push_back(kAlphabet[(n >> 18) & 63]);
    out.push_back(kAlphabet[(n >> 12) & 63]);
  } else if (i + 2 == in.size()) {
    uint32_t n = static_cast<uint8_t>(in[i]) << 16 | static_cast<uint8_t>(in[i + 1]) << 8;
    out.push_back(kAlphabet[(n >> 18) & 63]);
    out.push_back(kAlphabet[(n >> 12) & 63]);
    out.push_back(kAlphabet[(n >> 6) & 63]);
  }
  return out;
}

std::string Detail(std::string_view text) {
  json::object o;
  o["detail"] = json::string_view(text.data(), text.size());
  return json::serialize(o);
}

void ReplaceAll(std::string& s, std::string_view from, std::string_view to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size())) {
    s.replace(pos, from.size(), to);
  }
}

// `text` as the inside of a JSON string literal.
std::string JsonEscaped(std::string_view text) {
  std::string quoted = json::serialize(json::string(json::string_view(text.data(), text.size())));
  return quoted.substr(1, quoted.size() - 2);
}

const json::value* Field(const json::object& o, std::string_view key) {
  return o.if_contains(json::string_view(key.data(), key.size()));
}

milliseconds Ceil(NexoraClock::duration d) {
  return std::chrono::ceil<milliseconds>(d);
}

NexoraAction SendAction(uint64_t conn, std::string text) {
  NexoraAction a;
  a.conn = conn;
  a.kind = NexoraAction::Kind::kSend;
  a.text = std::move(text);
  return a;
}

NexoraAction DropAction(uint64_t conn) {
  NexoraAction a;
  a.conn = conn;
  a.kind = NexoraAction::Kind::kDrop;
  return a;
}

}  // namespace

std::vector<NexoraScriptStep> NexoraDefaultScript() {
  return {
      {R"({"type":"chunk","content":"Let me check that."})"},
      {R"({"type":"tool_call","tool":"github","input":{"action":"list_issues","repo":"owner/repo"}})"},
      {R"({"type":"tool_result","tool":"github","result":{"issues":[]}})"},
      {R"({"type":"sub_agent_start","task_id":"{{task_id}}","agent_name":"Research Assistant"})"},
      {R"({"type":"sub_agent_complete","task_id":"{{task_id}}","result":"No open issues found."})"},
      {R"({"type":"chunk","content":" You asked: {{content}}."})"},
      {R"({"type":"chunk","content":" There are no open issues."})"},
  };
}

bool NexoraProtocol::Fault::Take() {
  if (count == 0) return false;
  if (count > 0) --count;
  return true;
}

NexoraProtocol::NexoraProtocol(NexoraProtocolOptions options)
    : options_(std::move(options)), id_state_(options_.id_seed), script_(NexoraDefaultScript()) {}

void NexoraProtocol::InjectError(std::string code, std::string message, int after_steps,
                                 int count) {
  error_code_ = std::move(code);
  error_message_ = std::move(message);
  error_fault_ = {after_steps, count};
}

void NexoraProtocol::DropMidAnswer(int after_steps, int count) {
  drop_fault_ = {after_steps, count};
}

void NexoraProtocol::RefuseUpgrades(int status, std::string message, int count,
                                    int retry_after_s) {
  upgrade_refusal_ = {status, "", std::move(message), retry_after_s};
  upgrade_fault_ = {0, count};
}

void NexoraProtocol::ClearFaults() {
  error_fault_ = {};
  drop_fault_ = {};
  upgrade_fault_ = {};
}

std::string NexoraProtocol::NewUuid() {
  static constexpr char kHex[] = "0123456789abcdef";
  uint64_t hi = SplitMix64(id_state_);
  uint64_t lo = SplitMix64(id_state_);
  hi = (hi & ~0xf000ULL) | 0x4000ULL;                            // version 4
  lo = (lo & 0x3fffffffffffffffULL) | 0x8000000000000000ULL;     // variant
  std::string out;
  for (int i = 0; i < 32; ++i) {
    if (i == 8 || i == 12 || i == 16 || i == 20) out.push_back('-');
    const uint64_t word = i < 16 ? hi : lo;
    out.push_back(kHex[(word >> (60 - 4 * (i % 16))) & 0xf]);
  }
  return out;
}

std::string NexoraProtocol::NewJwt(const std::string& email, int64_t unix_now_s) {
  const int64_t lifetime_s =
      std::chrono::ceil<std::chrono::seconds>(options_.jwt_lifetime).count();
  json::object payload;
  payload["sub"] = email;
  payload["iat"] = unix_now_s;
  payload["exp"] = unix_now_s + lifetime_s;
  payload["jti"] = NewUuid();
  std::string signature;
  for (int i = 0; i < 4; ++i) {
    const uint64_t r = SplitMix64(id_state_);
    signature.append(reinterpret_cast<const char*>(&r), sizeof(r));
  }
  return Base64Url(R"({"alg":"HS256","typ":"JWT"})") + "." +
         Base64Url(json::serialize(payload)) + "." + Base64Url(signature);
}

std::string NexoraProtocol::CheckToken(std::string_view token, NexoraClock::time_point now) const {
  if (token.empty()) return "missing token";
  if (token.substr(0, 4) == "nxr_") {
    if (options_.api_keys.empty()) {
      return token.substr(0, 7) == "nxr_bad" ? "invalid API key" : "";
    }
    const auto& keys = options_.api_keys;
    return std::find(keys.begin(), keys.end(), token) != keys.end() ? "" : "invalid API key";
  }
  auto it = jwts_.find(token);
  if (it == jwts_.end()) return "invalid token";
  if (now >= it->second.expires_at) return "token expired";
  return "";
}

std::string NexoraProtocol::SocketChatId(std::string_view target) {
  const std::string_view path = target.substr(0, target.find('?'));
  if (path.substr(0, kSocketPrefix.size()) != kSocketPrefix) return "";
  const std::string_view segment = path.substr(kSocketPrefix.size());
  if (segment.find('/') != std::string_view::npos) return "";
  std::string chat = PercentDecode(segment, /*plus_is_space=*/false);
  return chat.find('/') == std::string::npos ? chat : "";
}

NexoraUpgrade NexoraProtocol::OnUpgrade(std::string_view target, NexoraClock::time_point now) {
  NexoraUpgrade out;
  ++upgrades_;
  if (upgrade_fault_.Take()) {
    ++refused_upgrades_;
    return upgrade_refusal_;
  }
  const size_t q = target.find('?');
  std::string_view query = q == std::string_view::npos ? "" : target.substr(q + 1);
  std::string chat = SocketChatId(target);
  if (chat.empty()) {
    ++refused_upgrades_;
    return {404, "", "no such endpoint: chat sockets are /api/ws/{chat_id}"};
  }
  std::string token;
  while (!query.empty()) {
    const size_t amp = query.find('&');
    std::string_view param = query.substr(0, amp);
    query = amp == std::string_view::npos ? "" : query.substr(amp + 1);
    if (param.substr(0, 6) == "token=") {
      token = PercentDecode(param.substr(6), /*plus_is_space=*/true);
      break;
    }
  }
  if (std::string why = CheckToken(token, now); !why.empty()) {
    ++refused_upgrades_;
    return {401, "", why};
  }
  if (options_.known_chats_only && created_chats_.count(chat) == 0) {
    ++refused_upgrades_;
    return {404, "", "chat not found"};
  }
  out.chat_id = std::move(chat);
  return out;
}

void NexoraProtocol::OnOpen(uint64_t conn, std::string_view chat_id) {
  conns_[conn] = std::string(chat_id);
}

void NexoraProtocol::OnClose(uint64_t conn, NexoraClock::time_point now) {
  auto it = conns_.find(conn);
  if (it == conns_.end()) return;
  auto chat = chats_.find(it->second);
  conns_.erase(it);
  if (chat == chats_.end() || finish_after_drop_) return;
  for (Answer& a : chat->second.answers) {
    if (a.conn == conn && a.ends_at > now) {
      a.ends_at = now;
      a.outcome = Outcome::kDropped;
    }
  }
}

NexoraAction NexoraProtocol::ErrorFrame(uint64_t conn, std::string_view code,
                                        std::string_view message) const {
  json::object o;
  o["type"] = "error";
  o["code"] = json::string_view(code.data(), code.size());
  o["message"] = json::string_view(message.data(), message.size());
  return SendAction(conn, json::serialize(o));
}

std::vector<NexoraAction> NexoraProtocol::OnFrame(uint64_t conn, std::string_view frame,
                                                  NexoraClock::time_point now) {
  auto c = conns_.find(conn);
  if (c == conns_.end()) return {};
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(frame.data(), frame.size()), ec);
  if (ec || !v.is_object()) return {ErrorFrame(conn, "invalid_message", "frame is not a JSON object")};
  const json::object& o = v.get_object();
  const json::value* type = Field(o, "type");
  if (type == nullptr || !type->is_string()) {
    return {ErrorFrame(conn, "invalid_message", "frame has no string \"type\"")};
  }
  if (type->get_string() == "ping") {
    ++pings_;
    if (!answer_pings_) return {};
    return {SendAction(conn, R"({"type":"pong"})")};
  }
  if (type->get_string() != "message") {
    return {ErrorFrame(conn, "unknown_message_type",
                       "unknown message type \"" + std::string(type->get_string()) + "\"")};
  }
  const json::value* content = Field(o, "content");
  if (content == nullptr || !content->is_string() || content->get_string().empty()) {
    return {ErrorFrame(conn, "invalid_message", "a message needs a non-empty string \"content\"")};
  }
  const json::value* id = Field(o, "client_message_id");
  if (id != nullptr && !id->is_null() && !id->is_string()) {
    return {ErrorFrame(conn, "invalid_message", "\"client_message_id\" must be a string")};
  }
  std::string cmid = id != nullptr && id->is_string() ? std::string(id->get_string()) : "";
  return OnMessage(conn, c->second, std::string(content->get_string()), std::move(cmid), now);
}

std::vector<NexoraAction> NexoraProtocol::OnMessage(uint64_t conn, const std::string& chat_id,
                                                    std::string content,
                                                    std::string client_message_id,
                                                    NexoraClock::time_point now) {
  Chat& chat = chats_[chat_id];
  ++received_by_id_[client_message_id];
  received_ids_.push_back(client_message_id);
  std::vector<NexoraAction> out;

  if (!client_message_id.empty()) {
    for (auto a = chat.answers.rbegin(); a != chat.answers.rend(); ++a) {
      if (a->client_message_id != client_message_id) continue;
      // In progress, or completed and saved: the existing answer stands.
      if (now < a->ends_at || a->outcome == Outcome::kDone) {
        json::object dup;
        dup["type"] = "duplicate";
        dup["client_message_id"] = client_message_id;
        dup["message_id"] = a->message_id;
        ++duplicates_sent_;
        out.push_back(SendAction(conn, json::serialize(dup)));
        return out;
      }
      break;  // errored or abandoned: answered afresh
    }
  }

  // Answers of a chat run one after another.
  NexoraClock::time_point start = now;
  for (const Answer& a : chat.answers) start = std::max(start, a.ends_at);

  Answer answer;
  answer.client_message_id = client_message_id;
  answer.message_id = NewUuid();
  answer.conn = conn;
  ++answers_started_;
  const bool drop = drop_fault_.Take();
  const bool error = !drop && error_fault_.Take();
  const int stop_after = drop ? drop_fault_.after_steps
                              : error ? error_fault_.after_steps : static_cast<int>(script_.size());
  const std::string task_id = NewUuid();
  const std::string content_escaped = JsonEscaped(content);
  const std::string cmid_escaped = JsonEscaped(client_message_id);

  milliseconds at = Ceil(start - now);
  for (int i = 0; i < static_cast<int>(script_.size()) && i < stop_after; ++i) {
    const NexoraScriptStep& step = script_[i];
    at += step.delay.count() < 0 ? options_.step_delay : step.delay;
    std::string text = step.event_json;
    ReplaceAll(text, "{{content}}", content_escaped);
    ReplaceAll(text, "{{task_id}}", task_id);
    ReplaceAll(text, "{{client_message_id}}", cmid_escaped);
    boost::system::error_code ec;
    json::value ev = json::parse(text, ec);
    if (!ec && ev.is_object()) {
      json::object& eo = ev.get_object();
      const json::value* t = eo.if_contains("type");
      if (t != nullptr && t->is_string() &&
          (t->get_string() == "chunk" || t->get_string() == "done") &&
          !eo.contains("message_id")) {
        // The page shows message_id right after type.
        json::object ordered;
        ordered["type"] = *t;
        ordered["message_id"] = answer.message_id;
        for (auto& kv : eo) {
          if (kv.key() != "type") ordered[kv.key()] = kv.value();
        }
        text = json::serialize(ordered);
      }
    }
    NexoraAction a = SendAction(conn, std::move(text));
    a.delay = at;
    out.push_back(std::move(a));
  }
  at += options_.step_delay;
  if (drop) {
    NexoraAction a = DropAction(conn);
    a.delay = at;
    out.push_back(std::move(a));
    answer.outcome = finish_after_drop_ ? Outcome::kDone : Outcome::kDropped;
  } else if (error) {
    NexoraAction a = ErrorFrame(conn, error_code_, error_message_);
    a.delay = at;
    out.push_back(std::move(a));
    answer.outcome = Outcome::kError;
  } else {
    json::object done;
    done["type"] = "done";
    done["message_id"] = answer.message_id;
    NexoraAction a = SendAction(conn, json::serialize(done));
    a.delay = at;
    out.push_back(std::move(a));
    answer.outcome = Outcome::kDone;
  }
  answer.ends_at = now + at;
  chat.answers.push_back(std::move(answer));
  return out;
}

NexoraHttpAnswer NexoraProtocol::OnHttp(std::string_view method, std::string_view target,
                                        std::string_view authorization, std::string_view body,
                                        NexoraClock::time_point now, int64_t unix_now_s) {
  const std::string_view path = target.substr(0, target.find('?'));
  if (path != "/api/auth/login" && path != "/api/chats") return {404, Detail("Not Found")};
  if (method != "POST") return {405, Detail("Method Not Allowed")};
  if (path == "/api/auth/login") return Login(body, now, unix_now_s);
  return CreateChat(authorization, body, now);
}

NexoraHttpAnswer NexoraProtocol::Login(std::string_view body, NexoraClock::time_point now,
                                       int64_t unix_now_s) {
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(body.data(), body.size()), ec);
  const json::value* email = !ec && v.is_object() ? Field(v.get_object(), "email") : nullptr;
  const json::value* password = !ec && v.is_object() ? Field(v.get_object(), "password") : nullptr;
  if (email == nullptr || !email->is_string() || password == nullptr || !password->is_string()) {
    return {422, Detail("body must be a JSON object with string \"email\" and \"password\"")};
  }
  auto user = options_.users.find(std::string(email->get_string()));
  if (user == options_.users.end() || user->second != password->get_string()) {
    ++refused_logins_;
    return {401, Detail("Incorrect email or password")};
  }
  std::string token = NewJwt(user->first, unix_now_s);
  jwts_[token] = Issued{now + options_.jwt_lifetime};
  ++logins_;
  json::object o;
  o["access_token"] = token;
  o["token_type"] = "bearer";
  o["expires_in"] = std::chrono::ceil<std::chrono::seconds>(options_.jwt_lifetime).count();
  return {200, json::serialize(o)};
}

NexoraHttpAnswer NexoraProtocol::CreateChat(std::string_view authorization,
                                            std::string_view body, NexoraClock::time_point now) {
  std::string_view token;
  if (authorization.size() > 7 &&
      (authorization.substr(0, 7) == "Bearer " || authorization.substr(0, 7) == "bearer ")) {
    token = authorization.substr(7);
  }
  if (token.empty()) return {401, Detail("Not authenticated")};
  if (std::string why = CheckToken(token, now); !why.empty()) return {401, Detail(why)};
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(body.data(), body.size()), ec);
  const json::value* agent = !ec && v.is_object() ? Field(v.get_object(), "agent_id") : nullptr;
  if (agent == nullptr || !agent->is_string() || agent->get_string().empty()) {
    return {422, Detail("body must be a JSON object with a string \"agent_id\"")};
  }
  const std::string agent_id(agent->get_string());
  const auto& agents = options_.agents;
  if (!agents.empty() && std::find(agents.begin(), agents.end(), agent_id) == agents.end()) {
    return {404, Detail("Agent not found")};
  }
  std::string id = NewUuid();
  created_chats_.insert(id);
  ++chats_created_;
  json::object o;
  o["id"] = id;
  o["agent_id"] = agent_id;
  o["title"] = nullptr;
  return {201, json::serialize(o)};
}

std::vector<NexoraAction> NexoraProtocol::DropSockets(std::string_view chat_id) const {
  std::vector<NexoraAction> out;
  for (const auto& [conn, chat] : conns_) {
    if (chat_id.empty() || chat == chat_id) out.push_back(DropAction(conn));
  }
  return out;
}

std::vector<NexoraAction> NexoraProtocol::Broadcast(std::string_view chat_id,
                                                    std::string text) const {
  std::vector<NexoraAction> out;
  for (const auto& [conn, chat] : conns_) {
    if (chat_id.empty() || chat == chat_id) out.push_back(SendAction(conn, text));
  }
  return out;
}

std::vector<NexoraAction> NexoraProtocol::CloseSockets(std::string_view chat_id, uint16_t code,
                                                       std::string reason) const {
  std::vector<NexoraAction> out;
  for (const auto& [conn, chat] : conns_) {
    if (!chat_id.empty() && chat != chat_id) continue;
    NexoraAction a;
    a.conn = conn;
    a.kind = NexoraAction::Kind::kClose;
    a.close_code = code;
    a.close_reason = reason;
    out.push_back(std::move(a));
  }
  return out;
}

int NexoraProtocol::messages_received(std::string_view client_message_id) const {
  auto it = received_by_id_.find(client_message_id);
  return it == received_by_id_.end() ? 0 : it->second;
}

int NexoraProtocol::open_sockets(std::string_view chat_id) const {
  return static_cast<int>(std::count_if(conns_.begin(), conns_.end(),
                                        [&](const auto& kv) { return kv.second == chat_id; }));
}

int NexoraProtocol::chats_with_sockets() const {
  std::set<std::string_view> chats;
  for (const auto& [conn, chat] : conns_) chats.insert(chat);
  return static_cast<int>(chats.size());
}

}  // namespace wsbridge::emulator
