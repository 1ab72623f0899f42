// A TCP fault proxy for tests: listens on 127.0.0.1 (port 0) and forwards bytes to a
// target, with faults switchable per direction at run time from any thread. It only
// forwards bytes, so it is transparent to TLS and WebSocket alike.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"

namespace wsbridge::faults {

enum class Direction {
  kClientToUpstream,  // bytes the proxy's caller sends, towards the target
  kUpstreamToClient,  // bytes the target answers, towards the caller
};

// What happens to a direction's bytes. Reset and close act at once on every open
// connection when set, and on every connection accepted while they stay set.
enum class Mode {
  kPass,       // forward (subject to the shaping below)
  kReset,      // the receiving socket is aborted with RST (SO_LINGER 0); the peer gets FIN
  kClose,      // the receiving socket gets FIN (half-close); the other direction goes on
  kBlackHole,  // sockets stay open, bytes are read and dropped: nothing passes
};

// Shaping applied to forwarded bytes of one direction (kPass only).
struct Shaping {
  std::chrono::milliseconds delay{0};  // fixed latency added to every chunk read
  bool slice = false;                  // write one byte per write (TCP_NODELAY)
  uint64_t bytes_per_second = 0;       // bandwidth cap; 0 = none
  // Of each new connection, the first `stall_bytes` bytes are held until the connection
  // is `stall_for` old (a stalled TLS or HTTP upgrade handshake). 0 = off.
  size_t stall_bytes = 0;
  std::chrono::milliseconds stall_for{0};
};

struct ProxyCounters {
  uint64_t connections_accepted = 0;
  uint64_t connections_open = 0;
  uint64_t bytes_client_to_upstream = 0;  // delivered to the target
  uint64_t bytes_upstream_to_client = 0;  // delivered to the caller
  uint64_t bytes_dropped = 0;             // read while black-holed
  uint64_t writes_client_to_upstream = 0;  // write calls (slicing makes one per byte)
  uint64_t writes_upstream_to_client = 0;
};

class FaultProxy {
 public:
  // `target_port` on 127.0.0.1.
  explicit FaultProxy(uint16_t target_port);
  ~FaultProxy();  // Stop()s
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  absl::Status Start();
  void Stop();  // idempotent; closes every connection
  uint16_t port() const;

  void SetMode(Direction d, Mode m);
  void SetShaping(Direction d, Shaping s);
  // Both directions back to kPass with no shaping.
  void Heal();
  ProxyCounters counters() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace wsbridge::faults
