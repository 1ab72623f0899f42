// The unary methods of the daemon's own services (health Check, admin) on the
// completion-queue API, answered at once on the CqLoop thread that matched them.
//
// Why not the callback or synchronous API, which would be simpler for methods this
// cold: registering any callback or synchronous method makes gRPC 1.51 start its own
// poller threads, which then also poll the connections the bridges' calls come in on
// and pass the polling role among themselves. That cost every bridged call about 2.5
// context switches (docs/performance.md, round 6). So every method of every service the
// daemon registers is served on its CqLoops.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "bridges/core/cq_loop.h"
#include "daemon/rpc_metrics.h"

namespace wsbridge::daemon {

// One call of a unary method whose answer needs no waiting: `handle` runs on the loop
// thread and returns the status (and fills the response). The call owns itself from its
// request to its Finish's completion (one tag at a time, so no done tag is needed), and
// asks for the next call of its method as soon as it is matched.
//
// `RequestFn(ctx, req, responder, cq, tag)` asks gRPC for a call of the method (the
// generated Request<Method>).
template <typename Req, typename Resp>
class InlineUnaryCall final : public core::CqTag {
 public:
  using RequestFn = std::function<void(grpc::ServerContext*, Req*, grpc::ServerAsyncResponseWriter<Resp>*,
                                       grpc::ServerCompletionQueue*, void*)>;
  using Handler = std::function<grpc::Status(grpc::ServerContext&, const Req&, Resp*)>;
  struct Method {
    RequestFn request;
    Handler handle;
    std::string path;               // "/pkg.Service/Method", for the metrics
    RpcTracker* tracker = nullptr;  // counts the calls (see CountedCall)
  };

  // Keeps one request for `method` outstanding on `loop` (which outlives the server).
  static void Serve(std::shared_ptr<const Method> method, core::CqLoop* loop) {
    auto* call = new InlineUnaryCall(std::move(method), loop);
    const bool asked = loop->RunIfAccepting([call, loop] {
      call->method_->request(&call->ctx_, &call->req_, &call->responder_, loop->cq(), call);
    });
    if (!asked) delete call;
  }

  void Run(bool ok) override {
    if (finishing_ || !ok) {  // answered, or never matched (the server shut down)
      delete this;
      return;
    }
    Serve(method_, loop_);  // the next caller
    counted_.emplace(method_->tracker, method_->path);
    const grpc::Status status = method_->handle(ctx_, req_, &resp_);
    counted_->Sent(status.error_code());
    finishing_ = true;
    if (status.ok()) {
      responder_.Finish(resp_, status, this);
    } else {
      responder_.FinishWithError(status, this);
    }
  }

 private:
  InlineUnaryCall(std::shared_ptr<const Method> method, core::CqLoop* loop)
      : method_(std::move(method)), loop_(loop), responder_(&ctx_) {}
  ~InlineUnaryCall() = default;

  std::shared_ptr<const Method> method_;
  core::CqLoop* loop_;
  grpc::ServerContext ctx_;
  Req req_;
  Resp resp_;
  grpc::ServerAsyncResponseWriter<Resp> responder_;
  std::optional<CountedCall> counted_;  // from the match to the Finish's completion
  bool finishing_ = false;
};

}  // namespace wsbridge::daemon
