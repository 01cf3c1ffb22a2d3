"""On-policy co-distillation through the real CLI, with the shipped example config
(configs/on_policy_chat.yaml) at tiny size: 2 ranks (DDP, DeepSpeed ZeRO-3) train the weights
1 process trains from the same global batch, and a run killed -9 after a checkpoint, then
resumed, ends with the weights of the run that never stopped (slow: each launch is a real run)."""
from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli, run_deepspeed_cli, run_torchrun_cli
from tests.hf_models import chat_rows, write_jsonl

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "on_policy_chat.yaml"
STEPS = 4
NAMES = ("scout", "dense", "small")
# seed 1's draws under the config's linear 0 -> 1 share over 4 steps: off, on, off, on
KINDS = {"scout": [False, True, False, True], "dense": [False, True, False, True], "small": [False] * STEPS}
TINY = "{hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, head_dim: 16"


@pytest.fixture(scope="module")
def tiny(hf_family, tmp_path_factory):
    """The example config's `--set`s for the tests' chat rows, the family's teacher and its
    pretrained student, tiny presets, 4 steps of 4 prompts (checkpoints at steps 2 and 4)."""
    work = tmp_path_factory.mktemp("onpolicy-ranks")
    data = write_jsonl(chat_rows(), work / "chat.jsonl")
    sets = {"seed": 1, "data.paths": f"[{data}]", "data.seq_len": 160, "data.val_fraction": 0.2,
            "teacher.path": hf_family["teacher"], "cache.k": 8,
            "students.0.model.args": TINY + ", num_experts: 4, intermediate_size: 32, intermediate_size_mlp: 64, "
                                            "attention_chunk_size: 8}",
            "students.1.model.args": TINY + ", intermediate_size: 64}",
            "students.2.model.path": hf_family["student"],
            "train.steps": STEPS, "train.batch_size": 4, "train.eval_every": 0, "train.eval_blocks": 1,
            "train.checkpoint_every": 2, "train.on_policy.max_new_tokens": 8, "train.on_policy.prompts_per_step": 4}
    return work, [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def train(tiny, out, launcher="single", *extra, env=None):
    work, sets = tiny
    args = ("train", "-c", str(CONFIG), "--quiet", *sets, "--set", f"out_dir={out}", *extra)
    if launcher == "single":
        return run_cli(*args, env=env)
    if launcher == "torchrun":
        return run_torchrun_cli(*args)
    return run_deepspeed_cli(*args, "--set", "train.engine=deepspeed", "--set", "train.zero_stage=3")


def weights(out, name, step=STEPS):
    return load_file(str(out / "students" / name / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def train_rows(out, name):
    rows = [json.loads(l) for l in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


@pytest.fixture(scope="module")
def single(tiny):
    """The uninterrupted 1-process run, once per module."""
    out = tiny[0] / "single"
    r = train(tiny, out)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in NAMES:
        assert [bool(row.get("on_policy")) for row in train_rows(out, name)] == KINDS[name], name
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "zero3"])
def test_two_ranks_train_the_on_policy_weights_one_process_trains(tiny, single, launcher):
    """Each rank samples its half of the step's prompts; a prompt's sample is seeded by its
    place in the step, not by the rank, so the two ranks draw the very samples one process
    draws (the same count of sampled tokens) and train the same weights.  Under ZeRO-3 each
    student is gathered whole for its generation."""
    out = tiny[0] / launcher
    r = train(tiny, out, launcher)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for name in NAMES:
        diff = rel_diff(weights(out, name), weights(single, name))
        assert diff < 1e-5, (launcher, name, diff)
        rows, ref = train_rows(out, name), train_rows(single, name)
        assert [bool(x.get("on_policy")) for x in rows] == KINDS[name]
        for a, b in zip(rows, ref):
            if b.get("on_policy"):  # the step's figures, over both ranks
                assert a["sampled_tokens"] == b["sampled_tokens"] > 0 and a["samples"] == b["samples"] == 8, (a, b)
                assert a["generate_s"] > 0 and a["teacher_s"] > 0
            assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"]), (a, b)


def test_kill9_after_a_checkpoint_and_resume_equal_the_uninterrupted_run(tiny, single):
    """Killed (SIGKILL) right after the first student's step-4 checkpoint: step 2 is the
    committed one; `--resume` trains steps 3-4 again (off-policy, then on-policy) and every
    student ends with the uninterrupted run's weights, bit for bit."""
    out = tiny[0] / "killed"
    r = train(tiny, out, env={"DISTILL_TEST_KILL_AFTER_CHECKPOINTS": "4"})  # step 2: 3 students; step 4: 1
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    committed = json.loads((out / "students" / "committed.json").read_text())
    assert committed["students"] == {name: 2 for name in NAMES}, committed
    r = train(tiny, out, "single", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in NAMES:
        a, b = weights(out, name), weights(single, name)
        assert all((a[k] == b[k]).all() for k in b), name
        rows = train_rows(out, name)
        assert [row["step"] for row in rows][-2:] == [3, 4] and bool(rows[-1].get("on_policy")) == KINDS[name][-1]
