// Fuzzes the client side of the upstream WebSocket: the bytes a server sends to our
// client, from the handshake answer on, through what core::Connection runs on them (no
// socket, no Beast websocket stream):
//   - the answer is read into a flat buffer, read by read, and put() to Beast's
//     http::response_parser<http::string_body> with connection.cc's limits (16 KiB of
//     header, 64 KiB of a refusal's body, read to its end as the connection does to
//     report it);
//   - a complete header goes through ws::CheckUpgradeAnswer (ws_handshake.h), the check
//     connection.cc runs: status 101, HTTP/1.1, exactly one `Upgrade: websocket`, a
//     `Connection` holding `upgrade`, exactly one `Sec-WebSocket-Accept` equal to
//     ws::AcceptKey(key), no extension in any `Sec-WebSocket-Extensions`, at most one
//     `Sec-WebSocket-Protocol`, and either no subprotocol or one we asked for (one must
//     be chosen when we asked for some);
//   - what the read that ended the header brought past it, then every later read, goes to
//     ws::Reader (ws_codec.h) as it came (Deliver in connection.cc), and ReleaseMemory()
//     is called whenever the reader asks for more (the connection calls it before it
//     waits for readable).
// Timeouts are left out: they are about time, not bytes.
//
// Input: one flags byte, then the server's bytes. The text "@A@" is replaced by the
// correct Sec-WebSocket-Accept for the key the client sent, so the fuzzer can get past
// the handshake (any other accept value must be refused).
//   flags bits 0-1: subprotocols requested: none, [json], [json, v2], [v2]
//   flags bits 2-3: max_message_bytes: 64, 200, 4096, 1 MiB
//   flags bits 4-6: bytes per read of the server's bytes: all, 1, 2, 3, 7, 64, 125, 600
//   flags bit 7: after every event, as if the connection paused there: ReleaseMemory()
//     before the payload is read (the payload must survive it), and the rest of the read
//     moved to a new heap block (the connection keeps it in `rx` until it resumes).
//
// Invariants:
//   - the answer parses the same read by read as in one piece (header, status, verdict);
//     an accepted one was HTTP/1.1 101 with the right accept key (computed here
//     independently of ws::AcceptKey), no extension and either no subprotocol or one we
//     asked for, and its header ended at the first empty line; a textbook 101 answer is
//     accepted;
//   - checked against Reference(), an independent RFC 6455 parser of the bytes after the
//     header: the messages delivered are exactly the complete messages before the first
//     protocol error, close frame or end of input, byte for byte, with their type, and
//     so are the pings and pongs; nothing is delivered after an error or a close; a
//     message over max_message_bytes is never delivered (the read ends with 1009,
//     RESOURCE_EXHAUSTED); every delivered text message is valid UTF-8; a protocol error
//     ends it with 1002 and bad UTF-8 (in text or a close reason) with 1007; a valid close
//     frame ends it with its code (1005 when it had none) and reason; at the end of the
//     input the reader is mid-message exactly when a frame or message was unfinished;
//   - the reader takes bytes only from the front of what it is given, asks for more only
//     once it has taken all of it, and a payload is either a view into the bytes it took
//     in that call or in its own buffer, never into an earlier read (each read is its own
//     heap block, freed after use, so ASan sees a stale view).
//
// Where Reference() follows our choices rather than Beast's (this harness used to check
// Beast's websocket::stream against it):
//   - close codes: 1014 is accepted (IANA registered it, "bad gateway") and 5000 and
//     above are refused (RFC 6455 7.4.2 defines no range there); Beast did the opposite;
//   - a masked frame is an error as soon as its second byte is in (Beast waited for the
//     whole header, so an input ending inside it was an end of input);
//   - a 64-bit length with its top bit set is a protocol error (RFC 6455 5.2), not a
//     message too big;
//   - bad UTF-8 is told apart from other protocol errors (1007 against 1002), and text
//     fails as soon as a byte can never be valid, message complete or not (as Beast did).
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http.hpp>

#include "absl/status/status.h"
#include "bridges/core/ws_codec.h"
#include "bridges/core/ws_handshake.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace ws = wsbridge::core::ws;
using beast::error_code;

// connection.cc's kHandshakeHeaderLimit and kHandshakeBodyLimit.
constexpr std::size_t kHeaderLimit = 16 * 1024;
constexpr std::size_t kBodyLimit = 64 * 1024;
constexpr std::string_view kAcceptPlaceholder = "@A@";
// The client's Sec-WebSocket-Key (the connection draws 16 random bytes; any will do).
constexpr std::string_view kKey = "AQIDBAUGBwgJCgsMDQ4PEA==";

// --- The reference: RFC 6455 for a client ------------------------------------------------

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

// RFC 6455 7.4: 1004-1006 and 1015 are reserved, 1016-2999 are for the protocol's future
// use, below 1000 is unused; 1012-1014 were registered with IANA since. 3000-3999 are
// registered and 4000-4999 private; nothing is defined from 5000 up.
bool ValidCloseCode(uint16_t v) {
  if (v >= 1000 && v <= 1003) return true;
  if (v >= 1007 && v <= 1014) return true;
  return v >= 3000 && v <= 4999;
}

enum class End { kEof, kClosed, kTooBig, kProtocolError, kBadUtf8 };

const char* Name(End e) {
  switch (e) {
    case End::kEof:
      return "end of input";
    case End::kClosed:
      return "closed";
    case End::kTooBig:
      return "too big";
    case End::kProtocolError:
      return "protocol error";
    case End::kBadUtf8:
      return "bad UTF-8";
  }
  return "?";
}

struct Message {
  std::string payload;
  bool binary = false;
  bool operator==(const Message&) const = default;
};

struct Control {
  bool ping = false;
  std::string payload;
  bool operator==(const Control&) const = default;
};

struct Outcome {
  std::vector<Message> messages;
  std::vector<Control> controls;  // pings and pongs
  End end = End::kEof;
  uint16_t close_code = 0;  // kClosed: 1005 when the close frame had no code
  std::string close_reason;
  bool partial = false;  // kEof: a frame or a message was unfinished
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
  auto end = [&](End e) {
    out.end = e;
    return out;
  };
  auto eof = [&](bool partial) {
    out.partial = partial;
    return end(End::kEof);
  };
  while (true) {
    const std::string_view rest = in.substr(pos);
    if (rest.size() < 2) return eof(in_message || !rest.empty());
    const unsigned char b0 = static_cast<unsigned char>(rest[0]);
    const unsigned char b1 = static_cast<unsigned char>(rest[1]);
    const bool fin = b0 & 0x80;
    const bool rsv = b0 & 0x70;
    const int op = b0 & 0x0F;
    // Servers never mask (RFC 6455 5.1); the second byte says so before the rest arrives.
    if (b1 & 0x80) return end(End::kProtocolError);
    uint64_t len = b1 & 0x7F;
    const size_t header = 2 + (len == 126 ? 2 : len == 127 ? 8 : 0);
    if (rest.size() < header) return eof(true);
    const bool control = op >= 8;
    if (op == 1 || op == 2) {
      if (in_message || rsv) return end(End::kProtocolError);  // interleaved data frame
    } else if (op == 0) {
      if (!in_message || rsv) return end(End::kProtocolError);  // continuation without start
    } else if (op == 8 || op == 9 || op == 10) {
      if (!fin || len > 125 || rsv) return end(End::kProtocolError);
    } else {
      return end(End::kProtocolError);  // reserved opcode
    }
    if (control && rest.size() < header + len) return eof(true);
    if (len == 126) {
      len = BigEndian(rest.substr(2, 2));
      if (len < 126) return end(End::kProtocolError);  // not the shortest form
    } else if (len == 127) {
      len = BigEndian(rest.substr(2, 8));
      if (len >> 63) return end(End::kProtocolError);  // RFC 6455 5.2: the top bit is 0
      if (len < 65536) return end(End::kProtocolError);
    }
    if (!control) {
      if (op != 0) {
        current.clear();
        current_binary = op == 2;
      }
      if (len > max_message || current.size() > max_message - len) return end(End::kTooBig);
      in_message = !fin;
    }
    const std::string_view payload = rest.substr(header, std::min<uint64_t>(len, rest.size() - header));
    if (!control) {
      current.append(payload);
      const bool complete = payload.size() == len;
      if (!current_binary && !Utf8Ok(current, complete && fin)) return end(End::kBadUtf8);
      if (!complete) return eof(true);
      if (fin) out.messages.push_back(Message{std::exchange(current, {}), current_binary});
    } else if (op == 8) {
      if (payload.size() == 1) return end(End::kProtocolError);
      out.close_code = 1005;  // no status code (RFC 6455 7.1.5)
      if (payload.size() >= 2) {
        out.close_code = static_cast<uint16_t>(BigEndian(payload.substr(0, 2)));
        out.close_reason = std::string(payload.substr(2));
        if (!ValidCloseCode(out.close_code)) return end(End::kProtocolError);
        if (!Utf8Ok(out.close_reason, true)) return end(End::kBadUtf8);
      }
      return end(End::kClosed);
    } else {
      out.controls.push_back(Control{op == 9, std::string(payload)});
    }
    pos += header + payload.size();
  }
}

// --- The handshake answer -------------------------------------------------------------

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

// The connection's check of the answer's header (ws_handshake.h, shared with
// connection.cc), with the refusal of any other status folded in.
bool HandshakeOk(const http::response<http::string_body>& res, std::string_view key,
                 const std::vector<std::string>& requested) {
  if (res.result_int() != 101) return false;
  std::string negotiated;
  if (!ws::CheckUpgradeAnswer(res, key, requested, &negotiated).ok()) return false;
  // What it reports chosen is what the answer names (or nothing).
  if (negotiated != Sv(res[http::field::sec_websocket_protocol])) __builtin_trap();
  return true;
}

struct Answer {
  bool header_done = false;
  size_t head = 0;  // the header's size
  unsigned status = 0;
  bool accepted = false;
  error_code ec;
  http::response<http::string_body> res;
  // Accepted: what the read that ended the header brought past it, and where the reads
  // still to come start in the input.
  std::string leftover;
  size_t next = 0;
};

// `read_size` bytes of `in` per read (0: all at once) into a flat buffer, parsed as they
// come, up to the end of the header of a 101 or the end of a refusal's body.
Answer ReadAnswer(std::string_view in, size_t read_size, const std::vector<std::string>& requested) {
  Answer a;
  http::response_parser<http::string_body> parser;
  parser.header_limit(kHeaderLimit);
  parser.body_limit(kBodyLimit);
  beast::flat_buffer buffer;
  size_t parsed = 0;
  size_t pos = 0;
  while (!parser.is_done()) {
    if (pos == in.size()) {
      // The end of the stream: a body read to it ends there; anything else is cut short.
      if (parser.got_some()) parser.put_eof(a.ec);
      if (!a.ec && !parser.is_done()) a.ec = http::error::partial_message;
      break;
    }
    const size_t n = read_size == 0 ? in.size() - pos : std::min(read_size, in.size() - pos);
    const auto space = buffer.prepare(n);
    std::copy_n(in.data() + pos, n, static_cast<char*>(space.data()));
    buffer.commit(n);
    pos += n;
    // Parse what the buffer holds: the header once it is whole, then the body.
    while (buffer.size() != 0 && !parser.is_done()) {
      error_code ec;
      const size_t used = parser.put(buffer.data(), ec);
      buffer.consume(used);
      parsed += used;
      if (!a.header_done && parser.is_header_done()) {
        a.header_done = true;
        a.head = parsed;
      }
      if (ec == http::error::need_more) break;
      if (ec) {
        a.ec = ec;
        return a;
      }
      if (used == 0) break;
    }
    // A 101 has no body: its header is the whole answer.
  }
  if (!parser.is_header_done()) return a;
  a.res = parser.release();
  a.status = a.res.result_int();
  if (a.ec) return a;
  a.accepted = HandshakeOk(a.res, kKey, requested);
  if (a.accepted) {
    const auto data = buffer.cdata();
    a.leftover.assign(static_cast<const char*>(data.data()), data.size());
    a.next = pos;
  }
  return a;
}

// --- The frames -------------------------------------------------------------------------

// The reader as the connection drives it: every read handed to Next() until it asks for
// more; the memory released whenever it is idle.
Outcome ReadFrames(const std::vector<std::string_view>& reads, size_t max_message, bool pause_after_event) {
  Outcome got;
  ws::Reader reader(max_message);
  bool ended = false;
  for (const std::string_view read : reads) {
    // Its own heap block, freed after this read: a view kept past it is a use after free.
    std::vector<char> bytes(read.begin(), read.end());
    std::string_view in(bytes.data(), bytes.size());
    for (;;) {
      const std::string_view before = in;
      const ws::Reader::Event e = reader.Next(in);
      if (pause_after_event) reader.ReleaseMemory();
      // Bytes are taken from the front only.
      if (in.size() > before.size() || in.data() != before.data() + (before.size() - in.size())) {
        __builtin_trap();
      }
      if (ended) {
        if (e.kind != ws::Reader::Event::kNeedMore) __builtin_trap();  // an event after the end
        break;
      }
      // A payload lies in what this call took, or wholly outside this read.
      const char* p = e.payload.data();
      const bool in_taken = p >= before.data() && p + e.payload.size() <= in.data();
      const bool outside = p + e.payload.size() <= bytes.data() || p >= bytes.data() + bytes.size();
      if (!e.payload.empty() && !in_taken && !outside) __builtin_trap();
      if (e.kind != ws::Reader::Event::kError && !e.error.ok()) __builtin_trap();
      switch (e.kind) {
        case ws::Reader::Event::kNeedMore:
          if (!in.empty() || reader.done()) __builtin_trap();  // more asked for with bytes left
          reader.ReleaseMemory();
          break;
        case ws::Reader::Event::kMessage:
          got.messages.push_back(Message{std::string(e.payload), e.binary});
          break;
        case ws::Reader::Event::kPing:
        case ws::Reader::Event::kPong:
          if (e.payload.size() > ws::kMaxControlPayload) __builtin_trap();
          got.controls.push_back(Control{e.kind == ws::Reader::Event::kPing, std::string(e.payload)});
          break;
        case ws::Reader::Event::kClose:
          if (!reader.done()) __builtin_trap();
          ended = true;
          got.end = End::kClosed;
          got.close_code = e.close_code;
          got.close_reason = std::string(e.payload);
          break;
        case ws::Reader::Event::kError:
          if (!reader.done() || e.error.ok()) __builtin_trap();
          if ((e.close_code == 1009) != (e.error.code() == absl::StatusCode::kResourceExhausted)) {
            __builtin_trap();
          }
          ended = true;
          switch (e.close_code) {
            case 1002:
              got.end = End::kProtocolError;
              break;
            case 1007:
              got.end = End::kBadUtf8;
              break;
            case 1009:
              got.end = End::kTooBig;
              break;
            default:
              __builtin_trap();  // no other code to fail with
          }
          break;
      }
      if (e.kind == ws::Reader::Event::kNeedMore) break;
      if (pause_after_event) {
        // The rest of the read waits in a block of its own; this one is freed.
        std::vector<char> rest(in.begin(), in.end());
        bytes.swap(rest);
        in = std::string_view(bytes.data(), bytes.size());
      }
    }
  }
  if (!ended) {
    got.end = End::kEof;
    got.partial = reader.mid_message();
  }
  return got;
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
  const bool pause_after_event = (flags & 0x80) != 0;

  static const std::string accept = AcceptFor(kKey);
  if (ws::AcceptKey(kKey) != accept) __builtin_trap();
  const std::string in = ReplaceAll(raw, kAcceptPlaceholder, accept);

  // The handshake answer, read as it comes and in one piece.
  const Answer a = ReadAnswer(in, read_size, requested);
  if (read_size != 0) {
    const Answer whole = ReadAnswer(in, 0, requested);
    if (a.header_done != whole.header_done || a.head != whole.head || a.status != whole.status ||
        a.accepted != whole.accepted || static_cast<bool>(a.ec) != static_cast<bool>(whole.ec)) {
      __builtin_trap();
    }
  }
  if (a.accepted) {
    if (a.status != 101 || a.res.version() != 11 || a.ec) __builtin_trap();
    if (Sv(a.res[http::field::sec_websocket_accept]) != accept) __builtin_trap();
    // No extension in any instance of the header (a second one after an empty first).
    for (auto [it, end] = a.res.equal_range(http::field::sec_websocket_extensions); it != end; ++it) {
      if (Sv(it->value()).find_first_not_of(" \t") != std::string_view::npos) __builtin_trap();
    }
    if (a.res.count(http::field::sec_websocket_accept) != 1) __builtin_trap();
    const std::string_view proto = Sv(a.res[http::field::sec_websocket_protocol]);
    const bool asked = std::find(requested.begin(), requested.end(), proto) != requested.end();
    if (requested.empty() ? !proto.empty() : !asked) __builtin_trap();
    // The header ends at the first empty line, and the frames start right after it.
    if (a.head != in.find("\r\n\r\n") + 4) __builtin_trap();
    if (a.leftover + in.substr(a.next) != std::string_view(in).substr(a.head)) __builtin_trap();
  } else if (a.header_done && !a.ec && a.status == 101 && a.res.version() == 11 &&
             a.res.count(http::field::upgrade) == 1 && Sv(a.res[http::field::upgrade]) == "websocket" &&
             Sv(a.res[http::field::connection]) == "Upgrade" &&
             a.res.count(http::field::sec_websocket_accept) == 1 &&
             Sv(a.res[http::field::sec_websocket_accept]) == accept &&
             a.res.count(http::field::sec_websocket_extensions) == 0 &&
             (requested.empty() ? a.res.count(http::field::sec_websocket_protocol) == 0
                                : a.res.count(http::field::sec_websocket_protocol) == 1 &&
                                      a.res[http::field::sec_websocket_protocol] == requested.front())) {
    __builtin_trap();  // a textbook answer refused
  }

  // WS_CLIENT_FUZZ_VERBOSE=1: one line per input saying how far it got (for seed authors).
  static const bool verbose = std::getenv("WS_CLIENT_FUZZ_VERBOSE") != nullptr;
  if (!a.accepted) {
    if (verbose) {
      const std::string why = a.ec ? a.ec.message() : a.header_done ? "checks failed" : "no header";
      std::fprintf(stderr, "handshake: refused (%s, status %u)\n", why.c_str(), a.status);
    }
    return 0;
  }

  // The frames: the rest of the read that ended the header first, then the later reads.
  std::vector<std::string_view> reads;
  if (!a.leftover.empty()) reads.push_back(a.leftover);
  for (size_t pos = a.next; pos < in.size();) {
    const size_t n = read_size == 0 ? in.size() - pos : std::min(read_size, in.size() - pos);
    reads.push_back(std::string_view(in).substr(pos, n));
    pos += n;
  }
  const Outcome got = ReadFrames(reads, max_message, pause_after_event);
  const Outcome want = Reference(std::string_view(in).substr(a.head), max_message);
  if (verbose) {
    std::fprintf(stderr, "handshake: ok; messages: %zu; pings/pongs: %zu; end: %s (%u)\n",
                 got.messages.size(), got.controls.size(), Name(got.end), got.close_code);
  }
  if (got.messages != want.messages) __builtin_trap();
  if (got.controls != want.controls) __builtin_trap();
  for (const Message& m : got.messages) {
    if (m.payload.size() > max_message) __builtin_trap();
    if (!m.binary && !Utf8Ok(m.payload, true)) __builtin_trap();
  }
  if (got.end != want.end) __builtin_trap();
  if (got.end == End::kClosed &&
      (got.close_code != want.close_code || got.close_reason != want.close_reason)) {
    __builtin_trap();
  }
  if (got.end == End::kEof && got.partial != want.partial) __builtin_trap();
  return 0;
}
