// Capped exponential backoff with full jitter.
#include "bridges/core/backoff.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace wsbridge::core {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

BackoffPolicy Policy(Duration initial, Duration max, double multiplier) {
  BackoffPolicy p;
  p.initial = initial;
  p.max = max;
  p.multiplier = multiplier;
  return p;
}

TEST(Backoff, EveryDelayIsWithinZeroAndTheCurrentCap) {
  Backoff b(Policy(milliseconds(100), seconds(5), 2.0), /*seed=*/7);
  for (int i = 0; i < 2000; ++i) {
    const Duration cap = b.CurrentCap();
    ASSERT_LE(cap, seconds(5));
    const Duration d = b.Next();
    ASSERT_GE(d, Duration::zero()) << "draw " << i;
    ASSERT_LE(d, cap) << "draw " << i;
  }
}

TEST(Backoff, CapGrowsGeometricallyUpToTheMaximum) {
  Backoff b(Policy(milliseconds(100), milliseconds(1000), 2.0), 1);
  const std::vector<Duration> expected = {milliseconds(100), milliseconds(200), milliseconds(400),
                                          milliseconds(800), milliseconds(1000), milliseconds(1000)};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(b.CurrentCap(), expected[i]) << "attempt " << i;
    EXPECT_EQ(b.attempt(), static_cast<int>(i));
    b.Next();
  }
}

TEST(Backoff, LongOutagesStayAtTheMaximumWithoutOverflow) {
  Backoff b(Policy(seconds(1), seconds(30), 10.0), 3);
  for (int i = 0; i < 100000; ++i) {
    const Duration d = b.Next();
    ASSERT_GE(d, Duration::zero());
    ASSERT_LE(d, seconds(30));
  }
  EXPECT_EQ(b.CurrentCap(), seconds(30));
}

TEST(Backoff, FullJitterCoversTheWholeRange) {
  // initial == max keeps the cap fixed, so all draws share one range.
  const Duration cap = seconds(1);
  Backoff b(Policy(cap, cap, 2.0), /*seed=*/42);
  constexpr int kDraws = 20000;
  std::array<int, 10> buckets{};
  double sum = 0;
  for (int i = 0; i < kDraws; ++i) {
    const double fraction = static_cast<double>(b.Next().count()) / static_cast<double>(cap.count());
    ASSERT_GE(fraction, 0.0);
    ASSERT_LE(fraction, 1.0);
    buckets[std::min(9, static_cast<int>(fraction * 10))]++;
    sum += fraction;
  }
  for (size_t i = 0; i < buckets.size(); ++i) {
    // Uniform: ~2000 each. Generous bounds so a fixed seed cannot be "unlucky".
    EXPECT_GT(buckets[i], kDraws / 20) << "bucket " << i;
    EXPECT_LT(buckets[i], kDraws / 5) << "bucket " << i;
  }
  EXPECT_NEAR(sum / kDraws, 0.5, 0.05);
}

TEST(Backoff, JitterIsNotConstantBelowTheCap) {
  Backoff b(Policy(milliseconds(10), seconds(10), 2.0), 5);
  for (int i = 0; i < 20; ++i) b.Next();
  std::vector<Duration> draws;
  for (int i = 0; i < 50; ++i) draws.push_back(b.Next());
  std::sort(draws.begin(), draws.end());
  EXPECT_LT(draws.front(), draws.back());
  EXPECT_LT(draws.front(), seconds(5));  // not pinned to the cap
}

TEST(Backoff, ResetStartsOverFromTheInitialCap) {
  Backoff b(Policy(milliseconds(50), seconds(10), 3.0), 9);
  for (int i = 0; i < 5; ++i) b.Next();
  EXPECT_GT(b.CurrentCap(), milliseconds(50));
  EXPECT_EQ(b.attempt(), 5);
  b.Reset();
  EXPECT_EQ(b.attempt(), 0);
  EXPECT_EQ(b.CurrentCap(), milliseconds(50));
  EXPECT_LE(b.Next(), milliseconds(50));
}

TEST(Backoff, SameSeedSameSequence) {
  Backoff a(BackoffPolicy{}, 1234);
  Backoff b(BackoffPolicy{}, 1234);
  for (int i = 0; i < 30; ++i) ASSERT_EQ(a.Next(), b.Next());
}

TEST(Backoff, NonsensePoliciesAreClampedToSaneOnes) {
  // max below initial, shrinking multiplier: delays never exceed initial and never go negative.
  Backoff b(Policy(milliseconds(200), milliseconds(100), 0.5), 11);
  for (int i = 0; i < 100; ++i) {
    const Duration d = b.Next();
    ASSERT_GE(d, Duration::zero());
    ASSERT_LE(d, milliseconds(200));
  }
  Backoff zero(Policy(Duration::zero(), Duration::zero(), 2.0), 1);
  EXPECT_EQ(zero.Next(), Duration::zero());
}

// The generator behind jitter and DFX request ids.
TEST(Rng, SameSeedSameStreamAndEntropySeedsDiffer) {
  Rng a(7), b(7), c(8);
  for (int i = 0; i < 100; ++i) {
    uint64_t x = a();
    EXPECT_EQ(x, b());
    EXPECT_NE(x, c());
  }
  Rng e1 = Rng::FromEntropy(), e2 = Rng::FromEntropy();
  EXPECT_NE(e1(), e2());
}

TEST(Rng, UniformOverSmallRangesAndEveryBit) {
  Rng r(12345);
  std::array<int, 52> hist{};
  uint64_t ones = 0, zeros = 0;
  for (int i = 0; i < 52000; ++i) {
    ++hist[std::uniform_int_distribution<size_t>(0, 51)(r)];
    uint64_t v = r();
    ones |= v;
    zeros |= ~v;
  }
  for (int h : hist) {  // expected 1000 each; 6 sigma is about 190
    EXPECT_GT(h, 800);
    EXPECT_LT(h, 1200);
  }
  EXPECT_EQ(ones, ~uint64_t{0});
  EXPECT_EQ(zeros, ~uint64_t{0});
}

}  // namespace
}  // namespace wsbridge::core
