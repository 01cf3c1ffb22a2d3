"""On-disk encodings of a teacher's top-k signal.

Every codec turns one shard's top-k (ids (N, k) int64, log-probs (N, k) fp32, N tokens)
into a dict of numpy arrays (stored as safetensors tensors) and back.  Tokens come in
*groups* of `group` consecutive tokens (one group = one cached sequence) so the reader can
decode any subset of sequences without touching the rest of the shard.

| name       | ids                          | log-probs                            | exact |
|------------|------------------------------|--------------------------------------|-------|
| `lossless` | bit-packed, ceil(log2 V) bits| fp32                                 | yes   |
| `fp16`     | bit-packed                   | IEEE half                            | no    |
| `bf16`     | bit-packed                   | bfloat16                             | no    |
| `compact`  | sorted, gap-coded (adaptive Rice) | companded levels + fp16 log top-k mass | no |
| `sampled`  | distinct sampled ids, sorted, Rice gap-coded | their counts as n run-end bits | yes |

`compact` is described in `CompactCodec`.  The bit-level helpers at the top are
vectorised with numpy: Python loops run over the k entries or over a shard's groups,
never over tokens.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Protocol

import numpy as np
import torch

from teachers.cache.bits import (gather_segments, grouped_input, id_bits, pack_fixed, pack_groups,  # noqa: F401
                                 pack_unary_groups, read_unary, read_varwidth, unpack_fixed, windows32)
from teachers.cache.fixed_codec import FixedCodec
from teachers.cache.sampled_codec import SampledCodec

Arrays = dict[str, np.ndarray]


# ---------------------------------------------------------------- codecs
class Codec(Protocol):
    """Encode a shard's (N, k) top-k; decode any subset of its groups."""

    name: str
    lossless: bool
    signal: str  # the TeacherSignal kind it stores: "topk" or "sampled"

    def encode(self, ids, logprobs, vocab_size: int, group: int | None = None) -> Arrays:
        """ids (N, k) int64, logprobs (N, k) fp32 -> {name: array}; group defaults to N."""

    def decode(self, arrays: Mapping[str, np.ndarray], k: int, vocab_size: int,
               group: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n*group, k) int64, logprobs (n*group, k) fp32) for group indices `groups`
        (in that order); None decodes every group."""


class CompactCodec:
    """Lossy and the smallest encoding (bytes/token and KL measured by bench/cache.py,
    recorded in BENCHMARKS.md).

    Per token (N tokens, k entries each):
    * ids sorted ascending and gap-coded (gap = id - previous id - 1) with Rice codes
      whose parameter comes from a per-shard table indexed by the previous id's bucket
      (prev >> shift).  Real and synthetic teachers put most top-k ids at small (frequent)
      ids, so gaps there are short and gaps among rare ids long; one parameter per bucket
      tracks that density (~13% smaller than one parameter per token).
    * values in that id order: the top-k is renormalised, q = p / M with M the top-k mass,
      and each q is quantised on a companded grid: uniform in sqrt(q) (step `delta`; for
      small errors KL ~= 2 * sum(d sqrt q)^2, so a uniform sqrt grid spends bits where KL
      is sensitive) and, below the crossover where that step would exceed `max_log_step`
      nats, uniform in log q (step max_log_step, bounding the log error at half of it down
      to a floor ~64 nats below).  delta = sqrt(6 kl_target / k) makes the expected
      normalised-top-k KL ~= kl_target whatever k.  Levels minus the token's minimum level
      are Rice-coded with a per-token parameter.
    * fixed per-token fields: position of the teacher's top-1 among the sorted ids (so the
      argmax survives ties between quantised levels), the minimum level, the Rice
      parameter and log M as fp16 (the tail mass 1 - M is what top-k losses need most).
    Decoding orders entries top-1 first, then by level descending, ties by ascending id,
    and rescales the dequantised q to sum to M exactly.

    Five bit streams (fixed fields; unary quotients and remainders for ids and for
    values) are concatenated per group with byte alignment; `offsets` (G+1, 5) locates
    each group's segments.  Id streams are position-major within a group (entry j of every
    token, then j+1) so the decoder loops over the k entries, vectorised over tokens.
    """

    name = "compact"
    lossless = False
    signal = "topk"
    STREAMS = ("fixed", "id_unary", "id_rem", "val_unary", "val_rem")  # the 5 columns of `offsets`

    def __init__(self, kl_target: float = 4e-4, max_log_step: float = 1.0, buckets_log2: int = 10):
        self.kl_target, self.max_log_step, self.buckets_log2 = kl_target, max_log_step, buckets_log2

    # -- grid: params = [delta, max_log_step, n_log_levels, bucket_shift]
    def _params(self, k: int, vocab_size: int) -> np.ndarray:
        delta = math.sqrt(6 * self.kl_target / k)
        return np.array([delta, self.max_log_step, math.ceil(64 / self.max_log_step),
                         max(0, id_bits(vocab_size) - self.buckets_log2)], np.float64)

    @staticmethod
    def _grid(params):
        delta, dmax, nlog = float(params[0]), float(params[1]), int(params[2])
        u_c = min(2.0 / dmax, 1.0 / delta)  # sqrt-grid level where its log step == dmax
        ln_qc = 2 * math.log(u_c * delta)
        top = nlog + math.ceil(1.0 / delta - u_c)  # level of q == 1
        return delta, dmax, nlog, u_c, ln_qc, top

    def _quantise(self, q, params):
        delta, dmax, nlog, u_c, ln_qc, top = self._grid(params)
        u = np.sqrt(q) / delta
        with np.errstate(divide="ignore"):
            c = np.where(u >= u_c, nlog + (u - u_c), nlog + (np.log(q) - ln_qc) / dmax)
        return np.clip(np.rint(c), 0, top).astype(np.int64)

    def _dequantise(self, levels, params):
        delta, dmax, nlog, u_c, ln_qc, _ = self._grid(params)
        lv = levels.astype(np.float64)
        return np.where(lv >= nlog, ((lv - nlog + u_c) * delta) ** 2,
                        np.exp(ln_qc + (np.minimum(lv, nlog) - nlog) * dmax))

    @staticmethod
    def _field_widths(k, top):
        """Per-token fixed fields: top-1 position, min level, Rice parameter, fp16 log M."""
        return np.array([max(1, (k - 1).bit_length()), max(1, top.bit_length()), 4, 16], np.int64)

    @staticmethod
    def _sorted(ids):
        """Ids sorted ascending -> (order, gaps, prev), all (n, k) int64."""
        order = np.argsort(ids, axis=1, kind="stable")
        sid = np.take_along_axis(ids, order, 1)
        prev = np.concatenate([np.full((len(ids), 1), -1, np.int64), sid[:, :-1]], 1)
        gaps = sid - prev - 1
        if (gaps < 0).any():
            raise ValueError("top-k ids must be distinct within a token")
        return order, gaps, prev

    def encode(self, ids, logprobs, vocab_size, group=None) -> Arrays:
        ids, lp, group = grouped_input(ids, logprobs, group)
        n, k = ids.shape
        if n and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"ids outside [0, {vocab_size})")
        params = self._params(k, vocab_size)
        shift = int(params[3])
        top = self._grid(params)[5]
        # Bounded memory: a shard is processed in chunks of whole groups (~64K tokens).
        step = max(1, 65536 // group) * group
        chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
        # A generator: one chunk's (gaps, prev) alive at a time, as the comment above promises.
        table = self._fit_table((self._sorted(ids[c])[1:] for c in chunks), shift, vocab_size)

        names = self.STREAMS
        pieces: dict[str, list] = {nm: [] for nm in names}
        offsets = np.zeros((n // group + 1, len(names)), np.int64)
        for c in chunks:
            parts = self._encode_chunk(ids[c], lp[c], group, table, params, top)
            g0 = c.start // group
            for s, nm in enumerate(names):
                stream, offs = parts[s]
                offsets[g0 + 1: g0 + len(offs), s] = offsets[g0, s] + offs[1:]
                pieces[nm].append(stream)
        arrays = {nm: np.concatenate(pieces[nm] + [np.zeros(4, np.uint8)]) for nm in names}
        arrays.update(id_table=table.astype(np.uint8), params=params, offsets=offsets)
        return arrays

    def _encode_chunk(self, ids, lp, group, table, params, top):
        n, k = ids.shape
        g = n // group
        order, gaps, prev = self._sorted(ids)
        slp = np.take_along_axis(lp, order, 1).astype(np.float64)
        top1_pos = np.argmax(order == 0, axis=1)  # where the given most-likely id went
        with np.errstate(divide="ignore", invalid="ignore"):
            log_mass = np.log(np.exp(slp).sum(1))  # top-k mass M, float64
            levels = self._quantise(np.exp(slp - log_mass[:, None]), params)
        lmin = levels.min(1)
        d = levels - lmin[:, None]
        b_val = np.argmin(np.stack([(d >> b).sum(1) + k * b for b in range(16)]), axis=0)
        mass16 = torch.from_numpy(np.minimum(log_mass, 0.0)).half().view(torch.int16).numpy().view(np.uint16)
        fixed = np.stack([top1_pos, lmin, b_val, mass16.astype(np.int64)], 1).reshape(g, -1)
        b_id = table[(prev + 1) >> int(params[3])]
        # Id streams position-major within a group: (g, group, k) -> (g, k, group).
        pm = lambda x: x.reshape(g, group, k).transpose(0, 2, 1).reshape(g, -1)  # noqa: E731
        bv = np.repeat(b_val, k).reshape(g, -1)
        dv = d.reshape(g, -1)
        return (pack_groups(fixed, np.tile(self._field_widths(k, top), (g, group))),
                pack_unary_groups(pm(gaps >> b_id)),
                pack_groups(pm(gaps & ((1 << b_id) - 1)), pm(b_id)),
                pack_unary_groups(dv >> bv),
                pack_groups(dv & ((1 << bv) - 1), bv))

    @staticmethod
    def _fit_table(chunks, shift, vocab_size) -> np.ndarray:
        """Per-bucket Rice parameter minimising sum(g >> b) + b over the shard's gaps.

        chunks: [(gaps, prev)] (n, k) each.  Per-(bucket, bit length) counts and sums price
        all candidates in one pass: for gaps of bit length <= b the quotient is exactly 0;
        above that g >> b ~= g / 2**b - 1/2.
        """
        nb = ((vocab_size - 1) >> shift) + 2
        cnt = np.zeros(nb * 33)
        tot = np.zeros(nb * 33)
        for gaps, prev in chunks:
            e = np.zeros(gaps.shape, np.int64)
            g = gaps.copy()
            while (g > 0).any():  # bit length, <= 18 passes
                e += g > 0
                g >>= 1
            key = (((prev + 1) >> shift) * 33 + e).ravel()
            cnt += np.bincount(key, minlength=nb * 33)
            tot += np.bincount(key, weights=gaps.ravel().astype(np.float64), minlength=nb * 33)
        cnt, tot = cnt.reshape(nb, 33), tot.reshape(nb, 33)
        costs = [(tot[:, b + 1:] / 2.0 ** b - 0.5 * cnt[:, b + 1:]).sum(1) + cnt.sum(1) * b for b in range(25)]
        return np.argmin(np.stack(costs), axis=0).astype(np.int64)

    def decode(self, arrays, k, vocab_size, group, groups=None):
        params = np.asarray(arrays["params"], np.float64)
        offsets = np.asarray(arrays["offsets"])
        sel = np.arange(offsets.shape[0] - 1) if groups is None else np.asarray(groups, np.int64)
        start, end = offsets[sel], offsets[sel + 1]  # (B, 5) byte offsets per stream
        B, top, shift = len(sel), self._grid(params)[5], int(params[3])

        def stream(s):  # (gathered bytes, local start byte of each selected group's segment)
            return gather_segments(arrays[self.STREAMS[s]], start[:, s], end[:, s])

        def fields(s):  # (uint32 windows, start bit of each segment (B, 1)) for varwidth reads
            buf, local = stream(s)
            return windows32(buf), 8 * local[:, None]

        win, base = fields(0)
        fw = np.tile(self._field_widths(k, top), (B, group))
        f = read_varwidth(win, base + np.cumsum(fw, 1) - fw, fw).reshape(B * group, 4)
        top1_pos, lmin, b_val = f[:, 0], f[:, 1], f[:, 2]
        log_mass = f[:, 3].astype(np.uint16).view(np.float16).astype(np.float64)

        # Ids: all unary quotients at once, then entry by entry (each Rice parameter
        # depends on the previous id), vectorised over the B*group tokens.
        table = np.asarray(arrays["id_table"]).astype(np.int64)
        quot = read_unary(*stream(1), group * k).reshape(B, k, group)
        win, base = fields(2)
        ids = np.empty((B, group, k), np.int64)
        prev = np.full((B, group), -1, np.int64)
        for j in range(k):
            b = table[(prev + 1) >> shift]
            csum = np.cumsum(b, 1)
            prev = prev + 1 + ((quot[:, j] << b) | read_varwidth(win, base + csum - b, b))
            ids[:, :, j] = prev
            base = base + csum[:, -1:]
        bv = np.repeat(b_val, k).reshape(B, -1)
        vq = read_unary(*stream(3), group * k)
        win, base = fields(4)
        vr = read_varwidth(win, base + np.cumsum(bv, 1) - bv, bv)
        levels = ((vq << bv) | vr).reshape(B * group, k) + lmin[:, None]

        # Levels are small ints: dequantise through a (top+1,) table, not per entry.
        q_of = self._dequantise(np.arange(top + 1), params)
        levels = np.minimum(levels, top)  # corrupt input must not index past the table
        logp = np.log(q_of)[levels] + (log_mass - np.log(q_of[levels].sum(1)))[:, None]
        # Most likely first: the stored top-1, then by level, ties in ascending-id order
        # (entries are stored sorted by id).  One sort of a unique composite key
        # (rank of the level) * k + entry does it, ~5x faster than a stable argsort.
        key = np.where(np.arange(k) == top1_pos[:, None], top + 1, levels)  # (n, k), higher first
        order = np.sort((top + 1 - key) * k + np.arange(k), axis=1) % k
        ids = ids.reshape(B * group, k)
        return (np.take_along_axis(ids, order, 1),
                np.take_along_axis(logp, order, 1).astype(np.float32))


CODECS: dict[str, Codec] = {
    "lossless": FixedCodec("lossless", "fp32"),
    "fp16": FixedCodec("fp16", "fp16"),
    "bf16": FixedCodec("bf16", "bf16"),
    "compact": CompactCodec(),
    "sampled": SampledCodec(),  # the one encoding of sampled signals (cache.estimator: sampled)
}


def get_codec(name: str, exact_top: int = 0) -> Codec:
    """The codec `name`; exact_top: a sampled cache's exact head (`Sampling.exact_top`)."""
    if name == "sampled" and exact_top:
        return SampledCodec(exact_top)
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown cache encoding {name!r}; choose one of {sorted(CODECS)}") from None


# ---------------------------------------------------------------- container
_ST_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I16": np.int16, "F16": np.float16, "I32": np.int32,
              "F32": np.float32, "I64": np.int64, "F64": np.float64}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A codec's arrays as a safetensors file, byte-deterministic.

    The official writer orders the metadata through a hash map, so two processes write
    different bytes for the same shard.  Here the header is sorted JSON and tensors go
    widest dtype first (then by name) so each stays aligned to its itemsize.
    """
    names = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for n in names:
        a = arrays[n]
        header[n] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = [np.ascontiguousarray(arrays[n]).tobytes() for n in names]
    return b"".join([len(text).to_bytes(8, "little"), text, *data])


def safetensors_header(path) -> tuple[int, dict, int]:
    """-> (data offset, {name: (dtype, shape, start, end)}, file size).

    Raises ValueError when the header is malformed or does not account for the file's size
    exactly (a truncated or padded file)."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(size - 8, 1 << 24):
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    tensors = {name: (_ST_DTYPES[t["dtype"]], tuple(t["shape"]), *t["data_offsets"]) for name, t in header.items()}
    if max((t[3] for t in tensors.values()), default=0) + 8 + n != size:
        raise ValueError(f"header describes {max((t[3] for t in tensors.values()), default=0) + 8 + n} bytes, "
                         f"file has {size}")
    return 8 + n, tensors, size
