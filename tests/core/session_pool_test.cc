// SessionPool with real sessions of the fake protocol against a real WebSocket server:
// keys and the cap, idle expiry, the default credential's session following a rotated
// secret while the old one drains, operator close, shutdown.
#include "bridges/core/session_pool.h"

#include <future>
#include <memory>
#include <string>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "tests/core/fake_protocol.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::core {
namespace {

namespace net = boost::asio;
using std::chrono::milliseconds;
using std::chrono::seconds;
using wsbridge::testing::WaitFor;

class SessionPoolTest : public ::testing::Test {
 protected:
  SessionPoolTest() : work_(net::make_work_guard(io_)), thread_([this] { io_.run(); }) {
    upstreams::WsServerHandler h;
    h.on_message = [this](const std::shared_ptr<upstreams::WsServerConnection>& c,
                          std::string_view data, bool) {
      std::string m(data);
      if (absl::StartsWith(m, "login|")) {
        absl::MutexLock lock(&mu_);
        logins_.push_back(m.substr(6));
        last_login_ = c;
        c->Send("login|ok", false);
      }
    };
    server_ = std::make_unique<upstreams::WsServer>(upstreams::WsServerOptions{}, std::move(h));
    EXPECT_TRUE(server_->Start().ok());
  }
  ~SessionPoolTest() override {
    if (pool_ != nullptr) {
      std::promise<void> done;
      pool_->Shutdown([&] { done.set_value(); });
      done.get_future().wait_for(seconds(20));
      pool_.reset();
    }
    work_.reset();
    io_.stop();
    thread_.join();
  }

  static SessionPoolOptions Opts(uint32_t max_sessions = 1000,
                                 Duration idle = std::chrono::minutes(5),
                                 Duration check = std::chrono::seconds(1)) {
    SessionPoolOptions o;
    o.max_sessions = max_sessions;
    o.idle_timeout = idle;
    o.check_interval = check;
    return o;
  }

  void MakePool(SessionPoolOptions o) {
    o.bridge = "fake";
    o.upstream = "fake";
    pool_ = std::make_unique<SessionPool>(
        o, io_.get_executor(),
        [this](const std::string& id, std::shared_ptr<SecretSource> credential, bool) {
          SessionOptions so;
          so.bridge = "fake";
          so.id = id;
          so.upstream = "fake";
          so.connection.allow_plaintext = true;
          so.connection.backoff.initial = milliseconds(10);
          return UpstreamSession::Create(
              io_.get_executor(), so,
              std::make_unique<testing::FakeProtocol>(server_->url(), credential, true));
        },
        [this] { health_changes_.fetch_add(1); });
  }

  std::vector<std::string> logins() {
    absl::MutexLock lock(&mu_);
    return logins_;
  }
  // Drops the connection that logged in last (no close frame).
  void DropLastLogin() {
    absl::MutexLock lock(&mu_);
    if (auto c = last_login_.lock()) c->Drop();
  }
  std::vector<std::string> ids() {
    std::vector<std::string> out;
    for (const auto& s : pool_->List()) out.push_back(s.id());
    return out;
  }

  net::io_context io_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::thread thread_;
  std::unique_ptr<upstreams::WsServer> server_;
  absl::Mutex mu_;
  std::vector<std::string> logins_ ABSL_GUARDED_BY(mu_);
  std::weak_ptr<upstreams::WsServerConnection> last_login_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> health_changes_{0};
  std::unique_ptr<SessionPool> pool_;
};

TEST_F(SessionPoolTest, SessionsAreKeyedByCredentialAndCapped) {
  MakePool(Opts(2));
  absl::StatusOr<Lease> a1 = pool_->Acquire(CredentialKey("tenant-a"), "tenant-a");
  absl::StatusOr<Lease> a2 = pool_->Acquire(CredentialKey("tenant-a"), "tenant-a");
  absl::StatusOr<Lease> b = pool_->Acquire(CredentialKey("tenant-b"), "tenant-b");
  ASSERT_TRUE(a1.ok() && a2.ok() && b.ok());
  EXPECT_EQ(a1->get(), a2->get());
  EXPECT_NE(a1->get(), b->get());
  absl::StatusOr<Lease> c = pool_->Acquire(CredentialKey("tenant-c"), "tenant-c");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "max_sessions"));
  // Ids carry a prefix of the credential's hash, never the credential.
  for (const auto& s : pool_->List()) {
    EXPECT_FALSE(absl::StrContains(s.id(), "tenant"));
    EXPECT_EQ(s.id().rfind("fake/", 0), 0u);
  }
}

TEST_F(SessionPoolTest, UnusedSessionsCloseAfterTheIdleTimeout) {
  MakePool(Opts(1000, milliseconds(100), milliseconds(20)));
  pool_->Start();
  {
    absl::StatusOr<Lease> held = pool_->Acquire(CredentialKey("held"), "held");
    absl::StatusOr<Lease> dropped = pool_->Acquire(CredentialKey("dropped"), "dropped");
    ASSERT_TRUE(held.ok() && dropped.ok());
    dropped->Release();
    ASSERT_TRUE(WaitFor([&] { return pool_->size() == 1; }));
    EXPECT_EQ(pool_->List().at(0).id(), "fake/" + CredentialKey("held").substr(0, 8));
  }
  EXPECT_TRUE(WaitFor([&] { return pool_->size() == 0; }));
}

TEST_F(SessionPoolTest, TheDefaultSessionFollowsARotatedSecretAndTheOldOneDrains) {
  wsbridge::testing::TempDir dir;
  const std::string path = dir.WriteFile("token", "first-token\n");
  config::v1::Secret secret;
  secret.set_file(path);
  MakePool(Opts(1, std::chrono::minutes(5), milliseconds(20)));
  pool_->SetDefault(SecretSource::Create(secret).value());
  pool_->Start();
  ASSERT_TRUE(WaitFor([&] { return pool_->DefaultReady(); }));
  absl::StatusOr<Lease> old = pool_->AcquireDefault();  // a call still on the old session
  ASSERT_TRUE(old.ok());
  const std::string old_id = (*old)->id();

  dir.WriteFile("token", "second-token\n");
  pool_->RefreshSecretsNow();
  // Without any call, the pool moves the default to a session for the new value.
  ASSERT_TRUE(WaitFor([&] {
    for (const auto& s : pool_->List()) {
      if (s.id() != old_id && s.state() == admin::v1::SESSION_STATE_READY) return true;
    }
    return false;
  }));
  EXPECT_EQ(logins(), (std::vector<std::string>{"first-token", "second-token"}));
  EXPECT_EQ(pool_->size(), 2u);  // the old one drains while a call holds it
  old->Release();
  EXPECT_TRUE(WaitFor([&] { return pool_->size() == 1; }));
  EXPECT_NE(pool_->List().at(0).id(), old_id);
  EXPECT_TRUE(WaitFor([&] { return server_->open_connections() == 1; }));
  EXPECT_TRUE(pool_->DefaultReady());
}

// The secret changes, and the default session reconnects (here: the upstream dropped it)
// before the pool has looked at the secret again: it logs in with the new value. When
// the pool then notices the rotation, that session becomes the new value's session: no
// second login, and the default stays ready throughout. If the first value comes back,
// it gets a session of its own whose id does not repeat the kept one's.
TEST_F(SessionPoolTest, ADefaultSessionAlreadyOnTheNewValueIsKeptWhenTheRotationIsNoticed) {
  wsbridge::testing::TempDir dir;
  const std::string path = dir.WriteFile("token", "first-token\n");
  config::v1::Secret secret;
  secret.set_file(path);
  // The pool's own check never runs in this test: AcquireDefault (a call) notices.
  MakePool(Opts(1000, std::chrono::hours(1), std::chrono::hours(1)));
  std::shared_ptr<SecretSource> source = SecretSource::Create(secret).value();
  pool_->SetDefault(source);
  pool_->Start();
  ASSERT_TRUE(WaitFor([&] { return pool_->DefaultReady(); }));
  const std::string first_id = ids().at(0);

  const uint64_t before = source->version();
  dir.WriteFile("token", "second-token\n");
  source->Refresh();  // the refresher's re-read, now
  ASSERT_NE(source->version(), before);
  DropLastLogin();
  ASSERT_TRUE(WaitFor([&] { return logins().size() == 2 && pool_->DefaultReady(); }));
  EXPECT_EQ(logins().back(), "second-token");

  const int health_before = health_changes_.load();
  absl::StatusOr<Lease> kept = pool_->AcquireDefault();
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ((*kept)->id(), first_id);
  EXPECT_TRUE(pool_->DefaultReady());
  EXPECT_EQ(pool_->size(), 1u);
  EXPECT_EQ(logins().size(), 2u) << "a second session logged in with the new value";
  EXPECT_EQ(health_changes_.load(), health_before);
  // A call holding the new value's credential shares it, as it would a fresh session.
  absl::StatusOr<Lease> same = pool_->Acquire(CredentialKey("second-token"), "second-token");
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->get(), kept->get());

  // The first value comes back while a call still holds the kept session: it drains, and
  // the first value's new session has an id of its own.
  dir.WriteFile("token", "first-token\n");
  source->Refresh();  // the refresher's re-read, now
  absl::StatusOr<Lease> back = pool_->AcquireDefault();
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_NE(back->get(), kept->get());
  ASSERT_TRUE(WaitFor([&] { return logins().size() == 3 && pool_->DefaultReady(); }));
  EXPECT_EQ(logins().back(), "first-token");
  const std::vector<std::string> both = ids();
  ASSERT_EQ(both.size(), 2u);
  EXPECT_NE(both[0], both[1]);
  EXPECT_EQ(pool_->Close(first_id).code(), absl::StatusCode::kOk);
  EXPECT_EQ(ids(), (std::vector<std::string>{(*back)->id()}));
}

TEST_F(SessionPoolTest, OperatorCloseReplacesTheDefaultAndUnknownIdsAreNotFound) {
  MakePool(Opts());
  pool_->SetDefault(SecretSource::Fixed("default-token"));
  pool_->Start();
  ASSERT_TRUE(WaitFor([&] { return pool_->DefaultReady(); }));
  const std::string id = pool_->List().at(0).id();
  EXPECT_EQ(pool_->Close("fake/nope").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(pool_->Close(id).ok());
  EXPECT_TRUE(WaitFor([&] { return pool_->DefaultReady() && logins().size() == 2; }));
}

TEST_F(SessionPoolTest, ShutdownClosesEverySessionAndRefusesNewOnes) {
  MakePool(Opts());
  ASSERT_TRUE(pool_->Acquire(CredentialKey("a"), "a-token").ok());
  std::promise<void> done;
  pool_->Shutdown([&] { done.set_value(); });
  EXPECT_EQ(done.get_future().wait_for(seconds(20)), std::future_status::ready);
  absl::StatusOr<Lease> late = pool_->Acquire(CredentialKey("b"), "b-token");
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(late.status().message(), "shutting down"));
}

}  // namespace
}  // namespace wsbridge::core
