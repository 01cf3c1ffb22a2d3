"""Soft-target divergences between a student and a teacher, one value per token.

Every divergence has the same signature::

    fn(student_logits, teacher, *, temperature=1.0, tail="bucket", mask=None, **params) -> (N,)

student_logits: (N, V) any float dtype; computed in fp32 (fp64 stays fp64).
teacher:        `TeacherSignal` with leading dims (N,): top-k `(N, k)`, optionally dense `(N, V)`.
mask:           optional (N,) bool, True = token counts.  Masked tokens give exactly 0.
returns:        (N,) per-token loss, already multiplied by T^2.

Both distributions are softened by the same temperature T and the loss is scaled by T^2 so
its gradients keep their size as T changes (Hinton et al., https://arxiv.org/abs/1503.02531).

Where the teacher's distribution comes from (`outcome_logprobs`):

* dense   -- `teacher.logits` is present: the exact softmax over the full vocabulary; `tail`
             is ignored.
* renorm  -- the k teacher ids only.  Teacher: `log_softmax(topk_logprobs / T)` (its top-k,
             renormalised to sum to 1).  Student: `log_softmax(student_logits[ids] / T)`, i.e.
             its tempered probabilities at those ids renormalised over them.  Tokens outside
             the top-k get no gradient, and the teacher's tail mass is thrown away.
* bucket  -- k + 1 outcomes: the k ids plus one "everything else" bucket.  Teacher:
             `[topk_logprobs, tail_logprob]`, re-tempered as `log_softmax([...] / T)`; this is
             exact at T = 1 and an estimate otherwise (the true tempered tail is a sum over
             tokens we no longer have).  Student: its full-vocabulary tempered softmax, with
             the mass outside the ids summed by a masked logsumexp (stable even when the tail
             is tiny).  The student is pushed to put the teacher's tail mass outside the top-k.
             A teacher tail that rounded to 0 in fp32 is floored at eps/2 (about 6e-8).

With k = V (every token kept) both sparse estimators equal the dense loss.  Top-k ids must be
distinct within a row.  Divergences use 0 * log 0 = 0, so zero-probability outcomes (e.g. an
empty teacher tail) contribute nothing and give finite gradients.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from losses.signal import TeacherSignal

TAILS = ("bucket", "renorm")
NEG_INF = float("-inf")
# The smallest tail mass 1 - sum(top-k) that fp32 resolves: a teacher tail that rounds to 0 is
# read as this, so losses with log p_t in them (reverse KL) stay finite on confident tokens.
TAIL_FLOOR_LOGPROB = math.log(torch.finfo(torch.float32).eps / 2)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precisions -> fp32; fp32/fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def outcome_logprobs(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tempered student and teacher log-probs over one shared outcome set.

    student_logits: (N, V).  Returns `(student, teacher)`, each (N, M) where M = V (dense
    teacher), k ("renorm") or k + 1 ("bucket", last column = tail bucket).  The teacher half is
    detached.  See the module docstring for what each estimator means.  mask: (N,) bool; the
    teacher rows of masked tokens (cache padding may hold anything) are replaced by the
    student's, so they cannot leak NaN into gradients.
    """
    s, t = _outcome_logprobs(student_logits, teacher, temperature, tail)
    if mask is not None:
        t = torch.where(mask.bool().unsqueeze(-1), t, s.detach())
    return s, t


def _outcome_logprobs(student_logits, teacher, temperature, tail):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail not in TAILS:
        raise ValueError(f"unknown tail estimator {tail!r}; expected one of {TAILS}")
    z = _upcast(student_logits)  # (N, V)
    z = z if temperature == 1.0 else z / temperature  # no (N, V) copy at T = 1
    if teacher.logits is not None:
        t_logits = _upcast(teacher.logits.detach()).to(z.dtype)  # (N, V)
        t = torch.log_softmax(t_logits / temperature, dim=-1)
        return torch.log_softmax(z, dim=-1), t
    ids = teacher.topk_ids
    top = teacher.topk_logprobs.detach().to(z.dtype)  # (N, k)
    if tail == "renorm" or teacher.k >= z.shape[-1]:
        # k = V: the tail bucket is empty, and bucket == renorm == dense.
        s = torch.log_softmax(z.gather(-1, ids), dim=-1)  # (N, k)
        return s, torch.log_softmax(top / temperature, dim=-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
    s_top = z.gather(-1, ids) - lse  # (N, k)
    s_tail = torch.logsumexp(z.scatter(-1, ids, NEG_INF), dim=-1, keepdim=True) - lse  # (N, 1)
    # (N, 1); an empty tail is fp32 rounding (top-k mass rounded to 1), not certainty.
    t_tail = teacher.tail_logprob().to(z.dtype).clamp_min(TAIL_FLOOR_LOGPROB).unsqueeze(-1)
    t = torch.log_softmax(torch.cat([top, t_tail], dim=-1) / temperature, dim=-1)
    return torch.cat([s_top, s_tail], dim=-1), t


# ---- kernels on log-prob pairs (..., M) -> (...,) ------------------------------------------

def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q) over the last dim, with 0 log 0 = 0.

    Entries where p = 0 exactly (log p = -inf) are zeroed *before* the subtraction so that
    -inf - -inf never makes a NaN, in the value or in the gradient.
    """
    empty = logp == NEG_INF
    diff = logp.masked_fill(empty, 0.0) - logq.masked_fill(empty, 0.0)
    return (logp.exp() * diff).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, a: float) -> torch.Tensor:
    """log(a p + (1 - a) q), elementwise; NaN-free gradients where both are -inf."""
    if a >= 1.0:
        return logp
    if a <= 0.0:
        return logq
    both = (logp == NEG_INF) & (logq == NEG_INF)
    mixed = torch.logaddexp(
        logp.masked_fill(both, 0.0) + math.log(a), logq.masked_fill(both, 0.0) + math.log1p(-a)
    )
    return mixed.masked_fill(both, NEG_INF)


def _finish(loss: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    loss = loss * (temperature**2)
    return loss if mask is None else loss.masked_fill(~mask.bool(), 0.0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ---- public per-token divergences ------------------------------------------------------------

def forward_kl(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_t || p_s) per token, (N, V) -> (N,).  Mode-covering; the classic KD loss."""
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(kl(t, s), temperature, mask)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_s || p_t) per token, (N, V) -> (N,).  Mode-seeking (MiniLLM,
    https://arxiv.org/abs/2306.08543)."""
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(kl(s, t), temperature, mask)


def jsd(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per token, (N, V) -> (N,).

    With m = beta p_t + (1 - beta) p_s:  JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    (GKD, Agarwal et al., eq. 1, https://arxiv.org/abs/2306.13649; TRL's `generalized_jsd_loss`
    convention).  beta = 0.5 is the symmetric JSD.  The formula itself vanishes at both ends
    (JSD_beta ~ beta KL(p_t||p_s) as beta -> 0, ~ (1 - beta) KL(p_s||p_t) as beta -> 1), so, as
    in TRL, the endpoints are defined as the unscaled KLs: beta = 0 is `forward_kl` and
    beta = 1 is `reverse_kl`.
    """
    _check_unit("beta", beta)
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    if beta == 0.0:
        loss = kl(t, s)
    elif beta == 1.0:
        loss = kl(s, t)
    else:
        m = log_mix(t, s, beta)
        loss = beta * kl(t, m) + (1.0 - beta) * kl(s, m)
    return _finish(loss, temperature, mask)


def skew_kl(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew KL per token: KL(p_t || alpha p_t + (1 - alpha) p_s), (N, V) -> (N,).

    DistiLLM (Ko et al., https://arxiv.org/abs/2402.03898): mixing a little of the teacher into
    the student side bounds the loss and its gradient.  alpha = 0 is `forward_kl`.
    """
    _check_unit("alpha", alpha)
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(kl(t, log_mix(t, s, alpha)), temperature, mask)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL per token: KL(p_s || alpha p_s + (1 - alpha) p_t), (N, V) -> (N,).

    DistiLLM's SRKL (https://arxiv.org/abs/2402.03898).  alpha = 0 is `reverse_kl`.
    """
    _check_unit("alpha", alpha)
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(kl(s, log_mix(s, t, alpha)), temperature, mask)


def tv(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation distance per token: 0.5 sum |p_t - p_s|, (N, V) -> (N,), in [0, T^2]
    (the T^2 factor is applied to every divergence for consistency)."""
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(0.5 * (t.exp() - s.exp()).abs().sum(-1), temperature, mask)


Divergence = Callable[..., torch.Tensor]

DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": tv,
}


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name, with a clear error for a typo."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        known = sorted(DIVERGENCES)
        raise ValueError(f"unknown divergence {name!r}; expected one of {known}") from None
