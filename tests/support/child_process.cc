#include "tests/support/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "tests/support/test_support.h"

extern char** environ;

namespace wsbridge::testing {

using Clock = std::chrono::steady_clock;

ChildProcess::ChildProcess(const std::string& path, std::vector<std::string> args,
                           const ChildProcessOptions& options)
    : stderr_path_(options.stderr_path) {
  int in[2] = {-1, -1}, out[2];
  if (options.stdin_pipe && pipe2(in, O_CLOEXEC) != 0) return;
  if (pipe2(out, O_CLOEXEC) != 0) {
    if (options.stdin_pipe) {
      close(in[0]);
      close(in[1]);
    }
    return;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (options.stdin_pipe) {
    posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path_.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  // Nothing of the test process (its sockets: proxies, emulators) leaks in.
  posix_spawn_file_actions_addclosefrom_np(&actions, STDERR_FILENO + 1);
  args.insert(args.begin(), path);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string_view(*e).substr(0, 9) != "WSBRIDGE_") env_strings.emplace_back(*e);
  }
  for (const auto& [key, value] : options.env) env_strings.push_back(key + "=" + value);
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  if (posix_spawn(&pid_, path.c_str(), &actions, nullptr, argv.data(), envp.data()) != 0) {
    pid_ = -1;
  }
  posix_spawn_file_actions_destroy(&actions);
  if (options.stdin_pipe) {
    close(in[0]);
    stdin_fd_ = in[1];
  }
  close(out[1]);
  stdout_fd_ = out[0];
}

ChildProcess::~ChildProcess() {
  CloseStdin();
  if (pid_ > 0 && !exit_status_) {
    kill(pid_, SIGKILL);  // a stopped process is killed too
    int status;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

bool ChildProcess::Signal(int sig) {
  if (pid_ <= 0 || exit_status_) return false;
  return kill(pid_, sig) == 0;
}

bool ChildProcess::Stop() {
  if (!Signal(SIGSTOP)) return false;
  int status = 0;
  pid_t r;
  while ((r = waitpid(pid_, &status, WUNTRACED)) < 0 && errno == EINTR) {
  }
  if (r != pid_) return false;
  if (!WIFSTOPPED(status)) {
    exit_status_ = status;  // it was gone already
    return false;
  }
  return true;
}

bool ChildProcess::WriteStdin(std::string_view text) {
  while (!text.empty()) {
    ssize_t n = write(stdin_fd_, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    text.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

void ChildProcess::CloseStdin() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  stdin_fd_ = -1;
}

std::optional<std::string> ChildProcess::ReadLine(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (size_t nl = stdout_.find('\n', consumed_); nl != std::string::npos) {
      std::string line = stdout_.substr(consumed_, nl - consumed_);
      consumed_ = nl + 1;
      return line;
    }
    if (eof_ || stdout_fd_ < 0) return std::nullopt;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return std::nullopt;
    pollfd p{stdout_fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[16384];
    const ssize_t n = read(stdout_fd_, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      eof_ = true;
      continue;
    }
    stdout_.append(buf, static_cast<size_t>(n));
  }
}

std::string ChildProcess::ReadAll(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string all;
  while (auto line = ReadLine(
             std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()))) {
    all += *line + "\n";
  }
  all += rest();
  consumed_ = stdout_.size();
  return all;
}

bool ChildProcess::eof() const {
  return eof_ && stdout_.find('\n', consumed_) == std::string::npos;
}

std::optional<int> ChildProcess::WaitExit(std::chrono::milliseconds timeout) {
  if (exit_status_ || pid_ <= 0) return exit_status_;
  WaitFor(
      [&] {
        int status;
        if (waitpid(pid_, &status, WNOHANG) == pid_ && (WIFEXITED(status) || WIFSIGNALED(status))) {
          exit_status_ = status;
        }
        return exit_status_.has_value();
      },
      timeout);
  return exit_status_;
}

std::optional<int> ChildProcess::WaitExitCode(std::chrono::milliseconds timeout) {
  const std::optional<int> status = WaitExit(timeout);
  if (!status) return std::nullopt;
  return WIFEXITED(*status) ? WEXITSTATUS(*status) : -1;
}

std::string ChildProcess::Stderr() const {
  std::ifstream in(stderr_path_);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace wsbridge::testing
