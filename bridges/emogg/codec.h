// The Emogg WebSocket wire format, as pure functions (no I/O, no clocks, no globals).
//
//   client -> server (text frames, JSON objects):
//     {"id": "<= 36 chars", "path": "channels:subscribe", "body": {...}}
//   server -> client:
//     answers  {"id": ..., "path": ..., "status": 200, "body": {...}}
//              {"error": true, "id": ..., "path": ..., "status": 404, "data": {"message": ...}}
//     events   [SUBSCRIPTION_ID, EVENT_TIMESTAMP, EVENT_TYPE, EVENT_DATA]
//
// DecodeFrame reads one inbound frame once, validating the JSON grammar (RFC 8259, UTF-8
// included) in a single pass without building a DOM, and says what it is and where it
// goes: an answer routed by `id` (the auth and ping answers recognised by their path,
// since Emogg may answer them with "id": null), an event routed by its subscription id,
// or malformed with the reason. Bodies and event data stay the exact JSON text the
// upstream sent (views into the frame), so fan-out forwards bytes without re-encoding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "bridges/core/rng.h"
#include "bridges/core/strings.h"

namespace wsbridge::emogg {

// Debian's Abseil has its own string_view type; these cross the boundary explicitly.
using core::Av;
using core::Sv;

inline constexpr std::string_view kErrorDomain = "emogg.wsbridge.dev";
// The page names wss://api.emogg.com/ws/v1 and warns that some clients do not fill in
// port 443 for wss://; the default spells it out (same endpoint, same Host header).
inline constexpr std::string_view kDefaultUrl = "wss://api.emogg.com:443/ws/v1";
// Per-call token metadata key (lower case, as gRPC requires).
inline constexpr std::string_view kTokenMetadataKey = "x-emogg-token";

inline constexpr std::string_view kPathAuth = "auth:token";
inline constexpr std::string_view kPathSubscribe = "channels:subscribe";
inline constexpr std::string_view kPathUnsubscribe = "channels:unsubscribe";
inline constexpr std::string_view kPathPing = "ping";

// "It can be a number or a string of up to 36 characters."
inline constexpr size_t kMaxIdSize = 36;
// Our own bound on caller-supplied paths, channels and keys (the page sets none).
inline constexpr size_t kMaxPathSize = 256;
inline constexpr size_t kMaxChannelSize = 256;
inline constexpr size_t kMaxKeySize = 1024;
// Nesting the decoder accepts; deeper frames are malformed (a bound on the work and
// stack one frame can cost; Emogg's documented frames nest 4 deep).
inline constexpr int kMaxDepth = 64;

// ---------------------------------------------------------------------------------
// Request ids.

// "<nonce>.<sequence>", both base 36: at most 13 + 1 + 13 = 27 characters, always a
// string (never a JSON number, so no client or server number precision issue).
std::string MakeRequestId(uint64_t nonce, uint64_t sequence);

// Ids for one session: a random nonce drawn once (so ids of different sessions differ
// in logs) and a counter (so ids in one session never repeat).
class RequestIdGenerator {
 public:
  explicit RequestIdGenerator(core::Rng& rng) : nonce_(rng() >> 24) {}
  std::string Next() { return MakeRequestId(nonce_, next_++); }

 private:
  uint64_t nonce_;
  uint64_t next_ = 1;
};

// Whether `id` may be sent as a request id: 1..36 characters, printable ASCII.
bool IsValidRequestId(std::string_view id);

// ---------------------------------------------------------------------------------
// Caller input checks (INVALID_ARGUMENT saying what is wrong and what to do). A frame
// Emogg cannot read is answered 405 and closes the connection for every caller on it,
// so everything that goes into a frame is checked before it is built.

// 1..kMaxPathSize bytes, no control characters.
absl::Status ValidatePath(std::string_view path);
// Paths the session owns (auth:token, channels:subscribe, channels:unsubscribe): not
// callable through Request.
bool IsReservedPath(std::string_view path);
// Empty (no body) or exactly one JSON object.
absl::Status ValidateRequestBody(std::string_view json);
absl::Status ValidateChannel(std::string_view channel);
absl::Status ValidateKey(std::string_view key);

// ---------------------------------------------------------------------------------
// Encoding. Arguments are assumed valid (see the checks above): ids from
// RequestIdGenerator, paths/channels/keys that passed validation, bodies that are JSON
// objects. Strings are escaped as JSON requires.

std::string EncodeAuth(std::string_view id, std::string_view token);
// `json_body` empty: the frame has no "body".
std::string EncodeRequest(std::string_view id, std::string_view path, std::string_view json_body);
std::string EncodeSubscribe(std::string_view id, std::string_view channel, std::string_view key);
std::string EncodeUnsubscribe(std::string_view id, std::string_view subscription_id);
std::string EncodePing(std::string_view id);

// `text` as a JSON string literal (quotes included). Invalid UTF-8 is copied as is: the
// callers pass gRPC strings, which are valid UTF-8.
std::string JsonQuote(std::string_view text);

// ---------------------------------------------------------------------------------
// Decoding.

enum class FrameKind {
  kResponse,      // an answer to a request (route: id)
  kAuthAnswer,    // the answer to auth:token (route: the session's auth gate)
  kPingAnswer,    // an answer on path "ping" (a heartbeat, or a caller's ping: check id)
  kEvent,         // a channel event (route: subscription_id)
  kMalformed,     // not valid JSON, or JSON of neither shape (reason says why)
};

std::string_view FrameKindName(FrameKind kind);

// One decoded frame. Every string_view points into the frame it was decoded from, so
// the frame must outlive it; std::string members are decoded JSON strings (escapes
// resolved).
struct Frame {
  FrameKind kind = FrameKind::kMalformed;

  // --- Answers (kResponse, kAuthAnswer, kPingAnswer). ---
  // The echoed id; numbers as their JSON text (e.g. "1"). Empty when null or absent.
  std::string id;
  bool has_id = false;
  // "" when the answer said "path": null (a 405 to a message whose path was unreadable).
  std::string path;
  int status = 0;
  // "error": true.
  bool error_flag = false;
  // data.message of an error answer; "" when absent.
  std::string message;
  // "body" as sent (JSON text); empty when absent.
  std::string_view body;
  // "data" as sent (JSON text); empty when absent.
  std::string_view data;
  // body.subscriptionId of a successful channels:subscribe answer; "" otherwise.
  std::string subscribed_id;

  // --- Events (kEvent). ---
  std::string subscription_id;
  // EVENT_TIMESTAMP as sent (a JSON number, or a JSON string with its quotes).
  std::string_view timestamp_raw;
  // EVENT_TIMESTAMP in ms since the Unix epoch: a number, an all-digits string or an
  // RFC 3339 string; nullopt when it was a string in none of these forms.
  std::optional<int64_t> timestamp_ms;
  std::string type;
  // EVENT_DATA as sent (JSON text; an array per Emogg's channel pages, any value taken).
  std::string_view event_data;

  // --- kMalformed. ---
  std::string reason;

  // Where it goes: the id of an answer, the subscription id of an event, "" otherwise.
  std::string_view route() const;
  // An answer that is an error: "error": true or a status outside 200..299.
  bool is_error() const;
};

// Decodes one inbound frame. Never fails: a frame it cannot read is kMalformed with a
// reason (which quotes no frame content, as frames may carry personal data).
Frame DecodeFrame(std::string_view frame);

// ---------------------------------------------------------------------------------
// Statuses.

// The gRPC code for an upstream HTTP-like status: 2xx OK; Emogg's own 405 INTERNAL and
// 500 UNAVAILABLE; every other status as core::CodeForHttpStatus maps it (400
// INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 NOT_FOUND, 409
// ABORTED, 412 FAILED_PRECONDITION, 422 INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 501
// UNIMPLEMENTED, 502-504 UNAVAILABLE, other 5xx INTERNAL, anything else UNKNOWN).
absl::StatusCode CodeForStatus(int status);

// ErrorInfo reason: BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, MALFORMED_PAYLOAD,
// TOO_MANY_REQUESTS, INTERNAL_SERVER_ERROR for the documented statuses (the page's
// titles), "HTTP_<status>" otherwise.
std::string ReasonForStatus(int status);

// Whether Emogg closes the connection after answering with `status` (401, 405, 429).
bool StatusClosesConnection(int status);

// The error for an answer that is_error(): CodeForStatus (UNKNOWN for an "error": true
// answer with a 2xx status) with ErrorInfo{reason, kErrorDomain, {upstream_status,
// path, upstream_message}}. The upstream message (at most 512 bytes of it) goes through
// `redact` when given, so a secret the upstream echoes never reaches a caller.
absl::Status UpstreamError(const Frame& answer,
                           const std::function<std::string(std::string_view)>& redact = {});

// Channels whose upstream sends the last known state at once to a new subscription
// (session_worker_state): a caller joining a shared subscription gets the last event.
bool ReplaysLastEventOnSubscribe(std::string_view channel);

}  // namespace wsbridge::emogg
