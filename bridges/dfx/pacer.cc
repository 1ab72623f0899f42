#include "bridges/dfx/pacer.h"

#include <algorithm>

namespace wsbridge::dfx {

using std::chrono::milliseconds;

void Pacer::Expire(core::Clock::time_point now) {
  std::erase_if(entries_,
                [&](const Entry& e) { return e.answered && *e.answered + window_ <= now; });
}

std::optional<core::Clock::time_point> Pacer::When(uint64_t cost, core::Clock::time_point now) {
  Expire(now);
  const milliseconds d(cost);
  milliseconds unanswered{0}, total = d;
  std::vector<const Entry*> answered;
  for (const Entry& e : entries_) {
    total += e.duration;
    if (e.answered) {
      answered.push_back(&e);
    } else {
      unanswered += e.duration;
    }
  }
  if (total <= window_ || entries_.empty()) return now;
  // Data in flight already fills the window: only its answer can tell when it counted.
  if (unanswered > milliseconds(0) && unanswered + d > window_) return std::nullopt;
  std::sort(answered.begin(), answered.end(),
            [](const Entry* a, const Entry* b) { return *a->answered < *b->answered; });
  for (const Entry* e : answered) {
    total -= e->duration;
    // One extra millisecond keeps us off the window's edge.
    if (total <= window_ || e == answered.back()) return *e->answered + window_ + milliseconds(1);
  }
  return std::nullopt;
}

void Pacer::Sent(uint64_t id, uint64_t cost, core::Clock::time_point /*now*/) {
  entries_.push_back(Entry{id, milliseconds(cost), std::nullopt});
}

void Pacer::Answered(uint64_t id, bool accepted, core::Clock::time_point now) {
  if (!accepted) {
    std::erase_if(entries_, [id](const Entry& e) { return e.id == id; });
    return;
  }
  for (Entry& e : entries_) {
    if (e.id == id && !e.answered) e.answered = now;
  }
}

void Pacer::Abandoned(uint64_t id, core::Clock::time_point now) { Answered(id, true, now); }

milliseconds Pacer::CountedAt(core::Clock::time_point now) const {
  milliseconds total{0};
  for (const Entry& e : entries_) {
    if (!e.answered || *e.answered + window_ > now) total += e.duration;
  }
  return total;
}

}  // namespace wsbridge::dfx
