#include "bench/bench_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace wsbridge::bench {

namespace {
double Rank(const std::vector<int64_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  size_t idx = static_cast<size_t>(q * static_cast<double>(sorted.size()));
  if (idx >= sorted.size()) idx = sorted.size() - 1;
  return static_cast<double>(sorted[idx]) / 1000.0;
}
}  // namespace

Latency Summarize(std::vector<int64_t> s) {
  Latency l;
  l.samples = s.size();
  if (s.empty()) return l;
  std::sort(s.begin(), s.end());
  l.p50_us = Rank(s, 0.50);
  l.p99_us = Rank(s, 0.99);
  l.p999_us = Rank(s, 0.999);
  double sum = 0;
  for (int64_t v : s) sum += static_cast<double>(v);
  l.mean_us = sum / static_cast<double>(s.size()) / 1000.0;
  return l;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

Latency MedianOf(const std::vector<Latency>& runs) {
  Latency out;
  std::vector<double> a, b, c, d;
  for (const Latency& r : runs) {
    a.push_back(r.p50_us);
    b.push_back(r.p99_us);
    c.push_back(r.p999_us);
    d.push_back(r.mean_us);
    out.samples += r.samples;
  }
  out.p50_us = Median(a);
  out.p99_us = Median(b);
  out.p999_us = Median(c);
  out.mean_us = Median(d);
  return out;
}

namespace {
std::mutex g_children_mu;
std::set<pid_t>& Children() {
  static auto* s = new std::set<pid_t>;
  return *s;
}
}  // namespace

void KillAllChildren() {
  std::lock_guard<std::mutex> lock(g_children_mu);
  for (pid_t p : Children()) kill(p, SIGKILL);
}

Child::~Child() { Stop(); }

absl::Status Child::Spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                          const std::string& stderr_file) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  std::vector<std::string> envs;
  for (char** e = environ; *e; ++e) envs.emplace_back(*e);
  for (const auto& e : env) envs.push_back(e);
  std::vector<char*> cargv, cenv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  for (auto& e : envs) cenv.push_back(e.data());
  cenv.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    if (!stderr_file.empty()) {
      int err = open(stderr_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      if (err >= 0) dup2(err, STDERR_FILENO);
    }
    execve(cargv[0], cargv.data(), cenv.data());
    _exit(127);
  }
  close(fds[1]);
  out_fd_ = fds[0];
  pid_ = pid;
  std::lock_guard<std::mutex> lock(g_children_mu);
  Children().insert(pid);
  return absl::OkStatus();
}

absl::StatusOr<std::string> Child::WaitForLine(const std::string& needle,
                                               std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (true) {
    size_t nl;
    while ((nl = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.find(needle) != std::string::npos) return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return absl::DeadlineExceededError(absl::StrCat("no line with ", needle));
    pollfd p{out_fd_, POLLIN, 0};
    int r = poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    char buf[4096];
    ssize_t n = read(out_fd_, buf, sizeof buf);
    if (n <= 0) return absl::UnavailableError(absl::StrCat("child exited before printing ", needle));
    buffer_.append(buf, static_cast<size_t>(n));
  }
}

void Child::Stop(std::chrono::milliseconds grace) {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    auto deadline = Clock::now() + grace;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::lock_guard<std::mutex> lock(g_children_mu);
    Children().erase(pid_);
    pid_ = -1;
  }
  if (out_fd_ >= 0) {
    close(out_fd_);
    out_fd_ = -1;
  }
}

double ProcessCpuSeconds(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/stat"));
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // Fields after the ")" that closes comm: state is field 3; utime 14, stime 15.
  size_t rp = s.rfind(')');
  if (rp == std::string::npos) return 0;
  std::istringstream in(s.substr(rp + 2));
  std::string tok;
  unsigned long long utime = 0, stime = 0;
  for (int field = 3; in >> tok; ++field) {
    if (field == 14) utime = std::stoull(tok);
    if (field == 15) {
      stime = std::stoull(tok);
      break;
    }
  }
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

int64_t ProcessContextSwitches(pid_t pid) {
  int64_t total = 0;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/task"), ec)) {
    std::ifstream f(task.path() / "status");
    std::string line;
    while (std::getline(f, line)) {
      if (line.find("ctxt_switches:") != std::string::npos) {
        total += std::stoll(line.substr(line.find(':') + 1));
      }
    }
  }
  return total;
}

int ProcessThreads(pid_t pid) {
  int n = 0;
  std::error_code ec;
  for ([[maybe_unused]] const auto& task :
       std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/task"), ec)) {
    ++n;
  }
  return n;
}

int64_t ProcessRssKiB(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  }
  return 0;
}

double SelfCpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

Machine DescribeMachine() {
  Machine m;
  std::ifstream cpu("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpu, line)) {
    if (line.rfind("model name", 0) == 0 && m.cpu_model.empty()) {
      m.cpu_model = line.substr(line.find(':') + 2);
    }
  }
  m.cores = static_cast<int>(std::thread::hardware_concurrency());
  utsname u{};
  uname(&u);
  m.kernel = absl::StrCat(u.sysname, " ", u.release, " ", u.machine);
#if defined(__clang__)
  m.compiler = absl::StrCat("clang ", __clang_version__);
#elif defined(__GNUC__)
  m.compiler = absl::StrCat("gcc ", __VERSION__);
#endif
#ifdef WSBRIDGE_BENCH_BUILD_TYPE
  m.build_type = WSBRIDGE_BENCH_BUILD_TYPE;
#endif
  std::ifstream mem("/proc/meminfo");
  while (std::getline(mem, line)) {
    if (line.rfind("MemTotal:", 0) == 0) m.mem_total_kib = std::stoll(line.substr(9));
  }
  return m;
}

std::string JsonField(const std::string& line, const std::string& key) {
  std::string pat = absl::StrCat("\"", key, "\":");
  size_t at = line.find(pat);
  if (at == std::string::npos) return "";
  at += pat.size();
  while (at < line.size() && line[at] == ' ') ++at;
  if (at < line.size() && line[at] == '"') {
    size_t end = line.find('"', at + 1);
    return end == std::string::npos ? "" : line.substr(at + 1, end - at - 1);
  }
  size_t end = at;
  while (end < line.size() && (isdigit(static_cast<unsigned char>(line[end])) || line[end] == '-' ||
                               line[end] == '.')) {
    ++end;
  }
  return line.substr(at, end - at);
}

uint64_t RaiseFdLimit() {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  getrlimit(RLIMIT_NOFILE, &rl);
  return rl.rlim_cur;
}

absl::StatusOr<WsUrl> ParseWsUrl(const std::string& url) {
  WsUrl u;
  std::string rest;
  if (url.rfind("wss://", 0) == 0) {
    u.tls = true;
    rest = url.substr(6);
  } else if (url.rfind("ws://", 0) == 0) {
    rest = url.substr(5);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("not a ws/wss url: ", url));
  }
  size_t colon = rest.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("url needs a port: ", url));
  u.host = rest.substr(0, colon);
  u.port = rest.substr(colon + 1);
  size_t slash = u.port.find('/');
  if (slash != std::string::npos) u.port.resize(slash);
  return u;
}

}  // namespace wsbridge::bench
