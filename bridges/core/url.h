// URL parsing for the two clients in core (the WebSocket connection and the HTTP client):
// a pure function, no I/O.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace wsbridge::core {

struct ParsedUrl {
  bool tls = false;
  std::string host;         // without IPv6 brackets
  std::string port;         // the scheme's default when the URL names none
  std::string host_header;  // host[:port], the port only when not the default
  std::string target;       // path?query, never empty; the fragment dropped
};

// Parses `secure`://host[:port][/path][?query][#fragment] (TLS) or the same with
// `plain`, e.g. ("wss", "ws") or ("https", "http"); schemes match without case. No
// user:password@. Messages start with `what` ("upstream URL") and show the URL redacted.
absl::StatusOr<ParsedUrl> ParseUrl(std::string_view url, std::string_view secure,
                                   std::string_view plain, std::string_view what);

}  // namespace wsbridge::core
