// A fake upstream protocol for the toolkit's tests, and the template a new bridge copies:
// a Protocol (how a session opens, logs in, encodes and decodes) over text frames.
//
//   client -> server                      server -> client
//   login|<token>                         login|ok   or   login|no
//   req|<id>|<body>   (routed request)    rep|<id>|<final 0/1>|<status>|<body>
//   ord|<body>        (send-order)        ord|<final 0/1>|<status>|<body>
//   sub|<id>|<topic>                      suback|<id>|<subscription id>
//   unsub|<id>|<subscription id>          ev|<subscription id>|<body>
//   ping                                  pong
//
// A status other than 200 is an error answer (404 -> NOT_FOUND, 429 -> retry after 20 ms).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bridges/core/status.h"
#include "bridges/core/upstream_config.h"
#include "bridges/core/upstream_session.h"

namespace wsbridge::core::testing {

inline constexpr std::string_view kFakeDomain = "fake.wsbridge.dev";

// What a reply or an event carries: its body text.
struct Text final : Payload {
  explicit Text(std::string b) : body(std::move(b)) {}
  std::string body;
};

inline OwnedPayloadPtr MakeText(std::string body) { return std::make_shared<Text>(std::move(body)); }
inline const std::string& BodyOf(const PayloadPtr& p) { return static_cast<const Text&>(*p).body; }

class FakeProtocol final : public Protocol {
 public:
  FakeProtocol(std::string url, std::shared_ptr<SecretSource> token, bool login)
      : url_(std::move(url)), token_(std::move(token)), login_(login) {}

  absl::StatusOr<HandshakeRequest> PrepareHandshake() override {
    HandshakeRequest r;
    r.url = url_;
    return r;
  }

  absl::StatusOr<LoginPlan> OnOpen(std::string_view) override {
    LoginPlan plan;
    if (!login_) return plan;
    absl::StatusOr<std::string> token = token_->Current();
    if (!token.ok()) return token.status();
    plan.frames.push_back({absl::StrCat("login|", *token), false});
    plan.wait = true;
    return plan;
  }

  Inbound Decode(std::string_view frame, bool) override {
    Inbound in;
    std::vector<std::string> f = absl::StrSplit(absl::string_view(frame.data(), frame.size()),
                                                absl::MaxSplits('|', 4));
    if (f[0] == "login" && f.size() == 2) {
      in.kind = Inbound::Kind::kLogin;
      if (f[1] != "ok") in.status = absl::UnauthenticatedError("the token was refused");
    } else if (f[0] == "rep" && f.size() == 5) {
      in.kind = Inbound::Kind::kReply;
      in.route = f[1];
      Answer(in, f[2], f[3], f[4]);
    } else if (f[0] == "ord" && f.size() >= 4) {
      in.kind = Inbound::Kind::kReply;
      std::vector<std::string> g = absl::StrSplit(absl::string_view(frame.data(), frame.size()),
                                                  absl::MaxSplits('|', 3));
      Answer(in, g[1], g[2], g[3]);
    } else if (f[0] == "suback" && f.size() == 3) {
      in.kind = Inbound::Kind::kReply;
      in.route = f[1];
      in.bare = true;
      in.event_route = f[2];
    } else if (f[0] == "ev" && f.size() >= 3) {
      in.kind = Inbound::Kind::kEvent;
      in.route = f[1];
      in.payload = MakeText(f[2]);
    } else if (f[0] == "pong") {
      in.kind = Inbound::Kind::kHeartbeat;
    } else {
      in.kind = Inbound::Kind::kMalformed;
      in.status = absl::InvalidArgumentError("not a fake protocol frame");
    }
    return in;
  }

  std::string NewRoute(std::string_view hint) override {
    if (hint == "ord") return "";
    return absl::StrCat("r", ++next_);
  }

  absl::StatusOr<Outbound> EncodeSubscribe(const std::string& topic, const PayloadPtr&,
                                           std::string_view route) override {
    if (topic == "local" || topic.empty()) return Outbound{};  // local subscriptions
    return Outbound{absl::StrCat("sub|", std::string(route), "|", topic), false};
  }
  std::optional<Outbound> EncodeUnsubscribe(const std::string&, std::string_view event_route,
                                            std::string_view route) override {
    return Outbound{absl::StrCat("unsub|", std::string(route), "|", std::string(event_route)), false};
  }
  std::optional<Outbound> Heartbeat() override { return Outbound{"ping", false}; }

 private:
  static void Answer(Inbound& in, const std::string& final, const std::string& status,
                     const std::string& body) {
    in.final = final == "1";
    if (status == "200") {
      in.payload = MakeText(body);
      return;
    }
    if (status == "429") in.retry_after = std::chrono::milliseconds(20);
    in.status = WithErrorInfo(absl::Status(status == "404" ? absl::StatusCode::kNotFound
                                                           : absl::StatusCode::kInternal,
                                           absl::StrCat("upstream answered ", status, ": ", body)),
                              absl::StrCat("HTTP_", status), kFakeDomain);
  }

  std::string url_;
  std::shared_ptr<SecretSource> token_;
  bool login_;
  uint64_t next_ = 0;
};

// A request of the fake protocol: `req|<route>|<body>`, or `ord|<body>` in send order.
inline Request FakeRequest(std::string body, bool ordered = false) {
  Request r;
  r.hint = ordered ? "ord" : "req";
  r.what = absl::StrCat("request \"", body, "\"");
  r.encode = [body = std::move(body), ordered](std::string_view route) -> absl::StatusOr<Outbound> {
    return Outbound{ordered ? absl::StrCat("ord|", body) : absl::StrCat("req|", std::string(route), "|", body),
                    false};
  };
  return r;
}

}  // namespace wsbridge::core::testing
