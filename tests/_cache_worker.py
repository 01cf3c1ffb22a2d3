"""Helpers the cache tests run in other processes (kill -9, 2-rank gloo) and in-process.

`setup()` builds a deterministic toy teacher and data so every process that calls it
caches exactly the same thing.  Run as a script it writes a cache:
    python tests/_cache_worker.py CACHE_DIR [--delay SECONDS]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

from teachers.cache.format import Sampling  # noqa: E402
from teachers.cache.writer import write_cache  # noqa: E402

VOCAB, SEQ_LEN, K = 300, 12, 16
SAMPLING = Sampling(n=16, temperature=2.0, seed=7)  # encoding "sampled" caches these draws


def setup(n_train: int = 37, n_val: int = 6, delay: float = 0.0):
    """-> (teacher_fn, splits, identity).  teacher_fn maps each token id to a fixed
    random logit row, so logits depend only on the input ids, not on batch layout."""
    g = torch.Generator().manual_seed(1234)
    table = torch.randn(VOCAB, VOCAB, generator=g) * 4.0
    splits = {"train": torch.randint(0, VOCAB, (n_train, SEQ_LEN), generator=g),
              "val": torch.randint(0, VOCAB, (n_val, SEQ_LEN), generator=g)}

    def teacher_fn(x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        if delay:
            time.sleep(delay)
        return table[x]

    identity = {"teacher_config_hash": "cfg", "teacher_weights_hash": "w", "tokenizer_hash": "tok",
                "data_fingerprint": "data", "seq_len": str(SEQ_LEN), "vocab_size": str(VOCAB)}
    return teacher_fn, splits, identity


def write(cache_dir, delay: float = 0.0, **kw) -> Path:
    teacher_fn, splits, identity = setup(delay=delay)
    kw = {"k": K, "batch_size": 2, "shard_sequences": 4, "progress": False, **kw}
    if kw.get("encoding") == "sampled":  # the teacher is then called with the draws' keys too
        kw.setdefault("sampling", SAMPLING)
        return write_cache(Path(cache_dir), lambda x, keys: teacher_fn(x), splits, identity=identity, **kw)
    return write_cache(Path(cache_dir), teacher_fn, splits, identity=identity, **kw)


def dist_worker(rank: int, world_size: int, init_file: str, cache_dir: str, encoding: str) -> None:
    """torch.multiprocessing.spawn target: one rank of a gloo group writing one cache."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        write(cache_dir, encoding=encoding, rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()


def split_dirs_worker(rank: int, world_size: int, init_file: str, root: str) -> None:
    """Each rank of a gloo group writes the one cache to a dir of its own (node-local disks):
    writes what it raised to root/outcome.r{rank}."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    outcome = "ok"
    try:
        write(Path(root) / f"node{rank}", rank=rank, world_size=world_size)
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        (Path(root) / f"outcome.r{rank}").write_text(outcome)
        dist.destroy_process_group()


def lockstep_worker(rank: int, world_size: int, init_file: str, cache_dir: str, fail_rank: int = -1) -> None:
    """Like dist_worker, but teacher_fn is a collective, as a ZeRO-3 teacher's forward is:
    each call all-reduces, so unequal call counts across ranks fail (60 s timeout) instead
    of passing.  Rank `fail_rank` gets a full disk after its first shard.  Writes this
    rank's call count and outcome to cache_dir/calls.r{rank} and outcome.r{rank}."""
    import errno
    from datetime import timedelta

    import torch.distributed as dist

    import teachers.cache.writer as cache_mod

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    teacher_fn, splits, identity = setup()
    calls = 0

    def collective_teacher(x):
        nonlocal calls
        calls += 1
        dist.all_reduce(torch.ones(1))
        return teacher_fn(x)

    if rank == fail_rank:
        real, shard_writes = cache_mod._write_all, []

        def full_disk_after_one_shard(f, data):
            if f.name.endswith(".safetensors") or ".safetensors." in f.name:
                shard_writes.append(f.name)
                if len(shard_writes) > 1:
                    raise OSError(errno.ENOSPC, "No space left on device")
            real(f, data)

        cache_mod._write_all = full_disk_after_one_shard
    outcome = "ok"
    try:
        write_cache(Path(cache_dir), collective_teacher, splits, identity=identity, k=K, batch_size=2,
                    shard_sequences=4, progress=False, rank=rank, world_size=world_size, lockstep=True)
    except Exception as e:  # noqa: BLE001 - the test reads the outcome
        outcome = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    (Path(cache_dir) / f"calls.r{rank}").write_text(str(calls))
    (Path(cache_dir) / f"outcome.r{rank}").write_text(outcome)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cache_dir")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--encoding", default="lossless")
    a = p.parse_args()
    torch.set_num_threads(1)
    write(a.cache_dir, delay=a.delay, encoding=a.encoding)
