#include "bridges/emogg/rate_limiter.h"

#include <algorithm>

namespace wsbridge::emogg {

RateLimiter::RateLimiter(Options options) : options_(options) {
  if (options_.max_messages == 0) options_.max_messages = 1;
  if (options_.window <= Clock::duration::zero()) options_.window = Clock::duration(1);
  options_.control_reserve = std::min(options_.control_reserve, options_.max_messages - 1);
}

uint32_t RateLimiter::Capacity(Priority priority) const {
  return priority == Priority::kControl ? options_.max_messages
                                        : options_.max_messages - options_.control_reserve;
}

void RateLimiter::Expire(TimePoint now) {
  // A send at t no longer counts once t <= now - window.
  while (!sent_.empty() && sent_.front() <= now - options_.window) sent_.pop_front();
}

RateLimiter::TimePoint RateLimiter::NextAllowed(Priority priority, TimePoint now) {
  Expire(now);
  TimePoint at = std::max(now, blocked_until_);
  const uint32_t capacity = Capacity(priority);
  if (sent_.size() < capacity) return at;
  // The send that has to leave the window first so that fewer than `capacity` remain.
  TimePoint oldest_blocking = sent_[sent_.size() - capacity];
  return std::max(at, oldest_blocking + options_.window);
}

bool RateLimiter::TryAcquire(Priority priority, TimePoint now) {
  if (NextAllowed(priority, now) != now) return false;
  sent_.push_back(now);
  return true;
}

void RateLimiter::Record(TimePoint now) {
  Expire(now);
  sent_.push_back(now);
}

void RateLimiter::BlockUntil(TimePoint until) { blocked_until_ = std::max(blocked_until_, until); }

uint32_t RateLimiter::InWindow(TimePoint now) {
  Expire(now);
  return static_cast<uint32_t>(sent_.size());
}

}  // namespace wsbridge::emogg
