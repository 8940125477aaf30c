#!/usr/bin/env bash
# The pure modules' unit tests under Miri (undefined-behaviour checks: the wire codecs,
# planner, session and room protocol, in-flight window, batch accounting, raw memory copies,
# the C ABI's pointer and struct helpers).
#
#   bash scripts/miri.sh
#
# Installs the pinned nightly (below) with miri and rust-src through rustup when missing;
# pinned so that every machine runs the same Miri. Where that
# cannot be done it prints "miri: skipped: <reason>" and exits 0 -- except under CI=true,
# where it fails. Property tests run 4 cases each (PROPTEST_CASES): Miri is ~1000x slower.
set -euo pipefail
cd "$(dirname "$0")/.."

cannot() {
  if [ "${CI:-}" = true ]; then
    echo "miri: cannot run (required under CI=true): $*" >&2
    exit 1
  fi
  echo "miri: skipped: $*"
  exit 0
}

tc=nightly-2026-05-20
command -v rustup >/dev/null || cannot "rustup not found (Miri comes as a nightly component)"
installed=$(rustup +"$tc" component list --installed 2>/dev/null || true)
if ! grep -q '^miri' <<<"$installed" || ! grep -q '^rust-src' <<<"$installed"; then
  echo "miri: installing $tc with miri and rust-src" >&2
  rustup toolchain install "$tc" --profile minimal --component miri,rust-src >&2 ||
    cannot "rustup could not install $tc with miri"
fi
echo "miri: $(rustc +"$tc" -V)" >&2

# Modules with no I/O, no clock and no threads of their own (or the unsafe helpers the
# others stand on). Proptest needs the working directory (isolation off).
modules=(
  wire:: plan:: batch:: kv::session kv::proto kv::layout kv::pages kv::failure
  transport::rdma::outstanding transport::fence topology::matrix topology::rails
  memory:: ffi::pointers ffi::versioned ffi::boundary
)
# A target directory per toolchain: Miri's artifacts from another nightly do not load.
MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}" PROPTEST_CASES="${PROPTEST_CASES:-4}" \
  CARGO_TARGET_DIR="target/$tc" cargo +"$tc" miri test --lib -- "${modules[@]}"
