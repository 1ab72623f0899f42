// The DFX protocol object: each frame decoded once into what the session routes on.
#include "bridges/dfx/protocol.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/status.h"

namespace wsbridge::dfx {
namespace {

Protocol Make(bool pacing = true) {
  ProtocolOptions o;
  o.url = "wss://dfx.example";
  o.token = core::SecretSource::Fixed("device-token-for-tests");
  o.pacing = pacing;
  o.rate_limit_retry = std::chrono::milliseconds(250);
  return Protocol(std::move(o));
}

TEST(DfxProtocolObjectTest, LogsInWithTheTokenAndDecodesItsAnswer) {
  Protocol p = Make();
  absl::StatusOr<core::LoginPlan> plan = p.OnOpen("json");
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->frames.size(), 1u);
  EXPECT_TRUE(plan->wait);
  const std::string rid = plan->frames[0].frame.substr(4, 10);
  EXPECT_EQ(plan->frames[0].frame.substr(0, 4), "0718");
  EXPECT_NE(plan->frames[0].frame.find("device-token-for-tests"), std::string::npos);
  core::Inbound refused = p.Decode(rid + R"(401{"Code":"INVALID_TOKEN"})", true);
  EXPECT_EQ(refused.kind, core::Inbound::Kind::kLogin);
  EXPECT_EQ(refused.status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ErrorReason(refused.status), "INVALID_TOKEN");
}

TEST(DfxProtocolObjectTest, ChunkAnswersRateLimitsAndResultsAreTyped) {
  Protocol p = Make();
  ASSERT_TRUE(p.OnOpen("json").ok());
  core::Inbound ok = p.Decode(R"(0506abcdef200{"ID":"d1","ChunkOrder":2})", true);
  ASSERT_EQ(ok.kind, core::Inbound::Kind::kReply);
  EXPECT_EQ(ok.route, "0506abcdef");
  EXPECT_EQ(static_cast<const ChunkAccepted&>(*ok.payload).answer.chunk_order, 2);

  core::Inbound limited = p.Decode(R"(0506abcdef429{"Code":"RATE_LIMIT"})", true);
  EXPECT_EQ(limited.status.code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(limited.retry_after.has_value());
  EXPECT_EQ(*limited.retry_after, std::chrono::milliseconds(250));

  const std::string sub_rid = p.NewRoute(kActionSubscribeResults);
  ASSERT_TRUE(p.EncodeSubscribe("meas-1", nullptr, sub_rid).ok());
  core::Inbound ack = p.Decode(sub_rid + "200{}", true);
  EXPECT_TRUE(ack.bare);
  core::Inbound result = p.Decode(sub_rid + R"(200{"ChunkOrder":1,"MeasurementDataID":"d9"})", true);
  ASSERT_NE(result.payload, nullptr);
  const auto& r = static_cast<const Result&>(*result.payload);
  EXPECT_EQ(r.result->measurement_id(), "meas-1");
  ASSERT_NE(r.encoded, nullptr);
  v1::SubscribeResultsResponse one;
  ASSERT_TRUE(one.ParseFromString(r.encoded->bytes));
  ASSERT_EQ(one.results_size(), 1);
  EXPECT_EQ(one.results(0).measurement_id(), "meas-1");
  EXPECT_EQ(one.results(0).json_body(), r.result->json_body());
  EXPECT_EQ(r.info.chunk_order, 1);
  EXPECT_EQ(r.info.measurement_data_id, "d9");

  core::Inbound call = p.Decode(R"(0100abcdef404{"Code":"NOT_FOUND"})", true);
  EXPECT_TRUE(call.status.ok());  // Call returns the upstream status as data
  EXPECT_EQ(static_cast<const Answer&>(*call.payload).status, 404);

  EXPECT_EQ(p.Decode("short", true).kind, core::Inbound::Kind::kMalformed);
  EXPECT_NE(p.gate(), nullptr);
  EXPECT_EQ(Make(/*pacing=*/false).gate(), nullptr);
}

// SubscribeResults writes results encoded once per event, concatenated: the bytes must be
// exactly a SubscribeResultsResponse's, whatever the sizes (1- and 2-byte lengths).
TEST(DfxProtocolObjectTest, EncodedResultsConcatenateIntoASubscribeResultsResponse) {
  v1::SubscribeResultsResponse expected;
  std::string wire;
  size_t body_bytes = 0;
  for (size_t body : {0u, 10u, 127u, 128u, 300u, 70000u}) {
    v1::MeasurementResult r;
    r.set_measurement_id(absl::StrCat("meas-", body));
    r.set_json_body(std::string(body, 'x'));
    r.set_after_reconnect(body == 128u);
    *expected.add_results() = r;
    auto e = EncodeResult(r);
    EXPECT_EQ(e->body_bytes, body);
    body_bytes += e->body_bytes;
    wire += e->bytes;
  }
  EXPECT_EQ(wire, expected.SerializeAsString());
  v1::SubscribeResultsResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  ASSERT_EQ(parsed.results_size(), 6);
  EXPECT_EQ(parsed.results(4).json_body().size(), 300u);
  EXPECT_TRUE(parsed.results(3).after_reconnect());
  EXPECT_EQ(body_bytes, 0u + 10 + 127 + 128 + 300 + 70000);
}

}  // namespace
}  // namespace wsbridge::dfx
