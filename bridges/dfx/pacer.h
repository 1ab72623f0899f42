// Real-time pacing of DFX measurement data, as a pure object (time is passed in).
//
// The DFX service answers RATE_LIMIT when a token sends more data than real time: no
// window of `window` (5 s upstream) may carry more than `window` of chunk data. The
// upstream receives a chunk somewhere between our send and its answer, so a chunk counts
// from its send until `window` after its answer; a chunk refused (not accepted) does not
// count; a chunk abandoned without an answer may have counted, so it counts as answered
// when it was abandoned.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "bridges/core/upstream_session.h"

namespace wsbridge::dfx {

class Pacer final : public core::SendGate {
 public:
  explicit Pacer(std::chrono::milliseconds window) : window_(window) {}

  // core::SendGate. `cost` is the chunk's duration in milliseconds.
  std::optional<core::Clock::time_point> When(uint64_t cost, core::Clock::time_point now) override;
  void Sent(uint64_t id, uint64_t cost, core::Clock::time_point now) override;
  void Answered(uint64_t id, bool accepted, core::Clock::time_point now) override;
  void Abandoned(uint64_t id, core::Clock::time_point now) override;

  // Chunk data (ms) counted in the window ending at `now`, for tests.
  std::chrono::milliseconds CountedAt(core::Clock::time_point now) const;

 private:
  struct Entry {
    uint64_t id;
    std::chrono::milliseconds duration;
    std::optional<core::Clock::time_point> answered;
  };
  void Expire(core::Clock::time_point now);

  std::chrono::milliseconds window_;
  std::vector<Entry> entries_;
};

}  // namespace wsbridge::dfx
