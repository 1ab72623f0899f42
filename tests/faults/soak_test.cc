// The soak: thousands of upstream reconnect cycles under random faults, for every bridge
// (the bridge in the real daemon, its emulator behind the fault proxy), with callers
// working the whole time.
//
// A cycle: a random fault cuts every upstream connection (RST or FIN, towards the bridge
// or towards the upstream), is sometimes held for a few backoff periods (attempts made
// meanwhile are cut too), then heals; the sessions reconnect and the callers' work goes
// on. Between cycles the traffic is sometimes sliced into 1-byte writes or delayed.
// Asserted over the whole run (the invariants of the fault scenarios):
//  - DFX: every acknowledged chunk is in the emulator's record exactly once, no chunk is
//    recorded twice, a measurement finished is recorded whole;
//  - NLX: every turn gets exactly one response or turn_failed, and NLX received at most
//    the turns the caller wrote (never one resent behind its back);
//  - Emogg: every subscriber is told of every gap (events of one upstream subscription
//    follow each other; a new upstream subscription comes after a `gap`); Emogg got at
//    most the requests callers made;
//  - Nexora: every message is answered exactly once (done or duplicate, last), or its
//    call ends with an error status; Nexora received it at most once plus once per
//    `restarted` the caller was told of (at least once when answered);
//  - every call ends OK or with a status a caller must expect from an outage
//    (UNAVAILABLE, DEADLINE_EXCEEDED; FAILED_PRECONDITION for a DFX chunk whose outcome
//    was unknown and that had arrived); no crash (the daemon is this process); no request
//    left in a session; the bridge serves again;
//  - memory flat: the heap in use and the resident size at the end within a bound of
//    their level after the warm-up (not under ASan, whose allocator keeps freed memory in
//    quarantine; LeakSanitizer checks there instead).
//
// Length: WSBRIDGE_SOAK_SECONDS per bridge (default 20). WSBRIDGE_SOAK_SEED replays a
// run's faults (each run prints its seed). scripts/soak.sh runs it for as long as asked.
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bridges/dfx/dfx_bridge.h"
#include "bridges/emogg/codec.h"
#include "tests/faults/bridge_kits.h"
#include "tests/faults/daemon_harness.h"
#include "tests/faults/emogg_gaps.h"
#include "tests/faults/fault_proxy.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_emulator.h"
#include "tests/upstreams/emogg_emulator.h"
#include "tests/upstreams/nexora_emulator.h"
#include "tests/upstreams/nlx_emulator.h"
#include "wsbridge/dfx/v1/dfx.grpc.pb.h"
#include "wsbridge/emogg/v1/emogg.grpc.pb.h"
#include "wsbridge/nexora/v1/nexora.grpc.pb.h"
#include "wsbridge/nlx/v1/nlx.grpc.pb.h"

#if defined(__SANITIZE_ADDRESS__)
#define WSBRIDGE_SOAK_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define WSBRIDGE_SOAK_ASAN 1
#endif
#endif

namespace wsbridge::faults {
namespace {

using namespace std::chrono_literals;
using testing::WaitFor;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

constexpr int kWorkers = 4;

int SoakSeconds() {
  const char* s = std::getenv("WSBRIDGE_SOAK_SECONDS");
  const int v = s != nullptr ? std::atoi(s) : 0;
  return v > 0 ? v : 20;
}

uint64_t SoakSeed() {
  const char* s = std::getenv("WSBRIDGE_SOAK_SEED");
  if (s != nullptr && *s != '\0') return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

// A fault's length (or the traffic between two faults): holding it is the scenario, not
// a wait for something to happen.
void Hold(Ms d) { std::this_thread::sleep_for(d); }

struct Memory {
  int64_t heap = 0;  // bytes in use (malloc)
  int64_t rss = 0;
};
Memory SampleMemory() {
  Memory m;
  m.heap = static_cast<int64_t>(mallinfo2().uordblks);
  m.rss = ResidentBytes();
  return m;
}
double MiB(int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); }

// What every workload shares: the statuses its calls ended with, and the unexpected ones.
class Outcomes {
 public:
  // Records a call's end; a status no outage explains is a failure of the soak.
  void Record(const char* what, const grpc::Status& st, bool failed_precondition_ok = false) {
    std::lock_guard<std::mutex> lock(mu_);
    ++by_code_[st.error_code()];
    switch (st.error_code()) {
      case grpc::StatusCode::OK:
      case grpc::StatusCode::UNAVAILABLE:
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return;
      case grpc::StatusCode::FAILED_PRECONDITION:
        if (failed_precondition_ok) return;
        break;
      default:
        break;
    }
    if (unexpected_.size() < 10) {
      unexpected_.push_back(absl::StrCat(what, ": ", st.error_code(), " ", st.error_message()));
    }
    ++unexpected_count_;
  }
  void Violation(std::string what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (violations_.size() < 20) violations_.push_back(std::move(what));
    ++violation_count_;
  }
  int ok() const { return Count(grpc::StatusCode::OK); }
  int failed() const {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const auto& [code, count] : by_code_) n += code == grpc::StatusCode::OK ? 0 : count;
    return n;
  }
  int Count(grpc::StatusCode c) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_code_.find(c);
    return it == by_code_.end() ? 0 : it->second;
  }
  void Expect() const {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(unexpected_count_, 0) << "calls ended with statuses no outage explains, e.g.:\n"
                                    << Join(unexpected_);
    EXPECT_EQ(violation_count_, 0) << "invariants broken, e.g.:\n" << Join(violations_);
  }

 private:
  static std::string Join(const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) absl::StrAppend(&out, "  ", s, "\n");
    return out;
  }
  mutable std::mutex mu_;
  std::map<grpc::StatusCode, int> by_code_;
  std::vector<std::string> unexpected_, violations_;
  int unexpected_count_ = 0, violation_count_ = 0;
};

// One bridge's callers: Step() does one unit of work on worker `w` (called in a loop on
// the worker's thread until `stop`) and says whether its last call failed, Check()
// asserts the invariants once every worker has returned and the faults have stopped.
class Workload {
 public:
  virtual ~Workload() = default;
  virtual bool Step(int w, const std::atomic<bool>& stop) = 0;
  virtual void Check() = 0;
  virtual std::string Summary() const = 0;
  Outcomes outcomes;
};

void CallOptions(grpc::ClientContext& ctx, Ms deadline) {
  Deadline(ctx, deadline);
  WaitForReady(ctx, true);  // callers that wait out the outages (bounded by the deadline)
}

// --- DFX: measurements of kChunks chunks, resumed after each failed stream -----------------

class DfxWorkload : public Workload {
 public:
  static constexpr uint32_t kChunks = 12;

  DfxWorkload(const Channel& ch, Upstream& up)
      : stub_(dfx::v1::DfxService::NewStub(ch)),
        emu_(static_cast<EmulatorUpstream<emulator::DfxEmulator>&>(up).emulator()) {}

  bool Step(int w, const std::atomic<bool>& stop) override {
    // Each worker has a device token of its own: its own upstream session.
    const std::string token = absl::StrCat("dfx-s3cr3t-soak-", w);
    Measurement m;
    {
      grpc::ClientContext ctx;
      CallOptions(ctx, 10s);
      ctx.AddMetadata(std::string(dfx::kDeviceTokenMetadata), token);
      dfx::v1::CreateMeasurementRequest req;
      req.set_study_id("study-1");
      dfx::v1::CreateMeasurementResponse resp;
      grpc::Status st = stub_->CreateMeasurement(&ctx, req, &resp);
      outcomes.Record("CreateMeasurement", st);
      if (!st.ok()) return false;
      m.id = resp.measurement_id();
    }
    uint32_t next = 0;
    for (int attempt = 0; attempt < 40 && next < kChunks && !m.abandoned && !stop.load(); ++attempt) {
      grpc::ClientContext ctx;
      CallOptions(ctx, 20s);
      ctx.AddMetadata(std::string(dfx::kDeviceTokenMetadata), token);
      auto stream = stub_->StreamMeasurement(&ctx);
      bool first = true;
      bool in_flight = false;  // a chunk written whose answer did not come
      uint32_t on_stream = 0;
      while (next < kChunks) {
        dfx::v1::MeasurementChunk c;
        if (first) c.set_measurement_id(m.id);
        first = false;
        c.set_stage(next == 0 ? dfx::v1::STAGE_FIRST
                              : next + 1 == kChunks ? dfx::v1::STAGE_LAST : dfx::v1::STAGE_CHUNK);
        c.set_payload(emulator::MakeEmulatorChunk(next, 1, "data"));
        c.set_duration_ms(1);
        if (!stream->Write(c)) break;
        in_flight = true;
        bool accepted = false;
        dfx::v1::MeasurementEvent ev;
        while (!accepted && stream->Read(&ev)) {
          if (!ev.has_chunk_accepted()) continue;
          const auto& a = ev.chunk_accepted();
          if (a.upstream_chunk_order() != next || a.chunk_order() != on_stream) {
            outcomes.Violation(absl::StrCat("measurement ", m.id, ": chunk ", next,
                                            " acknowledged as ", a.upstream_chunk_order(),
                                            " (", a.chunk_order(), " on the stream)"));
          }
          accepted = true;
        }
        if (!accepted) break;
        in_flight = false;
        m.acked.push_back(next);
        ++next;
        ++on_stream;
      }
      stream->WritesDone();
      dfx::v1::MeasurementEvent ev;
      while (stream->Read(&ev)) {
      }
      grpc::Status st = stream->Finish();
      outcomes.Record("StreamMeasurement", st, /*failed_precondition_ok=*/true);
      if (st.ok() && next == kChunks) break;
      if (st.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
        // The upstream's answer to a resumed chunk: the chunk whose outcome was unknown
        // had arrived (MISALIGNED_CHUNK; MEASUREMENT_CLOSED after the last one).
        if (m.unknown.empty() || m.unknown.back() != next) {
          outcomes.Violation(absl::StrCat("measurement ", m.id, ": FAILED_PRECONDITION for chunk ",
                                          next, ", whose outcome was known: ", st.error_message()));
          m.abandoned = true;
          break;
        }
        m.arrived.push_back(next);
        ++next;
        continue;
      }
      if (in_flight) {
        // Its outcome is unknown: resend it (the upstream answers MISALIGNED_CHUNK if it
        // had arrived) unless it is the first chunk, which would start the measurement
        // again: that measurement is given up.
        m.unknown.push_back(next);
        if (next == 0) m.abandoned = true;
      }
    }
    m.complete = next == kChunks && !m.abandoned;
    const bool ok = m.complete;
    if (m.complete) {
      // Nothing of it can still be on its way upstream: checked now, and the emulator's
      // record of it dropped (so that memory does not grow with the run).
      CheckMeasurement(m, emu_.TakeChunks(m.id));
    } else {
      // A chunk of unknown outcome may still be arriving: checked at the end.
      std::lock_guard<std::mutex> lock(mu_);
      unfinished_.push_back(std::move(m));
    }
    return ok;
  }

  void Check() override {
    std::vector<Measurement> unfinished;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unfinished.swap(unfinished_);
    }
    for (const auto& m : unfinished) CheckMeasurement(m, emu_.TakeChunks(m.id));
    // Every chunk upstream belongs to a measurement a caller streamed.
    for (const auto& c : emu_.chunks()) {
      ADD_FAILURE() << "chunk " << c.chunk_order << " of measurement " << c.measurement_id
                    << ", which no caller streamed, recorded upstream";
    }
  }

  std::string Summary() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return absl::StrCat(measurements_, " measurements (", complete_, " whole), ", acked_,
                        " chunks acknowledged, ", unknown_, " of unknown outcome");
  }

 private:
  struct Measurement {
    std::string id;
    std::vector<uint32_t> acked;    // acknowledged chunks
    std::vector<uint32_t> unknown;  // chunks whose stream failed before their answer
    std::vector<uint32_t> arrived;  // of those, the ones the upstream had (resend refused)
    bool abandoned = false;
    bool complete = false;
  };

  // Every acknowledged chunk recorded upstream exactly once, no chunk twice, a finished
  // measurement whole.
  void CheckMeasurement(const Measurement& m, const std::vector<emulator::DfxChunkRecord>& records) {
    std::map<int, int> rec;
    for (const auto& c : records) ++rec[c.chunk_order];
    for (uint32_t order : m.acked) {
      if (rec[static_cast<int>(order)] != 1) {
        outcomes.Violation(absl::StrCat("measurement ", m.id, ": acknowledged chunk ", order,
                                        " recorded ", rec[static_cast<int>(order)], " times upstream"));
      }
    }
    for (uint32_t order : m.arrived) {
      if (rec[static_cast<int>(order)] != 1) {
        outcomes.Violation(absl::StrCat("measurement ", m.id, ": chunk ", order,
                                        " refused as already there, recorded ",
                                        rec[static_cast<int>(order)], " times"));
      }
    }
    for (const auto& [order, n] : rec) {
      if (n != 1) {
        outcomes.Violation(absl::StrCat("measurement ", m.id, ": chunk ", order, " recorded ", n,
                                        " times upstream"));
      }
    }
    if (m.complete && rec.size() != kChunks) {
      outcomes.Violation(absl::StrCat("measurement ", m.id, " finished but ", rec.size(),
                                      " chunks recorded"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    ++measurements_;
    complete_ += m.complete ? 1 : 0;
    acked_ += m.acked.size();
    unknown_ += m.unknown.size();
  }

  std::unique_ptr<dfx::v1::DfxService::Stub> stub_;
  emulator::DfxEmulator& emu_;
  mutable std::mutex mu_;
  std::vector<Measurement> unfinished_;
  size_t measurements_ = 0, complete_ = 0, acked_ = 0, unknown_ = 0;
};

// --- NLX: a conversation per worker, resumed by each Converse call --------------------------

class NlxWorkload : public Workload {
 public:
  static constexpr int kTurnsPerCall = 20;

  NlxWorkload(const Channel& ch, Upstream& up)
      : stub_(nlx::v1::NlxService::NewStub(ch)),
        emu_(static_cast<EmulatorUpstream<emulator::NlxEmulator>&>(up).emulator()),
        conversations_(kWorkers) {}

  bool Step(int w, const std::atomic<bool>& stop) override {
    Conversation& conv = conversations_[static_cast<size_t>(w)];
    grpc::ClientContext ctx;
    CallOptions(ctx, 30s);
    auto stream = stub_->Converse(&ctx);
    // turn number on this call -> responses + failures it got
    std::map<uint64_t, int> answers;
    int written = 0;
    bool open = true;
    std::string opened_id;
    for (int t = 1; t <= kTurnsPerCall && open && !stop.load(); ++t) {
      nlx::v1::ConverseRequest r;
      if (t == 1) r.set_conversation_id(conv.id);  // empty: a new conversation
      r.mutable_turn()->set_text(absl::StrCat("worker ", w, " turn ", t));
      if (!stream->Write(r)) break;
      ++written;
      const uint64_t turn = static_cast<uint64_t>(t);
      nlx::v1::ConverseEvent ev;
      bool answered = false;
      while (!answered) {
        if (!stream->Read(&ev)) {
          open = false;
          break;
        }
        if (ev.has_opened()) {
          opened_id = ev.opened().conversation_id();
        } else if (ev.has_reconnected()) {
          ++reconnected_;
        } else if (ev.has_response() && ev.response().turn() != 0) {
          ++answers[ev.response().turn()];
          ++responses_;
          answered = ev.response().turn() == turn;
        } else if (ev.has_turn_failed()) {
          ++answers[ev.turn_failed().turn()];
          ++turn_failures_;
          answered = ev.turn_failed().turn() == turn;
        }
      }
    }
    if (open) {
      stream->WritesDone();
      nlx::v1::ConverseEvent ev;
      while (stream->Read(&ev)) {
        if (ev.has_opened()) opened_id = ev.opened().conversation_id();
        if (ev.has_response() && ev.response().turn() != 0) ++answers[ev.response().turn()];
        if (ev.has_turn_failed()) ++answers[ev.turn_failed().turn()];
      }
    }
    grpc::Status st = stream->Finish();
    outcomes.Record("Converse", st);
    for (const auto& [turn, n] : answers) {
      if (n != 1 || turn == 0 || turn > static_cast<uint64_t>(written)) {
        outcomes.Violation(absl::StrCat("conversation ", opened_id, ": turn ", turn, " answered ", n,
                                        " times (", written, " written)"));
      }
    }
    if (st.ok() && answers.size() != static_cast<size_t>(written)) {
      outcomes.Violation(absl::StrCat("conversation ", opened_id, ": the call ended OK with ",
                                      written - static_cast<int>(answers.size()), " turns unanswered"));
    }
    if (!opened_id.empty()) {
      if (!conv.id.empty() && conv.id != opened_id) {
        outcomes.Violation(absl::StrCat("resumed ", conv.id, " but opened ", opened_id));
      }
      conv.id = opened_id;
    }
    // What NLX may have received on the conversation: every turn written on a call that
    // opened or resumed it (a new conversation that never opened has no id to count on).
    if (!conv.id.empty()) {
      conv.written += written;
      // Only the count is checked: the emulator drops the turns' text as the run goes.
      emu_.ForgetTurns(conv.id);
    }
    return st.ok();
  }

  void Check() override {
    for (const auto& conv : conversations_) {
      if (conv.id.empty()) continue;
      const int received = emu_.turns_received(conv.id);
      EXPECT_LE(received, conv.written) << "conversation " << conv.id << ": NLX received "
                                        << received << " turns, the caller wrote " << conv.written;
      ++checked_;
    }
  }

  std::string Summary() const override {
    int written = 0;
    for (const auto& c : conversations_) written += c.written;
    return absl::StrCat(checked_, " conversations, ", written, " turns written, ", responses_.load(),
                        " responses, ", turn_failures_.load(), " turns failed, ", reconnected_.load(),
                        " reconnected events");
  }

 private:
  struct Conversation {
    std::string id;
    int written = 0;
  };
  std::unique_ptr<nlx::v1::NlxService::Stub> stub_;
  emulator::NlxEmulator& emu_;
  std::vector<Conversation> conversations_;  // one per worker, touched by its thread only
  std::atomic<int> responses_{0}, turn_failures_{0}, reconnected_{0};
  int checked_ = 0;
};

// --- Emogg: two long subscribers and two requesters -----------------------------------------

class EmoggWorkload : public Workload {
 public:
  EmoggWorkload(const Channel& ch, Upstream& up)
      : stub_(emogg::v1::EmoggService::NewStub(ch)),
        emu_(static_cast<EmulatorUpstream<emulator::EmoggEmulator>&>(up).emulator()) {
    emu_.SetRateLimit(1'000'000, 60s);
    emu_.SetEventInterval(5ms);
  }

  bool Step(int w, const std::atomic<bool>& stop) override {
    return w < 2 ? Subscribe(stop) : Request(w);
  }

  void Check() override {
    // No request silently resent: Emogg got at most the ones callers made.
    EXPECT_LE(emu_.requests("ping"), requests_.load());
    EXPECT_GE(emu_.requests("ping"), requests_ok_.load());
  }

  std::string Summary() const override {
    return absl::StrCat(subscriptions_.load(), " subscriptions read, ", events_.load(), " events, ",
                        gaps_.load(), " gaps told; ", requests_.load(), " requests (",
                        requests_ok_.load(), " answered)");
  }

 private:
  // One subscription, read until it ends or the soak stops; its gaps checked as it goes.
  bool Subscribe(const std::atomic<bool>& stop) {
    grpc::ClientContext ctx;
    CallOptions(ctx, 120s);
    emogg::v1::SubscribeRequest req;
    req.set_channel("session_emotions_counts");
    req.set_key("66151895e00a857bd76f889d:10s");
    auto reader = stub_->Subscribe(&ctx, req);
    std::atomic<bool> done{false};
    std::thread canceller([&] {
      // The soak's end cancels the call (WaitFor polls both; neither is an effect of ours).
      WaitFor([&] { return stop.load() || done.load(); }, 600s);
      if (!done.load()) ctx.TryCancel();
    });
    ++subscriptions_;
    emogg::v1::SubscribeResponse msg;
    GapRule rule;  // the fault scenarios' rule, on every update as it comes
    while (reader->Read(&msg)) {
      for (const auto& u : msg.updates()) {
        std::optional<Update> update = UpdateOf(u);
        if (!update) continue;
        events_ += update->kind == Update::Kind::kEvent ? 1 : 0;
        const int gaps_before = rule.gaps();
        if (std::string broken = rule.Next(*update); !broken.empty()) outcomes.Violation(broken);
        gaps_ += rule.gaps() - gaps_before;
      }
    }
    done.store(true);
    canceller.join();
    grpc::Status st = reader->Finish();
    if (st.error_code() != grpc::StatusCode::CANCELLED || !stop.load()) outcomes.Record("Subscribe", st);
    return st.ok();
  }

  bool Request(int w) {
    grpc::ClientContext ctx;
    CallOptions(ctx, 10s);
    ctx.AddMetadata(std::string(emogg::kTokenMetadataKey), absl::StrCat("emogg-s3cr3t-soak-", w));
    emogg::v1::RequestRequest req;
    req.set_path("ping");
    emogg::v1::RequestResponse resp;
    ++requests_;
    grpc::Status st = stub_->Request(&ctx, req, &resp);
    outcomes.Record("Request", st);
    if (st.ok()) ++requests_ok_;
    return st.ok();
  }

  std::unique_ptr<emogg::v1::EmoggService::Stub> stub_;
  emulator::EmoggEmulator& emu_;
  std::atomic<int> subscriptions_{0}, events_{0}, gaps_{0}, requests_{0}, requests_ok_{0};
};

// --- Nexora: a chat per worker, one message per call ----------------------------------------

class NexoraWorkload : public Workload {
 public:
  NexoraWorkload(const Channel& ch, Upstream& up)
      : stub_(nexora::v1::NexoraService::NewStub(ch)),
        emu_(static_cast<EmulatorUpstream<emulator::NexoraEmulator>&>(up).emulator()) {}

  bool Step(int w, const std::atomic<bool>&) override {
    const std::string cmid = absl::StrCat("soak-", w, "-", next_[static_cast<size_t>(w)]++);
    grpc::ClientContext ctx;
    CallOptions(ctx, 20s);
    nexora::v1::SendMessageRequest req;
    req.set_chat_id(absl::StrCat("soak-chat-", w));
    req.set_content("status please");
    req.set_client_message_id(cmid);
    auto reader = stub_->SendMessage(&ctx, req);
    Message m;
    m.cmid = cmid;
    nexora::v1::ChatEvent ev;
    bool last_terminal = false;
    while (reader->Read(&ev)) {
      const bool terminal = ev.has_done() || ev.has_duplicate() || ev.has_error();
      m.terminal += terminal ? 1 : 0;
      m.restarted += ev.has_restarted() ? 1 : 0;
      last_terminal = terminal;
      if (ev.client_message_id() != cmid) {
        outcomes.Violation(absl::StrCat(cmid, ": an event of ", ev.client_message_id()));
      }
    }
    m.status = reader->Finish();
    outcomes.Record("SendMessage", m.status);
    if (m.status.ok() && (m.terminal != 1 || !last_terminal)) {
      outcomes.Violation(absl::StrCat(cmid, ": answered ", m.terminal, " times",
                                      last_terminal ? "" : ", something after the end"));
    }
    if (!m.status.ok() && m.terminal != 0) {
      outcomes.Violation(absl::StrCat(cmid, ": an answer's end, then ", m.status.error_message()));
    }
    const bool ok = m.status.ok();
    std::lock_guard<std::mutex> lock(mu_);
    messages_.push_back(std::move(m));
    return ok;
  }

  void Check() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Message& m : messages_) {
      const int received = emu_.messages_received(m.cmid);
      // Sent once, then once more per restart the caller was told of: never more (a
      // resend cut off by the next fault may not have arrived).
      EXPECT_LE(received, 1 + m.restarted) << m.cmid << ": resent behind the caller's back";
      if (m.status.ok()) {
        EXPECT_GE(received, 1) << m.cmid << ": answered but never received";
      }
    }
  }

  std::string Summary() const override {
    std::lock_guard<std::mutex> lock(mu_);
    int ok = 0, restarted = 0;
    for (const Message& m : messages_) {
      ok += m.status.ok() ? 1 : 0;
      restarted += m.restarted;
    }
    return absl::StrCat(messages_.size(), " messages (", ok, " answered), ", restarted,
                        " answers restarted");
  }

 private:
  struct Message {
    std::string cmid;
    int terminal = 0;   // done, duplicate or error events
    int restarted = 0;  // `restarted` events
    grpc::Status status;
  };
  std::unique_ptr<nexora::v1::NexoraService::Stub> stub_;
  emulator::NexoraEmulator& emu_;
  std::vector<int> next_ = std::vector<int>(kWorkers, 0);  // per worker, its thread only
  mutable std::mutex mu_;
  std::vector<Message> messages_;
};

std::unique_ptr<Workload> MakeWorkload(const std::string& bridge, const Channel& ch, Upstream& up) {
  if (bridge == "dfx") return std::make_unique<DfxWorkload>(ch, up);
  if (bridge == "nlx") return std::make_unique<NlxWorkload>(ch, up);
  if (bridge == "emogg") return std::make_unique<EmoggWorkload>(ch, up);
  return std::make_unique<NexoraWorkload>(ch, up);
}

// --- The soak ---------------------------------------------------------------------------

class SoakTest : public ::testing::TestWithParam<Kit> {
 protected:
  void TearDown() override {
    if (harness_ != nullptr) harness_->Stop();
    if (proxy_ != nullptr) proxy_->Stop();
    upstream_.reset();
  }

  std::unique_ptr<Upstream> upstream_;
  std::unique_ptr<FaultProxy> proxy_;
  std::unique_ptr<DaemonHarness> harness_;
};

TEST_P(SoakTest, RandomFaultsKeepTheInvariants) {
  const Kit& kit = GetParam();
  const auto length = std::chrono::seconds(SoakSeconds());
  const uint64_t seed = SoakSeed();
  std::printf("[soak %s] %lld s, seed %llu (WSBRIDGE_SOAK_SEED replays it)\n", kit.name.c_str(),
              static_cast<long long>(length.count()), static_cast<unsigned long long>(seed));
  RecordProperty("seed", std::to_string(seed));
  std::mt19937_64 rng(seed);

  auto up = kit.start_upstream(nullptr);
  ASSERT_TRUE(up.ok()) << up.status();
  upstream_ = *std::move(up);
  proxy_ = std::make_unique<FaultProxy>(upstream_->port());
  ASSERT_TRUE(proxy_->Start().ok());
  Settings s;
  s.url = absl::StrCat("ws://127.0.0.1:", proxy_->port());
  // Quick reconnects, so that a run makes thousands of them.
  s.backoff = core::BackoffPolicy{2ms, 40ms, 2.0, 30s};
  s.request_timeout = 5s;
  harness_ = std::make_unique<DaemonHarness>();
  ASSERT_TRUE(harness_
                  ->Start(
                      kit.name, [&kit, s](config::v1::BridgeConfig& b) { kit.describe(b, s.url); },
                      [&kit, s](const core::BridgeContext& ctx) { return kit.make(s, ctx); })
                  .ok());
  if (kit.always_on_session) {
    ASSERT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }));
  }

  std::unique_ptr<Workload> work = MakeWorkload(kit.name, harness_->channel(), *upstream_);
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      // Like a real client, a worker backs off a little after a failed call (jittered,
      // 5-35 ms) instead of retrying in a tight loop.
      std::mt19937 jitter(static_cast<uint32_t>(seed) + static_cast<uint32_t>(w));
      while (!stop.load()) {
        if (!work->Step(w, stop)) Hold(Ms(5 + jitter() % 31));
      }
    });
  }

  const auto start = Clock::now();
  const auto warm_until = start + length / 4;
  std::optional<Memory> warm;
  int cycles = 0, shaped = 0, held = 0, stuck = 0, slow_close = 0;
  const uint64_t accepted_before = proxy_->counters().connections_accepted;
  const Direction dirs[] = {Direction::kUpstreamToClient, Direction::kClientToUpstream};
  const Mode modes[] = {Mode::kReset, Mode::kClose};
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  while (Clock::now() - start < length) {
    if (!warm && Clock::now() >= warm_until) warm = SampleMemory();
    // Traffic between faults, sometimes sliced or delayed.
    if (pick(5) == 0) {
      Shaping sh;
      if (pick(2) == 0) {
        sh.slice = true;
      } else {
        sh.delay = Ms(1 + pick(3));
      }
      proxy_->SetShaping(dirs[pick(2)], sh);
      ++shaped;
    }
    Hold(Ms(10 + pick(60)));
    // The fault: every connection cut, maybe held for a few backoff periods.
    const uint64_t accepted = proxy_->counters().connections_accepted;
    Direction dir = dirs[pick(2)];
    Mode mode = modes[pick(2)];
    proxy_->SetMode(dir, mode);
    if (!WaitFor([&] { return proxy_->counters().connections_open == 0; }, 10s)) {
      // Not a failure by itself (a connection half-closed by a FIN closes when the bridge
      // notices); connections left behind for good fail the check after the run.
      ++slow_close;
      std::printf("[soak %s] cycle %d: %llu connections still open 10 s into a %s %s\n",
                  kit.name.c_str(), cycles, static_cast<unsigned long long>(proxy_->counters().connections_open),
                  mode == Mode::kReset ? "reset" : "FIN",
                  dir == Direction::kUpstreamToClient ? "towards the bridge" : "towards the upstream");
    }
    if (pick(4) == 0) {
      Hold(Ms(5 + pick(80)));
      ++held;
    }
    proxy_->Heal();
    ++cycles;
    // Some session comes back before the next fault (always-on ones and every busy
    // worker's want one).
    if (!WaitFor([&] { return proxy_->counters().connections_accepted > accepted &&
                              proxy_->counters().connections_open > 0; }, 20s)) {
      ++stuck;
      std::printf("[soak %s] cycle %d: no connection back 20 s after healing (%llu accepted, %llu open)\n",
                  kit.name.c_str(), cycles,
                  static_cast<unsigned long long>(proxy_->counters().connections_accepted - accepted),
                  static_cast<unsigned long long>(proxy_->counters().connections_open));
    }
  }
  proxy_->Heal();
  stop.store(true);
  for (auto& t : workers) t.join();
  const uint64_t reconnects = proxy_->counters().connections_accepted - accepted_before;

  // The bridge serves again; nothing is left in its sessions.
  if (kit.always_on_session) {
    EXPECT_TRUE(WaitFor([&] { return harness_->bridge()->Serving(); }, 20s));
  }
  EXPECT_TRUE(WaitFor([&] { return kit.probe(harness_->channel(), -1, true).ok(); }, 30s))
      << "the bridge does not serve after the soak";
  EXPECT_TRUE(WaitFor([&] { return NoRequestsHeld(*harness_->bridge()); }, 20s))
      << "a session still holds requests of calls that ended";
  work->Check();
  work->outcomes.Expect();
  EXPECT_EQ(stuck, 0) << "cycles after which no upstream connection came back";
  // No upstream connection left behind: what stays open is the sessions the workers and
  // the last probe use (a device token or a chat each, the default session).
  const uint64_t bound = static_cast<uint64_t>(kWorkers + kit.base_sessions + 1);
  EXPECT_TRUE(WaitFor([&] { return proxy_->counters().connections_open <= bound; }, 30s))
      << proxy_->counters().connections_open << " upstream connections still open, at most " << bound
      << " expected";
  RecordProperty("slow_close_cycles", slow_close);

  const Memory end = SampleMemory();
  if (!warm) warm = end;
  std::printf("[soak %s] %d fault cycles (%d held, %d with shaping, %d slow to close), %llu upstream connections "
              "accepted; calls %d ok, %d failed (%d UNAVAILABLE, %d DEADLINE_EXCEEDED); %s\n",
              kit.name.c_str(), cycles, held, shaped, slow_close, static_cast<unsigned long long>(reconnects),
              work->outcomes.ok(), work->outcomes.failed(),
              work->outcomes.Count(grpc::StatusCode::UNAVAILABLE),
              work->outcomes.Count(grpc::StatusCode::DEADLINE_EXCEEDED), work->Summary().c_str());
  std::printf("[soak %s] heap in use %.1f -> %.1f MiB, RSS %.1f -> %.1f MiB (after warm-up -> end)\n",
              kit.name.c_str(), MiB(warm->heap), MiB(end.heap), MiB(warm->rss), MiB(end.rss));
  RecordProperty("cycles", cycles);
  RecordProperty("reconnects", static_cast<int>(reconnects));
  RecordProperty("calls_ok", work->outcomes.ok());
  RecordProperty("heap_warm_kib", static_cast<int>(warm->heap / 1024));
  RecordProperty("heap_end_kib", static_cast<int>(end.heap / 1024));
  RecordProperty("rss_warm_kib", static_cast<int>(warm->rss / 1024));
  RecordProperty("rss_end_kib", static_cast<int>(end.rss / 1024));
  // Work got done, and faults were survived: a soak that made no progress proves nothing.
  EXPECT_GT(cycles, 0);
  EXPECT_GT(work->outcomes.ok(), 0);
#ifndef WSBRIDGE_SOAK_ASAN
  // Flat. The emulators keep a little per measurement or message (the DFX rate history,
  // Nexora's deduplication record; about 1 MiB per 20 s here); the soak drops the rest of
  // their records as it checks them. A leak of a kilobyte per call or reconnect would be
  // tens of megabytes. The bound grows by 4 MiB per minute past the first, for long runs.
  const int64_t extra_minutes = std::max<int64_t>(0, length.count() / 60 - 1);
  const int64_t heap_bound = (int64_t{8} + 4 * extra_minutes) << 20;
  EXPECT_LT(end.heap - warm->heap, heap_bound) << "heap grew by " << MiB(end.heap - warm->heap) << " MiB";
  EXPECT_LT(end.rss - warm->rss, heap_bound + (int64_t{16} << 20))
      << "RSS grew by " << MiB(end.rss - warm->rss) << " MiB";
#endif
}

INSTANTIATE_TEST_SUITE_P(Soak, SoakTest, ::testing::ValuesIn(AllKits()), KitName);

}  // namespace
}  // namespace wsbridge::faults
