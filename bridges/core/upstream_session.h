// UpstreamSession: one upstream WebSocket session of any bridge, as an actor on its own
// strand (shared with its Connection). A bridge supplies a Protocol object (how to open,
// log in, encode and decode); the session owns everything the four protocols share:
//
//  - the login gate (send a login frame and wait, wait for a server hello, or none), its
//    timeout, and what a refused credential does (callers fail with UNAUTHENTICATED at
//    once; the connection retries on its own with the slow auth backoff, re-reading the
//    credential, so a fixed secret brings the session back without a call);
//  - requests with deadlines, answered by one reply or a stream of replies until a final
//    one, matched by route (a request id) or in send order (route ""); a bound on the
//    requests waiting while the upstream is away; what a drop does to a request in flight
//    (fail OUTCOME_UNKNOWN, or resend when the protocol deduplicates);
//  - an optional send gate (real-time pacing) that gated requests pass in order, and
//    resends the upstream asks for (retry-after answers);
//  - subscriptions shared by many sinks, acknowledged within a deadline, restored after a
//    reconnect with a gap mark, released upstream when the last sink leaves;
//  - protocol heartbeats, admin description, metrics, orderly close.
//
// Threading: the public methods may be called from any thread (they post to the strand);
// Protocol, SendGate and every callback run on the strand and must not block.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/connection.h"
#include "bridges/core/inplace_function.h"
#include "bridges/core/metrics.h"
#include "wsbridge/admin/v1/admin.pb.h"

namespace wsbridge::core {

class SecretSource;

using Clock = std::chrono::steady_clock;

// A decoded protocol message (a reply, an event, subscription parameters). Each bridge
// derives its own types; whoever receives one knows which type its protocol produces.
struct Payload {
  virtual ~Payload() = default;
};
using PayloadPtr = std::shared_ptr<const Payload>;
// A payload with one owner so far (a decoded frame, a reply): the one it goes to may take
// its parts (e.g. move a body out) instead of copying them.
using OwnedPayloadPtr = std::shared_ptr<Payload>;

// A frame to send.
struct Outbound {
  std::string frame;
  bool binary = false;
};

// One inbound frame, decoded once by Protocol::Decode.
struct Inbound {
  enum class Kind {
    kReply,      // answers the request (or subscription) with this route
    kEvent,      // an event of the subscription whose events carry this route
    kLogin,      // answers the login; `status` says whether it succeeded
    kHeartbeat,  // a pong or keepalive; nothing to route
    kIgnore,     // understood, nothing to do
    kMalformed,  // not understood; `status` says why (counted and logged, never fatal)
  };
  Kind kind = Kind::kIgnore;
  // kReply: the request id ("" = the oldest request in flight that was sent without a
  // route: protocols that answer in send order). kEvent: the subscription's event route.
  std::string route;
  // kReply/kLogin: the upstream's verdict (non-OK: an error answer, already mapped to a
  // status with ErrorInfo). kMalformed: why it was not understood.
  absl::Status status;
  // kReply: no further reply follows for this request.
  bool final = true;
  // kReply: an acknowledgement that carries no payload of its own.
  bool bare = false;
  // kReply answering a subscribe: the route its events will carry ("" = `route` itself).
  std::string event_route;
  // kReply: the upstream asks for the same request again after this pause (e.g. a rate
  // limit); honoured RequestOptions::max_retries times, then delivered as `status`.
  std::optional<Duration> retry_after;
  OwnedPayloadPtr payload;
};

// How a session logs in once the WebSocket is open.
struct LoginPlan {
  std::vector<Outbound> frames;  // sent first, before anything else
  bool wait = false;             // wait for a kLogin inbound; false: usable at once
};

// Real-time pacing of gated requests (e.g. DFX measurement data). Gated requests leave in
// the order they came; each carries a cost (e.g. milliseconds of data).
class SendGate {
 public:
  virtual ~SendGate() = default;
  // When a request of `cost` may be sent: `now` or later, or nullopt while it must wait
  // for an answer to one in flight.
  virtual std::optional<Clock::time_point> When(uint64_t cost, Clock::time_point now) = 0;
  virtual void Sent(uint64_t id, uint64_t cost, Clock::time_point now) = 0;
  // The upstream answered: `accepted` = it counts against the rate (a refusal does not).
  virtual void Answered(uint64_t id, bool accepted, Clock::time_point now) = 0;
  // Dropped after it was sent without an answer (connection lost, deadline, cancel): it
  // may have counted upstream.
  virtual void Abandoned(uint64_t id, Clock::time_point now) = 0;
};

// What a bridge tells the session about its protocol. One instance per session, used on
// the session's strand only, so it may keep per-connection state.
class Protocol {
 public:
  virtual ~Protocol() = default;
  // Before each connection attempt: URL, headers, subprotocols. Credentials are read here
  // (from a SecretSource: never blocking I/O), so rotated ones take effect.
  virtual absl::StatusOr<HandshakeRequest> PrepareHandshake() = 0;
  // The WebSocket is open: how to log in. An error drops the connection and retries.
  virtual absl::StatusOr<LoginPlan> OnOpen(std::string_view subprotocol) = 0;
  virtual Inbound Decode(std::string_view frame, bool binary) = 0;
  // A new request id for a request with this hint ("" for protocols answering in send
  // order). The session asks again if it clashes with an open route.
  virtual std::string NewRoute(std::string_view hint) = 0;
  // The frame subscribing to `key`. An empty frame: nothing is sent upstream and the
  // subscription is active as soon as the session is ready, with `key` as its event route.
  virtual absl::StatusOr<Outbound> EncodeSubscribe(const std::string& key,
                                                   const PayloadPtr& params,
                                                   std::string_view route) {
    (void)key, (void)params, (void)route;
    return absl::UnimplementedError("this upstream has no subscriptions");
  }
  // The hint for a subscribe request's route.
  virtual std::string_view SubscribeHint() const { return ""; }
  // The frame releasing an acknowledged subscription, or nullopt when the protocol has
  // none (its events are then dropped and counted as unrouted).
  virtual std::optional<Outbound> EncodeUnsubscribe(const std::string& key,
                                                    std::string_view event_route,
                                                    std::string_view route) {
    (void)key, (void)event_route, (void)route;
    return std::nullopt;
  }
  virtual std::string_view UnsubscribeHint() const { return ""; }
  // The protocol's own heartbeat, sent every KeepaliveOptions::heartbeat_interval.
  virtual std::optional<Outbound> Heartbeat() { return std::nullopt; }
  // Asked before each heartbeat: an error (e.g. the protocol's own ping went unanswered)
  // means the upstream looks dead; the connection is dropped and reconnected.
  virtual absl::Status CheckAlive() { return absl::OkStatus(); }
  // Protocol-specific close codes (see ConnectionHandler::Classify).
  virtual DisconnectKind Classify(const DisconnectInfo& info) {
    return ClassifyDisconnect(info.http_status, info.close_code,
                              info.retry_after > Duration::zero());
  }
  // The pacing gate, or null.
  virtual SendGate* gate() { return nullptr; }
};

// One answer to a request: a final reply or one of a stream of replies.
struct Reply {
  OwnedPayloadPtr payload;  // the callback's own: it may move parts out
  bool final = true;
};

// What becomes of a request in flight when the connection drops.
enum class OnDrop {
  kFailOutcomeUnknown,  // UNAVAILABLE with ErrorInfo OUTCOME_UNKNOWN; never resent
  kResend,              // sent again on the next connection (the protocol deduplicates)
};

struct Request {
  // Encodes the frame for `route` (on the strand, each time it is sent). Captures of up
  // to 64 bytes (e.g. two strings) are held without a heap allocation.
  InplaceFunction<absl::StatusOr<Outbound>(std::string_view route), 64> encode;
  std::string hint;  // for Protocol::NewRoute (e.g. an action id)
  std::string what;  // for messages: "the request (action 0504)"
  // The caller's deadline for the whole request (waiting and in flight); the session
  // also bounds it by its request_timeout from when it was queued and from when sent.
  Clock::time_point deadline = Clock::time_point::max();
  OnDrop on_drop = OnDrop::kFailOutcomeUnknown;
  bool gated = false;     // passes Protocol::gate(), in order with other gated ones
  uint64_t gate_cost = 0;
  int max_retries = 0;    // retry_after answers honoured
};

// Called on the strand: each reply, then (for streams) more until a final one or an
// error. Exactly one final call unless cancelled. Captures of up to 48 bytes are held
// without a heap allocation.
using ReplyCallback = InplaceFunction<void(absl::StatusOr<Reply>), 48>;

struct SubscribedInfo {
  // The upstream subscription was restored after a reconnect: events between gap_from
  // (when it was lost) and gap_to (when it was restored) may be missing.
  bool restored = false;
  std::chrono::system_clock::time_point gap_from, gap_to;
};

// A subscriber. Called on the strand; must queue and return.
class EventSink {
 public:
  virtual ~EventSink() = default;
  // Active upstream (again, after a restore). Called once per (re)subscription.
  virtual void OnSubscribed(const SubscribedInfo& info) = 0;
  // `after_gap`: the first event after a restore.
  virtual void OnEvent(const PayloadPtr& event, bool after_gap) = 0;
  // The subscription ended (upstream error, ack timeout, session closed). Nothing follows.
  virtual void OnEnded(const absl::Status& status) = 0;
};

// What a session keeps of its options (all but the connection's, which it shares).
// Sessions whose settings are equal but for `id` share one copy (most of a bridge's
// sessions): a session keeps only its id of its own.
struct SessionSettings {
  std::string bridge;       // bridge instance name
  std::string id;           // "<bridge>/<key prefix>"; admin and logs
  std::string upstream;     // "DFX", for messages
  std::string error_domain; // ErrorInfo domain of this bridge
  // Bound on an answer once sent, and on the wait for the session to be usable.
  Duration request_timeout = std::chrono::seconds(30);
  // Bound on the login answer (or the server's hello).
  Duration login_timeout = std::chrono::seconds(30);
  // Bound on a subscription's acknowledgement.
  Duration subscribe_timeout = std::chrono::seconds(30);
  // Requests waiting (not yet sent) beyond which new ones fail RESOURCE_EXHAUSTED.
  size_t max_pending = 4096;
  Counter* malformed_frames = nullptr;
  Counter* unrouted_frames = nullptr;
  Histogram* rtt = nullptr;
  // Called (on the strand) when ready() changes. Shared, so that settings with the same
  // callback compare equal (and are shared).
  std::shared_ptr<const std::function<void()>> health_changed;

  // Equal but for `id`. (A new field must be compared here: see the size check below.)
  bool SameAs(const SessionSettings& o) const {
    return bridge == o.bridge && upstream == o.upstream && error_domain == o.error_domain &&
           request_timeout == o.request_timeout && login_timeout == o.login_timeout &&
           subscribe_timeout == o.subscribe_timeout && max_pending == o.max_pending &&
           malformed_frames == o.malformed_frames && unrouted_frames == o.unrouted_frames &&
           rtt == o.rtt && health_changed == o.health_changed;
  }
};
static_assert(sizeof(void*) != 8 || sizeof(SessionSettings) == 4 * sizeof(std::string) + 3 * sizeof(Duration) +
                                                                   sizeof(size_t) + 3 * sizeof(void*) +
                                                                   sizeof(std::shared_ptr<int>),
              "SessionSettings changed: compare the new field in SameAs");

struct SessionOptions : SessionSettings {
  // The connection's options; its name defaults to `id`.
  ConnectionOptions connection;
  // When set, used instead of `connection`: one copy shared by every session of a bridge
  // (BridgeBase::BaseSessionOptions), the connection named `id`.
  std::shared_ptr<const ConnectionOptions> shared_connection;
};

class UpstreamSession {
 public:
  static std::shared_ptr<UpstreamSession> Create(boost::asio::any_io_executor executor,
                                                 SessionOptions options,
                                                 std::unique_ptr<Protocol> protocol);
  virtual ~UpstreamSession() = default;

  // --- Any thread. ---
  // Connects now rather than on first use.
  virtual void Start() = 0;
  // Sends `request` once the session is usable; `done` runs on the strand. Returns an id
  // for Cancel().
  virtual uint64_t Send(Request request, ReplyCallback done) = 0;
  // Drops a request; its callback is not called again.
  virtual void Cancel(uint64_t id) = 0;
  // Adds a sink to the subscription `key` (every sink of a key shares one upstream
  // subscription; `params` are used when the first one creates it). Returns the sink id.
  virtual uint64_t Subscribe(std::string key, PayloadPtr params,
                             std::shared_ptr<EventSink> sink) = 0;
  virtual void Unsubscribe(std::string key, uint64_t sink_id) = 0;
  // Ends everything with UNAVAILABLE and closes with `code`; `done` (any thread) once
  // closed. Idempotent.
  virtual void Close(uint16_t code, std::string reason, std::function<void()> done) = 0;

  virtual const std::string& id() const = 0;
  virtual bool ready() const = 0;
  // The upstream refused the credential and has not accepted it since.
  virtual bool auth_refused() const = 0;
  // What callers were told when the upstream refused the credential (OK when it was not).
  virtual absl::Status AuthRefusal() const = 0;
  // UNAVAILABLE ("the X upstream has been unreachable since <UTC> (<n> s): <last error>")
  // once a connection attempt has failed and none has succeeded since; OK otherwise.
  // A session's very first connect, and the one reconnect right after a ready connection
  // dropped, are not "unreachable": calls arriving then wait (bounded by max_pending and
  // request_timeout). Callers use it to fail fast instead of queueing during an outage.
  virtual absl::Status Unreachable() const = 0;
  virtual admin::v1::Session Describe() const = 0;

  // Held by SessionPool: calls holding the session, and when the last one left.
  std::atomic<int> leases{0};
  std::atomic<int64_t> idle_since_ns{0};
  // The default credential's session: SessionPool sets `tracked_credential` (the
  // SecretSource the protocol logs in with) before the session is used, and the session
  // stores that source's version as each connection attempt begins (before the protocol
  // reads the value, so the value used is at least that new). A rotation that finds the
  // session already attempting with the new value keeps it as the new value's session
  // instead of replacing it with a second login (SessionPool::DefaultKey).
  std::shared_ptr<const SecretSource> tracked_credential;
  std::atomic<uint64_t> attempt_credential_version{0};
};

}  // namespace wsbridge::core
