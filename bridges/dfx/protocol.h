// The DFX protocol on the bridge toolkit: how a DFX session opens (the "json"
// subprotocol), logs in (0718 with the device token, then wait for its answer), decodes
// each frame once, subscribes to results (0510; DFX has no unsubscribe) and paces
// measurement data (Pacer). Strand-only, like every core::Protocol.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bridges/core/rng.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"
#include "bridges/dfx/codec.h"
#include "bridges/dfx/pacer.h"
#include "wsbridge/dfx/v1/dfx.pb.h"

namespace wsbridge::dfx {

// Replies, as the session hands them to the service.
// Any action's answer: the upstream status is data (Call returns it as is).
struct Answer final : core::Payload {
  int status = 0;
  std::string body;
  std::string id;      // the body's "ID" (0504's measurement id), read in the same parse
  absl::Status error;  // a non-2xx answer mapped to a status (for RPCs that fail on one)
};
// An accepted measurement chunk (0506 answered 2xx).
struct ChunkAccepted final : core::Payload {
  ChunkAnswer answer;
};
// A result as one element of SubscribeResultsResponse.results on the wire (field key,
// length, the serialized MeasurementResult): encoded once per event and shared by every
// subscriber's stream, whose messages are these elements concatenated. `body_bytes`:
// the JSON body's size (what the message limits count).
struct EncodedResult {
  std::string bytes;
  size_t body_bytes = 0;
};
std::shared_ptr<const EncodedResult> EncodeResult(const v1::MeasurementResult& result);

// One result of a 0510 subscription, built and encoded once and shared by every
// subscriber.
struct Result final : core::Payload {
  std::shared_ptr<const v1::MeasurementResult> result;
  std::shared_ptr<const EncodedResult> encoded;
  ResultInfo info;
  // Whether this is the last result of measurement `last_checked_for`, asked once per
  // event rather than once per subscriber (a lock and a map lookup each). Strand only:
  // every sink of one event runs on the session's strand.
  mutable std::string last_checked_for;
  mutable bool last = false;
};

struct ProtocolOptions {
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  std::shared_ptr<core::SecretSource> token;
  bool pacing = true;
  std::chrono::milliseconds pacing_window{5000};
  // Pause before a chunk answered RATE_LIMIT is sent again.
  core::Duration rate_limit_retry = std::chrono::seconds(1);
};

class Protocol final : public core::Protocol {
 public:
  explicit Protocol(ProtocolOptions options);
  // Options every session of a bridge shares (one copy; their `token` is not used), with
  // this session's device token.
  Protocol(std::shared_ptr<const ProtocolOptions> shared, std::shared_ptr<core::SecretSource> token);

  absl::StatusOr<core::HandshakeRequest> PrepareHandshake() override;
  absl::StatusOr<core::LoginPlan> OnOpen(std::string_view subprotocol) override;
  core::Inbound Decode(std::string_view frame, bool binary) override;
  std::string NewRoute(std::string_view hint) override;
  absl::StatusOr<core::Outbound> EncodeSubscribe(const std::string& measurement_id,
                                                 const core::PayloadPtr& params,
                                                 std::string_view route) override;
  std::string_view SubscribeHint() const override { return kActionSubscribeResults; }
  // DFX has no unsubscribe action: the session forgets the route and drops later results.
  std::optional<core::Outbound> EncodeUnsubscribe(const std::string& measurement_id,
                                                  std::string_view event_route,
                                                  std::string_view route) override;
  core::SendGate* gate() override { return options_->pacing ? &pacer_ : nullptr; }

 private:
  std::shared_ptr<const ProtocolOptions> options_;
  std::shared_ptr<core::SecretSource> token_;
  Pacer pacer_;
  core::Rng rng_;
  std::string login_rid_;
  // 0510 request id -> measurement id, for building results.
  std::map<std::string, std::string, std::less<>> subscriptions_;
};

}  // namespace wsbridge::dfx
