"""Which token positions a cache shard stores, and where each sits in its encoded rows.

A shard whose blocks mark their training targets (chat data: the assistant's tokens; text
packed by document: every position but a row's first) stores the teacher's signal at those
positions only: nothing reads it elsewhere, and on chat data the prompts are often half
the tokens.  Such a shard holds `stored` (n, ceil(T / 8)) uint8, the positions as bits
(np.packbits of an (n, T) bool, MSB first), and its codec encodes the stored positions of
each sequence in order, padded to whole groups of `group` rows with copies of the
sequence's last stored row (a real row, so every codec accepts it).  Sequence i then owns
groups first[i] .. first[i + 1] of the codec, so any set of sequences is decoded without
touching the others.  A shard without `stored` holds every position (groups of T rows).
"""
from __future__ import annotations

import numpy as np

STORE_GROUP = 32  # rows per codec group: padding costs < 32 rows a sequence; offsets 16-40 B a group


def encoded_rows(stored: np.ndarray, group: int = STORE_GROUP) -> np.ndarray:
    """(n, T) bool stored positions -> (R,) int64: the flat token index (sequence * T +
    position) each encoded row holds, R = sum over sequences of count rounded up to `group`;
    padding rows repeat the sequence's last stored token."""
    n, seq_len = stored.shape
    counts = stored.sum(1)
    first = first_groups(counts, group) * group  # (n + 1,) first row of each sequence
    seq, pos = np.nonzero(stored)  # sequence-major, positions ascending
    rank = np.arange(len(seq)) - (np.cumsum(counts) - counts)[seq]  # index within its sequence
    src = np.full(int(first[-1]), -1, np.int64)
    src[first[seq] + rank] = seq * seq_len + pos
    filled = np.maximum.accumulate(np.where(src >= 0, np.arange(len(src)), 0)) if len(src) else src
    return src[filled]  # every sequence's first row is real, so padding never crosses sequences


def first_groups(counts: np.ndarray, group: int = STORE_GROUP) -> np.ndarray:
    """(n,) stored positions per sequence -> (n + 1,) int64 index of each sequence's first
    codec group (and the total at the end)."""
    return np.concatenate([[0], np.cumsum(-(-np.asarray(counts, np.int64) // group))]).astype(np.int64)


def stored_bits(packed: np.ndarray, seq_len: int) -> np.ndarray:
    """`stored` (n, ceil(T / 8)) uint8 -> (n, T) bool."""
    return np.unpackbits(np.asarray(packed), axis=1, count=seq_len).astype(bool)
