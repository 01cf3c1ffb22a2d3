"""Teacher-signal cache: pay for the teacher's forward pass once, replay it from disk.

Layout of a cache dir:
    manifest.json                      identity, k, encoding, per split its shards
    {split}-r{rank}-{idx:05d}.safetensors  one shard = up to `shard_sequences` sequences
    manifest.r{rank}.json              per-rank partial manifest (multi-rank runs only)
    .lock / .lock.r{rank}              fcntl locks held by a running writer

A shard holds the codec's arrays (see distill/codec.py) plus `invalid` (n,) int64: flat
token indices (sequence * seq_len + position, within the shard) whose teacher logits held
NaN/+inf (or were all -inf).  Those tokens store a placeholder signal, uniform over the
vocab (ids 0..k-1, log-prob -log V), and `CacheReader.valid` reports them False so
training can mask them; the manifest counts them as `nonfinite_tokens`.

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
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from distill.codec import get_codec, safetensors_bytes, safetensors_header
from distill.fsutil import write_file_atomically
from losses.signal import TeacherSignal

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Shards and their temp files (fsutil writes `.NAME.tmpPID` beside NAME).
_SHARD_RE = re.compile(r"^\.?.+-r(?P<rank>\d+)-\d{5}\.safetensors(\.tmp\d+)?$")
_PART_RE = re.compile(r"^manifest\.r(?P<rank>\d+)\.json$")
_MANIFEST_TMP_RE = re.compile(r"^\.manifest(\.r\d+)?\.json\.tmp\d+$")


class CacheMismatch(ValueError):
    """The cache dir holds a cache for a different teacher/tokenizer/data/k/encoding."""


class CacheLocked(RuntimeError):
    """Another process is writing this cache dir."""


class CacheCorrupt(ValueError):
    """A shard or the manifest disagrees with what was written."""


class CacheWriteError(OSError):
    """Writing a cache file failed (disk full, permissions); earlier files are intact."""


# ------------------------------------------------------------------ file helpers
def _write_all(f, data: bytes) -> None:
    """The single place cache bytes hit a file (tests inject ENOSPC here)."""
    f.write(data)


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        write_file_atomically(path, data, write=lambda f, d: _write_all(f, d))
    except OSError as e:
        raise CacheWriteError(e.errno or errno.EIO, f"could not write {path}: {e.strerror or e}", str(path)) from e


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _dump(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorrupt(f"{path} is not valid JSON ({e}); remove it or pass overwrite=True") from e


class _Lock:
    """Non-blocking exclusive fcntl lock on cache_dir/.lock (rank 0) or .lock.r{rank}."""

    def __init__(self, cache_dir: Path, rank: int):
        self.path = cache_dir / (".lock" if rank == 0 else f".lock.r{rank}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise CacheLocked(f"cache dir {cache_dir} is being written by another process (pid {holder} "
                              f"holds {self.path}); wait for it to finish or use another cache dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


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
        flag = torch.tensor([int(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ------------------------------------------------------------------ identity
def _full_identity(identity: Mapping, k: int, encoding: str, seq_len: int) -> dict[str, str]:
    ident = {key: str(v) for key, v in identity.items()}
    if "vocab_size" not in ident:
        raise ValueError("identity must include 'vocab_size'")
    if ident.setdefault("seq_len", str(seq_len)) != str(seq_len):
        raise ValueError(f"identity seq_len={ident['seq_len']} but the blocks have length {seq_len}")
    ident.update(k=str(k), encoding=encoding)
    return ident


def _diff(old: Mapping, new: Mapping, keys=None) -> list[str]:
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{key}: {old.get(key)!r} (cache) vs {new.get(key)!r} (requested)"
            for key in keys if str(old.get(key)) != str(new.get(key))]


def _mismatch(cache_dir: Path, diffs: list[str]) -> CacheMismatch:
    return CacheMismatch(f"cache at {cache_dir} was written for a different setup: " + "; ".join(diffs)
                         + ". Pass --overwrite (overwrite=True) to replace it, or use another cache dir.")


# ------------------------------------------------------------------ writer
def _topk(logits: torch.Tensor, k: int, vocab_size: int):
    """(B, T, V) logits -> ids (B*T, k) int64, logprobs (B*T, k) fp32, bad (B*T,) bool.

    Same arithmetic as TeacherSignal.from_logits (fp32 log_softmax, then topk), so cached
    and live signals are bitwise equal.  Row chunks bound the fp32 copy (~16 MB on CPU,
    so topk re-reads it from cache; ~256 MB on an accelerator).  Only (B*T, k) results
    leave the logits' device.  A row with NaN or +inf (or all -inf) has a NaN log-sum-exp,
    so its top-1 is not finite: that flags it.
    """
    if logits.dim() != 3 or logits.shape[-1] != vocab_size:
        raise ValueError(f"teacher_fn returned {tuple(logits.shape)}, expected (B, T, {vocab_size})")
    flat = logits.reshape(-1, vocab_size)
    rows = max(1, (1 << (22 if flat.device.type == "cpu" else 26)) // vocab_size)
    parts = [torch.topk(torch.log_softmax(flat[i:i + rows].float(), dim=-1), k, dim=-1)
             for i in range(0, flat.shape[0], rows)]
    vals = torch.cat([p.values for p in parts]).cpu()
    ids = torch.cat([p.indices for p in parts]).cpu()
    bad = ~torch.isfinite(vals[:, 0]) | torch.isnan(vals).any(-1)
    ids[bad] = torch.arange(k)
    vals[bad] = -math.log(vocab_size)
    return ids, vals, bad


def _entry_ok(cache_dir: Path, entry: dict | None, want: dict) -> bool:
    """A prior shard entry is reusable if it describes the same work and its bytes match."""
    if entry is None or any(entry.get(key) != want[key] for key in ("file", "sequences", "input_sha256")):
        return False
    path = cache_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and _sha256_file(path) == entry["sha256"]


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
                progress: bool = True) -> Path:
    """Run the teacher over every split's blocks (N_split, T) once and cache its top-k.

    teacher_fn: LongTensor (B, T) -> logits (B, T, V), V = identity["vocab_size"]; it is
    called under torch.no_grad on batches of `batch_size` sequences taken in order within
    each shard.  identity: strings naming teacher config/weights, tokenizer and data
    (k, encoding and seq_len are added).  Returns cache_dir.  Raises CacheMismatch,
    CacheLocked, CacheWriteError (see module docstring).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    codec = get_codec(encoding)
    lens = {t.shape[1] for t in splits.values()}
    if len(lens) != 1 or any(t.dim() != 2 for t in splits.values()):
        raise ValueError(f"every split must be a (N, T) block tensor of one T; got lengths {sorted(lens)}")
    seq_len = lens.pop()
    ident = _full_identity(identity, k, encoding, seq_len)
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
        if final and final.get("complete"):
            return cache_dir
        prior = {e["file"]: e for old in (final, partial) if old for s in old["splits"].values() for e in s["shards"]}
        manifest = dict(format_version=FORMAT_VERSION, identity=ident, k=k, encoding=encoding, vocab_size=vocab,
                        seq_len=seq_len, world_size=world_size, shard_sequences=shard_sequences, complete=False,
                        splits={s: {"sequences": n, "shards": [], "tokens": 0, "nonfinite_tokens": 0}
                                for s, n in counts.items()})
        path = cache_dir / (MANIFEST if world_size == 1 else f"manifest.r{rank}.json")
        try:
            _run(cache_dir, teacher_fn, splits, codec, manifest, path, prior, rank, world_size,
                 batch_size, shard_sequences, progress)
        except BaseException:
            sync.any_failed(True)
            raise
        if sync.any_failed(False):
            raise RuntimeError("another rank failed while caching; finished shards are kept, rerun to resume")
        err = None
        if world_size == 1:
            _cleanup(cache_dir, manifest)
        elif rank == 0 or not sync.on:  # without a process group, whichever rank ends last merges
            try:
                _merge(cache_dir, world_size, cleanup=sync.on)
            except BaseException as e:
                err = e
        if sync.any_failed(err is not None):
            raise err or RuntimeError("rank 0 could not merge the per-rank manifests")
        return cache_dir
    finally:
        lock.release()


def _existing(cache_dir: Path, ident: dict, counts: dict, overwrite: bool, rank: int, world_size: int):
    """-> (manifest.json, this rank's partial manifest), None where absent or overwritten.
    Raises CacheMismatch when either was written for another identity or other splits."""
    if overwrite:  # before parsing: a corrupt manifest must not block --overwrite
        _clear(cache_dir, rank, world_size)
        return None, None
    final = _load_json(cache_dir / MANIFEST)
    partial = _load_json(cache_dir / f"manifest.r{rank}.json") if world_size > 1 else None
    for old in filter(None, (final, partial)):
        diffs = _diff(old.get("identity", {}), ident)
        old_counts = {s: v["sequences"] for s, v in old.get("splits", {}).items()}
        if old_counts != counts:
            diffs.append(f"splits: {old_counts} (cache) vs {counts} (requested)")
        if diffs:
            raise _mismatch(cache_dir, diffs)
    return final, partial


def _run(cache_dir, teacher_fn, splits, codec, manifest, manifest_path, prior, rank, world_size,
         batch_size, shard_sequences, progress) -> None:
    """Compute, encode and write this rank's shards; encoding+writing of shard i overlaps
    the teacher's work on shard i+1 (one background thread, at most one shard in flight)."""
    k, vocab, seq_len = manifest["k"], manifest["vocab_size"], manifest["seq_len"]

    def finish(split, entry, ids, vals, bad):
        arrays = codec.encode(ids.numpy(), vals.numpy(), vocab, group=seq_len)
        arrays["invalid"] = np.flatnonzero(bad.numpy()).astype(np.int64)
        meta = {"format": "distill-topk-cache", "format_version": str(FORMAT_VERSION), "encoding": codec.name,
                "k": str(k), "vocab_size": str(vocab), "seq_len": str(seq_len), "split": split,
                "sequences": f"{entry['sequences'][0]}-{entry['sequences'][1]}"}
        data = safetensors_bytes(arrays, meta)
        _atomic_write(cache_dir / entry["file"], data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), nonfinite_tokens=int(bad.sum()))
        record(split, entry)

    def record(split, entry):
        s = manifest["splits"][split]
        s["shards"].append(entry)
        s["tokens"] = sum(e["tokens"] for e in s["shards"])
        s["nonfinite_tokens"] = sum(e["nonfinite_tokens"] for e in s["shards"])
        _atomic_write(manifest_path, _dump(manifest))

    pending = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for split, blocks in splits.items():
                n = blocks.shape[0]
                lo, hi = n * rank // world_size, n * (rank + 1) // world_size
                for idx, s0 in enumerate(range(lo, hi, shard_sequences)):
                    s1 = min(s0 + shard_sequences, hi)
                    x = blocks[s0:s1].to(torch.int64).contiguous()
                    entry = {"file": f"{split}-r{rank}-{idx:05d}.safetensors", "sequences": [s0, s1],
                             "tokens": (s1 - s0) * blocks.shape[1],
                             "input_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest()}
                    if _entry_ok(cache_dir, prior.get(entry["file"]), entry):
                        if pending is not None:
                            pending.result()
                            pending = None
                        record(split, prior[entry["file"]])
                        continue
                    outs = []
                    with torch.no_grad():
                        for b0 in range(0, s1 - s0, batch_size):
                            outs.append(_topk(teacher_fn(x[b0:b0 + batch_size]), k, vocab))
                    ids, vals, bad = (torch.cat(t) for t in zip(*outs))
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(finish, split, entry, ids, vals, bad)
                    if progress:
                        print(f"[cache] rank {rank}: {split} sequences {s0}-{s1} of {n}", file=sys.stderr, flush=True)
        finally:
            if pending is not None:
                pending.result()  # a finished shard is recorded even if the teacher failed later
    manifest["complete"] = True
    _atomic_write(manifest_path, _dump(manifest))


def _merge(cache_dir: Path, world_size: int, cleanup: bool) -> bool:
    """Merge complete per-rank manifests into manifest.json; False if some rank is not done."""
    parts = [_load_json(cache_dir / f"manifest.r{r}.json") for r in range(world_size)]
    if any(p is None or not p.get("complete") for p in parts):
        return False
    merged = {key: v for key, v in parts[0].items() if key != "splits"}
    merged["splits"] = {}
    for split in parts[0]["splits"]:
        shards = sorted((e for p in parts for e in p["splits"][split]["shards"]), key=lambda e: e["sequences"][0])
        merged["splits"][split] = {"sequences": parts[0]["splits"][split]["sequences"], "shards": shards,
                                   "tokens": sum(e["tokens"] for e in shards),
                                   "nonfinite_tokens": sum(e["nonfinite_tokens"] for e in shards)}
    _atomic_write(cache_dir / MANIFEST, _dump(merged))
    if cleanup:  # every rank is past its last write: safe to drop leftovers
        _cleanup(cache_dir, merged)
    return True


def _cleanup(cache_dir: Path, manifest: dict) -> None:
    """Remove shard files (and temp files) the manifest does not reference."""
    keep = {e["file"] for s in manifest["splits"].values() for e in s["shards"]}
    for p in cache_dir.iterdir():
        if (_SHARD_RE.match(p.name) and p.name not in keep) or _MANIFEST_TMP_RE.match(p.name):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ reader
def _read_header(path: Path, entry: dict, seq_len: int) -> tuple[int, dict]:
    """safetensors_header(path), checked against the shard's manifest entry: raises
    CacheCorrupt naming the shard when it is missing, unreadable, has another size or
    holds another token count."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheCorrupt(f"shard {path.name} listed in the manifest is missing from {path.parent}") from None
    if size != entry["bytes"]:
        raise CacheCorrupt(f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
                           "(truncated or replaced); rerun write_cache to rewrite it")
    try:
        base, tensors, _ = safetensors_header(path)
    except (OSError, ValueError, KeyError) as e:
        raise CacheCorrupt(f"shard {path} is unreadable ({e!r}); rerun write_cache to rewrite it") from None
    # Tokens held: rows of `values` (fixed-width codecs) or groups * seq_len (compact).
    tokens = tensors["values"][1][0] if "values" in tensors else (tensors["offsets"][1][0] - 1) * seq_len
    if tokens != entry["tokens"]:
        raise CacheCorrupt(f"shard {path} holds {tokens} tokens, the manifest says {entry['tokens']}")
    return base, tensors


class CacheReader:
    """Random access to one split of a complete cache, in global sequence order.

    reader.signal(indices) -> TeacherSignal, topk_ids (B, T, k) int64 and topk_logprobs
    (B, T, k) fp32 for sequences `indices` (in that order); reader.valid(indices) -> bool
    (B, T), False where the teacher's logits were not finite.  Shards are memory-mapped
    lazily (at most `max_open` at once); every shard's size and header are checked at
    open, and verify=True also checks every shard's sha256.
    """

    def __init__(self, cache_dir, split: str, verify: bool = False, max_open: int = 64):
        self.dir = Path(cache_dir)
        manifest = _load_json(self.dir / MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {self.dir}: not a teacher cache (run write_cache first)")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CacheCorrupt(f"cache at {self.dir} has format {manifest['format_version']}, newer than this "
                               f"reader's {FORMAT_VERSION}; upgrade the toolkit")
        if not manifest.get("complete"):
            raise CacheCorrupt(f"cache at {self.dir} is incomplete (writer interrupted?); rerun write_cache to resume")
        if split not in manifest["splits"]:
            raise KeyError(f"split {split!r} not in cache {self.dir}; it has {sorted(manifest['splits'])}")
        self.manifest, self.split = manifest, split
        self.k, self.seq_len, self.vocab_size = manifest["k"], manifest["seq_len"], manifest["vocab_size"]
        self.codec = get_codec(manifest["encoding"])
        info = manifest["splits"][split]
        self.shards = sorted(info["shards"], key=lambda e: e["sequences"][0])
        ranges = [tuple(e["sequences"]) for e in self.shards]
        if [r[0] for r in ranges] != [0, *(r[1] for r in ranges)][:len(ranges)] or \
                (ranges[-1][1] if ranges else 0) != info["sequences"]:
            raise CacheCorrupt(f"cache at {self.dir}: shards of split {split!r} do not cover sequences "
                               f"0..{info['sequences']} contiguously")
        self._starts = np.array([r[0] for r in ranges], np.int64)
        self._n = info["sequences"]
        self._headers = [_read_header(self.dir / e["file"], e, self.seq_len) for e in self.shards]
        if verify:
            bad = [e["file"] for e in self.shards if _sha256_file(self.dir / e["file"]) != e["sha256"]]
            if bad:
                raise CacheCorrupt(f"cache at {self.dir}: sha256 mismatch in shard(s) {', '.join(bad)}")
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return self._n

    def check_identity(self, identity: Mapping) -> None:
        """Raise CacheMismatch if any field given in identity differs from the cache's."""
        diffs = _diff(self.manifest["identity"], {key: str(v) for key, v in identity.items()}, sorted(identity))
        if diffs:
            raise _mismatch(self.dir, diffs)

    def _arrays(self, i: int) -> dict:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        base, tensors = self._headers[i]
        # One map (one fd) per shard; plain ndarray views skip np.memmap's per-index cost.
        mm = np.memmap(self.dir / self.shards[i]["file"], dtype=np.uint8, mode="r").view(np.ndarray)
        arrays = {name: mm[base + a: base + b].view(dt).reshape(shape) if b > a else np.zeros(shape, dt)
                  for name, (dt, shape, a, b) in tensors.items()}
        self._open[i] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"sequence index out of range [0, {self._n}) for split {self.split!r}")
        return idx, np.searchsorted(self._starts, idx, side="right") - 1

    def signal(self, indices: Sequence[int]) -> TeacherSignal:
        idx, shard = self._locate(indices)
        ids = np.empty((len(idx), self.seq_len, self.k), np.int64)
        lps = np.empty((len(idx), self.seq_len, self.k), np.float32)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            arrays = self._arrays(int(s))
            i, lp = self.codec.decode(arrays, self.k, self.vocab_size, self.seq_len, idx[sel] - self._starts[s])
            ids[sel] = i.reshape(len(sel), self.seq_len, self.k)
            lps[sel] = lp.reshape(len(sel), self.seq_len, self.k)
        return TeacherSignal(torch.from_numpy(ids), torch.from_numpy(lps))

    def valid(self, indices: Sequence[int]) -> torch.Tensor:
        idx, shard = self._locate(indices)
        mask = np.ones((len(idx), self.seq_len), bool)
        for row, (g, s) in enumerate(zip(idx, shard)):
            bad = np.asarray(self._arrays(int(s))["invalid"])
            if bad.size:
                local = bad - (g - self._starts[s]) * self.seq_len
                mask[row, local[(local >= 0) & (local < self.seq_len)]] = False
        return torch.from_numpy(mask)


# ------------------------------------------------------------------ inspection
def verify_cache(cache_dir) -> list[str]:
    """Every problem found (empty list = ok): missing/short/corrupt shards by name,
    gaps in sequence coverage, an incomplete or missing manifest."""
    cache_dir = Path(cache_dir)
    try:
        manifest = _load_json(cache_dir / MANIFEST)
    except CacheCorrupt as e:
        return [str(e)]
    if manifest is None:
        return [f"{cache_dir / MANIFEST} is missing"]
    problems = [] if manifest.get("complete") else [f"{cache_dir}: manifest says the cache is incomplete"]
    for split, info in manifest["splits"].items():
        end = 0
        for e in sorted(info["shards"], key=lambda e: e["sequences"][0]):
            if e["sequences"][0] != end:
                problems.append(f"split {split}: sequences {end}..{e['sequences'][0]} have no shard")
            end = e["sequences"][1]
            try:
                _read_header(cache_dir / e["file"], e, manifest["seq_len"])
            except CacheCorrupt as err:
                problems.append(str(err))
                continue
            if _sha256_file(cache_dir / e["file"]) != e["sha256"]:
                problems.append(f"shard {e['file']}: sha256 mismatch (bytes changed on disk)")
        if manifest.get("complete") and end != info["sequences"]:
            problems.append(f"split {split}: shards end at sequence {end}, expected {info['sequences']}")
    return problems


def describe_cache(cache_dir) -> dict:
    """Summary for `distill inspect`: identity, k, encoding, sizes, bytes per token."""
    cache_dir = Path(cache_dir)
    m = _load_json(cache_dir / MANIFEST)
    if m is None:
        raise FileNotFoundError(f"no {MANIFEST} in {cache_dir}")
    splits = {}
    for name, info in m["splits"].items():
        size = sum((cache_dir / e["file"]).stat().st_size for e in info["shards"] if (cache_dir / e["file"]).exists())
        splits[name] = {"sequences": info["sequences"], "tokens": info.get("tokens", 0), "shards": len(info["shards"]),
                        "bytes": size, "nonfinite_tokens": info.get("nonfinite_tokens", 0)}
    tokens = sum(s["tokens"] for s in splits.values())
    size = sum(s["bytes"] for s in splits.values())
    return {"path": str(cache_dir), "format_version": m["format_version"], "complete": m.get("complete", False),
            "identity": m["identity"], "k": m["k"], "encoding": m["encoding"], "vocab_size": m["vocab_size"],
            "seq_len": m["seq_len"], "splits": splits, "shards": sum(s["shards"] for s in splits.values()),
            "tokens": tokens, "bytes": size, "bytes_per_token": size / tokens if tokens else None,
            "nonfinite_tokens": sum(s["nonfinite_tokens"] for s in splits.values())}
