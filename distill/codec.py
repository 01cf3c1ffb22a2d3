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

`compact` is described in `CompactCodec`; the bit-level helpers live in
`distill/bitio.py`-style functions at the top of this file to keep one file per concern
small enough to read.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

Arrays = dict[str, np.ndarray]


# ---------------------------------------------------------------- bit helpers
def id_bits(vocab_size: int) -> int:
    """Narrowest width that holds every id in [0, vocab_size): 18 for 202,048."""
    return max(1, int(vocab_size - 1).bit_length())


def pack_fixed(values: np.ndarray, widths) -> np.ndarray:
    """(N, c) non-negative ints, column j in widths[j] <= 32 bits -> (N, R) uint8, MSB first.

    widths is an int (all columns) or a sequence of c ints.  Each row is byte-aligned
    (R = ceil(sum(widths)/8)) so one token's row can be fetched on its own.  The loop runs
    over the c columns (k at most), each step vectorised over all N rows.
    """
    n, c = values.shape
    widths = [widths] * c if isinstance(widths, int) else list(widths)
    starts = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    row_bytes = int(starts[-1] + 7) // 8
    out = np.zeros((n, row_bytes), np.uint8)
    v = values.astype(np.uint64)
    for j, w in enumerate(widths):
        byte, shift = int(starts[j]) >> 3, int(starts[j]) & 7
        # Left-align the field in a 40-bit window that starts at `byte`, then cut bytes.
        window = v[:, j] << np.uint64(40 - shift - w)
        for t in range(min(5, row_bytes - byte)):
            out[:, byte + t] |= ((window >> np.uint64(32 - 8 * t)) & np.uint64(0xFF)).astype(np.uint8)
    return out


def unpack_fixed(buf: np.ndarray, widths, count: int | None = None) -> np.ndarray:
    """Inverse of `pack_fixed`: (N, R) uint8 -> (N, c) int64 (c = count or len(widths))."""
    n, row_bytes = buf.shape
    widths = np.full(count, widths, np.int64) if isinstance(widths, int) else np.asarray(widths, np.int64)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    byte, shift = starts >> 3, starts & 7
    window = np.zeros((n, len(widths)), np.uint64)
    for t in range(5):
        # Reading past the row end only feeds bits that the final shift discards.
        idx = np.minimum(byte + t, row_bytes - 1)
        window |= buf[:, idx].astype(np.uint64) << np.uint64(32 - 8 * t)
    out = (window >> (40 - shift - widths).astype(np.uint64)) & ((np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1))
    return out.astype(np.int64)


def pack_unary(q: np.ndarray) -> tuple[np.ndarray, int]:
    """Unary code (q zeros then a one) for each of q (n,) -> (bytes uint8, bit length)."""
    ends = np.cumsum(q.astype(np.int64) + 1) - 1
    nbits = int(ends[-1]) + 1 if len(ends) else 0
    bits = np.zeros(nbits, np.uint8)
    bits[ends] = 1
    return np.packbits(bits), nbits


def unpack_unary(buf: np.ndarray, count: int) -> np.ndarray:
    """First `count` unary codes in buf (uint8) -> (count,) int64: gaps between the ones."""
    ones = np.flatnonzero(np.unpackbits(buf))[:count]
    if len(ones) < count:
        raise ValueError(f"unary stream holds {len(ones)} codes, expected {count}")
    return np.diff(ones, prepend=-1) - 1


def pack_varwidth(values: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """Concatenate values[i] in widths[i] bits (MSB first) -> (bytes uint8, bit length)."""
    wmax = int(widths.max()) if len(widths) else 0
    if wmax == 0:
        return np.zeros(0, np.uint8), 0
    j = np.arange(wmax, dtype=np.int64)
    shifts = widths[:, None].astype(np.int64) - 1 - j  # (n, wmax); < 0 means unused
    bits = (values.astype(np.int64)[:, None] >> np.maximum(shifts, 0)) & 1
    bits = bits[shifts >= 0].astype(np.uint8)  # row-major: field order, MSB first
    return np.packbits(bits), len(bits)


def read_varwidth(buf: np.ndarray, pos: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Fields of widths (n,) <= 25 at bit positions pos (n,) of buf -> (n,) int64.

    buf must have 3 spare bytes after the last field (callers pad) so the 32-bit window
    never reads past the end.
    """
    byte = pos >> 3
    window = (buf[byte].astype(np.int64) << 24) | (buf[byte + 1].astype(np.int64) << 16)
    window |= (buf[byte + 2].astype(np.int64) << 8) | buf[byte + 3].astype(np.int64)
    return (window >> (32 - (pos & 7) - widths)) & ((np.int64(1) << widths) - 1)


def _rows(groups: np.ndarray | None, group: int, n: int) -> np.ndarray | slice:
    """Token rows of the selected groups (in the order given)."""
    if groups is None:
        return slice(0, n)
    g = np.asarray(groups, np.int64)
    return (g[:, None] * group + np.arange(group)).reshape(-1)


# ---------------------------------------------------------------- codecs
class Codec:
    """Interface: encode a shard's (N, k) top-k; decode any subset of its groups.

    encode(ids (N,k) int64, logprobs (N,k) fp32, vocab_size, group=N) -> {name: array}
    decode(arrays, k, vocab_size, group, groups=None) -> (ids (n*group,k) int64,
                                                          logprobs (n*group,k) fp32)
    `groups` selects group indices (in that order); None decodes everything.
    """

    name = ""
    lossless = False

    def encode(self, ids, logprobs, vocab_size: int, group: int | None = None) -> Arrays:
        raise NotImplementedError

    def decode(self, arrays: Mapping[str, np.ndarray], k: int, vocab_size: int,
               group: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class FixedCodec(Codec):
    """Bit-packed ids + one value per entry at a fixed width, in the given rank order.

    value_dtype: "fp32" (lossless), "fp16" or "bf16".  16-bit values are stored as their
    raw uint16 bits (safetensors' numpy backend has no bfloat16); rounding is torch's
    round-to-nearest-even, so encoding is deterministic.
    """

    def __init__(self, name: str, value_dtype: str):
        self.name, self.value_dtype = name, value_dtype
        self.lossless = value_dtype == "fp32"

    def encode(self, ids, logprobs, vocab_size, group=None) -> Arrays:
        ids = np.asarray(ids, np.int64)
        lp = torch.as_tensor(np.asarray(logprobs, np.float32))
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"ids outside [0, {vocab_size})")
        if self.value_dtype == "fp32":
            values = lp.numpy()
        else:
            dt = torch.float16 if self.value_dtype == "fp16" else torch.bfloat16
            values = lp.to(dt).view(torch.int16).numpy().view(np.uint16)
        return {"ids": pack_fixed(ids, id_bits(vocab_size)), "values": np.ascontiguousarray(values)}

    def decode(self, arrays, k, vocab_size, group, groups=None):
        rows = _rows(groups, group, arrays["values"].shape[0])
        ids = unpack_fixed(np.asarray(arrays["ids"][rows]), id_bits(vocab_size), k)
        raw = np.asarray(arrays["values"][rows])
        if self.value_dtype == "fp32":
            return ids, raw.astype(np.float32, copy=False)
        dt = torch.float16 if self.value_dtype == "fp16" else torch.bfloat16
        vals = torch.from_numpy(raw.view(np.int16).copy()).view(dt).float().numpy()
        return ids, vals


from distill.compact import CompactCodec  # noqa: E402  (needs the helpers above)

CODECS: dict[str, Codec] = {
    "lossless": FixedCodec("lossless", "fp32"),
    "fp16": FixedCodec("fp16", "fp16"),
    "bf16": FixedCodec("bf16", "bf16"),
    "compact": CompactCodec(),
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown cache encoding {name!r}; choose one of {sorted(CODECS)}") from None
