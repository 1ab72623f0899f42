#include "bridges/dfx/protocol.h"

#include <google/protobuf/io/coded_stream.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/log.h"
#include "bridges/core/status.h"

namespace wsbridge::dfx {

std::shared_ptr<const EncodedResult> EncodeResult(const v1::MeasurementResult& result) {
  // SubscribeResultsResponse.results is field 1, length-delimited.
  constexpr uint32_t kResultsKey = (1 << 3) | 2;
  const size_t size = result.ByteSizeLong();
  auto e = std::make_shared<EncodedResult>();
  e->body_bytes = result.json_body().size();
  e->bytes.resize(1 + google::protobuf::io::CodedOutputStream::VarintSize64(size) + size);
  auto* out = reinterpret_cast<uint8_t*>(e->bytes.data());
  out = google::protobuf::io::CodedOutputStream::WriteVarint32ToArray(kResultsKey, out);
  out = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(size, out);
  result.SerializeWithCachedSizesToArray(out);
  return e;
}

Protocol::Protocol(ProtocolOptions options)
    : Protocol(std::make_shared<const ProtocolOptions>(options), options.token) {}

Protocol::Protocol(std::shared_ptr<const ProtocolOptions> shared,
                   std::shared_ptr<core::SecretSource> token)
    : options_(std::move(shared)),
      token_(std::move(token)),
      pacer_(options_->pacing_window),
      rng_(core::Rng::FromEntropy()) {}

absl::StatusOr<core::HandshakeRequest> Protocol::PrepareHandshake() {
  core::HandshakeRequest req;
  req.url = options_->url;
  req.headers = options_->headers;
  req.subprotocols = {std::string(kSubprotocol)};
  return req;
}

absl::StatusOr<core::LoginPlan> Protocol::OnOpen(std::string_view subprotocol) {
  if (!subprotocol.empty() && subprotocol != kSubprotocol) {
    log::Warn("dfx", "upstream negotiated an unexpected subprotocol",
              {{"subprotocol", std::string(subprotocol)}});
  }
  subscriptions_.clear();  // routes of the previous connection
  // The cached value: the refresher re-reads file and env secrets off this thread.
  absl::StatusOr<std::string> token = token_->Current();
  if (!token.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the device token cannot be read: ", token.status().message()));
  }
  login_rid_ = MakeRequestId(kActionLogin, rng_);
  core::LoginPlan plan;
  plan.frames.push_back({EncodeRequest(kActionLogin, login_rid_, LoginBody(*token)), true});
  plan.wait = true;
  return plan;
}

core::Inbound Protocol::Decode(std::string_view payload, bool /*binary*/) {
  core::Inbound in;
  absl::StatusOr<ResponseFrame> frame = ParseResponse(payload);
  if (!frame.ok()) {
    in.kind = core::Inbound::Kind::kMalformed;
    in.status = frame.status();
    return in;
  }
  const bool ok = frame->status / 100 == 2;
  if (!login_rid_.empty() && frame->request_id == login_rid_) {
    login_rid_.clear();
    in.kind = core::Inbound::Kind::kLogin;
    if (!ok) {
      in.status = UpstreamError(*frame, "login with the device token (0718)");
      // A refused token is an auth refusal whatever code the body names.
      if (frame->status == 401 || frame->status == 403) {
        in.status = absl::Status(absl::StatusCode::kUnauthenticated, in.status.message());
        in.status = core::WithErrorInfo(
            in.status, frame->code.empty() ? "INVALID_TOKEN" : frame->code, kErrorDomain);
      }
    }
    return in;
  }
  in.kind = core::Inbound::Kind::kReply;
  in.route = std::string(frame->request_id);
  const std::string_view action = frame->action_id();
  if (action == kActionSubscribeResults) {
    if (!ok) {
      in.status = UpstreamError(*frame, "results subscription (0510)");
      return in;
    }
    in.bare = frame->empty;
    if (in.bare) return in;
    auto result = std::make_shared<v1::MeasurementResult>();
    if (auto it = subscriptions_.find(frame->request_id); it != subscriptions_.end()) {
      result->set_measurement_id(it->second);
    }
    result->set_json_body(std::string(frame->body));
    auto r = std::make_shared<Result>();
    r->info = ResultInfoOf(*frame);
    r->encoded = EncodeResult(*result);
    r->result = std::move(result);
    in.payload = std::move(r);
    return in;
  }
  if (action == kActionMeasurementData) {
    if (!ok) {
      in.status = UpstreamError(*frame, "measurement data (0506)");
      const bool rate_limited =
          frame->code == "RATE_LIMIT" || (frame->code.empty() && frame->status == 429);
      if (rate_limited) in.retry_after = options_->rate_limit_retry;
      return in;
    }
    auto c = std::make_shared<ChunkAccepted>();
    c->answer = ChunkAnswerOf(*frame);
    in.payload = std::move(c);
    return in;
  }
  // Any other action: the status is data for the caller.
  auto a = std::make_shared<Answer>();
  a->status = frame->status;
  a->body = std::string(frame->body);
  a->id = frame->id;
  if (!ok) {
    a->error = UpstreamError(*frame, action == kActionCreateMeasurement
                                         ? std::string("create measurement (0504)")
                                         : absl::StrCat("action ", Av(action)));
  }
  in.payload = std::move(a);
  return in;
}

std::string Protocol::NewRoute(std::string_view hint) { return MakeRequestId(hint, rng_); }

absl::StatusOr<core::Outbound> Protocol::EncodeSubscribe(const std::string& measurement_id,
                                                         const core::PayloadPtr& /*params*/,
                                                         std::string_view route) {
  subscriptions_[std::string(route)] = measurement_id;
  return core::Outbound{EncodeRequest(kActionSubscribeResults, route,
                                      SubscribeResultsBody(measurement_id, route)),
                        true};
}

std::optional<core::Outbound> Protocol::EncodeUnsubscribe(const std::string& /*measurement_id*/,
                                                          std::string_view event_route,
                                                          std::string_view /*route*/) {
  if (auto it = subscriptions_.find(event_route); it != subscriptions_.end()) {
    subscriptions_.erase(it);
  }
  return std::nullopt;
}

}  // namespace wsbridge::dfx
