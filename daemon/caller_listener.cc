#include "daemon/caller_listener.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define WSBRIDGE_UNDER_TSAN 1
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#endif

namespace wsbridge::daemon {
namespace {

// fstat of a descriptor number this listener handed to gRPC. The number may have been
// closed and reused by any thread since (that is what the sweep checks, by inode), and
// ThreadSanitizer reports such a reuse as a race on the descriptor; the probe is racy by
// design, so TSan is told to ignore it.
int ProbeHanded(int fd, struct stat* st) {
#ifdef WSBRIDGE_UNDER_TSAN
  __tsan_ignore_thread_begin();
  const int rc = fstat(fd, st);
  __tsan_ignore_thread_end();
  return rc;
#else
  return fstat(fd, st);
#endif
}

// How often the accept thread checks which handed-over connections gRPC has closed, for
// the gauge (the cap itself checks at once when it is reached).
constexpr std::chrono::seconds kSweepInterval{1};
// After the process ran out of descriptors (EMFILE), the listening socket stays readable:
// wait this long before accepting again instead of spinning.
constexpr std::chrono::milliseconds kOutOfDescriptorsPause{100};
// Connections accepted from one listening socket before the others get a turn.
constexpr int kAcceptBatch = 64;

std::string PeerName(const sockaddr_storage& addr) {
  char text[INET6_ADDRSTRLEN] = {};
  if (addr.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(addr);
    inet_ntop(AF_INET, &in.sin_addr, text, sizeof(text));
    return absl::StrCat(text, ":", ntohs(in.sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(addr);
    inet_ntop(AF_INET6, &in6.sin6_addr, text, sizeof(text));
    return absl::StrCat("[", text, "]:", ntohs(in6.sin6_port));
  }
  return "unix socket";
}

int BoundPort(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return 0;
  if (addr.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in&>(addr).sin_port);
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6&>(addr).sin6_port);
  return 0;
}

void SetPort(sockaddr* addr, int port) {
  if (addr->sa_family == AF_INET) reinterpret_cast<sockaddr_in*>(addr)->sin_port = htons(port);
  if (addr->sa_family == AF_INET6) reinterpret_cast<sockaddr_in6*>(addr)->sin6_port = htons(port);
}

// A listening TCP socket on `addr`; `dual_stack` accepts IPv4 on an IPv6 wildcard.
absl::StatusOr<int> ListenOn(const sockaddr* addr, socklen_t len, bool dual_stack) {
  int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::ErrnoToStatus(errno, "socket()");
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (addr->sa_family == AF_INET6) {
    const int v6only = dual_stack ? 0 : 1;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
  }
  if (bind(fd, addr, len) != 0 || listen(fd, SOMAXCONN) != 0) {
    const int err = errno;
    close(fd);
    return absl::ErrnoToStatus(err, "bind/listen");
  }
  return fd;
}

}  // namespace

CallerListener::CallerListener(Options options) : options_(options) {
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

CallerListener::~CallerListener() {
  Stop();
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::StatusOr<int> CallerListener::ListenTcp(const std::string& host_port, Acceptor acceptor) {
  // "[v6]:port", "host:port" or ":port".
  std::string host, port_text;
  if (!host_port.empty() && host_port[0] == '[') {
    const size_t close_bracket = host_port.find(']');
    if (close_bracket == std::string::npos || close_bracket + 1 >= host_port.size() ||
        host_port[close_bracket + 1] != ':') {
      return absl::InvalidArgumentError(absl::StrCat(
          "server.listen: \"", host_port, "\" is not [ipv6]:port (e.g. \"[::]:50051\")"));
    }
    host = host_port.substr(1, close_bracket - 1);
    port_text = host_port.substr(close_bracket + 2);
  } else {
    const size_t colon = host_port.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "server.listen: \"", host_port, "\" has no port; write host:port (e.g. \"127.0.0.1:50051\")"));
    }
    host = host_port.substr(0, colon);
    port_text = host_port.substr(colon + 1);
  }
  int port = -1;
  if (!absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server.listen: \"", port_text, "\" in \"", host_port, "\" is not a port (0-65535)"));
  }

  std::vector<int> fds;
  auto fail = [&](absl::Status status) {
    for (int fd : fds) close(fd);
    return absl::UnavailableError(absl::StrCat("cannot listen on ", host_port, ": ",
                                               status.message()));
  };
  if (host.empty() || host == "::" || host == "0.0.0.0") {
    // Every address, IPv4 and IPv6 on one socket where the host has IPv6.
    sockaddr_in6 any6{};
    any6.sin6_family = AF_INET6;
    any6.sin6_addr = in6addr_any;
    any6.sin6_port = htons(port);
    auto fd = ListenOn(reinterpret_cast<sockaddr*>(&any6), sizeof(any6), /*dual_stack=*/true);
    if (!fd.ok()) {
      sockaddr_in any4{};
      any4.sin_family = AF_INET;
      any4.sin_addr.s_addr = htonl(INADDR_ANY);
      any4.sin_port = htons(port);
      fd = ListenOn(reinterpret_cast<sockaddr*>(&any4), sizeof(any4), false);
    }
    if (!fd.ok()) return fail(fd.status());
    fds.push_back(*fd);
  } else {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    const std::string service = std::to_string(port);
    if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0) {
      return absl::InvalidArgumentError(absl::StrCat("server.listen: cannot resolve \"", host,
                                                     "\": ", gai_strerror(rc)));
    }
    // Every address the name has (localhost: 127.0.0.1 and ::1), on one port: with port
    // 0, the one the first bind got.
    absl::Status first_error;
    int bound_port = port;
    for (addrinfo* ai = found; ai != nullptr; ai = ai->ai_next) {
      if (bound_port != 0) SetPort(ai->ai_addr, bound_port);
      auto fd = ListenOn(ai->ai_addr, ai->ai_addrlen, /*dual_stack=*/false);
      if (!fd.ok()) {
        if (first_error.ok()) first_error = fd.status();
        continue;
      }
      fds.push_back(*fd);
      if (bound_port == 0) bound_port = BoundPort(*fd);
    }
    freeaddrinfo(found);
    if (fds.empty()) return fail(first_error);
  }
  const int bound = BoundPort(fds.front());
  // One acceptor serves every socket of this address.
  std::shared_ptr<grpc::experimental::ExternalConnectionAcceptor> shared = std::move(acceptor);
  for (int fd : fds) {
    Listening l;
    l.fd = fd;
    l.name = host_port;
    l.acceptor = shared;
    listening_.push_back(std::move(l));
  }
  return bound;
}

absl::Status CallerListener::ListenUnix(const std::string& path, Acceptor acceptor) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("server.unix_socket: path is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::ErrnoToStatus(errno, "server.unix_socket: socket()");
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(fd, SOMAXCONN) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen on unix:", path, ": ", std::strerror(err)));
  }
  Listening l;
  l.fd = fd;
  l.unix_socket = true;
  l.name = "unix:" + path;
  l.acceptor = std::move(acceptor);
  listening_.push_back(std::move(l));
  return absl::OkStatus();
}

void CallerListener::Start() {
  if (thread_.joinable() || listening_.empty()) return;
  thread_ = std::thread([this] { Run(); });
}

void CallerListener::Stop() {
  if (stopping_.exchange(true)) return;
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  for (auto& l : listening_) {
    if (l.fd >= 0) close(l.fd);
    l.fd = -1;
  }
}

size_t CallerListener::OpenConnections() {
  absl::MutexLock lock(&mu_);
  SweepLocked();
  return handed_.size();
}

void CallerListener::SweepLocked() {
  size_t kept = 0;
  for (const Handed& h : handed_) {
    struct stat st {};
    // Gone: the descriptor is closed, or its number now names another file.
    if (ProbeHanded(h.fd, &st) != 0 || st.st_ino != h.ino || st.st_dev != h.dev) continue;
    handed_[kept++] = h;
  }
  handed_.resize(kept);
  if (options_.open != nullptr) options_.open->Set(static_cast<int64_t>(kept));
}

void CallerListener::Run() {
  using Clock = std::chrono::steady_clock;
  std::vector<pollfd> fds;
  for (const auto& l : listening_) fds.push_back({l.fd, POLLIN, 0});
  fds.push_back({wake_fd_, POLLIN, 0});
  Clock::time_point paused_until{};  // out of descriptors: accept nothing until then
  Clock::time_point next_sweep = Clock::now() + kSweepInterval;
  while (!stopping_.load()) {
    Clock::time_point now = Clock::now();
    if (now >= next_sweep) {
      // On time even while connections keep arriving: without a cap nothing else would
      // drop the closed ones, and the gauge stays current.
      absl::MutexLock lock(&mu_);
      SweepLocked();
      next_sweep = now + kSweepInterval;
    }
    // While paused only the wake-up descriptor is watched.
    const bool paused = now < paused_until;
    const Clock::time_point wake_at = paused ? std::min(next_sweep, paused_until) : next_sweep;
    const auto timeout = std::chrono::ceil<std::chrono::milliseconds>(wake_at - now);
    const int rc = poll(paused ? &fds.back() : fds.data(), paused ? 1 : fds.size(),
                        static_cast<int>(std::max<int64_t>(timeout.count(), 0)));
    if (stopping_.load()) break;
    if (rc < 0) {
      if (errno == EINTR) continue;
      log::Error("server", "caller listener: poll failed; no more caller connections",
                 {{"error", std::strerror(errno)}});
      break;
    }
    if (rc == 0 || paused) continue;
    for (size_t i = 0; i + 1 < fds.size(); ++i) {
      const short revents = fds[i].revents;
      if ((revents & POLLIN) == 0) {
        if ((revents & (POLLERR | POLLNVAL)) != 0) {
          // Never expected of a listening socket; poll would report it again at once.
          log::Error("server", "caller listener: the listening socket failed",
                     {{"listen", listening_[i].name}});
          fds[i].fd = -1;  // poll skips it from now on
        }
        continue;
      }
      for (int n = 0; n < kAcceptBatch; ++n) {
        sockaddr_storage peer{};
        socklen_t len = sizeof(peer);
        int fd = accept4(listening_[i].fd, reinterpret_cast<sockaddr*>(&peer), &len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
          if (errno == EINTR || errno == ECONNABORTED) continue;
          if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            log::Warn("server", "cannot accept a caller connection: out of resources",
                      {{"listen", listening_[i].name}, {"error", std::strerror(errno)}});
            paused_until = Clock::now() + kOutOfDescriptorsPause;
          } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
            log::Warn("server", "cannot accept a caller connection",
                      {{"listen", listening_[i].name}, {"error", std::strerror(errno)}});
          }
          break;
        }
        Admit(i, fd, peer);
      }
    }
  }
}

void CallerListener::Admit(size_t index, int fd, const sockaddr_storage& peer) {
  Listening& l = listening_[index];
  struct stat st {};
  {
    absl::MutexLock lock(&mu_);
    if (options_.max_connections != 0 && handed_.size() >= options_.max_connections) {
      SweepLocked();
    }
    if (options_.max_connections != 0 && handed_.size() >= options_.max_connections) {
      // Counted before the close, so a caller that saw it can already read the count.
      refused_.fetch_add(1, std::memory_order_relaxed);
      if (options_.refused != nullptr) options_.refused->Inc();
      close(fd);
      log::Warn("server",
                "caller connection refused: server.connections.max_connections reached",
                {{"listen", l.name},
                 {"peer", PeerName(peer)},
                 {"max_connections", std::to_string(options_.max_connections)}});
      return;
    }
    if (fstat(fd, &st) != 0) {
      close(fd);
      return;
    }
    handed_.push_back({fd, st.st_dev, st.st_ino});
    if (options_.open != nullptr) options_.open->Set(static_cast<int64_t>(handed_.size()));
  }
  if (!l.unix_socket) {
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  grpc::experimental::ExternalConnectionAcceptor::NewConnectionParameters p;
  p.listener_fd = l.fd;
  p.fd = fd;
  l.acceptor->HandleNewConnection(&p);
}

}  // namespace wsbridge::daemon
