#!/usr/bin/env bash
# KV rooms over TCP under network faults: ffi/python/tests/test_faults.py, with a decode
# process and a prefill process in two network namespaces joined by a veth pair.
#
#   bash scripts/faults.sh [pytest arguments]
#
# Needs root (network namespaces, iptables) on Linux; installs iproute2 and iptables with apt
# when missing. Where it cannot run it prints "faults: skipped: <reason>" and exits 0 --
# except under CI=true, where it fails.
#
# It creates the namespaces (unique names, removed on exit, with whatever still runs in them)
# joined by a veth pair, 10.213.0.1/24 (decode side) and 10.213.0.2/24 (prefill side), with
# GSO capped at one segment, so what iptables sees is a wire packet. Then it checks that
# the kernel does what the tests use: iptables DROP, -m statistic (random loss; else it falls
# back to nftables' numgen) and -j NFQUEUE with nfnetlink_queue (the user-space delay stage,
# faults_delay.py, since our kernels have no netem; without it the loss test runs without
# delay and says so). The Python package is the one scripts/python-tests.sh installs in
# target/pyenv, reused when it is newer than the sources, else installed the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

cannot() {
  if [ "${CI:-}" = true ]; then
    echo "faults: cannot run (required under CI=true): $*" >&2
    exit 1
  fi
  echo "faults: skipped: $*"
  exit 0
}
say() { echo "faults: $*" >&2; }

[ "$(uname -s)" = Linux ] || cannot "needs Linux (network namespaces)"
[ "$(id -u)" -eq 0 ] || cannot "needs root (network namespaces, iptables)"
{ command -v apt-get && command -v dpkg; } >/dev/null || cannot "apt-get/dpkg unavailable (needs a Debian-like host)"
bash scripts/setup.sh iproute2 iptables python3 python3-venv

# --- two namespaces and a veth --------------------------------------------------------------
nsd=kvt-faults-decode-$$ nsp=kvt-faults-prefill-$$
ifd=kvtfd$$ ifp=kvtfp$$ # interface names: at most 15 bytes
ipd=10.213.0.1 ipp=10.213.0.2
tests_pid="" work=""
cleanup() {
  local ns pid
  [ -z "$tests_pid" ] || kill -TERM "$tests_pid" 2>/dev/null || true
  [ -z "$work" ] || rm -rf "$work"
  for ns in "$nsd" "$nsp"; do
    [ -e "/run/netns/$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true # takes the veth with it
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$nsd" 2>/dev/null || cannot "ip netns add failed (no network namespaces here)"
ip netns add "$nsp"
ip link add "$ifd" netns "$nsd" type veth peer name "$ifp" netns "$nsp" 2>/dev/null ||
  cannot "ip link add type veth failed (no veth in this kernel)"
for side in "$nsd $ifd $ipd" "$nsp $ifp $ipp"; do
  read -r ns dev ip <<<"$side"
  ip -n "$ns" addr add "$ip/24" dev "$dev"
  ip -n "$ns" link set "$dev" gso_max_segs 1 gso_max_size 1500 up
  ip -n "$ns" link set lo up
done

# --- what the kernel offers -----------------------------------------------------------------
# Modules where they are modules (a kernel with them built in has no modprobe to do).
for m in nfnetlink_queue xt_NFQUEUE xt_statistic; do modprobe -q "$m" 2>/dev/null || true; done
rule_ok() { # $1: the iptables binary; the rest: a rule spec, added to INPUT and removed again
  local ipt=$1
  shift
  ip netns exec "$nsd" "$ipt" -w -A INPUT -i "$ifd" "$@" 2>/dev/null &&
    ip netns exec "$nsd" "$ipt" -w -D INPUT -i "$ifd" "$@"
}
ipt=""
for candidate in iptables iptables-legacy; do
  if command -v "$candidate" >/dev/null && rule_ok "$candidate" -j DROP; then ipt=$candidate && break; fi
done
[ -n "$ipt" ] || cannot "iptables cannot add a DROP rule in a namespace (no netfilter filter table in this kernel?)"
loss=iptables delay=nfqueue
if ! rule_ok "$ipt" -m statistic --mode random --probability 0.01 -j DROP; then
  say "the kernel has no xt_statistic (iptables -m statistic refused): random loss through nftables numgen instead"
  bash scripts/setup.sh nftables
  loss=nft
fi
if ! rule_ok "$ipt" -j NFQUEUE --queue-num 0; then
  say "the kernel has no xt_NFQUEUE/nfnetlink_queue (iptables -j NFQUEUE refused): no delay stage, loss only"
  delay=none
fi
say "$nsd ($ifd $ipd) <-> $nsp ($ifp $ipp); $ipt, loss by $loss, delay by $delay"

# --- the package, as scripts/python-tests.sh installs it -------------------------------------
venv=target/pyenv
lib=$(cd / && "$OLDPWD/$venv/bin/python" -c 'import glob, os, pytest, kvtransfer
print(glob.glob(os.path.join(os.path.dirname(kvtransfer.__file__), "libkvtransfer*"))[0])' 2>/dev/null) || lib=""
if [ -z "$lib" ] || [ -n "$(find src ffi/python/kvtransfer ffi/python/pyproject.toml Cargo.toml Cargo.lock \
  -newer "$lib" -print -quit 2>/dev/null)" ]; then
  say "installing the package into $venv (scripts/pyenv.sh)"
  bash scripts/pyenv.sh
fi

# --- the tests ------------------------------------------------------------------------------
export KVT_FAULTS_NS_DECODE=$nsd KVT_FAULTS_NS_PREFILL=$nsp KVT_FAULTS_IF_DECODE=$ifd
export KVT_FAULTS_IP_DECODE=$ipd KVT_FAULTS_IP_PREFILL=$ipp KVT_FAULTS_IPTABLES=$ipt
export KVT_FAULTS_LOSS=$loss KVT_FAULTS_DELAY=$delay
unset KVTRANSFER_LIB
tests=$(pwd)/ffi/python/tests
work=$(mktemp -d)
cd "$work"
# -s: the tests print what they measured (failure latencies, the round trip, the loss).
# In the background, so that a signal to this script reaches the trap at once.
timeout 240 "$OLDPWD/$venv/bin/pytest" "$tests/test_faults.py" -q -s -p no:cacheprovider --rootdir "$tests" "$@" &
tests_pid=$!
wait "$tests_pid"
