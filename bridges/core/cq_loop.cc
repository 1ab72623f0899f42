#include "bridges/core/cq_loop.h"

#include <utility>

#include <grpc/support/time.h>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace wsbridge::core {

CqLoop::CqLoop(std::unique_ptr<grpc::ServerCompletionQueue> cq) : cq_(std::move(cq)) {}

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
  }
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
  if (thread_.joinable()) WaitQuiet(absl::Seconds(2));
  {
    absl::MutexLock lock(&mu_);
    if (joined_) return;
    shutting_down_ = true;
  }
  cq_->Shutdown();
  if (thread_.joinable()) {
    thread_.join();
  } else {
    // Never started: drain here so that every tag still gets its Run(false).
    Loop();
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
