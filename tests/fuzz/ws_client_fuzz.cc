// Fuzzes the client side of the upstream WebSocket: the bytes a server sends to our
// client, from the handshake answer on, over Beast's in-memory test stream (no socket).
//
// The stream is set up and read the way core::Connection does it (connection.cc:
// DoWsHandshake, OnWsHandshake's subprotocol checks, DoRead/OnRead's two-part reads
// with the first part capped at 512 bytes, the read_message_max limit, no
// permessage-deflate, no auto-fragmenting). Timeouts are left out: they are about time,
// not bytes. Keep the two in step when either changes.
//
// Input: one flags byte, then the server's bytes. The text "@A@" is replaced by the
// correct Sec-WebSocket-Accept for the key the client sent, so the fuzzer can get past
// the handshake (any other accept value must be refused).
//   flags bits 0-1: subprotocols requested: none, [json], [json, v2], [v2]
//   flags bits 2-3: max_message_bytes: 64, 200, 4096, 1 MiB
//   flags bits 4-6: bytes per read of the underlying stream: all, 1, 2, 3, 7, 64, 125, 600
//
// Invariants checked against an independent RFC 6455 parser of the same bytes:
//   - a handshake Beast and our checks accept had status 101, the right accept key and
//     either no subprotocol or one we asked for; when we asked for some, one was chosen;
//   - the messages delivered are exactly the complete messages before the first
//     protocol error, close frame or end of input, byte for byte, with their type;
//   - nothing is delivered after a protocol error; a message over max_message_bytes is
//     never delivered (the read ends with message_too_big); every delivered text
//     message is valid UTF-8;
//   - a valid close frame ends the read as "closed" with its code and reason; a bad one
//     (1 byte, reserved or unused code, bad UTF-8 reason) is a protocol error.
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using beast::error_code;

// connection.cc's first-part read cap (kFirstReadBytes).
constexpr std::size_t kFirstReadBytes = 512;
constexpr std::string_view kAcceptPlaceholder = "@A@";

// --- The reference: RFC 6455 as Beast applies it to a client -------------------------

// Strict UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
// With `complete` false a truncated last sequence is fine (a message still arriving);
// anything already impossible is not.
bool Utf8Ok(std::string_view s, bool complete) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    for (size_t k = 1; k < len; ++k) {
      if (i + k >= n) return !complete;
      const unsigned char b = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return false;
    }
    i += len;
  }
  return true;
}

// RFC 6455 7.4: 1004-1006 and 1014-1015 are reserved, 1016-2999 are for the protocol's
// future use, below 1000 is unused. Codes from 3000 up are the registered (3xxx) and
// private (4xxx) ranges; the RFC does not forbid 5000 and above, and Beast takes them.
bool ValidCloseCode(uint16_t v) {
  if (v >= 1000 && v <= 1003) return true;
  if (v >= 1007 && v <= 1013) return true;
  return v >= 3000;
}

enum class End { kEof, kClosed, kTooBig, kProtocolError };

struct Message {
  std::string payload;
  bool binary = false;
  bool operator==(const Message&) const = default;
};

struct Outcome {
  std::vector<Message> messages;
  End end = End::kEof;
  uint16_t close_code = 0;  // kClosed: 0 when the close frame had no code
  std::string close_reason;
};

uint64_t BigEndian(std::string_view b) {
  uint64_t v = 0;
  for (char c : b) v = (v << 8) | static_cast<unsigned char>(c);
  return v;
}

// What a client must make of `in`, the bytes after the handshake answer.
Outcome Reference(std::string_view in, uint64_t max_message) {
  Outcome out;
  bool in_message = false;
  std::string current;
  bool current_binary = false;
  size_t pos = 0;
  auto fail = [&](End e) {
    out.end = e;
    return out;
  };
  while (true) {
    const std::string_view rest = in.substr(pos);
    if (rest.size() < 2) return fail(End::kEof);
    const unsigned char b0 = static_cast<unsigned char>(rest[0]);
    const unsigned char b1 = static_cast<unsigned char>(rest[1]);
    const bool fin = b0 & 0x80;
    const bool rsv = b0 & 0x70;
    const int op = b0 & 0x0F;
    const bool masked = b1 & 0x80;
    uint64_t len = b1 & 0x7F;
    const size_t ext = len == 126 ? 2 : len == 127 ? 8 : 0;
    const size_t header = 2 + ext + (masked ? 4 : 0);
    if (rest.size() < header) return fail(End::kEof);
    const bool control = op >= 8;
    if (op == 1 || op == 2) {
      if (in_message || rsv) return fail(End::kProtocolError);  // interleaved data frame
    } else if (op == 0) {
      if (!in_message || rsv) return fail(End::kProtocolError);  // continuation without start
    } else if (op == 8 || op == 9 || op == 10) {
      if (!fin || len > 125 || rsv) return fail(End::kProtocolError);
    } else {
      return fail(End::kProtocolError);  // reserved opcode
    }
    if (masked) return fail(End::kProtocolError);  // servers never mask
    if (control && rest.size() < header + len) return fail(End::kEof);
    if (len == 126) {
      len = BigEndian(rest.substr(2, 2));
      if (len < 126) return fail(End::kProtocolError);  // not the shortest form
    } else if (len == 127) {
      len = BigEndian(rest.substr(2, 8));
      if (len < 65536) return fail(End::kProtocolError);
    }
    if (!control) {
      if (op != 0) {
        current.clear();
        current_binary = op == 2;
      }
      if (len > max_message || current.size() > max_message - len) return fail(End::kTooBig);
      in_message = !fin;
    }
    const std::string_view payload = rest.substr(header, std::min<uint64_t>(len, rest.size() - header));
    if (!control) {
      current.append(payload);
      const bool complete = payload.size() == len;
      if (!current_binary && !Utf8Ok(current, complete && fin)) return fail(End::kProtocolError);
      if (!complete) return fail(End::kEof);
      if (fin) out.messages.push_back(Message{std::exchange(current, {}), current_binary});
    } else if (op == 8) {
      if (payload.size() == 1) return fail(End::kProtocolError);
      if (payload.size() >= 2) {
        out.close_code = static_cast<uint16_t>(BigEndian(payload.substr(0, 2)));
        out.close_reason = std::string(payload.substr(2));
        if (!ValidCloseCode(out.close_code) || !Utf8Ok(out.close_reason, true)) {
          return fail(End::kProtocolError);
        }
      }
      return fail(End::kClosed);
    }
    pos += header + payload.size();
  }
}

// --- Helpers ---------------------------------------------------------------------------

std::string AcceptFor(std::string_view key) {
  const std::string in = std::string(key) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(in.data()), in.size(), digest);
  unsigned char b64[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
  const int n = EVP_EncodeBlock(b64, digest, SHA_DIGEST_LENGTH);
  return std::string(reinterpret_cast<const char*>(b64), n);
}

std::string ReplaceAll(std::string_view in, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  for (size_t p = in.find(from); p != std::string_view::npos; p = in.find(from, pos)) {
    out.append(in.substr(pos, p - pos));
    out.append(to);
    pos = p + from.size();
  }
  out.append(in.substr(pos));
  return out;
}

std::string_view Sv(beast::string_view s) { return {s.data(), s.size()}; }

// The client as core::Connection drives it.
struct Client {
  using Ws = websocket::stream<beast::test::stream>;

  Client(net::io_context& ioc, size_t max_message, std::vector<std::string> protocols)
      : ws(ioc), server(ioc), requested(std::move(protocols)) {
    ws.next_layer().connect(server);
    // DoWsHandshake's settings.
    websocket::stream_base::timeout timeouts{};
    timeouts.handshake_timeout = websocket::stream_base::none();
    timeouts.idle_timeout = websocket::stream_base::none();
    timeouts.keep_alive_pings = false;
    ws.set_option(timeouts);
    ws.read_message_max(max_message);
    ws.auto_fragment(false);
    websocket::permessage_deflate pmd;
    pmd.client_enable = false;
    pmd.server_enable = false;
    ws.set_option(pmd);
    std::string joined;
    for (const std::string& p : requested) joined += (joined.empty() ? "" : ", ") + p;
    ws.set_option(websocket::stream_base::decorator([joined](websocket::request_type& req) {
      req.set(http::field::user_agent, "wsbridge");
      if (!joined.empty()) req.set(http::field::sec_websocket_protocol, joined);
    }));
    ws.control_callback([this](websocket::frame_type, beast::string_view) { ++control_frames; });
  }

  void Handshake() {
    ws.async_handshake(response, "upstream.test", "/ws", [this](error_code ec) {
      handshake_done = true;
      handshake_ec = ec;
      if (ec) return;
      // OnWsHandshake's subprotocol checks.
      const std::string negotiated(response[http::field::sec_websocket_protocol]);
      if (!requested.empty() && negotiated.empty()) return Refuse();
      if (!negotiated.empty() &&
          std::find(requested.begin(), requested.end(), negotiated) == requested.end()) {
        return Refuse();
      }
      open = true;
      DoRead();
    });
  }

  void Refuse() { refused = true; }

  void DoRead() {
    const std::size_t limit = buffer.size() == 0 ? kFirstReadBytes : 0;
    ws.async_read_some(buffer, limit, [this](error_code ec, std::size_t) { OnRead(ec); });
  }

  void OnRead(error_code ec) {
    if (ended) __builtin_trap();  // a read completed after the end
    if (ec) {
      ended = true;
      end_ec = ec;
      return;
    }
    if (!ws.is_message_done()) return DoRead();
    const auto data = buffer.cdata();
    messages.push_back(Message{std::string(static_cast<const char*>(data.data()), data.size()), ws.got_binary()});
    buffer.consume(buffer.size());
    buffer.shrink_to_fit();
    DoRead();
  }

  Ws ws;
  beast::test::stream server;
  std::vector<std::string> requested;
  websocket::response_type response;
  beast::flat_buffer buffer;
  bool handshake_done = false;
  error_code handshake_ec;
  bool refused = false;
  bool open = false;
  bool ended = false;
  error_code end_ec;
  std::vector<Message> messages;
  size_t control_frames = 0;
};

// The client's Sec-WebSocket-Key, from the request it wrote.
std::string KeyOf(std::string_view request) {
  http::request_parser<http::empty_body> p;
  error_code ec;
  p.put(net::buffer(request.data(), request.size()), ec);
  if (ec || !p.is_header_done()) __builtin_trap();  // our own request must parse
  return std::string(Sv(p.get()[http::field::sec_websocket_key]));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t flags = data[0];
  const std::string_view raw(reinterpret_cast<const char*>(data) + 1, size - 1);
  static const std::vector<std::string> kProtocols[] = {{}, {"json"}, {"json", "v2"}, {"v2"}};
  static constexpr size_t kMaxMessage[] = {64, 200, 4096, 1 << 20};
  static constexpr size_t kReadSize[] = {0, 1, 2, 3, 7, 64, 125, 600};
  const std::vector<std::string>& requested = kProtocols[flags & 3];
  const size_t max_message = kMaxMessage[(flags >> 2) & 3];
  const size_t read_size = kReadSize[(flags >> 4) & 7];

  net::io_context ioc;
  Client c(ioc, max_message, requested);
  if (read_size != 0) c.ws.next_layer().read_size(read_size);
  c.Handshake();
  ioc.poll();  // the request is written; the answer is awaited
  if (c.handshake_done) __builtin_trap();
  const std::string key = KeyOf(c.server.str());
  const std::string accept = AcceptFor(key);
  const std::string in = ReplaceAll(raw, kAcceptPlaceholder, accept);
  c.ws.next_layer().append(in);
  c.ws.next_layer().close_remote();  // the end of the input is the end of the stream
  ioc.run();
  if (!c.handshake_done) __builtin_trap();
  if (c.open && !c.ended) __builtin_trap();  // the end of input ends every read

  // The handshake: parse the answer independently.
  http::response_parser<http::empty_body> p;
  p.eager(false);
  error_code pec;
  const size_t head = p.put(net::buffer(in.data(), in.size()), pec);
  const bool head_ok = !pec && p.is_header_done();
  if (!c.handshake_ec) {
    if (!head_ok) __builtin_trap();
    const auto& res = p.get();
    if (res.result_int() != 101) __builtin_trap();
    if (Sv(res[http::field::sec_websocket_accept]) != accept) __builtin_trap();
    const std::string_view proto = Sv(res[http::field::sec_websocket_protocol]);
    const bool asked = std::find(requested.begin(), requested.end(), proto) != requested.end();
    if (c.open != (requested.empty() ? proto.empty() : asked)) __builtin_trap();
  } else if (c.open) {
    __builtin_trap();
  }
  // WS_CLIENT_FUZZ_VERBOSE=1: one line per input saying how far it got (for seed authors).
  static const bool verbose = std::getenv("WS_CLIENT_FUZZ_VERBOSE") != nullptr;
  if (verbose) {
    std::fprintf(stderr, "handshake: %s; open: %d; messages: %zu; end: %s\n",
                 c.handshake_ec ? c.handshake_ec.message().c_str() : (c.refused ? "subprotocol refused" : "ok"),
                 c.open, c.messages.size(), c.ended ? c.end_ec.message().c_str() : "-");
  }
  if (!c.open) {
    if (!c.messages.empty() || c.ended) __builtin_trap();  // nothing read before checks pass
    return 0;
  }

  // The frames.
  const Outcome want = Reference(std::string_view(in).substr(head), max_message);
  if (c.messages != want.messages) __builtin_trap();
  for (const Message& m : c.messages) {
    if (m.payload.size() > max_message) __builtin_trap();
    if (!m.binary && !Utf8Ok(m.payload, true)) __builtin_trap();
  }
  const error_code ec = c.end_ec;
  switch (want.end) {
    case End::kClosed:
      if (ec != websocket::error::closed) __builtin_trap();
      if (static_cast<uint16_t>(c.ws.reason().code) != want.close_code) __builtin_trap();
      if (std::string_view(c.ws.reason().reason.data(), c.ws.reason().reason.size()) != want.close_reason) {
        __builtin_trap();
      }
      break;
    case End::kTooBig:
      if (ec != websocket::error::message_too_big) __builtin_trap();
      break;
    case End::kProtocolError:
      if (ec == websocket::error::closed || ec == websocket::error::message_too_big ||
          ec == net::error::eof) {
        __builtin_trap();
      }
      break;
    case End::kEof:
      if (ec != net::error::eof) __builtin_trap();
      break;
  }
  return 0;
}
