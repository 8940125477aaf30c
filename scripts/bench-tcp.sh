#!/usr/bin/env bash
# kvtransfer TCP loopback vs iperf3 in the same run, same block sizes; prints a Markdown table.
#   bash scripts/bench-tcp.sh [seconds-per-point]
# JSON results go to bench-results/tcp-<date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
bash scripts/setup.sh iperf3 jq
cargo build --release --quiet --bin kvtransfer
mkdir -p bench-results
out="bench-results/tcp-$(date +%Y%m%d-%H%M%S).jsonl"
port=$(( 20000 + RANDOM % 20000 ))

iperf() { # block size -> GB/s (receiver side)
  iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  local bps
  bps=$(iperf3 -c 127.0.0.1 -p "$port" -l "$1" -t "$secs" -J | jq '.end.sum_received.bits_per_second')
  wait "$srv" || true
  awk -v b="$bps" 'BEGIN { printf "%.2f", b / 8e9 }'
}

echo "| block | kvtransfer write GB/s, contiguous (coalesced) | kvtransfer write GB/s, reversed (one slice per block) | iperf3 -l GB/s | ratio (reversed / iperf3) |"
echo "|---|---|---|---|---|"
for bs in 4K 64K 1M; do
  row=()
  for layout in contiguous reversed; do
    j=$(./target/release/kvtransfer bench --role loopback --transport tcp --block-size "$bs" --batch-size 128 \
          --layout "$layout" --duration "$secs" --json)
    echo "$j" >> "$out"
    row+=("$(echo "$j" | jq '.gbps')")
  done
  ip=$(iperf "$bs")
  awk -v bs="$bs" -v c="${row[0]}" -v r="${row[1]}" -v i="$ip" \
    'BEGIN { printf "| %s | %.2f | %.2f | %.2f | %.2fx |\n", bs, c, r, i, r / i }'
done
j=$(./target/release/kvtransfer bench --role loopback --transport tcp --mode latency --block-size 4K \
      --duration "$secs" --json)
echo "$j" >> "$out"
echo
echo "4 KiB single write: $(echo "$j" | jq -r '"p50 \(.latency_p50_us) us, p99 \(.latency_p99_us) us"')"
echo "(raw JSON: $out)"
