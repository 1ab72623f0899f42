// NLX WebSocket wire format, as pure functions (no I/O, no clocks, no globals).
//
//   upgrade: wss://us-east-1-ws.apps.nlx.ai?apiKey=..&deploymentKey=..&channelKey=..
//            [&conversationId=..][&languageCode=..]
//   server -> client, first: {"conversationId":"..."}                  (the ack)
//   client -> server:        ConversationRequest {"request":{...},"userId",...}
//   server -> client:        ConversationResponse {"messages":[...],"conversationId",...}
//                            or an API Gateway error {"message":"...","connectionId",
//                            "requestId"}
//
// Responses name no turn: a session matches them to turns by send order. Each inbound
// frame is decoded once (DecodeFrame) into what it is, so the session routes it without
// parsing again.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/strings.h"
#include "wsbridge/nlx/v1/nlx.pb.h"

namespace wsbridge::nlx {

// Debian's Abseil has its own string_view type; these cross the boundary explicitly.
using core::Av;
using core::Sv;

inline constexpr std::string_view kErrorDomain = "nlx.wsbridge.dev";
inline constexpr std::string_view kDefaultUrl = "wss://us-east-1-ws.apps.nlx.ai";
inline constexpr size_t kMaxConversationIdSize = 128;
// A key longer than this is a configuration mistake (a whole file, a certificate).
inline constexpr size_t kMaxKeySize = 1024;

// gRPC metadata carrying per-call keys (when the bridge allows them).
inline constexpr std::string_view kApiKeyMetadata = "x-nlx-api-key";
inline constexpr std::string_view kDeploymentKeyMetadata = "x-nlx-deployment-key";
inline constexpr std::string_view kChannelKeyMetadata = "x-nlx-channel-key";

// Bridge-side ErrorInfo reasons (the table is in nlx.proto).
inline constexpr std::string_view kReasonKeysMissing = "KEYS_MISSING";
inline constexpr std::string_view kReasonKeysRefused = "KEYS_REFUSED";
inline constexpr std::string_view kReasonAckTimeout = "ACK_TIMEOUT";
inline constexpr std::string_view kReasonUpgradeRefused = "UPGRADE_REFUSED";
inline constexpr std::string_view kReasonOutcomeUnknown = "OUTCOME_UNKNOWN";
inline constexpr std::string_view kReasonTurnTimeout = "TURN_TIMEOUT";
inline constexpr std::string_view kReasonInvalidTurn = "INVALID_TURN";

// The three credentials of one NLX channel.
struct Keys {
  std::string api_key;
  std::string deployment_key;
  std::string channel_key;
};

// OK when every key is 1-1024 bytes of printable ASCII (no spaces, no control
// characters); else UNAUTHENTICATED (reason KEYS_MISSING) naming the empty key, or
// INVALID_ARGUMENT naming the malformed one. Never quotes a key.
absl::Status ValidateKeys(const Keys& keys);

// OK when `id` is 1-128 printable ASCII characters without spaces (NLX's ids are
// UUIDs); INVALID_ARGUMENT (reason INVALID_TURN) saying what is wrong otherwise.
absl::Status ValidateConversationId(std::string_view id);

// `channel_key` with "-<language>" appended, unless `language` is empty or the key
// already ends with it (NLX's channel keys carry the language suffix, e.g. xxxx-en-US).
std::string ChannelKeyWithLanguage(std::string_view channel_key, std::string_view language);

// RFC 3986 percent-encoding: unreserved characters (A-Z a-z 0-9 - _ . ~) kept, every
// other byte as %XX (upper-case hex).
std::string PercentEncode(std::string_view bytes);

// The upgrade URL: `base_url` (ws:// or wss://, no fragment) followed by the query
//   apiKey=..&deploymentKey=..&channelKey=..[&conversationId=..][&languageCode=..]
// (values percent-encoded; channelKey with the language suffix; a query already in
// `base_url` is kept in front). `conversation_id` empty = a new conversation.
// INVALID_ARGUMENT / UNAUTHENTICATED as ValidateKeys and ValidateConversationId say, or
// for a base URL that is not ws:// or wss://.
absl::StatusOr<std::string> UpgradeUrl(std::string_view base_url, const Keys& keys,
                                       std::string_view conversation_id,
                                       std::string_view language);

// One user turn as NLX's ConversationRequest JSON:
//   {"request":{"unstructured":{"text":..}} | {"structured":{..}},
//    "conversationId":.., "userId":.., "context":{..}, "languageCode":.., <extra_json>}
// Absent/empty fields are left out. `conversation_id` is the acknowledged id (empty =
// left out); `default_language` is used when the turn names none.
// INVALID_ARGUMENT (reason INVALID_TURN) for: no request, empty text, an empty
// structured request, a slot without slot_id, a context / slot value JSON cannot carry
// (NaN, infinity), extra_json that is not a JSON object or sets a field written here.
absl::StatusOr<std::string> EncodeTurn(const v1::Turn& turn, std::string_view conversation_id,
                                       std::string_view default_language);

enum class FrameKind {
  kAck,       // {"conversationId": "..."} without messages: the socket is ready
  kResponse,  // a ConversationResponse (has "messages")
  kError,     // an error answer ({"message": ...} / {"error": ...} without messages)
  kUnknown,   // a JSON object that is none of these: passed on raw
};
std::string_view FrameKindName(FrameKind kind);

// One server frame, decoded once.
struct Frame {
  FrameKind kind = FrameKind::kUnknown;
  // kAck: the acknowledged id (never empty). kResponse: as sent ("" when absent).
  std::string conversation_id;
  // kResponse: typed; response.json() holds the frame as it came; turn is 0 (the
  // session sets it).
  v1::ConversationResponse response;
  // kError: the upstream's text ("message", "error" / "error.message", "errorMessage")
  // and API Gateway's requestId when sent.
  std::string error_message;
  std::string request_id;
  // kAck, kError, kUnknown: the frame as it came (empty for kResponse: see response).
  std::string raw;

  const std::string& json() const { return kind == FrameKind::kResponse ? response.json() : raw; }
};

// Decodes one text frame. INVALID_ARGUMENT when it is not valid JSON, not a JSON object,
// or a modelled field has the wrong JSON type (e.g. "messages" not an array, a
// message's "text" a number); the message names the field. JSON null counts as absent.
// Fields not modelled are never an error (they stay in the JSON).
absl::StatusOr<Frame> DecodeFrame(std::string_view frame);

// An error frame as a status: the code and reason from the table in nlx.proto,
// ErrorInfo{domain: kErrorDomain, metadata: upstream_message (redacted),
// upstream_request_id (when sent)}. `what` names the request in the message ("turn 3").
absl::Status ErrorFrameStatus(const Frame& error, std::string_view what);

// A refused upgrade as a status: 401/403 -> UNAUTHENTICATED (KEYS_REFUSED: an API
// Gateway authorizer answers 403 for a denied key), 429 -> RESOURCE_EXHAUSTED, other
// -> UNAVAILABLE (UPGRADE_REFUSED); metadata http_status; the body's text (redacted,
// shortened) is quoted in the message.
absl::Status UpgradeRefusedStatus(int http_status, std::string_view body);

}  // namespace wsbridge::nlx
