// The daemon's own listening sockets for callers (server.listen and server.unix_socket).
//
// gRPC 1.51 has no cap on the number of connections a server holds, so wsbridged
// accepts callers itself and hands each connection to the gRPC server through its
// ExternalConnectionAcceptor (TLS, mTLS and plaintext alike: the server still does the
// handshake with the listener's credentials). A connection beyond
// server.connections.max_connections is closed as soon as it is accepted, counted in
// wsbridge_server_connections_refused_total and logged (repeats summarised); the callers
// already connected are not touched.
//
// Counting needs to know when gRPC has closed a connection, which the acceptor does
// not say: each connection handed over is remembered by its descriptor and the socket's
// inode, and an entry whose descriptor no longer names that socket is gone (a socket's
// inode is unique while it is open, so a descriptor number reused for another file is
// not mistaken for the old connection). The list is checked whenever the cap is reached
// and once a second for the gauge wsbridge_server_connections.
#ifndef WSBRIDGE_DAEMON_CALLER_LISTENER_H_
#define WSBRIDGE_DAEMON_CALLER_LISTENER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/server_builder.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/metrics.h"

namespace wsbridge::daemon {

class CallerListener {
 public:
  struct Options {
    // 0: no cap.
    size_t max_connections = 0;
    core::Counter* refused = nullptr;  // may be null
    core::Gauge* open = nullptr;       // may be null
  };
  explicit CallerListener(Options options);
  ~CallerListener();  // Stop()
  CallerListener(const CallerListener&) = delete;
  CallerListener& operator=(const CallerListener&) = delete;

  using Acceptor = std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor>;

  // Binds and listens on `host_port` ("127.0.0.1:0", "[::]:50051", "localhost:50051",
  // ":50051" for every address); every address the host resolves to is bound, on one
  // port. Returns the port. Call before the server starts; accepting begins at Start().
  absl::StatusOr<int> ListenTcp(const std::string& host_port, Acceptor acceptor);
  // Binds and listens on the Unix socket `path` (the caller sets the umask and checks
  // the path beforehand).
  absl::Status ListenUnix(const std::string& path, Acceptor acceptor);

  // Starts accepting (the gRPC server must have started).
  void Start();
  // Closes the listening sockets and stops accepting; connections already handed over
  // stay the server's. Idempotent.
  void Stop();

  // Connections handed to gRPC and not yet closed (checked now).
  size_t OpenConnections();
  uint64_t Refused() const { return refused_.load(std::memory_order_relaxed); }

 private:
  struct Listening {
    int fd = -1;
    bool unix_socket = false;
    std::string name;  // for logs
    // Shared by the sockets of one address (localhost: 127.0.0.1 and ::1).
    std::shared_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor;
  };
  struct Handed {
    int fd;
    dev_t dev;
    ino_t ino;
  };

  void Run();
  // Hands `fd` to the gRPC server, or closes it when the cap is reached.
  void Admit(size_t index, int fd, const sockaddr_storage& peer);
  void SweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  std::vector<Listening> listening_;
  int wake_fd_ = -1;  // eventfd: Stop() wakes the accept thread
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> refused_{0};
  absl::Mutex mu_;
  std::vector<Handed> handed_ ABSL_GUARDED_BY(mu_);
};

}  // namespace wsbridge::daemon

#endif  // WSBRIDGE_DAEMON_CALLER_LISTENER_H_
