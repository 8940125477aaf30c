#!/usr/bin/env bash
# Prepares this machine to boot the Soft-RoCE test guest (scripts/rdma-vm/run.sh). Root.
#
#   1. Debian packages: qemu, rdma-core + verbs tools, perftest, static busybox, kmod, cpio.
#   2. The kernel: Debian's linux-image package that linux-image-amd64 points to, fetched with
#      `apt-get download` and unpacked with `dpkg -x` into the cache (nothing is installed
#      into the host's /boot or /lib/modules), depmod'ed, and its uncompressed vmlinux cut out
#      of the bzImage (qemu boots that through its PVH entry, skipping firmware and in-guest
#      decompression, which are slow under TCG).
#   3. The initramfs: static busybox, guest/init and the few modules stage 1 needs.
#
# Idempotent: each step is skipped when its result is already there; a second run takes
# well under a second.
#
# Environment:
#   KVT_VM_CACHE       where it all goes (default /var/cache/kvtransfer-vm)
#   KVT_VM_KERNEL_PKG  a specific kernel package, e.g. linux-image-6.1.0-28-amd64
#   KVT_VM_REFRESH=1   resolve linux-image-amd64 again (take a newer kernel if there is one)
set -euo pipefail
KVT_VM_PROG=rdma-vm/setup
# shellcheck source=scripts/rdma-vm/lib.sh
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" -eq 0 ] || kvt_vm_die "must run as root (apt-get, dpkg)"
command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
  kvt_vm_die "needs a Debian-like host (apt-get, dpkg)"

t_start=$EPOCHREALTIME
# elapsed T0: seconds since T0 (an $EPOCHREALTIME value), one decimal.
elapsed() {
  local d=$(( 10#${EPOCHREALTIME//[.,]/} - 10#${1//[.,]/} ))
  printf '%d.%d s' $((d / 1000000)) $((d / 100000 % 10))
}

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
  [ "$apt_updated" -eq 1 ] && return 0
  apt-get update -qq
  apt_updated=1
}

# --- 1. packages --------------------------------------------------------------------------
# qemu-system-x86: the VM.  rdma-core, ibverbs-utils (+ libibverbs1, ibverbs-providers with
# librxe): the userspace verbs stack the guest runs from the host's filesystem.  perftest: the
# smoke checks.  busybox-static: stage 1.  kmod: depmod here, modprobe in the guest.  cpio:
# the initramfs.  iproute2: ip and rdma, which build the fabric in the guest.
packages=(qemu-system-x86 rdma-core ibverbs-utils perftest busybox-static kmod cpio iproute2)
missing=()
for p in "${packages[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  t=$EPOCHREALTIME
  kvt_vm_log "installing ${missing[*]}"
  apt_update
  # Note: on bookworm images that carry qemu-utils from backports, this removes it (the
  # versions conflict). Nothing here needs qemu-img.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  kvt_vm_log "packages installed in $(elapsed "$t")"
fi
command -v qemu-system-x86_64 >/dev/null || kvt_vm_die "qemu-system-x86_64 missing after install"
busybox=$(command -v busybox) || kvt_vm_die "busybox missing after install"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$busybox" || kvt_vm_die "$busybox is not static (is busybox-static installed?)"

mkdir -p "$KVT_VM_CACHE"

# --- 2. kernel ----------------------------------------------------------------------------
KVT_VM_KVER="" KVT_VM_KERNEL_DIR="" KVT_VM_VMLINUX="" KVT_VM_INITRD="" KVT_VM_INITRD_HASH=""
# shellcheck disable=SC1090
[ -f "$KVT_VM_STATE" ] && . "$KVT_VM_STATE"

kernel_pkg=${KVT_VM_KERNEL_PKG:-}
if [ -n "$kernel_pkg" ] && [ "linux-image-$KVT_VM_KVER" != "$kernel_pkg" ]; then
  KVT_VM_KVER=""  # a different kernel was asked for
fi
if [ -z "$KVT_VM_KVER" ] || [ "${KVT_VM_REFRESH:-0}" = 1 ] ||
   [ ! -f "$KVT_VM_KERNEL_DIR/.unpacked" ] || [ ! -s "$KVT_VM_VMLINUX" ]; then
  if [ -z "$kernel_pkg" ]; then
    resolve() {
      apt-cache depends --important linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1
    }
    kernel_pkg=$(resolve)
    [ -n "$kernel_pkg" ] || { apt_update; kernel_pkg=$(resolve); }
    [ -n "$kernel_pkg" ] || kvt_vm_die "cannot resolve linux-image-amd64 to a kernel package"
  fi
  kver=${kernel_pkg#linux-image-}
  kdir=$KVT_VM_CACHE/kernel-$kver

  if [ ! -f "$kdir/.unpacked" ]; then
    t=$EPOCHREALTIME
    kvt_vm_log "fetching $kernel_pkg"
    dl=$(mktemp -d "$KVT_VM_CACHE/download.XXXXXX")
    # APT::Sandbox::User=root: the download directory belongs to root, not _apt.
    if ! (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg"); then
      apt_update
      (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg") ||
        { rm -rf "$dl"; kvt_vm_die "apt-get download $kernel_pkg failed"; }
    fi
    rm -rf "$kdir" "$kdir.partial"
    dpkg -x "$dl"/*.deb "$kdir.partial"
    rm -rf "$dl"
    # depmod -b wants <base>/lib/modules/<kver>; newer packages ship usr/lib/modules only.
    if [ ! -d "$kdir.partial/lib/modules/$kver" ] && [ -d "$kdir.partial/usr/lib/modules/$kver" ]; then
      ln -s usr/lib "$kdir.partial/lib"
    fi
    [ -d "$kdir.partial/lib/modules/$kver" ] || kvt_vm_die "$kernel_pkg has no lib/modules/$kver"
    depmod -b "$kdir.partial" "$kver"
    touch "$kdir.partial/.unpacked"
    mv "$kdir.partial" "$kdir"
    kvt_vm_log "kernel $kver unpacked in $(elapsed "$t")"
  fi

  for m in $KVT_VM_INITRD_MODULES $KVT_FABRIC_MODULES; do
    modprobe -d "$kdir" -S "$kver" --show-depends "$m" >/dev/null 2>&1 ||
      kvt_vm_die "kernel $kver has no module $m"
  done

  # The bzImage's header says where the compressed kernel is: setup_sects (0x1f1) gives the
  # size of the real-mode part, payload_offset (0x248) and payload_length (0x24c) locate the
  # compressed vmlinux inside the protected-mode part. The payload ends with the
  # uncompressed size as 4 little-endian bytes.
  vmlinux=$kdir/vmlinux
  if [ ! -s "$vmlinux" ]; then
    t=$EPOCHREALTIME
    bz=$kdir/boot/vmlinuz-$kver
    [ -f "$bz" ] || kvt_vm_die "no $bz in $kernel_pkg"
    u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
    u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
    [ "$(dd if="$bz" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ] ||
      kvt_vm_die "$bz is not a bzImage"
    setup_sects=$(u8 "$bz" $((0x1f1))); [ "$setup_sects" -ne 0 ] || setup_sects=4
    start=$(( (setup_sects + 1) * 512 + $(u32 "$bz" $((0x248))) ))
    len=$(u32 "$bz" $((0x24c)))
    want=$(u32 "$bz" $((start + len - 4)))
    magic=$(od -An -tx1 -j "$start" -N6 "$bz" | tr -d ' \n')
    case $magic in
      1f8b*)         unpack=(gzip -dc) ;;
      fd377a585a00)  unpack=(xz -dc --single-stream) ;;
      28b52ffd*)     unpack=(zstd -dcq) ;;
      425a68*)       unpack=(bzip2 -dc) ;;
      5d0000*)       unpack=(xz -dc --format=lzma) ;;
      *)             kvt_vm_die "unknown kernel compression (payload starts with $magic)" ;;
    esac
    command -v "${unpack[0]}" >/dev/null || kvt_vm_die "${unpack[0]} is needed to unpack the kernel"
    # Decompressors may complain about the trailing size bytes; the checks below decide.
    tail -c +$((start + 1)) "$bz" | head -c $((len - 4)) | "${unpack[@]}" > "$vmlinux.partial" 2>/dev/null || true
    [ "$(od -An -tx1 -N4 "$vmlinux.partial" | tr -d ' ')" = 7f454c46 ] ||
      kvt_vm_die "decompressed kernel is not an ELF file"
    got=$(stat -c %s "$vmlinux.partial")
    [ "$got" -eq "$want" ] || kvt_vm_die "decompressed kernel has $got bytes, header says $want"
    mv "$vmlinux.partial" "$vmlinux"
    kvt_vm_log "vmlinux extracted ($((got / 1048576)) MiB) in $(elapsed "$t")"
  fi

  KVT_VM_KVER=$kver KVT_VM_KERNEL_DIR=$kdir KVT_VM_VMLINUX=$vmlinux
  KVT_VM_INITRD="" KVT_VM_INITRD_HASH=""  # rebuilt for this kernel below
fi

# --- 3. initramfs -------------------------------------------------------------------------
hash=$(kvt_vm_initrd_inputs_hash "$KVT_VM_KVER")
if [ "$KVT_VM_INITRD_HASH" != "$hash" ] || [ ! -s "$KVT_VM_INITRD" ]; then
  t=$EPOCHREALTIME
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,dev,proc,sys,lower,rw,newroot,modules}
  cp "$busybox" "$root/bin/busybox"
  install -m 0755 "$KVT_VM_DIR/guest/init" "$root/init"
  # The kernel opens /dev/console for init before anything is mounted.
  mknod -m 600 "$root/dev/console" c 5 1
  # Dependencies first, each module once, in the order `modprobe --show-depends` gives.
  n=0
  declare -A seen=()
  for m in $KVT_VM_INITRD_MODULES; do
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      [ -z "${seen[$path]:-}" ] || continue
      seen[$path]=1
      name=$(basename "$path"); name=${name%%.ko*}
      dest=$root/modules/$(printf '%02d' $n)-$name.ko
      case $path in
        *.ko)     cp "$path" "$dest" ;;
        *.ko.xz)  xz -dc "$path" > "$dest" ;;
        *.ko.zst) zstd -dcq "$path" > "$dest" ;;
        *.ko.gz)  gzip -dc "$path" > "$dest" ;;
        *)        kvt_vm_die "cannot handle module file $path" ;;
      esac
      n=$((n + 1))
    done < <(modprobe -d "$KVT_VM_KERNEL_DIR" -S "$KVT_VM_KVER" --show-depends "$m")
  done
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$KVT_VM_CACHE/initrd.partial"
  mv "$KVT_VM_CACHE/initrd.partial" "$KVT_VM_CACHE/initrd-$KVT_VM_KVER.cpio"
  KVT_VM_INITRD=$KVT_VM_CACHE/initrd-$KVT_VM_KVER.cpio KVT_VM_INITRD_HASH=$hash
  kvt_vm_log "initramfs built ($n modules, $(( $(stat -c %s "$KVT_VM_INITRD") / 1024 )) KiB) in $(elapsed "$t")"
fi

{
  echo "# Written by scripts/rdma-vm/setup.sh; read by scripts/rdma-vm/run.sh."
  for v in KVT_VM_KVER KVT_VM_KERNEL_DIR KVT_VM_VMLINUX KVT_VM_INITRD KVT_VM_INITRD_HASH; do
    printf '%s=%q\n' "$v" "${!v}"
  done
} > "$KVT_VM_STATE.partial"
mv "$KVT_VM_STATE.partial" "$KVT_VM_STATE"
# Kernels this cache no longer uses (after KVT_VM_REFRESH=1 or KVT_VM_KERNEL_PKG).
for d in "$KVT_VM_CACHE"/kernel-*; do
  if [ -d "$d" ] && [ "$d" != "$KVT_VM_KERNEL_DIR" ]; then kvt_vm_log "removing old $d"; rm -rf "$d"; fi
done
for f in "$KVT_VM_CACHE"/initrd-*.cpio; do
  if [ -f "$f" ] && [ "$f" != "$KVT_VM_INITRD" ]; then rm -f "$f"; fi
done
kvt_vm_log "ready: kernel $KVT_VM_KVER, cache $KVT_VM_CACHE ($(elapsed "$t_start"))"
