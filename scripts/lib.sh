# Shared by the scripts in this directory (sourced, not run): what to install, and how to find
# the Rust toolchain when run through sudo.

# Debian/Ubuntu packages. Host: QEMU (microvm), qemu-img, debootstrap and busybox-static for
# guest images, cpio, lz4 for the kernel, e2fsprogs, iproute2 + nftables for network slots.
# Build: build-essential (gcc alone does not bring libc6-dev, which the linker needs: gcc only
# recommends it and recommends are not installed), pkg-config. Tests: python3-pip, python3-venv
# (scripts/check-deps.sh builds a clean virtual environment), jq, curl. Port proxy:
# libnss-myhostname resolves every `*.localhost` name to loopback (its install adds
# `myhostname` to /etc/nsswitch.conf), so the URLs the SDK builds from `wrenn up`'s
# `http://localhost:8080` (`8888-cl-….localhost:8080`) reach the platform from this machine.
APT_PACKAGES=(qemu-system-x86 qemu-utils debootstrap busybox-static cpio lz4 e2fsprogs iproute2 nftables
              ca-certificates curl jq python3 python3-pip python3-venv build-essential pkg-config
              libnss-myhostname)

# The tests' Python packages (one file: install-deps.sh installs it, check-deps.sh proves it
# covers every import), and pip's flags for it: the official SDK `wrenn` declares Python >= 3.13
# but runs on 3.11.
TEST_REQUIREMENTS=tests/requirements.txt
PIP_INSTALL=(python3 -m pip install -q --disable-pip-version-check --ignore-requires-python)

# Puts cargo on PATH. `sudo` resets PATH and HOME, which hides a rustup toolchain installed by
# the user who ran `sudo ./scripts/…`: when cargo is not on PATH, use that user's ~/.cargo/bin
# (or root's own), with CARGO_HOME and RUSTUP_HOME pointing at that user's ~/.cargo and
# ~/.rustup so rustup finds its toolchains. Also fixes `sudo env PATH=$PATH …`, where cargo is
# found but rustup would look for toolchains in root's home. Says what to do when there is none.
ensure_cargo() {
  local cargo user="${SUDO_USER:-}" home="" dir
  cargo=$(command -v cargo || true)
  if [[ -z "$cargo" ]]; then
    if [[ -n "$user" && "$user" != root ]]; then
      home=$(getent passwd "$user" | cut -d: -f6)
    fi
    for dir in ${home:+"$home"} "${HOME:-/root}" /root; do
      if [[ -x "$dir/.cargo/bin/cargo" ]]; then
        cargo="$dir/.cargo/bin/cargo"
        export PATH="$dir/.cargo/bin:$PATH"
        echo "using the Rust toolchain in $dir (sudo left it off PATH)"
        break
      fi
    done
  fi
  if [[ -z "$cargo" ]]; then
    {
      echo "Rust (cargo) is required and was not found on PATH${home:+ nor in $home/.cargo/bin}."
      echo "Install it with rustup (https://rustup.rs, stable toolchain)${user:+ as $user, not as root}:"
      echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
      echo "then run this again; with cargo elsewhere, pass your PATH through sudo:"
      echo "  sudo env PATH=\"\$PATH\" $0"
    } >&2
    return 1
  fi
  # A rustup proxy in someone's ~/.cargo/bin: point rustup at that home's toolchains.
  if [[ "$cargo" == */.cargo/bin/cargo ]]; then
    dir=${cargo%/.cargo/bin/cargo}
    if [[ -z "${RUSTUP_HOME:-}" && -d "$dir/.rustup" ]]; then
      export CARGO_HOME="${CARGO_HOME:-$dir/.cargo}" RUSTUP_HOME="$dir/.rustup"
    fi
  fi
}
