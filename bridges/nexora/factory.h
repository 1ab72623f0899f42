// Builds Nexora bridges from wsbridge.config.v1.NexoraBridgeConfig.
#pragma once

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/nexora/nexora_bridge.h"
#include "wsbridge/config/v1/nexora.pb.h"

namespace wsbridge::nexora {

// The config's options with defaults applied. Secrets are read once now (a missing
// variable or file is a start-up error) and kept current afterwards.
absl::StatusOr<NexoraBridgeOptions> OptionsFromConfig(const config::v1::NexoraBridgeConfig& config,
                                                      std::string_view bridge_name);

// Registers the factory under "wsbridge.config.v1.NexoraBridgeConfig".
void RegisterFactory(core::BridgeRegistry& registry);

}  // namespace wsbridge::nexora
