"""What keeps a multi-process test (and a DeepSpeed run on CPU) from hanging: a stale JIT build
lock is found and refused in one line; a launch, a spawn and their ranks end within a bound; the
ranks meet at a port bound once (issue 22)."""
import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from distill.runtime import DEEPSPEED_CPU_OP, check_deepspeed_cpu_op, stale_build_lock
from common.errors import UserError
from tests.conftest import rendezvous, run_cli, run_group, spawn


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


HOLD = ("import os, sys, time\n"  # what torch's FileBaton does: create the lock and keep it open
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    """A private torch extensions dir and the lock path of DeepSpeed's CPU op in it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext" / DEEPSPEED_CPU_OP / "lock"


def test_a_lock_left_by_a_killed_build_is_stale_and_a_held_one_is_not(ext_dir):
    assert stale_build_lock(settle=0.05) is None  # no lock: nothing to say (and the dir is torch's)
    assert ext_dir.parent.is_dir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ext_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert stale_build_lock(settle=0.05) is None  # a build at work
        check_deepspeed_cpu_op()
    finally:
        holder.kill()  # killed mid-build: the lock stays behind
        holder.wait()
    assert ext_dir.exists()
    assert stale_build_lock(settle=0.05) == ext_dir
    with pytest.raises(UserError, match="Delete that file") as e:
        check_deepspeed_cpu_op()
    assert str(ext_dir) in str(e.value)


def test_deepspeed_train_on_cpu_with_a_stale_lock_fails_in_one_line_instead_of_hanging(online_setup, tmp_path):
    """Before: `distill train` with engine deepspeed waited on the lock forever, printing nothing."""
    work, cfg = online_setup
    ext = tmp_path / "ext"
    (ext / DEEPSPEED_CPU_OP).mkdir(parents=True)
    (ext / DEEPSPEED_CPU_OP / "lock").touch()
    t0 = time.monotonic()
    with rendezvous() as meet:  # as a launcher's rank 0 (without a launcher DeepSpeed looks for MPI)
        r = run_cli("train", "-c", str(cfg), "--quiet", "--set", f"out_dir={tmp_path / 'out'}",
                    "--set", "train.engine=deepspeed", timeout=60,
                    env={"TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", **meet,
                         "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: DeepSpeed's CPU communication op") and "Traceback" not in r.stderr, r.stderr
    assert str(ext / DEEPSPEED_CPU_OP / "lock") in lines[-1]
    assert time.monotonic() - t0 < 60


LAUNCHER = ("import subprocess, sys, time\n"  # a launcher whose rank outlives it unless its group is killed
            "rank = subprocess.Popen([sys.executable, '-c', 'import sys, time; time.sleep(30); "
            "open(sys.argv[1], \"w\").write(\"survived\")', sys.argv[2]])\n"
            "print(rank.pid, flush=True)\n"
            "time.sleep(float(sys.argv[1]))\n")


def launch_and_rank(tmp_path, launcher_sleeps: float, timeout: float):
    """run_group on LAUNCHER: (its result or the pytest failure, the rank's pid, the rank's
    marker file, seconds taken); the rank is then given 5 s to be gone."""
    marker, t0 = tmp_path / "survived", time.monotonic()
    try:
        result = run_group([sys.executable, "-c", LAUNCHER, str(launcher_sleeps), str(marker)], env=dict(os.environ),
                           timeout=timeout)
        out = result.stdout
    except pytest.fail.Exception as e:
        result, out = e, str(e).split("stdout: ")[1]
    took, rank = time.monotonic() - t0, int(out.split()[0])
    deadline = time.monotonic() + 5
    while alive(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result, rank, marker, took


def test_a_launch_past_its_timeout_is_killed_with_its_ranks(tmp_path):
    failed, rank, marker, took = launch_and_rank(tmp_path, 600, timeout=2)
    assert "no result after 2 s; its process group was killed" in str(failed)
    assert took < 20 and not alive(rank) and not marker.exists(), "the launcher's rank outlived the timeout"


def test_a_rank_a_finished_launch_left_behind_is_killed(tmp_path):
    r, rank, marker, took = launch_and_rank(tmp_path, 0, timeout=60)
    assert r.returncode == 0
    assert took < 20 and not alive(rank) and not marker.exists(), "the rank outlived its launcher"


def _sleep_forever(rank, pids):
    with open(f"{pids}.{rank}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def test_spawned_ranks_past_the_deadline_are_killed_and_the_test_fails(tmp_path):
    t0 = time.monotonic()  # (20 s: time for both to start, import torch and say who they are)
    with pytest.raises(pytest.fail.Exception, match="2 ranks did not finish in 20 s; killed"):
        spawn(_sleep_forever, (str(tmp_path / "pid"),), timeout=20)
    assert time.monotonic() - t0 < 60
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(2)]
    assert not any(alive(p) for p in pids)


def _all_reduce(rank, meet, out):
    import torch
    import torch.distributed as dist

    os.environ.update(meet, RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(float(t)))
    dist.destroy_process_group()


def test_ranks_meet_at_a_port_bound_once_and_held(tmp_path):
    """The port the ranks are given is bound before they start and stays bound (a second bind
    fails): nothing else can take it in between; both ranks join through it as clients."""
    with rendezvous() as meet:
        with socket.socket() as s, pytest.raises(OSError) as e:
            s.bind((meet["MASTER_ADDR"], int(meet["MASTER_PORT"])))
        assert e.value.errno == errno.EADDRINUSE
        spawn(_all_reduce, (meet, str(tmp_path / "sum")), timeout=120)
    assert [(tmp_path / f"sum.{r}").read_text() for r in range(2)] == ["3.0", "3.0"]
