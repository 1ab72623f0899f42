// The four bridges as fault scenarios and the soak see them (a "kit" per bridge): how to
// start its emulator (optionally over TLS), describe it in the daemon's config, build it
// with the scenario's URL, backoff and timeouts, make a call that needs the upstream, and
// hold a live stream. Every credential contains "s3cr3t" (the suite-wide secret check).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/core/upstream_config.h"
#include "daemon/config/config.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::faults {

// --- Upstreams -------------------------------------------------------------------------

// How an upstream serves TLS: its certificate and, when non-zero, the newest TLS version
// it offers (OpenSSL's numbering).
struct TlsServe {
  std::string cert_pem, key_pem;
  int max_version = 0;
};

// What runs behind the proxy; stopped when destroyed.
class Upstream {
 public:
  virtual ~Upstream() = default;
  virtual uint16_t port() const = 0;
};

template <typename Emulator>
class EmulatorUpstream : public Upstream {
 public:
  explicit EmulatorUpstream(std::unique_ptr<Emulator> e) : emulator_(std::move(e)) {}
  uint16_t port() const override { return emulator_->port(); }
  Emulator& emulator() { return *emulator_; }

 private:
  std::unique_ptr<Emulator> emulator_;
};

// A TLS endpoint offering only TLS <= 1.1 for the bridges whose emulators cannot cap
// their version: the bridge never gets past TLS, so what speaks WebSocket behind it
// does not matter (and any upgrade that did get through would count as a failure).
class OutdatedTlsUpstream : public Upstream {
 public:
  static absl::StatusOr<std::unique_ptr<Upstream>> Start(const TlsServe& tls) {
    upstreams::WsServerOptions so;
    so.tls = true;
    so.cert_pem = tls.cert_pem;
    so.key_pem = tls.key_pem;
    so.tls_max_version = tls.max_version;
    auto out = std::make_unique<OutdatedTlsUpstream>();
    upstreams::WsServerHandler h;
    std::atomic<int>* opened = &out->opened;
    h.on_open = [opened](const std::shared_ptr<upstreams::WsServerConnection>&) { ++*opened; };
    out->server = std::make_unique<upstreams::WsServer>(std::move(so), std::move(h));
    if (absl::Status st = out->server->Start(); !st.ok()) return st;
    return std::unique_ptr<Upstream>(std::move(out));
  }
  uint16_t port() const override { return server->port(); }
  ~OutdatedTlsUpstream() override {
    if (server) server->Stop();
  }

  std::unique_ptr<upstreams::WsServer> server;
  std::atomic<int> opened{0};
};

template <typename Emulator, typename Options>
absl::StatusOr<std::unique_ptr<Upstream>> StartEmulator(Options o, const TlsServe* tls) {
  if (tls != nullptr) {
    o.tls = true;
    o.cert_pem = tls->cert_pem;
    o.key_pem = tls->key_pem;
  }
  auto e = std::make_unique<Emulator>(std::move(o));
  if (absl::Status st = e->Start(); !st.ok()) return st;
  return std::unique_ptr<Upstream>(std::make_unique<EmulatorUpstream<Emulator>>(std::move(e)));
}

// --- The bridges -------------------------------------------------------------------------

// What a scenario sets for the bridge under test.
struct Settings {
  std::string url;      // the proxy's ws:// or wss:// URL
  std::string ca_file;  // trusted CA for wss ("" with ws)
  core::BackoffPolicy backoff{std::chrono::milliseconds(20), std::chrono::milliseconds(200), 2.0,
                              std::chrono::seconds(30)};
  core::Duration request_timeout = std::chrono::seconds(5);
};


// Points an endpoint at the scenario's URL with its backoff and timeouts.
void Connect(const Settings& s, core::UpstreamEndpoint& e);

// A call that needs the upstream. `caller` < 0: the bridge's configured credential;
// otherwise the caller's own credential (or conversation/chat) number `caller`.
using Channel = std::shared_ptr<grpc::Channel>;
using Probe = std::function<grpc::Status(const Channel&, int caller, bool wait_for_ready)>;

// A live stream for the drain scenario: opened and shown working, then ended by the
// drain. `finish` reads to the end and checks what the bridge said; `check` looks
// upstream for what was accepted.
struct LiveStream {
  std::function<grpc::Status()> finish;
  std::function<void(const grpc::Status&)> check;
};
using OpenStream = std::function<std::unique_ptr<LiveStream>(const Channel&, Upstream&, int n)>;

struct Kit {
  std::string name;
  std::string service;  // full gRPC service name (health)
  // Serving follows an always-on session of a configured credential (DFX, Emogg); the
  // others make their sessions per call and serve while they can make them.
  bool always_on_session;
  // How many upstream sessions a working bridge holds before any call.
  int base_sessions;
  std::function<absl::StatusOr<std::unique_ptr<Upstream>>(const TlsServe*)> start_upstream;
  std::function<void(config::v1::BridgeConfig&, const std::string& url)> describe;
  std::function<absl::StatusOr<std::unique_ptr<core::Bridge>>(const Settings&,
                                                               const core::BridgeContext&)>
      make;
  Probe probe;
  OpenStream open_stream;
  // What got past TLS upstream: WebSocket upgrade requests (DFX: connections opened,
  // Emogg: logins).
  std::function<int(Upstream&)> past_tls;
};

// The stand-in counts its opened WebSockets; an emulator through `count`.
template <typename Emulator>
std::function<int(Upstream&)> PastTls(int (*count)(const Emulator&)) {
  return [count](Upstream& up) {
    if (auto* old = dynamic_cast<OutdatedTlsUpstream*>(&up)) return old->opened.load();
    return count(static_cast<EmulatorUpstream<Emulator>&>(up).emulator());
  };
}

void Deadline(grpc::ClientContext& ctx, std::chrono::milliseconds d);
// Sets the metadata that makes a call wait for the upstream (`wait`) instead of failing fast.
void WaitForReady(grpc::ClientContext& ctx, bool wait);

// The four bridges, each with its emulator. Every credential contains "s3cr3t".
Kit DfxKit();
Kit EmoggKit();
Kit NlxKit();
Kit NexoraKit();
// All four, for INSTANTIATE_TEST_SUITE_P.
std::vector<Kit> AllKits();
std::string KitName(const ::testing::TestParamInfo<Kit>& info);
void PrintTo(const Kit& kit, std::ostream* os);


}  // namespace wsbridge::faults
