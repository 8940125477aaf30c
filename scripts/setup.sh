#!/usr/bin/env bash
# Installs what building and testing kvtransfer needs, skipping whatever is present.
# Debian/Ubuntu, run as root (or with sudo available). Safe to run again.
set -euo pipefail

need=()
# cmake and libclang (bindgen) build rdma-mummy-sys, the run-time verbs loader under sideway;
# binutils and libibverbs-dev let tests/static_lib.rs link the static library beside libibverbs.
for pkg in cmake libclang-dev gcc binutils libibverbs-dev "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
