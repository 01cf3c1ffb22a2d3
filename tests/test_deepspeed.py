"""DeepSpeed ZeRO-2 in 2 CPU processes matches the single-process run (slow: JIT-builds a comm op once)."""
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_zero2_two_cpu_processes_match_single_process(online_setup):
    work, cfg = online_setup
    single = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "deepspeed launcher not installed (make install provides it)"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29533", str(ROOT / "cli.py"), "train", "-c", str(cfg),
           "--quiet", "--set", f"out_dir={work / 'ds'}", "--set", "train.engine=deepspeed",
           "--set", "train.zero_stage=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    a, b = losses(work / "single"), losses(work / "ds")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3 * max(1.0, abs(x)), (a, b)
    assert list((work / "ds" / "students" / "dense" / "checkpoints").glob("step_*"))
