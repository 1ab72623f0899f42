// Fuzzes every NLX codec function that reads upstream bytes, and the turn encoder with
// caller-controlled JSON.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "bridges/nlx/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace wsbridge::nlx;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<Frame> f = DecodeFrame(in);
  if (f.ok()) {
    // Whatever it decoded to, the frame itself must be kept, byte for byte.
    if (f->json() != in) __builtin_trap();
    if (f->kind == FrameKind::kAck && f->conversation_id.empty()) __builtin_trap();
    if (f->kind == FrameKind::kError) (void)ErrorFrameStatus(*f, "fuzz");
  } else if (f.status().message().empty()) {
    __builtin_trap();
  }
  // The same bytes as caller input: extra_json, ids and keys.
  v1::Turn turn;
  turn.set_text("t");
  turn.set_extra_json(std::string(in));
  (void)EncodeTurn(turn, in, in);
  (void)ValidateConversationId(in);
  (void)UpgradeRefusedStatus(401, in);
  absl::StatusOr<std::string> url = UpgradeUrl("wss://h", Keys{"k", "d", std::string(in)}, "", "");
  if (url.ok() && url->find_first_of(" \r\n#") != std::string::npos) __builtin_trap();
  return 0;
}
