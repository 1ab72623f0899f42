// Fuzzes every Nexora codec function that reads upstream bytes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "bridges/nexora/codec.h"

namespace nx = wsbridge::nexora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<nx::Event> e = nx::DecodeEvent(in);
  if (e.ok()) {
    // A decoded frame has its type; an unknown one keeps the whole frame; known kinds
    // never do.
    if (e->type.empty() && e->kind != nx::EventKind::kUnknown) __builtin_trap();
    if (e->kind == nx::EventKind::kUnknown && e->json != in) __builtin_trap();
    if (nx::EventKindName(e->kind) != e->type && e->kind != nx::EventKind::kUnknown) {
      __builtin_trap();
    }
    if (e->kind == nx::EventKind::kError) (void)nx::EventError(*e);
  }
  (void)nx::DecodeLoginAnswer(in);
  absl::StatusOr<std::string> chat = nx::DecodeCreateChatAnswer(in);
  if (chat.ok() && !nx::ValidateChatId(*chat).ok()) __builtin_trap();
  (void)nx::HttpError(500, in, "fuzz");
  (void)nx::HttpBaseUrl(in);
  // Whatever a chat id passes validation, the target stays one path segment.
  if (nx::ValidateChatId(in).ok()) {
    absl::StatusOr<std::string> t = nx::SocketTarget("", in, in);
    if (!t.ok() || t->find('?') != 8 + in.size()) __builtin_trap();
  }
  const std::string pe = nx::PercentEncode(in);
  for (char c : pe) {
    if (c == '?' || c == '&' || c == '#' || c == '/' || c == ' ') __builtin_trap();
  }
  return 0;
}
