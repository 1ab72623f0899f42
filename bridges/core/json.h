// JSON helpers the codecs share: Boost.JSON without exceptions, as pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>
#include <boost/json/string_view.hpp>
#include <boost/json/value.hpp>

#include "absl/status/status.h"

namespace wsbridge::core {

namespace json = boost::json;

inline json::string_view Jv(std::string_view s) { return json::string_view(s.data(), s.size()); }
inline std::string JsonStr(json::string_view s) { return std::string(s.data(), s.size()); }

// Parses one JSON value; nullopt with the parser's complaint in `why` on error.
// `max_depth` is Boost's nesting limit (its default 32 calls deep valid input malformed).
std::optional<json::value> ParseJson(std::string_view text, std::string* why = nullptr,
                                     std::size_t max_depth = 32);

// An integer field: a JSON integer or a string of up to 18 digits (some servers quote
// numbers); nullopt when absent or anything else.
std::optional<int64_t> JsonInt(const json::value* v);

// A string field of `o`; "" when absent or not a string.
std::string JsonString(const json::object& o, std::string_view key);

// OK when `text` is one JSON object. INVALID_ARGUMENT naming `field` otherwise (the
// parser's complaint, or that it is an array or scalar). Validates without building a
// DOM (which costs ~10 allocations on a hot path).
absl::Status ValidateJsonObject(std::string_view text, std::string_view field = "json_body");

// Standard base64 with padding.
std::string Base64Encode(std::string_view bytes);

}  // namespace wsbridge::core
