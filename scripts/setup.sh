#!/usr/bin/env bash
# Installs the Debian packages wsbridge needs to build, run and test, when they are missing.
# Idempotent and quiet when nothing is missing; needs root (or sudo) only when something is.
set -euo pipefail

pkgs=(
  cmake ninja-build g++ pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libboost1.81-dev libboost-json1.81-dev libssl-dev libabsl-dev libyaml-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-grpcio python3-protobuf python3-yaml openssl
  clang libclang-rt-14-dev lld
  nodejs npm kubectl
)
if [[ "${1:-}" == "--runtime-only" ]]; then
  pkgs=(cmake ninja-build g++ pkg-config
        libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
        libboost1.81-dev libboost-json1.81-dev libssl-dev libabsl-dev libyaml-cpp-dev)
fi

missing=()
for p in "${pkgs[@]}"; do
  # A tool already on PATH (e.g. node/npm from another source) counts as present.
  case "$p" in
    nodejs) command -v node >/dev/null 2>&1 && continue ;;
    npm) command -v npm >/dev/null 2>&1 && continue ;;
    kubectl) command -v kubectl >/dev/null 2>&1 && continue ;;
  esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "setup: installing ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
