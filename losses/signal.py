"""The one typed object that crosses the teacher/loss border.

A `TeacherSignal` says, for every token position, what the teacher believed the next
token would be.  Losses never care whether it came from a live teacher or a cache.
"""
from __future__ import annotations

import math
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
        """Top-k of a teacher's logits (..., V), computed in fp32 (see `topk_logprobs`)."""
        k = min(k, logits.shape[-1])
        values, ids = topk_logprobs(logits, k)
        return TeacherSignal(ids, values, logits if keep_dense else None)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits -> (values (..., k) fp32 log-probs, ids (..., k) int64), most likely first.

    The one place teacher log-probs are computed, so live and cached signals are bitwise
    equal.  No (N, V) log-softmax is materialised: per chunk of rows it finds the row max
    m, sums exp(x - m) in a reused scratch buffer, top-k's the raw logits (log-softmax is
    monotonic in x) and returns (top - m) - log(sum): faster than log_softmax + topk and
    closer to fp64 (figures in BENCHMARKS.md, teacher-logit cache).  Scratch memory is
    ~16 MB on CPU, ~256 MB on an accelerator.  A row holding NaN or +inf (or only -inf)
    comes out NaN.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    shape = logits.shape[:-1] + (k,)
    if flat.shape[0] == 0:
        return flat.new_empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.long, device=flat.device)
    rows = max(1, min(flat.shape[0], (1 << (22 if flat.device.type == "cpu" else 26)) // vocab))
    scratch = torch.empty(rows, vocab, dtype=torch.float32, device=flat.device)
    values, ids = [], []
    for i in range(0, flat.shape[0], rows):
        x = flat[i:i + rows]  # (r, V) in the logits' dtype: no fp32 copy of a bf16 chunk
        top, idx, row_max = _topk_and_max(x, k)
        top, row_max = top.float(), row_max.float()  # exact casts
        buf = scratch[: x.shape[0]]
        torch.sub(x, row_max, out=buf)  # promotes into the fp32 scratch
        log_norm = buf.exp_().sum(dim=-1, keepdim=True).log_()  # (r, 1)
        values.append(top.sub_(row_max).sub_(log_norm))
        ids.append(idx)
    return torch.cat(values).reshape(shape), torch.cat(ids).reshape(shape)


def placeholder_invalid(values: torch.Tensor, ids: torch.Tensor, vocab_size: int):
    """Top-k (values, ids) (..., k) from `topk_logprobs` -> (values, ids, valid (...,) bool).

    A token whose logits held NaN or +inf (or only -inf) came out NaN; it is marked
    invalid and given a uniform placeholder (ids 0..k-1, log-prob -log V) so nothing
    non-finite reaches a loss or a cache shard.  The one rule for live and cached signals.
    """
    valid = ~torch.isnan(values).any(dim=-1) & torch.isfinite(values[..., 0])
    if not bool(valid.all()):
        k = values.shape[-1]
        values = torch.where(valid[..., None], values, torch.full_like(values, -math.log(vocab_size)))
        ids = torch.where(valid[..., None], ids, torch.arange(k, device=ids.device).expand_as(ids))
    return values, ids, valid


_BLOCK = 64  # vocab entries per block in _topk_and_max


def _topk_and_max(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r, V) -> top-k values (r, k), their ids (r, k), row max (r, 1).

    Two-stage top-k, exact: the k largest entries of a row lie in the k blocks with the
    largest block maxima (any entry outside them is beaten by k block maxima), so one
    block-max pass, a top-k over V/64 maxima and a top-k over k*64 gathered entries
    replace a top-k over all V (measured in BENCHMARKS.md).  The row max falls out
    of the block maxima.  Ties may be ordered differently from torch.topk's.
    """
    r, vocab = x.shape
    n_blocks = vocab // _BLOCK
    if n_blocks < 4 * k:  # small vocab: the plain top-k is cheap
        top, idx = torch.topk(x, k, dim=-1)
        return top, idx, x.amax(dim=-1, keepdim=True)
    main = n_blocks * _BLOCK
    blocks = x[:, :main].reshape(r, n_blocks, _BLOCK)
    block_max = blocks.amax(dim=-1)  # (r, n_blocks)
    best = torch.topk(block_max, k, dim=-1).indices  # (r, k)
    cand = blocks.gather(1, best[..., None].expand(r, k, _BLOCK)).reshape(r, k * _BLOCK)
    cand_ids = (best[..., None] * _BLOCK + torch.arange(_BLOCK, device=x.device)).reshape(r, k * _BLOCK)
    row_max = block_max.amax(dim=-1, keepdim=True)
    if main < vocab:  # the last V % 64 entries are always candidates
        rest = x[:, main:]
        cand = torch.cat([cand, rest], dim=1)
        cand_ids = torch.cat([cand_ids, torch.arange(main, vocab, device=x.device).expand(r, -1)], dim=1)
        row_max = torch.maximum(row_max, rest.amax(dim=-1, keepdim=True))
    top, pos = torch.topk(cand, k, dim=-1)
    return top, cand_ids.gather(1, pos), row_max
