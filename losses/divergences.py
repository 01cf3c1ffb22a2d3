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
* bucket  -- k + 1 outcomes: the k ids plus one "everything else" bucket, built the same
             way on both sides: each side's own probabilities at T = 1 of the k ids and of the
             rest (teacher: `[topk_logprobs, tail_logprob]`; student: its full softmax, the
             rest summed by a logsumexp over the ids' complement), then softened as a (k+1)-
             outcome distribution, `log_softmax(log a / T)`.  What is estimated is therefore
             the divergence between the two tempered coarse-grained distributions: exactly
             the divergence of the (k+1)-outcome distributions at T = 1, and at any T zero
             (with zero gradient) for a student identical to its teacher.  The tail's shape
             is unknown on the teacher's side, so tempering the full softmax first and then
             bucketing, on the student's side only, would compare two different functions.
             A tail mass that rounds below eps/2 (about 6e-8, fp32's resolution of
             1 - sum(top-k)) is read as eps/2 on both sides, so reverse KL stays finite on
             confident tokens; with k >= V the bucket is empty (probability 0) on both sides.
* sampled -- see `TeacherSignal` (kind "sampled"): the teacher's tempered distribution is
             estimated by the frequencies of n draws from it; forward KL (and CE) are linear
             in the teacher's probabilities, so their value and gradient are unbiased.  Every
             other divergence needs the teacher's probabilities at the student's support and
             is refused for this signal.  The draws' temperature must be the loss's.

With k = V (every token kept) both top-k estimators equal the dense loss.  Top-k ids must be
distinct within a row.  Divergences use 0 * log 0 = 0, so zero-probability outcomes (e.g. an
empty tail bucket) contribute nothing and give finite gradients.

Each entry of `DIVERGENCES` also says whether it has a closed-form gradient with respect to
the outcome logits (`Divergence.outcome_grad`); the chunked loss (losses/chunked.py) then
forms d loss / d student logits analytically, and falls back to autograd otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from losses.signal import TeacherSignal

TAILS = ("bucket", "renorm")  # estimators over a top-k signal
ESTIMATORS = (*TAILS, "sampled")  # every estimator the loss's `tail` names ("auto" picks one: resolve_tail)
NEG_INF = float("-inf")
# The smallest tail mass 1 - sum(top-k) that fp32 resolves: a teacher tail that rounds to 0 is
# read as this, so losses with log p_t in them (reverse KL) stay finite on confident tokens.
TAIL_FLOOR_LOGPROB = math.log(torch.finfo(torch.float32).eps / 2)


def dense_over(teacher: TeacherSignal, vocab: int, temperature: float = 1.0) -> TeacherSignal:
    """The signal with its dense logits (N, V_t) widened to the student's vocab (N, vocab).
    A student whose vocab is padded past the tokenizer's (as many checkpoints' are) has ids
    the teacher never predicts: they get logits max(T, 1) * TAIL_FLOOR_LOGPROB below the
    row's max, so at temperature T each is at most the bucket's floor (6e-8) of the top id's
    probability, and a divergence with log p_t in it (reverse KL) stays finite.  Anything
    else is returned as it is."""
    missing = 0 if teacher.logits is None else vocab - teacher.logits.shape[-1]
    if missing <= 0:
        return teacher
    floor = teacher.logits.amax(dim=-1, keepdim=True) + max(temperature, 1.0) * TAIL_FLOOR_LOGPROB  # (N, 1)
    wide = torch.cat([teacher.logits, floor.expand(*teacher.logits.shape[:-1], missing)], dim=-1)
    return dataclasses.replace(teacher, logits=wide, dense_entropy=None)  # no longer normalised


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
    check_estimator(teacher, temperature, tail)
    z = _upcast(student_logits)  # (N, V)
    if teacher.logits is not None:
        t_logits = _upcast(dense_over(teacher, z.shape[-1], temperature).logits.detach()).to(z.dtype)  # (N, V)
        return torch.log_softmax(z / temperature, dim=-1), torch.log_softmax(t_logits / temperature, dim=-1)
    ids = teacher.topk_ids
    top = teacher.topk_logprobs.detach().to(z.dtype)  # (N, k)
    if tail == "renorm":
        s = torch.log_softmax(z.gather(-1, ids) / temperature, dim=-1)  # (N, k)
        return s, torch.log_softmax(top / temperature, dim=-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
    s_top = z.gather(-1, ids) - lse  # (N, k)
    s_tail = torch.logsumexp(z.scatter(-1, ids, NEG_INF), dim=-1, keepdim=True) - lse  # (N, 1)
    t_tail = teacher.tail_logprob().to(z.dtype).unsqueeze(-1)  # (N, 1)
    s_tail, t_tail = bucket_tails(s_tail, t_tail, empty=teacher.k >= z.shape[-1])
    s = torch.log_softmax(torch.cat([s_top, s_tail], dim=-1) / temperature, dim=-1)
    t = torch.log_softmax(torch.cat([top, t_tail], dim=-1) / temperature, dim=-1)
    return s, t


def bucket_tails(s_tail: torch.Tensor, t_tail: torch.Tensor, empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' tail log-masses at T = 1, (N, 1) each, by one rule: floored at
    TAIL_FLOOR_LOGPROB, or -inf on both when the top-k holds the whole vocabulary."""
    if empty:
        return torch.full_like(s_tail, NEG_INF), torch.full_like(t_tail, NEG_INF)
    return s_tail.clamp_min(TAIL_FLOOR_LOGPROB), t_tail.clamp_min(TAIL_FLOOR_LOGPROB)


def resolve_tail(tail: str, teacher: TeacherSignal) -> str:
    """The loss's `tail`, with "auto" (the config's default) as the estimator the signal
    needs: `sampled` for a sampled signal, `bucket` for a top-k or dense one."""
    if tail != "auto":
        return tail
    return "sampled" if teacher.kind == "sampled" and teacher.logits is None else "bucket"


def check_estimator(teacher: TeacherSignal, temperature: float, tail: str, divergence: str = "forward_kl") -> None:
    """ValueError, in one line, for a signal the estimator cannot use without bias."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail not in ESTIMATORS:
        raise ValueError(f"unknown tail estimator {tail!r}; expected one of {ESTIMATORS}")
    if teacher.logits is not None:
        return
    if (teacher.kind == "sampled") != (tail == "sampled"):
        raise ValueError(f"the teacher signal is {teacher.kind!r} but the loss's estimator is {tail!r}; "
                         f"use tail: {'sampled' if teacher.kind == 'sampled' else 'bucket or renorm'}")
    if teacher.kind == "sampled":
        if not DIVERGENCES[divergence].sampled:
            raise ValueError(f"divergence {divergence!r} cannot be estimated without bias from sampled teacher "
                             f"tokens; use forward_kl, or a top-k cache")
        if abs(teacher.temperature - temperature) > 1e-9:
            raise ValueError(f"the teacher's tokens were sampled at temperature {teacher.temperature:g} but the "
                             f"loss uses {temperature:g}; set loss.temperature to {teacher.temperature:g} or "
                             f"re-cache with that sampling temperature")


def sampled_forward_kl(z: torch.Tensor, teacher: TeacherSignal, temperature: float) -> torch.Tensor:
    """Unbiased KL(p_t^T || p_s^T) per token from sampled teacher tokens, (N, V) -> (N,), not
    yet scaled by T^2:  -sum_i f_i log p_s^T(i) - H_T, with f_i the sampled frequencies
    (E[f_i] = p_t^T(i), so this is an unbiased cross-entropy) and H_T the teacher's stored
    entropy at T.  Its gradient w.r.t. z / T is p_s^T - f."""
    logp = torch.log_softmax(z / temperature, dim=-1).gather(-1, teacher.topk_ids)  # (N, u)
    freq = teacher.topk_logprobs.detach().to(z.dtype).exp()  # (N, u); padding: 0
    return -(freq * logp).sum(-1) - teacher.entropy.detach().to(z.dtype)


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


def _per_token(name: str, student_logits, teacher, temperature, tail, mask, params) -> torch.Tensor:
    """The generic (autograd-friendly) per-token value of DIVERGENCES[name], (N, V) -> (N,)."""
    check_estimator(teacher, temperature, tail, name)
    if teacher.kind == "sampled" and teacher.logits is None:
        if mask is not None:  # masked rows (cache padding) may hold anything: keep NaN out of grads
            keep = mask.bool()
            teacher = TeacherSignal(teacher.topk_ids, teacher.topk_logprobs.masked_fill(~keep[:, None], NEG_INF),
                                    kind="sampled", entropy=teacher.entropy.masked_fill(~keep, 0.0),
                                    temperature=teacher.temperature)
        return _finish(sampled_forward_kl(_upcast(student_logits), teacher, temperature), temperature, mask)
    s, t = outcome_logprobs(student_logits, teacher, temperature=temperature, tail=tail, mask=mask)
    return _finish(DIVERGENCES[name].value(s, t, **params), temperature, mask)


# ---- values and closed-form gradients on outcome log-probs (N, M) ------------------------------
# s = log A, t = log B: the student's and the teacher's tempered outcome distributions, with
# A = softmax(l) of the student's outcome logits l.  `*_grad` returns dD/dl (N, M) in closed
# form: for D(A), dD/dl = A * (dD/dA - <A, dD/dA>); every row of it sums to 0.

def _weighted_centre(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A * (g - <A, g>) per row, with A = exp(s); entries where A = 0 are 0 (g may be NaN there)."""
    a = s.exp()
    g = g.masked_fill(s == NEG_INF, 0.0)
    return a * (g - (a * g).sum(-1, keepdim=True))


def _forward_kl_grad(s, t):
    return s.exp() - t.exp()


def _reverse_kl_grad(s, t):
    return _weighted_centre(s, s - t)  # dKL(A||B)/dA_j = log A_j - log B_j + 1; the 1 cancels


def _jsd_value(s, t, beta=0.5):
    _check_unit("beta", beta)
    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = log_mix(t, s, beta)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)


def _jsd_grad(s, t, beta=0.5):
    if beta == 0.0:
        return _forward_kl_grad(s, t)
    if beta == 1.0:
        return _reverse_kl_grad(s, t)
    return _weighted_centre(s, (1.0 - beta) * (s - log_mix(t, s, beta)))  # dJSD/dA_j = (1-beta) log(A_j/M_j)


def _skew_kl_value(s, t, alpha=0.1):
    _check_unit("alpha", alpha)
    return kl(t, log_mix(t, s, alpha))


def _skew_kl_grad(s, t, alpha=0.1):
    # dD/dA_j = -(1 - alpha) B_j / M_j, M = alpha B + (1 - alpha) A; B_j / M_j <= 1 / alpha.
    return _weighted_centre(s, -(1.0 - alpha) * (t - log_mix(t, s, alpha)).exp())


def _skew_reverse_kl_value(s, t, alpha=0.1):
    _check_unit("alpha", alpha)
    return kl(s, log_mix(s, t, alpha))


def _skew_reverse_kl_grad(s, t, alpha=0.1):
    # dD/dA_j = log(A_j / M_j) + 1 - alpha A_j / M_j, M = alpha A + (1 - alpha) B; the 1 cancels.
    r = s - log_mix(s, t, alpha)
    return _weighted_centre(s, r - alpha * r.exp())


def _tv_value(s, t):
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


# ---- public per-token divergences ------------------------------------------------------------

def forward_kl(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_t || p_s) per token, (N, V) -> (N,).  Mode-covering; the classic KD loss.  The one
    divergence a sampled signal estimates without bias (tail="sampled")."""
    return _per_token("forward_kl", student_logits, teacher, temperature, tail, mask, {})


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
    return _per_token("reverse_kl", student_logits, teacher, temperature, tail, mask, {})


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
    return _per_token("jsd", student_logits, teacher, temperature, tail, mask, {"beta": beta})


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
    return _per_token("skew_kl", student_logits, teacher, temperature, tail, mask, {"alpha": alpha})


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
    return _per_token("skew_reverse_kl", student_logits, teacher, temperature, tail, mask, {"alpha": alpha})


def tv(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation distance per token: 0.5 sum |p_t - p_s|, (N, V) -> (N,), in [0, T^2]
    (the T^2 factor is applied to every divergence for consistency).  Not differentiable
    where p_t = p_s, so it has no closed-form gradient here: the chunked loss uses autograd."""
    return _per_token("tv", student_logits, teacher, temperature, tail, mask, {})


@dataclass(frozen=True)
class Divergence:
    """One registered divergence: its per-token function and what the fast path needs.

    fn:           the per-token loss, (student_logits (N, V), teacher, *, temperature, tail,
                  mask, **params) -> (N,), differentiable by autograd
    value:        the divergence on outcome log-probs, (s (N, M), t (N, M), **params) -> (N,)
    outcome_grad: its gradient w.r.t. the student's outcome logits in closed form, (s, t,
                  **params) -> (N, M); None: the chunked loss falls back to autograd
    params:       the config parameters it takes (LossConfig fields of the same names)
    sampled:      estimable without bias from a sampled teacher signal
    """

    fn: Callable[..., torch.Tensor]
    value: Callable[..., torch.Tensor]
    outcome_grad: Callable[..., torch.Tensor] | None = None
    params: tuple[str, ...] = ()
    sampled: bool = False

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl, lambda s, t: kl(t, s), _forward_kl_grad, sampled=True),
    "reverse_kl": Divergence(reverse_kl, lambda s, t: kl(s, t), _reverse_kl_grad),
    "jsd": Divergence(jsd, _jsd_value, _jsd_grad, params=("beta",)),
    "skew_kl": Divergence(skew_kl, _skew_kl_value, _skew_kl_grad, params=("alpha",)),
    "skew_reverse_kl": Divergence(skew_reverse_kl, _skew_reverse_kl_value, _skew_reverse_kl_grad, params=("alpha",)),
    "tv": Divergence(tv, _tv_value),
}


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name, with a clear error for a typo."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        known = sorted(DIVERGENCES)
        raise ValueError(f"unknown divergence {name!r}; expected one of {known}") from None
