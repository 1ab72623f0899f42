// The wsbridged daemon: builds the bridges from the config, serves them over gRPC
// (TCP and/or Unix socket) with health, reflection and the admin service, runs the
// admin HTTP listener (/metrics, /healthz, /readyz) and drains on shutdown.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "bridges/core/bridge.h"
#include "bridges/core/metrics.h"
#include "wsbridge/config/v1/daemon.pb.h"

namespace wsbridge::daemon {

struct DaemonOptions {
  // Handle SIGTERM/SIGINT: the first starts the drain, the second exits at once with
  // status 1. Off for in-process use (tests), where the host owns the signals.
  bool handle_signals = false;
  // Exit the process (status 0) if shutdown has not finished by shutdown.deadline,
  // so a stuck call can never keep the process alive. For the executable only.
  bool exit_at_deadline = false;
  // Configure logging from the config's LogConfig in Start().
  bool configure_logging = true;
};

class Daemon {
 public:
  // `registry` must outlive Start().
  Daemon(wsbridge::config::v1::DaemonConfig config, core::BridgeRegistry& registry,
         DaemonOptions options = {});
  // Shuts down (as RequestShutdown + Wait) if still running.
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Builds the bridges and starts every listener. Call once. On error nothing keeps
  // running and the message says which part of the config is at fault.
  absl::Status Start();
  // Starts the drain and shutdown sequence. Thread-safe, idempotent, never blocks.
  void RequestShutdown();
  // Blocks until shutdown has completed (returns at once if Start() failed or was
  // never called). Call from one thread only, never from a gRPC or io thread.
  void Wait();

  // Bound ports after Start() (useful with port 0); 0 when there is no such listener.
  int grpc_port() const;
  int admin_port() const;
  // The Unix socket path, "" when none.
  std::string unix_socket_path() const;
  // `{"event":"listening","grpc":"host:port","unix":"path","admin":"host:port"}`
  // (absent listeners are left out); main prints it so that scripts and tests can
  // learn the ports.
  std::string ListeningJson() const;
  // True while serving and every bridge is serving; false once draining.
  bool ready() const;
  core::MetricsRegistry& metrics();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace wsbridge::daemon
