"""On-policy co-distillation (distill/train/on_policy.py): students sample, one teacher
forward per step scores every student's samples, each learns from its own."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.hf_models import chat_rows, save_model, write_jsonl

DENSE = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def op(hf_family, tmp_path_factory):
    """Chat rows, the family's teacher, and a teacher without vocab padding (its copy as a
    student is then the very same distribution)."""
    work = tmp_path_factory.mktemp("onpolicy")
    exact = save_model("qwen3", hf_family["vocab"], work / "exact_teacher", hf_family["tokenizer"], seed=4)
    return {"data": write_jsonl(chat_rows(), work / "chat.jsonl"), "teacher": hf_family["teacher"],
            "exact": exact, "student": hf_family["student"]}


def _dense(name: str, width: int = 32, **extra) -> dict:
    return {"name": name, "model": {"preset": "dense", "args": {**DENSE, "hidden_size": width}},
            "optim": {"lr": 3e-3, "warmup_steps": 1}, **extra}


def _raw(op, out, students, share=None, steps=2, teacher=None, **train) -> dict:
    raw = {"out_dir": str(out), "seed": 5,
           "data": {"paths": [str(op["data"])], "seq_len": 48, "val_fraction": 0.2},
           "teacher": {"source": "checkpoint", "path": str(teacher or op["teacher"])}, "cache": {"k": 8},
           "students": students,
           "train": {"mode": "online", "steps": steps, "batch_size": 2, "eval_every": 0, "eval_blocks": 1,
                     "checkpoint_every": 0, **train}}
    if share is not None:
        raw["train"]["on_policy"] = {"share": share, "max_new_tokens": 6}
    return raw


def _train(raw: dict, resume: bool = False) -> dict:
    from distill.config import check_config, parse_config
    from distill.stages import train_students

    return train_students(check_config(parse_config(raw)), resume=resume, progress=False)


def _weights(out, name: str, step: int) -> dict:
    return load_file(str(out / "students" / name / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


ALWAYS = {"kind": "constant", "start": 1.0}


@pytest.fixture
def spy(monkeypatch):
    """Counts the teacher model's real forwards during training (evaluation stubbed out)."""
    import distill.stages
    import distill.train.loop

    calls = {"forwards": 0, "teacher": None}
    make = distill.stages.live_teacher

    def live_teacher(*args, **kwargs):
        teacher = make(*args, **kwargs)
        teacher.model.model.register_forward_pre_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
        calls["teacher"] = teacher
        return teacher

    monkeypatch.setattr(distill.stages, "live_teacher", live_teacher)
    monkeypatch.setattr(distill.train.loop, "evaluate_model", lambda *a, **k: {})
    return calls


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_teacher_forward_per_on_policy_step(n, op, spy, tmp_path):
    students = [_dense("a"), {"name": "b", "model": {"path": str(op["student"])}}, _dense("c", 48)][:n]
    result = _train(_raw(op, tmp_path / "out", students, ALWAYS, steps=2))
    assert spy["forwards"] == 2  # one per step, whatever the number of students
    assert spy["teacher"].forward_calls == 2 == result["teacher_forward_calls"]
    for s in students:
        rows = [json.loads(l) for l in (tmp_path / "out" / "students" / s["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("on_policy") for r in rows if r.get("kind", "train") == "train"] == [True, True]
