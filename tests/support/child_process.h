// A binary run as a child process by a test: stdout on a pipe read line by line with a
// deadline, stderr in a file, signals, waiting for the exit with a deadline.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace wsbridge::testing {

struct ChildProcessOptions {
  // The child's stderr goes to this file (created or truncated); Stderr() reads it.
  std::string stderr_path;
  // stdin on a pipe (WriteStdin, CloseStdin); /dev/null otherwise.
  bool stdin_pipe = false;
  // Added to the environment. The test's own WSBRIDGE_* variables never reach the child.
  std::map<std::string, std::string> env = {};
};

// Spawned (posix_spawn) on construction, with no descriptor of the test process above
// stderr; SIGKILLed and reaped on destruction unless it was reaped already.
class ChildProcess {
 public:
  ChildProcess(const std::string& path, std::vector<std::string> args,
               const ChildProcessOptions& options);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  bool spawned() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // kill(2) unless the child has been reaped; whether the signal was sent.
  bool Signal(int sig);
  // SIGSTOP, returning once the kernel reports the child stopped (false if it is gone).
  bool Stop();

  bool WriteStdin(std::string_view text);
  void CloseStdin();

  // The next stdout line, or nullopt at EOF or when `timeout` passes.
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout);
  // Every stdout line until EOF (bounded by `timeout` in all), the unterminated rest
  // included.
  std::string ReadAll(std::chrono::milliseconds timeout);
  // At EOF with no whole line left to read.
  bool eof() const;
  // What has been read from stdout but not returned as a line (at EOF: what follows the
  // last newline).
  std::string rest() const { return stdout_.substr(consumed_); }
  // Everything read from stdout so far.
  const std::string& stdout_text() const { return stdout_; }

  // The wait status (as from waitpid) once the child has exited within `timeout`.
  std::optional<int> WaitExit(std::chrono::milliseconds timeout);
  // The same as an exit code; -1 if a signal killed it.
  std::optional<int> WaitExitCode(std::chrono::milliseconds timeout);

  // The stderr file's contents so far.
  std::string Stderr() const;

 private:
  std::string stderr_path_;
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
  int stdout_fd_ = -1;
  std::string stdout_;
  size_t consumed_ = 0;
  bool eof_ = false;
  std::optional<int> exit_status_;
};

}  // namespace wsbridge::testing
