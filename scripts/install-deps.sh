#!/usr/bin/env bash
# Installs what Wrenn needs on a Debian/Ubuntu host (idempotent; run as root).
# Host tools: QEMU (microvm), qemu-img, debootstrap and busybox-static for guest images, cpio, lz4
# for the kernel, iproute2 + nftables for network slots. Test tools: pytest, schemathesis, aiosmtpd (the
# tests' SMTP listener),
# openapi-spec-validator and the official Python SDK.
set -euo pipefail

APT_PACKAGES=(qemu-system-x86 qemu-utils debootstrap busybox-static cpio lz4 e2fsprogs iproute2 nftables
              ca-certificates curl jq python3 python3-pip gcc)
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

if ! command -v cargo >/dev/null; then
  echo "Rust is required: install it from https://rustup.rs (stable toolchain)" >&2
  exit 1
fi

if [[ "${1:-}" == "--test" ]]; then
  py=(python3 -m pip install -q --disable-pip-version-check)
  # Debian's own python refuses system-wide pip installs without this flag; pyenv's accepts it.
  if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
    py+=(--break-system-packages)
  fi
  python3 -c 'import pytest, schemathesis, openapi_spec_validator, yaml, wrenn, aiosmtpd' 2>/dev/null ||
    "${py[@]}" --ignore-requires-python pytest schemathesis openapi-spec-validator pyyaml httpx wrenn aiosmtpd
fi

# The store tests and one platform test run against PostgreSQL (WRENN_TEST_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/postgres). When that default is wanted and nothing listens
# there, install Debian's server and let the local `postgres` role in over TCP without a
# password (a test machine's setting; a server already running is left as it is).
if [[ "${1:-}" == "--test" && -z "${WRENN_TEST_POSTGRES_URL:-}" ]] &&
   ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "installing and starting PostgreSQL for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
  grep -q "wrenn tests" "$hba" ||
    sed -i '1i host all postgres 127.0.0.1/32 trust  # wrenn tests' "$hba"
  pg_ctlcluster "$(basename "$(dirname "$(dirname "$hba")")")" main restart
fi
if [[ "${1:-}" == "--test" ]] && ! command -v psql >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-client >/dev/null
fi
