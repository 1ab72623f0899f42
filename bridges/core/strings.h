// Conversions between std::string_view and abseil's string_view, which is a distinct type
// in Debian's abseil build (it is not an alias of std::string_view there).
#pragma once

#include <string_view>

#include "absl/strings/string_view.h"

namespace wsbridge::core {

inline absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }
inline std::string_view Sv(absl::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace wsbridge::core
