#include "bridges/core/log.h"

#include <atomic>
#include <bitset>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"

namespace wsbridge::log {
namespace {

std::atomic<int> g_level{static_cast<int>(Level::kInfo)};
std::atomic<bool> g_json{false};

// The registered secrets, each with the number of registrations holding it, indexed by
// their first four bytes: redacting a line then costs a bit test per byte of the line
// (and a lookup where the test passes), not a search per secret. Per-call credentials
// make thousands of secrets, registered while their sessions live.
struct SecretSet {
  absl::node_hash_map<std::string, size_t> holders;  // node map: the index points into it
  absl::flat_hash_map<uint32_t, std::vector<const std::string*>> by_head;
  std::bitset<65536> first_two;  // the first two bytes of some secret
  absl::flat_hash_map<uint16_t, uint32_t> with_first_two;  // how many secrets start so
};

absl::Mutex g_secrets_mu;
SecretSet& Secrets() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_secrets_mu) {
  static auto* secrets = new SecretSet();
  return *secrets;
}

uint32_t Head4(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint16_t Head2(const char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Very short values would redact ordinary text; they are not credentials anyway.
constexpr size_t kMinSecret = 4;

const std::string* AddSecret(std::string_view secret) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_secrets_mu) {
  SecretSet& set = Secrets();
  auto [it, added] = set.holders.try_emplace(std::string(secret), 0);
  ++it->second;
  if (added) {
    set.by_head[Head4(it->first.data())].push_back(&it->first);
    const uint16_t two = Head2(it->first.data());
    ++set.with_first_two[two];
    set.first_two.set(two);
  }
  return &it->first;
}

void DropSecret(const std::string* secret) ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_secrets_mu) {
  SecretSet& set = Secrets();
  auto it = set.holders.find(*secret);
  if (it == set.holders.end() || --it->second > 0) return;
  const uint32_t head = Head4(secret->data());
  auto& same_head = set.by_head[head];
  std::erase(same_head, &it->first);
  if (same_head.empty()) set.by_head.erase(head);
  const uint16_t two = Head2(secret->data());
  if (--set.with_first_two[two] == 0) {
    set.with_first_two.erase(two);
    set.first_two.reset(two);
  }
  set.holders.erase(it);
}

// Writes go through one mutex so concurrent lines never interleave.
absl::Mutex g_write_mu;
std::function<void(std::string_view)> g_observer ABSL_GUARDED_BY(g_write_mu);

// Repeat summarising (SetRepeatLimit). Keyed by level, component and message.
struct Repeat {
  Level level;
  std::string component;
  std::string message;
  std::chrono::steady_clock::time_point window_start;
  size_t written = 0;
  size_t suppressed = 0;
};
// Distinct messages tracked at once; past this, new ones are written unlimited (log
// messages are constant strings, so the real number is in the hundreds).
constexpr size_t kMaxRepeatKeys = 4096;
constexpr std::chrono::seconds kRepeatSweepInterval{1};
absl::Mutex g_repeat_mu;
size_t g_repeat_burst ABSL_GUARDED_BY(g_repeat_mu) = 0;
std::chrono::steady_clock::duration g_repeat_window ABSL_GUARDED_BY(g_repeat_mu){};
std::chrono::steady_clock::time_point g_next_sweep ABSL_GUARDED_BY(g_repeat_mu){};
std::unordered_map<std::string, Repeat>& Repeats() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_repeat_mu) {
  static auto* repeats = new std::unordered_map<std::string, Repeat>();
  return *repeats;
}

constexpr std::string_view kRedacted = "[redacted]";

std::string_view LevelName(Level level) {
  switch (level) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warn";
    case Level::kError: return "error";
  }
  return "info";
}

void AppendJsonString(std::string& out, std::string_view s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

// Plain values with spaces or quotes are quoted so lines stay parseable as key=value.
void AppendPlainValue(std::string& out, std::string_view s) {
  bool quote = s.empty();
  for (char c : s) {
    if (c == ' ' || c == '"' || c == '=' || c == '\n') { quote = true; break; }
  }
  if (quote) {
    AppendJsonString(out, s);
  } else {
    out.append(s);
  }
}

std::string Timestamp() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm;
  gmtime_r(&t, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return buf;
}

// Query parameter names whose values are shown in logs and errors; every other value is
// redacted. Kept short on purpose: a name is only added when it can never hold a
// credential.
bool KnownHarmless(std::string_view name) {
  std::string lower = absl::AsciiStrToLower(absl::string_view(name.data(), name.size()));
  for (std::string_view harmless : {"v", "version", "format", "encoding", "lang", "language",
                                    "languagecode", "locale", "conversationid"}) {
    if (lower == harmless) return true;
  }
  return false;
}

std::string FormatLine(Level level, std::string_view component, std::string_view message,
                       std::initializer_list<Field> fields) {
  std::string line;
  line.reserve(128);
  if (g_json.load(std::memory_order_relaxed)) {
    line += "{\"ts\":";
    AppendJsonString(line, Timestamp());
    line += ",\"level\":";
    AppendJsonString(line, LevelName(level));
    line += ",\"component\":";
    AppendJsonString(line, component);
    line += ",\"msg\":";
    AppendJsonString(line, message);
    for (const auto& f : fields) {
      line.push_back(',');
      AppendJsonString(line, f.key);
      line.push_back(':');
      AppendJsonString(line, f.value);
    }
    line += "}";
  } else {
    line += Timestamp();
    line.push_back(' ');
    std::string_view name = LevelName(level);
    line += absl::AsciiStrToUpper(absl::string_view(name.data(), name.size()));
    line.push_back(' ');
    line.append(component);
    line += ": ";
    line.append(message);
    for (const auto& f : fields) {
      line.push_back(' ');
      line.append(f.key);
      line.push_back('=');
      AppendPlainValue(line, f.value);
    }
  }
  line = Redact(line);
  line.push_back('\n');
  return line;
}

std::string SummaryLine(const Repeat& r) {
  return FormatLine(r.level, r.component,
                    std::string("suppressed ") + std::to_string(r.suppressed) +
                        " similar lines: " + r.message,
                    {{"suppressed", std::to_string(r.suppressed)}});
}

// Appends the summaries of windows that have ended and forgets them.
void SweepEndedRepeats(std::chrono::steady_clock::time_point now,
                       std::vector<std::string>& summaries)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_repeat_mu) {
  g_next_sweep = now + kRepeatSweepInterval;
  auto& repeats = Repeats();
  for (auto it = repeats.begin(); it != repeats.end();) {
    if (now - it->second.window_start < g_repeat_window) {
      ++it;
      continue;
    }
    if (it->second.suppressed > 0) summaries.push_back(SummaryLine(it->second));
    it = repeats.erase(it);
  }
}

// Whether this line is written; appends summaries of windows that have ended to
// `summaries` (written before the line).
bool AdmitRepeat(Level level, std::string_view component, std::string_view message,
                 std::vector<std::string>& summaries) {
  absl::MutexLock lock(&g_repeat_mu);
  if (g_repeat_burst == 0) return true;
  const auto now = std::chrono::steady_clock::now();
  auto& repeats = Repeats();
  if (now >= g_next_sweep) SweepEndedRepeats(now, summaries);
  std::string key;
  key.reserve(component.size() + message.size() + 3);
  key.push_back(static_cast<char>('0' + static_cast<int>(level)));
  key.append(component);
  key.push_back('\0');
  key.append(message);
  auto it = repeats.find(key);
  if (it == repeats.end()) {
    if (repeats.size() < kMaxRepeatKeys) {
      repeats.emplace(std::move(key), Repeat{level, std::string(component), std::string(message),
                                             now, 1, 0});
    }
    return true;
  }
  Repeat& r = it->second;
  if (now - r.window_start >= g_repeat_window) {
    if (r.suppressed > 0) summaries.push_back(SummaryLine(r));
    r.window_start = now;
    r.written = 1;
    r.suppressed = 0;
    return true;
  }
  if (r.written < g_repeat_burst) {
    ++r.written;
    return true;
  }
  ++r.suppressed;
  return false;
}

}  // namespace

void SetRepeatLimit(size_t burst, double window_seconds) {
  absl::MutexLock lock(&g_repeat_mu);
  g_repeat_burst = burst;
  g_repeat_window = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(window_seconds));
  g_next_sweep = std::chrono::steady_clock::now() + kRepeatSweepInterval;
  Repeats().clear();
}

void Configure(Level level, bool json) {
  g_level.store(static_cast<int>(level));
  g_json.store(json);
}

bool Enabled(Level level) { return static_cast<int>(level) >= g_level.load(std::memory_order_relaxed); }

void RegisterSecret(std::string_view secret) {
  if (secret.size() < kMinSecret) return;
  absl::MutexLock lock(&g_secrets_mu);
  AddSecret(secret);
}

std::shared_ptr<const void> RegisterSecretWhileHeld(std::string_view secret) {
  if (secret.size() < kMinSecret) return nullptr;
  absl::MutexLock lock(&g_secrets_mu);
  const std::string* held = AddSecret(secret);
  return std::shared_ptr<const void>(nullptr, [held](const void*) {
    absl::MutexLock lock(&g_secrets_mu);
    DropSecret(held);
  });
}

size_t RegisteredSecrets() {
  absl::MutexLock lock(&g_secrets_mu);
  return Secrets().holders.size();
}

std::string Redact(std::string_view text) {
  absl::MutexLock lock(&g_secrets_mu);
  const SecretSet& set = Secrets();
  if (set.holders.empty()) return std::string(text);
  std::string out;
  size_t copied = 0;  // text[0, copied) is in `out`
  size_t i = 0;
  while (i + kMinSecret <= text.size()) {
    const std::string* longest = nullptr;
    if (set.first_two.test(Head2(text.data() + i))) {
      auto it = set.by_head.find(Head4(text.data() + i));
      if (it != set.by_head.end()) {
        for (const std::string* s : it->second) {
          if ((longest == nullptr || s->size() > longest->size()) &&
              text.substr(i).starts_with(*s)) {
            longest = s;
          }
        }
      }
    }
    if (longest == nullptr) {
      ++i;
      continue;
    }
    out.append(text.substr(copied, i - copied));
    out.append(kRedacted);
    i += longest->size();
    copied = i;
  }
  if (copied == 0) return std::string(text);
  out.append(text.substr(copied));
  return out;
}

std::string RedactUrl(std::string_view url) {
  size_t q = url.find('?');
  if (q == std::string_view::npos) return Redact(url);
  size_t end = url.find('#', q);
  std::string_view fragment = end == std::string_view::npos ? std::string_view() : url.substr(end);
  std::string_view query = url.substr(q + 1, (end == std::string_view::npos ? url.size() : end) - q - 1);
  std::string out(url.substr(0, q + 1));
  bool first = true;
  while (true) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    if (!first) out.push_back('&');
    first = false;
    size_t eq = pair.find('=');
    if (eq != std::string_view::npos && !KnownHarmless(pair.substr(0, eq))) {
      out.append(pair.substr(0, eq + 1));
      out.append(kRedacted);
    } else if (eq == std::string_view::npos && !pair.empty() && !KnownHarmless(pair)) {
      out.append(kRedacted);  // a bare value ("?<token>") may be the credential itself
    } else {
      out.append(pair);
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  out.append(fragment);
  return Redact(out);
}

namespace {

// Summaries first, then the line, in one write.
void WriteLocked(const std::vector<std::string>& summaries, const std::string& line)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_write_mu) {
  std::string out;
  for (const auto& summary : summaries) out += summary;
  out += line;
  if (out.empty()) return;
  std::fwrite(out.data(), 1, out.size(), stderr);
  if (g_observer) g_observer(out);
}

}  // namespace

void Write(Level level, std::string_view component, std::string_view message,
           std::initializer_list<Field> fields) {
  if (!Enabled(level)) return;
  std::vector<std::string> summaries;
  // Under the write lock from the decision to the write: a window's summary is always
  // written before any line of the next window of the same message.
  absl::MutexLock lock(&g_write_mu);
  const bool admitted = AdmitRepeat(level, component, message, summaries);
  if (!admitted && summaries.empty()) return;
  WriteLocked(summaries, admitted ? FormatLine(level, component, message, fields) : "");
}

void WriteEndedRepeats() {
  std::vector<std::string> summaries;
  absl::MutexLock lock(&g_write_mu);
  {
    absl::MutexLock repeat_lock(&g_repeat_mu);
    if (g_repeat_burst == 0) return;
    SweepEndedRepeats(std::chrono::steady_clock::now(), summaries);
  }
  WriteLocked(summaries, "");
}

void FlushRepeats() {
  std::vector<std::string> summaries;
  absl::MutexLock lock(&g_write_mu);
  {
    absl::MutexLock repeat_lock(&g_repeat_mu);
    for (auto& [key, r] : Repeats()) {
      if (r.suppressed == 0) continue;
      summaries.push_back(SummaryLine(r));
      r.suppressed = 0;  // the window goes on: its later lines are still limited
    }
  }
  WriteLocked(summaries, "");
}

void SetObserver(std::function<void(std::string_view line)> observer) {
  absl::MutexLock lock(&g_write_mu);
  g_observer = std::move(observer);
}

}  // namespace wsbridge::log
