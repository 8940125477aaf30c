#!/usr/bin/env bash
# Installs what building and testing kvtransfer needs, skipping whatever is present.
# Debian/Ubuntu, run as root (or with sudo available). Safe to run again.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# sideway's bindings (RDMA transport) are generated with bindgen, which needs libclang.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 \
  || need+=(libclang-dev)
command -v cc >/dev/null 2>&1 || need+=(gcc)
for extra in "$@"; do
  command -v "$extra" >/dev/null 2>&1 || need+=("$extra")
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
