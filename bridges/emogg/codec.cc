#include "bridges/emogg/codec.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "bridges/core/status.h"

namespace wsbridge::emogg {
namespace {

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// A one-pass JSON (RFC 8259) reader over a frame: validates the grammar and UTF-8 and
// reports the byte ranges of values, so the decoder can keep bodies and event data as
// the exact text received without building a DOM. Errors name the offset, never the
// content.
class Scanner {
 public:
  explicit Scanner(std::string_view text) : s_(text) {}

  size_t pos() const { return pos_; }
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  bool AtEnd() const { return pos_ >= s_.size(); }
  char Peek() const { return AtEnd() ? '\0' : s_[pos_]; }
  std::string_view Slice(size_t begin, size_t end) const { return s_.substr(begin, end - begin); }

  void Ws() {
    while (!AtEnd() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Fail(std::string_view why) {
    if (error_.empty()) error_ = absl::StrCat(Av(why), " at offset ", pos_);
    return false;
  }

  bool Expect(char c) {
    if (Peek() != c) {
      return Fail(AtEnd() ? absl::StrCat("unexpected end, expected '", std::string(1, c), "'")
                          : absl::StrCat("expected '", std::string(1, c), "'"));
    }
    ++pos_;
    return true;
  }

  // A string at pos(); decoded into *out (escapes resolved) unless out is null.
  bool String(std::string* out) {
    if (!Expect('"')) return false;
    while (true) {
      size_t run = pos_;
      while (!AtEnd()) {
        unsigned char c = static_cast<unsigned char>(s_[pos_]);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++pos_;
      }
      if (out != nullptr) out->append(s_.data() + run, pos_ - run);
      if (AtEnd()) return Fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (c < 0x20) return Fail("control character in a string");
      if (c == '\\') {
        if (!Escape(out)) return false;
        continue;
      }
      size_t begin = pos_;
      if (!Utf8Sequence()) return false;
      if (out != nullptr) out->append(s_.data() + begin, pos_ - begin);
    }
  }

  // A number at pos(); *integer says whether it had no fraction and no exponent.
  bool Number(bool* integer) {
    *integer = true;
    if (Peek() == '-') ++pos_;
    if (Peek() == '0') {
      ++pos_;
    } else if (IsDigit(Peek())) {
      while (IsDigit(Peek())) ++pos_;
    } else {
      return Fail("invalid number");
    }
    if (Peek() == '.') {
      *integer = false;
      ++pos_;
      if (!IsDigit(Peek())) return Fail("invalid number: digit expected after '.'");
      while (IsDigit(Peek())) ++pos_;
    }
    if (Peek() == 'e' || Peek() == 'E') {
      *integer = false;
      ++pos_;
      if (Peek() == '+' || Peek() == '-') ++pos_;
      if (!IsDigit(Peek())) return Fail("invalid number: digit expected in the exponent");
      // Exponents beyond 9 significant digits are refused (Boost.JSON refuses those
      // beyond INT_MAX; no real value needs either).
      int64_t exponent = 0;
      while (IsDigit(Peek())) {
        exponent = exponent * 10 + (s_[pos_] - '0');
        if (exponent > 999'999'999) return Fail("invalid number: exponent out of range");
        ++pos_;
      }
    }
    return true;
  }

  bool Literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return Fail("invalid literal");
    pos_ += word.size();
    return true;
  }

  // Any value at pos(); `depth` is the nesting of the container holding it.
  bool Value(int depth) {
    switch (Peek()) {
      case '"':
        return String(nullptr);
      case '{':
        return Object(depth + 1);
      case '[':
        return Array(depth + 1);
      case 't':
        return Literal("true");
      case 'f':
        return Literal("false");
      case 'n':
        return Literal("null");
      case '\0':
        if (AtEnd()) return Fail("unexpected end, a value was expected");
        return Fail("unexpected character");
      default: {
        if (Peek() == '-' || IsDigit(Peek())) {
          bool integer;
          return Number(&integer);
        }
        return Fail("unexpected character");
      }
    }
  }

  bool Object(int depth) {
    if (depth > kMaxDepth) return Fail("nested too deeply");
    if (!Expect('{')) return false;
    Ws();
    if (Peek() == '}') {
      ++pos_;
      return true;
    }
    while (true) {
      Ws();
      if (!String(nullptr)) return false;
      Ws();
      if (!Expect(':')) return false;
      Ws();
      if (!Value(depth)) return false;
      Ws();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect('}');
    }
  }

  bool Array(int depth) {
    if (depth > kMaxDepth) return Fail("nested too deeply");
    if (!Expect('[')) return false;
    Ws();
    if (Peek() == ']') {
      ++pos_;
      return true;
    }
    while (true) {
      Ws();
      if (!Value(depth)) return false;
      Ws();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect(']');
    }
  }

 private:
  bool Hex4(uint32_t* cp) {
    if (s_.size() - pos_ < 4) return Fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      int h = HexValue(s_[pos_ + i]);
      if (h < 0) return Fail("invalid \\u escape");
      v = (v << 4) | static_cast<uint32_t>(h);
    }
    pos_ += 4;
    *cp = v;
    return true;
  }

  bool Escape(std::string* out) {
    ++pos_;  // the backslash
    if (AtEnd()) return Fail("unterminated escape");
    char e = s_[pos_++];
    char plain = 0;
    switch (e) {
      case '"': plain = '"'; break;
      case '\\': plain = '\\'; break;
      case '/': plain = '/'; break;
      case 'b': plain = '\b'; break;
      case 'f': plain = '\f'; break;
      case 'n': plain = '\n'; break;
      case 'r': plain = '\r'; break;
      case 't': plain = '\t'; break;
      case 'u': {
        uint32_t cp = 0;
        if (!Hex4(&cp)) return false;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return Fail("unpaired low surrogate");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (s_.substr(pos_, 2) != "\\u") return Fail("unpaired high surrogate");
          pos_ += 2;
          uint32_t low = 0;
          if (!Hex4(&low)) return false;
          if (low < 0xDC00 || low > 0xDFFF) return Fail("unpaired high surrogate");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        if (out != nullptr) AppendUtf8(cp, out);
        return true;
      }
      default:
        --pos_;
        return Fail("invalid escape");
    }
    if (out != nullptr) out->push_back(plain);
    return true;
  }

  // One multi-byte UTF-8 sequence at pos() (Unicode 15, table 3-7: no overlong forms,
  // no surrogates, nothing above U+10FFFF).
  bool Utf8Sequence() {
    auto byte = [&](size_t i) -> unsigned {
      return pos_ + i < s_.size() ? static_cast<unsigned char>(s_[pos_ + i]) : 0u;
    };
    unsigned b0 = byte(0);
    unsigned lo = 0x80, hi = 0xBF;
    int n;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      n = 1;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      n = 2;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      n = 3;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    } else {
      return Fail("invalid UTF-8");
    }
    unsigned b1 = byte(1);
    if (b1 < lo || b1 > hi) return Fail("invalid UTF-8");
    for (int i = 2; i <= n; ++i) {
      unsigned b = byte(i);
      if (b < 0x80 || b > 0xBF) return Fail("invalid UTF-8");
    }
    pos_ += n + 1;
    return true;
  }

  std::string_view s_;
  size_t pos_ = 0;
  std::string error_;
};

// A string member `key` of the JSON object `object_text` (already validated), decoded;
// nullopt when absent or not a string.
std::optional<std::string> StringMember(std::string_view object_text, std::string_view key) {
  Scanner sc(object_text);
  sc.Ws();
  if (sc.Peek() != '{') return std::nullopt;
  sc.Expect('{');
  sc.Ws();
  if (sc.Peek() == '}') return std::nullopt;
  std::optional<std::string> found;
  while (sc.ok()) {
    sc.Ws();
    std::string name;
    if (!sc.String(&name)) return std::nullopt;
    sc.Ws();
    if (!sc.Expect(':')) return std::nullopt;
    sc.Ws();
    if (name == key && sc.Peek() == '"') {
      std::string value;
      if (!sc.String(&value)) return std::nullopt;
      found = std::move(value);  // the last duplicate wins, as in most JSON readers
    } else {
      if (name == key) found.reset();
      if (!sc.Value(1)) return std::nullopt;
    }
    sc.Ws();
    if (sc.Peek() == ',') {
      sc.Expect(',');
      continue;
    }
    break;
  }
  return found;
}

std::optional<int64_t> ParseInt64(std::string_view digits) {
  int64_t v = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  return v;
}

// EVENT_TIMESTAMP "date": Emogg's examples use both 1712675148150 (ms since the epoch)
// and "2024-04-14T23:00:30.000Z"; both are taken, plus an all-digits string.
std::optional<int64_t> NumberTimestamp(std::string_view text, bool integer) {
  if (integer) return ParseInt64(text);
  double v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || !std::isfinite(v) ||
      std::fabs(v) >= 9.2e18) {
    return std::nullopt;
  }
  return static_cast<int64_t>(std::llround(v));
}

std::optional<int64_t> StringTimestamp(const std::string& text) {
  if (!text.empty() && text.size() <= 18 &&
      text.find_first_not_of("0123456789") == std::string::npos) {
    return ParseInt64(text);
  }
  absl::Time t;
  std::string err;
  if (!absl::ParseTime(absl::RFC3339_full, text, &t, &err)) return std::nullopt;
  return absl::ToUnixMillis(t);
}

// Reads the members of an answer object. Structural problems are recorded in
// `*structure` (first one wins) while the grammar check goes on to the end, so a frame
// that is not JSON at all is reported as such.
void DecodeAnswer(Scanner& sc, Frame& f, std::string* structure) {
  auto bad = [&](std::string_view why) {
    if (structure->empty()) *structure = std::string(why);
  };
  bool has_path = false, has_status = false;
  sc.Expect('{');
  sc.Ws();
  if (sc.Peek() == '}') {
    sc.Expect('}');
  } else {
    while (sc.ok()) {
      sc.Ws();
      std::string key;
      if (!sc.String(&key)) return;
      sc.Ws();
      if (!sc.Expect(':')) return;
      sc.Ws();
      const size_t begin = sc.pos();
      const char c = sc.Peek();
      if (key == "id") {
        if (c == '"') {
          f.id.clear();
          if (!sc.String(&f.id)) return;
          f.has_id = true;
        } else if (c == '-' || IsDigit(c)) {
          bool integer;
          if (!sc.Number(&integer)) return;
          f.id = std::string(sc.Slice(begin, sc.pos()));
          f.has_id = true;
        } else if (c == 'n') {
          if (!sc.Literal("null")) return;
          f.id.clear();
          f.has_id = false;
        } else {
          bad("\"id\" is neither a string, a number nor null");
          if (!sc.Value(1)) return;
        }
      } else if (key == "path") {
        if (c == '"') {
          f.path.clear();
          if (!sc.String(&f.path)) return;
          has_path = true;
        } else if (c == 'n') {
          // Choice: an error answer to a message whose path could not be read (a 405)
          // may carry "path": null; it is still an answer (with path "").
          if (!sc.Literal("null")) return;
          f.path.clear();
          has_path = true;
        } else {
          bad("\"path\" is not a string");
          if (!sc.Value(1)) return;
        }
      } else if (key == "status") {
        if (c == '-' || IsDigit(c)) {
          bool integer;
          if (!sc.Number(&integer)) return;
          std::optional<int64_t> v =
              integer ? ParseInt64(sc.Slice(begin, sc.pos())) : std::nullopt;
          if (!v || *v < 100 || *v > 599) {
            bad("\"status\" is not an integer from 100 to 599");
          } else {
            f.status = static_cast<int>(*v);
            has_status = true;
          }
        } else {
          bad("\"status\" is not a number");
          if (!sc.Value(1)) return;
        }
      } else if (key == "error") {
        if (c == 't') {
          if (!sc.Literal("true")) return;
          f.error_flag = true;
        } else if (c == 'f') {
          if (!sc.Literal("false")) return;
          f.error_flag = false;
        } else {
          bad("\"error\" is not a boolean");
          if (!sc.Value(1)) return;
        }
      } else if (key == "body") {
        if (!sc.Value(1)) return;
        f.body = sc.Slice(begin, sc.pos());
      } else if (key == "data") {
        if (!sc.Value(1)) return;
        f.data = sc.Slice(begin, sc.pos());
      } else {
        if (!sc.Value(1)) return;  // unknown members are ignored
      }
      sc.Ws();
      if (sc.Peek() == ',') {
        sc.Expect(',');
        continue;
      }
      sc.Expect('}');
      break;
    }
  }
  if (!sc.ok()) return;
  if (!has_path) bad("answer without a \"path\"");
  if (!has_status) bad("answer without a numeric \"status\"");
  if (!f.data.empty()) f.message = StringMember(f.data, "message").value_or("");
  if (has_path && f.path == kPathSubscribe && !f.is_error() && !f.body.empty()) {
    f.subscribed_id = StringMember(f.body, "subscriptionId").value_or("");
  }
}

void DecodeEvent(Scanner& sc, Frame& f, std::string* structure) {
  auto bad = [&](std::string_view why) {
    if (structure->empty()) *structure = std::string(why);
  };
  sc.Expect('[');
  sc.Ws();
  int n = 0;
  if (sc.Peek() == ']') {
    sc.Expect(']');
  } else {
    while (sc.ok()) {
      sc.Ws();
      const size_t begin = sc.pos();
      const char c = sc.Peek();
      switch (n) {
        case 0:
          if (c == '"') {
            if (!sc.String(&f.subscription_id)) return;
            if (f.subscription_id.empty()) bad("event with an empty SUBSCRIPTION_ID");
          } else {
            bad("event SUBSCRIPTION_ID is not a string");
            if (!sc.Value(1)) return;
          }
          break;
        case 1:
          if (c == '"') {
            std::string text;
            if (!sc.String(&text)) return;
            f.timestamp_raw = sc.Slice(begin, sc.pos());
            f.timestamp_ms = StringTimestamp(text);
          } else if (c == '-' || IsDigit(c)) {
            bool integer;
            if (!sc.Number(&integer)) return;
            f.timestamp_raw = sc.Slice(begin, sc.pos());
            f.timestamp_ms = NumberTimestamp(f.timestamp_raw, integer);
          } else {
            bad("event EVENT_TIMESTAMP is neither a number nor a string");
            if (!sc.Value(1)) return;
          }
          break;
        case 2:
          if (c == '"') {
            if (!sc.String(&f.type)) return;
          } else {
            bad("event EVENT_TYPE is not a string");
            if (!sc.Value(1)) return;
          }
          break;
        case 3:
          if (!sc.Value(1)) return;
          f.event_data = sc.Slice(begin, sc.pos());
          break;
        default:
          // Choice: elements after the fourth are ignored, so an element Emogg might
          // append one day does not make every event malformed.
          if (!sc.Value(1)) return;
          break;
      }
      ++n;
      sc.Ws();
      if (sc.Peek() == ',') {
        sc.Expect(',');
        continue;
      }
      sc.Expect(']');
      break;
    }
  }
  if (sc.ok() && n < 4) {
    bad(absl::StrCat("event array has ", n,
                     " elements; expected [SUBSCRIPTION_ID, EVENT_TIMESTAMP, EVENT_TYPE, "
                     "EVENT_DATA]"));
  }
}

constexpr std::string_view kBase36 = "0123456789abcdefghijklmnopqrstuvwxyz";

void AppendBase36(uint64_t v, std::string* out) {
  char buf[16];
  int n = 0;
  do {
    buf[n++] = kBase36[v % 36];
    v /= 36;
  } while (v != 0);
  while (n > 0) out->push_back(buf[--n]);
}

absl::Status CheckText(std::string_view what, std::string_view value, size_t max,
                       std::string_view example) {
  if (value.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(what), " is required (e.g. \"", Av(example), "\")"));
  }
  if (value.size() > max) {
    return absl::InvalidArgumentError(absl::StrCat(Av(what), " is ", value.size(),
                                                   " bytes long; at most ", max, " are allowed"));
  }
  for (char c : value) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrCat(Av(what), " contains a control character; remove it"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// --- Ids -----------------------------------------------------------------------------

std::string MakeRequestId(uint64_t nonce, uint64_t sequence) {
  std::string id;
  id.reserve(27);
  AppendBase36(nonce, &id);
  id.push_back('.');
  AppendBase36(sequence, &id);
  return id;
}

bool IsValidRequestId(std::string_view id) {
  if (id.empty() || id.size() > kMaxIdSize) return false;
  for (char c : id) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

// --- Checks --------------------------------------------------------------------------

absl::Status ValidatePath(std::string_view path) {
  return CheckText("path", path, kMaxPathSize, "ping");
}

bool IsReservedPath(std::string_view path) {
  return path == kPathAuth || path == kPathSubscribe || path == kPathUnsubscribe;
}

absl::Status ValidateRequestBody(std::string_view json) {
  if (json.empty()) return absl::OkStatus();
  Scanner sc(json);
  sc.Ws();
  const bool object = sc.Peek() == '{';
  sc.Value(0);
  sc.Ws();
  if (sc.ok() && !sc.AtEnd()) sc.Fail("extra data after the JSON value");
  if (!sc.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "json_body is not valid JSON (", sc.error(), "); send one JSON object, e.g. {}"));
  }
  if (!object) {
    return absl::InvalidArgumentError(
        "json_body must be a JSON object (e.g. {\"sessionId\": \"...\"}), not an array or "
        "scalar: Emogg closes the connection on any other body");
  }
  return absl::OkStatus();
}

absl::Status ValidateChannel(std::string_view channel) {
  return CheckText("channel", channel, kMaxChannelSize, "session_emotions_counts");
}

absl::Status ValidateKey(std::string_view key) {
  return CheckText("key", key, kMaxKeySize, "66151895e00a857bd76f889d:10s");
}

// --- Encoding ------------------------------------------------------------------------

std::string JsonQuote(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out.push_back('"');
  for (char ch : text) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          static constexpr char kHex[] = "0123456789abcdef";
          out += "\\u00";
          out.push_back(kHex[c >> 4]);
          out.push_back(kHex[c & 0xF]);
        } else {
          out.push_back(ch);
        }
    }
  }
  out.push_back('"');
  return out;
}

std::string EncodeRequest(std::string_view id, std::string_view path, std::string_view json_body) {
  std::string out;
  out.reserve(id.size() + path.size() + json_body.size() + 32);
  out += "{\"id\":";
  out += JsonQuote(id);
  out += ",\"path\":";
  out += JsonQuote(path);
  if (!json_body.empty()) {
    out += ",\"body\":";
    out += json_body;
  }
  out.push_back('}');
  return out;
}

std::string EncodeAuth(std::string_view id, std::string_view token) {
  return EncodeRequest(id, kPathAuth, absl::StrCat("{\"token\":", JsonQuote(token), "}"));
}

std::string EncodeSubscribe(std::string_view id, std::string_view channel, std::string_view key) {
  return EncodeRequest(
      id, kPathSubscribe,
      absl::StrCat("{\"channel\":", JsonQuote(channel), ",\"key\":", JsonQuote(key), "}"));
}

std::string EncodeUnsubscribe(std::string_view id, std::string_view subscription_id) {
  return EncodeRequest(id, kPathUnsubscribe,
                       absl::StrCat("{\"subscriptionId\":", JsonQuote(subscription_id), "}"));
}

// The page's own ping example sends no body; "{}" is sent anyway because its JavaScript
// helper does, and an empty object is valid for every path.
std::string EncodePing(std::string_view id) { return EncodeRequest(id, kPathPing, "{}"); }

// --- Decoding ------------------------------------------------------------------------

std::string_view FrameKindName(FrameKind kind) {
  switch (kind) {
    case FrameKind::kResponse: return "response";
    case FrameKind::kAuthAnswer: return "auth_answer";
    case FrameKind::kPingAnswer: return "ping_answer";
    case FrameKind::kEvent: return "event";
    case FrameKind::kMalformed: return "malformed";
  }
  return "unknown";
}

std::string_view Frame::route() const {
  switch (kind) {
    case FrameKind::kResponse:
    case FrameKind::kAuthAnswer:
    case FrameKind::kPingAnswer:
      return id;
    case FrameKind::kEvent:
      return subscription_id;
    case FrameKind::kMalformed:
      break;
  }
  return {};
}

bool Frame::is_error() const { return error_flag || status < 200 || status > 299; }

Frame DecodeFrame(std::string_view text) {
  Frame f;
  Scanner sc(text);
  std::string structure;
  sc.Ws();
  const char first = sc.Peek();
  if (first == '{') {
    DecodeAnswer(sc, f, &structure);
  } else if (first == '[') {
    DecodeEvent(sc, f, &structure);
  } else {
    sc.Value(0);
    if (sc.ok()) structure = "neither an answer object nor an event array";
  }
  if (sc.ok()) {
    sc.Ws();
    if (!sc.AtEnd()) sc.Fail("extra data after the JSON value");
  }
  Frame out;
  if (!sc.ok()) {
    out.reason = absl::StrCat("not valid JSON: ", sc.error());
    return out;
  }
  if (!structure.empty()) {
    out.reason = std::move(structure);
    return out;
  }
  if (first == '[') {
    f.kind = FrameKind::kEvent;
  } else if (f.path == kPathAuth) {
    f.kind = FrameKind::kAuthAnswer;
  } else if (f.path == kPathPing) {
    f.kind = FrameKind::kPingAnswer;
  } else {
    f.kind = FrameKind::kResponse;
  }
  return f;
}

// --- Statuses ------------------------------------------------------------------------

absl::StatusCode CodeForStatus(int status) {
  if (status >= 200 && status <= 299) return absl::StatusCode::kOk;
  switch (status) {
    // The bridge builds every payload: a 405 means it sent one Emogg cannot read.
    case 405: return absl::StatusCode::kInternal;
    // "Something went wrong on Emogg's end. (These are rare.)": worth a retry.
    case 500: return absl::StatusCode::kUnavailable;
    default: break;
  }
  // Everything else as every bridge maps HTTP-like statuses.
  return core::CodeForHttpStatus(status);
}

std::string ReasonForStatus(int status) {
  switch (status) {
    case 400: return "BAD_REQUEST";
    case 401: return "UNAUTHORIZED";
    case 404: return "NOT_FOUND";
    case 405: return "MALFORMED_PAYLOAD";
    case 429: return "TOO_MANY_REQUESTS";
    case 500: return "INTERNAL_SERVER_ERROR";
    default: return absl::StrCat("HTTP_", status);
  }
}

bool StatusClosesConnection(int status) { return status == 401 || status == 405 || status == 429; }

absl::Status UpstreamError(const Frame& answer,
                           const std::function<std::string(std::string_view)>& redact) {
  constexpr size_t kMaxMessage = 512;
  absl::StatusCode code = CodeForStatus(answer.status);
  if (code == absl::StatusCode::kOk) code = absl::StatusCode::kUnknown;  // error:true with 2xx
  std::string upstream_message = answer.message.substr(0, kMaxMessage);
  if (redact) upstream_message = redact(upstream_message);
  std::string text = absl::StrCat("Emogg answered ", answer.status, " to \"", answer.path, "\"");
  if (!upstream_message.empty()) absl::StrAppend(&text, ": ", upstream_message);
  if (StatusClosesConnection(answer.status)) {
    absl::StrAppend(&text, " (Emogg closes the connection after this status)");
  }
  return core::WithErrorInfo(absl::Status(code, text), ReasonForStatus(answer.status),
                             kErrorDomain,
                             {{"upstream_status", absl::StrCat(answer.status)},
                              {"path", answer.path},
                              {"upstream_message", upstream_message}});
}

bool ReplaysLastEventOnSubscribe(std::string_view channel) {
  return channel == "session_worker_state";
}

}  // namespace wsbridge::emogg
