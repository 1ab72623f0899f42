#include "tests/upstreams/nlx_emulator.h"

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

namespace {

// WsServer picks the HTTP status of a refusal from the status code.
absl::Status RefusalFor(int http_status, std::string body) {
  switch (http_status) {
    case 401: return absl::UnauthenticatedError(body);
    case 403: return absl::PermissionDeniedError(body);
    case 429: return absl::ResourceExhaustedError(body);
    case 503: return absl::UnavailableError(body);
    default: return absl::InvalidArgumentError(body);  // 400
  }
}

}  // namespace

struct NlxEmulator::Impl {
  explicit Impl(NlxEmulatorOptions o) : options(std::move(o)), proto(MakeProtocolOptions(options)) {}

  static NlxProtocolOptions MakeProtocolOptions(const NlxEmulatorOptions& o) {
    NlxProtocolOptions p;
    p.api_key = o.api_key;
    p.deployment_key = o.deployment_key;
    p.channel_key = o.channel_key;
    // Two emulators (or two runs) issue different conversation ids.
    p.id_seed = std::random_device{}() * 0x100000001ULL ^ std::random_device{}();
    return p;
  }

  absl::Status OnHandshake(const HandshakeInfo& info) {
    absl::MutexLock lock(&mu);
    NlxUpgrade u = proto.CheckUpgrade(info.target);
    if (u.http_status == 101) return absl::OkStatus();
    return RefusalFor(u.http_status, std::move(u.body));
  }

  void OnOpen(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns[c->id()] = c;
    NlxClock::time_point now = NlxClock::now();
    Perform(proto.OnOpen(c->id(), c->handshake().target, now), now);
  }

  void OnMessage(const std::shared_ptr<WsServerConnection>& c, std::string_view data, bool binary) {
    absl::MutexLock lock(&mu);
    NlxClock::time_point now = NlxClock::now();
    Perform(proto.OnFrame(c->id(), data, binary, now), now);
  }

  void OnClose(const std::shared_ptr<WsServerConnection>& c) {
    absl::MutexLock lock(&mu);
    conns.erase(c->id());
    proto.OnClose(c->id());
    close_codes.push_back(c->remote_close_code());
  }

  // Runs under mu so frames leave in the order the protocol produced them; the
  // connection methods only post to the connection's strand.
  int Perform(std::vector<NlxAction> actions, NlxClock::time_point at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    int n = 0;
    for (NlxAction& a : actions) {
      ++n;
      if (a.delay.count() > 0) {
        pending.emplace(std::make_pair(at + a.delay, next_seq++), std::move(a));
        cv.Signal();  // the scheduler may be waiting for a later (or no) due time
      } else {
        Execute(a);
      }
    }
    return n;
  }

  void Execute(const NlxAction& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = conns.find(a.conn);
    if (it == conns.end()) return;  // closed meanwhile
    switch (a.kind) {
      case NlxAction::Kind::kSend:
        it->second->Send(a.text, /*binary=*/false);
        break;
      case NlxAction::Kind::kClose:
        it->second->Close(a.close_code, a.close_reason);
        break;
      case NlxAction::Kind::kDrop:
        it->second->Drop();
        break;
    }
  }

  // Delayed acks and answers, in due-time order (ties in production order).
  void SchedulerLoop() {
    absl::MutexLock lock(&mu);
    while (!stopping) {
      if (pending.empty()) {
        cv.Wait(&mu);
        continue;
      }
      auto due = pending.begin()->first.first;
      NlxClock::time_point now = NlxClock::now();
      if (due > now) {
        cv.WaitWithTimeout(&mu, absl::FromChrono(due - now));
        continue;
      }
      NlxAction a = std::move(pending.begin()->second);
      pending.erase(pending.begin());
      Execute(a);
    }
  }

  const NlxEmulatorOptions options;
  mutable absl::Mutex mu;
  absl::CondVar cv;
  NlxProtocol proto ABSL_GUARDED_BY(mu);
  std::map<uint64_t, std::shared_ptr<WsServerConnection>> conns ABSL_GUARDED_BY(mu);
  std::map<std::pair<NlxClock::time_point, uint64_t>, NlxAction> pending ABSL_GUARDED_BY(mu);
  uint64_t next_seq ABSL_GUARDED_BY(mu) = 0;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::vector<int> close_codes ABSL_GUARDED_BY(mu);
  std::unique_ptr<WsServer> server;
  std::thread scheduler;
};

NlxEmulator::NlxEmulator(NlxEmulatorOptions options)
    : impl_(std::make_shared<Impl>(std::move(options))) {}

NlxEmulator::~NlxEmulator() { Stop(); }

absl::Status NlxEmulator::Start() {
  if (impl_->server) return absl::FailedPreconditionError("NlxEmulator already started");
  WsServerOptions so;
  so.listen = impl_->options.listen;
  so.tls = impl_->options.tls;
  so.cert_pem = impl_->options.cert_pem;
  so.key_pem = impl_->options.key_pem;
  so.max_message_bytes = impl_->options.max_message_bytes;
  Impl* impl = impl_.get();  // the server is stopped (threads joined) before impl dies
  WsServerHandler h;
  h.on_handshake = [impl](const HandshakeInfo& info, std::string* /*subprotocol*/) {
    return impl->OnHandshake(info);
  };
  h.on_open = [impl](const std::shared_ptr<WsServerConnection>& c) { impl->OnOpen(c); };
  h.on_message = [impl](const std::shared_ptr<WsServerConnection>& c, std::string_view data,
                        bool binary) { impl->OnMessage(c, data, binary); };
  h.on_close = [impl](const std::shared_ptr<WsServerConnection>& c, const absl::Status&) {
    impl->OnClose(c);
  };
  auto server = std::make_unique<WsServer>(std::move(so), std::move(h));
  if (absl::Status st = server->Start(); !st.ok()) return st;
  impl_->server = std::move(server);
  impl_->scheduler = std::thread([impl] { impl->SchedulerLoop(); });
  return absl::OkStatus();
}

void NlxEmulator::Stop() {
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

std::string NlxEmulator::url() const { return impl_->server ? impl_->server->url() : ""; }
uint16_t NlxEmulator::port() const { return impl_->server ? impl_->server->port() : 0; }

void NlxEmulator::SetRefuseUpgrades(int http_status) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetRefuseUpgrades(http_status);
}
void NlxEmulator::SetAckDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetAckDelay(d);
}
void NlxEmulator::SetWithholdAck(bool withhold) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetWithholdAck(withhold);
}
void NlxEmulator::SetAnswerDelay(std::chrono::milliseconds d) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetAnswerDelay(d);
}
void NlxEmulator::DropNextTurns(int n) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.DropNextTurns(n);
}
void NlxEmulator::SetApiKey(std::string key) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.SetApiKey(std::move(key));
}

int NlxEmulator::Push(std::string_view conversation_id, std::string_view text) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->Perform(impl_->proto.Push(conversation_id, text), NlxClock::now());
}
int NlxEmulator::PushRaw(std::string_view conversation_id, std::string text) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->Perform(impl_->proto.PushRaw(conversation_id, text), NlxClock::now());
}
int NlxEmulator::Drop(std::string_view conversation_id) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->Perform(impl_->proto.Drop(conversation_id), NlxClock::now());
}
int NlxEmulator::Close(std::string_view conversation_id, uint16_t code, std::string reason) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->Perform(impl_->proto.Close(conversation_id, code, reason), NlxClock::now());
}

int NlxEmulator::handshakes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.handshakes();
}
int NlxEmulator::refused_handshakes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.refused_handshakes();
}
int NlxEmulator::open_connections() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.open_connections();
}
int NlxEmulator::connections_for(std::string_view conversation_id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.connections_for(conversation_id);
}
int NlxEmulator::conversations() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.conversations();
}
bool NlxEmulator::knows(std::string_view conversation_id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.knows(conversation_id);
}
std::vector<std::string> NlxEmulator::conversation_ids() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.conversation_ids();
}
int NlxEmulator::turns_received(std::string_view conversation_id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.turns_received(conversation_id);
}
std::vector<NlxTurnRecord> NlxEmulator::turns(std::string_view conversation_id) const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.turns(conversation_id);
}
void NlxEmulator::ForgetTurns(std::string_view conversation_id) {
  absl::MutexLock lock(&impl_->mu);
  impl_->proto.ForgetTurns(conversation_id);
}
int NlxEmulator::total_turns() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.total_turns();
}
int NlxEmulator::invalid_frames() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.invalid_frames();
}
int NlxEmulator::frames_before_ack() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->proto.frames_before_ack();
}
std::vector<int> NlxEmulator::close_codes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->close_codes;
}

}  // namespace wsbridge::emulator
