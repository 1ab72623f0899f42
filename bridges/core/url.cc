#include "bridges/core/url.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/strings.h"

namespace wsbridge::core {

absl::StatusOr<ParsedUrl> ParseUrl(std::string_view url, std::string_view secure,
                                   std::string_view plain, std::string_view what) {
  ParsedUrl out;
  const auto scheme = [&](std::string_view s) {
    return url.size() >= s.size() + 3 && absl::EqualsIgnoreCase(Av(url.substr(0, s.size())), Av(s)) &&
           url.substr(s.size(), 3) == "://";
  };
  std::string_view rest;
  if (scheme(secure)) {
    out.tls = true;
    rest = url.substr(secure.size() + 3);
  } else if (scheme(plain)) {
    rest = url.substr(plain.size() + 3);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(Av(what), " \"", log::RedactUrl(url),
                                                   "\" must start with ", Av(secure), ":// or ",
                                                   Av(plain), "://"));
  }
  const size_t end = rest.find_first_of("/?#");
  std::string_view authority = rest.substr(0, end);
  std::string_view tail = end == std::string_view::npos ? std::string_view() : rest.substr(end);
  if (const size_t hash = tail.find('#'); hash != std::string_view::npos) tail = tail.substr(0, hash);
  if (authority.find('@') != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(what), " must not carry user:password@; send credentials in headers"));
  }
  std::string_view port;
  if (!authority.empty() && authority.front() == '[') {
    const size_t close = authority.find(']');
    std::string_view after =
        close == std::string_view::npos ? std::string_view() : authority.substr(close + 1);
    if (close == std::string_view::npos || (!after.empty() && after.front() != ':')) {
      return absl::InvalidArgumentError(absl::StrCat(Av(what), " has a bad IPv6 host"));
    }
    out.host = std::string(authority.substr(1, close - 1));
    if (!after.empty()) port = after.substr(1);
  } else {
    const size_t colon = authority.rfind(':');
    out.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (out.host.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(what), " \"", log::RedactUrl(url), "\" has no host"));
  }
  const std::string_view default_port = out.tls ? "443" : "80";
  if (port.empty()) {
    out.port = std::string(default_port);
  } else {
    int p = 0;
    if (!absl::SimpleAtoi(Av(port), &p) || p <= 0 || p > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat(Av(what), " \"", log::RedactUrl(url), "\" has a bad port"));
    }
    out.port = std::string(port);
  }
  const bool v6 = out.host.find(':') != std::string::npos;
  out.host_header = v6 ? absl::StrCat("[", out.host, "]") : out.host;
  if (out.port != default_port) absl::StrAppend(&out.host_header, ":", out.port);
  if (tail.empty()) {
    out.target.assign(1, '/');  // (a literal here trips a GCC 12 -Wrestrict false positive)
  } else if (tail.front() == '?') {
    out.target = absl::StrCat("/", Av(tail));
  } else {
    out.target = std::string(tail);
  }
  return out;
}

}  // namespace wsbridge::core
