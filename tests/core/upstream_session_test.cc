// UpstreamSession through the fake protocol (tests/core/fake_protocol.h) over a real
// WebSocket server on 127.0.0.1: everything the session does for every bridge.
#include "bridges/core/upstream_session.h"

#include <atomic>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "bridges/core/loop_executor.h"
#include "bridges/core/metrics.h"
#include "tests/core/fake_protocol.h"
#include "tests/core/fake_upstream.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/ws_server.h"

namespace wsbridge::core {
namespace {

namespace net = boost::asio;
using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::seconds;
using testing::BodyOf;
using testing::FakeProtocol;
using testing::FakeRequest;
using testing::FakeUpstream;
using testing::MakeText;
using wsbridge::testing::WaitFor;

// Collects what a request's callback receives. Thread-safe.
struct Replies {
  absl::Mutex mu;
  std::vector<absl::StatusOr<Reply>> got ABSL_GUARDED_BY(mu);
  ReplyCallback callback() {
    return [this](absl::StatusOr<Reply> r) {
      absl::MutexLock lock(&mu);
      got.push_back(std::move(r));
    };
  }
  size_t size() {
    absl::MutexLock lock(&mu);
    return got.size();
  }
  absl::StatusOr<Reply> at(size_t i) {
    absl::MutexLock lock(&mu);
    return got.at(i);
  }
  bool WaitFinal() {
    return WaitFor([this] {
      absl::MutexLock lock(&mu);
      return !got.empty() && (!got.back().ok() || got.back()->final);
    });
  }
};

// A subscriber that records everything. Thread-safe.
struct Sink final : EventSink {
  absl::Mutex mu;
  std::vector<SubscribedInfo> subscribed ABSL_GUARDED_BY(mu);
  std::vector<std::pair<std::string, bool>> events ABSL_GUARDED_BY(mu);
  std::optional<absl::Status> ended ABSL_GUARDED_BY(mu);
  void OnSubscribed(const SubscribedInfo& info) override {
    absl::MutexLock lock(&mu);
    subscribed.push_back(info);
  }
  void OnEvent(const PayloadPtr& e, bool after_gap) override {
    absl::MutexLock lock(&mu);
    events.emplace_back(BodyOf(e), after_gap);
  }
  void OnEnded(const absl::Status& st) override {
    absl::MutexLock lock(&mu);
    ended = st;
  }
  size_t subscriptions() {
    absl::MutexLock lock(&mu);
    return subscribed.size();
  }
  size_t event_count() {
    absl::MutexLock lock(&mu);
    return events.size();
  }
};

class UpstreamSessionTest : public ::testing::Test {
 protected:
  UpstreamSessionTest() : work_(net::make_work_guard(io_)), thread_([this] { io_.run(); }) {}
  ~UpstreamSessionTest() override {
    if (session_ != nullptr) {
      std::promise<void> closed;
      session_->Close(1000, "test over", [&] { closed.set_value(); });
      closed.get_future().wait_for(seconds(20));
      session_.reset();
    }
    work_.reset();
    io_.stop();
    thread_.join();
  }

  // Whether the upstream received a message containing `text`.
  bool UpstreamGot(absl::string_view text) const {
    for (const std::string& m : upstream_.messages()) {
      if (absl::StrContains(m, text)) return true;
    }
    return false;
  }

  // A session on the daemon's executor (LoopExecutor), logged in and idle.
  std::shared_ptr<UpstreamSession> MakeReadyOnLoopExecutor() {
    inline_executor_ = true;
    auto s = Make();
    Replies& first = R();
    s->Send(FakeRequest("first"), first.callback());
    EXPECT_TRUE(first.WaitFinal());
    return s;
  }

  std::shared_ptr<UpstreamSession> Make(std::function<void(SessionOptions&)> tweak = nullptr,
                                        std::string token = "good-token", bool login = true) {
    SessionOptions o;
    o.bridge = "fake";
    o.id = "fake/test";
    o.upstream = "fake";
    o.error_domain = std::string(testing::kFakeDomain);
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = milliseconds(10);
    o.connection.backoff.max = milliseconds(50);
    o.connection.auth_backoff.initial = milliseconds(100);
    o.connection.auth_backoff.max = milliseconds(200);
    o.request_timeout = seconds(10);
    o.malformed_frames = &malformed_;
    o.unrouted_frames = &unrouted_;
    o.health_changed = health_changed_;
    if (tweak) tweak(o);
    net::any_io_executor executor = io_.get_executor();
    if (inline_executor_) executor = LoopExecutor(io_.get_executor());
    session_ = UpstreamSession::Create(
        executor, o,
        std::make_unique<FakeProtocol>(upstream_.url(), SecretSource::Fixed(token), login));
    return session_;
  }

  // The session's io thread, held busy until Release (or destruction).
  struct HeldIo {
    std::shared_ptr<absl::Notification> release = std::make_shared<absl::Notification>();
    std::thread::id io_thread;
    void Release() {
      if (release != nullptr && !release->HasBeenNotified()) release->Notify();
    }
    ~HeldIo() { Release(); }
  };
  // Holds the io thread. The session's strand may still have work queued behind it at
  // that moment (what its last run posted runs once the io thread is free), and a request
  // then waits its turn, as it should: the tests that need the strand idle while the io
  // thread is held try again, up to kHeldTries times, and assert that one request left
  // while held (never that a given one did).
  HeldIo HoldIoThread() {
    HeldIo held;
    absl::Notification busy;
    std::thread::id io_thread;
    net::post(io_, [&busy, &io_thread, release = held.release] {
      io_thread = std::this_thread::get_id();
      busy.Notify();
      release->WaitForNotification();
    });
    busy.WaitForNotification();
    held.io_thread = io_thread;
    return held;
  }
  static constexpr int kHeldTries = 20;
  static constexpr std::chrono::milliseconds kHeldWait{3000};

  // Reply collectors outlive the session (closing it fails what is still open).
  Replies& R() { return *replies_.emplace_back(std::make_unique<Replies>()); }

  net::io_context io_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::thread thread_;
  FakeUpstream upstream_;
  std::vector<std::unique_ptr<Replies>> replies_;
  Counter malformed_;
  Counter unrouted_;
  std::atomic<int> health_changes_{0};
  const std::shared_ptr<const std::function<void()>> health_changed_ =
      std::make_shared<const std::function<void()>>([this] { health_changes_.fetch_add(1); });
  bool inline_executor_ = false;  // the daemon's session executor (LoopExecutor)
  std::shared_ptr<UpstreamSession> session_;
};

TEST_F(UpstreamSessionTest, LogsInFirstThenAnswersRequestsByRoute) {
  auto s = Make();
  Replies& a = R(); Replies& b = R();
  s->Send(FakeRequest("hold"), a.callback());  // never answered: b must not get its reply
  s->Send(FakeRequest("second"), b.callback());
  ASSERT_TRUE(b.WaitFinal());
  EXPECT_EQ(BodyOf(b.at(0)->payload), "second");
  EXPECT_EQ(a.size(), 0u);
  std::vector<std::string> m = upstream_.messages();
  ASSERT_GE(m.size(), 3u);
  EXPECT_EQ(m[0], "login|good-token");  // nothing before the login
  EXPECT_TRUE(s->ready());
  EXPECT_GE(health_changes_.load(), 1);
}

TEST_F(UpstreamSessionTest, StreamedRepliesEndWithTheFinalOne) {
  auto s = Make();
  Replies& r = R();
  s->Send(FakeRequest("stream"), r.callback());
  ASSERT_TRUE(r.WaitFinal());
  ASSERT_EQ(r.size(), 3u);
  EXPECT_FALSE(r.at(0)->final);
  EXPECT_EQ(BodyOf(r.at(1)->payload), "part2");
  EXPECT_TRUE(r.at(2)->final);
  Replies& e = R();
  s->Send(FakeRequest("404"), e.callback());
  ASSERT_TRUE(e.WaitFinal());
  EXPECT_EQ(e.at(0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrorReason(e.at(0).status()), "HTTP_404");
}

TEST_F(UpstreamSessionTest, SendOrderRepliesGoToTheOldestRequest) {
  auto s = Make();
  Replies& a = R(); Replies& b = R();
  s->Send(FakeRequest("one", /*ordered=*/true), a.callback());
  s->Send(FakeRequest("two", /*ordered=*/true), b.callback());
  ASSERT_TRUE(a.WaitFinal());
  ASSERT_TRUE(b.WaitFinal());
  EXPECT_EQ(BodyOf(a.at(0)->payload), "one");
  EXPECT_EQ(BodyOf(b.at(0)->payload), "two");
}

// A send-order protocol that also pushes on its own (NLX): its local subscription gets
// the pushes (route ""), never the answer of a request in flight.
TEST_F(UpstreamSessionTest, SendOrderRepliesGoToTheRequestAndPushesToTheLocalSubscription) {
  auto s = Make();
  auto sink = std::make_shared<Sink>();
  s->Subscribe("", nullptr, sink);
  ASSERT_TRUE(WaitFor([&] { return sink->subscriptions() == 1; }));
  Replies& a = R();
  s->Send(FakeRequest("turn", /*ordered=*/true), a.callback());
  ASSERT_TRUE(a.WaitFinal());
  EXPECT_EQ(BodyOf(a.at(0)->payload), "turn");
  EXPECT_EQ(sink->event_count(), 0);
  upstream_.Push("ord|1|200|pushed");  // nothing in flight: an unsolicited message
  ASSERT_TRUE(WaitFor([&] { return sink->event_count() == 1; }));
}

TEST_F(UpstreamSessionTest, ADropFailsInFlightRequestsOutcomeUnknownAndResendsIdempotentOnes) {
  auto s = Make();
  Replies& warm = R();
  s->Send(FakeRequest("warm"), warm.callback());
  ASSERT_TRUE(warm.WaitFinal());
  Replies& lost = R(); Replies& resent = R();
  s->Send(FakeRequest("hold"), lost.callback());
  Request idempotent = FakeRequest("hold");
  idempotent.on_drop = OnDrop::kResend;
  s->Send(std::move(idempotent), resent.callback());
  ASSERT_TRUE(WaitFor([&] { return upstream_.Count("req|") == 3; }));
  upstream_.DropAll();
  ASSERT_TRUE(lost.WaitFinal());
  EXPECT_EQ(lost.at(0).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ErrorReason(lost.at(0).status()), "OUTCOME_UNKNOWN");
  EXPECT_TRUE(absl::StrContains(lost.at(0).status().message(), "not resent"));
  // The idempotent one went out again on the new connection (after a new login).
  EXPECT_TRUE(WaitFor([&] { return upstream_.Count("req|") == 4; }));
  EXPECT_EQ(upstream_.Count("login|"), 2);
  EXPECT_EQ(resent.size(), 0u);
}

TEST_F(UpstreamSessionTest, PendingRequestsAreBoundedWhileTheUpstreamIsAway) {
  upstream_.Refuse(absl::UnavailableError("down for maintenance"));
  auto s = Make([](SessionOptions& o) { o.max_pending = 2; });
  Replies& a = R(); Replies& b = R(); Replies& c = R();
  s->Send(FakeRequest("a"), a.callback());
  s->Send(FakeRequest("b"), b.callback());
  s->Send(FakeRequest("c"), c.callback());
  ASSERT_TRUE(c.WaitFinal());
  EXPECT_EQ(c.at(0).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(c.at(0).status().message(), "max_pending_requests"));
  EXPECT_EQ(a.size(), 0u);  // the accepted ones still wait
  upstream_.Refuse(absl::OkStatus());
  EXPECT_TRUE(a.WaitFinal());
  EXPECT_TRUE(b.WaitFinal());
  EXPECT_TRUE(a.at(0).ok());
}

TEST_F(UpstreamSessionTest, AQueuedRequestFailsAtItsDeadlineWithoutBeingSent) {
  upstream_.Refuse(absl::UnavailableError("down"));
  auto s = Make();
  Replies& r = R();
  Request req = FakeRequest("late");
  req.deadline = Clock::now() + milliseconds(100);
  s->Send(std::move(req), r.callback());
  ASSERT_TRUE(r.WaitFinal());
  EXPECT_EQ(r.at(0).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(r.at(0).status().message(), "nothing was sent"));
  upstream_.Refuse(absl::OkStatus());
  Replies& next = R();
  s->Send(FakeRequest("next"), next.callback());
  ASSERT_TRUE(next.WaitFinal());
  EXPECT_EQ(upstream_.Count("req|"), 1);  // "late" never went out
}

TEST_F(UpstreamSessionTest, ARequestWhoseDeadlineHasPassedIsNeverSent) {
  auto s = Make();
  Replies& ready = R();
  s->Send(FakeRequest("first"), ready.callback());
  ASSERT_TRUE(ready.WaitFinal());  // the session is ready: a request would go out at once
  std::vector<Replies*> late;
  for (int i = 0; i < 50; ++i) {
    Replies& r = R();
    Request req = FakeRequest("late");
    req.deadline = Clock::now() - microseconds(1);
    s->Send(std::move(req), r.callback());
    late.push_back(&r);
  }
  Replies& next = R();
  s->Send(FakeRequest("next"), next.callback());
  ASSERT_TRUE(next.WaitFinal());
  for (Replies* r : late) {
    ASSERT_TRUE(r->WaitFinal());
    EXPECT_EQ(r->at(0).status().code(), absl::StatusCode::kDeadlineExceeded);
    EXPECT_TRUE(absl::StrContains(r->at(0).status().message(), "nothing was sent"))
        << r->at(0).status();
  }
  EXPECT_EQ(upstream_.Count("req|"), 2);  // "first" and "next" only
}

// Sessions share one copy of equal settings (all but the id); a session whose settings
// differ in one field keeps its own, and each keeps its own id.
TEST_F(UpstreamSessionTest, SessionsWithDifferentSettingsEachKeepTheirOwn) {
  auto patient = Make([](SessionOptions& o) { o.id = "fake/patient"; });
  auto twin = Make([](SessionOptions& o) { o.id = "fake/twin"; });
  auto hasty = Make([](SessionOptions& o) {
    o.id = "fake/hasty";
    o.request_timeout = milliseconds(200);
  });
  EXPECT_EQ(patient->id(), "fake/patient");
  EXPECT_EQ(twin->id(), "fake/twin");
  EXPECT_EQ(hasty->id(), "fake/hasty");
  EXPECT_EQ(twin->Describe().id(), "fake/twin");
  Replies& slow = R();
  Replies& fast = R();
  Replies& other = R();
  patient->Send(FakeRequest("hold"), slow.callback());  // never answered
  twin->Send(FakeRequest("twin"), other.callback());
  hasty->Send(FakeRequest("hold"), fast.callback());
  ASSERT_TRUE(other.WaitFinal());
  EXPECT_EQ(BodyOf(other.at(0)->payload), "twin");
  ASSERT_TRUE(fast.WaitFinal());  // at the hasty session's 200 ms, not the others' 10 s
  EXPECT_EQ(fast.at(0).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(slow.size(), 0u);
  for (const auto& s : {patient, twin}) {
    std::promise<void> closed;
    s->Close(1000, "test over", [&] { closed.set_value(); });
    ASSERT_EQ(closed.get_future().wait_for(seconds(20)), std::future_status::ready);
  }
  ASSERT_TRUE(slow.WaitFinal());
  EXPECT_EQ(slow.at(0).status().code(), absl::StatusCode::kUnavailable);  // closed, not expired
}

TEST_F(UpstreamSessionTest, AnswersTheUpstreamAsksToRetryAreResentAfterThePause) {
  auto s = Make();
  Replies& r = R();
  Request req = FakeRequest("429");
  req.max_retries = 2;
  s->Send(std::move(req), r.callback());
  ASSERT_TRUE(r.WaitFinal());
  EXPECT_EQ(upstream_.Count("req|"), 3);  // the first try and two retries
  EXPECT_FALSE(r.at(0).ok());
}

TEST_F(UpstreamSessionTest, SubscriptionsAreSharedRestoredWithAGapAndReleasedByTheLast) {
  auto s = Make();
  auto one = std::make_shared<Sink>();
  auto two = std::make_shared<Sink>();
  uint64_t id1 = s->Subscribe("topic", nullptr, one);
  uint64_t id2 = s->Subscribe("topic", nullptr, two);
  ASSERT_TRUE(WaitFor([&] { return one->subscriptions() == 1 && two->subscriptions() == 1; }));
  EXPECT_EQ(upstream_.Count("sub|"), 1);  // one upstream subscription for both
  upstream_.Push("ev|S-topic|hello");
  ASSERT_TRUE(WaitFor([&] { return one->event_count() == 1 && two->event_count() == 1; }))
      << "unrouted " << unrouted_.value() << " malformed " << malformed_.value() << " events "
      << one->event_count() << "/" << two->event_count();

  upstream_.DropAll();
  ASSERT_TRUE(WaitFor([&] { return one->subscriptions() == 2; }));
  {
    absl::MutexLock lock(&one->mu);
    EXPECT_TRUE(one->subscribed[1].restored);
    EXPECT_LE(one->subscribed[1].gap_from, one->subscribed[1].gap_to);
  }
  EXPECT_EQ(upstream_.Count("sub|"), 2);
  upstream_.Push("ev|S-topic|again");
  ASSERT_TRUE(WaitFor([&] { return one->event_count() == 2; }));
  {
    absl::MutexLock lock(&one->mu);
    EXPECT_TRUE(one->events[1].second);  // the first event after the gap is marked
  }
  s->Unsubscribe("topic", id1);
  EXPECT_EQ(upstream_.Count("unsub|"), 0);
  s->Unsubscribe("topic", id2);
  EXPECT_TRUE(WaitFor([&] { return upstream_.Count("unsub|") == 1; }));
  EXPECT_EQ(unrouted_.value(), 0u);  // the unsubscribe's answer was expected
}

TEST_F(UpstreamSessionTest, AnUnacknowledgedSubscriptionEndsAtTheSubscribeTimeout) {
  auto s = Make([](SessionOptions& o) { o.subscribe_timeout = milliseconds(100); });
  auto sink = std::make_shared<Sink>();
  s->Subscribe("silent", nullptr, sink);
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&sink->mu);
    return sink->ended.has_value();
  }));
  absl::MutexLock lock(&sink->mu);
  EXPECT_EQ(sink->ended->code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(absl::StrContains(sink->ended->message(), "did not acknowledge"));
}

TEST_F(UpstreamSessionTest, ARefusedUpgradeFailsCallsAtOnceAndIsRetriedOnTheAuthBackoff) {
  upstream_.Refuse(absl::UnauthenticatedError("bad api key"));
  auto s = Make(nullptr, "good-token", /*login=*/false);
  Replies& r = R();
  s->Send(FakeRequest("x"), r.callback());
  ASSERT_TRUE(r.WaitFinal());
  EXPECT_EQ(r.at(0).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(s->auth_refused());
  Replies& fast = R();  // while refused, calls fail at once instead of waiting
  s->Send(FakeRequest("y"), fast.callback());
  ASSERT_TRUE(fast.WaitFinal());
  EXPECT_EQ(fast.at(0).status().code(), absl::StatusCode::kUnauthenticated);
  const admin::v1::Session d = s->Describe();
  EXPECT_TRUE(absl::StrContains(d.last_error(), "refused"));
  // Fixed upstream side: the session comes back by itself.
  upstream_.Refuse(absl::OkStatus());
  EXPECT_TRUE(WaitFor([&] { return s->ready(); }));
  EXPECT_FALSE(s->auth_refused());
  Replies& ok = R();
  s->Send(FakeRequest("z"), ok.callback());
  ASSERT_TRUE(ok.WaitFinal());
  EXPECT_TRUE(ok.at(0).ok());
}

TEST_F(UpstreamSessionTest, ARefusedLoginIsAnAuthRefusalNotAFastLoop) {
  auto s = Make(nullptr, "bad-token");
  Replies& r = R();
  s->Send(FakeRequest("x"), r.callback());
  ASSERT_TRUE(r.WaitFinal());
  EXPECT_EQ(r.at(0).status().code(), absl::StatusCode::kUnauthenticated);
  // The next login waits for the auth backoff (100-200 ms here), not the 10 ms one.
  ASSERT_TRUE(WaitFor([&] { return upstream_.Count("login|") >= 2; }));
  const admin::v1::Session d = s->Describe();
  EXPECT_EQ(d.bridge(), "fake");
}

TEST_F(UpstreamSessionTest, AnUnansweredLoginReconnectsAtTheLoginTimeoutAndLogsInAgain) {
  auto s = Make([](SessionOptions& o) { o.login_timeout = milliseconds(100); }, "mute-token");
  Replies& r = R();
  s->Send(FakeRequest("x"), r.callback());
  // Nothing answers the login: at its timeout the session drops the connection, says
  // why, and logs in again on the next one.
  ASSERT_TRUE(WaitFor([&] { return upstream_.handshakes() >= 2 && upstream_.Count("login|") >= 2; }));
  ASSERT_TRUE(WaitFor(
      [&] { return absl::StrContains(s->Describe().last_error(), "did not answer the login within 100ms"); }));
  EXPECT_FALSE(UpstreamGot("req|"));  // nothing but logins before a login is answered
}

TEST_F(UpstreamSessionTest, HeartbeatsAreSentWhileReady) {
  auto s = Make([](SessionOptions& o) { o.connection.keepalive.heartbeat_interval = milliseconds(20); });
  s->Start();
  EXPECT_TRUE(WaitFor([&] { return upstream_.Count("ping") >= 2; }));
}

TEST_F(UpstreamSessionTest, MalformedAndUnroutedFramesAreCountedNotFatal) {
  auto s = Make();
  Replies& warm = R();
  s->Send(FakeRequest("warm"), warm.callback());
  ASSERT_TRUE(warm.WaitFinal());
  upstream_.Push("garbage");
  upstream_.Push("rep|r999|1|200|nobody asked");
  upstream_.Push("ev|S-nothing|x");
  ASSERT_TRUE(WaitFor([&] { return malformed_.value() == 1 && unrouted_.value() == 2; }));
  Replies& after = R();
  s->Send(FakeRequest("still fine"), after.callback());
  ASSERT_TRUE(after.WaitFinal());
  EXPECT_TRUE(after.at(0).ok());
}

TEST_F(UpstreamSessionTest, CloseEndsEverythingAndIsIdempotent) {
  auto s = Make();
  Replies& held = R();
  s->Send(FakeRequest("hold"), held.callback());
  auto sink = std::make_shared<Sink>();
  s->Subscribe("topic", nullptr, sink);
  ASSERT_TRUE(WaitFor([&] { return sink->subscriptions() == 1; }));
  std::promise<void> a, b;
  s->Close(1001, "going away", [&] { a.set_value(); });
  s->Close(1001, "going away", [&] { b.set_value(); });
  EXPECT_EQ(a.get_future().wait_for(seconds(10)), std::future_status::ready);
  EXPECT_EQ(b.get_future().wait_for(seconds(10)), std::future_status::ready);
  ASSERT_TRUE(held.WaitFinal());
  EXPECT_EQ(held.at(0).status().code(), absl::StatusCode::kUnavailable);
  absl::MutexLock lock(&sink->mu);
  ASSERT_TRUE(sink->ended.has_value());
  EXPECT_EQ(sink->ended->code(), absl::StatusCode::kUnavailable);
}

// A request sent from a completion-queue thread inside an InlineScope (what a unary call
// does) enters the idle strand on that thread and leaves for the upstream from there: it
// gets out while the session's io thread is busy, and its answer comes back on the io
// thread.
TEST_F(UpstreamSessionTest, ASendInsideAnInlineScopeLeavesWhileTheIoThreadIsBusy) {
  auto s = MakeReadyOnLoopExecutor();
  ASSERT_FALSE(::testing::Test::HasFailure());
  bool left = false;
  for (int attempt = 0; attempt < kHeldTries && !left; ++attempt) {
    const std::string body = absl::StrCat("while busy ", attempt);
    std::atomic<std::thread::id> answered_on{};
    Replies& r = R();
    HeldIo held = HoldIoThread();
    {
      InlineScope scope;
      s->Send(FakeRequest(body), [&answered_on, cb = r.callback()](absl::StatusOr<Reply> a) {
        answered_on.store(std::this_thread::get_id());
        cb(std::move(a));
      });
    }
    left = WaitFor([&] { return UpstreamGot(body); }, kHeldWait);
    const size_t answered_while_held = r.size();
    held.Release();
    ASSERT_TRUE(r.WaitFinal());
    EXPECT_EQ(BodyOf(r.at(0)->payload), body);
    if (left) {
      EXPECT_EQ(answered_while_held, 0u);  // the answer waits for the io thread
      EXPECT_EQ(answered_on.load(), held.io_thread);
    }
  }
  EXPECT_TRUE(left) << "no request left while the io thread was busy (" << kHeldTries << " tries)";
}

// A request sent under a lock that its answer's callback takes (a bidi stream's read
// handler: the session's news takes the stream's lock) inside an InlineAfterScope is held
// until the scope closes, after the lock is released, and then leaves from this thread
// while the session's io thread is busy.
TEST_F(UpstreamSessionTest, ASendInsideAnInlineAfterScopeLeavesOnceTheLockIsReleased) {
  auto s = MakeReadyOnLoopExecutor();
  ASSERT_FALSE(::testing::Test::HasFailure());
  bool left = false;
  for (int attempt = 0; attempt < kHeldTries && !left; ++attempt) {
    const std::string body = absl::StrCat("under the lock ", attempt);
    // Shared with the callback, which may run after the test body (the session's close).
    auto stream_lock = std::make_shared<absl::Mutex>();
    Replies& r = R();
    HeldIo held = HoldIoThread();
    {
      InlineAfterScope after;
      absl::MutexLock lock(stream_lock.get());
      s->Send(FakeRequest(body), [stream_lock, cb = r.callback()](absl::StatusOr<Reply> a) {
        absl::MutexLock answer_lock(stream_lock.get());  // what Locked() does
        cb(std::move(a));
      });
      EXPECT_TRUE(InlineAfterScope::Holding());
    }
    EXPECT_FALSE(InlineAfterScope::Holding());
    // Written from this thread as the scope closed: the io thread is still held.
    left = WaitFor([&] { return UpstreamGot(body); }, kHeldWait);
    const size_t answered_while_held = r.size();
    held.Release();
    ASSERT_TRUE(r.WaitFinal());
    EXPECT_EQ(BodyOf(r.at(0)->payload), body);
    if (left) EXPECT_EQ(answered_while_held, 0u);  // the answer waits for the io thread
  }
  EXPECT_TRUE(left) << "no request left while the io thread was busy (" << kHeldTries << " tries)";
}

// LoopExecutor's rules, on strands like a session's (bridges/core/loop_executor.h).
class LoopExecutorTest : public ::testing::Test {
 protected:
  LoopExecutorTest()
      : work_(net::make_work_guard(io_)), thread_([this] {
          io_thread_.set_value(std::this_thread::get_id());
          io_.run();
        }) {
    io_id_ = io_thread_.get_future().get();
  }
  ~LoopExecutorTest() override {
    work_.reset();
    io_.stop();
    thread_.join();
  }
  net::strand<net::any_io_executor> MakeStrand() {
    return net::make_strand(net::any_io_executor(LoopExecutor(io_.get_executor())));
  }
  // Where `post_or_dispatch` runs a function, and whether it ran before returning.
  template <typename Start>
  std::pair<std::thread::id, bool> RunVia(Start start) {
    std::promise<std::thread::id> where;
    std::atomic<bool> returned{false};
    std::atomic<bool> ran_first{false};
    start([&] {
      ran_first.store(!returned.load());
      where.set_value(std::this_thread::get_id());
    });
    returned.store(true);
    std::thread::id id = where.get_future().get();
    return {id, ran_first.load()};
  }

  net::io_context io_;
  net::executor_work_guard<net::io_context::executor_type> work_;
  std::promise<std::thread::id> io_thread_;
  std::thread thread_;
  std::thread::id io_id_;
};

TEST_F(LoopExecutorTest, AnIdleStrandRunsOnTheCallingThreadOnlyInsideAScope) {
  auto strand = MakeStrand();
  const std::thread::id me = std::this_thread::get_id();
  auto [in_scope, at_once] = RunVia([&](auto f) {
    InlineScope scope;
    net::dispatch(strand, std::move(f));
  });
  EXPECT_EQ(in_scope, me);
  EXPECT_TRUE(at_once);
  EXPECT_FALSE(InlineScope::Active());  // the scope ended with its block

  auto [outside, unused1] = RunVia([&](auto f) { net::dispatch(strand, std::move(f)); });
  EXPECT_EQ(outside, io_id_);
  // A post never runs inside the caller, scope or not.
  auto [posted, unused2] = RunVia([&](auto f) {
    InlineScope scope;
    net::post(strand, std::move(f));
  });
  EXPECT_EQ(posted, io_id_);
}

TEST_F(LoopExecutorTest, ABusyStrandIsNotEnteredAndKeepsItsOrder) {
  auto strand = MakeStrand();
  absl::Notification entered, release;
  std::vector<int> order;  // only touched inside the strand
  net::post(strand, [&] {
    entered.Notify();
    release.WaitForNotification();
    order.push_back(1);
  });
  entered.WaitForNotification();
  std::promise<std::thread::id> where;
  {
    InlineScope scope;
    net::dispatch(strand, [&] {
      order.push_back(2);
      where.set_value(std::this_thread::get_id());
    });
  }
  release.Notify();
  EXPECT_EQ(where.get_future().get(), io_id_);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST_F(LoopExecutorTest, WhatAnInlineRunDispatchesElsewhereGoesToTheIoThread) {
  auto a = MakeStrand();
  auto b = MakeStrand();
  std::thread::id outer;
  std::promise<std::thread::id> inner;
  {
    InlineScope scope;
    net::dispatch(a, [&] {
      outer = std::this_thread::get_id();
      EXPECT_FALSE(InlineScope::Active());  // switched off while the function runs
      net::dispatch(b, [&] { inner.set_value(std::this_thread::get_id()); });
    });
    EXPECT_TRUE(InlineScope::Active());
  }
  EXPECT_EQ(outer, std::this_thread::get_id());
  EXPECT_EQ(inner.get_future().get(), io_id_);
}

// What the inline function posts (to the io executor, to idle strands, to its own
// strand) runs on the calling thread right after it, in the order posted, up to
// kMaxDeferred (8); the rest goes to the io thread. The strand's own queue is handed on
// when the function returns, so it comes last.
TEST_F(LoopExecutorTest, WhatAnInlineRunPostsRunsAfterItOnTheCallingThreadUpToTheCap) {
  auto a = MakeStrand();
  std::vector<net::strand<net::any_io_executor>> others;
  for (int i = 0; i < 10; ++i) others.push_back(MakeStrand());
  net::any_io_executor io = LoopExecutor(io_.get_executor());
  const std::thread::id me = std::this_thread::get_id();
  std::vector<int> here;  // only the calling thread appends
  std::vector<std::promise<std::thread::id>> where(12);
  bool returned = false;
  auto record = [&](int id) {
    if (std::this_thread::get_id() == me) {
      EXPECT_TRUE(returned);
      here.push_back(id);
    }
    where[id].set_value(std::this_thread::get_id());
  };
  {
    InlineScope scope;
    net::dispatch(a, [&] {
      net::post(a, [&] { record(11); });  // queued on the running strand
      net::post(io, [&] { record(0); });  // the io executor (a TLS write done at once)
      for (int i = 0; i < 10; ++i) net::post(others[i], [&, i] { record(1 + i); });
      returned = true;
    });
  }
  for (int i = 0; i < 8; ++i) EXPECT_EQ(where[i].get_future().get(), me) << i;
  for (int i = 8; i < 12; ++i) EXPECT_EQ(where[i].get_future().get(), io_id_) << i;
  EXPECT_EQ(here, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
}

// A scope that says the thread has other work waiting still enters an idle strand, but
// what the inline function posts goes to the io thread.
TEST_F(LoopExecutorTest, AScopeWithOtherWorkWaitingLeavesThePostsToTheIoThread) {
  auto a = MakeStrand();
  net::any_io_executor io = LoopExecutor(io_.get_executor());
  std::thread::id ran;
  std::promise<std::thread::id> posted;
  {
    InlineScope scope(/*run_posts_here=*/false);
    net::dispatch(a, [&] {
      ran = std::this_thread::get_id();
      net::post(io, [&] { posted.set_value(std::this_thread::get_id()); });
    });
  }
  EXPECT_EQ(ran, std::this_thread::get_id());
  EXPECT_EQ(posted.get_future().get(), io_id_);
}

// Inside an InlineAfterScope nothing handed to a strand runs; when it closes, what was
// dispatched to an idle strand runs on the calling thread (the lock declared after the
// scope already released), what was posted goes to the io thread, and what another
// thread queued on a held strand meanwhile runs after the held work, in order.
TEST_F(LoopExecutorTest, AnInlineAfterScopeHoldsHandOffsUntilItClosesThenRunsThemHere) {
  auto a = MakeStrand();
  auto b = MakeStrand();
  auto c = MakeStrand();
  const std::thread::id me = std::this_thread::get_id();
  absl::Mutex mu;
  std::atomic<bool> a_ran{false};
  std::vector<int> order;  // only touched inside strand c
  std::thread::id a_on;
  std::promise<std::thread::id> b_on;
  std::promise<void> c_done;
  {
    InlineAfterScope after;
    absl::MutexLock lock(&mu);
    net::dispatch(a, [&] {
      EXPECT_TRUE(mu.TryLock()) << "ran before the lock was released";
      mu.Unlock();
      a_on = std::this_thread::get_id();
      a_ran.store(true);
    });
    net::post(b, [&] { b_on.set_value(std::this_thread::get_id()); });
    net::dispatch(c, [&] { order.push_back(1); });
    // Another thread queues on c while its run is held: it runs after 1.
    std::thread([&] {
      net::post(c, [&] {
        order.push_back(2);
        c_done.set_value();
      });
    }).join();
    EXPECT_FALSE(a_ran.load());
  }
  EXPECT_TRUE(a_ran.load());  // ran as the scope closed
  EXPECT_EQ(a_on, me);
  EXPECT_EQ(b_on.get_future().get(), io_id_);
  c_done.get_future().wait();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

// Nested scopes: the outermost one holds and runs everything when it closes.
TEST_F(LoopExecutorTest, NestedInlineAfterScopesRunWhenTheOutermostCloses) {
  auto a = MakeStrand();
  bool ran = false;
  {
    InlineAfterScope outer;
    {
      InlineAfterScope inner;
      net::dispatch(a, [&] { ran = true; });
    }
    EXPECT_FALSE(ran);
    EXPECT_TRUE(InlineAfterScope::Holding());
  }
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace wsbridge::core
