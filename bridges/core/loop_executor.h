// The executor every upstream session's strand runs on: an io thread's io_context, plus
// one permission: inside an InlineScope, a strand that is idle runs the function at once
// on the calling thread instead of waking its io thread.
//
// Why: a bridged unary call's request is read on a gRPC completion-queue thread. Handing
// it to the session's io thread (a post, i.e. an eventfd write and that thread's wake-up)
// put one more thread wake-up on every call's latency path than a direct client has. A
// completion-queue thread that opens an InlineScope around the hand-off enters the
// session's strand itself when nobody else is in it and writes the request upstream from
// its own thread; the answer still comes back on the io thread (the socket is registered
// with its io_context), which finishes the call (core::AsyncUnaryCall::Respond).
//
// The strand keeps its meaning: one thread at a time, in order. The scope is switched off
// while the inline function runs, so what it dispatches elsewhere is not run inside it.
// What it posts (blocking.never: a write that completed at once, the strand's own queue)
// runs on this same thread right after it returns, once: a TLS write that completes at
// once then finishes here too, instead of waking the io thread for its completion. What
// those post in turn goes to the io threads as usual, and so does everything posted when
// the scope says this thread has other work waiting (several unary calls in flight: the
// gRPC thread then stays with the calls, and measured fewer calls/s when it also ran the
// sessions' write completions). A never-blocking execution is never run inside its
// caller. Only callers that hold no lock a session callback could take may open a scope
// (a unary call's OnAdmitted, for instance). A bidi stream's read handler holds the
// stream's lock, which the session's news takes: it opens an InlineAfterScope instead,
// which holds the hand-offs made inside it until it closes, after the lock is released,
// and runs them then as an InlineScope would.
#pragma once

#include <type_traits>
#include <utility>

#include <boost/asio/execution/blocking.hpp>
#include <boost/asio/execution/executor.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/require.hpp>

#include "absl/container/inlined_vector.h"
#include "bridges/core/inplace_function.h"

namespace wsbridge::core {

class InlineScope {
 public:
  // `run_posts_here`: false when this thread has other work waiting (several calls in
  // flight); what an inline function posts then goes to the io threads, so the gRPC
  // thread does not also take over their write completions and queued writes.
  explicit InlineScope(bool run_posts_here = true) noexcept
      : previous_(active_), previous_posts_(run_posts_) {
    active_ = true;
    run_posts_ = run_posts_here;
  }
  ~InlineScope() {
    active_ = previous_;
    run_posts_ = previous_posts_;
  }
  InlineScope(const InlineScope&) = delete;
  InlineScope& operator=(const InlineScope&) = delete;

  static bool Active() noexcept { return active_; }

 private:
  template <typename>
  friend class LoopExecutor;
  // A posted function: run here (true) or handed to its io thread (false).
  using Later = InplaceFunction<void(bool), 128>;
  using Deferred = absl::InlinedVector<Later, 2>;
  // At most this many posted functions run on the calling thread per scope entry; the
  // rest go to their io threads (a long send queue is not drained on a gRPC thread).
  static constexpr size_t kMaxDeferred = 8;
  static inline thread_local bool active_ = false;
  static inline thread_local bool run_posts_ = true;
  static inline thread_local bool collecting_ = false;      // an inline function runs
  static inline thread_local Deferred* deferred_ = nullptr;  // the outermost run's list
  bool previous_;
  bool previous_posts_;
};

// Opened before a lock that a session callback may take (declared before the lock
// guard, so it closes after the guard is released). Every function handed to a
// LoopExecutor on this thread while it is open (a strand's run, posted or dispatched:
// the strand has queued the work itself, in order) is held, and when the scope closes
// each is handed over again inside an InlineScope(run_posts_here): an idle strand that
// was dispatched to then runs on this thread, lock-free, while a post still goes to its
// io thread. Holding only delays the strand's run: what other threads queue behind the
// held work runs with it, in order. Nested scopes: the outermost one holds.
class InlineAfterScope {
 public:
  explicit InlineAfterScope(bool run_posts_here = false) noexcept
      : outermost_(held_ == nullptr), run_posts_(run_posts_here) {
    if (outermost_) held_ = &list_;
  }
  ~InlineAfterScope() {
    if (!outermost_) return;
    held_ = nullptr;
    if (list_.empty()) return;
    InlineScope scope(run_posts_);
    for (Held& h : list_) std::move(h)();
  }
  InlineAfterScope(const InlineAfterScope&) = delete;
  InlineAfterScope& operator=(const InlineAfterScope&) = delete;

  // A hand-off made now is held until the outermost scope closes.
  static bool Holding() noexcept { return held_ != nullptr; }

 private:
  template <typename>
  friend class LoopExecutor;
  using Held = InplaceFunction<void(), 128>;
  using List = absl::InlinedVector<Held, 2>;
  static inline thread_local List* held_ = nullptr;
  List list_;
  bool outermost_;
  bool run_posts_;
};

template <typename Inner>
class LoopExecutor {
 public:
  explicit LoopExecutor(Inner inner) noexcept : inner_(std::move(inner)) {}

  template <typename F>
  void execute(F&& f) const {
    if (InlineAfterScope::held_ != nullptr) {
      // Handed over again, as made, when the scope closes.
      InlineAfterScope::held_->emplace_back(
          [ex = *this, fn = std::decay_t<F>(std::forward<F>(f))]() mutable { ex.execute(std::move(fn)); });
      return;
    }
    const bool never = boost::asio::query(inner_, boost::asio::execution::blocking) ==
                       boost::asio::execution::blocking.never;
    if (never && InlineScope::collecting_) {
      InlineScope::deferred_->emplace_back(
          [ex = inner_, fn = std::decay_t<F>(std::forward<F>(f))](bool here) mutable {
            if (here) {
              std::move(fn)();
            } else {
              ex.execute(std::move(fn));
            }
          });
      return;
    }
    if (never || !InlineScope::active_) {
      inner_.execute(std::forward<F>(f));
      return;
    }
    RunInline(std::decay_t<F>(std::forward<F>(f)));
  }

  template <typename Property>
  auto query(const Property& p) const
      noexcept(noexcept(boost::asio::query(std::declval<const Inner&>(), p)))
          -> decltype(boost::asio::query(std::declval<const Inner&>(), p)) {
    return boost::asio::query(inner_, p);
  }

  template <typename Property>
  auto require(const Property& p) const
      -> LoopExecutor<std::decay_t<decltype(boost::asio::require(std::declval<const Inner&>(), p))>> {
    using Next = std::decay_t<decltype(boost::asio::require(std::declval<const Inner&>(), p))>;
    return LoopExecutor<Next>(boost::asio::require(inner_, p));
  }

  friend bool operator==(const LoopExecutor& a, const LoopExecutor& b) noexcept {
    return a.inner_ == b.inner_;
  }
  friend bool operator!=(const LoopExecutor& a, const LoopExecutor& b) noexcept {
    return !(a == b);
  }

 private:
  // On the calling thread, inside an open scope: `fn` with the scope switched off and its
  // posts collected; then, by the outermost run only and in order, what was collected
  // (the scope open again, so a strand it dispatches to may run inline too, collecting
  // into the same list), up to kMaxDeferred.
  template <typename Fn>
  static void RunInline(Fn fn) {
    InlineScope::Deferred list;
    const bool outermost = InlineScope::deferred_ == nullptr;
    if (outermost) InlineScope::deferred_ = &list;
    {
      struct Collect {
        Collect() {
          InlineScope::active_ = false;
          InlineScope::collecting_ = InlineScope::run_posts_;
        }
        ~Collect() {
          InlineScope::collecting_ = false;
          InlineScope::active_ = true;
        }
      } collect;
      std::move(fn)();
    }
    if (!outermost) return;
    struct Done {
      ~Done() { InlineScope::deferred_ = nullptr; }
    } done;
    for (size_t i = 0; i < list.size(); ++i) {
      InlineScope::Later later = std::move(list[i]);
      later(i < InlineScope::kMaxDeferred);
    }
  }

  Inner inner_;
};

}  // namespace wsbridge::core
