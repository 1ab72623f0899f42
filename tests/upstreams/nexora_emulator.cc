#include "tests/upstreams/nexora_emulator.h"

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
using upstreams::HttpRequest;
using upstreams::HttpResponse;
using upstreams::WsServer;
using upstreams::WsServerConnection;
using upstreams::WsServerHandler;
using upstreams::WsServerOptions;

namespace {

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

struct NexoraEmulator::Impl {
  explicit Impl(NexoraEmulatorOptions o)
      : options(std::move(o)), proto(MakeProtocolOptions(options)) {}

  static NexoraProtocolOptions MakeProtocolOptions(const NexoraEmulatorOptions& o) {
    NexoraProtocolOptions p;
    p.api_keys = o.api_keys;
    p.users = o.users;
    p.agents = o.agents;
    p.jwt_lifetime = o.jwt_lifetime;
    p.step_delay = o.step_delay;
    p.known_chats_only = o.known_chats_only;
    p.id_seed = std::random_device{}() * 0x100000001ULL ^ std::random_device{}();
    return p;
  }

  absl::Status OnHandshake(const HandshakeInfo& info) {
    absl::MutexLock lock(&mu);
    NexoraUpgrade u = proto.OnUpgrade(info.target, NexoraClock::now());
    absl::Status refusal;
    switch (u.status) {
      case 101:
        return absl::OkStatus();
      case 401:
        refusal = absl::UnauthenticatedError(u.message);
        break;
      case 403:
        refusal = absl::PermissionDeniedError(u.message);
        break;
      case 429:
        refusal = absl::ResourceExhaustedError(u.message);
        break;
      case 503:
        refusal = absl::UnavailableError(u.message);
        break;
      default:
        // The test server answers 400 for the rest (404 in the protocol's terms).
        refusal = absl::NotFoundError(u.message);
        break;
    }
    return u.retry_after_s > 0 ? upstreams::WithRetryAfter(refusal, u.retry_after_s) : refusal;
  }

  void OnOpen(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns[c->id()] = c;
    proto.OnOpen(c->id(), NexoraProtocol::SocketChatId(c->handshake().target));
  }

  void OnMessage(const std::shared_ptr<WsServerConnection>& c, std::string_view data) {
    absl::MutexLock lock(&mu);
    NexoraClock::time_point now = NexoraClock::now();
    Perform(proto.OnFrame(c->id(), data, now), now);
  }

  void OnClose(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns.erase(c->id());
    proto.OnClose(c->id(), NexoraClock::now());
  }

  HttpResponse OnHttp(const HttpRequest& req) {
    absl::MutexLock lock(&mu);
    NexoraHttpAnswer a = proto.OnHttp(req.method, req.target, req.Header("authorization"),
                                      req.body, NexoraClock::now(), UnixNow());
    HttpResponse res;
    res.status = a.status;
    res.body = std::move(a.body);
    return res;
  }

  // Runs under mu so frames leave in the order the protocol produced them; the
  // connection methods only post to the connection's strand.
  void Perform(std::vector<NexoraAction> actions, NexoraClock::time_point received)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    for (NexoraAction& a : actions) {
      if (a.delay.count() > 0) {
        pending.emplace(std::make_pair(received + a.delay, next_seq++), std::move(a));
        cv.Signal();
      } else {
        Execute(a);
      }
    }
  }

  void Execute(const NexoraAction& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = conns.find(a.conn);
    if (it == conns.end()) return;  // closed meanwhile: the rest of its answer is lost
    switch (a.kind) {
      case NexoraAction::Kind::kSend:
        it->second->Send(a.text, /*binary=*/false);
        break;
      case NexoraAction::Kind::kClose:
        it->second->Close(a.close_code, a.close_reason);
        conns.erase(it);  // nothing of its answers follows the close frame
        break;
      case NexoraAction::Kind::kDrop:
        // After the events the answer already sent: "drop after n events" must deliver n.
        it->second->DropAfterWrites();
        // Later frames of this socket's answers must not go out while the drop is
        // still on its way through the connection's strand.
        conns.erase(it);
        break;
    }
  }

  // Delayed events, due-time order (ties in production order).
  void SchedulerLoop() {
    absl::MutexLock lock(&mu);
    while (!stopping) {
      if (pending.empty()) {
        cv.Wait(&mu);
        continue;
      }
      auto due = pending.begin()->first.first;
      NexoraClock::time_point now = NexoraClock::now();
      if (due > now) {
        cv.WaitWithTimeout(&mu, absl::FromChrono(due - now));
        continue;
      }
      NexoraAction a = std::move(pending.begin()->second);
      pending.erase(pending.begin());
      Execute(a);
    }
  }

  const NexoraEmulatorOptions options;
  mutable absl::Mutex mu;
  absl::CondVar cv;
  NexoraProtocol proto ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<WsServerConnection>> conns ABSL_GUARDED_BY(mu);
  std::map<std::pair<NexoraClock::time_point, uint64_t>, NexoraAction> pending ABSL_GUARDED_BY(mu);
  uint64_t next_seq ABSL_GUARDED_BY(mu) = 0;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::unique_ptr<WsServer> server;
  std::thread scheduler;
};

NexoraEmulator::NexoraEmulator(NexoraEmulatorOptions options)
    : impl_(std::make_shared<Impl>(std::move(options))) {}

NexoraEmulator::~NexoraEmulator() { Stop(); }

absl::Status NexoraEmulator::Start() {
  if (impl_->server) return absl::FailedPreconditionError("NexoraEmulator already started");
  WsServerOptions so;
  so.listen = impl_->options.listen;
  so.tls = impl_->options.tls;
  so.cert_pem = impl_->options.cert_pem;
  so.key_pem = impl_->options.key_pem;
  so.max_message_bytes = 4u << 20;
  so.max_http_body_bytes = 64u << 10;
  Impl* impl = impl_.get();  // the server is stopped (threads joined) before impl dies
  WsServerHandler h;
  h.on_handshake = [impl](const HandshakeInfo& info, std::string*) {
    return impl->OnHandshake(info);
  };
  h.on_open = [impl](const std::shared_ptr<WsServerConnection>& c) { impl->OnOpen(c); };
  h.on_message = [impl](const std::shared_ptr<WsServerConnection>& c, std::string_view data,
                        bool /*binary*/) { impl->OnMessage(c, data); };
  h.on_close = [impl](const std::shared_ptr<WsServerConnection>& c, const absl::Status&) {
    impl->OnClose(c);
  };
  h.on_http = [impl](const HttpRequest& req) { return impl->OnHttp(req); };
  auto server = std::make_unique<WsServer>(std::move(so), std::move(h));
  if (absl::Status st = server->Start(); !st.ok()) return st;
  impl_->server = std::move(server);
  impl_->scheduler = std::thread([impl] { impl->SchedulerLoop(); });
  return absl::OkStatus();
}

void NexoraEmulator::Stop() {
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

std::string NexoraEmulator::url() const { return impl_->server ? impl_->server->url() : ""; }
std::string NexoraEmulator::http_url() const {
  if (!impl_->server) return "";
  std::string u = impl_->server->url();
  return (impl_->options.tls ? "https" : "http") + u.substr(u.find(':'));
}
uint16_t NexoraEmulator::port() const { return impl_->server ? impl_->server->port() : 0; }

void NexoraEmulator::SetScript(std::vector<NexoraScriptStep> steps) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetScript(std::move(steps));
}
void NexoraEmulator::InjectError(std::string code, std::string message, int after_steps,
                                 int count) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.InjectError(std::move(code), std::move(message), after_steps, count);
}
void NexoraEmulator::DropMidAnswer(int after_steps, int count) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.DropMidAnswer(after_steps, count);
}
void NexoraEmulator::ClearFaults() {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.ClearFaults();
}
void NexoraEmulator::SetAnswerPings(bool answer) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetAnswerPings(answer);
}
void NexoraEmulator::SetFinishAfterDrop(bool finish) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetFinishAfterDrop(finish);
}
void NexoraEmulator::SetJwtLifetime(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetJwtLifetime(d);
}
void NexoraEmulator::SetStepDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetStepDelay(d);
}
void NexoraEmulator::SetApiKeys(std::vector<std::string> keys) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetApiKeys(std::move(keys));
}
void NexoraEmulator::RefuseUpgrades(int status, std::string message, int count,
                                    int retry_after_s) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.RefuseUpgrades(status, std::move(message), count, retry_after_s);
}
void NexoraEmulator::CloseSockets(uint16_t code, std::string reason, std::string_view chat_id) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.CloseSockets(chat_id, code, std::move(reason)), NexoraClock::now());
}
void NexoraEmulator::DropSockets(std::string_view chat_id) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.DropSockets(chat_id), NexoraClock::now());
}
void NexoraEmulator::Broadcast(std::string text, std::string_view chat_id) {
  absl::MutexLock lock(&impl_->mu);
  impl_->Perform(impl_->proto.Broadcast(chat_id, std::move(text)), NexoraClock::now());
}

int NexoraEmulator::messages_received(std::string_view id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.messages_received(id);
}
std::vector<std::string> NexoraEmulator::received_ids() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.received_ids();
}
int NexoraEmulator::answers_started() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.answers_started();
}
int NexoraEmulator::duplicates_sent() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.duplicates_sent();
}
int NexoraEmulator::logins() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.logins();
}
int NexoraEmulator::refused_logins() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.refused_logins();
}
int NexoraEmulator::refused_upgrades() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.refused_upgrades();
}
int NexoraEmulator::upgrades() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.upgrades();
}
int NexoraEmulator::chats_created() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.chats_created();
}
int NexoraEmulator::pings() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.pings();
}
int NexoraEmulator::open_sockets(std::string_view chat_id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.open_sockets(chat_id);
}
int NexoraEmulator::open_sockets() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.open_sockets();
}
int NexoraEmulator::chats_with_sockets() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.chats_with_sockets();
}


}  // namespace wsbridge::emulator
