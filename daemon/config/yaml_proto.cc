#include "daemon/config/yaml_proto.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <utility>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/duration.pb.h>
#include <yaml-cpp/yaml.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "wsbridge/config/v1/options.pb.h"

namespace wsbridge::config {
namespace {

namespace pb = google::protobuf;
using FD = pb::FieldDescriptor;

constexpr size_t kMaxEchoChars = 60;
constexpr size_t kMaxMessageChars = 1000;
constexpr int64_t kNanosPerSecond = 1'000'000'000;
// Longer than any limit in the schema; keeps duration arithmetic far from overflow.
constexpr int64_t kMaxDurationSeconds = 10LL * 365 * 24 * 3600;

const v1::FieldRules& RulesOf(const FD* field) {
  return field->options().GetExtension(v1::rules);
}

bool IsDuration(const pb::Descriptor* d) {
  return d == pb::Duration::descriptor();
}

// A message holding a secret field: its unknown keys are not echoed, because a secret
// pasted in the wrong place would otherwise be printed back.
bool HoldsSecret(const pb::Descriptor* d) {
  for (int i = 0; i < d->field_count(); ++i) {
    if (RulesOf(d->field(i)).secret()) return true;
  }
  return false;
}

std::string Quote(absl::string_view text) {
  std::string out = "\"";
  size_t n = 0;
  for (unsigned char c : text) {
    if (n++ == kMaxEchoChars) {
      out += "...";
      break;
    }
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      out += absl::StrCat("\\x", absl::Hex(c, absl::kZeroPad2));
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  out.push_back('"');
  return out;
}

std::string DescribeNode(const YAML::Node& node, bool echo) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Scalar: return echo ? Quote(node.Scalar()) : "a plain value";
    case YAML::NodeType::Null: return "an empty value";
    case YAML::NodeType::Undefined: break;
  }
  return "nothing";
}

std::string JoinPath(absl::string_view path, absl::string_view name) {
  return path.empty() ? std::string(name) : absl::StrCat(path, ".", name);
}

// Bounds as written in messages: integers without a fraction, durations with a unit.
std::string FormatBound(double v, bool duration) {
  if (duration) {
    return FormatDuration(std::chrono::nanoseconds(static_cast<int64_t>(std::llround(v * 1e9))));
  }
  if (v == std::floor(v) && std::fabs(v) < 1e18) return absl::StrCat(static_cast<int64_t>(v));
  return absl::StrCat(v);
}

std::string AllowedRange(const v1::FieldRules& r, bool duration) {
  if (r.has_min() && r.has_max()) {
    return absl::StrCat("allowed: ", FormatBound(r.min(), duration), " to ",
                        FormatBound(r.max(), duration));
  }
  if (r.has_min()) return absl::StrCat("allowed: at least ", FormatBound(r.min(), duration));
  return absl::StrCat("allowed: at most ", FormatBound(r.max(), duration));
}

// Checks (rules).min/max; `shown` is the value as the user wrote it.
absl::Status CheckBounds(const FD* field, double value, absl::string_view shown, bool duration) {
  const v1::FieldRules& r = RulesOf(field);
  if (r.has_min() && value < r.min()) {
    return absl::InvalidArgumentError(absl::StrCat(shown, " is below the minimum ",
                                                   FormatBound(r.min(), duration), " (",
                                                   AllowedRange(r, duration), ")"));
  }
  if (r.has_max() && value > r.max()) {
    return absl::InvalidArgumentError(absl::StrCat(shown, " is above the maximum ",
                                                   FormatBound(r.max(), duration), " (",
                                                   AllowedRange(r, duration), ")"));
  }
  return absl::OkStatus();
}

bool IsDigits(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Parses an integer of the field's type. The type's limits and the field's rules form one
// range, so "-1" for a uint32 with min 1 reads "below the minimum 1 (allowed: 1 to ...)".
template <typename T>
absl::StatusOr<T> ParseInteger(absl::string_view text, const FD* field) {
  absl::string_view digits = text;
  bool negative = false;
  if (!digits.empty() && (digits.front() == '-' || digits.front() == '+')) {
    negative = digits.front() == '-';
    digits.remove_prefix(1);
  }
  if (!IsDigits(digits)) {
    return absl::InvalidArgumentError(absl::StrCat("expected an integer, got ", Quote(text),
                                                   " (write digits only, e.g. 1024)"));
  }
  // long double holds every 64-bit integer exactly on the platforms we build for.
  long double value = 0;
  if (negative) {
    int64_t v = 0;
    std::string signed_text = absl::StrCat("-", digits);
    auto [ptr, ec] = std::from_chars(signed_text.data(), signed_text.data() + signed_text.size(), v);
    value = ec == std::errc() ? static_cast<long double>(v) : -1e30L;
  } else {
    uint64_t v = 0;
    auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
    value = ec == std::errc() ? static_cast<long double>(v) : 1e30L;
  }
  struct Bound {
    long double value;
    std::string text;
  };
  Bound lo{static_cast<long double>(std::numeric_limits<T>::min()),
           absl::StrCat(std::numeric_limits<T>::min())};
  Bound hi{static_cast<long double>(std::numeric_limits<T>::max()),
           absl::StrCat(std::numeric_limits<T>::max())};
  const v1::FieldRules& r = RulesOf(field);
  if (r.has_min() && r.min() > lo.value) lo = {r.min(), FormatBound(r.min(), false)};
  if (r.has_max() && r.max() < hi.value) hi = {r.max(), FormatBound(r.max(), false)};
  std::string shown = absl::StrCat(negative ? "-" : "", digits);
  std::string allowed = absl::StrCat(" (allowed: ", lo.text, " to ", hi.text, ")");
  if (value < lo.value) {
    return absl::InvalidArgumentError(
        absl::StrCat(shown, " is below the minimum ", lo.text, allowed));
  }
  if (value > hi.value) {
    return absl::InvalidArgumentError(
        absl::StrCat(shown, " is above the maximum ", hi.text, allowed));
  }
  return static_cast<T>(value);
}

std::string EnumNames(const pb::EnumDescriptor* e) {
  std::vector<std::string> names;
  for (int i = 0; i < e->value_count(); ++i) names.push_back(e->value(i)->name());
  return absl::StrJoin(names, ", ");
}

// Sets (or, for repeated fields, appends) one scalar written as `text`: the single
// place where YAML scalars and schema defaults become field values.
absl::Status SetScalar(absl::string_view text, pb::Message* msg, const FD* field) {
  const pb::Reflection* refl = msg->GetReflection();
  const bool add = field->is_repeated();
  const v1::FieldRules& rules = RulesOf(field);
  switch (field->cpp_type()) {
    case FD::CPPTYPE_INT32: {
      auto v = ParseInteger<int32_t>(text, field);
      if (!v.ok()) return v.status();
      add ? refl->AddInt32(msg, field, *v) : refl->SetInt32(msg, field, *v);
      return absl::OkStatus();
    }
    case FD::CPPTYPE_UINT32: {
      auto v = ParseInteger<uint32_t>(text, field);
      if (!v.ok()) return v.status();
      add ? refl->AddUInt32(msg, field, *v) : refl->SetUInt32(msg, field, *v);
      return absl::OkStatus();
    }
    case FD::CPPTYPE_INT64: {
      auto v = ParseInteger<int64_t>(text, field);
      if (!v.ok()) return v.status();
      add ? refl->AddInt64(msg, field, *v) : refl->SetInt64(msg, field, *v);
      return absl::OkStatus();
    }
    case FD::CPPTYPE_UINT64: {
      auto v = ParseInteger<uint64_t>(text, field);
      if (!v.ok()) return v.status();
      add ? refl->AddUInt64(msg, field, *v) : refl->SetUInt64(msg, field, *v);
      return absl::OkStatus();
    }
    case FD::CPPTYPE_DOUBLE:
    case FD::CPPTYPE_FLOAT: {
      double v = 0;
      auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
      if (text.empty() || ec != std::errc() || ptr != text.data() + text.size() ||
          !std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("expected a number, got ", Quote(text), " (e.g. 2 or 1.5)"));
      }
      if (absl::Status s = CheckBounds(field, v, text, false); !s.ok()) return s;
      if (field->cpp_type() == FD::CPPTYPE_FLOAT) {
        add ? refl->AddFloat(msg, field, static_cast<float>(v))
            : refl->SetFloat(msg, field, static_cast<float>(v));
      } else {
        add ? refl->AddDouble(msg, field, v) : refl->SetDouble(msg, field, v);
      }
      return absl::OkStatus();
    }
    case FD::CPPTYPE_BOOL: {
      std::string lower = absl::AsciiStrToLower(text);
      if (lower != "true" && lower != "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("expected true or false, got ", Quote(text)));
      }
      add ? refl->AddBool(msg, field, lower == "true") : refl->SetBool(msg, field, lower == "true");
      return absl::OkStatus();
    }
    case FD::CPPTYPE_ENUM: {
      const pb::EnumValueDescriptor* v = field->enum_type()->FindValueByName(std::string(text));
      if (v == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(
            Quote(text), " is not one of ", EnumNames(field->enum_type())));
      }
      add ? refl->AddEnum(msg, field, v) : refl->SetEnum(msg, field, v);
      return absl::OkStatus();
    }
    case FD::CPPTYPE_STRING: {
      if (text.empty() && rules.required()) {
        return absl::InvalidArgumentError("must not be empty");
      }
      if (!text.empty() && rules.one_of_size() > 0 &&
          std::find(rules.one_of().begin(), rules.one_of().end(), text) == rules.one_of().end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            rules.secret() ? "the value" : Quote(text), " is not one of ",
            absl::StrJoin(rules.one_of(), ", ")));
      }
      add ? refl->AddString(msg, field, std::string(text))
          : refl->SetString(msg, field, std::string(text));
      return absl::OkStatus();
    }
    case FD::CPPTYPE_MESSAGE: {
      if (!IsDuration(field->message_type())) break;
      absl::StatusOr<std::chrono::nanoseconds> d = ParseDuration(text);
      if (!d.ok()) return d.status();
      double seconds = static_cast<double>(d->count()) / 1e9;
      if (absl::Status s = CheckBounds(field, seconds, text, true); !s.ok()) return s;
      pb::Message* sub = add ? refl->AddMessage(msg, field) : refl->MutableMessage(msg, field);
      auto* duration = static_cast<pb::Duration*>(sub);
      duration->set_seconds(d->count() / kNanosPerSecond);
      duration->set_nanos(static_cast<int32_t>(d->count() % kNanosPerSecond));
      return absl::OkStatus();
    }
  }
  return absl::InternalError(
      absl::StrCat("field type of ", field->full_name(), " has no scalar form"));
}

std::string TypeName(const FD* field) {
  switch (field->cpp_type()) {
    case FD::CPPTYPE_INT32:
    case FD::CPPTYPE_INT64:
    case FD::CPPTYPE_UINT32:
    case FD::CPPTYPE_UINT64: return "an integer";
    case FD::CPPTYPE_DOUBLE:
    case FD::CPPTYPE_FLOAT: return "a number";
    case FD::CPPTYPE_BOOL: return "true or false";
    case FD::CPPTYPE_ENUM: return absl::StrCat("one of ", EnumNames(field->enum_type()));
    case FD::CPPTYPE_STRING: return "a string";
    case FD::CPPTYPE_MESSAGE:
      if (IsDuration(field->message_type())) return "a duration like \"10s\"";
      return "a mapping";
  }
  return "a value";
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

class Parser {
 public:
  Parser(Diagnostics& diag, SourceMap* sources) : diag_(diag), sources_(sources) {}

  void Message(const YAML::Node& node, const YAML::Mark& at, pb::Message* msg,
               const std::string& path) {
    Record(path, at);
    // YAML aliases can make a node contain itself; recursive message types would follow.
    if (depth_ >= kMaxDepth) {
      diag_.Add(at, path, absl::StrCat("nested more than ", kMaxDepth,
                                       " levels deep (check for an alias that refers to itself)"));
      return;
    }
    ++depth_;
    MessageBody(node, at, msg, path);
    --depth_;
  }

 private:
  static constexpr int kMaxDepth = 32;

  void MessageBody(const YAML::Node& node, const YAML::Mark& at, pb::Message* msg,
                   const std::string& path) {
    const pb::Descriptor* desc = msg->GetDescriptor();
    std::map<std::string, YAML::Mark> seen;
    if (node.IsMap()) {
      std::map<const pb::OneofDescriptor*, std::string> oneof_set;
      for (const auto& kv : node) {
        const YAML::Node& key = kv.first;
        const YAML::Node& value = kv.second;
        if (!key.IsScalar()) {
          diag_.Add(key.Mark(), path,
                    absl::StrCat("keys must be plain names, got ", DescribeNode(key, false)));
          continue;
        }
        const std::string& name = key.Scalar();
        const FD* field = desc->FindFieldByName(name);
        std::string child = JoinPath(path, name);
        if (field == nullptr) {
          UnknownKey(key, desc, path, name);
          continue;
        }
        if (auto it = seen.find(name); it != seen.end()) {
          diag_.Add(key.Mark(), child,
                    absl::StrCat("duplicate key \"", name, "\" (first set on line ",
                                 it->second.line + 1, "; keep one)"));
          continue;
        }
        seen.emplace(name, key.Mark());
        if (const pb::OneofDescriptor* oneof = field->real_containing_oneof()) {
          auto [it, inserted] = oneof_set.emplace(oneof, name);
          if (!inserted) {
            std::vector<std::string> choices;
            for (int i = 0; i < oneof->field_count(); ++i) {
              choices.push_back(oneof->field(i)->name());
            }
            diag_.Add(key.Mark(), path,
                      absl::StrCat("\"", it->second, "\" and \"", name,
                                   "\" are both set, but only one of ",
                                   absl::StrJoin(choices, ", "), " may be (keep one)"));
            continue;
          }
        }
        Field(value, value.IsNull() ? key.Mark() : value.Mark(), msg, field, child);
      }
    } else if (!node.IsNull()) {
      std::string hint;
      if (HoldsSecret(desc)) {
        std::vector<std::string> keys;
        for (int i = 0; i < desc->field_count(); ++i) keys.push_back(desc->field(i)->name());
        for (std::string& k : keys) k = absl::StrCat("{", k, ": ...}");
        std::string last = keys.back();
        keys.pop_back();
        hint = absl::StrCat(" (write it as ", absl::StrJoin(keys, ", "), " or ", last, ")");
      } else {
        hint = " (write indented \"key: value\" lines)";
      }
      // Never echo a scalar given for a message: it may be a misplaced secret.
      diag_.Add(at, path, absl::StrCat("expected a mapping, got ", DescribeNode(node, false), hint));
      return;
    }
    // An empty mapping or `key:` with nothing after it: the section is present and empty.
    for (int i = 0; i < desc->field_count(); ++i) {
      const FD* field = desc->field(i);
      if (!RulesOf(field).required() || seen.count(field->name())) continue;
      std::string child = JoinPath(path, field->name());
      std::string where = path.empty() ? "at the top level" : absl::StrCat("under ", path);
      diag_.Add(at, child,
                absl::StrCat("required key \"", field->name(), "\" is missing (add it ", where,
                             ")"));
    }
  }

  void Record(const std::string& path, const YAML::Mark& mark) {
    if (sources_ != nullptr) sources_->Record(path, mark);
  }

  void UnknownKey(const YAML::Node& key, const pb::Descriptor* desc, const std::string& path,
                  const std::string& name) {
    std::vector<std::string> known;
    std::string best;
    size_t best_distance = 3;
    for (int i = 0; i < desc->field_count(); ++i) {
      const std::string& candidate = desc->field(i)->name();
      known.push_back(candidate);
      size_t d = EditDistance(name, candidate);
      // Loose matches on short names suggest nonsense ("nlx" is not a typo of "dfx").
      size_t limit = candidate.size() >= 6 ? 2 : 1;
      if (d <= limit && d < best_distance) {
        best_distance = d;
        best = candidate;
      }
    }
    std::string known_list = absl::StrCat("known keys: ", absl::StrJoin(known, ", "));
    if (HoldsSecret(desc)) {
      diag_.Add(key.Mark(), path,
                absl::StrCat("unknown key, not shown because this section holds a secret (",
                             known_list, ")"));
      return;
    }
    std::string hint = best.empty() ? known_list
                                    : absl::StrCat("did you mean \"", best, "\"? ", known_list);
    // The key joins the path only when it is a plain name; a long one, or one with line
    // breaks or control bytes, is shown only quoted and cut in the message.
    const bool plain = name.size() <= kMaxEchoChars &&
                       std::all_of(name.begin(), name.end(), [](unsigned char c) {
                         return absl::ascii_isalnum(c) || c == '_' || c == '-' || c == '.';
                       });
    diag_.Add(key.Mark(), plain ? JoinPath(path, name) : path,
              absl::StrCat("unknown key ", Quote(name), " (", hint, ")"));
  }

  void Field(const YAML::Node& node, const YAML::Mark& at, pb::Message* msg, const FD* field,
             const std::string& path) {
    if (field->is_map()) {
      Map(node, at, msg, field, path);
      return;
    }
    if (!field->is_repeated()) {
      Value(node, at, msg, field, path);
      return;
    }
    Record(path, at);
    if (node.IsNull()) {
      if (RulesOf(field).required()) diag_.Add(at, path, "must not be empty (list at least one entry)");
      return;
    }
    if (!node.IsSequence()) {
      diag_.Add(at, path,
                absl::StrCat("expected a list, got ", DescribeNode(node, false),
                             " (write one \"- item\" line per entry)"));
      return;
    }
    if (node.size() == 0 && RulesOf(field).required()) {
      diag_.Add(at, path, "must not be empty (list at least one entry)");
    }
    for (size_t i = 0; i < node.size(); ++i) {
      const YAML::Node& item = node[i];
      Value(item, item.Mark().is_null() ? at : item.Mark(), msg, field,
            absl::StrCat(path, "[", i, "]"));
    }
  }

  void Map(const YAML::Node& node, const YAML::Mark& at, pb::Message* msg, const FD* field,
           const std::string& path) {
    Record(path, at);
    if (node.IsNull()) return;
    if (!node.IsMap()) {
      diag_.Add(at, path,
                absl::StrCat("expected a mapping, got ", DescribeNode(node, false),
                             " (write indented \"name: value\" lines)"));
      return;
    }
    const FD* key_field = field->message_type()->map_key();
    const FD* value_field = field->message_type()->map_value();
    std::map<std::string, YAML::Mark> seen;
    for (const auto& kv : node) {
      if (!kv.first.IsScalar()) {
        diag_.Add(kv.first.Mark(), path,
                  absl::StrCat("keys must be plain names, got ", DescribeNode(kv.first, false)));
        continue;
      }
      const std::string& key = kv.first.Scalar();
      std::string child = absl::StrCat(path, "[", Quote(key), "]");
      if (auto it = seen.find(key); it != seen.end()) {
        diag_.Add(kv.first.Mark(), child,
                  absl::StrCat("duplicate key ", Quote(key), " (first set on line ",
                               it->second.line + 1, "; keep one)"));
        continue;
      }
      seen.emplace(key, kv.first.Mark());
      pb::Message* entry = msg->GetReflection()->AddMessage(msg, field);
      if (absl::Status s = SetScalar(key, entry, key_field); !s.ok()) {
        diag_.Add(kv.first.Mark(), child, s.message());
        continue;
      }
      Value(kv.second, kv.second.IsNull() ? kv.first.Mark() : kv.second.Mark(), entry,
            value_field, child);
    }
  }

  // One singular value, or one element of a repeated field.
  void Value(const YAML::Node& node, const YAML::Mark& at, pb::Message* msg, const FD* field,
             const std::string& path) {
    if (field->cpp_type() == FD::CPPTYPE_MESSAGE && !IsDuration(field->message_type())) {
      const pb::Reflection* refl = msg->GetReflection();
      pb::Message* sub =
          field->is_repeated() ? refl->AddMessage(msg, field) : refl->MutableMessage(msg, field);
      Message(node, at, sub, path);
      return;
    }
    Record(path, at);
    const bool echo = !RulesOf(field).secret();
    if (!node.IsScalar()) {
      std::string hint = node.IsNull() ? " (write a value or remove the key)" : "";
      diag_.Add(at, path,
                absl::StrCat("expected ", TypeName(field), ", got ", DescribeNode(node, echo),
                             hint));
      return;
    }
    if (absl::Status s = SetScalar(node.Scalar(), msg, field); !s.ok()) {
      diag_.Add(at, path, echo ? std::string(s.message()) : "invalid value (not shown: secret)");
    }
  }

  Diagnostics& diag_;
  SourceMap* sources_;
  int depth_ = 0;
};

bool TypeHasDefaults(const pb::Descriptor* desc, std::set<const pb::Descriptor*>& visiting) {
  if (!visiting.insert(desc).second) return false;
  for (int i = 0; i < desc->field_count(); ++i) {
    const FD* f = desc->field(i);
    if (!RulesOf(f).default_value().empty()) return true;
    if (f->cpp_type() == FD::CPPTYPE_MESSAGE && !f->is_repeated() &&
        !f->real_containing_oneof() && TypeHasDefaults(f->message_type(), visiting)) {
      return true;
    }
  }
  return false;
}

bool TypeHasDefaults(const pb::Descriptor* desc) {
  std::set<const pb::Descriptor*> visiting;
  return TypeHasDefaults(desc, visiting);
}

}  // namespace

void SourceMap::Record(const std::string& path, const YAML::Mark& mark) {
  if (!mark.is_null()) marks_.insert_or_assign(path, mark);
}

std::optional<YAML::Mark> SourceMap::Find(absl::string_view path) const {
  while (true) {
    if (auto it = marks_.find(path); it != marks_.end()) return it->second;
    if (path.empty()) return std::nullopt;
    size_t cut = path.find_last_of(".[");
    path = cut == absl::string_view::npos ? absl::string_view() : path.substr(0, cut);
  }
}

bool SourceMap::Contains(absl::string_view path) const { return marks_.count(path) > 0; }

void Diagnostics::Add(const std::optional<YAML::Mark>& mark, absl::string_view path,
                      absl::string_view message) {
  std::string line = source_name_;
  positions_.push_back(mark && !mark->is_null() ? std::make_pair(mark->line, mark->column)
                                                : std::make_pair(-1, -1));
  if (mark && !mark->is_null()) absl::StrAppend(&line, ":", mark->line + 1, ":", mark->column + 1);
  absl::StrAppend(&line, ": ");
  if (!path.empty()) absl::StrAppend(&line, path, ": ");
  // Backstop for messages built elsewhere (URL checks, file errors) that quote a value:
  // no line of a config error grows past this, however long the bad value.
  if (message.size() > kMaxMessageChars) {
    absl::StrAppend(&line, message.substr(0, kMaxMessageChars), "... (message cut: ",
                    message.size(), " bytes in all)");
  } else {
    absl::StrAppend(&line, message);
  }
  lines_.push_back(std::move(line));
}

void Diagnostics::AddAt(const SourceMap& sources, absl::string_view path,
                        absl::string_view message) {
  Add(sources.Find(path), path, message);
}

absl::Status Diagnostics::ToStatus() const {
  if (lines_.empty()) return absl::OkStatus();
  // In file order, whatever order the checks ran in; whole-file errors first.
  std::vector<size_t> order(lines_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return positions_[a] < positions_[b]; });
  std::vector<absl::string_view> sorted;
  for (size_t i : order) sorted.push_back(lines_[i]);
  return absl::InvalidArgumentError(absl::StrJoin(sorted, "\n"));
}

void ParseYamlInto(const YAML::Node& node, pb::Message* message, const std::string& path,
                   Diagnostics& diagnostics, SourceMap* sources) {
  Parser(diagnostics, sources).Message(node, node.Mark(), message, path);
}

absl::Status ApplyDefaults(pb::Message* message) {
  const pb::Descriptor* desc = message->GetDescriptor();
  const pb::Reflection* refl = message->GetReflection();
  for (int i = 0; i < desc->field_count(); ++i) {
    const FD* field = desc->field(i);
    const std::string& def = RulesOf(field).default_value();
    if (field->is_repeated()) {
      if (field->cpp_type() != FD::CPPTYPE_MESSAGE || field->is_map()) continue;
      for (int j = 0; j < refl->FieldSize(*message, field); ++j) {
        if (absl::Status s = ApplyDefaults(refl->MutableRepeatedMessage(message, field, j));
            !s.ok()) {
          return s;
        }
      }
      continue;
    }
    const bool is_message = field->cpp_type() == FD::CPPTYPE_MESSAGE;
    if (refl->HasField(*message, field)) {
      if (is_message && !IsDuration(field->message_type())) {
        if (absl::Status s = ApplyDefaults(refl->MutableMessage(message, field)); !s.ok()) return s;
      }
      continue;
    }
    if (!def.empty()) {
      if (absl::Status s = SetScalar(def, message, field); !s.ok()) {
        return absl::InternalError(absl::StrCat("default_value of ", field->full_name(),
                                                " is invalid: ", s.message()));
      }
    } else if (is_message && !field->real_containing_oneof() &&
               TypeHasDefaults(field->message_type())) {
      if (absl::Status s = ApplyDefaults(refl->MutableMessage(message, field)); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::chrono::nanoseconds> ParseDuration(absl::string_view text) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected a duration like \"250ms\", \"1.5s\", \"2m\" or \"1h\", got ", Quote(text), " (",
        why, ")"));
  };
  if (text.empty()) return bad("write a number followed by a unit");
  if (text.front() == '-') return bad("durations cannot be negative");
  if (IsDigits(text) || (text.find_first_not_of("0123456789.") == absl::string_view::npos)) {
    return bad(absl::StrCat("add a unit, e.g. \"", text, "s\""));
  }
  struct Unit {
    absl::string_view name;
    int64_t nanos;
  };
  // Longest names first so "ms" is not read as "m" followed by garbage.
  static constexpr Unit kUnits[] = {{"ns", 1},
                                    {"us", 1'000},
                                    {"ms", 1'000'000},
                                    {"s", kNanosPerSecond},
                                    {"m", 60 * kNanosPerSecond},
                                    {"h", 3600 * kNanosPerSecond}};
  absl::string_view rest = text;
  int64_t total = 0;
  while (!rest.empty()) {
    size_t int_len = rest.find_first_not_of("0123456789");
    absl::string_view int_part = rest.substr(0, int_len);
    rest.remove_prefix(int_part.size());
    absl::string_view frac_part;
    if (!rest.empty() && rest.front() == '.') {
      rest.remove_prefix(1);
      size_t frac_len = rest.find_first_not_of("0123456789");
      frac_part = rest.substr(0, frac_len);
      rest.remove_prefix(frac_part.size());
      if (frac_part.empty()) return bad("write digits after the decimal point");
    }
    if (int_part.empty() && frac_part.empty()) return bad("write a number before each unit");
    size_t unit_len = rest.find_first_of("0123456789.");
    absl::string_view unit_name = rest.substr(0, unit_len);
    rest.remove_prefix(unit_name.size());
    const Unit* unit = nullptr;
    for (const Unit& u : kUnits) {
      if (u.name == unit_name) unit = &u;
    }
    if (unit == nullptr) {
      return bad(unit_name.empty() ? "add a unit: ns, us, ms, s, m or h"
                                   : absl::StrCat("unknown unit ", Quote(unit_name),
                                                  "; use ns, us, ms, s, m or h"));
    }
    if (int_part.size() > 12) return bad("too large");
    int64_t whole = 0;
    for (char c : int_part) whole = whole * 10 + (c - '0');
    // Fractions beyond nanosecond precision are dropped.
    int64_t frac_nanos = 0;
    int64_t scale = unit->nanos;
    for (char c : frac_part) {
      if (scale < 10) break;
      scale /= 10;
      frac_nanos += (c - '0') * scale;
    }
    if (whole > kMaxDurationSeconds * kNanosPerSecond / unit->nanos) return bad("too large");
    total += whole * unit->nanos + frac_nanos;
    if (total > kMaxDurationSeconds * kNanosPerSecond) return bad("too large");
  }
  return std::chrono::nanoseconds(total);
}

std::string FormatDuration(std::chrono::nanoseconds d) {
  const int64_t n = d.count();
  if (n == 0) return "0s";
  struct Unit {
    absl::string_view name;
    int64_t nanos;
  };
  static constexpr Unit kUnits[] = {{"h", 3600 * kNanosPerSecond},
                                    {"m", 60 * kNanosPerSecond},
                                    {"s", kNanosPerSecond},
                                    {"ms", 1'000'000},
                                    {"us", 1'000},
                                    {"ns", 1}};
  for (const Unit& u : kUnits) {
    if (n % u.nanos == 0) return absl::StrCat(n / u.nanos, u.name);
  }
  return absl::StrCat(n, "ns");
}

}  // namespace wsbridge::config
