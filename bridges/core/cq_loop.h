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
  class MailboxTag final : public CqTag {
   public:
    explicit MailboxTag(CqLoop* loop) : loop_(loop) {}
    void Run(bool ok) override { loop_->RunMailbox(ok); }

   private:
    CqLoop* loop_;
  };
  void Loop();
  void RunMailbox(bool ok);
  // Returns once two markers posted one after the other ran with nothing else handled
  // between them (or `limit` passed).
  void WaitQuiet(absl::Duration limit);

  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::thread thread_;
  MailboxTag mailbox_tag_{this};
  absl::Mutex mu_;
  std::vector<Task> mailbox_ ABSL_GUARDED_BY(mu_);
  // The batch being run, swapped with mailbox_ so that both keep their capacity (a
  // post then costs no allocation). Loop thread only.
  std::vector<Task> batch_;
  // The alarm that wakes the loop for the mailbox; set at most once at a time.
  grpc::Alarm alarm_ ABSL_GUARDED_BY(mu_);
  bool alarm_set_ ABSL_GUARDED_BY(mu_) = false;
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
