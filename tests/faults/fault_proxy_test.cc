// The fault proxy over real sockets: a small target server behind it (echo, or a sink
// that records what arrived), a blocking client in front. Timing is only ever asserted
// as a lower bound (a fault adds at least this much), never as an upper bound.
#include "tests/faults/fault_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/support/test_support.h"

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;

// A loopback TCP server: every accepted connection is echoed or sunk on its own thread.
class Target {
 public:
  enum class Kind { kEcho, kSink };
  explicit Target(Kind kind) : kind_(kind) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(listen_fd_, 16), 0);
    socklen_t len = sizeof a;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~Target() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : workers_) t.join();
    ::close(listen_fd_);
  }

  uint16_t port() const { return port_; }
  std::string received() {
    std::lock_guard<std::mutex> lock(mu_);
    return received_;
  }
  int accepted() const { return accepted_; }
  int ended() const { return ended_; }  // connections that saw EOF or an error
  int resets() const { return resets_; }

 private:
  // Polls so the threads notice stop_ without any socket being closed under them.
  static bool Readable(int fd, const std::atomic<bool>& stop) {
    while (!stop) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) > 0) return true;
    }
    return false;
  }

  void AcceptLoop() {
    while (Readable(listen_fd_, stop_)) {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) continue;
      ++accepted_;
      workers_.emplace_back([this, fd] { Serve(fd); });
    }
  }

  void Serve(int fd) {
    char buf[8192];
    while (Readable(fd, stop_)) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) {
        if (n < 0 && errno == ECONNRESET) ++resets_;
        ++ended_;
        break;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        received_.append(buf, n);
      }
      if (kind_ == Kind::kEcho) ::send(fd, buf, n, MSG_NOSIGNAL);
    }
    ::close(fd);
  }

  const Kind kind_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> workers_;  // acceptor thread only, until joined
  std::mutex mu_;
  std::string received_;
  std::atomic<int> accepted_{0}, ended_{0}, resets_{0};
};

// A blocking client socket with a 10 s receive bound (a hung proxy fails, not hangs).
class Client {
 public:
  explicit Client(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~Client() { ::close(fd_); }
  bool connected() const { return connected_; }
  bool Send(const std::string& s) {
    return ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
  }
  // Reads exactly n bytes; fewer on EOF, error or timeout (errno kept in last_errno()).
  std::string Read(size_t n) {
    std::string out;
    char buf[8192];
    while (out.size() < n) {
      ssize_t r = ::recv(fd_, buf, std::min(sizeof buf, n - out.size()), 0);
      if (r <= 0) {
        last_errno_ = r == 0 ? 0 : errno;
        eof_ = r == 0;
        break;
      }
      out.append(buf, r);
    }
    return out;
  }
  // Blocks until the peer ends the stream: 0 for a FIN, else the errno (ECONNRESET).
  int ReadUntilEnd() {
    char buf[4096];
    for (;;) {
      ssize_t r = ::recv(fd_, buf, sizeof buf, 0);
      if (r == 0) return 0;
      if (r < 0) return errno;
    }
  }
  // Nothing to read and no EOF right now: the connection is open and silent.
  bool OpenAndSilent() {
    char c;
    ssize_t r = ::recv(fd_, &c, 1, MSG_DONTWAIT);
    return r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  bool eof() const { return eof_; }
  int last_errno() const { return last_errno_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
  bool eof_ = false;
  int last_errno_ = 0;
};

std::string Pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + i / 251) & 0xff);
  return s;
}

TEST(FaultProxyTest, PassForwardsBothWaysInOrderAndCounts) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.connected());
  const std::string data = Pattern(200'000);
  std::thread writer([&] { EXPECT_TRUE(client.Send(data)); });
  EXPECT_EQ(client.Read(data.size()), data);
  writer.join();
  EXPECT_TRUE(WaitFor([&] { return proxy.counters().bytes_upstream_to_client == data.size(); }));
  ProxyCounters c = proxy.counters();
  EXPECT_EQ(c.connections_accepted, 1u);
  EXPECT_EQ(c.bytes_client_to_upstream, data.size());
  EXPECT_EQ(c.bytes_upstream_to_client, data.size());
  EXPECT_EQ(c.bytes_dropped, 0u);
}

TEST(FaultProxyTest, SlicingDeliversEveryByteInOrderOneWriteEach) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Shaping slice;
  slice.slice = true;
  proxy.SetShaping(Direction::kClientToUpstream, slice);
  proxy.SetShaping(Direction::kUpstreamToClient, slice);
  Client client(proxy.port());
  const std::string data = Pattern(5000);
  ASSERT_TRUE(client.Send(data));
  EXPECT_EQ(client.Read(data.size()), data);
  // The counters move just after each write completes, so the last may lag the read.
  EXPECT_TRUE(WaitFor([&] {
    ProxyCounters c = proxy.counters();
    return c.writes_client_to_upstream == data.size() &&
           c.writes_upstream_to_client == data.size();
  })) << proxy.counters().writes_client_to_upstream << " "
      << proxy.counters().writes_upstream_to_client;
}

TEST(FaultProxyTest, BlackHoleDeliversNothingWhileTheSocketStaysOpen) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("hello"));
  ASSERT_EQ(client.Read(5), "hello");
  proxy.SetMode(Direction::kClientToUpstream, Mode::kBlackHole);
  ASSERT_TRUE(client.Send(Pattern(1000)));
  ASSERT_TRUE(WaitFor([&] { return proxy.counters().bytes_dropped == 1000; }));
  EXPECT_EQ(target.received(), "hello");
  EXPECT_TRUE(client.OpenAndSilent());
  EXPECT_EQ(target.ended(), 0);
  // Healed, the same connection carries bytes again; what was swallowed stays lost.
  proxy.Heal();
  ASSERT_TRUE(client.Send("again"));
  EXPECT_EQ(client.Read(5), "again");
  EXPECT_EQ(target.received(), "helloagain");
}

TEST(FaultProxyTest, BlackHoleTowardsTheClientSwallowsAnswers) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  proxy.SetMode(Direction::kUpstreamToClient, Mode::kBlackHole);
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("ping"));
  ASSERT_TRUE(WaitFor([&] { return proxy.counters().bytes_dropped == 4; }));
  EXPECT_EQ(target.received(), "ping");
  EXPECT_TRUE(client.OpenAndSilent());
}

TEST(FaultProxyTest, ResetGivesTheReceiverEconnreset) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("x"));
  ASSERT_EQ(client.Read(1), "x");
  proxy.SetMode(Direction::kUpstreamToClient, Mode::kReset);
  EXPECT_EQ(client.ReadUntilEnd(), ECONNRESET);
  // The upstream side is closed as well (a FIN: the proxy's side of it is gone).
  EXPECT_TRUE(WaitFor([&] { return target.ended() == 1; }));
  EXPECT_TRUE(WaitFor([&] { return proxy.counters().connections_open == 0; }));
}

TEST(FaultProxyTest, ResetTowardsTheUpstreamResetsIt) {
  Target target(Target::Kind::kSink);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("x"));
  ASSERT_TRUE(WaitFor([&] { return target.received() == "x"; }));
  proxy.SetMode(Direction::kClientToUpstream, Mode::kReset);
  EXPECT_TRUE(WaitFor([&] { return target.resets() == 1; }));
  EXPECT_EQ(client.ReadUntilEnd(), 0);
}

TEST(FaultProxyTest, ResetAppliesToConnectionsAcceptedWhileSet) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  proxy.SetMode(Direction::kUpstreamToClient, Mode::kReset);
  for (int i = 0; i < 3; ++i) {
    Client client(proxy.port());
    ASSERT_TRUE(client.connected());
    EXPECT_EQ(client.ReadUntilEnd(), ECONNRESET);
  }
  EXPECT_EQ(proxy.counters().connections_accepted, 3u);
  proxy.Heal();
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("ok"));
  EXPECT_EQ(client.Read(2), "ok");
}

TEST(FaultProxyTest, CloseHalfClosesOneDirectionOnly) {
  Target target(Target::Kind::kSink);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.Send("before"));
  ASSERT_TRUE(WaitFor([&] { return target.received() == "before"; }));
  proxy.SetMode(Direction::kUpstreamToClient, Mode::kClose);
  EXPECT_EQ(client.ReadUntilEnd(), 0);  // a FIN, not a reset
  // The other direction still flows.
  ASSERT_TRUE(client.Send("after"));
  EXPECT_TRUE(WaitFor([&] { return target.received() == "beforeafter"; }));
  EXPECT_EQ(target.ended(), 0);
}

TEST(FaultProxyTest, DelayAddsAtLeastTheLatencyPerChunk) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Shaping delay;
  delay.delay = 150ms;
  proxy.SetShaping(Direction::kUpstreamToClient, delay);
  Client client(proxy.port());
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(client.Send("abc"));
  ASSERT_EQ(client.Read(3), "abc");
  EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
}

TEST(FaultProxyTest, BandwidthCapBoundsTheRate) {
  Target target(Target::Kind::kSink);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Shaping cap;
  cap.bytes_per_second = 100'000;
  proxy.SetShaping(Direction::kClientToUpstream, cap);
  Client client(proxy.port());
  const std::string data = Pattern(60'000);
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(client.Send(data));
  ASSERT_TRUE(WaitFor([&] { return target.received().size() == data.size(); }, 20s));
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(target.received(), data);
  // 60 kB at 100 kB/s take at least ~0.58 s (the first 2 kB piece goes at once). Only
  // the bound is checked: a busy machine may well be slower.
  EXPECT_GE(elapsed, 0.5) << "rate " << data.size() / elapsed << " B/s";
  EXPECT_LE(data.size() / elapsed, 125'000.0);
  EXPECT_GE(proxy.counters().writes_client_to_upstream, 29u);  // 2 kB pieces
}

TEST(FaultProxyTest, StallHoldsTheFirstBytesOfEveryNewConnection) {
  Target target(Target::Kind::kEcho);
  FaultProxy proxy(target.port());
  ASSERT_TRUE(proxy.Start().ok());
  Shaping stall;
  stall.stall_bytes = 16;
  stall.stall_for = 300ms;
  proxy.SetShaping(Direction::kUpstreamToClient, stall);
  for (int i = 0; i < 2; ++i) {
    Client client(proxy.port());
    auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(client.Send("hello"));
    ASSERT_EQ(client.Read(5), "hello");
    EXPECT_GE(std::chrono::steady_clock::now() - start, 250ms);
    // Later bytes on the same connection are not stalled again; order is kept.
    ASSERT_TRUE(client.Send(Pattern(100)));
    EXPECT_EQ(client.Read(100), Pattern(100));
  }
}

TEST(FaultProxyTest, UnreachableTargetResetsTheClient) {
  uint16_t dead_port;
  {
    Target gone(Target::Kind::kEcho);
    dead_port = gone.port();
  }
  FaultProxy proxy(dead_port);
  ASSERT_TRUE(proxy.Start().ok());
  Client client(proxy.port());
  ASSERT_TRUE(client.connected());
  EXPECT_EQ(client.ReadUntilEnd(), ECONNRESET);
}

TEST(FaultProxyTest, StopEndsOpenAndStalledConnections) {
  Target target(Target::Kind::kEcho);
  auto proxy = std::make_unique<FaultProxy>(target.port());
  ASSERT_TRUE(proxy->Start().ok());
  Shaping stall;
  stall.stall_bytes = 1;
  stall.stall_for = std::chrono::hours(1);
  proxy->SetShaping(Direction::kUpstreamToClient, stall);
  Client client(proxy->port());
  ASSERT_TRUE(client.Send("x"));
  ASSERT_TRUE(WaitFor([&] { return target.received() == "x"; }));
  proxy.reset();  // must not wait for the hour
  EXPECT_EQ(client.ReadUntilEnd(), 0);
}

}  // namespace
}  // namespace wsbridge::faults
