// A real reconnect storm through the real wsbridged process, and what it writes to
// stderr. The daemon summarises repeated log lines (daemon.cc: log::SetRepeatLimit with
// a burst of 20 per 10 s window; docs/operations.md § Logs, "Repeats are summarised"):
// of the lines with the same level, component and message, the first 20 of each window
// are written, the rest counted and written as one "suppressed N similar lines: <msg>"
// line once the window is over (and what is still held back, at exit). Here the
// wsbridged binary runs as a child process with a YAML config (its stderr in a file, its
// stdout on a pipe), one DFX bridge whose upstream (the DFX emulator behind the fault
// proxy) resets every connection of a dozen sessions for as long as the first window
// takes to end.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/bridge_base.h"
#include "bridges/dfx/dfx_bridge.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/child_process.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using wsbridge::testing::ChildProcess;
using wsbridge::testing::TempDir;
using wsbridge::testing::WaitFor;

// What daemon.cc sets (kLogRepeatBurst, kLogRepeatWindowSeconds), as documented.
constexpr size_t kBurst = 20;
constexpr auto kWindow = 10s;
constexpr std::string_view kSummaryPrefix = "suppressed ";
constexpr std::string_view kSummaryInfix = " similar lines: ";
// The connection's lines for each failed attempt (bridges/core/connection.cc).
constexpr std::string_view kScheduled = "upstream reconnect scheduled";
constexpr std::string_view kAttemptFailed = "upstream connection attempt failed";

// One line of the daemon's JSON log (log.format: json): a flat object of strings.
struct LogLine {
  std::string level, component, msg;
  std::map<std::string, std::string> fields;
};

// Reads one JSON string at `i` (at its opening quote); escapes are decoded, \uXXXX kept.
std::optional<std::string> JsonString(std::string_view s, size_t& i) {
  if (i >= s.size() || s[i] != '"') return std::nullopt;
  std::string out;
  for (++i; i < s.size(); ++i) {
    char c = s[i];
    if (c == '"') {
      ++i;
      return out;
    }
    if (c == '\\' && i + 1 < s.size()) {
      c = s[++i];
      switch (c) {
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': out += "\\u"; break;
        default: out.push_back(c);
      }
      continue;
    }
    out.push_back(c);
  }
  return std::nullopt;
}

std::optional<LogLine> ParseLogLine(std::string_view s) {
  if (s.empty() || s[0] != '{') return std::nullopt;
  LogLine line;
  size_t i = 1;
  while (i < s.size() && s[i] != '}') {
    auto key = JsonString(s, i);
    if (!key || i >= s.size() || s[i] != ':') return std::nullopt;
    ++i;
    auto value = JsonString(s, i);
    if (!value) return std::nullopt;
    if (*key == "level") line.level = *value;
    else if (*key == "component") line.component = *value;
    else if (*key == "msg") line.msg = *value;
    else line.fields[*key] = *value;
    if (i < s.size() && s[i] == ',') ++i;
  }
  if (i >= s.size() || line.msg.empty()) return std::nullopt;
  return line;
}

// A summary line's count and the message it counts ("suppressed N similar lines: <msg>").
std::optional<std::pair<uint64_t, std::string>> Summary(const LogLine& line) {
  std::string_view m = line.msg;
  if (!m.starts_with(kSummaryPrefix)) return std::nullopt;
  m.remove_prefix(kSummaryPrefix.size());
  const size_t infix = m.find(kSummaryInfix);
  uint64_t n = 0;
  if (infix == std::string_view::npos || !absl::SimpleAtoi(std::string(m.substr(0, infix)), &n)) return std::nullopt;
  return std::make_pair(n, std::string(m.substr(infix + kSummaryInfix.size())));
}

// A line's "ts" ("2026-12-01T15:00:00.123Z") in milliseconds since the epoch.
std::optional<int64_t> TimestampMs(const LogLine& line) {
  auto it = line.fields.find("ts");
  if (it == line.fields.end()) return std::nullopt;
  std::tm tm{};
  int ms = 0;
  if (std::sscanf(it->second.c_str(), "%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                  &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7) {
    return std::nullopt;
  }
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return static_cast<int64_t>(timegm(&tm)) * 1000 + ms;
}

// The daemon's stderr file, read as it grows: whole lines only.
class StderrTail {
 public:
  explicit StderrTail(std::string path) : path_(std::move(path)) {}
  ~StderrTail() {
    if (fd_ >= 0) close(fd_);
  }
  StderrTail(const StderrTail&) = delete;
  StderrTail& operator=(const StderrTail&) = delete;

  // Reads what was appended since the last call.
  void Poll() {
    if (fd_ < 0) fd_ = open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return;
    char buf[16 * 1024];
    for (ssize_t n; (n = read(fd_, buf, sizeof buf)) > 0;) partial_.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
      lines_.push_back(partial_.substr(start, nl - start));
    }
    partial_.erase(0, start);
  }
  const std::vector<std::string>& lines() const { return lines_; }
  const std::string& partial() const { return partial_; }

 private:
  std::string path_;
  int fd_ = -1;
  std::string partial_;
  std::vector<std::string> lines_;
};

// The key the daemon summarises by.
std::string Key(const LogLine& l) { return absl::StrCat(l.level, " ", l.component, ": ", l.msg); }

// A dozen DFX sessions (the configured token and 12 per-call ones) whose upstream resets
// every connection, reconnecting every 2-40 ms each, for the daemon's whole first log
// window: thousands of attempts at the proxy, while the daemon's stderr carries exactly
// 20 of each reconnect line in that window, then one summary with the count of the rest;
// no message over 20 lines in any window; no token anywhere.
TEST(ReconnectLogTest, AReconnectStormThroughTheRealDaemonLogsABurstAndACount) {
  constexpr int kCallers = 12;
  const std::string kDefaultToken = "rl-s3cr3t-default-token";
  auto caller_token = [](int i) { return absl::StrCat("rl-s3cr3t-caller-", i); };

  emulator::DfxEmulator emu(emulator::DfxEmulatorOptions{});
  ASSERT_TRUE(emu.Start().ok());
  FaultProxy proxy(emu.port());
  ASSERT_TRUE(proxy.Start().ok());

  TempDir dir;
  // The daemon's own config file, as an operator writes it; backoff as in the soak
  // (2 ms doubling to 40 ms, full jitter) so that the attempts are many.
  const std::string config = dir.WriteFile(
      "wsbridged.yaml",
      absl::StrCat("server:\n"
                   "  listen: \"127.0.0.1:0\"\n"
                   "log:\n"
                   "  format: json\n"
                   "  level: info\n"
                   "shutdown:\n"
                   "  drain_timeout: 100ms\n"
                   "  deadline: 10s\n"
                   "bridges:\n"
                   "  - name: dfx\n"
                   "    dfx:\n"
                   "      upstream:\n"
                   "        url: ws://127.0.0.1:", proxy.port(), "\n"
                   "        allow_plaintext: true\n"
                   "        backoff:\n"
                   "          initial: 2ms\n"
                   "          max: 40ms\n"
                   "          multiplier: 2\n"
                   "      device_token:\n"
                   "        value: ", kDefaultToken, "\n"
                   "      allow_call_token: true\n"));
  const std::string stderr_path = dir.path() + "/stderr.log";

  const auto spawned_at = Clock::now();
  // stdout on a pipe (its "listening" line), stderr in the file.
  ChildProcess daemon(WSBRIDGED_PATH, {"--config", config}, {.stderr_path = stderr_path});
  ASSERT_TRUE(daemon.spawned()) << WSBRIDGED_PATH;
  StderrTail log(stderr_path);
  auto dump = [&] {
    log.Poll();
    std::string all;
    for (const auto& l : log.lines()) absl::StrAppend(&all, l, "\n");
    return absl::StrCat(all, log.partial());
  };
  // {"event":"listening","grpc":"127.0.0.1:PORT",...}
  std::string grpc_address;
  while (auto line = daemon.ReadLine(60s)) {
    constexpr std::string_view kGrpc = "\"grpc\":\"";
    if (size_t at = line->find(kGrpc); at != std::string::npos) {
      at += kGrpc.size();
      grpc_address = line->substr(at, line->find('"', at) - at);
      break;
    }
  }
  ASSERT_FALSE(grpc_address.empty()) << "no listening line; stderr:\n" << dump();

  // The sessions: the configured one, and one per caller's token (each call waits for
  // its session's login).
  auto stub = dfx::v1::DfxService::NewStub(grpc::CreateChannel(grpc_address, grpc::InsecureChannelCredentials()));
  for (int i = 0; i < kCallers; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 30s);
    ctx.AddMetadata(std::string(dfx::kDeviceTokenMetadata), caller_token(i));
    ctx.AddMetadata(std::string(core::kWaitForReadyMetadata), "true");
    dfx::v1::CallRequest req;
    req.set_action_id("0100");
    dfx::v1::CallResponse resp;
    grpc::Status st = stub->Call(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << i << ": " << st.error_message();
  }
  constexpr uint64_t kSessions = kCallers + 1;
  ASSERT_TRUE(WaitFor([&] { return proxy.counters().connections_open == kSessions; }, 30s))
      << proxy.counters().connections_open << " upstream connections open, want " << kSessions;

  // The storm: every connection reset, the open ones at once and every new one on arrival.
  const uint64_t accepted_before = proxy.counters().connections_accepted;
  const auto storm_started = Clock::now();
  proxy.SetMode(Direction::kUpstreamToClient, Mode::kReset);

  // Until the first window of both reconnect lines has ended and been summarised (10 s
  // after the storm's first line; summaries go out with the next line written).
  std::map<std::string, std::pair<uint64_t, uint64_t>> first_summary;  // msg -> (count, accepted)
  size_t scanned = 0;
  const bool summarised = WaitFor(
      [&] {
        log.Poll();
        for (; scanned < log.lines().size(); ++scanned) {
          auto line = ParseLogLine(log.lines()[scanned]);
          if (!line || line->component != "connection") continue;
          auto summary = Summary(*line);
          if (summary && !first_summary.contains(summary->second)) {
            first_summary[summary->second] = {summary->first, proxy.counters().connections_accepted};
          }
        }
        return first_summary.contains(std::string(kScheduled)) &&
               first_summary.contains(std::string(kAttemptFailed));
      },
      120s);
  const uint64_t attempts = proxy.counters().connections_accepted - accepted_before;
  const auto storm_ended = Clock::now();
  ASSERT_TRUE(summarised) << attempts << " attempts; stderr:\n" << dump();

  daemon.Signal(SIGTERM);
  const std::optional<int> status = daemon.WaitExit(60s);
  const auto exited = Clock::now();
  ASSERT_TRUE(status.has_value()) << "wsbridged did not exit after SIGTERM";
  while (daemon.ReadLine(10s)) {
  }
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status << "\n" << dump();
  log.Poll();
  // Every connection the storm made, to the end (the daemon has exited).
  const uint64_t all_attempts = proxy.counters().connections_accepted - accepted_before;

  // The daemon's windows each start with a written line and last 10 s, so over its
  // whole life (an upper bound: spawn to exit, on our clock) a message has at most
  // this many windows.
  const auto lifetime = exited - spawned_at;
  const uint64_t windows = static_cast<uint64_t>(lifetime / kWindow) + 1;

  struct PerKey {
    uint64_t written = 0;             // lines of the message itself
    uint64_t before_first_summary = 0;  // of those, written before its first summary
    std::optional<int64_t> first_ms;  // the first line's timestamp
    uint64_t first_seconds = 0;  // lines stamped within 5 s of the first: its first window's
    uint64_t summaries = 0;
    uint64_t suppressed = 0;  // sum of the summaries' counts
  };
  std::map<std::string, PerKey> keys;
  std::vector<std::string> other;  // stderr lines that are no log line (none expected)
  uint64_t log_lines = 0;
  for (const auto& text : log.lines()) {
    auto line = ParseLogLine(text);
    if (!line) {
      other.push_back(text);
      continue;
    }
    ++log_lines;
    if (auto summary = Summary(*line)) {
      LogLine counted = *line;
      counted.msg = summary->second;
      PerKey& k = keys[Key(counted)];
      ++k.summaries;
      k.suppressed += summary->first;
      EXPECT_GE(summary->first, 1u) << text;
      EXPECT_EQ(line->fields["suppressed"], absl::StrCat(summary->first)) << text;
      continue;
    }
    PerKey& k = keys[Key(*line)];
    ++k.written;
    if (k.summaries == 0) ++k.before_first_summary;
    const std::optional<int64_t> at = TimestampMs(*line);
    EXPECT_TRUE(at.has_value()) << text;
    if (!k.first_ms) k.first_ms = at;
    if (at && *at - *k.first_ms < 5000) ++k.first_seconds;
  }

  // Many attempts were made...
  EXPECT_GE(attempts, 100u) << "the storm was too small to show anything";
  // ...and every message, the reconnect lines included, stayed within 20 per window,
  // with at most one summary per window and one more at exit (log::FlushRepeats).
  for (const auto& [key, k] : keys) {
    EXPECT_LE(k.written, kBurst * windows) << key << " (" << windows << " windows at most)";
    EXPECT_LE(k.summaries, windows + 1) << key;
  }
  for (std::string_view msg : {kScheduled, kAttemptFailed}) {
    const std::string key = absl::StrCat(msg == kScheduled ? "info" : "warn", " connection: ", std::string(msg));
    ASSERT_TRUE(keys.contains(key)) << key;
    const PerKey& k = keys[key];
    // The first window: exactly the burst written (the storm made far more than 20 in
    // it, the first 20 within a second or so), then the summary of the rest, before any
    // line of the next window.
    EXPECT_EQ(k.first_seconds, kBurst) << key;
    EXPECT_EQ(k.before_first_summary, kBurst) << key;
    // Nothing goes uncounted, the last window's lines included (counted at exit): one
    // line, written or counted, per connection the storm ended, but for the sessions'
    // first connections and an attempt per session cut short by the shutdown.
    EXPECT_GE(k.written + k.suppressed + 2 * kSessions, all_attempts) << key;
    EXPECT_LE(k.written + k.suppressed, all_attempts + kSessions) << key;
    const auto [count, accepted_then] = first_summary[std::string(msg)];
    // Far more than the burst were counted (thousands are made in 10 s).
    EXPECT_GE(count, 100u) << key;
    // Each counted line stands for a connection that ended (the sessions' own at the
    // reset, then failed attempts): no more than the proxy had accepted by then.
    EXPECT_LE(kBurst + count, accepted_then - accepted_before + kSessions) << key;
    std::printf("[reconnect log] %s: %llu written (%llu in the first window, %llu before its "
                "summary), %llu summaries counting %llu, the first %llu; %llu attempts in all\n",
                key.c_str(), static_cast<unsigned long long>(k.written),
                static_cast<unsigned long long>(k.first_seconds),
                static_cast<unsigned long long>(k.before_first_summary),
                static_cast<unsigned long long>(k.summaries),
                static_cast<unsigned long long>(k.suppressed), static_cast<unsigned long long>(count),
                static_cast<unsigned long long>(all_attempts));
  }

  // No credential anywhere in what the daemon wrote.
  std::vector<std::string> secrets = {kDefaultToken, "s3cr3t"};
  for (int i = 0; i < kCallers; ++i) secrets.push_back(caller_token(i));
  for (const std::string& secret : secrets) {
    for (const auto& text : log.lines()) {
      EXPECT_FALSE(absl::StrContains(text, secret)) << "stderr shows a secret (" << text.size() << " bytes)";
    }
    EXPECT_FALSE(absl::StrContains(log.partial(), secret)) << "stderr shows a secret";
    EXPECT_FALSE(absl::StrContains(daemon.stdout_text(), secret)) << "stdout shows a secret";
  }
  EXPECT_TRUE(other.empty()) << other.size() << " stderr lines are no log line, the first: "
                             << (other.empty() ? "" : other.front());

  const auto ms = [](auto d) { return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()); };
  std::printf("[reconnect log] %llu sessions, %llu upstream attempts in %lld ms of storm; the daemon "
              "wrote %llu log lines (%zu distinct messages) in %lld ms, %llu windows at most\n",
              static_cast<unsigned long long>(kSessions), static_cast<unsigned long long>(attempts),
              ms(storm_ended - storm_started), static_cast<unsigned long long>(log_lines), keys.size(),
              ms(lifetime), static_cast<unsigned long long>(windows));
  RecordProperty("attempts", static_cast<int>(attempts));
  RecordProperty("log_lines", static_cast<int>(log_lines));
}

}  // namespace
}  // namespace wsbridge::faults
