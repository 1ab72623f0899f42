// The client's check of a server's answer to the WebSocket upgrade (RFC 6455 4.1), as a
// pure function of the parsed header: core::Connection runs it and
// tests/fuzz/ws_client_fuzz.cc fuzzes it, so the two cannot drift apart.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <boost/beast/http/fields.hpp>
#include <boost/beast/http/message.hpp>

#include "absl/status/status.h"

namespace wsbridge::core::ws {

// Checks a 101 answer to a request sent with Sec-WebSocket-Key `key`, offering no
// extension and the subprotocols `requested`. OK with *negotiated set to the chosen
// subprotocol ("" for none); UNAVAILABLE saying what is wrong with the answer
// (HTTP/1.1, exactly one "Upgrade: websocket", a Connection holding "upgrade", exactly
// one correct Sec-WebSocket-Accept, no extension in any Sec-WebSocket-Extensions, at
// most one Sec-WebSocket-Protocol); FAILED_PRECONDITION when the subprotocol is not one
// requested, or none was chosen while some were requested.
absl::Status CheckUpgradeAnswer(const boost::beast::http::response_header<>& res, std::string_view key,
                                const std::vector<std::string>& requested, std::string* negotiated);

}  // namespace wsbridge::core::ws
