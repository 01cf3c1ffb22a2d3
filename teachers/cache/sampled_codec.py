"""The `sampled` encoding: per token, the distinct ids of n teacher draws and their counts.

Input, per token (N tokens, n = the width of the arrays = draws per token):
  ids      (N, n) int64, the distinct sampled ids, padding anywhere (any id),
  logprobs (N, n) fp32,  log(count / n), padding -inf (count 0).
Stored, per token:
* `runs` (N, ceil(n / 8)) uint8: the counts as n bits, the draws sorted by id with a 1 at
  the last draw of each distinct id.  Exactly n bits whatever the counts, so a token's row
  is fetched on its own, and the number of distinct ids u is its popcount.
* `rice` (N,) uint8: the token's Rice parameter b.
* per group (one cached sequence), two byte-aligned bit streams located by `offsets` (G+1, 2):
  the distinct ids ascending, gap-coded (gap = id - previous id - 1, the first from -1),
  as Rice codes: the quotients gap >> b in unary (`id_unary`), the b-bit remainders
  (`id_rem`).  b minimises the token's own code length.
On a Zipf-like teacher at V = 202,048 and n = 32 that measured 17.7 bytes per token (bench/cache.py,
BENCHMARKS.md) against 121.5 for the compact top-64; the teacher's difficulty statistics add 6
bytes per token beside it in each shard.  Lossless: counts and ids come back exactly.

With an exact head (cache.exact_top h > 0, `losses.signal.sample_signal`), a token's first h
entries are the teacher's most likely ids with their exact log-probs, stored as the
`lossless` top-k codec stores them (`head_ids` bit-packed, `head_values` fp32), and the
other n entries are the draws from the rest, log(m * count / n) with m the tail's mass.
m is recomputed from the stored head (`log_tail_mass`, the sampler's own formula), so the
counts are encoded as above and come back exactly.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from losses.signal import log_tail_mass
from teachers.cache.bits import gather_segments, grouped_input, read_varwidth, windows32
from teachers.cache.fixed_codec import FixedCodec

Arrays = dict[str, np.ndarray]
_MAX_RICE = 24
ENCODE_ENTRIES = 1 << 22  # tokens x draws encoded at once (a shard is encoded in such chunks)


def _segment_offsets(bits_per_group: np.ndarray) -> np.ndarray:
    """(G,) bit counts -> (G+1,) byte offsets of byte-aligned segments."""
    return np.concatenate([[0], np.cumsum((bits_per_group + 7) // 8)]).astype(np.int64)


def _pack_fields(values: np.ndarray, widths: np.ndarray, pos: np.ndarray, n_bytes: int) -> np.ndarray:
    """Fields (values < 2**widths, widths <= 25) at absolute bit positions -> uint8 stream
    of n_bytes, MSB first.  Fields never share bits, so OR == ADD: one weighted bincount
    per byte of a 40-bit window places all of them at once."""
    window = values.astype(np.uint64) << (40 - (pos & 7) - widths).astype(np.uint64)
    byte = pos >> 3
    out = np.zeros(n_bytes + 5)
    for t in range(5):
        part = ((window >> np.uint64(32 - 8 * t)) & np.uint64(0xFF)).astype(np.float64)
        out += np.bincount(byte + t, weights=part, minlength=len(out))[: len(out)]
    return out[:n_bytes].astype(np.uint8)


def _log_tail_mass(head_logprobs: np.ndarray) -> np.ndarray:
    """(N, h) fp32 head log-probs -> (N,) fp64 log of the tail's mass, as the sampler made it."""
    return log_tail_mass(torch.from_numpy(np.ascontiguousarray(head_logprobs, np.float32))).numpy()


def _within(group_of: np.ndarray, lengths: np.ndarray, n_groups: int) -> np.ndarray:
    """Start bit of each field within its group's segment (fields in order, group-major)."""
    ends = np.cumsum(lengths)
    first = np.searchsorted(group_of, np.arange(n_groups), side="left")  # group_of is sorted
    base = np.concatenate([[0], ends])[first]  # (G,) cumulative length before each group
    return ends - lengths - base[group_of]


class SampledCodec:
    name = "sampled"
    lossless = True
    signal = "sampled"

    def __init__(self, exact_top: int = 0):
        self.exact_top = exact_top  # entries per token kept exactly before the draws
        self._head = FixedCodec("lossless", "fp32")

    def encode(self, ids, logprobs, vocab_size: int, group: int | None = None) -> Arrays:
        h = self.exact_top
        if not h:
            return self._encode_draws(ids, logprobs, vocab_size, group)
        ids, lp = np.asarray(ids, np.int64), np.asarray(logprobs, np.float32)
        head_lp = lp[:, :h]
        draws = lp[:, h:].astype(np.float64) - _log_tail_mass(head_lp)[:, None]  # log(count / n)
        head = self._head.encode(ids[:, :h], head_lp, vocab_size)
        return {**self._encode_draws(ids[:, h:], draws, vocab_size, group),
                "head_ids": head["ids"], "head_values": head["values"]}

    def decode(self, arrays: Mapping[str, np.ndarray], k: int, vocab_size: int, group: int,
               groups=None) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n*group, k), log-probs (n*group, k) fp32) for the selected groups, k the
        width: the exact head (if any) most likely first, then the distinct drawn ids
        ascending, padding (id 0, -inf) last."""
        h = self.exact_top
        if not h:
            return self._decode_draws(arrays, k, vocab_size, group, groups)
        head_ids, head_lp = self._head.decode({"ids": arrays["head_ids"], "values": arrays["head_values"]},
                                              h, vocab_size, group, groups)
        ids, tail = self._decode_draws(arrays, k - h, vocab_size, group, groups, _log_tail_mass(head_lp))
        return np.concatenate([head_ids, ids], 1), np.concatenate([head_lp, tail], 1)

    def _encode_draws(self, ids, logprobs, vocab_size: int, group: int | None) -> Arrays:
        """Whole groups at a time, at most ENCODE_ENTRIES (tokens x draws) each: the encoder's
        (N, n) int64 temporaries then stay ~100 MB whatever the shard's size, and the chunks'
        streams join byte for byte (every group's segment is byte-aligned)."""
        ids, lp, group = grouped_input(ids, logprobs, group)
        per_chunk = max(1, ENCODE_ENTRIES // max(1, group * ids.shape[1])) * group
        if ids.shape[0] <= per_chunk:
            return self._encode_chunk(ids, lp, vocab_size, group)
        parts = [self._encode_chunk(ids[i:i + per_chunk], lp[i:i + per_chunk], vocab_size, group)
                 for i in range(0, ids.shape[0], per_chunk)]
        offsets, base = [parts[0]["offsets"][:1]], np.zeros(2, np.int64)
        for part in parts:
            offsets.append(part["offsets"][1:] + base)
            base = base + part["offsets"][-1]
        return {**{key: np.concatenate([part[key] for part in parts]) for key in ("runs", "rice", "id_unary", "id_rem")},
                "offsets": np.concatenate(offsets)}

    def _encode_chunk(self, ids: np.ndarray, lp: np.ndarray, vocab_size: int, group: int) -> Arrays:
        n_tok, n = ids.shape
        with np.errstate(over="ignore"):
            counts = np.rint(np.exp(lp.astype(np.float64)) * n).astype(np.int64)  # (N, n); padding 0
        if n_tok and not (counts.sum(1) == n).all():
            raise ValueError(f"sampled counts must sum to the {n} draws of every token")
        real = counts > 0
        if real.any() and (ids[real].min() < 0 or ids[real].max() >= vocab_size):
            raise ValueError(f"ids outside [0, {vocab_size})")
        order = np.argsort(np.where(real, ids, vocab_size), axis=1, kind="stable")  # real ids first, ascending
        sid, cnt = np.take_along_axis(ids, order, 1), np.take_along_axis(counts, order, 1)
        real = cnt > 0
        prev = np.concatenate([np.full((n_tok, 1), -1, np.int64), sid[:, :-1]], 1)
        gaps = np.where(real, sid - prev - 1, 0)
        if (gaps < 0).any():
            raise ValueError("sampled ids must be distinct within a token")
        # Counts as run ends: bit (cumsum(count) - 1) of each real entry.
        ends = np.where(real, np.cumsum(cnt, 1) - 1, -1)
        bits = np.zeros((n_tok, n + 1), bool)
        np.put_along_axis(bits, np.where(ends < 0, n, ends), True, 1)
        runs = np.packbits(bits[:, :n], axis=1)
        # Per-token Rice parameter: the b in [0, 24] with the shortest code for its gaps.
        cost = np.stack([((gaps >> b) + 1 + b).sum(1, where=real) for b in range(_MAX_RICE + 1)], 1)
        rice = np.argmin(cost, 1).astype(np.uint8)  # (N,)
        # Flatten the real entries in token order; each belongs to group token // group.
        tok, col = np.nonzero(real)
        g_of = tok // group
        n_groups = n_tok // group if n_tok else 0
        b = rice[tok].astype(np.int64)
        gap = gaps[tok, col]
        q, r = gap >> b, gap & ((1 << b) - 1)
        # Unary quotients: q zeros then a one, per group segment.
        q_bits = np.bincount(g_of, weights=q + 1, minlength=n_groups).astype(np.int64)
        q_off = _segment_offsets(q_bits)
        one_at = q_off[g_of] * 8 + _within(g_of, q + 1, n_groups) + q
        unary = np.zeros(int(q_off[-1]) * 8, np.uint8)
        unary[one_at] = 1
        r_bits = np.bincount(g_of, weights=b, minlength=n_groups).astype(np.int64)
        r_off = _segment_offsets(r_bits)
        rem = _pack_fields(r, b, r_off[g_of] * 8 + _within(g_of, b, n_groups), int(r_off[-1]))
        return {"runs": runs, "rice": rice, "id_unary": np.packbits(unary), "id_rem": rem,
                "offsets": np.stack([q_off, r_off], 1)}

    def _decode_draws(self, arrays: Mapping[str, np.ndarray], k: int, vocab_size: int, group: int,
                      groups=None, log_mass: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n*group, k) int64 ascending, padding 0; log(count / k) (.., k) fp32,
        padding -inf) for the selected groups; k is the number of draws.  log_mass (n*group,)
        fp64: added to each token's log-frequencies before they are rounded to fp32, as the
        sampler adds it (the tail's mass under an exact head).

        Entries (a token's distinct ids) come out token-major, so group-major: per-entry
        values are built with np.repeat over counts, never by fancy-indexing with a token or
        group index per entry, and land in a token's first u columns through one boolean mask
        (a flat teacher has ~k entries a token: these passes are the read's cost)."""
        offsets = np.asarray(arrays["offsets"])
        sel = np.arange(offsets.shape[0] - 1) if groups is None else np.asarray(groups, np.int64)
        rows = (sel[:, None] * group + np.arange(group)).reshape(-1)
        n_rows = len(rows)
        bits = np.unpackbits(np.asarray(arrays["runs"])[rows], axis=1)[:, :k].astype(bool)  # (R, k)
        u = bits.sum(1)  # (R,) distinct ids per token
        tok, end = np.nonzero(bits)  # (M,) run ends, token-major and ascending within a token
        token_first = np.cumsum(u) - u  # (R,) index of each token's first entry
        has = u > 0
        counts = np.diff(end, prepend=-1)  # draws per distinct id: run end - previous run end ...
        counts[token_first[has]] = end[token_first[has]] + 1  # ... from -1 at a token's first
        per_group = u.reshape(len(sel), group).sum(1)  # (G,) entries per selected group
        seg_first = np.cumsum(per_group) - per_group  # (G,) index of each group's first entry
        # Unary quotients: the ones of each group's segment, in order; q = zeros before each one.
        ubuf, ulocal = gather_segments(arrays["id_unary"], offsets[sel, 0], offsets[sel + 1, 0])
        ones = np.flatnonzero(np.unpackbits(ubuf))
        if len(ones) < len(tok):
            raise ValueError("sampled id stream is shorter than its run bits say")
        ones = ones[: len(tok)]  # trailing padding holds no ones; a corrupt stream is caught above
        q = np.diff(ones, prepend=-1) - 1
        filled = per_group > 0
        q[seg_first[filled]] = ones[seg_first[filled]] - 8 * ulocal[filled]  # from the segment's start
        # Rice remainders: b bits each, b the token's parameter, packed group by group.
        b = np.repeat(np.asarray(arrays["rice"])[rows].astype(np.int64), u)  # (M,)
        rbuf, rlocal = gather_segments(arrays["id_rem"], offsets[sel, 1], offsets[sel + 1, 1])
        b_before = np.cumsum(b) - b  # (M,) remainder bits before each entry, over all groups
        group_start = 8 * rlocal - np.r_[b_before, 0][seg_first]  # (G,) bit where each segment's fields start, shifted
        r = read_varwidth(windows32(rbuf), b_before + np.repeat(group_start, per_group), b)
        step = (q << b) + r + 1  # (M,) id - previous id in the token (the first: id + 1)
        csum = np.cumsum(step)
        ids_flat = csum - np.repeat(np.r_[0, csum][token_first], u) - 1
        present = np.arange(k) < u[:, None]  # (R, k) a token's first u columns, in entry order
        ids = np.zeros((n_rows, k), np.int64)
        logp = np.full((n_rows, k), -np.inf, np.float32)
        ids[present] = ids_flat  # damaged bytes may decode past V: the reader checks every id read and names the shard
        if log_mass is None:
            with np.errstate(divide="ignore", invalid="ignore"):
                table = np.log(np.arange(k + 1) / k).astype(np.float32)  # log(count / k), count 0..k
            logp[present] = table[np.minimum(counts, k)]
        else:
            logp[present] = (np.log(counts / k) + log_mass[tok]).astype(np.float32)
        return ids, logp
