#!/usr/bin/env bash
# SGLang 0.5.23's real disaggregation code on kvtransfer (CPU, TCP): its Mooncake backend over
# kvtransfer.mooncake, and kvtransfer's native backend (--disaggregation-transfer-backend
# kvtransfer), in SGLang's own venv (scripts/sglang-env.sh: made once, cached) with the
# package installed from ./ffi/python. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/sglang-env.sh)
tests=$(pwd)/ffi/python/tests
cd "$(mktemp -d)"
# Run from outside the checkout with KVTRANSFER_LIB unset: the installed wheel is under test.
env -u KVTRANSFER_LIB "$venv/bin/pytest" "$tests/with_sglang" \
  -q -p no:cacheprovider --rootdir "$tests" -W ignore::UserWarning "$@"
