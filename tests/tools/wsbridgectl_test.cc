// wsbridgectl as an operator runs it: a separate process against the real wsbridged
// binary (gRPC on 127.0.0.1 port 0 and a Unix socket, a bearer token) bridging to the
// real wsbridge-emulator's DFX API.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tests/support/child_process.h"
#include "tests/support/test_support.h"
#include "tests/upstreams/dfx_protocol.h"

namespace wsbridge::ctltest {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using wsbridge::testing::ChildProcess;
using wsbridge::testing::TempDir;
using wsbridge::testing::WaitFor;

constexpr char kToken[] = "ctl-test-token";
constexpr auto kProcessTimeout = std::chrono::seconds(60);

// A child process with stdin and stdout on pipes and stderr in a file.
class Process : public ChildProcess {
 public:
  Process(const std::string& path, std::vector<std::string> args, const std::string& stderr_path,
          const std::map<std::string, std::string>& env = {})
      : ChildProcess(path, std::move(args),
                     {.stderr_path = stderr_path, .stdin_pipe = true, .env = env}) {}
};

boost::json::object ParseObject(const std::string& text) {
  boost::system::error_code ec;
  auto value = boost::json::parse(text, ec);
  if (ec || !value.is_object()) {
    ADD_FAILURE() << "not a JSON object: " << text;
    return {};
  }
  return value.as_object();
}

std::string Str(const boost::json::object& object, const char* key) {
  auto* v = object.if_contains(key);
  return v != nullptr && v->is_string() ? std::string(v->as_string()) : std::string();
}

// A result's json_body (the upstream's JSON) -> its ChunkOrder.
int64_t ChunkOrderOf(const boost::json::object& result) {
  auto body = ParseObject(Str(result, "json_body"));
  auto* order = body.if_contains("ChunkOrder");
  return order != nullptr && order->is_int64() ? order->as_int64() : -1;
}

struct Result {
  int exit_code = -99;
  std::string out;
  std::string err;
};

// The daemon and the emulator are shared by the tests of one process (ctest runs each
// test in a process of its own).
class WsbridgectlTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    emulator_ = new Process(EMULATOR_PATH, {"--dfx", "127.0.0.1:0"},
                            dir_->path() + "/emulator.stderr");
    ASSERT_TRUE(emulator_->spawned());
    auto line = emulator_->ReadLine(std::chrono::seconds(30));
    ASSERT_TRUE(line.has_value()) << emulator_->Stderr();
    const std::string url = Str(ParseObject(*line), "url");
    ASSERT_THAT(url, StartsWith("ws://127.0.0.1:"));

    unix_socket_ = new std::string(dir_->path() + "/wsbridged.sock");
    const std::string config = dir_->WriteFile(
        "wsbridged.yaml",
        absl::StrCat("server:\n"
                     "  listen: \"127.0.0.1:0\"\n"
                     "  unix_socket: ", *unix_socket_, "\n"
                     "  auth_token: {value: ", kToken, "}\n"
                     "log:\n"
                     "  format: json\n"
                     "  level: info\n"
                     "shutdown:\n"
                     "  drain_timeout: 1s\n"
                     "  deadline: 5s\n"
                     "bridges:\n"
                     "  - name: dfx\n"
                     "    dfx:\n"
                     "      upstream:\n"
                     "        url: ", url, "\n"
                     "        allow_plaintext: true\n"
                     "      device_token: {value: ctl-test-device}\n"
                     "      allow_call_token: true\n"));
    daemon_ = new Process(WSBRIDGED_PATH, {"--config", config}, dir_->path() + "/wsbridged.stderr");
    ASSERT_TRUE(daemon_->spawned());
    grpc_ = new std::string();
    while (auto out = daemon_->ReadLine(std::chrono::seconds(30))) {
      auto object = ParseObject(*out);
      if (Str(object, "event") == "listening") {
        *grpc_ = Str(object, "grpc");
        break;
      }
    }
    ASSERT_FALSE(grpc_->empty()) << daemon_->Stderr();
  }

  static void TearDownTestSuite() {
    for (Process* p : {daemon_, emulator_}) {
      if (p == nullptr) continue;
      p->Signal(SIGTERM);
      p->WaitExit(std::chrono::seconds(30));  // else the destructor kills it
      delete p;
    }
    daemon_ = emulator_ = nullptr;
    delete grpc_;
    delete unix_socket_;
    delete dir_;
  }

  // Starts wsbridgectl; `args` follow --target (the TCP listener).
  std::unique_ptr<Process> Start(std::vector<std::string> args,
                                 const std::map<std::string, std::string>& env = {}) {
    args.insert(args.begin(), {"--target", *grpc_});
    const std::string err = absl::StrCat(dir_->path(), "/ctl-", ++runs_, ".stderr");
    auto p = std::make_unique<Process>(WSBRIDGECTL_PATH, std::move(args), err, env);
    EXPECT_TRUE(p->spawned());
    return p;
  }

  // Runs wsbridgectl to completion with `input` on stdin.
  Result Run(std::vector<std::string> args, const std::string& input = "",
             const std::map<std::string, std::string>& env = {}) {
    auto p = Start(std::move(args), env);
    Result r;
    p->WriteStdin(input);
    p->CloseStdin();
    r.out = p->ReadAll(kProcessTimeout);
    r.exit_code = p->WaitExitCode(kProcessTimeout).value_or(-98);
    r.err = p->Stderr();
    return r;
  }

  // The same with the bearer token.
  Result RunAuthed(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), {"--token", kToken});
    return Run(std::move(args), input);
  }

  std::string CreateMeasurement() {
    Result r = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                          R"({"study_id":"ctl-test"})"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::string id = Str(ParseObject(r.out), "measurement_id");
    EXPECT_FALSE(id.empty()) << r.out;
    return id;
  }

  // One StreamMeasurement request line: an emulator SDK chunk, base64 in the JSON.
  static std::string ChunkLine(const std::string& measurement_id, const char* stage,
                               uint32_t order, bool subscribe = false) {
    boost::json::object chunk;
    if (!measurement_id.empty()) chunk["measurement_id"] = measurement_id;
    chunk["stage"] = stage;
    chunk["payload"] = absl::Base64Escape(emulator::MakeEmulatorChunk(order, 100, "ctl"));
    chunk["duration_ms"] = 100;
    if (subscribe) chunk["subscribe_results"] = true;
    return boost::json::serialize(chunk) + "\n";
  }

  static inline TempDir* dir_ = nullptr;
  static inline Process* emulator_ = nullptr;
  static inline Process* daemon_ = nullptr;
  static inline std::string* grpc_ = nullptr;
  static inline std::string* unix_socket_ = nullptr;
  int runs_ = 0;
};

TEST_F(WsbridgectlTest, HealthIsServingForTheDaemonAndEachService) {
  for (std::string service : {"", "wsbridge.dfx.v1.DfxService", "wsbridge.admin.v1.AdminService"}) {
    Result r;
    // Published before the daemon reports listening; a bridge's own health may follow its
    // upstream, hence the wait.
    EXPECT_TRUE(WaitFor(
        [&] {
          r = Run(service.empty() ? std::vector<std::string>{"health"}
                                  : std::vector<std::string>{"health", service});
          return r.exit_code == 0;
        },
        std::chrono::seconds(30)))
        << service << ": " << r.err;
    EXPECT_EQ(r.out, "SERVING\n") << service;
  }
}

TEST_F(WsbridgectlTest, HealthOfAnUnknownServiceIsNotFound) {
  Result r = Run({"health", "no.such.v1.Service"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("NOT_FOUND: "));
}

TEST_F(WsbridgectlTest, SessionsListsAndClosesUpstreamSessions) {
  CreateMeasurement();  // opens the bridge's upstream session

  Result table = RunAuthed({"sessions"});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  std::vector<std::string> lines = absl::StrSplit(table.out, '\n', absl::SkipEmpty());
  ASSERT_GE(lines.size(), 2u) << table.out;
  EXPECT_THAT(lines[0], StartsWith("ID "));
  EXPECT_THAT(lines[0], HasSubstr("STATE"));
  // The ready session (one per device token; earlier ones may still show as closed).
  std::string id;
  for (size_t i = 1; i < lines.size(); ++i) {
    std::vector<std::string> row = absl::StrSplit(lines[i], ' ', absl::SkipEmpty());
    ASSERT_GE(row.size(), 3u) << lines[i];
    EXPECT_THAT(row[0], StartsWith("dfx/"));
    EXPECT_EQ(row[1], "dfx");
    if (row[2] == "ready") id = row[0];
  }
  ASSERT_FALSE(id.empty()) << table.out;

  Result json = RunAuthed({"sessions", "--bridge", "dfx", "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.err;
  bool listed = false;
  const auto listing = ParseObject(json.out);
  ASSERT_TRUE(listing.contains("sessions")) << json.out;
  std::string connected_since;
  for (const auto& session : listing.at("sessions").as_array()) {
    if (Str(session.as_object(), "id") != id) continue;
    listed = true;
    connected_since = Str(session.as_object(), "connected_since");
    EXPECT_FALSE(connected_since.empty()) << json.out;
    EXPECT_EQ(Str(session.as_object(), "state"), "SESSION_STATE_READY");
    EXPECT_EQ(Str(session.as_object(), "bridge"), "dfx");
    // --json prints every field, zeros included.
    EXPECT_TRUE(session.as_object().contains("reconnects")) << json.out;
  }
  EXPECT_TRUE(listed) << json.out;

  Result unknown_bridge = RunAuthed({"sessions", "--bridge", "nope"});
  EXPECT_EQ(unknown_bridge.exit_code, 1);
  EXPECT_THAT(unknown_bridge.err, StartsWith("NOT_FOUND: no bridge named \"nope\""));

  Result closed = RunAuthed({"close-session", id});
  EXPECT_EQ(closed.exit_code, 0) << closed.err;
  EXPECT_EQ(closed.out, "closed " + id + "\n");
  EXPECT_TRUE(WaitFor(
      [&] {
        Result now = RunAuthed({"sessions", "--json"});
        if (now.exit_code != 0) return false;
        const auto listing = ParseObject(now.out);
        if (!listing.contains("sessions")) return true;  // none at all
        for (const auto& session : listing.at("sessions").as_array()) {
          // The bridge may reopen its configured session at once: a new connection.
          if (Str(session.as_object(), "id") == id &&
              Str(session.as_object(), "state") == "SESSION_STATE_READY" &&
              Str(session.as_object(), "connected_since") == connected_since) {
            return false;
          }
        }
        return true;
      },
      std::chrono::seconds(30)))
      << "the closed session still shows as the same ready connection";

  Result again = RunAuthed({"close-session", "dfx/no-such-session"});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_THAT(again.err, StartsWith("NOT_FOUND: "));
  Result no_bridge = RunAuthed({"close-session", "nobridge/x"});
  EXPECT_EQ(no_bridge.exit_code, 1);
  EXPECT_THAT(no_bridge.err, StartsWith("NOT_FOUND: no session \"nobridge/x\""));
}

// Reflection lookups carry the token too (a daemon may require it for reflection).
TEST_F(WsbridgectlTest, ListAndDescribeThroughReflection) {
  Result services = RunAuthed({"list"});
  ASSERT_EQ(services.exit_code, 0) << services.err;
  EXPECT_THAT(services.out, HasSubstr("wsbridge.dfx.v1.DfxService\n"));
  EXPECT_THAT(services.out, HasSubstr("wsbridge.admin.v1.AdminService\n"));
  EXPECT_THAT(services.out, HasSubstr("grpc.health.v1.Health\n"));

  Result methods = RunAuthed({"list", "wsbridge.admin.v1.AdminService"});
  ASSERT_EQ(methods.exit_code, 0) << methods.err;
  EXPECT_EQ(methods.out,
            "wsbridge.admin.v1.AdminService/ListSessions\n"
            "wsbridge.admin.v1.AdminService/CloseSession\n");

  Result service = RunAuthed({"describe", "wsbridge.dfx.v1.DfxService"});
  ASSERT_EQ(service.exit_code, 0) << service.err;
  EXPECT_THAT(service.out, HasSubstr("service DfxService {"));
  EXPECT_THAT(service.out,
              HasSubstr("rpc SubscribeResults(.wsbridge.dfx.v1.SubscribeResultsRequest) returns "
                        "(stream .wsbridge.dfx.v1.SubscribeResultsResponse);"));

  Result method = RunAuthed({"describe", "wsbridge.dfx.v1.DfxService/CreateMeasurement"});
  ASSERT_EQ(method.exit_code, 0) << method.err;
  EXPECT_THAT(method.out, HasSubstr("message CreateMeasurementRequest {"));
  EXPECT_THAT(method.out, HasSubstr("string study_id = 1;"));
  EXPECT_THAT(method.out, HasSubstr("message CreateMeasurementResponse {"));

  // A message whose field types live in another file (google/protobuf/timestamp.proto).
  Result message = RunAuthed({"describe", "wsbridge.admin.v1.Session"});
  ASSERT_EQ(message.exit_code, 0) << message.err;
  EXPECT_THAT(message.out, HasSubstr(".google.protobuf.Timestamp connected_since = 5;"));
  Result enum_type = RunAuthed({"describe", "wsbridge.dfx.v1.Stage"});
  ASSERT_EQ(enum_type.exit_code, 0) << enum_type.err;
  EXPECT_THAT(enum_type.out, HasSubstr("STAGE_LAST = 3;"));

  Result missing = RunAuthed({"describe", "wsbridge.dfx.v1.NoSuchThing"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, StartsWith("NOT_FOUND: "));
  EXPECT_THAT(missing.err, HasSubstr("wsbridge.dfx.v1.DfxService"));  // what there is
}

TEST_F(WsbridgectlTest, CallUnaryTakesAndPrintsJson) {
  Result r = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/Call", R"({"action_id":"0100"})"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  auto response = ParseObject(r.out);
  EXPECT_EQ(response.at("status").as_int64(), 200);
  auto body = ParseObject(Str(response, "json_body"));
  EXPECT_EQ(Str(body, "Version"), "emulator");
  EXPECT_EQ(Str(body, "Status"), "OK");

  // From stdin ("-" and no argument), with the lowerCamelCase JSON name; the dotted
  // method form works too.
  Result dash = RunAuthed({"call", "wsbridge.dfx.v1.DfxService.CreateMeasurement", "-"},
                          R"({"studyId":"from-stdin"})");
  ASSERT_EQ(dash.exit_code, 0) << dash.err;
  Result absent = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement"},
                            "{\n  \"study_id\": \"multi-line\"\n}\n");
  ASSERT_EQ(absent.exit_code, 0) << absent.err;
  const std::string a = Str(ParseObject(dash.out), "measurement_id");
  const std::string b = Str(ParseObject(absent.out), "measurement_id");
  EXPECT_FALSE(a.empty());
  EXPECT_FALSE(b.empty());
  EXPECT_NE(a, b);
}

TEST_F(WsbridgectlTest, ServerStreamPrintsEachMessageAsItArrives) {
  const std::string measurement = CreateMeasurement();
  // -v: the subscriber reports the response headers, which the bridge sends once the
  // upstream acknowledged the subscription; chunks sent after that all have results.
  auto subscriber = Start({"--token", kToken, "-v", "call",
                           "wsbridge.dfx.v1.DfxService/SubscribeResults",
                           R"({"measurement_id":")" + measurement + R"("})"});
  subscriber->CloseStdin();
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(subscriber->Stderr(), "< headers"); },
                      std::chrono::seconds(30)))
      << subscriber->Stderr();

  // A bidi stream fed line by line: each chunk's result reaches the subscriber before
  // the next chunk is written, so each arrives as a message of its own.
  auto sender = Start({"--token", kToken, "call", "wsbridge.dfx.v1.DfxService/StreamMeasurement"});
  const char* stages[] = {"STAGE_FIRST", "STAGE_CHUNK", "STAGE_LAST"};
  for (uint32_t order = 0; order < 3; ++order) {
    ASSERT_TRUE(sender->WriteStdin(ChunkLine(order == 0 ? measurement : "", stages[order], order)));
    auto accepted = sender->ReadLine(std::chrono::seconds(30));
    ASSERT_TRUE(accepted.has_value()) << sender->Stderr();
    EXPECT_TRUE(ParseObject(*accepted).contains("chunk_accepted")) << *accepted;
    auto line = subscriber->ReadLine(std::chrono::seconds(30));
    ASSERT_TRUE(line.has_value()) << "no result for chunk " << order << "\n" << subscriber->Stderr();
    auto results = ParseObject(*line).at("results").as_array();
    ASSERT_EQ(results.size(), 1u) << *line;
    EXPECT_EQ(Str(results[0].as_object(), "measurement_id"), measurement);
    EXPECT_EQ(ChunkOrderOf(results[0].as_object()), static_cast<int64_t>(order)) << *line;
  }
  // The bridge ends the results stream OK after LAST's result; stdin EOF ends the other.
  EXPECT_EQ(subscriber->WaitExitCode(kProcessTimeout).value_or(-98), 0) << subscriber->Stderr();
  sender->CloseStdin();
  EXPECT_EQ(sender->WaitExitCode(kProcessTimeout).value_or(-98), 0) << sender->Stderr();
  EXPECT_EQ(sender->ReadAll(kProcessTimeout), "");
  EXPECT_EQ(subscriber->ReadAll(kProcessTimeout), "");
}

TEST_F(WsbridgectlTest, BidiStreamFromStdinEndsAtEof) {
  const std::string measurement = CreateMeasurement();
  std::string input = ChunkLine(measurement, "STAGE_FIRST", 0, /*subscribe=*/true) +
                      ChunkLine("", "STAGE_CHUNK", 1) + ChunkLine("", "STAGE_LAST", 2);
  Result r = RunAuthed(
      {"--emit-defaults", "call", "wsbridge.dfx.v1.DfxService/StreamMeasurement"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<int64_t> accepted, results;
  const std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  for (const std::string& line : lines) {
    auto event = ParseObject(line);
    if (auto* chunk = event.if_contains("chunk_accepted")) {
      // --emit-defaults: chunk_order 0 is printed too.
      accepted.push_back(chunk->as_object().at("chunk_order").as_int64());
    } else if (auto* result = event.if_contains("result")) {
      EXPECT_EQ(Str(result->as_object(), "measurement_id"), measurement);
      results.push_back(ChunkOrderOf(result->as_object()));
    } else {
      ADD_FAILURE() << "unexpected event " << line;
    }
  }
  EXPECT_EQ(accepted, (std::vector<int64_t>{0, 1, 2})) << r.out;
  EXPECT_EQ(results, (std::vector<int64_t>{0, 1, 2})) << r.out;
}

TEST_F(WsbridgectlTest, BadJsonIsAUsageErrorNamingTheProblem) {
  Result unknown_field = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                                    R"({"study_idd":"x"})"});
  EXPECT_EQ(unknown_field.exit_code, 2);
  EXPECT_THAT(unknown_field.err, HasSubstr("study_idd"));
  EXPECT_EQ(unknown_field.out, "");

  Result wrong_type = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                                 R"({"resolution":"fast"})"});
  EXPECT_EQ(wrong_type.exit_code, 2);
  EXPECT_THAT(wrong_type.err, HasSubstr("resolution"));

  Result truncated = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                                R"({"study_id":)"});
  EXPECT_EQ(truncated.exit_code, 2);
  EXPECT_THAT(truncated.err, HasSubstr("the JSON argument is not a valid "
                                       "wsbridge.dfx.v1.CreateMeasurementRequest"));

  // In a stream, the bad line is named by its place and ends the call.
  Result stream = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/StreamMeasurement"},
                            R"({"stage":"STAGE_NOPE"})" "\n");
  EXPECT_EQ(stream.exit_code, 2);
  EXPECT_THAT(stream.err, HasSubstr("request 1 on stdin"));
  EXPECT_THAT(stream.err, HasSubstr("STAGE_NOPE"));

  // One request for a unary method: two objects are refused.
  Result two = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/CreateMeasurement"},
                         "{}\n{}\n");
  EXPECT_EQ(two.exit_code, 2);
  EXPECT_THAT(two.err, HasSubstr("takes one request"));
}

TEST_F(WsbridgectlTest, ErrorStatusPrintsCodeMessageAndErrorInfo) {
  const std::string measurement = CreateMeasurement();
  // A CHUNK before any FIRST: the upstream refuses it as MISALIGNED_CHUNK.
  Result r = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/StreamMeasurement"},
                       ChunkLine(measurement, "STAGE_CHUNK", 1));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("FAILED_PRECONDITION: "));
  EXPECT_THAT(r.err, HasSubstr("\n  reason: MISALIGNED_CHUNK\n"));
  EXPECT_THAT(r.err, HasSubstr("\n  domain: dfx.wsbridge.dev\n"));
  EXPECT_THAT(r.err, HasSubstr("\n  metadata: last_acked_chunk_order=-1\n"));
  EXPECT_THAT(r.err, HasSubstr("\n  metadata: measurement_id=" + measurement + "\n"));
}

TEST_F(WsbridgectlTest, ServerEndingABidiStreamEndsTheCallWithStdinStillOpen) {
  const std::string measurement = CreateMeasurement();
  auto p = Start({"--token", kToken, "call", "wsbridge.dfx.v1.DfxService/StreamMeasurement"});
  ASSERT_TRUE(p->WriteStdin(ChunkLine(measurement, "STAGE_CHUNK", 1)));
  // stdin stays open: the server's error alone must end wsbridgectl.
  EXPECT_EQ(p->WaitExitCode(kProcessTimeout).value_or(-98), 1) << p->Stderr();
  EXPECT_THAT(p->Stderr(), StartsWith("FAILED_PRECONDITION: "));
  EXPECT_THAT(p->Stderr(), HasSubstr("\n  reason: MISALIGNED_CHUNK\n"));
}

TEST_F(WsbridgectlTest, HeaderFlagSendsMetadata) {
  // The DFX bridge takes a per-call device token from metadata; the emulator refuses
  // tokens starting "bad", so the answer shows the header arrived.
  Result refused = RunAuthed({"-H", "X-DFX-Device-Token=bad-ctl-token", "call",
                              "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                              R"({"study_id":"ctl-test"})"});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_THAT(refused.err, StartsWith("UNAUTHENTICATED: "));
  EXPECT_THAT(refused.err, HasSubstr("\n  reason: INVALID_TOKEN\n"));
  Result accepted = RunAuthed({"-H", "x-dfx-device-token=ctl-other-device", "call",
                               "wsbridge.dfx.v1.DfxService/CreateMeasurement",
                               R"({"study_id":"ctl-test"})"});
  EXPECT_EQ(accepted.exit_code, 0) << accepted.err;
  EXPECT_THAT(accepted.out, HasSubstr("measurement_id"));
}

TEST_F(WsbridgectlTest, TimeoutEndsAStreamWithDeadlineExceeded) {
  const std::string measurement = CreateMeasurement();
  // No chunk is ever sent: only the deadline can end this subscription.
  Result r = RunAuthed({"--timeout", "0.5", "call", "wsbridge.dfx.v1.DfxService/SubscribeResults",
                        R"({"measurement_id":")" + measurement + R"("})"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, StartsWith("DEADLINE_EXCEEDED: "));
}

TEST_F(WsbridgectlTest, BearerTokenIsRequiredAndSent) {
  Result none = Run({"sessions"});
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_THAT(none.err, StartsWith("UNAUTHENTICATED: "));
  Result wrong = Run({"--token", "not-the-token", "sessions"});
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_THAT(wrong.err, StartsWith("UNAUTHENTICATED: "));
  Result call = Run({"call", "wsbridge.dfx.v1.DfxService/Call", R"({"action_id":"0100"})"});
  EXPECT_EQ(call.exit_code, 1);
  EXPECT_THAT(call.err, StartsWith("UNAUTHENTICATED: "));

  Result flag = Run({"sessions", "--token", kToken});  // global flags after the command
  EXPECT_EQ(flag.exit_code, 0) << flag.err;
  EXPECT_THAT(flag.out, StartsWith("ID "));
  Result env = Run({"sessions"}, "", {{"WSBRIDGE_TOKEN", kToken}});
  EXPECT_EQ(env.exit_code, 0) << env.err;
}

TEST_F(WsbridgectlTest, UnixSocketTarget) {
  const std::string target = "unix:" + *unix_socket_;
  // The later --target wins over the TCP one Run() puts first.
  Result health = Run({"--target", target, "health"});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(health.out, "SERVING\n");
  Result call = Run({"--target", target, "--token", kToken, "call",
                     "wsbridge.dfx.v1.DfxService/Call", R"({"action_id":"0100"})"});
  EXPECT_EQ(call.exit_code, 0) << call.err;
  EXPECT_EQ(ParseObject(call.out).at("status").as_int64(), 200);

  // WSBRIDGE_TARGET is the default target.
  auto p = std::make_unique<Process>(
      WSBRIDGECTL_PATH, std::vector<std::string>{"list"}, dir_->path() + "/env-target.stderr",
      std::map<std::string, std::string>{{"WSBRIDGE_TARGET", target}, {"WSBRIDGE_TOKEN", kToken}});
  p->CloseStdin();
  const std::string out = p->ReadAll(kProcessTimeout);
  EXPECT_EQ(p->WaitExitCode(kProcessTimeout).value_or(-98), 0) << p->Stderr();
  EXPECT_THAT(out, HasSubstr("wsbridge.dfx.v1.DfxService\n"));
}

TEST_F(WsbridgectlTest, UnreachableDaemonIsAnErrorNotAUsageError) {
  // A bound but not listening socket: connections to its port are refused.
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string target = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  for (std::vector<std::string> args :
       {std::vector<std::string>{"health"}, {"list"}, {"describe", "x.Y"},
        {"call", "wsbridge.dfx.v1.DfxService/Call", "{}"}}) {
    args.insert(args.begin(), {"--target", target});
    Result r = Run(args);
    EXPECT_EQ(r.exit_code, 1) << args.back() << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr("UNAVAILABLE: ")) << args.back();
  }
  close(fd);
}

TEST_F(WsbridgectlTest, UsageErrorsExit2AndHelpIsEverywhere) {
  struct Case {
    std::vector<std::string> args;
    const char* says;
  };
  for (const Case& c : std::vector<Case>{
           {{"frobnicate"}, "unknown command \"frobnicate\""},
           {{"close-session"}, "close-session takes one session ID"},
           {{"--timeout", "soon", "health"}, "--timeout: \"soon\""},
           {{"-H", "no-equals-sign", "health"}, "-H: \"no-equals-sign\" is not KEY=VALUE"},
           {{"--cert", "/dev/null", "health"}, "--cert and --key go together"},
           {{"sessions", "--frob"}, "unexpected argument \"--frob\""},
           {{"call"}, "call takes METHOD"},
           {{"call", "wsbridge.dfx.v1.DfxService", "{}"}, "is a service; name a method"},
           {{"help", "nope"}, "no command \"nope\""},
       }) {
    std::vector<std::string> args = c.args;
    args.insert(args.begin(), {"--token", kToken});
    Result r = Run(args);
    EXPECT_EQ(r.exit_code, 2) << c.args.front() << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.says));
  }
  Result bare = Run({});
  EXPECT_EQ(bare.exit_code, 2);
  EXPECT_THAT(bare.err, HasSubstr("usage: wsbridgectl"));

  Result no_method = RunAuthed({"call", "wsbridge.dfx.v1.DfxService/NoSuchMethod", "{}"});
  EXPECT_EQ(no_method.exit_code, 1);
  EXPECT_THAT(no_method.err, StartsWith("NOT_FOUND: no method"));

  Result help = Run({"--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, StartsWith("usage: wsbridgectl [global flags] <command>"));
  for (const char* command :
       {"health", "sessions", "close-session", "list", "describe", "call", "help"}) {
    const std::string usage = absl::StrCat("usage: wsbridgectl ", command);
    Result flag = Run({command, "--help"});
    EXPECT_EQ(flag.exit_code, 0) << command;
    EXPECT_THAT(flag.out, StartsWith(usage));
    Result via_help = Run({"help", command});
    EXPECT_EQ(via_help.exit_code, 0) << command;
    EXPECT_EQ(via_help.out, flag.out);
  }
}

// TLS and mTLS to a daemon of its own (no bridges: health and reflection are enough).
TEST(WsbridgectlTlsTest, TlsAndMutualTls) {
  wsbridge::testing::TestPki pki;
  const auto ca = pki.MakeCa("ctl-test-ca");
  const auto server = pki.IssueServerCert(ca, {"localhost", "127.0.0.1"});
  const auto client_ca = pki.MakeCa("ctl-test-clients");
  const auto client = pki.IssueClientCert(client_ca, "operator");
  TempDir dir;
  const std::string config = dir.WriteFile(
      "wsbridged.yaml", absl::StrCat("server:\n"
                                     "  listen: \"127.0.0.1:0\"\n"
                                     "  tls:\n"
                                     "    cert_file: ", server.cert_file, "\n"
                                     "    key_file: ", server.key_file, "\n"
                                     "    client_ca_file: ", client_ca.cert_file, "\n"
                                     "    require_client_cert: true\n"
                                     "shutdown:\n"
                                     "  drain_timeout: 1s\n"
                                     "  deadline: 5s\n"));
  Process daemon(WSBRIDGED_PATH, {"--config", config}, dir.path() + "/wsbridged.stderr");
  ASSERT_TRUE(daemon.spawned());
  std::string grpc;
  while (auto out = daemon.ReadLine(std::chrono::seconds(30))) {
    auto object = ParseObject(*out);
    if (Str(object, "event") == "listening") {
      grpc = Str(object, "grpc");
      break;
    }
  }
  ASSERT_FALSE(grpc.empty()) << daemon.Stderr();
  int runs = 0;
  auto run = [&](std::vector<std::string> args) {
    auto p = std::make_unique<Process>(WSBRIDGECTL_PATH, std::move(args),
                                       absl::StrCat(dir.path(), "/ctl-", ++runs, ".stderr"));
    p->CloseStdin();
    Result r;
    r.out = p->ReadAll(kProcessTimeout);
    r.exit_code = p->WaitExitCode(kProcessTimeout).value_or(-98);
    r.err = p->Stderr();
    return r;
  };

  // The certificate names 127.0.0.1 and localhost: by the target's address, or by a name
  // given with --server-name. (Addresses only: no DNS lookups in tests.)
  Result by_name = run({"--target", grpc, "--ca", ca.cert_file, "--cert",
                        client.cert_file, "--key", client.key_file, "health"});
  EXPECT_EQ(by_name.exit_code, 0) << by_name.err;
  EXPECT_EQ(by_name.out, "SERVING\n");
  Result by_address = run({"--target", grpc, "--server-name", "localhost", "--ca", ca.cert_file,
                           "--cert", client.cert_file, "--key", client.key_file, "list"});
  EXPECT_EQ(by_address.exit_code, 0) << by_address.err;
  EXPECT_THAT(by_address.out, HasSubstr("grpc.health.v1.Health\n"));

  // Refused: no client certificate; plaintext to a TLS port; a CA that did not sign it.
  const auto other_ca = pki.MakeCa("ctl-test-other");
  for (std::vector<std::string> args :
       {std::vector<std::string>{"--target", grpc, "--ca", ca.cert_file},
        std::vector<std::string>{"--target", grpc},
        std::vector<std::string>{"--target", grpc, "--ca", other_ca.cert_file, "--cert",
                                 client.cert_file, "--key", client.key_file},
        std::vector<std::string>{"--target", grpc, "--server-name", "not-in-the-cert.example",
                                 "--ca", ca.cert_file, "--cert", client.cert_file, "--key",
                                 client.key_file}}) {
    args.push_back("health");
    Result r = run(args);
    EXPECT_EQ(r.exit_code, 1) << absl::StrJoin(args, " ");
    EXPECT_THAT(r.err, StartsWith("UNAVAILABLE: ")) << absl::StrJoin(args, " ");
  }
  Result missing = run({"--target", grpc, "--ca", dir.path() + "/no-such-ca.pem", "health"});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_THAT(missing.err, HasSubstr("--ca: cannot read"));

  daemon.Signal(SIGTERM);
  EXPECT_EQ(daemon.WaitExitCode(kProcessTimeout).value_or(-98), 0) << daemon.Stderr();
}

}  // namespace
}  // namespace wsbridge::ctltest
