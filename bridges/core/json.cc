#include "bridges/core/json.h"

#include <openssl/evp.h>

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/parse.hpp>

#include "absl/strings/str_cat.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {
namespace {

// A SAX handler that builds nothing: validating needs only the grammar and the kind of
// the top-level value.
struct ValidatingHandler {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  using ec = boost::system::error_code;
  int depth = 0;
  bool top_is_object = false;
  bool Value(bool object) {
    if (depth == 0) top_is_object = object;
    return true;
  }
  bool on_document_begin(ec&) { return true; }
  bool on_document_end(ec&) { return true; }
  bool on_array_begin(ec&) { Value(false); return ++depth > 0; }
  bool on_array_end(std::size_t, ec&) { return --depth >= 0; }
  bool on_object_begin(ec&) { Value(true); return ++depth > 0; }
  bool on_object_end(std::size_t, ec&) { return --depth >= 0; }
  bool on_string_part(json::string_view, std::size_t, ec&) { return true; }
  bool on_string(json::string_view, std::size_t, ec&) { return Value(false); }
  bool on_key_part(json::string_view, std::size_t, ec&) { return true; }
  bool on_key(json::string_view, std::size_t, ec&) { return true; }
  bool on_number_part(json::string_view, ec&) { return true; }
  bool on_int64(int64_t, json::string_view, ec&) { return Value(false); }
  bool on_uint64(uint64_t, json::string_view, ec&) { return Value(false); }
  bool on_double(double, json::string_view, ec&) { return Value(false); }
  bool on_bool(bool, ec&) { return Value(false); }
  bool on_null(ec&) { return Value(false); }
  bool on_comment_part(json::string_view, ec&) { return true; }
  bool on_comment(json::string_view, ec&) { return true; }
};

bool AllDigits(std::string_view s) {
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

}  // namespace

std::optional<json::value> ParseJson(std::string_view text, std::string* why,
                                     std::size_t max_depth) {
  boost::system::error_code ec;
  json::parse_options opt;
  opt.max_depth = max_depth;
  json::value v = json::parse(Jv(text), ec, {}, opt);
  if (ec) {
    if (why != nullptr) *why = ec.message();
    return std::nullopt;
  }
  return v;
}

std::optional<int64_t> JsonInt(const json::value* v) {
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

std::string JsonString(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(Jv(key));
  if (v == nullptr || !v->is_string()) return "";
  return JsonStr(v->get_string());
}

absl::Status ValidateJsonObject(std::string_view text, std::string_view field) {
  json::basic_parser<ValidatingHandler> parser(json::parse_options{});
  boost::system::error_code ec;
  const std::size_t n = parser.write_some(false, text.data(), text.size(), ec);
  if (!ec && n < text.size()) ec = json::error::extra_data;
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        Av(field), " is not valid JSON (", ec.message(), "); send one JSON object, e.g. {}"));
  }
  if (!parser.handler().top_is_object) {
    return absl::InvalidArgumentError(absl::StrCat(
        Av(field), " must be a JSON object (e.g. {\"Key\": \"value\"}), not an array or scalar"));
  }
  return absl::OkStatus();
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

}  // namespace wsbridge::core
