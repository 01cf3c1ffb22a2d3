"""Checkpoints and exports are all-or-nothing: a failed write leaves the previous good state."""
import errno

import pytest
import torch

from distill.train import checkpoint
from distill.report import export
from common.errors import UserError
from students.build import build_model
from students.presets import dense


@pytest.fixture
def model():
    return build_model(dense(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=16, intermediate_size=64), seed=0)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_save_load_round_trip_and_keep_last(tmp_path, model):
    root = tmp_path / "students" / "s" / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(root, step, model, {"x": step}, {"run_hash": "h"})
        checkpoint.commit(tmp_path / "students", {"s": step}, keep_last=2)
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step_00000002", "step_00000003"]
    fresh = build_model(model.config, seed=1)
    state = checkpoint.load(checkpoint.latest(root), fresh, "h")
    assert state["x"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    with pytest.raises(UserError, match="different config"):
        checkpoint.load(checkpoint.latest(root), fresh, "other")


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, model, monkeypatch):
    checkpoint.save(tmp_path, 1, model, {}, {"run_hash": "h"})
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(UserError, match="disk full"):
        checkpoint.save(tmp_path, 2, model, {}, {"run_hash": "h"})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp dir, old one intact
    assert checkpoint.latest(tmp_path).name == "step_00000001"


def test_torn_checkpoint_without_meta_is_ignored(tmp_path, model):
    checkpoint.save(tmp_path, 1, model, {}, {"run_hash": "h"})
    (tmp_path / "step_00000002").mkdir()  # a dir with no meta.json is never trusted
    assert checkpoint.latest(tmp_path).name == "step_00000001"


def test_failed_export_keeps_previous_export(tmp_path, model, monkeypatch):
    out = tmp_path / "export"
    export.save_hf_dir(model, None, out)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(UserError, match="disk full"):
        export.save_hf_dir(model, None, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the temp dir is gone


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_an_uncommitted_step_is_not_the_latest_and_pruning_keeps_the_committed_one(tmp_path, model):
    """Students commit together: a step published by one student but not committed is not
    its latest checkpoint (for --resume, export, inspect), and committing another student's
    step never prunes this one's committed step."""
    students = tmp_path / "students"
    for name in ("a", "b"):
        checkpoint.save(students / name / "checkpoints", 2, model, {}, {"run_hash": "h"})
    checkpoint.commit(students, {"a": 2, "b": 2}, keep_last=1)
    checkpoint.save(students / "a" / "checkpoints", 4, model, {}, {"run_hash": "h"})  # killed before b's save
    assert checkpoint.latest(students / "a" / "checkpoints").name == "step_00000002"
    assert checkpoint.committed_steps(students) == {"a": 2, "b": 2}
    assert export.resolve_checkpoint(students / "a").name == "step_00000002"
    # Resumed from step 2, the run commits step 4 for both: the stale step-4 dir is replaced.
    for name in ("a", "b"):
        checkpoint.save(students / name / "checkpoints", 4, model, {}, {"run_hash": "h"})
    checkpoint.commit(students, {"a": 4, "b": 4}, keep_last=1)
    assert [p.name for p in checkpoint.step_dirs(students / "b" / "checkpoints")] == ["step_00000004"]
    # A commit of step 6 for `a` alone (b dropped) keeps b's committed step 4.
    checkpoint.save(students / "a" / "checkpoints", 6, model, {}, {"run_hash": "h"})
    checkpoint.commit(students, {"a": 6}, keep_last=1)
    assert checkpoint.latest(students / "b" / "checkpoints").name == "step_00000004"
    assert checkpoint.committed_steps(students) == {"a": 6, "b": 4}
