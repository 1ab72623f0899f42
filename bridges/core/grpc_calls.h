// gRPC call helpers every bridge's handlers build on, all on the completion-queue API
// (see cq_loop.h for why). Every method the daemon serves is on it: registering a
// callback-API or synchronous method makes gRPC start poller threads of its own, which
// then also poll the connections every call arrives on (docs/architecture.md).
//
//  - AsyncCallBase: a call owns itself from its request until gRPC has returned every
//    tag, keeps one request outstanding for the next caller, is counted (CallAccount)
//    and registered with the drain (ActiveCalls), admitted (drain, caller auth) on its
//    CqLoop thread. The derived call then validates its request and only then takes a
//    session, so bad requests never occupy one.
//  - AsyncUnaryCall: answered on the loop thread or from the session strand (Respond).
//  - AsyncServerStream: items queued from a session strand are handed to the loop thread
//    through ONE pending post per stream (StreamInbox: a CqLoop's mailbox holds at most
//    one entry per open stream), bounded per stream (the slow-consumer rule: past the
//    bound the stream ends RESOURCE_EXHAUSTED SLOW_CONSUMER and nobody else is held
//    back), batched into messages with one write in flight, finished exactly once after
//    what was queued before an OK finish is written.
//  - AsyncBidiStream: a read loop and an outbox; the session's news handled on its strand
//    under the stream's lock (Locked).
#pragma once

#include <deque>
#include <memory>
#include <optional>
#include <string_view>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/bridge_base.h"
#include "bridges/core/cq_loop.h"
#include "bridges/core/loop_executor.h"
#include "bridges/core/status.h"

namespace wsbridge::core {

// RESOURCE_EXHAUSTED with ErrorInfo SLOW_CONSUMER: a stream fell `limit` items behind.
absl::Status SlowConsumer(size_t limit, std::string_view items, std::string_view domain);

template <typename Derived>
class AsyncCallBase : public std::enable_shared_from_this<Derived> {
 public:
  // Whether the drain's abort (ActiveCalls::AbortAll, on the thread that shuts the bridge
  // down) may run Abort on that thread. False: it is posted to the call's loop, where
  // everything else of the call runs. A call whose session news is handled on the
  // strand under its lock (AsyncBidiStream) says true, or that news (the session being
  // closed by the same shutdown, right after the abort) would overtake the drain's
  // status on the strand.
  static constexpr bool kAbortsOnAnyThread = false;

 protected:
  AsyncCallBase(BridgeBase* bridge, CqLoop* loop, std::string_view method)
      : bridge_(bridge), loop_(loop), method_(method) {}

  // Starts `call`: the done tag, then `request` (gRPC's Request<Method>) unless the
  // loop is shutting down.
  template <typename RequestFn>
  static void Start(std::shared_ptr<Derived> call, CqTag* done_tag, RequestFn&& request) {
    call->self_ = call;
    call->ctx_.AsyncNotifyWhenDone(done_tag);
    if (!call->loop_->RunIfAccepting(std::forward<RequestFn>(request))) call->self_.reset();
  }

  // On the matched tag: requests the next call, registers this one (accounting, drain)
  // and admits it. False when the call was never matched (server shutdown) or has been
  // finished with an error.
  bool AdmitMatched(bool ok) {
    if (!ok) {
      self_.reset();
      return false;
    }
    matched_ = true;
    loop_->CallOpened();
    Derived::Request(bridge_, loop_);  // keep a request outstanding for the next caller
    account_.emplace(bridge_, method_);
    call_id_ = bridge_->calls().Add([w = this->weak_from_this(), loop = loop_](const grpc::Status& st) {
      if constexpr (Derived::kAbortsOnAnyThread) {
        (void)loop;
        if (auto c = w.lock()) c->Abort(st);
      } else {
        loop->Post([w, st] {
          if (auto c = w.lock()) c->Abort(st);
        });
      }
    });
    if (call_id_ == 0) {
      Self().FinishWith(ToGrpcStatus(bridge_->ShuttingDown()));
      return false;
    }
    if (absl::Status st = bridge_->Admit(ctx_); !st.ok()) {
      Self().FinishWith(ToGrpcStatus(st));
      return false;
    }
    return true;
  }

  // The session for this call (after validation). Finishes the call on failure.
  std::optional<Lease> TakeSession() {
    absl::StatusOr<Lease> lease = bridge_->SessionFor(ctx_);
    if (!lease.ok()) {
      Self().FinishWith(ToGrpcStatus(lease.status()));
      return std::nullopt;
    }
    return std::move(*lease);
  }

  // The drain (or shutdown) ends the call. Derived may override to add details.
  void Abort(const grpc::Status& st) { Self().FinishWith(st); }

  // On the done tag: the call is over (finished, or cancelled by the caller or the
  // server). Releases what admission took; the object goes once no tag is out.
  void EndCall(Lease& lease) {
    done_ = true;
    finished_ = true;
    if (matched_) loop_->CallClosed();
    lease.Release();
    if (call_id_ != 0) bridge_->calls().Remove(call_id_);
    if (account_.has_value()) {
      // Valid once the done tag is back. A stream the caller cancels with nothing
      // outstanding sees its read fail as if half-closed and may finish OK meanwhile.
      if (ctx_.IsCancelled()) account_->CancelledByCaller();
      account_->Done();
    }
    MaybeRelease();
  }

  void Finishing(const grpc::Status& status) {
    if (account_.has_value()) account_->Finishing(status.error_code());
  }
  void OpStarted() { ++ops_; }
  void OpReturned() {
    --ops_;
    MaybeRelease();
  }

  BridgeBase* bridge_;
  CqLoop* loop_;
  grpc::ServerContext ctx_;
  bool matched_ = false;
  bool finished_ = false;  // a Finish is started, or none is needed any more
  bool done_ = false;

 private:
  Derived& Self() { return static_cast<Derived&>(*this); }
  void MaybeRelease() {
    if (done_ && ops_ == 0) self_.reset();
  }

  std::string_view method_;
  std::shared_ptr<Derived> self_;
  std::optional<CallAccount> account_;
  ActiveCalls::Id call_id_ = 0;
  int ops_ = 0;  // operations gRPC has not returned yet (besides the done tag)
};

// The queue between a session strand (producer, any thread) and a stream's loop thread
// (consumer). Thread-safe. At most one wake-up is pending per stream.
template <typename Item>
class StreamInbox {
 public:
  explicit StreamInbox(size_t limit) : limit_(limit) {}

  // Queues `item`; false when the stream is `limit` behind (the caller ends it). Returns
  // through `wake` whether the consumer must be woken (nothing was pending).
  bool Push(Item item, bool* wake) {
    absl::MutexLock lock(&mu_);
    if (items_.size() >= limit_) {
      *wake = false;
      return false;
    }
    items_.push_back(std::move(item));
    *wake = !wake_pending_;
    wake_pending_ = true;
    return true;
  }
  // Consumer: takes everything queued (and allows the next wake-up).
  void Take(std::deque<Item>* out) {
    absl::MutexLock lock(&mu_);
    wake_pending_ = false;
    if (out->empty()) {
      out->swap(items_);
    } else {
      for (auto& i : items_) out->push_back(std::move(i));
      items_.clear();
    }
  }
  void Clear() {
    absl::MutexLock lock(&mu_);
    items_.clear();
  }
  size_t limit() const { return limit_; }

 private:
  const size_t limit_;
  absl::Mutex mu_;
  std::deque<Item> items_ ABSL_GUARDED_BY(mu_);
  bool wake_pending_ ABSL_GUARDED_BY(mu_) = false;
};

// A unary call on the completion-queue API. Derived has
//   static void Request(BridgeBase*, CqLoop*)   asks gRPC for the next call (see Start),
//                                               with loop->unary_cq() as the call's queue
//                                               and loop->cq() for the matched tag;
//   void OnAdmitted()                           validates req_, takes a session, sends;
//                                               runs in an InlineScope, so it must hold
//                                               no lock a session callback may take;
// and answers with FinishWith on the loop thread, or from a session strand with Respond
// (finishes on the strand's thread) or OnLoop (runs on the loop thread).
// `upstream_op_` and `lease_`, when set, are cancelled and released if the caller goes.
//
// Why Respond finishes on the strand's thread: handing the answer back to the loop thread
// cost one thread wake-up on every call's latency path (the loop thread is asleep while
// the upstream answers). The completion-queue API lets any thread start the Finish; its
// completion comes back to the loop's unary queue, which the loop thread takes from when
// it is next awake (CqLoop::unary_cq), so the Finish does not wake it either; the loop
// thread then releases the call. mu_ orders the finish against the loop thread's own
// ends of the call (cancel, drain, gRPC's tags).
template <typename Derived, typename RequestMsg, typename ResponseMsg>
class AsyncUnaryCall : public AsyncCallBase<Derived> {
 protected:
  using Base = AsyncCallBase<Derived>;
  AsyncUnaryCall(BridgeBase* bridge, CqLoop* loop, std::string_view method)
      : Base(bridge, loop, method), responder_(&this->ctx_) {}

  // Loop thread, or inside OnLoop's function (which holds mu_ already).
  void FinishWith(const grpc::Status& status) {
    if (held_ == this) {
      mu_.AssertHeld();
      FinishLocked(status);
      return;
    }
    absl::MutexLock lock(&mu_);
    FinishLocked(status);
  }

  // From a session strand (any thread; the loop thread itself when the strand ran inline
  // from OnAdmitted and answered at once, e.g. a full send queue): `fn(call)` fills
  // resp_ (and may release what the call holds) and returns the status to finish with,
  // on the calling thread, unless the call is over by then. The caller holds a reference
  // to the call (the strand's callback captures it).
  //
  // When other unary calls of this loop are waiting for their answers too, only the
  // Finish is handed to the loop thread: answers that arrive together (several calls in
  // flight) are then finished in one wake-up of the loop, and their completions come
  // back to a thread that is awake. Finishing each on the strand made the loop wake for
  // every completion (measured at 32 calls in flight: 2.0 instead of 1.0 context
  // switches and ~20 % more CPU per call).
  template <typename F>
  void Respond(F&& fn) {
    absl::MutexLock lock(&mu_);
    if (!this->matched_ || this->finished_ || this->done_) return;
    grpc::Status status = fn(static_cast<Derived&>(*this));
    if (this->loop_->unary_waiting() <= 1) {
      FinishLocked(status);
      return;
    }
    this->finished_ = true;  // decided: nobody else finishes it
    Uncount();
    deferred_ = std::move(status);
    this->loop_->Post([c = this->shared_from_this()] {
      absl::MutexLock lock(&c->mu_);
      // Gone meanwhile (the caller cancelled, the server shut down): nothing to send, and
      // no operation may start on a call whose done tag has come back.
      if (!c->done_) c->StartFinish(c->deferred_);
    });
  }

  // Runs `fn(call)` on this call's loop thread, unless the call is over by then, holding
  // mu_ (so it is ordered with Respond); `fn` may call FinishWith. For answers that must
  // not run on a session strand.
  template <typename F>
  void OnLoop(F&& fn) {
    CqLoop* loop = this->loop_;
    loop->Post([c = this->shared_from_this(), fn = std::forward<F>(fn)]() mutable {
      absl::MutexLock lock(&c->mu_);
      if (c->finished_) return;
      held_ = c.get();
      fn(*c);
      held_ = nullptr;
    });
  }

  CqTag* matched_tag() { return &matched_tag_; }
  CqTag* done_tag() { return &done_tag_; }

  RequestMsg req_;
  ResponseMsg resp_;
  grpc::ServerAsyncResponseWriter<ResponseMsg> responder_;
  Lease lease_;
  uint64_t upstream_op_ = 0;

 private:
  friend Base;
  void OnMatched(bool ok) {
    if (ok) {
      absl::MutexLock lock(&mu_);
      this->loop_->UnaryTagOut();  // the done tag
      this->loop_->UnaryStarted();
      counted_ = true;
    }
    if (!this->AdmitMatched(ok)) return;
    // OnAdmitted holds no lock, so the session's strand may take the request on this
    // thread and write it upstream without waking its io thread (loop_executor.h); the
    // write's completion runs here too unless other calls of this loop are waiting.
    InlineScope inline_scope(this->loop_->unary_waiting() <= 1);
    static_cast<Derived&>(*this).OnAdmitted();
  }
  // This call no longer waits for an answer (CqLoop::unary_waiting).
  void Uncount() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (counted_) this->loop_->UnaryEnded();
    counted_ = false;
  }
  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!this->matched_ || this->finished_ || this->done_) return;
    this->finished_ = true;
    Uncount();
    StartFinish(status);
  }
  void StartFinish(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    this->Finishing(status);
    this->OpStarted();
    this->loop_->UnaryFinishing();
    if (status.ok()) {
      responder_.Finish(resp_, status, &finish_tag_);
    } else {
      responder_.FinishWithError(status, &finish_tag_);
    }
  }
  // `keep`: the call may release itself here; it must outlive the lock.
  void OnFinished(bool /*ok*/) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    this->OpReturned();
  }
  // Cancelled before the answer: the upstream request is dropped (a late answer is
  // ignored).
  void OnDone(bool /*ok*/) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    if (!this->finished_ && upstream_op_ != 0 && lease_) lease_->Cancel(upstream_op_);
    Uncount();
    this->EndCall(lease_);
  }
  absl::Mutex mu_;
  bool counted_ ABSL_GUARDED_BY(mu_) = false;  // in CqLoop::unary_waiting
  grpc::Status deferred_ ABSL_GUARDED_BY(mu_);  // Respond's status, for the loop's Finish
  // The call whose OnLoop function this thread runs (FinishWith then holds mu_ already).
  static inline thread_local const AsyncUnaryCall* held_ = nullptr;
  MemberTag<AsyncUnaryCall, &AsyncUnaryCall::OnMatched> matched_tag_{this};
  MemberTag<AsyncUnaryCall, &AsyncUnaryCall::OnFinished> finish_tag_{this};
  MemberTag<AsyncUnaryCall, &AsyncUnaryCall::OnDone> done_tag_{this};
};

// A server-streaming call on the completion-queue API that forwards items from a session
// strand: initial metadata once the upstream side is active (Activated), items batched
// into messages with one write in flight, bounded per stream (SLOW_CONSUMER), finished
// exactly once. Derived has
//   static void Request(BridgeBase*, CqLoop*)   asks gRPC for the next call (see Start);
//   void OnAdmitted()                           validates req_, takes a session, subscribes;
//   void Release()                              drops its upstream share (loop thread; once);
//   static bool Append(ResponseMsg*, const Item&, size_t* bytes)
//                                               adds an item to a message unless it is full
//                                               (`bytes`: the payload bytes in it so far).
template <typename Derived, typename RequestMsg, typename ResponseMsg, typename Item>
class AsyncServerStream : public AsyncCallBase<Derived> {
 public:
  // --- Any thread (a session strand). ---
  // The upstream side is active: initial metadata tells the caller.
  void Activated() {
    this->loop_->Post([s = this->shared_from_this()] { s->SendMetadata(); });
  }
  // Queues an item; `last` ends the stream OK once it is written.
  void Push(Item item, bool last = false) {
    bool wake = false;
    if (!inbox_.Push(Queued{std::move(item), last, std::nullopt}, &wake)) {
      if (!overflowed_.exchange(true)) {
        this->loop_->Post([s = this->shared_from_this()] {
          s->FinishWith(ToGrpcStatus(SlowConsumer(s->inbox_.limit(), s->items_, s->domain_)));
        });
      }
      return;
    }
    if (wake) this->loop_->Post([s = this->shared_from_this()] { s->Drain(); });
  }
  // Ends the stream with `status` once the items queued before it are written (an
  // upstream error that follows the events it ends).
  void EndAfterQueued(const absl::Status& status) {
    bool wake = false;
    if (!inbox_.Push(Queued{Item{}, true, ToGrpcStatus(status)}, &wake)) {
      End(status);
      return;
    }
    if (wake) this->loop_->Post([s = this->shared_from_this()] { s->Drain(); });
  }
  // Ends the stream with `status` (an upstream error, the session closing).
  void End(const absl::Status& status) {
    this->loop_->Post([s = this->shared_from_this(), status] { s->FinishWith(ToGrpcStatus(status)); });
  }

 protected:
  using Base = AsyncCallBase<Derived>;
  // `limit`: items queued before SLOW_CONSUMER; `items`/`domain` name them in its message.
  AsyncServerStream(BridgeBase* bridge, CqLoop* loop, std::string_view method, size_t limit,
                    std::string_view items, std::string_view domain)
      : Base(bridge, loop, method), writer_(&this->ctx_), inbox_(limit), items_(items), domain_(domain) {}

  // Ends the call with `status` (the first status wins), dropping unwritten items, once
  // a write in flight is done. Loop thread.
  void FinishWith(const grpc::Status& status) {
    if (!this->matched_ || this->finished_ || this->done_) return;
    this->finished_ = true;
    ReleaseOnce();
    pending_.clear();
    inbox_.Clear();
    finish_after_ = status;
    WriteNext();  // finishes now unless a write is in flight; OnWritten comes back here
  }

  CqTag* matched_tag() { return &matched_tag_; }
  CqTag* done_tag() { return &done_tag_; }

  RequestMsg req_;
  grpc::ServerAsyncWriter<ResponseMsg> writer_;
  Lease lease_;

 private:
  friend Base;
  struct Queued {
    Item item;
    bool last = false;
    std::optional<grpc::Status> end;  // EndAfterQueued: no item, finish with this
  };

  void OnMatched(bool ok) {
    if (this->AdmitMatched(ok)) static_cast<Derived&>(*this).OnAdmitted();
  }
  void OnWritten(bool ok) {
    writing_ = false;
    if (!ok) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke"));
    } else {
      WriteNext();
    }
    this->OpReturned();
  }
  void OnFinished(bool /*ok*/) { this->OpReturned(); }
  void OnDone(bool /*ok*/) {
    ReleaseOnce();
    this->EndCall(lease_);
  }

  void ReleaseOnce() {
    if (released_) return;
    released_ = true;
    static_cast<Derived&>(*this).Release();
  }

  void SendMetadata() {
    if (this->finished_ || sent_metadata_ || writing_) return;
    sent_metadata_ = true;
    writing_ = true;
    this->OpStarted();
    writer_.SendInitialMetadata(&write_tag_);
  }

  void Drain() {
    // taken_ keeps its storage between drains (Take swaps it with the inbox's, so both
    // keep theirs): a local deque allocated and freed its node map and a node each time.
    inbox_.Take(&taken_);
    struct Clear {
      std::deque<Queued>& q;
      ~Clear() { q.clear(); }
    } clear{taken_};
    if (this->finished_ || finish_after_.has_value()) return;
    for (Queued& q : taken_) {
      if (!q.end.has_value()) pending_.push_back(std::move(q.item));
      if (q.last) {
        finish_after_ = q.end.value_or(grpc::Status::OK);
        ReleaseOnce();
        break;
      }
    }
    // The bound covers everything not yet written, not only the inbox: a caller that
    // stops reading stalls the write in flight, and items would pile up here instead.
    if (pending_.size() > inbox_.limit()) {
      FinishWith(ToGrpcStatus(SlowConsumer(inbox_.limit(), items_, domain_)));
      return;
    }
    sent_metadata_ = true;  // a write sends it
    if (!writing_) WriteNext();
  }

  // Writes the queued items (one message's worth) or, with none left, a pending finish.
  void WriteNext() {
    if (writing_ || finish_started_) return;
    if (pending_.empty()) {
      if (finish_after_.has_value()) {
        this->finished_ = true;
        finish_started_ = true;
        this->Finishing(*finish_after_);
        this->OpStarted();
        writer_.Finish(*finish_after_, &finish_tag_);
      }
      return;
    }
    batch_.Clear();
    size_t bytes = 0;
    while (!pending_.empty() && Derived::Append(&batch_, pending_.front(), &bytes)) {
      pending_.pop_front();
    }
    writing_ = true;
    this->OpStarted();
    writer_.Write(batch_, &write_tag_);
  }

  MemberTag<AsyncServerStream, &AsyncServerStream::OnMatched> matched_tag_{this};
  MemberTag<AsyncServerStream, &AsyncServerStream::OnWritten> write_tag_{this};
  MemberTag<AsyncServerStream, &AsyncServerStream::OnFinished> finish_tag_{this};
  MemberTag<AsyncServerStream, &AsyncServerStream::OnDone> done_tag_{this};
  StreamInbox<Queued> inbox_;
  std::string_view items_, domain_;
  std::atomic<bool> overflowed_{false};
  bool released_ = false;
  bool sent_metadata_ = false;
  bool writing_ = false;
  bool finish_started_ = false;
  // The status to finish with once nothing is left to write.
  std::optional<grpc::Status> finish_after_;
  std::deque<Queued> taken_;  // Drain's batch from the inbox (empty between drains)
  std::deque<Item> pending_;  // not yet in a message
  ResponseMsg batch_;         // the message in flight
};

// A bidi-streaming call on the completion-queue API. Its completions come to its CqLoop
// thread; a session strand's news (an answer, an event) is handled on the strand's own
// thread under the stream's lock (Locked), which starts the write (and the next read)
// right there: handing it to the loop thread cost one thread wake-up per message on the
// latency path, as for AsyncUnaryCall::Respond. mu_ orders the two threads; every hook
// below runs under it. Admission, accounting and drain registration as AsyncCallBase;
// one read in flight (the first once admitted), an outbox with one write in flight,
// finish exactly once: after the write in flight, and for Complete after everything
// queued. Derived has
//   static void Request(BridgeBase*, CqLoop*)   asks gRPC for the next call (see Start);
//   absl::Status Accept()                       takes the message just read (read_, which
//                                               it may move from); an error ends the
//                                               stream through Fail;
//   void MaybeComplete()                        after the caller's half-close (half_closed_
//                                               is set) and whenever Derived's work may be
//                                               done: Complete once nothing is left;
//   void Fail(const absl::Status&)              ends the stream with an error (e.g. adding
//                                               details) through FinishWith; the drain
//                                               uses it;
//   void Release()                              drops upstream work as the stream ends
//                                               (may run more than once);
// and may hide
//   void ReadMore()                             after an accepted message: reads the next
//                                               one (default), or not yet (flow control:
//                                               Derived calls StartRead later).
template <typename Derived, typename RequestMsg, typename ResponseMsg>
class AsyncBidiStream : public AsyncCallBase<Derived> {
 public:
  // The drain (or shutdown) ends the stream through Derived::Fail, on its own thread,
  // before the sessions are closed (see AsyncCallBase::kAbortsOnAnyThread).
  static constexpr bool kAbortsOnAnyThread = true;
  void Abort(const grpc::Status& st) {
    absl::MutexLock lock(&mu_);
    if (!this->finished_) Self().Fail(FromGrpcStatus(st));
  }

 protected:
  using Base = AsyncCallBase<Derived>;
  AsyncBidiStream(BridgeBase* bridge, CqLoop* loop, std::string_view method)
      : Base(bridge, loop, method), stream_(&this->ctx_) {}

  // Runs `fn(stream)` on the calling thread (a session strand) under the stream's lock,
  // unless the stream is finished. The caller holds a reference to the stream. gRPC
  // operations started here complete on the loop thread, never inline.
  template <typename F>
  void Locked(F&& fn) {
    absl::MutexLock lock(&mu_);
    if (!this->finished_) fn(Self());
  }

  // Ends the stream now with `status` (the first status wins), dropping what is queued;
  // gRPC gets the Finish once a write in flight is done.
  void FinishWith(const grpc::Status& status) {
    if (!this->matched_ || this->finished_ || this->done_) return;
    this->finished_ = true;
    Self().Release();
    outbox_.clear();
    finish_with_ = status;
    WriteNext();
  }
  // Finishes with `status` once everything queued is written.
  void Complete(const grpc::Status& status) {
    if (this->finished_ || finish_with_.has_value()) return;
    finish_with_ = status;
    Self().Release();
    WriteNext();
  }
  void Push(ResponseMsg msg) {
    outbox_.push_back(std::move(msg));
    WriteNext();
  }
  void StartRead() {
    if (reading_ || this->finished_ || this->done_) return;
    reading_ = true;
    this->OpStarted();
    stream_.Read(&read_, &read_tag_);
  }
  void ReadMore() { StartRead(); }
  // Messages not yet written, the one in flight included.
  size_t queued() const { return outbox_.size() + (writing_ ? 1 : 0); }
  // Complete was called: the stream ends OK once the outbox is written.
  bool finishing() const { return finish_with_.has_value(); }

  CqTag* matched_tag() { return &matched_tag_; }
  CqTag* done_tag() { return &done_tag_; }

  grpc::ServerAsyncReaderWriter<ResponseMsg, RequestMsg> stream_;
  RequestMsg read_;  // the message just read (one read in flight at a time)
  bool half_closed_ = false;
  Lease lease_;

 private:
  friend Base;
  Derived& Self() { return static_cast<Derived&>(*this); }

  // Each tag holds the stream (`keep`): it may release itself under the lock.
  void OnMatched(bool ok) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    if (this->AdmitMatched(ok)) StartRead();
  }
  void OnRead(bool ok) {
    auto keep = this->shared_from_this();
    // What Accept hands to a session (a request, a subscription) is held until the lock
    // below is released; then an idle session strand takes a request on this thread, as
    // for a unary call (loop_executor.h). Under the lock it could not: the session's
    // news takes this lock. What the strand posts (a TLS write's completion) runs here
    // too when this stream is its loop's only call, and goes to its io thread otherwise.
    InlineAfterScope hand_off_after_unlock(this->loop_->calls_open() <= 1);
    absl::MutexLock lock(&mu_);
    reading_ = false;
    if (!this->finished_) {
      if (!ok) {
        half_closed_ = true;
        Self().MaybeComplete();
      } else if (absl::Status st = Self().Accept(); !st.ok()) {
        Self().Fail(st);
      } else if (!finishing() && !this->finished_) {
        Self().ReadMore();
      }
    }
    this->OpReturned();
  }
  void OnWritten(bool ok) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke"));
    WriteNext();
    this->OpReturned();
  }
  void OnFinished(bool /*ok*/) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    this->OpReturned();
  }
  // The call is over: finished, or cancelled by the caller, its deadline or the server.
  void OnDone(bool /*ok*/) {
    auto keep = this->shared_from_this();
    absl::MutexLock lock(&mu_);
    Self().Release();
    this->EndCall(lease_);
  }

  // Writes the next queued message or, with none left, starts a decided finish.
  void WriteNext() {
    if (writing_ || finish_started_ || this->done_) return;
    if (outbox_.empty()) {
      if (finish_with_.has_value()) {
        this->finished_ = true;
        finish_started_ = true;
        this->Finishing(*finish_with_);
        this->OpStarted();
        stream_.Finish(*finish_with_, &finish_tag_);
      }
      return;
    }
    in_flight_ = std::move(outbox_.front());
    outbox_.pop_front();
    writing_ = true;
    this->OpStarted();
    stream_.Write(in_flight_, &write_tag_);
  }

  absl::Mutex mu_;
  MemberTag<AsyncBidiStream, &AsyncBidiStream::OnMatched> matched_tag_{this};
  MemberTag<AsyncBidiStream, &AsyncBidiStream::OnRead> read_tag_{this};
  MemberTag<AsyncBidiStream, &AsyncBidiStream::OnWritten> write_tag_{this};
  MemberTag<AsyncBidiStream, &AsyncBidiStream::OnFinished> finish_tag_{this};
  MemberTag<AsyncBidiStream, &AsyncBidiStream::OnDone> done_tag_{this};
  bool reading_ = false;
  bool writing_ = false;
  bool finish_started_ = false;
  // The status to finish with once nothing is left to write.
  std::optional<grpc::Status> finish_with_;
  std::deque<ResponseMsg> outbox_;
  ResponseMsg in_flight_;  // the message being written
};

}  // namespace wsbridge::core
