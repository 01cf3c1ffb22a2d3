"""Shared fixtures: small real corpora (from the stdlib) and a runner for the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `distill ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def run_deepspeed_cli(*args: str, port: int, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 cli.py ARGS` on CPU: 2 processes, 1 thread each."""
    deepspeed = shutil.which("deepspeed")
    assert deepspeed, "deepspeed launcher not installed (make install provides it)"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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
        "seed": 3, "data": {"paths": [str(stdlib_corpus)], "seq_len": 32},
        "teacher": {"source": "checkpoint", "path": str(teacher_dir)},
        "cache": {"k": 16},
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


def run_torchrun_cli(*args: str, port: int, timeout: int = 900, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 cli.py ARGS` on CPU (gloo): 2 processes, 1 thread each."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
