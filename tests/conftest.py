"""Shared fixtures: small real corpora (from the stdlib) and a runner for the real CLI."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _share_the_cores() -> None:
    """Give each pytest-xdist worker its share of the cores for torch's threads, before torch is
    imported; every process it starts inherits the setting (a command or launcher that sets its
    own keeps it).  `make test` runs 2 workers on 2 cores.  With 2 threads in each, a test of many
    small ops (tests/test_generation_eval.py's twin test: 1 s alone) took 34 s, as each worker's
    threads wait on cores the other holds."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))
        if "torch" in sys.modules:  # a plugin imported it first: its pool is sized already
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `distill ARGS` in a process of its own, as a user would: forked from a server that has
    the libraries imported (tests/cli_process.py says what that keeps and what it does not)."""
    from tests import cli_process

    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return cli_process.run(list(args), cwd=cwd or ROOT, env=full_env, timeout=timeout)


def run_deepspeed_cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 cli.py ARGS` on CPU: 2 processes, 1 thread each, meeting at a
    store this process holds (`rendezvous`); the op DeepSpeed builds on CPU is built first."""
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "deepspeed launcher not installed (make install provides it)"
    ensure_deepspeed_cpu_op()
    with rendezvous() as meet:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               **meet}
        cmd = [deepspeed, "--num_gpus", "2", "--master_addr", meet["MASTER_ADDR"], "--master_port",
               meet["MASTER_PORT"], str(ROOT / "cli.py"), *args]
        result = run_group(cmd, env=env, timeout=timeout)
    # What the run left in /dev/shm (DeepSpeed's CPU all-reduce buffers, named after its port).
    result.shm_left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{meet['MASTER_PORT']}_*"))
    return result


# ------------------------------------------------------------------ comparing runs' weights and metrics


def checkpoint_weights(out: Path, name: str, step: int) -> dict:
    """Student `name`'s weights at checkpoint `step` of the run in `out`."""
    from safetensors.torch import load_file

    return load_file(str(out / "students" / name / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def train_rows(out: Path, name: str) -> list[dict]:
    """Student `name`'s training rows of metrics.jsonl."""
    rows = [json.loads(l) for l in (out / "students" / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


# ------------------------------------------------------------------ multi-process runs that end


@contextlib.contextmanager
def rendezvous():
    """The env of a launch whose ranks meet at a TCPStore this process binds once (port 0: the
    kernel picks a free one) and holds until the block ends.  TORCHELASTIC_USE_AGENT_STORE=True
    (what torchrun's workers get) makes every rank's init_process_group a client of that store,
    so no rank binds MASTER_PORT itself: no window between picking a free port and binding it,
    and a port another run holds is never joined."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads (a launcher and its ranks), SIGKILL what is left
    after `grace` seconds, and reap `proc`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    proc.wait()


def run_group(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, ended as a whole when the command returns, times
    out or the test is interrupted (pytest-timeout, ^C): subprocess.run's timeout kills only its
    child, so a launcher's ranks lived on, holding their ports, build locks and pipes.  A timeout
    fails the test with the output so far."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:  # (communicate again after a timeout loses no output)
                out, err = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if proc.poll() is not None:  # the launcher is done but a rank it left holds the pipes
                    kill_group(proc)
                elif time.monotonic() > deadline:
                    kill_group(proc)
                    out, err = proc.communicate()
                    pytest.fail(f"{Path(cmd[0]).name} ... {' '.join(cmd[-4:])}: no result after {timeout:.0f} s; "
                                f"its process group was killed\nstdout: {(out or '')[-2000:]}\n"
                                f"stderr: {(err or '')[-3000:]}", pytrace=False)
    finally:
        kill_group(proc)  # ranks a finished launcher left behind, too
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def spawn(fn, args: tuple, nprocs: int = 2, timeout: float = 600) -> None:
    """torch.multiprocessing.spawn with a deadline: ranks still running then are killed and the
    test fails (spawn's own join waits forever, and its non-daemon ranks keep pytest from exiting
    even after pytest-timeout fails the test)."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{fn.__name__}: {nprocs} ranks did not finish in {timeout:.0f} s; killed", pytrace=False)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(10)


@functools.cache
def _deepspeed_cpu_op() -> str | None:
    """Build (or load) DeepSpeed's CPU communication op once, bounded; None, or why it failed."""
    from distill.runtime import DEEPSPEED_CPU_OP, stale_build_lock

    lock = stale_build_lock(DEEPSPEED_CPU_OP)
    if lock is not None:
        return (f"stale build lock {lock}: a DeepSpeed run was killed while it built {DEEPSPEED_CPU_OP}, and every "
                f"DeepSpeed run on CPU would wait on it forever; delete that file and rerun")
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "import deepspeed.ops\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):\n"
            "    b.load()\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEEPSPEED_OP_BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out = proc.communicate()[0]
        lock = stale_build_lock(DEEPSPEED_CPU_OP)
        if lock is not None:  # ours: its only holder, the build, was just killed
            lock.unlink(missing_ok=True)
        return f"building {DEEPSPEED_CPU_OP} took over {DEEPSPEED_OP_BUILD_TIMEOUT} s; killed\n{out[-3000:]}"
    finally:
        kill_group(proc)
    return None if proc.returncode == 0 else f"building {DEEPSPEED_CPU_OP} failed:\n{out[-3000:]}"


DEEPSPEED_OP_BUILD_TIMEOUT = 600  # the first build takes 40-90 s on 2 cores; a load, a few


def ensure_deepspeed_cpu_op() -> None:
    """Before the first DeepSpeed run on CPU: its op built once (not by two ranks racing, inside
    a run's timeout), and a stale lock a fast failure with the file to delete, not a silent hang."""
    why = _deepspeed_cpu_op()
    if why is not None:
        pytest.fail(why, pytrace=False)


# `make test` runs on 2 workers with --dist loadfile (a file's tests on one worker, its module
# fixtures built once), handing files out in collection order: these, the slowest, go first so
# that neither worker is left with one of them while the other idles at the end.
SLOWEST_FIRST = ("test_data_parallel.py", "test_bench.py", "test_reliability.py", "test_onpolicy_ranks.py",
                 "test_blocks.py", "test_accumulation.py", "test_e2e.py", "test_cache.py", "test_teacher_sharding.py",
                 "test_no_hang.py", "test_curriculum.py", "test_sampled_cli.py", "test_onpolicy.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A few real stdlib modules copied into a dir (a small, real corpus)."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py",
                 "keyword.py", "numbers.py", "queue.py", "sched.py", "this.py", "stringprep.py", "copy.py",
                 "abc.py", "cmd.py", "graphlib.py", "opcode.py", "operator.py", "random.py", "string.py"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def online_setup(stdlib_corpus, tmp_path_factory):
    """A random tiny Behemoth-style teacher saved as a Hugging Face dir, plus a config."""
    from distill.config import DataConfig
    from distill.data import prepare_data
    from distill.report.export import save_hf_dir
    from students.build import build_model
    from students.presets import behemoth

    work = tmp_path_factory.mktemp("online")
    data = prepare_data(DataConfig(paths=[stdlib_corpus], seq_len=32, tokenizer={"vocab_size": 300}), work / "prep")
    teacher = build_model(behemoth(vocab_size=len(data.tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, num_experts=4), seed=1)
    teacher_dir = save_hf_dir(teacher, data.tokenizer, work / "teacher")
    student = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16}
    cfg = {
        # 512 of the corpus's 4,505 training blocks: every `distill cache` of a test pays the teacher
        # once per block, while a run reads 16 (4 steps of 4).
        "seed": 3, "data": {"paths": [str(stdlib_corpus)], "seq_len": 32, "max_train_blocks": 512},
        "teacher": {"source": "checkpoint", "path": str(teacher_dir)},
        "cache": {"k": 16, "samples": 32},  # cache.estimator: auto draws here; 32 a token keeps the tests quick
        "students": [{"name": "dense", "model": {"preset": "dense", "args": student},
                      "optim": {"lr": 3e-3, "warmup_steps": 1}}],
        "train": {"mode": "online", "steps": 4, "batch_size": 4, "eval_every": 0, "eval_blocks": 2,
                  "checkpoint_every": 0},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return work, path


@pytest.fixture(scope="session")
def hf_family(stdlib_corpus, tmp_path_factory):
    """One tokenizer family as a user has it (built with `tokenizers`, ChatML template), a
    3-layer Qwen3 teacher (vocab padded by 12 rows) and a tied-embedding Llama student (padded
    by 4), each a stock transformers dir with the tokenizer saved beside it."""
    from tests.hf_models import chat_rows, make_tokenizer, save_model

    work = tmp_path_factory.mktemp("family")
    texts = [p.read_text() for p in sorted(stdlib_corpus.glob("*.py"))]
    texts += [json.dumps(r) for r in chat_rows()]
    tok = make_tokenizer(texts, work / "tokenizer")
    n = len(tok)
    teacher = save_model("qwen3", n + 12, work / "teacher", tok, seed=1, num_hidden_layers=3)
    student = save_model("llama", n + 4, work / "student", tok, seed=2, num_hidden_layers=1, tie_word_embeddings=True,
                         rope_theta=5000.0, rms_norm_eps=1e-5)
    return {"work": work, "tokenizer": tok, "teacher": teacher, "student": student, "vocab": n}


def run_torchrun_cli(*args: str, timeout: int = 900, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 cli.py ARGS` on CPU (gloo): 2 processes, 1 thread
    each; --standalone binds its rendezvous and the ranks' store on port 0, once."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "cli.py"), *args]
    return run_group(cmd, env=env, timeout=timeout)
