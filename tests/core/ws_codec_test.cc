#include "bridges/core/ws_codec.h"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"

// Live heap blocks of the whole binary: ReleaseMemory's promise ("an idle reader holds no
// capacity") is about the heap, and the reader keeps its buffers private, so the test
// counts what is still allocated instead of asking the object.
namespace {
std::atomic<long> g_live_blocks{0};
}  // namespace

void* operator new(std::size_t n) {
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  g_live_blocks.fetch_add(1, std::memory_order_relaxed);
  return p;
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p != nullptr) g_live_blocks.fetch_add(1, std::memory_order_relaxed);
  return p;
}
void operator delete(void* p) noexcept {
  if (p == nullptr) return;
  g_live_blocks.fetch_sub(1, std::memory_order_relaxed);
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { operator delete(p); }

namespace wsbridge::core::ws {
namespace {

using Kind = Reader::Event::Kind;
constexpr std::size_t npos = std::string_view::npos;

std::string Bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) s.push_back(static_cast<char>(c));
  return s;
}

std::string Be(uint64_t v, int n) {
  std::string s;
  for (int i = n - 1; i >= 0; --i) s.push_back(static_cast<char>(v >> (8 * i)));
  return s;
}

// --- Frames as a server sends them (never masked unless asked) ---------------------------

enum class Len { kShortest, k16, k64 };

// `b0` is the first header byte (FIN, RSV, opcode); `length` overrides the payload's size
// in the header (for lengths the payload does not have).
std::string Frame(int b0, std::string_view payload, Len form = Len::kShortest,
                  std::optional<uint64_t> length = std::nullopt, bool masked = false) {
  const uint64_t n = length.value_or(payload.size());
  if (form == Len::kShortest) form = n < 126 ? Len::kShortest : n <= 0xFFFF ? Len::k16 : Len::k64;
  const int mask_bit = masked ? 0x80 : 0;
  std::string f(1, static_cast<char>(b0));
  if (form == Len::kShortest) {
    f.push_back(static_cast<char>(mask_bit | n));
  } else if (form == Len::k16) {
    f.push_back(static_cast<char>(mask_bit | 126));
    f += Be(n, 2);
  } else {
    f.push_back(static_cast<char>(mask_bit | 127));
    f += Be(n, 8);
  }
  std::string body(payload);
  if (masked) {
    f += Bytes({1, 2, 3, 4});
    ApplyMask(body.data(), body.size(), 0x01020304);
  }
  return f + body;
}

constexpr int kFin = 0x80;
std::string Text(std::string_view p, bool fin = true) { return Frame((fin ? kFin : 0) | 0x1, p); }
std::string Binary(std::string_view p, bool fin = true) { return Frame((fin ? kFin : 0) | 0x2, p); }
std::string Cont(std::string_view p, bool fin = true) { return Frame((fin ? kFin : 0) | 0x0, p); }
std::string Ping(std::string_view p) { return Frame(kFin | 0x9, p); }
std::string Pong(std::string_view p) { return Frame(kFin | 0xA, p); }
std::string Close(std::string_view p) { return Frame(kFin | 0x8, p); }
std::string CloseCode(uint16_t code, std::string_view reason = "") {
  return Close(Be(code, 2) + std::string(reason));
}

// --- Driving a reader ------------------------------------------------------------------

// One event, with its payload copied out (the view dies at the next call).
struct Got {
  Kind kind = Kind::kNeedMore;
  bool binary = false;
  std::string payload;
  uint16_t close_code = 0;
  // An error's status: a message too big is a resource exhausted, the rest is bad data.
  bool too_big = false;
  bool no_copy = false;  // the payload was a view into the bytes handed in

  bool operator==(const Got& o) const {
    return kind == o.kind && binary == o.binary && payload == o.payload && close_code == o.close_code &&
           too_big == o.too_big;
  }
};

std::ostream& operator<<(std::ostream& os, const Got& g) {
  os << "{kind " << static_cast<int>(g.kind) << (g.binary ? " binary" : "") << " payload " << g.payload.size()
     << " bytes";
  if (g.payload.size() <= 40) os << " \"" << g.payload << "\"";
  return os << " code " << g.close_code << (g.too_big ? " too big" : "") << "}";
}

Got Message(std::string_view p) { return {Kind::kMessage, false, std::string(p)}; }
Got BinaryMessage(std::string_view p) { return {Kind::kMessage, true, std::string(p)}; }
Got PingEvent(std::string_view p) { return {Kind::kPing, false, std::string(p)}; }
Got PongEvent(std::string_view p) { return {Kind::kPong, false, std::string(p)}; }
Got CloseEvent(uint16_t code, std::string_view reason = "") {
  return {Kind::kClose, false, std::string(reason), code};
}
Got Error(uint16_t code) { return {Kind::kError, false, "", code, code == 1009}; }

// Hands `chunks` to `r` one by one, as reads would, and returns every event. Each chunk
// is its own allocation, gone once the reader has moved past it, so a view that outlives
// its chunk is a use after free under ASan.
std::vector<Got> Drive(Reader& r, const std::vector<std::string>& chunks) {
  std::vector<Got> got;
  for (const std::string& chunk_bytes : chunks) {
    std::string chunk = chunk_bytes;
    std::string_view in = chunk;
    for (;;) {
      const std::string_view before = in;
      const Reader::Event e = r.Next(in);
      if (e.kind == Kind::kNeedMore) {
        // Asking for more means everything handed in was taken (or the reader is done).
        if (!r.done()) {
          EXPECT_TRUE(in.empty()) << in.size() << " bytes left";
        }
        break;
      }
      Got g{e.kind, e.binary, std::string(e.payload), e.close_code,
            e.error.code() == absl::StatusCode::kResourceExhausted};
      g.no_copy = !e.payload.empty() && e.payload.data() >= before.data() &&
                  e.payload.data() + e.payload.size() <= before.data() + before.size();
      if (e.kind == Kind::kError) {
        EXPECT_FALSE(e.error.ok());
        EXPECT_FALSE(e.error.message().empty());
      } else {
        EXPECT_TRUE(e.error.ok());
      }
      if (e.kind == Kind::kError || e.kind == Kind::kClose) {
        EXPECT_TRUE(r.done());
      }
      got.push_back(std::move(g));
    }
  }
  return got;
}

std::vector<std::string> Whole(std::string_view s) { return {std::string(s)}; }

std::vector<std::string> ByteByByte(std::string_view s) {
  std::vector<std::string> out;
  for (char c : s) out.emplace_back(1, c);
  return out;
}

std::vector<std::string> RandomSplits(std::string_view s, std::mt19937& rng) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    // Mostly short pieces (headers cut anywhere), sometimes long ones.
    const std::size_t max = rng() % 4 == 0 ? 300 : 12;
    const std::size_t n = std::min<std::size_t>(1 + rng() % max, s.size() - pos);
    out.emplace_back(s.substr(pos, n));
    pos += n;
  }
  return out;
}

// Checks that `input` gives `want` whole, byte by byte and in random splits.
void ExpectEvents(std::string_view input, const std::vector<Got>& want, std::size_t max = 1 << 20,
                  int random_splits = 30) {
  {
    Reader r(max);
    EXPECT_EQ(Drive(r, Whole(input)), want) << "whole";
  }
  {
    Reader r(max);
    EXPECT_EQ(Drive(r, ByteByByte(input)), want) << "byte by byte";
  }
  std::mt19937 rng(42);
  for (int i = 0; i < random_splits; ++i) {
    Reader r(max);
    EXPECT_EQ(Drive(r, RandomSplits(input, rng)), want) << "random split " << i;
  }
}

// --- Client frames ---------------------------------------------------------------------

TEST(WsCodec, WritesClientHeadersInTheShortestLengthForm) {
  struct Case {
    Opcode op;
    bool fin;
    uint64_t size;
    std::string bytes;
  };
  const std::vector<Case> cases = {
      {Opcode::kText, true, 0, Bytes({0x81, 0x80})},
      {Opcode::kText, true, 125, Bytes({0x81, 0x80 | 125})},
      {Opcode::kBinary, true, 126, Bytes({0x82, 0xFE, 0x00, 0x7E})},
      {Opcode::kBinary, true, 65535, Bytes({0x82, 0xFE, 0xFF, 0xFF})},
      {Opcode::kBinary, true, 65536, Bytes({0x82, 0xFF, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00})},
      {Opcode::kText, false, (uint64_t{1} << 40) + 5, Bytes({0x01, 0xFF, 0, 0, 0x01, 0, 0, 0, 0, 0x05})},
      {Opcode::kContinuation, true, 1, Bytes({0x80, 0x81})},
      {Opcode::kContinuation, false, 1, Bytes({0x00, 0x81})},
      {Opcode::kClose, true, 2, Bytes({0x88, 0x82})},
      {Opcode::kPing, true, 0, Bytes({0x89, 0x80})},
      {Opcode::kPong, true, 125, Bytes({0x8A, 0xFD})},
  };
  for (const Case& c : cases) {
    char out[kMaxClientHeaderBytes + 2];
    std::memset(out, 0x55, sizeof out);
    const std::size_t n = WriteClientHeader(c.op, c.fin, c.size, 0xA1B2C3D4, out);
    // The header, then the mask key most significant byte first; nothing written past it.
    EXPECT_EQ(std::string(out, n), c.bytes + Bytes({0xA1, 0xB2, 0xC3, 0xD4})) << c.size;
    EXPECT_LE(n, kMaxClientHeaderBytes);
    EXPECT_EQ(out[n], 0x55) << c.size;
  }
}

TEST(WsCodec, ClientFrameIsTheRfcExample) {
  // RFC 6455 5.7: a single-frame masked text message "Hello".
  EXPECT_EQ(ClientFrame(Opcode::kText, "Hello", 0x37FA213D),
            Bytes({0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58}));
  EXPECT_EQ(ClientFrame(Opcode::kPing, "", 0x01020304), Bytes({0x89, 0x80, 1, 2, 3, 4}));
  // A 16-bit length, and the payload unmasks to what went in.
  const std::string payload(300, 'x');
  std::string f = ClientFrame(Opcode::kBinary, payload, 0xDEADBEEF);
  ASSERT_EQ(f.size(), 8 + payload.size());
  EXPECT_EQ(f.substr(0, 8), Bytes({0x82, 0xFE, 0x01, 0x2C, 0xDE, 0xAD, 0xBE, 0xEF}));
  ApplyMask(f.data() + 8, payload.size(), 0xDEADBEEF);
  EXPECT_EQ(f.substr(8), payload);
}

TEST(WsCodec, ApplyMaskIsAByteWiseXorAtEveryOffsetAndAlignment) {
  const uint32_t key = 0x9F1E2D3C;
  const unsigned char k[4] = {0x9F, 0x1E, 0x2D, 0x3C};
  std::string src(96, '\0');
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<char>(i * 37 + 11);
  // Every start alignment of the data (the eight-byte loop), key offset and length.
  for (std::size_t align = 0; align < 8; ++align) {
    for (std::size_t offset = 0; offset < 9; ++offset) {
      for (std::size_t n = 0; n <= 70; ++n) {
        std::string buf = src;
        char* data = buf.data() + align;
        ApplyMask(data, n, key, offset);
        for (std::size_t i = 0; i < buf.size(); ++i) {
          const bool inside = i >= align && i < align + n;
          const char want = inside ? static_cast<char>(src[i] ^ k[(offset + i - align) % 4]) : src[i];
          ASSERT_EQ(buf[i], want) << "align " << align << " offset " << offset << " n " << n << " i " << i;
        }
        // The same call unmasks.
        ApplyMask(data, n, key, offset);
        ASSERT_EQ(buf, src);
        // Masking in two pieces, the second starting at the key position where the first
        // stopped, is masking in one.
        for (std::size_t cut = 0; cut <= n; cut += 3) {
          std::string two = src;
          ApplyMask(two.data() + align, cut, key, offset);
          ApplyMask(two.data() + align + cut, n - cut, key, offset + cut);
          std::string one = src;
          ApplyMask(one.data() + align, n, key, offset);
          ASSERT_EQ(two, one) << "cut " << cut;
        }
      }
    }
  }
}

TEST(WsCodec, ClosePayloadCutsTheReasonOnACharacterBoundary) {
  EXPECT_EQ(ClosePayload(0, "ignored"), "");
  EXPECT_EQ(ClosePayload(1000, ""), Bytes({0x03, 0xE8}));
  EXPECT_EQ(ClosePayload(4001, "bye"), Bytes({0x0F, 0xA1}) + "bye");
  EXPECT_EQ(ClosePayload(1000, std::string(200, 'r')), Bytes({0x03, 0xE8}) + std::string(123, 'r'));
  EXPECT_EQ(ClosePayload(1000, std::string(123, 'r')).size(), 125u);
  const std::string euro = "\xE2\x82\xAC";
  // 120 + 3 bytes fit exactly; one more byte after it is cut, the euro sign stays.
  EXPECT_EQ(ClosePayload(1000, std::string(120, 'a') + euro).substr(2), std::string(120, 'a') + euro);
  EXPECT_EQ(ClosePayload(1000, std::string(120, 'a') + euro + "b").substr(2), std::string(120, 'a') + euro);
  // The euro sign would straddle byte 123: it goes whole.
  EXPECT_EQ(ClosePayload(1000, std::string(121, 'a') + euro).substr(2), std::string(121, 'a'));
  EXPECT_EQ(ClosePayload(1000, std::string(122, 'a') + euro + "z").substr(2), std::string(122, 'a'));
  // Every cut of a reason mixing 1- to 4-byte characters: the longest prefix of whole
  // characters within 123 bytes.
  const std::vector<std::string> chars = {"a", "\xC3\xA9", euro, "\xF0\x9F\x98\x80"};
  std::mt19937 rng(7);
  for (int round = 0; round < 500; ++round) {
    std::string reason;
    std::vector<std::size_t> boundaries = {0};
    while (reason.size() < 140) {
      reason += chars[rng() % chars.size()];
      boundaries.push_back(reason.size());
    }
    std::size_t want = 0;
    for (std::size_t b : boundaries) {
      if (b <= 123) want = b;
    }
    const std::string p = ClosePayload(1001, reason);
    ASSERT_EQ(p.substr(2), reason.substr(0, want)) << round;
    ASSERT_TRUE(IsValidUtf8(p.substr(2)));
    ASSERT_LE(p.size(), kMaxControlPayload);
  }
}

// --- UTF-8 -----------------------------------------------------------------------------

TEST(WsCodec, Utf8Table) {
  struct Case {
    std::string s;
    std::size_t prefix;  // ValidUtf8Prefix
  };
  const std::vector<Case> cases = {
      {"", 0},
      {"plain ascii", 11},
      {Bytes({0x00, 0x7F}), 2},
      {"\xC2\x80", 2},          // U+0080, the first 2-byte one
      {"\xDF\xBF", 2},          // U+07FF
      {"\xE0\xA0\x80", 3},      // U+0800
      {"\xED\x9F\xBF", 3},      // U+D7FF, below the surrogates
      {"\xEE\x80\x80", 3},      // U+E000, above them
      {"\xEF\xBF\xBF", 3},      // U+FFFF
      {"\xF0\x90\x80\x80", 4},  // U+10000
      {"\xF4\x8F\xBF\xBF", 4},  // U+10FFFF, the last
      {"a\xE2\x82\xAC!", 5},
      // Overlong forms.
      {"\xC0\x80", npos},
      {"\xC1\xBF", npos},
      {"\xE0\x80\x80", npos},
      {"\xE0\x9F\xBF", npos},
      {"\xF0\x80\x80\x80", npos},
      {"\xF0\x8F\xBF\xBF", npos},
      // Surrogates (CESU-8 pairs included).
      {"\xED\xA0\x80", npos},
      {"\xED\xBF\xBF", npos},
      {"\xED\xA0\xBD\xED\xB8\x80", npos},
      // Above U+10FFFF, and bytes that are never UTF-8.
      {"\xF4\x90\x80\x80", npos},
      {"\xF5\x80\x80\x80", npos},
      {"\xF7\xBF\xBF\xBF", npos},
      {"\xF8\x88\x80\x80\x80", npos},
      {"\xFE", npos},
      {"\xFF", npos},
      // Continuation bytes out of place, and a lead without them.
      {"\x80", npos},
      {"a\xBF", npos},
      {"\xC2\x41", npos},
      {"\xE2\x82\x41", npos},
      {"\xF0\x90\x80\x41", npos},
      {"\xE2\x82\xAC\xAC", npos},
      // Truncated at the end: valid so far, so the prefix stops before it...
      {"\xC2", 0},
      {"a\xE2\x82", 1},
      {"\xE2", 0},
      {"ab\xF0\x90\x80", 2},
      {"\xF4\x8F", 0},
      {"\xED\x9F", 0},
      // ... unless what is there can never be completed.
      {"\xE0\x80", npos},
      {"\xE0\x9F", npos},
      {"\xED\xA0", npos},
      {"\xF0\x8F", npos},
      {"\xF4\x90", npos},
      {"\xF5", npos},
      {"\xC0", npos},
      // The eight-bytes-at-a-time ASCII scan around multi-byte characters.
      {"abcdefgh\xE2\x82\xACijklmnopq", 20},
      {"abcdefghijklmno\x80", npos},
      {"abcdefghijklmnopq\xF0\x9F\x98", 17},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(ValidUtf8Prefix(c.s), c.prefix) << testing::PrintToString(c.s);
    EXPECT_EQ(IsValidUtf8(c.s), c.prefix == c.s.size()) << testing::PrintToString(c.s);
  }
  // A bad byte found at every position of a long ASCII run.
  for (std::size_t at = 0; at < 40; ++at) {
    std::string s(40, 'x');
    s[at] = '\xFF';
    EXPECT_EQ(ValidUtf8Prefix(s), npos) << at;
    s[at] = '\xC2';  // truncated only when last
    EXPECT_EQ(ValidUtf8Prefix(s), at == 39 ? 39 : npos) << at;
  }
}

// An independent reading of RFC 3629, for exhaustive checks: the code points a sequence's
// bytes can still become form a range, and the sequence is fine while the range holds a
// valid one.
std::size_t ReferencePrefix(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int len;
    uint32_t lead_bits;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, lead_bits = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, lead_bits = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, lead_bits = c & 0x07;
    } else {
      return npos;
    }
    uint32_t lo = lead_bits, hi = lead_bits;
    int k = 1;
    for (; k < len && i + k < s.size(); ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return npos;
      lo = (lo << 6) | (cc & 0x3F);
      hi = (hi << 6) | (cc & 0x3F);
    }
    for (int m = k; m < len; ++m) {
      lo = lo << 6;
      hi = (hi << 6) | 0x3F;
    }
    const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    const bool possible = hi >= min && lo <= 0x10FFFF && !(lo >= 0xD800 && hi <= 0xDFFF);
    if (!possible) return npos;
    if (k < len) return i;  // truncated, and may still become valid
    i += len;
  }
  return s.size();
}

TEST(WsCodec, Utf8AgreesWithAReferenceOnEveryShortString) {
  std::string s;
  for (int a = 0; a < 256; ++a) {
    s.assign(1, static_cast<char>(a));
    ASSERT_EQ(ValidUtf8Prefix(s), ReferencePrefix(s)) << a;
    for (int b = 0; b < 256; ++b) {
      s.assign({static_cast<char>(a), static_cast<char>(b)});
      ASSERT_EQ(ValidUtf8Prefix(s), ReferencePrefix(s)) << a << " " << b;
    }
  }
  // Every 3-byte string with a non-ASCII lead.
  for (int a = 0x80; a < 256; ++a) {
    for (int b = 0; b < 256; ++b) {
      for (int c = 0; c < 256; ++c) {
        s.assign({static_cast<char>(a), static_cast<char>(b), static_cast<char>(c)});
        ASSERT_EQ(ValidUtf8Prefix(s), ReferencePrefix(s)) << a << " " << b << " " << c;
      }
    }
  }
  // 4-byte leads with every second byte and the edges of the others.
  const int edges[] = {0x00, 0x7F, 0x80, 0x8F, 0x90, 0xBF, 0xC0, 0xFF};
  for (int a = 0xF0; a < 256; ++a) {
    for (int b = 0; b < 256; ++b) {
      for (int c : edges) {
        for (int d : edges) {
          s.assign({static_cast<char>(a), static_cast<char>(b), static_cast<char>(c), static_cast<char>(d)});
          ASSERT_EQ(ValidUtf8Prefix(s), ReferencePrefix(s)) << a << " " << b << " " << c << " " << d;
        }
      }
    }
  }
  // Random mixes, mostly valid text with damage here and there.
  const std::vector<std::string> pieces = {
      "a",    "xyzxyzxyz", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xED\x9F\xBF", "\xF4\x8F\xBF\xBF",
      "\x80", "\xE2",      "\xF0\x9F", "\xED\xA0\x80", "\xC0\xAF",         "\xFF"};
  std::mt19937 rng(3);
  for (int round = 0; round < 20000; ++round) {
    s.clear();
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) s += pieces[rng() % (round % 2 == 0 ? 7 : pieces.size())];
    ASSERT_EQ(ValidUtf8Prefix(s), ReferencePrefix(s)) << testing::PrintToString(s);
    ASSERT_EQ(IsValidUtf8(s), ReferencePrefix(s) == s.size());
  }
}

TEST(WsCodec, ValidReceivedCloseCodes) {
  for (uint32_t code = 0; code <= 0xFFFF; ++code) {
    const bool want =
        (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
    EXPECT_EQ(IsValidReceivedCloseCode(static_cast<uint16_t>(code)), want) << code;
  }
}

TEST(WsCodec, AcceptKey) {
  // RFC 6455 1.3's example, and two more computed with Python's hashlib and base64.
  EXPECT_EQ(AcceptKey("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  EXPECT_EQ(AcceptKey("x3JJHMbDL1EzLkh9GBhXDw=="), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
  EXPECT_EQ(AcceptKey(""), "Kfh9QIsMVZcl6xEPYxPHzW8SZ8w=");
}

// --- Reader ----------------------------------------------------------------------------

TEST(WsReader, DeliversEveryMessageByteExactHoweverTheBytesArrive) {
  std::string all_bytes;
  for (int i = 0; i < 256; ++i) all_bytes.push_back(static_cast<char>(i));
  std::string text_125(125, 't'), bin_126(126, '\xAB'), bin_65535(65535, '\0'), text_65536;
  for (int i = 0; i < 65536; ++i) text_65536.push_back(static_cast<char>('a' + i % 26));
  for (std::size_t i = 0; i < bin_65535.size(); ++i) bin_65535[i] = static_cast<char>(i * 7);
  std::string input;
  std::vector<Got> want;
  auto add = [&](const std::string& frames, std::vector<Got> events) {
    input += frames;
    want.insert(want.end(), events.begin(), events.end());
  };
  add(Text("hello"), {Message("hello")});
  add(Binary(all_bytes), {BinaryMessage(all_bytes)});
  add(Text("") + Binary(""), {Message(""), BinaryMessage("")});
  add(Text(text_125) + Binary(bin_126), {Message(text_125), BinaryMessage(bin_126)});
  add(Binary(bin_65535) + Text(text_65536), {BinaryMessage(bin_65535), Message(text_65536)});
  add(Text("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"),
      {Message("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80")});
  // Fragmented, with control frames between the fragments (RFC 6455 5.4).
  add(Text("he", false) + Ping("") + Cont("l", false) + Pong("x") + Ping(std::string(125, 'p')) + Cont("lo"),
      {PingEvent(""), PongEvent("x"), PingEvent(std::string(125, 'p')), Message("hello")});
  // Empty fragments, a binary message split everywhere.
  add(Binary("", false) + Cont("", false) + Cont("ab", false) + Cont("", false) + Cont("c"),
      {BinaryMessage("abc")});
  add(Binary("", false) + Cont(""), {BinaryMessage("")});
  // A character split across fragments is fine: only the message must be whole.
  add(Text("\xE2", false) + Cont("\x82", false) + Cont("\xAC"), {Message("\xE2\x82\xAC")});
  // A fragmented message larger than any one frame, with a 16-bit length fragment.
  add(Binary(bin_126, false) + Cont(all_bytes), {BinaryMessage(bin_126 + all_bytes)});
  add(Ping("are you there") + Pong(""), {PingEvent("are you there"), PongEvent("")});
  add(CloseCode(1000, "bye"), {CloseEvent(1000, "bye")});
  // After the close frame nothing is read.
  input += Text("never");
  ExpectEvents(input, want, 1 << 20, 10);
}

TEST(WsReader, PayloadIsAViewIntoTheInputWhenTheMessageIsOneFrameAllThere) {
  {
    // One frame, all there: no copy.
    Reader r(1024);
    const std::string input = Text("direct") + Binary(std::string(300, 'b'));
    std::string_view in = input;
    Reader::Event e = r.Next(in);
    ASSERT_EQ(e.kind, Kind::kMessage);
    EXPECT_EQ(e.payload, "direct");
    EXPECT_EQ(e.payload.data(), input.data() + 2);
    e = r.Next(in);
    ASSERT_EQ(e.kind, Kind::kMessage);
    EXPECT_EQ(e.payload.data(), input.data() + 8 + 4);
    EXPECT_TRUE(in.empty());
  }
  {
    // A header split over two reads, its payload all in the second: still no copy.
    Reader r(1024);
    const std::string first = Text("split header").substr(0, 1);
    const std::string second = Text("split header").substr(1);
    std::string_view in = first;
    EXPECT_EQ(r.Next(in).kind, Kind::kNeedMore);
    EXPECT_TRUE(r.mid_message());
    in = second;
    const Reader::Event e = r.Next(in);
    ASSERT_EQ(e.kind, Kind::kMessage);
    EXPECT_EQ(e.payload, "split header");
    EXPECT_EQ(e.payload.data(), second.data() + 1);
  }
  {
    // The payload split over two reads: assembled in the reader's buffer.
    Reader r(1024);
    const std::string frame = Binary("assembled payload");
    const std::string first = frame.substr(0, 7), second = frame.substr(7);
    std::string_view in = first;
    EXPECT_EQ(r.Next(in).kind, Kind::kNeedMore);
    in = second;
    const Reader::Event e = r.Next(in);
    ASSERT_EQ(e.kind, Kind::kMessage);
    EXPECT_EQ(e.payload, "assembled payload");
    EXPECT_TRUE(e.payload.data() < second.data() || e.payload.data() >= second.data() + second.size());
  }
  {
    // Fragments, all in one read: assembled too.
    Reader r(1024);
    const std::string input = Text("frag", false) + Cont("ments");
    std::string_view in = input;
    const Reader::Event e = r.Next(in);
    ASSERT_EQ(e.kind, Kind::kMessage);
    EXPECT_EQ(e.payload, "fragments");
    EXPECT_TRUE(e.payload.data() < input.data() || e.payload.data() >= input.data() + input.size());
  }
}

TEST(WsReader, ZeroLengthMessagesAndControlFrames) {
  ExpectEvents(Text("") + Binary("") + Ping("") + Pong("") + Text("", false) + Cont("") + Close(""),
               {Message(""), BinaryMessage(""), PingEvent(""), PongEvent(""), Message(""), CloseEvent(1005)});
  // An empty read before, between and after.
  Reader r(16);
  std::string_view empty;
  EXPECT_EQ(r.Next(empty).kind, Kind::kNeedMore);
  EXPECT_FALSE(r.mid_message());
  EXPECT_EQ(Drive(r, {"", Text(""), "", Binary("x"), ""}),
            (std::vector<Got>{Message(""), BinaryMessage("x")}));
  EXPECT_EQ(r.Next(empty).kind, Kind::kNeedMore);
  // An empty read (a null data() view) in the middle of a header.
  const std::string frame = Binary(std::string(200, 'b'));
  Reader r2(1024);
  std::string_view in = std::string_view(frame).substr(0, 3);
  EXPECT_EQ(r2.Next(in).kind, Kind::kNeedMore);
  EXPECT_EQ(r2.Next(empty).kind, Kind::kNeedMore);
  EXPECT_TRUE(r2.mid_message());
  EXPECT_EQ(Drive(r2, {frame.substr(3)}), std::vector<Got>{BinaryMessage(std::string(200, 'b'))});
}

TEST(WsReader, ProtocolErrors) {
  struct Case {
    const char* what;
    std::string frames;
    uint16_t code;
  };
  std::vector<Case> cases = {
      {"masked server frame", Frame(kFin | 0x1, "hello", Len::kShortest, std::nullopt, true), 1002},
      {"masked empty frame", Frame(kFin | 0x2, "", Len::kShortest, std::nullopt, true), 1002},
      {"RSV1", Frame(kFin | 0x40 | 0x1, "x"), 1002},
      {"RSV2", Frame(kFin | 0x20 | 0x2, "x"), 1002},
      {"RSV3", Frame(kFin | 0x10 | 0x1, "x"), 1002},
      {"RSV1 on a ping", Frame(kFin | 0x40 | 0x9, ""), 1002},
      {"RSV on a continuation", Text("a", false) + Frame(kFin | 0x40, "b"), 1002},
      {"continuation without a start", Cont("a"), 1002},
      {"unfinished continuation without a start", Cont("a", false), 1002},
      {"text inside a fragmented text", Text("a", false) + Text("b"), 1002},
      {"binary inside a fragmented text", Text("a", false) + Binary("b"), 1002},
      {"text inside a fragmented binary", Binary("a", false) + Cont("b", false) + Text("c"), 1002},
      {"fragmented ping", Frame(0x9, "p"), 1002},
      {"fragmented pong", Frame(0xA, ""), 1002},
      {"fragmented close", Frame(0x8, Be(1000, 2)), 1002},
      {"ping of 126 bytes", Ping(std::string(126, 'p')), 1002},
      {"pong of 65536 bytes", Pong(std::string(65536, 'p')), 1002},
      {"close of 126 bytes", Close(Be(1000, 2) + std::string(124, 'r')), 1002},
      {"16-bit length 125", Frame(kFin | 0x2, std::string(125, 'b'), Len::k16), 1002},
      {"16-bit length 0", Frame(kFin | 0x2, "", Len::k16), 1002},
      {"64-bit length 65535", Frame(kFin | 0x2, std::string(65535, 'b'), Len::k64), 1002},
      {"64-bit length 126", Frame(kFin | 0x2, std::string(126, 'b'), Len::k64), 1002},
      {"64-bit length 0", Frame(kFin | 0x2, "", Len::k64), 1002},
      {"64-bit length with the top bit", Frame(kFin | 0x2, "", Len::k64, uint64_t{1} << 63), 1002},
      {"64-bit length all ones", Frame(kFin | 0x2, "", Len::k64, UINT64_MAX), 1002},
      {"close with a 1-byte payload", Close("\x03"), 1002},
      {"close reason not UTF-8", CloseCode(1000, "\xFF"), 1007},
      {"close reason truncated UTF-8", CloseCode(1000, "ok\xE2\x82"), 1007},
      {"text not UTF-8", Text("\xC0\xAF"), 1007},
      {"text a surrogate", Text("\xED\xA0\x80"), 1007},
      {"text truncated UTF-8", Text("ok\xE2\x82"), 1007},
      {"fragmented text truncated UTF-8", Text("ok", false) + Cont("\xE2\x82"), 1007},
      {"fragmented text surrogate across frames", Text("\xED", false) + Cont("\xA0\x80"), 1007},
  };
  for (int op : {0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF}) {
    cases.push_back({"reserved opcode", Frame(kFin | op, ""), 1002});
  }
  for (uint16_t code : {0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535}) {
    cases.push_back({"invalid close code", CloseCode(code, "why"), 1002});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    // A message before is delivered; nothing after is, whatever it is.
    const std::string input = Text("before") + c.frames + Text("after") + CloseCode(1000);
    ExpectEvents(input, {Message("before"), Error(c.code)}, 1 << 20, 5);
  }
  // A continuation once the message it continued is finished.
  ExpectEvents(Text("a") + Cont("b"), {Message("a"), Error(1002)});
  ExpectEvents(Binary("a", false) + Cont("b") + Cont("c", false), {BinaryMessage("ab"), Error(1002)});
}

TEST(WsReader, ErrorsAreFoundAsSoonAsTheBytesShowThem) {
  // A masked frame: from the second byte, before its length and key.
  {
    Reader r(1024);
    EXPECT_EQ(Drive(r, {Bytes({0x81, 0xFF})}), std::vector<Got>{Error(1002)});
  }
  // A length that is not the shortest: once the header is whole.
  {
    Reader r(1024);
    EXPECT_EQ(Drive(r, {Bytes({0x82, 0x7E, 0x00})}), std::vector<Got>{});
    EXPECT_EQ(Drive(r, {Bytes({0x05})}), std::vector<Got>{Error(1002)});
  }
  // Too big: from the header, before any of the payload.
  {
    Reader r(64);
    EXPECT_EQ(Drive(r, {Bytes({0x82, 65})}), std::vector<Got>{Error(1009)});
  }
  {
    Reader r(1 << 20);
    EXPECT_EQ(Drive(r, {Bytes({0x82, 0x7F, 0, 0, 1, 0, 0, 0, 0, 0})}), std::vector<Got>{Error(1009)});
  }
}

TEST(WsReader, MessagesOverTheLimit) {
  const std::string at(64, 'y'), over(65, 'z');
  ExpectEvents(Binary(at) + Text(at) + CloseCode(1000), {BinaryMessage(at), Message(at), CloseEvent(1000)},
               64);
  ExpectEvents(Binary(over) + Text("never"), {Error(1009)}, 64);
  ExpectEvents(Text(over), {Error(1009)}, 64);
  // Across fragments: the fragment that takes it over fails at its header, and none of
  // the message is delivered.
  ExpectEvents(Binary(std::string(40, 'a'), false) + Cont(std::string(24, 'b')) + Text("x"),
               {BinaryMessage(std::string(40, 'a') + std::string(24, 'b')), Message("x")}, 64);
  ExpectEvents(Binary(std::string(40, 'a'), false) + Ping("p") + Cont(std::string(25, 'b')) + Text("never"),
               {PingEvent("p"), Error(1009)}, 64);
  ExpectEvents(Text(std::string(30, 'a'), false) + Cont(std::string(30, 'b'), false) + Cont("", false) +
                   Cont(std::string(4, 'c'), false) + Cont("d"),
               {Error(1009)}, 64);
  // Control frames do not count toward the limit.
  ExpectEvents(Ping(std::string(125, 'p')) + Binary("ok"),
               {PingEvent(std::string(125, 'p')), BinaryMessage("ok")}, 8);
  // A limit of zero still lets empty messages through.
  ExpectEvents(Text("") + Binary("", false) + Cont("") + Binary("x"),
               {Message(""), BinaryMessage(""), Error(1009)}, 0);
  // The largest length a frame can state.
  ExpectEvents(Frame(kFin | 0x2, "", Len::k64, INT64_MAX) + Text("never"), {Error(1009)}, 1 << 20);
}

TEST(WsReader, BadUtf8FailsBeforeTheMessageEnds) {
  // The first fragment settles it: the rest is never needed.
  {
    Reader r(1024);
    EXPECT_EQ(Drive(r, {Text("ok \xC0", false)}), std::vector<Got>{Error(1007)});
  }
  // Part of one frame's payload is enough.
  {
    Reader r(1024);
    const std::string frame = Frame(kFin | 0x1, "", Len::kShortest, 100) + "ab\xFF";
    EXPECT_EQ(Drive(r, {frame}), std::vector<Got>{Error(1007)});
  }
  // A surrogate's second byte, in the next read.
  {
    Reader r(1024);
    const std::string frame = Frame(kFin | 0x1, "", Len::kShortest, 50) + "abc\xED";
    EXPECT_EQ(Drive(r, {frame}), std::vector<Got>{});
    EXPECT_EQ(Drive(r, {"\xA0"}), std::vector<Got>{Error(1007)});
  }
  // A character cut by a read or a fragment boundary is not an error...
  {
    Reader r(1024);
    EXPECT_EQ(Drive(r, {Text("\xF0\x9F", false), Cont("\x98", false) + Cont("\x80").substr(0, 2), "\x80"}),
              std::vector<Got>{Message("\xF0\x9F\x98\x80")});
  }
  // ... until the message ends with it unfinished.
  {
    Reader r(1024);
    EXPECT_EQ(Drive(r, {Text("\xF0\x9F", false)}), std::vector<Got>{});
    EXPECT_EQ(Drive(r, {Cont("\x98")}), std::vector<Got>{Error(1007)});
  }
  // Binary messages are not text.
  ExpectEvents(Binary("\xC0\xAF\xED\xA0\x80\xFF", false) + Cont("\xF0"),
               {BinaryMessage("\xC0\xAF\xED\xA0\x80\xFF\xF0")});
}

TEST(WsReader, CloseFrames) {
  ExpectEvents(Close(""), {CloseEvent(1005)});
  ExpectEvents(CloseCode(1000), {CloseEvent(1000)});
  ExpectEvents(CloseCode(1001, "going away"), {CloseEvent(1001, "going away")});
  ExpectEvents(CloseCode(4000, "caf\xC3\xA9"), {CloseEvent(4000, "caf\xC3\xA9")});
  ExpectEvents(CloseCode(1000, std::string(123, 'r')), {CloseEvent(1000, std::string(123, 'r'))});
  for (uint16_t code :
       {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999}) {
    ExpectEvents(CloseCode(code, "r"), {CloseEvent(code, "r")}, 1 << 20, 2);
  }
  // Between the fragments of a message, the close wins: the message was never finished.
  ExpectEvents(Text("unfinished", false) + CloseCode(1001) + Cont("never"), {CloseEvent(1001)});
}

TEST(WsReader, NothingAfterDone) {
  for (const std::string& end : {CloseCode(1000), Text("\xFF"), Frame(kFin | 0x3, "")}) {
    Reader r(1024);
    const std::string input = end + Text("never") + Ping("never");
    std::string_view in = input;
    const Reader::Event first = r.Next(in);
    EXPECT_TRUE(first.kind == Kind::kClose || first.kind == Kind::kError);
    EXPECT_TRUE(r.done());
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(r.Next(in).kind, Kind::kNeedMore);
      const std::string more = Text("more");
      std::string_view more_in = more;
      EXPECT_EQ(r.Next(more_in).kind, Kind::kNeedMore);
    }
    EXPECT_TRUE(r.done());
  }
}

TEST(WsReader, MidMessage) {
  Reader r(1024);
  EXPECT_FALSE(r.mid_message());
  const std::string frames = Text("ab", false) + Ping("") + Cont("cd");
  std::vector<Got> got;
  std::vector<bool> mid;
  for (char c : frames) {
    got = Drive(r, {std::string(1, c)});
    mid.push_back(r.mid_message());
  }
  // Mid-message from the first header byte to the last payload byte, control frame
  // between the fragments included; not after.
  for (std::size_t i = 0; i + 1 < mid.size(); ++i) EXPECT_TRUE(mid[i]) << i;
  EXPECT_FALSE(mid.back());
  EXPECT_EQ(got, std::vector<Got>{Message("abcd")});
}

TEST(WsReader, ReleaseMemoryLeavesNoCapacity) {
  const std::string big(5000, 'm');
  const std::string ping(125, 'p');
  const std::vector<std::string> input = {
      // A message assembled in the reader's buffer.
      Text(big.substr(0, 3000), false),
      Cont(big.substr(3000)),
      // One frame over two reads.
      Binary(big).substr(0, 1000),
      Binary(big).substr(1000),
      // Control frames too big for the short string buffer.
      Ping(ping),
      Pong(ping),
  };
  Reader r(1 << 20);
  const long baseline = g_live_blocks.load();
  std::size_t events = 0;
  for (std::size_t i = 0; i < input.size(); ++i) {
    std::string_view in = input[i];
    for (;;) {
      const Reader::Event e = r.Next(in);
      // Straight after an event its payload must survive the call.
      r.ReleaseMemory();
      if (e.kind == Kind::kNeedMore) break;
      ++events;
      const std::size_t size = e.kind == Kind::kMessage ? big.size() : ping.size();
      EXPECT_EQ(e.payload.size(), size);
      EXPECT_EQ(e.payload.find_first_not_of(e.payload.front()), std::string_view::npos);
    }
    // Between events (the reader asked for more), an idle reader holds nothing.
    if (!r.mid_message()) {
      EXPECT_EQ(g_live_blocks.load(), baseline) << "after input " << i;
    }
  }
  EXPECT_EQ(events, 4u);
  EXPECT_EQ(g_live_blocks.load(), baseline);
}

}  // namespace
}  // namespace wsbridge::core::ws
