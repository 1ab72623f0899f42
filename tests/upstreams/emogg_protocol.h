// The Emogg WebSocket API as the emulator serves it: a pure, clock-injected state
// machine. Frames go in with the time they arrived; what the server does in answer
// (send, close, drop) comes out, and Advance(now) releases what time makes due (delayed
// answers, channel events, idle and auth timeouts). No sockets, no threads, no clocks of
// its own, so every rule is unit-testable.
//
// It is written from Emogg's public pages (docs.emogg.com/docs/api/ws/...) only and never
// shares code with the bridge's codec: it is the independent check of it. It reads JSON
// with Boost.JSON's DOM; the bridge has its own one-pass reader.
//
// Not thread-safe: EmoggEmulator serializes calls.
//
// What the pages say, as served here:
// - The first message must be `auth:token` with body {"token"}; anything else first
//   terminates the connection (dropped, no answer). A missing or refused token: 401
//   {"error":true,...,"data":{"message":"Invalid token"}} and the connection closes.
//   Success: {"id": <echo>, "path": "auth:token", "status": 200}.
// - Every message must be a JSON object with a string "path", an optional "id" (number,
//   or string of at most 36 characters) and an optional object "body"; otherwise 405 and
//   the connection closes.
// - 401, 405 and 429 close the connection after the answer; 400, 404 and 500 do not.
// - The connection is closed after `idle_timeout` (65 s) in which the server sent
//   nothing to it (answers and events restart the timer).
// - Rate limits: `max_messages` per `rate_window` per user (token) across all its
//   connections (80 per 60 s): the message over the limit is answered 429 and the
//   connection closes. Subscriptions: at most 5 per connection and 10 per user.
// - channels:subscribe {channel, key} answers {"subscriptionId"}; events
//   [SUBSCRIPTION_ID, EVENT_TIMESTAMP, EVENT_TYPE, EVENT_DATA] follow.
//   channels:unsubscribe {subscriptionId}: 200 {} or 404 "Subscription not found".
//   Channels: session_emotions_counts ("sec", key "sessionId:frequency"),
//   session_emotions_intensities ("sei", same key), session_worker_state ("sws", key
//   "sessionId"; the last known state is sent at once on subscribe).
// - ping: 200 {"ts": "<ISO 8601 server time>"}.
//
// Choices where the pages are silent (a client, and the bridge, must cope with these):
// - Closes after 401, 405 and 429 use close code 1008 (policy violation) with the
//   status title as the reason; the idle timeout closes with 1000 "Idle timeout"; a
//   connection not authenticated within `auth_timeout` (10 s) is dropped.
// - Answers to requests without an id carry "id": null; a 405 for a message whose id or
//   path could not be read carries "id": null / "path": null. Ids are echoed with their
//   JSON type (a number stays a number).
// - "id": null in a request is taken as no id. Members other than id/path/body are
//   ignored. Binary frames are read like text frames.
// - A second auth:token on an authenticated connection is checked again (401 closes).
// - Messages over the rate limit are not counted; the auth message counts for its user.
// - A subscribe over the subscription limits answers 400 (the subscribe page lists only
//   200, 400 and 404). An unknown channel or a key not matching the channel's template is
//   400; a session the emulator does not know is 404 "Channel and key combination not
//   found or you do not have permissions for it". With `known_sessions` empty every
//   session id is known except those starting with "unknown".
// - The same channel and key may be subscribed twice on one connection (two ids).
// - Worker states change only when a test calls SetWorkerState; a session's state is
//   "working" until then. Counts/intensities events carry deterministic numbers.
// - Event timestamps are ms since the epoch (numbers) by default, or ISO 8601 strings
//   (the channel pages show both forms).
// - Paths served besides the documented ones, all deterministic: "sessions:get"
//   {sessionId} -> 200 {"id","name","status":"active"}, 400 without sessionId, 404 for
//   an unknown session; "emulator:echo" -> 200 with the request body (or {}) as body;
//   "emulator:fail" -> 500; "emulator:status" {"status": 400..599, "message"} -> that
//   error (401, 405 and 429 close the connection as usual); "emulator:slow" {"ms": N} -> 200 {} after N ms; any other
//   path -> 404 "Path not found".
// - Not emulated: the 90-new-connections-per-minute limit per IP (every test client is
//   127.0.0.1), and WebSocket ping frames restarting the idle timer (the emulator's
//   WebSocket server answers pings but does not report them, so only answers and events
//   keep an emulated connection alive; the bridge's ping requests do).
// - A revoked token (RevokeToken: a token that expired or was withdrawn while in use) is
//   refused from then on, and every connection authenticated with it is told at once:
//   401 {"id": null, "path": "auth:token", ..., "data": {"message": "Token revoked"}}
//   (the page's 401: "the authentication details provided are not valid", which closes
//   the connection) and closed with 1008 "Unauthorized", like any other 401.
// - Close codes on demand (CloseAll, SetCloseAfterAuth) for the close-code scenarios:
//   1001 going away (a server restarting), 1008 policy violation, 1011 internal error;
//   the pages name no close codes, so a client must cope with any of them.
#ifndef WSBRIDGE_TESTS_UPSTREAMS_EMOGG_PROTOCOL_H_
#define WSBRIDGE_TESTS_UPSTREAMS_EMOGG_PROTOCOL_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace wsbridge::emulator {

using EmoggClock = std::chrono::steady_clock;

// The time an input happened: the steady clock for timers, and the wall clock (ms since
// the Unix epoch) for what the server writes into frames.
struct EmoggTime {
  EmoggClock::time_point mono;
  int64_t unix_ms = 0;
};

// One thing the server does to one connection, now.
struct EmoggAction {
  enum class Kind {
    kSend,   // send `text` as a text frame
    kClose,  // close handshake with `close_code` / `close_reason`
    kDrop,   // drop the TCP connection, no close frame
  };
  uint64_t conn = 0;
  Kind kind = Kind::kSend;
  std::string text;
  uint16_t close_code = 0;
  std::string close_reason;
};

struct EmoggProtocolOptions {
  // Accepted tokens; empty = any non-empty token not starting with "bad".
  std::vector<std::string> tokens;
  // Known Emogg session ids; empty = every id not starting with "unknown".
  std::vector<std::string> known_sessions;
  std::chrono::milliseconds idle_timeout{65000};
  std::chrono::milliseconds auth_timeout{10000};
  // Messages per user within any rate_window.
  int max_messages = 80;
  std::chrono::milliseconds rate_window{60000};
  int max_subscriptions_per_connection = 5;
  int max_subscriptions_per_user = 10;
  // Set: every counts/intensities subscription emits at this interval instead of the
  // key's frequency (tests). Zero: events only on EmitNow.
  std::optional<std::chrono::milliseconds> event_interval;
  bool iso_timestamps = false;
  // Seeds generated subscription ids (so two emulators differ).
  uint64_t id_seed = 0x5eed;
};

class EmoggProtocol {
 public:
  explicit EmoggProtocol(EmoggProtocolOptions options);

  void OnOpen(uint64_t conn, EmoggTime now);
  // One WebSocket data frame from `conn`.
  std::vector<EmoggAction> OnFrame(uint64_t conn, std::string_view frame, EmoggTime now);
  // The connection is gone; its subscriptions end.
  void OnClose(uint64_t conn);
  // Releases everything due at `now`: delayed answers, channel events, idle closes,
  // auth timeouts.
  std::vector<EmoggAction> Advance(EmoggTime now);
  // When Advance next has something to do; nullopt when nothing is scheduled.
  std::optional<EmoggClock::time_point> NextWakeup() const;

  // --- Test controls. ---
  // One event now on every subscription of (channel, key); key "" = every key.
  std::vector<EmoggAction> EmitNow(std::string_view channel, std::string_view key, EmoggTime now);
  // A session's worker state; subscribers of session_worker_state get it at once.
  std::vector<EmoggAction> SetWorkerState(std::string_view session_id, std::string_view state,
                                          EmoggTime now);
  // `text` as is to every authenticated connection (malformed frames, events of unknown
  // subscriptions).
  std::vector<EmoggAction> SendRaw(std::string_view text, EmoggTime now);
  // Drops every connection (no close frame).
  std::vector<EmoggAction> DropAll();
  // Closes every open connection with a close frame of `code` and `reason`.
  std::vector<EmoggAction> CloseAll(uint16_t code, std::string_view reason);
  // `token` is refused from now on; the connections authenticated with it get a 401
  // answer and close 1008 "Unauthorized" now.
  std::vector<EmoggAction> RevokeToken(std::string_view token, EmoggTime now);

  // Fault switches; they apply to frames received from now on.
  // Drop the connection when its n-th frame arrives, unanswered; -1 = off.
  void SetDropAfterFrames(int n) { drop_after_frames_ = n; }
  // Answer every auth:token with 401 (and close).
  void SetRefuseAuth(bool refuse) { refuse_auth_ = refuse; }
  // Every successful auth:token is answered 200, then the connection is closed with
  // `code` and `reason` (a server that keeps closing sessions); 0 = off.
  void SetCloseAfterAuth(uint16_t code, std::string reason) {
    close_after_auth_code_ = code;
    close_after_auth_reason_ = std::move(reason);
  }
  // Silent: nothing is answered or emitted (the connection stays open), and no timers
  // fire. The emulator also stops its sockets reading (so WebSocket pings go
  // unanswered).
  void SetSilent(bool silent) { silent_ = silent; }
  void SetAnswerDelay(std::chrono::milliseconds d) { answer_delay_ = d; }
  void SetRateLimit(int max_messages, std::chrono::milliseconds window);
  void SetEventInterval(std::optional<std::chrono::milliseconds> interval);

  // --- Observations. ---
  int open_connections() const { return static_cast<int>(conns_.size()); }
  int authenticated_connections() const;
  int auth_successes() const { return auth_successes_; }
  int auth_failures() const { return auth_failures_; }
  // Connections terminated because their first message was not auth:token.
  int frames_before_auth() const { return frames_before_auth_; }
  int requests(std::string_view path) const;  // messages received per path
  int active_subscriptions() const;
  // Active subscriptions of (channel, key) over all connections.
  int subscriptions_of(std::string_view channel, std::string_view key) const;
  int events_sent() const { return events_sent_; }
  // Close codes the server sent, in order (1008 after 401/405/429, 1000 idle).
  std::vector<int> server_close_codes() const { return server_close_codes_; }
  // Statuses answered, in order (all connections).
  int answers_with_status(int status) const;

 private:
  struct Subscription {
    std::string channel;
    std::string key;
    std::string session_id;
    std::string type;  // "sec" | "sei" | "sws"
    std::chrono::milliseconds period{0};
    EmoggClock::time_point next_event{};
    uint64_t seq = 0;
  };
  struct Conn {
    int frames = 0;
    bool authed = false;
    bool closing = false;  // a close or drop was issued: ignore everything else
    std::string token;
    EmoggClock::time_point opened{};
    EmoggClock::time_point last_sent{};
    std::map<std::string, Subscription> subs;  // by subscription id
  };
  struct Delayed {
    EmoggClock::time_point due;
    uint64_t seq;
    EmoggAction action;
  };
  struct Request;

  std::vector<EmoggAction> Handle(uint64_t conn, Conn& c, const Request& req, EmoggTime now);
  std::vector<EmoggAction> Auth(uint64_t conn, Conn& c, const Request& req, EmoggTime now);
  std::vector<EmoggAction> Subscribe(uint64_t conn, Conn& c, const Request& req, EmoggTime now);
  std::vector<EmoggAction> Unsubscribe(uint64_t conn, Conn& c, const Request& req, EmoggTime now);
  std::vector<EmoggAction> SessionsGet(uint64_t conn, Conn& c, const Request& req, EmoggTime now);

  bool TokenAccepted(std::string_view token) const;
  bool SessionKnown(std::string_view session_id) const;
  bool OverRateLimit(const std::string& token, EmoggClock::time_point now);
  int UserSubscriptions(const std::string& token) const;
  std::string NewSubscriptionId(int64_t unix_ms);
  std::string EventFrame(const std::string& sub_id, Subscription& s, int64_t unix_ms,
                         std::string_view worker_state);

  // Builders; each marks the connection as having been sent to (idle timer).
  EmoggAction Send(uint64_t conn, Conn& c, std::string text, EmoggTime now);
  std::vector<EmoggAction> Answer(uint64_t conn, Conn& c, const Request& req, int status,
                                  std::string body_json, EmoggTime now);
  std::vector<EmoggAction> Error(uint64_t conn, Conn& c, const Request& req, int status,
                                 std::string_view message, EmoggTime now);
  EmoggAction Close(uint64_t conn, Conn& c, uint16_t code, std::string reason);
  EmoggAction Drop(uint64_t conn, Conn& c);

  EmoggProtocolOptions options_;
  uint64_t id_state_;
  int drop_after_frames_ = -1;
  bool refuse_auth_ = false;
  uint16_t close_after_auth_code_ = 0;
  std::string close_after_auth_reason_;
  std::vector<std::string> revoked_;
  bool silent_ = false;
  std::chrono::milliseconds answer_delay_{0};

  std::map<uint64_t, Conn> conns_;
  std::map<std::string, std::deque<EmoggClock::time_point>> rate_by_token_;
  std::map<std::string, std::string, std::less<>> worker_state_;
  std::vector<Delayed> delayed_;  // answers waiting for their due time
  uint64_t delayed_seq_ = 0;

  std::map<std::string, int, std::less<>> requests_by_path_;
  std::map<int, int> answers_by_status_;
  std::vector<int> server_close_codes_;
  int auth_successes_ = 0;
  int auth_failures_ = 0;
  int frames_before_auth_ = 0;
  int events_sent_ = 0;
};

}  // namespace wsbridge::emulator

#endif  // WSBRIDGE_TESTS_UPSTREAMS_EMOGG_PROTOCOL_H_
