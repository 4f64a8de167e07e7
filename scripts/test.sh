#!/usr/bin/env bash
# The whole test suite: lint, unit tests, real-VM tests of the host agent, the API contract,
# end-to-end tests through the public API and the official SDK, schemathesis. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $EUID -eq 0 ]] || { echo "run as root (tests boot VMs in network namespaces): sudo $0" >&2; exit 1; }
source scripts/lib.sh
export CARGO_TERM_COLOR=never

started=$SECONDS
current=""
step() { current="$*"; echo; echo "=== $* ==="; }
finish() {
  local rc=$? took=$((SECONDS - started))
  local t="$((took / 60)) min $((took % 60)) s"
  if ((rc == 0)); then
    echo "suite passed in $t"
  else
    echo "suite FAILED after $t${current:+ (step: $current)}" >&2
  fi
}
trap finish EXIT

ensure_cargo

step "dependencies"
scripts/install-deps.sh --test

step "dependencies cover the suite (clean virtual environment)"
scripts/check-deps.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings

step "build"
scripts/build.sh --debug

step "API contract (docs/openapi.yaml)"
python3 docs/tools/check_spec.py

step "unit and host-agent tests (real VMs)"
cargo test --workspace -q 2>&1 | tee target/cargo-test.log
grep -q "test result: ok" target/cargo-test.log

step "end-to-end tests through the API and the official SDK (real VMs)"
# Any order works: every module that destroys data (test_schema.py's admin run) or kills the
# platform runs on a platform of its own.
python3 -m pytest -q -p no:cacheprovider tests/e2e

# On CI nothing else runs capsules on this machine, so any leftover is ours.
if [[ "${CI:-}" == "true" ]]; then
  step "nothing left behind"
  leftover=$(ip netns list | grep -c '^wrenn-s' || true)
  [[ "$leftover" == 0 ]] || { echo "leftover network namespaces:"; ip netns list; exit 1; }
  if pgrep -f 'qemu-system-x86_64 -name cl-' >/dev/null; then echo "leftover VMs:"; pgrep -af qemu-system; exit 1; fi
fi
current=""
