"""On-policy co-distillation through the real CLI, with the shipped example config
(configs/on_policy_chat.yaml) at tiny size: 2 ranks (DDP, DeepSpeed ZeRO-3) train the weights
1 process trains from the same global batch, and a run killed -9 after a checkpoint, then
resumed, ends with the weights of the run that never stopped (slow: each launch is a real run)."""
from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

from tests.conftest import (
    ROOT, checkpoint_weights, ensure_deepspeed_cpu_op, rel_diff, rendezvous, run_cli, run_deepspeed_cli,
    run_torchrun_cli, spawn, train_rows)
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
    # ZeRO-3 really partitioning tiny students (the default keeps parameters under 1e5 elements
    # whole on every rank), with buckets sized to them (the default 5e8-element reduce bucket is
    # 2 GB per student per rank).
    ds = work / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                    "reduce_bucket_size": 100_000,
                                                    "stage3_prefetch_bucket_size": 100_000}}))
    sets = {"seed": 1, "data.paths": f"[{data}]", "data.seq_len": 160, "data.val_fraction": 0.2,
            "teacher.path": hf_family["teacher"], "cache.k": 8,
            "students.0.model.args": TINY + ", num_experts: 4, intermediate_size: 32, intermediate_size_mlp: 64, "
                                            "attention_chunk_size: 8}",
            "students.1.model.args": TINY + ", intermediate_size: 64}",
            "students.2.model.path": hf_family["student"],
            "train.steps": STEPS, "train.batch_size": 4, "train.eval_every": 0, "train.eval_blocks": 1,
            "train.checkpoint_every": 2, "train.on_policy.max_new_tokens": 8, "train.on_policy.prompts_per_step": 4}
    return work, [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], ds


def train(tiny, out, launcher="single", *extra, env=None):
    work, sets, ds = tiny
    args = ("train", "-c", str(CONFIG), "--quiet", *sets, "--set", f"out_dir={out}", *extra)
    if launcher == "single":
        return run_cli(*args, env=env)
    if launcher == "torchrun":
        return run_torchrun_cli(*args)
    return run_deepspeed_cli(*args, "--set", "train.engine=deepspeed", "--set", f"train.deepspeed_config={ds}")


def weights(out, name, step=STEPS):
    return checkpoint_weights(out, name, step)


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


def _generate_rank(rank, world, meet, out):
    """A ZeRO-3 student (every weight partitioned) generates a different number of tokens on
    each rank inside `generating()`, then runs a forward through its restored hooks."""
    os.environ.update(meet, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from distill.config import OptimConfig
    from distill.train.engines import DeepSpeedEngine
    from distill.train.student import make_optimizer
    from students.build import build_model
    from students.presets import dense

    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(dense(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16),
                        seed=0)
    whole = copy.deepcopy(model).eval()
    opt, sched = make_optimizer(model, OptimConfig(), 10)
    engine = DeepSpeedEngine(model, opt, sched, {
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 1 << 30,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 100_000,
                              "stage3_prefetch_bucket_size": 100_000}})
    before = [p.numel() for p in engine.module.parameters()]
    ids = torch.tensor([[5, 9, 2, 7]])
    n = 2 + 6 * rank  # rank 0 decodes 2 tokens, rank 1 8: a per-layer gather would wait forever
    kwargs = {"max_new_tokens": n, "do_sample": False, "eos_token_id": None, "pad_token_id": 0, "synced_gpus": False}
    engine.module.eval()
    with torch.no_grad(), engine.generating():
        got = engine.module.generate(ids, **kwargs)
    after = [p.numel() for p in engine.module.parameters()]
    with torch.no_grad():
        logits = engine.run(lambda m, x: m(x).logits, ids)  # the hooks gather again
    torch.save({"got": got, "want": whole.generate(ids, **kwargs), "before": before, "after": after,
                "logits": logits, "want_logits": whole(ids).logits.detach()}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_zero3_student_generates_whole_on_each_rank_alone(tmp_path):
    """Under ZeRO-3, `generating()` gathers the student once: each rank decodes alone (other
    lengths, no collective: without the gather, rank 1's per-layer gathers wait forever for
    rank 0), its tokens are the unpartitioned model's, and after it the weights are partitions
    again with working hooks."""
    ensure_deepspeed_cpu_op()
    with rendezvous() as meet:
        spawn(_generate_rank, (2, meet, tmp_path), timeout=180)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert all(n == 0 for n in r["before"]) and r["after"] == r["before"], rank  # partitioned, before and after
        assert r["got"].shape[1] == 4 + 2 + 6 * rank and torch.equal(r["got"], r["want"]), rank
        torch.testing.assert_close(r["logits"], r["want_logits"], rtol=1e-5, atol=1e-6)
