// Nexora wire format, as pure functions (no I/O, no clocks, no globals).
//
//   socket:  wss://<instance>/api/ws/{chat_id}?token=<API key nxr_... or JWT>
//   client -> server: {"type":"message","content":...,"client_message_id":...}
//                     {"type":"ping"}
//   server -> client: {"type":"chunk"|"tool_call"|"tool_result"|"sub_agent_start"|
//                      "sub_agent_complete"|"done"|"error"|"duplicate"|"pong", ...}
//   HTTP:    POST /api/auth/login {"email","password"} -> {"access_token", ...}
//            POST /api/chats {"agent_id"} (Authorization: Bearer) -> {"id", ...}
//
// Only chunk and done carry message_id and only duplicate carries client_message_id,
// so a session routes the other events to the message in flight on the chat.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/rng.h"
#include "bridges/core/strings.h"

namespace wsbridge::nexora {

// Debian's Abseil has its own string_view type; these cross the boundary explicitly.
using core::Av;
using core::Sv;

inline constexpr std::string_view kErrorDomain = "nexora.wsbridge.dev";
inline constexpr std::string_view kLoginPath = "/api/auth/login";
inline constexpr std::string_view kChatsPath = "/api/chats";
inline constexpr size_t kMaxChatIdSize = 128;
inline constexpr size_t kMaxClientMessageIdSize = 128;

// OK when `chat_id` is 1-128 characters of A-Z a-z 0-9 - _ . ~ and not "." or "..".
// The page only shows UUIDs; the unreserved set keeps the id one literal path segment.
absl::Status ValidateChatId(std::string_view chat_id);

// OK when `id` is 1-128 printable ASCII characters without spaces.
absl::Status ValidateClientMessageId(std::string_view id);

// RFC 3986 percent-encoding: unreserved characters (A-Z a-z 0-9 - _ . ~) kept, every
// other byte as %XX (upper-case hex).
std::string PercentEncode(std::string_view bytes);

// "/api/ws/{chat_id}?token=<percent-encoded token>", prefixed by `base_path` (the
// upstream URL's path, e.g. "" or "/nexora"; a trailing '/' is ignored).
// INVALID_ARGUMENT for a bad chat id or an empty token.
absl::StatusOr<std::string> SocketTarget(std::string_view base_path, std::string_view chat_id,
                                         std::string_view token);

// The HTTP base URL for a WebSocket URL: wss:// -> https://, ws:// -> http://, the rest
// (host, port, path prefix) kept, a trailing '/' dropped. INVALID_ARGUMENT otherwise.
absl::StatusOr<std::string> HttpBaseUrl(std::string_view ws_url);

// A random UUID v4 (like crypto.randomUUID(), which the page's example uses).
std::string MakeClientMessageId(core::Rng& rng);

// {"type":"message","content":...,"client_message_id":...}
std::string EncodeSend(std::string_view content, std::string_view client_message_id);
// {"type":"ping"}
std::string_view PingFrame();

enum class EventKind {
  kChunk,
  kToolCall,
  kToolResult,
  kSubAgentStart,
  kSubAgentComplete,
  kDone,
  kError,
  kDuplicate,
  kPong,
  kUnknown,  // a type this codec does not know: passed on raw
};
std::string_view EventKindName(EventKind kind);

// One server frame, decoded once. Fields a kind does not use are empty.
struct Event {
  EventKind kind = EventKind::kUnknown;
  std::string type;               // "type" as sent
  // Route: set when the frame carries them (chunk, done, duplicate; any unknown event).
  std::string message_id;
  std::string client_message_id;
  std::string content;            // chunk
  std::string tool;               // tool_call, tool_result
  std::string json;               // tool_call input / tool_result result (JSON text,
                                  // "null" when absent); unknown: the whole frame
  std::string task_id;            // sub_agent_*
  std::string agent_name;         // sub_agent_start
  std::string result;             // sub_agent_complete: string, or JSON text otherwise
  std::string code;               // error
  std::string message;            // error

  // Whether the answer of the message in flight ends with this event.
  bool ends_answer() const {
    return kind == EventKind::kDone || kind == EventKind::kError ||
           kind == EventKind::kDuplicate;
  }
};

// Decodes one text frame. INVALID_ARGUMENT when it is not a JSON object, has no string
// "type", or a known type carries a field of the wrong JSON type (e.g. a numeric
// "content"): such a frame is malformed, not an unknown event. Absent fields are empty.
absl::StatusOr<Event> DecodeEvent(std::string_view frame);

// The absl code an upstream error code maps to (table in nexora.proto).
absl::StatusCode CodeForUpstreamError(std::string_view code);

// An `error` event as a status: mapped code, ErrorInfo{reason: the upstream code (or
// "UNKNOWN_ERROR" when empty), domain: kErrorDomain, metadata: upstream_message}.
absl::Status EventError(const Event& error);

// HTTP bodies.
std::string EncodeLoginBody(std::string_view email, std::string_view password);
struct LoginAnswer {
  std::string access_token;
  std::string token_type;            // e.g. "bearer"; "" when absent
  std::optional<int64_t> expires_in_s;  // when the answer says
};
// INTERNAL (naming what is wrong, never the token) when there is no access_token.
absl::StatusOr<LoginAnswer> DecodeLoginAnswer(std::string_view body);

std::string EncodeCreateChatBody(std::string_view agent_id);
// The "id" of the created chat (a string, or a number turned into one); INTERNAL when
// absent or not a valid chat id.
absl::StatusOr<std::string> DecodeCreateChatAnswer(std::string_view body);

// A non-2xx HTTP answer as a status: code from the HTTP status, ErrorInfo{reason:
// "HTTP_<status>", metadata: upstream_status}; the body's "detail" / "message" / "error"
// text (redacted) is quoted in the message. `what` says which request ("login");
// `advice` (optional) ends the message ("; nothing was sent; retry later").
absl::Status HttpError(int status, std::string_view body, std::string_view what,
                       std::string_view advice = "");

}  // namespace wsbridge::nexora
