#include "bench/grpc_echo.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "bench_echo.grpc.pb.h"

namespace wsbridge::bench {
namespace {

using wsbridge::bench::v1::EchoMessage;
using EchoAsync = wsbridge::bench::v1::EchoService::AsyncService;

// Requests stop before the queue shuts down (no request may start on a queue being shut
// down).
std::mutex g_request_mu;
bool g_accepting = true;  // guarded by g_request_mu

template <typename F>
void IfAccepting(F&& ask) {
  std::lock_guard<std::mutex> lock(g_request_mu);
  if (g_accepting) ask();
}

// What every operation on the queue passes as its tag.
class Tag {
 public:
  virtual void Run(bool ok) = 0;

 protected:
  ~Tag() = default;
};

// One unary Echo: answered as soon as it is matched. One tag in flight at a time.
class UnaryEcho final : public Tag {
 public:
  static void Request(EchoAsync* service, grpc::ServerCompletionQueue* cq) {
    IfAccepting([&] {
      auto* c = new UnaryEcho(service, cq);
      service->RequestEcho(&c->ctx_, &c->req_, &c->responder_, cq, cq, c);
    });
  }
  void Run(bool ok) override {
    if (!ok || finishing_) {
      delete this;
      return;
    }
    Request(service_, cq_);  // the next caller
    finishing_ = true;
    responder_.Finish(req_, grpc::Status::OK, this);
  }

 private:
  UnaryEcho(EchoAsync* service, grpc::ServerCompletionQueue* cq)
      : service_(service), cq_(cq), responder_(&ctx_) {}
  ~UnaryEcho() = default;

  EchoAsync* service_;
  grpc::ServerCompletionQueue* cq_;
  grpc::ServerContext ctx_;
  EchoMessage req_;
  grpc::ServerAsyncResponseWriter<EchoMessage> responder_;
  bool finishing_ = false;
};

// One EchoStream: read a message, write it back, read the next; OK after the caller's
// half-close. One tag in flight at a time.
class StreamEcho final : public Tag {
 public:
  static void Request(EchoAsync* service, grpc::ServerCompletionQueue* cq) {
    IfAccepting([&] {
      auto* s = new StreamEcho(service, cq);
      service->RequestEchoStream(&s->ctx_, &s->stream_, cq, cq, s);
    });
  }
  void Run(bool ok) override {
    switch (step_) {
      case Step::kMatching:
        if (!ok) break;
        Request(service_, cq_);
        return Read();
      case Step::kReading:
        if (!ok) return Finish(grpc::Status::OK);
        step_ = Step::kWriting;
        stream_.Write(msg_, this);
        return;
      case Step::kWriting:
        if (!ok) return Finish(grpc::Status::CANCELLED);
        return Read();
      case Step::kFinishing:
        break;
    }
    delete this;
  }

 private:
  enum class Step { kMatching, kReading, kWriting, kFinishing };
  StreamEcho(EchoAsync* service, grpc::ServerCompletionQueue* cq)
      : service_(service), cq_(cq), stream_(&ctx_) {}
  ~StreamEcho() = default;
  void Read() {
    step_ = Step::kReading;
    stream_.Read(&msg_, this);
  }
  void Finish(const grpc::Status& status) {
    step_ = Step::kFinishing;
    stream_.Finish(status, this);
  }

  EchoAsync* service_;
  grpc::ServerCompletionQueue* cq_;
  grpc::ServerContext ctx_;
  grpc::ServerAsyncReaderWriter<EchoMessage, EchoMessage> stream_;
  EchoMessage msg_;
  Step step_ = Step::kMatching;
};

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

}  // namespace

int RunGrpcEcho(const std::vector<std::string>&) {
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  EchoAsync service;
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&service);
  b.SetMaxReceiveMessageSize(64 << 20);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = b.AddCompletionQueue();
  auto server = b.BuildAndStart();
  if (!server) {
    fprintf(stderr, "grpc-echo: could not start\n");
    return 1;
  }
  // A few requests outstanding per method, so that a burst of callers does not wait
  // for each match to ask for the next.
  for (int i = 0; i < 16; ++i) {
    UnaryEcho::Request(&service, cq.get());
    StreamEcho::Request(&service, cq.get());
  }
  std::thread loop([q = cq.get()] {
    void* tag = nullptr;
    bool ok = false;
    while (q->Next(&tag, &ok)) static_cast<Tag*>(tag)->Run(ok);
  });
  printf("{\"event\":\"grpc-echo\",\"port\":%d}\n", port);
  fflush(stdout);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard<std::mutex> lock(g_request_mu);
    g_accepting = false;
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  cq->Shutdown();  // the loop drains every remaining tag (ok = false) and ends
  loop.join();
  return 0;
}

}  // namespace wsbridge::bench
