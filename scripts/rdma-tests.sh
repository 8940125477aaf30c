#!/usr/bin/env bash
# The RDMA verbs suite, on Soft-RoCE (rdma_rxe) devices in a QEMU guest
# (scripts/rdma-vm/), since our build machines' kernels have no InfiniBand support.
#
#   bash scripts/rdma-tests.sh
#
# Needs root (apt-get, and qemu sharing / with the guest) and a Debian-like x86_64 host;
# TCG emulation is enough, /dev/kvm is not needed. Where that is missing it prints one line,
# "rdma-tests: skipped: <reason>", and exits 0 -- except under CI=true, where it fails.
#
# It prepares the machine (scripts/rdma-vm/setup.sh), builds the verbs test binary and the
# library's unit-test binary on the host (cargo test --release --no-run --test rdma_verbs,
# and --lib, whose tests named *over_rdma* run), boots the guest once and runs
# every planned step in it, in order, with libtest's output passed through. Until the test
# target rdma_verbs exists (or with KVT_RDMA_TESTS_SMOKE=1), the plan is a smoke check
# instead: ibv_devinfo, and ib_write_bw from rxeA0 to rxeB0.
# The closing line is "N passed, N failed" over the steps; the exit status is the first
# failing step's (124: timed out, 125: the VM died).
#
# Environment: KVT_RDMA_TESTS_TIMEOUT (seconds for the whole VM run, default 1200),
# KVT_RDMA_TESTS_SMOKE=1 (only the smoke checks: the guest and fabric, no cargo build),
# and run.sh's KVT_VM_* settings.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
vm=$repo/scripts/rdma-vm
timeout=${KVT_RDMA_TESTS_TIMEOUT:-1200}

cannot() {
  if [ "${CI:-}" = true ]; then
    echo "rdma-tests: cannot run (required under CI=true): $*" >&2
    exit 1
  fi
  echo "rdma-tests: skipped: $*"
  exit 0
}
say() { echo "rdma-tests: $*" >&2; }

# --- can it run here? -------------------------------------------------------------------
[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || cannot "needs Linux on x86_64 (the guest runs Debian's amd64 kernel)"
[ "$(id -u)" -eq 0 ] || cannot "needs root (apt-get, qemu sharing / with the guest)"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || cannot "apt-get/dpkg unavailable (needs a Debian-like host)"
command -v cargo >/dev/null || cannot "cargo not found"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! bash "$vm/setup.sh" 2>"$tmp/setup.log"; then
  cat "$tmp/setup.log" >&2
  cannot "scripts/rdma-vm/setup.sh failed: $(tail -n 1 "$tmp/setup.log")"
fi
cat "$tmp/setup.log" >&2
qemu-system-x86_64 --version >/dev/null 2>&1 || cannot "qemu-system-x86_64 does not run"
if ! command -v jq >/dev/null; then
  say "installing jq"
  { apt-get install -y -qq --no-install-recommends jq >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends jq >/dev/null; }; } ||
    cannot "cannot install jq"
fi

# --- the plan: steps run in sequence in one VM boot -------------------------------------
# plan_add LABEL CMD [ARGS...]: CMD runs in the guest, in the checkout's root, with the
# KVT_* variables set; it may be a host binary/script or a function of
# scripts/rdma-vm/guest/checks.sh. To add tests, add plan_add lines below.
plan=()
plan_add() {
  local label=$1 words
  shift
  printf -v words ' %q' "$label" "$@"
  plan+=("kvt_step$words")
}
# write_driver FILE: the guest-side script that runs the plan.
write_driver() {
  {
    echo '#!/bin/bash'
    echo '# Written by scripts/rdma-tests.sh for one VM boot.'
    printf '. %q\n' "$vm/guest/checks.sh"
    printf '%s\n' "${plan[@]}"
    echo 'kvt_summary'
  } > "$1"
}

# Test binaries are built on the host, at full speed (building under TCG would be slow).
# $1 = test target name; prints the executable's path.
build_test_binary() {
  local json=$tmp/cargo-$1.json exe
  if ! cargo test --release --no-run --message-format=json --test "$1" > "$json"; then
    jq -r 'select(.reason == "compiler-message") | .message.rendered' "$json" >&2 || true
    say "building test target $1 failed"
    return 1
  fi
  exe=$(jq -r --arg t "$1" \
    'select(.reason == "compiler-artifact" and .target.name == $t and .executable != null) | .executable' \
    "$json" | tail -n 1)
  [ -n "$exe" ] && [ -x "$exe" ] || { say "no executable for test target $1 in cargo's output"; return 1; }
  echo "$exe"
}
# The library's own unit-test binary (tests that need crate internals, e.g. emulated GPU
# memory); prints the executable's path.
build_lib_test_binary() {
  local json=$tmp/cargo-lib.json exe
  if ! cargo test --release --no-run --message-format=json --lib > "$json"; then
    jq -r 'select(.reason == "compiler-message") | .message.rendered' "$json" >&2 || true
    say "building the library's unit tests failed"
    return 1
  fi
  exe=$(jq -r 'select(.reason == "compiler-artifact" and .profile.test and .executable != null) | .executable' \
    "$json" | tail -n 1)
  [ -n "$exe" ] && [ -x "$exe" ] || { say "no unit-test executable in cargo's output"; return 1; }
  echo "$exe"
}
has_test_target() {
  cargo metadata --no-deps --format-version 1 |
    jq -e --arg t "$1" '[.packages[].targets[] | select(.name == $t and (.kind | index("test")))] | length > 0' \
      >/dev/null
}

if [ "${KVT_RDMA_TESTS_SMOKE:-0}" != 1 ] && has_test_target rdma_verbs; then
  bin=$(build_test_binary rdma_verbs)
  plan_add "rdma_verbs ($(basename "$bin"))" "$bin" --test-threads=1
  # Unit tests named *over_rdma* skip themselves outside the guest.
  lib=$(build_lib_test_binary)
  plan_add "unit tests over_rdma ($(basename "$lib"))" "$lib" --test-threads=1 over_rdma
  # Two rails at 64 KiB x 64 WRITEs, thirty runs against one target: none may fail (three of
  # eleven such runs once ended in IBV_WC_WR_FLUSH_ERR).
  cargo build --release --quiet --bin kvtransfer
  plan_add "2-rail WRITE bench, 64 KiB x 64, 30 runs" kvt_check_bench_repeat 30 \
    "$repo/target/release/kvtransfer" --block-size 64K --batch-size 64 --duration 1
else
  say "smoke checks only (no test target rdma_verbs, or KVT_RDMA_TESTS_SMOKE=1)"
  plan_add "ibv_devinfo: every device PORT_ACTIVE" kvt_check_devinfo
  plan_add "ib_write_bw rxeA0 -> rxeB0, 64 KiB x 1000" kvt_check_write_bw rxeA0 rxeB0 -s 65536 -n 1000
fi

# --- one boot -----------------------------------------------------------------------------
write_driver "$tmp/driver.sh"
say "booting the Soft-RoCE guest (${#plan[@]} step(s), timeout ${timeout} s)"
status=0
RUST_BACKTRACE=${RUST_BACKTRACE:-1} bash "$vm/run.sh" --timeout "$timeout" -- bash "$tmp/driver.sh" || status=$?
case $status in
  124) say "timed out after ${timeout} s (KVT_RDMA_TESTS_TIMEOUT)" ;;
  125) say "the VM failed before the tests reported" ;;
esac
exit "$status"
