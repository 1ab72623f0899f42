#include "bridges/core/ws_codec.h"

#include <openssl/evp.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace wsbridge::core::ws {

std::size_t WriteClientHeader(Opcode op, bool fin, uint64_t payload_size, uint32_t mask_key, char* out) {
  auto* p = reinterpret_cast<unsigned char*>(out);
  p[0] = static_cast<unsigned char>((fin ? 0x80 : 0x00) | static_cast<unsigned char>(op));
  std::size_t n = 2;
  if (payload_size < 126) {
    p[1] = static_cast<unsigned char>(0x80 | payload_size);
  } else if (payload_size <= 0xFFFF) {
    p[1] = 0x80 | 126;
    p[2] = static_cast<unsigned char>(payload_size >> 8);
    p[3] = static_cast<unsigned char>(payload_size);
    n = 4;
  } else {
    p[1] = 0x80 | 127;
    for (int i = 0; i < 8; ++i) p[2 + i] = static_cast<unsigned char>(payload_size >> (56 - 8 * i));
    n = 10;
  }
  p[n] = static_cast<unsigned char>(mask_key >> 24);
  p[n + 1] = static_cast<unsigned char>(mask_key >> 16);
  p[n + 2] = static_cast<unsigned char>(mask_key >> 8);
  p[n + 3] = static_cast<unsigned char>(mask_key);
  return n + 4;
}

void ApplyMask(char* data, std::size_t n, uint32_t mask_key, std::size_t offset) {
  unsigned char key[4] = {static_cast<unsigned char>(mask_key >> 24), static_cast<unsigned char>(mask_key >> 16),
                          static_cast<unsigned char>(mask_key >> 8), static_cast<unsigned char>(mask_key)};
  auto* p = reinterpret_cast<unsigned char*>(data);
  std::size_t i = 0;
  // Align the key to position 0, then XOR eight bytes at a time.
  for (; i < n && (offset + i) % 4 != 0; ++i) p[i] ^= key[(offset + i) % 4];
  if (n - i >= 8) {
    uint64_t k8;
    unsigned char rep[8] = {key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]};
    std::memcpy(&k8, rep, 8);
    for (; n - i >= 8; i += 8) {
      uint64_t v;
      std::memcpy(&v, p + i, 8);
      v ^= k8;
      std::memcpy(p + i, &v, 8);
    }
  }
  for (; i < n; ++i) p[i] ^= key[(offset + i) % 4];
}

std::string ClientFrame(Opcode op, std::string_view payload, uint32_t mask_key) {
  char header[kMaxClientHeaderBytes];
  const std::size_t h = WriteClientHeader(op, true, payload.size(), mask_key, header);
  std::string frame;
  frame.reserve(h + payload.size());
  frame.append(header, h);
  frame.append(payload);
  ApplyMask(frame.data() + h, payload.size(), mask_key);
  return frame;
}

std::string ClosePayload(uint16_t code, std::string_view reason) {
  if (code == 0) return {};
  std::size_t n = std::min<std::size_t>(reason.size(), kMaxControlPayload - 2);
  // Never cut inside a UTF-8 sequence: back up over continuation bytes.
  if (n < reason.size()) {
    while (n > 0 && (static_cast<unsigned char>(reason[n]) & 0xC0) == 0x80) --n;
  }
  std::string out;
  out.push_back(static_cast<char>(code >> 8));
  out.push_back(static_cast<char>(code & 0xFF));
  out.append(reason.substr(0, n));
  return out;
}

std::size_t ValidUtf8Prefix(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    // ASCII runs, eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t v;
      std::memcpy(&v, p + i, 8);
      if (v & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
    } else {
      return std::string_view::npos;  // continuation byte, overlong lead (C0, C1), beyond U+10FFFF
    }
    // The second byte's range rules out overlong forms, surrogates and code points above
    // U+10FFFF as soon as it is there (RFC 3629's table), so a truncated sequence that
    // can never become valid is refused at once.
    unsigned char lo = 0x80, hi = 0xBF;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
    for (std::size_t k = 1; k < len; ++k) {
      if (i + k >= n) return i;  // truncated: valid so far
      const unsigned char cc = p[i + k];
      if (k == 1 ? (cc < lo || cc > hi) : (cc & 0xC0) != 0x80) return std::string_view::npos;
    }
    i += len;
  }
  return n;
}

bool IsValidUtf8(std::string_view s) { return ValidUtf8Prefix(s) == s.size(); }



bool IsValidReceivedCloseCode(uint16_t code) {
  if (code >= 1000 && code <= 1003) return true;
  if (code >= 1007 && code <= 1014) return true;
  return code >= 3000 && code <= 4999;
}

std::string AcceptKey(std::string_view key) {
  static constexpr std::string_view kGuid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  std::string in(key);
  in.append(kGuid);
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(in.data()), in.size(), digest);
  unsigned char b64[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
  const int n = EVP_EncodeBlock(b64, digest, SHA_DIGEST_LENGTH);
  return std::string(reinterpret_cast<const char*>(b64), static_cast<std::size_t>(n));
}

Reader::Event Reader::Fail(uint16_t code, std::string message) {
  done_ = true;
  Event e;
  e.kind = Event::kError;
  e.close_code = code;
  e.error = code == 1009 ? absl::ResourceExhaustedError(std::move(message))
                         : absl::DataLossError(std::move(message));
  return e;
}

// A whole message: delivered, unless it is text and not valid UTF-8.
Reader::Event Reader::Complete(std::string_view payload, bool valid_utf8) {
  if (!binary_ && !valid_utf8) return Fail(1007, "the server sent a text message that is not valid UTF-8");
  Event e;
  e.kind = Event::kMessage;
  e.binary = binary_;
  e.payload = payload;
  return e;
}

Reader::Event Reader::Next(std::string_view& in) {
  if (done_) return {};
  // What the previous event pointed into is released now.
  if (!in_message_ && !message_.empty()) message_.clear();
  if (!in_payload_) control_.clear();
  for (;;) {
    if (!in_payload_) {
      // --- The frame header, possibly split over several reads.
      const unsigned char* h;
      std::size_t avail;
      if (header_bytes_ == 0) {
        h = reinterpret_cast<const unsigned char*>(in.data());
        avail = in.size();
      } else {
        h = reinterpret_cast<const unsigned char*>(header_);
        avail = header_bytes_;
      }
      // The header's size is known once its second byte is.
      std::size_t need = 2;
      if (avail >= 2) {
        if (h[1] & 0x80) return Fail(1002, "the server sent a masked frame (RFC 6455 5.1 forbids it)");
        const unsigned len7 = h[1] & 0x7F;
        need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0);
      }
      if (avail < need) {
        if (header_bytes_ == 0) {
          // Keep the partial header and wait for the rest. (string_view::copy, not memcpy:
          // `in` may be an empty view with a null data(), which memcpy must not be given.)
          in.copy(header_, in.size());
          header_bytes_ = in.size();
          in.remove_prefix(in.size());
          return {};
        }
        // Complete it from `in`, byte by byte up to what is needed now.
        const std::size_t take = std::min(in.size(), need - header_bytes_);
        in.copy(header_ + header_bytes_, take);
        header_bytes_ += take;
        in.remove_prefix(take);
        if (header_bytes_ < need) {
          if (in.empty()) return {};
          continue;  // the second byte arrived: `need` grows
        }
        continue;
      }
      const bool fin = (h[0] & 0x80) != 0;
      const unsigned rsv = h[0] & 0x70;
      const unsigned op = h[0] & 0x0F;
      const unsigned len7 = h[1] & 0x7F;
      uint64_t len = len7;
      if (len7 == 126) {
        len = (uint64_t{h[2]} << 8) | h[3];
        if (len < 126) return Fail(1002, "the server sent a frame length in more bytes than needed");
      } else if (len7 == 127) {
        len = 0;
        for (int i = 0; i < 8; ++i) len = (len << 8) | h[2 + i];
        if (len >> 63) return Fail(1002, "the server sent a frame length with its top bit set");
        if (len <= 0xFFFF) return Fail(1002, "the server sent a frame length in more bytes than needed");
      }
      if (header_bytes_ == 0) {
        in.remove_prefix(need);
      } else {
        header_bytes_ = 0;
      }
      if (rsv != 0) return Fail(1002, "the server set reserved frame bits (no extension was negotiated)");
      const bool control = (op & 0x8) != 0;
      switch (op) {
        case 0x0:
          if (!in_message_) return Fail(1002, "the server sent a continuation frame with no message to continue");
          break;
        case 0x1:
        case 0x2:
          if (in_message_) return Fail(1002, "the server started a new message before finishing the last one");
          break;
        case 0x8:
        case 0x9:
        case 0xA:
          if (!fin) return Fail(1002, "the server fragmented a control frame");
          if (len > kMaxControlPayload) return Fail(1002, "the server sent a control frame over 125 bytes");
          break;
        default:
          return Fail(1002, absl::StrCat("the server sent a frame with unknown opcode ", op));
      }
      if (!control) {
        if (len > max_message_bytes_ - std::min(message_.size(), max_message_bytes_) ||
            message_.size() > max_message_bytes_) {
          return Fail(1009, absl::StrCat("the server sent a message larger than the limit of ",
                                         max_message_bytes_, " bytes"));
        }
        if (op != 0x0) {
          in_message_ = true;
          binary_ = op == 0x2;
          utf8_valid_ = 0;
          // A whole message in one frame, all of it here: hand out a view, no copy.
          if (fin && in.size() >= len) {
            const std::string_view payload = in.substr(0, static_cast<std::size_t>(len));
            in.remove_prefix(static_cast<std::size_t>(len));
            in_message_ = false;
            return Complete(payload, IsValidUtf8(payload));
          }
        }
      }
      opcode_ = static_cast<Opcode>(op);
      fin_ = fin;
      remaining_ = len;
      in_payload_ = true;
    }

    // --- The payload.
    const bool control = (static_cast<unsigned>(opcode_) & 0x8) != 0;
    const std::size_t take = static_cast<std::size_t>(std::min<uint64_t>(remaining_, in.size()));
    if (take > 0) {
      if (control) {
        control_.append(in.data(), take);
      } else {
        if (message_.empty() && remaining_ > take) message_.reserve(static_cast<std::size_t>(remaining_));
        message_.append(in.data(), take);
        if (!binary_) {
          // Text is checked as it arrives, so a bad byte fails the connection at once.
          const std::size_t valid = ValidUtf8Prefix(std::string_view(message_).substr(utf8_valid_));
          if (valid == std::string_view::npos) {
            return Fail(1007, "the server sent a text message that is not valid UTF-8");
          }
          utf8_valid_ += valid;
        }
      }
      in.remove_prefix(take);
      remaining_ -= take;
    }
    if (remaining_ != 0) return {};
    in_payload_ = false;
    if (control) {
      Event e;
      e.payload = control_;
      switch (opcode_) {
        case Opcode::kPing:
          e.kind = Event::kPing;
          return e;
        case Opcode::kPong:
          e.kind = Event::kPong;
          return e;
        default:
          break;
      }
      // Close.
      if (control_.empty()) {
        e.close_code = 1005;  // no status code (RFC 6455 7.1.5)
      } else if (control_.size() == 1) {
        return Fail(1002, "the server sent a close frame with a 1-byte payload");
      } else {
        e.close_code = static_cast<uint16_t>((static_cast<unsigned char>(control_[0]) << 8) |
                                             static_cast<unsigned char>(control_[1]));
        if (!IsValidReceivedCloseCode(e.close_code)) {
          return Fail(1002, absl::StrCat("the server sent close code ", e.close_code,
                                         ", which may not be sent (RFC 6455 7.4)"));
        }
        e.payload = std::string_view(control_).substr(2);
        if (!IsValidUtf8(e.payload)) return Fail(1007, "the server sent a close reason that is not valid UTF-8");
      }
      done_ = true;
      e.kind = Event::kClose;
      return e;
    }
    if (!fin_) continue;
    in_message_ = false;
    return Complete(message_, utf8_valid_ == message_.size());
  }
}

}  // namespace wsbridge::core::ws
