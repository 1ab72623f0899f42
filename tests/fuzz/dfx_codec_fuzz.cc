// Fuzzes every DFX codec function that reads upstream bytes.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "bridges/core/json.h"
#include "bridges/dfx/codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<wsbridge::dfx::ResponseFrame> f = wsbridge::dfx::ParseResponse(in);
  if (f.ok()) {
    // Parsed frames must view into the input and carry a valid header.
    if (!wsbridge::dfx::IsRequestId(f->request_id) || f->status < 0 || f->status > 999) {
      __builtin_trap();
    }
    (void)wsbridge::dfx::ChunkAnswerOf(*f);
    (void)wsbridge::dfx::ResultInfoOf(*f);
    (void)wsbridge::dfx::UpstreamError(*f, "fuzz");
  }
  (void)wsbridge::core::ValidateJsonObject(in);
  (void)wsbridge::dfx::ValidateActionId(in);
  return 0;
}
