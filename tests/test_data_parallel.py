"""Data parallelism is exact: 2 CPU processes (gloo) train the weights 1 process trains from the
same global batch, under the torch engine (DDP) and DeepSpeed ZeRO-2/3, with 1 or 2 micro-batches,
for a dense and a MoE student trained together in one launch (slow: each launch is a real CLI run)."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_cli, run_deepspeed_cli, run_torchrun_cli

pytestmark = pytest.mark.slow

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
STEPS = 3


@pytest.fixture(scope="module")
def dp_config(online_setup):
    """The online setup's teacher, a dense and a MoE (Scout-style, top-1 of 4) student, a global
    batch of 8 blocks for 3 steps."""
    work, base = online_setup
    cfg = yaml.safe_load(base.read_text())
    optim = {"lr": 3e-3, "warmup_steps": 1}
    cfg["students"] = [
        {"name": "dense", "model": {"preset": "dense", "args": TINY}, "optim": optim},
        {"name": "moe", "model": {"preset": "scout", "args": {**TINY, "intermediate_size": 32, "num_experts": 4,
                                                              "attention_chunk_size": 8}},
         "optim": optim, "loss": {"balance_weight": 0.1}},
    ]
    cfg["train"].update(steps=STEPS, batch_size=8, eval_every=0, checkpoint_every=0)
    path = work / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return work, path


def weights(out, name, step=STEPS):
    return load_file(str(out / "students" / name / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def train_rows(out, name):
    rows = [json.loads(l) for l in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def train(cfg, out, launcher, grad_accum, port, *extra):
    args = ("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", f"train.grad_accum={grad_accum}",
            *extra)
    if launcher == "single":
        r = run_cli(*args)
    elif launcher == "torchrun":
        r = run_torchrun_cli(*args, port=port)
    else:  # "zero2", "zero3"
        r = run_deepspeed_cli(*args, "--set", "train.engine=deepspeed", "--set", f"train.zero_stage={launcher[-1]}",
                              port=port)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def single(dp_config):
    work, cfg = dp_config
    return {ga: train(cfg, work / f"single-ga{ga}", "single", ga, 0) for ga in (1, 2)}


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("launcher", ["torchrun", "zero2", "zero3"])
def test_two_ranks_train_the_weights_one_process_trains(dp_config, single, launcher, grad_accum):
    work, cfg = dp_config
    port = 29600 + 10 * ["torchrun", "zero2", "zero3"].index(launcher) + grad_accum
    out = train(cfg, work / f"{launcher}-ga{grad_accum}", launcher, grad_accum, port)
    for name in ("dense", "moe"):
        diff = rel_diff(weights(out, name), weights(single[grad_accum], name))
        assert diff < 1e-5, (launcher, grad_accum, name, diff)
    # Metrics are the step's, over both ranks: the same loss and token count as one process.
    for name in ("dense", "moe"):
        rows, ref = train_rows(out, name), train_rows(single[grad_accum], name)
        assert len(rows) == len(ref) == STEPS
        for a, b in zip(rows, ref):
            assert a["n_valid"] == b["n_valid"] and abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"]), (a, b)
            if name == "moe":
                assert abs(a["balance_loss"] - b["balance_loss"]) < 1e-4, (a, b)
