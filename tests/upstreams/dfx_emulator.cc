#include "tests/upstreams/dfx_emulator.h"

#include <algorithm>
#include <map>
#include <random>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::emulator {

using upstreams::HandshakeInfo;
using upstreams::WsServer;
using upstreams::WsServerConnection;
using upstreams::WsServerHandler;
using upstreams::WsServerOptions;

struct DfxEmulator::Impl {
  explicit Impl(DfxEmulatorOptions o)
      : options(std::move(o)), proto(MakeProtocolOptions(options)) {}

  static DfxProtocolOptions MakeProtocolOptions(const DfxEmulatorOptions& o) {
    DfxProtocolOptions p;
    p.tokens = o.tokens;
    p.rate_window = o.rate_window;
    p.id_seed = std::random_device{}() * 0x100000001ULL ^ std::random_device{}();
    return p;
  }

  // The vendor client always asks for `json`. Choice: without it the upgrade is
  // refused with HTTP 400 (a real gateway rejects what it cannot speak rather than
  // accept and then fail on every frame).
  absl::Status OnHandshake(const HandshakeInfo& info, std::string* subprotocol) {
    const auto& p = info.requested_subprotocols;
    if (std::find(p.begin(), p.end(), "json") == p.end()) {
      return absl::InvalidArgumentError(
          "this endpoint speaks the \"json\" subprotocol only; request it in "
          "Sec-WebSocket-Protocol");
    }
    *subprotocol = "json";
    return absl::OkStatus();
  }

  void OnOpen(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns[c->id()] = c;
    ++opened;
    proto.OnOpen(c->id());
  }

  void OnMessage(const std::shared_ptr<WsServerConnection>& c, std::string_view data) {
    absl::MutexLock lock(&mu);
    DfxClock::time_point now = DfxClock::now();
    const int logins_before = proto.logins();
    Perform(proto.OnFrame(c->id(), data, now), now);
    // Queued behind the login's answer on the connection's strand.
    if (close_after_login >= 0 && proto.logins() > logins_before) {
      c->Close(static_cast<uint16_t>(close_after_login), close_after_login_reason);
    }
  }

  void OnClose(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns.erase(c->id());
    proto.OnClose(c->id());
    // 0 when the socket ended without a close handshake.
    close_codes.push_back(c->remote_close_code());
  }

  // Runs under mu so answers leave in the order the protocol produced them; the
  // connection methods only post to the connection's strand.
  void Perform(std::vector<DfxAction> actions, DfxClock::time_point received)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    for (DfxAction& a : actions) {
      if (a.delay.count() > 0) {
        pending.emplace(std::make_pair(received + a.delay, next_seq++), std::move(a));
        cv.Signal();  // the scheduler may be waiting for a later (or no) due time
      } else {
        Execute(a);
      }
    }
  }

  void Execute(const DfxAction& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = conns.find(a.conn);
    if (it == conns.end()) return;  // closed meanwhile
    switch (a.kind) {
      case DfxAction::Kind::kSend:
        it->second->Send(a.bytes, /*binary=*/true);
        break;
      case DfxAction::Kind::kClose:
        it->second->Close(a.close_code, a.close_reason);
        break;
      case DfxAction::Kind::kDrop:
        it->second->Drop();
        break;
    }
  }

  // Delayed answers and results, due-time order (ties in production order).
  void SchedulerLoop() {
    absl::MutexLock lock(&mu);
    while (!stopping) {
      if (pending.empty()) {
        cv.Wait(&mu);
        continue;
      }
      auto due = pending.begin()->first.first;
      DfxClock::time_point now = DfxClock::now();
      if (due > now) {
        cv.WaitWithTimeout(&mu, absl::FromChrono(due - now));
        continue;
      }
      DfxAction a = std::move(pending.begin()->second);
      pending.erase(pending.begin());
      Execute(a);
    }
  }

  const DfxEmulatorOptions options;
  mutable absl::Mutex mu;
  absl::CondVar cv;
  DfxProtocol proto ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<WsServerConnection>> conns ABSL_GUARDED_BY(mu);
  std::map<std::pair<DfxClock::time_point, uint64_t>, DfxAction> pending ABSL_GUARDED_BY(mu);
  uint64_t next_seq ABSL_GUARDED_BY(mu) = 0;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::vector<int> close_codes ABSL_GUARDED_BY(mu);
  int opened ABSL_GUARDED_BY(mu) = 0;
  int close_after_login ABSL_GUARDED_BY(mu) = -1;
  std::string close_after_login_reason ABSL_GUARDED_BY(mu);
  std::unique_ptr<WsServer> server;
  std::thread scheduler;
};

DfxEmulator::DfxEmulator(DfxEmulatorOptions options)
    : impl_(std::make_shared<Impl>(std::move(options))) {}

DfxEmulator::~DfxEmulator() { Stop(); }

absl::Status DfxEmulator::Start() {
  if (impl_->server) return absl::FailedPreconditionError("DfxEmulator already started");
  WsServerOptions so;
  so.listen = impl_->options.listen;
  so.tls = impl_->options.tls;
  so.cert_pem = impl_->options.cert_pem;
  so.key_pem = impl_->options.key_pem;
  so.tls_max_version = impl_->options.tls_max_version;
  so.max_message_bytes = 16u << 20;
  Impl* impl = impl_.get();  // the server is stopped (threads joined) before impl dies
  WsServerHandler h;
  h.on_handshake = [impl](const HandshakeInfo& info, std::string* sub) {
    return impl->OnHandshake(info, sub);
  };
  h.on_open = [impl](const std::shared_ptr<WsServerConnection>& c) { impl->OnOpen(c); };
  h.on_message = [impl](const std::shared_ptr<WsServerConnection>& c, std::string_view data,
                        bool /*binary*/) { impl->OnMessage(c, data); };
  h.on_close = [impl](const std::shared_ptr<WsServerConnection>& c, const absl::Status&) {
    impl->OnClose(c);
  };
  auto server = std::make_unique<WsServer>(std::move(so), std::move(h));
  if (absl::Status st = server->Start(); !st.ok()) return st;
  impl_->server = std::move(server);
  impl_->scheduler = std::thread([impl] { impl->SchedulerLoop(); });
  return absl::OkStatus();
}

void DfxEmulator::Stop() {
  if (!impl_->server || !impl_->scheduler.joinable()) return;
  {
    absl::MutexLock lock(&impl_->mu);
    impl_->stopping = true;
    impl_->cv.SignalAll();
  }
  impl_->scheduler.join();
  impl_->server->Stop();
  absl::MutexLock lock(&impl_->mu);
  impl_->conns.clear();
  impl_->pending.clear();
}

std::string DfxEmulator::url() const { return impl_->server ? impl_->server->url() : ""; }
uint16_t DfxEmulator::port() const { return impl_->server ? impl_->server->port() : 0; }

void DfxEmulator::SetDropAfterFrames(int n) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetDropAfterFrames(n);
}
void DfxEmulator::SetAnswerDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetAnswerDelay(d);
}
void DfxEmulator::SetRefuseLogin(bool refuse) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetRefuseLogin(refuse);
}
void DfxEmulator::SetResultDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetResultDelay(d);
}
void DfxEmulator::SendRaw(std::string bytes) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.BroadcastRaw(bytes), DfxClock::now());
}

void DfxEmulator::CloseAll(int code, std::string reason) {
  absl::MutexLock lock(&impl_->mu);
  for (const auto& [id, c] : impl_->conns) c->Close(static_cast<uint16_t>(code), reason);
}
void DfxEmulator::SetCloseAfterLogin(int code, std::string reason) {
  absl::MutexLock lock(&impl_->mu);
  impl_->close_after_login = code;
  impl_->close_after_login_reason = std::move(reason);
}

std::vector<DfxEmulator::ChunkRecord> DfxEmulator::chunks() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.chunks();
}
std::vector<DfxEmulator::ChunkRecord> DfxEmulator::TakeChunks(std::string_view measurement_id) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.TakeChunks(measurement_id);
}
int DfxEmulator::MaxDataMsInWindow() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.MaxDataMsInWindow();
}
int DfxEmulator::open_connections() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.open_connections();
}
std::vector<int> DfxEmulator::close_codes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->close_codes;
}

int DfxEmulator::connections() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->opened;
}

int DfxEmulator::logins() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.logins();
}
int DfxEmulator::active_subscriptions() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.active_subscriptions();
}
int DfxEmulator::frames_received(std::string_view action) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.frames_received(action);
}

}  // namespace wsbridge::emulator
