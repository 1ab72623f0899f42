// The NLX WebSocket API as the emulator serves it: a pure, clock-injected state machine.
// Upgrades, frames and closes go in with the time they happened; what the server does
// in answer (send, close, drop, each maybe delayed) comes out. No sockets, no threads,
// no clocks of its own, so every rule is unit-testable.
//
// It is written from NLX's WebSocket page and its public SDK only and must never share
// code with the bridge's codec: it is the independent check of it.
//
// Not thread-safe: NlxEmulator serializes calls.
//
// Where the page is silent, the emulator does what the real service most plausibly does
// (NLX's endpoint is an AWS API Gateway WebSocket API: "the server identifies
// disconnected sessions using the connectionId internal header"):
// - Upgrade: any path. apiKey, deploymentKey and channelKey (with its language suffix)
//   must be present and equal the configured ones: otherwise 401 with
//   {"message":"Unauthorized: <which key> is missing|not valid"} (a key's value is never
//   echoed). Query values are percent-decoded ('+' stays '+'); when a parameter repeats,
//   the last one counts (as API Gateway's queryStringParameters). Other parameters (e.g.
//   the SDK's languageCode) are ignored. A conversationId that is not 1-128 printable
//   ASCII characters: 400.
// - Conversations: without conversationId a new id (a UUID) is issued. With one, a
//   known conversation is resumed (its turn count goes on); an UNKNOWN id starts a new
//   conversation under that id, because NLX's own SDK makes up the id of a new
//   conversation itself (uuid()) and passes it on the first connect. A conversation may
//   have several sockets; a turn's response goes to the socket it came on, pushes go to
//   every socket of the conversation. Conversations outlive their sockets.
// - Ack: right after the upgrade, {"conversationId":"<id>"} (after the ack delay, or
//   never while the ack is withheld). Frames that arrive before the ack was due are
//   still answered, but counted (frames_before_ack): a client must wait for the ack.
// - Turns: a text frame holding a JSON object with request.unstructured.text (a
//   non-empty string) or request.structured (an object). conversationId in the body,
//   when present, must be the socket's. Anything else is answered with API Gateway's
//   error shape {"message":"Invalid request body: <why>","connectionId":"..",
//   "requestId":".."} and is not a turn. Binary frames are refused the same way.
// - Responses are deterministic (turn numbers count per conversation, from 1):
//     {"conversationId", "messages":[{"messageId","text","type":"text",...}],
//      "metadata":{"intentId","escalation","frustration","incomprehension",
//                  "uploadUrls":[],"hasPendingDataRequest":false},
//      "expirationTimestamp": 1767225600000 + turn * 60000,
//      "emulator":{"turn":n,"userId":..,"languageCode":..,"context":..}}   (unmodelled)
//   The first word of a text turn (case-insensitive) picks the answer:
//     choices  one message with two choices (choicePayload on one) and a nodeId
//     multi    three messages
//     extra    unmodelled fields at every level (top, message, choice, modalities)
//     escalate metadata.escalation = true ("an agent will join")
//     pending  metadata.hasPendingDataRequest = true
//     error    {"message":"Internal server error",...} instead of a response
//     silent   no answer at all
//     anything else: one message `Turn <n>: you said "<text>"`.
//   A structured turn is answered with one message naming what it carried:
//   `You chose <choiceId>.`, `Started flow <intentId|flowId>.`, `Slots: a=1, b="x".`,
//   `Nothing pending.` (poll), joined by spaces. messageIds are UUID-shaped hashes of
//   (conversation, turn, index): the same turn always gets the same ids.
// - Push: a ConversationResponse with one message (type "text", "emulatorPush": true)
//   to every socket of a conversation, at any time (e.g. an agent after escalation).
#ifndef WSBRIDGE_TESTS_UPSTREAMS_NLX_PROTOCOL_H_
#define WSBRIDGE_TESTS_UPSTREAMS_NLX_PROTOCOL_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace wsbridge::emulator {

using NlxClock = std::chrono::steady_clock;

// One thing the server does to one connection.
struct NlxAction {
  enum class Kind {
    kSend,   // send `text` as a text frame
    kClose,  // send a close frame with `close_code` / `close_reason`
    kDrop,   // drop the TCP connection abruptly, no close frame
  };
  uint64_t conn = 0;
  Kind kind = Kind::kSend;
  std::string text;
  uint16_t close_code = 0;
  std::string close_reason;
  // Perform it this long after the event that caused it.
  std::chrono::milliseconds delay{0};
};

struct NlxProtocolOptions {
  // The accepted keys (compared exactly; channel_key with its language suffix).
  std::string api_key = "nlx-emulator-api-key";
  std::string deployment_key = "nlx-emulator-deployment";
  std::string channel_key = "nlx-emulator-channel-en-US";
  // Seeds issued conversation ids, connection ids and request ids.
  uint64_t id_seed = 0x6e6c78;
};

// What to do with one upgrade request.
struct NlxUpgrade {
  int http_status = 101;  // 101 = accept; else refuse with this status and `body`
  std::string body;
};

// A turn as received.
struct NlxTurnRecord {
  uint64_t conn = 0;
  int number = 0;    // per conversation, from 1
  std::string json;  // the frame as received
  NlxClock::time_point received;
};

class NlxProtocol {
 public:
  explicit NlxProtocol(NlxProtocolOptions options);

  // An upgrade request for `target` (path?query as sent). Counts a handshake; creates
  // nothing (that happens in OnOpen).
  NlxUpgrade CheckUpgrade(std::string_view target);
  // The socket accepted for `target` is open: the conversation is created or resumed
  // and the ack is due (returned, maybe delayed; nothing while the ack is withheld).
  std::vector<NlxAction> OnOpen(uint64_t conn, std::string_view target, NlxClock::time_point now);
  // One data frame from `conn`.
  std::vector<NlxAction> OnFrame(uint64_t conn, std::string_view frame, bool binary,
                                 NlxClock::time_point now);
  // The connection is gone (its conversation stays).
  void OnClose(uint64_t conn);

  // Unsolicited response with one message `text` to every socket of the conversation;
  // empty when it has none.
  std::vector<NlxAction> Push(std::string_view conversation_id, std::string_view text);
  // A raw text frame to every socket of the conversation ("" = every open socket).
  std::vector<NlxAction> PushRaw(std::string_view conversation_id, const std::string& text) const;
  // Drops (no close frame) every socket of the conversation ("" = every open socket).
  std::vector<NlxAction> Drop(std::string_view conversation_id) const;
  // Closes every socket of the conversation ("" = every open socket) with a close frame,
  // e.g. 1001 "Going away" as API Gateway does at a socket's 2-hour limit.
  std::vector<NlxAction> Close(std::string_view conversation_id, uint16_t code,
                               const std::string& reason) const;

  // Fault switches; they apply to events from now on.
  // Refuse every upgrade with this HTTP status (e.g. 503, 429, 403); 0 = off.
  void SetRefuseUpgrades(int http_status) { refuse_status_ = http_status; }
  void SetAckDelay(std::chrono::milliseconds d) { ack_delay_ = d; }
  // Never send the ack on sockets opened from now on.
  void SetWithholdAck(bool withhold) { withhold_ack_ = withhold; }
  void SetAnswerDelay(std::chrono::milliseconds d) { answer_delay_ = d; }
  // The next `n` turns (any socket) are received and counted, then their socket is
  // dropped before any answer: the client cannot know whether they ran.
  void DropNextTurns(int n) { drop_next_turns_ = n; }
  // The API key upgrades must carry from now on (a key rotated on NLX's side); open
  // sockets are not touched (close them with Close(.., 1008, ..) to model a revocation).
  void SetApiKey(std::string key) { options_.api_key = std::move(key); }

  // Observations.
  int handshakes() const { return handshakes_; }
  int refused_handshakes() const { return refused_handshakes_; }
  int open_connections() const { return static_cast<int>(conns_.size()); }
  int connections_for(std::string_view conversation_id) const;
  int conversations() const { return static_cast<int>(conversations_.size()); }
  bool knows(std::string_view conversation_id) const;
  // The conversation of an open connection ("" when unknown).
  std::string conversation_of(uint64_t conn) const;
  // Turns received on the conversation, in order (dropped ones included).
  std::vector<NlxTurnRecord> turns(std::string_view conversation_id) const;
  int turns_received(std::string_view conversation_id) const;
  // Drops the records of the conversation's turns, keeping their count and numbering
  // (long runs, which need only turns_received).
  void ForgetTurns(std::string_view conversation_id);
  int total_turns() const { return total_turns_; }
  int invalid_frames() const { return invalid_frames_; }
  int frames_before_ack() const { return frames_before_ack_; }
  // Conversations in the order they were created.
  std::vector<std::string> conversation_ids() const { return conversation_order_; }

 private:
  struct Conn {
    std::string conversation_id;
    std::string connection_id;  // API Gateway's connectionId (for error frames)
    NlxClock::time_point ack_due;
    bool ack_withheld = false;
  };
  struct Conversation {
    std::set<uint64_t> conns;
    std::vector<NlxTurnRecord> turns;
    int forgotten = 0;  // turns whose records ForgetTurns dropped
    int pushes = 0;
  };

  std::string NewUuid();
  std::string NewToken();
  NlxAction Send(uint64_t conn, std::string text, std::chrono::milliseconds delay) const;
  NlxAction InvalidBody(uint64_t conn, const Conn& c, std::string_view why);
  std::vector<NlxAction> ForEach(std::string_view conversation_id,
                                 const std::function<NlxAction(uint64_t)>& make) const;

  NlxProtocolOptions options_;
  uint64_t id_state_;
  int refuse_status_ = 0;
  bool withhold_ack_ = false;
  std::chrono::milliseconds ack_delay_{0};
  std::chrono::milliseconds answer_delay_{0};
  int drop_next_turns_ = 0;

  std::map<uint64_t, Conn> conns_;
  std::map<std::string, Conversation, std::less<>> conversations_;
  std::vector<std::string> conversation_order_;
  int handshakes_ = 0;
  int refused_handshakes_ = 0;
  int total_turns_ = 0;
  int invalid_frames_ = 0;
  int frames_before_ack_ = 0;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_NLX_PROTOCOL_H_
