"""How hard the teacher finds each token: the statistics data selection ranks by.

Per token, from the teacher's logits at temperature 1 and the true next token:
  nll      -log p(true next token)        high = hard (the teacher was surprised)
  entropy  -sum_v p_v log p_v  (nats)     high = hard (the teacher is unsure)
  top1     max_v p_v                       low  = hard (no clear favourite)
Per sequence: the mean of each over the sequence's training targets (for chat data the
assistant's tokens only) and those targets' count.  Pure functions; the cache writer and
the live teacher call them on the same logits as the signal, chunk by chunk.
"""
from __future__ import annotations

import torch

STATS = ("nll", "entropy", "top1")  # column order of every difficulty tensor
HARDER_WHEN_HIGHER = {"nll": True, "entropy": True, "top1": False}


def token_difficulty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) token ids -> (N, 3) fp32 [nll, entropy, top1].

    Computed in fp32 from a log-softmax of the chunk.  A row whose logits hold NaN or +inf,
    or only -inf, comes out NaN (the cache marks such tokens invalid anyway); a target the
    teacher gives probability 0 (a masked vocab entry) has nll +inf."""
    targets = targets.reshape(-1, 1).to(logits.device)
    rows = max(1, (1 << 24) // max(1, logits.shape[-1]))  # ~64 MB of fp32 per piece, whatever V is
    parts = []
    for i in range(0, logits.shape[0], rows):
        x = logits[i:i + rows].float()
        logp = torch.log_softmax(x, dim=-1)  # (r, V)
        p = logp.exp()
        nll = -logp.gather(-1, targets[i:i + rows]).squeeze(-1)
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        top1 = p.max(dim=-1).values
        bad = x.isnan().any(-1) | x.isposinf().any(-1) | x.isneginf().all(-1)
        parts.append(torch.stack([nll, entropy, top1], dim=-1).masked_fill(bad[:, None], float("nan")))
    return torch.cat(parts) if parts else logits.new_empty((0, len(STATS)), dtype=torch.float32)


def sequence_difficulty(token_stats: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """token_stats (B, T, 3), trained (B, T) bool (the position is a training target) ->
    (B, 4) fp32: the mean nll, entropy and top1 over trained positions whose stats are
    finite, and the count of those positions (a block with none: NaN means, count 0)."""
    ok = trained & torch.isfinite(token_stats).all(-1)  # (B, T)
    n = ok.sum(-1).float()  # (B,)
    total = torch.where(ok[..., None], token_stats.double(), torch.zeros((), dtype=torch.float64)).sum(1)  # (B, 3)
    means = (total / n[:, None]).float()  # 0/0 = NaN for a block with no target
    return torch.cat([means, n[:, None]], dim=-1)


def hardness(sequence_stats: torch.Tensor, stat: str) -> torch.Tensor:
    """(N, 4) per-sequence stats -> (N,) fp64 score, higher = harder; a block with no scored
    target is -inf (the easiest: it teaches nothing)."""
    col = sequence_stats[:, STATS.index(stat)].double()
    score = col if HARDER_WHEN_HIGHER[stat] else -col
    return torch.where(torch.isnan(score), torch.full_like(score, float("-inf")), score)
