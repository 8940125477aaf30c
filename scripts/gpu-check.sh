#!/usr/bin/env bash
# One-shot check of every GPU path on a machine with an NVIDIA GPU, over binaries built here.
#
#   bash scripts/gpu-check.sh --build   # here: build, strip and collect into target/gpu-check
#   bash scripts/gpu-check.sh           # there (or here): run every check, print a table
#
# The GPU machine has CUDA and PyTorch but no Rust toolchain and no network, so --build puts
# everything it runs under target/gpu-check (stripped x86-64 release binaries and the Python
# package with its library, well under 64 MiB); the device tool carries that folder:
#   run(command="bash scripts/gpu-check.sh", carry=["target/gpu-check"], timeout_s=480)
# Without a GPU it says so and exits 0 at once. Checks:
#   - CUDA driver; pointer classification of cuMemAlloc'ed and host memory (Rust) and of torch
#     CUDA and pinned tensors (Python, as a peer sees them);
#   - GPUDirect RDMA write visibility: whether the GPU orders NIC writes itself or needs
#     cuFlushGPUDirectRDMAWrites before a room reports Success (and that flush, run);
#   - registration: staging over TCP; over RDMA (where there is a port) the mode chosen and
#     each forced mode (dmabuf, peermem, staging);
#   - KV pages GPU -> TCP loopback -> GPU through staging, verified, with GB/s: 36 KiB pages
#     and 4 KiB pages (the gathered small-page path);
#   - the Python package with torch CUDA tensors: paged transfers, a KV room with CUDA KV
#     buffers, and kvtransfer.mooncake with CUDA pointers.
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check

if [ "${1:-}" = "--build" ]; then
  set -e
  bash scripts/setup.sh >&2
  cargo build --release --quiet --lib --example gpu_check --example gpu_staging
  rm -rf "$out"
  mkdir -p "$out/python"
  cp target/release/examples/gpu_check target/release/examples/gpu_staging "$out/"
  cp -r ffi/python/kvtransfer "$out/python/"
  rm -rf "$out"/python/kvtransfer/__pycache__ "$out"/python/kvtransfer/*/__pycache__
  cp target/release/libkvtransfer.so "$out/python/kvtransfer/"
  cp scripts/gpu_check.py "$out/"
  strip "$out/gpu_check" "$out/gpu_staging" "$out/python/kvtransfer/libkvtransfer.so"
  du -sh "$out" >&2
  exit 0
fi

# Is there a GPU at all? Answer quickly where there is none.
gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ -z "$gpus" ] || [ "$gpus" = "0" ]; then
  echo "gpu-check: no GPU here (no nvidia-smi, or it lists no GPU): nothing to check"
  exit 0
fi
if [ ! -x "$out/gpu_check" ]; then
  echo "gpu-check: $out is missing: run 'bash scripts/gpu-check.sh --build' first and carry it" >&2
  exit 1
fi
echo "gpu-check: $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"

results=$(mktemp)
run_check() {  # name, command...: CHECK lines go to the table, everything else to the log
  local name=$1; shift
  local log rc
  log=$(mktemp)
  timeout 150 "$@" >"$log" 2>&1
  rc=$?
  grep '^CHECK ' "$log" | sed 's/^CHECK //' >>"$results"
  if ! grep -q '^CHECK ' "$log"; then
    echo "$name | $([ $rc -eq 0 ] && echo PASS || echo FAIL) | exit $rc: $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-150)" >>"$results"
  fi
  echo "---- $name (exit $rc)"; grep -v '^CHECK ' "$log" | tail -15
}

export RUST_BACKTRACE=1
run_check "rust checks" "$out/gpu_check"
run_check "staging 36 KiB pages" "$out/gpu_staging" 256 36864 5
run_check "staging 4 KiB pages (gathered)" "$out/gpu_staging" 1024 4096 5
py=$(command -v python3 || command -v python)
run_check "python checks" env PYTHONPATH="$out/python" KVTRANSFER_LIB="$PWD/$out/python/kvtransfer/libkvtransfer.so" "$py" "$out/gpu_check.py"

echo
printf '%-40s | %-4s | %s\n' check result detail
printf '%s\n' "-----------------------------------------+------+----------------------------------------"
fails=0
while IFS='|' read -r name status detail; do
  name=$(echo "$name" | xargs); status=$(echo "$status" | xargs)
  printf '%-40s | %-4s |%s\n' "$name" "$status" "$detail"
  [ "$status" = FAIL ] && fails=$((fails + 1))
done <"$results"
echo "gpu-check: $fails failed"
[ "$fails" -eq 0 ]
