// The WebSocket client's wire format (RFC 6455), as pure functions: no I/O, no clock, so
// they are unit-tested and fuzzed on bytes alone (tests/fuzz/ws_client_fuzz.cc).
//
// core::Connection frames its messages with these and reads the server's frames with
// ws::Reader. It used to run Beast's websocket::stream, whose pending read operation
// (its composed-operation chain) and fixed 1.5 KiB frame buffer stayed allocated for
// the whole life of an idle session; with our own framing an idle session waits for
// readable on the socket and holds no read buffer at all (docs/performance.md, round 9).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace wsbridge::core::ws {

enum class Opcode : uint8_t {
  kContinuation = 0x0,
  kText = 0x1,
  kBinary = 0x2,
  kClose = 0x8,
  kPing = 0x9,
  kPong = 0xA,
};

// A client frame header is at most 2 + 8 (length) + 4 (mask key) bytes.
inline constexpr std::size_t kMaxClientHeaderBytes = 14;
// Control frames carry at most 125 bytes (RFC 6455 5.5).
inline constexpr std::size_t kMaxControlPayload = 125;

// Writes the header of a client frame (always masked, RFC 6455 5.3) into `out`, which
// has room for kMaxClientHeaderBytes; returns its size.
std::size_t WriteClientHeader(Opcode op, bool fin, uint64_t payload_size, uint32_t mask_key, char* out);

// XORs `data` with the 4-byte `mask_key` (as written in the header, most significant
// byte first), starting at key position `offset` % 4. The same call unmasks.
void ApplyMask(char* data, std::size_t n, uint32_t mask_key, std::size_t offset = 0);

// A whole client frame: header + masked payload.
std::string ClientFrame(Opcode op, std::string_view payload, uint32_t mask_key);

// The payload of a close frame: the code (big-endian) and the reason, cut at 123 bytes
// on a UTF-8 boundary. Code 0 means "no code" (an empty payload).
std::string ClosePayload(uint16_t code, std::string_view reason);

bool IsValidUtf8(std::string_view s);
// The length of the longest prefix of `s` made of whole valid UTF-8 sequences, or npos
// when `s` holds a byte that can never be valid (a truncated last sequence is not).
std::size_t ValidUtf8Prefix(std::string_view s);

// Close codes a peer may send (RFC 6455 7.4): 1000-1003, 1007-1011 (and 1012-1014, which
// IANA registered since), 3000-4999.
bool IsValidReceivedCloseCode(uint16_t code);

// The Sec-WebSocket-Accept value a server must answer to `key` (RFC 6455 4.2.2).
std::string AcceptKey(std::string_view key);

// What the server sent, read frame by frame into messages. Bytes are handed in as they
// arrive; Next() consumes what it can from the front of `in` and returns one event.
// Messages are assembled up to `max_message_bytes`. When a message is one frame whose
// payload is wholly in `in`, its payload is a view into `in` (no copy); otherwise it is
// a view into the reader's own buffer. Either stays valid until the next call.
class Reader {
 public:
  struct Event {
    enum Kind {
      kNeedMore,  // `in` holds no complete event: read more
      kMessage,   // a complete text or binary message
      kPing,      // payload: the ping's application data (answer with a pong)
      kPong,
      kClose,     // close_code (1005 when the frame had none) and payload (the reason)
      kError,     // error says what; fail with close_code (1002, 1007 or 1009)
    };
    Kind kind = kNeedMore;
    bool binary = false;
    std::string_view payload;
    uint16_t close_code = 0;
    absl::Status error;
  };

  explicit Reader(std::size_t max_message_bytes) : max_message_bytes_(max_message_bytes) {}

  Event Next(std::string_view& in);

  // A message has started and not finished (its frames so far are buffered or counted).
  bool mid_message() const { return in_message_ || remaining_ != 0 || header_bytes_ != 0; }
  // Drops the message buffer's capacity (between messages, so an idle reader holds none),
  // and the control frame buffer's: a ping of more than 15 bytes would leave it allocated.
  void ReleaseMemory() {
    if (message_.empty()) std::string().swap(message_);
    if (control_.empty()) std::string().swap(control_);
  }
  // After an error or a close frame, nothing more is read.
  bool done() const { return done_; }

 private:
  Event Fail(uint16_t code, std::string message);
  Event Complete(std::string_view payload, bool valid_utf8);

  std::size_t max_message_bytes_;
  bool done_ = false;
  // The message being assembled.
  bool in_message_ = false;
  bool binary_ = false;
  std::string message_;
  std::size_t utf8_valid_ = 0;  // text: how much of message_ is known to be valid UTF-8
  // The frame being read: its header bytes while incomplete, then its payload.
  char header_[kMaxClientHeaderBytes] = {};
  std::size_t header_bytes_ = 0;
  Opcode opcode_ = Opcode::kContinuation;
  bool fin_ = false;
  uint64_t remaining_ = 0;
  bool in_payload_ = false;
  std::string control_;  // a control frame's payload (<= 125 bytes)
};

}  // namespace wsbridge::core::ws
