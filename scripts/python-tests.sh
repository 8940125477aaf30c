#!/usr/bin/env bash
# Tests the Python package (ffi/python) as installed: a venv under target/pyenv with numpy,
# pytest and `pip install ./ffi/python` (which builds and carries libkvtransfer), then pytest
# from outside the checkout. Safe to run again: the venv is reused and the package
# reinstalled. Extra arguments go to pytest.
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
"${pip[@]}" install 'numpy' 'pytest'
# Install the package as a user would: pip builds the crate's cdylib with setuptools-rust (in
# an isolated build environment) and puts it inside the package. Reinstalled each time (the
# cargo build is incremental) so the tests run the current sources and library.
rm -rf ffi/python/build
"${pip[@]}" install --force-reinstall --no-deps ./ffi/python

# KVTRANSFER_LIB unset and run from outside the checkout: the package must use the library
# its wheel carries (test_lib checks that it does).
unset KVTRANSFER_LIB
tests=$(pwd)/ffi/python/tests
cd "$(mktemp -d)"
# The SGLang tests (with_sglang/) need SGLang's own venv: scripts/sglang-tests.sh runs them.
"$OLDPWD/$venv/bin/pytest" "$tests" -q -p no:cacheprovider --rootdir "$tests" --ignore "$tests/with_sglang" "$@"
