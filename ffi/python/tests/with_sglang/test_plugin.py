"""The installed package's SGLang entry points, as SGLang loads them (each case in a fresh
interpreter: SGLang loads plugins once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang")


def run(code: str, **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("KVT_MOONCAKE_COMPAT", "SGLANG_PLUGINS")}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=full, timeout=240
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_plugins_registers_the_kvtransfer_backend():
    got = run(
        """
import json
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
from sglang.srt.disaggregation.utils import TransferBackend, KVClassType, get_kv_class
from sglang.srt.managers import disagg_service
args = prepare_server_args(["--model-path", "dummy", "--disaggregation-mode", "prefill",
                            "--disaggregation-transfer-backend", "kvtransfer"])
b = TransferBackend(args.disaggregation_transfer_backend)
classes = {t.value: get_kv_class(b, t).__module__ + "." + get_kv_class(b, t).__name__ for t in KVClassType}
print(json.dumps({
    "parsed": args.disaggregation_transfer_backend,
    "member": b.name,
    "classes": classes,
    "service": disagg_service.get_kv_class(b, KVClassType.BOOTSTRAP_SERVER).__name__,
    "rust_bootstrap": disagg_service.rust_server_serves_kv_bootstrap(b),
    "mooncake": get_kv_class(TransferBackend.MOONCAKE, KVClassType.MANAGER).__name__,
    "members": [m.value for m in TransferBackend],
    "engine_installed": __import__("sys").modules.get("mooncake.engine") is not None,
}))
"""
    )
    assert got["parsed"] == "kvtransfer" and got["member"] == "KVTRANSFER"
    assert got["classes"]["manager"] == "kvtransfer.sglang.conn.KvtKVManager"
    assert got["classes"]["sender"] == "kvtransfer.sglang.conn.KvtKVSender"
    assert got["classes"]["receiver"] == "kvtransfer.sglang.conn.KvtKVReceiver"
    assert got["classes"]["bootstrap_server"] == "kvtransfer.sglang.conn.KvtKVBootstrapServer"
    assert got["classes"]["kvargs"].endswith(".KVArgs")
    assert got["service"] == "KvtKVBootstrapServer" and got["rust_bootstrap"] is True
    assert got["mooncake"] == "MooncakeKVManager"  # the other backends are untouched
    assert "kvtransfer" in got["members"] and "mooncake" in got["members"]
    assert got["engine_installed"] is False  # the Mooncake drop-in stays off without the switch


def test_mooncake_compat_switch_installs_the_drop_in():
    code = """
import json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import MooncakeTransferEngine
e = MooncakeTransferEngine(hostname="127.0.0.1", gpu_id=0, ib_device=None)
print(json.dumps({"engine": type(e.engine).__module__, "session": e.get_session_id()}))
"""
    got = run(code, KVT_MOONCAKE_COMPAT="1", MOONCAKE_PROTOCOL="tcp")
    assert got["engine"] == "kvtransfer.mooncake"
    assert got["session"].startswith("127.0.0.1:")
