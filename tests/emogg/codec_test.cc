#include "bridges/emogg/codec.h"

#include <set>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "absl/strings/cord.h"
#include "bridges/core/status.h"
#include "google/rpc/error_details.pb.h"

namespace wsbridge::emogg {
namespace {

namespace json = boost::json;

json::value ParseOrDie(std::string_view text) {
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(text.data(), text.size()), ec);
  EXPECT_FALSE(ec) << text << ": " << ec.message();
  return v;
}

bool BoostAccepts(std::string_view text) {
  json::parse_options opt;
  opt.max_depth = kMaxDepth;
  boost::system::error_code ec;
  json::parse(json::string_view(text.data(), text.size()), ec, {}, opt);
  return !ec;
}

google::rpc::ErrorInfo InfoOf(const absl::Status& st) {
  google::rpc::ErrorInfo info;
  auto payload = st.GetPayload(absl::string_view(core::kErrorInfoTypeUrl.data(),
                                                 core::kErrorInfoTypeUrl.size()));
  EXPECT_TRUE(payload.has_value()) << st;
  if (payload) {
    EXPECT_TRUE(info.ParseFromString(std::string(*payload)));
  }
  return info;
}

TEST(EmoggCodec, RequestIdsAreShortUniqueStrings) {
  EXPECT_EQ(MakeRequestId(0, 0), "0.0");
  EXPECT_EQ(MakeRequestId(35, 36), "z.10");
  std::string longest = MakeRequestId(UINT64_MAX, UINT64_MAX);
  EXPECT_EQ(longest, "3w5e11264sgsf.3w5e11264sgsf");
  EXPECT_LE(longest.size(), kMaxIdSize);
  EXPECT_TRUE(IsValidRequestId(longest));

  core::Rng rng(7);
  RequestIdGenerator a(rng), b(rng);
  std::set<std::string> seen;
  for (int i = 0; i < 10000; ++i) {
    std::string id = a.Next();
    ASSERT_TRUE(IsValidRequestId(id)) << id;
    ASSERT_TRUE(seen.insert(id).second) << "repeated id " << id;
  }
  // Two sessions' ids differ (their nonces do), so logs of both can be told apart.
  EXPECT_NE(a.Next().substr(0, a.Next().find('.')), b.Next().substr(0, b.Next().find('.')));

  EXPECT_FALSE(IsValidRequestId(""));
  EXPECT_FALSE(IsValidRequestId(std::string(37, 'a')));
  EXPECT_TRUE(IsValidRequestId(std::string(36, 'a')));
  EXPECT_FALSE(IsValidRequestId("a b"));
  EXPECT_FALSE(IsValidRequestId("a\x01"));
}

TEST(EmoggCodec, EncodesTheDocumentedRequestShapes) {
  EXPECT_EQ(EncodeAuth("1.1", "YOUR_TOKEN"),
            R"({"id":"1.1","path":"auth:token","body":{"token":"YOUR_TOKEN"}})");
  EXPECT_EQ(EncodeSubscribe("1.2", "session_emotions_counts", "66151895e00a857bd76f889d:10s"),
            R"({"id":"1.2","path":"channels:subscribe","body":{"channel":"session_emotions_counts","key":"66151895e00a857bd76f889d:10s"}})");
  EXPECT_EQ(EncodeUnsubscribe("1.3", "luug96xrbbc594"),
            R"({"id":"1.3","path":"channels:unsubscribe","body":{"subscriptionId":"luug96xrbbc594"}})");
  EXPECT_EQ(EncodePing("1.4"), R"({"id":"1.4","path":"ping","body":{}})");
  EXPECT_EQ(EncodeRequest("1.5", "sessions:get", R"({"id": 3})"),
            R"({"id":"1.5","path":"sessions:get","body":{"id": 3}})");
  EXPECT_EQ(EncodeRequest("1.6", "x", ""), R"({"id":"1.6","path":"x"})");
}

TEST(EmoggCodec, EscapesStringsSoEveryFrameIsValidJson) {
  const std::string nasty = "a\"b\\c\n\t\x01\x1f/é😀";
  EXPECT_EQ(JsonQuote(nasty), "\"a\\\"b\\\\c\\n\\t\\u0001\\u001f/é😀\"");
  for (const std::string& frame :
       {EncodeAuth("i", nasty), EncodeSubscribe("i", nasty, nasty), EncodeUnsubscribe("i", nasty),
        EncodeRequest("i", nasty, "{}")}) {
    json::value v = ParseOrDie(frame);
    ASSERT_TRUE(v.is_object()) << frame;
    ASSERT_TRUE(v.as_object().contains("path"));
  }
  json::value auth = ParseOrDie(EncodeAuth("i", nasty));
  EXPECT_EQ(auth.at("body").at("token").as_string(), nasty);
}

TEST(EmoggCodec, DecodesTheDocumentedAnswers) {
  Frame ok = DecodeFrame(R"({ "id": 1, "path": "auth:token", "status": 200 })");
  EXPECT_EQ(ok.kind, FrameKind::kAuthAnswer) << ok.reason;
  EXPECT_TRUE(ok.has_id);
  EXPECT_EQ(ok.id, "1");
  EXPECT_EQ(ok.status, 200);
  EXPECT_FALSE(ok.is_error());
  EXPECT_EQ(ok.body, "");

  // The page's first example answers auth with "id": null.
  Frame null_id = DecodeFrame(R"({ "id": null, "path": "auth:token", "status": 200 })");
  EXPECT_EQ(null_id.kind, FrameKind::kAuthAnswer);
  EXPECT_FALSE(null_id.has_id);
  EXPECT_EQ(null_id.route(), "");

  Frame refused = DecodeFrame(
      R"({"error": true, "id": null, "path": "auth:token", "status": 401, "data": {"message": "Invalid token"}})");
  EXPECT_EQ(refused.kind, FrameKind::kAuthAnswer);
  EXPECT_TRUE(refused.is_error());
  EXPECT_TRUE(refused.error_flag);
  EXPECT_EQ(refused.message, "Invalid token");
  EXPECT_EQ(refused.data, R"({"message": "Invalid token"})");

  Frame not_found = DecodeFrame(
      R"({"error":true,"id":2,"path":"channels:unsubscribe","status":404,"data":{"message":"Subscription not found"}})");
  EXPECT_EQ(not_found.kind, FrameKind::kResponse);
  EXPECT_EQ(not_found.route(), "2");
  EXPECT_EQ(not_found.path, "channels:unsubscribe");
  EXPECT_EQ(not_found.status, 404);
  EXPECT_EQ(not_found.message, "Subscription not found");

  Frame sub = DecodeFrame(
      R"({ "id": "k3.9", "path": "channels:subscribe", "status": 200, "body": {"subscriptionId":"luug96xrbbc594"} })");
  EXPECT_EQ(sub.kind, FrameKind::kResponse);
  EXPECT_EQ(sub.route(), "k3.9");
  EXPECT_EQ(sub.subscribed_id, "luug96xrbbc594");
  EXPECT_EQ(sub.body, R"({"subscriptionId":"luug96xrbbc594"})");

  // A 405 to a message whose path could not be read may name no path.
  Frame unreadable = DecodeFrame(
      R"({"error":true,"id":null,"path":null,"status":405,"data":{"message":"Malformed payload"}})");
  EXPECT_EQ(unreadable.kind, FrameKind::kResponse) << unreadable.reason;
  EXPECT_EQ(unreadable.path, "");
  EXPECT_TRUE(unreadable.is_error());
  EXPECT_TRUE(StatusClosesConnection(unreadable.status));

  Frame ping = DecodeFrame(
      R"({ "id": null, "path": "ping", "status": 200, "body": {"ts":"2024-05-01T10:30:00.000Z"} })");
  EXPECT_EQ(ping.kind, FrameKind::kPingAnswer);
  EXPECT_EQ(ping.body, R"({"ts":"2024-05-01T10:30:00.000Z"})");
}

TEST(EmoggCodec, KeepsBodiesAsTheExactTextReceived) {
  // Re-encoding would turn 1.0 into 1E0 and reorder nothing but whitespace; callers get
  // the bytes Emogg sent.
  const std::string body = R"({ "a" : [1.0, -0, 2e3, "\u00e9"], "b": {"c": null} })";
  // A Frame views into the text it was decoded from: keep the text alive.
  const std::string text = R"({"id":"x","path":"sessions:get","status":200,"body":)" + body + "}";
  Frame f = DecodeFrame(text);
  ASSERT_EQ(f.kind, FrameKind::kResponse) << f.reason;
  EXPECT_EQ(f.body, body);
  // Scalars and arrays are kept too (the page only says "object").
  EXPECT_EQ(DecodeFrame(R"({"path":"p","status":200,"body":[1,2]})").body, "[1,2]");
  EXPECT_EQ(DecodeFrame(R"({"path":"p","status":200,"body":"s"})").body, "\"s\"");
  // Unknown members are ignored; the last duplicate wins.
  Frame dup = DecodeFrame(R"({"path":"a","status":500,"extra":{"x":[]},"path":"b"})");
  EXPECT_EQ(dup.kind, FrameKind::kResponse);
  EXPECT_EQ(dup.path, "b");
  // A subscribe error carries no subscription id.
  EXPECT_EQ(DecodeFrame(R"({"error":true,"path":"channels:subscribe","status":404,"body":{"subscriptionId":"s"}})")
                .subscribed_id,
            "");
}

TEST(EmoggCodec, DecodesEventsWithEitherTimestampForm) {
  Frame e = DecodeFrame(R"([ "lusik292xia9b1", 1712675148150, "sec",
      [ { "fatigue": 4, "exaltation": 33, "focus": 21, "seriousness": 11 } ] ])");
  ASSERT_EQ(e.kind, FrameKind::kEvent) << e.reason;
  EXPECT_EQ(e.route(), "lusik292xia9b1");
  EXPECT_EQ(e.timestamp_raw, "1712675148150");
  EXPECT_EQ(e.timestamp_ms, 1712675148150);
  EXPECT_EQ(e.type, "sec");
  EXPECT_EQ(e.event_data,
            R"([ { "fatigue": 4, "exaltation": 33, "focus": 21, "seriousness": 11 } ])");

  Frame iso = DecodeFrame(R"(["luug96xrbbc594","2024-04-14T23:00:30.000Z","sws",["working"]])");
  ASSERT_EQ(iso.kind, FrameKind::kEvent) << iso.reason;
  EXPECT_EQ(iso.timestamp_raw, "\"2024-04-14T23:00:30.000Z\"");
  EXPECT_EQ(iso.timestamp_ms, 1713135630000);
  EXPECT_EQ(iso.event_data, R"(["working"])");

  EXPECT_EQ(DecodeFrame(R"(["s","2024-04-14T23:00:30.5+02:00","t",[]])").timestamp_ms,
            1713128430500);
  EXPECT_EQ(DecodeFrame(R"(["s","1712675148150","t",[]])").timestamp_ms, 1712675148150);
  EXPECT_EQ(DecodeFrame(R"(["s",1.7126751481505e12,"t",[]])").timestamp_ms, 1712675148151);
  // A string in neither form is kept raw; the event still counts.
  Frame odd = DecodeFrame(R"(["s","yesterday","t",{}])");
  EXPECT_EQ(odd.kind, FrameKind::kEvent);
  EXPECT_FALSE(odd.timestamp_ms.has_value());
  EXPECT_EQ(odd.timestamp_raw, "\"yesterday\"");
  EXPECT_FALSE(DecodeFrame(R"(["s",1e300,"t",[]])").timestamp_ms.has_value());
  // Elements after the fourth are ignored (forward compatibility).
  Frame five = DecodeFrame(R"(["s",1,"t",[1],{"new":true}])");
  EXPECT_EQ(five.kind, FrameKind::kEvent);
  EXPECT_EQ(five.event_data, "[1]");
  // Escapes in routed strings are resolved.
  EXPECT_EQ(DecodeFrame(R"(["a\u0062\"c",1,"t\/u",[]])").subscription_id, "ab\"c");
  EXPECT_EQ(DecodeFrame(R"(["s",1,"t\/u",[]])").type, "t/u");
  EXPECT_EQ(DecodeFrame(R"(["\ud83d\ude00",1,"t",[]])").subscription_id, "😀");
}

TEST(EmoggCodec, ClassifiesMalformedFramesWithAReason) {
  struct Case {
    std::string frame;
    std::string reason_part;
  };
  const Case cases[] = {
      {"", "not valid JSON"},
      {"{", "not valid JSON"},
      {"{\"path\":\"p\",\"status\":200", "not valid JSON"},
      {"{\"path\":\"p\",\"status\":200}}", "extra data"},
      {"{\"path\":\"p\",\"status\":200,}", "not valid JSON"},
      {"{'path':'p'}", "not valid JSON"},
      {"[\"s\",1,\"t\",[1,]]", "not valid JSON"},
      {"{\"path\":\"p\",\"status\":200,\"body\":01}", "not valid JSON"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\x01\"}", "control character"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\xc3\x28\"}", "invalid UTF-8"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\xed\xa0\x80\"}", "invalid UTF-8"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\xc0\xaf\"}", "invalid UTF-8"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\\ud800\"}", "surrogate"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\\udc00\"}", "surrogate"},
      {"{\"path\":\"p\",\"status\":200,\"body\":\"\\x\"}", "invalid escape"},
      {"{\"status\":200}", "without a \"path\""},
      {"{\"path\":\"p\"}", "without a numeric \"status\""},
      {"{\"path\":\"p\",\"status\":\"200\"}", "\"status\" is not a number"},
      {"{\"path\":\"p\",\"status\":200.5}", "integer from 100 to 599"},
      {"{\"path\":\"p\",\"status\":99999999999999999999}", "integer from 100 to 599"},
      {"{\"path\":7,\"status\":200}", "\"path\" is not a string"},
      {"{\"path\":\"p\",\"status\":200,\"id\":{}}", "\"id\" is neither"},
      {"{\"path\":\"p\",\"status\":200,\"error\":1}", "\"error\" is not a boolean"},
      {"[\"s\",1,\"t\"]", "event array has 3 elements"},
      {"[]", "event array has 0 elements"},
      {"[1,1,\"t\",[]]", "SUBSCRIPTION_ID is not a string"},
      {"[\"\",1,\"t\",[]]", "empty SUBSCRIPTION_ID"},
      {"[\"s\",null,\"t\",[]]", "EVENT_TIMESTAMP"},
      {"[\"s\",1,2,[]]", "EVENT_TYPE is not a string"},
      {"\"just a string\"", "neither an answer object nor an event array"},
      {"42", "neither an answer object nor an event array"},
      {"nul", "not valid JSON"},
  };
  for (const Case& c : cases) {
    Frame f = DecodeFrame(c.frame);
    EXPECT_EQ(f.kind, FrameKind::kMalformed) << c.frame;
    EXPECT_NE(f.reason.find(c.reason_part), std::string::npos)
        << c.frame << " -> " << f.reason << " (wanted \"" << c.reason_part << "\")";
    EXPECT_EQ(f.route(), "");
  }
  // Reasons never quote frame content (frames may carry tokens or personal data).
  Frame leaky = DecodeFrame(R"({"path":"auth:token","status":"secret-token-123"})");
  EXPECT_EQ(leaky.kind, FrameKind::kMalformed);
  EXPECT_EQ(leaky.reason.find("secret"), std::string::npos) << leaky.reason;

  // Stricter than Boost.JSON in one way: exponents above 999999999.
  EXPECT_NE(DecodeFrame(R"(["s",1,"t",[1e1000000000]])").reason.find("exponent out of range"),
            std::string::npos);
  std::string deep = "{\"path\":\"p\",\"status\":200,\"body\":" + std::string(200, '[') +
                     std::string(200, ']') + "}";
  EXPECT_NE(DecodeFrame(deep).reason.find("nested too deeply"), std::string::npos);
  std::string ok_depth = "{\"path\":\"p\",\"status\":200,\"body\":" +
                         std::string(kMaxDepth - 1, '[') + std::string(kMaxDepth - 1, ']') + "}";
  EXPECT_EQ(DecodeFrame(ok_depth).kind, FrameKind::kResponse) << DecodeFrame(ok_depth).reason;
}

// The decoder's grammar is its own (it keeps byte ranges Boost.JSON's DOM cannot give),
// so it is checked against Boost.JSON: both accept or both reject.
TEST(EmoggCodec, GrammarAgreesWithBoostJson) {
  const std::vector<std::string> values = {
      "0", "-0", "1.5e-3", "1E+2", "-", "1.", ".5", "01", "1e", "+1", "true", "tru", "null",
      "\"a\\/b\"", "\"\\u00E9\"", "\"\\uD83D\\uDE00\"", "\"\\uD83D\"", "\"\\uDE00\"",
      "\"\\uD83Dx\"", "\"tab\there\"", "\"\xe2\x82\xac\"", "\"\xf0\x9f\x98\x80\"",
      "\"\xf4\x90\x80\x80\"", "\"\xe0\x80\xaf\"", "\"\xff\"", "[1,[2,{\"a\":[]}]]", "[1 2]",
      "{\"a\":1,}", "{\"a\" 1}", "{,}", "[,]", " [ ] ", "{\"\":\"\"}", "[\"a\\u0000b\"]",
      "1e999999999", "1e0000000000000000001", "-1.5E-999999999", "1e99999999999",
  };
  for (const std::string& v : values) {
    const std::string body_frame = "{\"path\":\"p\",\"status\":200,\"body\":" + v + "}";
    const bool mine = DecodeFrame(body_frame).kind != FrameKind::kMalformed;
    EXPECT_EQ(mine, BoostAccepts(body_frame)) << body_frame << " " << DecodeFrame(body_frame).reason;
    const std::string event_frame = "[\"s\",1,\"t\"," + v + "]";
    const bool mine_event = DecodeFrame(event_frame).kind != FrameKind::kMalformed;
    EXPECT_EQ(mine_event, BoostAccepts(event_frame)) << event_frame;
    const std::string body = "{\"k\":" + v + "}";
    EXPECT_EQ(ValidateRequestBody(body).ok(), BoostAccepts(body)) << body;
  }
}

TEST(EmoggCodec, ValidatesCallerInput) {
  EXPECT_TRUE(ValidateRequestBody("").ok());
  EXPECT_TRUE(ValidateRequestBody(" {\"a\": [1]} ").ok());
  for (const char* not_object : {"[]", "1", "\"s\"", "null"}) {
    absl::Status st = ValidateRequestBody(not_object);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("must be a JSON object"), absl::string_view::npos) << st;
  }
  for (const char* invalid : {"{", "{} {}", "{\"a\":}", "{\"a\":1}x"}) {
    absl::Status st = ValidateRequestBody(invalid);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("not valid JSON"), absl::string_view::npos) << st;
  }

  EXPECT_TRUE(ValidatePath("ping").ok());
  EXPECT_EQ(ValidatePath("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ValidatePath("").message().find("required"), absl::string_view::npos);
  EXPECT_EQ(ValidatePath(std::string(kMaxPathSize + 1, 'p')).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidatePath("a\nb").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(IsReservedPath("auth:token"));
  EXPECT_TRUE(IsReservedPath("channels:subscribe"));
  EXPECT_TRUE(IsReservedPath("channels:unsubscribe"));
  EXPECT_FALSE(IsReservedPath("ping"));
  EXPECT_TRUE(ValidateChannel("session_emotions_counts").ok());
  EXPECT_FALSE(ValidateChannel("").ok());
  EXPECT_TRUE(ValidateKey("66151895e00a857bd76f889d:10s").ok());
  EXPECT_FALSE(ValidateKey(std::string(kMaxKeySize + 1, 'k')).ok());
}

TEST(EmoggCodec, MapsStatusesToCodes) {
  using C = absl::StatusCode;
  const std::pair<int, C> table[] = {
      {200, C::kOk}, {204, C::kOk}, {400, C::kInvalidArgument}, {401, C::kUnauthenticated},
      {403, C::kPermissionDenied}, {404, C::kNotFound}, {405, C::kInternal}, {409, C::kAborted},
      {412, C::kFailedPrecondition}, {418, C::kUnknown}, {422, C::kInvalidArgument},
      {429, C::kResourceExhausted}, {500, C::kUnavailable}, {501, C::kUnimplemented},
      {502, C::kUnavailable}, {503, C::kUnavailable}, {504, C::kUnavailable},
      {599, C::kInternal}, {302, C::kUnknown}, {100, C::kUnknown},
  };
  for (auto [status, code] : table) EXPECT_EQ(CodeForStatus(status), code) << status;
  EXPECT_EQ(ReasonForStatus(400), "BAD_REQUEST");
  EXPECT_EQ(ReasonForStatus(401), "UNAUTHORIZED");
  EXPECT_EQ(ReasonForStatus(404), "NOT_FOUND");
  EXPECT_EQ(ReasonForStatus(405), "MALFORMED_PAYLOAD");
  EXPECT_EQ(ReasonForStatus(429), "TOO_MANY_REQUESTS");
  EXPECT_EQ(ReasonForStatus(500), "INTERNAL_SERVER_ERROR");
  EXPECT_EQ(ReasonForStatus(418), "HTTP_418");
  std::set<int> closing;
  for (int s = 100; s < 600; ++s) {
    if (StatusClosesConnection(s)) closing.insert(s);
  }
  EXPECT_EQ(closing, (std::set<int>{401, 405, 429}));
}

TEST(EmoggCodec, UpstreamErrorCarriesStatusPathAndMessage) {
  Frame f = DecodeFrame(
      R"({"error":true,"id":"a.1","path":"channels:subscribe","status":404,"data":{"message":"Channel and key combination not found"}})");
  absl::Status st = UpstreamError(f);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(st.message().find("404"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("channels:subscribe"), absl::string_view::npos) << st;
  EXPECT_NE(st.message().find("Channel and key combination not found"), absl::string_view::npos);
  google::rpc::ErrorInfo info = InfoOf(st);
  EXPECT_EQ(info.reason(), "NOT_FOUND");
  EXPECT_EQ(info.domain(), kErrorDomain);
  EXPECT_EQ(info.metadata().at("upstream_status"), "404");
  EXPECT_EQ(info.metadata().at("path"), "channels:subscribe");
  EXPECT_EQ(info.metadata().at("upstream_message"), "Channel and key combination not found");

  Frame limited = DecodeFrame(
      R"({"error":true,"path":"sessions:get","status":429,"data":{"message":"slow down"}})");
  absl::Status rl = UpstreamError(limited);
  EXPECT_EQ(rl.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(rl.message().find("closes the connection"), absl::string_view::npos);
  EXPECT_EQ(core::ErrorReason(rl), "TOO_MANY_REQUESTS");

  // The redactor sees the upstream message before it reaches the status.
  Frame echo = DecodeFrame(
      R"({"error":true,"path":"auth:token","status":401,"data":{"message":"Invalid token tok-123"}})");
  absl::Status red = UpstreamError(
      echo, [](std::string_view m) {
        std::string s(m);
        size_t at = s.find("tok-123");
        if (at != std::string::npos) s.replace(at, 7, "[REDACTED]");
        return s;
      });
  EXPECT_EQ(red.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(std::string(red.message()).find("tok-123"), std::string::npos) << red;
  EXPECT_EQ(InfoOf(red).metadata().at("upstream_message"), "Invalid token [REDACTED]");

  // error:true with a 2xx status is still an error.
  Frame odd = DecodeFrame(R"({"error":true,"path":"p","status":200})");
  EXPECT_TRUE(odd.is_error());
  EXPECT_EQ(UpstreamError(odd).code(), absl::StatusCode::kUnknown);
  // A long upstream message is cut.
  const std::string big_text = R"({"error":true,"path":"p","status":400,"data":{"message":")" +
                               std::string(5000, 'm') + "\"}}";
  Frame big = DecodeFrame(big_text);
  EXPECT_LE(InfoOf(UpstreamError(big)).metadata().at("upstream_message").size(), 512u);
}

TEST(EmoggCodec, ReplaysOnlyStateChannels) {
  EXPECT_TRUE(ReplaysLastEventOnSubscribe("session_worker_state"));
  EXPECT_FALSE(ReplaysLastEventOnSubscribe("session_emotions_counts"));
  EXPECT_FALSE(ReplaysLastEventOnSubscribe("session_emotions_intensities"));
}

}  // namespace
}  // namespace wsbridge::emogg
