// DfxBridge: the wsbridge.dfx.v1.DfxService handlers on the bridge toolkit. Sessions,
// pool, admission, drain and the call state machines are core's; what is here is DFX:
// which action each RPC sends, how answers map to messages, measurement streams.
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include <google/protobuf/descriptor.h>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/grpc_calls.h"
#include "bridges/core/json.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"
#include "bridges/dfx/codec.h"
#include "bridges/dfx/dfx_bridge.h"
#include "bridges/dfx/protocol.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"

namespace wsbridge::dfx {
namespace {

// One SubscribeResultsResponse as SubscribeResults writes it: results encoded once per
// event (EncodedResult) and shared by every subscriber, concatenated into the message's
// bytes when it is written. Building a SubscribeResultsResponse instead copied each
// result into every subscriber's message and serialized it again per message.
struct ResultsBatch {
  std::vector<std::shared_ptr<const EncodedResult>> results;
  void Clear() { results.clear(); }
};

}  // namespace
}  // namespace wsbridge::dfx

template <>
class grpc::SerializationTraits<wsbridge::dfx::ResultsBatch, void> {
 public:
  // gRPC serializes a message when the write starts, so the batch may change after.
  static grpc::Status Serialize(const wsbridge::dfx::ResultsBatch& batch, grpc::ByteBuffer* bb,
                                bool* own_buffer) {
    size_t total = 0;
    for (const auto& r : batch.results) total += r->bytes.size();
    grpc_slice slice = grpc_slice_malloc(total);
    uint8_t* out = GRPC_SLICE_START_PTR(slice);
    for (const auto& r : batch.results) {
      std::memcpy(out, r->bytes.data(), r->bytes.size());
      out += r->bytes.size();
    }
    grpc::Slice s(slice, grpc::Slice::STEAL_REF);
    grpc::ByteBuffer buffer(&s, 1);
    bb->Swap(&buffer);
    *own_buffer = true;
    return grpc::Status::OK;
  }
  // Only written, never read.
  static grpc::Status Deserialize(grpc::ByteBuffer* /*bb*/, wsbridge::dfx::ResultsBatch* /*batch*/) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "ResultsBatch is never read");
  }
};

namespace wsbridge::dfx {
namespace {

using core::Lease;
using v1::MeasurementEvent;

constexpr std::string_view kCallMethod = "/wsbridge.dfx.v1.DfxService/Call";
constexpr std::string_view kCreateMeasurementMethod = "/wsbridge.dfx.v1.DfxService/CreateMeasurement";
constexpr std::string_view kSubscribeResultsMethod = "/wsbridge.dfx.v1.DfxService/SubscribeResults";
constexpr std::string_view kStreamMeasurementMethod = "/wsbridge.dfx.v1.DfxService/StreamMeasurement";

std::string_view StageName(v1::Stage stage) {
  switch (stage) {
    case v1::STAGE_FIRST: return "FIRST";
    case v1::STAGE_CHUNK: return "CHUNK";
    case v1::STAGE_LAST: return "LAST";
    default: return "";
  }
}

// Every method on the completion-queue API: Call (latency, AsyncCall), SubscribeResults
// (fan-out, AsyncResultsStream), StreamMeasurement (chunks, MeasurementStream) and
// CreateMeasurement (AsyncCreateMeasurement). None on the callback API: registering one
// makes gRPC start its own poller threads, which then read our connections too and hand
// the polling role among themselves (docs/performance.md, round 6).
using DfxServiceBase = v1::DfxService::WithAsyncMethod_Call<
    v1::DfxService::WithAsyncMethod_CreateMeasurement<v1::DfxService::WithAsyncMethod_SubscribeResults<
        v1::DfxService::WithAsyncMethod_StreamMeasurement<v1::DfxService::Service>>>>;

// Calls requested ahead on each completion queue, per async method.
constexpr int kOutstandingSubscribeRequests = 8;
constexpr int kOutstandingCallRequests = 16;
constexpr int kOutstandingMeasurementRequests = 4;
// SubscribeResultsResponse limits (documented in dfx.proto).
constexpr int kMaxResultsPerMessage = 64;
constexpr size_t kMaxBatchBytes = 1 << 20;
// Measurements whose LAST chunk is remembered for result streams.
constexpr size_t kLastChunksKept = 10000;

// The LAST chunk of each measurement streamed through this bridge: DFX defines no
// end-of-results marker, so a result stream ends OK with the result that belongs to the
// measurement's LAST chunk (matched by its upstream chunk order or data id). A result
// stream of a measurement whose data went another way ends when its caller ends it (or
// its deadline passes). Thread-safe.
class LastChunks {
 public:
  void Record(const std::string& mid, std::optional<int64_t> order, std::string data_id) {
    absl::MutexLock lock(&mu_);
    if (!last_.contains(mid)) {
      order_.push_back(mid);
      if (order_.size() > kLastChunksKept) {
        last_.erase(order_.front());
        order_.pop_front();
      }
    }
    last_[mid] = Entry{order, std::move(data_id)};
  }
  bool IsLast(const std::string& mid, const ResultInfo& info) const {
    absl::MutexLock lock(&mu_);
    auto it = last_.find(mid);
    if (it == last_.end()) return false;
    return (it->second.order.has_value() && info.chunk_order == it->second.order) ||
           (!it->second.data_id.empty() && info.measurement_data_id == it->second.data_id);
  }

 private:
  struct Entry {
    std::optional<int64_t> order;
    std::string data_id;
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> last_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> order_ ABSL_GUARDED_BY(mu_);
};

class DfxBridge final : public core::BridgeBase, public DfxServiceBase {
 public:
  DfxBridge(DfxBridgeOptions options, core::BridgeContext context)
      : BridgeBase(std::move(context), "DFX", {std::string(v1::DfxService::service_full_name())}),
        options_(std::move(options)),
        protocol_options_(SharedProtocolOptions(options_)) {
    InitPool(
        {.max_sessions = options_.max_sessions, .idle_timeout = options_.idle_session_timeout},
        [this](const std::string& id, std::shared_ptr<core::SecretSource> token, bool pinned) {
          return NewSession(id, std::move(token), pinned);
        },
        core::CredentialPolicy{std::string(kDeviceTokenMetadata), options_.allow_call_token},
        options_.default_token);
    set_max_open_calls(options_.max_open_calls);
  }

  std::vector<grpc::Service*> Services() override { return {this}; }
  bool UsesCompletionQueues() const override { return true; }
  void ServeAsync(const std::vector<core::CqLoop*>& loops) override;

  const DfxBridgeOptions& options() const { return options_; }
  LastChunks& last_chunks() { return last_chunks_; }

  // Asks for the next SubscribeResults call like the generated RequestSubscribeResults,
  // but with a writer of any message type `W` that has grpc::SerializationTraits (the
  // stream writes ResultsBatch, the same bytes as a SubscribeResultsResponse).
  template <typename W>
  void RequestSubscribeResultsAs(grpc::ServerContext* ctx, v1::SubscribeResultsRequest* req,
                                 grpc::ServerAsyncWriter<W>* writer, core::CqLoop* loop, void* tag) {
    static const int index = SubscribeResultsIndex();
    RequestAsyncServerStreaming(index, ctx, req, writer, loop->cq(), loop->cq(), tag);
  }

 private:
  std::shared_ptr<core::UpstreamSession> NewSession(const std::string& id,
                                                    std::shared_ptr<core::SecretSource> token,
                                                    bool pinned) {
    core::SessionOptions so =
        BaseSessionOptions(id, pinned, options_.connection, kErrorDomain);
    so.request_timeout = options_.request_timeout;
    so.login_timeout = options_.request_timeout;
    so.subscribe_timeout = options_.subscribe_timeout;
    so.max_pending = options_.max_pending_requests;
    return core::UpstreamSession::Create(SessionExecutor(), std::move(so),
                                         std::make_unique<Protocol>(protocol_options_, std::move(token)));
  }

  // The method's index in the service, as the generated code numbers them (the order in
  // dfx.proto).
  static int SubscribeResultsIndex() {
    const google::protobuf::ServiceDescriptor* service =
        v1::SubscribeResultsRequest::descriptor()->file()->FindServiceByName("DfxService");
    const google::protobuf::MethodDescriptor* method =
        service == nullptr ? nullptr : service->FindMethodByName("SubscribeResults");
    if (method == nullptr) {
      log::Error("dfx", "wsbridge.dfx.v1.DfxService/SubscribeResults is missing from the descriptor");
      std::abort();
    }
    return method->index();
  }

  // What every session's protocol shares (URL, headers, pacing): one copy per bridge.
  static std::shared_ptr<const ProtocolOptions> SharedProtocolOptions(const DfxBridgeOptions& o) {
    auto po = std::make_shared<ProtocolOptions>();
    po->url = o.url;
    po->headers = o.headers;
    po->pacing = o.pacing;
    po->pacing_window = o.pacing_window;
    po->rate_limit_retry = o.rate_limit_retry;
    return po;
  }

  DfxBridgeOptions options_;
  const std::shared_ptr<const ProtocolOptions> protocol_options_;
  LastChunks last_chunks_;
};

// An upstream request for any action, answered with the upstream's status as data.
core::Request ActionRequest(std::string action, std::string body, core::Clock::time_point deadline) {
  core::Request r;
  r.what = absl::StrCat("action ", action);
  r.hint = action;
  r.deadline = deadline;
  r.encode = [action = std::move(action),
              body = std::move(body)](std::string_view rid) -> absl::StatusOr<core::Outbound> {
    return core::Outbound{EncodeRequest(action, rid, body), true};
  };
  return r;
}

// What Call accepts: any action id but the ones with their own RPC, with a JSON object
// body (empty = {}).
absl::Status ValidateCall(const v1::CallRequest& req) {
  if (absl::Status st = ValidateActionId(req.action_id()); !st.ok()) return st;
  const std::string& action = req.action_id();
  if (action == kActionLogin) {
    return absl::InvalidArgumentError(
        "action 0718 (login) is managed by the bridge: it logs in with the device token on "
        "every connect");
  }
  if (action == kActionSubscribeResults) {
    return absl::InvalidArgumentError(
        "action 0510 (subscribe to results) streams results: use SubscribeResults");
  }
  if (action == kActionMeasurementData) {
    return absl::InvalidArgumentError(
        "action 0506 (measurement data) must be ordered and paced: use StreamMeasurement");
  }
  if (!req.json_body().empty()) return core::ValidateJsonObject(req.json_body());
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------
// Call on the completion-queue API, the latency path: matched, admitted and sent on
// its CqLoop thread; the session's strand finishes it with the answer (Respond).
class AsyncCall final
    : public core::AsyncUnaryCall<AsyncCall, v1::CallRequest, v1::CallResponse> {
 public:
  AsyncCall(DfxBridge* bridge, core::CqLoop* loop) : AsyncUnaryCall(bridge, loop, kCallMethod) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* dfx = static_cast<DfxBridge*>(bridge);
    auto c = std::make_shared<AsyncCall>(dfx, loop);
    Start(c, c->done_tag(), [&] {
      dfx->RequestCall(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(), loop->cq(),
                       c->matched_tag());
    });
  }

  void OnAdmitted() {
    if (absl::Status st = ValidateCall(req_); !st.ok()) {
      FinishWith(core::ToGrpcStatus(st));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    std::string body = req_.json_body().empty() ? "{}" : std::move(*req_.mutable_json_body());
    upstream_op_ = lease_->Send(
        ActionRequest(req_.action_id(), std::move(body), core::SteadyDeadline(ctx_)),
        [c = shared_from_this()](absl::StatusOr<core::Reply> answer) mutable {
          c->Respond([&answer](AsyncCall& call) {
            if (!answer.ok()) return core::ToGrpcStatus(answer.status());
            auto& a = static_cast<Answer&>(*answer->payload);
            call.resp_.set_status(static_cast<uint32_t>(a.status));
            call.resp_.set_json_body(std::move(a.body));
            return grpc::Status::OK;
          });
        });
  }
};

// CreateMeasurement on the completion-queue API, like Call.
class AsyncCreateMeasurement final
    : public core::AsyncUnaryCall<AsyncCreateMeasurement, v1::CreateMeasurementRequest,
                                  v1::CreateMeasurementResponse> {
 public:
  AsyncCreateMeasurement(DfxBridge* bridge, core::CqLoop* loop)
      : AsyncUnaryCall(bridge, loop, kCreateMeasurementMethod) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* dfx = static_cast<DfxBridge*>(bridge);
    auto c = std::make_shared<AsyncCreateMeasurement>(dfx, loop);
    Start(c, c->done_tag(), [&] {
      dfx->RequestCreateMeasurement(&c->ctx_, &c->req_, &c->responder_, loop->unary_cq(),
                                    loop->cq(), c->matched_tag());
    });
  }

  void OnAdmitted() {
    if (req_.study_id().empty()) {
      FinishWith(core::ToGrpcStatus(
          absl::InvalidArgumentError("study_id is required: the DFX study to measure with")));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    CreateMeasurementParams p;
    p.study_id = req_.study_id();
    p.resolution = req_.resolution();
    p.user_profile_id = req_.user_profile_id();
    p.partner_id = req_.partner_id();
    upstream_op_ = lease_->Send(
        ActionRequest(std::string(kActionCreateMeasurement), CreateMeasurementBody(p),
                      core::SteadyDeadline(ctx_)),
        [c = shared_from_this()](absl::StatusOr<core::Reply> reply) {
          c->Respond([&reply](AsyncCreateMeasurement& call) {
            if (!reply.ok()) return core::ToGrpcStatus(reply.status());
            const auto& a = static_cast<const Answer&>(*reply->payload);
            if (a.status / 100 != 2) return core::ToGrpcStatus(a.error);
            if (a.id.empty()) {
              return core::ToGrpcStatus(absl::InternalError("upstream answered 0504 without an ID"));
            }
            call.resp_.set_measurement_id(a.id);
            return grpc::Status::OK;
          });
        });
  }
};

// ---------------------------------------------------------------------------------
// SubscribeResults on the completion-queue API: the session's strand pushes results
// into the stream (one shared, encoded-once result per subscriber); core's
// AsyncServerStream batches and writes them on the loop thread.
using EncodedPtr = std::shared_ptr<const EncodedResult>;

class AsyncResultsStream final
    : public core::AsyncServerStream<AsyncResultsStream, v1::SubscribeResultsRequest, ResultsBatch,
                                     EncodedPtr>,
      public core::EventSink {
 public:
  AsyncResultsStream(DfxBridge* bridge, core::CqLoop* loop)
      : AsyncServerStream(bridge, loop, kSubscribeResultsMethod, bridge->options().subscriber_queue,
                          "results", kErrorDomain) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* dfx = static_cast<DfxBridge*>(bridge);
    auto s = std::make_shared<AsyncResultsStream>(dfx, loop);
    Start(s, s->done_tag(), [&] {
      dfx->RequestSubscribeResultsAs(&s->ctx_, &s->req_, &s->writer_, loop, s->matched_tag());
    });
  }

  // SubscribeResultsResponse limits (documented in dfx.proto).
  static bool Append(ResultsBatch* m, const EncodedPtr& r, size_t* bytes) {
    if (m->results.size() >= kMaxResultsPerMessage) return false;
    if (!m->results.empty() && *bytes + r->body_bytes > kMaxBatchBytes) return false;
    *bytes += r->body_bytes;
    m->results.push_back(r);
    return true;
  }

  void OnAdmitted() {
    if (req_.measurement_id().empty()) {
      FinishWith(core::ToGrpcStatus(
          absl::InvalidArgumentError("measurement_id is required (from CreateMeasurement)")));
      return;
    }
    std::optional<Lease> lease = TakeSession();
    if (!lease.has_value()) return;
    lease_ = std::move(*lease);
    mid_ = req_.measurement_id();
    sink_id_ = lease_->Subscribe(mid_, nullptr, shared_from_this());
  }

  // Stops routing results here: the last subscriber leaving releases the upstream one.
  void Release() {
    if (sink_id_ != 0 && lease_) lease_->Unsubscribe(mid_, sink_id_);
  }

  // core::EventSink (session strand).
  void OnSubscribed(const core::SubscribedInfo& /*info*/) override { Activated(); }
  void OnEvent(const core::PayloadPtr& event, bool after_gap) override {
    const auto& r = static_cast<const Result&>(*event);
    EncodedPtr encoded = r.encoded;
    if (after_gap) {
      // Rare: this subscriber's copy says results may be missing before it.
      v1::MeasurementResult copy = *r.result;
      copy.set_after_reconnect(true);
      encoded = EncodeResult(copy);
    }
    if (r.last_checked_for != mid_) {
      r.last = static_cast<DfxBridge*>(bridge_)->last_chunks().IsLast(mid_, r.info);
      r.last_checked_for = mid_;
    }
    Push(std::move(encoded), r.last);
  }
  void OnEnded(const absl::Status& status) override { End(status); }

 private:
  std::string mid_;  // set before the subscription exists; read on the strand after
  uint64_t sink_id_ = 0;
};

// ---------------------------------------------------------------------------------
// StreamMeasurement on the completion-queue API: chunks in, acknowledgements and results
// out. Chunks are read on its CqLoop thread; chunk answers, results and subscription
// news are handled on the session's strand, in its order, which writes the
// acknowledgement and starts the next read itself (core::AsyncBidiStream::Locked). One
// chunk in flight: the next is read once this one is answered (gRPC flow control holds
// the caller).
class MeasurementStream final
    : public core::AsyncBidiStream<MeasurementStream, v1::MeasurementChunk, MeasurementEvent>,
      public core::EventSink {
 public:
  friend AsyncBidiStream;  // calls the hooks
  MeasurementStream(DfxBridge* bridge, core::CqLoop* loop)
      : AsyncBidiStream(bridge, loop, kStreamMeasurementMethod), dfx_(bridge) {}

  static void Request(core::BridgeBase* bridge, core::CqLoop* loop) {
    auto* dfx = static_cast<DfxBridge*>(bridge);
    auto s = std::make_shared<MeasurementStream>(dfx, loop);
    Start(s, s->done_tag(), [&] {
      dfx->RequestStreamMeasurement(&s->ctx_, &s->stream_, loop->cq(), loop->cq(), s->matched_tag());
    });
  }

  // core::EventSink (session strand).
  void OnSubscribed(const core::SubscribedInfo& /*info*/) override {
    Locked([](MeasurementStream& s) { s.Subscribed(); });
  }
  void OnEvent(const core::PayloadPtr& event, bool after_gap) override {
    Locked([&](MeasurementStream& s) { s.Event(*event, after_gap); });
  }
  void OnEnded(const absl::Status& status) override {
    Locked([&](MeasurementStream& s) { s.Ended(status); });
  }

 private:
  // --- core::AsyncBidiStream hooks (under its lock). ---
  // One chunk in flight: the next is read once this one is answered (ChunkAnswered).
  void ReadMore() {}

  // Validates the chunk just read and sends it (or holds it until subscribed). The
  // session is taken once the first chunk is valid: bad streams hold none.
  absl::Status Accept() {
    if (last_sent_) {
      // Nothing after LAST is sent upstream; the caller must learn it was not.
      return absl::FailedPreconditionError(absl::StrCat(
          "chunk ", next_index_, " arrived after the LAST chunk (chunk ", next_index_ - 1,
          ") and was not sent; start a new stream for a new measurement"));
    }
    if (!mid_ && read_.measurement_id().empty()) {
      return absl::InvalidArgumentError(
          "the first message must carry measurement_id (from CreateMeasurement)");
    }
    if (StageName(read_.stage()).empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", next_index_, ": stage must be STAGE_FIRST, STAGE_CHUNK or STAGE_LAST"));
    }
    if (read_.payload().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", next_index_, ": payload is empty (pass the SDK's chunk bytes)"));
    }
    if (read_.duration_ms() == 0 && dfx_->options().pacing) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", next_index_,
          ": duration_ms is required (the real time the chunk covers; used to pace uploads)"));
    }
    if (!mid_) {
      absl::StatusOr<Lease> lease = bridge_->SessionFor(ctx_);
      if (!lease.ok()) return lease.status();
      lease_ = std::move(*lease);
      mid_ = std::make_shared<const std::string>(std::move(*read_.mutable_measurement_id()));
      subscribe_ = read_.subscribe_results();
    }
    core::Request c;
    c.what = absl::StrCat("measurement chunk ", next_index_);
    c.hint = std::string(kActionMeasurementData);
    c.gated = true;
    c.gate_cost = read_.duration_ms();
    c.max_retries = dfx_->options().max_rate_limit_retries;
    c.deadline = core::SteadyDeadline(ctx_);
    // The frame is built on the strand each time the chunk is sent (a RATE_LIMIT retry
    // sends it again), with the payload base64-encoded straight into it. The captures
    // stay within the encoder's inline space: no allocation for it.
    c.encode = [mid = mid_, stage = read_.stage(), ignore = read_.ignore(),
                payload = std::move(*read_.mutable_payload())](
                   std::string_view rid) -> absl::StatusOr<core::Outbound> {
      return core::Outbound{EncodeMeasurementData(rid, *mid, StageName(stage), ignore, payload), true};
    };
    current_is_last_ = read_.stage() == v1::STAGE_LAST;
    current_ignore_ = read_.ignore();
    if (subscribe_ && !subscribed_ && !sub_requested_) {
      sub_requested_ = true;
      subscribed_ = true;
      held_ = std::move(c);  // sent once the subscription is active: no result is missed
      sub_id_ = lease_->Subscribe(*mid_, nullptr, shared_from_this());
      return absl::OkStatus();
    }
    Send(std::move(c));
    return absl::OkStatus();
  }

  // Ends the stream OK when nothing is left to do: the caller half-closed, no chunk is
  // outstanding and, after LAST with results subscribed, LAST's result has come. Until
  // the half-close a chunk may still arrive; one after LAST is refused, never dropped.
  void MaybeComplete() {
    if (finishing() || in_flight_ || held_.has_value()) return;
    if (awaiting_final_) {
      bool got = (last_upstream_order_.has_value() && seen_orders_.contains(*last_upstream_order_)) ||
                 (!last_data_id_.empty() && seen_ids_.contains(last_data_id_));
      if (!got) return;
      awaiting_final_ = false;
    }
    if (!half_closed_) return;
    Complete(grpc::Status::OK);
  }

  // Errors end the stream at once, naming the last chunk the upstream acknowledged
  // so the caller knows exactly where it stands.
  void Fail(const absl::Status& st) {
    if (finished_) return;
    std::string reason = core::ErrorReason(st);
    if (reason.empty()) reason = absl::StatusCodeToString(st.code());
    std::map<std::string, std::string> md = {{"last_acked_chunk_order", absl::StrCat(last_acked_)},
                                             {"measurement_id", mid_ ? *mid_ : std::string()}};
    if (!last_data_id_.empty()) md["last_acked_measurement_data_id"] = last_data_id_;
    FinishWith(core::ToGrpcStatus(core::WithErrorInfo(
        absl::Status(st.code(), absl::StrCat(st.message(), " (last chunk acknowledged upstream: ",
                                             last_acked_ < 0 ? std::string("none")
                                                             : absl::StrCat(last_acked_),
                                             ")")),
        reason, kErrorDomain, md)));
  }

  void Release() {
    if (!lease_) return;
    if (chunk_op_ != 0) {
      lease_->Cancel(chunk_op_);
      chunk_op_ = 0;
    }
    if (subscribed_) {
      lease_->Unsubscribe(*mid_, sub_id_);
      subscribed_ = false;
    }
  }

  // --- Session news, on the strand under the lock. ---
  void Subscribed() {
    if (sub_active_) return;
    sub_active_ = true;
    if (held_.has_value()) {
      core::Request c = std::move(*held_);
      held_.reset();
      Send(std::move(c));
    }
  }

  void Event(const core::Payload& event, bool after_gap) {
    const auto& r = static_cast<const Result&>(event);
    if (r.info.chunk_order.has_value()) seen_orders_.insert(*r.info.chunk_order);
    if (!r.info.measurement_data_id.empty()) seen_ids_.insert(r.info.measurement_data_id);
    if (queued() >= dfx_->options().subscriber_queue) {
      Fail(core::SlowConsumer(dfx_->options().subscriber_queue, "events", kErrorDomain));
      return;
    }
    MeasurementEvent ev;
    *ev.mutable_result() = *r.result;
    if (after_gap) ev.mutable_result()->set_after_reconnect(true);
    Push(std::move(ev));
    MaybeComplete();
  }

  void Ended(const absl::Status& status) {
    subscribed_ = false;
    if (finishing()) return;
    Fail(status);
  }

  void Send(core::Request c) {
    in_flight_ = true;
    chunk_op_ = lease_->Send(std::move(c), [w = weak_from_this()](absl::StatusOr<core::Reply> r) {
      if (auto s = w.lock()) s->Locked([&](MeasurementStream& m) { m.ChunkAnswered(std::move(r)); });
    });
  }

  void ChunkAnswered(absl::StatusOr<core::Reply> reply) {
    in_flight_ = false;
    chunk_op_ = 0;
    if (!reply.ok()) {
      Fail(reply.status());
      return;
    }
    const ChunkAnswer& answer = static_cast<const ChunkAccepted&>(*reply->payload).answer;
    last_acked_ = static_cast<int64_t>(next_index_);
    last_data_id_ = answer.measurement_data_id;
    MeasurementEvent ev;
    v1::ChunkAccepted* acc = ev.mutable_chunk_accepted();
    acc->set_chunk_order(next_index_);
    acc->set_measurement_data_id(answer.measurement_data_id);
    if (answer.chunk_order.has_value()) acc->set_upstream_chunk_order(*answer.chunk_order);
    ++next_index_;
    Push(std::move(ev));
    if (current_is_last_) {
      last_sent_ = true;
      last_upstream_order_ = answer.chunk_order;
      // On the strand, before the next frame: that may be LAST's result, which result
      // streams look up here.
      dfx_->last_chunks().Record(*mid_, answer.chunk_order, answer.measurement_data_id);
      awaiting_final_ = subscribe_ && !current_ignore_;
    }
    // Keep reading: after LAST a further chunk is refused (FAILED_PRECONDITION), and
    // a half-close is noticed.
    if (!half_closed_) StartRead();
    MaybeComplete();
  }

  DfxBridge* dfx_;
  // Set by the first valid chunk; shared with its chunks' encoders on the strand.
  std::shared_ptr<const std::string> mid_;
  bool subscribe_ = false;
  bool sub_requested_ = false;
  bool subscribed_ = false;  // we hold a sink id on the session
  bool sub_active_ = false;
  uint64_t sub_id_ = 0;
  std::optional<core::Request> held_;
  bool in_flight_ = false;
  uint64_t chunk_op_ = 0;
  bool current_is_last_ = false;
  bool current_ignore_ = false;
  uint32_t next_index_ = 0;
  int64_t last_acked_ = -1;
  std::string last_data_id_;
  std::optional<int64_t> last_upstream_order_;
  bool last_sent_ = false;
  bool awaiting_final_ = false;
  std::set<int64_t> seen_orders_;
  std::set<std::string> seen_ids_;
};

void DfxBridge::ServeAsync(const std::vector<core::CqLoop*>& loops) {
  // A few requests outstanding per queue, so that a burst of new subscribers does not
  // wait for each match to request the next.
  for (core::CqLoop* loop : loops) {
    for (int i = 0; i < kOutstandingSubscribeRequests; ++i) AsyncResultsStream::Request(this, loop);
    for (int i = 0; i < kOutstandingCallRequests; ++i) AsyncCall::Request(this, loop);
    for (int i = 0; i < kOutstandingMeasurementRequests; ++i) MeasurementStream::Request(this, loop);
    AsyncCreateMeasurement::Request(this, loop);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::Bridge>> NewDfxBridge(DfxBridgeOptions options,
                                                           const core::BridgeContext& context) {
  if (options.url.empty()) return absl::InvalidArgumentError("dfx: upstream url is required");
  if (options.default_token == nullptr && !options.allow_call_token) {
    return absl::InvalidArgumentError(
        "dfx: set device_token, or allow_call_token so calls can bring their own");
  }
  if (!context.executor) return absl::InvalidArgumentError("dfx: no executor in the context");
  return std::unique_ptr<core::Bridge>(new DfxBridge(std::move(options), context));
}

}  // namespace wsbridge::dfx
