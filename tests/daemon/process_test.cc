// Process-level tests: the real wsbridged binary, spawned with posix_spawn, driven over
// its listeners and with signals.
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <boost/json.hpp>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include "clients.h"
#include "tests/support/child_process.h"
#include "tests/support/test_support.h"

namespace wsbridge::daemontest {
namespace {

using grpc::health::v1::HealthCheckResponse;
using wsbridge::testing::ChildProcess;
using wsbridge::testing::TempDir;
using wsbridge::testing::WaitFor;

// The wsbridged binary with stdout on a pipe and stderr in a file.
class DaemonProcess : public ChildProcess {
 public:
  DaemonProcess(std::vector<std::string> args, const std::string& stderr_path)
      : ChildProcess(WSBRIDGED_PATH, std::move(args), {.stderr_path = stderr_path}) {}
};

struct Listening {
  std::string grpc;
  std::string unix_socket;
  int admin_port = 0;
};

// Reads stdout until the `{"event":"listening",...}` line.
std::optional<Listening> AwaitListening(DaemonProcess& process) {
  while (auto line = process.ReadLine(std::chrono::seconds(30))) {
    boost::system::error_code ec;
    auto value = boost::json::parse(*line, ec);
    if (ec || !value.is_object()) continue;
    const auto& object = value.as_object();
    if (!object.contains("event") || object.at("event") != "listening") continue;
    Listening result;
    if (object.contains("grpc")) result.grpc = std::string(object.at("grpc").as_string());
    if (object.contains("unix")) result.unix_socket = std::string(object.at("unix").as_string());
    if (object.contains("admin")) {
      std::string admin(object.at("admin").as_string());
      result.admin_port = std::stoi(admin.substr(admin.rfind(':') + 1));
    }
    return result;
  }
  return std::nullopt;
}

std::string Config(const TempDir& dir, const std::string& drain, const std::string& deadline) {
  return "server:\n"
         "  listen: \"127.0.0.1:0\"\n"
         "  unix_socket: " + dir.path() + "/wsbridged.sock\n"
         "  unix_socket_mode: \"0600\"\n"
         "admin:\n"
         "  listen: \"127.0.0.1:0\"\n"
         "log:\n"
         "  format: json\n"
         "  level: info\n"
         "shutdown:\n"
         "  drain_timeout: " + drain + "\n"
         "  deadline: " + deadline + "\n";
}

TEST(ProcessTest, CheckAcceptsAGoodConfig) {
  TempDir dir;
  const std::string config = dir.WriteFile("good.yaml", Config(dir, "1s", "5s"));
  DaemonProcess process({"--config", config, "--check"}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  const std::string out = process.ReadAll(std::chrono::seconds(30));
  auto status = process.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0) << process.Stderr();
  EXPECT_EQ(out, "config OK\n");
}

TEST(ProcessTest, CheckRejectsABadConfigWithPositions) {
  TempDir dir;
  const std::string config = dir.WriteFile("bad.yaml",
                                           "server:\n"
                                           "  listen: \"127.0.0.1:0\"\n"
                                           "  lisen_typo: 1\n");
  DaemonProcess process({"--config", config, "--check"}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  const std::string out = process.ReadAll(std::chrono::seconds(30));
  auto status = process.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 2);
  EXPECT_EQ(out.find("config OK"), std::string::npos);
  const std::string err = process.Stderr();
  EXPECT_NE(err.find("bad.yaml:3:"), std::string::npos) << err;
  EXPECT_NE(err.find("server.lisen_typo"), std::string::npos) << err;
}

TEST(ProcessTest, UnknownArgumentIsAUsageError) {
  TempDir dir;
  DaemonProcess process({"--frobnicate"}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  auto status = process.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(WEXITSTATUS(*status), 2);
  EXPECT_NE(process.Stderr().find("--frobnicate"), std::string::npos);
}

TEST(ProcessTest, VersionAndHelp) {
  TempDir dir;
  {
    DaemonProcess process({"--version"}, dir.path() + "/stderr.txt");
    const std::string out = process.ReadAll(std::chrono::seconds(30));
    EXPECT_EQ(process.WaitExit(std::chrono::seconds(30)).value_or(-1), 0);
    EXPECT_EQ(out.rfind("wsbridged ", 0), 0u) << out;
  }
  {
    DaemonProcess process({"--help"}, dir.path() + "/stderr.txt");
    const std::string out = process.ReadAll(std::chrono::seconds(30));
    EXPECT_EQ(process.WaitExit(std::chrono::seconds(30)).value_or(-1), 0);
    EXPECT_NE(out.find("--config FILE"), std::string::npos) << out;
    EXPECT_NE(out.find("second signal"), std::string::npos) << out;
  }
}

TEST(ProcessTest, ServesAndExitsCleanlyOnSigterm) {
  TempDir dir;
  const std::string config = dir.WriteFile("wsbridged.yaml", Config(dir, "1s", "10s"));
  DaemonProcess process({"--config", config}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  auto listening = AwaitListening(process);
  ASSERT_TRUE(listening.has_value()) << process.Stderr();
  ASSERT_FALSE(listening->grpc.empty());
  EXPECT_EQ(listening->unix_socket, dir.path() + "/wsbridged.sock");
  struct stat st {};
  ASSERT_EQ(stat(listening->unix_socket.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);

  auto tcp = grpc::CreateChannel(listening->grpc, grpc::InsecureChannelCredentials());
  auto unix_channel =
      grpc::CreateChannel("unix:" + listening->unix_socket, grpc::InsecureChannelCredentials());
  EXPECT_EQ(CheckHealth(tcp, "").value(), HealthCheckResponse::SERVING);
  EXPECT_EQ(CheckHealth(unix_channel, "").value(), HealthCheckResponse::SERVING);
  // Whole-archive protos: reflection resolves services no bridge of this config serves.
  for (const char* symbol : {"wsbridge.admin.v1.AdminService", "wsbridge.dfx.v1.DfxService",
                             "grpc.health.v1.Health"}) {
    auto files = ReflectionFileContainingSymbol(unix_channel, symbol);
    EXPECT_TRUE(files.ok() && !files->empty()) << symbol << ": " << files.status();
  }
  auto readyz = HttpRequest(listening->admin_port, "GET", "/readyz");
  ASSERT_TRUE(readyz.ok()) << readyz.status();
  EXPECT_EQ(readyz->status, 200);

  // An open call gets the drain, then is ended; the process still exits 0.
  OpenReflectionStream stream(tcp);
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(process.Signal(SIGTERM));
  grpc::Status ended = stream.Finish();
  EXPECT_FALSE(ended.ok());
  // shutdown.deadline is 10 s (the daemon _exits then); the slack covers a loaded machine
  // and a sanitizer build's exit-time checks.
  auto status = process.WaitExit(std::chrono::seconds(40));
  ASSERT_TRUE(status.has_value()) << "did not exit after shutdown.deadline\n" << process.Stderr();
  ASSERT_TRUE(WIFEXITED(*status)) << process.Stderr();
  EXPECT_EQ(WEXITSTATUS(*status), 0) << process.Stderr();
  EXPECT_NE(lstat(listening->unix_socket.c_str(), &st), 0) << "socket file left behind";
  const std::string err = process.Stderr();
  EXPECT_NE(err.find("draining"), std::string::npos) << err;
  EXPECT_NE(err.find("stopped"), std::string::npos) << err;
}

// Thousands of upstream sessions need as many descriptors: wsbridged raises its soft
// open-file limit to the hard limit at start.
TEST(ProcessTest, RaisesTheOpenFileSoftLimitToTheHardLimit) {
  rlimit original{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &original), 0);
  if (original.rlim_max != RLIM_INFINITY && original.rlim_max <= 256) {
    GTEST_SKIP() << "hard open-file limit " << original.rlim_max << " leaves nothing to raise";
  }
  TempDir dir;
  const std::string config = dir.WriteFile("wsbridged.yaml", Config(dir, "1s", "10s"));
  // The child inherits a low soft limit from this process for the spawn only.
  rlimit low = original;
  low.rlim_cur = 256;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  DaemonProcess process({"--config", config}, dir.path() + "/stderr.txt");
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &original), 0);
  ASSERT_TRUE(process.spawned());
  ASSERT_TRUE(AwaitListening(process).has_value()) << process.Stderr();
  std::ifstream limits("/proc/" + std::to_string(process.pid()) + "/limits");
  std::string line, soft, hard;
  while (std::getline(limits, line)) {
    if (line.rfind("Max open files", 0) != 0) continue;
    std::istringstream fields(line.substr(std::string("Max open files").size()));
    fields >> soft >> hard;
  }
  ASSERT_FALSE(soft.empty());
  EXPECT_EQ(soft, hard);
  EXPECT_NE(soft, "256");
  ASSERT_TRUE(process.Signal(SIGTERM));
  auto status = process.WaitExit(std::chrono::seconds(40));  // deadline 10 s + slack
  ASSERT_TRUE(status.has_value()) << process.Stderr();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << process.Stderr();
}

TEST(ProcessTest, SecondSignalExitsAtOnce) {
  TempDir dir;
  // A drain far longer than the test waits: only the second signal can end it in time.
  const std::string config = dir.WriteFile("wsbridged.yaml", Config(dir, "600s", "900s"));
  DaemonProcess process({"--config", config}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  auto listening = AwaitListening(process);
  ASSERT_TRUE(listening.has_value()) << process.Stderr();
  auto channel = grpc::CreateChannel(listening->grpc, grpc::InsecureChannelCredentials());
  OpenReflectionStream stream(channel);  // holds the drain open
  ASSERT_TRUE(stream.ok());

  ASSERT_TRUE(process.Signal(SIGTERM));
  // Draining has begun once readiness fails.
  EXPECT_TRUE(WaitFor([&] {
    auto readyz = HttpRequest(listening->admin_port, "GET", "/readyz");
    return readyz.ok() && readyz->status == 503;
  }));
  EXPECT_FALSE(process.WaitExit(std::chrono::milliseconds(0)).has_value());
  ASSERT_TRUE(process.Signal(SIGINT));
  auto status = process.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value()) << "second signal did not end the process\n" << process.Stderr();
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 1);
  EXPECT_NE(process.Stderr().find("second signal"), std::string::npos) << process.Stderr();
}

TEST(ProcessTest, StartupFailureExitsWithStatus1) {
  TempDir dir;
  const std::string not_a_socket = dir.WriteFile("occupied", "x");
  const std::string config = dir.WriteFile("wsbridged.yaml",
                                           "server:\n"
                                           "  unix_socket: " + not_a_socket + "\n");
  DaemonProcess process({"--config", config}, dir.path() + "/stderr.txt");
  ASSERT_TRUE(process.spawned());
  auto status = process.WaitExit(std::chrono::seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(WEXITSTATUS(*status), 1);
  EXPECT_NE(process.Stderr().find("not a socket"), std::string::npos) << process.Stderr();
}

}  // namespace
}  // namespace wsbridge::daemontest
