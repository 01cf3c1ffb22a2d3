"""Every per-student option a config accepts changes the student it is set on, and only it.

One `distill train` over the real CLI co-trains a base student beside variants that each
differ from it by one key.  Every student starts from the same weights (one seed for all,
distill/train/setup.py) and reads the same teacher signal each step, so a variant whose key
were ignored would end bit for bit equal to the base, as its twin (the same config under
another name) does.  Memory knobs (loss.chunk_size) must change nothing but rounding."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from tests.conftest import checkpoint_weights, run_cli, train_rows

pytestmark = pytest.mark.slow

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
MOE = {**TINY, "intermediate_size": 32, "num_experts": 4, "attention_chunk_size": 8}
STEPS = 6

# name -> what the student sets beyond the base's (optim lr 3e-3, warmup 1; loss defaults)
DENSE_VARIANTS = {
    "twin": {},
    "grad_clip": {"optim": {"grad_clip": 1e-4}},
    "min_lr_ratio": {"optim": {"min_lr_ratio": 0.9}},
    "betas": {"optim": {"betas": [0.5, 0.6]}},
    "weight_decay": {"optim": {"weight_decay": 2.0}},
    "warmup_steps": {"optim": {"warmup_steps": 4}},
    "reverse_kl": {"loss": {"divergence": "reverse_kl"}},
    "jsd": {"loss": {"divergence": "jsd"}},
    "jsd_beta": {"loss": {"divergence": "jsd", "beta": 0.05}},
    "skew_kl": {"loss": {"divergence": "skew_kl"}},
    "skew_kl_alpha": {"loss": {"divergence": "skew_kl", "alpha": 0.6}},
    "skew_reverse_kl": {"loss": {"divergence": "skew_reverse_kl"}},
    "tv": {"loss": {"divergence": "tv"}},
    "temperature": {"loss": {"temperature": 2.0}},
    "tail_renorm": {"loss": {"tail": "renorm"}},
    "teacher_argmax": {"loss": {"hard_target": "teacher_argmax", "soft_weight": {"kind": "constant", "start": 0.5}}},
    "chunk_size": {"loss": {"chunk_size": 5}},  # a memory knob: the same result
}
MOE_VARIANTS = {"moe_z": {"loss": {"z_weight": 1.0}}, "moe_balance": {"loss": {"balance_weight": 1.0}}}


def _student(name: str, args: dict, preset: str, extra: dict) -> dict:
    optim = {"lr": 3e-3, "warmup_steps": 1, **extra.get("optim", {})}
    return {"name": name, "model": {"preset": preset, "args": args}, "optim": optim, "loss": extra.get("loss", {})}


@pytest.fixture(scope="module")
def trained(online_setup):
    work, base = online_setup
    cfg = yaml.safe_load(base.read_text())
    cfg["students"] = ([_student("base", TINY, "dense", {})]
                       + [_student(n, TINY, "dense", extra) for n, extra in DENSE_VARIANTS.items()]
                       + [_student("moe_base", MOE, "scout", {})]
                       + [_student(n, MOE, "scout", extra) for n, extra in MOE_VARIANTS.items()])
    # the top-16 signal: loss.tail chooses how its tail is read (the whole distribution has none)
    cfg["train"].update(steps=STEPS, online_dense=False, checkpoint_every=0)
    (work / "options.yaml").write_text(yaml.safe_dump(cfg))
    out = work / "options"
    r = run_cli("train", "-c", str(work / "options.yaml"), "--quiet", "--set", f"out_dir={out}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", [n for n in DENSE_VARIANTS if n not in ("twin", "chunk_size")] + list(MOE_VARIANTS))
def test_each_option_changes_its_student(trained, name):
    base = checkpoint_weights(trained, "moe_base" if name.startswith("moe_") else "base", STEPS)
    # Measured: 6.1e-3 (min_lr_ratio) to 2.5e-2 apart after 6 steps, against 3.4e-5 for rounding alone (below)
    assert _max_diff(checkpoint_weights(trained, name, STEPS), base) > 5e-4, f"{name} trained as if it were unset"


def test_the_comparison_can_tell_and_a_memory_knob_changes_nothing(trained):
    """The twin ends bit for bit equal to the base, as an ignored key would.  loss.chunk_size
    only reorders sums: each step's loss and grad norm agree to rounding, and the weights to
    what Adam makes of it (3.4e-5: it scales the rounding of near-zero gradients up to steps)."""
    base = checkpoint_weights(trained, "base", STEPS)
    assert _max_diff(checkpoint_weights(trained, "twin", STEPS), base) == 0.0
    assert _max_diff(checkpoint_weights(trained, "chunk_size", STEPS), base) < 1e-4
    for key in ("loss", "grad_norm"):
        ref, got = ([r[key] for r in train_rows(trained, n)] for n in ("base", "chunk_size"))
        assert got == pytest.approx(ref, rel=1e-5), key


def test_the_lr_schedule_follows_warmup_and_min_lr_ratio(trained):
    """Linear warmup to lr, then cosine towards lr x min_lr_ratio at `train.steps`.  The
    logged lr is the rate the step's update used (it was the next step's: the warmup's first
    rate never showed, and the last one logged was never applied)."""
    def cosine(progress, floor):
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    lrs = {n: [r["lr"] for r in train_rows(trained, n)] for n in ("base", "min_lr_ratio", "warmup_steps")}
    # warmup 1 (the tests' setting), then cosine over the other 5 steps, from progress 0 at step 2
    assert lrs["base"] == pytest.approx([3e-3, *(3e-3 * cosine(i / 5, 0.1) for i in range(5))], rel=1e-6)
    assert lrs["min_lr_ratio"] == pytest.approx([3e-3, *(3e-3 * cosine(i / 5, 0.9) for i in range(5))], rel=1e-6)
    assert lrs["warmup_steps"] == pytest.approx([3e-3 * 1 / 4, 3e-3 * 2 / 4, 3e-3 * 3 / 4, 3e-3, 3e-3,
                                                 3e-3 * cosine(1 / 2, 0.1)], rel=1e-6)


def test_precision_bf16_autocasts_and_keeps_fp32_weights(trained, online_setup):
    """train.precision: bf16 (a run-level key): the same students, run under bf16 autocast,
    compute each step's loss in bf16 matmuls (measured: 3e-5 off fp32's at step 1, where the
    weights are the same) and keep fp32 weights (the optimiser's master copy)."""
    work, _ = online_setup
    cfg = yaml.safe_load((work / "options.yaml").read_text())
    cfg["students"] = [s for s in cfg["students"] if s["name"] in ("base", "moe_base")]
    cfg["train"]["precision"] = "bf16"
    (work / "bf16.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("train", "-c", str(work / "bf16.yaml"), "--quiet", "--set", f"out_dir={work / 'bf16'}")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("base", "moe_base"):
        got, ref = train_rows(work / "bf16", name)[0]["loss"], train_rows(trained, name)[0]["loss"]
        assert got != ref and got == pytest.approx(ref, rel=1e-3), (got, ref)
        assert {v.dtype for v in checkpoint_weights(work / "bf16", name, STEPS).values()} == {torch.float32}
