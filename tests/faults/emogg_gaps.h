// Emogg's "every subscriber is told of every gap" rule over one Subscribe stream, checked
// update by update: the Emogg fault scenarios and the soak apply the same rule.
#pragma once

#include <optional>
#include <string>

#include "wsbridge/emogg/v1/emogg.pb.h"

namespace wsbridge::faults {

// One update of a Subscribe stream, as the rule sees it.
struct Update {
  enum class Kind { kSubscribed, kEvent, kGap } kind;
  std::string upstream_id;  // events
  int seq = -1;             // events: the emulator's per-subscription counter, -1 if none
  std::string reason;       // gaps
};
// None for an update of another kind (the rule ignores those).
std::optional<Update> UpdateOf(const emogg::v1::SubscriptionUpdate& u);

// The emulator's per-subscription counter in each counts event ("seq": n, from 1).
int EventSeq(const std::string& json_data);

// The stream starts with `subscribed`; within one upstream subscription the events
// follow each other; a new upstream subscription (a restore after a reconnect) comes
// after a gap, which has a reason, and starts with its first event. Events without a
// counter (worker states) are checked for their subscription only.
class GapRule {
 public:
  // "" when `u` keeps the rule, else what it broke.
  std::string Next(const Update& u);
  int gaps() const { return gaps_; }

 private:
  bool first_ = true;
  std::string current_;  // the upstream subscription of the last event
  int prev_ = 0;
  bool gap_pending_ = false;
  int gaps_ = 0;
};

}  // namespace wsbridge::faults
