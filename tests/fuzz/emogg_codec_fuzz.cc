// Fuzzes every Emogg codec function that reads upstream or caller bytes, with
// Boost.JSON as the oracle for the decoder's own one-pass JSON grammar.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json.hpp>

#include "bridges/emogg/codec.h"

namespace {

namespace json = boost::json;
namespace emogg = wsbridge::emogg;

bool BoostParse(std::string_view text, json::value* out = nullptr) {
  json::parse_options opt;
  opt.max_depth = emogg::kMaxDepth;
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(text.data(), text.size()), ec, {}, opt);
  if (!ec && out != nullptr) *out = std::move(v);
  return !ec;
}

// A view the decoder returned must point into the frame and be one JSON value.
void CheckSpan(std::string_view frame, std::string_view span) {
  if (span.empty()) return;
  if (span.data() < frame.data() || span.data() + span.size() > frame.data() + frame.size()) {
    __builtin_trap();
  }
  if (!BoostParse(span)) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);

  emogg::Frame f = emogg::DecodeFrame(in);
  const bool grammar_ok =
      !(f.kind == emogg::FrameKind::kMalformed && f.reason.rfind("not valid JSON", 0) == 0);
  json::value v;
  const bool boost_ok = BoostParse(in, &v);
  // The decoder is stricter in one documented way: exponents above 999999999, which
  // Boost.JSON takes up to INT_MAX.
  const bool stricter = !grammar_ok && boost_ok &&
                        f.reason.find("exponent out of range") != std::string::npos;
  if (grammar_ok != boost_ok && !stricter) __builtin_trap();
  switch (f.kind) {
    case emogg::FrameKind::kMalformed:
      if (f.reason.empty() || !f.route().empty()) __builtin_trap();
      break;
    case emogg::FrameKind::kEvent: {
      if (!v.is_array() || v.as_array().size() < 4) __builtin_trap();
      if (f.subscription_id.empty() || f.route() != f.subscription_id) __builtin_trap();
      // Decoded strings agree with Boost.JSON's.
      if (v.as_array()[0].as_string() != f.subscription_id) __builtin_trap();
      if (v.as_array()[2].as_string() != f.type) __builtin_trap();
      CheckSpan(in, f.timestamp_raw);
      CheckSpan(in, f.event_data);
      break;
    }
    case emogg::FrameKind::kResponse:
    case emogg::FrameKind::kAuthAnswer:
    case emogg::FrameKind::kPingAnswer: {
      if (!v.is_object() || f.status < 100 || f.status > 599) __builtin_trap();
      const json::value* path = v.as_object().if_contains("path");
      if (path == nullptr) __builtin_trap();
      if (path->is_null() ? !f.path.empty() : (!path->is_string() || path->as_string() != f.path)) {
        __builtin_trap();
      }
      CheckSpan(in, f.body);
      CheckSpan(in, f.data);
      if (f.is_error()) {
        absl::Status st = emogg::UpstreamError(f);
        if (st.ok()) __builtin_trap();
      }
      break;
    }
  }

  // A caller body the check lets through is one JSON object.
  if (emogg::ValidateRequestBody(in).ok() && !in.empty()) {
    json::value body;
    if (!BoostParse(in, &body) || !body.is_object()) __builtin_trap();
    // ...and the request frame built around it is valid JSON with the same path.
    json::value frame;
    if (!BoostParse(emogg::EncodeRequest("a.1", "p", in), &frame)) __builtin_trap();
  }
  // Quoting: whenever the quoted text is valid JSON (the input was valid UTF-8), it
  // decodes back to the input.
  json::value quoted;
  if (BoostParse(emogg::JsonQuote(in), &quoted)) {
    if (!quoted.is_string() || quoted.as_string() != json::string_view(in.data(), in.size())) {
      __builtin_trap();
    }
  }
  (void)emogg::ValidatePath(in);
  (void)emogg::ValidateKey(in);
  return 0;
}
