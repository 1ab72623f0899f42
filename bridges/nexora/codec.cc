#include "bridges/nexora/codec.h"

#include <random>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/json.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::nexora {
namespace {

namespace json = boost::json;

bool IsUnreserved(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ||
         c == '.' || c == '~';
}

using core::Jv;
using core::JsonStr;

// Tool inputs are arbitrary JSON; Boost's default depth limit (32) would call a deeply
// nested but valid input malformed.
constexpr std::size_t kMaxDepth = 64;

std::optional<json::value> Parse(std::string_view text, std::string* why = nullptr) {
  return core::ParseJson(text, why, kMaxDepth);
}

// Reads an optional string field: absent or null -> "" (OK); another JSON type ->
// INVALID_ARGUMENT naming the field.
absl::Status ReadString(const json::object& o, std::string_view type, std::string_view key,
                        std::string* out) {
  const json::value* v = o.if_contains(Jv(key));
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  if (!v->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", Av(type), "\" event has a non-string \"",
                                                   Av(key), "\""));
  }
  *out = JsonStr(v->get_string());
  return absl::OkStatus();
}

// Any JSON value as text; "null" when absent.
std::string JsonText(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(Jv(key));
  return v == nullptr ? std::string("null") : json::serialize(*v);
}

struct KindName {
  std::string_view name;
  EventKind kind;
};
constexpr KindName kKinds[] = {
    {"chunk", EventKind::kChunk},
    {"tool_call", EventKind::kToolCall},
    {"tool_result", EventKind::kToolResult},
    {"sub_agent_start", EventKind::kSubAgentStart},
    {"sub_agent_complete", EventKind::kSubAgentComplete},
    {"done", EventKind::kDone},
    {"error", EventKind::kError},
    {"duplicate", EventKind::kDuplicate},
    {"pong", EventKind::kPong},
};

absl::StatusCode CodeForHttpStatus(int status) {
  // Nexora's HTTP endpoints (login, create chat) are worth retrying on any 5xx, so every
  // 5xx but 501 is UNAVAILABLE; the rest is core's one HTTP-status table.
  if (status >= 500 && status != 501) return absl::StatusCode::kUnavailable;
  return core::CodeForHttpStatus(status);
}

// The human-readable text of an HTTP error body: FastAPI's {"detail": "..."} (or a
// validation list, as JSON text), else "message" or "error"; the body itself when it
// is short plain text.
std::string ErrorText(std::string_view body) {
  std::optional<json::value> v = Parse(body);
  if (v.has_value() && v->is_object()) {
    const json::object& o = v->get_object();
    for (std::string_view key : {"detail", "message", "error"}) {
      const json::value* f = o.if_contains(Jv(key));
      if (f == nullptr || f->is_null()) continue;
      return f->is_string() ? JsonStr(f->get_string()) : json::serialize(*f);
    }
    return "";
  }
  if (!v.has_value() && body.size() <= 200) return std::string(body);
  return "";
}

}  // namespace

absl::Status ValidateChatId(std::string_view chat_id) {
  if (chat_id.empty()) {
    return absl::InvalidArgumentError("chat_id is required (create one with CreateChat)");
  }
  if (chat_id.size() > kMaxChatIdSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat_id has ", chat_id.size(), " characters; at most ", kMaxChatIdSize));
  }
  if (chat_id == "." || chat_id == "..") {
    return absl::InvalidArgumentError("chat_id must not be \".\" or \"..\"");
  }
  for (char c : chat_id) {
    if (!IsUnreserved(c)) {
      return absl::InvalidArgumentError(
          "chat_id may contain only A-Z a-z 0-9 - _ . ~ (Nexora chat ids are UUIDs)");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateClientMessageId(std::string_view id) {
  if (id.empty() || id.size() > kMaxClientMessageIdSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "client_message_id must have 1 to ", kMaxClientMessageIdSize,
        " characters (leave it empty to let the bridge generate one)"));
  }
  for (char c : id) {
    if (c <= 0x20 || c >= 0x7f) {
      return absl::InvalidArgumentError(
          "client_message_id may contain only printable ASCII characters without spaces");
    }
  }
  return absl::OkStatus();
}

std::string PercentEncode(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(bytes.size());
  for (char c : bytes) {
    if (IsUnreserved(c)) {
      out.push_back(c);
    } else {
      const auto b = static_cast<unsigned char>(c);
      out.push_back('%');
      out.push_back(kHex[b >> 4]);
      out.push_back(kHex[b & 0xf]);
    }
  }
  return out;
}

absl::StatusOr<std::string> SocketTarget(std::string_view base_path, std::string_view chat_id,
                                         std::string_view token) {
  if (absl::Status st = ValidateChatId(chat_id); !st.ok()) return st;
  if (token.empty()) {
    return absl::InvalidArgumentError("no token: configure an API key or email and password");
  }
  while (!base_path.empty() && base_path.back() == '/') base_path.remove_suffix(1);
  return absl::StrCat(Av(base_path), "/api/ws/", Av(chat_id), "?token=",
                      PercentEncode(token));
}

absl::StatusOr<std::string> HttpBaseUrl(std::string_view ws_url) {
  std::string_view rest;
  std::string_view scheme;
  if (ws_url.substr(0, 6) == "wss://") {
    scheme = "https://";
    rest = ws_url.substr(6);
  } else if (ws_url.substr(0, 5) == "ws://") {
    scheme = "http://";
    rest = ws_url.substr(5);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "upstream url must start with wss:// (or ws://); set http_base_url explicitly "
        "otherwise"));
  }
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return absl::InvalidArgumentError(
        "upstream url must not carry a query or fragment (the bridge adds ?token=)");
  }
  while (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
  if (rest.empty() || rest.front() == '/') {
    return absl::InvalidArgumentError("upstream url has no host");
  }
  return absl::StrCat(Av(scheme), Av(rest));
}

std::string MakeClientMessageId(core::Rng& rng) {
  static constexpr char kHex[] = "0123456789abcdef";
  const uint64_t hi = rng();
  const uint64_t lo = rng();
  unsigned char b[16];
  for (int i = 0; i < 8; ++i) {
    b[i] = static_cast<unsigned char>(hi >> (56 - 8 * i));
    b[8 + i] = static_cast<unsigned char>(lo >> (56 - 8 * i));
  }
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  std::string out;
  out.reserve(36);
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.push_back('-');
    out.push_back(kHex[b[i] >> 4]);
    out.push_back(kHex[b[i] & 0xf]);
  }
  return out;
}

std::string EncodeSend(std::string_view content, std::string_view client_message_id) {
  json::object o;
  o["type"] = "message";
  o["content"] = Jv(content);
  o["client_message_id"] = Jv(client_message_id);
  return json::serialize(o);
}

std::string_view PingFrame() { return R"({"type":"ping"})"; }

std::string_view EventKindName(EventKind kind) {
  for (const KindName& k : kKinds) {
    if (k.kind == kind) return k.name;
  }
  return "unknown";
}

absl::StatusOr<Event> DecodeEvent(std::string_view frame) {
  std::string why;
  std::optional<json::value> v = Parse(frame, &why);
  if (!v.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("frame is not valid JSON: ", why));
  }
  if (!v->is_object()) return absl::InvalidArgumentError("frame is not a JSON object");
  const json::object& o = v->get_object();
  const json::value* type = o.if_contains("type");
  if (type == nullptr || !type->is_string()) {
    return absl::InvalidArgumentError("frame has no string \"type\"");
  }
  Event e;
  e.type = JsonStr(type->get_string());
  e.kind = EventKind::kUnknown;
  for (const KindName& k : kKinds) {
    if (k.name == e.type) e.kind = k.kind;
  }
  // The route fields are read for every kind: the page shows them on chunk, done and
  // duplicate only, but a service that adds them elsewhere routes better, not worse.
  for (auto [key, out] : {std::pair<std::string_view, std::string*>{"message_id", &e.message_id},
                          {"client_message_id", &e.client_message_id}}) {
    if (absl::Status st = ReadString(o, e.type, key, out); !st.ok()) {
      if (e.kind != EventKind::kUnknown) return st;
      out->clear();  // unknown events pass on raw whatever their fields
    }
  }
  absl::Status st;
  switch (e.kind) {
    case EventKind::kChunk:
      st = ReadString(o, e.type, "content", &e.content);
      break;
    case EventKind::kToolCall:
      st = ReadString(o, e.type, "tool", &e.tool);
      e.json = JsonText(o, "input");
      break;
    case EventKind::kToolResult:
      st = ReadString(o, e.type, "tool", &e.tool);
      e.json = JsonText(o, "result");
      break;
    case EventKind::kSubAgentStart:
      st = ReadString(o, e.type, "task_id", &e.task_id);
      if (st.ok()) st = ReadString(o, e.type, "agent_name", &e.agent_name);
      break;
    case EventKind::kSubAgentComplete: {
      st = ReadString(o, e.type, "task_id", &e.task_id);
      const json::value* r = o.if_contains("result");
      if (r != nullptr && r->is_string()) {
        e.result = JsonStr(r->get_string());
      } else if (r != nullptr && !r->is_null()) {
        e.result = json::serialize(*r);
      }
      break;
    }
    case EventKind::kError:
      st = ReadString(o, e.type, "code", &e.code);
      if (st.ok()) st = ReadString(o, e.type, "message", &e.message);
      break;
    case EventKind::kUnknown:
      e.json = std::string(frame);
      break;
    case EventKind::kDone:
    case EventKind::kDuplicate:
    case EventKind::kPong:
      break;
  }
  if (!st.ok()) return st;
  return e;
}

absl::StatusCode CodeForUpstreamError(std::string_view code) {
  struct Entry {
    std::string_view code;
    absl::StatusCode status;
  };
  // Only all_providers_exhausted is documented; the rest are plausible codes of such a
  // service (see nexora.proto). The reason keeps the code verbatim either way.
  static constexpr Entry kTable[] = {
      {"all_providers_exhausted", absl::StatusCode::kUnavailable},
      {"rate_limited", absl::StatusCode::kResourceExhausted},
      {"rate_limit_exceeded", absl::StatusCode::kResourceExhausted},
      {"quota_exceeded", absl::StatusCode::kResourceExhausted},
      {"unauthorized", absl::StatusCode::kUnauthenticated},
      {"invalid_token", absl::StatusCode::kUnauthenticated},
      {"token_expired", absl::StatusCode::kUnauthenticated},
      {"forbidden", absl::StatusCode::kPermissionDenied},
      {"not_found", absl::StatusCode::kNotFound},
      {"chat_not_found", absl::StatusCode::kNotFound},
      {"agent_not_found", absl::StatusCode::kNotFound},
      {"invalid_message", absl::StatusCode::kInvalidArgument},
      {"invalid_request", absl::StatusCode::kInvalidArgument},
      {"bad_request", absl::StatusCode::kInvalidArgument},
      {"validation_error", absl::StatusCode::kInvalidArgument},
      {"context_length_exceeded", absl::StatusCode::kInvalidArgument},
      {"timeout", absl::StatusCode::kDeadlineExceeded},
      {"internal_error", absl::StatusCode::kInternal},
  };
  for (const Entry& e : kTable) {
    if (e.code == code) return e.status;
  }
  return absl::StatusCode::kUnknown;
}

absl::Status EventError(const Event& error) {
  const std::string reason = error.code.empty() ? "UNKNOWN_ERROR" : error.code;
  const std::string message = log::Redact(error.message);
  std::string text = absl::StrCat("Nexora answered error ", reason);
  if (!message.empty()) absl::StrAppend(&text, ": ", message);
  std::map<std::string, std::string> metadata;
  if (!message.empty()) metadata["upstream_message"] = message;
  return core::WithErrorInfo(absl::Status(CodeForUpstreamError(error.code), text), reason,
                             kErrorDomain, metadata);
}

std::string EncodeLoginBody(std::string_view email, std::string_view password) {
  json::object o;
  o["email"] = Jv(email);
  o["password"] = Jv(password);
  return json::serialize(o);
}

absl::StatusOr<LoginAnswer> DecodeLoginAnswer(std::string_view body) {
  std::optional<json::value> v = Parse(body);
  if (!v.has_value() || !v->is_object()) {
    return absl::InternalError("Nexora login answered without a JSON object");
  }
  const json::object& o = v->get_object();
  LoginAnswer out;
  const json::value* token = o.if_contains("access_token");
  if (token == nullptr || !token->is_string() || token->get_string().empty()) {
    return absl::InternalError("Nexora login answer has no string \"access_token\"");
  }
  out.access_token = JsonStr(token->get_string());
  if (const json::value* t = o.if_contains("token_type"); t != nullptr && t->is_string()) {
    out.token_type = JsonStr(t->get_string());
  }
  if (const json::value* e = o.if_contains("expires_in"); e != nullptr) {
    if (e->is_int64() && e->get_int64() >= 0) {
      out.expires_in_s = e->get_int64();
    } else if (e->is_uint64() && e->get_uint64() <= static_cast<uint64_t>(INT64_MAX)) {
      out.expires_in_s = static_cast<int64_t>(e->get_uint64());
    } else if (e->is_double() && e->get_double() >= 0 && e->get_double() < 1e15) {
      out.expires_in_s = static_cast<int64_t>(e->get_double());
    }
  }
  return out;
}

std::string EncodeCreateChatBody(std::string_view agent_id) {
  json::object o;
  o["agent_id"] = Jv(agent_id);
  return json::serialize(o);
}

absl::StatusOr<std::string> DecodeCreateChatAnswer(std::string_view body) {
  std::optional<json::value> v = Parse(body);
  if (!v.has_value() || !v->is_object()) {
    return absl::InternalError("Nexora create-chat answered without a JSON object");
  }
  const json::value* id = v->get_object().if_contains("id");
  std::string out;
  if (id != nullptr && id->is_string()) {
    out = JsonStr(id->get_string());
  } else if (id != nullptr && (id->is_int64() || id->is_uint64())) {
    out = json::serialize(*id);
  } else {
    return absl::InternalError("Nexora create-chat answer has no \"id\"");
  }
  if (absl::Status st = ValidateChatId(out); !st.ok()) {
    return absl::InternalError(
        absl::StrCat("Nexora create-chat answered an unusable chat id: ", st.message()));
  }
  return out;
}

absl::Status HttpError(int status, std::string_view body, std::string_view what,
                       std::string_view advice) {
  std::string text = absl::StrCat(Av(what), ": Nexora answered HTTP ", status);
  const std::string detail = log::Redact(ErrorText(body));
  if (!detail.empty()) absl::StrAppend(&text, ": ", detail);
  if (status == 401) absl::StrAppend(&text, " (check the API key or email and password)");
  absl::StrAppend(&text, Av(advice));
  return core::WithErrorInfo(absl::Status(CodeForHttpStatus(status), text),
                             absl::StrCat("HTTP_", status), kErrorDomain,
                             {{"upstream_status", absl::StrCat(status)}});
}

}  // namespace wsbridge::nexora
