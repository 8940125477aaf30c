#!/usr/bin/env bash
# Makes (once) and prints the path of a Python venv with SGLang 0.5.23 and what its
# disaggregation modules import on a CPU-only host (scripts/sglang-requirements.txt), then
# installs the current kvtransfer package into it (pip install ./ffi/python).
#
# The venv lives outside the checkout, in a cache keyed by the requirements, so a second run
# (or another clone on the same machine) downloads nothing: ${KVT_SGLANG_VENV_ROOT:-
# $HOME/.cache/kvtransfer}/sglang-0.5.23-<hash>. A venv left half-made by an interrupted run
# has no stamp file and is made again.
#   bash scripts/sglang-env.sh            # prints the venv's directory on stdout
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh python3 python3-venv >&2

reqs=scripts/sglang-requirements.txt
sglang_pin="sglang==0.5.23"
key=$( (cat "$reqs"; echo "$sglang_pin"; python3 --version) | sha256sum | cut -c1-12)
root=${KVT_SGLANG_VENV_ROOT:-$HOME/.cache/kvtransfer}
venv="$root/sglang-0.5.23-$key"
stamp="$venv/.kvtransfer-complete"

if [ ! -f "$stamp" ]; then
  echo "sglang-env: making $venv (about 6 GB of wheels on the first run)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
  start=$(date +%s)
  "${pip[@]}" install -r "$reqs" >&2
  "${pip[@]}" install --no-deps "$sglang_pin" >&2
  # The imports the tests rely on must work before the venv counts as made.
  "$venv/bin/python" -c 'import sglang.srt.disaggregation.mooncake.conn, sglang.srt.disaggregation.utils' >&2
  touch "$stamp"
  echo "sglang-env: made in $(( $(date +%s) - start )) s" >&2
fi

# The package under test, as a user installs it (builds and carries libkvtransfer).
rm -rf ffi/python/build
"$venv/bin/python" -m pip --disable-pip-version-check --quiet install --force-reinstall --no-deps ./ffi/python >&2
echo "$venv"
