// The Emogg bridge inside the real daemon (its gRPC server, its registry building the
// bridge through a factory), with a real gRPC client, against the in-process Emogg
// emulator over real sockets on 127.0.0.1. Shared by the protocol and service tests.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/bridge.h"
#include "bridges/core/upstream_config.h"
#include "bridges/emogg/emogg_bridge.h"
#include "daemon/config/config.h"
#include "daemon/daemon.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/emogg_emulator.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"

namespace wsbridge::emogg::testing {

using namespace std::chrono_literals;
using wsbridge::testing::WaitFor;
namespace v1 = wsbridge::emogg::v1;

inline constexpr char kToken[] = "demo-token";

struct Detail {
  std::string reason;
  std::string domain;
  std::map<std::string, std::string> metadata;
};

// Decodes grpc-status-details-bin as a client with googleapis' protos would.
inline Detail ErrorDetail(const grpc::Status& st) {
  Detail d;
  google::rpc::Status s;
  if (!s.ParseFromString(st.error_details())) return d;
  for (const auto& any : s.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) {
      d.reason = info.reason();
      d.domain = info.domain();
      d.metadata.insert(info.metadata().begin(), info.metadata().end());
    }
  }
  return d;
}

struct Outcome {
  grpc::Status status;
  v1::RequestResponse response;
};

// A Subscribe call read on the test thread.
struct Stream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::SubscribeResponse>> reader;
  std::vector<v1::SubscriptionUpdate> pending;

  // The next update (messages may carry several); false when the stream ended.
  bool Next(v1::SubscriptionUpdate* out) {
    while (pending.empty()) {
      v1::SubscribeResponse msg;
      if (!reader->Read(&msg)) return false;
      for (const auto& u : msg.updates()) pending.push_back(u);
    }
    *out = pending.front();
    pending.erase(pending.begin());
    return true;
  }
  // The next update that is an event (gaps and the like are returned through `skipped`).
  bool NextEvent(v1::Event* ev, std::vector<v1::SubscriptionUpdate>* skipped = nullptr) {
    v1::SubscriptionUpdate u;
    while (Next(&u)) {
      if (u.has_event()) {
        *ev = u.event();
        return true;
      }
      if (skipped != nullptr) skipped->push_back(u);
    }
    return false;
  }
  grpc::Status Finish() {
    ctx.TryCancel();
    v1::SubscribeResponse msg;
    while (reader->Read(&msg)) {
    }
    return reader->Finish();
  }
};

class EmoggBridgeTest : public ::testing::Test {
 protected:
  // Runs the bridge inside the real daemon with test-sized windows; `tweak` adjusts the
  // bridge options, `eopts` the emulator.
  void Start(emulator::EmoggProtocolOptions eopts = Generous(),
             std::function<void(EmoggBridgeOptions&)> tweak = nullptr) {
    emulator::EmoggEmulatorOptions em;
    em.protocol = std::move(eopts);
    emulator_ = std::make_unique<emulator::EmoggEmulator>(std::move(em));
    ASSERT_TRUE(emulator_->Start().ok());

    EmoggBridgeOptions o;
    o.url = emulator_->url();
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.default_token = core::SecretSource::Fixed(kToken);
    o.allow_call_token = true;
    o.request_timeout = 5s;
    o.auth_retry_pause = 100ms;
    o.retry_after_429 = 100ms;
    o.subscribe_timeout = 5s;
    // The limiter is on (its gate is on every request's path) with room for any test
    // that does not test it.
    o.limits.max_messages = 100000;
    o.limits.control_reserve = 8;
    if (tweak) tweak(o);
    options_ = o;
    registry_.Register(config::v1::EmoggBridgeConfig::descriptor()->full_name(),
                       [this, o](const google::protobuf::Message&, const core::BridgeContext& ctx)
                           -> absl::StatusOr<std::unique_ptr<core::Bridge>> {
                         auto bridge = NewEmoggBridge(o, ctx);
                         if (bridge.ok()) bridge_ = bridge->get();
                         return bridge;
                       });

    config::v1::DaemonConfig cfg;
    cfg.mutable_server()->set_listen("127.0.0.1:0");
    cfg.mutable_shutdown()->mutable_drain_timeout()->set_nanos(100'000'000);
    cfg.mutable_shutdown()->mutable_deadline()->set_seconds(10);
    auto* b = cfg.add_bridges();
    b->set_name("emogg");
    b->mutable_emogg()->mutable_upstream()->set_url(emulator_->url());
    b->mutable_emogg()->mutable_upstream()->set_allow_plaintext(true);
    absl::Status defaults = config::ApplyConfigDefaults(&cfg);
    ASSERT_TRUE(defaults.ok()) << defaults;
    daemon::DaemonOptions dopts;
    dopts.configure_logging = false;
    daemon_ = std::make_unique<daemon::Daemon>(std::move(cfg), registry_, dopts);
    absl::Status started = daemon_->Start();
    ASSERT_TRUE(started.ok()) << started;
    ASSERT_NE(bridge_, nullptr);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(daemon_->grpc_port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::EmoggService::NewStub(channel_);
  }

  // Emulator rules with room for every test that does not test limits.
  static emulator::EmoggProtocolOptions Generous() {
    emulator::EmoggProtocolOptions p;
    p.tokens = {kToken, "tenant-token"};
    p.max_messages = 1000000;
    return p;
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      daemon_->RequestShutdown();
      daemon_->Wait();
      daemon_.reset();
    }
    if (emulator_ != nullptr) emulator_->Stop();
  }

  uint64_t Counter(const std::string& name) {
    return daemon_->metrics().GetCounter(name, "", {{"bridge", "emogg"}}).value();
  }

  bool Ready() { return bridge_ != nullptr && bridge_->Serving(); }

  Outcome Call(const std::string& path, const std::string& body = "",
               std::chrono::milliseconds deadline = 10s, const std::string& token = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    if (!token.empty()) ctx.AddMetadata("x-emogg-token", token);
    v1::RequestRequest req;
    req.set_path(path);
    req.set_json_body(body);
    Outcome out;
    out.status = stub_->Request(&ctx, req, &out.response);
    return out;
  }

  // Calls made concurrently from a client completion queue; outcomes in call order.
  std::vector<Outcome> CallAll(const std::vector<std::pair<std::string, std::string>>& calls,
                               std::chrono::milliseconds deadline = 10s) {
    grpc::CompletionQueue cq;
    struct Pending {
      grpc::ClientContext ctx;
      v1::RequestRequest req;
      Outcome out;
      std::unique_ptr<grpc::ClientAsyncResponseReader<v1::RequestResponse>> rpc;
    };
    std::vector<std::unique_ptr<Pending>> ps;
    for (size_t i = 0; i < calls.size(); ++i) {
      auto p = std::make_unique<Pending>();
      p->ctx.set_deadline(std::chrono::system_clock::now() + deadline);
      p->req.set_path(calls[i].first);
      p->req.set_json_body(calls[i].second);
      p->rpc = stub_->AsyncRequest(&p->ctx, p->req, &cq);
      p->rpc->Finish(&p->out.response, &p->out.status, reinterpret_cast<void*>(i));
      ps.push_back(std::move(p));
    }
    for (size_t n = 0; n < calls.size(); ++n) {
      void* tag = nullptr;
      bool ok = false;
      if (!cq.Next(&tag, &ok)) break;
    }
    std::vector<Outcome> out;
    for (auto& p : ps) out.push_back(std::move(p->out));
    return out;
  }

  std::unique_ptr<Stream> Subscribe(const std::string& channel, const std::string& key,
                                    std::chrono::milliseconds deadline = 15s) {
    auto s = std::make_unique<Stream>();
    s->ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    v1::SubscribeRequest req;
    req.set_channel(channel);
    req.set_key(key);
    s->reader = stub_->Subscribe(&s->ctx, req);
    return s;
  }

  // The first update of a stream: `subscribed`.
  static v1::Subscribed ExpectSubscribed(Stream& s) {
    v1::SubscriptionUpdate u;
    EXPECT_TRUE(s.Next(&u));
    EXPECT_TRUE(u.has_subscribed()) << u.DebugString();
    return u.subscribed();
  }

  std::unique_ptr<emulator::EmoggEmulator> emulator_;
  EmoggBridgeOptions options_;
  core::BridgeRegistry registry_;
  core::Bridge* bridge_ = nullptr;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::EmoggService::Stub> stub_;
};

}  // namespace wsbridge::emogg::testing
