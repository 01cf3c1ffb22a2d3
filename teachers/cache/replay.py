"""Replay a logit cache: every student reads the same stored teacher signal."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from losses.signal import TeacherSignal
from teachers.cache.reader import CacheReader
from teachers.protocol import Batch


class CachedTeacher:
    """A `Teacher` that reads `(TeacherSignal, valid)` for a batch's block indices from a
    cache split; the batch's token ids are not needed.

    `prefetch` hands the next batches to `workers` background threads (numpy's decoding
    releases the GIL for most of its work), so a step finds its signal decoded; with a GPU
    the tensors come back in pinned memory, so the copy to the device can overlap too.
    workers=0 reads on demand."""

    def __init__(self, cache_dir: Path, split: str, identity: dict | None = None, verify: bool = False,
                 workers: int = 2):
        self.reader = CacheReader(cache_dir, split, verify=verify)
        if identity is not None:
            self.reader.check_identity(identity)
        self.forward_calls = 0  # a cache never runs the teacher
        self.reads = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cache-read") if workers > 0 else None
        self._pending: dict[tuple[int, ...], Future] = {}
        self._pin = torch.cuda.is_available()

    def __len__(self) -> int:
        return len(self.reader)

    def _read(self, indices) -> tuple[TeacherSignal, torch.Tensor]:
        sig, valid = self.reader.read(indices)
        if self._pin:
            sig, valid = sig.apply(lambda t: t.pin_memory()), valid.pin_memory()
        return sig, valid

    def prefetch(self, batches: Sequence[Batch]) -> None:
        if self._pool is None:
            return
        for batch in batches:
            key = tuple(batch.indices)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._read, key)

    def signal(self, batch: Batch) -> tuple[TeacherSignal, torch.Tensor]:
        self.reads += 1
        ahead = self._pending.pop(tuple(batch.indices), None)
        return ahead.result() if ahead is not None else self._read(batch.indices)
