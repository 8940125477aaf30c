# Shared by setup.sh and run.sh (sourced, not executed).
#
# Everything the guest needs that is not the host's own root filesystem lives in one cache
# directory: the unpacked Debian kernel package, the uncompressed vmlinux (PVH boot), the
# initramfs, and state.env, which records what setup.sh built so that run.sh does not have to
# work it out again.

KVT_VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
KVT_VM_CACHE=${KVT_VM_CACHE:-/var/cache/kvtransfer-vm}
KVT_VM_STATE=$KVT_VM_CACHE/state.env

# Modules stage 1 (the initramfs) inserts, dependencies resolved at build time: what it takes
# to see virtio-serial ports, mount 9p shares and put an overlay on top.
KVT_VM_INITRD_MODULES="virtio_pci virtio_console 9pnet_virtio 9p overlay"
# Modules stage 2 loads (with the guest's modprobe): KVT_FABRIC_MODULES, defined in
# guest/fabric.sh, which only defines things.
# shellcheck source=scripts/rdma-vm/guest/fabric.sh
. "$KVT_VM_DIR/guest/fabric.sh"

kvt_vm_log() { printf '%s: %s\n' "${KVT_VM_PROG:-rdma-vm}" "$*" >&2; }
kvt_vm_die() { kvt_vm_log "$*"; exit "${KVT_VM_DIE_STATUS:-1}"; }

# Hash of everything baked into the initramfs; run.sh compares it with the one setup.sh
# recorded, so an edited guest/init is never booted stale.
kvt_vm_initrd_inputs_hash() {
  {
    cat "$KVT_VM_DIR/guest/init"
    echo "$KVT_VM_INITRD_MODULES"
    echo "${1:-}"
  } | sha256sum | cut -c1-16
}
