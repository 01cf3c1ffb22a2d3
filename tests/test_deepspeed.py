"""DeepSpeed ZeRO-2 in 2 CPU processes matches the single-process run (slow: JIT-builds a comm op once)."""
import json

import pytest

from tests.conftest import run_cli, run_deepspeed_cli

pytestmark = pytest.mark.slow


def losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_zero2_two_cpu_processes_match_single_process(online_setup):
    work, cfg = online_setup
    single = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    r = run_deepspeed_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'ds'}",
                          "--set", "train.engine=deepspeed", "--set", "train.zero_stage=2", port=29533)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    a, b = losses(work / "single"), losses(work / "ds")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3 * max(1.0, abs(x)), (a, b)
    assert list((work / "ds" / "students" / "dense" / "checkpoints").glob("step_*"))
