"""The contract between the training loop and wherever a teacher signal comes from.

The loop holds a `Teacher` and calls `signal(batch)` once per micro-batch; every student
then learns from that one signal.  A live model reads `batch.input_ids`, a cache replay
reads `batch.indices`: each gets both, so neither needs to know which it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from losses.signal import TeacherSignal


@dataclass(frozen=True)
class Batch:
    """Blocks of one (micro-)batch.

    indices:   global block indices in the split (the rows a cache stores)
    input_ids: (B, T) token ids the models read
    labels:    (B, T) next-token ids (the block shifted by one)
    """

    indices: Sequence[int]
    input_ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, blocks: torch.Tensor, indices: Sequence[int]) -> "Batch":
        """blocks: (B, T+1) token ids of the blocks at `indices`."""
        return cls(list(indices), blocks[:, :-1], blocks[:, 1:])


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
