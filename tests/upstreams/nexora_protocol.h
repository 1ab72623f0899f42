// The Nexora agent-chat API as the emulator serves it: a pure, clock-injected state
// machine. Upgrade requests, HTTP requests and socket frames go in with the time they
// arrived; what the server does in answer (send, close, drop, each maybe delayed) comes
// out. No sockets, no threads, no clocks of its own, so every rule is unit-testable.
//
// It is written from Nexora's API page only and never shares code with the bridge's
// codec: it is the independent check of it.
//
// Not thread-safe: NexoraEmulator serializes calls.
//
// Where the page leaves a choice, the emulator does what such a service most plausibly
// does (a client, and the bridge, must cope with exactly this):
// - Socket: GET /api/ws/{chat_id}?token=<token> (token percent-decoded). A missing,
//   unknown or expired token refuses the upgrade with 401 (the body says which); a
//   path that is not /api/ws/<one segment> with 404; with known_chats_only, a chat
//   not created through POST /api/chats with 404. The token is checked at the upgrade
//   only: a JWT expiring while its socket is open does not close it.
// - Tokens: API keys start with "nxr_" (the configured ones; none configured = any
//   "nxr_" key not starting "nxr_bad"); anything else must be a JWT this emulator
//   issued and that has not expired (jwt_lifetime after the login).
// - POST /api/auth/login {"email","password"} -> 200 {"access_token": JWT,
//   "token_type":"bearer","expires_in": seconds}; wrong credentials 401
//   {"detail":"Incorrect email or password"}; a body without both strings 422.
// - POST /api/chats {"agent_id"} with "Authorization: Bearer <API key or JWT>" -> 201
//   {"id": uuid, "agent_id", "title": null}; no/invalid/expired token 401; no agent_id
//   422; an agent not configured (when agents are configured) 404. Errors are FastAPI
//   style {"detail": "..."}. Other paths 404, other methods 405.
// - Messages of one chat are answered one after another: an answer starts when the
//   previous answer on the chat ended (queued, in arrival order, across sockets). The
//   events of an answer go to the socket that sent the message.
// - An answer: the script's events (chunk and done carry the answer's message_id,
//   placeholders {{content}}, {{task_id}}, {{client_message_id}} filled in), each
//   step_delay (or its own delay) after the previous one, then {"type":"done"}.
// - Dedup, per chat, by client_message_id: a message whose answer completed (done), or
//   is still in progress, is answered at once with {"type":"duplicate",
//   "client_message_id", "message_id"} and nothing else; the answer in progress keeps
//   streaming to the socket that sent it first. An answer that ended with an error is
//   not saved: the id may be sent again and is answered afresh. An answer interrupted
//   because its socket closed (client close, drop) is abandoned and not saved, so a
//   resend after a reconnect gets a fresh, whole answer; SetFinishAfterDrop(true)
//   switches to "generation continues server-side and is saved", so a resend gets
//   duplicate. A message without client_message_id is answered without dedup.
// - {"type":"ping"} -> {"type":"pong"} at once (unless SetAnswerPings(false)).
// - Malformed client frames (not a JSON object, no string type, a message without a
//   non-empty string content, a non-string client_message_id) -> {"type":"error",
//   "code":"invalid_message","message":...}; an unknown client type -> error
//   "unknown_message_type". The socket stays open.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_NEXORA_PROTOCOL_H_
#define WSBRIDGE_TESTS_UPSTREAMS_NEXORA_PROTOCOL_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace wsbridge::emulator {

using NexoraClock = std::chrono::steady_clock;

// One thing the server does to one socket.
struct NexoraAction {
  enum class Kind {
    kSend,   // send `text` as a text frame
    kClose,  // close handshake with `close_code` / `close_reason`
    kDrop,   // drop the TCP connection abruptly, no close frame
  };
  uint64_t conn = 0;
  Kind kind = Kind::kSend;
  std::string text;
  uint16_t close_code = 0;
  std::string close_reason;
  // Perform it this long after the frame that caused it was received.
  std::chrono::milliseconds delay{0};
};

// One event of a scripted answer: a JSON object with a "type" (any type, unknown ones
// included), sent `delay` after the previous event (-1 = the protocol's step_delay).
struct NexoraScriptStep {
  std::string event_json;
  std::chrono::milliseconds delay{-1};
};

// chunk, tool_call, tool_result, sub_agent_start, sub_agent_complete, two more chunks
// (the second echoes the message content).
std::vector<NexoraScriptStep> NexoraDefaultScript();

struct NexoraProtocolOptions {
  // Accepted API keys; empty = any key starting "nxr_" but not "nxr_bad".
  std::vector<std::string> api_keys;
  // Accounts for POST /api/auth/login: email -> password.
  std::map<std::string, std::string> users;
  // Accepted agent ids for POST /api/chats; empty = any non-empty id.
  std::vector<std::string> agents;
  // JWTs issued by the login expire this long after it.
  std::chrono::milliseconds jwt_lifetime{std::chrono::minutes(15)};
  // Pause between the events of an answer (steps without their own delay, and done).
  std::chrono::milliseconds step_delay{2};
  // Refuse sockets for chats not created through POST /api/chats (404).
  bool known_chats_only = false;
  // Seeds generated ids (message, chat, task ids, JWT signatures).
  uint64_t id_seed = 0x6e78;
};

// The outcome of an upgrade request: 101 (accepted) or the refusal's HTTP status.
struct NexoraUpgrade {
  int status = 101;
  std::string chat_id;  // when accepted
  std::string message;  // why refused
  int retry_after_s = 0;  // a refusal's Retry-After header (0 = none)
};

struct NexoraHttpAnswer {
  int status = 200;
  std::string body;  // JSON
};

class NexoraProtocol {
 public:
  explicit NexoraProtocol(NexoraProtocolOptions options);

  // The chat id of a socket target "/api/ws/{chat_id}?...", percent-decoded; "" when
  // the target is not one.
  static std::string SocketChatId(std::string_view target);
  // The upgrade request's target (path?query).
  NexoraUpgrade OnUpgrade(std::string_view target, NexoraClock::time_point now);
  // A socket accepted by OnUpgrade opened.
  void OnOpen(uint64_t conn, std::string_view chat_id);
  // One text frame from `conn`.
  std::vector<NexoraAction> OnFrame(uint64_t conn, std::string_view frame,
                                    NexoraClock::time_point now);
  // The socket is gone (either side); its answers in progress are interrupted.
  void OnClose(uint64_t conn, NexoraClock::time_point now);
  // A plain HTTP request. `unix_now_s` only fills the JWT's iat/exp claims.
  NexoraHttpAnswer OnHttp(std::string_view method, std::string_view target,
                          std::string_view authorization, std::string_view body,
                          NexoraClock::time_point now, int64_t unix_now_s);

  // Fault switches and scripts; they apply to answers started from now on.
  void SetScript(std::vector<NexoraScriptStep> steps) { script_ = std::move(steps); }
  // The next `count` answers (-1: all until cleared) send {"type":"error", code,
  // message} after `after_steps` script events instead of the rest and done.
  void InjectError(std::string code, std::string message, int after_steps, int count);
  // The next `count` answers (-1: all until cleared) drop their socket after
  // `after_steps` script events (no close frame).
  void DropMidAnswer(int after_steps, int count);
  void ClearFaults();
  void SetAnswerPings(bool answer) { answer_pings_ = answer; }
  void SetFinishAfterDrop(bool finish) { finish_after_drop_ = finish; }
  void SetJwtLifetime(std::chrono::milliseconds d) { options_.jwt_lifetime = d; }
  // The accepted API keys from now on (empty = any "nxr_" key but "nxr_bad..."): a
  // rotation. Open sockets stay open (the token is checked at the upgrade only).
  void SetApiKeys(std::vector<std::string> keys) { options_.api_keys = std::move(keys); }
  // The next `count` upgrade requests (-1: all until cleared by count 0) are refused with
  // HTTP `status` and `message` (and Retry-After when `retry_after_s` > 0) before any
  // other check: an overloaded or failing gateway in front of the service.
  void RefuseUpgrades(int status, std::string message, int count, int retry_after_s = 0);
  void SetStepDelay(std::chrono::milliseconds d) { options_.step_delay = d; }
  // Drop every open socket (of one chat, or all when `chat_id` is empty).
  std::vector<NexoraAction> DropSockets(std::string_view chat_id) const;
  // A raw text frame to every open socket of a chat (all when empty).
  std::vector<NexoraAction> Broadcast(std::string_view chat_id, std::string text) const;
  // Close every open socket of a chat (all when empty) with a close frame: `code` 1001
  // (going away: a restart), 1008 (policy violation: a revoked token), 1011 (internal
  // error). Their answers in progress are interrupted as on a drop.
  std::vector<NexoraAction> CloseSockets(std::string_view chat_id, uint16_t code,
                                         std::string reason) const;

  // Observations.
  // "message" frames received with this client_message_id (all chats).
  int messages_received(std::string_view client_message_id) const;
  // client_message_ids of received messages, in arrival order ("" for none).
  const std::vector<std::string>& received_ids() const { return received_ids_; }
  int answers_started() const { return answers_started_; }  // duplicates excluded
  int duplicates_sent() const { return duplicates_sent_; }
  int logins() const { return logins_; }                    // successful
  int refused_logins() const { return refused_logins_; }
  int refused_upgrades() const { return refused_upgrades_; }
  int upgrades() const { return upgrades_; }  // upgrade requests, accepted or refused
  int chats_created() const { return chats_created_; }
  int pings() const { return pings_; }
  int open_sockets(std::string_view chat_id) const;
  int open_sockets() const { return static_cast<int>(conns_.size()); }
  // Chats with at least one open socket.
  int chats_with_sockets() const;

 private:
  enum class Outcome { kDone, kError, kDropped };
  struct Answer {
    std::string client_message_id;
    std::string message_id;
    uint64_t conn = 0;
    NexoraClock::time_point ends_at;
    Outcome outcome = Outcome::kDone;
  };
  struct Chat {
    std::vector<Answer> answers;  // in start order
  };
  struct Issued {
    NexoraClock::time_point expires_at;
  };
  struct Fault {
    int after_steps = 0;
    int count = 0;  // remaining; -1 = unlimited
    bool Take();
  };

  std::string NewUuid();
  std::string NewJwt(const std::string& email, int64_t unix_now_s);
  // "" when `token` is accepted at `now`, else why not.
  std::string CheckToken(std::string_view token, NexoraClock::time_point now) const;
  std::vector<NexoraAction> OnMessage(uint64_t conn, const std::string& chat_id,
                                      std::string content, std::string client_message_id,
                                      NexoraClock::time_point now);
  NexoraAction ErrorFrame(uint64_t conn, std::string_view code, std::string_view message) const;
  NexoraHttpAnswer Login(std::string_view body, NexoraClock::time_point now, int64_t unix_now_s);
  NexoraHttpAnswer CreateChat(std::string_view authorization, std::string_view body,
                              NexoraClock::time_point now);

  NexoraProtocolOptions options_;
  uint64_t id_state_;
  std::vector<NexoraScriptStep> script_;
  Fault error_fault_;
  std::string error_code_, error_message_;
  Fault drop_fault_;
  Fault upgrade_fault_;
  NexoraUpgrade upgrade_refusal_;
  bool answer_pings_ = true;
  bool finish_after_drop_ = false;

  std::map<uint64_t, std::string> conns_;  // open socket -> chat id
  std::map<std::string, Chat, std::less<>> chats_;
  std::set<std::string, std::less<>> created_chats_;
  std::map<std::string, Issued, std::less<>> jwts_;
  std::map<std::string, int, std::less<>> received_by_id_;
  std::vector<std::string> received_ids_;
  int answers_started_ = 0;
  int duplicates_sent_ = 0;
  int logins_ = 0;
  int refused_logins_ = 0;
  int refused_upgrades_ = 0;
  int upgrades_ = 0;
  int chats_created_ = 0;
  int pings_ = 0;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_NEXORA_PROTOCOL_H_
