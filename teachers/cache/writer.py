"""Teacher-signal cache: pay for the teacher's forward pass once, replay it from disk.

Layout of a cache dir:
    manifest.json                      identity, k, encoding, per split its shards
    {split}-r{rank}-s{first:09d}.safetensors  one shard = up to `shard_sequences` sequences from `first`
                                       (`-{idx:05d}` before 2026-12-05: still read and reused)
    manifest.r{rank}.json              per-rank partial manifest (multi-rank runs only)
    .lock / .lock.r{rank}              fcntl locks held by a running writer

A shard holds the codec's arrays (see codec.py) plus `invalid` (n,) int64: flat
token indices (sequence * seq_len + position, within the shard) whose teacher logits held
NaN/+inf (or were all -inf).  Those tokens store a placeholder signal, uniform over the
vocab (ids 0..k-1, log-prob -log V), and `CacheReader.read` returns them as not valid so
training can mask them; the manifest counts them as `nonfinite_tokens`.

Difficulty statistics (when the writer is given each position's next token, as
`distill cache` does): `token_stats` (n_tokens, 3) fp16, the teacher's nll of the true next
token, entropy and top-1 probability at T = 1, and `sequence_stats` (n_sequences, 4) fp32,
their means over the sequence's training targets and the targets' count
(losses/difficulty.py).  They live in the shards, so the manifest's sha256 covers them;
the manifest lists their names under `difficulty`.  A shard written without them is not
reused by a run that wants them.

Stored positions: given the next tokens, a shard stores the signal (and `entropy`,
`token_stats`) at the training targets only, with their positions as bits (`stored`; the
layout is in rows.py); the manifest says `stored: {positions: targets, group: 32}`, each
entry its `stored_tokens`.  On chat data the prompts, often half the tokens, cost nothing.

Crash safety: every file is written to a temp file in the same dir, fsynced, renamed over
the target, and the dir fsynced; the manifest is rewritten that way after each shard.  A
rerun keeps every listed shard whose sha256 still matches and recomputes the rest; shard
bytes are deterministic (no timestamps), so the result is byte-identical to an
uninterrupted run.

Ranks: rank r of W caches the contiguous slice [N*r//W, N*(r+1)//W) of every split, so
each shard covers a contiguous range of global sequence indices and the reader serves
them in global order whatever W was.  After the last shard, ranks synchronise
(torch.distributed if initialised, else whichever rank finishes last) and the per-rank
manifests are merged into manifest.json.

Reading, verifying and describing a cache live in reader.py; the format's shared names
and errors in format.py.
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import inspect
import json
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from common.fsutil import try_lock, unlock, write_file_atomically
from common.progress import progress_bar
from teachers.cache.codec import get_codec, safetensors_bytes
from teachers.cache.format import (MANIFEST, CacheLocked, CacheMismatch, CacheWriteError, Sampling, format_version, identity_diffs,
                                   mismatch_error, read_json, sha256_file)
from teachers.cache.rows import STORE_GROUP, encoded_rows
from losses.difficulty import STATS, sequence_difficulty
from losses.signal import TeacherSignal, placeholder_invalid, sample_signal, topk_logprobs
from teachers.protocol import TeacherUnavailable, token_ids

# Shards and their temp files (fsutil writes `.NAME.tmpPID` beside NAME).
_SHARD_RE = re.compile(r"^\.?.+-r(?P<rank>\d+)-(\d{5}|s\d{9})\.safetensors(\.tmp\d+)?$")
_PART_RE = re.compile(r"^manifest\.r(?P<rank>\d+)\.json$")
_MANIFEST_TMP_RE = re.compile(r"^\.manifest(\.r\d+)?\.json\.tmp\d+$")


# ------------------------------------------------------------------ file helpers
def _write_all(f, data: bytes) -> None:
    """The single place cache bytes hit a file (tests inject ENOSPC here)."""
    f.write(data)


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        write_file_atomically(path, data, write=lambda f, d: _write_all(f, d))
    except OSError as e:
        raise CacheWriteError(e.errno or errno.EIO, f"could not write {path}: {e.strerror or e}", str(path)) from e


def _dump(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


class _Lock:
    """Non-blocking exclusive fcntl lock on cache_dir/.lock (rank 0) or .lock.r{rank}."""

    def __init__(self, cache_dir: Path, rank: int):
        self.path = cache_dir / (".lock" if rank == 0 else f".lock.r{rank}")
        self.fd, holder = try_lock(self.path)
        if self.fd is None:
            raise CacheLocked(f"cache dir {cache_dir} is being written by another process (pid {holder} "
                              f"holds {self.path}); wait for it to finish or use another cache dir")

    def release(self) -> None:
        unlock(self.fd)


class _Sync:
    """Cross-rank agreement: torch.distributed when initialised, else a no-op."""

    def __init__(self, world_size: int):
        self.on = world_size > 1 and dist.is_available() and dist.is_initialized()
        if self.on and dist.get_world_size() != world_size:
            raise ValueError(f"world_size={world_size} but torch.distributed has {dist.get_world_size()} ranks")

    def any_failed(self, failed: bool) -> bool:
        """Collective: True if any rank passed failed=True (doubles as a barrier)."""
        if not self.on:
            return failed
        return bool(self.max(int(failed)))

    def max(self, value: int) -> int:
        """Collective: the largest value any rank passed."""
        if not self.on:
            return value
        t = torch.tensor([value], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _comm_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo and the rest take CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------ identity
def _full_identity(identity: Mapping, k: int, encoding: str, seq_len: int) -> dict[str, str]:
    ident = {key: str(v) for key, v in identity.items()}
    if "vocab_size" not in ident:
        raise ValueError("identity must include 'vocab_size'")
    if ident.setdefault("seq_len", str(seq_len)) != str(seq_len):
        raise ValueError(f"identity seq_len={ident['seq_len']} but the blocks have length {seq_len}")
    ident.update(k=str(k), encoding=encoding)
    return ident


# ------------------------------------------------------------------ writer
def _topk(out, k: int, vocab_size: int, targets: torch.Tensor | None):
    """teacher_fn's output -> ids (B*T, k) int64, logprobs (B*T, k) fp32, bad (B*T,) bool,
    None (no entropy), difficulty (B*T, 3) fp32 or None.

    out is logits (B, T, V), or their top-k already, (values, ids) of shape (B, T, k) each
    (LiveTeacher.topk, which never holds the whole logits), then with the difficulty
    (B, T, 3) of `targets` as a third element when targets (B, T) were asked for.  Either way the log-probs come
    from `topk_logprobs`, the arithmetic of TeacherSignal.from_logits, so cached and live
    signals agree; only (B*T, k) results (and the (B*T, 3) difficulty) leave the device.  A row with NaN or +inf (or all
    -inf) comes out NaN: that flags it, and it gets the uniform placeholder (see the
    module docstring).
    """
    difficulty = None
    if isinstance(out, tuple):
        vals, ids, *rest = out
        if targets is not None:
            difficulty = _difficulty_of(rest[0] if rest else None, vals.shape[:2])
        if vals.dim() != 3 or vals.shape[-1] != k or ids.shape != vals.shape:
            raise ValueError(f"teacher_fn returned top-k of shapes {tuple(vals.shape)}, {tuple(ids.shape)}; "
                             f"expected (B, T, {k}) each")
    elif out.dim() != 3 or out.shape[-1] != vocab_size:
        raise ValueError(f"teacher_fn returned {tuple(out.shape)}, expected (B, T, {vocab_size})")
    elif targets is None:
        vals, ids = topk_logprobs(out, k)
    else:
        vals, ids, difficulty = topk_logprobs(out, k, targets.to(out.device))
        difficulty = difficulty.reshape(-1, len(STATS)).cpu()
    vals, ids, valid = placeholder_invalid(vals.reshape(-1, k).float(), ids.reshape(-1, k), vocab_size)
    return ids.cpu(), vals.cpu(), ~valid.cpu(), None, difficulty


def _accepts(fn, name: str) -> bool:
    """Whether fn takes the keyword argument `name`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: it cannot be asked
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _difficulty_of(stats, lead) -> torch.Tensor:
    """A sparse teacher output's difficulty (B, T, 3) -> (B*T, 3) fp32 on the CPU."""
    if stats is None or tuple(stats.shape) != (*lead, len(STATS)):
        got = None if stats is None else tuple(stats.shape)
        raise ValueError(f"teacher_fn was given targets but returned difficulty of shape {got}; expected "
                         f"({lead[0]}, {lead[1]}, {len(STATS)}) (see losses/difficulty.py)")
    return stats.reshape(-1, len(STATS)).float().cpu()


def _sampled(out, sampling: Sampling, vocab_size: int, keys: torch.Tensor, targets: torch.Tensor | None):
    """teacher_fn's output for a sampled cache -> ids (B*T, w), their log-probs (B*T, w) (the
    exact head, then log(m * count / n); w = `sampling.width`), bad (B*T,), entropy (B*T,),
    difficulty (B*T, 3) or None.  out is logits (B, T, V) (drawn here) or the sampled
    TeacherSignal a chunked live teacher drew with the same seed and keys (carrying the
    difficulty of `targets` when they were asked for).  A token whose logits were not finite
    gets w distinct placeholder ids, uniform (so every draw has count 1), and is flagged."""
    n = sampling.width
    if not isinstance(out, TeacherSignal):
        if out.dim() != 3 or out.shape[-1] != vocab_size:
            raise ValueError(f"teacher_fn returned {tuple(out.shape)}, expected (B, T, {vocab_size})")
        out = sample_signal(out, sampling.n, sampling.temperature, sampling.seed, keys, targets,  # one pass,
                            exact_top=sampling.exact_top)  # difficulty too
    difficulty = None if targets is None else _difficulty_of(out.difficulty, out.topk_ids.shape[:2])
    sig = out.flatten()
    ids = torch.zeros(sig.topk_ids.shape[0], n, dtype=torch.int64)
    vals = torch.full((sig.topk_ids.shape[0], n), float("-inf"))
    ids[:, :sig.k], vals[:, :sig.k] = sig.topk_ids.cpu(), sig.topk_logprobs.float().cpu()
    entropy = sig.entropy.float().cpu()
    bad = ~torch.isfinite(entropy)
    if bool(bad.any()):  # the sampled form of `placeholder_invalid`: n distinct ids drawn once each, which
        # the sampled codec stores like any row (the online signal, never stored, takes one id drawn n times: live.py)
        ids[bad] = torch.arange(n)
        vals[bad] = -math.log(n)
        entropy[bad] = 0.0
    return ids, vals, bad, entropy, difficulty


def _damaged_shards(cache_dir: Path, manifest: dict) -> list[str]:
    """The shards of a complete manifest that are missing or have another size (a stat each;
    a same-size change is for `inspect --verify`, which reads every sha256)."""
    entries = [e for split in manifest.get("splits", {}).values() for e in split.get("shards", [])]
    return [e["file"] for e in entries
            if not (cache_dir / e["file"]).is_file() or (cache_dir / e["file"]).stat().st_size != e["bytes"]]


def input_sha256(blocks: torch.Tensor) -> str:
    """A shard's input, (n, T) token ids, as the manifest records it: what a resumed cache
    checks before it keeps the shard."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _entry_ok(cache_dir: Path, entry: dict, input_hash: str) -> bool:
    """An earlier run's shard is reusable if it was computed from the same input (input_hash:
    `input_sha256` of the blocks it covers now) and its bytes still match its record."""
    if entry.get("input_sha256") != input_hash:
        return False
    path = cache_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def _clear(cache_dir: Path, rank: int, world_size: int) -> None:
    """overwrite=True: each rank removes only its own files (no cross-rank race); rank 0
    also removes manifest.json and files of ranks >= world_size.  Nothing else is touched."""
    for p in cache_dir.iterdir():
        m = _SHARD_RE.match(p.name) or _PART_RE.match(p.name)
        owner = int(m.group("rank")) if m else None
        if owner == rank or (rank == 0 and (p.name == MANIFEST or (owner is not None and owner >= world_size))):
            p.unlink()


def write_cache(cache_dir: Path, teacher_fn: Callable[[torch.Tensor], torch.Tensor],
                splits: Mapping[str, torch.Tensor], *, identity: Mapping, k: int = 64,
                encoding: str = "lossless", batch_size: int = 8, shard_sequences: int = 256,
                overwrite: bool = False, rank: int = 0, world_size: int = 1,
                progress: bool = True, lockstep: bool = False, sampling: Sampling | None = None,
                targets: Mapping[str, torch.Tensor] | None = None, upgrade: bool = False,
                positions: Mapping[str, torch.Tensor] | None = None, notes: Mapping | None = None) -> Path:
    """Run the teacher over every split's blocks (N_split, T) once and cache its signal.
    Returns cache_dir.  Raises CacheMismatch, CacheLocked, CacheWriteError (module docstring).

    teacher_fn: LongTensor (B, T) -> logits (B, T, V), V = identity["vocab_size"], or their
      top-k (values, ids), (B, T, k) each (see `_topk`); called under torch.no_grad on batches
      of `batch_size` sequences taken in order within each shard.
    identity: strings naming teacher config/weights, tokenizer and data (k, encoding and
      seq_len are added).
    lockstep: teacher_fn is a collective (a ZeRO-3 sharded teacher gathers its weights from
      every rank), so every rank calls it equally often; a rank with less left to do runs
      padding batches, whose output is dropped.
    sampling: cache n sampled tokens per position instead of the top-k (encoding "sampled",
      k = `Sampling.width`); teacher_fn is then called as teacher_fn(x, keys), keys (B, T)
      from `Sampling.keys` (split and token index), and may return logits or the sampled
      signal it drew itself with `sample_signal(..., sampling.seed, keys)` (see `_sampled`).
    targets: per split the (N, T) next-token ids of the blocks, a token that is no training
      target marked -(id + 1) (teachers.protocol.untrained).  The teacher's difficulty
      statistics are then stored too (losses/difficulty.py), per token as `token_stats`
      (N*T, 3) fp16 and per sequence over its training targets as `sequence_stats` (N, 4)
      fp32, and the signal only at targets.  teacher_fn is called with `targets=` (B, T)
      plain ids if it takes that argument and returns them with its output; one that does
      not must return logits, and the writer computes them.
    upgrade: a complete cache made without difficulty statistics is recomputed with them
      (one more teacher pass; the run's data selection needs them); else it is returned as
      it is.
    positions: per split the (N, T) position ids of the blocks' inputs, restarting per
      packed row (data.packing: documents); teacher_fn is then called with `position_ids=`
      (B, T) too, so each row is scored alone.
    notes: more keys for the manifest (a server teacher's probe, checked by its caller on
      resume).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (sampling is not None) != (encoding == "sampled"):
        raise ValueError("encoding 'sampled' is the one encoding of a sampled cache (and only of one)")
    k = sampling.width if sampling is not None else k
    version = format_version(sampling)
    codec = get_codec(encoding, sampling.exact_top if sampling is not None else 0)
    seq_len = _seq_len(splits, targets, positions)
    ident = _full_identity({**identity, **(sampling.identity() if sampling else {})}, k, encoding, seq_len)
    vocab = int(ident["vocab_size"])
    if not 0 < k <= vocab:
        raise ValueError(f"k={k} must be in [1, vocab_size={vocab}]")
    counts = {name: int(t.shape[0]) for name, t in splits.items()}
    sync = _Sync(world_size)

    lock = err = final = partial = None
    try:  # lock, then refuse a different setup; every rank must reach the collective below
        lock = _Lock(cache_dir, rank)
        final, partial = _existing(cache_dir, ident, counts, overwrite, rank, world_size)
    except BaseException as e:
        err = e
    if sync.any_failed(err is not None):
        if lock is not None:
            lock.release()
        raise err or RuntimeError("another rank refused the cache dir; see its error")
    try:
        stats = list(STATS) if targets is not None else None
        stored = {"positions": "targets", "group": min(STORE_GROUP, seq_len)} if targets is not None else {"positions": "all"}
        if final and final.get("complete") and not (upgrade and stats and final.get("difficulty") != stats):
            damaged = _damaged_shards(cache_dir, final)
            if not damaged:
                return cache_dir
            if rank == 0:  # the shards whose bytes still match (sha256) are kept; these are computed again
                print(f"[cache] {len(damaged)} shard(s) of the cache at {cache_dir} are missing or have another size "
                      f"than the manifest says ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}); "
                      f"computing them again", file=sys.stderr, flush=True)
        prior = _earlier_shards([final, *partial], stats, stored)
        manifest = dict(format_version=version, identity=ident, k=k, encoding=encoding, vocab_size=vocab,
                        seq_len=seq_len, world_size=world_size, shard_sequences=shard_sequences, complete=False,
                        stored=stored, **(notes or {}),
                        splits={s: {"sequences": n, "shards": [], "tokens": 0, "nonfinite_tokens": 0}
                                for s, n in counts.items()})
        if stats is not None:
            manifest["difficulty"] = stats
        path = cache_dir / (MANIFEST if world_size == 1 else f"manifest.r{rank}.json")
        try:
            _run(cache_dir, teacher_fn, splits, codec, manifest, path, prior, rank, world_size,
                 batch_size, shard_sequences, progress, sync if lockstep else None, sampling, targets, positions)
        except BaseException:
            sync.any_failed(True)
            raise
        if sync.any_failed(False):
            raise RuntimeError("another rank failed while caching; finished shards are kept, rerun to resume")
        _publish(cache_dir, manifest, sync, rank, world_size)
        return cache_dir
    finally:
        lock.release()


def _seq_len(splits: Mapping[str, torch.Tensor], targets: Mapping | None, positions: Mapping | None) -> int:
    """T of the splits' (N, T) blocks, which targets and positions (if given) match split by split."""
    lens = {t.shape[1] for t in splits.values()}
    if len(lens) != 1 or any(t.dim() != 2 for t in splits.values()):
        raise ValueError(f"every split must be a (N, T) block tensor of one T; got lengths {sorted(lens)}")
    for name, given in (("targets", targets), ("positions", positions)):
        if given is not None and (set(given) != set(splits) or any(given[n].shape != splits[n].shape for n in splits)):
            raise ValueError(f"{name} must give every split a tensor of its blocks' shape (N, T)")
    return lens.pop()


def _earlier_shards(manifests: list[dict | None], stats: list[str] | None, stored: dict) -> dict[str, dict[int, list[dict]]]:
    """Finished shards of earlier runs (manifest.json, every rank's partial one), on any number of
    ranks: split -> first sequence -> their entries.  One written without (or with other)
    difficulty statistics, or storing other positions, is left out: it is computed again."""
    prior: dict[str, dict[int, list[dict]]] = {}
    for old in manifests:
        if old and old.get("difficulty") == stats and old.get("stored", {"positions": "all"}) == stored:
            for split, s in old["splits"].items():
                for e in s["shards"]:
                    prior.setdefault(split, {}).setdefault(e["sequences"][0], []).append(e)
    return prior


def _publish(cache_dir: Path, manifest: dict, sync: _Sync, rank: int, world_size: int) -> None:
    """Every rank's shards are written: one process cleans up; several merge their manifests into
    manifest.json (rank 0, or without a process group whichever rank ends last).  Every rank calls
    it (a collective), and raises if the merge failed."""
    err = None
    if world_size == 1:
        _cleanup(cache_dir, manifest)
    elif rank == 0 or not sync.on:
        try:
            if not _merge(cache_dir, world_size, cleanup=sync.on) and sync.on:  # every rank has finished
                missing = [f"manifest.r{r}.json" for r in range(world_size)
                           if not (read_json(cache_dir / f"manifest.r{r}.json") or {}).get("complete")]
                raise CacheWriteError(
                    f"cache at {cache_dir}: rank 0 does not see the finished {', '.join(missing)} the other "
                    f"rank(s) wrote (a node-local disk?); every rank writes one cache dir, so put it on a "
                    f"filesystem all nodes share (cache.dir), then rerun: the shards rank 0 sees are kept")
        except BaseException as e:
            err = e
    if sync.any_failed(err is not None):
        raise err or CacheWriteError(f"cache at {cache_dir}: rank 0 could not merge the per-rank manifests; "
                                     f"its error says why")


def _existing(cache_dir: Path, ident: dict, counts: dict, overwrite: bool, rank: int, world_size: int):
    """-> (manifest.json or None, [every rank's partial manifest]): an earlier run's, on any
    number of ranks; (None, []) when overwritten.  Raises CacheMismatch when one was written
    for another identity or other splits."""
    if overwrite:  # before parsing: a corrupt manifest must not block --overwrite
        _clear(cache_dir, rank, world_size)
        return None, []
    final = read_json(cache_dir / MANIFEST)
    partial = [read_json(p) for p in sorted(cache_dir.glob("manifest.r*.json")) if _PART_RE.match(p.name)]
    for old in filter(None, (final, *partial)):
        diffs = identity_diffs(old.get("identity", {}), ident)
        old_counts = {s: v["sequences"] for s, v in old.get("splits", {}).items()}
        if old_counts != counts:
            diffs.append(f"splits: {old_counts} (cache) vs {counts} (requested)")
        if diffs:
            raise mismatch_error(cache_dir, diffs)
    return final, partial


def _plan(cache_dir: Path, splits: Mapping[str, torch.Tensor], prior: dict, rank: int, world_size: int,
          shard_sequences: int, progress: bool = False) -> list[tuple[str, dict, bool]]:
    """This rank's shards in order: (split, manifest entry, reused from an earlier run).

    A rank takes sequences [n * rank / world, n * (rank + 1) / world) of each split, in shards
    of `shard_sequences`.  An earlier run's finished shard (prior: split -> first sequence ->
    entries, from runs on any number of ranks) is reused where it starts at the next sequence,
    ends inside the range and still matches its input and bytes; a new shard ends where the
    next such shard starts.  So a cache killed on 8 ranks resumes on 4, or on 1.  Only the
    earlier shards' inputs are read here, and their bytes (a sha256 each, under a progress bar:
    minutes for a large cache); a new shard's input (its input_sha256) when it is computed."""
    ranges = {}  # split -> this rank's [lo, hi)
    candidates = []  # (split, first sequence, the earlier shards that start there and fit)
    for split, blocks in splits.items():
        n = blocks.shape[0]
        ranges[split] = lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        for s0, entries in prior.get(split, {}).items():
            fits = [e for e in entries if lo <= s0 < e["sequences"][1] <= hi]
            if fits:
                candidates.append((split, s0, fits))
    done = {split: {} for split in splits}  # split -> first sequence -> a finished shard that still holds
    with progress_bar(len(candidates), "cache: checking earlier shards", progress and bool(candidates)) as bar:
        for split, s0, fits in candidates:
            blocks = splits[split]
            ok = next((e for e in fits
                       if _entry_ok(cache_dir, e, input_sha256(blocks[e["sequences"][0]:e["sequences"][1]]))), None)
            if ok is not None:
                done[split][s0] = ok
            bar.update(1)
    plan = []
    for split, blocks in splits.items():
        lo, hi = ranges[split]
        done_here = done[split]
        starts = sorted(done_here)
        s0 = lo
        while s0 < hi:
            if s0 in done_here:
                plan.append((split, done_here[s0], True))
                s0 = done_here[s0]["sequences"][1]
                continue
            after = bisect.bisect_right(starts, s0)  # the next kept shard's start, if any
            s1 = min(s0 + shard_sequences, hi, starts[after] if after < len(starts) else hi)
            # Named by its first sequence: unique whatever layout earlier runs' reused shards had.
            plan.append((split, {"file": f"{split}-r{rank}-s{s0:09d}.safetensors", "sequences": [s0, s1],
                                 "tokens": (s1 - s0) * blocks.shape[1]}, False))
            s0 = s1
    return plan


class _TeacherCalls:
    """teacher_fn, called with the arguments it takes, and counted: under lockstep every rank
    makes `total` calls, a rank with less left to do (or that failed outside the teacher)
    padding with dummy batches whose output is dropped."""

    def __init__(self, teacher_fn, manifest: dict, sampling: Sampling | None, total: int):
        self.fn, self.sampling, self.total = teacher_fn, sampling, total
        self.k, self.vocab, self.seq_len = manifest["k"], manifest["vocab_size"], manifest["seq_len"]
        self.calls, self.in_teacher = 0, False
        self.takes_targets = _accepts(teacher_fn, "targets")  # else it returns logits and the stats are computed here
        # A teacher that can skip positions computes the signal at the stored ones only (rows.py).
        self.takes_where = self.takes_targets and _accepts(teacher_fn, "where")

    @torch.no_grad()
    def __call__(self, x, keys, t, p=None, w=None):
        """x: (B, T) ids; keys: the draws' keys of a sampled cache (sampling.keys), else None; t:
        (B, T) plain next-token ids when difficulty statistics are kept, else None; p: (B, T)
        position ids of packed rows, else None; w: (B, T) bool, the positions that are stored
        (training targets), else None."""
        self.calls, self.in_teacher = self.calls + 1, True
        args = (x,) if keys is None else (x, keys)
        kwargs = ({"targets": t} if t is not None and self.takes_targets else {}) | ({} if p is None else {"position_ids": p})
        if w is not None and self.takes_where:
            kwargs["where"] = w
        out = self.fn(*args, **kwargs)
        self.in_teacher = False
        return out

    def signal(self, split: str, x, first_seq: int, t, p, w):
        """-> (ids, vals, bad, entropy or None, difficulty or None) of sequences first_seq.. of `split`."""
        keys = None if self.sampling is None else self.sampling.keys(split, range(first_seq, first_seq + x.shape[0]),
                                                                     self.seq_len)
        out = self(x, keys, t, p, w)
        return _topk(out, self.k, self.vocab, t) if keys is None else _sampled(out, self.sampling, self.vocab, keys, t)

    def pad_to_total(self, dummy: torch.Tensor | None, with_targets: bool) -> None:
        """dummy: (B, T) ids, any real ones (None only where every split is empty: no calls)."""
        while self.calls < self.total:
            keys = None if self.sampling is None else self.sampling.keys("padding", range(len(dummy)), self.seq_len)
            self(dummy, keys, torch.zeros_like(dummy) if with_targets else None)


def _compute_shard(teacher: _TeacherCalls, split: str, entry: dict, x: torch.Tensor, t: torch.Tensor | None,
                   pos: torch.Tensor | None, batch_size: int, bar) -> tuple:
    """The teacher's signal over one shard's sequences, in batches of `batch_size`.  x: (n, T)
    ids; t: (n, T) next-token ids, a token that is no training target -(id + 1), or None; pos:
    (n, T) position ids or None.  -> (ids, vals (n*T, k); bad (n*T,); entropy (n*T,) or None;
    difficulty (n*T, 3) or None)."""
    s0, s1 = entry["sequences"]
    plain = None if t is None else token_ids(t)
    outs = []
    try:
        for b0 in range(0, len(x), batch_size):
            b = slice(b0, b0 + batch_size)
            outs.append(teacher.signal(split, x[b], s0 + b0, None if plain is None else plain[b],
                                       None if pos is None else pos[b], None if t is None else t[b] >= 0))
            bar.update(len(x[b]), info=f"{split} shard {entry['file']}")
    except TeacherUnavailable as e:  # name the shard it stopped in
        raise TeacherUnavailable(f"cache shard {entry['file']} ({split} sequences {s0}-{s1}): {e}") from None
    ids, vals, bad = (torch.cat(o) for o in list(zip(*outs))[:3])
    entropy = None if teacher.sampling is None else torch.cat([o[3] for o in outs])
    difficulty = None if t is None else torch.cat([o[4] for o in outs])
    return ids, vals, bad, entropy, difficulty


def _encode_shard(codec, manifest: dict, split: str, entry: dict, ids, vals, bad, entropy, difficulty,
                  trained) -> bytes:
    """One shard's safetensors bytes.  ids, vals (n*T, k); bad, entropy (n*T,); difficulty
    (n*T, 3); trained (n, T) bool or None.  With `trained`, only the training targets are
    stored (teachers/cache/rows.py), and `entry` gets their count."""
    seq_len = manifest["seq_len"]
    arrays, group, rows = {}, seq_len, None
    if difficulty is not None:  # per sequence over its valid training targets
        per_seq = sequence_difficulty(difficulty.view(-1, seq_len, len(STATS)), trained & ~bad.view(-1, seq_len))
        arrays["sequence_stats"] = per_seq.numpy()
    if trained is not None:
        arrays["stored"] = np.packbits(trained.numpy(), axis=1)
        group = manifest["stored"]["group"]
        rows = torch.from_numpy(encoded_rows(trained.numpy(), group))
        entry.update(stored_tokens=int(trained.sum()), rows=len(rows))
    pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731  token rows -> encoded rows
    arrays.update(codec.encode(pick(ids).numpy(), pick(vals).numpy(), manifest["vocab_size"], group=group))
    arrays["invalid"] = np.flatnonzero(bad.numpy()).astype(np.int64)  # flat token indices, stored or not
    if entropy is not None:  # sampled: the teacher's entropy at T makes the KL's value unbiased
        arrays["entropy"] = pick(entropy).numpy().astype(np.float16)
    if difficulty is not None:
        arrays["token_stats"] = pick(difficulty).numpy().astype(np.float16)
    meta = {"format": "distill-topk-cache", "format_version": str(manifest["format_version"]), "encoding": codec.name,
            "k": str(manifest["k"]), "vocab_size": str(manifest["vocab_size"]), "seq_len": str(seq_len),
            "split": split, "sequences": f"{entry['sequences'][0]}-{entry['sequences'][1]}"}
    return safetensors_bytes(arrays, meta)


def _run(cache_dir, teacher_fn, splits, codec, manifest, manifest_path, prior, rank, world_size,
         batch_size, shard_sequences, progress, lockstep: _Sync | None, sampling: Sampling | None,
         targets: Mapping[str, torch.Tensor] | None, positions: Mapping[str, torch.Tensor] | None = None) -> None:
    """Compute, encode and write this rank's shards; encoding+writing of shard i overlaps
    the teacher's work on shard i+1 (one background thread, at most one shard in flight).

    lockstep: every rank calls teacher_fn `total` times.  If this rank fails outside the
    teacher (a shard write on a full disk, say), it still makes its remaining calls with a
    padding batch before raising, so the other ranks' collective forwards complete and the
    failure reaches them at the next agreement.  A failure *inside* a collective teacher
    (one rank out of memory) cannot be rescued this way: the launcher's timeout ends it.
    """
    plan = err = None
    try:
        plan = _plan(cache_dir, splits, prior, rank, world_size, shard_sequences, progress)
    except Exception as e:
        err = e
    failed = lockstep.any_failed(err is not None) if lockstep is not None else err is not None
    if failed:
        raise err or RuntimeError("another rank could not plan its shards; see its error")
    kept = sum(reuse for _, _, reuse in plan)
    if progress and kept:
        print(f"[cache] rank {rank}: {kept} of {len(plan)} shard(s) kept from an earlier run", file=sys.stderr, flush=True)
    forwards = sum(-(-(e["sequences"][1] - e["sequences"][0]) // batch_size) for _, e, reuse in plan if not reuse)
    teacher = _TeacherCalls(teacher_fn, manifest, sampling, lockstep.max(forwards) if lockstep is not None else forwards)
    # padding calls' input (lockstep): any real ids; there are some whenever a rank has calls to make
    dummy = next((t[:batch_size].to(torch.int64) for t in splits.values() if t.shape[0]), None)

    def record(split, entry):
        s = manifest["splits"][split]
        s["shards"].append(entry)
        s.update(_split_totals(s["shards"]))
        _atomic_write(manifest_path, _dump(manifest))

    def finish(split, entry, *signal, trained):
        data = _encode_shard(codec, manifest, split, entry, *signal, trained)
        _atomic_write(cache_dir / entry["file"], data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), nonfinite_tokens=int(signal[2].sum()))
        record(split, entry)

    pending = None  # the shard being encoded and written in the background
    todo = sum(e["sequences"][1] - e["sequences"][0] for _, e, reuse in plan if not reuse)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(todo, "cache", progress) as bar:
            try:
                for split, entry, reuse in plan:
                    if reuse:
                        if pending is not None:
                            pending.result()
                            pending = None
                        record(split, entry)
                        continue
                    s0, s1 = entry["sequences"]
                    x = splits[split][s0:s1].to(torch.int64)
                    entry["input_sha256"] = input_sha256(x)
                    t = None if targets is None else targets[split][s0:s1].to(torch.int64)  # (n, T), signed
                    pos = None if positions is None else positions[split][s0:s1]  # (n, T)
                    signal = _compute_shard(teacher, split, entry, x, t, pos, batch_size, bar)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(finish, split, entry, *signal, trained=None if t is None else t >= 0)
            finally:
                if pending is not None:
                    pending.result()  # a finished shard is recorded even if the teacher failed later
        teacher.pad_to_total(dummy, targets is not None)
    except BaseException:
        if lockstep is not None and not teacher.in_teacher:
            teacher.pad_to_total(dummy, targets is not None)
        raise
    manifest["complete"] = True
    _atomic_write(manifest_path, _dump(manifest))


def _split_totals(shards: list[dict]) -> dict:
    """A split's token counts over its shards: positions, those with no finite signal, stored."""
    return {"tokens": sum(e["tokens"] for e in shards), "nonfinite_tokens": sum(e["nonfinite_tokens"] for e in shards),
            "stored_tokens": sum(e.get("stored_tokens", e["tokens"]) for e in shards)}


def _merge(cache_dir: Path, world_size: int, cleanup: bool) -> bool:
    """Merge complete per-rank manifests into manifest.json; False if some rank is not done."""
    parts = [read_json(cache_dir / f"manifest.r{r}.json") for r in range(world_size)]
    if any(p is None or not p.get("complete") for p in parts):
        return False

    def settings(part: dict) -> dict:  # what makes the shards what they are, the identity's keys one by one
        # (not `notes`: each rank probes a served teacher itself, rounded log-probs that may move a little)
        return {**{k: part.get(k) for k in ("format_version", "k", "encoding", "vocab_size", "seq_len", "stored",
                                            "difficulty", "shard_sequences")}, **part.get("identity", {})}

    ours = settings(parts[0])
    for r, part in enumerate(parts[1:], start=1):  # one cache: the same teacher, signal and layout on every rank
        theirs = settings(part)
        diffs = [f"{key}: {ours.get(key)} (rank 0) vs {theirs.get(key)} (rank {r})"
                 for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
        if diffs:
            raise CacheMismatch(f"cache at {cache_dir}: its ranks computed different caches ({'; '.join(diffs)[:400]}); "
                                f"every rank must run the same config, then `distill cache --overwrite`")
    merged = {key: v for key, v in parts[0].items() if key != "splits"}
    merged["splits"] = {}
    for split in parts[0]["splits"]:
        shards = sorted((e for p in parts for e in p["splits"][split]["shards"]), key=lambda e: e["sequences"][0])
        merged["splits"][split] = {"sequences": parts[0]["splits"][split]["sequences"], "shards": shards,
                                   **_split_totals(shards)}
    _atomic_write(cache_dir / MANIFEST, _dump(merged))
    if cleanup:  # every rank is past its last write: safe to drop leftovers
        _cleanup(cache_dir, merged)
    return True


def _cleanup(cache_dir: Path, manifest: dict) -> None:
    """Remove shard files (and temp files) the complete manifest does not reference, and the
    per-rank manifests it was merged from (or an earlier run's, on other ranks)."""
    keep = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    for p in cache_dir.iterdir():
        if (_SHARD_RE.match(p.name) and p.name not in keep) or _MANIFEST_TMP_RE.match(p.name) or _PART_RE.match(p.name):
            p.unlink(missing_ok=True)
