#!/usr/bin/env bash
# A DeepSeek-V3 request through SGLang 0.5.23's real PD code on each backend, interleaved
# rounds (scripts/bench_sglang.py says what is measured). Uses SGLang's cached venv
# (scripts/sglang-env.sh) with the current kvtransfer installed, and puts Mooncake's real
# engine (mooncake-transfer-engine-non-cuda, from PyPI) beside it on PYTHONPATH only, so the
# venv the tests use stays without it.
#   bash scripts/bench-sglang.sh [--rounds 3] [--rooms 5] [--configs a,b,c] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/sglang-env.sh)
# Mooncake's extension links libibverbs.so.1 even for TCP.
bash scripts/setup.sh libibverbs1 >&2
cargo build --release --quiet --lib
mooncake="${KVT_SGLANG_VENV_ROOT:-$HOME/.cache/kvtransfer}/mooncake-non-cuda"
if [ ! -f "$mooncake/.kvtransfer-complete" ]; then
  rm -rf "$mooncake"
  if "$venv/bin/python" -m pip --disable-pip-version-check --quiet install --no-deps --target "$mooncake" \
      mooncake-transfer-engine-non-cuda >&2; then
    touch "$mooncake/.kvtransfer-complete"
  else
    echo "bench-sglang: mooncake-transfer-engine-non-cuda did not install; comparing kvtransfer's paths only" >&2
  fi
fi
export PYTHONPATH="$mooncake${PYTHONPATH:+:$PYTHONPATH}"
exec env -u KVTRANSFER_LIB "$venv/bin/python" scripts/bench_sglang.py "$@"
