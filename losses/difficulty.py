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
COUNT = len(STATS)  # per-sequence stats: the column after the means, the number of targets averaged
HARDER_WHEN_HIGHER = {"nll": True, "entropy": True, "top1": False}


def token_difficulty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) token ids -> (N, 3) fp32 [nll, entropy, top1], on the
    logits' device.  Per chunk of rows in fp32 scratch buffers, no (N, V) log-softmax (see
    `from_shifted`).  A row whose logits hold NaN or +inf, or only -inf, comes out NaN (the
    arithmetic propagates it; the cache marks such tokens invalid anyway); a target the
    teacher gives probability 0 (a masked vocab entry, -inf) has nll +inf.
    `losses.signal.topk_logprobs(..., targets=)` computes the same alongside the top-k."""
    vocab = logits.shape[-1]
    targets = targets.reshape(-1, 1).to(logits.device)
    out = torch.empty(logits.shape[0], len(STATS), dtype=torch.float32, device=logits.device)
    # two buffers of ~8 MB on CPU (they stay in cache: measured 1.5x faster than 16 MB each), 128 MB on a GPU
    rows = max(1, min(logits.shape[0], (1 << (21 if logits.device.type == "cpu" else 25)) // max(1, vocab)))
    shifted = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    exps = torch.empty_like(shifted)
    for i in range(0, logits.shape[0], rows):
        x = logits[i:i + rows]  # (r, V) in the logits' dtype
        s, e = shifted[: x.shape[0]], exps[: x.shape[0]]
        torch.sub(x, x.max(dim=-1, keepdim=True).values.float(), out=s)  # promotes into fp32
        out[i:i + rows] = from_shifted(s, torch.exp(s, out=e), s.gather(-1, targets[i:i + rows]))
    return out


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(r, V), (r, V) -> (r,) row sums of a * b, in the inputs' dtype.  Autocast is off: a bf16
    teacher's reduction (and a bf16 student's loss forward) runs inside autocast, which lists
    vecdot and would round both operands to bf16 (an entropy came out 0.01 nats off at V =
    32,000; a KL of 0.04 came out 0.04 off)."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.linalg.vecdot(a, b)


def from_shifted(s: torch.Tensor, e: torch.Tensor, at_target: torch.Tensor) -> torch.Tensor:
    """Rows of shifted logits s = x - max(x) (r, V) fp32, e = exp(s) (r, V), s at the target
    (r, 1) -> (r, 3) [nll, entropy, top1].  With Z = sum(e):
        nll = log Z - s[target],   entropy = log Z - (e . s) / Z,   top1 = 1 / Z."""
    z = e.sum(-1, keepdim=True)  # (r, 1)
    dot = row_dot(e, s).unsqueeze(-1)  # (r, 1) sum(e * s); 4x faster than bmm on CPU
    masked = torch.isnan(dot) & torch.isfinite(z)  # rows with -inf entries: 0 * -inf; they weigh 0
    if bool(masked.any()):
        rows = masked.squeeze(-1)
        dot[rows] = (e[rows] * s[rows].clamp(min=torch.finfo(torch.float32).min)).sum(-1, keepdim=True)
    log_z = z.log()
    return torch.cat([log_z - at_target, log_z - dot / z, z.reciprocal()], dim=-1)


def sequence_difficulty(token_stats: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """token_stats (B, T, 3), trained (B, T) bool (the position is a training target) ->
    (B, 4) fp32: the mean nll, entropy and top1 over trained positions whose stats are
    finite, and the count of those positions (a block with none: NaN means, count 0)."""
    ok = trained & torch.isfinite(token_stats).all(-1)  # (B, T)
    n = ok.sum(-1).float()  # (B,)
    total = torch.where(ok[..., None], token_stats.double(), torch.zeros((), dtype=torch.float64)).sum(1)  # (B, 3)
    means = (total / n[:, None]).float()  # 0/0 = NaN for a block with no target
    return torch.cat([means, n[:, None]], dim=-1)  # (B, COUNT + 1)


def hardness(sequence_stats: torch.Tensor, stat: str) -> torch.Tensor:
    """(N, 4) per-sequence stats -> (N,) fp64 score, higher = harder; a block with no scored
    target is -inf (the easiest: it teaches nothing)."""
    col = sequence_stats[:, STATS.index(stat)].double()
    score = col if HARDER_WHEN_HIGHER[stat] else -col
    return torch.where(torch.isnan(score), torch.full_like(score, float("-inf")), score)
