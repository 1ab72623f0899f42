// ThreadSanitizer and Debian's Abseil: makes absl::Mutex, CondVar and Notification
// visible to TSan. Linked into every TSan test binary (tests/tsan/CMakeLists.txt).
//
// Why: Debian's libabsl_synchronization is not built with -fsanitize=thread, so its
// lock and unlock (atomics and futex syscalls inside the library) carry no
// happens-before edges TSan can see. Every field our code guards with an absl::Mutex
// (ABSL_GUARDED_BY) would then be reported as a race between two threads that in fact
// both held the lock. An instrumented Abseil annotates itself (ABSL_TSAN_MUTEX_*); this
// file adds the same edges from outside: the executable defines the library's exported
// entry points, so every call (ours, and gRPC's, whose gpr_mu is an absl::Mutex) comes
// here first; each forwards to the library's own definition (dlsym RTLD_NEXT) and tells
// TSan "acquire" after taking a lock and "release" before giving one up.
//
// It adds edges that really exist and removes none, so it can hide a race only where
// two accesses really are ordered by one of these locks.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);

namespace {

#define WSB_STR2(x) #x
#define WSB_STR(x) WSB_STR2(x)

// The library's symbol `_ZN4absl<len><inline ns><rest>` (Itanium mangling; the inline
// namespace is Debian's ABSL_OPTION_INLINE_NAMESPACE_NAME).
template <class Fn>
Fn Real(const char* rest) {
  const std::string ns = WSB_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string(rest[0] == 'K' ? "_ZNK4absl" : "_ZN4absl") +
                           std::to_string(ns.size()) + ns + (rest[0] == 'K' ? rest + 1 : rest);
  void* p = dlsym(RTLD_NEXT, name.c_str());
  if (p == nullptr) {
    std::fprintf(stderr, "tsan absl shim: %s not found\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

}  // namespace

namespace {
// See Condition::Eval below.
char g_condition_sync;
thread_local void* t_condition_mutex = nullptr;

// Names the mutex whose conditions this thread may evaluate inside the library.
class ConditionScope {
 public:
  explicit ConditionScope(void* mu) : prev_(t_condition_mutex) { t_condition_mutex = mu; }
  ~ConditionScope() { t_condition_mutex = prev_; }
  ConditionScope(const ConditionScope&) = delete;
  ConditionScope& operator=(const ConditionScope&) = delete;

 private:
  void* prev_;
};
}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// --- Mutex -----------------------------------------------------------------------------

void Mutex::Lock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex4LockEv");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderLock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  real(this);
  __tsan_acquire(this);
}

bool Mutex::TryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  const bool ok = real(this);
  if (ok) __tsan_acquire(this);
  return ok;
}

bool Mutex::ReaderTryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  const bool ok = real(this);
  if (ok) __tsan_acquire(this);
  return ok;
}

void Mutex::Unlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex6UnlockEv");
  ConditionScope scope(this);
  __tsan_release(this);
  real(this);
}

void Mutex::ReaderUnlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  ConditionScope scope(this);
  __tsan_release(this);
  real(this);
}

// Conditional waits give the lock up while waiting and hold it again on return.
void Mutex::Await(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  ConditionScope scope(this);
  __tsan_release(this);
  real(this, cond);
  __tsan_acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  ConditionScope scope(this);
  __tsan_release(this);
  const bool ok = real(this, cond, timeout);
  __tsan_acquire(this);
  return ok;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  ConditionScope scope(this);
  __tsan_release(this);
  const bool ok = real(this, cond, deadline);
  __tsan_acquire(this);
  return ok;
}

void Mutex::LockWhen(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  ConditionScope scope(this);
  real(this, cond);
  __tsan_acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static auto real =
      Real<void (*)(Mutex*, const Condition&)>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  ConditionScope scope(this);
  real(this, cond);
  __tsan_acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  ConditionScope scope(this);
  const bool ok = real(this, cond, timeout);
  __tsan_acquire(this);
  return ok;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  ConditionScope scope(this);
  const bool ok = real(this, cond, deadline);
  __tsan_acquire(this);
  return ok;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  ConditionScope scope(this);
  const bool ok = real(this, cond, timeout);
  __tsan_acquire(this);
  return ok;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  ConditionScope scope(this);
  const bool ok = real(this, cond, deadline);
  __tsan_acquire(this);
  return ok;
}

// --- Condition -------------------------------------------------------------------------
// Await / LockWhen give the lock up and take it back inside the library (not through
// Lock()), and evaluate the caller's Condition there with the lock held: on the waiting
// thread, or on the thread that is unlocking. Condition::Eval is not told the mutex, so
// the wrappers above name it for their thread (ConditionScope) and Eval acquires and
// releases it around the evaluation, as the lock held at that moment does. Outside those
// wrappers (not expected), one process-wide object stands in.

bool Condition::Eval() const {
  static auto real = Real<bool (*)(const Condition*)>("K9Condition4EvalEv");
  void* sync = t_condition_mutex != nullptr ? t_condition_mutex : &g_condition_sync;
  __tsan_acquire(sync);
  const bool result = real(this);
  __tsan_release(sync);
  return result;
}

// --- CondVar ---------------------------------------------------------------------------

void CondVar::Wait(Mutex* mu) {
  static auto real = Real<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  __tsan_release(mu);
  real(this, mu);
  __tsan_acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, absl::Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  __tsan_release(mu);
  const bool timed_out = real(this, mu, timeout);
  __tsan_acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, absl::Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  __tsan_release(mu);
  const bool timed_out = real(this, mu, deadline);
  __tsan_acquire(mu);
  return timed_out;
}

// --- Notification ----------------------------------------------------------------------
// HasBeenNotified() is inline (compiled into our code, so instrumented), but the store
// it reads is made inside the library: Notify also releases on the flag's address,
// which is what that instrumented acquire-load synchronizes with.

namespace {
void* FlagOf(const Notification* n) {
  // Notification is { Mutex mutex_; std::atomic<bool> notified_yet_; }.
  static_assert(sizeof(Notification) == 2 * sizeof(Mutex), "absl::Notification layout changed");
  return const_cast<char*>(reinterpret_cast<const char*>(n) + sizeof(Mutex));
}
}  // namespace

void Notification::Notify() {
  static auto real = Real<void (*)(Notification*)>("12Notification6NotifyEv");
  __tsan_release(this);
  __tsan_release(FlagOf(this));
  real(this);
}

void Notification::WaitForNotification() const {
  static auto real = Real<void (*)(const Notification*)>("K12Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static auto real = Real<bool (*)(const Notification*, absl::Duration)>(
      "K12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  const bool ok = real(this, timeout);
  if (ok) __tsan_acquire(const_cast<Notification*>(this));
  return ok;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  static auto real = Real<bool (*)(const Notification*, absl::Time)>(
      "K12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  const bool ok = real(this, deadline);
  if (ok) __tsan_acquire(const_cast<Notification*>(this));
  return ok;
}

// --- Status ------------------------------------------------------------------------------
// absl::Status shares its heap representation between copies by a reference count the
// library decrements (UnrefNonInlined, uninstrumented): the thread that drops the last
// reference frees it without TSan seeing the other threads' earlier reads. Each
// decrement is a release, and one that may free an acquire, as instrumented refcounting
// would be.

void Status::UnrefNonInlined(uintptr_t rep) {
  static auto real = Real<void (*)(uintptr_t)>("6Status15UnrefNonInlinedEm");
  void* obj = reinterpret_cast<void*>(rep);
  __tsan_release(obj);
  __tsan_acquire(obj);
  real(rep);
}

ABSL_NAMESPACE_END
}  // namespace absl
