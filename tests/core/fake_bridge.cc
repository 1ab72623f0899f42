#include "tests/core/fake_bridge.h"

#include <algorithm>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/post.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/grpc_calls.h"
#include "bridges/core/status.h"
#include "daemon/config/config.h"
#include "wsbridge/config/v1/dfx.pb.h"
#include "tests/core/fake_protocol.h"
#include "fake_service.grpc.pb.h"

namespace wsbridge::core::testing {
namespace {

namespace v1 = wsbridge::coretest::v1;

constexpr std::string_view kEchoMethod = "/wsbridge.coretest.v1.FakeService/Echo";
constexpr std::string_view kGetMethod = "/wsbridge.coretest.v1.FakeService/Get";
constexpr std::string_view kWatchMethod = "/wsbridge.coretest.v1.FakeService/Watch";
constexpr std::string_view kChatMethod = "/wsbridge.coretest.v1.FakeService/Chat";
constexpr int kEventsPerMessage = 4;

// Every method on the completion-queue API, as in the bundled bridges.
using FakeServiceBase = v1::FakeService::WithAsyncMethod_Echo<v1::FakeService::WithAsyncMethod_Get<
    v1::FakeService::WithAsyncMethod_Watch<v1::FakeService::WithAsyncMethod_Chat<v1::FakeService::Service>>>>;

absl::Status RequireText(const v1::EchoRequest& req) {
  return req.text().empty() ? absl::InvalidArgumentError("text is required: the body to send upstream")
                            : absl::OkStatus();
}

class FakeBridge final : public BridgeBase, public FakeServiceBase {
 public:
  FakeBridge(FakeBridgeOptions options, BridgeContext context)
      : BridgeBase(std::move(context), "Fake", {std::string(v1::FakeService::service_full_name())}),
        options_(std::move(options)) {
    InitPool(
        {.max_sessions = options_.max_sessions,
         .idle_timeout = options_.idle_session_timeout},
        [this](const std::string& id, std::shared_ptr<SecretSource> token, bool pinned) {
          SessionOptions so =
              BaseSessionOptions(id, pinned, options_.connection, kFakeDomain);
          so.request_timeout = options_.request_timeout;
          so.login_timeout = options_.request_timeout;
          so.subscribe_timeout = options_.request_timeout;
          return UpstreamSession::Create(
              SessionExecutor(), std::move(so),
              std::make_unique<FakeProtocol>(options_.url, std::move(token), options_.login));
        },
        CredentialPolicy{std::string(kFakeTokenMetadata), options_.allow_per_call},
        options_.default_token);
    set_max_open_calls(options_.max_open_calls);
  }

  std::vector<grpc::Service*> Services() override { return {this}; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<CqLoop*>& loops) override;

  const FakeBridgeOptions& options() const { return options_; }
  const std::vector<CqLoop*>& loops() const { return loops_; }

 private:
  FakeBridgeOptions options_;
  std::vector<CqLoop*> loops_;
};

// --- Echo: AsyncUnaryCall --------------------------------------------------------------
class EchoCall final : public AsyncUnaryCall<EchoCall, v1::EchoRequest, v1::EchoResponse> {
 public:
  EchoCall(FakeBridge* bridge, CqLoop* loop) : AsyncUnaryCall(bridge, loop, kEchoMethod) {}

  static void Request(BridgeBase* bridge, CqLoop* loop) {
    auto* fake = static_cast<FakeBridge*>(bridge);
    auto c = std::make_shared<EchoCall>(fake, loop);
    Start(c, c->done_tag(), [&] {
      fake->RequestEcho(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                        c->matched_tag());
    });
  }

  // Validate, then take a session, then send: a bad request never holds a session.
  void OnAdmitted() {
    if (absl::Status st = RequireText(req_); !st.ok()) {
      FinishWith(ToGrpcStatus(st));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    core::Request r = FakeRequest(req_.text());
    r.deadline = SteadyDeadline(ctx_);
    upstream_op_ = lease_->Send(std::move(r), [c = shared_from_this()](absl::StatusOr<Reply> reply) mutable {
      c->OnLoop([reply = std::move(reply)](EchoCall& call) mutable {
        if (!reply.ok()) {
          call.FinishWith(ToGrpcStatus(reply.status()));
          return;
        }
        call.parts_.push_back(BodyOf(reply->payload));
        if (!reply->final) return;  // a streamed answer: more parts follow
        call.resp_.set_text(absl::StrJoin(call.parts_, "+"));
        call.FinishWith(grpc::Status::OK);
      });
    });
  }

 private:
  std::vector<std::string> parts_;  // loop thread
};

// --- Get: AsyncUnaryCall answered on the session strand (Respond) -----------------------
class GetCall final : public AsyncUnaryCall<GetCall, v1::EchoRequest, v1::EchoResponse> {
 public:
  GetCall(FakeBridge* bridge, CqLoop* loop) : AsyncUnaryCall(bridge, loop, kGetMethod) {}

  static void Request(BridgeBase* bridge, CqLoop* loop) {
    auto* fake = static_cast<FakeBridge*>(bridge);
    auto c = std::make_shared<GetCall>(fake, loop);
    Start(c, c->done_tag(), [&] {
      fake->RequestGet(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                       c->matched_tag());
    });
  }

  void OnAdmitted() {
    if (absl::Status st = RequireText(req_); !st.ok()) {
      FinishWith(ToGrpcStatus(st));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    core::Request q = FakeRequest(req_.text(), /*ordered=*/true);
    q.deadline = SteadyDeadline(ctx_);
    upstream_op_ = lease_->Send(std::move(q), [c = shared_from_this()](absl::StatusOr<Reply> reply) {
      c->Respond([&reply](GetCall& call) {
        if (!reply.ok()) return ToGrpcStatus(reply.status());
        call.resp_.set_text(BodyOf(reply->payload));
        return grpc::Status::OK;
      });
    });
  }
};

// --- Watch: AsyncServerStream + EventSink ----------------------------------------------
class WatchCall final
    : public AsyncServerStream<WatchCall, v1::WatchRequest, v1::WatchResponse, std::string>,
      public EventSink {
 public:
  WatchCall(FakeBridge* bridge, CqLoop* loop)
      : AsyncServerStream(bridge, loop, kWatchMethod, bridge->options().subscriber_queue, "events",
                          kFakeDomain) {}

  static void Request(BridgeBase* bridge, CqLoop* loop) {
    auto* fake = static_cast<FakeBridge*>(bridge);
    auto s = std::make_shared<WatchCall>(fake, loop);
    Start(s, s->done_tag(), [&] {
      fake->RequestWatch(&s->ctx_, &s->req_, &s->writer_, loop->cq(), loop->cq(), s->matched_tag());
    });
  }

  static bool Append(v1::WatchResponse* m, const std::string& event, size_t* bytes) {
    if (m->events_size() >= kEventsPerMessage) return false;
    *bytes += event.size();
    m->add_events(event);
    return true;
  }

  void OnAdmitted() {
    if (req_.topic().empty() || req_.topic().find('|') != std::string::npos) {
      FinishWith(ToGrpcStatus(absl::InvalidArgumentError("topic is required and may not contain '|'")));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    topic_ = req_.topic();
    sink_id_ = lease_->Subscribe(topic_, nullptr, shared_from_this());
  }
  void Release() {
    if (sink_id_ != 0 && lease_) lease_->Unsubscribe(topic_, sink_id_);
  }

  // EventSink (session strand).
  void OnSubscribed(const SubscribedInfo&) override { Activated(); }
  void OnEvent(const PayloadPtr& event, bool after_gap) override {
    const std::string& body = BodyOf(event);
    Push(after_gap ? absl::StrCat("gap:", body) : body, body == "end");
  }
  void OnEnded(const absl::Status& status) override { End(status); }

 private:
  std::string topic_;
  uint64_t sink_id_ = 0;
};

// --- Chat: AsyncBidiStream --------------------------------------------------------------
// Each message a send-order request; answers are written from the session strand under
// the stream's lock (Locked), in send order.
class ChatStream final : public AsyncBidiStream<ChatStream, v1::EchoRequest, v1::EchoResponse> {
 public:
  friend AsyncBidiStream;  // calls the hooks
  ChatStream(FakeBridge* bridge, CqLoop* loop) : AsyncBidiStream(bridge, loop, kChatMethod) {}

  static void Request(BridgeBase* bridge, CqLoop* loop) {
    auto* fake = static_cast<FakeBridge*>(bridge);
    auto s = std::make_shared<ChatStream>(fake, loop);
    Start(s, s->done_tag(), [&] {
      fake->RequestChat(&s->ctx_, &s->stream_, loop->cq(), loop->cq(), s->matched_tag());
    });
  }

 private:
  // --- AsyncBidiStream hooks (under its lock). ---
  void Fail(const absl::Status& st) { FinishWith(ToGrpcStatus(st)); }
  // Requests not answered yet are dropped (a late answer is ignored).
  void Release() {
    if (lease_) {
      for (uint64_t op : open_) lease_->Cancel(op);
    }
    open_.clear();
  }
  // The first valid message takes the session: invalid streams hold none.
  absl::Status Accept() {
    if (absl::Status st = RequireText(read_); !st.ok()) return st;
    if (!lease_) {
      absl::StatusOr<Lease> lease = bridge_->SessionFor(ctx_);
      if (!lease.ok()) return lease.status();
      lease_ = std::move(*lease);
    }
    core::Request r = FakeRequest(read_.text(), /*ordered=*/true);
    r.deadline = SteadyDeadline(ctx_);
    open_.push_back(lease_->Send(std::move(r), [w = weak_from_this()](absl::StatusOr<Reply> reply) {
      if (auto s = w.lock()) s->Locked([&](ChatStream& c) { c.OnReply(std::move(reply)); });
    }));
    return absl::OkStatus();
  }
  void MaybeComplete() {
    if (half_closed_ && open_.empty() && !finishing()) Complete(grpc::Status::OK);
  }

  // Session strand, under the lock: answers come in send order.
  void OnReply(absl::StatusOr<Reply> reply) {
    if (open_.empty()) return;
    if (!reply.ok()) {
      Fail(reply.status());
    } else if (reply->final) {
      open_.pop_front();
      v1::EchoResponse msg;
      msg.set_text(BodyOf(reply->payload));
      Push(std::move(msg));
      MaybeComplete();
    }
  }

  std::deque<uint64_t> open_;  // under the stream's lock
};

void FakeBridge::ServeAsync(const std::vector<CqLoop*>& loops) {
  loops_ = loops;
  for (CqLoop* loop : loops) {
    for (int i = 0; i < 2; ++i) {
      EchoCall::Request(this, loop);
      GetCall::Request(this, loop);
      WatchCall::Request(this, loop);
      ChatStream::Request(this, loop);
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Bridge>> NewFakeBridge(FakeBridgeOptions options,
                                                      const BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("url is required");
  return std::make_unique<FakeBridge>(std::move(options), context);
}

void FakeDaemon::HoldLoops(std::shared_ptr<absl::Notification> release) {
  for (CqLoop* loop : static_cast<FakeBridge*>(bridge_)->loops()) {
    loop->Post([release] { release->WaitForNotification(); });
  }
}

int FakeDaemon::CallsOpen() const {
  int n = 0;
  for (CqLoop* loop : static_cast<FakeBridge*>(bridge_)->loops()) n += loop->calls_open();
  return n;
}

void FakeDaemon::HoldIoThread(std::shared_ptr<absl::Notification> busy,
                              std::shared_ptr<absl::Notification> release) {
  boost::asio::post(static_cast<FakeBridge*>(bridge_)->SessionExecutor(), [busy, release] {
    busy->Notify();
    release->WaitForNotification();
  });
}

absl::Status FakeDaemon::Start(FakeBridgeOptions options,
                              const std::function<void(config::v1::DaemonConfig&)>& tweak) {
  // The daemon picks a factory by the config kind's message type; the fake bridge takes
  // the place of the `dfx` kind (the test's options carry its real settings).
  registry_.Register(config::v1::DfxBridgeConfig::descriptor()->full_name(),
                     [this, options](const google::protobuf::Message&, const BridgeContext& ctx)
                         -> absl::StatusOr<std::unique_ptr<Bridge>> {
                       auto bridge = NewFakeBridge(options, ctx);
                       if (bridge.ok()) bridge_ = bridge->get();
                       return bridge;
                     });
  config::v1::DaemonConfig cfg;
  cfg.mutable_server()->set_listen("127.0.0.1:0");
  cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
  cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
  auto* b = cfg.add_bridges();
  b->set_name("fake");
  b->mutable_dfx()->mutable_upstream()->set_url(options.url);
  if (tweak) tweak(cfg);
  if (absl::Status st = config::ApplyConfigDefaults(&cfg); !st.ok()) return st;
  daemon::DaemonOptions dopts;
  dopts.configure_logging = false;
  daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
  if (absl::Status st = daemon_->Start(); !st.ok()) return st;
  if (bridge_ == nullptr) return absl::InternalError("the fake bridge was not built");
  channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", daemon_->grpc_port()),
                                 grpc::InsecureChannelCredentials());
  stub_ = coretest::v1::FakeService::NewStub(channel_);
  return absl::OkStatus();
}

void FakeDaemon::Stop() {
  if (daemon_ == nullptr) return;
  stub_.reset();
  channel_.reset();
  daemon_->RequestShutdown();
  daemon_->Wait();
  daemon_.reset();
  bridge_ = nullptr;
}

}  // namespace wsbridge::core::testing
