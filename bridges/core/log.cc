#include "bridges/core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"

namespace wsbridge::log {
namespace {

std::atomic<int> g_level{static_cast<int>(Level::kInfo)};
std::atomic<bool> g_json{false};

absl::Mutex g_secrets_mu;
std::vector<std::string>& Secrets() ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_secrets_mu) {
  static auto* secrets = new std::vector<std::string>();
  return *secrets;
}

// Writes go through one mutex so concurrent lines never interleave.
absl::Mutex g_write_mu;

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

bool LooksSecret(std::string_view name) {
  std::string lower = absl::AsciiStrToLower(absl::string_view(name.data(), name.size()));
  for (std::string_view word : {"token", "key", "secret", "password", "auth", "signature", "credential"}) {
    if (lower.find(word) != std::string::npos) return true;
  }
  return false;
}

}  // namespace

void Configure(Level level, bool json) {
  g_level.store(static_cast<int>(level));
  g_json.store(json);
}

bool Enabled(Level level) { return static_cast<int>(level) >= g_level.load(std::memory_order_relaxed); }

void RegisterSecret(std::string_view secret) {
  // Very short values would redact ordinary text; they are not credentials anyway.
  if (secret.size() < 4) return;
  absl::MutexLock lock(&g_secrets_mu);
  for (const auto& s : Secrets()) {
    if (s == secret) return;
  }
  Secrets().emplace_back(secret);
}

std::string Redact(std::string_view text) {
  std::string out(text);
  absl::MutexLock lock(&g_secrets_mu);
  for (const auto& s : Secrets()) {
    if (out.find(s) != std::string::npos) {
      absl::StrReplaceAll({{s, absl::string_view(kRedacted.data(), kRedacted.size())}}, &out);
    }
  }
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
    if (eq != std::string_view::npos && LooksSecret(pair.substr(0, eq))) {
      out.append(pair.substr(0, eq + 1));
      out.append(kRedacted);
    } else {
      out.append(pair);
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  out.append(fragment);
  return Redact(out);
}

void Write(Level level, std::string_view component, std::string_view message,
           std::initializer_list<Field> fields) {
  if (!Enabled(level)) return;
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
  absl::MutexLock lock(&g_write_mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace wsbridge::log
