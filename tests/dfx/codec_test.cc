#include "bridges/dfx/codec.h"

#include <optional>
#include <random>
#include <string>
#include <vector>

#include <boost/json/serialize.hpp>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "bridges/core/json.h"
#include "bridges/core/status.h"

namespace wsbridge::dfx {
namespace {

TEST(DfxCodec, EncodesRequestFrame) {
  EXPECT_EQ(EncodeRequest("0100", "0100abcDEF", "{}"), "01000100abcDEF{}");
}

TEST(DfxCodec, RequestIdsHaveTheDocumentedShape) {
  core::Rng rng(42);
  for (int i = 0; i < 200; ++i) {
    std::string id = MakeRequestId("0506", rng);
    ASSERT_EQ(id.size(), 10u);
    EXPECT_EQ(id.substr(0, 4), "0506");
    EXPECT_TRUE(IsRequestId(id)) << id;
  }
  EXPECT_NE(MakeRequestId("0506", rng), MakeRequestId("0506", rng));
  EXPECT_FALSE(IsRequestId("0506abc"));
  EXPECT_FALSE(IsRequestId("05x6abcdef"));
  EXPECT_FALSE(IsRequestId("0506abcde1"));
}

TEST(DfxCodec, ParsesResponseFrame) {
  absl::StatusOr<ResponseFrame> f = ParseResponse(R"(0504kQzPaB200{"ID":"m-1"})");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->request_id, "0504kQzPaB");
  EXPECT_EQ(f->action_id(), "0504");
  EXPECT_EQ(f->status, 200);
  EXPECT_EQ(f->body, R"({"ID":"m-1"})");
  absl::StatusOr<ResponseFrame> empty = ParseResponse("0718abcdef401");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->status, 401);
  EXPECT_EQ(empty->body, "");
}

TEST(DfxCodec, RejectsMalformedResponseFrames) {
  EXPECT_EQ(ParseResponse("0504kQz").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseResponse("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseResponse("0504kQzPaB2x0{}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseResponse("abcdkQzPaB200{}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseResponse("0504kQzPaB200{bad").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseResponse(std::string("0504kQzPa\0" "200{}", 15)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DfxCodec, ValidatesActionId) {
  EXPECT_TRUE(ValidateActionId("0100").ok());
  for (std::string_view bad : {"", "100", "01000", "01a0", " 100"}) {
    absl::Status st = ValidateActionId(bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("four digits"), absl::string_view::npos);
  }
}

TEST(DfxCodec, BuildsRequestBodies) {
  EXPECT_EQ(LoginBody("t\"k"), R"({"Token":"t\"k"})");
  EXPECT_EQ(SubscribeResultsBody("m1", "0510abcdef"),
            R"({"Params":{"ID":"m1"},"RequestID":"0510abcdef"})");
  EXPECT_EQ(MeasurementDataBody("m1", "FIRST", false, "hello"),
            R"({"Params":{"ID":"m1"},"Action":"FIRST::PROCESS","Payload":"aGVsbG8="})");
  EXPECT_EQ(MeasurementDataBody("m1", "LAST", true, std::string("\0\xff", 2)),
            R"({"Params":{"ID":"m1"},"Action":"LAST::IGNORE","Payload":"AP8="})");
  CreateMeasurementParams p;
  p.study_id = "s";
  EXPECT_EQ(CreateMeasurementBody(p), R"({"StudyID":"s","Resolution":100})");
  p.user_profile_id = "u";
  p.resolution = 30;
  EXPECT_EQ(CreateMeasurementBody(p), R"({"StudyID":"s","Resolution":30,"UserProfileID":"u"})");
}

// The 0506 frame is built by hand (one buffer, base64 written into it): it must be the
// frame Boost.JSON's serializer builds, for any measurement id and payload size.
TEST(DfxCodec, MeasurementDataFrameIsTheSerializedObject) {
  auto reference = [](std::string_view mid, std::string_view stage, bool ignore,
                      std::string_view payload) {
    boost::json::object params;
    params["ID"] = boost::json::string_view(mid.data(), mid.size());
    boost::json::object o;
    o["Params"] = std::move(params);
    o["Action"] = absl::StrCat(Av(stage), ignore ? "::IGNORE" : "::PROCESS");
    o["Payload"] = core::Base64Encode(payload);
    return absl::StrCat("0506", "0506abcDEF", boost::json::serialize(o));
  };
  std::mt19937 rng(7);
  std::vector<std::string> mids = {"m1", "6a1c0d52-0f43-4c4e-9b55-3f0a1b2c3d4e", "", "q\"b\\s",
                                   "\x01\x1f\x7f\n\t", "caf\xc3\xa9", "\xff\xfe"};
  for (int c = 0; c < 256; ++c) mids.push_back(absl::StrCat("id", std::string(1, static_cast<char>(c))));
  for (const std::string& mid : mids) {
    for (size_t n : {0, 1, 2, 3, 4, 5, 4096, 4097, 4098}) {
      std::string payload(n, '\0');
      for (char& ch : payload) ch = static_cast<char>(rng());
      for (bool ignore : {false, true}) {
        std::string frame = EncodeMeasurementData("0506abcDEF", mid, "CHUNK", ignore, payload);
        ASSERT_EQ(frame, reference(mid, "CHUNK", ignore, payload)) << mid << " " << n;
        ASSERT_EQ(frame.substr(14), MeasurementDataBody(mid, "CHUNK", ignore, payload));
        // Reserved once at its exact size: never grown by appending past the reserve
        // (which doubles the capacity). A standard library may round a reserve up a little.
        EXPECT_LT(frame.capacity(), frame.size() + 32) << mid << " " << n;
      }
    }
  }
}

TEST(DfxCodec, ReadsTheFieldsOfAFrameInOneParse) {
  absl::StatusOr<ResponseFrame> chunk =
      ParseResponse(R"(0506abcdef200{"ID":"d1","ChunkOrder":"3"})");
  ASSERT_TRUE(chunk.ok()) << chunk.status();
  EXPECT_FALSE(chunk->empty);
  EXPECT_EQ(ChunkAnswerOf(*chunk).measurement_data_id, "d1");
  EXPECT_EQ(ChunkAnswerOf(*chunk).chunk_order, 3);
  absl::StatusOr<ResponseFrame> result =
      ParseResponse(R"(0510abcdef200{"MeasurementDataID":"d2","ChunkOrder":4,"Results":{}})");
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(ResultInfoOf(*result).measurement_data_id, "d2");
  EXPECT_EQ(ResultInfoOf(*result).chunk_order, 4);
  absl::StatusOr<ResponseFrame> ack = ParseResponse("0510abcdef200{ }");
  ASSERT_TRUE(ack.ok());
  EXPECT_TRUE(ack->empty);
  EXPECT_TRUE(ParseResponse("0510abcdef200")->empty);
  absl::StatusOr<ResponseFrame> err =
      ParseResponse(R"(0506abcdef429{"Code":"RATE_LIMIT","Message":"slow down"})");
  ASSERT_TRUE(err.ok());
  EXPECT_EQ(err->code, "RATE_LIMIT");
  absl::Status st = UpstreamError(*err, "measurement data (0506)");
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(wsbridge::core::ErrorReason(st), "RATE_LIMIT");
  EXPECT_FALSE(ParseResponse("0510abcdef200[1]")->empty);
  // A non-object body reads no fields.
  absl::StatusOr<ResponseFrame> arr = ParseResponse(R"(0506abcdef200["ID"])");
  ASSERT_TRUE(arr.ok());
  EXPECT_EQ(ChunkAnswerOf(*arr).measurement_data_id, "");
  EXPECT_EQ(ParseResponse(R"(0504abcdef200{"ID":"m"})")->id, "m");
}

TEST(DfxCodec, MapsUpstreamErrors) {
  struct Case {
    int status;
    std::string body;
    absl::StatusCode code;
    std::string reason;
  };
  const Case cases[] = {
      {400, R"({"Code":"MISALIGNED_CHUNK"})", absl::StatusCode::kFailedPrecondition,
       "MISALIGNED_CHUNK"},
      {400, R"({"Code":"MEASUREMENT_CLOSED"})", absl::StatusCode::kFailedPrecondition,
       "MEASUREMENT_CLOSED"},
      {404, R"({"Code":"INVALID_MEASUREMENT"})", absl::StatusCode::kNotFound,
       "INVALID_MEASUREMENT"},
      {400, R"({"Code":"UNPACKER_RPC_ERROR","Message":"bad magic"})",
       absl::StatusCode::kInvalidArgument, "UNPACKER_RPC_ERROR"},
      {429, R"({"Code":"RATE_LIMIT"})", absl::StatusCode::kResourceExhausted, "RATE_LIMIT"},
      {401, R"({"Code":"INVALID_TOKEN"})", absl::StatusCode::kUnauthenticated, "INVALID_TOKEN"},
      {401, "", absl::StatusCode::kUnauthenticated, "HTTP_401"},
      {403, "{}", absl::StatusCode::kPermissionDenied, "HTTP_403"},
      {503, "{}", absl::StatusCode::kUnavailable, "HTTP_503"},
      {500, "{}", absl::StatusCode::kInternal, "HTTP_500"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ResponseFrame> f =
        ParseResponse(absl::StrCat("0506abcdef", c.status, c.body));
    ASSERT_TRUE(f.ok()) << f.status();
    absl::Status st = UpstreamError(*f, "test");
    EXPECT_EQ(st.code(), c.code) << c.body;
    EXPECT_EQ(core::ErrorReason(st), c.reason) << c.body;
  }
  absl::Status st = UpstreamError(
      *ParseResponse(R"(0506abcdef400{"Code":"UNPACKER_RPC_ERROR","Message":"bad magic"})"),
      "measurement data");
  EXPECT_NE(st.message().find("bad magic"), absl::string_view::npos);
  EXPECT_NE(st.message().find("measurement data"), absl::string_view::npos);
}

// ParseResponse reads the body's fields with a SAX parser: every answer must match
// reading them from the parsed DOM (top-level members only, last duplicate wins, a
// non-string reads "", ChunkOrder as core::JsonInt), and invalid bodies must fail alike.
TEST(DfxCodec, ResponseFieldsMatchTheParsedDocument) {
  const std::vector<std::string> bodies = {
      "{}", " { } ", "[]", "[{\"Code\":\"X\"}]", "3", "\"s\"", "null", "true",
      R"({"Code":"RATE_LIMIT","Message":"slow down","ID":"m-1"})",
      R"({"MeasurementDataID":"d2","ChunkOrder":4,"Results":{"Code":"inner","ChunkOrder":9}})",
      R"({"ChunkOrder":"0003"})", R"({"ChunkOrder":"12345678901234567890"})",
      R"({"ChunkOrder":""})", R"({"ChunkOrder":4.0})", R"({"ChunkOrder":-7})",
      R"({"ChunkOrder":18446744073709551615})", R"({"ChunkOrder":9223372036854775807})",
      R"({"ChunkOrder":"12a"})", R"({"ChunkOrder":null})", R"({"ChunkOrder":[1]})",
      R"({"Code":"A","Code":"B"})", R"({"Code":"A","Code":1})", R"({"Code":1,"Code":"A"})",
      R"({"Code":{"Code":"x"},"ID":["y"]})", R"({"ChunkOrder":2,"ChunkOrder":"x"})",
      R"({"C\u006fde":"esc\u00e9\n\"q\"","ID":"a\/b"})", R"({"Message":""})",
      R"({"MeasurementDataID":"d9","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"})",
      R"({"Other":{"a":[1,2,{"b":null}]},"ID":"after-nesting"})",
      "{bad", "{\"Code\":\"x\"} trailing", "{\"Code\":}", "{\"a\":1,}", "{} ",
      std::string(40, '[') + std::string(40, ']'),
  };
  for (const std::string& body : bodies) {
    SCOPED_TRACE(body);
    absl::StatusOr<ResponseFrame> f = ParseResponse("0510abcdef200" + body);
    std::string why;
    std::optional<boost::json::value> v = core::ParseJson(body, &why);
    ASSERT_EQ(f.ok(), v.has_value()) << f.status();
    if (!v.has_value()) {
      EXPECT_EQ(f.status().message(), absl::StrCat("body is not valid JSON: ", why));
      continue;
    }
    if (!v->is_object()) {
      EXPECT_FALSE(f->empty);
      EXPECT_EQ(f->code, "");
      EXPECT_EQ(f->chunk_order, std::nullopt);
      continue;
    }
    const boost::json::object& o = v->get_object();
    EXPECT_EQ(f->empty, o.empty());
    EXPECT_EQ(f->code, core::JsonString(o, "Code"));
    EXPECT_EQ(f->message, core::JsonString(o, "Message"));
    EXPECT_EQ(f->id, core::JsonString(o, "ID"));
    EXPECT_EQ(f->measurement_data_id, core::JsonString(o, "MeasurementDataID"));
    EXPECT_EQ(f->chunk_order, core::JsonInt(o.if_contains("ChunkOrder")));
  }
}

}  // namespace
}  // namespace wsbridge::dfx
