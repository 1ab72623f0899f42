#include "bridges/nlx/codec.h"

#include <cmath>
#include <optional>
#include <utility>

#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/json.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::nlx {
namespace {

namespace json = boost::json;

using core::Jv;
std::string_view Sv(json::string_view s) { return std::string_view(s.data(), s.size()); }

// 1..max bytes of 0x21..0x7e: what fits a query value and a log line unescaped.
bool PrintableNoSpace(std::string_view s) {
  for (char c : s) {
    if (c <= 0x20 || c >= 0x7f) return false;
  }
  return true;
}

absl::Status InvalidTurn(std::string_view message) {
  return core::WithErrorInfo(absl::InvalidArgumentError(Av(message)), kReasonInvalidTurn,
                             kErrorDomain);
}

// --- google.protobuf.Value -> JSON ------------------------------------------------

// Doubles that are whole numbers within +-2^53 (exactly representable) become
// integers: a context value 3 reaches NLX as 3, not 3.0e0.
constexpr double kMaxExactInteger = 9007199254740992.0;

absl::Status ToJson(const google::protobuf::Value& v, const std::string& path, int depth,
                    json::value* out);

absl::Status ToJson(const google::protobuf::Struct& s, const std::string& path, int depth,
                    json::value* out) {
  json::object& o = out->emplace_object();
  for (const auto& [key, value] : s.fields()) {
    json::value child;
    if (absl::Status st = ToJson(value, path.empty() ? key : absl::StrCat(path, ".", key),
                                 depth + 1, &child);
        !st.ok()) {
      return st;
    }
    o[Jv(key)] = std::move(child);
  }
  return absl::OkStatus();
}

absl::Status ToJson(const google::protobuf::Value& v, const std::string& path, int depth,
                    json::value* out) {
  // Protobuf itself refuses to parse messages nested this deep; this keeps a
  // hand-built one from exhausting the stack.
  if (depth > 100) return InvalidTurn(absl::StrCat(path, " is nested more than 100 levels"));
  switch (v.kind_case()) {
    case google::protobuf::Value::kNullValue:
    case google::protobuf::Value::KIND_NOT_SET:
      *out = nullptr;
      return absl::OkStatus();
    case google::protobuf::Value::kNumberValue: {
      double d = v.number_value();
      if (!std::isfinite(d)) {
        return InvalidTurn(absl::StrCat(path, " is ", d,
                                        ": JSON has no NaN or infinity (send a string)"));
      }
      if (d == std::trunc(d) && std::fabs(d) <= kMaxExactInteger) {
        *out = static_cast<int64_t>(d);
      } else {
        *out = d;
      }
      return absl::OkStatus();
    }
    case google::protobuf::Value::kStringValue:
      *out = Jv(v.string_value());
      return absl::OkStatus();
    case google::protobuf::Value::kBoolValue:
      *out = v.bool_value();
      return absl::OkStatus();
    case google::protobuf::Value::kStructValue:
      return ToJson(v.struct_value(), path, depth, out);
    case google::protobuf::Value::kListValue: {
      json::array& a = out->emplace_array();
      a.reserve(v.list_value().values_size());
      for (int i = 0; i < v.list_value().values_size(); ++i) {
        json::value child;
        if (absl::Status st =
                ToJson(v.list_value().values(i), absl::StrCat(path, "[", i, "]"), depth + 1, &child);
            !st.ok()) {
          return st;
        }
        a.push_back(std::move(child));
      }
      return absl::OkStatus();
    }
  }
  *out = nullptr;
  return absl::OkStatus();
}

// --- decoding -----------------------------------------------------------------------

// NLX nests context and modalities of any shape; the default depth (32) could refuse a
// legitimate response.
json::parse_options ParseOptions() {
  json::parse_options o;
  o.max_depth = 64;
  return o;
}

std::string_view JsonTypeName(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: return "null";
    case json::kind::bool_: return "a boolean";
    case json::kind::int64:
    case json::kind::uint64:
    case json::kind::double_: return "a number";
    case json::kind::string: return "a string";
    case json::kind::array: return "an array";
    case json::kind::object: return "an object";
  }
  return "a value";
}

absl::Status WrongType(std::string_view path, const json::value& v, std::string_view want) {
  return absl::InvalidArgumentError(
      absl::StrCat("upstream frame: ", Av(path), " is ", Av(JsonTypeName(v)), ", expected ",
                   Av(want)));
}

// The field's value, or nullptr when absent or null.
const json::value* Field(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(Jv(key));
  return v == nullptr || v->is_null() ? nullptr : v;
}

// Strings: absent/null -> untouched; a string -> *out; anything else -> error.
absl::Status GetString(const json::object& o, std::string_view key, std::string_view path,
                       std::string* out) {
  const json::value* v = Field(o, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_string()) return WrongType(path, *v, "a string");
  out->assign(v->get_string().data(), v->get_string().size());
  return absl::OkStatus();
}

absl::Status GetBool(const json::object& o, std::string_view key, std::string_view path,
                     bool* out) {
  const json::value* v = Field(o, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_bool()) return WrongType(path, *v, "a boolean");
  *out = v->get_bool();
  return absl::OkStatus();
}

absl::Status GetObject(const json::object& o, std::string_view key, std::string_view path,
                       const json::object** out) {
  *out = nullptr;
  const json::value* v = Field(o, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_object()) return WrongType(path, *v, "an object");
  *out = &v->get_object();
  return absl::OkStatus();
}

#define NLX_RETURN_IF_ERROR(expr)           \
  do {                                      \
    if (absl::Status _st = (expr); !_st.ok()) return _st; \
  } while (0)

absl::Status DecodeChoice(const json::value& v, const std::string& path, v1::Choice* out) {
  if (!v.is_object()) return WrongType(path, v, "an object");
  const json::object& o = v.get_object();
  NLX_RETURN_IF_ERROR(GetString(o, "choiceId", path + ".choiceId", out->mutable_choice_id()));
  NLX_RETURN_IF_ERROR(
      GetString(o, "choiceText", path + ".choiceText", out->mutable_choice_text()));
  if (const json::value* p = Field(o, "choicePayload"); p != nullptr) {
    out->set_choice_payload_json(json::serialize(*p));
  }
  return absl::OkStatus();
}

absl::Status DecodeMessage(const json::value& v, const std::string& path, v1::Message* out) {
  if (!v.is_object()) return WrongType(path, v, "an object");
  const json::object& o = v.get_object();
  NLX_RETURN_IF_ERROR(GetString(o, "messageId", path + ".messageId", out->mutable_message_id()));
  NLX_RETURN_IF_ERROR(GetString(o, "text", path + ".text", out->mutable_text()));
  NLX_RETURN_IF_ERROR(GetString(o, "type", path + ".type", out->mutable_type()));
  NLX_RETURN_IF_ERROR(GetString(o, "nodeId", path + ".nodeId", out->mutable_node_id()));
  const json::object* meta = nullptr;
  NLX_RETURN_IF_ERROR(GetObject(o, "metadata", path + ".metadata", &meta));
  if (meta != nullptr) {
    NLX_RETURN_IF_ERROR(
        GetString(*meta, "intentId", path + ".metadata.intentId", out->mutable_intent_id()));
  }
  if (const json::value* choices = Field(o, "choices"); choices != nullptr) {
    if (!choices->is_array()) return WrongType(path + ".choices", *choices, "an array");
    const json::array& a = choices->get_array();
    out->mutable_choices()->Reserve(static_cast<int>(a.size()));
    for (size_t i = 0; i < a.size(); ++i) {
      NLX_RETURN_IF_ERROR(
          DecodeChoice(a[i], absl::StrCat(path, ".choices[", i, "]"), out->add_choices()));
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeResponse(const json::object& o, v1::ConversationResponse* out) {
  NLX_RETURN_IF_ERROR(
      GetString(o, "conversationId", "conversationId", out->mutable_conversation_id()));
  const json::value* messages = Field(o, "messages");
  if (!messages->is_array()) return WrongType("messages", *messages, "an array");
  const json::array& a = messages->get_array();
  out->mutable_messages()->Reserve(static_cast<int>(a.size()));
  for (size_t i = 0; i < a.size(); ++i) {
    NLX_RETURN_IF_ERROR(DecodeMessage(a[i], absl::StrCat("messages[", i, "]"), out->add_messages()));
  }
  const json::object* meta = nullptr;
  NLX_RETURN_IF_ERROR(GetObject(o, "metadata", "metadata", &meta));
  if (meta != nullptr) {
    v1::ResponseMetadata* m = out->mutable_metadata();
    NLX_RETURN_IF_ERROR(GetString(*meta, "intentId", "metadata.intentId", m->mutable_intent_id()));
    bool b = false;
    NLX_RETURN_IF_ERROR(GetBool(*meta, "escalation", "metadata.escalation", &b));
    m->set_escalation(b);
    b = false;
    NLX_RETURN_IF_ERROR(GetBool(*meta, "frustration", "metadata.frustration", &b));
    m->set_frustration(b);
    b = false;
    NLX_RETURN_IF_ERROR(GetBool(*meta, "incomprehension", "metadata.incomprehension", &b));
    m->set_incomprehension(b);
    b = false;
    NLX_RETURN_IF_ERROR(
        GetBool(*meta, "hasPendingDataRequest", "metadata.hasPendingDataRequest", &b));
    m->set_has_pending_data_request(b);
  }
  if (const json::value* p = Field(o, "payload"); p != nullptr) {
    // NLX's SDK types it as a string; anything else is kept as its JSON text.
    out->set_payload(p->is_string() ? std::string(Sv(p->get_string())) : json::serialize(*p));
  }
  if (const json::value* t = Field(o, "expirationTimestamp"); t != nullptr) {
    if (t->is_int64()) {
      out->set_expiration_timestamp(t->get_int64());
    } else if (t->is_uint64()) {
      out->set_expiration_timestamp(t->get_uint64() > static_cast<uint64_t>(INT64_MAX)
                                        ? INT64_MAX
                                        : static_cast<int64_t>(t->get_uint64()));
    } else if (t->is_double() && std::isfinite(t->get_double()) &&
               std::fabs(t->get_double()) < 9.2e18) {
      out->set_expiration_timestamp(static_cast<int64_t>(t->get_double()));
    } else {
      return WrongType("expirationTimestamp", *t, "a number of milliseconds");
    }
  }
  return absl::OkStatus();
}

// The error text of an error-shaped frame, if it is one. API Gateway sends
// {"message": ...}; Lambda-style answers use "errorMessage"; others {"error": ...}.
absl::StatusOr<std::optional<std::string>> ErrorText(const json::object& o) {
  std::string text;
  bool found = false;
  for (std::string_view key : {"message", "errorMessage"}) {
    if (const json::value* v = Field(o, key); v != nullptr) {
      if (!v->is_string()) return WrongType(key, *v, "a string");
      if (!found) text.assign(v->get_string().data(), v->get_string().size());
      found = true;
    }
  }
  if (const json::value* v = Field(o, "error"); v != nullptr) {
    if (v->is_string()) {
      if (!found) text.assign(v->get_string().data(), v->get_string().size());
    } else if (v->is_object()) {
      std::string inner;
      NLX_RETURN_IF_ERROR(GetString(v->get_object(), "message", "error.message", &inner));
      if (!found) text = inner.empty() ? json::serialize(*v) : inner;
    } else if (!found) {
      text = json::serialize(*v);
    }
    found = true;
  }
  if (!found) return std::optional<std::string>();
  return std::optional<std::string>(std::move(text));
}

struct ErrorRow {
  absl::StatusCode code;
  std::string_view reason;
};

ErrorRow ClassifyError(std::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(Av(text));
  auto is = [&](std::string_view s) { return absl::EqualsIgnoreCase(t, Av(s)); };
  if (is("Forbidden")) return {absl::StatusCode::kPermissionDenied, "FORBIDDEN"};
  if (is("Unauthorized")) return {absl::StatusCode::kUnauthenticated, "UNAUTHORIZED"};
  if (is("Internal server error")) return {absl::StatusCode::kInternal, "INTERNAL_SERVER_ERROR"};
  if (is("Too Many Requests") || is("Limit Exceeded") || is("Rate exceeded")) {
    return {absl::StatusCode::kResourceExhausted, "RATE_LIMITED"};
  }
  if (is("Message too long") || is("Request too long")) {
    return {absl::StatusCode::kInvalidArgument, "MESSAGE_TOO_LONG"};
  }
  if (is("Endpoint request timed out")) {
    return {absl::StatusCode::kDeadlineExceeded, "UPSTREAM_TIMEOUT"};
  }
  std::string lower = absl::AsciiStrToLower(t);
  if (absl::StrContains(lower, "invalid") || absl::StrContains(lower, "bad request")) {
    return {absl::StatusCode::kInvalidArgument, "BAD_REQUEST"};
  }
  return {absl::StatusCode::kUnknown, "UPSTREAM_ERROR"};
}

// At most `n` bytes of upstream text in a status message, cut at a UTF-8 boundary.
std::string Shorten(std::string_view text, size_t n) {
  if (text.size() <= n) return std::string(text);
  size_t cut = n;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xc0) == 0x80) --cut;
  return absl::StrCat(Av(text.substr(0, cut)), "...");
}

#undef NLX_RETURN_IF_ERROR

constexpr std::string_view kTurnFields[] = {"request", "conversationId", "userId", "context",
                                            "languageCode"};

}  // namespace

absl::Status ValidateKeys(const Keys& keys) {
  struct Named {
    std::string_view name;
    std::string_view config;
    std::string_view metadata;
    const std::string* value;
  };
  const Named all[] = {
      {"apiKey", "api_key", kApiKeyMetadata, &keys.api_key},
      {"deploymentKey", "deployment_key", kDeploymentKeyMetadata, &keys.deployment_key},
      {"channelKey", "channel_key", kChannelKeyMetadata, &keys.channel_key},
  };
  for (const Named& k : all) {
    if (k.value->empty()) {
      return core::WithErrorInfo(
          absl::UnauthenticatedError(absl::StrCat(
              "no NLX ", Av(k.name), ": set ", Av(k.config), " in the bridge config, or send ",
              Av(k.metadata), " metadata where the bridge allows per-call keys")),
          kReasonKeysMissing, kErrorDomain, {{"key", std::string(k.name)}});
    }
    if (k.value->size() > kMaxKeySize || !PrintableNoSpace(*k.value)) {
      return core::WithErrorInfo(
          absl::InvalidArgumentError(absl::StrCat(
              "the NLX ", Av(k.name), " is malformed (", k.value->size(),
              " bytes; a key is 1-1024 printable ASCII characters without spaces: check the "
              "secret for a stray newline or the wrong file)")),
          "INVALID_KEYS", kErrorDomain, {{"key", std::string(k.name)}});
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateConversationId(std::string_view id) {
  if (id.empty()) return InvalidTurn("conversation_id is empty");
  if (id.size() > kMaxConversationIdSize) {
    return InvalidTurn(absl::StrCat("conversation_id is ", id.size(),
                                    " bytes; NLX ids are UUIDs (at most 128 characters)"));
  }
  if (!PrintableNoSpace(id)) {
    return InvalidTurn(
        "conversation_id may hold printable ASCII only (no spaces or control characters); "
        "NLX ids are UUIDs such as 94712479-acea-4c42-b375-e3757056b44b");
  }
  return absl::OkStatus();
}

std::string ChannelKeyWithLanguage(std::string_view channel_key, std::string_view language) {
  if (language.empty()) return std::string(channel_key);
  std::string suffix = absl::StrCat("-", Av(language));
  if (absl::EndsWith(Av(channel_key), suffix)) return std::string(channel_key);
  return absl::StrCat(Av(channel_key), suffix);
}

std::string PercentEncode(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(bytes.size());
  for (char ch : bytes) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

absl::StatusOr<std::string> UpgradeUrl(std::string_view base_url, const Keys& keys,
                                       std::string_view conversation_id,
                                       std::string_view language) {
  if (!absl::StartsWith(Av(base_url), "wss://") && !absl::StartsWith(Av(base_url), "ws://")) {
    return absl::InvalidArgumentError(
        absl::StrCat("NLX URL must start with wss:// (or ws:// for local emulators), got \"",
                     Av(log::RedactUrl(Shorten(base_url, 64))), "\""));
  }
  if (base_url.find('#') != std::string_view::npos) {
    return absl::InvalidArgumentError("NLX URL must not have a #fragment");
  }
  if (absl::Status st = ValidateKeys(keys); !st.ok()) return st;
  if (!conversation_id.empty()) {
    if (absl::Status st = ValidateConversationId(conversation_id); !st.ok()) return st;
  }
  if (!language.empty() && !PrintableNoSpace(language)) {
    return absl::InvalidArgumentError("language must be a code such as en-US");
  }
  std::string url(base_url);
  const size_t q = url.find('?');
  if (q == std::string::npos) {
    url.push_back('?');
  } else if (q + 1 < url.size() && url.back() != '&') {
    url.push_back('&');
  }
  absl::StrAppend(&url, "apiKey=", PercentEncode(keys.api_key),
                  "&deploymentKey=", PercentEncode(keys.deployment_key),
                  "&channelKey=", PercentEncode(ChannelKeyWithLanguage(keys.channel_key, language)));
  if (!conversation_id.empty()) {
    absl::StrAppend(&url, "&conversationId=", PercentEncode(conversation_id));
  }
  if (!language.empty()) absl::StrAppend(&url, "&languageCode=", PercentEncode(language));
  return url;
}

absl::StatusOr<std::string> EncodeTurn(const v1::Turn& turn, std::string_view conversation_id,
                                       std::string_view default_language) {
  json::object frame;
  json::object request;
  switch (turn.request_case()) {
    case v1::Turn::kText: {
      if (turn.text().empty()) {
        return InvalidTurn("turn.text is empty: send the user's words, or a structured request");
      }
      json::object unstructured;
      unstructured["text"] = Jv(turn.text());
      request["unstructured"] = std::move(unstructured);
      break;
    }
    case v1::Turn::kStructured: {
      const v1::StructuredRequest& s = turn.structured();
      json::object st;
      if (!s.choice_id().empty()) st["choiceId"] = Jv(s.choice_id());
      if (!s.node_id().empty()) st["nodeId"] = Jv(s.node_id());
      // flowId is intentId's newer name; NLX's SDK sends the flow as intentId too.
      if (!s.intent_id().empty()) {
        st["intentId"] = Jv(s.intent_id());
      } else if (!s.flow_id().empty()) {
        st["intentId"] = Jv(s.flow_id());
      }
      if (!s.flow_id().empty()) st["flowId"] = Jv(s.flow_id());
      if (s.slots_size() > 0) {
        json::array slots;
        slots.reserve(s.slots_size());
        for (int i = 0; i < s.slots_size(); ++i) {
          const v1::Slot& slot = s.slots(i);
          if (slot.slot_id().empty()) {
            return InvalidTurn(absl::StrCat("turn.structured.slots[", i, "].slot_id is empty"));
          }
          json::object o;
          o["slotId"] = Jv(slot.slot_id());
          json::value value;
          if (slot.has_value()) {
            if (absl::Status st2 = ToJson(slot.value(),
                                          absl::StrCat("turn.structured.slots[", i, "].value"), 0,
                                          &value);
                !st2.ok()) {
              return st2;
            }
          }
          o["value"] = std::move(value);
          slots.push_back(std::move(o));
        }
        st["slots"] = std::move(slots);
      }
      if (s.upload_ids_size() > 0) {
        json::array ids;
        for (const std::string& id : s.upload_ids()) ids.push_back(Jv(id));
        st["uploadIds"] = std::move(ids);
      }
      if (!s.utterance().empty()) st["utterance"] = Jv(s.utterance());
      if (s.poll()) st["poll"] = true;
      if (st.empty()) {
        return InvalidTurn(
            "turn.structured is empty: set choice_id, intent_id/flow_id, slots, upload_ids, "
            "utterance or poll");
      }
      request["structured"] = std::move(st);
      break;
    }
    case v1::Turn::REQUEST_NOT_SET:
      return InvalidTurn("the turn has no request: set turn.text or turn.structured");
  }
  frame["request"] = std::move(request);
  if (!conversation_id.empty()) frame["conversationId"] = Jv(conversation_id);
  if (!turn.user_id().empty()) frame["userId"] = Jv(turn.user_id());
  if (turn.has_context()) {
    json::value context;
    if (absl::Status st = ToJson(turn.context(), "turn.context", 0, &context); !st.ok()) return st;
    frame["context"] = std::move(context);
  }
  std::string_view language =
      turn.language_code().empty() ? default_language : std::string_view(turn.language_code());
  if (!language.empty()) frame["languageCode"] = Jv(language);
  if (!turn.extra_json().empty()) {
    boost::system::error_code ec;
    json::value extra = json::parse(Jv(turn.extra_json()), ec, {}, ParseOptions());
    if (ec) {
      return InvalidTurn(absl::StrCat("turn.extra_json is not valid JSON (", ec.message(),
                                      "); send one JSON object, e.g. {\"environment\":\"development\"}"));
    }
    if (!extra.is_object()) {
      return InvalidTurn(absl::StrCat("turn.extra_json must be a JSON object, not ",
                                      Av(JsonTypeName(extra))));
    }
    for (auto& [key, value] : extra.get_object()) {
      for (std::string_view owned : kTurnFields) {
        if (Sv(key) == owned) {
          return InvalidTurn(absl::StrCat("turn.extra_json sets \"", Av(owned),
                                          "\", which the bridge writes: use the Turn field "
                                          "instead"));
        }
      }
      frame[key] = std::move(value);
    }
  }
  return json::serialize(frame);
}

std::string_view FrameKindName(FrameKind kind) {
  switch (kind) {
    case FrameKind::kAck: return "ack";
    case FrameKind::kResponse: return "response";
    case FrameKind::kError: return "error";
    case FrameKind::kUnknown: return "unknown";
  }
  return "unknown";
}

absl::StatusOr<Frame> DecodeFrame(std::string_view text) {
  // The DOM lives only while the frame is decoded: a monotonic arena (first 4 KiB on the
  // stack) instead of one heap allocation per string, object and array.
  unsigned char arena[4096];
  json::monotonic_resource mr(arena, sizeof(arena));
  boost::system::error_code ec;
  json::value v = json::parse(Jv(text), ec, &mr, ParseOptions());
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("upstream frame is not valid JSON: ", ec.message()));
  }
  if (!v.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("upstream frame is ", Av(JsonTypeName(v)),
                                                   ", expected a JSON object"));
  }
  const json::object& o = v.get_object();
  Frame f;
  if (Field(o, "messages") != nullptr) {
    f.kind = FrameKind::kResponse;
    if (absl::Status st = DecodeResponse(o, &f.response); !st.ok()) return st;
    f.conversation_id = f.response.conversation_id();
    f.response.set_json(std::string(text));
    return f;
  }
  absl::StatusOr<std::optional<std::string>> error = ErrorText(o);
  if (!error.ok()) return error.status();
  if (error->has_value()) {
    f.kind = FrameKind::kError;
    f.error_message = std::move(**error);
    if (absl::Status st = GetString(o, "requestId", "requestId", &f.request_id); !st.ok()) {
      return st;
    }
    if (absl::Status st = GetString(o, "conversationId", "conversationId", &f.conversation_id);
        !st.ok()) {
      return st;
    }
    f.raw = std::string(text);
    return f;
  }
  if (absl::Status st = GetString(o, "conversationId", "conversationId", &f.conversation_id);
      !st.ok()) {
    return st;
  }
  f.kind = f.conversation_id.empty() ? FrameKind::kUnknown : FrameKind::kAck;
  f.raw = std::string(text);
  return f;
}

absl::Status ErrorFrameStatus(const Frame& error, std::string_view what) {
  ErrorRow row = ClassifyError(error.error_message);
  std::string shown = log::Redact(Shorten(error.error_message, 300));
  std::map<std::string, std::string> metadata{{"upstream_message", shown}};
  if (!error.request_id.empty()) metadata["upstream_request_id"] = error.request_id;
  return core::WithErrorInfo(
      absl::Status(row.code, absl::StrCat(Av(what), ": NLX answered with an error: \"", shown,
                                          "\"")),
      row.reason, kErrorDomain, metadata);
}

absl::Status UpgradeRefusedStatus(int http_status, std::string_view body) {
  std::string shown = log::Redact(Shorten(nlx::Sv(absl::StripAsciiWhitespace(Av(body))), 200));
  std::string said = shown.empty() ? "" : absl::StrCat(" (\"", shown, "\")");
  std::map<std::string, std::string> metadata{{"http_status", absl::StrCat(http_status)}};
  if (http_status == 401 || http_status == 403) {
    return core::WithErrorInfo(
        absl::UnauthenticatedError(absl::StrCat(
            "NLX refused the keys: the upgrade was answered ", http_status, said,
            "; check api_key, deployment_key and channel_key (with its language suffix, e.g. "
            "-en-US) or the x-nlx-* metadata")),
        kReasonKeysRefused, kErrorDomain, metadata);
  }
  if (http_status == 429) {
    return core::WithErrorInfo(
        absl::ResourceExhaustedError(absl::StrCat(
            "NLX refused the connection: too many requests (429)", said, "; retry later")),
        kReasonUpgradeRefused, kErrorDomain, metadata);
  }
  return core::WithErrorInfo(
      absl::UnavailableError(absl::StrCat("NLX refused the connection: the upgrade was answered ",
                                          http_status, said)),
      kReasonUpgradeRefused, kErrorDomain, metadata);
}

}  // namespace wsbridge::nlx
