"""Replay a logit cache: every student reads the same stored teacher signal."""
from __future__ import annotations

from pathlib import Path

import torch

from losses.signal import TeacherSignal
from teachers.cache.reader import CacheReader
from teachers.protocol import Batch


class CachedTeacher:
    """A `Teacher` that reads `(TeacherSignal, valid)` for a batch's block indices from a
    cache split; the batch's token ids are not needed."""

    def __init__(self, cache_dir: Path, split: str, identity: dict | None = None, verify: bool = False):
        self.reader = CacheReader(cache_dir, split, verify=verify)
        if identity is not None:
            self.reader.check_identity(identity)
        self.forward_calls = 0  # a cache never runs the teacher
        self.reads = 0

    def __len__(self) -> int:
        return len(self.reader)

    def signal(self, batch: Batch) -> tuple[TeacherSignal, torch.Tensor]:
        self.reads += 1
        return self.reader.read(batch.indices)
