// The fake upstream: a real WebSocket server on 127.0.0.1 that speaks the fake protocol
// (fake_protocol.h), for the toolkit's tests.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::core::testing {

// The fake upstream: answers the fake protocol, records what it received, and lets a
// test change its behaviour. Thread-safe.
class FakeUpstream {
 public:
  FakeUpstream() {
    upstreams::WsServerHandler h;
    h.on_handshake = [this](const upstreams::HandshakeInfo&, std::string*) {
      absl::MutexLock lock(&mu_);
      ++handshakes_;
      return refuse_;
    };
    h.on_open = [this](const std::shared_ptr<upstreams::WsServerConnection>& c) {
      absl::MutexLock lock(&mu_);
      conns_.push_back(c);
    };
    h.on_message = [this](const std::shared_ptr<upstreams::WsServerConnection>& c,
                          std::string_view data, bool) { OnMessage(c, std::string(data)); };
    server_ = std::make_unique<upstreams::WsServer>(upstreams::WsServerOptions{}, std::move(h));
    EXPECT_TRUE(server_->Start().ok());
  }

  std::string url() const { return server_->url(); }
  // Refuse upgrades with this status (OK = accept).
  void Refuse(absl::Status st) {
    absl::MutexLock lock(&mu_);
    refuse_ = std::move(st);
  }
  // Drop every open connection (no close frame).
  void DropAll() {
    std::vector<std::shared_ptr<upstreams::WsServerConnection>> conns;
    {
      absl::MutexLock lock(&mu_);
      conns.swap(conns_);
    }
    for (auto& c : conns) c->Drop();
  }
  void Push(const std::string& frame) {
    absl::MutexLock lock(&mu_);
    for (auto& c : conns_) c->Send(frame, false);
  }
  // Messages received that start with `prefix`.
  int Count(std::string_view prefix) const {
    absl::MutexLock lock(&mu_);
    int n = 0;
    for (const auto& m : messages_) n += absl::StartsWith(m, absl::string_view(prefix.data(), prefix.size())) ? 1 : 0;
    return n;
  }
  std::vector<std::string> messages() const {
    absl::MutexLock lock(&mu_);
    return messages_;
  }
  int handshakes() const {
    absl::MutexLock lock(&mu_);
    return handshakes_;
  }
  int open() const { return static_cast<int>(server_->open_connections()); }

 private:
  // Default answers: login ok unless the token starts with "bad" (refused) or "mute" (no
  // answer at all); req echo (body "hold"
  // is never answered, "stream" answers twice then finally, "404" is an error); ord echo;
  // subscriptions acknowledged as "S-<topic>" unless the topic is "silent".
  void OnMessage(const std::shared_ptr<upstreams::WsServerConnection>& c, std::string m) {
    {
      absl::MutexLock lock(&mu_);
      messages_.push_back(m);
    }
    std::vector<std::string> f = absl::StrSplit(m, absl::MaxSplits('|', 2));
    if (f[0] == "login") {
      if (absl::StartsWith(f[1], "mute")) return;
      c->Send(absl::StartsWith(f[1], "bad") ? "login|no" : "login|ok", false);
    } else if (f[0] == "req") {
      const std::string& body = f[2];
      if (body == "hold") return;
      if (body == "stream") {
        c->Send(absl::StrCat("rep|", f[1], "|0|200|part1"), false);
        c->Send(absl::StrCat("rep|", f[1], "|0|200|part2"), false);
      }
      const char* status = body == "404" ? "404" : body == "429" ? "429" : "200";
      c->Send(absl::StrCat("rep|", f[1], "|1|", status, "|", body), false);
    } else if (f[0] == "ord") {
      if (f[1] == "hold") return;
      c->Send(absl::StrCat("ord|1|200|", f[1]), false);
    } else if (f[0] == "sub") {
      if (f[2] == "silent") return;
      c->Send(absl::StrCat("suback|", f[1], "|S-", f[2]), false);
    } else if (f[0] == "unsub") {
      c->Send(absl::StrCat("rep|", f[1], "|1|200|"), false);
    } else if (f[0] == "ping") {
      c->Send("pong", false);
    }
  }

  mutable absl::Mutex mu_;
  absl::Status refuse_ ABSL_GUARDED_BY(mu_);
  int handshakes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> messages_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<upstreams::WsServerConnection>> conns_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<upstreams::WsServer> server_;
};

}  // namespace wsbridge::core::testing
