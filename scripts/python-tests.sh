#!/usr/bin/env bash
# Tests the Python package (ffi/python) against the cdylib: a venv under target/pyenv with
# numpy, pytest and the package installed from ./ffi/python, then pytest. Safe to run again:
# the venv is reused and the package reinstalled. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv (ensurepip) is what Debian leaves out of python3; setup.sh installs it if missing.
bash scripts/setup.sh python3 python3-venv

venv=target/pyenv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "python-tests: creating $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install 'numpy' 'pytest' 'setuptools>=61' wheel
# Reinstall the package each time (it is small) so the tests run the current sources; a
# stale setuptools build/ could carry deleted modules along.
rm -rf ffi/python/build
"${pip[@]}" install --no-build-isolation --no-deps --force-reinstall ./ffi/python

cargo build --release --lib --quiet

# KVTRANSFER_LIB unset: the package must find target/release/libkvtransfer.so by itself
# (one test sets it explicitly in a child process).
unset KVTRANSFER_LIB
"$venv/bin/pytest" ffi/python/tests -q -p no:cacheprovider "$@"
