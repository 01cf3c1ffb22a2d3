"""Shared fixtures: small real corpora (from the stdlib) and a runner for the real CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `distill ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A few real stdlib modules copied into a dir (a small, real corpus)."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py",
                 "keyword.py", "numbers.py", "queue.py", "sched.py", "this.py", "stringprep.py", "copy.py",
                 "abc.py", "cmd.py", "graphlib.py", "opcode.py", "operator.py", "random.py", "string.py"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out
