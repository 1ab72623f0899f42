// DFX WebSocket wire format, as pure functions (no I/O, no clocks, no globals).
//
//   client -> server: ACTION(4 digits) | REQUEST_ID(10) | JSON body
//   server -> client: REQUEST_ID(10)   | STATUS(3 digits) | JSON body
//
// A request id is the 4-digit action id followed by 6 ASCII letters; responses carry
// it back, so it is the correlation key.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bridges/core/rng.h"
#include "bridges/core/strings.h"

namespace wsbridge::dfx {

// Debian's Abseil has its own string_view type; these cross the boundary explicitly.
using core::Av;
using core::Sv;

inline constexpr std::string_view kErrorDomain = "dfx.wsbridge.dev";
inline constexpr std::string_view kSubprotocol = "json";
inline constexpr size_t kActionIdSize = 4;
inline constexpr size_t kRequestIdSize = 10;
inline constexpr size_t kStatusSize = 3;

inline constexpr std::string_view kActionLogin = "0718";
inline constexpr std::string_view kActionCreateMeasurement = "0504";
inline constexpr std::string_view kActionMeasurementData = "0506";
inline constexpr std::string_view kActionSubscribeResults = "0510";

// One parsed server frame. `body` views into the frame it was parsed from. The body is
// parsed once, here, and the fields the bridge routes and answers on are read out of it,
// so nothing downstream parses the frame again.
struct ResponseFrame {
  std::string_view request_id;
  int status = 0;
  std::string_view body;
  // The body is empty or "{}": e.g. a 0510 subscribe acknowledgement.
  bool empty = true;
  // Fields of a JSON object body, "" / nullopt when absent.
  std::string code;                 // "Code" of an error answer (e.g. "RATE_LIMIT")
  std::string message;              // "Message" of an error answer
  std::string id;                   // "ID" (0504: the measurement; 0506: the data id)
  std::string measurement_data_id;  // "MeasurementDataID" (results; some 0506 answers)
  std::optional<int64_t> chunk_order;  // "ChunkOrder" (0506 answers, results)
  std::string_view action_id() const { return request_id.substr(0, kActionIdSize); }
};

// OK when `action_id` is exactly four ASCII digits; INVALID_ARGUMENT saying why otherwise.
absl::Status ValidateActionId(std::string_view action_id);

// `action` + 6 letters drawn from `rng`.
std::string MakeRequestId(std::string_view action, core::Rng& rng);

// Whether `id` has the documented request id shape.
bool IsRequestId(std::string_view id);

// ACTION|REQUEST_ID|BODY. `request_id` must start with `action`.
std::string EncodeRequest(std::string_view action, std::string_view request_id,
                          std::string_view json_body);

// Parses one server frame, body included. INVALID_ARGUMENT for a short frame, a
// malformed request id, a non-numeric status or a body that is not a JSON value.
absl::StatusOr<ResponseFrame> ParseResponse(std::string_view frame);

// Request bodies.
std::string LoginBody(std::string_view token);
std::string SubscribeResultsBody(std::string_view measurement_id, std::string_view request_id);
// `stage` is FIRST, CHUNK or LAST; the payload is base64-encoded here.
std::string MeasurementDataBody(std::string_view measurement_id, std::string_view stage,
                                bool ignore, std::string_view payload);
// The whole 0506 frame, EncodeRequest(kActionMeasurementData, request_id,
// MeasurementDataBody(...)), built in one buffer of its exact size with the payload
// base64-encoded straight into it: the chunk's only copy on its way to the connection
// (which takes the buffer by move).
std::string EncodeMeasurementData(std::string_view request_id, std::string_view measurement_id,
                                  std::string_view stage, bool ignore, std::string_view payload);
struct CreateMeasurementParams {
  std::string study_id;
  uint32_t resolution = 100;
  std::string user_profile_id;
  std::string partner_id;
};
std::string CreateMeasurementBody(const CreateMeasurementParams& params);

// Answers, read from a parsed frame (no second parse).
struct ChunkAnswer {
  std::string measurement_data_id;
  std::optional<int64_t> chunk_order;
};
ChunkAnswer ChunkAnswerOf(const ResponseFrame& frame);

// Fields of a result frame used to tell which chunk it belongs to.
struct ResultInfo {
  std::optional<int64_t> chunk_order;
  std::string measurement_data_id;
};
ResultInfo ResultInfoOf(const ResponseFrame& frame);

// Maps a non-2xx upstream answer to a status: the gRPC-facing code chosen from the
// upstream code (or HTTP-like status when the body names none), with ErrorInfo
// {reason: upstream code, domain: kErrorDomain}. `what` names the request.
absl::Status UpstreamError(const ResponseFrame& frame, std::string_view what);

}  // namespace wsbridge::dfx
