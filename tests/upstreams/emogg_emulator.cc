#include "tests/upstreams/emogg_emulator.h"

#include <map>
#include <random>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::emulator {

using upstreams::WsServer;
using upstreams::WsServerConnection;
using upstreams::WsServerHandler;
using upstreams::WsServerOptions;

namespace {

EmoggTime Now() {
  return EmoggTime{EmoggClock::now(),
                   std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count()};
}

}  // namespace

struct EmoggEmulator::Impl {
  explicit Impl(EmoggEmulatorOptions o) : options(std::move(o)), proto(ProtocolOptions(options)) {}

  static EmoggProtocolOptions ProtocolOptions(const EmoggEmulatorOptions& o) {
    EmoggProtocolOptions p = o.protocol;
    if (p.id_seed == 0) p.id_seed = std::random_device{}() * 0x100000001ULL ^ std::random_device{}();
    return p;
  }

  void OnOpen(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns[c->id()] = c;
    if (silent) c->SetSilent(true);
    proto.OnOpen(c->id(), Now());
    cv.Signal();  // a new auth deadline
  }

  void OnMessage(const std::shared_ptr<WsServerConnection>& c, std::string_view data) {
    absl::MutexLock lock(&mu);
    Perform(proto.OnFrame(c->id(), data, Now()));
  }

  void OnClose(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns.erase(c->id());
    proto.OnClose(c->id());
    client_close_codes.push_back(c->remote_close_code());
  }

  // Under mu, so frames leave in the order the protocol produced them; the connection
  // methods only post to the connection's strand. Anything may have moved a deadline,
  // so the scheduler is woken.
  void Perform(const std::vector<EmoggAction>& actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    for (const EmoggAction& a : actions) {
      auto it = conns.find(a.conn);
      if (it == conns.end()) continue;  // closed meanwhile
      switch (a.kind) {
        case EmoggAction::Kind::kSend:
          it->second->Send(a.text, /*binary=*/false);
          break;
        case EmoggAction::Kind::kClose:
          it->second->Close(a.close_code, a.close_reason);
          break;
        case EmoggAction::Kind::kDrop:
          it->second->Drop();
          break;
      }
    }
    cv.Signal();
  }

  // Runs the protocol's timers: delayed answers, events, idle and auth timeouts.
  void SchedulerLoop() {
    absl::MutexLock lock(&mu);
    while (!stopping) {
      std::optional<EmoggClock::time_point> next = proto.NextWakeup();
      EmoggClock::time_point now = EmoggClock::now();
      if (!next) {
        cv.Wait(&mu);
        continue;
      }
      if (*next > now) {
        cv.WaitWithTimeout(&mu, absl::FromChrono(*next - now));
        continue;
      }
      Perform(proto.Advance(Now()));
    }
  }

  const EmoggEmulatorOptions options;
  mutable absl::Mutex mu;
  absl::CondVar cv;
  EmoggProtocol proto ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<WsServerConnection>> conns ABSL_GUARDED_BY(mu);
  bool silent ABSL_GUARDED_BY(mu) = false;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::vector<int> client_close_codes ABSL_GUARDED_BY(mu);
  std::unique_ptr<WsServer> server;
  std::thread scheduler;
};

EmoggEmulator::EmoggEmulator(EmoggEmulatorOptions options)
    : impl_(std::make_shared<Impl>(std::move(options))) {}

EmoggEmulator::~EmoggEmulator() { Stop(); }

absl::Status EmoggEmulator::Start() {
  if (impl_->server) return absl::FailedPreconditionError("EmoggEmulator already started");
  WsServerOptions so;
  so.listen = impl_->options.listen;
  so.tls = impl_->options.tls;
  so.cert_pem = impl_->options.cert_pem;
  so.key_pem = impl_->options.key_pem;
  so.max_message_bytes = 1u << 20;
  Impl* impl = impl_.get();  // the server is stopped (threads joined) before impl dies
  WsServerHandler h;
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

void EmoggEmulator::Stop() {
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
}

std::string EmoggEmulator::url() const {
  return impl_->server ? impl_->server->url() + "/ws/v1" : "";
}
uint16_t EmoggEmulator::port() const { return impl_->server ? impl_->server->port() : 0; }

void EmoggEmulator::EmitNow(std::string_view channel, std::string_view key) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.EmitNow(channel, key, Now()));
}
void EmoggEmulator::SetWorkerState(std::string_view session_id, std::string_view state) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.SetWorkerState(session_id, state, Now()));
}
void EmoggEmulator::SendRaw(std::string text) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.SendRaw(text, Now()));
}
void EmoggEmulator::DropAll() {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.DropAll());
}

void EmoggEmulator::CloseAll(uint16_t code, std::string reason) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.CloseAll(code, reason));
}
void EmoggEmulator::RevokeToken(std::string token) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.RevokeToken(token, Now()));
}
void EmoggEmulator::SetCloseAfterAuth(uint16_t code, std::string reason) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetCloseAfterAuth(code, std::move(reason));
}

void EmoggEmulator::SetDropAfterFrames(int n) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetDropAfterFrames(n);
}
void EmoggEmulator::SetRefuseAuth(bool refuse) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetRefuseAuth(refuse);
}
void EmoggEmulator::SetSilent(bool silent) {
  absl::MutexLock lock(&impl_->mu);
  impl_->silent = silent;
  impl_->proto.SetSilent(silent);
  for (auto& [id, c] : impl_->conns) c->SetSilent(silent);
  impl_->cv.Signal();
}
void EmoggEmulator::SetAnswerDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetAnswerDelay(d);
}
void EmoggEmulator::SetRateLimit(int max_messages, std::chrono::milliseconds window) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetRateLimit(max_messages, window);
}
void EmoggEmulator::SetEventInterval(std::optional<std::chrono::milliseconds> interval) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetEventInterval(interval);
  impl_->cv.Signal();
}

int EmoggEmulator::open_connections() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.open_connections();
}
int EmoggEmulator::authenticated_connections() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.authenticated_connections();
}
int EmoggEmulator::auth_successes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.auth_successes();
}
int EmoggEmulator::auth_failures() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.auth_failures();
}
int EmoggEmulator::frames_before_auth() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.frames_before_auth();
}
int EmoggEmulator::requests(std::string_view path) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.requests(path);
}
int EmoggEmulator::active_subscriptions() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.active_subscriptions();
}
int EmoggEmulator::subscriptions_of(std::string_view channel, std::string_view key) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.subscriptions_of(channel, key);
}
int EmoggEmulator::events_sent() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.events_sent();
}
int EmoggEmulator::answers_with_status(int status) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.answers_with_status(status);
}
std::vector<int> EmoggEmulator::server_close_codes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.server_close_codes();
}
std::vector<int> EmoggEmulator::client_close_codes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->client_close_codes;
}

}  // namespace wsbridge::emulator
