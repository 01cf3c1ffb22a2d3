"""Checkpoints and exports are all-or-nothing: a failed write leaves the previous good state."""
import errno
import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

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


def test_a_refused_resume_says_what_changed(tmp_path, model):
    """A checkpoint keeps its run's identity by name: a refused --resume names what changed,
    and when only the data did, says so rather than blaming the config."""
    from distill.train.loop_config import run_hash

    then = {"stage": "train", "students": [{"name": "s", "optim": {"lr": 1e-3}}], checkpoint.DATA_KEY: "aaaa",
            "train.steps": 60}
    checkpoint.save(tmp_path, 1, model, {}, {"run_hash": run_hash(*then.values()), "run_identity": then})
    ckpt = tmp_path / "step_00000001"

    def refused(**now) -> str:
        now = {**then, **now}
        with pytest.raises(UserError) as e:
            checkpoint.load(ckpt, None, run_hash(*now.values()), now)
        return str(e.value)

    said = refused(**{"train.steps": 70})
    assert "made by another config (train.steps 60 -> 70);" in said
    assert said.endswith("to train these students further, `distill export` them and start a new run (another "
                         "out_dir) with students.N.model.path set to each export"), said
    said = refused(students=[{"name": "s", "optim": {"lr": 1}}])
    assert "made by another config (student s: optim);" in said and "further" not in said
    said = refused(**{checkpoint.DATA_KEY: "bbbb"})
    assert ("this checkpoint was made from other data (its fingerprint aaaa -> bbbb: a data file, the tokenizer or "
            "a data setting changed); resume with the data it was trained on") in said, said
    assert "another config (" in refused(**{checkpoint.DATA_KEY: "bbbb", "train.steps": 70})
    # a key gone (on-policy steps dropped), the data the same: the config changed, not the data
    with_key = {**then, "train.on_policy": {"share": 0.5}}
    checkpoint.save(tmp_path / "b", 1, model, {}, {"run_hash": run_hash(*with_key.values()), "run_identity": with_key})
    with pytest.raises(UserError, match=r"made by another config \(train.on_policy\);"):
        checkpoint.load(tmp_path / "b" / "step_00000001", None, run_hash(*then.values()), then)
    other_data = {**then, checkpoint.DATA_KEY: "bbbb"}  # and the data changed too: both named
    with pytest.raises(UserError, match=r"made by another config \(data \(its fingerprint\) aaaa -> bbbb; "
                                        r"train.on_policy\);"):
        checkpoint.load(tmp_path / "b" / "step_00000001", None, run_hash(*other_data.values()), other_data)
    # a hash the same run had under earlier rules is accepted
    checkpoint.load(ckpt, None, "a-new-rule", then, also=(run_hash(*then.values()),))
    # a checkpoint from before identities were recorded: what changed is not known, the way on is said
    checkpoint.save(tmp_path / "old", 1, model, {}, {"run_hash": "7f1125e7fb1215a7"})
    with pytest.raises(UserError) as e:
        checkpoint.load(tmp_path / "old" / "step_00000001", None, run_hash(*then.values()), then)
    assert "made by a different config (run hash 7f1125e7fb1215a7 != " in str(e.value)
    assert str(e.value).endswith("; if train.steps changed, to train these students further, `distill export` them "
                                 "and start a new run (another out_dir) with students.N.model.path set to each export")


def test_a_checkpoint_hashed_with_a_students_device_still_resumes():
    """Checkpoints made before a student's `device` left the run hash hashed it: a config that
    sets one gets that hash too, as an earlier one."""
    from distill.config import check_config, parse_config
    from distill.stages import earlier_run_hashes, run_identity
    from distill.train.loop_config import run_hash

    raw = {"data": {"stdlib": True}, "teacher": {"path": "/teacher"},
           "students": [{"name": "a", "model": {"preset": "dense"}, "device": "cuda:1"},
                        {"name": "b", "model": {"preset": "dense"}}]}
    cfg = check_config(parse_config(raw))
    identity = run_identity(cfg, "fingerprint", None, dense=False)
    old = {**identity, "students": [s.model_dump(mode="json") for s in cfg.students]}  # the old rule
    for d, s in zip(old["students"], cfg.students):  # keys that enter only when set, as before
        d.pop("select"), d.pop("on_policy_share")
    assert old["students"][0]["device"] == "cuda:1" and old != identity
    assert run_hash(*old.values()) in earlier_run_hashes(cfg, identity)
    no_device = check_config(parse_config({**raw, "students": raw["students"][1:]}))
    assert run_hash(*old.values()) not in earlier_run_hashes(no_device, run_identity(no_device, "fingerprint", None,
                                                                                    dense=False))


def test_a_checkpoint_hashed_with_its_grad_accum_still_resumes_with_any():
    """Until 2026-12-05 `train.grad_accum` was part of the run hash; it does not shape the step
    (tests/test_data_parallel.py), so it is hashed as 1 now and a checkpoint made with any
    grad_accum that divides the batch resumes with any other."""
    from distill.config import check_config, parse_config
    from distill.stages import earlier_run_hashes, run_identity
    from distill.train.loop_config import run_hash

    def cfg(grad_accum):
        return check_config(parse_config({"data": {"stdlib": True}, "teacher": {"path": "/teacher"},
                                          "train": {"batch_size": 12, "grad_accum": grad_accum},
                                          "students": [{"name": "a", "model": {"preset": "dense"}}]}))

    identity = run_identity(cfg(4), "fingerprint", None, dense=False)
    assert identity == run_identity(cfg(1), "fingerprint", None, dense=False)  # today: one hash for every split
    made_then = {g: run_hash(*{**identity, "train.grad_accum": g}.values()) for g in (1, 2, 3, 4, 6, 12)}
    assert made_then[1] == run_hash(*identity.values())  # grad_accum 1's checkpoints kept their hash
    earlier = earlier_run_hashes(cfg(4), identity)
    assert set(earlier) == {made_then[g] for g in (2, 3, 4, 6, 12)}


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, model, monkeypatch):
    checkpoint.save(tmp_path, 1, model, {}, {"run_hash": "h"})
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(UserError, match="disk full"):
        checkpoint.save(tmp_path, 2, model, {}, {"run_hash": "h"})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp dir, old one intact
    assert checkpoint.latest(tmp_path).name == "step_00000001"


def test_disk_full_as_a_library_reports_it_is_one_line_and_keeps_the_previous(tmp_path, model, monkeypatch):
    """Disk full does not always come as an OSError: safetensors raises its own error type with
    the OS error's text, torch.save a RuntimeError naming no cause."""
    from safetensors import SafetensorError

    from common import fsutil

    checkpoint.save(tmp_path, 1, model, {}, {"run_hash": "h"})

    def safetensors_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", safetensors_full)
        with pytest.raises(UserError, match="step_00000002: disk full"):
            checkpoint.save(tmp_path, 2, model, {}, {"run_hash": "h"})
    with monkeypatch.context() as m:  # torch.save's error, on a disk with nothing left
        m.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos 576 vs 534")))
        m.setattr(fsutil.shutil, "disk_usage", lambda path: type("usage", (), {"free": 4096})())
        with pytest.raises(UserError, match="step_00000002: disk full"):
            checkpoint.save(tmp_path, 2, model, {}, {"run_hash": "h"})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp dir, old one intact
    with monkeypatch.context() as m:  # the same error on a disk with room is not called disk full
        m.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
        with pytest.raises(RuntimeError, match="something else"):
            checkpoint.save(tmp_path, 2, model, {}, {"run_hash": "h"})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    out = tmp_path / "export"
    export.save_hf_dir(model, None, out)
    before = sorted(p.name for p in out.iterdir())
    with monkeypatch.context() as m:
        m.setattr(type(model), "save_pretrained", safetensors_full)
        with pytest.raises(UserError, match="export: disk full"):
            export.save_hf_dir(model, None, out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_damaged_commit_marker_or_meta_is_one_line_naming_the_file(tmp_path, model):
    students = tmp_path / "students"
    root = students / "s" / "checkpoints"
    checkpoint.save(root, 2, model, {}, {"run_hash": "h"})
    checkpoint.commit(students, {"s": 2}, keep_last=2)
    (students / "committed.json").write_text("{garbage")
    with pytest.raises(UserError, match="committed.json: the run's commit marker is unreadable .*delete it"):
        checkpoint.latest(root)
    (students / "committed.json").unlink()
    (root / "step_00000002" / "meta.json").write_text("{")
    with pytest.raises(UserError, match=r"meta.json: checkpoint is unreadable \(JSONDecodeError\); delete this step"):
        checkpoint.load_meta(checkpoint.latest(root))


def test_an_export_never_replaces_its_own_checkpoint_or_a_run_even_with_overwrite(tmp_path, model):
    """An export replaces its --out whole: `--out OUT --overwrite` deleted the whole run (its
    data, cache and every checkpoint, the exported one too), `--out CKPT` the checkpoint."""
    run = tmp_path / "run"
    students = run / "students"
    ckpt = checkpoint.save(students / "s" / "checkpoints", 2, model, {}, {"run_hash": "h", "student": "s"})
    checkpoint.commit(students, {"s": 2}, keep_last=2)
    (run / "cache").mkdir()
    (run / "cache" / "manifest.json").write_text("{}")
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for out, held in ((run, "the checkpoint being exported"), (students, "the checkpoint being exported"),
                      (ckpt, "the checkpoint being exported"), (run / "cache", "a teacher cache or prepared data")):
        for overwrite in (False, True):
            with pytest.raises(UserError, match=f"--out {out} holds {held}.* choose another --out, e.g. "
                                                f"{students / 's' / 'export'}"):
                export.export_checkpoint(ckpt, out, overwrite=overwrite)
    other = tmp_path / "other-run"  # another run's out_dir: not the source, still a run
    checkpoint.save(other / "students" / "t" / "checkpoints", 1, model, {}, {"run_hash": "g", "student": "t"})
    with pytest.raises(UserError, match="holds a training run's students and checkpoints"):
        export.export_checkpoint(ckpt, other, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files
    export.check_export_target(tmp_path / "mine", {"student": "s"}, overwrite=True, source=ckpt)  # a new dir: fine
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    export.check_export_target(tmp_path / "mine", {"student": "s"}, overwrite=True, source=ckpt)  # someone's files


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


def _run_hash_of(raw: dict, selections: dict | None = None) -> str:
    from distill.config import check_config, parse_config
    from distill.stages import run_identity
    from distill.train.loop_config import run_hash
    identity = run_identity(check_config(parse_config(raw)), "fingerprint", selections, dense=False)
    return run_hash(*identity.values())


def test_the_run_hash_of_a_fixed_config_does_not_move():
    """--resume accepts a checkpoint only while its run hash is the same.  A config field added
    with a default (a student's, a loss's, an optimiser's) changes every earlier checkpoint's
    hash, so an upgrade would refuse to resume a user's run.  When this fails, keep the new
    field out of the hash at its default (see distill/stages.py::student_identity), don't
    update the pins."""
    base = {"data": {"stdlib": True}, "teacher": {"path": "/teacher"}, "train": {"mode": "cached", "steps": 60},
            "students": [{"name": "dense", "model": {"preset": "dense"}},
                         {"name": "scout", "model": {"preset": "scout"}, "loss": {"soft_weight": {
                             "kind": "linear", "start": 0.9, "end": 0.3, "warmup_steps": 5}}}]}
    assert _run_hash_of(base) == "89637bc7b0667bb2"  # the cache's default: 256 draws a token
    topk = {**base, "cache": {"estimator": "topk", "k": 32}, "train": {"mode": "online", "steps": 60,
                                                                        "on_policy": {"share": {"start": 0.5}}}}
    assert _run_hash_of(topk, {"dense": {"rule": "all", "digest": "d", "blocks": 3}}) == "7701ebcd07c51e56"
    # where a student runs is not part of its trajectory (the README: the device may change)
    on_cpu = {**base, "students": [{**base["students"][0], "device": "cpu"}, base["students"][1]]}
    assert _run_hash_of(on_cpu) == _run_hash_of(base)


def test_a_checkpoint_records_what_its_blocks_held_and_one_from_before_still_resumes(tmp_path, model):
    """`data_content` (distill/blocks.py content_digest) tells blocks prepared again under the
    same fingerprint apart; checkpoints made before it was recorded resume as before."""
    checkpoint.save(tmp_path / "old", 1, model, {"x": 1}, {"run_hash": "h"})
    assert checkpoint.load(tmp_path / "old" / "step_00000001", None, "h", data_content="abcd")["x"] == 1
    checkpoint.save(tmp_path / "new", 1, model, {"x": 1}, {"run_hash": "h", "data_content": "abcd"})
    assert checkpoint.load(tmp_path / "new" / "step_00000001", None, "h", data_content="abcd")["x"] == 1
    with pytest.raises(UserError, match="trained on other blocks of data with the same fingerprint"):
        checkpoint.load(tmp_path / "new" / "step_00000001", None, "h", data_content="efgh")
    # Data edited so its fingerprint moved too: that is said, not "the same fingerprint".
    then = {checkpoint.DATA_KEY: "f1", "seed": 0}
    checkpoint.save(tmp_path / "edited", 1, model, {}, {"run_hash": "h1", "data_content": "abcd", "run_identity": then})
    with pytest.raises(UserError, match=r"made from other data \(its fingerprint f1 -> f2"):
        checkpoint.load(tmp_path / "edited" / "step_00000001", None, "h2", {**then, checkpoint.DATA_KEY: "f2"}, data_content="efgh")


def test_a_pruned_step_is_renamed_before_its_files_go(tmp_path, model, monkeypatch):
    """A reader (`distill export` of a student's dir during the run) sees a step whole or gone:
    removed in place, its dir outlived its files, and the export failed naming a missing
    model.safetensors (1 time in 12 in a trial).  A kill mid-removal leaves nothing the next
    commit does not clear."""
    students = tmp_path / "students"
    root = students / "s" / "checkpoints"
    removed, real = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (removed.append(Path(p).name) if Path(p).parent == root
                                                           else None, real(p, **kw))[1])
    (root / ".pruned-step_00000000").mkdir(parents=True)  # an earlier kill's leftover
    for step in (1, 2, 3):
        checkpoint.save(root, step, model, {}, {"run_hash": "h", "student": "s"})
        checkpoint.commit(students, {"s": step}, keep_last=1)
    assert [d.name for d in checkpoint.step_dirs(root)] == ["step_00000003"]
    assert ".pruned-step_00000001" in removed and ".pruned-step_00000002" in removed
    assert not any(checkpoint.STEP_DIR.match(n) for n in removed), removed  # never a step dir in place
    assert not list(root.glob(".pruned-*"))


def test_an_export_during_training_reads_a_step_the_run_prunes_meanwhile(tmp_path, model, monkeypatch):
    """`distill export STUDENT` while the run commits newer steps and prunes older ones
    (train.keep_last): the step it was reading vanished and it failed 7 times in 8 with a
    traceback about a Hub repo id.  Given the student's dir it now reads the newer latest;
    given the vanished step itself, one line says what happened.  Weights holding NaN are
    refused, naming the earlier steps."""
    from tests.hf_models import make_tokenizer

    make_tokenizer(["def f(x): return x"], tmp_path / "tok", vocab_size=64)
    students = tmp_path / "run" / "students"
    root = students / "s" / "checkpoints"
    for step in (1, 2):
        checkpoint.save(root, step, model, {}, {"run_hash": "h", "student": "s"})
        checkpoint.commit(students, {"s": step}, keep_last=2)
    real = export.load_checkpoint_model
    pruned = []

    def the_run_moves_on(ckpt):  # as the run does between two reads: the next step committed, this one pruned
        if not pruned:
            step = checkpoint.step_of(ckpt) + 1
            checkpoint.save(root, step, model, {}, {"run_hash": "h", "student": "s"})
            checkpoint.commit(students, {"s": step}, keep_last=1)
            pruned.append(ckpt)
        return real(ckpt)

    monkeypatch.setattr(export, "load_checkpoint_model", the_run_moves_on)
    out = export.export_checkpoint(students / "s", tmp_path / "e", tokenizer_dir=tmp_path / "tok")
    assert pruned == [root / "step_00000002"] and not pruned[0].exists()
    assert json.loads((out / "distill_meta.json").read_text())["step"] == 3
    pruned.clear()
    with pytest.raises(UserError, match=r"step_00000003: removed while it was being read \(a run in progress pruned "
                                        r"it: train.keep_last\); export a newer step, or the student's dir"):
        export.export_checkpoint(root / "step_00000003", tmp_path / "e2", tokenizer_dir=tmp_path / "tok")
    assert not (tmp_path / "e2").exists()
    monkeypatch.setattr(export, "load_checkpoint_model", real)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] = float("nan")
    checkpoint.save(root, 5, model, {}, {"run_hash": "h", "student": "s"})
    checkpoint.commit(students, {"s": 5}, keep_last=2)
    from tests.conftest import run_cli  # as a user runs it

    r = run_cli("export", str(students / "s"), "--out", str(tmp_path / "e3"), "--tokenizer", str(tmp_path / "tok"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"step_00000005: its weights hold NaN or inf \(model.embed_tokens.weight: 1 of 2,048\).*export an "
                     r"earlier step \(the others here: step_00000004\)", r.stderr), r.stderr
    assert not (tmp_path / "e3").exists()


def test_an_fp16_export_of_weights_past_its_range_is_refused(tmp_path, model):
    """fp16 stops at 65,504: a weight past it became inf in the export, written silently (the
    report then said perplexity nan).  Refused, naming the tensor; bf16 keeps fp32's range."""
    from tests.conftest import run_cli
    from tests.hf_models import make_tokenizer

    make_tokenizer(["def f(x): return x"], tmp_path / "tok", vocab_size=64)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5
    checkpoint.save(tmp_path / "ckpt", 1, model, {}, {"run_hash": "h", "student": "s"})
    args = ("export", str(tmp_path / "ckpt" / "step_00000001"), "--tokenizer", str(tmp_path / "tok"))
    r = run_cli(*args, "--out", str(tmp_path / "fp16"), "--dtype", "fp16")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --dtype fp16: weights past fp16's range became inf (model.layers.0.mlp.down_proj.weight: 1); export "
        "with --dtype bf16 (fp32's range) or fp32 (export.dtype in a run's config)")
    assert not (tmp_path / "fp16").exists()
    r = run_cli(*args, "--out", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_model_card_names_the_teacher_as_its_readers_know_it():
    """Not the absolute path on the training machine: the served name, the Hub id of a Hugging
    Face cache snapshot, else the dir's own name."""
    served = {"teacher": "/runs/x/teacher", "teacher_identity": {"teacher_server_model": "behemoth-instruct"}}
    assert export.teacher_name(served) == "behemoth-instruct (served)"
    hub = {"teacher": "/home/u/.cache/huggingface/hub/models--meta-llama--Llama-4-Scout-17B-16E/snapshots/abc123"}
    assert export.teacher_name(hub) == "meta-llama/Llama-4-Scout-17B-16E"
    assert export.teacher_name({"teacher": "/data/models/my-teacher"}) == "my-teacher"
    assert export.teacher_name({}) == "?"
    card = export.model_card("s", {**hub, "student_config": {"model": {"path": "/data/models/qwen-0.5b"}}})
    assert "| teacher | meta-llama/Llama-4-Scout-17B-16E |" in card and "| architecture | pretrained qwen-0.5b |" in card
    assert "/data/" not in card and "/home/" not in card


def test_a_deepspeed_checkpoint_missing_a_ranks_files_is_named_not_miscounted(tmp_path):
    """A ZeRO checkpoint whose rank-1 files stayed on another node's disk was counted as written
    by 1 rank ("resuming on 2: converting"), the conversion failed, and its advice (resume on 1)
    failed too.  The count DeepSpeed records (dp_world_size) is checked: the missing rank named."""
    from common.errors import UserError
    from distill.train.engines import saved_ranks

    tag = tmp_path / "step_00000028"
    tag.mkdir()
    torch.save({"dp_world_size": 2, "module": {"w": torch.zeros(3)}}, tag / "mp_rank_00_model_states.pt")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"written by 2 rank\(s\), but the optimizer states of rank\(s\) 1 are not there"):
        saved_ranks(tag)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_ranks(tag) == 2


def test_a_write_stopped_or_killed_leaves_no_temp_dir_behind(tmp_path, monkeypatch):
    """Ctrl-C during `distill export` left `.OUT.tmpPID/` with part of the export, and a kill -9
    one that no later export removed (its name has the pid).  Now a Ctrl-C removes it, and the
    next write of the same dir removes those of processes that are gone (a live one's stays)."""
    import socket
    import subprocess
    import sys

    from common.fsutil import staged_dir

    final = tmp_path / "export"
    final.mkdir()
    (final / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final) as tmp:
            (tmp / "config.json").write_text("{partial")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (final / "config.json").read_text() == "{}"

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead, live = (tmp_path / f".export.tmp-{host}-{int(gone.stdout)}", tmp_path / f".export.tmp-{host}-{os.getppid()}")
    dead_old = tmp_path / f".export.old-{host}-{int(gone.stdout)}"  # killed as it removed the export it replaced
    for left in (dead, live, dead_old):
        left.mkdir()
        (left / "model.safetensors").write_bytes(b"x" * 100)
    with staged_dir(final) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
    assert (final / "config.json").read_text() == '{"new": 1}'

    # Ctrl-C between the two renames (the old export moved aside, the new one not yet in place):
    # the old one is put back, not left as a hidden dir with no export beside it
    renames = []

    def stopped_at_the_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final) as tmp:
            (tmp / "config.json").write_text('{"newer": 1}')
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(renames) == 3 and renames[-1] == final  # moved aside, stopped, put back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])
    assert (final / "config.json").read_text() == '{"new": 1}'


def test_verify_names_every_flipped_byte_of_a_state_file_without_a_traceback(tmp_path):
    """`checkpoint_problems` (inspect --verify) checks torch files by their zip CRCs; a flip in the
    zip's own directory raised EOFError, NotImplementedError or UnicodeDecodeError through it
    (56 of 1,755 single-byte flips of one small state.pt)."""
    from safetensors.torch import save_file

    from distill.train.checkpoint import checkpoint_problems

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"step": 1}')
    (ckpt / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(ckpt / "model.safetensors"))
    torch.save({"step": 1, "exp_avg": torch.arange(64.0)}, ckpt / "state.pt")
    assert checkpoint_problems(ckpt) == []
    clean = (ckpt / "state.pt").read_bytes()
    with zipfile.ZipFile(ckpt / "state.pt") as archive:  # where each member's bytes (pickle, tensors) lie
        members = []
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", clean[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            members.append(range(start, start + info.compress_size))
    missed = []
    for at in range(len(clean)):
        flipped = bytearray(clean)
        flipped[at] ^= 0x55
        (ckpt / "state.pt").write_bytes(bytes(flipped))
        if not checkpoint_problems(ckpt) and any(at in m for m in members):  # never raises
            missed.append(at)
    assert missed == [] and sum(len(m) for m in members) > 256
