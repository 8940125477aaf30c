#!/usr/bin/env bash
# Builds kvtransfer (release) and runs its CLI; with no arguments, the demo transfer.
#   bash scripts/run.sh                 # demo: DeepSeek-shaped KV cache, verified, GB/s
#   bash scripts/run.sh bench --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet --bin kvtransfer
[ $# -gt 0 ] || set -- demo
exec ./target/release/kvtransfer "$@"
