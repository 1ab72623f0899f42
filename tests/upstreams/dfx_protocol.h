// The DFX (DeepAffex) WebSocket protocol as the emulator serves it: a pure,
// clock-injected state machine. Frames go in with the time they arrived; what the
// server does in answer (send, close, drop, each maybe delayed) comes out. No
// sockets, no threads, no clocks of its own, so every rule is unit-testable.
//
// It is written from the vendor's documentation and public client only and must
// never share code with the bridge's codec: it is the independent check of it.
//
// Not thread-safe: DfxEmulator serializes calls.
//
// Where the vendor's pages leave a choice, the emulator does what the real service most
// plausibly does (a client, and the bridge, must cope with exactly this):
// - Handshake: the `json` subprotocol is required (selected in the answer); without it
//   the upgrade is refused with HTTP 400. Any path is accepted (the client uses "/").
// - Frames: text frames are read like binary ones; every answer is a binary frame.
//   Shorter than ACTION(4)+REQUEST_ID(10): close 1002. Non-digit action, body not a
//   JSON object (an empty body included: send "{}"): 400 BAD_REQUEST.
// - Login (0718): 200 {}. Missing/empty/refused Token: 401 INVALID_TOKEN; the socket
//   stays open and the connection is logged out (also if it was logged in), so 0718
//   may be retried. Every other action (0100 included) before a successful login:
//   401 NOT_AUTHENTICATED. The token is never echoed.
// - Measurements belong to the token that created them (others get 404).
// - 0510: Params.ID and RequestID (10 chars) are required (400 INVALID_PARAMETER);
//   results are pushed on the body's RequestID. Subscribing to a finished measurement
//   answers 200 {} and yields nothing more. No unsubscribe: it ends with the socket.
// - 0506 checks, in order: Params.ID / Action / Payload present (400
//   INVALID_PARAMETER), measurement known (404 INVALID_MEASUREMENT), not closed (400
//   MEASUREMENT_CLOSED), payload base64 + SDK header (400 UNPACKER_RPC_ERROR), order
//   (400 MISALIGNED_CHUNK: FIRST must carry ChunkOrder 0 and restarts the measurement;
//   CHUNK/LAST before any FIRST are misaligned; a repeated chunk is misaligned), rate
//   (429 RATE_LIMIT, sliding half-open window (now - window, now] per token over all
//   its measurements and connections). A refused chunk changes nothing.
// - Accepted chunk: 200 {"ID":"<data id>","ChunkOrder":n}, then (after the result
//   delay) one result per ::PROCESS chunk on every subscription of the measurement:
//   200 {"ID":mid,"MeasurementDataID":"<data id>","ChunkOrder":n,"Action":"...",
//        "Results":{"HR_BPM":60..99,"DataMs":total}}
//   LAST (PROCESS or IGNORE) closes the measurement. The public page defines no
//   end-of-results marker, so none is sent: a subscriber learns the end from the result
//   whose ChunkOrder is the LAST chunk's (none comes for LAST::IGNORE).
// - 0100: 200 {"Version":"emulator","Status":"OK"}; any other action: 404 NOT_FOUND.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_DFX_PROTOCOL_H_
#define WSBRIDGE_TESTS_UPSTREAMS_DFX_PROTOCOL_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace wsbridge::emulator {

using DfxClock = std::chrono::steady_clock;

// One thing the server does to one connection.
struct DfxAction {
  enum class Kind {
    kSend,   // send `bytes` as a binary frame
    kClose,  // send a close frame with `close_code` / `close_reason`
    kDrop,   // drop the TCP connection abruptly, no close frame
  };
  uint64_t conn = 0;
  Kind kind = Kind::kSend;
  std::string bytes;
  uint16_t close_code = 0;
  std::string close_reason;
  // Perform it this long after the frame that caused it was received.
  std::chrono::milliseconds delay{0};
};

struct DfxProtocolOptions {
  // Accepted device tokens; empty = any non-empty token not starting with "bad".
  std::vector<std::string> tokens;
  // Sliding window of the RATE_LIMIT rule: at most this much chunk data (by the
  // chunks' own durations) may arrive within any window of this length.
  std::chrono::milliseconds rate_window{5000};
  // Seeds the generated measurement / data ids (so two emulators differ).
  uint64_t id_seed = 0x5eed;
};

// What was accepted, for tests to check ordering and pacing.
struct DfxChunkRecord {
  std::string measurement_id;
  std::string action;  // e.g. "CHUNK::PROCESS"
  int chunk_order = 0;
  int duration_ms = 0;
  DfxClock::time_point received;
};

// Emulator SDK chunk: "WSBE" | u32 LE chunk_order | u32 LE duration_ms | body.
// The real payload is opaque SDK output that carries its own order and length;
// this stands in for it.
std::string MakeEmulatorChunk(uint32_t chunk_order, uint32_t duration_ms,
                              std::string_view body = {});

class DfxProtocol {
 public:
  explicit DfxProtocol(DfxProtocolOptions options);

  void OnOpen(uint64_t conn);
  // One WebSocket data frame from `conn` (text frames are read like binary ones).
  std::vector<DfxAction> OnFrame(uint64_t conn, std::string_view frame, DfxClock::time_point now);
  // The connection is gone; its subscriptions end.
  void OnClose(uint64_t conn);

  // Fault switches; they apply to frames received from now on.
  void SetDropAfterFrames(int n) { drop_after_frames_ = n; }
  void SetAnswerDelay(std::chrono::milliseconds d) { answer_delay_ = d; }
  void SetRefuseLogin(bool refuse) { refuse_login_ = refuse; }
  void SetResultDelay(std::chrono::milliseconds d) { result_delay_ = d; }
  // A raw binary frame for every open connection.
  std::vector<DfxAction> BroadcastRaw(const std::string& bytes) const;

  std::vector<DfxChunkRecord> chunks() const { return chunks_; }
  // Removes and returns the records of one measurement's chunks (long runs check each
  // measurement once it ended, so the record does not grow with the run).
  std::vector<DfxChunkRecord> TakeChunks(std::string_view measurement_id);
  int MaxDataMsInWindow() const;
  int open_connections() const { return static_cast<int>(conns_.size()); }
  int logins() const { return logins_; }
  int active_subscriptions() const;
  int frames_received(std::string_view action) const;

 private:
  struct Subscription {
    std::string measurement_id;
    std::string request_id;  // results are pushed on this id
  };
  struct Conn {
    int frames = 0;
    std::optional<std::string> token;  // set once logged in
    std::vector<Subscription> subscriptions;
  };
  struct Measurement {
    std::string owner_token;
    bool started = false;  // a FIRST was accepted
    bool closed = false;   // a LAST was accepted
    uint32_t next_order = 0;
    int64_t data_ms = 0;   // data accepted since the last FIRST
  };
  struct RateEntry {
    DfxClock::time_point at;
    int duration_ms;
  };
  struct Request;  // a parsed client frame

  std::string NewId();
  std::vector<DfxAction> Handle(uint64_t conn, Conn& c, const Request& req,
                                DfxClock::time_point now);
  std::vector<DfxAction> Login(uint64_t conn, Conn& c, const Request& req);
  std::vector<DfxAction> CreateMeasurement(uint64_t conn, Conn& c, const Request& req);
  std::vector<DfxAction> Subscribe(uint64_t conn, Conn& c, const Request& req);
  std::vector<DfxAction> AddData(uint64_t conn, Conn& c, const Request& req,
                                 DfxClock::time_point now);
  bool TokenAccepted(const std::string& token) const;
  DfxAction Answer(uint64_t conn, std::string_view request_id, int status,
                   std::string_view json) const;
  DfxAction Error(uint64_t conn, std::string_view request_id, int status,
                  std::string_view code, std::string_view message) const;

  DfxProtocolOptions options_;
  uint64_t id_state_;
  int drop_after_frames_ = -1;
  bool refuse_login_ = false;
  std::chrono::milliseconds answer_delay_{0};
  std::chrono::milliseconds result_delay_{0};

  std::map<uint64_t, Conn> conns_;
  std::map<std::string, Measurement> measurements_;
  std::map<std::string, std::vector<RateEntry>> rate_by_token_;
  std::vector<DfxChunkRecord> chunks_;
  std::map<std::string, int, std::less<>> frames_by_action_;
  int logins_ = 0;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_DFX_PROTOCOL_H_
