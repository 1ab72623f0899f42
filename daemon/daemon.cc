#include "daemon/daemon.h"

#include <malloc.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <csignal>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/json.hpp>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/loop_executor.h"
#include "bridges/core/log.h"
#include "daemon/admin_http.h"
#include "daemon/admin_service.h"
#include "daemon/auth.h"
#include "daemon/caller_listener.h"
#include "daemon/config/config.h"
#include "daemon/health_service.h"
#include "daemon/reflection_service.h"
#include "daemon/rpc_metrics.h"

namespace wsbridge::daemon {
namespace {

namespace asio = boost::asio;
using wsbridge::config::v1::DaemonConfig;

constexpr uint32_t kDefaultMaxMessageBytes = 4 * 1024 * 1024;
constexpr uint32_t kDefaultMaxConcurrentStreams = 1000;
constexpr uint32_t kDefaultMaxConnections = 1000;
constexpr uint32_t kDefaultMaxMetadataBytes = 16 * 1024;
constexpr size_t kTransportMetadataFactor = 4;
constexpr size_t kMinTransportMetadataBytes = 64 * 1024;
// Caller connections (server.connections); the schema documents the same defaults.
constexpr absl::Duration kDefaultKeepaliveTime = absl::Seconds(60);
constexpr absl::Duration kDefaultKeepaliveTimeout = absl::Seconds(20);
constexpr absl::Duration kDefaultMaxIdle = absl::Minutes(5);
constexpr absl::Duration kDefaultMaxAgeGrace = absl::Seconds(30);
constexpr absl::Duration kDefaultMinPingInterval = absl::Seconds(10);
constexpr uint32_t kDefaultIoThreads = 2;
constexpr size_t kLogRepeatBurst = 20;
constexpr double kLogRepeatWindowSeconds = 10;
constexpr absl::Duration kDefaultDrainTimeout = absl::Seconds(10);
constexpr absl::Duration kDefaultDeadline = absl::Seconds(15);
// Health is re-published on every BridgeContext::health_changed and at least this often.
constexpr std::chrono::seconds kHealthPollInterval{1};
// How often the drain checks whether every client call has ended.
constexpr std::chrono::milliseconds kDrainPollInterval{20};
constexpr std::string_view kAdminServiceName = "wsbridge.admin.v1.AdminService";

std::vector<std::unique_ptr<asio::io_context>> MakeIoLoops(const DaemonConfig& config) {
  const uint32_t n =
      config.runtime().io_threads() != 0 ? config.runtime().io_threads() : kDefaultIoThreads;
  std::vector<std::unique_ptr<asio::io_context>> loops;
  // concurrency_hint 1: each loop is run by exactly one thread.
  for (uint32_t i = 0; i < n; ++i) loops.push_back(std::make_unique<asio::io_context>(1));
  return loops;
}

absl::Duration ToDuration(const google::protobuf::Duration& d, absl::Duration fallback) {
  if (d.seconds() == 0 && d.nanos() == 0) return fallback;
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* field) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot read \"", path, "\": ", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The mode of a directory created for the socket: whoever may read or write the socket
// may enter the directory (0660 -> 0770, 0600 -> 0700), nobody else.
mode_t DirectoryModeFor(mode_t socket_mode) {
  const mode_t rw = socket_mode & 0666;
  return rw | ((rw & 0444) >> 2) | ((rw & 0222) >> 1);
}

// mkdir -p with `mode` given to mkdir itself, so no directory is ever wider than that,
// not even for a moment (std::filesystem::create_directories uses 0777 & ~umask).
// Directories that exist are left as they are.
absl::Status CreateDirectories(const std::filesystem::path& dir, mode_t mode) {
  std::filesystem::path prefix;
  for (const auto& part : dir) {
    prefix /= part;
    if (part == "/" || part.empty()) continue;
    if (mkdir(prefix.c_str(), mode) != 0 && errno != EEXIST) {
      return absl::FailedPreconditionError(absl::StrCat(
          "server.unix_socket: cannot create \"", prefix.string(), "\": ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

// Sets the process umask for its lifetime, so that a file bound in the meantime (the
// Unix socket: bind() takes 0777 & ~umask) is created with its final mode instead of
// being widened until a later chmod. The umask is process-wide: threads creating files
// during the few microseconds of the bind get the narrower mask, never a wider one.
class ScopedUmask {
 public:
  explicit ScopedUmask(mode_t mask) : previous_(umask(mask)) {}
  ~ScopedUmask() { umask(previous_); }
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

 private:
  mode_t previous_;
};

// Removes a socket file left behind by a process that is gone; refuses to touch a
// path that is not a socket or that a live process still listens on.
absl::Status PrepareUnixSocketPath(const std::string& path, mode_t socket_mode) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("server.unix_socket: path is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      // Create the directory (e.g. /run/wsbridge) so a fresh host or tmpfs works.
      const auto parent = std::filesystem::path(path).parent_path();
      if (parent.empty()) return absl::OkStatus();
      return CreateDirectories(parent, DirectoryModeFor(socket_mode));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("server.unix_socket: cannot stat \"", path, "\": ", std::strerror(errno)));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server.unix_socket: \"", path, "\" exists and is not a socket; remove it or pick another path"));
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket(): ", std::strerror(errno)));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(fd);
  if (rc == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server.unix_socket: \"", path, "\" is in use by a running process (another wsbridged?)"));
  }
  if (err != ECONNREFUSED && err != ENOENT) {
    return absl::FailedPreconditionError(absl::StrCat("server.unix_socket: cannot probe \"", path,
                                                      "\": ", std::strerror(err)));
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server.unix_socket: cannot remove stale socket \"", path, "\": ", std::strerror(errno)));
  }
  log::Info("server", "removed stale unix socket", {{"path", path}});
  return absl::OkStatus();
}

absl::StatusOr<mode_t> ParseMode(const std::string& text) {
  if (text.empty()) return static_cast<mode_t>(0660);
  uint32_t mode = 0;
  for (char c : text) {
    if (c < '0' || c > '7' || mode > 07777) {
      return absl::InvalidArgumentError(absl::StrCat(
          "server.unix_socket_mode: \"", text, "\" is not an octal file mode (e.g. \"0660\")"));
    }
    mode = mode * 8 + static_cast<uint32_t>(c - '0');
  }
  if (mode > 07777) {
    return absl::InvalidArgumentError(
        absl::StrCat("server.unix_socket_mode: \"", text, "\" is out of range"));
  }
  return static_cast<mode_t>(mode);
}

size_t MaxMetadataBytes(const DaemonConfig& config) {
  return config.server().max_metadata_bytes() != 0 ? config.server().max_metadata_bytes()
                                                   : kDefaultMaxMetadataBytes;
}

// The header block size past which gRPC itself refuses a connection's input.
size_t TransportMetadataLimit(size_t per_call) {
  return std::max<size_t>(per_call * kTransportMetadataFactor, kMinTransportMetadataBytes);
}

int Millis(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), INT32_MAX));
}

// Keepalive and lifetime of caller connections (server.connections). Unset fields take
// the defaults above; an explicit 0 turns max_idle / max_age off.
void AddConnectionArguments(const wsbridge::config::v1::ServerConnectionConfig& c,
                            grpc::ServerBuilder& builder) {
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             Millis(ToDuration(c.keepalive_time(), kDefaultKeepaliveTime)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             Millis(ToDuration(c.keepalive_timeout(), kDefaultKeepaliveTimeout)));
  // Ping connections without calls too: an idle caller that vanished is found as well.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Keep pinging a stream that carries no data (a quiet subscription): gRPC stops after
  // two pings without data otherwise, and a caller that vanished would go unnoticed.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  builder.AddChannelArgument(
      GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
      Millis(c.has_min_ping_interval() ? ToDuration(c.min_ping_interval(), absl::ZeroDuration())
                                       : kDefaultMinPingInterval));
  const absl::Duration idle = c.has_max_idle()
                                  ? ToDuration(c.max_idle(), absl::ZeroDuration())
                                  : kDefaultMaxIdle;
  if (idle > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, Millis(idle));
  }
  const absl::Duration age = ToDuration(c.max_age(), absl::ZeroDuration());
  if (age > absl::ZeroDuration()) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, Millis(age));
    builder.AddChannelArgument(
        GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
        Millis(c.has_max_age_grace() ? ToDuration(c.max_age_grace(), absl::ZeroDuration())
                                     : kDefaultMaxAgeGrace));
  }
}

// "host:PORT" with the port actually bound.
std::string WithPort(const std::string& listen, int port) {
  size_t colon = listen.rfind(':');
  return absl::StrCat(listen.substr(0, colon == std::string::npos ? listen.size() : colon), ":",
                      port);
}

const char* SessionStateLabel(wsbridge::admin::v1::SessionState state) {
  switch (state) {
    case wsbridge::admin::v1::SESSION_STATE_IDLE: return "idle";
    case wsbridge::admin::v1::SESSION_STATE_CONNECTING: return "connecting";
    case wsbridge::admin::v1::SESSION_STATE_AUTHENTICATING: return "authenticating";
    case wsbridge::admin::v1::SESSION_STATE_READY: return "ready";
    case wsbridge::admin::v1::SESSION_STATE_BACKING_OFF: return "backing_off";
    case wsbridge::admin::v1::SESSION_STATE_CLOSED: return "closed";
    default: return "unspecified";
  }
}

}  // namespace

struct Daemon::Impl {
  Impl(DaemonConfig c, core::BridgeRegistry& r, DaemonOptions o)
      : config(std::move(c)), registry(r), options(o), control(asio::make_strand(io)),
        health_timer(control), trim_timer(control), drain_timer(control), signals(control) {}

  absl::Status Start();
  absl::Status BuildBridges();
  absl::Status StartServer();
  void AddCollectors();
  void PublishHealth();       // on `control`
  void ScheduleHealthPoll();  // on `control`
  void ScheduleMemoryTrim();  // on `control`
  void BeginShutdown();       // on `control`
  void PollDrain();           // on `control`
  void ShutdownBridges();     // on `control`
  void WaitSignal();
  void StopIo(absl::Time grace_until);
  // After the server shut down: every call tag comes back (ok = false) and is released.
  void ShutdownCqLoops() {
    for (auto& loop : cq_loops) loop->Shutdown();
  }
  std::string ListeningJson() const;

  DaemonConfig config;
  core::BridgeRegistry& registry;
  DaemonOptions options;

  // Declared first so that it outlives everything that may hold its executor.
  // One event loop per io thread (runtime.io_threads): a multi-threaded io_context
  // shares one epoll set and wakes an idle thread for every post, so work hops between
  // threads; a loop per thread keeps each session on one thread. `io` is the first.
  std::vector<std::unique_ptr<asio::io_context>> io_loops = MakeIoLoops(config);
  asio::io_context& io = *io_loops.front();
  std::atomic<size_t> next_loop{0};
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::vector<std::thread> threads;
  asio::strand<asio::io_context::executor_type> control;
  asio::steady_timer health_timer;
  asio::steady_timer trim_timer;
  asio::steady_timer drain_timer;
  asio::signal_set signals;

  core::MetricsRegistry metrics;
  Authorizer authorize;
  std::shared_ptr<RpcTracker> rpc_tracker;
  // Handed to bridges before the tracker exists; no call can arrive before it does.
  struct ForwardingObserver final : core::CallObserver {
    RpcTracker* tracker = nullptr;
    void Started() override { tracker->Started(); }
    void Finished(std::string_view method, grpc::StatusCode code) override {
      tracker->Finished(method, code);
    }
  } bridge_calls;
  std::vector<std::unique_ptr<core::Bridge>> bridges;
  std::unique_ptr<AdminServiceImpl> admin_service;
  std::unique_ptr<ReflectionService> reflection_service;
  std::unique_ptr<HealthService> health_service = std::make_unique<HealthService>();
  // The completion queues every service is served on, each with its thread; shut down
  // after the server and before the bridges whose calls they hold.
  std::vector<std::unique_ptr<core::CqLoop>> cq_loops;
  // Accepts callers and hands their connections to `server`; stopped before it.
  std::unique_ptr<CallerListener> listener;
  // Destroyed before the services it serves.
  std::unique_ptr<grpc::Server> server;
  // `server` for PublishHealth, set once it has started. Bridges start (and may report
  // health, which runs PublishHealth on the control thread) before the server is built
  // on the starting thread, so PublishHealth must not read `server` itself.
  std::atomic<grpc::Server*> health_server{nullptr};
  std::unique_ptr<AdminHttpServer> admin_http;

  int grpc_port = 0;
  std::string grpc_address;
  std::string unix_path;
  bool unix_bound = false;
  std::atomic<bool> ready{false};
  std::atomic<bool> draining{false};
  int signals_seen = 0;  // on `control`

  // Shutdown timeline (set on `control` when shutdown begins).
  absl::Time shutdown_started;
  absl::Time drain_end;
  absl::Time bridges_deadline;
  absl::Time server_deadline;
  absl::Time exit_deadline;

  mutable absl::Mutex mu;
  bool started ABSL_GUARDED_BY(mu) = false;
  bool shutdown_requested ABSL_GUARDED_BY(mu) = false;
  bool shutdown_begun ABSL_GUARDED_BY(mu) = false;
  bool bridges_done ABSL_GUARDED_BY(mu) = false;
  bool finished ABSL_GUARDED_BY(mu) = false;
  int running_io_threads ABSL_GUARDED_BY(mu) = 0;
  absl::Time wait_bridges_until ABSL_GUARDED_BY(mu) = absl::InfiniteFuture();
  absl::Time server_deadline_locked ABSL_GUARDED_BY(mu) = absl::InfiniteFuture();
  std::thread watchdog;
};

absl::Status Daemon::Impl::BuildBridges() {
  std::set<std::string> names;
  for (int i = 0; i < config.bridges_size(); ++i) {
    const auto& bridge_config = config.bridges(i);
    const std::string where = absl::StrCat("bridges[", i, "]");
    if (bridge_config.name().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".name: is required"));
    }
    if (!names.insert(bridge_config.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".name: \"", bridge_config.name(),
                                                     "\" is used by another bridge"));
    }
    // The kind is whichever field of the `kind` oneof is set; its message type picks the
    // factory.
    const auto* descriptor = bridge_config.GetDescriptor();
    const auto* reflection = bridge_config.GetReflection();
    const auto* oneof = descriptor->FindOneofByName("kind");
    const google::protobuf::FieldDescriptor* field =
        oneof != nullptr ? reflection->GetOneofFieldDescriptor(bridge_config, oneof) : nullptr;
    if (field == nullptr || field->message_type() == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, " (", bridge_config.name(), "): no bridge kind set (e.g. `dfx:`)"));
    }
    const std::string type = field->message_type()->full_name();
    const core::BridgeFactory* factory = registry.Find(type);
    if (factory == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".", field->name(), ": this build has no bridge for ", type,
                       "; built in: ", absl::StrJoin(registry.Types(), ", ")));
    }
    core::BridgeContext context;
    context.name = bridge_config.name();
    context.executor = io.get_executor();
    // Sessions' strands may be entered by a completion-queue thread (core::InlineScope).
    context.session_executor = [this]() -> asio::any_io_executor {
      return core::LoopExecutor(
          io_loops[next_loop.fetch_add(1, std::memory_order_relaxed) % io_loops.size()]->get_executor());
    };
    context.metrics = &metrics;
    context.calls = &bridge_calls;
    context.authorize = authorize;
    context.health_changed = [this] { asio::post(control, [this] { PublishHealth(); }); };
    // A config loaded from YAML has every default applied; one built in code may leave
    // limits out, and then the bridge's own values stay.
    if (bridge_config.has_limits()) {
      const auto& limits = bridge_config.limits();
      if (limits.max_waiting_calls() > 0) context.limits.max_waiting_calls = limits.max_waiting_calls();
      if (limits.has_refusal_memory()) {
        context.limits.refusal_memory = absl::ToChronoNanoseconds(
            ToDuration(limits.refusal_memory(), absl::ZeroDuration()));
      }
      context.limits.max_sessions_per_caller = limits.max_sessions_per_caller();
    }
    auto bridge = (*factory)(reflection->GetMessage(bridge_config, field), context);
    if (!bridge.ok()) {
      return absl::Status(bridge.status().code(),
                          absl::StrCat(where, " (", bridge_config.name(), "): ",
                                       bridge.status().message()));
    }
    log::Info("server", "bridge created",
              {{"bridge", bridge_config.name()}, {"kind", std::string(field->name())}});
    bridges.push_back(*std::move(bridge));
  }
  return absl::OkStatus();
}

void Daemon::Impl::AddCollectors() {
  metrics.AddCollector([this](std::string& out) {
    std::map<std::pair<std::string, std::string>, int64_t> by_state;
    struct Totals {
      uint64_t reconnects = 0, frames_in = 0, frames_out = 0, bytes_in = 0, bytes_out = 0;
    };
    std::map<std::string, Totals> totals;
    for (const auto& bridge : bridges) {
      Totals& t = totals[bridge->name()];
      for (const auto& s : bridge->ListSessions()) {
        ++by_state[{bridge->name(), SessionStateLabel(s.state())}];
        t.reconnects += s.reconnects();
        t.frames_in += s.frames_in();
        t.frames_out += s.frames_out();
        t.bytes_in += s.bytes_in();
        t.bytes_out += s.bytes_out();
      }
    }
    out += "# HELP wsbridge_sessions Upstream sessions by bridge and state.\n"
           "# TYPE wsbridge_sessions gauge\n";
    for (const auto& [key, n] : by_state) {
      absl::StrAppend(&out, "wsbridge_sessions",
                      core::RenderLabels({{"bridge", key.first}, {"state", key.second}}), " ", n,
                      "\n");
    }
    auto family = [&](const char* name, auto get, std::string_view direction) {
      for (const auto& [bridge, t] : totals) {
        core::Labels labels = {{"bridge", bridge}};
        if (!direction.empty()) labels.emplace_back("direction", std::string(direction));
        absl::StrAppend(&out, name, core::RenderLabels(labels), " ", get(t), "\n");
      }
    };
    out += "# HELP wsbridge_session_reconnects_total Reconnects of the current upstream sessions.\n"
           "# TYPE wsbridge_session_reconnects_total counter\n";
    family("wsbridge_session_reconnects_total", [](const Totals& t) { return t.reconnects; },
           "");
    out += "# HELP wsbridge_upstream_frames_total WebSocket frames of the current upstream sessions.\n"
           "# TYPE wsbridge_upstream_frames_total counter\n";
    family("wsbridge_upstream_frames_total", [](const Totals& t) { return t.frames_in; }, "in");
    family("wsbridge_upstream_frames_total", [](const Totals& t) { return t.frames_out; }, "out");
    out += "# HELP wsbridge_upstream_bytes_total Bytes of the current upstream sessions.\n"
           "# TYPE wsbridge_upstream_bytes_total counter\n";
    family("wsbridge_upstream_bytes_total", [](const Totals& t) { return t.bytes_in; }, "in");
    family("wsbridge_upstream_bytes_total", [](const Totals& t) { return t.bytes_out; }, "out");
    absl::StrAppend(&out,
                    "# HELP wsbridge_ready 1 when serving and every bridge is serving.\n"
                    "# TYPE wsbridge_ready gauge\nwsbridge_ready ",
                    ready.load() ? 1 : 0, "\n",
                    "# HELP wsbridge_draining 1 once shutdown has begun.\n"
                    "# TYPE wsbridge_draining gauge\nwsbridge_draining ",
                    draining.load() ? 1 : 0, "\n",
                    "# HELP wsbridge_grpc_calls_in_flight gRPC calls currently open.\n"
                    "# TYPE wsbridge_grpc_calls_in_flight gauge\nwsbridge_grpc_calls_in_flight ",
                    rpc_tracker ? rpc_tracker->in_flight() : 0, "\n");
    out += "# HELP wsbridge_bridge_serving 1 while the bridge's upstream is usable.\n"
           "# TYPE wsbridge_bridge_serving gauge\n";
    for (const auto& bridge : bridges) {
      absl::StrAppend(&out, "wsbridge_bridge_serving",
                      core::RenderLabels({{"bridge", bridge->name()}}), " ",
                      bridge->Serving() ? 1 : 0, "\n");
    }
  });
}

absl::Status Daemon::Impl::StartServer() {
  const auto& server_config = config.server();
  if (server_config.listen().empty() && server_config.unix_socket().empty()) {
    return absl::InvalidArgumentError(
        "server: set `listen` (host:port) and/or `unix_socket` (path); neither is set");
  }
  grpc::ServerBuilder builder;
  // The daemon listens itself, so that it can cap the caller connections (see
  // caller_listener.h); gRPC gets each accepted connection with the listener's
  // credentials.
  const auto& connections = server_config.connections();
  CallerListener::Options listener_options;
  listener_options.max_connections =
      connections.has_max_connections() ? connections.max_connections() : kDefaultMaxConnections;
  listener_options.refused = &metrics.GetCounter(
      "wsbridge_server_connections_refused_total",
      "Caller connections closed at once because server.connections.max_connections were open");
  listener_options.open = &metrics.GetGauge(
      "wsbridge_server_connections", "Caller connections open (TCP and Unix socket together)");
  listener = std::make_unique<CallerListener>(listener_options);
  using ConnectionType = grpc::ServerBuilder::experimental_type::ExternalConnectionType;

  if (!server_config.listen().empty()) {
    std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
    if (server_config.has_tls()) {
      const auto& tls = server_config.tls();
      auto cert = ReadFile(tls.cert_file(), "server.tls.cert_file");
      if (!cert.ok()) return cert.status();
      auto key = ReadFile(tls.key_file(), "server.tls.key_file");
      if (!key.ok()) return key.status();
      grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
      ssl.pem_key_cert_pairs.push_back({*key, *cert});
      if (!tls.client_ca_file().empty()) {
        auto ca = ReadFile(tls.client_ca_file(), "server.tls.client_ca_file");
        if (!ca.ok()) return ca.status();
        ssl.pem_root_certs = *ca;
        ssl.client_certificate_request =
            tls.require_client_cert() ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                      : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
      } else if (tls.require_client_cert()) {
        return absl::InvalidArgumentError(
            "server.tls.require_client_cert: needs server.tls.client_ca_file to verify clients");
      }
      credentials = grpc::SslServerCredentials(ssl);
    }
    auto port = listener->ListenTcp(
        server_config.listen(),
        builder.experimental().AddExternalConnectionAcceptor(ConnectionType::FROM_FD, credentials));
    if (!port.ok()) return port.status();
    grpc_port = *port;
  }
  mode_t socket_mode = 0660;
  if (!server_config.unix_socket().empty()) {
    unix_path = server_config.unix_socket();
    if (absl::StartsWith(unix_path, "unix:")) unix_path = unix_path.substr(5);
    auto mode = ParseMode(server_config.unix_socket_mode());
    if (!mode.ok()) return mode.status();
    socket_mode = *mode;
    if (absl::Status s = PrepareUnixSocketPath(unix_path, socket_mode); !s.ok()) return s;
    // Bound with its final mode from the start.
    ScopedUmask mask(static_cast<mode_t>(~socket_mode & 0777));
    if (absl::Status s = listener->ListenUnix(
            unix_path, builder.experimental().AddExternalConnectionAcceptor(
                           ConnectionType::FROM_FD, grpc::InsecureServerCredentials()));
        !s.ok()) {
      return s;
    }
    unix_bound = true;
  }

  const int max_message = static_cast<int>(server_config.max_message_bytes() != 0
                                               ? server_config.max_message_bytes()
                                               : kDefaultMaxMessageBytes);
  builder.SetMaxReceiveMessageSize(max_message);
  builder.SetMaxSendMessageSize(max_message);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(server_config.max_concurrent_streams() != 0
                                                  ? server_config.max_concurrent_streams()
                                                  : kDefaultMaxConcurrentStreams));
  // gRPC 1.51 treats a header block above its transport limit as a connection error
  // that ends every call on the connection (its default, 8 KiB, made one 9 KB call do
  // that). So the transport limit is set well above server.max_metadata_bytes, which
  // the authorizer checks per call (WithMetadataLimit): an oversize call fails alone.
  // The transport limit is announced in SETTINGS_MAX_HEADER_LIST_SIZE; clients that
  // honour it (Go, Java) fail a call above it themselves.
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE,
                             static_cast<int>(TransportMetadataLimit(MaxMetadataBytes(config))));
  AddConnectionArguments(server_config.connections(), builder);

  // Every service a bridge serves, checked for clashes (gRPC would refuse to start).
  std::set<std::string, std::less<>> known_services = {
      std::string(kAdminServiceName), "grpc.health.v1.Health",
      "grpc.reflection.v1alpha.ServerReflection"};
  std::map<std::string, std::string> service_owner;
  for (const auto& bridge : bridges) {
    for (const auto& name : bridge->ServiceNames()) {
      auto [it, inserted] = service_owner.emplace(name, bridge->name());
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(
            "bridges \"", it->second, "\" and \"", bridge->name(), "\" both serve ", name,
            ": one daemon can serve each API from one bridge only"));
      }
      known_services.insert(name);
    }
    for (grpc::Service* service : bridge->Services()) builder.RegisterService(service);
  }
  std::vector<core::Bridge*> bridge_ptrs;
  for (const auto& bridge : bridges) bridge_ptrs.push_back(bridge.get());
  admin_service = std::make_unique<AdminServiceImpl>(bridge_ptrs, authorize);
  builder.RegisterService(admin_service.get());
  reflection_service = std::make_unique<ReflectionService>(
      std::vector<std::string>(known_services.begin(), known_services.end()),
      server_config.reflection_without_token()
          ? WithMetadataLimit(MakeBearerAuthorizer(""), MaxMetadataBytes(config))
          : authorize);
  builder.RegisterService(reflection_service.get());
  builder.RegisterService(health_service.get());

  // The daemon's own services count their calls themselves (CountedCall: why, in
  // rpc_metrics.h); so do bridges that say so. The interceptor counts the rest (calls of
  // unknown methods).
  std::set<std::string, std::less<>> self_observed = {
      std::string(kAdminServiceName), "grpc.health.v1.Health",
      "grpc.reflection.v1alpha.ServerReflection"};
  for (const auto& bridge : bridges) {
    if (!bridge->ObservesOwnCalls()) continue;
    for (const auto& name : bridge->ServiceNames()) self_observed.insert(name);
  }
  rpc_tracker = std::make_shared<RpcTracker>(&metrics, std::move(known_services));
  bridge_calls.tracker = rpc_tracker.get();
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
  factories.push_back(MakeRpcMetricsInterceptorFactory(rpc_tracker, std::move(self_observed)));
  builder.experimental().SetInterceptorCreators(std::move(factories));

  // Every service of the daemon (health, admin, reflection) and every method of the
  // bundled bridges is served on these queues: with no callback-API or synchronous
  // method registered, gRPC starts no poller threads of its own (see async_unary.h).
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs;  // CqLoops own them once started
  const uint32_t n = config.runtime().grpc_cq_threads() != 0 ? config.runtime().grpc_cq_threads() : 1;
  for (uint32_t i = 0; i < n; ++i) cqs.push_back(builder.AddCompletionQueue());

  server = builder.BuildAndStart();
  if (server == nullptr) {
    return absl::InternalError("cannot start the gRPC server (see the gRPC error above)");
  }
  listener->Start();
  health_server.store(server.get(), std::memory_order_release);
  std::vector<core::CqLoop*> loops;
  for (auto& cq : cqs) {
    cq_loops.push_back(std::make_unique<core::CqLoop>(std::move(cq)));
    cq_loops.back()->Start();
    loops.push_back(cq_loops.back().get());
  }
  health_service->Serve(loops, rpc_tracker.get());
  admin_service->Serve(loops, rpc_tracker.get());
  reflection_service->Serve(loops, rpc_tracker.get());
  for (const auto& bridge : bridges) {
    if (bridge->UsesCompletionQueues()) bridge->ServeAsync(loops);
  }
  if (!server_config.listen().empty()) grpc_address = WithPort(server_config.listen(), grpc_port);
  if (!unix_path.empty() && chmod(unix_path.c_str(), socket_mode) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server.unix_socket_mode: chmod \"", unix_path, "\" failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status Daemon::Impl::Start() {
  if (options.configure_logging) {
    const auto& lc = config.log();
    log::Level level = log::Level::kInfo;
    if (lc.level() == "debug") level = log::Level::kDebug;
    if (lc.level() == "warn") level = log::Level::kWarn;
    if (lc.level() == "error") level = log::Level::kError;
    log::Configure(level, lc.format() == "json");
    // A reconnect storm (1,000 sessions retrying) would otherwise write ~3 MB a minute
    // of near-identical lines: the first 20 of each message per 10 s, then a count.
    log::SetRepeatLimit(kLogRepeatBurst, kLogRepeatWindowSeconds);
  }
  std::string token;
  if (config.server().has_auth_token()) {
    auto resolved = wsbridge::config::ResolveSecret(config.server().auth_token());
    if (!resolved.ok()) {
      return absl::Status(resolved.status().code(),
                          absl::StrCat("server.auth_token: ", resolved.status().message()));
    }
    token = *std::move(resolved);
    if (token.empty()) {
      return absl::InvalidArgumentError("server.auth_token: the token is empty");
    }
    log::RegisterSecret(token);
  }
  authorize = WithMetadataLimit(MakeBearerAuthorizer(std::move(token)), MaxMetadataBytes(config));

  {
    absl::MutexLock lock(&mu);
    running_io_threads = static_cast<int>(io_loops.size());
  }
  for (auto& loop : io_loops) {
    work.push_back(asio::make_work_guard(*loop));
    threads.emplace_back([this, l = loop.get()] {
      l->run();
      absl::MutexLock lock(&mu);
      --running_io_threads;
    });
  }

  if (absl::Status s = BuildBridges(); !s.ok()) return s;
  AddCollectors();
  for (const auto& bridge : bridges) bridge->Start();
  if (absl::Status s = StartServer(); !s.ok()) return s;
  PublishHealth();  // before anything reports "listening"

  if (!config.admin().listen().empty()) {
    AdminHttpHandlers handlers;
    handlers.metrics = [this] { return metrics.Render(); };
    handlers.ready = [this](std::string& reason) {
      if (draining.load()) {
        reason = "draining (shutting down)";
        return false;
      }
      if (!ready.load()) {
        std::vector<std::string> down;
        for (const auto& bridge : bridges) {
          if (!bridge->Serving()) down.push_back(bridge->name());
        }
        reason = down.empty() ? "starting" : absl::StrCat("bridges not serving: ",
                                                          absl::StrJoin(down, ", "));
        return false;
      }
      return true;
    };
    auto http = StartAdminHttpServer(io.get_executor(), config.admin().listen(), std::move(handlers));
    if (!http.ok()) return http.status();
    admin_http = *std::move(http);
  }

  asio::post(control, [this] {
    ScheduleHealthPoll();
    ScheduleMemoryTrim();
  });
  if (options.handle_signals) {
    signals.add(SIGTERM);
    signals.add(SIGINT);
    WaitSignal();
  }
  log::Info("server", "listening",
            {{"grpc", grpc_address.empty() ? "-" : grpc_address},
             {"unix", unix_path.empty() ? "-" : unix_path},
             {"admin", admin_http ? admin_http->address() : "-"},
             {"bridges", std::to_string(bridges.size())}});
  return absl::OkStatus();
}

void Daemon::Impl::PublishHealth() {
  grpc::Server* const started = health_server.load(std::memory_order_acquire);
  if (draining.load() || started == nullptr) return;
  HealthService* health = health_service.get();
  bool all = true;
  for (const auto& bridge : bridges) {
    const bool serving = bridge->Serving();
    all = all && serving;
    for (const auto& name : bridge->ServiceNames()) health->SetServingStatus(name, serving);
  }
  health->SetServingStatus(std::string(kAdminServiceName), true);
  health->SetServingStatus("", all);
  if (ready.exchange(all) != all) {
    log::Info("server", all ? "ready" : "not ready");
  }
}

void Daemon::Impl::ScheduleHealthPoll() {
  if (draining.load()) return;
  health_timer.expires_after(kHealthPollInterval);
  health_timer.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    PublishHealth();
    // Counts of log lines summarised in a window that has ended, even if nothing else
    // is logged now.
    log::WriteEndedRepeats();
    ScheduleHealthPoll();
  });
}

void Daemon::Impl::ScheduleMemoryTrim() {
#ifdef __GLIBC__
  // Unset means the default; an explicit 0 disables trimming.
  const absl::Duration every =
      config.runtime().has_memory_trim_interval()
          ? ToDuration(config.runtime().memory_trim_interval(), absl::ZeroDuration())
          : absl::Seconds(5);
  if (every <= absl::ZeroDuration() || draining.load()) return;
  trim_timer.expires_after(absl::ToChronoNanoseconds(every));
  trim_timer.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    malloc_trim(0);
    ScheduleMemoryTrim();
  });
#endif
}

void Daemon::Impl::WaitSignal() {
  signals.async_wait([this](boost::system::error_code ec, int signal) {
    if (ec) return;
    if (++signals_seen > 1) {
      log::Warn("server", "second signal: exiting at once without draining",
                {{"signal", std::to_string(signal)}});
      if (!unix_path.empty()) unlink(unix_path.c_str());
      log::FlushRepeats();
      _exit(1);
    }
    log::Info("server", "signal received: draining", {{"signal", std::to_string(signal)}});
    BeginShutdown();
    WaitSignal();
  });
}

void Daemon::Impl::BeginShutdown() {
  {
    absl::MutexLock lock(&mu);
    if (shutdown_begun) return;
    shutdown_begun = true;
    shutdown_requested = true;
  }
  const absl::Duration drain_timeout = ToDuration(config.shutdown().drain_timeout(),
                                                  kDefaultDrainTimeout);
  const absl::Duration deadline = ToDuration(config.shutdown().deadline(), kDefaultDeadline);
  // Keep a slice of the deadline for the gRPC server's own shutdown and the exit.
  const absl::Duration reserve = std::min(absl::Seconds(1), deadline / 4);
  shutdown_started = absl::Now();
  exit_deadline = shutdown_started + deadline;
  bridges_deadline = exit_deadline - reserve;
  server_deadline = exit_deadline - reserve / 2;
  drain_end = std::min(shutdown_started + drain_timeout, bridges_deadline);

  draining = true;
  ready = false;
  health_timer.cancel();
  // Health goes NOT_SERVING at once for everything, and stays so.
  health_service->Shutdown();
  log::Info("server", "draining: health is NOT_SERVING, new calls are refused",
            {{"drain_timeout", absl::FormatDuration(drain_timeout)},
             {"deadline", absl::FormatDuration(deadline)}});
  for (const auto& bridge : bridges) bridge->BeginDrain();
  {
    absl::MutexLock lock(&mu);
    wait_bridges_until = bridges_deadline;
    server_deadline_locked = server_deadline;
  }
  if (options.exit_at_deadline) {
    const absl::Time exit_at = exit_deadline;
    watchdog = std::thread([this, exit_at] {
      absl::MutexLock lock(&mu);
      if (!mu.AwaitWithDeadline(absl::Condition(&finished), exit_at)) {
        log::Error("server", "shutdown deadline passed: exiting with calls still open");
        if (!unix_path.empty()) unlink(unix_path.c_str());
        log::FlushRepeats();
        _exit(0);
      }
    });
  }
  PollDrain();
}

void Daemon::Impl::PollDrain() {
  const int64_t open = rpc_tracker ? rpc_tracker->draining_calls() : 0;
  if (open == 0 || absl::Now() >= drain_end) {
    if (open != 0) {
      log::Info("server", "drain timeout: ending open calls", {{"open_calls", std::to_string(open)}});
    } else {
      log::Info("server", "drain complete: no client calls open");
    }
    ShutdownBridges();
    return;
  }
  auto wait = std::min(absl::ToChronoMilliseconds(drain_end - absl::Now()) +
                           std::chrono::milliseconds(1),
                       kDrainPollInterval);
  drain_timer.expires_after(wait);
  drain_timer.async_wait([this](boost::system::error_code ec) {
    if (!ec) PollDrain();
  });
}

void Daemon::Impl::ShutdownBridges() {
  auto pending = std::make_shared<std::atomic<size_t>>(bridges.size());
  auto one_done = [this, pending] {
    if (pending->fetch_sub(1) == 1) {
      absl::MutexLock lock(&mu);
      bridges_done = true;
    }
  };
  if (bridges.empty()) {
    absl::MutexLock lock(&mu);
    bridges_done = true;
    return;
  }
  const grpc::Status status(grpc::StatusCode::UNAVAILABLE, "server shutting down");
  for (const auto& bridge : bridges) {
    log::Info("server", "shutting down bridge", {{"bridge", bridge->name()}});
    bridge->Shutdown(status, one_done);
  }
}

void Daemon::Impl::StopIo(absl::Time grace_until) {
  if (admin_http) admin_http->Stop();
  asio::post(control, [this] {
    boost::system::error_code ignored;
    health_timer.cancel();
    drain_timer.cancel();
    trim_timer.cancel();
    signals.cancel(ignored);
  });
  work.clear();
  {
    // Let the io threads finish what the bridges' shutdown left (close handshakes);
    // whatever is still pending at `grace_until` is dropped.
    absl::MutexLock lock(&mu);
    mu.AwaitWithDeadline(absl::Condition(
                             +[](int* n) { return *n == 0; }, &running_io_threads),
                         grace_until);
  }
  for (auto& loop : io_loops) loop->stop();
  for (auto& t : threads) {
    if (t.joinable()) t.join();
  }
  threads.clear();
}

std::string Daemon::Impl::ListeningJson() const {
  boost::json::object line;
  line["event"] = "listening";
  if (!grpc_address.empty()) line["grpc"] = grpc_address;
  if (!unix_path.empty()) line["unix"] = unix_path;
  if (admin_http) line["admin"] = admin_http->address();
  return boost::json::serialize(line);
}

Daemon::Daemon(DaemonConfig config, core::BridgeRegistry& registry, DaemonOptions options)
    : impl_(std::make_unique<Impl>(std::move(config), registry, options)) {}

Daemon::~Daemon() {
  RequestShutdown();
  Wait();
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
}

absl::Status Daemon::Start() {
  {
    absl::MutexLock lock(&impl_->mu);
    if (impl_->started) return absl::FailedPreconditionError("Daemon::Start called twice");
  }
  absl::Status status = impl_->Start();
  if (!status.ok()) {
    log::Error("server", "start-up failed", {{"error", std::string(status.message())}});
    // Undo whatever did start; bridges are told to stop before their executor does.
    if (impl_->listener) impl_->listener->Stop();
    if (impl_->server) impl_->server->Shutdown(std::chrono::system_clock::now());
    impl_->ShutdownCqLoops();
    for (const auto& bridge : impl_->bridges) {
      bridge->Shutdown(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server failed to start"),
                       [] {});
    }
    impl_->StopIo(absl::Now());
    impl_->health_server.store(nullptr);
    impl_->server.reset();
    // Only a socket this daemon bound; never a file it refused to touch.
    if (impl_->unix_bound) unlink(impl_->unix_path.c_str());
    absl::MutexLock lock(&impl_->mu);
    impl_->finished = true;
    return status;
  }
  absl::MutexLock lock(&impl_->mu);
  impl_->started = true;
  return absl::OkStatus();
}

void Daemon::RequestShutdown() {
  {
    absl::MutexLock lock(&impl_->mu);
    if (!impl_->started || impl_->shutdown_begun) return;
    impl_->shutdown_requested = true;
  }
  asio::post(impl_->control, [impl = impl_.get()] { impl->BeginShutdown(); });
}

void Daemon::Wait() {
  Impl& d = *impl_;
  absl::Time server_deadline;
  {
    absl::MutexLock lock(&d.mu);
    if (!d.started || d.finished) return;
    // Wait for shutdown to begin, then for the bridges (bounded by the deadline).
    d.mu.Await(absl::Condition(
        +[](Impl* impl) ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl->mu) {
          return impl->wait_bridges_until != absl::InfiniteFuture();
        },
        &d));
    if (!d.mu.AwaitWithDeadline(absl::Condition(&d.bridges_done), d.wait_bridges_until)) {
      log::Warn("server", "bridges did not finish shutting down in time");
    }
    server_deadline = d.server_deadline_locked;
  }
  log::Info("server", "stopping the gRPC server");
  // No new caller connections from here; the server then ends the open ones.
  d.listener->Stop();
  // The drain is over and the bridges have ended their calls: whatever is still open
  // (health watches, reflection, admin) is cancelled now rather than at the deadline.
  // Blocks until the handlers are done, hence this thread.
  d.server->Shutdown(absl::ToChronoTime(std::min(server_deadline, absl::Now())));
  d.ShutdownCqLoops();
  d.StopIo(std::min(absl::Now() + absl::Seconds(2), d.exit_deadline));
  d.health_server.store(nullptr);
  d.server.reset();
  if (!d.unix_path.empty() && unlink(d.unix_path.c_str()) != 0 && errno != ENOENT) {
    log::Warn("server", "cannot remove unix socket",
              {{"path", d.unix_path}, {"error", std::strerror(errno)}});
  }
  log::FlushRepeats();  // what the last window held back is counted too
  log::Info("server", "stopped",
            {{"shutdown_seconds", absl::StrCat(absl::ToDoubleSeconds(absl::Now() - d.shutdown_started))}});
  absl::MutexLock lock(&d.mu);
  d.finished = true;
}

int Daemon::grpc_port() const { return impl_->grpc_port; }
int Daemon::admin_port() const { return impl_->admin_http ? impl_->admin_http->port() : 0; }
std::string Daemon::unix_socket_path() const { return impl_->unix_path; }
std::string Daemon::ListeningJson() const { return impl_->ListeningJson(); }
bool Daemon::ready() const { return impl_->ready.load(); }
core::MetricsRegistry& Daemon::metrics() { return impl_->metrics; }

}  // namespace wsbridge::daemon
