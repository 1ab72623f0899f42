// The real-time pacer as a pure object: time is passed in.
#include "bridges/dfx/pacer.h"

#include <gtest/gtest.h>

namespace wsbridge::dfx {
namespace {

using std::chrono::milliseconds;
using TimePoint = core::Clock::time_point;

TEST(PacerTest, DataUpToTheWindowGoesAtOnce) {
  Pacer p(milliseconds(1000));
  const TimePoint t0{};
  EXPECT_EQ(p.When(400, t0), t0);
  p.Sent(1, 400, t0);
  EXPECT_EQ(p.When(600, t0), t0);  // 1000 ms in a 1000 ms window is allowed
  p.Sent(2, 600, t0);
  EXPECT_EQ(p.CountedAt(t0), milliseconds(1000));
}

TEST(PacerTest, MoreWaitsForTheAnswerThenForTheWindowAfterIt) {
  Pacer p(milliseconds(1000));
  const TimePoint t0{};
  p.Sent(1, 1000, t0);
  // In flight and filling the window: only its answer tells when it counted.
  EXPECT_FALSE(p.When(100, t0).has_value());
  p.Answered(1, true, t0 + milliseconds(50));
  // It counts until a window after its answer (plus a millisecond off the edge).
  EXPECT_EQ(p.When(100, t0 + milliseconds(60)), t0 + milliseconds(1051));
  EXPECT_EQ(p.When(100, t0 + milliseconds(1051)), t0 + milliseconds(1051));
}

TEST(PacerTest, RefusedChunksDoNotCountAbandonedOnesDo) {
  Pacer p(milliseconds(1000));
  const TimePoint t0{};
  p.Sent(1, 1000, t0);
  p.Answered(1, /*accepted=*/false, t0);  // RATE_LIMIT: it did not count upstream
  EXPECT_EQ(p.When(1000, t0), t0);
  p.Sent(2, 1000, t0);
  p.Abandoned(2, t0 + milliseconds(10));  // lost in a disconnect: it may have counted
  EXPECT_EQ(p.When(500, t0 + milliseconds(20)), t0 + milliseconds(1011));
  EXPECT_EQ(p.CountedAt(t0 + milliseconds(1011)), milliseconds(0));
}

TEST(PacerTest, TheOldestAnswersLeaveTheWindowFirst) {
  Pacer p(milliseconds(1000));
  const TimePoint t0{};
  p.Sent(1, 500, t0);
  p.Answered(1, true, t0 + milliseconds(100));
  p.Sent(2, 500, t0 + milliseconds(100));
  p.Answered(2, true, t0 + milliseconds(300));
  // 1000 ms counted; 400 more fits once the first 500 ms left.
  EXPECT_EQ(p.When(400, t0 + milliseconds(310)), t0 + milliseconds(1101));
}

}  // namespace
}  // namespace wsbridge::dfx
