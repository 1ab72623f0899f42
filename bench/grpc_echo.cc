#include "bench/grpc_echo.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "bench_echo.grpc.pb.h"

namespace wsbridge::bench {
namespace {

using wsbridge::bench::v1::EchoMessage;

class EchoStreamReactor : public grpc::ServerBidiReactor<EchoMessage, EchoMessage> {
 public:
  EchoStreamReactor() { StartRead(&msg_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    StartWrite(&msg_);  // one message in flight: echo, then read the next
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::CANCELLED);
      return;
    }
    StartRead(&msg_);
  }
  void OnDone() override { delete this; }

 private:
  EchoMessage msg_;
};

class EchoService final : public wsbridge::bench::v1::EchoService::CallbackService {
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* ctx, const EchoMessage* req,
                                 EchoMessage* resp) override {
    *resp = *req;
    auto* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }
  grpc::ServerBidiReactor<EchoMessage, EchoMessage>* EchoStream(
      grpc::CallbackServerContext*) override {
    return new EchoStreamReactor();
  }
};

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

}  // namespace

int RunGrpcEcho(const std::vector<std::string>&) {
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  EchoService service;
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&service);
  b.SetMaxReceiveMessageSize(64 << 20);
  auto server = b.BuildAndStart();
  if (!server) {
    fprintf(stderr, "grpc-echo: could not start\n");
    return 1;
  }
  printf("{\"event\":\"grpc-echo\",\"port\":%d}\n", port);
  fflush(stdout);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace wsbridge::bench
