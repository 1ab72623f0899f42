#include "bridges/emogg/rate_limiter.h"

#include <algorithm>
#include <deque>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace wsbridge::emogg {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using P = RateLimiter::Priority;
using TP = RateLimiter::TimePoint;

const TP kT0 = TP(seconds(1000));

RateLimiter Make(uint32_t max, milliseconds window, uint32_t reserve) {
  RateLimiter::Options o;
  o.max_messages = max;
  o.window = window;
  o.control_reserve = reserve;
  return RateLimiter(o);
}

TEST(EmoggRateLimiter, RequestsStopShortOfTheControlReserve) {
  RateLimiter rl = Make(5, seconds(60), 2);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rl.TryAcquire(P::kRequest, kT0)) << i;
  EXPECT_FALSE(rl.TryAcquire(P::kRequest, kT0));
  EXPECT_EQ(rl.InWindow(kT0), 3u);
  // The session's own messages may still use the reserve...
  EXPECT_TRUE(rl.TryAcquire(P::kControl, kT0));
  EXPECT_TRUE(rl.TryAcquire(P::kControl, kT0));
  // ...and then nothing more fits.
  EXPECT_FALSE(rl.TryAcquire(P::kControl, kT0));
  EXPECT_EQ(rl.InWindow(kT0), 5u);
}

TEST(EmoggRateLimiter, NextAllowedIsWhenEnoughSendsLeaveTheWindow) {
  RateLimiter rl = Make(3, seconds(10), 1);
  ASSERT_TRUE(rl.TryAcquire(P::kRequest, kT0));
  ASSERT_TRUE(rl.TryAcquire(P::kRequest, kT0 + seconds(4)));
  // Two requests in the window fill the request capacity (3 - 1).
  EXPECT_EQ(rl.NextAllowed(P::kRequest, kT0 + seconds(5)), kT0 + seconds(10));
  EXPECT_EQ(rl.NextAllowed(P::kControl, kT0 + seconds(5)), kT0 + seconds(5));
  ASSERT_TRUE(rl.TryAcquire(P::kControl, kT0 + seconds(6)));
  // Full: the control class waits for the oldest send, requests for the two oldest.
  EXPECT_EQ(rl.NextAllowed(P::kControl, kT0 + seconds(7)), kT0 + seconds(10));
  EXPECT_EQ(rl.NextAllowed(P::kRequest, kT0 + seconds(7)), kT0 + seconds(14));
  // A send at t stops counting exactly at t + window (window is half-open).
  EXPECT_FALSE(rl.TryAcquire(P::kControl, kT0 + seconds(10) - milliseconds(1)));
  EXPECT_TRUE(rl.TryAcquire(P::kControl, kT0 + seconds(10)));
  EXPECT_EQ(rl.InWindow(kT0 + seconds(10)), 3u);
  EXPECT_EQ(rl.InWindow(kT0 + seconds(30)), 0u);
  EXPECT_TRUE(rl.TryAcquire(P::kRequest, kT0 + seconds(30)));
}

TEST(EmoggRateLimiter, RecordCountsASendEvenOverTheLimit) {
  RateLimiter rl = Make(2, seconds(10), 1);
  rl.Record(kT0);
  rl.Record(kT0 + milliseconds(1));
  rl.Record(kT0 + milliseconds(2));  // the auth message on a fresh connection
  EXPECT_EQ(rl.InWindow(kT0 + milliseconds(2)), 3u);
  // Nothing else fits until enough of them have left the window.
  EXPECT_EQ(rl.NextAllowed(P::kControl, kT0 + milliseconds(3)), kT0 + milliseconds(10001));
  EXPECT_EQ(rl.NextAllowed(P::kRequest, kT0 + milliseconds(3)), kT0 + milliseconds(10002));
}

TEST(EmoggRateLimiter, BlockUntilPausesEverySend) {
  RateLimiter rl = Make(10, seconds(60), 2);
  rl.BlockUntil(kT0 + seconds(60));
  EXPECT_EQ(rl.NextAllowed(P::kControl, kT0), kT0 + seconds(60));
  EXPECT_FALSE(rl.TryAcquire(P::kControl, kT0 + seconds(59)));
  rl.BlockUntil(kT0 + seconds(30));  // an earlier pause does not shorten it
  EXPECT_FALSE(rl.TryAcquire(P::kRequest, kT0 + seconds(45)));
  EXPECT_TRUE(rl.TryAcquire(P::kRequest, kT0 + seconds(60)));
}

TEST(EmoggRateLimiter, OptionsAreClampedToSomethingUsable) {
  RateLimiter none = Make(0, milliseconds(0), 0);
  EXPECT_EQ(none.options().max_messages, 1u);
  EXPECT_TRUE(none.TryAcquire(P::kRequest, kT0));
  // control_reserve >= max_messages would starve requests forever: clamped to max - 1.
  RateLimiter r = Make(4, seconds(1), 9);
  EXPECT_EQ(r.options().control_reserve, 3u);
  EXPECT_TRUE(r.TryAcquire(P::kRequest, kT0));
  EXPECT_FALSE(r.TryAcquire(P::kRequest, kT0));
}

// The property the bridge relies on: whatever the mix and timing of sends, no interval
// of one window ever holds more than max_messages of them, and requests never take
// the reserve. Checked by counting over random schedules.
TEST(EmoggRateLimiter, NeverExceedsTheLimitInAnyWindow) {
  std::mt19937_64 rng(1234);
  for (int round = 0; round < 50; ++round) {
    const uint32_t max = 1 + rng() % 20;
    const uint32_t reserve = rng() % max;
    const milliseconds window(1 + rng() % 5000);
    RateLimiter rl = Make(max, window, reserve);
    std::vector<std::pair<TP, P>> sent;
    TP now = kT0;
    for (int i = 0; i < 2000; ++i) {
      now += milliseconds(rng() % 200);
      P p = rng() % 3 == 0 ? P::kControl : P::kRequest;
      TP next = rl.NextAllowed(p, now);
      ASSERT_GE(next, now);
      if (rl.TryAcquire(p, now)) {
        ASSERT_EQ(next, now);
        sent.emplace_back(now, p);
      } else {
        ASSERT_GT(next, now);
        // Waiting until `next` must succeed (NextAllowed is not a guess).
        if (rng() % 4 == 0) {
          now = next;
          ASSERT_TRUE(rl.TryAcquire(p, now)) << "round " << round << " send " << i;
          sent.emplace_back(now, p);
        }
      }
    }
    // Every window ending at a send (sends are in time order).
    size_t lo = 0;
    for (size_t hi = 0; hi < sent.size(); ++hi) {
      while (sent[lo].first <= sent[hi].first - window) ++lo;
      const uint32_t all = static_cast<uint32_t>(hi - lo + 1);
      ASSERT_LE(all, max) << "round " << round;
      if (sent[hi].second == P::kRequest) {
        // When a request went out, fewer than max - reserve sends were in its window.
        ASSERT_LE(all, max - reserve) << "round " << round;
      }
    }
  }
}

}  // namespace
}  // namespace wsbridge::emogg
