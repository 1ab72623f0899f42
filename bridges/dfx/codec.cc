#include "bridges/dfx/codec.h"

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/serialize.hpp>
#include <openssl/evp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/json.h"
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

// Reads the fields ResponseFrame names from a JSON body without building a DOM (a DOM
// costs an allocation per object, member name and string: ~10 per result frame on the
// fan-out path). Same answers as reading them from json::parse's value: members of the
// top-level object only, the last of duplicate keys wins, a string field of any other
// type reads "", ChunkOrder as core::JsonInt reads it.
class ResponseFieldsHandler {
 public:
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  using ec = boost::system::error_code;

  explicit ResponseFieldsHandler(ResponseFrame* out) : out_(out) {}
  bool top_is_object() const { return top_is_object_; }
  std::size_t top_members() const { return top_members_; }

  bool on_document_begin(ec&) { return true; }
  bool on_document_end(ec&) { return true; }
  bool on_array_begin(ec&) {
    Scalar();
    ++depth_;
    return true;
  }
  bool on_array_end(std::size_t, ec&) {
    --depth_;
    return true;
  }
  bool on_object_begin(ec&) {
    if (depth_ == 0) top_is_object_ = true;
    Scalar();
    ++depth_;
    return true;
  }
  bool on_object_end(std::size_t, ec&) {
    --depth_;
    return true;
  }
  bool on_key_part(json::string_view part, std::size_t, ec&) {
    if (depth_ == 1) key_.append(part.data(), part.size());
    return true;
  }
  bool on_key(json::string_view last, std::size_t, ec&) {
    if (depth_ != 1) return true;
    ++top_members_;
    std::string_view key(last.data(), last.size());
    if (!key_.empty()) {
      key_.append(last.data(), last.size());
      key = key_;
    }
    field_ = key == "Code"                ? Field::kCode
             : key == "Message"           ? Field::kMessage
             : key == "ID"                ? Field::kId
             : key == "MeasurementDataID" ? Field::kDataId
             : key == "ChunkOrder"        ? Field::kChunkOrder
                                          : Field::kNone;
    key_.clear();
    return true;
  }
  bool on_string_part(json::string_view part, std::size_t, ec&) {
    if (depth_ == 1 && field_ != Field::kNone) str_.append(part.data(), part.size());
    return true;
  }
  bool on_string(json::string_view last, std::size_t, ec&) {
    if (depth_ != 1 || field_ == Field::kNone) return true;
    std::string_view v(last.data(), last.size());
    if (!str_.empty()) {
      str_.append(last.data(), last.size());
      v = str_;
    }
    if (field_ == Field::kChunkOrder) {
      out_->chunk_order = std::nullopt;
      if (!v.empty() && v.size() < 19 && AllDigits(v)) out_->chunk_order = std::stoll(std::string(v));
    } else {
      *Str() = std::string(v);
    }
    str_.clear();
    field_ = Field::kNone;
    return true;
  }
  bool on_number_part(json::string_view, ec&) { return true; }
  bool on_int64(int64_t v, json::string_view, ec&) {
    Int(v);
    return true;
  }
  bool on_uint64(uint64_t v, json::string_view, ec&) {
    if (v <= static_cast<uint64_t>(INT64_MAX)) {
      Int(static_cast<int64_t>(v));
    } else {
      Scalar();
    }
    return true;
  }
  bool on_double(double, json::string_view, ec&) {
    Scalar();
    return true;
  }
  bool on_bool(bool, ec&) {
    Scalar();
    return true;
  }
  bool on_null(ec&) {
    Scalar();
    return true;
  }
  bool on_comment_part(json::string_view, ec&) { return true; }
  bool on_comment(json::string_view, ec&) { return true; }

 private:
  enum class Field { kNone, kCode, kMessage, kId, kDataId, kChunkOrder };
  std::string* Str() {
    switch (field_) {
      case Field::kCode: return &out_->code;
      case Field::kMessage: return &out_->message;
      case Field::kId: return &out_->id;
      case Field::kDataId: return &out_->measurement_data_id;
      default: return nullptr;
    }
  }
  // A member value that is not a string (or an integer for ChunkOrder) starts.
  void Scalar() {
    if (depth_ != 1 || field_ == Field::kNone) return;
    if (field_ == Field::kChunkOrder) {
      out_->chunk_order = std::nullopt;
    } else {
      Str()->clear();
    }
    field_ = Field::kNone;
  }
  void Int(int64_t v) {
    if (depth_ == 1 && field_ == Field::kChunkOrder) {
      out_->chunk_order = v;
      field_ = Field::kNone;
      return;
    }
    Scalar();
  }

  ResponseFrame* out_;
  int depth_ = 0;
  bool top_is_object_ = false;
  std::size_t top_members_ = 0;
  Field field_ = Field::kNone;
  std::string key_;  // a key that arrived in parts
  std::string str_;  // a string value that arrived in parts
};

}  // namespace

absl::Status ValidateActionId(std::string_view action_id) {
  if (action_id.size() != kActionIdSize || !AllDigits(action_id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "action_id must be exactly four digits (e.g. \"0100\"), got \"",
        Av(action_id.substr(0, 16)), action_id.size() > 16 ? "...\"" : "\""));
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
    json::parse_options options;
    options.max_depth = 32;  // as core::ParseJson
    json::basic_parser<ResponseFieldsHandler> parser(options, &out);
    boost::system::error_code ec;
    const std::size_t n = parser.write_some(false, body.data(), body.size(), ec);
    if (!ec && n < body.size()) ec = json::error::extra_data;
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat("body is not valid JSON: ", ec.message()));
    }
    const ResponseFieldsHandler& h = parser.handler();
    out.empty = h.top_is_object() && h.top_members() == 0;
  }
  return out;
}

std::string LoginBody(std::string_view token) {
  json::object o;
  o["Token"] = core::Jv(token);
  return json::serialize(o);
}

std::string SubscribeResultsBody(std::string_view measurement_id, std::string_view request_id) {
  json::object params;
  params["ID"] = core::Jv(measurement_id);
  json::object o;
  o["Params"] = std::move(params);
  o["RequestID"] = core::Jv(request_id);
  return json::serialize(o);
}

namespace {

// Whether `s` goes into a JSON string literal as is (a measurement id always does).
bool JsonPlain(std::string_view s) {
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') return false;
  }
  return true;
}

// Appends {"Params":{"ID":<id>},"Action":"<stage>::PROCESS","Payload":"<base64>"} to
// `out` (whose `prefix` bytes are already written), sized exactly once.
void AppendMeasurementDataBody(std::string* out, size_t prefix, std::string_view measurement_id,
                               std::string_view stage, bool ignore, std::string_view payload) {
  constexpr std::string_view kParams = R"({"Params":{"ID":)";
  constexpr std::string_view kAction = R"(},"Action":")";
  constexpr std::string_view kPayload = R"(","Payload":")";
  constexpr std::string_view kEnd = R"("})";
  const std::string_view mode = ignore ? "::IGNORE" : "::PROCESS";
  // Quoted as is, or by Boost's serializer when something in it needs escaping.
  const bool plain = JsonPlain(measurement_id);
  const std::string escaped = plain ? std::string() : json::serialize(core::Jv(measurement_id));
  const size_t id_size = plain ? measurement_id.size() + 2 : escaped.size();
  const size_t encoded = 4 * ((payload.size() + 2) / 3);
  const size_t head = prefix + kParams.size() + id_size + kAction.size() + stage.size() +
                      mode.size() + kPayload.size();
  out->reserve(head + encoded + kEnd.size());
  out->append(kParams);
  if (plain) {
    out->append(1, '"').append(measurement_id).append(1, '"');
  } else {
    out->append(escaped);
  }
  out->append(kAction).append(stage).append(mode).append(kPayload);
  // EVP_EncodeBlock writes a NUL after the encoding, where kEnd goes next.
  out->resize(head + encoded);
  if (!payload.empty()) {
    EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out->data() + head),
                    reinterpret_cast<const unsigned char*>(payload.data()),
                    static_cast<int>(payload.size()));
  }
  out->append(kEnd);
}

}  // namespace

std::string MeasurementDataBody(std::string_view measurement_id, std::string_view stage,
                                bool ignore, std::string_view payload) {
  std::string out;
  AppendMeasurementDataBody(&out, 0, measurement_id, stage, ignore, payload);
  return out;
}

std::string EncodeMeasurementData(std::string_view request_id, std::string_view measurement_id,
                                  std::string_view stage, bool ignore, std::string_view payload) {
  // The 14-byte head fits the string's inline buffer; the body's append reserves the
  // whole frame in one allocation.
  std::string out;
  out.append(kActionMeasurementData).append(request_id);
  AppendMeasurementDataBody(&out, out.size(), measurement_id, stage, ignore, payload);
  return out;
}

std::string CreateMeasurementBody(const CreateMeasurementParams& p) {
  json::object o;
  o["StudyID"] = p.study_id;
  o["Resolution"] = p.resolution == 0 ? 100u : p.resolution;
  if (!p.user_profile_id.empty()) o["UserProfileID"] = p.user_profile_id;
  if (!p.partner_id.empty()) o["PartnerID"] = p.partner_id;
  return json::serialize(o);
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
