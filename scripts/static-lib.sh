#!/usr/bin/env bash
# Builds the static library for linking into a C/C++ program beside libibverbs:
#
#   bash scripts/static-lib.sh [--debug]
#   -> target/release/static/libkvtransfer.a   (target/debug/static/ with --debug)
#   bash scripts/static-lib.sh --from ARCHIVE --out DIR   (rename only, no cargo build)
#
# Cargo's own target/*/libkvtransfer.a carries rdma-mummy-sys's run-time loader for
# libibverbs, whose functions are named like libibverbs' own (ibv_*, rdma_*, mlx5dv_*): a
# program that links libibverbs too fails with "multiple definition of ibv_get_device_list",
# or, with the archive first, silently gets our loader in place of the real library for
# UCX and NCCL as well. This script renames those symbols (definitions and references alike,
# in every member) to kvt__<name>, so the archive defines no libibverbs name at all.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release dir=release src="" out=""
while [ $# -gt 0 ]; do
  case $1 in
    --debug) profile=dev dir=debug; shift ;;
    --from) src=${2?--from needs an archive}; shift 2 ;;
    --out) out=${2?--out needs a directory}; shift 2 ;;
    *) echo "static-lib: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v objcopy >/dev/null && command -v nm >/dev/null ||
  { echo "static-lib: needs objcopy and nm (binutils)" >&2; exit 1; }
if [ -z "$src" ]; then
  cargo build --quiet --lib --profile "$profile"
  src=target/$dir/libkvtransfer.a
fi
out=${out:-target/$dir/static}
mkdir -p "$out"
map=$(mktemp)
trap 'rm -f "$map"' EXIT
# Every libibverbs/librdmacm/mlx5dv name the archive defines or uses.
nm -A "$src" 2>/dev/null |
  awk '$NF ~ /^_?(ibv|rdma|mlx5dv)_/ && ($(NF-1) == "T" || $(NF-1) == "U" || $(NF-1) == "D" || $(NF-1) == "B" || $(NF-1) == "R") { print $NF }' |
  sort -u | awk '{ print $1, "kvt__" $1 }' > "$map"
objcopy --redefine-syms="$map" "$src" "$out/libkvtransfer.a.tmp"
mv "$out/libkvtransfer.a.tmp" "$out/libkvtransfer.a"
left=$(nm -g --defined-only "$out/libkvtransfer.a" 2>/dev/null | awk '$3 ~ /^_?(ibv|rdma|mlx5dv)_/' | wc -l)
[ "$left" -eq 0 ] || { echo "static-lib: $left libibverbs names still defined" >&2; exit 1; }
echo "$out/libkvtransfer.a ($(wc -l < "$map") verbs names renamed kvt__*)"
