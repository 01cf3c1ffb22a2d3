"""The contract between the training loop and wherever a teacher signal comes from.

The loop holds a `Teacher` and calls `signal(batch)` once per micro-batch; every student
then learns from that one signal.  A live model reads `batch.input_ids`, a cache replay
reads `batch.indices`: each gets both, so neither needs to know which it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from common.errors import UserError
from losses.signal import TeacherSignal


@dataclass(frozen=True)
class Batch:
    """Blocks of one (micro-)batch.

    indices:   global block indices in the split (the rows a cache stores)
    input_ids: (B, T) token ids the models read
    labels:    (B, T) next-token ids (the block shifted by one)
    position_ids: (B, T) restarting at 0 where a row of the block starts (data.packing:
               documents): every model given them attends within each row only; None: each
               block is one sequence
    """

    indices: Sequence[int]
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, blocks: torch.Tensor, indices: Sequence[int], positions: torch.Tensor | None = None) -> "Batch":
        """blocks: (B, T+1) token ids of the blocks at `indices`, a token that is no
        training target stored as -(id + 1) (see `untrained`): its label becomes -100.
        positions: (B, T+1) the blocks' position ids (distill.blocks.block_positions) or None."""
        targets = blocks[:, 1:]
        labels = torch.where(targets < 0, torch.full_like(targets, IGNORE), targets)
        return cls(list(indices), token_ids(blocks[:, :-1]), labels,
                   None if positions is None else positions[:, :-1])


# Chat data trains on the assistant's tokens only.  The packed blocks carry that mask in
# the sign of each id, so one (N, T+1) int64 tensor still holds a split (the loop, the
# cache writer and resume index it as before): id >= 0 is a target, -(id + 1) is not.
IGNORE = -100  # the label of a token that is no training target (torch's ignore_index)


def untrained(ids: torch.Tensor) -> torch.Tensor:
    """Mark token ids as no training target: id -> -(id + 1)."""
    return -ids - 1


def token_ids(blocks: torch.Tensor) -> torch.Tensor:
    """The plain token ids of (possibly marked) blocks, any shape."""
    return torch.where(blocks < 0, -blocks - 1, blocks)


class TeacherUnavailable(UserError):
    """A remote teacher that keeps failing (server down, every retry spent): the run stops
    with one line; whatever was finished (cache shards) is kept for the rerun."""


class Teacher(Protocol):
    """Anything that yields one teacher signal per batch."""

    forward_calls: int  # teacher forward passes so far (a cache never runs one)
    reads: int  # cache reads so far (a live teacher never reads one)

    def signal(self, batch: Batch) -> tuple[TeacherSignal, torch.Tensor]:
        """(TeacherSignal (B, T, k), valid (B, T) bool): valid is False where the teacher's
        logits were not finite; such tokens carry a placeholder and must be masked."""
        ...

    def prefetch(self, batches: Sequence[Batch]) -> None:
        """A hint: these batches are asked for next.  A cache starts decoding them in the
        background; a live teacher (whose forward needs the device) ignores it."""
        ...
