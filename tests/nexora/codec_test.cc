#include "bridges/nexora/codec.h"

#include <set>
#include <string>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "bridges/core/status.h"

namespace wsbridge::nexora {
namespace {

namespace json = boost::json;

TEST(NexoraCodec, SocketTargetPercentEncodesTheToken) {
  absl::StatusOr<std::string> t =
      SocketTarget("", "3f2a-9c", "eyJ.a+b/c=d&e f");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, "/api/ws/3f2a-9c?token=eyJ.a%2Bb%2Fc%3Dd%26e%20f");
  EXPECT_EQ(*SocketTarget("/nexora/", "c1", "nxr_abc"), "/nexora/api/ws/c1?token=nxr_abc");
  EXPECT_EQ(*SocketTarget("/x", "c1", "nxr_abc"), "/x/api/ws/c1?token=nxr_abc");
  EXPECT_EQ(PercentEncode(std::string("\x00\xff~_.-Az9", 9)), "%00%FF~_.-Az9");
  EXPECT_EQ(SocketTarget("", "c1", "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SocketTarget("", "a/b", "t").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NexoraCodec, ValidatesChatIds) {
  EXPECT_TRUE(ValidateChatId("0f8fad5b-d9cb-469f-a165-70867728950e").ok());
  EXPECT_TRUE(ValidateChatId("a.b_c~d").ok());
  EXPECT_TRUE(ValidateChatId(std::string(128, 'a')).ok());
  for (std::string bad : {std::string(), std::string(129, 'a'), std::string("."),
                          std::string(".."), std::string("a/b"), std::string("a?b"),
                          std::string("a b"), std::string("a%2F"), std::string("\xc3\xa9")}) {
    absl::Status st = ValidateChatId(bad);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("chat_id"), absl::string_view::npos) << bad;
  }
}

TEST(NexoraCodec, ValidatesClientMessageIds) {
  EXPECT_TRUE(ValidateClientMessageId("unique-client-id").ok());
  EXPECT_TRUE(ValidateClientMessageId("a!\"#~").ok());
  for (std::string bad : {std::string(), std::string(129, 'x'), std::string("a b"),
                          std::string("a\tb"), std::string("\x7f"), std::string("\xc3\xa9")}) {
    EXPECT_EQ(ValidateClientMessageId(bad).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(NexoraCodec, HttpBaseUrlFollowsTheSocketUrl) {
  EXPECT_EQ(*HttpBaseUrl("wss://nexora.example.com"), "https://nexora.example.com");
  EXPECT_EQ(*HttpBaseUrl("wss://nexora.example.com:8443/prefix/"),
            "https://nexora.example.com:8443/prefix");
  EXPECT_EQ(*HttpBaseUrl("ws://127.0.0.1:9000"), "http://127.0.0.1:9000");
  for (const char* bad : {"https://x", "wss://", "wss:///path", "wss://h/?q=1", "x"}) {
    EXPECT_EQ(HttpBaseUrl(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(NexoraCodec, GeneratedClientMessageIdsAreUuidV4) {
  core::Rng rng(7);
  std::set<std::string> seen;
  for (int i = 0; i < 500; ++i) {
    std::string id = MakeClientMessageId(rng);
    ASSERT_EQ(id.size(), 36u) << id;
    for (int dash : {8, 13, 18, 23}) EXPECT_EQ(id[dash], '-') << id;
    EXPECT_EQ(id[14], '4') << id;
    EXPECT_NE(std::string("89ab").find(id[19]), std::string::npos) << id;
    for (char c : id) EXPECT_TRUE(c == '-' || isxdigit(c)) << id;
    EXPECT_TRUE(ValidateClientMessageId(id).ok());
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 500u);
  core::Rng a(1), b(1);
  EXPECT_EQ(MakeClientMessageId(a), MakeClientMessageId(b));
}

TEST(NexoraCodec, EncodesClientFrames) {
  EXPECT_EQ(EncodeSend("What is \"up\"?\n", "id-1"),
            R"({"type":"message","content":"What is \"up\"?\n","client_message_id":"id-1"})");
  EXPECT_EQ(PingFrame(), R"({"type":"ping"})");
  EXPECT_EQ(EncodeLoginBody("user@example.com", "p\"w"),
            R"({"email":"user@example.com","password":"p\"w"})");
  EXPECT_EQ(EncodeCreateChatBody("agent-1"), R"({"agent_id":"agent-1"})");
}

TEST(NexoraCodec, DecodesEveryDocumentedEvent) {
  // The examples from the API page, verbatim.
  absl::StatusOr<Event> e =
      DecodeEvent(R"({ "type": "chunk", "message_id": "uuid", "content": "Partial response text..." })");
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->kind, EventKind::kChunk);
  EXPECT_EQ(e->message_id, "uuid");
  EXPECT_EQ(e->content, "Partial response text...");
  EXPECT_FALSE(e->ends_answer());

  e = DecodeEvent(R"({ "type": "tool_call", "tool": "github", "input": { "action": "list_issues", "repo": "owner/repo" } })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kToolCall);
  EXPECT_EQ(e->tool, "github");
  EXPECT_EQ(json::parse(e->json), json::parse(R"({"action":"list_issues","repo":"owner/repo"})"));

  e = DecodeEvent(R"({ "type": "tool_result", "tool": "github", "result": { "issues": [] } })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kToolResult);
  EXPECT_EQ(e->tool, "github");
  EXPECT_EQ(e->json, R"({"issues":[]})");

  e = DecodeEvent(R"({ "type": "sub_agent_start", "task_id": "uuid", "agent_name": "Research Assistant" })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kSubAgentStart);
  EXPECT_EQ(e->task_id, "uuid");
  EXPECT_EQ(e->agent_name, "Research Assistant");

  e = DecodeEvent(R"({ "type": "sub_agent_complete", "task_id": "uuid", "result": "..." })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kSubAgentComplete);
  EXPECT_EQ(e->task_id, "uuid");
  EXPECT_EQ(e->result, "...");

  e = DecodeEvent(R"({ "type": "done", "message_id": "uuid" })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kDone);
  EXPECT_EQ(e->message_id, "uuid");
  EXPECT_TRUE(e->ends_answer());

  e = DecodeEvent(R"({ "type": "error", "code": "all_providers_exhausted", "message": "All LLM providers failed" })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kError);
  EXPECT_EQ(e->code, "all_providers_exhausted");
  EXPECT_EQ(e->message, "All LLM providers failed");
  EXPECT_TRUE(e->ends_answer());

  e = DecodeEvent(R"({ "type": "duplicate", "client_message_id": "your-id", "message_id": "uuid" })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kDuplicate);
  EXPECT_EQ(e->client_message_id, "your-id");
  EXPECT_EQ(e->message_id, "uuid");
  EXPECT_TRUE(e->ends_answer());

  e = DecodeEvent(R"({ "type": "pong" })");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kPong);
  EXPECT_FALSE(e->ends_answer());
}

TEST(NexoraCodec, AbsentFieldsAreEmptyAndNonStringResultsAreJson) {
  absl::StatusOr<Event> e = DecodeEvent(R"({"type":"tool_call","tool":"x"})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->json, "null");
  e = DecodeEvent(R"({"type":"sub_agent_complete","task_id":"t","result":{"n":1}})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->result, R"({"n":1})");
  e = DecodeEvent(R"({"type":"chunk","content":null})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->content, "");
  e = DecodeEvent(R"({"type":"error"})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->code, "");
  EXPECT_EQ(core::ErrorReason(EventError(*e)), "UNKNOWN_ERROR");
}

TEST(NexoraCodec, UnknownTypesPassThroughRawWithTheirRoute) {
  const std::string frame =
      R"({"type":"thinking","message_id":"m1","content":"hmm","extra":[1,{"a":null}]})";
  absl::StatusOr<Event> e = DecodeEvent(frame);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->kind, EventKind::kUnknown);
  EXPECT_EQ(e->type, "thinking");
  EXPECT_EQ(e->json, frame);
  EXPECT_EQ(e->message_id, "m1");
  EXPECT_EQ(e->content, "");  // unknown events are not interpreted
  EXPECT_FALSE(e->ends_answer());
  // An unknown event keeps flowing even when its route fields are odd.
  e = DecodeEvent(R"({"type":"status","message_id":5})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kUnknown);
  EXPECT_EQ(e->message_id, "");
  // Type names are case-sensitive: "Chunk" is not a chunk.
  e = DecodeEvent(R"({"type":"Chunk","content":"x"})");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->kind, EventKind::kUnknown);
}

TEST(NexoraCodec, RejectsMalformedFrames) {
  for (const char* bad :
       {"", "not json", "[]", "\"chunk\"", "{}", R"({"type":1})", R"({"type":null})",
        R"({"type":"chunk","content":5})", R"({"type":"chunk","message_id":[]})",
        R"({"type":"tool_call","tool":{}})", R"({"type":"error","code":1})",
        R"({"type":"sub_agent_start","agent_name":true})", R"({"type":"done"} x)",
        R"({"type":"duplicate","client_message_id":7})"}) {
    EXPECT_EQ(DecodeEvent(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  absl::Status st = DecodeEvent(R"({"type":"chunk","content":5})").status();
  EXPECT_NE(st.message().find("\"content\""), absl::string_view::npos) << st;
  // Deep but valid tool input is accepted up to the codec's depth limit.
  std::string deep = R"({"type":"tool_call","tool":"t","input":)";
  for (int i = 0; i < 50; ++i) deep += "[";
  for (int i = 0; i < 50; ++i) deep += "]";
  deep += "}";
  EXPECT_TRUE(DecodeEvent(deep).ok());
  std::string too_deep = R"({"type":"tool_call","input":)" + std::string(10000, '[');
  EXPECT_EQ(DecodeEvent(too_deep).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(NexoraCodec, MapsUpstreamErrorCodes) {
  struct Case {
    const char* code;
    absl::StatusCode status;
  };
  const Case cases[] = {
      {"all_providers_exhausted", absl::StatusCode::kUnavailable},
      {"rate_limited", absl::StatusCode::kResourceExhausted},
      {"token_expired", absl::StatusCode::kUnauthenticated},
      {"forbidden", absl::StatusCode::kPermissionDenied},
      {"chat_not_found", absl::StatusCode::kNotFound},
      {"invalid_message", absl::StatusCode::kInvalidArgument},
      {"timeout", absl::StatusCode::kDeadlineExceeded},
      {"internal_error", absl::StatusCode::kInternal},
      {"something_new", absl::StatusCode::kUnknown},
      {"ALL_PROVIDERS_EXHAUSTED", absl::StatusCode::kUnknown},
  };
  for (const Case& c : cases) {
    Event e;
    e.kind = EventKind::kError;
    e.code = c.code;
    e.message = "All LLM providers failed";
    absl::Status st = EventError(e);
    EXPECT_EQ(st.code(), c.status) << c.code;
    EXPECT_EQ(CodeForUpstreamError(c.code), c.status) << c.code;
    EXPECT_EQ(core::ErrorReason(st), c.code);
    EXPECT_NE(st.message().find(c.code), absl::string_view::npos) << st;
    EXPECT_NE(st.message().find("All LLM providers failed"), absl::string_view::npos) << st;
  }
}

TEST(NexoraCodec, DecodesLoginAnswers) {
  absl::StatusOr<LoginAnswer> a =
      DecodeLoginAnswer(R"({"access_token":"eyJ.x.y","token_type":"bearer","expires_in":900})");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->access_token, "eyJ.x.y");
  EXPECT_EQ(a->token_type, "bearer");
  EXPECT_EQ(a->expires_in_s, 900);
  a = DecodeLoginAnswer(R"({"access_token":"t"})");
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->expires_in_s.has_value());
  EXPECT_EQ(a->token_type, "");
  EXPECT_FALSE(DecodeLoginAnswer(R"({"access_token":"t","expires_in":-5})")->expires_in_s.has_value());
  for (const char* bad : {"", "[]", "{}", R"({"access_token":""})", R"({"access_token":7})",
                          R"({"token":"t"})"}) {
    absl::StatusOr<LoginAnswer> r = DecodeLoginAnswer(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal) << bad;
  }
}

TEST(NexoraCodec, DecodesCreateChatAnswers) {
  EXPECT_EQ(*DecodeCreateChatAnswer(R"({"id":"0f8fad5b-d9cb","agent_id":"a"})"), "0f8fad5b-d9cb");
  EXPECT_EQ(*DecodeCreateChatAnswer(R"({"id":42})"), "42");
  for (const char* bad : {"", "{}", R"({"id":null})", R"({"id":"a/b"})", R"({"id":""})", "[1]"}) {
    EXPECT_EQ(DecodeCreateChatAnswer(bad).status().code(), absl::StatusCode::kInternal) << bad;
  }
}

TEST(NexoraCodec, MapsHttpErrors) {
  struct Case {
    int status;
    const char* body;
    absl::StatusCode code;
    const char* text;  // expected in the message
  };
  const Case cases[] = {
      {401, R"({"detail":"Invalid email or password"})", absl::StatusCode::kUnauthenticated,
       "Invalid email or password"},
      {403, R"({"message":"no access"})", absl::StatusCode::kPermissionDenied, "no access"},
      {404, R"({"detail":"Agent not found"})", absl::StatusCode::kNotFound, "Agent not found"},
      {422, R"({"detail":[{"loc":["body","agent_id"],"msg":"field required"}]})",
       absl::StatusCode::kInvalidArgument, "field required"},
      {429, "", absl::StatusCode::kResourceExhausted, "HTTP 429"},
      {500, "Internal Server Error", absl::StatusCode::kUnavailable, "Internal Server Error"},
      {503, R"({"error":"maintenance"})", absl::StatusCode::kUnavailable, "maintenance"},
      {418, "{}", absl::StatusCode::kUnknown, "HTTP 418"},
  };
  for (const Case& c : cases) {
    absl::Status st = HttpError(c.status, c.body, "create chat");
    EXPECT_EQ(st.code(), c.code) << c.status;
    EXPECT_EQ(core::ErrorReason(st), "HTTP_" + std::to_string(c.status));
    EXPECT_NE(st.message().find(c.text), absl::string_view::npos) << st;
    EXPECT_NE(st.message().find("create chat"), absl::string_view::npos) << st;
  }
}

}  // namespace
}  // namespace wsbridge::nexora
