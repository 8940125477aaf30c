"""Every ```python sample of the README and of docs/*.md runs, each in a fresh interpreter
against the installed package, from a directory outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[3]


def samples() -> List[Tuple[str, str]]:
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        block = None
        for line in f.read_text(encoding="utf-8").splitlines():
            if block is None and line.rstrip() == "```python":
                block = []
            elif block is not None and line.rstrip() == "```":
                out.append((f"{f.relative_to(ROOT)} #{sum(1 for n, _ in out if n.startswith(str(f.relative_to(ROOT)))) + 1}", "\n".join(block) + "\n"))
                block = None
            elif block is not None:
                block.append(line)
    return out


SAMPLES = samples()


def test_there_are_samples():
    assert len(SAMPLES) >= 2, SAMPLES


@pytest.mark.parametrize("name,code", SAMPLES, ids=[n for n, _ in SAMPLES])
def test_sample_runs(name: str, code: str, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVT_")}
    env["KVT_TRANSPORT"] = "tcp"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{name} failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
