#!/usr/bin/env bash
# Installs what Wrenn needs on a Debian/Ubuntu host (idempotent; run as root): the packages in
# APT_PACKAGES (scripts/lib.sh) and a Rust toolchain check. With --test also what the test suite
# needs: the Python packages of tests/requirements.txt, PostgreSQL and Redis (when the tests'
# default addresses have none) and psql.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

missing_packages() {
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
# Two rounds: installing Debian's qemu-system-x86 removes a newer qemu-utils that does not match
# it (some images ship a backported one), which the second round replaces with the matching one.
for round in 1 2; do
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]})) || break
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
  echo "could not install: ${missing[*]}" >&2
  exit 1
fi

ensure_cargo

[[ "${1:-}" == "--test" ]] || exit 0

# Every requirement of the file installed, at a version it accepts?
requirements_met() {
  python3 - "$TEST_REQUIREMENTS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(have, prereleases=True):
        sys.exit(1)
EOF
}
if ! requirements_met 2>/dev/null; then
  echo "installing the tests' Python packages ($TEST_REQUIREMENTS)"
  py=("${PIP_INSTALL[@]}")
  # Debian's own python refuses system-wide pip installs without this flag; pyenv's accepts it.
  if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    py+=(--break-system-packages)
  fi
  "${py[@]}" -r "$TEST_REQUIREMENTS"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
apt_install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The store tests and one platform test run against PostgreSQL (WRENN_TEST_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/postgres). When that default is wanted and nothing listens
# there, install Debian's server and let the local `postgres` role in over TCP without a
# password (a test machine's setting; a server already running is left as it is).
if [[ -z "${WRENN_TEST_POSTGRES_URL:-}" ]] && ! port_open 5432; then
  echo "installing and starting PostgreSQL for the tests"
  apt_install postgresql
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
  grep -q "wrenn tests" "$hba" ||
    sed -i '1i host all postgres 127.0.0.1/32 trust  # wrenn tests' "$hba"
  pg_ctlcluster "$(basename "$(dirname "$(dirname "$hba")")")" main restart
fi
if ! command -v psql >/dev/null; then
  apt_install postgresql-client
fi

# Two control planes share events through Redis in tests/e2e/test_events.py
# (WRENN_TEST_REDIS_URL, default redis://127.0.0.1:6379). Same rule: when that default is
# wanted and nothing listens there, install Debian's server (its package starts it).
if [[ -z "${WRENN_TEST_REDIS_URL:-}" ]] && ! port_open 6379; then
  echo "installing and starting Redis for the tests"
  apt_install redis-server
  for _ in $(seq 50); do port_open 6379 && break; sleep 0.1; done
  port_open 6379 || service redis-server start >/dev/null
  for _ in $(seq 50); do port_open 6379 && break; sleep 0.1; done
  port_open 6379 || { echo "Redis did not start on 127.0.0.1:6379" >&2; exit 1; }
fi

# Builds from OCI images are tested against a real local registry (Debian's docker-registry,
# started by the test itself on a port of its own, with htpasswd from apache2-utils).
if ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null; then
  apt_install docker-registry apache2-utils
fi
