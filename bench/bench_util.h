// Small pieces wsbridge-bench is built from: latency summaries, child processes and
// their /proc accounting, and the machine description printed with every result.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace wsbridge::bench {

using Clock = std::chrono::steady_clock;

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// Percentiles (nearest rank) of latency samples in nanoseconds.
struct Latency {
  double p50_us = 0, p99_us = 0, p999_us = 0, mean_us = 0;
  size_t samples = 0;
};
Latency Summarize(std::vector<int64_t> samples_ns);
// Median of each field over repeated runs.
Latency MedianOf(const std::vector<Latency>& runs);
double Median(std::vector<double> v);

// A child process with its stdout on a pipe.
class Child {
 public:
  Child() = default;
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  // argv[0] is the executable path. `env` entries ("K=V") are added to ours.
  // `stderr_file`: where its stderr goes ("" = inherit ours).
  absl::Status Spawn(const std::vector<std::string>& argv,
                     const std::vector<std::string>& env = {},
                     const std::string& stderr_file = "");
  // Next stdout line containing `needle`, waiting at most `timeout`.
  absl::StatusOr<std::string> WaitForLine(const std::string& needle,
                                          std::chrono::milliseconds timeout);
  // SIGTERM, then SIGKILL if it has not exited within `grace`.
  void Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(5000));
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buffer_;
};

// SIGKILLs every child still running (for fatal errors: no orphans left behind).
void KillAllChildren();

// utime + stime of a process, in seconds.
double ProcessCpuSeconds(pid_t pid);
// Context switches (voluntary + involuntary) summed over all threads of a process.
int64_t ProcessContextSwitches(pid_t pid);
// Threads of a process.
int ProcessThreads(pid_t pid);
// Resident set size of a process, in KiB.
int64_t ProcessRssKiB(pid_t pid);
// This process's CPU (user + system), in seconds.
double SelfCpuSeconds();

struct Machine {
  std::string cpu_model, kernel, compiler, build_type;
  int cores = 0;
  int64_t mem_total_kib = 0;
};
Machine DescribeMachine();

// Value of a string field `"key":"value"` or number `"key":123` in a flat JSON line.
std::string JsonField(const std::string& line, const std::string& key);

// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit.
uint64_t RaiseFdLimit();

// A ws:// or wss:// URL of a bench upstream or emulator: ws[s]://HOST:PORT[/path].
struct WsUrl {
  bool tls = false;
  std::string host, port;
};
absl::StatusOr<WsUrl> ParseWsUrl(const std::string& url);

}  // namespace wsbridge::bench
