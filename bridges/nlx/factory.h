// Builds NLX bridges from wsbridge.config.v1.NlxBridgeConfig.
#pragma once

#include <string_view>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/nlx/nlx_bridge.h"
#include "wsbridge/config/v1/nlx.pb.h"

namespace wsbridge::nlx {

// The config's options with defaults applied. Secrets are read once now (a missing
// variable or file is a start-up error) and kept current afterwards.
absl::StatusOr<NlxBridgeOptions> OptionsFromConfig(const config::v1::NlxBridgeConfig& config,
                                                   std::string_view bridge_name);

// Registers the factory under "wsbridge.config.v1.NlxBridgeConfig".
void RegisterFactory(core::BridgeRegistry& registry);

}  // namespace wsbridge::nlx
