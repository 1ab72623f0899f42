#include "bridges/core/cq_loop.h"

#include <utility>

#include <grpc/support/time.h>

namespace wsbridge::core {

CqLoop::CqLoop(std::unique_ptr<grpc::ServerCompletionQueue> cq) : cq_(std::move(cq)) {}

CqLoop::~CqLoop() { Shutdown(); }

void CqLoop::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void CqLoop::Loop() {
  void* tag = nullptr;
  bool ok = false;
  while (cq_->Next(&tag, &ok)) static_cast<CqTag*>(tag)->Run(ok);
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
  for (auto& fn : batch_) fn();
  batch_.clear();
}

void CqLoop::Shutdown() {
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
