"""Data parallelism is exact: 2 CPU processes (gloo) train the weights 1 process trains from the
same global batch, under the torch engine (DDP) and DeepSpeed ZeRO-2/3, with 1 or 2 micro-batches,
for a dense and a MoE student trained together in one launch (slow: each launch is a real CLI run)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.train import checkpoint
from tests.conftest import (
    ROOT, checkpoint_weights, ensure_deepspeed_cpu_op, kill_group, rel_diff, rendezvous, run_cli, run_deepspeed_cli,
    run_torchrun_cli, train_rows)

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
    return checkpoint_weights(out, name, step)


def train(cfg, out, launcher, grad_accum, *extra):
    """Run `distill train` by `launcher` into `out`; returns `out`."""
    launch(cfg, out, launcher, grad_accum, *extra)
    return out


def launch(cfg, out, launcher, grad_accum, *extra):
    args = ("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", f"train.grad_accum={grad_accum}",
            *extra)
    if launcher == "single":
        r = run_cli(*args)
    elif launcher.startswith("single-zero"):  # DeepSpeed on one process, no launcher
        ensure_deepspeed_cpu_op()
        r = run_cli(*args, "--set", "train.engine=deepspeed", "--set", f"train.zero_stage={launcher[-1]}")
    elif launcher == "torchrun":
        r = run_torchrun_cli(*args)
    else:  # "zero2", "zero3"
        r = run_deepspeed_cli(*args, "--set", "train.engine=deepspeed", "--set", f"train.zero_stage={launcher[-1]}")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def killed_after_step_2(full, to):
    """A copy of run `full` as if killed -9 after step 2: no step-3 checkpoint, ours or DeepSpeed's."""
    shutil.copytree(full, to)
    for name in ("dense", "moe"):
        shutil.rmtree(to / "students" / name / "checkpoints" / "step_00000003")
        shutil.rmtree(to / "students" / name / "checkpoints" / "deepspeed" / "step_00000003", ignore_errors=True)
    return to


@pytest.fixture(scope="module")
def launched(dp_config):
    """launched(launcher, grad_accum) -> out dir of that run, each launched once per module.
    Runs checkpoint every step (not part of the run's identity), for the resume tests."""
    work, cfg = dp_config
    runs = {}

    def get(launcher, grad_accum):
        if (launcher, grad_accum) not in runs:
            runs[launcher, grad_accum] = train(cfg, work / f"{launcher}-ga{grad_accum}", launcher, grad_accum,
                                               "--set", "train.checkpoint_every=1")
        return runs[launcher, grad_accum]

    return get


# Each launch is 2 fresh processes importing torch, transformers and DeepSpeed: the default engine
# (DDP) and the default ZeRO stage (2) with and without accumulation, and ZeRO-3 with the
# accumulation that the resume test below also needs.  Every run is compared with both 1-process runs.
@pytest.mark.parametrize("launcher, grad_accum", [("torchrun", 1), ("torchrun", 2), ("zero2", 1), ("zero2", 2),
                                                  ("zero3", 2)])
def test_two_ranks_train_the_weights_one_process_trains(launched, launcher, grad_accum):
    out, ref = launched(launcher, grad_accum), launched("single", grad_accum)
    # Rounding alone: the dense student 2e-6, the MoE one up to 1.3e-5 on the default (whole-
    # distribution) signal, 3e-7 on the top-16 (the teacher's signal is bitwise the same for a
    # rank's half; Adam turns the reductions' rounding in the experts' few-token gradients into
    # relative steps).  Not reducing f_e over the ranks moves the MoE student by 0.12.
    tolerance = {"dense": 1e-5, "moe": 5e-5}
    for name in ("dense", "moe"):  # the MoE student's balance loss is on: its f_e is the step's
        diff = rel_diff(weights(out, name), weights(ref, name))
        assert diff < tolerance[name], (launcher, grad_accum, name, diff)
        diff = rel_diff(weights(out, name), weights(launched("single", 1), name))  # = one big batch
        assert diff < tolerance[name], (launcher, grad_accum, name, "vs one micro-batch", diff)
    # Metrics are the step's, over both ranks: the same loss and token count as one process.
    for name in ("dense", "moe"):
        rows, ref_rows = train_rows(out, name), train_rows(ref, name)
        assert len(rows) == len(ref_rows) == STEPS
        for a, b in zip(rows, ref_rows):
            assert a["n_valid"] == b["n_valid"] and abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"]), (a, b)
            # the teacher's figures are the step's too, not rank 0's share
            assert a["teacher_nonfinite_tokens"] == b["teacher_nonfinite_tokens"], (a, b)
            assert abs(a["teacher_nll"] - b["teacher_nll"]) < 1e-4 * abs(b["teacher_nll"]), (a, b)
            if name == "moe":
                assert abs(a["balance_loss"] - b["balance_loss"]) < 1e-4, (a, b)
    if launcher.startswith("zero"):  # the stage asked for, as DeepSpeed's own optimiser state says
        saved = out / "students" / "dense" / "checkpoints" / "deepspeed" / f"step_{STEPS:08d}"
        parts = sorted(saved.glob("*zero_pp_rank_*optim_states.pt"))
        assert len(parts) == 2, parts  # one per rank
        for part in parts:
            state = torch.load(part, map_location="cpu", weights_only=False)
            assert int(state["optimizer_state_dict"]["zero_stage"]) == int(launcher[-1]), part


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_on_one_process_without_a_launcher_trains_the_same_weights(launched, stage):
    """`train.engine: deepspeed` with no launcher (one GPU with ZeRO offload, say) failed in
    DeepSpeed's MPI discovery (no mpi4py) with a traceback; it now runs as a group of one and
    trains the weights the torch engine does, at the ZeRO stage asked for (DeepSpeed's own
    optimiser state records it; stage 2 runs under both launchers above)."""
    out, ref = launched(f"single-zero{stage}", 2), launched("single", 2)
    for name, tolerance in (("dense", 1e-5), ("moe", 5e-5)):
        diff = rel_diff(weights(out, name), weights(ref, name))
        assert diff < tolerance, (name, diff)
        saved = out / "students" / name / "checkpoints" / "deepspeed" / f"step_{STEPS:08d}"
        state = torch.load(next(saved.glob("*zero_pp_rank_0_*optim_states.pt")), map_location="cpu", weights_only=False)
        assert int(state["optimizer_state_dict"]["zero_stage"]) == stage


def test_zero3_resume_after_a_kill_and_export_to_stock_transformers(launched, dp_config, tmp_path):
    """As if killed -9 after step 2 (the step-3 checkpoint, ours and DeepSpeed's, never written):
    --resume under ZeRO-3 gives the uninterrupted weights; the export loads in stock transformers
    with the trained model's logits; DeepSpeed's checkpoint dirs were pruned to keep_last."""
    work, cfg = dp_config
    full = launched("zero3", 2)
    ckpts = full / "students" / "dense" / "checkpoints"
    assert sorted(p.name for p in (ckpts / "deepspeed").glob("step_*")) == ["step_00000002", "step_00000003"]
    killed = train(cfg, killed_after_step_2(full, work / "zero3-killed"), "zero3", 2, "--resume")
    for name in ("dense", "moe"):
        assert rel_diff(weights(killed, name), weights(full, name)) < 1e-6, name
        r = run_cli("export", str(killed / "students" / name), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-2000:]
        from transformers import AutoModelForCausalLM  # stock: no sparse MoE, nothing of ours

        stock = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        ours.load_state_dict(weights(launched("single", 2), name), strict=False)  # the 1-process run's
        ids = torch.randint(0, stock.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = stock(ids).logits, ours(ids).logits
        assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max()), name


@pytest.mark.parametrize("first, then, grad_accum", [("torchrun", "single", 2), ("zero2", "single-zero2", 2),
                                                     ("zero3", "single-zero3", 1)])
def test_a_run_resumes_on_another_number_of_ranks_with_another_grad_accum(launched, dp_config, first, then,
                                                                          grad_accum):
    """A job rescheduled on fewer GPUs (2 ranks -> 1 here) resumes, with the grad_accum that
    fits them, to the weights of the uninterrupted run.  DeepSpeed's partitions are per rank:
    they go through its universal checkpoint, whose loader needs two corrections (every param
    group given the first's weight decay; one `step` shared by every group under ZeRO-3)."""
    work, cfg = dp_config
    full = launched(first, 3 - grad_accum)
    killed = killed_after_step_2(full, work / f"{first}-then-{then}")
    said = launch(cfg, killed, then, grad_accum, "--resume").stdout
    if then != "single":  # the branch that converts was taken, and cleaned up after
        assert said.count("written by 2 rank(s), resuming on 1") == 2, said[-3000:]
        assert not list((killed / "students").glob("*/checkpoints/deepspeed/.universal-*"))
    for name, tolerance in (("dense", 1e-5), ("moe", 5e-5)):  # rounding only, as in the test above
        assert rel_diff(weights(killed, name), weights(full, name)) < tolerance, name


def start_two_ranks(args: list[str], meet: dict, rank1_extra: tuple = (), ranks: int = 2) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of `args` started by hand (no launcher, so each one's exit code and stderr
    are seen), each in a session of its own; `meet`: the rendezvous() env.  rank1_extra: more
    arguments for rank 1 alone (a node started with other settings).  ranks: how many of the
    two to start (1: rank 0 waits for a peer that never comes)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", **meet}
    return [subprocess.Popen(args + (list(rank1_extra) if r else []), env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for r in range(ranks)]


def _two_ranks(args, rank1_extra=(), timeout=300):
    with rendezvous() as meet:
        procs = start_two_ranks(args, meet, rank1_extra)
        try:
            errs = [p.communicate(timeout=timeout)[1] for p in procs]
        finally:
            for p in procs:
                kill_group(p)
    return [p.returncode for p in procs], errs


@pytest.mark.parametrize("case", ["another_lr", "node_local_out_dir"])
def test_ranks_with_another_config_or_out_dir_are_refused_before_any_work(dp_config, tmp_path, case):
    """Nothing compared the ranks of a launch: a node started with another `--set` (lr,
    batch_size) trained on with the others, exit 0, its weights silently off; one whose
    out_dir was a node-local disk (or another relative path) resumed from step 0 while rank 0
    resumed its checkpoint.  Now every rank says the same one line, exit 2, before any work."""
    work, cfg = dp_config
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}"]
    other = ("--set", "students.0.optim.lr=0.03") if case == "another_lr" else ("--set", f"out_dir={tmp_path / 'local'}")
    codes, errs = _two_ranks(args, other)
    assert codes == [2, 2], errs
    for e in errs:
        lines = [l for l in e.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in e, e
        if case == "another_lr":
            assert lines[0].startswith("error: rank 1 (") and "runs another config than rank 0" in lines[0], e
            assert "students.0.optim.lr 0.003 -> 0.03" in lines[0], e
        else:
            assert lines[0].startswith("error: out_dir: rank 1 (") and "does not see the dir rank 0" in lines[0], e
    assert not (out / "students").exists() and not (out / "data").exists()  # refused before any work


def test_a_cache_dir_the_ranks_do_not_share_is_refused_before_any_work(dp_config, tmp_path):
    """`distill cache` with cache.dir on node-local disks: each rank wrote its half where the other
    could not see it, rank 0's merge found rank 1's manifest missing and both exited 0, leaving
    no manifest.json ("no cache; run `distill cache` first" next).  Now every rank says one line
    before the teacher runs (the merge's own refusal: tests/test_cache.py)."""
    work, cfg = dp_config
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "cache", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}",
            "--set", "train.mode=cached", "--set", "data.max_train_blocks=16", "--set", "data.max_val_blocks=4",
            "--set", f"cache.dir={tmp_path / 'node0-cache'}"]
    codes, errs = _two_ranks(args, ("--set", f"cache.dir={tmp_path / 'node1-cache'}"))  # the same path, on each node
    assert codes == [2, 2], errs
    for e in errs:
        lines = [l for l in e.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith("error: cache.dir: rank 1 (") and "Traceback" not in e, e
        assert "does not see the dir rank 0" in lines[0], e
    assert not list((tmp_path / "node0-cache").glob("*.safetensors")) and not (out / "data").exists()


def test_a_rank_waiting_for_a_peer_that_never_comes_stops_on_sigterm(dp_config, tmp_path):
    """A rank whose peer never joins (a wrong MASTER_PORT) waited in torch's rendezvous, in C++,
    silent and deaf to SIGTERM and Ctrl-C until its 30-minute timeout.  Now SIGTERM ends it at
    once with the interrupted line, 130 (what it says while it waits: test_runtime_watch below)."""
    work, cfg = dp_config
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path}"]
    with rendezvous() as meet:
        proc, = start_two_ranks(args, meet, ranks=1)
        try:
            time.sleep(8)  # imported and waiting
            assert proc.poll() is None, proc.communicate()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            kill_group(proc)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err, err
    assert took < 10, took


def test_runtime_watch_says_a_rank_is_waiting(monkeypatch, capsys):
    from distill import runtime

    monkeypatch.setattr(runtime, "WAITING_SAID_AFTER", 0.3)
    monkeypatch.setenv("RANK", "1")
    with runtime._rendezvous_watch(2):
        time.sleep(1.0)
    said = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[dist] rank 1 of 2: waiting")]
    assert len(said) >= 2, said  # after 0.3 s and 0.6 s (a loaded box may wake it at 1.2 s too)


def test_sigterm_to_one_rank_stops_both_at_the_same_step(dp_config):
    """torch engine (DDP), two ranks started by hand so each one's exit code is seen; each in a
    session of its own, killed with all it started whatever happens (bounded: 300 s to step 2,
    120 s to stop)."""
    work, cfg = dp_config
    out = work / "sigterm"
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}",
            "--set", "train.steps=400"]
    metrics = out / "students" / "dense" / "metrics.jsonl"
    with rendezvous() as meet:
        procs = start_two_ranks(args, meet)
        try:
            deadline = time.time() + 300
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    for p in procs:  # before reading their output: a live rank's pipe never ends
                        kill_group(p)
                    pytest.fail(f"no step 2 (exit codes {[p.returncode for p in procs]}): "
                                f"{[p.communicate()[1][-2000:] for p in procs]}")
                time.sleep(0.2)
            procs[1].send_signal(signal.SIGTERM)  # rank 1 only
            errs = [p.communicate(timeout=120)[1] for p in procs]  # unagreed, the ranks deadlock: a timeout
        finally:
            for p in procs:
                kill_group(p)
    assert [p.returncode for p in procs] == [130, 130], errs
    steps = {re.search(r"stopped by signal 15 after step (\d+)", e).group(1) for e in errs}
    assert len(steps) == 1, errs
    step = int(steps.pop())
    assert 2 <= step < 400
    for name in ("dense", "moe"):
        assert checkpoint.latest(out / "students" / name / "checkpoints").name == f"step_{step:08d}"


def test_a_signal_in_one_ranks_validation_stops_every_rank_at_the_same_batch(dp_config, monkeypatch):
    """Validation asks after each batch whether to stop, and the ranks agree (an all-reduce), so
    a SIGTERM that rank 1 alone gets as it validates cuts both at the same batch: both exit 130
    at the same step, checkpointed, with nothing of the cut validation logged (unagreed, one rank
    would go on to the next batch's collectives while the other waits in the checkpoint's:
    a deadlock, and the test's timeout)."""
    from distill.train.loop import SIGNAL_IN_VALIDATION

    work, cfg = dp_config
    out = work / "signal-in-validation"
    monkeypatch.setenv(SIGNAL_IN_VALIDATION, "1")  # rank 1 SIGTERMs itself in its first validation batch
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}",
            "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.eval_blocks=24"]
    codes, errs = _two_ranks(args, timeout=300)
    assert codes == [130, 130], errs
    for err in errs:
        assert "stopped by signal 15 after step 2 of 4 (its validation cut short)" in err, err[-2000:]
    for name in ("dense", "moe"):
        assert checkpoint.latest(out / "students" / name / "checkpoints").name == "step_00000002"
        rows = [json.loads(line) for line in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "val"] == []
    # Resumed on both ranks: rank 0 finds step 2's validation missing and both ranks do it, then go on
    monkeypatch.delenv(SIGNAL_IN_VALIDATION)
    codes, errs = _two_ranks(args + ["--resume"], timeout=300)
    assert codes == [0, 0], errs
    for name in ("dense", "moe"):
        rows = [json.loads(line) for line in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4], rows


def test_a_rank_whose_peer_refused_the_input_says_one_line(dp_config, tmp_path):
    """Rank 0 prepares the data while rank 1 waits: a broken jsonl line is rank 0's one-line
    error (exit 2), and rank 1, whose wait fails when rank 0 exits, says one line pointing at it
    (exit 1), not gloo's traceback (before: 50 lines of it under rank 0's line)."""
    work, cfg = dp_config
    corpus = tmp_path / "broken.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f(x):\n    return x + {i}\n" * 8}) + "\n" for i in range(50))
                      + '{"text": "cut short\n')
    args = [sys.executable, str(ROOT / "cli.py"), "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'out'}",
            "--set", f"data.paths=[{corpus}]"]
    with rendezvous() as meet:
        procs = start_two_ranks(args, meet)
        try:
            errs = [p.communicate(timeout=300)[1] for p in procs]
        finally:
            for p in procs:
                kill_group(p)
    assert [p.returncode for p in procs] == [2, 1], errs
    lines = [[l for l in e.splitlines() if l.startswith("error:")] for e in errs]
    assert len(lines[0]) == 1 and lines[0][0].startswith(f"error: {corpus}: line 51 is not valid JSON ("), errs[0]
    assert len(lines[1]) == 1 and lines[1][0].startswith("error: rank 1: stopped because another rank of the launch "
                                                         "stopped first (Connection closed by peer"), errs[1]
    assert lines[1][0].endswith("its output says why (an error, a signal, or a run that ended sooner)") and "Traceback" not in errs[1], errs[1]


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc; a zombie counts as gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ranks_whose_launcher_is_killed_checkpoint_and_stop(dp_config):
    """kill -9 of torchrun alone (it starts its ranks in sessions of their own, and SIGKILL
    cannot be passed on): the ranks trained on as orphans to the run's end.  Now each notices
    its launcher is gone, and they stop after the same step, checkpointed and committed."""
    work, cfg = dp_config
    out = work / "orphans"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "cli.py"),
           "train", "-c", str(cfg), "--quiet", "--set", f"out_dir={out}", "--set", "train.steps=400"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    ranks = []
    try:
        metrics = out / "students" / "dense" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.time() < deadline and launcher.poll() is None, "no step 2"
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 120
        while any(_alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), "the ranks outlived their launcher"
    finally:
        kill_group(launcher)
        for r in ranks:
            if _alive(r):
                os.kill(r, signal.SIGKILL)
    steps = checkpoint.committed_steps(out / "students")
    assert steps["dense"] == steps["moe"] and 2 <= steps["dense"] < 400, steps
    for name in ("dense", "moe"):
        assert checkpoint.latest(out / "students" / name / "checkpoints").name == f"step_{steps[name]:08d}"


def test_two_ranks_select_and_reweigh_data_as_one_process_does(dp_config):
    """Data selection under DDP: a static selection and a dynamic one (re-weighted every step by
    the students' gap, gathered from both ranks) give the weights of one process on the same
    global batches; a rank that kept only its own gaps would draw other blocks."""
    work, base = dp_config
    cfg = yaml.safe_load(base.read_text())
    cfg["train"].update(mode="cached", grad_accum=2)
    cfg["students"][0]["select"] = {"by": "nll", "drop_easiest": 0.5}
    cfg["students"][1]["select"] = {"by": "entropy", "keep_hardest": 0.5, "rescore_every": 1,
                                    "rescore_temperature": 0.001}
    path = work / "dp-select.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("cache", "-c", str(path), "--quiet", "--set", f"cache.dir={work / 'dp-cache'}")
    assert r.returncode == 0, r.stderr[-2000:]
    sets = ("--set", f"cache.dir={work / 'dp-cache'}")
    one = train(path, work / "select-single", "single", 2, *sets)
    two = train(path, work / "select-torchrun", "torchrun", 2, *sets)
    for name in ("dense", "moe"):
        assert rel_diff(weights(two, name), weights(one, name)) < 1e-5, name
        a = torch.load(two / "students" / name / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)
        b = torch.load(one / "students" / name / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)
        if name == "moe":  # the dynamic view's table: every block of every step, from both ranks
            assert int(b["data_view"]["seen"].sum()) >= 8
            assert torch.equal(a["data_view"]["seen"], b["data_view"]["seen"])
            torch.testing.assert_close(a["data_view"]["gaps"], b["data_view"]["gaps"], rtol=1e-4, atol=1e-5)


def test_teacher_pretrained_under_zero3_equals_the_one_process_teacher(online_setup, tmp_path):
    """`distill pretrain` under DeepSpeed ZeRO-3 on 2 ranks saves the whole teacher (gathered
    from every rank's partitions), equal to the teacher one process pretrains."""
    work, base = online_setup
    cfg = yaml.safe_load(base.read_text())
    cfg["teacher"] = {"source": "preset", "model": {"preset": "dense", "args": TINY},
                      "pretrain": {"steps": 2, "batch_size": 4, "optim": {"lr": 3e-3, "warmup_steps": 1}}}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = run_cli("pretrain", "-c", str(path), "--quiet", "--set", f"out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_deepspeed_cli("pretrain", "-c", str(path), "--quiet", "--set", f"out_dir={tmp_path / 'two'}",
                            "--set", "train.engine=deepspeed", "--set", "train.zero_stage=3")
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-3000:])
    a = load_file(str(tmp_path / "two" / "teacher" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "teacher" / "model.safetensors"))
    assert all(a[k].numel() > 0 for k in a)  # not rank 0's empty partitions
    assert rel_diff(a, b) < 1e-5
