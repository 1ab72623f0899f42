#include "tests/upstreams/nlx_protocol.h"

#include <algorithm>
#include <cstdio>
#include <optional>
#include <utility>

#include <boost/json.hpp>

namespace wsbridge::emulator {
namespace {

namespace json = boost::json;

// Dates the deterministic expirationTimestamp: 2026-01-01T00:00:00Z in Unix ms.
constexpr int64_t kExpiryBaseMs = 1767225600000;

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t Fnv1a(std::string_view s, uint64_t h = 0xcbf29ce484222325ULL) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::string UuidFrom(uint64_t a, uint64_t b) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%08x-%04x-%04x-%04x-%012llx",
                static_cast<unsigned>(a >> 32), static_cast<unsigned>((a >> 16) & 0xffff),
                static_cast<unsigned>(0x4000 | (a & 0x0fff)),
                static_cast<unsigned>(0x8000 | ((b >> 48) & 0x3fff)),
                static_cast<unsigned long long>(b & 0xffffffffffffULL));
  return buf;
}

// A message id that depends only on where the message is: replays are comparable.
std::string MessageId(std::string_view conversation, int turn, int index) {
  std::string key = std::string(conversation) + "/" + std::to_string(turn) + "/" +
                    std::to_string(index);
  return UuidFrom(Fnv1a(key), Fnv1a(key, 0x84222325cbf29ce4ULL));
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding of one query component; nullopt on a broken %XX. '+' is kept: NLX's
// SDK builds the URL with URLSearchParams, which writes a '+' in a value as %2B.
std::optional<std::string> PercentDecode(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out.push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return std::nullopt;
    int hi = HexValue(in[i + 1]);
    int lo = HexValue(in[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

// The query of `target` as name -> value (the last of repeated names wins); nullopt
// when a component is not valid percent-encoding.
std::optional<std::map<std::string, std::string>> ParseQuery(std::string_view target) {
  std::map<std::string, std::string> out;
  size_t q = target.find('?');
  if (q == std::string_view::npos) return out;
  std::string_view query = target.substr(q + 1);
  if (size_t hash = query.find('#'); hash != std::string_view::npos) query = query.substr(0, hash);
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (pair.empty()) continue;
    size_t eq = pair.find('=');
    std::optional<std::string> name = PercentDecode(pair.substr(0, eq));
    std::optional<std::string> value =
        PercentDecode(eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1));
    if (!name || !value) return std::nullopt;
    out[*name] = *value;
  }
  return out;
}

bool ValidConversationId(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  return std::all_of(id.begin(), id.end(), [](char c) { return c > 0x20 && c < 0x7f; });
}

std::string Str(const json::object& o, std::string_view key) {
  auto it = o.find(key);
  return it != o.end() && it->value().is_string() ? std::string(it->value().get_string()) : "";
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string FirstWord(std::string_view text) {
  size_t start = text.find_first_not_of(" \t\r\n");
  if (start == std::string_view::npos) return "";
  size_t end = text.find_first_of(" \t\r\n", start);
  return Lower(text.substr(start, end == std::string_view::npos ? end : end - start));
}

json::object TextMessage(std::string_view conversation, int turn, int index,
                         std::string_view text) {
  json::object m;
  m["messageId"] = MessageId(conversation, turn, index);
  m["text"] = text;
  m["type"] = "text";
  return m;
}

json::object Metadata(std::string_view intent) {
  json::object m;
  m["intentId"] = intent;
  m["escalation"] = false;
  m["frustration"] = false;
  m["incomprehension"] = false;
  m["uploadUrls"] = json::array();
  m["hasPendingDataRequest"] = false;
  return m;
}

// The answer text of a structured request; "" when it carries nothing known.
std::string DescribeStructured(const json::object& s) {
  std::string out;
  auto add = [&](const std::string& part) {
    if (!out.empty()) out += " ";
    out += part;
  };
  if (std::string c = Str(s, "choiceId"); !c.empty()) add("You chose " + c + ".");
  std::string flow = Str(s, "intentId");
  if (flow.empty()) flow = Str(s, "flowId");
  if (!flow.empty()) add("Started flow " + flow + ".");
  if (auto it = s.find("slots"); it != s.end() && it->value().is_array()) {
    std::string slots;
    for (const json::value& v : it->value().get_array()) {
      if (!v.is_object()) continue;
      const json::object& slot = v.get_object();
      auto value = slot.find("value");
      if (!slots.empty()) slots += ", ";
      slots += Str(slot, "slotId") + "=" +
               (value == slot.end() ? std::string("null") : json::serialize(value->value()));
    }
    add("Slots: " + slots + ".");
  }
  if (auto it = s.find("poll"); it != s.end() && it->value() == true) add("Nothing pending.");
  return out;
}

}  // namespace

NlxProtocol::NlxProtocol(NlxProtocolOptions options)
    : options_(std::move(options)), id_state_(options_.id_seed) {}

std::string NlxProtocol::NewUuid() {
  uint64_t a = SplitMix64(id_state_);
  uint64_t b = SplitMix64(id_state_);
  return UuidFrom(a, b);
}

// API Gateway's connectionId / requestId look like "L0SM9cOFvHcCIhw=".
std::string NlxProtocol::NewToken() {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  uint64_t v = SplitMix64(id_state_);
  std::string out;
  for (int i = 0; i < 15; ++i) {
    out.push_back(kAlphabet[v % 62]);
    v /= 62;
    if (v == 0) v = SplitMix64(id_state_);
  }
  out.push_back('=');
  return out;
}

NlxUpgrade NlxProtocol::CheckUpgrade(std::string_view target) {
  ++handshakes_;
  NlxUpgrade out;
  auto refuse = [&](int status, std::string message) {
    ++refused_handshakes_;
    json::object body;
    body["message"] = message;
    out.http_status = status;
    out.body = json::serialize(body);
    return out;
  };
  if (refuse_status_ != 0) {
    return refuse(refuse_status_, refuse_status_ == 429 ? "Too Many Requests"
                                  : refuse_status_ == 403 ? "Forbidden"
                                                          : "Service Unavailable");
  }
  std::optional<std::map<std::string, std::string>> query = ParseQuery(target);
  if (!query) return refuse(400, "Bad Request: the query string is not valid percent-encoding");
  struct Check {
    const char* name;
    const std::string& want;
  };
  for (const Check& c : {Check{"apiKey", options_.api_key},
                         Check{"deploymentKey", options_.deployment_key},
                         Check{"channelKey", options_.channel_key}}) {
    auto it = query->find(c.name);
    if (it == query->end() || it->second.empty()) {
      return refuse(401, std::string("Unauthorized: ") + c.name + " is missing");
    }
    if (it->second != c.want) {
      return refuse(401, std::string("Unauthorized: ") + c.name + " is not valid" +
                             (std::string_view(c.name) == "channelKey"
                                  ? " (it carries the language suffix, e.g. xxxx-en-US)"
                                  : ""));
    }
  }
  if (auto it = query->find("conversationId");
      it != query->end() && !ValidConversationId(it->second)) {
    return refuse(400, "Bad Request: conversationId must be 1-128 printable characters");
  }
  return out;
}

std::vector<NlxAction> NlxProtocol::OnOpen(uint64_t conn, std::string_view target,
                                           NlxClock::time_point now) {
  std::optional<std::map<std::string, std::string>> query = ParseQuery(target);
  std::string id;
  if (query) {
    if (auto it = query->find("conversationId"); it != query->end()) id = it->second;
  }
  if (!ValidConversationId(id)) id = NewUuid();
  auto [cit, created] = conversations_.try_emplace(id);
  if (created) conversation_order_.push_back(id);
  cit->second.conns.insert(conn);
  Conn& c = conns_[conn];
  c.conversation_id = id;
  c.connection_id = NewToken();
  c.ack_withheld = withhold_ack_;
  c.ack_due = withhold_ack_ ? NlxClock::time_point::max() : now + ack_delay_;
  if (withhold_ack_) return {};
  json::object ack;
  ack["conversationId"] = id;
  return {Send(conn, json::serialize(ack), ack_delay_)};
}

void NlxProtocol::OnClose(uint64_t conn) {
  auto it = conns_.find(conn);
  if (it == conns_.end()) return;
  if (auto cit = conversations_.find(it->second.conversation_id); cit != conversations_.end()) {
    cit->second.conns.erase(conn);
  }
  conns_.erase(it);
}

NlxAction NlxProtocol::Send(uint64_t conn, std::string text,
                            std::chrono::milliseconds delay) const {
  NlxAction a;
  a.conn = conn;
  a.kind = NlxAction::Kind::kSend;
  a.text = std::move(text);
  a.delay = delay;
  return a;
}

NlxAction NlxProtocol::InvalidBody(uint64_t conn, const Conn& c, std::string_view why) {
  ++invalid_frames_;
  json::object o;
  o["message"] = "Invalid request body: " + std::string(why);
  o["connectionId"] = c.connection_id;
  o["requestId"] = NewToken();
  return Send(conn, json::serialize(o), answer_delay_);
}

std::vector<NlxAction> NlxProtocol::OnFrame(uint64_t conn, std::string_view frame, bool binary,
                                            NlxClock::time_point now) {
  auto cit = conns_.find(conn);
  if (cit == conns_.end()) return {};
  Conn& c = cit->second;
  if (now < c.ack_due) ++frames_before_ack_;
  if (binary) return {InvalidBody(conn, c, "send the ConversationRequest as a text frame")};

  boost::system::error_code ec;
  json::value parsed = json::parse(frame, ec);
  if (ec) return {InvalidBody(conn, c, "not valid JSON (" + ec.message() + ")")};
  if (!parsed.is_object()) return {InvalidBody(conn, c, "expected a JSON object")};
  const json::object& body = parsed.get_object();
  auto req = body.find("request");
  if (req == body.end() || !req->value().is_object()) {
    return {InvalidBody(conn, c, "request is required (an object)")};
  }
  const json::object& request = req->value().get_object();
  const json::object* structured = nullptr;
  std::string text;
  bool has_text = false;
  if (auto u = request.find("unstructured"); u != request.end()) {
    if (!u->value().is_object()) return {InvalidBody(conn, c, "request.unstructured must be an object")};
    auto t = u->value().get_object().find("text");
    if (t == u->value().get_object().end() || !t->value().is_string() ||
        t->value().get_string().empty()) {
      return {InvalidBody(conn, c, "request.unstructured.text must be a non-empty string")};
    }
    text = std::string(t->value().get_string());
    has_text = true;
  }
  if (auto s = request.find("structured"); s != request.end() && !has_text) {
    if (!s->value().is_object()) return {InvalidBody(conn, c, "request.structured must be an object")};
    structured = &s->value().get_object();
  }
  if (!has_text && structured == nullptr) {
    return {InvalidBody(conn, c, "request.unstructured or request.structured is required")};
  }
  if (auto it = body.find("conversationId"); it != body.end() && !it->value().is_null()) {
    if (!it->value().is_string() || it->value().get_string() != c.conversation_id) {
      return {InvalidBody(conn, c, "conversationId is not this connection's conversation")};
    }
  }

  Conversation& conv = conversations_[c.conversation_id];
  NlxTurnRecord record;
  record.conn = conn;
  record.number = conv.forgotten + static_cast<int>(conv.turns.size()) + 1;
  record.json = std::string(frame);
  record.received = now;
  conv.turns.push_back(record);
  ++total_turns_;
  const int turn = record.number;
  const std::string& id = c.conversation_id;

  // Fault switch: the turn arrived (and may have run), the answer never leaves.
  if (drop_next_turns_ > 0) {
    --drop_next_turns_;
    NlxAction drop;
    drop.conn = conn;
    drop.kind = NlxAction::Kind::kDrop;
    return {drop};
  }

  const std::string word = has_text ? FirstWord(text) : "";
  if (word == "silent") return {};
  if (word == "error") {
    json::object o;
    o["message"] = "Internal server error";
    o["connectionId"] = c.connection_id;
    o["requestId"] = NewToken();
    return {Send(conn, json::serialize(o), answer_delay_)};
  }

  json::object response;
  response["conversationId"] = id;
  json::array messages;
  json::object metadata = Metadata(has_text ? "NLX.Fallback" : "Structured");
  if (!has_text) {
    std::string described = DescribeStructured(*structured);
    if (described.empty()) described = "Nothing to do.";
    messages.push_back(TextMessage(id, turn, 0, described));
  } else if (word == "choices") {
    json::object m = TextMessage(id, turn, 0, "Which class would you like?");
    m["nodeId"] = "node-class";
    json::object meta;
    meta["intentId"] = "BookFlight";
    m["metadata"] = std::move(meta);
    json::array choices;
    json::object economy;
    economy["choiceId"] = "choice-economy";
    economy["choiceText"] = "Economy";
    json::object business;
    business["choiceId"] = "choice-business";
    business["choiceText"] = "Business";
    business["choicePayload"] = json::parse(R"({"fare":"J","lounge":true})");
    choices.push_back(std::move(economy));
    choices.push_back(std::move(business));
    m["choices"] = std::move(choices);
    messages.push_back(std::move(m));
    metadata["intentId"] = "BookFlight";
  } else if (word == "multi") {
    for (int i = 0; i < 3; ++i) {
      messages.push_back(TextMessage(
          id, turn, i, "Part " + std::to_string(i + 1) + " of 3: " + text));
    }
  } else if (word == "extra") {
    json::object m = TextMessage(id, turn, 0, "Here is a card.");
    m["rich"] = json::parse(R"({"card":{"title":"London","image":"https://example.invalid/l.png"}})");
    json::array choices;
    json::object more;
    more["choiceId"] = "choice-more";
    more["choiceText"] = "More";
    more["choiceStyle"] = "primary";
    choices.push_back(std::move(more));
    m["choices"] = std::move(choices);
    messages.push_back(std::move(m));
    response["modalities"] = json::parse(R"({"MapCard":{"lat":51.5,"lon":-0.12}})");
    response["payload"] = "card-payload";
    response["emulatorExtra"] = json::parse(R"({"nested":[1,{"deep":true}],"big":18446744073709551615})");
    metadata["sources"] = json::parse(R"([{"fileName":"faq.pdf","pageNumber":3}])");
  } else if (word == "escalate") {
    messages.push_back(TextMessage(id, turn, 0, "An agent will join shortly."));
    metadata["escalation"] = true;
  } else if (word == "pending") {
    messages.push_back(TextMessage(id, turn, 0, "Looking that up..."));
    metadata["hasPendingDataRequest"] = true;
  } else {
    messages.push_back(TextMessage(
        id, turn, 0, "Turn " + std::to_string(turn) + ": you said \"" + text + "\""));
  }
  response["messages"] = std::move(messages);
  response["metadata"] = std::move(metadata);
  response["expirationTimestamp"] = kExpiryBaseMs + static_cast<int64_t>(turn) * 60000;
  json::object echo;
  echo["turn"] = turn;
  if (auto it = body.find("userId"); it != body.end()) echo["userId"] = it->value();
  if (auto it = body.find("languageCode"); it != body.end()) echo["languageCode"] = it->value();
  if (auto it = body.find("context"); it != body.end()) echo["context"] = it->value();
  response["emulator"] = std::move(echo);
  return {Send(conn, json::serialize(response), answer_delay_)};
}

std::vector<NlxAction> NlxProtocol::ForEach(
    std::string_view conversation_id, const std::function<NlxAction(uint64_t)>& make) const {
  std::vector<NlxAction> out;
  if (conversation_id.empty()) {
    for (const auto& [conn, c] : conns_) out.push_back(make(conn));
    return out;
  }
  auto it = conversations_.find(conversation_id);
  if (it == conversations_.end()) return out;
  for (uint64_t conn : it->second.conns) out.push_back(make(conn));
  return out;
}

std::vector<NlxAction> NlxProtocol::Push(std::string_view conversation_id, std::string_view text) {
  auto it = conversations_.find(conversation_id);
  if (it == conversations_.end() || it->second.conns.empty()) return {};
  int n = ++it->second.pushes;
  json::object response;
  response["conversationId"] = conversation_id;
  json::array messages;
  // Negative "turns" keep push message ids apart from turn message ids.
  messages.push_back(TextMessage(conversation_id, -n, 0, text));
  response["messages"] = std::move(messages);
  response["emulatorPush"] = true;
  std::string frame = json::serialize(response);
  return ForEach(conversation_id,
                 [&](uint64_t conn) { return Send(conn, frame, std::chrono::milliseconds(0)); });
}

std::vector<NlxAction> NlxProtocol::PushRaw(std::string_view conversation_id,
                                            const std::string& text) const {
  return ForEach(conversation_id,
                 [&](uint64_t conn) { return Send(conn, text, std::chrono::milliseconds(0)); });
}

std::vector<NlxAction> NlxProtocol::Drop(std::string_view conversation_id) const {
  return ForEach(conversation_id, [](uint64_t conn) {
    NlxAction a;
    a.conn = conn;
    a.kind = NlxAction::Kind::kDrop;
    return a;
  });
}

std::vector<NlxAction> NlxProtocol::Close(std::string_view conversation_id, uint16_t code,
                                          const std::string& reason) const {
  return ForEach(conversation_id, [&](uint64_t conn) {
    NlxAction a;
    a.conn = conn;
    a.kind = NlxAction::Kind::kClose;
    a.close_code = code;
    a.close_reason = reason;
    return a;
  });
}

int NlxProtocol::connections_for(std::string_view conversation_id) const {
  auto it = conversations_.find(conversation_id);
  return it == conversations_.end() ? 0 : static_cast<int>(it->second.conns.size());
}

bool NlxProtocol::knows(std::string_view conversation_id) const {
  return conversations_.find(conversation_id) != conversations_.end();
}

std::string NlxProtocol::conversation_of(uint64_t conn) const {
  auto it = conns_.find(conn);
  return it == conns_.end() ? "" : it->second.conversation_id;
}

std::vector<NlxTurnRecord> NlxProtocol::turns(std::string_view conversation_id) const {
  auto it = conversations_.find(conversation_id);
  return it == conversations_.end() ? std::vector<NlxTurnRecord>() : it->second.turns;
}

int NlxProtocol::turns_received(std::string_view conversation_id) const {
  auto it = conversations_.find(conversation_id);
  return it == conversations_.end() ? 0
                                     : it->second.forgotten + static_cast<int>(it->second.turns.size());
}

void NlxProtocol::ForgetTurns(std::string_view conversation_id) {
  auto it = conversations_.find(conversation_id);
  if (it == conversations_.end()) return;
  it->second.forgotten += static_cast<int>(it->second.turns.size());
  std::vector<NlxTurnRecord>().swap(it->second.turns);
}

}  // namespace wsbridge::emulator
