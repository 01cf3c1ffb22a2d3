"""Per-token soft weights that follow the teacher, and the hard/soft combination.

The schedule (`losses.schedules`) says how much soft loss a step gets on average, w_soft(t).
An adaptive mode redistributes that amount across tokens by a non-negative score r_i:

    w_i = w_soft(t) * r_i / mean_{valid j}(r_j)        (0 at masked tokens)

so the average soft weight over valid tokens is exactly w_soft(t).  Scores (all detached):

  uniform       r_i = 1                                   (plain scheduled KD)
  confidence    r_i = teacher's top-1 probability (T = 1)
  entropy       r_i = exp(-H_i), H_i the teacher's entropy: low entropy -> high weight.
                From a top-k signal, H_i is the entropy over the k ids plus one tail bucket (a
                lower bound on the true entropy); exact with dense logits.
  disagreement  r_i = the per-token soft loss itself: spend the soft weight where the student
                is furthest from the teacher.
If every valid score is 0 (e.g. no disagreement anywhere) the weights fall back to uniform.
"""
from __future__ import annotations

import torch

from losses.signal import TeacherSignal

WEIGHTING_MODES = ("uniform", "confidence", "entropy", "disagreement")


def teacher_confidence(signal: TeacherSignal) -> torch.Tensor:
    """Teacher's top-1 probability, (..., k) signal -> (...,) fp32."""
    if signal.kind == "sampled" and signal.logits is None:
        raise ValueError("adaptive weighting 'confidence' needs a top-k (or dense) teacher signal: sampled "
                         "tokens do not give the teacher's top-1 probability")
    if signal.logits is not None:
        return torch.softmax(signal.logits.float(), dim=-1).amax(dim=-1)
    return signal.topk_logprobs.float().amax(dim=-1).exp()


def teacher_entropy(signal: TeacherSignal) -> torch.Tensor:
    """Teacher entropy in nats, (..., k) signal -> (...,) fp32.

    Dense logits: exact.  Top-k: entropy of the (k + 1)-outcome distribution [top-k, tail],
    which treats the tail as one token and so never exceeds the true entropy.  Sampled: the
    exact entropy stored with the draws (at the temperature they were drawn at).
    """
    if signal.logits is None and signal.kind == "sampled":
        return signal.entropy.float()
    if signal.logits is not None:
        logp = torch.log_softmax(signal.logits.float(), dim=-1)
    else:
        tail = signal.tail_logprob().unsqueeze(-1)
        logp = torch.cat([signal.topk_logprobs.float(), tail], dim=-1)  # (..., k + 1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def weight_scores(mode: str, signal: TeacherSignal | None, soft: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Non-negative (N,) fp32 scores r_i for one weighting mode (see the module docstring),
    before normalisation; a training step sums them over its targets on every rank to get
    the `score_mean` that `soft_weights` divides by."""
    if mode == "uniform":
        like = next((x for x in (mask, soft) if x is not None), None)
        if like is None and signal is not None:
            like = signal.topk_ids[..., 0]
        if like is None:
            raise ValueError("uniform weights need at least one of mask, signal or soft")
        return torch.ones(like.shape, dtype=torch.float32, device=like.device)
    if mode == "disagreement":
        if soft is None:
            raise ValueError('weighting "disagreement" needs the per-token soft loss')
        return soft.detach().float().clamp_min(0.0)
    if signal is None:
        raise ValueError(f"weighting {mode!r} needs the teacher signal")
    if mode == "confidence":
        return teacher_confidence(signal)
    return torch.exp(-teacher_entropy(signal))


def soft_weights(
    mode: str,
    w_soft: float,
    mask: torch.Tensor | None,
    *,
    signal: TeacherSignal | None = None,
    soft: torch.Tensor | None = None,
    score_mean: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token soft weights (N,), detached, averaging to `w_soft` over valid tokens.

    mode: one of WEIGHTING_MODES.  mask: (N,) bool or None (all valid).  signal: the (N, k)
    teacher signal (confidence/entropy).  soft: the (N,) per-token soft loss (disagreement).
    score_mean: the mean score over more tokens than these N (a training step's targets on
    every micro-batch and rank), so that splitting the step does not change the weights;
    None: these N tokens' own mean.  Masked tokens get weight 0; a fully masked batch gives
    all zeros.
    """
    if mode not in WEIGHTING_MODES:
        raise ValueError(f"unknown weighting mode {mode!r}; expected one of {WEIGHTING_MODES}")
    if w_soft < 0:
        raise ValueError(f"w_soft must be >= 0, got {w_soft}")
    r = weight_scores(mode, signal, soft, mask)  # (N,)
    valid = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    r = r.masked_fill(~valid, 0.0)
    mean = r.sum() / valid.sum().clamp_min(1) if score_mean is None else torch.as_tensor(score_mean, device=r.device)
    w = torch.where(mean > 0, r / mean.clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
    return (w * w_soft).masked_fill(~valid, 0.0)


def combine(
    hard: torch.Tensor,
    soft: torch.Tensor,
    mask: torch.Tensor | None,
    w_hard: float,
    w_soft: float | torch.Tensor,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean of w_hard * hard + w_soft_i * soft over valid tokens.

    hard, soft: (N,) per-token losses.  mask: (N,) bool or None.  w_soft: a float or (N,)
    per-token weights (`soft_weights`).  denominator: the token count to divide by; None
    means these N tokens' own valid count.  A training step passes its GLOBAL valid count
    (every micro-batch on every rank): each micro-batch's total is then its share of the
    step's token mean, the shares add up to it, and how a batch is split over micro-batches
    or ranks no longer changes the gradient.
    Returns `(total, stats)`: total is a scalar tensor (0 with zero gradients when every
    token is masked, never NaN); stats holds floats for logging: loss, hard and soft (sums
    over valid tokens / the denominator: means when it is None), w_hard, w_soft (the same),
    n_valid (this call's own count).
    """
    valid = torch.ones_like(hard, dtype=torch.bool) if mask is None else mask.bool()
    count = valid.sum()
    n = count.clamp_min(1) if denominator is None else max(float(denominator), 1.0)
    w_s = torch.as_tensor(w_soft, dtype=soft.dtype, device=soft.device).expand_as(soft)
    w_s = w_s.detach().masked_fill(~valid, 0.0)  # (N,)
    hard0, soft0 = hard.masked_fill(~valid, 0.0), soft.masked_fill(~valid, 0.0)
    total = (w_hard * hard0 + w_s * soft0).sum() / n
    with torch.no_grad():  # one host sync for all the logged numbers
        sums = torch.stack([hard0.sum(), soft0.sum(), w_s.sum()])
        values = torch.cat([total.reshape(1), sums / n, count.reshape(1)]).float().tolist()
    stats = {
        "loss": values[0],
        "hard": values[1],
        "soft": values[2],
        "w_hard": float(w_hard),
        "w_soft": values[3],
        "n_valid": int(values[4]),
    }
    return total, stats

