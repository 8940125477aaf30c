#!/usr/bin/env bash
# The Python package's pytest suite against the release cdylib.
#
#   bash scripts/python-tests.sh [pytest args]
#
# Makes a virtual environment in target/pyenv (installing python3 and python3-venv through
# scripts/setup.sh when `python3 -m venv` is missing), installs numpy, pytest and ./ffi/python
# into it, builds the library (cargo build --release --lib) and runs pytest. The package finds
# the library in target/release by itself (KVTRANSFER_LIB is not set).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  bash scripts/setup.sh python3 python3-venv
fi
venv=target/pyenv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
log=target/pyenv/install.log
if ! { "$venv/bin/python" -m pip install numpy pytest &&
       "$venv/bin/python" -m pip install --force-reinstall --no-deps ./ffi/python; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "python-tests: pip install failed (log above)" >&2
  exit 1
fi
cargo build --release --lib --quiet
unset KVTRANSFER_LIB
"$venv/bin/python" -m pytest -q ffi/python/tests "$@"
