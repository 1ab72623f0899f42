// The demo config built into wsbridged (deploy/config/demo.yaml).
#pragma once

#include <string_view>

namespace wsbridge::daemon {

// YAML text; empty when the build had no demo config.
std::string_view DemoConfigYaml();

}  // namespace wsbridge::daemon
