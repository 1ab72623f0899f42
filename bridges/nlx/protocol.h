// The NLX conversation socket on the bridge toolkit: one core::UpstreamSession per
// conversation, with this Protocol. Strand-only, like every core::Protocol; Conversation
// and Registry are shared with the calls and are thread-safe.
//
//  - Login gate = the server's hello: nothing is sent on open; the session waits (its
//    login_timeout = ack_timeout) for {"conversationId"}, which the protocol keeps so
//    every reconnect resumes the same conversation.
//  - Replies in send order: one turn in flight per conversation (TurnGate), so the next
//    response or error frame belongs to it. Responses while no turn is in flight are
//    unsolicited pushes: events on kConversationRoute (the conversation's sinks, i.e.
//    Converse calls). A turn abandoned on an open socket (deadline, cancel) leaves the gate shut
//    and CheckAlive replaces the socket: a late answer can never be taken for the next
//    turn's.
//  - The first open of a conversation either reaches the ack or fails (Conversation::
//    OpenFailed: ACK_TIMEOUT, a refused upgrade, a lost socket) and is not retried: the
//    calls waiting on it end with that status. Once acknowledged, drops reconnect with
//    backoff and the same conversationId.
//  - 401/403 at the upgrade: recorded in the Registry for the keys, so every session and
//    call with those keys fails at once for auth_retry_after (no reconnect storm).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"
#include "bridges/nlx/codec.h"

namespace wsbridge::nlx {

// One decoded server frame (responses, errors without a turn, unknown frames).
struct FramePayload final : core::Payload {
  Frame frame;
};

// The subscription key (and event route) of a conversation's sinks: a local subscription,
// nothing is sent upstream. Not "": core routes a send-order reply (route "") to a
// subscription with that event route before the request in flight.
inline constexpr std::string_view kConversationRoute = "conversation";

// The status payload carrying an upstream error frame's JSON (TurnFailed.upstream_json).
inline constexpr std::string_view kUpstreamJsonPayload = "type.wsbridge.dev/nlx.upstream_json";

// Where one socket's three keys come from: the config's secrets or a call's metadata
// (core::SecretSource::Fixed). Read on every connection attempt.
struct KeySources {
  std::shared_ptr<core::SecretSource> api_key, deployment_key, channel_key;
};

// The key under which refusals are remembered: the tenant ("default" or a hash of the
// call's keys) and the secrets' versions, so a rotated secret is tried at once.
std::string RefusalKey(std::string_view tenant, const KeySources& keys);
// The key under which a refusal of one conversation's socket (a 1008 close) is
// remembered: RefusalKey and the conversation id.
std::string ConversationRefusalKey(std::string_view tenant, const KeySources& keys,
                                   std::string_view conversation_id);

// What the calls on a conversation share with its session's protocol. Thread-safe.
class Conversation {
 public:
  // `resume_id`: the id asked for ("" = a new conversation); `pool_key`: its session's.
  explicit Conversation(std::string resume_id, std::string pool_key = "")
      : pool_key_(std::move(pool_key)), id_(std::move(resume_id)) {}

  const std::string& pool_key() const { return pool_key_; }

  // The acknowledged id (or, before the first ack, the id asked for).
  std::string id() const;
  bool acknowledged() const;
  // Why the first open failed (OK while it has not).
  absl::Status open_error() const;
  // `fn` runs (on the session strand) if the first open fails. Returns 0 and does not
  // keep `fn` when the open already succeeded or failed (check open_error()).
  uint64_t WatchOpen(std::function<void(const absl::Status&)> fn);
  void Unwatch(uint64_t id);

  // Why the conversation's last socket (or connection attempt) ended, as the connection
  // put it: "upstream closed the connection (code 1011: ...)", "upstream connection lost:
  // ...". Quoted to the calls whose turn that end left unknown. "" before any end.
  std::string last_disconnect() const;

  // --- The protocol (strand). ---
  void Acknowledged(std::string id);
  void OpenFailed(absl::Status status);
  void Disconnected(std::string why);

 private:
  const std::string pool_key_;
  mutable absl::Mutex mu_;
  std::string id_ ABSL_GUARDED_BY(mu_);
  bool acknowledged_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status open_error_ ABSL_GUARDED_BY(mu_);
  std::string last_disconnect_ ABSL_GUARDED_BY(mu_);
  uint64_t next_watch_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<uint64_t, std::function<void(const absl::Status&)>> watchers_ ABSL_GUARDED_BY(mu_);
};

// Bridge-wide: which pool key holds which conversation, and which keys NLX refused.
// Thread-safe; shared by the bridge and its protocols (so it outlives either).
//
// Pool keys are made here ("%08x" counters), never derived from the conversation id,
// because a new conversation's id is known only after its ack. Once acknowledged, the
// protocol aliases "<tenant>#<conversation id>" to its pool key; a resume by id finds
// the open session through the alias, or gets a fresh pool key (aliased at once, so two
// concurrent resumes of one id share one socket).
class Registry {
 public:
  // A pool key for a new conversation.
  std::string NewPoolKey();
  // The pool key of conversation `id` of `tenant` (a fresh one, aliased, when none).
  std::string PoolKeyFor(std::string_view tenant, std::string_view id);
  void Alias(std::string_view tenant, std::string_view id, const std::string& pool_key);
  // The conversation state of the session under `pool_key` (set by the session factory).
  void Put(const std::string& pool_key, std::shared_ptr<Conversation> conversation);
  std::shared_ptr<Conversation> Get(const std::string& pool_key) const;
  // The session under `pool_key` is gone: forgets its state and aliases, unless a newer
  // session took the key since.
  void Forget(const std::string& pool_key, const Conversation* conversation);

  // Refusals.
  void Refuse(const std::string& refusal_key, absl::Status status, core::Clock::time_point until);
  // The recorded refusal while it holds, else OK.
  absl::Status Refused(const std::string& refusal_key, core::Clock::time_point now) const;

  size_t aliases() const;

 private:
  mutable absl::Mutex mu_;
  uint64_t next_key_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::string, std::string, std::less<>> aliases_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Conversation>> by_key_ ABSL_GUARDED_BY(mu_);
  struct Refusal {
    absl::Status status;
    core::Clock::time_point until;
  };
  std::map<std::string, Refusal> refusals_ ABSL_GUARDED_BY(mu_);
};

// At most one turn in flight per conversation socket; an abandoned one keeps it shut
// until the socket is replaced.
class TurnGate final : public core::SendGate {
 public:
  std::optional<core::Clock::time_point> When(uint64_t, core::Clock::time_point now) override {
    if (busy_ || stale_) return std::nullopt;
    return now;
  }
  void Sent(uint64_t, uint64_t, core::Clock::time_point) override { busy_ = true; }
  void Answered(uint64_t, bool, core::Clock::time_point) override { busy_ = false; }
  void Abandoned(uint64_t, core::Clock::time_point) override {
    busy_ = false;
    stale_ = true;
  }
  void Reset() { busy_ = stale_ = false; }
  bool busy() const { return busy_; }
  bool stale() const { return stale_; }

 private:
  bool busy_ = false;
  bool stale_ = false;
};

struct ProtocolOptions {
  std::string url;       // ws(s)://host[:port][/path][?query]
  std::string language;  // "" = none
  std::vector<std::pair<std::string, std::string>> headers;
  KeySources keys;
  std::string tenant;    // "default" or a hash of the call's keys
  std::string pool_key;
  std::shared_ptr<Conversation> conversation;
  std::shared_ptr<Registry> registry;
  core::Duration ack_timeout = std::chrono::seconds(10);
  core::Duration auth_retry_after = std::chrono::seconds(30);
  std::function<core::Clock::time_point()> now = [] { return core::Clock::now(); };
};

class Protocol final : public core::Protocol {
 public:
  explicit Protocol(ProtocolOptions options) : options_(std::move(options)) {}
  ~Protocol() override;

  absl::StatusOr<core::HandshakeRequest> PrepareHandshake() override;
  absl::StatusOr<core::LoginPlan> OnOpen(std::string_view subprotocol) override;
  core::Inbound Decode(std::string_view frame, bool binary) override;
  std::string NewRoute(std::string_view) override { return ""; }
  // The conversation's sinks: local, nothing is sent upstream.
  absl::StatusOr<core::Outbound> EncodeSubscribe(const std::string&, const core::PayloadPtr&,
                                                 std::string_view) override {
    return core::Outbound{};
  }
  absl::Status CheckAlive() override;
  core::DisconnectKind Classify(const core::DisconnectInfo& info) override;
  core::SendGate* gate() override { return &gate_; }

 private:
  // The first open of the conversation failed with `st` (not retried).
  void FailOpen(absl::Status st);
  // Classify without the bookkeeping.
  core::DisconnectKind ClassifyEnd(const core::DisconnectInfo& info);

  ProtocolOptions options_;
  TurnGate gate_;
  int attempts_ = 0;
  bool awaiting_ack_ = false;
  core::Clock::time_point opened_at_{};
  absl::Status last_failure_;    // what Classify learnt about the last failed attempt
  absl::Status prepare_status_;  // why the last PrepareHandshake failed
};

}  // namespace wsbridge::nlx
