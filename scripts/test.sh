#!/usr/bin/env bash
# Runs every test of kvtransfer: formatting, lints, unit, property, integration (in- and
# cross-process TCP), doc tests, all of them again in a debug build, the pure modules under
# Miri, the static library linked beside libibverbs, the Python package as installed, SGLang's own code on both
# backends, the GPU check (which stops where there is no GPU) and the RDMA suite in a
# Soft-RoCE guest. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR=never
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --release --all-targets -- -D warnings

step "lean library: no CLI crate among its dependencies, none newer than the MSRV"
bash scripts/lean.sh

step "cargo test (unit, property, integration, doc)"
cargo test --release --all-targets --no-fail-fast
cargo test --release --doc

step "cargo doc, warnings denied (every public item documented, every link resolved)"
RUSTDOCFLAGS="-D warnings" cargo doc --release --quiet --no-deps --workspace

step "cargo test, debug profile (overflow checks and debug assertions on)"
cargo test --all-targets --no-fail-fast

step "Miri: the pure modules' unit tests"
bash scripts/miri.sh

step "Python package (pytest against the installed wheel)"
bash scripts/python-tests.sh

step "SGLang 0.5.23, real code on CPU: its Mooncake backend on kvtransfer.mooncake, the native backend"
bash scripts/sglang-tests.sh

step "examples and the main job run (small demo, every byte verified)"
cargo run --release --quiet --example write_read
./target/release/kvtransfer demo --pages 32 --rounds 1

step "GPU check (says so and stops where there is no GPU)"
bash scripts/gpu-check.sh

step "fuzz targets, ${FUZZ_SECONDS:-30} s each (libFuzzer, AddressSanitizer)"; bash scripts/fuzz.sh
step "TCP under network faults: a partition, then 1% loss + 5 ms delay (two network namespaces)"; bash scripts/faults.sh
step "RDMA verbs suite (Soft-RoCE guest)"
bash scripts/rdma-tests.sh

step "done in $(( $(date +%s) - start )) s"
