// Capped exponential backoff with full jitter ("Exponential Backoff And Jitter"):
// the n-th delay is uniform in [0, min(max, initial * multiplier^n)].
#pragma once

#include <chrono>
#include <cstdint>

#include "bridges/core/rng.h"

namespace wsbridge::core {

using Duration = std::chrono::nanoseconds;

struct BackoffPolicy {
  Duration initial = std::chrono::milliseconds(500);
  Duration max = std::chrono::seconds(30);
  double multiplier = 2.0;
  // A connection that stayed healthy this long resets the attempt count.
  Duration reset_after = std::chrono::seconds(30);
};

class Backoff {
 public:
  // Without a seed the jitter draws from a generator unique to this instance.
  explicit Backoff(BackoffPolicy policy);
  Backoff(BackoffPolicy policy, uint64_t seed);

  // Delay before the next attempt; advances the attempt count.
  Duration Next();
  // The cap the next call to Next() draws under (without jitter).
  Duration CurrentCap() const;
  void Reset() { attempt_ = 0; }
  int attempt() const { return attempt_; }
  const BackoffPolicy& policy() const { return policy_; }

 private:
  BackoffPolicy policy_;
  int attempt_ = 0;
  Rng rng_;
};

}  // namespace wsbridge::core
