#!/usr/bin/env bash
# Installs the Python package as a user would, into the venv target/pyenv (created when
# missing): numpy and pytest, then `pip install ./ffi/python`, which builds the crate's cdylib
# with setuptools-rust (in an isolated build environment) and puts it inside the package.
# Reinstalled each time (the cargo build is incremental), so the venv runs the current
# sources. Used by scripts/python-tests.sh and scripts/faults.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv (ensurepip) is what Debian leaves out of python3; setup.sh installs it if missing.
bash scripts/setup.sh python3 python3-venv
venv=target/pyenv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "pyenv: creating $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install 'numpy' 'pytest'
rm -rf ffi/python/build
"${pip[@]}" install --force-reinstall --no-deps ./ffi/python
