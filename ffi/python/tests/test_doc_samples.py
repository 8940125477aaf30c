"""Every ```python sample of the README and of docs/*.md runs, each in a fresh interpreter
against the installed package, from a directory outside the checkout.

A sample must therefore be a whole program. Commands and fragments of other programs are
```bash or ```text blocks, which this test does not run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[3]


def guides() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def samples() -> List[Tuple[str, str]]:
    """(``file #n``, code) for each ```python block, in file order."""
    out = []
    for f in guides():
        name, n, block = f.relative_to(ROOT), 0, None
        for line in f.read_text(encoding="utf-8").splitlines():
            if block is None:
                if line.rstrip() == "```python":
                    block = []
            elif line.rstrip() == "```":
                n += 1
                out.append((f"{name} #{n}", "\n".join(block) + "\n"))
                block = None
            else:
                block.append(line)
    return out


SAMPLES = samples()


def test_there_are_samples():
    assert len(SAMPLES) >= 2, SAMPLES


@pytest.mark.parametrize("name,code", SAMPLES, ids=[n for n, _ in SAMPLES])
def test_sample_runs(name: str, code: str, tmp_path):
    # The samples name their own settings; a KVT_* variable of the caller's shell must not
    # change them. TCP, since this host may have an RDMA port the sample does not expect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVT_")}
    env["KVT_TRANSPORT"] = "tcp"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{name} failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
