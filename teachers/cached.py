"""Replay a logit cache: every student reads the same stored teacher signal."""
from __future__ import annotations

from pathlib import Path

import torch

from losses.signal import TeacherSignal


class CachedTeacher:
    """Reads `(TeacherSignal, valid)` for block indices from a cache split."""

    def __init__(self, cache_dir: Path, split: str, identity: dict | None = None, verify: bool = False):
        from distill.cache_reader import CacheReader

        self.reader = CacheReader(cache_dir, split, verify=verify)
        if identity is not None:
            self.reader.check_identity(identity)
        self.forward_calls = 0  # a cache never runs the teacher
        self.reads = 0

    def __len__(self) -> int:
        return len(self.reader)

    def signal(self, indices: list[int], input_ids: torch.Tensor | None = None) -> tuple[TeacherSignal, torch.Tensor]:
        self.reads += 1
        return self.reader.read(indices)
