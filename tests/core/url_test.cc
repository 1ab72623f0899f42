#include "bridges/core/url.h"

#include <gtest/gtest.h>

namespace wsbridge::core {
namespace {

TEST(CoreUrl, ParsesHostPortAndTarget) {
  absl::StatusOr<ParsedUrl> u = ParseUrl("WSS://api.example.com/v1?x=1#frag", "wss", "ws", "upstream URL");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_TRUE(u->tls);
  EXPECT_EQ(u->host, "api.example.com");
  EXPECT_EQ(u->port, "443");
  EXPECT_EQ(u->host_header, "api.example.com");
  EXPECT_EQ(u->target, "/v1?x=1");

  u = ParseUrl("http://[::1]:8080?q", "https", "http", "URL");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_FALSE(u->tls);
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, "8080");
  EXPECT_EQ(u->host_header, "[::1]:8080");
  EXPECT_EQ(u->target, "/?q");

  u = ParseUrl("ws://h", "wss", "ws", "upstream URL");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->port, "80");
  EXPECT_EQ(u->target, "/");
}

TEST(CoreUrl, RefusesWhatItCannotUseSayingWhy) {
  const struct {
    const char* url;
    const char* says;
  } cases[] = {
      {"https://h/", "must start with wss:// or ws://"},
      {"wss://", "has no host"},
      {"wss://:443/", "has no host"},
      {"wss://user:pw@h/", "must not carry user:password@"},
      {"wss://[::1/", "bad IPv6 host"},
      {"wss://[::1]x/", "bad IPv6 host"},
      {"wss://h:0/", "bad port"},
      {"wss://h:65536/", "bad port"},
      {"wss://h:8x/", "bad port"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<ParsedUrl> u = ParseUrl(c.url, "wss", "ws", "upstream URL");
    ASSERT_FALSE(u.ok()) << c.url;
    EXPECT_EQ(u.status().code(), absl::StatusCode::kInvalidArgument) << c.url;
    EXPECT_NE(u.status().message().find(c.says), absl::string_view::npos) << c.url << ": " << u.status();
    EXPECT_EQ(u.status().message().find("pw"), absl::string_view::npos) << "echoed a password";
  }
}

}  // namespace
}  // namespace wsbridge::core
