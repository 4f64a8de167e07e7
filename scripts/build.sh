#!/usr/bin/env bash
# Builds the static guest agent (envd) and the `wrenn` binary.
#   scripts/build.sh            release build (what `wrenn up` runs)
#   scripts/build.sh --debug    debug build of wrenn (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_cargo
# envd is copied into guests: static, so it runs on any rootfs. Its own target dir keeps the
# static flags away from the host binaries' build cache.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p envd --target x86_64-unknown-linux-gnu
if [[ "${1:-}" == "--debug" ]]; then
  cargo build -p wrenn
else
  cargo build --release -p wrenn
fi
