// InplaceFunction: a move-only callable that keeps a callable of up to `Capacity` bytes
// inside itself, so storing one costs no heap allocation.
//
// The per-request callbacks of the hot paths (a request's encoder, its reply callback,
// a post to a completion-queue loop) are lambdas holding a shared_ptr or two strings.
// std::function keeps only 16 bytes inline, and in libstdc++ only for trivially
// copyable callables, so each of those cost a malloc and a free per call. Larger
// callables still work: they go to the heap, as with std::function.
#pragma once

#include <cstddef>
#include <functional>
#include <new>
#include <type_traits>
#include <utility>

namespace wsbridge::core {

template <typename Signature, std::size_t Capacity = 48>
class InplaceFunction;

template <typename T>
struct IsStdFunction : std::false_type {};
template <typename S>
struct IsStdFunction<std::function<S>> : std::true_type {};

template <typename R, typename... Args, std::size_t Capacity>
class InplaceFunction<R(Args...), Capacity> {
 public:
  InplaceFunction() noexcept = default;
  InplaceFunction(std::nullptr_t) noexcept {}  // NOLINT: as std::function

  template <typename F, typename D = std::decay_t<F>,
            typename = std::enable_if_t<!std::is_same_v<D, InplaceFunction> &&
                                        std::is_invocable_r_v<R, D&, Args...>>>
  InplaceFunction(F&& f) {  // NOLINT: implicit, as std::function
    Emplace<D>(std::forward<F>(f));
  }

  InplaceFunction(InplaceFunction&& other) noexcept { MoveFrom(other); }
  InplaceFunction& operator=(InplaceFunction&& other) noexcept {
    if (this != &other) {
      Reset();
      MoveFrom(other);
    }
    return *this;
  }
  InplaceFunction& operator=(std::nullptr_t) noexcept {
    Reset();
    return *this;
  }
  template <typename F, typename D = std::decay_t<F>,
            typename = std::enable_if_t<!std::is_same_v<D, InplaceFunction> &&
                                        std::is_invocable_r_v<R, D&, Args...>>>
  InplaceFunction& operator=(F&& f) {
    Reset();
    Emplace<D>(std::forward<F>(f));
    return *this;
  }
  InplaceFunction(const InplaceFunction&) = delete;
  InplaceFunction& operator=(const InplaceFunction&) = delete;
  ~InplaceFunction() { Reset(); }

  explicit operator bool() const noexcept { return ops_ != nullptr; }

  // Const, as std::function's: a mutable lambda inside may still change its captures.
  R operator()(Args... args) const {
    return ops_->invoke(const_cast<Storage*>(&storage_), std::forward<Args>(args)...);
  }

  // Whether a callable of type F is kept inline (for tests and static checks).
  template <typename F>
  static constexpr bool kStoresInline = sizeof(F) <= Capacity &&
                                        alignof(F) <= alignof(std::max_align_t) &&
                                        std::is_nothrow_move_constructible_v<F>;

 private:
  struct alignas(std::max_align_t) Storage {
    unsigned char bytes[Capacity];
  };
  struct Ops {
    R (*invoke)(Storage*, Args&&...);
    void (*move)(Storage* to, Storage* from) noexcept;  // leaves `from` destroyed
    void (*destroy)(Storage*) noexcept;
  };

  template <typename D>
  static D* Inline(Storage* s) {
    return std::launder(reinterpret_cast<D*>(s->bytes));
  }
  template <typename D>
  static D*& Heap(Storage* s) {
    return *std::launder(reinterpret_cast<D**>(s->bytes));
  }

  template <typename D>
  static const Ops* OpsFor() {
    if constexpr (kStoresInline<D>) {
      static constexpr Ops ops{
          [](Storage* s, Args&&... a) -> R { return std::invoke(*Inline<D>(s), std::forward<Args>(a)...); },
          [](Storage* to, Storage* from) noexcept {
            ::new (static_cast<void*>(to->bytes)) D(std::move(*Inline<D>(from)));
            Inline<D>(from)->~D();
          },
          [](Storage* s) noexcept { Inline<D>(s)->~D(); }};
      return &ops;
    } else {
      static constexpr Ops ops{
          [](Storage* s, Args&&... a) -> R { return std::invoke(*Heap<D>(s), std::forward<Args>(a)...); },
          [](Storage* to, Storage* from) noexcept {
            ::new (static_cast<void*>(to->bytes)) D*(Heap<D>(from));
          },
          [](Storage* s) noexcept { delete Heap<D>(s); }};
      return &ops;
    }
  }

  template <typename D, typename F>
  void Emplace(F&& f) {
    // An empty std::function or a null function pointer makes an empty InplaceFunction.
    if constexpr (std::is_pointer_v<D> || std::is_member_pointer_v<D>) {
      if (f == nullptr) return;
    } else if constexpr (IsStdFunction<D>::value) {
      if (!f) return;
    }
    if constexpr (kStoresInline<D>) {
      ::new (static_cast<void*>(storage_.bytes)) D(std::forward<F>(f));
    } else {
      ::new (static_cast<void*>(storage_.bytes)) D*(new D(std::forward<F>(f)));
    }
    ops_ = OpsFor<D>();
  }

  void MoveFrom(InplaceFunction& other) noexcept {
    if (other.ops_ == nullptr) return;
    other.ops_->move(&storage_, &other.storage_);
    ops_ = other.ops_;
    other.ops_ = nullptr;
  }

  void Reset() noexcept {
    if (ops_ == nullptr) return;
    ops_->destroy(&storage_);
    ops_ = nullptr;
  }

  Storage storage_;
  const Ops* ops_ = nullptr;
};

}  // namespace wsbridge::core
