#include "tests/faults/emogg_gaps.h"

#include <regex>

#include "absl/strings/str_cat.h"

namespace wsbridge::faults {

std::optional<Update> UpdateOf(const emogg::v1::SubscriptionUpdate& u) {
  if (u.has_subscribed()) return Update{Update::Kind::kSubscribed, "", -1, ""};
  if (u.has_gap()) return Update{Update::Kind::kGap, "", -1, u.gap().reason()};
  if (u.has_event()) {
    return Update{Update::Kind::kEvent, u.event().upstream_subscription_id(),
                  EventSeq(u.event().json_data()), ""};
  }
  return std::nullopt;
}

int EventSeq(const std::string& json_data) {
  static const std::regex kSeq(R"re("seq":(\d+))re");
  std::smatch m;
  return std::regex_search(json_data, m, kSeq) ? std::stoi(m[1]) : -1;
}

std::string GapRule::Next(const Update& u) {
  if (first_) {
    first_ = false;
    return u.kind == Update::Kind::kSubscribed ? "" : "the stream does not start with `subscribed`";
  }
  if (u.kind == Update::Kind::kSubscribed) return "a second `subscribed`";
  if (u.kind == Update::Kind::kGap) {
    gap_pending_ = true;
    ++gaps_;
    return u.reason.empty() ? "a gap without a reason" : "";
  }
  const bool counted = u.seq > 0;
  std::string broken;
  if (current_.empty()) {
    // The first event (a late joiner of a shared subscription starts anywhere).
    if (gap_pending_ && counted && u.seq != 1) {
      broken = absl::StrCat("a restored subscription's first ", u.seq - 1, " events lost");
    }
  } else if (u.upstream_id != current_) {
    if (!gap_pending_) {
      broken = absl::StrCat("events of a new upstream subscription (event seq ", u.seq,
                            ") without a gap before them");
    } else if (counted && u.seq != 1) {
      broken = absl::StrCat("a restored subscription's first ", u.seq - 1, " events lost");
    }
  } else if (gap_pending_) {
    broken = "a gap, then events of the same upstream subscription";
  } else if (counted && u.seq != prev_ + 1) {
    broken = absl::StrCat("events ", prev_ + 1, "..", u.seq - 1, " lost without a gap");
  }
  current_ = u.upstream_id;
  prev_ = u.seq;
  gap_pending_ = false;
  return broken;
}

}  // namespace wsbridge::faults
