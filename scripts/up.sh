#!/usr/bin/env bash
# Installs what is missing, builds Wrenn and starts the whole platform on this machine:
# control plane on http://127.0.0.1:8080, one host agent, SQLite under /var/lib/wrenn.
# The first start builds the guest images (about a minute); later starts reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $EUID -eq 0 ]] || { echo "run as root (network namespaces and VMs need it): sudo $0" >&2; exit 1; }
source scripts/lib.sh
ensure_cargo  # sudo hides the invoking user's rustup: find it (exported to the steps below)
scripts/install-deps.sh
scripts/build.sh
exec target/release/wrenn up "$@"
