#!/usr/bin/env bash
# What the library drags into an inference engine's process, checked:
#   - `cargo tree -e normal` of the library (rlib, cdylib, staticlib) names none of the CLI's
#     crates (clap, indicatif, hdrhistogram, serde_json); serde comes only through sideway,
#     the verbs crate, which needs it;
#   - every crate the library depends on declares a rust-version no newer than ours (the MSRV
#     in Cargo.toml), or none. (The code itself is held to it by clippy's incompatible_msrv
#     lint, which clippy -D warnings enforces; this machine can fetch no second toolchain to
#     build with the MSRV itself.)
# Prints the size of the stripped libkvtransfer.so when it has been built.
set -euo pipefail
cd "$(dirname "$0")/.."

tree=$(cargo tree -e normal -p kvtransfer --prefix none --offline 2>/dev/null || cargo tree -e normal -p kvtransfer --prefix none)
bad=$(echo "$tree" | awk '{print $1}' | grep -xE 'clap|clap_builder|clap_derive|indicatif|hdrhistogram|serde_json' | sort -u || true)
if [ -n "$bad" ]; then
  echo "lean: the library depends on CLI crates: $bad" >&2
  cargo tree -e normal -p kvtransfer -i "$(echo "$bad" | head -1)" >&2 || true
  exit 1
fi
serde_users=$(cargo tree -e normal -p kvtransfer -i serde --depth 1 --prefix none 2>/dev/null | tail -n +2 | awk '{print $1}' | sort -u)
if [ -n "$serde_users" ] && [ "$serde_users" != "sideway" ]; then
  echo "lean: serde is pulled by $(echo $serde_users) (only sideway may)" >&2
  exit 1
fi
echo "lean: the library's $(echo "$tree" | awk '{print $1}' | sort -u | wc -l) crates include no CLI crate; serde only through sideway"

cargo metadata --format-version 1 --filter-platform "$(rustc -vV | sed -n "s/^host: //p")" --offline 2>/dev/null >target/lean-metadata.json || cargo metadata --format-version 1 >target/lean-metadata.json
python3 - target/lean-metadata.json <<'EOF'
import json, sys

meta = json.load(open(sys.argv[1]))
pkgs = {p["id"]: p for p in meta["packages"]}
root = next(p for p in meta["packages"] if p["name"] == "kvtransfer" and p["source"] is None)
msrv = tuple(int(x) for x in root["rust_version"].split("."))
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
seen, todo = set(), [root["id"]]
while todo:
    i = todo.pop()
    if i in seen:
        continue
    seen.add(i)
    for d in nodes[i]["deps"]:
        if any(k["kind"] is None for k in d["dep_kinds"]):  # normal dependencies only
            todo.append(d["pkg"])
newer = []
for i in seen:
    rv = pkgs[i].get("rust_version")
    if rv and tuple(int(x) for x in rv.split(".")[:2]) > msrv[:2]:
        newer.append(f"{pkgs[i]['name']} {pkgs[i]['version']} needs {rv}")
if newer:
    sys.exit("lean: dependencies newer than the MSRV " + root["rust_version"] + ": " + "; ".join(sorted(newer)))
print(f"lean: MSRV {root['rust_version']}: none of the library's {len(seen) - 1} dependencies declares a newer rust-version")
EOF

so=target/release/libkvtransfer.so
if [ -f "$so" ]; then
  stripped=$(mktemp)
  strip -o "$stripped" "$so"
  echo "lean: $so is $(stat -c %s "$so") bytes, $(stat -c %s "$stripped") stripped"
  rm -f "$stripped"
fi
