#include "bridges/core/backoff.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

namespace wsbridge::core {

Backoff::Backoff(BackoffPolicy policy) : Backoff(policy, Rng::FromEntropy()()) {}

Backoff::Backoff(BackoffPolicy policy, uint64_t seed) : policy_(policy), rng_(seed) {
  if (policy_.initial < Duration::zero()) policy_.initial = Duration::zero();
  if (policy_.max < policy_.initial) policy_.max = policy_.initial;
  if (!(policy_.multiplier >= 1.0)) policy_.multiplier = 1.0;  // also catches NaN
}

Duration Backoff::CurrentCap() const {
  // Computed in floating point and clamped, so a long outage cannot overflow.
  const double cap = static_cast<double>(policy_.initial.count()) *
                     std::pow(policy_.multiplier, static_cast<double>(attempt_));
  const double max = static_cast<double>(policy_.max.count());
  if (!(cap < max)) return policy_.max;
  return Duration(static_cast<Duration::rep>(cap));
}

Duration Backoff::Next() {
  const Duration cap = CurrentCap();
  if (attempt_ < std::numeric_limits<int>::max()) ++attempt_;
  if (cap <= Duration::zero()) return Duration::zero();
  std::uniform_int_distribution<Duration::rep> full_jitter(0, cap.count());
  return Duration(full_jitter(rng_));
}

}  // namespace wsbridge::core
