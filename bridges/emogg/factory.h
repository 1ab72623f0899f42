// Builds Emogg bridges from wsbridge.config.v1.EmoggBridgeConfig.
#pragma once

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "bridges/core/bridge.h"
#include "bridges/emogg/emogg_bridge.h"
#include "wsbridge/config/v1/emogg.pb.h"

namespace wsbridge::emogg {

// The config's options with the documented defaults applied (secrets are read once now,
// so a missing one is a start-up error, then kept current by the session pool).
absl::StatusOr<EmoggBridgeOptions> OptionsFromConfig(const config::v1::EmoggBridgeConfig& config,
                                                     std::string_view bridge_name);

// Registers the factory under "wsbridge.config.v1.EmoggBridgeConfig".
void RegisterFactory(core::BridgeRegistry& registry);

}  // namespace wsbridge::emogg
