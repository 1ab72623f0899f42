// Structured logging: plain text or JSON lines, with secrets redacted.
#pragma once

#include <cstddef>
#include <functional>
#include <initializer_list>
#include <memory>
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

// Summarises repeats: of the lines with the same level, component and message, the
// first `burst` in each `window_seconds` are written; the rest are counted and, once
// the window is over, written as one line "suppressed N similar lines: <message>"
// (with the next line of any kind, or by WriteEndedRepeats / FlushRepeats). Fields (session ids, errors) do not make lines different, so 1,000
// sessions reconnecting in a storm log `burst` lines and a count. burst 0 (the
// library's default) turns it off; wsbridged turns it on at start-up.
void SetRepeatLimit(size_t burst, double window_seconds);
// Writes the summaries of windows that have ended now, without waiting for the next
// line (wsbridged calls it once a second, so a storm that stops is still counted soon).
void WriteEndedRepeats();
// Writes the counts suppressed so far, windows ended or not (at exit, so that the last
// stretch of a storm is counted too).
void FlushRepeats();

// Registers a credential value so that every later log line containing it shows
// "[redacted]" instead. Secrets are resolved through the config loader, which calls it.
void RegisterSecret(std::string_view secret);
// The same, for as long as the returned handle (or a copy) is held: for credentials that
// come and go (a per-call token, with its session), so that the registered set stays
// as large as what is in use. Null for values too short to redact.
std::shared_ptr<const void> RegisterSecretWhileHeld(std::string_view secret);
// How many distinct secrets are registered now.
size_t RegisteredSecrets();
// Applies the registered-secret redaction to `text` (used for error messages too): every
// occurrence of a secret, the longest where several start at one place.
std::string Redact(std::string_view text);
// `url` with the value of every query parameter replaced by "[redacted]", except for a
// short list of names known to carry no credential (v, version, format, encoding, lang,
// language, languageCode, locale, conversationId; any case). Signed URLs put
// credentials under any name (sig, X-Amz-Signature, st, ...), so nothing else is shown.
std::string RedactUrl(std::string_view url);

// Also hands every line written from now on (formatted, redacted, with its newline) to
// `observer`, on the logging thread, one at a time; null stops it. For tests that
// check what the daemon logs (e.g. that no secret ever appears).
void SetObserver(std::function<void(std::string_view line)> observer);

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
