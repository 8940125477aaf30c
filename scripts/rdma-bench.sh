#!/usr/bin/env bash
# kvtransfer over RDMA next to perftest's ib_write_bw, same Soft-RoCE devices, same guest boot.
#   bash scripts/rdma-bench.sh [seconds-per-point]
# Prints a Markdown table (MB/s = 10^6 bytes/s). It is emulated hardware (the guest runs under
# TCG at tens of MB/s): compare ratios, not absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}
if [ "${KVT_VM:-}" != 1 ]; then
  bash scripts/setup.sh jq
  bash scripts/rdma-vm/setup.sh
  cargo build --release --quiet --bin kvtransfer
  exec bash scripts/rdma-vm/run.sh --timeout 900 -- bash scripts/rdma-bench.sh "$secs"
fi

# --- inside the guest ---
ip link set lo up 2>/dev/null || true   # engines bootstrap over loopback
kv=./target/release/kvtransfer
gid=${KVT_GID_INDEX:-1}

perftest() { # size, server dev, client dev, server ip -> MB/s (perftest's BW average)
  local out try
  for try in 1 2 3; do  # TCG sometimes breaks perftest's clock calibration: it then says 0.00
    ib_write_bw -d "$2" -x "$gid" -s "$1" -D "$secs" -F >/dev/null 2>&1 &
    local srv=$!
    sleep 1
    out=$(ib_write_bw -d "$3" -x "$gid" -s "$1" -D "$secs" -F "$4" 2>/dev/null | awk '$1 == '"$1"' { print $4 }')
    wait "$srv" 2>/dev/null || true
    if [ -n "$out" ] && awk -v v="$out" 'BEGIN { exit !(v > 0) }'; then echo "$out"; return; fi
  done
  echo 0
}

kvbench() { # block size, target devices, initiator devices, QPs per rail -> MB/s
  local fifo; fifo=$(mktemp -u); mkfifo "$fifo"
  export KVT_QPS_PER_RAIL=$4
  KVT_DEVICES=$2 $kv bench --role target --transport rdma --buffer-size 256M >"$fifo" 2>/dev/null &
  local tgt=$!
  local addr; addr=$(head -n1 "$fifo" | jq -r .listening)
  local json
  json=$(KVT_DEVICES=$3 $kv bench --role initiator --target "$addr" --transport rdma \
           --block-size "$1" --batch-size 32 --duration "$secs" --json 2>"$fifo.err" || echo '{}')
  if [ "$json" = '{}' ]; then
    echo "kvtransfer bench failed ($1 B, $3 -> $2):" >&2
    tail -n 5 "$fifo.err" >&2
  fi
  rm -f "$fifo.err"
  kill "$tgt" 2>/dev/null; wait "$tgt" 2>/dev/null || true; rm -f "$fifo"
  echo "$json" | jq -r '(.gbps // 0) * 1000 | . * 10 | round / 10'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }

rounds=${KVT_BENCH_ROUNDS:-3}
echo "| block | ib_write_bw 1 rail, 1 QP | kvtransfer 1 rail, 1 QP | ratio | kvtransfer 2 rails, 1 QP each | 2 rails / 1 rail | kvtransfer 1 rail, 2 QPs (default) |"
echo "|---|---|---|---|---|---|---|"
for bs in 65536 1048576; do
  pts=() ones=() twos=() dflt=()
  # Interleaved rounds, medians reported: under TCG one run can differ from the next by 2x.
  for _ in $(seq "$rounds"); do
    pts+=("$(perftest "$bs" rxeB0 rxeA0 "${KVT_IP_B0:-198.18.0.3}")")
    ones+=("$(kvbench "$bs" rxeB0 rxeA0 1)")
    twos+=("$(kvbench "$bs" rxeB0,rxeB1 rxeA0,rxeA1 1)")
    dflt+=("$(kvbench "$bs" rxeB0 rxeA0 2)")
  done
  echo "raw $bs: ib_write_bw ${pts[*]} | 1 rail ${ones[*]} | 2 rails ${twos[*]} | 1 rail 2 QPs ${dflt[*]}"
  pt=$(printf '%s\n' "${pts[@]}" | median)
  one=$(printf '%s\n' "${ones[@]}" | median)
  two=$(printf '%s\n' "${twos[@]}" | median)
  dq=$(printf '%s\n' "${dflt[@]}" | median)
  awk -v bs="$bs" -v p="$pt" -v o="$one" -v t="$two" -v d="$dq" 'BEGIN {
    printf "| %d KiB | %.1f | %.1f | %.2fx | %.1f | %.2fx | %.1f |\n", bs / 1024, p, o, (p > 0 ? o / p : 0), t, (o > 0 ? t / o : 0), d }'
done
