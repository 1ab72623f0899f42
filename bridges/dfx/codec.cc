#include "bridges/dfx/codec.h"

#include <openssl/evp.h>

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::dfx {
namespace {

namespace json = boost::json;

bool AllDigits(std::string_view s) {
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

bool AllLetters(std::string_view s) {
  for (char c : s) {
    if (!absl::ascii_isalpha(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// Parses without exceptions; null on error.
std::optional<json::value> Parse(std::string_view text, std::string* why = nullptr) {
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(text.data(), text.size()), ec);
  if (ec) {
    if (why != nullptr) *why = ec.message();
    return std::nullopt;
  }
  return v;
}

std::optional<int64_t> AsInt(const json::value* v) {
  if (v == nullptr) return std::nullopt;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64() && v->get_uint64() <= static_cast<uint64_t>(INT64_MAX)) {
    return static_cast<int64_t>(v->get_uint64());
  }
  if (v->is_string()) {
    const json::string& s = v->get_string();
    if (!s.empty() && s.size() < 19 && AllDigits(std::string_view(s.data(), s.size()))) {
      return std::stoll(std::string(s.data(), s.size()));
    }
  }
  return std::nullopt;
}

std::string AsString(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(json::string_view(key.data(), key.size()));
  if (v == nullptr || !v->is_string()) return "";
  return std::string(v->get_string().data(), v->get_string().size());
}

absl::StatusCode CodeFor(std::string_view upstream_code, int status) {
  if (upstream_code == "MISALIGNED_CHUNK" || upstream_code == "MEASUREMENT_CLOSED") {
    return absl::StatusCode::kFailedPrecondition;
  }
  if (upstream_code == "INVALID_MEASUREMENT" || upstream_code == "NOT_FOUND") {
    return absl::StatusCode::kNotFound;
  }
  if (upstream_code == "UNPACKER_RPC_ERROR" || upstream_code == "BAD_REQUEST" ||
      upstream_code == "INVALID_PARAMETER") {
    return absl::StatusCode::kInvalidArgument;
  }
  if (upstream_code == "RATE_LIMIT") return absl::StatusCode::kResourceExhausted;
  if (upstream_code == "INVALID_TOKEN" || upstream_code == "NOT_AUTHENTICATED") {
    return absl::StatusCode::kUnauthenticated;
  }
  return core::CodeForHttpStatus(status);
}

}  // namespace

absl::Status ValidateActionId(std::string_view action_id) {
  if (action_id.size() != kActionIdSize || !AllDigits(action_id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "action_id must be exactly four digits (e.g. \"0100\"), got \"",
        Av(action_id.substr(0, 16)), action_id.size() > 16 ? "...\"" : "\""));
  }
  return absl::OkStatus();
}

namespace {

// A SAX handler that builds nothing: validating a caller's json_body needs only the
// grammar and the kind of the top-level value, not a DOM (which cost ~10 allocations
// per bridged Call).
struct ValidatingHandler {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  int depth = 0;
  bool top_is_object = false;
  void Value(bool object) {
    if (depth == 0) top_is_object = object;
  }
  bool on_document_begin(boost::system::error_code&) { return true; }
  bool on_document_end(boost::system::error_code&) { return true; }
  bool on_array_begin(boost::system::error_code&) { Value(false); ++depth; return true; }
  bool on_array_end(std::size_t, boost::system::error_code&) { --depth; return true; }
  bool on_object_begin(boost::system::error_code&) { Value(true); ++depth; return true; }
  bool on_object_end(std::size_t, boost::system::error_code&) { --depth; return true; }
  bool on_string_part(json::string_view, std::size_t, boost::system::error_code&) { return true; }
  bool on_string(json::string_view, std::size_t, boost::system::error_code&) { Value(false); return true; }
  bool on_key_part(json::string_view, std::size_t, boost::system::error_code&) { return true; }
  bool on_key(json::string_view, std::size_t, boost::system::error_code&) { return true; }
  bool on_number_part(json::string_view, boost::system::error_code&) { return true; }
  bool on_int64(int64_t, json::string_view, boost::system::error_code&) { Value(false); return true; }
  bool on_uint64(uint64_t, json::string_view, boost::system::error_code&) { Value(false); return true; }
  bool on_double(double, json::string_view, boost::system::error_code&) { Value(false); return true; }
  bool on_bool(bool, boost::system::error_code&) { Value(false); return true; }
  bool on_null(boost::system::error_code&) { Value(false); return true; }
  bool on_comment_part(json::string_view, boost::system::error_code&) { return true; }
  bool on_comment(json::string_view, boost::system::error_code&) { return true; }
};

}  // namespace

absl::Status ValidateJsonObject(std::string_view text) {
  json::basic_parser<ValidatingHandler> parser(json::parse_options{});
  boost::system::error_code ec;
  const std::size_t n = parser.write_some(false, text.data(), text.size(), ec);
  if (!ec && n < text.size()) ec = json::error::extra_data;
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "json_body is not valid JSON (", ec.message(), "); send one JSON object, e.g. {}"));
  }
  if (!parser.handler().top_is_object) {
    return absl::InvalidArgumentError(
        "json_body must be a JSON object (e.g. {\"Key\": \"value\"}), not an array or scalar");
  }
  return absl::OkStatus();
}

std::string MakeRequestId(std::string_view action, core::Rng& rng) {
  static constexpr std::string_view kLetters =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
  std::string id(action.substr(0, kActionIdSize));
  std::uniform_int_distribution<size_t> pick(0, kLetters.size() - 1);
  while (id.size() < kRequestIdSize) id.push_back(kLetters[pick(rng)]);
  return id;
}

bool IsRequestId(std::string_view id) {
  return id.size() == kRequestIdSize && AllDigits(id.substr(0, kActionIdSize)) &&
         AllLetters(id.substr(kActionIdSize));
}

std::string EncodeRequest(std::string_view action, std::string_view request_id,
                          std::string_view json_body) {
  std::string out;
  out.reserve(action.size() + request_id.size() + json_body.size());
  out.append(action).append(request_id).append(json_body);
  return out;
}

absl::StatusOr<ResponseFrame> ParseResponse(std::string_view frame) {
  constexpr size_t kHeader = kRequestIdSize + kStatusSize;
  if (frame.size() < kHeader) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame of ", frame.size(), " bytes is shorter than its ", kHeader,
                     "-byte header"));
  }
  std::string_view rid = frame.substr(0, kRequestIdSize);
  if (!IsRequestId(rid)) {
    return absl::InvalidArgumentError(
        "request id is not a 4-digit action id followed by 6 letters");
  }
  std::string_view status = frame.substr(kRequestIdSize, kStatusSize);
  if (!AllDigits(status)) {
    return absl::InvalidArgumentError("status is not three digits");
  }
  std::string_view body = frame.substr(kHeader);
  ResponseFrame out;
  out.request_id = rid;
  out.status = (status[0] - '0') * 100 + (status[1] - '0') * 10 + (status[2] - '0');
  out.body = body;
  if (!body.empty()) {
    std::string why;
    std::optional<json::value> v = Parse(body, &why);
    if (!v.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat("body is not valid JSON: ", why));
    }
    if (v->is_object()) {
      const json::object& o = v->get_object();
      out.empty = o.empty();
      out.code = AsString(o, "Code");
      out.message = AsString(o, "Message");
      out.id = AsString(o, "ID");
      out.measurement_data_id = AsString(o, "MeasurementDataID");
      out.chunk_order = AsInt(o.if_contains("ChunkOrder"));
    } else {
      out.empty = false;
    }
  }
  return out;
}

std::string LoginBody(std::string_view token) {
  json::object o;
  o["Token"] = json::string_view(token.data(), token.size());
  return json::serialize(o);
}

std::string SubscribeResultsBody(std::string_view measurement_id, std::string_view request_id) {
  json::object params;
  params["ID"] = json::string_view(measurement_id.data(), measurement_id.size());
  json::object o;
  o["Params"] = std::move(params);
  o["RequestID"] = json::string_view(request_id.data(), request_id.size());
  return json::serialize(o);
}

std::string MeasurementDataBody(std::string_view measurement_id, std::string_view stage,
                                bool ignore, std::string_view payload) {
  json::object params;
  params["ID"] = json::string_view(measurement_id.data(), measurement_id.size());
  json::object o;
  o["Params"] = std::move(params);
  o["Action"] = absl::StrCat(Av(stage), ignore ? "::IGNORE" : "::PROCESS");
  o["Payload"] = Base64Encode(payload);
  return json::serialize(o);
}

std::string CreateMeasurementBody(const CreateMeasurementParams& p) {
  json::object o;
  o["StudyID"] = p.study_id;
  o["Resolution"] = p.resolution == 0 ? 100u : p.resolution;
  if (!p.user_profile_id.empty()) o["UserProfileID"] = p.user_profile_id;
  if (!p.partner_id.empty()) o["PartnerID"] = p.partner_id;
  return json::serialize(o);
}

std::string Base64Encode(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3), '\0');
  if (bytes.empty()) return out;
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<int>(bytes.size()));
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

ChunkAnswer ChunkAnswerOf(const ResponseFrame& f) {
  ChunkAnswer out;
  out.measurement_data_id = f.id.empty() ? f.measurement_data_id : f.id;
  out.chunk_order = f.chunk_order;
  return out;
}

ResultInfo ResultInfoOf(const ResponseFrame& f) {
  ResultInfo out;
  out.chunk_order = f.chunk_order;
  out.measurement_data_id = f.measurement_data_id;
  return out;
}

absl::Status UpstreamError(const ResponseFrame& f, std::string_view what) {
  std::string reason = f.code.empty() ? absl::StrCat("HTTP_", f.status) : f.code;
  std::string message = absl::StrCat(Av(what), ": upstream answered ", f.status);
  if (!f.code.empty()) absl::StrAppend(&message, " ", f.code);
  if (!f.message.empty()) absl::StrAppend(&message, ": ", log::Redact(f.message));
  return core::WithErrorInfo(absl::Status(CodeFor(f.code, f.status), message), reason,
                             kErrorDomain, {{"upstream_status", absl::StrCat(f.status)}});
}

}  // namespace wsbridge::dfx
