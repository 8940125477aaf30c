#!/bin/bash
# Stage 2 of the kvtransfer Soft-RoCE guest: PID 1, the host's bash, on the overlaid host
# root filesystem. Builds the fabric, runs the command run.sh was given, writes its exit
# status to the control share and powers the VM off.
#
# Control share (/run/kvt), written by run.sh:
#   argv     the command, NUL-separated        env   the caller's environment, NUL-separated
#   cwd      the caller's working directory    devices  fabric device suffixes, one a line
# and by this script: rc (the exit status), error (why the command could not be run),
# timing (guest uptime at stage 2 start, fabric ready, command done).
#
# Output: two named virtio-serial ports, kvt.stdout and kvt.stderr, that run.sh copies to
# its own stdout and stderr. A port can be opened only once at a time, so the command writes
# into pipes and one static busybox cat per stream copies them to the ports; the command can
# reopen /dev/stdout (a pipe) like anywhere else.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
ctl=/run/kvt
here=${0%/*}
busybox=/bin/busybox

power_off() {
  # rw shares: flush what was written through mmap.
  [ -s $ctl/shares ] && $busybox sync
  $busybox poweroff -f
  echo o > /proc/sysrq-trigger
  while :; do read -r -t 60 _ <> <(:); done
}
# The VM could not run the command: no rc, so run.sh exits 125 and shows this.
fail() {
  echo "kvt-vm: $*" >&2
  echo "$*" >> $ctl/error
  power_off
}

read -r up_stage2 _ < /proc/uptime
exec </dev/null
exec 3>/dev/virtio-ports/kvt.stdout 4>/dev/virtio-ports/kvt.stderr || fail "no output ports"
exec 2>&4

ulimit -l unlimited
echo kvt-vm > /proc/sys/kernel/hostname

# shellcheck source=scripts/rdma-vm/guest/fabric.sh
. "$here/fabric.sh" || fail "cannot read $here/fabric.sh"
mapfile -t devices < $ctl/devices
kvt_fabric_up "${devices[@]}" || fail "building the RoCE fabric failed"

read -r up_ready _ < /proc/uptime
mapfile -d '' argv < $ctl/argv
mapfile -d '' envv < $ctl/env
IFS= read -r -d '' cwd < $ctl/cwd

exec 5> >(exec $busybox cat >&3)
out_pid=$!
exec 6> >(exec $busybox cat >&4)
err_pid=$!

# (outer braces: no job notice from this shell when the command dies of a signal; the
# command's own stderr is fd 6)
{ (
  cd -- "$cwd" || { echo "kvt-vm: cannot cd to $cwd" >&2; exit 125; }
  while read -r name; do unset -v "$name" 2>/dev/null; done < <(compgen -e)
  for kv in "${envv[@]}"; do
    [[ ${kv%%=*} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && export "$kv"
  done
  export KVT_VM=1 KVT_GID_INDEX=1 "${kvt_fabric_env[@]}"
  exec "${argv[@]}"
) >&5 2>&6 3>&- 4>&- 5>&- 6>&-; } 2>/dev/null
rc=$?

# The copiers end when every writer is gone; a background process the command left running
# may still hold the pipes, so give them a moment and then stop waiting.
exec 5>&- 6>&-
exec {sleeper}<> <(:)
for ((i = 0; i < 30; i++)); do
  kill -0 $out_pid 2>/dev/null || kill -0 $err_pid 2>/dev/null || break
  read -r -t 0.1 -u $sleeper _
done
if kill -0 $out_pid 2>/dev/null || kill -0 $err_pid 2>/dev/null; then
  echo "kvt-vm: processes left running by the command still hold its output; not waiting for them" >&4
fi

read -r up_done _ < /proc/uptime
echo "$up_stage2 $up_ready $up_done" > $ctl/timing
echo "$rc" > $ctl/rc
power_off
