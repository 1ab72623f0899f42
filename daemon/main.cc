// wsbridged: serves third-party WebSocket APIs as typed gRPC services.
#include <sys/resource.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "daemon/demo_config.h"

namespace {

constexpr std::string_view kUsage =
    R"(Usage: wsbridged [--config FILE] [--check]

Serves the upstream WebSocket APIs named in the config as gRPC services (with health,
reflection and wsbridge.admin.v1.AdminService), plus an admin HTTP listener for
/metrics, /healthz and /readyz.

  --config FILE   YAML config (see deploy/config/). Without it, the built-in demo
                  config runs.
  --check         Validate the config and exit: 0 and "config OK", or 2 with one
                  line per error (file:line:col: path: problem) on stderr.
  --version       Print the version and exit.
  --help          Print this help and exit.

Once listening, one JSON line goes to stdout:
  {"event":"listening","grpc":"HOST:PORT","unix":"PATH","admin":"HOST:PORT"}
Logs go to stderr.

Signals: SIGTERM or SIGINT starts a graceful shutdown (readiness and health go
NOT_SERVING, new calls are refused, open calls get shutdown.drain_timeout, then end
with UNAVAILABLE); the process exits 0 within shutdown.deadline. A second signal
exits at once with status 1.

Exit status: 0 after a shutdown, 1 when start-up fails, 2 for a bad command line or
config.
)";

#ifndef WSBRIDGE_VERSION
#define WSBRIDGE_VERSION "unknown"
#endif

// Every upstream session is a socket and every caller connection another: raise the
// soft descriptor limit to the hard one (commonly 1024 -> 1048576 under systemd and
// container runtimes) so that thousands of sessions do not fail with EMFILE.
void RaiseDescriptorLimit() {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur >= lim.rlim_max) return;
  rlimit raised = lim;
  raised.rlim_cur = lim.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &raised) != 0) {
    std::cerr << "wsbridged: cannot raise the open-file limit from " << lim.rlim_cur << " to "
              << lim.rlim_max << ": " << std::strerror(errno) << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (arg == "--version") {
      std::cout << "wsbridged " << WSBRIDGE_VERSION << "\n";
      return 0;
    }
    if (arg == "--check") {
      check = true;
    } else if (arg == "--config" && i + 1 < argc) {
      config_path = argv[++i];
    } else if (arg.starts_with("--config=")) {
      config_path = std::string(arg.substr(9));
    } else {
      std::cerr << "wsbridged: " << (arg == "--config" ? "--config needs a FILE" :
                                     "unknown argument \"" + std::string(arg) + "\"")
                << "\n\n" << kUsage;
      return 2;
    }
  }

  absl::StatusOr<wsbridge::config::v1::DaemonConfig> config;
  if (config_path.empty()) {
    std::string_view demo = wsbridge::daemon::DemoConfigYaml();
    if (demo.empty()) {
      std::cerr << "wsbridged: this build has no built-in demo config; pass --config FILE\n";
      return 2;
    }
    std::cerr << "wsbridged: no --config given: using the built-in DEMO config "
                 "(deploy/config/demo.yaml). Pass --config FILE for a real deployment.\n";
    config = wsbridge::config::LoadConfigString(demo, "<built-in demo config>");
  } else {
    config = wsbridge::config::LoadConfigFile(config_path);
  }
  if (!config.ok()) {
    std::cerr << config.status().message() << "\n";
    return 2;
  }
  if (check) {
    std::cout << "config OK\n";
    return 0;
  }

#ifdef NDEBUG
  // The packaged abseil has lock-order (deadlock) detection compiled in: it updates a
  // global graph on every Mutex lock, measurable on each bridged call. Debug and
  // sanitizer builds keep it, so lock-order cycles still show up in testing.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif

  RaiseDescriptorLimit();

  wsbridge::core::BridgeRegistry registry;
  wsbridge::core::RegisterBuiltinBridges(registry);
  wsbridge::daemon::Daemon daemon(*std::move(config), registry,
                                  {.handle_signals = true, .exit_at_deadline = true});
  if (absl::Status status = daemon.Start(); !status.ok()) {
    std::cerr << "wsbridged: cannot start: " << status.message() << "\n";
    return 1;
  }
  std::string line = daemon.ListeningJson() + "\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
  daemon.Wait();
  return 0;
}
