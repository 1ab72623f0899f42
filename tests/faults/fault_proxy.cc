#include "tests/faults/fault_proxy.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "absl/strings/str_cat.h"

namespace wsbridge::faults {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

int Index(Direction d) { return d == Direction::kClientToUpstream ? 0 : 1; }

struct DirConfig {
  Mode mode = Mode::kPass;
  Shaping shaping;
};

// One proxied connection. Touched only on the io thread.
struct Conn {
  explicit Conn(asio::io_context& io, tcp::socket c)
      : client(std::move(c)), upstream(io), timers{asio::steady_timer(io), asio::steady_timer(io)} {}

  tcp::socket& From(int dir) { return dir == 0 ? client : upstream; }
  tcp::socket& To(int dir) { return dir == 0 ? upstream : client; }

  tcp::socket client;
  tcp::socket upstream;
  std::array<asio::steady_timer, 2> timers;
  Clock::time_point start = Clock::now();
  std::array<uint64_t, 2> forwarded{0, 0};
  std::array<bool, 2> half_closed{false, false};
  bool dead = false;
  int pumps_done = 0;
};

// RST instead of FIN: linger on with a zero timeout, then close.
void Abort(tcp::socket& s) {
  boost::system::error_code ig;
  if (!s.is_open()) return;
  s.set_option(asio::socket_base::linger(true, 0), ig);
  s.close(ig);
}

void Kill(Conn& c) {
  boost::system::error_code ig;
  c.dead = true;
  for (auto& t : c.timers) t.cancel();
  c.client.close(ig);
  c.upstream.close(ig);
}

}  // namespace

struct FaultProxy::Impl {
  explicit Impl(uint16_t target) : target_port(target), acceptor(io), guard(io.get_executor()) {}

  DirConfig Config(int dir) {
    std::lock_guard<std::mutex> lock(mu);
    return config[dir];
  }

  // Reset and close act on the receiving socket of the direction.
  void Apply(Conn& c, int dir, Mode mode) {
    if (c.dead) return;
    boost::system::error_code ig;
    if (mode == Mode::kReset) {
      Abort(c.To(dir));
      Kill(c);  // the sender's side is closed normally (FIN)
    } else if (mode == Mode::kClose && !c.half_closed[dir]) {
      c.half_closed[dir] = true;
      c.To(dir).shutdown(tcp::socket::shutdown_send, ig);
    }
  }

  asio::awaitable<void> Pump(std::shared_ptr<Conn> c, int dir) {
    std::vector<char> buf(16 * 1024);
    Clock::time_point send_at = Clock::now();  // bandwidth cap: when the next byte may go
    while (!c->dead && !c->half_closed[dir]) {
      auto [ec, n] = co_await c->From(dir).async_read_some(asio::buffer(buf), kTuple);
      if (c->dead) break;
      if (ec) {
        boost::system::error_code ig;
        if (ec == asio::error::eof) {
          c->To(dir).shutdown(tcp::socket::shutdown_send, ig);  // pass the FIN on
        } else {
          Abort(c->To(dir));  // pass the reset on
          Kill(*c);
        }
        break;
      }
      DirConfig cfg = Config(dir);
      if (c->half_closed[dir]) break;
      if (cfg.mode == Mode::kBlackHole) {
        dropped += n;
        continue;
      }
      if (cfg.mode != Mode::kPass) {
        Apply(*c, dir, cfg.mode);
        break;
      }
      const Shaping& s = cfg.shaping;
      auto& timer = c->timers[dir];
      if (s.stall_bytes > 0 && c->forwarded[dir] < s.stall_bytes) {
        timer.expires_at(c->start + s.stall_for);
        co_await timer.async_wait(kTuple);
        if (c->dead) break;
      }
      if (s.delay.count() > 0) {
        timer.expires_after(s.delay);
        co_await timer.async_wait(kTuple);
        if (c->dead) break;
      }
      // Pieces of ~20 ms at the cap so the rate holds within a chunk too.
      size_t piece_max = n;
      if (s.slice) piece_max = 1;
      if (s.bytes_per_second > 0) {
        piece_max = std::min<size_t>(piece_max, std::max<uint64_t>(1, s.bytes_per_second / 50));
      }
      size_t off = 0;
      bool failed = false;
      while (off < n && !c->dead) {
        size_t piece = std::min(piece_max, n - off);
        if (s.bytes_per_second > 0) {
          send_at = std::max(send_at, Clock::now());
          timer.expires_at(send_at);
          co_await timer.async_wait(kTuple);
          if (c->dead) break;
          send_at += std::chrono::duration_cast<Clock::duration>(
              std::chrono::duration<double>(static_cast<double>(piece) / s.bytes_per_second));
        }
        auto [wec, written] =
            co_await asio::async_write(c->To(dir), asio::buffer(buf.data() + off, piece), kTuple);
        if (wec) {
          failed = true;
          break;
        }
        off += written;
        c->forwarded[dir] += written;
        bytes[dir] += written;
        ++writes[dir];
      }
      if (failed) {
        Kill(*c);
        break;
      }
    }
    if (++c->pumps_done == 2) {
      Kill(*c);
      conns.erase(c);
      --open;
    }
  }

  asio::awaitable<void> Serve(tcp::socket client) {
    auto c = std::make_shared<Conn>(io, std::move(client));
    conns.insert(c);
    ++open;
    auto [ec] = co_await c->upstream.async_connect(
        tcp::endpoint(asio::ip::address_v4::loopback(), target_port), kTuple);
    if (ec || stopping) {
      Abort(c->client);
      Kill(*c);
      conns.erase(c);
      --open;
      co_return;
    }
    boost::system::error_code ig;
    c->client.set_option(tcp::no_delay(true), ig);
    c->upstream.set_option(tcp::no_delay(true), ig);
    for (int dir : {0, 1}) {
      asio::co_spawn(io, Pump(c, dir), asio::detached);
    }
    // Faults set before this connection existed apply to it too.
    for (int dir : {0, 1}) Apply(*c, dir, Config(dir).mode);
  }

  asio::awaitable<void> Accept() {
    for (;;) {
      auto [ec, s] = co_await acceptor.async_accept(kTuple);
      if (ec) {
        if (!acceptor.is_open()) co_return;
        continue;
      }
      ++accepted;
      asio::co_spawn(io, Serve(std::move(s)), asio::detached);
    }
  }

  const uint16_t target_port;
  asio::io_context io;
  tcp::acceptor acceptor;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  std::thread thread;
  uint16_t port = 0;
  bool started = false;
  bool stopping = false;  // io thread only

  std::mutex mu;
  std::array<DirConfig, 2> config;

  std::set<std::shared_ptr<Conn>> conns;  // io thread only
  std::atomic<uint64_t> accepted{0}, open{0}, dropped{0};
  std::array<std::atomic<uint64_t>, 2> bytes{};
  std::array<std::atomic<uint64_t>, 2> writes{};
};

FaultProxy::FaultProxy(uint16_t target_port) : impl_(std::make_shared<Impl>(target_port)) {}

FaultProxy::~FaultProxy() { Stop(); }

absl::Status FaultProxy::Start() {
  boost::system::error_code ec;
  tcp::endpoint ep(asio::ip::address_v4::loopback(), 0);
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return absl::InternalError(absl::StrCat("fault proxy: cannot listen on 127.0.0.1: ", ec.message()));
  impl_->port = impl_->acceptor.local_endpoint().port();
  asio::co_spawn(impl_->io, impl_->Accept(), asio::detached);
  impl_->started = true;
  impl_->thread = std::thread([impl = impl_.get()] { impl->io.run(); });
  return absl::OkStatus();
}

void FaultProxy::Stop() {
  if (!impl_->started || !impl_->thread.joinable()) return;
  asio::post(impl_->io, [impl = impl_.get()] {
    impl->stopping = true;
    boost::system::error_code ig;
    impl->acceptor.close(ig);
    for (const auto& c : impl->conns) Kill(*c);
    impl->guard.reset();  // run() returns once every connection has wound down
  });
  impl_->thread.join();
}

uint16_t FaultProxy::port() const { return impl_->port; }

void FaultProxy::SetMode(Direction d, Mode m) {
  int dir = Index(d);
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->config[dir].mode = m;
  }
  if (m == Mode::kReset || m == Mode::kClose) {
    asio::post(impl_->io, [impl = impl_.get(), dir, m] {
      // Copy: Apply may end connections, which removes them from the set.
      std::vector<std::shared_ptr<Conn>> all(impl->conns.begin(), impl->conns.end());
      for (const auto& c : all) impl->Apply(*c, dir, m);
    });
  }
}

void FaultProxy::SetShaping(Direction d, Shaping s) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->config[Index(d)].shaping = s;
}

void FaultProxy::Heal() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->config = {};
}

ProxyCounters FaultProxy::counters() const {
  ProxyCounters out;
  out.connections_accepted = impl_->accepted.load();
  out.connections_open = impl_->open.load();
  out.bytes_client_to_upstream = impl_->bytes[0].load();
  out.bytes_upstream_to_client = impl_->bytes[1].load();
  out.bytes_dropped = impl_->dropped.load();
  out.writes_client_to_upstream = impl_->writes[0].load();
  out.writes_upstream_to_client = impl_->writes[1].load();
  return out;
}

}  // namespace wsbridge::faults
