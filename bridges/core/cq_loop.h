// A gRPC server completion queue with the one thread that drains it, for RPCs served
// on the completion-queue (async) API instead of the callback API.
//
// Why: with the callback API, every operation a non-gRPC thread starts (a write from a
// session's io thread) hands its completion to gRPC's own callback threads, and the
// measured cost on the fan-out path was ~0.5-0.8 thread wake-ups per delivered result.
// Here a session hands work to the loop with Post() (one wake-up for everything posted
// until the loop runs), the loop thread starts the gRPC operations itself, and their
// completions come back to the same queue, drained by the same thread while it is busy.
//
// Everything a tag or a posted function does runs on the loop thread, in order, so
// per-call state owned by one loop needs no lock.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <grpcpp/alarm.h>
#include <grpcpp/completion_queue.h>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "bridges/core/inplace_function.h"

namespace wsbridge::core {

// What is passed as the `void* tag` of every operation on a CqLoop's queue.
class CqTag {
 public:
  // `ok`: the operation's success as gRPC reports it.
  virtual void Run(bool ok) = 0;

 protected:
  ~CqTag() = default;
};

// A CqTag calling a member function of T.
template <typename T, void (T::*Fn)(bool)>
class MemberTag final : public CqTag {
 public:
  explicit MemberTag(T* self) : self_(self) {}
  void Run(bool ok) override { (self_->*Fn)(ok); }

 private:
  T* self_;
};

class CqLoop {
 public:
  explicit CqLoop(std::unique_ptr<grpc::ServerCompletionQueue> cq);
  ~CqLoop();  // Shutdown()
  CqLoop(const CqLoop&) = delete;
  CqLoop& operator=(const CqLoop&) = delete;

  grpc::ServerCompletionQueue* cq() const { return cq_.get(); }
  // The queue a unary call's own operations complete on (its Finish and its done tag):
  // pass it as the call's queue when requesting a unary call (AsyncUnaryCall). Nobody
  // waits on it: the loop thread takes what is there while it is awake anyway (after
  // each tag of cq(), for the Finishes it was told of by UnaryFinishing), and a sweep
  // every kUnarySweepMs takes the rest (a caller's cancel, a Finish that could not be
  // written at once). Why: a unary call answered from a session's io thread is finished
  // there, and its completions on cq() woke the sleeping loop thread once more per call
  // only to release the call.
  grpc::CompletionQueue* unary_cq() const { return unary_cq_.get(); }
  static constexpr int kUnarySweepMs = 50;
  // A unary call was matched: its done tag is out on unary_cq().
  void UnaryTagOut() { unary_out_.fetch_add(1); }
  // A unary call's Finish is about to start (any thread): its tag, then its done tag,
  // come back to unary_cq() shortly.
  void UnaryFinishing() {
    unary_out_.fetch_add(1);
    unary_due_.fetch_add(2);
    unary_finishes_.fetch_add(1);
  }

  // Starts the thread.
  void Start();
  // Runs `fn` on the loop thread, after everything posted before it. Dropped after
  // Shutdown() began.
  // What Post() takes: captures of up to 64 bytes (a call's shared_ptr and an answer)
  // are held without a heap allocation.
  using Task = InplaceFunction<void(), 64>;
  void Post(Task fn);
  // Unary calls of this loop that were matched and wait for their answer. Kept by
  // AsyncUnaryCall: an answer for the only waiting call is finished on the answering
  // thread; with others waiting, the loop finishes it (see AsyncUnaryCall::Respond).
  void UnaryStarted() { unary_waiting_.fetch_add(1, std::memory_order_relaxed); }
  void UnaryEnded() { unary_waiting_.fetch_sub(1, std::memory_order_relaxed); }
  int unary_waiting() const { return unary_waiting_.load(std::memory_order_relaxed); }
  // Calls of this loop (any kind) matched and not yet done. Kept by AsyncCallBase: a
  // bidi stream that is its loop's only call lets the loop thread finish the session
  // work its read hands over (AsyncBidiStream::OnRead).
  void CallOpened() { calls_open_.fetch_add(1, std::memory_order_relaxed); }
  void CallClosed() { calls_open_.fetch_sub(1, std::memory_order_relaxed); }
  int calls_open() const { return calls_open_.load(std::memory_order_relaxed); }

  // Call after the gRPC server has shut down: waits until the loop is quiet (at most
  // 2 s; see the .cc), shuts the queue down, lets the thread
  // drain every remaining tag (ok = false) and joins it. Idempotent.
  void Shutdown();
  // Runs `fn` (which starts a gRPC operation on cq()) unless Shutdown() has begun,
  // atomically with respect to it: nothing is started on a queue being shut down.
  // Returns whether `fn` ran.
  template <typename F>
  bool RunIfAccepting(F&& fn) {
    absl::MutexLock lock(&mu_);
    if (shutting_down_) return false;
    fn();
    return true;
  }

 private:
  void Loop();
  void RunMailbox(bool ok);
  void RunSweep(bool ok);
  // Loop thread: after a tag of cq(), takes the unary completions due (all of them
  // while shutting down) and arms the sweep while any are out.
  void AfterTag();
  // Loop thread: runs the tags unary_cq() has; `all`: until it has none ready, else
  // only as many as are due.
  void DrainUnary(bool all);
  // Returns once two markers posted one after the other ran with nothing else handled
  // between them (or `limit` passed).
  void WaitQuiet(absl::Duration limit);

  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::CompletionQueue> unary_cq_;
  std::thread thread_;
  MemberTag<CqLoop, &CqLoop::RunMailbox> mailbox_tag_{this};
  absl::Mutex mu_;
  std::vector<Task> mailbox_ ABSL_GUARDED_BY(mu_);
  // The batch being run, swapped with mailbox_ so that both keep their capacity (a
  // post then costs no allocation). Loop thread only.
  std::vector<Task> batch_;
  // The alarm that wakes the loop for the mailbox; set at most once at a time.
  grpc::Alarm alarm_ ABSL_GUARDED_BY(mu_);
  bool alarm_set_ ABSL_GUARDED_BY(mu_) = false;
  MemberTag<CqLoop, &CqLoop::RunSweep> sweep_tag_{this};
  grpc::Alarm sweep_alarm_ ABSL_GUARDED_BY(mu_);
  bool sweep_set_ ABSL_GUARDED_BY(mu_) = false;
  // Operations out on unary_cq() (done tags of matched calls, Finishes) and how many of
  // them are known to complete shortly (a Finish started: its tag and the done tag).
  // Incremented from any thread, decremented by the loop thread as it takes them.
  std::atomic<int> unary_out_{0};
  std::atomic<int> unary_due_{0};
  // Finishes started so far, and that count when the loop last found none of the due
  // completions there (loop thread): it looks again only after another Finish started.
  std::atomic<uint64_t> unary_finishes_{0};
  uint64_t unary_finishes_seen_ = 0;
  // Shutdown began waiting for quiet: every tag takes all unary completions.
  std::atomic<bool> unary_take_all_{false};
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  bool joined_ = false;
  std::atomic<int> unary_waiting_{0};
  std::atomic<int> calls_open_{0};
  // Tags and posted functions the loop has handled (WaitQuiet). Only the loop thread
  // writes it, so a plain load and store count, without a locked read-modify-write on
  // every tag.
  std::atomic<uint64_t> handled_{0};
  void CountHandled() {
    handled_.store(handled_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
};

}  // namespace wsbridge::core
