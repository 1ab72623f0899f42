#include "bridges/core/cq_loop.h"

#include <utility>

#include <grpc/support/time.h>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace wsbridge::core {

CqLoop::CqLoop(std::unique_ptr<grpc::ServerCompletionQueue> cq)
    : cq_(std::move(cq)), unary_cq_(std::make_unique<grpc::CompletionQueue>()) {}

CqLoop::~CqLoop() { Shutdown(); }

void CqLoop::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void CqLoop::Loop() {
  void* tag = nullptr;
  bool ok = false;
  while (cq_->Next(&tag, &ok)) {
    static_cast<CqTag*>(tag)->Run(ok);
    CountHandled();
    AfterTag();
  }
}

// Unary completions. A unary call's Finish usually completes inside the call that starts
// it (gRPC writes to an idle connection at once), so its tag and the done tag are on
// unary_cq() by the time the loop thread next wakes, for the next call or anything else.
// Taking only as many as are due keeps the loop from polling an empty queue (a system
// call) after every tag while calls wait for their answers; what was not due (a
// caller's cancel) or not yet there waits for the sweep.
void CqLoop::AfterTag() {
  const bool all = unary_take_all_.load();
  if (all || (unary_due_.load() > 0 && unary_finishes_.load() != unary_finishes_seen_)) {
    DrainUnary(all);
  }
  if (unary_out_.load() == 0) return;
  absl::MutexLock lock(&mu_);
  if (sweep_set_ || shutting_down_) return;
  sweep_set_ = true;
  sweep_alarm_.Set(cq_.get(),
                   gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_millis(kUnarySweepMs, GPR_TIMESPAN)),
                   &sweep_tag_);
}

void CqLoop::DrainUnary(bool all) {
  void* tag = nullptr;
  bool ok = false;
  while (all || unary_due_.load() > 0) {
    if (unary_cq_->AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC)) !=
        grpc::CompletionQueue::GOT_EVENT) {
      if (!all) unary_finishes_seen_ = unary_finishes_.load();
      return;
    }
    // Only this thread decrements: a positive count stays positive until it does.
    if (unary_due_.load() > 0) unary_due_.fetch_sub(1);
    unary_out_.fetch_sub(1);
    static_cast<CqTag*>(tag)->Run(ok);
    CountHandled();
  }
}

void CqLoop::RunSweep(bool /*ok*/) {
  {
    absl::MutexLock lock(&mu_);
    sweep_set_ = false;
  }
  // Cancelled (shutdown) or due: either way take what is there.
  DrainUnary(true);
}

void CqLoop::WaitQuiet(absl::Duration limit) {
  const absl::Time deadline = absl::Now() + limit;
  int quiet = 0;
  while (quiet < 2 && absl::Now() < deadline) {
    const uint64_t before = handled_.load(std::memory_order_relaxed);
    auto marker = std::make_shared<absl::Notification>();
    Post([marker] { marker->Notify(); });
    if (!marker->WaitForNotificationWithDeadline(deadline)) return;
    // The marker alone: its mailbox tag and its task.
    quiet = handled_.load(std::memory_order_relaxed) - before <= 2 ? quiet + 1 : 0;
  }
}

void CqLoop::Post(Task fn) {
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return;
  mailbox_.push_back(std::move(fn));
  if (!alarm_set_) {
    alarm_set_ = true;
    // A deadline in the past: the alarm fires at once, which queues mailbox_tag_ on the
    // completion queue and wakes the loop thread if it is waiting.
    alarm_.Set(cq_.get(), gpr_time_0(GPR_CLOCK_MONOTONIC), &mailbox_tag_);
  }
}

void CqLoop::RunMailbox(bool /*ok*/) {
  // `ok` is false only when the alarm was cancelled (shutdown); run what is there anyway
  // so that no posted cleanup is lost.
  {
    absl::MutexLock lock(&mu_);
    alarm_set_ = false;
    batch_.swap(mailbox_);
  }
  for (auto& fn : batch_) {
    fn();
    CountHandled();
  }
  batch_.clear();
}

void CqLoop::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (joined_ || shutting_down_) return;
  }
  // The server has shut down: every call's last completions (failed reads and writes,
  // done tags) are queued or about to be, and handling one may start another operation
  // (a Finish after a failed read; with a server interceptor, gRPC's own empty batch
  // that returns each completion). gRPC aborts the process on an operation started on a
  // queue that is shut down with nothing pending, so the queue is shut down only once
  // the loop has gone quiet.
  // The unary calls' done tags are on unary_cq(): while waiting for quiet, every tag
  // the loop handles takes them all.
  unary_take_all_.store(true);
  if (thread_.joinable()) WaitQuiet(absl::Seconds(2));
  {
    absl::MutexLock lock(&mu_);
    if (joined_) return;
    shutting_down_ = true;
    if (sweep_set_) sweep_alarm_.Cancel();  // its tag comes back (ok = false) before the end
  }
  cq_->Shutdown();
  if (thread_.joinable()) {
    thread_.join();
  } else {
    // Never started: drain here so that every tag still gets its Run(false).
    Loop();
  }
  // What is left of the unary calls (nothing after a quiet loop, unless the 2 s ran
  // out): the loop thread is gone, so this thread runs their tags.
  unary_cq_->Shutdown();
  {
    void* tag = nullptr;
    bool ok = false;
    while (unary_cq_->Next(&tag, &ok)) static_cast<CqTag*>(tag)->Run(ok);
  }
  std::vector<Task> rest;
  {
    absl::MutexLock lock(&mu_);
    joined_ = true;
    rest.swap(mailbox_);
  }
  for (auto& fn : rest) fn();
}

}  // namespace wsbridge::core
