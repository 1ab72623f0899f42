// The call helpers of grpc_calls.h through the fake bridge (fake_bridge.h) in the real
// daemon, over a real WebSocket fake upstream: AsyncUnaryCall answered on the loop (Echo)
// and on the session strand (Get), AsyncServerStream (Watch) and AsyncBidiStream (Chat).
#include "bridges/core/grpc_calls.h"

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tests/core/fake_bridge.h"
#include "tests/core/fake_protocol.h"
#include "tests/core/fake_upstream.h"
#include "tests/support/test_support.h"

namespace wsbridge::core {
namespace {

using namespace std::chrono_literals;
using testing::FakeBridgeOptions;
using testing::FakeDaemon;
using testing::FakeUpstream;
using wsbridge::testing::WaitFor;
namespace v1 = wsbridge::coretest::v1;

// The ErrorInfo of a status, as a client with googleapis' protos decodes it.
google::rpc::ErrorInfo ErrorInfoOf(const grpc::Status& st) {
  google::rpc::Status s;
  google::rpc::ErrorInfo info;
  if (s.ParseFromString(st.error_details())) {
    for (const auto& any : s.details()) {
      if (any.UnpackTo(&info)) break;
    }
  }
  return info;
}

class GrpcCallsTest : public ::testing::Test {
 protected:
  // `daemon_tweak` may change the daemon's config (e.g. runtime.io_threads).
  void Start(std::function<void(FakeBridgeOptions&)> tweak = nullptr,
             const std::function<void(config::v1::DaemonConfig&)>& daemon_tweak = nullptr) {
    FakeBridgeOptions o;
    o.url = upstream_.url();
    o.connection.allow_plaintext = true;
    o.connection.backoff.initial = 20ms;
    o.connection.backoff.max = 200ms;
    o.default_token = SecretSource::Fixed("default-token");
    if (tweak) tweak(o);
    absl::Status st = daemon_.Start(o, daemon_tweak);
    ASSERT_TRUE(st.ok()) << st;
  }

  // `respond`: Get (answered on the strand) instead of Echo (answered on the loop).
  grpc::Status Unary(bool respond, const std::string& text, std::string* out,
                     std::chrono::milliseconds deadline = 10s) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    v1::EchoRequest req;
    req.set_text(text);
    v1::EchoResponse resp;
    grpc::Status st = respond ? daemon_.stub().Get(&ctx, req, &resp)
                              : daemon_.stub().Echo(&ctx, req, &resp);
    if (out != nullptr) *out = resp.text();
    return st;
  }

  // Requests in flight on the default session (admin view).
  uint32_t InFlight() {
    uint32_t n = 0;
    for (const auto& s : daemon_.bridge().ListSessions()) n += s.in_flight_requests();
    return n;
  }

  FakeUpstream upstream_;
  FakeDaemon daemon_;
};

// --- AsyncUnaryCall --------------------------------------------------------------------

TEST_F(GrpcCallsTest, AsyncUnaryAnswersStreamedRepliesAndMapsErrors) {
  Start();
  std::string out;
  ASSERT_TRUE(Unary(false, "stream", &out).ok());
  EXPECT_EQ(out, "part1+part2+stream");
  grpc::Status nf = Unary(false, "404", &out);
  EXPECT_EQ(nf.error_code(), grpc::StatusCode::NOT_FOUND) << nf.error_message();
  google::rpc::ErrorInfo info = ErrorInfoOf(nf);
  EXPECT_EQ(info.reason(), "HTTP_404");
  EXPECT_EQ(info.domain(), testing::kFakeDomain);
}

TEST_F(GrpcCallsTest, AsyncUnaryGivesUpItsUpstreamRequestWhenTheCallerGoes) {
  Start();
  grpc::Status st = Unary(false, "hold", nullptr, 300ms);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(upstream_.Count("req|"), 1);
  EXPECT_TRUE(WaitFor([&] { return InFlight() == 0; }, 10s));
  // The session goes on serving.
  std::string out;
  EXPECT_TRUE(Unary(false, "after", &out).ok());
  EXPECT_EQ(out, "after");
}

// A unary call's own completions come back to its loop's unary queue
// (CqLoop::unary_cq), which nobody waits on: the loop takes them when it is awake
// anyway, and a sweep takes the rest. A call finished on the session's thread, and one
// the caller abandons, are both released with nothing else arriving after them.
TEST_F(GrpcCallsTest, UnaryCallsAreReleasedWithNothingElseArriving) {
  Start();
  std::string out;
  ASSERT_TRUE(Unary(true, "first", &out).ok());
  EXPECT_EQ(out, "first");
  EXPECT_TRUE(WaitFor([&] { return daemon_.CallsOpen() == 0; }, 10s)) << daemon_.CallsOpen();
  EXPECT_EQ(Unary(true, "hold", &out, 300ms).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitFor([&] { return daemon_.CallsOpen() == 0 && InFlight() == 0; }, 10s))
      << daemon_.CallsOpen() << " calls open, " << InFlight() << " upstream requests";
}

TEST_F(GrpcCallsTest, AsyncUnaryServesManyConcurrentCalls) {
  Start();
  grpc::CompletionQueue cq;
  constexpr int kCalls = 200;
  struct Call {
    grpc::ClientContext ctx;
    v1::EchoResponse resp;
    grpc::Status st;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::EchoResponse>> rpc;
  };
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < kCalls; ++i) {
    auto c = std::make_unique<Call>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::EchoRequest req;
    req.set_text(absl::StrCat("m", i));
    c->rpc = daemon_.stub().AsyncEcho(&c->ctx, req, &cq);
    c->rpc->Finish(&c->resp, &c->st, c.get());
    calls.push_back(std::move(c));
  }
  for (int i = 0; i < kCalls; ++i) {
    void* tag = nullptr;
    bool ok = false;
    ASSERT_TRUE(cq.Next(&tag, &ok));
  }
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(calls[i]->st.ok()) << calls[i]->st.error_message();
    EXPECT_EQ(calls[i]->resp.text(), absl::StrCat("m", i));  // each answer to its own call
  }
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

// --- AsyncUnaryCall answered on the strand (Respond) -----------------------------------

TEST_F(GrpcCallsTest, RespondedUnaryValidatesAnswersAndGivesUp) {
  Start();
  std::string out;
  ASSERT_TRUE(Unary(true, "first", &out).ok());
  EXPECT_EQ(out, "first");
  EXPECT_EQ(upstream_.Count("ord|first"), 1);  // the send-order request
  grpc::Status bad = Unary(true, "", &out);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(bad.error_message(), "text is required")) << bad.error_message();
  grpc::Status late = Unary(true, "hold", &out, 300ms);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(WaitFor([&] { return InFlight() == 0; }, 10s));
}

// --- AsyncServerStream -----------------------------------------------------------------

TEST_F(GrpcCallsTest, ServerStreamBatchesEventsAndEndsOnTheLast) {
  Start();
  grpc::ClientContext ctx;
  v1::WatchRequest req;
  req.set_topic("t");
  auto watch = daemon_.stub().Watch(&ctx, req);
  watch->WaitForInitialMetadata();  // sent once the upstream acknowledged the subscription
  EXPECT_EQ(upstream_.Count("sub|"), 1);
  std::vector<std::string> sent;
  for (int i = 0; i < 9; ++i) {
    sent.push_back(absl::StrCat("e", i));
    upstream_.Push(absl::StrCat("ev|S-t|e", i));
  }
  upstream_.Push("ev|S-t|end");
  sent.push_back("end");
  std::vector<std::string> got;
  v1::WatchResponse m;
  while (watch->Read(&m)) {
    EXPECT_GE(m.events_size(), 1);
    EXPECT_LE(m.events_size(), 4);
    got.insert(got.end(), m.events().begin(), m.events().end());
  }
  grpc::Status st = watch->Finish();
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(absl::StrJoin(got, ","), absl::StrJoin(sent, ","));
  // Ending released the share: the last subscriber leaving unsubscribes upstream.
  EXPECT_TRUE(WaitFor([&] { return upstream_.Count("unsub|") == 1; }, 10s));
}

TEST_F(GrpcCallsTest, ServerStreamEndsWithTheSubscriptionsError) {
  Start([](FakeBridgeOptions& o) { o.request_timeout = 300ms; });
  grpc::ClientContext ctx;
  v1::WatchRequest req;
  req.set_topic("silent");  // never acknowledged
  auto watch = daemon_.stub().Watch(&ctx, req);
  v1::WatchResponse m;
  EXPECT_FALSE(watch->Read(&m));
  grpc::Status st = watch->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_TRUE(absl::StrContains(st.error_message(), "did not acknowledge")) << st.error_message();

  grpc::ClientContext bad_ctx;
  v1::WatchRequest bad;
  auto invalid = daemon_.stub().Watch(&bad_ctx, bad);
  EXPECT_FALSE(invalid->Read(&m));
  EXPECT_EQ(invalid->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(GrpcCallsTest, SlowConsumerIsEndedAloneAndOthersGetEverything) {
  Start([](FakeBridgeOptions& o) { o.subscriber_queue = 256; });
  // Each watcher on its own HTTP/2 connection, so only the slow one's window fills.
  auto channel = [&](int n) {
    grpc::ChannelArguments args;
    args.SetInt("wsbridge.test.channel", n);
    // Small fixed receive windows: the slow caller's backlog shows in the bridge early.
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 * 1024);
    return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_.daemon().grpc_port()),
                                     grpc::InsecureChannelCredentials(), args);
  };
  auto fast_stub = v1::FakeService::NewStub(channel(1));
  auto slow_stub = v1::FakeService::NewStub(channel(2));
  v1::WatchRequest req;
  req.set_topic("t");
  grpc::ClientContext fast_ctx, slow_ctx;
  auto fast = fast_stub->Watch(&fast_ctx, req);
  auto slow = slow_stub->Watch(&slow_ctx, req);
  fast->WaitForInitialMetadata();
  slow->WaitForInitialMetadata();

  // The fast reader drains on its own thread; the upstream pushes in rounds the fast
  // reader keeps up with, far more in all than the slow one's flow-control windows hold.
  constexpr int kEvents = 20000;
  constexpr int kRound = 100;
  const std::string pad(200, 'x');
  absl::Mutex mu;
  std::vector<std::string> got;
  std::thread reader([&] {
    v1::WatchResponse m;
    while (fast->Read(&m)) {
      absl::MutexLock lock(&mu);
      got.insert(got.end(), m.events().begin(), m.events().end());
    }
  });
  auto received = [&] {
    absl::MutexLock lock(&mu);
    return got.size();
  };
  for (int i = 0; i < kEvents; ++i) {
    upstream_.Push(absl::StrCat("ev|S-t|", i, pad));
    if ((i + 1) % kRound == 0) {
      ASSERT_TRUE(WaitFor([&] { return received() == static_cast<size_t>(i + 1); }, 20s)) << i;
    }
  }
  upstream_.Push("ev|S-t|end");
  reader.join();
  grpc::Status fast_st = fast->Finish();
  EXPECT_TRUE(fast_st.ok()) << fast_st.error_message();
  ASSERT_EQ(got.size(), static_cast<size_t>(kEvents + 1));
  for (int i = 0; i < kEvents; ++i) ASSERT_EQ(got[i], absl::StrCat(i, pad));

  v1::WatchResponse m;
  while (slow->Read(&m)) {
  }
  grpc::Status slow_st = slow->Finish();
  EXPECT_EQ(slow_st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << slow_st.error_message();
  EXPECT_EQ(ErrorInfoOf(slow_st).reason(), "SLOW_CONSUMER");
}

// --- AsyncBidiStream -------------------------------------------------------------------

TEST_F(GrpcCallsTest, BidiAnswersInOrderAndCompletesAfterHalfClose) {
  Start();
  grpc::ClientContext ctx;
  auto chat = daemon_.stub().Chat(&ctx);
  for (const char* t : {"a", "b", "c"}) {
    v1::EchoRequest r;
    r.set_text(t);
    ASSERT_TRUE(chat->Write(r));
  }
  ASSERT_TRUE(chat->WritesDone());
  std::vector<std::string> got;
  v1::EchoResponse m;
  while (chat->Read(&m)) got.push_back(m.text());
  grpc::Status st = chat->Finish();
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(absl::StrJoin(got, ","), "a,b,c");
}

// A message read on a bidi stream goes upstream from the completion-queue thread that
// read it once the stream's lock is released (AsyncBidiStream::OnRead): it leaves while
// the session's io thread is busy, and its answer follows when that thread is free.
TEST_F(GrpcCallsTest, BidiMessageLeavesWhileTheSessionsIoThreadIsBusy) {
  // One io thread: the one to hold is the session's.
  Start(nullptr, [](config::v1::DaemonConfig& c) { c.mutable_runtime()->set_io_threads(1); });
  grpc::ClientContext ctx;
  auto chat = daemon_.stub().Chat(&ctx);
  v1::EchoRequest r;
  v1::EchoResponse m;
  r.set_text("first");
  ASSERT_TRUE(chat->Write(r) && chat->Read(&m));  // logged in and idle
  EXPECT_EQ(m.text(), "first");

  auto busy = std::make_shared<absl::Notification>();
  auto release = std::make_shared<absl::Notification>();
  daemon_.HoldIoThread(busy, release);
  busy->WaitForNotification();
  r.set_text("while busy");
  ASSERT_TRUE(chat->Write(r));
  const bool left = WaitFor([&] { return upstream_.Count("ord|while busy") == 1; }, 10s);
  release->Notify();
  EXPECT_TRUE(left) << "the message waited for the busy io thread";
  ASSERT_TRUE(chat->Read(&m));
  EXPECT_EQ(m.text(), "while busy");
  ASSERT_TRUE(chat->WritesDone());
  EXPECT_TRUE(chat->Finish().ok());
}

// The loops count their open calls (CqLoop::calls_open: a bidi stream alone on its loop
// lets the loop thread finish what its read hands over): streams and unary calls count
// from their match until done, however they end.
TEST_F(GrpcCallsTest, LoopsCountOpenCallsUntilTheyAreDone) {
  Start();
  EXPECT_EQ(daemon_.CallsOpen(), 0);
  grpc::ClientContext a_ctx, b_ctx;
  auto a = daemon_.stub().Chat(&a_ctx);
  auto b = daemon_.stub().Chat(&b_ctx);
  v1::EchoRequest r;
  v1::EchoResponse m;
  r.set_text("a");
  ASSERT_TRUE(a->Write(r));
  ASSERT_TRUE(a->Read(&m));
  r.set_text("b");
  ASSERT_TRUE(b->Write(r));
  ASSERT_TRUE(b->Read(&m));
  EXPECT_EQ(daemon_.CallsOpen(), 2);
  ASSERT_TRUE(a->WritesDone());
  EXPECT_TRUE(a->Finish().ok());
  b_ctx.TryCancel();
  EXPECT_EQ(b->Finish().error_code(), grpc::StatusCode::CANCELLED);
  std::string out;
  EXPECT_TRUE(Unary(false, "x", &out).ok());
  EXPECT_EQ(Unary(false, "", &out).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(WaitFor([&] { return daemon_.CallsOpen() == 0; }, 10s)) << daemon_.CallsOpen();
}

TEST_F(GrpcCallsTest, BidiEndsOnAnInvalidMessageAfterWhatWasAnswered) {
  Start();
  grpc::ClientContext ctx;
  auto chat = daemon_.stub().Chat(&ctx);
  v1::EchoRequest r;
  r.set_text("a");
  ASSERT_TRUE(chat->Write(r));
  v1::EchoResponse m;
  ASSERT_TRUE(chat->Read(&m));
  EXPECT_EQ(m.text(), "a");
  r.set_text("");
  chat->Write(r);
  while (chat->Read(&m)) {
  }
  grpc::Status st = chat->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(st.error_message(), "text is required")) << st.error_message();
}

TEST_F(GrpcCallsTest, BidiCancelGivesUpOpenRequests) {
  Start();
  grpc::ClientContext ctx;
  auto chat = daemon_.stub().Chat(&ctx);
  v1::EchoRequest r;
  r.set_text("hold");
  ASSERT_TRUE(chat->Write(r));
  ASSERT_TRUE(WaitFor([&] { return upstream_.Count("ord|hold") == 1; }, 10s));
  EXPECT_EQ(InFlight(), 1u);
  ctx.TryCancel();
  EXPECT_EQ(chat->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return InFlight() == 0; }, 10s));
}

// A caller that cancels a stream with nothing outstanding: the read that fails looks
// like a half-close to the server, which then finishes OK; the call must still count as
// CANCELLED (the caller never got that OK).
TEST_F(GrpcCallsTest, BidiCancelledWithNothingOpenCountsCancelled) {
  Start();
  auto count = [&](const char* code) {
    return daemon_.daemon()
        .metrics()
        .GetCounter("wsbridge_grpc_requests_total", "",
                    {{"method", "/wsbridge.coretest.v1.FakeService/Chat"}, {"code", code}})
        .value();
  };
  grpc::ClientContext ctx;
  auto chat = daemon_.stub().Chat(&ctx);
  v1::EchoRequest r;
  r.set_text("a");
  ASSERT_TRUE(chat->Write(r));
  v1::EchoResponse m;
  ASSERT_TRUE(chat->Read(&m));
  EXPECT_EQ(m.text(), "a");
  ctx.TryCancel();
  EXPECT_EQ(chat->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return count("CANCELLED") == 1; }, 10s));
  EXPECT_EQ(count("OK"), 0u);
}

}  // namespace
}  // namespace wsbridge::core
