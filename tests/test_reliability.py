"""Faults and bad input over the real CLI: one clear line, exit 2, nothing lost; exact resume."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def final_weights(out_dir):
    ckpts = sorted((out_dir / "students" / "dense" / "checkpoints").glob("step_*"))
    return ckpts[-1].name, load_file(str(ckpts[-1] / "model.safetensors"))


def start_train(cfg, out_dir, *extra):
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet",
           "--set", f"out_dir={out_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def wait_for_step(out_dir, step, proc, timeout=300):
    path = out_dir / "students" / "dense" / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and sum(1 for l in path.read_text().splitlines() if '"train"' in l) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def test_kill9_then_resume_equals_uninterrupted(online_setup):
    work, cfg = online_setup
    sets = ["--set", "train.steps=8", "--set", "train.checkpoint_every=2"]
    full = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'full'}", *sets)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = start_train(cfg, work / "killed", *sets)
    wait_for_step(work / "killed", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={work / 'killed'}", *sets)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    name_a, a = final_weights(work / "full")
    name_b, b = final_weights(work / "killed")
    assert name_a == name_b == "step_00000008"
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    # metrics were truncated back to the resumed step: one line per step, no duplicates
    rows = [json.loads(l) for l in (work / "killed" / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))


def test_sigterm_checkpoints_then_exits(online_setup):
    work, cfg = online_setup
    proc = start_train(cfg, work / "term", "--set", "train.steps=500", "--set", "train.checkpoint_every=0")
    wait_for_step(work / "term", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]  # a stop asked for: no "error:", and the way to go on with `train`
    assert re.fullmatch(r"stopped by signal 15 after step \d+ of 500; checkpoints saved under .*; rerun it with "
                        r"--resume to continue", line), err
    assert "Traceback" not in err
    assert list((work / "term" / "students" / "dense" / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("steps,eval_every", [(4, 2), (2, 0)])
def test_ctrl_c_during_a_validation_stops_it_at_the_next_batch(online_setup, tmp_path, monkeypatch, steps, eval_every):
    """A Ctrl-C during a validation was honoured only once every student was scored (277 s on a
    2,000-block held-out split), and during the final validation not at all: the run exited 0
    and `distill run` went on to export and eval.  Now validation asks after each batch: the
    run checkpoints the step and stops (exit 130), the cut validation not logged, and the
    resumed run ends as one never stopped."""
    from distill.config import load_config
    from distill.stages import train_students
    from distill.train import loop as loop_module
    from distill.train.loop import TrainingInterrupted

    scored = []  # batches scored per validation

    def evaluate(*args, bar=None, **kw):
        scored.append(0)

        class Signalled:  # Ctrl-C as the first batch is scored
            def update(self, n):
                scored[-1] += 1
                bar.update(n)
                os.kill(os.getpid(), signal.SIGINT)

        return real(*args, bar=Signalled(), **kw)

    real = loop_module.evaluate_model
    sets = {"train.steps": steps, "train.eval_every": eval_every, "train.eval_blocks": 24, "train.checkpoint_every": 0}
    cfg = load_config(online_setup[1], {**sets, "out_dir": str(tmp_path / "stopped")})
    monkeypatch.setattr(loop_module, "evaluate_model", evaluate)
    monkeypatch.setattr(sys, "argv", ["distill", "train"])  # the command the hint names
    with pytest.raises(TrainingInterrupted, match=rf"stopped by signal 2 after step 2 of {steps} \(its validation "
                                                   rf"cut short\); checkpoints saved under .*; rerun it with --resume"):
        train_students(cfg, progress=False)
    assert scored == [1]  # of 3 batches (24 blocks, 8 a batch)
    students = tmp_path / "stopped" / "students"
    assert json.loads((students / "committed.json").read_text()) == {"students": {"dense": 2}}
    rows = [json.loads(line) for line in (students / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == []

    monkeypatch.setattr(loop_module, "evaluate_model", real)
    result = train_students(cfg, resume=True, progress=False)
    assert result["start_step"] == 2
    full = train_students(load_config(online_setup[1], {**sets, "out_dir": str(tmp_path / "full")}), progress=False)
    assert result["students"] == full["students"]  # the final validation's figures (steps 2: validated on resume)
    # and the validation the signal cut, at step 2, was done when the run resumed there: the same rows
    val_rows = [[{k: v for k, v in json.loads(line).items()} for line in
                 (d / "students" / "dense" / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in line]
                for d in (tmp_path / "stopped", tmp_path / "full")]
    assert val_rows[0] == val_rows[1] and [r["step"] for r in val_rows[0]] == list(range(2, steps + 1, 2))
    a, b = (load_file(str(d / "students" / "dense" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
            for d in (tmp_path / "stopped", tmp_path / "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A rerun of the finished run keeps them in train_summary.json (it rewrote them as {}), not validating again
    scored.clear()
    monkeypatch.setattr(loop_module, "evaluate_model", evaluate)
    again = train_students(cfg, resume=True, progress=False)
    summary = json.loads((tmp_path / "stopped" / "train_summary.json").read_text())
    assert scored == [] and again["students"] == summary["students"] == full["students"]


def test_a_signal_during_the_final_checkpoint_ends_the_run_as_stopped(online_setup, tmp_path, monkeypatch):
    """A Ctrl-C as the last step's checkpoint was written was read by no one: `distill run`
    went on to export and eval, exit 0."""
    from distill.config import load_config
    from distill.stages import train_students
    from distill.train import loop as loop_module
    from distill.train.loop import TrainingInterrupted

    saves = loop_module.save_all

    def save_and_signal(layout, students, step, loop):
        saves(layout, students, step, loop)
        if step == loop.steps:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop_module, "save_all", save_and_signal)
    cfg = load_config(online_setup[1], {"train.steps": 2, "out_dir": str(tmp_path / "run")})
    with pytest.raises(TrainingInterrupted, match=r"stopped by signal 2 after step 2 of 2; checkpoints saved"):
        train_students(cfg, progress=False)
    monkeypatch.setattr(loop_module, "save_all", saves)
    assert train_students(cfg, resume=True, progress=False)["students"]["dense"]["val_ppl"] > 1


def test_a_validation_shows_its_progress_in_the_training_bar(online_setup, tmp_path, monkeypatch, capsys):
    """A validation said nothing while it ran (35 minutes for 5 students on 1,955 blocks): now
    the training bar's text counts each student's blocks; in a log, in its plain lines."""
    from common import progress
    from distill.config import load_config
    from distill.stages import train_students

    monkeypatch.setattr(progress, "PLAIN_PROGRESS_SECONDS", 0.0)  # a line every update
    sets = {"train.steps": 2, "train.eval_every": 1, "train.eval_blocks": 24, "out_dir": str(tmp_path / "run")}
    train_students(load_config(online_setup[1], sets), progress=True)
    lines = capsys.readouterr().out.splitlines()
    seen = [line.split("  ")[-1] for line in lines if "validating" in line]
    assert seen == [f"validating dense: {n}/24 blocks" for n in (8, 16, 24)] * 2, lines
    assert any(line.startswith("co-distilling 2/2 (100%)") and line.endswith("validating dense: 24/24 blocks")
               for line in lines), lines


def test_sigterm_during_the_cache_stops_as_ctrl_c_and_the_rerun_keeps_its_shards(online_setup):
    """SIGTERM outside training (a scheduler's preemption of `distill cache`) killed the process
    (-15, no word); now it says what Ctrl-C says, exit 130, and the rerun keeps the finished shards."""
    work, cfg = online_setup
    out = work / "term-cache"
    sets = ["--set", f"out_dir={out}", "--set", "train.mode=cached", "--set", "cache.shard_sequences=16"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "cache", "-c", str(cfg), "--quiet", *sets],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list((out / "cache").glob("train-*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 300, "no shard in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "interrupted: what was written is kept; rerun the same command to resume", err
    assert "Traceback" not in err
    rerun = run_cli("cache", "-c", str(cfg), *sets)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    kept = [l for l in rerun.stderr.splitlines() if "shard(s) kept from an earlier run" in l]
    assert kept and not kept[0].startswith("[cache] rank 0: 0 of"), rerun.stderr[-2000:]
    # the teacher pass's progress, in a log a plain line (here only the end's: it takes seconds)
    # counting the sequences this run computes, not the kept ones
    done = re.findall(r"^cache ([\d,]+)/([\d,]+) \(100%\)", rerun.stdout, re.M)
    total = sum(s["sequences"] for s in json.loads((out / "cache" / "manifest.json").read_text())["splits"].values())
    assert len(done) == 1 and done[0][0] == done[0][1] and int(done[0][0].replace(",", "")) < total, rerun.stdout
    # before it, the earlier shards' bytes are read (a sha256 each) under their own progress
    checked = re.findall(r"^cache: checking earlier shards (\d+)/(\d+) \(100%\)", rerun.stdout, re.M)
    assert len(checked) == 1 and checked[0][0] == checked[0][1] and int(checked[0][0]) >= 1, rerun.stdout


def test_ctrl_c_and_sigterm_while_workers_tokenise(hf_family, tmp_path):
    """`distill prepare` stopped while datasets' worker pool tokenises, the signal sent to the
    whole process group as a terminal's Ctrl-C and a scheduler's SIGTERM send it.  Ctrl-C gave
    datasets' TimeoutError traceback (and each worker's), exit 1; unwinding through the pool
    could also wait forever (for a queue lock a killed worker held; at exit, for a thread
    forking a replacement worker).  Now either signal ends it at once with the interrupted
    line, 130, and the rerun finishes."""
    import random
    import sysconfig
    from pathlib import Path

    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]]
    rng = random.Random(0)
    corpus = tmp_path / "big.jsonl"
    with corpus.open("w") as f:  # about 24 MB: seconds of tokenising in 2 workers
        for _ in range(2400):
            f.write(json.dumps({"text": rng.choice(texts)[:10_000]}) + "\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"),
        "data": {"paths": [str(corpus)], "seq_len": 64, "num_proc": 2, "shard_documents": 400,
                 "tokenizer": {"path": str(hf_family["teacher"])}},
        "teacher": {"source": "checkpoint", "path": str(hf_family["teacher"])},
        "students": [{"name": "s", "model": {"preset": "dense"}}]}))

    def stopped_in_the_pool(sig):
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "prepare", "-c", str(cfg), "--quiet"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        t0 = time.time()
        while not list((tmp_path / "out" / "data").glob("blocks-*/.work/*.arrow")):  # the pool's first output
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 300, "no tokenising in time"
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(proc.pid, sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running 60 s after {sig!r}")
        deadline = time.time() + 10  # and no worker is left behind in its process group
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"processes of the stopped prepare still run 10 s after {sig!r}")
        return proc.returncode, err

    code, err = stopped_in_the_pool(signal.SIGINT)
    assert code == 130 and "Traceback" not in err, (code, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("interrupted: what was written is kept"), err[-2000:]
    code, err = stopped_in_the_pool(signal.SIGTERM)
    assert code == 130 and "Traceback" not in err, (code, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("interrupted: what was written is kept"), err[-2000:]
    done = run_cli("prepare", "-c", str(cfg), "--quiet", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("command", ["train", "cache", "run"])
def test_a_cache_of_other_data_is_refused_before_the_new_data_is_prepared(online_setup, command, tmp_path):
    """The corpus (or a data setting) changed after the cache was made: the refusal came only
    after the new data was prepared in full (15 minutes at 1.5 GB, the old blocks kept beside
    the new).  Now it comes first, and nothing is prepared."""
    work, cfg = online_setup
    out = tmp_path / "out"
    sets = ["--set", f"out_dir={out}", "--set", "train.mode=cached"]
    made = run_cli("cache", "-c", str(cfg), "--quiet", *sets)
    assert made.returncode == 0, made.stderr[-2000:]
    before = sorted(d.name for d in (out / "data").glob("blocks-*"))
    line = one_line(run_cli(command, "-c", str(cfg), "--quiet", *sets, "--set", "data.seq_len=24"))
    assert line.startswith(f"error: cache at {out / 'cache'} was made from other data (fingerprint "), line
    assert "said before the new data is prepared" in line and "`distill cache --overwrite`" in line, line
    assert sorted(d.name for d in (out / "data").glob("blocks-*")) == before  # nothing prepared


def test_resume_with_other_config_refused(online_setup):
    work, cfg = online_setup
    out = work / "other"
    first = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}")
    assert first.returncode == 0
    # online_dense: auto (the default) hands over the whole distribution here, and says so once
    assert first.stdout.count("[train] teacher signal: the whole distribution (train.online_dense: auto;") == 1
    assert "[train] note:" not in first.stdout, first.stdout
    # where a student runs, how often it is checkpointed and how a step is split are not its trajectory
    again = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}",
                    "--set", "students.0.device=cpu", "--set", "train.checkpoint_every=3", "--set", "train.grad_accum=2")
    assert again.returncode == 0, again.stderr[-2000:]
    # resuming a finished run says so (before: nothing at all, exit 0)
    assert "[train] the run is finished: every student is at step 4 of 4; nothing to train" in again.stderr
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}",
                            "--set", "students.0.optim.lr=0.1"))
    assert "this checkpoint was made by another config (student dense: optim);" in line, line
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}",
                            "--set", "train.online_dense=false"))  # the top-16: another loss
    assert "made by another config (the teacher signal);" in line, line
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}",
                            "--set", "train.steps=7"))  # the LR schedule's length: another trajectory
    assert "made by another config (train.steps 4 -> 7);" in line and "--overwrite" in line, line
    assert line.endswith("to train these students further, `distill export` them and start a new run (another "
                         "out_dir) with students.N.model.path set to each export"), line
    topk = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'other-topk'}",
                   "--set", "train.online_dense=false", "--set", "train.steps=1", "--set", "students.0.optim.warmup_steps=2")
    assert topk.returncode == 0
    # a random-init student on the top-16: the run says what it may cost, once, and how to avoid it
    assert topk.stdout.count("[train] note: dense start from random init") == 1, topk.stdout
    assert ("train.online_dense: true, cache.estimator: sampled with cache.samples: 256 (1.00-1.02x "
            "the full distribution's there), or cache.k: 512") in topk.stdout
    assert "[train] teacher signal:" not in topk.stdout  # chosen, not picked
    # one step, with an LR warmup of two: the LR never reaches its peak, said once
    assert topk.stdout.count("[train] note: training ends after 1 step (schedule steps 0-0), before "
                             "students.0.optim.warmup_steps 2: those curves (or the LR) never reach their end") == 1
    assert "training ends after" not in first.stdout  # 4 steps: every schedule ends in them


def test_resume_with_another_teacher_refused(online_setup):
    """The teacher is not in the run hash (a copy of it elsewhere resumes), but a checkpoint
    records which one the students learnt from: another one, online or through a cache made
    again from it, is refused on --resume, naming what changed."""
    from students.build import load_causal_lm

    work, cfg = online_setup
    teacher = yaml.safe_load(cfg.read_text())["teacher"]["path"]
    copy = shutil.copytree(teacher, work / "teacher-copy")
    other = load_causal_lm(copy)
    for p in other.parameters():  # the same architecture, config and tokenizer; other weights
        p.data.mul_(1.5)
    shutil.copytree(teacher, work / "teacher-other")
    other.save_pretrained(work / "teacher-other")
    for mode in ("online", "cached"):
        out = work / f"teacher-{mode}"
        sets = ["--quiet", "--set", f"out_dir={out}", "--set", f"train.mode={mode}"]
        if mode == "cached":
            assert run_cli("cache", "-c", str(cfg), *sets).returncode == 0
        first = run_cli("train", "-c", str(cfg), *sets)
        assert first.returncode == 0, first.stderr[-2000:]
        moved = run_cli("train", "-c", str(cfg), "--resume", *sets, "--set", f"teacher.path={copy}")
        assert moved.returncode == 0, moved.stderr[-2000:]
        if mode == "cached":  # the cache made again from the other teacher
            again = run_cli("cache", "-c", str(cfg), *sets, "--overwrite", "--set", f"teacher.path={work / 'teacher-other'}")
            assert again.returncode == 0, again.stderr[-2000:]
        line = one_line(run_cli("train", "-c", str(cfg), "--resume", *sets,
                                "--set", f"teacher.path={work / 'teacher-other'}"))
        assert "the students learnt from another teacher until this checkpoint (teacher_weights_hash " in line, line
        assert "resume with that teacher (and its cache), or start afresh in this out_dir with --overwrite" in line, line


def test_epochs_count_the_steps_from_the_prepared_blocks(online_setup):
    """train.epochs 0.1: ceil(0.1 x training blocks / batch_size) steps, said once; a resume
    counts the same steps (the same run), and train.steps is not used."""
    work, cfg = online_setup
    out = work / "epochs"
    first = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", "train.epochs=0.1",
                    "--set", "train.steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads(next((out / "data").glob("blocks-*/manifest.json")).read_text())
    blocks = manifest["splits"]["train"]["blocks"]
    steps = math.ceil(0.1 * blocks / 4)  # online_setup: batch_size 4
    assert 4 < steps < 20
    assert first.stdout.count(f"[train] train.epochs 0.1: {steps} steps of 4 blocks over {blocks:,} training blocks") == 1
    rows = [json.loads(l) for l in (out / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))
    again = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}",
                    "--set", "train.epochs=0.1", "--set", "train.steps=1")
    assert again.returncode == 0 and "this checkpoint was made by" not in again.stderr, again.stderr[-2000:]
    assert f"[train] train.epochs 0.1: {steps} steps" in again.stdout  # counted the same, said again
    rows = [json.loads(l) for l in (out / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))  # nothing more to train


def test_online_dense_true_with_a_server_teacher_refused(online_setup):
    """A server returns the teacher's top-k only: asking for its whole distribution is one
    line at config check, exit 2, before any work (no out_dir made)."""
    work, cfg = online_setup
    out = work / "dense-server"
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}",
                            "--set", "teacher.source=server", "--set", "teacher.server={url: 'http://127.0.0.1:9', model: m}",
                            "--set", "train.online_dense=true"))
    assert "train.online_dense: true" in line and "a server teacher returns its top-k only" in line, line
    assert not out.exists()


def test_k_larger_than_vocab_refused(online_setup):
    work, cfg = online_setup
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={work / 'k'}",
                            "--set", "cache.k=100000"))
    assert "cache.k=100000" in line


def test_tokenizer_dir_missing_files(online_setup, tmp_path):
    work, cfg = online_setup
    (tmp_path / "tok").mkdir()
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'o'}",
                            "--set", f"data.tokenizer.path={tmp_path / 'tok'}"))
    assert "tokenizer" in line and str(tmp_path / "tok") in line


def test_corrupt_teacher_weights_named(online_setup, tmp_path):
    import shutil

    work, cfg = online_setup
    bad = tmp_path / "teacher"
    shutil.copytree(work / "teacher", bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'o'}",
                            "--set", f"teacher.path={bad}"))
    assert weights.name in line


def test_teacher_with_no_weights(online_setup, tmp_path):
    import shutil

    work, cfg = online_setup
    bad = tmp_path / "teacher"
    shutil.copytree(work / "teacher", bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'o'}",
                            "--set", f"teacher.path={bad}"))
    assert "weights" in line.lower()



def test_cache_from_other_k_refused_by_cli(online_setup):
    work, cfg = online_setup
    out = work / "cache-k"
    first = run_cli("cache", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", "train.mode=cached")
    assert first.returncode == 0, first.stderr[-2000:]
    # --quiet drops progress bars, not log lines: which signal `auto` chose is said (it was not)
    assert "[cache] teacher signal: 32 draws per token (cache.estimator: auto;" in first.stderr, first.stderr
    shards = {p: p.read_bytes() for p in (out / "cache").glob("*.safetensors")}
    line = one_line(run_cli("cache", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", "cache.k=8"))
    assert "overwrite" in line
    assert {p: p.read_bytes() for p in (out / "cache").glob("*.safetensors")} == shards  # nothing deleted


class _Payload:
    """Unpickling this runs a shell command: what a hostile state.pt would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_in_state_is_refused(online_setup, tmp_path):
    import torch

    work, cfg = online_setup
    out = tmp_path / "o"
    sets = ["--set", f"out_dir={out}", "--set", "train.checkpoint_every=2"]
    assert run_cli("train", "-c", str(cfg), "--quiet", *sets).returncode == 0
    ckpts = sorted((out / "students" / "dense" / "checkpoints").glob("step_*"))
    marker = tmp_path / "pwned"
    torch.save({"engine": _Payload(marker)}, ckpts[-1] / "state.pt")
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", *sets))
    assert "state.pt" in line and "refused" in line, line
    assert not marker.exists()  # the payload never ran


def test_diverging_student_stops_the_run_with_exit_3_then_resume_goes_on_without_it(online_setup, tmp_path):
    """Exit 3 over the real CLI (on_student_failure: stop); the healthy student is checkpointed
    first, and --resume finishes it while the failed one stays dropped."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    work, base = online_setup
    raw = yaml.safe_load(base.read_text())
    raw["students"].append({**raw["students"][0], "name": "bad"})
    raw.update(out_dir=str(tmp_path / "o"))
    raw["train"].update(checkpoint_every=2, keep_last=5)
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert run_cli("train", "-c", str(cfg), "--quiet").returncode == 0
    students = tmp_path / "o" / "students"
    for name in ("dense", "bad"):  # as if killed after step 2
        shutil.rmtree(students / name / "checkpoints" / "step_00000004")
    weights = students / "bad" / "checkpoints" / "step_00000002" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["lm_head.weight"][0, 0] = float("nan")  # every later loss of `bad` is NaN
    save_file(tensors, str(weights), metadata={"format": "pt"})

    r = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", "train.max_nonfinite=0")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "student bad failed at step 3" in r.stderr
    assert (students / "dense" / "checkpoints" / "step_00000003").exists()  # the healthy one, first
    assert json.loads((students / "bad" / "failed.json").read_text())["step"] == 2

    r = run_cli("train", "-c", str(cfg), "--quiet", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (students / "dense" / "checkpoints" / "step_00000004").exists()
    assert not (students / "bad" / "checkpoints" / "step_00000004").exists()
    summary = json.loads((tmp_path / "o" / "train_summary.json").read_text())
    assert "non-finite" in summary["failed"]["bad"]["reason"]


def test_a_fresh_run_into_a_used_out_dir_is_refused_and_overwrite_moves_the_old_run_aside(online_setup, tmp_path):
    """One run per out_dir: a run of 6 steps, then a fresh one of 3 into the same dir.  Without
    --resume or --overwrite it is refused before any work (the old run intact); with
    --overwrite the old run moves aside whole, and export and metrics are the new run's."""
    work, cfg = online_setup
    out = tmp_path / "o"
    sets = ["--set", f"out_dir={out}", "--set", "train.checkpoint_every=2"]
    assert run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "train.steps=6").returncode == 0
    ckpts = out / "students" / "dense" / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "train.steps=3"))
    assert "earlier run (dense at step 6)" in line and "--resume" in line and "--overwrite" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == before
    line = one_line(run_cli("run", "-c", str(cfg), "--quiet", "--no-resume", *sets, "--set", "train.steps=3"))
    assert "--overwrite" in line, line
    # A fresh run whose student has another name would mix with it just as much.
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "students.0.name=renamed"))
    assert "earlier run (dense at step 6)" in line, line
    assert sorted(p.name for p in (out / "students").iterdir()) == ["committed.json", "dense"]

    r = run_cli("train", "-c", str(cfg), "--quiet", "--overwrite", *sets, "--set", "train.steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"moved the earlier run (dense at step 6) to {aside[0]}" in r.stderr
    assert (aside[0] / "students" / "dense" / "checkpoints" / "step_00000006").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]
    rows = [json.loads(l) for l in (out / "students" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    # what data the new run's student sees is the new run's, not moved aside with the old run
    assert json.loads((out / "students" / "dense" / "data.json").read_text())["student"] == "dense"
    r = run_cli("export", str(out / "students" / "dense"), "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr[-2000:]
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    trained = load_file(str(ckpts / "step_00000003" / "model.safetensors"))
    assert all((exported[k] == trained[k]).all() for k in exported)
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--overwrite", *sets))
    assert "give one of them" in line, line


def test_a_second_training_run_into_an_out_dir_being_trained_is_refused(online_setup, tmp_path):
    """Two `distill train` at once into one out_dir interleaved their metrics and overwrote each
    other's checkpoints; the second is now refused while the first holds OUT/.train.lock, and
    runs once it is let go (the kernel drops it when its holder dies, kill -9 too)."""
    import os

    from common.fsutil import exclusive_lock

    work, cfg = online_setup
    out = tmp_path / "o"
    sets = ["--set", f"out_dir={out}", "--set", "train.steps=2"]
    with exclusive_lock(out / ".train.lock", "held by this test"):  # a run in progress
        line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets))
        assert f"{out} is being trained into by another run (pid {os.getpid()} holds {out / '.train.lock'})" in line
        assert not (out / "students").exists()
        line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", *sets))
        assert "being trained into by another run" in line
    r = run_cli("train", "-c", str(cfg), "--quiet", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    # `inspect OUT` names the teacher the run's checkpoints record, a checkpoint dir outside OUT here
    shown = run_cli("inspect", str(out), env={"COLUMNS": "300"})
    assert shown.returncode == 0 and f"model {work / 'teacher'}" in shown.stdout, shown.stdout + shown.stderr


def test_a_second_preparation_in_an_out_dir_waits_for_the_first(online_setup, tmp_path):
    """Two commands preparing one out_dir's data at once (`distill cache` and `train` started
    together): the second removed the first's table copies, crashing it with datasets' traceback
    (seen 1 in 3 tries).  Now the second waits for OUT/data/.prepare.lock, says so, then reuses
    the blocks the first prepared."""
    from common.fsutil import exclusive_lock

    work, cfg = online_setup
    out = tmp_path / "o"
    args = [sys.executable, str(ROOT / "cli.py"), "prepare", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}"]
    with exclusive_lock(out / "data" / ".prepare.lock", "held by this test"):  # a preparation in progress
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            said = ""
            deadline = time.time() + 120
            while "waiting for pid" not in said and time.time() < deadline and proc.poll() is None:
                said += proc.stderr.readline()
            assert f"[data] waiting for pid {os.getpid()}, which is preparing data in {out / 'data'}" in said, said
            time.sleep(1)
            assert proc.poll() is None and not list((out / "data").glob("blocks-*"))  # it waits, touching nothing
        except BaseException:
            proc.kill()
            raise
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert len(list((out / "data").glob("blocks-*/manifest.json"))) == 1


def test_a_damaged_cache_manifest_is_named_at_train(online_setup, tmp_path):
    """It read as `cache at X holds a None signal but cache.estimator is topk; set
    cache.estimator: None`, advice that cannot work."""
    work, cfg = online_setup
    out = tmp_path / "o"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "manifest.json").write_text("{")
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", "train.mode=cached"))
    assert f"{out / 'cache' / 'manifest.json'} is not valid JSON" in line and "--overwrite" in line, line
    assert "None" not in line, line


def test_kill9_between_two_students_checkpoints_resumes_from_the_committed_step(online_setup, tmp_path):
    """Three students, keep_last 1: killed (SIGKILL) after the second student's step-4
    checkpoint was published, before the third's.  Step 4 is not committed, step 2 was not
    pruned, and --resume gives every student the weights of an uninterrupted run."""
    import yaml

    work, base = online_setup
    raw = yaml.safe_load(base.read_text())
    raw["students"] = [{**raw["students"][0], "name": name} for name in ("a", "b", "c")]
    raw["train"].update(steps=6, checkpoint_every=2, keep_last=1)
    cfg = tmp_path / "three.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    full = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    r = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={killed}",
                env={"DISTILL_TEST_KILL_AFTER_CHECKPOINTS": "5"})  # step 2: a, b, c; step 4: a, b, then dead
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    students = killed / "students"
    assert sorted(p.name for p in (students / "b" / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert [p.name for p in (students / "c" / "checkpoints").glob("step_*")] == ["step_00000002"]
    r = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={killed}")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("a", "b", "c"):
        ckpts = sorted((students / name / "checkpoints").glob("step_*"))
        assert [p.name for p in ckpts] == ["step_00000006"], name
        a = load_file(str(ckpts[-1] / "model.safetensors"))
        b = load_file(str(tmp_path / "full" / "students" / name / "checkpoints" / "step_00000006" / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in a), name


def test_deepspeed_stage_0_is_refused_at_config_check(online_setup, tmp_path):
    """DeepSpeed at stage 0 gives no grad norm with a plain optimiser: every step would read as
    non-finite (and a real NaN would be applied).  Refused before any work, from the config
    key or from a ds_config JSON."""
    work, cfg = online_setup
    sets = ["--set", f"out_dir={tmp_path / 'o'}", "--set", "train.engine=deepspeed"]
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "train.zero_stage=0"))
    assert "train.zero_stage: 0 is refused" in line and "engine: torch" in line, line
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", f"train.deepspeed_config={ds}"))
    assert f"{ds}: zero_optimization.stage 0 is refused" in line, line
    assert not (tmp_path / "o").exists()


def test_a_cache_of_another_k_is_refused_and_k_is_part_of_the_run(online_setup, tmp_path):
    """`distill train` checks the cache's k and encoding against the config (naming both), and
    they are part of the run's identity: a resume after re-caching with another k is refused."""
    work, cfg = online_setup
    sets = ["--set", f"out_dir={tmp_path / 'o'}", "--set", "train.mode=cached", "--set", "train.steps=2",
            "--set", "cache.estimator=topk"]  # a top-k cache: its k and encoding
    assert run_cli("cache", "-c", str(cfg), "--quiet", *sets).returncode == 0  # k 16
    # the default (cache.estimator: auto) would draw here: a top-k cache already made is named, not redone
    auto = sets[:-2]
    line = one_line(run_cli("cache", "-c", str(cfg), "--quiet", *auto))
    assert line.endswith("holds a topk signal but cache.estimator: auto chose sampled; set cache.estimator: topk "
                         "to use it, or pass --overwrite to redo the teacher pass"), line
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *auto))
    assert line.endswith("holds a topk signal but cache.estimator is sampled (chosen by cache.estimator: auto); "
                         "set cache.estimator: topk, or rerun `distill cache --overwrite`"), line
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "cache.k=8"))
    assert "has k 16 but cache.k is 8" in line, line
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", *sets, "--set", "cache.encoding=compact"))
    assert "has encoding lossless but cache.encoding is compact" in line, line
    assert run_cli("train", "-c", str(cfg), "--quiet", *sets).returncode == 0
    # --overwrite moves the earlier run aside only once the cache checks out: refused, it stays
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--overwrite", *sets, "--set", "cache.k=8"))
    assert "has k 16 but cache.k is 8" in line, line
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith("replaced-")]
    assert (tmp_path / "o" / "students" / "dense" / "checkpoints" / "step_00000002").exists()
    assert run_cli("cache", "-c", str(cfg), "--quiet", "--overwrite", *sets, "--set", "cache.k=8").returncode == 0
    line = one_line(run_cli("train", "-c", str(cfg), "--quiet", "--resume", *sets, "--set", "cache.k=8",
                            "--set", "train.steps=3"))
    assert "another config (train.steps 2 -> 3; the teacher signal)" in line, line


def test_data_prepared_again_that_came_out_different_is_not_taken_for_the_old(online_setup, tmp_path):
    """The fingerprint samples a large file (16 windows of 64 KiB), so an edit that keeps its size
    and misses every window keeps the fingerprint; the README says to delete OUT/data then.  The
    blocks prepared again differ, but a cache and checkpoints of the old ones matched them by
    fingerprint and were used as theirs.  They now record what the blocks hold too."""
    from distill.data import SAMPLE_BYTES, SAMPLE_WINDOWS, file_digest

    work, cfg = online_setup
    rows = [{"text": f"def f{i}(x):\n    return x + {i}  # row {i}\n" * 6, "pad": "z" * 40_000} for i in range(64)]
    corpus = tmp_path / "big.jsonl"  # 2.6 MB, its text small: the `pad` column is not read
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = corpus.read_bytes()
    last = len(raw) - SAMPLE_BYTES
    seen = [(i * last // (SAMPLE_WINDOWS - 1), i * last // (SAMPLE_WINDOWS - 1) + SAMPLE_BYTES)
            for i in range(SAMPLE_WINDOWS)]
    at = next(raw.index(b"return x + ", start) for start in range(0, len(raw), 1000)
              if not any(a - 200 <= raw.index(b"return x + ", start) < b for a, b in seen))
    edited = raw[:at] + b"return x - " + raw[at + len(b"return x - "):]  # the same size, outside every window
    assert len(edited) == len(raw) and edited != raw
    before = file_digest(corpus)
    sets = ["--set", f"data.paths=['{corpus}']", "--set", "data.max_train_blocks=null", "--set", "train.steps=2",
            "--set", "train.checkpoint_every=1"]

    online, cached = tmp_path / "online", tmp_path / "cached"
    r = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={online}", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("cache", "-c", str(cfg), "--quiet", "--set", f"out_dir={cached}", *sets,
                "--set", "train.mode=cached")
    assert r.returncode == 0, r.stderr[-2000:]
    corpus.write_bytes(edited)
    assert file_digest(corpus) == before  # the case: the fingerprint cannot see this edit
    for out in (online, cached):
        fingerprints = [d.name for d in (out / "data").glob("blocks-*")]
        shutil.rmtree(out / "data")  # as the README says to

        mode = "cached" if out == cached else "online"
        r = run_cli("train", "-c", str(cfg), "--quiet", "--resume", "--set", f"out_dir={out}", *sets,
                    "--set", f"train.mode={mode}")
        line = one_line(r)
        assert [d.name for d in (out / "data").glob("blocks-*")] == fingerprints, line  # the same name, again
        want = "holds the teacher's signal for other blocks" if mode == "cached" else \
            "this checkpoint was trained on other blocks of data with the same fingerprint"
        assert want in line and "came out different" in line, line
        if mode == "cached":  # eval scores agreement and KL against the cache too
            # (its exports are checked first: the online run's student stands in for this one's)
            export = run_cli("export", str(online / "students" / "dense"), "--out", str(out / "students" / "dense" / "export"))
            assert export.returncode == 0, export.stderr[-2000:]
            line = one_line(run_cli("eval", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", *sets,
                                    "--set", "train.mode=cached"))
            assert "holds the teacher's signal for other blocks" in line, line
            # and a cache of other data altogether (another fingerprint): refused too, not scored
            # against the wrong blocks or an IndexError past the cache's last block
            other = tmp_path / "other.jsonl"
            other.write_text("".join(json.dumps({"text": f"class C{i}:\n    x = {i}\n" * 30}) + "\n" for i in range(40)))
            r = run_cli("eval", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", *sets,
                        "--set", "train.mode=cached", "--set", f"data.paths=['{other}']")
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
            line = r.stderr.strip().splitlines()[-1]  # after the note naming the earlier preparation
            assert line.startswith(f"error: cache at {out / 'cache'} was made from other data"), line
