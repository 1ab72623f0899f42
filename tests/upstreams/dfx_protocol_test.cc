#include "tests/upstreams/dfx_protocol.h"

#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using std::chrono::milliseconds;
using Kind = DfxAction::Kind;

// Test-side base64 encoder (the emulator only decodes).
std::string Base64(std::string_view in) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t n = (static_cast<unsigned char>(in[i]) << 16) |
                 (static_cast<unsigned char>(in[i + 1]) << 8) | static_cast<unsigned char>(in[i + 2]);
    for (int s : {18, 12, 6, 0}) out.push_back(kAlphabet[(n >> s) & 63]);
  }
  if (in.size() - i == 1) {
    uint32_t n = static_cast<unsigned char>(in[i]) << 16;
    out += {kAlphabet[(n >> 18) & 63], kAlphabet[(n >> 12) & 63], '=', '='};
  } else if (in.size() - i == 2) {
    uint32_t n = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8);
    out += {kAlphabet[(n >> 18) & 63], kAlphabet[(n >> 12) & 63], kAlphabet[(n >> 6) & 63], '='};
  }
  return out;
}

struct Reply {
  std::string request_id;
  int status = 0;
  json::object body;
};

Reply ParseReply(const DfxAction& a) {
  EXPECT_EQ(a.kind, Kind::kSend);
  EXPECT_GE(a.bytes.size(), 13u) << a.bytes;
  Reply r;
  r.request_id = a.bytes.substr(0, 10);
  r.status = std::stoi(a.bytes.substr(10, 3));
  json::value v = json::parse(a.bytes.substr(13));
  EXPECT_TRUE(v.is_object()) << a.bytes;
  r.body = v.as_object();
  return r;
}

std::string Str(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  if (it == o.end() || !it->value().is_string()) return "<absent>";
  return std::string(it->value().get_string());
}

class DfxProtocolTest : public ::testing::Test {
 protected:
  DfxProtocolTest() : proto_(MakeOptions()) {}
  static DfxProtocolOptions MakeOptions() {
    DfxProtocolOptions o;
    o.tokens = {"good-token", "other-token"};
    o.rate_window = milliseconds(5000);
    return o;
  }

  std::vector<DfxAction> Send(uint64_t conn, std::string action, std::string rid, std::string body) {
    return proto_.OnFrame(conn, action + rid + body, now_);
  }
  Reply One(uint64_t conn, std::string action, std::string rid, std::string body) {
    std::vector<DfxAction> out = Send(conn, action, rid, body);
    EXPECT_EQ(out.size(), 1u);
    if (out.empty()) return {};
    EXPECT_EQ(out[0].conn, conn);
    return ParseReply(out[0]);
  }
  void Login(uint64_t conn, std::string token = "good-token") {
    proto_.OnOpen(conn);
    Reply r = One(conn, "0718", "0718AAAAAA", R"({"Token":")" + token + R"("})");
    ASSERT_EQ(r.status, 200);
  }
  std::string Create(uint64_t conn) {
    Reply r = One(conn, "0504", "0504AAAAAA", R"({"StudyID":"study-1","Resolution":100})");
    EXPECT_EQ(r.status, 200);
    return Str(r.body, "ID");
  }
  std::string DataBody(const std::string& mid, const std::string& action, uint32_t order,
                       uint32_t duration, std::string_view body = "xyz") {
    return R"({"Params":{"ID":")" + mid + R"("},"Action":")" + action + R"(","Payload":")" +
           Base64(MakeEmulatorChunk(order, duration, body)) + R"("})";
  }
  std::vector<DfxAction> Data(uint64_t conn, const std::string& mid, const std::string& action,
                              uint32_t order, uint32_t duration = 1000) {
    return Send(conn, "0506", "0506BBBBBB", DataBody(mid, action, order, duration));
  }

  DfxProtocol proto_;
  DfxClock::time_point now_ = DfxClock::time_point() + std::chrono::hours(1);
};

TEST_F(DfxProtocolTest, LoginIsRequiredFirst) {
  proto_.OnOpen(1);
  Reply r = One(1, "0504", "0504abcdef", R"({"StudyID":"s"})");
  EXPECT_EQ(r.request_id, "0504abcdef");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(Str(r.body, "Code"), "NOT_AUTHENTICATED");
  EXPECT_EQ(Str(r.body, "Message"), "login with 0718 first");
  EXPECT_EQ(One(1, "0100", "0100abcdef", "{}").status, 401);

  r = One(1, "0718", "0718qwerty", R"({"Token":"good-token"})");
  EXPECT_EQ(r.request_id, "0718qwerty");
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(r.body.empty());
  EXPECT_EQ(proto_.logins(), 1);

  r = One(1, "0100", "0100abcdef", "{}");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(Str(r.body, "Status"), "OK");
}

TEST_F(DfxProtocolTest, BadTokenIsRefusedAndConnectionStaysUsable) {
  proto_.OnOpen(1);
  Reply r = One(1, "0718", "0718qwerty", R"({"Token":"wrong-token"})");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_TOKEN");
  EXPECT_THAT(Str(r.body, "Message"), ::testing::Not(HasSubstr("wrong-token")));
  EXPECT_EQ(One(1, "0718", "0718qwertz", "{}").status, 401);
  EXPECT_EQ(One(1, "0718", "0718qwertz", R"({"Token":7})").status, 401);
  EXPECT_EQ(One(1, "0504", "0504abcdef", R"({"StudyID":"s"})").status, 401);
  EXPECT_EQ(One(1, "0718", "0718qwerty", R"({"Token":"other-token"})").status, 200);
  EXPECT_EQ(proto_.logins(), 1);
}

TEST_F(DfxProtocolTest, DefaultTokenRuleAcceptsAnyNonEmptyExceptBadPrefix) {
  DfxProtocol p{DfxProtocolOptions{}};
  p.OnOpen(1);
  auto status = [&](std::string body) {
    auto out = p.OnFrame(1, "0718ABCDEFGHIJ" + body, now_);
    return out.size() == 1 ? ParseReply(out[0]).status : -1;
  };
  EXPECT_EQ(status(R"({"Token":"demo-device-token"})"), 200);
  EXPECT_EQ(status(R"({"Token":"bad-token"})"), 401);
  EXPECT_EQ(status(R"({"Token":""})"), 401);
}

TEST_F(DfxProtocolTest, RefuseLoginSwitch) {
  proto_.SetRefuseLogin(true);
  proto_.OnOpen(1);
  Reply r = One(1, "0718", "0718qwerty", R"({"Token":"good-token"})");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_TOKEN");
  proto_.SetRefuseLogin(false);
  EXPECT_EQ(One(1, "0718", "0718qwerty", R"({"Token":"good-token"})").status, 200);
}

TEST_F(DfxProtocolTest, MalformedFrames) {
  proto_.OnOpen(1);
  // Too short to carry a request id: protocol error close.
  std::vector<DfxAction> out = proto_.OnFrame(1, "0718abc", now_);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].kind, Kind::kClose);
  EXPECT_EQ(out[0].close_code, 1002);

  Reply r = One(1, "07a8", "0718qwerty", R"({"Token":"good-token"})");
  EXPECT_EQ(r.request_id, "0718qwerty");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "BAD_REQUEST");
  r = One(1, "0718", "0718qwerty", R"({"Token":)");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "BAD_REQUEST");
  EXPECT_THAT(Str(r.body, "Message"), HasSubstr("JSON"));
  EXPECT_EQ(One(1, "0718", "0718qwerty", "").status, 400);
  EXPECT_EQ(One(1, "0718", "0718qwerty", "[1]").status, 400);
}

TEST_F(DfxProtocolTest, UnknownActionIsNotFound) {
  Login(1);
  Reply r = One(1, "0999", "0999abcdef", "{}");
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(Str(r.body, "Code"), "NOT_FOUND");
}

TEST_F(DfxProtocolTest, CreateMeasurementValidatesStudy) {
  Login(1);
  Reply r = One(1, "0504", "0504abcdef", R"({"Resolution":100})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_PARAMETER");
  EXPECT_THAT(Str(r.body, "Message"), HasSubstr("StudyID"));
  std::string a = Create(1);
  std::string b = Create(1);
  EXPECT_EQ(a.size(), 36u) << a;
  EXPECT_NE(a, b);
}

TEST_F(DfxProtocolTest, FullMeasurementWithResultsOnSubscriptionRequestId) {
  Login(1);
  std::string mid = Create(1);
  Reply sub = One(1, "0510", "0510SUBSCR",
                  R"({"Params":{"ID":")" + mid + R"("},"RequestID":"0510SUBSCR"})");
  EXPECT_EQ(sub.status, 200);
  EXPECT_TRUE(sub.body.empty());
  EXPECT_EQ(proto_.active_subscriptions(), 1);

  std::vector<std::string> data_ids;
  const char* actions[] = {"FIRST::PROCESS", "CHUNK::IGNORE", "CHUNK::PROCESS", "LAST::PROCESS"};
  for (uint32_t order = 0; order < 4; ++order) {
    now_ += milliseconds(1000);
    std::vector<DfxAction> out = Data(1, mid, actions[order], order, 1000);
    const bool expect_result = order != 1;
    ASSERT_EQ(out.size(), expect_result ? 2u : 1u) << order;
    Reply ack = ParseReply(out[0]);
    EXPECT_EQ(ack.request_id, "0506BBBBBB");
    EXPECT_EQ(ack.status, 200);
    EXPECT_EQ(ack.body.at("ChunkOrder").to_number<int>(), static_cast<int>(order));
    data_ids.push_back(Str(ack.body, "ID"));
    if (!expect_result) continue;
    Reply res = ParseReply(out[1]);
    EXPECT_EQ(res.request_id, "0510SUBSCR");
    EXPECT_EQ(res.status, 200);
    EXPECT_EQ(Str(res.body, "ID"), mid);
    EXPECT_EQ(Str(res.body, "MeasurementDataID"), data_ids.back());
    EXPECT_EQ(res.body.at("ChunkOrder").to_number<int>(), static_cast<int>(order));
    EXPECT_FALSE(res.body.contains("Status"));
    EXPECT_EQ(res.body.at("Results").at("DataMs").to_number<int>(), 1000 * (order + 1));
    int hr = res.body.at("Results").at("HR_BPM").to_number<int>();
    EXPECT_GE(hr, 60);
    EXPECT_LT(hr, 100);
  }
  std::vector<DfxChunkRecord> chunks = proto_.chunks();
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(chunks[2].action, "CHUNK::PROCESS");
  EXPECT_EQ(chunks[2].chunk_order, 2);
  EXPECT_EQ(chunks[2].duration_ms, 1000);
  EXPECT_EQ(chunks[2].measurement_id, mid);
  EXPECT_EQ(proto_.frames_received("0506"), 4);
  EXPECT_EQ(proto_.frames_received("0510"), 1);

  // After LAST the measurement is closed.
  std::vector<DfxAction> out = Data(1, mid, "CHUNK::PROCESS", 4);
  ASSERT_EQ(out.size(), 1u);
  Reply closed = ParseReply(out[0]);
  EXPECT_EQ(closed.status, 400);
  EXPECT_EQ(Str(closed.body, "Code"), "MEASUREMENT_CLOSED");
  out = Data(1, mid, "FIRST::PROCESS", 0);
  EXPECT_EQ(ParseReply(out[0]).status, 400);

  proto_.OnClose(1);
  EXPECT_EQ(proto_.active_subscriptions(), 0);
  EXPECT_EQ(proto_.open_connections(), 0);
}

TEST_F(DfxProtocolTest, LastIgnoreClosesTheMeasurementWithoutAResult) {
  Login(1);
  std::string mid = Create(1);
  ASSERT_EQ(One(1, "0510", "0510SUBSCR", R"({"Params":{"ID":")" + mid + R"("},"RequestID":"0510SUBSCR"})").status, 200);
  ASSERT_EQ(Data(1, mid, "FIRST::IGNORE", 0).size(), 1u);
  std::vector<DfxAction> out = Data(1, mid, "LAST::IGNORE", 1);
  ASSERT_EQ(out.size(), 1u);  // the chunk's answer, and no result
  EXPECT_EQ(ParseReply(out[0]).status, 200);
  EXPECT_EQ(Str(ParseReply(Data(1, mid, "CHUNK::PROCESS", 2)[0]).body, "Code"), "MEASUREMENT_CLOSED");
}

TEST_F(DfxProtocolTest, ResultsGoToEverySubscriptionOnEveryConnection) {
  Login(1);
  Login(2);
  std::string mid = Create(1);
  std::string sub = R"({"Params":{"ID":")" + mid + R"("},"RequestID":")";
  ASSERT_EQ(One(1, "0510", "0510AAAAAA", sub + R"(0510AAAAAA"})").status, 200);
  ASSERT_EQ(One(2, "0510", "0510BBBBBB", sub + R"(0510BBBBBB"})").status, 200);
  ASSERT_EQ(One(2, "0510", "0510CCCCCC", sub + R"(0510CCCCCC"})").status, 200);
  EXPECT_EQ(proto_.active_subscriptions(), 3);
  std::vector<DfxAction> out = Data(1, mid, "FIRST::PROCESS", 0);
  ASSERT_EQ(out.size(), 4u);
  std::vector<std::pair<uint64_t, std::string>> pushed;
  for (size_t i = 1; i < out.size(); ++i) pushed.emplace_back(out[i].conn, ParseReply(out[i]).request_id);
  EXPECT_THAT(pushed, ElementsAre(std::pair<uint64_t, std::string>{1, "0510AAAAAA"},
                                  std::pair<uint64_t, std::string>{2, "0510BBBBBB"},
                                  std::pair<uint64_t, std::string>{2, "0510CCCCCC"}));
  proto_.OnClose(2);
  EXPECT_EQ(proto_.active_subscriptions(), 1);
  EXPECT_EQ(Data(1, mid, "CHUNK::PROCESS", 1).size(), 2u);
}

TEST_F(DfxProtocolTest, SubscribeValidation) {
  Login(1);
  Reply r = One(1, "0510", "0510AAAAAA", R"({"Params":{"ID":"nope"},"RequestID":"0510AAAAAA"})");
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_MEASUREMENT");
  std::string mid = Create(1);
  r = One(1, "0510", "0510AAAAAA", R"({"Params":{"ID":")" + mid + R"("}})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_PARAMETER");
  EXPECT_THAT(Str(r.body, "Message"), HasSubstr("RequestID"));
  r = One(1, "0510", "0510AAAAAA", R"({"RequestID":"0510AAAAAA"})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(proto_.active_subscriptions(), 0);

  // Measurements belong to the token that created them.
  Login(2, "other-token");
  r = One(2, "0510", "0510AAAAAA", R"({"Params":{"ID":")" + mid + R"("},"RequestID":"0510AAAAAA"})");
  EXPECT_EQ(r.status, 404);
}

TEST_F(DfxProtocolTest, ChunkOrdering) {
  Login(1);
  std::string mid = Create(1);
  auto code = [](const std::vector<DfxAction>& out) {
    return out.empty() ? "<none>" : Str(ParseReply(out[0]).body, "Code");
  };
  // CHUNK before FIRST.
  EXPECT_EQ(code(Data(1, mid, "CHUNK::PROCESS", 0)), "MISALIGNED_CHUNK");
  // FIRST must be order 0.
  EXPECT_EQ(code(Data(1, mid, "FIRST::PROCESS", 1)), "MISALIGNED_CHUNK");
  EXPECT_EQ(ParseReply(Data(1, mid, "FIRST::PROCESS", 0)[0]).status, 200);
  std::vector<DfxAction> out = Data(1, mid, "CHUNK::PROCESS", 2);
  Reply r = ParseReply(out[0]);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "MISALIGNED_CHUNK");
  EXPECT_EQ(Str(r.body, "Message"), "ChunkOrder 2 was sent before ChunkOrder 1");
  // A repeated chunk is misaligned too.
  EXPECT_EQ(code(Data(1, mid, "CHUNK::PROCESS", 0)), "MISALIGNED_CHUNK");
  EXPECT_EQ(ParseReply(Data(1, mid, "CHUNK::PROCESS", 1)[0]).status, 200);
  // FIRST restarts the measurement.
  EXPECT_EQ(ParseReply(Data(1, mid, "FIRST::IGNORE", 0)[0]).status, 200);
  EXPECT_EQ(ParseReply(Data(1, mid, "CHUNK::IGNORE", 1)[0]).status, 200);
  EXPECT_EQ(proto_.chunks().size(), 4u);
}

TEST_F(DfxProtocolTest, DataValidation) {
  Login(1);
  std::string mid = Create(1);
  auto reply = [&](std::string body) { return One(1, "0506", "0506abcdef", body); };

  Reply r = reply(DataBody("no-such-id", "FIRST::PROCESS", 0, 100));
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_MEASUREMENT");

  r = reply(DataBody(mid, "MIDDLE::PROCESS", 0, 100));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_PARAMETER");
  r = reply(R"({"Params":{"ID":")" + mid + R"("},"Action":"FIRST::PROCESS"})");
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_PARAMETER");
  r = reply(R"({"Action":"FIRST::PROCESS","Payload":""})");
  EXPECT_EQ(Str(r.body, "Code"), "INVALID_PARAMETER");

  std::string head = R"({"Params":{"ID":")" + mid + R"("},"Action":"FIRST::PROCESS","Payload":")";
  r = reply(head + R"(abc"})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(Str(r.body, "Code"), "UNPACKER_RPC_ERROR");
  EXPECT_THAT(Str(r.body, "Message"), HasSubstr("base64"));
  r = reply(head + R"(ab*d"})");
  EXPECT_EQ(Str(r.body, "Code"), "UNPACKER_RPC_ERROR");
  r = reply(head + Base64("XXXX\0\0\0\0\0\0\0\0") + R"("})");
  EXPECT_EQ(Str(r.body, "Code"), "UNPACKER_RPC_ERROR");
  EXPECT_THAT(Str(r.body, "Message"), HasSubstr("header"));
  r = reply(head + Base64("WSBE\0\0\0") + R"("})");
  EXPECT_EQ(Str(r.body, "Code"), "UNPACKER_RPC_ERROR");
  EXPECT_TRUE(proto_.chunks().empty());

  // Body-less chunk, padding variants.
  for (std::string body : {"", "a", "ab", "abc"}) {
    r = reply(R"({"Params":{"ID":")" + mid + R"("},"Action":"FIRST::PROCESS","Payload":")" +
              Base64(MakeEmulatorChunk(0, 10, body)) + R"("})");
    EXPECT_EQ(r.status, 200) << body;
  }
}

TEST_F(DfxProtocolTest, SlidingWindowRateLimit) {
  Login(1);
  Login(2);  // same token on another connection shares the budget
  std::string a = Create(1);
  std::string b = Create(2);
  ASSERT_EQ(ParseReply(Data(1, a, "FIRST::IGNORE", 0, 3000)[0]).status, 200);
  now_ += milliseconds(1000);
  ASSERT_EQ(ParseReply(Data(2, b, "FIRST::IGNORE", 0, 2000)[0]).status, 200);
  now_ += milliseconds(1000);
  // 5000 ms already within the last 5 s: any more is too fast.
  Reply r = ParseReply(Data(1, a, "CHUNK::IGNORE", 1, 1)[0]);
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(Str(r.body, "Code"), "RATE_LIMIT");
  // Rejected chunk did not advance the order.
  now_ += milliseconds(3000);  // the 3000 ms chunk is now exactly one window old: out
  EXPECT_EQ(ParseReply(Data(1, a, "CHUNK::IGNORE", 1, 3000)[0]).status, 200);
  EXPECT_EQ(ParseReply(Data(1, a, "CHUNK::IGNORE", 2, 1)[0]).status, 429);
  EXPECT_EQ(proto_.MaxDataMsInWindow(), 5000);

  // Another token has its own budget.
  Login(3, "other-token");
  std::string c = Create(3);
  EXPECT_EQ(ParseReply(Data(3, c, "FIRST::IGNORE", 0, 5000)[0]).status, 200);
  EXPECT_EQ(proto_.MaxDataMsInWindow(), 5000);
}

TEST_F(DfxProtocolTest, MaxDataMsInWindowIsSliding) {
  DfxProtocolOptions o;
  o.rate_window = milliseconds(10000);  // generous so nothing is refused
  DfxProtocol p(o);
  p.OnOpen(1);
  p.OnFrame(1, R"(0718AAAAAAAAAA{"Token":"t"})", now_);
  auto out = p.OnFrame(1, R"(0504AAAAAAAAAA{"StudyID":"s"})", now_);
  std::string mid = Str(ParseReply(out[0]).body, "ID");
  auto data = [&](const char* action, uint32_t order, uint32_t dur) {
    return ParseReply(p.OnFrame(1, "0506AAAAAAAAAA" + DataBody(mid, action, order, dur), now_)[0]).status;
  };
  // 2000 at t, 2000 at t+4s, 2000 at t+9s, 2000 at t+12s: the densest 10 s window
  // (t+4s..t+12s) holds 6000.
  ASSERT_EQ(data("FIRST::IGNORE", 0, 2000), 200);
  now_ += milliseconds(4000);
  ASSERT_EQ(data("CHUNK::IGNORE", 1, 2000), 200);
  now_ += milliseconds(5000);
  ASSERT_EQ(data("CHUNK::IGNORE", 2, 2000), 200);
  EXPECT_EQ(p.MaxDataMsInWindow(), 6000);
  now_ += milliseconds(3000);
  ASSERT_EQ(data("CHUNK::IGNORE", 3, 2000), 200);
  EXPECT_EQ(p.MaxDataMsInWindow(), 6000);
}

TEST_F(DfxProtocolTest, DropAfterFramesDropsBeforeAnswering) {
  proto_.SetDropAfterFrames(2);
  proto_.OnOpen(1);
  EXPECT_EQ(One(1, "0718", "0718AAAAAA", R"({"Token":"good-token"})").status, 200);
  std::vector<DfxAction> out = Send(1, "0504", "0504AAAAAA", R"({"StudyID":"s"})");
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].kind, Kind::kDrop);
  EXPECT_EQ(out[0].conn, 1u);
  EXPECT_EQ(proto_.frames_received("0504"), 1);
  // Per connection: a new one gets its own count.
  proto_.OnClose(1);
  Login(2);
  EXPECT_EQ(Send(2, "0100", "0100AAAAAA", "{}")[0].kind, Kind::kDrop);
  proto_.SetDropAfterFrames(-1);
  EXPECT_EQ(ParseReply(Send(2, "0100", "0100AAAAAA", "{}")[0]).status, 200);
}

TEST_F(DfxProtocolTest, DelaysAreAttachedToAnswersAndResults) {
  Login(1);
  std::string mid = Create(1);
  ASSERT_EQ(One(1, "0510", "0510SUBSCR", R"({"Params":{"ID":")" + mid + R"("},"RequestID":"0510SUBSCR"})").status, 200);
  proto_.SetAnswerDelay(milliseconds(30));
  proto_.SetResultDelay(milliseconds(200));
  std::vector<DfxAction> out = Data(1, mid, "FIRST::PROCESS", 0);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].delay, milliseconds(30));
  EXPECT_EQ(out[1].delay, milliseconds(230));
}

TEST_F(DfxProtocolTest, BroadcastRawReachesEveryOpenConnection) {
  proto_.OnOpen(1);
  proto_.OnOpen(7);
  std::vector<DfxAction> out = proto_.BroadcastRaw("garbage");
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].conn, 1u);
  EXPECT_EQ(out[1].conn, 7u);
  EXPECT_EQ(out[1].bytes, "garbage");
  EXPECT_EQ(proto_.open_connections(), 2);
}

TEST_F(DfxProtocolTest, FramesFromUnknownConnectionsAreIgnored) {
  EXPECT_TRUE(proto_.OnFrame(42, R"(0718AAAAAAAAAA{"Token":"good-token"})", now_).empty());
  EXPECT_EQ(proto_.logins(), 0);
}

}  // namespace
}  // namespace wsbridge::emulator
