// Client-side limit on messages sent to Emogg, so a session stays under the upstream's
// limit ("80 messages every 60 seconds" per user, across connections) instead of
// learning it from a 429, which closes the connection under every caller sharing it.
//
// A sliding window: at most `max_messages` sends within any interval of length `window`
// (a send at t counts at `now` while t > now - window). That is exactly the documented
// rule, whatever window alignment the server uses, where a token bucket would either
// allow bursts above it or waste budget. Session messages (auth after a reconnect,
// restoring subscriptions, unsubscribes, pings) may use the whole window; caller
// requests all but `control_reserve` of it, so a burst of requests can never keep a
// session from re-authenticating or restoring its subscriptions.
//
// Pure: time is passed in, nothing is read from a clock. Not thread-safe (one per
// session, used on its strand). Memory: one time point per send still in the window
// (at most max_messages).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>

namespace wsbridge::emogg {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  using TimePoint = Clock::time_point;

  enum class Priority {
    kRequest,  // a caller's request: all but control_reserve slots of the window
    kControl,  // the session's own messages: the whole window
  };

  struct Options {
    uint32_t max_messages = 70;
    Clock::duration window = std::chrono::seconds(60);
    uint32_t control_reserve = 8;  // clamped to max_messages - 1
  };

  explicit RateLimiter(Options options);

  // The earliest time, `now` or later, at which a message of `priority` may be sent.
  TimePoint NextAllowed(Priority priority, TimePoint now);

  // Records a send at `now` and returns true when NextAllowed(priority, now) == now;
  // otherwise records nothing and returns false.
  bool TryAcquire(Priority priority, TimePoint now);

  // Records a send at `now` whatever the limit says: a session message that cannot wait
  // (the auth message on a fresh connection). It still counts, so requests wait longer.
  void Record(TimePoint now);

  // Nothing may be sent before `until` (e.g. after the upstream answered 429 and
  // closed). Later calls only extend the pause.
  void BlockUntil(TimePoint until);

  // Sends counted at `now` (those within (now - window, now]).
  uint32_t InWindow(TimePoint now);

  const Options& options() const { return options_; }

 private:
  uint32_t Capacity(Priority priority) const;
  void Expire(TimePoint now);

  Options options_;
  std::deque<TimePoint> sent_;  // send times, oldest first
  TimePoint blocked_until_{};
};

}  // namespace wsbridge::emogg
