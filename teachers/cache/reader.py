"""Reading a teacher-signal cache written by writer.py: random access in global sequence
order, verification, and the summary `distill inspect` prints."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from safetensors import safe_open
import torch

from teachers.cache.format import (FORMAT_VERSION, MANIFEST, CacheCorrupt, Sampling, identity_diffs, mismatch_error,
                                   read_json, sha256_file)
from teachers.cache.codec import get_codec, safetensors_header
from teachers.cache.rows import STORE_GROUP, first_groups, stored_bits
from losses.difficulty import STATS
from losses.signal import TeacherSignal


def _read_header(path: Path, entry: dict, seq_len: int, group: int) -> tuple[int, dict]:
    """safetensors_header(path), checked against the shard's manifest entry: raises
    CacheCorrupt naming the shard when it is missing, unreadable, has another size or
    holds another token count.  group: the codec's rows per group in a shard that stores
    the training targets only (rows.py)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheCorrupt(f"shard {path.name} listed in the manifest is missing from {path.parent}") from None
    if size != entry["bytes"]:
        raise CacheCorrupt(f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
                           "(truncated or replaced); rerun `distill cache` to compute it again")
    try:
        base, tensors, _ = safetensors_header(path)
    except (OSError, ValueError, KeyError) as e:
        raise CacheCorrupt(f"shard {path} is unreadable ({e!r}); rerun `distill cache` to compute it again") from None
    # Rows held: rows of `values` (fixed-width codecs) or groups * rows per group (the others).
    stored = "stored" in tensors
    rows = tensors["values"][1][0] if "values" in tensors else (tensors["offsets"][1][0] - 1) * (group if stored else seq_len)
    want = entry.get("rows", -1) if stored else entry["tokens"]
    if rows != want or (stored and tensors["stored"][1][0] * seq_len != entry["tokens"]):
        raise CacheCorrupt(f"shard {path} holds {rows} rows, the manifest says {want}")
    return base, tensors


class CacheReader:
    """Random access to one split of a complete cache, in global sequence order.

    reader.read(indices) -> (TeacherSignal, valid): topk_ids (B, T, k) int64 and
    topk_logprobs (B, T, k) fp32 for sequences `indices` (in that order), and valid (B, T)
    bool, False where the teacher's logits were not finite (`signal` gives the first
    alone).  Shards are memory-mapped lazily (at most `max_open` at once); every shard's
    size and header are checked at open, and verify=True also checks every sha256.
    """

    def __init__(self, cache_dir, split: str, verify: bool = False, max_open: int = 64):
        self.dir = Path(cache_dir)
        manifest = read_json(self.dir / MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {self.dir}: not a teacher cache (run write_cache first)")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CacheCorrupt(f"cache at {self.dir} has format {manifest['format_version']}, newer than this "
                               f"reader's {FORMAT_VERSION}; upgrade the toolkit")
        if not manifest.get("complete"):
            raise CacheCorrupt(f"cache at {self.dir} is incomplete (writer interrupted?); rerun `distill cache` to resume")
        if split not in manifest["splits"]:
            raise KeyError(f"split {split!r} not in cache {self.dir}; it has {sorted(manifest['splits'])}")
        self.manifest, self.split = manifest, split
        self.k, self.seq_len, self.vocab_size = manifest["k"], manifest["seq_len"], manifest["vocab_size"]
        self.sampling = Sampling.of_manifest(manifest)  # None: a top-k cache
        self.codec = get_codec(manifest["encoding"], self.sampling.exact_top if self.sampling else 0)
        self.has_difficulty = manifest.get("difficulty") == list(STATS)  # caches made before it have none
        info = manifest["splits"][split]
        self.shards = sorted(info["shards"], key=lambda e: e["sequences"][0])
        ranges = [tuple(e["sequences"]) for e in self.shards]
        if [r[0] for r in ranges] != [0, *(r[1] for r in ranges)][:len(ranges)] or \
                (ranges[-1][1] if ranges else 0) != info["sequences"]:
            raise CacheCorrupt(f"cache at {self.dir}: shards of split {split!r} do not cover sequences "
                               f"0..{info['sequences']} contiguously")
        self._starts = np.array([r[0] for r in ranges], np.int64)
        self._n = info["sequences"]
        self.store_group = manifest.get("stored", {}).get("group", STORE_GROUP)
        self._headers = [_read_header(self.dir / e["file"], e, self.seq_len, self.store_group) for e in self.shards]
        if verify:
            bad = [e["file"] for e in self.shards if sha256_file(self.dir / e["file"]) != e["sha256"]]
            if bad:
                raise CacheCorrupt(f"cache at {self.dir}: sha256 mismatch in shard(s) {', '.join(bad)}")
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()  # prefetch threads share the open-shard table

    def __len__(self) -> int:
        return self._n

    def check_identity(self, identity: Mapping) -> None:
        """Raise CacheMismatch if any field given in identity differs from the cache's."""
        diffs = identity_diffs(self.manifest["identity"], {key: str(v) for key, v in identity.items()}, sorted(identity))
        if diffs:
            raise mismatch_error(self.dir, diffs)

    def _arrays(self, i: int) -> dict:
        with self._lock:
            if i in self._open:
                self._open.move_to_end(i)
                return self._open[i]
            base, tensors = self._headers[i]
            # One map (one fd) per shard; plain ndarray views skip np.memmap's per-index cost.
            mm = np.memmap(self.dir / self.shards[i]["file"], dtype=np.uint8, mode="r").view(np.ndarray)
            arrays = {name: mm[base + a: base + b].view(dt).reshape(shape) if b > a else np.zeros(shape, dt)
                      for name, (dt, shape, a, b) in tensors.items()}
            if "stored" in arrays:  # (n + 1,) each sequence's first codec group (rows.py)
                arrays["first_group"] = first_groups(stored_bits(arrays["stored"], self.seq_len).sum(1), self.store_group)
            self._open[i] = arrays
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
            return arrays

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"sequence index out of range [0, {self._n}) for split {self.split!r}")
        return idx, np.searchsorted(self._starts, idx, side="right") - 1

    def read(self, indices: Sequence[int]) -> tuple[TeacherSignal, torch.Tensor]:
        """(TeacherSignal (B, T, k), valid (B, T) bool) for sequences `indices`, one pass over their shards."""
        idx, shard = self._locate(indices)
        ids = np.empty((len(idx), self.seq_len, self.k), np.int64)
        lps = np.empty((len(idx), self.seq_len, self.k), np.float32)
        valid = np.ones((len(idx), self.seq_len), bool)
        entropy = np.zeros((len(idx), self.seq_len), np.float32) if self.sampling else None
        difficulty = np.zeros((len(idx), self.seq_len, len(STATS)), np.float32) if self.has_difficulty else None
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            arrays = self._arrays(int(s))
            local = idx[sel] - self._starts[s]  # sequence index within the shard
            if "stored" in arrays:
                self._read_stored(arrays, sel, local, ids, lps, entropy, difficulty, int(s))
            else:  # every position stored, one codec group per sequence
                i, lp = self._decode(arrays, self.seq_len, local, int(s))
                ids[sel] = i.reshape(len(sel), self.seq_len, self.k)
                lps[sel] = lp.reshape(len(sel), self.seq_len, self.k)
                if entropy is not None:
                    entropy[sel] = np.asarray(arrays["entropy"]).reshape(-1, self.seq_len)[local].astype(np.float32)
                if difficulty is not None:
                    stats = np.asarray(arrays["token_stats"]).reshape(-1, self.seq_len, len(STATS))
                    difficulty[sel] = stats[local].astype(np.float32)
            bad = np.asarray(arrays["invalid"])  # flat token indices within the shard
            if bad.size:
                seq, pos = np.divmod(bad, self.seq_len)
                for row, want in zip(sel, local):
                    valid[row, pos[seq == want]] = False
        difficulty = None if difficulty is None else torch.from_numpy(difficulty)
        if self.sampling is None:
            return (TeacherSignal(torch.from_numpy(ids), torch.from_numpy(lps), difficulty=difficulty),
                    torch.from_numpy(valid))
        used = np.flatnonzero((lps > -np.inf).reshape(-1, self.k).any(0))  # columns any token uses
        width = max(1, int(used.max(initial=0)) + 1)  # padding comes last (an exact head may hold -inf)
        sig = TeacherSignal(torch.from_numpy(ids[..., :width].copy()), torch.from_numpy(lps[..., :width].copy()),
                            kind="sampled", entropy=torch.from_numpy(entropy), temperature=self.sampling.temperature,
                            difficulty=difficulty)
        return sig, torch.from_numpy(valid)

    def _read_stored(self, arrays: dict, sel: np.ndarray, local: np.ndarray, ids: np.ndarray, lps: np.ndarray,
                     entropy: np.ndarray | None, difficulty: np.ndarray | None, shard: int) -> None:
        """Fill rows `sel` of the (B, T, ...) outputs with sequences `local` of a shard that
        stores the training targets only (rows.py).  Other positions get a placeholder no
        loss reads (labels mask them): ids 0..k-1 at log-prob -log V (top-k), or one id at
        frequency 1 and entropy 0 (sampled); NaN difficulty."""
        seq_len, k, group = self.seq_len, self.k, self.store_group
        bits = stored_bits(arrays["stored"][local], seq_len)  # (b, T)
        first = arrays["first_group"]
        groups = np.concatenate([np.arange(first[q], first[q + 1]) for q in local])  # their codec groups, in order
        # Encoded rows that hold a stored token: each sequence's first `count` rows of its groups.
        keep = np.concatenate([np.arange((first[q + 1] - first[q]) * group) < c for q, c in zip(local, bits.sum(1))])
        sub_ids = np.broadcast_to(np.arange(k), (len(sel), seq_len, k)).copy()
        sub_lps = np.full((len(sel), seq_len, k), -np.log(self.vocab_size) if self.sampling is None else -np.inf,
                          np.float32)
        if self.sampling is not None:
            sub_lps[..., 0] = 0.0
        rows = (groups[:, None] * group + np.arange(group)).reshape(-1)[keep]  # (stored,) encoded row indices
        if len(groups):
            i, lp = self._decode(arrays, group, groups, shard)
            sub_ids[bits], sub_lps[bits] = i[keep], lp[keep]
        ids[sel], lps[sel] = sub_ids, sub_lps
        if entropy is not None:
            sub = np.zeros((len(sel), seq_len), np.float32)
            sub[bits] = np.asarray(arrays["entropy"])[rows]
            entropy[sel] = sub
        if difficulty is not None:
            sub = np.full((len(sel), seq_len, len(STATS)), np.nan, np.float32)
            sub[bits] = np.asarray(arrays["token_stats"])[rows]
            difficulty[sel] = sub

    def _decode(self, arrays: dict, rows_per_group: int, groups: np.ndarray, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """The codec's (ids, log-probs) of `groups`, checked: reads skip the sha256 (`verify`
        checks it), so bytes changed on disk show here, as a decode that runs off its buffers or
        an id outside the vocabulary.  Said naming the shard, rather than as an index error deep
        in the codec or in a student's loss."""
        where = f"cache shard {self.dir / self.shards[shard]['file']}"
        advice = (f"the shard is damaged; `distill inspect {self.dir} --verify` checks every shard, `distill cache "
                  f"--overwrite` rewrites them")
        try:
            ids, lps = self.codec.decode(arrays, self.k, self.vocab_size, rows_per_group, groups)
        except (IndexError, ValueError) as e:
            raise CacheCorrupt(f"{where} does not decode ({type(e).__name__}: {e}): {advice}") from None
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise CacheCorrupt(f"{where} decodes to teacher id {bad}, outside the vocabulary [0, {self.vocab_size}): "
                               f"{advice}")
        return ids, lps

    def sequence_stats(self) -> torch.Tensor:
        """(N, 4) fp32: every sequence's mean teacher nll, entropy and top1 over its training
        targets and their count (losses/difficulty.py), in global order.  Raises CacheCorrupt
        for a cache written without them."""
        if not self.has_difficulty:
            raise CacheCorrupt(f"cache at {self.dir} holds no teacher difficulty statistics (it was made by an "
                               f"older version); rerun `distill cache --overwrite` to record them")
        return torch.from_numpy(np.concatenate([np.asarray(self._arrays(i)["sequence_stats"], np.float32)
                                                for i in range(len(self.shards))]))

    def signal(self, indices: Sequence[int]) -> TeacherSignal:
        return self.read(indices)[0]


# ------------------------------------------------------------------ inspection
def verify_cache(cache_dir) -> list[str]:
    """Every problem found (empty list = ok): missing/short/corrupt shards by name,
    gaps in sequence coverage, an incomplete or missing manifest."""
    cache_dir = Path(cache_dir)
    try:
        manifest = read_json(cache_dir / MANIFEST)
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
                _read_header(cache_dir / e["file"], e, manifest["seq_len"], manifest.get("stored", {}).get("group", 0))
            except CacheCorrupt as err:
                problems.append(str(err))
                continue
            if sha256_file(cache_dir / e["file"]) != e["sha256"]:
                problems.append(f"shard {e['file']}: sha256 mismatch (bytes changed on disk)")
            try:
                with safe_open(cache_dir / e["file"], "np") as f:
                    meta = f.metadata() or {}
            except Exception as err:  # a header safetensors refuses (an edited offset): a problem to name
                problems.append(f"shard {e['file']}: unreadable header ({str(err)[:120]})")
                continue
            other = [f"{key} {meta[key]} (manifest: {manifest[key]})" for key in ("encoding", "k", "vocab_size", "seq_len")
                     if key in meta and key in manifest and meta[key] != str(manifest[key])]
            if other:  # a shard of another cache's settings (a rank run with other ones, say): it decodes to garbage
                problems.append(f"shard {e['file']}: written with {', '.join(other)}")
        if manifest.get("complete") and end != info["sequences"]:
            problems.append(f"split {split}: shards end at sequence {end}, expected {info['sequences']}")
    return problems


def describe_cache(cache_dir) -> dict:
    """Summary for `distill inspect`: identity, k, encoding, sizes, bytes per token."""
    cache_dir = Path(cache_dir)
    m = read_json(cache_dir / MANIFEST)
    if m is None:
        raise FileNotFoundError(f"no {MANIFEST} in {cache_dir}")
    splits = {}
    for name, info in m["splits"].items():
        size = sum((cache_dir / e["file"]).stat().st_size for e in info["shards"] if (cache_dir / e["file"]).exists())
        splits[name] = {"sequences": info["sequences"], "tokens": info.get("tokens", 0), "shards": len(info["shards"]),
                        "bytes": size, "nonfinite_tokens": info.get("nonfinite_tokens", 0),
                        "stored_tokens": sum(e.get("stored_tokens", e["tokens"]) for e in info["shards"]),
                        "written": sum(e["sequences"][1] - e["sequences"][0] for e in info["shards"])}
    tokens = sum(s["tokens"] for s in splits.values())
    stored = sum(s["stored_tokens"] for s in splits.values())
    blocks = sum(s.pop("written") for s in splits.values())  # so far: an incomplete cache's bytes cover these only
    size = sum(s["bytes"] for s in splits.values())
    sampling = Sampling.of_manifest(m)
    estimator = "top-k" if sampling is None else (
        f"sampled (n={sampling.n}, T={sampling.temperature:g}"
        + (f", the exact top {sampling.exact_top})" if sampling.exact_top else ")"))
    return {"path": str(cache_dir), "format_version": m["format_version"], "complete": m.get("complete", False),
            "identity": m["identity"], "estimator": estimator, "k": m["k"], "encoding": m["encoding"], "vocab_size": m["vocab_size"],
            "seq_len": m["seq_len"], "splits": splits, "shards": sum(s["shards"] for s in splits.values()),
            "tokens": tokens, "bytes": size, "bytes_per_token": size / tokens if tokens else None,
            "stored_positions": m.get("stored", {}).get("positions", "all"), "stored_tokens": stored,
            "bytes_per_stored_token": size / stored if stored else None, "bytes_per_block": size / blocks if blocks else None,
            "nonfinite_tokens": sum(s["nonfinite_tokens"] for s in splits.values())}
