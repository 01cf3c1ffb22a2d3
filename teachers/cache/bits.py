"""Bit-level building blocks of the cache codecs, vectorised with numpy: Python loops run
over the k entries of a token or over a shard's groups, never over tokens."""
from __future__ import annotations

import numpy as np


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
    # A 32-bit window suffices (and halves memory traffic) unless a field is > 25 bits.
    nb, dt = (4, np.uint32) if (shift + widths).max(initial=0) <= 32 else (5, np.uint64)
    window = np.zeros((n, len(widths)), dt)
    for t in range(nb):
        # Reading past the row end only feeds bits that the final shift discards.
        idx = np.minimum(byte + t, row_bytes - 1)
        window |= buf[:, idx].astype(dt) << dt(8 * (nb - 1 - t))
    mask = ((np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)).astype(dt)
    return ((window >> (8 * nb - shift - widths).astype(dt)) & mask).astype(np.int64)


def pack_groups(values: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variable-width fields, one byte-aligned segment per group.

    values, widths: (G, m) with 0 <= values < 2**widths, widths <= 25.
    Returns (stream uint8, offsets (G+1,) int64): group g's fields, MSB first, occupy bytes
    [offsets[g], offsets[g+1]).  Fields never share bits, so OR == ADD and one weighted
    bincount per byte of the 40-bit window places all of them at once.
    """
    w = widths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum((w.sum(1) + 7) // 8)]).astype(np.int64)
    pos = (offsets[:-1, None] * 8 + np.cumsum(w, 1) - w).ravel()
    w = w.ravel()
    window = values.ravel().astype(np.uint64) << (40 - (pos & 7) - w).astype(np.uint64)
    byte = pos >> 3
    out = np.zeros(int(offsets[-1]) + 5)
    for t in range(5):
        part = ((window >> np.uint64(32 - 8 * t)) & np.uint64(0xFF)).astype(np.float64)
        out += np.bincount(byte + t, weights=part, minlength=len(out))[: len(out)]
    return out[: offsets[-1]].astype(np.uint8), offsets


def pack_unary_groups(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unary codes (q zeros then a one) for q (G, m); layout as `pack_groups`."""
    q = q.astype(np.int64)
    ends = np.cumsum(q + 1, axis=1) - 1  # bit of each terminating one, within its group
    offsets = np.concatenate([[0], np.cumsum(ends[:, -1] // 8 + 1)]).astype(np.int64)
    bits = np.zeros(int(offsets[-1]) * 8, np.uint8)
    bits[(offsets[:-1, None] * 8 + ends).ravel()] = 1
    return np.packbits(bits), offsets


def gather_segments(stream: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy segments stream[starts[i]:ends[i]] into one local buffer (+4 zero bytes).

    Returns (buffer uint8, local start byte of each segment).  Decoding works on this
    small contiguous copy rather than scattering reads over a memory-mapped shard.
    """
    parts = [np.asarray(stream[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]
    local = np.concatenate([[0], np.cumsum(ends - starts)[:-1]]).astype(np.int64)
    return np.concatenate(parts + [np.zeros(4, np.uint8)]), local


def windows32(buf: np.ndarray) -> np.ndarray:
    """(n,) uint8 ending in >= 3 spare bytes -> (n-3,) uint32: the big-endian 4-byte window
    at every byte offset, so reading any field of <= 25 bits is one gather."""
    b = buf.astype(np.uint32)
    return (b[:-3] << np.uint32(24)) | (b[1:-2] << np.uint32(16)) | (b[2:-1] << np.uint32(8)) | b[3:]


def read_varwidth(win: np.ndarray, pos: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Fields of widths <= 25 at bit positions pos (any equal shapes) -> int64.

    win = windows32(buffer); streams end in 4 zero bytes so no window reads past the end.
    """
    w = widths.astype(np.uint32)
    return ((win[pos >> 3] >> (np.uint32(32) - (pos & 7).astype(np.uint32) - w))
            & ((np.uint32(1) << w) - np.uint32(1))).astype(np.int64)


def read_unary(buf: np.ndarray, local: np.ndarray, m: int) -> np.ndarray:
    """The m unary codes of each segment of a gathered buffer -> (B, m) int64."""
    ones = np.flatnonzero(np.unpackbits(buf))
    if len(ones) != len(local) * m:
        raise ValueError(f"unary stream holds {len(ones)} codes, expected {len(local) * m}")
    ones = ones.reshape(len(local), m)
    # Padding zeros sit only after a segment's last code, so each segment restarts here.
    return np.diff(ones, axis=1, prepend=(8 * local - 1)[:, None]) - 1


def grouped_input(ids, logprobs, group: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """A codec's input as (N, k) int64 ids and fp32 log-probs, and its group size (default:
    all N tokens in one group); N must split into whole groups."""
    ids = np.asarray(ids, np.int64)
    lp = np.asarray(logprobs, np.float32)
    n = ids.shape[0]
    group = group or max(n, 1)
    if n % group:
        raise ValueError(f"{n} tokens do not split into groups of {group}")
    return ids, lp, group
