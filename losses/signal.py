"""The one typed object that crosses the teacher/loss border.

A `TeacherSignal` says, for every token position, what the teacher believed the next
token would be.  Losses never care whether it came from a live teacher or a cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherSignal:
    """Teacher's next-token beliefs, sparse (top-k) and optionally dense.

    topk_ids:      (..., k) int64   the k most likely token ids, most likely first.
    topk_logprobs: (..., k) float32 their log-probabilities under the *full* softmax at
                   temperature 1 (so they sum to <= 1; the rest is the tail's mass).
    logits:        (..., V) optional dense teacher logits (online mode may pass them;
                   exact losses then use them instead of the top-k estimate).

    Leading dims are (B, T) from a batch, or (N,) once flattened to tokens.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def tail_logprob(self) -> torch.Tensor:
        """log(1 - sum(top-k probs)), shape (...,); -inf when top-k holds all the mass."""
        top_mass = torch.logsumexp(self.topk_logprobs.float(), dim=-1)
        # log1p(-exp(x)) is accurate for x near 0 (tail almost empty).
        return torch.log1p(-torch.exp(top_mass).clamp(max=1.0))

    def flatten(self) -> "TeacherSignal":
        """(B, T, ...) -> (B*T, ...)."""
        return TeacherSignal(
            self.topk_ids.reshape(-1, self.k),
            self.topk_logprobs.reshape(-1, self.k),
            None if self.logits is None else self.logits.reshape(-1, self.logits.shape[-1]),
        )

    def to(self, device) -> "TeacherSignal":
        return TeacherSignal(
            self.topk_ids.to(device, non_blocking=True),
            self.topk_logprobs.to(device, non_blocking=True),
            None if self.logits is None else self.logits.to(device, non_blocking=True),
        )

    @staticmethod
    def from_logits(logits: torch.Tensor, k: int, keep_dense: bool = False) -> "TeacherSignal":
        """Top-k of a teacher's logits (..., V), computed in fp32."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = min(k, logprobs.shape[-1])
        values, ids = torch.topk(logprobs, k, dim=-1)
        return TeacherSignal(ids, values, logits if keep_dense else None)
