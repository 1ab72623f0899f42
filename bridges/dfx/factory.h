// Builds DFX bridges from wsbridge.config.v1.DfxBridgeConfig.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/dfx/dfx_bridge.h"
#include "wsbridge/config/v1/dfx.pb.h"

namespace wsbridge::dfx {

// The config's options with defaults applied (secrets are resolved per login).
absl::StatusOr<DfxBridgeOptions> OptionsFromConfig(const config::v1::DfxBridgeConfig& config,
                                                   std::string_view bridge_name);

// Registers the factory under "wsbridge.config.v1.DfxBridgeConfig".
void RegisterFactory(core::BridgeRegistry& registry);

}  // namespace wsbridge::dfx
