#!/usr/bin/env bash
# Runs one command inside a throw-away QEMU guest that has Soft-RoCE (rdma_rxe) devices, and
# returns its exit status. The guest's root filesystem is this machine's own (read-only,
# with a tmpfs overlay: writes vanish at power-off except under --rw DIR), so host-built
# binaries run unchanged. Prepare the machine once with scripts/rdma-vm/setup.sh.
#
#   scripts/rdma-vm/run.sh [options] [--] CMD [ARGS...]
#
#   --timeout S     kill the VM after S seconds (exit 124); default $KVT_VM_TIMEOUT or none
#   --devices LIST  fabric device suffixes, default "A0 A1 B0 B1" -> rxeA0 rxeA1 rxeB0 rxeB1;
#                   "" for no fabric
#   --rw DIR        share DIR read-write (same path inside); repeatable
#   --mem MB        guest memory, default 2048 (memory registrations pin guest pages)
#   --cpus N        guest vCPUs, default 2
#   --verbose       print boot timing
#
# CMD runs as root in the caller's working directory with the caller's environment plus
#   KVT_VM=1  KVT_GID_INDEX=1  KVT_RDMA_DEVICES="rxeA0 rxeA1 rxeB0 rxeB1"
#   KVT_IP_A0=198.18.0.1 ... KVT_IP_B1=198.18.0.4   KVT_NETDEV_A0=vA0 ...
# stdin is /dev/null; its stdout and stderr come back on ours (separately: their relative
# order is not kept).
#
# Exit status: CMD's; 124 if --timeout expired; 125 if the VM could not run CMD or died
# before reporting (qemu's log and the guest console are printed then).
set -euo pipefail
KVT_VM_PROG=rdma-vm/run
KVT_VM_DIE_STATUS=125
# shellcheck source=scripts/rdma-vm/lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

timeout=${KVT_VM_TIMEOUT:-0}
devices=${KVT_VM_DEVICES-A0 A1 B0 B1}
mem=${KVT_VM_MEM:-2048}
cpus=${KVT_VM_CPUS:-2}
verbose=${KVT_VM_VERBOSE:-0}
rw_dirs=()
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2?--timeout needs a value}; shift 2 ;;
    --devices) devices=${2?--devices needs a value}; shift 2 ;;
    --rw)      rw_dirs+=("${2?--rw needs a directory}"); shift 2 ;;
    --mem)     mem=${2?--mem needs a value}; shift 2 ;;
    --cpus)    cpus=${2?--cpus needs a value}; shift 2 ;;
    --verbose) verbose=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --)        shift; break ;;
    -*)        kvt_vm_die "unknown option $1 (see --help)" ;;
    *)         break ;;
  esac
done
[ $# -gt 0 ] || kvt_vm_die "no command given (see --help)"
[[ $timeout =~ ^[0-9]+$ ]] || kvt_vm_die "--timeout wants whole seconds, not '$timeout'"
[[ $mem =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ ]] || kvt_vm_die "--mem and --cpus want numbers"

# --- what setup.sh prepared -------------------------------------------------------------
[ -f "$KVT_VM_STATE" ] || kvt_vm_die "$KVT_VM_STATE missing: run scripts/rdma-vm/setup.sh (as root) first"
# shellcheck disable=SC1090
. "$KVT_VM_STATE"
for f in "$KVT_VM_VMLINUX" "$KVT_VM_INITRD"; do
  [ -s "$f" ] || kvt_vm_die "$f missing: run scripts/rdma-vm/setup.sh again"
done
[ "$(kvt_vm_initrd_inputs_hash "$KVT_VM_KVER")" = "$KVT_VM_INITRD_HASH" ] ||
  kvt_vm_die "guest/init changed since the initramfs was built: run scripts/rdma-vm/setup.sh again"
stage2=$KVT_VM_DIR/guest/stage2.sh
[[ $stage2 != *[[:space:]]* ]] || kvt_vm_die "the checkout's path must not contain spaces (kernel command line): $stage2"

read -r -a device_list <<<"$devices"
declare -A seen=()
for d in "${device_list[@]}"; do
  [[ $d =~ ^[A-Za-z0-9]{1,12}$ ]] || kvt_vm_die "bad device suffix '$d' (letters and digits, at most 12)"
  [ -z "${seen[$d]:-}" ] || kvt_vm_die "device $d given twice"
  seen[$d]=1
done
[ ${#device_list[@]} -le 250 ] || kvt_vm_die "too many devices"

# --- accelerator ------------------------------------------------------------------------
# KVM only with real VMX/SVM. /dev/kvm on our CI machines is kvm_pvm (a software hypervisor
# for PVM-enabled guest kernels): a stock kernel fails there, so those run under TCG.
# Under TCG the CPU model drops ERMS/FSRM (the kernel then copies with plain mov loops
# instead of emulated `rep movsb`) and PCLMULQDQ (rxe's ICRC then uses table-driven crc32):
# about twice the rxe bandwidth.
accel=${KVT_VM_ACCEL:-auto}
if [ "$accel" = auto ]; then
  accel=tcg
  if [ -w /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
    accel=kvm
  fi
fi
case $accel in
  tcg) accel_args=(-accel tcg -cpu max,-erms,-fsrm,-pclmulqdq) ;;
  kvm) accel_args=(-accel kvm -cpu host) ;;
  *)   kvt_vm_die "KVT_VM_ACCEL must be auto, tcg or kvm" ;;
esac

# qopt S: S as a value inside a qemu -option (commas doubled).
qopt() { printf '%s' "${1//,/,,}"; }

# --- control share ----------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvt-vm.XXXXXX")
ctl=$tmp/ctl
mkdir "$ctl"
qpid="" timer_pid="" out_pid="" err_pid=""
cleanup() {
  set +e
  local pid
  for pid in "$timer_pid" "$qpid"; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  done
  # Unblock the output copiers if qemu never opened the FIFOs, then let them drain.
  release_fifos
  for pid in "$out_pid" "$err_pid"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null
  done
  rm -rf "$tmp"
}
# Opening a FIFO read-write never blocks; doing it once wakes a reader still waiting for a
# writer, and closing it again lets the reader see end-of-file.
release_fifos() {
  local f fd
  for f in "$tmp/stdout" "$tmp/stderr"; do
    [ -p "$f" ] || continue
    exec {fd}<>"$f"
    exec {fd}>&-
  done
}
trap cleanup EXIT
trap 'kvt_vm_log "interrupted"; exit 130' INT
trap 'kvt_vm_log "terminated"; exit 143' TERM

printf '%s\0' "$@" > "$ctl/argv"
env -0 > "$ctl/env"
printf '%s\0' "$PWD" > "$ctl/cwd"
: > "$ctl/devices"
[ ${#device_list[@]} -eq 0 ] || printf '%s\n' "${device_list[@]}" > "$ctl/devices"
share_args=()
: > "$ctl/shares"
for i in "${!rw_dirs[@]}"; do
  dir=$(realpath -e -- "${rw_dirs[i]}" 2>/dev/null) && [ -d "$dir" ] ||
    kvt_vm_die "--rw ${rw_dirs[i]}: not a directory"
  [ "$dir" != / ] && [[ $dir != *$'\n'* ]] || kvt_vm_die "--rw $dir: not allowed"
  share_args+=(-virtfs "local,path=$(qopt "$dir"),mount_tag=rw$i,security_model=none,multidevs=remap")
  printf 'rw%d %s\n' "$i" "$dir" >> "$ctl/shares"
done

mkfifo "$tmp/stdout" "$tmp/stderr"
cat "$tmp/stdout" &
out_pid=$!
cat "$tmp/stderr" >&2 &
err_pid=$!

# --- boot -------------------------------------------------------------------------------
cmdline="console=ttyS0 quiet panic=-1 mitigations=off rdinit=/init"
cmdline+=" kvt.stage2=$stage2 kvt.kver=$KVT_VM_KVER kvt.moddir=$KVT_VM_KERNEL_DIR/lib/modules/$KVT_VM_KVER"
qemu_args=(
  -name kvt-rdma-vm -nodefaults -no-user-config -display none -no-reboot
  "${accel_args[@]}" -M q35 -smp "$cpus" -m "$mem" -nic none
  -kernel "$KVT_VM_VMLINUX" -initrd "$KVT_VM_INITRD" -append "$cmdline"
  -serial "file:$(qopt "$tmp")/console.log"
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
  -virtfs "local,path=$(qopt "$ctl"),mount_tag=ctl,security_model=none"
  "${share_args[@]}"
  -device virtio-serial-pci
  -chardev "file,id=kvtout,path=$(qopt "$tmp")/stdout" -device virtserialport,chardev=kvtout,name=kvt.stdout
  -chardev "file,id=kvterr,path=$(qopt "$tmp")/stderr" -device virtserialport,chardev=kvterr,name=kvt.stderr
)
t0=$EPOCHREALTIME
qemu-system-x86_64 "${qemu_args[@]}" </dev/null >"$tmp/qemu.log" 2>&1 &
qpid=$!

if [ "$timeout" -gt 0 ]; then
  # A watchdog that kills qemu, by its PID, when the time is up; killed itself (with its
  # sleep) when qemu ends first.
  (
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    sleep "$timeout" &
    sleep_pid=$!
    wait "$sleep_pid" || exit 0
    : > "$tmp/timed-out"
    kill -KILL "$qpid" 2>/dev/null
  ) </dev/null >/dev/null 2>&1 &
  timer_pid=$!
fi

qemu_status=0
# (braces + 2>/dev/null: no "Killed" job notice from bash when the watchdog fired)
{ wait "$qpid"; } 2>/dev/null || qemu_status=$?
qpid=""
if [ -n "$timer_pid" ]; then
  kill -TERM "$timer_pid" 2>/dev/null || true
  wait "$timer_pid" 2>/dev/null || true
  timer_pid=""
fi
release_fifos
wait "$out_pid" 2>/dev/null || true
wait "$err_pid" 2>/dev/null || true
out_pid="" err_pid=""
t1=$EPOCHREALTIME

if [ "$verbose" = 1 ] && [ -f "$ctl/timing" ]; then
  read -r up_stage2 up_ready up_done < "$ctl/timing" || true
  kvt_vm_log "$(printf 'accel %s; guest uptime: stage 2 at %s s, fabric ready at %s s, command done at %s s; wall %s s' \
    "$accel" "$up_stage2" "$up_ready" "$up_done" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }' | tr , .)")"
fi

if [ -f "$tmp/timed-out" ]; then
  kvt_vm_log "timed out after ${timeout} s; qemu killed"
  exit 124
fi
if [ -f "$ctl/rc" ]; then
  read -r rc < "$ctl/rc"
  [[ $rc =~ ^[0-9]+$ ]] && exit "$rc"
fi
kvt_vm_log "the VM ended (qemu status $qemu_status) without the command's exit status"
[ -s "$ctl/error" ] && kvt_vm_log "guest: $(tail -n 5 "$ctl/error")"
for f in qemu.log console.log; do
  if [ -s "$tmp/$f" ]; then
    echo "----- last lines of $f -----" >&2
    tail -n 40 "$tmp/$f" >&2
  fi
done
if [ ! -s "$tmp/qemu.log" ] && [ ! -s "$tmp/console.log" ]; then
  kvt_vm_log "qemu and the guest console printed nothing: the kernel died before its console came up (too little --mem?)"
fi
exit 125
