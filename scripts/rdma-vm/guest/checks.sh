# Helpers for guest-side driver scripts (scripts/rdma-tests.sh writes one per VM boot).
# Sourced inside the guest; needs the KVT_* variables run.sh exports.
#
#   kvt_step LABEL CMD [ARGS...]   run one step, print its outcome, count it
#   kvt_summary                    print "N passed, N failed"; exit with the first failure's
#                                  status (so a lone test binary's status is passed through)
#   kvt_check_devinfo              ibv_devinfo; every device in KVT_RDMA_DEVICES PORT_ACTIVE
#   kvt_check_write_bw CLIENT SERVER [PERFTEST ARGS...]
#                                  ib_write_bw (RC RDMA WRITE) from CLIENT to SERVER device

kvt_passed=0 kvt_failed=0 kvt_first_failure=0 kvt_steps=()
exec {kvt_sleeper}<> <(:)
kvt_sleep() { read -r -t "$1" -u "$kvt_sleeper" _ || true; }  # no exec (slow under TCG)

kvt_step() {
  local label=$1 status t0=${EPOCHREALTIME//[.,]/} dt
  shift
  echo "=== rdma-tests: $label"
  ( "$@" )  # a subshell: a step that exits or cds does not take the driver with it
  status=$?
  dt=$(( (${EPOCHREALTIME//[.,]/} - t0) / 100000 ))
  if [ "$status" -eq 0 ]; then
    kvt_passed=$((kvt_passed + 1))
    kvt_steps+=("ok      $label ($((dt / 10)).$((dt % 10)) s)")
  else
    kvt_failed=$((kvt_failed + 1))
    [ "$kvt_first_failure" -ne 0 ] || kvt_first_failure=$status
    kvt_steps+=("FAILED  $label (status $status, $((dt / 10)).$((dt % 10)) s)")
  fi
  echo "--- ${kvt_steps[-1]}"
}

kvt_summary() {
  echo
  printf '  %s\n' "${kvt_steps[@]}"
  echo "$kvt_passed passed, $kvt_failed failed"
  exit "$kvt_first_failure"
}

kvt_check_devinfo() {
  local out dev ok=0
  out=$(ibv_devinfo) || return 1
  echo "$out"
  for dev in $KVT_RDMA_DEVICES; do
    # hca_id: line, then that device's port lines up to the next hca_id.
    if awk -v d="$dev" '/^hca_id:/ { cur = $2 } cur == d && /state:[[:space:]]+PORT_ACTIVE/ { found = 1 }
                         END { exit !found }' <<<"$out"; then
      ok=$((ok + 1))
    else
      echo "$dev: not PORT_ACTIVE" >&2
    fi
  done
  [ "$ok" -eq "$(wc -w <<<"$KVT_RDMA_DEVICES")" ] && [ "$ok" -gt 0 ]
}

# Waits (up to $2 s) until something listens on TCP port $1.
kvt_wait_listen() {
  local hex i local_addr st
  printf -v hex '%04X' "$1"
  for ((i = 0; i < $2 * 10; i++)); do
    while read -r _ local_addr _ st _; do
      [[ $local_addr == *:$hex && $st == 0A ]] && return 0
    done < /proc/net/tcp
    kvt_sleep 0.1
  done
  return 1
}

kvt_check_write_bw() {
  local client=$1 server=$2 port=18515 attempt spid cst sst bw ip_var dir
  shift 2
  ip_var=KVT_IP_${server#rxe}
  [ -n "${!ip_var:-}" ] || { echo "no $ip_var: is $server in the fabric?" >&2; return 1; }
  dir=$(mktemp -d)
  # perftest calibrates its clock from the TSC; under TCG that sometimes fails ("Correlation
  # coefficient r^2 < 0.9") and the run then reports 0.00 MB/s for a transfer that worked.
  for attempt in 1 2 3; do
    timeout 120 ib_write_bw -d "$server" -x "$KVT_GID_INDEX" -p "$port" "$@" > "$dir/server.log" 2>&1 &
    spid=$!
    if ! kvt_wait_listen "$port" 30; then
      echo "ib_write_bw server on $server did not start:" >&2
      cat "$dir/server.log" >&2
      kill "$spid" 2>/dev/null
      return 1
    fi
    timeout 120 ib_write_bw -d "$client" -x "$KVT_GID_INDEX" -p "$port" "$@" "${!ip_var}" > "$dir/client.log" 2>&1
    cst=$?
    wait "$spid"
    sst=$?
    bw=$(awk 'seen && $1 ~ /^[0-9]+$/ { print $4; exit } /#bytes/ { seen = 1 }' "$dir/client.log")
    if [ "$cst" -eq 0 ] && [ "$sst" -eq 0 ] && [ -n "$bw" ] && [ "$bw" != 0.00 ]; then
      echo "$client -> $server: ib_write_bw $* : BW average $bw MB/s"
      rm -rf "$dir"
      return 0
    fi
    if [ "$cst" -eq 0 ] && [ "$sst" -eq 0 ]; then
      echo "attempt $attempt: ib_write_bw reported '${bw:-nothing}' MB/s (clock calibration?); again"
      continue
    fi
    echo "$client -> $server: ib_write_bw failed (client $cst, server $sst)" >&2
    echo "--- client:" >&2; cat "$dir/client.log" >&2
    echo "--- server:" >&2; cat "$dir/server.log" >&2
    rm -rf "$dir"
    return 1
  done
  rm -rf "$dir"
  return 1
}

# kvt_check_bench_repeat RUNS KVTRANSFER [BENCH ARGS...]: one `kvtransfer bench` target on
# rxeB0,rxeB1 and RUNS initiator runs from rxeA0,rxeA1 against it, one after another; every
# run must finish without error. A failing run's log lines with its reason are printed.
kvt_check_bench_repeat() {
  local runs=$1 kv=$2 dir tgt addr i failed=0 rates=()
  shift 2
  dir=$(mktemp -d)
  KVT_DEVICES=rxeB0,rxeB1 KVT_QPS_PER_RAIL=1 "$kv" bench --role target --transport rdma \
    --buffer-size 64M > "$dir/target.out" 2> "$dir/target.err" &
  tgt=$!
  for _ in $(seq 300); do
    addr=$(head -n 1 "$dir/target.out" 2>/dev/null | jq -r '.listening // empty' 2>/dev/null)
    [ -n "$addr" ] && break
    kill -0 "$tgt" 2>/dev/null || break
    kvt_sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "bench target did not start:" >&2; cat "$dir/target.err" >&2
    kill "$tgt" 2>/dev/null; rm -rf "$dir"; return 1
  fi
  for i in $(seq "$runs"); do
    if KVT_DEVICES=rxeA0,rxeA1 KVT_QPS_PER_RAIL=1 timeout 120 "$kv" bench --role initiator \
         --target "$addr" --transport rdma --json "$@" > "$dir/run.json" 2> "$dir/run.err"; then
      rates+=("$(jq -r '(.gbps * 1000 | round | tostring) + " MB/s"' "$dir/run.json")")
    else
      failed=$((failed + 1))
      echo "run $i of $runs failed:" >&2
      grep -iE "error|fail|IBV_|panick|worker" "$dir/run.err" | tail -n 8 >&2
    fi
  done
  kill "$tgt" 2>/dev/null; wait "$tgt" 2>/dev/null
  echo "$runs runs of bench $*: $failed failed; ${rates[*]}"
  rm -rf "$dir"
  [ "$failed" -eq 0 ]
}
