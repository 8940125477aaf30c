#!/usr/bin/env bash
# Tests the Python package (ffi/python) as installed: a venv under target/pyenv with numpy,
# pytest and `pip install ./ffi/python` (which builds and carries libkvtransfer), then pytest
# from outside the checkout. Safe to run again: the venv is reused and the package
# reinstalled. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/pyenv.sh
venv=target/pyenv

# KVTRANSFER_LIB unset and run from outside the checkout: the package must use the library
# its wheel carries (test_lib checks that it does).
unset KVTRANSFER_LIB
tests=$(pwd)/ffi/python/tests
cd "$(mktemp -d)"
# The SGLang tests (with_sglang/) need SGLang's own venv: scripts/sglang-tests.sh runs them.
"$OLDPWD/$venv/bin/pytest" "$tests" -q -p no:cacheprovider --rootdir "$tests" --ignore "$tests/with_sglang" "$@"
