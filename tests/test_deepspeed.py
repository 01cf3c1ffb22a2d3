"""DeepSpeed ZeRO-2 in 2 CPU processes matches the single-process run (slow: JIT-builds a comm op once)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def online_setup(stdlib_corpus, tmp_path_factory):
    """A random tiny Behemoth-style teacher saved as a Hugging Face dir, plus a config."""
    from distill.config import DataConfig
    from distill.data import prepare_data
    from distill.export import save_hf_dir
    from students.build import build_model
    from students.presets import behemoth

    work = tmp_path_factory.mktemp("ds")
    data = prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}), work / "prep")
    teacher = build_model(behemoth(vocab_size=len(data.tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, num_experts=4), seed=1)
    teacher_dir = save_hf_dir(teacher, data.tokenizer, work / "teacher")
    student = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = {
        "seed": 3, "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
        "teacher": {"source": "checkpoint", "path": str(teacher_dir)},
        "cache": {"k": 16},
        "students": [{"name": "dense", "model": {"preset": "dense", "args": student},
                      "optim": {"lr": 3e-3, "warmup_steps": 1}}],
        "train": {"mode": "online", "steps": 4, "batch_size": 4, "eval_every": 0, "eval_blocks": 2,
                  "checkpoint_every": 0},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return work, path


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
