"""Finding and loading the library, and the bindings against the C header."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvtransfer
from kvtransfer import _lib

CHILD_ENV = {k: v for k, v in os.environ.items() if k != _lib.ENV_VAR}


def checkout_root() -> Path:
    """The kvtransfer checkout this library was loaded from (or the one above the cwd)."""
    for start in (Path(kvtransfer.library_path()).parent, Path.cwd()):
        for d in _lib._checkouts_above(start):
            return d
    pytest.skip("not run inside a kvtransfer checkout (no Cargo.toml naming kvtransfer above)")


def run_child(code: str, env_extra: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**CHILD_ENV, **env_extra},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_loaded_library_and_abi_version():
    path = Path(kvtransfer.library_path())
    assert path.is_file() and path.name.startswith("libkvtransfer") and path.suffix == ".so"
    assert kvtransfer.abi_version() == kvtransfer.ABI_VERSION == 1
    if not os.environ.get(_lib.ENV_VAR):
        # The test script installs the wheel (pip install ./ffi/python) and leaves
        # KVTRANSFER_LIB unset: the library found is the one the wheel carries.
        assert path.parent == Path(kvtransfer.__file__).parent, path
        assert "site-packages" in path.parts, path


def test_a_wheel_named_library_is_a_candidate(tmp_path):
    pkg = tmp_path / "site" / "kvtransfer"
    pkg.mkdir(parents=True)
    wheel_lib = pkg / "libkvtransfer.cpython-311-x86_64-linux-gnu.so"
    wheel_lib.write_bytes(b"")
    got = _lib.candidates(env={}, cwd=tmp_path, package_dir=pkg)
    assert got == [pkg / _lib.LIB_NAME, wheel_lib]


def make_checkout(root: Path, name: str = "kvtransfer") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Cargo.toml").write_text(f'[package]\nname = "{name}"\nversion = "0.1.0"\n\n[dependencies]\nname = "x"\n')
    return root


def test_discovery_order(tmp_path):
    repo = make_checkout(tmp_path / "repo")
    work = repo / "a" / "b"
    work.mkdir(parents=True)
    pkg = tmp_path / "site" / "kvtransfer"
    pkg.mkdir(parents=True)
    got = _lib.candidates(env={}, cwd=work, package_dir=pkg)
    assert got == [
        pkg / _lib.LIB_NAME,
        repo / "target" / "release" / _lib.LIB_NAME,
        repo / "target" / "debug" / _lib.LIB_NAME,
    ]
    # An installed package inside a checkout (target/pyenv/...) finds that checkout too,
    # after the one above the working directory.
    other = make_checkout(tmp_path / "other")
    pkg2 = other / "target" / "pyenv" / "lib" / "site-packages" / "kvtransfer"
    pkg2.mkdir(parents=True)
    got = _lib.candidates(env={}, cwd=work, package_dir=pkg2)
    assert got[1:] == [
        repo / "target" / "release" / _lib.LIB_NAME,
        repo / "target" / "debug" / _lib.LIB_NAME,
        other / "target" / "release" / _lib.LIB_NAME,
        other / "target" / "debug" / _lib.LIB_NAME,
    ]
    # KVTRANSFER_LIB is the only candidate when set.
    assert _lib.candidates(env={_lib.ENV_VAR: "/x/libk.so"}, cwd=work, package_dir=pkg) == [Path("/x/libk.so")]
    # A Cargo.toml of another crate (or a dependency named kvtransfer) is not a checkout.
    make_checkout(tmp_path / "notus", name="something-else")
    (tmp_path / "dep").mkdir()
    (tmp_path / "dep" / "Cargo.toml").write_text('[dependencies]\nname = "kvtransfer"\n')
    for d in ("notus", "dep"):
        assert _lib.candidates(env={}, cwd=tmp_path / d, package_dir=pkg) == [pkg / _lib.LIB_NAME]


def test_load_takes_the_first_that_works(tmp_path):
    real = Path(kvtransfer.library_path())
    fake = tmp_path / _lib.LIB_NAME
    fake.write_text("not a shared object")
    with pytest.raises(kvtransfer.LibraryNotFoundError) as e:
        _lib.load(fake)
    assert str(fake) in str(e.value) and e.value.tried
    # A real shared object without the kvtransfer ABI is passed over with a reason.
    import _ctypes

    if getattr(_ctypes, "__file__", None):
        with pytest.raises(kvtransfer.LibraryNotFoundError) as e:
            _lib.load(_ctypes.__file__)
        assert "not the kvtransfer C ABI" in str(e.value)
    assert _lib.load(real).kvt_abi_version() == 1


def test_env_var_is_used_and_a_bad_one_is_reported(tmp_path):
    real = kvtransfer.library_path()
    code = "import kvtransfer; print(kvtransfer.library_path()); print(kvtransfer.TransferEngine(transport='tcp').local_addr)"
    # Set explicitly, from a directory with no checkout above it.
    out = run_child(code, {_lib.ENV_VAR: real}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == real and lines[1].startswith("127.0.0.1:")

    # A wrong path: importing works (the library loads lazily); first use says what was tried.
    missing = tmp_path / "nowhere" / _lib.LIB_NAME
    out = run_child(code, {_lib.ENV_VAR: str(missing)}, cwd=tmp_path)
    assert out.returncode != 0
    assert "LibraryNotFoundError" in out.stderr and str(missing) in out.stderr and "not found" in out.stderr
    assert "KVTRANSFER_LIB is set" in out.stderr


def test_package_next_to_library_is_found_first(tmp_path):
    """A copy of the package with the library beside it, imported from a foreign cwd."""
    pkg = tmp_path / "site" / "kvtransfer"
    shutil.copytree(
        Path(kvtransfer.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "libkvtransfer*")
    )
    shutil.copy(kvtransfer.library_path(), pkg / _lib.LIB_NAME)
    out = run_child(
        "import kvtransfer; print(kvtransfer.__file__); print(kvtransfer.library_path())",
        {"PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    file, path = out.stdout.split()
    assert Path(file).parent == pkg and Path(path) == pkg / _lib.LIB_NAME

    # Without it, and with no checkout above either directory: a clear error listing places.
    (pkg / _lib.LIB_NAME).unlink()
    out = run_child("import kvtransfer; kvtransfer.abi_version()", {"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path)
    assert out.returncode != 0
    assert "cannot load" in out.stderr and str(pkg / _lib.LIB_NAME) in out.stderr
    assert "cargo build --release --lib" in out.stderr


def header_functions(text: str) -> dict:
    """name -> parameter count of every function declared in kvtransfer.h."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for m in re.finditer(r"\b(?:u?int32_t|const char \*)\s*(kvt_\w+)\s*\(([^)]*)\)\s*;", text):
        params = m.group(2).strip()
        out[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return out


def test_every_header_function_is_declared_with_its_arity():
    header = checkout_root() / "include" / "kvtransfer.h"
    if not header.is_file():
        pytest.skip(f"{header} not found")
    declared = header_functions(header.read_text())
    assert len(declared) >= 30, declared
    assert set(declared) == set(_lib.SIGNATURES), set(declared) ^ set(_lib.SIGNATURES)
    for name, arity in declared.items():
        assert len(_lib.SIGNATURES[name][1]) == arity, name


STRUCTS = {
    "kvt_engine_config": _lib.EngineConfig,
    "kvt_request": _lib.Request,
    "kvt_kv_buffer": _lib.KvBuffer,
    "kvt_kv_config": _lib.KvConfig,
    "kvt_room_metrics": _lib.RoomMetricsC,
}


def test_struct_layouts_match_the_c_compiler(tmp_path):
    header = checkout_root() / "include" / "kvtransfer.h"
    cc = shutil.which("cc") or shutil.which("gcc")
    if not header.is_file() or cc is None:
        pytest.skip("needs include/kvtransfer.h and a C compiler")
    lines = []
    for cname, py in STRUCTS.items():
        lines.append(f'printf("{cname} size %zu\\n", sizeof({cname}));')
        for f, _ in py._fields_:
            lines.append(f'printf("{cname} {f} %zu\\n", offsetof({cname}, {f}));')
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"kvtransfer.h\"\nint main(void) {\n"
        + "\n".join(lines)
        + "\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", str(header.parent), str(src), "-o", str(exe)], check=True, timeout=60)
    c = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        s, f, v = line.split()
        c[(s, f)] = int(v)
    for cname, py in STRUCTS.items():
        assert c[(cname, "size")] == ctypes.sizeof(py), cname
        for f, _ in py._fields_:
            assert c[(cname, f)] == getattr(py, f).offset, (cname, f)
