#include "bridges/core/ws_handshake.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bridges/core/ws_codec.h"

namespace wsbridge::core::ws {
namespace {

namespace http = boost::beast::http;

absl::string_view AV(boost::beast::string_view s) { return absl::string_view(s.data(), s.size()); }

// `value` (a comma-separated header list) holds `token`, compared without case.
bool HasToken(absl::string_view value, absl::string_view token) {
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    if (absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(part), token)) return true;
  }
  return false;
}

}  // namespace

absl::Status CheckUpgradeAnswer(const http::response_header<>& res, std::string_view key,
                                const std::vector<std::string>& requested, std::string* negotiated) {
  // Every instance of a header counts: a second Sec-WebSocket-Extensions must not slip
  // an extension past a first, empty one.
  bool extension = false;
  for (auto [it, end] = res.equal_range(http::field::sec_websocket_extensions); it != end; ++it) {
    if (!absl::StripAsciiWhitespace(AV(it->value())).empty()) extension = true;
  }
  bool connection_upgrade = false;
  for (auto [it, end] = res.equal_range(http::field::connection); it != end; ++it) {
    if (HasToken(AV(it->value()), "upgrade")) connection_upgrade = true;
  }
  absl::string_view bad;
  if (res.result_int() != 101) {
    bad = "the answer is not 101 Switching Protocols";
  } else if (res.version() != 11) {
    bad = "the answer is not HTTP/1.1";
  } else if (res.count(http::field::upgrade) != 1 ||
             !absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(AV(res[http::field::upgrade])), "websocket")) {
    bad = "the answer has no \"Upgrade: websocket\"";
  } else if (!connection_upgrade) {
    bad = "the answer has no \"Connection: Upgrade\"";
  } else if (res.count(http::field::sec_websocket_accept) != 1 ||
             AV(res[http::field::sec_websocket_accept]) != AcceptKey(key)) {
    bad = "Sec-WebSocket-Accept does not match the key sent";
  } else if (extension) {
    bad = "the server chose an extension that was not offered";
  } else if (res.count(http::field::sec_websocket_protocol) > 1) {
    bad = "the answer names more than one subprotocol";
  }
  if (!bad.empty()) return absl::UnavailableError(bad);
  std::string chosen(AV(res[http::field::sec_websocket_protocol]));
  if (!requested.empty() && chosen.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "upstream accepted none of the requested subprotocols (", absl::StrJoin(requested, ", "), ")"));
  }
  if (!chosen.empty() && std::find(requested.begin(), requested.end(), chosen) == requested.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("upstream selected subprotocol \"", chosen, "\" that was not requested"));
  }
  *negotiated = std::move(chosen);
  return absl::OkStatus();
}

}  // namespace wsbridge::core::ws
