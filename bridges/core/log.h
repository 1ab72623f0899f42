// Structured logging: plain text or JSON lines, with secrets redacted.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>

namespace wsbridge::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

struct Field {
  std::string_view key;
  std::string value;
};

// Thread-safe. Set once at start-up, before threads start logging.
void Configure(Level level, bool json);
bool Enabled(Level level);

// Registers a credential value so that every later log line containing it shows
// "[redacted]" instead. Secrets are resolved through the config loader, which calls it.
void RegisterSecret(std::string_view secret);
// Applies the registered-secret redaction to `text` (used for error messages too).
std::string Redact(std::string_view text);
// `url` with the values of its query parameters replaced by "[redacted]" when their
// names look like credentials (token, key, secret, password, auth, signature).
std::string RedactUrl(std::string_view url);

// One log line: `component` says who logs ("dfx", "server", ...).
void Write(Level level, std::string_view component, std::string_view message,
           std::initializer_list<Field> fields = {});

inline void Debug(std::string_view c, std::string_view m, std::initializer_list<Field> f = {}) {
  if (Enabled(Level::kDebug)) Write(Level::kDebug, c, m, f);
}
inline void Info(std::string_view c, std::string_view m, std::initializer_list<Field> f = {}) {
  if (Enabled(Level::kInfo)) Write(Level::kInfo, c, m, f);
}
inline void Warn(std::string_view c, std::string_view m, std::initializer_list<Field> f = {}) {
  if (Enabled(Level::kWarn)) Write(Level::kWarn, c, m, f);
}
inline void Error(std::string_view c, std::string_view m, std::initializer_list<Field> f = {}) {
  Write(Level::kError, c, m, f);
}

}  // namespace wsbridge::log
