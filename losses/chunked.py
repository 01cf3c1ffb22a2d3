"""Per-token hard and soft losses in bounded memory, chunked over tokens, with analytic gradients.

Full-vocabulary logits are the memory hog of distillation: at 8192 tokens x 128,256 vocab
one fp32 copy is 4.2 GB, and log-softmax, probabilities and their gradients make several.
Here the lm_head matmul and both losses run `chunk_size` tokens at a time, so at most a few
chunk_size x V buffers are alive, in forward and in backward.

How: a custom `torch.autograd.Function`.  Forward computes each chunk's losses without a graph
and keeps, per token, only what backward needs beyond the inputs: the log-normaliser and the
soft loss's gradient on its few outcomes (k + 1 numbers for a top-k signal).  Backward
recomputes one chunk's logits at a time (under the autocast state forward ran in, so it
differentiates the function forward computed), except the last chunk, whose exp pass forward
keeps for it (backward starts there, so still one chunk's buffers at a time; all the tokens,
when they fit one chunk), and forms d loss / d logits in closed form:

    p = softmax(z)                                   one exp pass over (C, V)
    g = p * (g_hard + g_soft * a)                    the dense part, one row scale
    g[S] = ...;  g[y] -= g_hard                      the k (or u) sparse entries, scattered

where g_hard, g_soft are the upstream per-token gradients (schedule weights, adaptive
weights, masks: all known only at backward time, so they enter as row scales).  The soft
part's closed form is the divergence's gradient on its outcome logits (losses/divergences.py,
`Divergence.outcome_grad`) chained through the estimator:

* bucket:  outcomes [log p_S, log p_rest] / T.  With c = T * dD/dl (k + 1 values, summing to 0
           unless the tail was floored): d/dz_m = c_m on the ids, c_rest * p_m / p_rest off
           them, minus p_m * sum(c) (nonzero only when the tail was floored).  So a = c_rest /
           p_rest - sum(c) and the ids' entries are overwritten: never a large term cancelled.
* renorm:  outcomes z_S / T: d/dz = T * dD/dl on the ids only (a = 0).
* sampled: forward KL only: d/dz = T * (softmax(z / T) * sum(f) - f on the sampled ids).
* dense:   (online teacher logits) d/dz = T * dD/dl over all V outcomes; for forward KL at
           T = 1 that is p - p_t, so the row scale takes g_soft and -g_soft * p_t is added.
           A signal that carries log-probabilities and their entropy (`dense_entropy`, as the
           live teacher hands it over) gives p_t = exp(logits) and H(t) without a teacher
           log-softmax per student: the forward KL's value is -H(t) - p_t . z + lse(z).

The forward pass likewise makes one exp pass (plus, for the bucket, one sum over the ids'
complement, done in place: no scatter copy).  So a KD step costs about what a CE-only step
costs, and no autograd graph over (C, V) tensors is built.  A divergence without a closed form
(`Divergence.outcome_grad is None`, e.g. tv) takes the generic path, chosen automatically:
backward runs autograd over the recomputed chunk.

Why not `torch.utils.checkpoint` per chunk: autograd would create a fresh (V, H) grad of W per
chunk and sum them (2x the weight's size at peak).  Why not compute the gradients during
forward (Liger's fused linear losses): the upstream per-token gradients only exist at backward
time, so that would mean keeping (N, V) partial gradients.  The price of recomputing is one
extra (C, H) x (H, V) matmul and one exp pass per chunk but the last.  Grad W accumulates in
W's dtype.  Double backward is not supported.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from losses.difficulty import row_dot
from losses.divergences import NEG_INF, bucket_tails, check_estimator, dense_over, get_divergence, resolve_tail
from losses.hard import hard_ce, hard_labels
from losses.signal import TeacherSignal

# Default memory budget for the (C, V) buffers a chunk holds at once (logits, their fp32
# copy, probabilities/gradient): the chunk size follows from it and the vocabulary.  On a
# CPU a small chunk keeps them near the caches; on an accelerator each chunk costs kernel
# launches and a (C, H) x (H, V) matmul too small to fill the device, so it gets 8x the
# budget: at Liger's shape (BT 8192, H 4096, V 128,256, bf16) on an H200, 160-token chunks
# took 133 ms (CE) / 160 ms (KD) and 1,392-token ones 73 / 76 ms at 3.4 GB peak (BENCHMARKS.md).
CHUNK_BUDGET_BYTES = 256 << 20
ACCELERATOR_CHUNK_BUDGET_BYTES = 2 << 30
_LIVE_BUFFERS = 3  # (C, V) fp32-sized buffers alive at once in backward


def auto_chunk_size(vocab_size: int, device: torch.device | str | None = None, *, budget_bytes: int | None = None,
                    buffers: int = _LIVE_BUFFERS) -> int:
    """Tokens per chunk so that the chunk's (C, V) buffers fit the budget (`budget_bytes`, else
    CHUNK_BUDGET_BYTES on a CPU or no device, ACCELERATOR_CHUNK_BUDGET_BYTES elsewhere): a
    multiple of 16, at least 16 (V = 128,256: 160 tokens on a CPU, 1,392 on a GPU; V = 4,096:
    5,456 and 43,680)."""
    if isinstance(device, int):  # the second parameter was the budget before 2026-12-04
        raise TypeError("auto_chunk_size(vocab_size, device): pass a byte budget as budget_bytes=")
    if budget_bytes is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        budget_bytes = CHUNK_BUDGET_BYTES if on_cpu else ACCELERATOR_CHUNK_BUDGET_BYTES
    c = budget_bytes // (buffers * 4 * max(vocab_size, 1))
    return max(16, c // 16 * 16)


@dataclass(frozen=True)
class _Plan:
    """What every chunk does: the divergence and its settings, and which backward it takes."""

    divergence: Any  # losses.divergences.Divergence
    name: str
    temperature: float
    tail: str
    ignore_index: int
    params: dict = field(default_factory=dict)
    # The model's logits from its lm_head's output (`head_logits`): Cohere's scale (Granite's
    # 1 / logits_scaling), then Gemma 2/3's soft cap, cap * tanh(z / cap).
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def analytic(self) -> bool:
        return self.divergence.outcome_grad is not None

    def divergence_value(self, logits, signal, mask) -> torch.Tensor:
        return self.divergence(logits, signal, temperature=self.temperature, tail=self.tail, mask=mask,
                               **self.params)


def _chunk_logits(rows, weight, bias, plan) -> torch.Tensor:
    """(C, H) hidden -> (C, V) logits in the model's (or autocast's) dtype, as its lm_head and
    the model's head transform would compute them; with weight None the rows already are
    (C, V) logits."""
    return rows if weight is None else head_logits(F.linear(rows, weight, bias), plan.logit_scale, plan.softcap)


def head_logits(raw: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """A model's logits from its lm_head's output `raw`, as transformers' Cohere/Granite
    (a scale) and Gemma 2/3 (`final_logit_softcapping`) heads compute them."""
    if logit_scale != 1.0:
        raw = raw * logit_scale
    if softcap is not None:
        raw = torch.tanh(raw / softcap) * softcap
    return raw


def _head_slope(logits: torch.Tensor, plan) -> torch.Tensor | float:
    """d logits / d (lm_head output): the scale, times 1 - (z / cap)^2 under a soft cap
    ((C, V) fp32 from the capped logits z, made before the working copy clobbers them)."""
    if plan.softcap is None:
        return plan.logit_scale
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32, copy=True)
    return z.div_(plan.softcap).square_().neg_().add_(1.0).mul_(plan.logit_scale)


def _chunk_signal(signal: TeacherSignal | None, start: int, end: int, vocab: int,
                  temperature: float) -> TeacherSignal | None:
    """Tokens start..end of a flattened signal, dense logits widened to the student's vocab
    (`dense_over`: a student vocab padded past the tokenizer's)."""
    return None if signal is None else dense_over(signal.rows(start, end), vocab, temperature)


def _working_copy(logits: torch.Tensor, owned: bool) -> torch.Tensor:
    """fp32 (fp64 stays fp64) logits that may be modified in place: `owned` logits (computed
    here from hidden states) are reused when already fp32; a caller's logits are copied."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if owned and logits.dtype == dtype:
        return logits
    return logits.to(dtype, copy=True)


# ---------------------------------------------------------------------------- analytic path


def _soft_case(signal, plan) -> str:
    """Which soft term the analytic passes compute, decided once per chunk:
    "none" (CE only); a dense teacher (its whole distribution): "dense_kl_normalised" (forward
    KL at T = 1 from log-normalised logits and their entropy, `TeacherSignal.dense_entropy`: no
    teacher log-softmax here), "dense_kl" (forward KL otherwise), "dense" (another divergence);
    "sampled" (draws); a top-k signal by its tail: "renorm" or "bucket"."""
    if signal is None:
        return "none"
    if signal.logits is not None:
        if plan.name != "forward_kl":
            return "dense"
        normalised = signal.dense_entropy is not None and plan.temperature == 1.0
        return "dense_kl_normalised" if normalised else "dense_kl"
    if signal.kind == "sampled":
        return "sampled"
    return "renorm" if plan.tail == "renorm" else "bucket"


def _softmax_suffices(signal, plan) -> bool:
    """Whether `_analytic_backward` needs only softmax(z) and the per-token state, not z itself
    (a dense teacher under another divergence or temperature, and a sampled signal at T != 1,
    take log-softmax(z / T) again)."""
    case, T = _soft_case(signal, plan), plan.temperature
    return case in ("none", "dense_kl_normalised", "renorm", "bucket") or T == 1.0 and case in ("dense_kl", "sampled")


def _analytic_forward(z, signal, targets, mask, plan, keep_exp: bool = False):
    """z: (C, V) fp32 working logits (clobbered).  Returns (hard (C,), soft (C,), state), where
    state holds what `_analytic_backward` needs per token (a few numbers each).  keep_exp: also
    hold z's exp pass, exp(z - max) (C, V), as state["exp"], so that backward takes softmax(z)
    from it instead of recomputing the chunk's logits (only where `_softmax_suffices`)."""
    T, case = plan.temperature, _soft_case(signal, plan)
    valid_y = targets != plan.ignore_index
    z_y = z.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)  # (C,)
    state: dict[str, torch.Tensor] = {}
    soft = torch.zeros_like(z_y)
    keep = None if mask is None else mask.bool()
    dense_cross = None  # dense forward KL: sum p_t (log p_t - z / T), (C,); + lse(z / T) below
    # Before the exp pass below clobbers z: what each case needs of the logits themselves.
    if case == "dense_kl_normalised":
        # KL(t || s) = -H(t) - p_t . z + logsumexp(z), from the teacher's log-probs and entropy
        # (given once per step for every student): one exp pass and one row dot.
        p_t = signal.logits.to(z.dtype).exp()  # (C, V)
        dense_cross = row_dot(p_t, z).neg_().sub_(signal.dense_entropy.to(z.dtype))  # (C,)
        del p_t
    elif case == "dense_kl":
        # KL(t || s) = sum p_t (log p_t - z / T) + logsumexp(z / T): no (C, V) log-softmax of
        # the student, and the sum as one row dot (xlogy + a p_t . z dot cost 2-4x as much at
        # V = 49,152).
        t = torch.log_softmax(signal.logits.to(z.dtype) / T, dim=-1)  # (C, V) log p_t
        p_t = t.exp()
        # log p_t - z / T in place; a -inf teacher logit (p_t = 0) is held at the dtype's lowest
        # first, so that p_t times it is 0, as xlogy gives, not 0 * -inf = NaN.
        t.clamp_(min=torch.finfo(t.dtype).min).sub_(z, alpha=1.0 / T)
        dense_cross = row_dot(p_t, t)  # (C,)
        if T != 1.0:  # at T = 1 the exp pass below gives lse(z)
            dense_cross += torch.logsumexp(z / T, dim=-1)
        del t, p_t
    elif case == "dense":  # exact over all V
        s = torch.log_softmax(z / T, dim=-1)
        t = torch.log_softmax(signal.logits.to(z.dtype) / T, dim=-1)
        if keep is not None:
            t = torch.where(keep[:, None], t, s)
        soft = plan.divergence.value(s, t, **plan.params) * T * T
        del s, t
    elif case == "sampled":
        lse_t = torch.logsumexp(z / T, dim=-1) if T != 1.0 else None
        freq = signal.topk_logprobs.to(z.dtype).exp()  # (C, u); padding 0
        entropy = signal.entropy.to(z.dtype)
        if keep is not None:  # masked rows (cache padding) may hold anything
            freq = freq.masked_fill(~keep[:, None], 0.0)
            entropy = entropy.masked_fill(~keep, 0.0)
        z_u = z.gather(1, signal.topk_ids)  # (C, u)
    elif case in ("renorm", "bucket"):
        z_s = z.gather(1, signal.topk_ids)  # (C, k)
    # One exp pass over the chunk, in place: e = exp(z - max).
    row_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
    e = z.sub_(row_max).exp_()
    total = e.sum(-1)  # (C,)
    lse = row_max.squeeze(1) + total.log()  # (C,)
    hard = torch.where(valid_y, lse - z_y, torch.zeros_like(lse))
    state["lse"] = lse
    if keep_exp and _softmax_suffices(signal, plan):
        state.update(exp=e, total=total)  # the bucket zeroes the ids' entries below: backward overwrites them
    if dense_cross is not None:
        soft = (dense_cross + lse if T == 1.0 else dense_cross) * T * T
        if keep is not None:
            soft = torch.where(keep, soft, torch.zeros_like(soft))
    if case in ("none", "dense_kl_normalised", "dense_kl", "dense"):
        return hard, soft, state
    if case == "sampled":
        lse_t = lse if lse_t is None else lse_t
        cross = -(freq * (z_u / T - lse_t[:, None])).sum(-1)  # unbiased CE at T
        soft = (cross - entropy) * T * T
        state.update(lse_t=lse_t, freq=freq)
        return hard, soft, state
    top = signal.topk_logprobs.to(z.dtype)  # (C, k) teacher log-probs at T = 1
    if case == "renorm":
        s = torch.log_softmax(z_s / T, dim=-1)
        t = torch.log_softmax(top / T, dim=-1)
        value, grad = _outcome(s, t, keep, plan)
        state["c_ids"] = grad * T  # (C, k) d soft / d z on the ids
        return hard, value * T * T, state
    # bucket: the student's mass off the ids, summed exactly (zero the ids in place, re-sum).
    log_ids = z_s - lse[:, None]  # (C, k) log p_S
    if "exp" in state:
        state["p_ids"] = log_ids.exp()  # backward's exact entries; the kept exp pass loses them
    e.scatter_(1, signal.topk_ids, 0.0)
    log_rest = (e.sum(-1).log() - total.log())[:, None]  # (C, 1) log p_rest, stable when tiny
    s_tail, t_tail = bucket_tails(log_rest, signal.tail_logprob().to(z.dtype)[:, None],
                                  empty=signal.k >= z.shape[-1])
    s = torch.log_softmax(torch.cat([log_ids, s_tail], dim=-1) / T, dim=-1)  # (C, k + 1)
    t = torch.log_softmax(torch.cat([top, t_tail], dim=-1) / T, dim=-1)
    value, grad = _outcome(s, t, keep, plan)
    c = grad * T  # (C, k + 1): d soft / d log a for each outcome's T = 1 log-mass
    floored = (s_tail == NEG_INF) | (s_tail > log_rest)  # where the floor (or emptiness) ruled
    c_rest = c[:, -1:].masked_fill(floored, 0.0)  # the clamp passes no gradient
    state["c_ids"] = c[:, :-1]
    state["sigma"] = (c[:, :-1].sum(-1, keepdim=True) + c_rest).squeeze(1)  # (C,)
    # c_rest / p_rest, with p_rest = exp(log_rest); 0 where floored (p_rest may be 0 there).
    state["rest_scale"] = torch.where(floored, torch.zeros_like(c_rest), c_rest * (-log_rest).exp()).squeeze(1)
    return hard, value * T * T, state


def _outcome(s, t, keep, plan):
    """(value (C,), dD/dl (C, M)) of the divergence on outcome log-probs; masked rows give 0."""
    if keep is not None:
        t = torch.where(keep[:, None], t, s)
    value = plan.divergence.value(s, t, **plan.params)
    grad = plan.divergence.outcome_grad(s, t, **plan.params)
    if keep is not None:
        value, grad = value * keep, grad * keep[:, None]
    return value, grad


def _analytic_backward(z, signal, targets, mask, state, g_hard, g_soft, plan):
    """d(g_hard . hard + g_soft . soft) / d logits, (C, V) in z's dtype, from the recomputed
    working logits z (clobbered) and the forward's per-token state; z is None where forward
    kept its exp pass (state["exp"], consumed here: the gradient is written over it)."""
    T, case = plan.temperature, _soft_case(signal, plan)
    dtype = state["lse"].dtype  # z's: fp32, or fp64
    g_hard = g_hard.to(dtype).masked_fill(targets == plan.ignore_index, 0.0)  # (C,)
    g_soft = g_soft.to(dtype)
    if mask is not None:
        g_soft = g_soft * mask
    dense_soft, dense_scale = None, None  # a (C, V) soft term not proportional to softmax(z), times (C, 1) if set
    coef = g_hard.clone()  # (C,): p's row scale
    if case == "dense_kl_normalised" or case == "dense_kl" and T == 1.0:
        # d KL(t || s) / dz = softmax(z) - p_t: the row scale, and -p_t added below
        coef += g_soft
        p_t = signal.logits.to(dtype).exp() if case == "dense_kl_normalised" else \
            torch.log_softmax(signal.logits.to(dtype), dim=-1).exp_()  # (C, V)
        dense_soft, dense_scale = p_t, -g_soft[:, None]  # -p_t g_soft, added in one pass below
    elif case in ("dense_kl", "dense"):
        s = torch.log_softmax(z / T, dim=-1)
        t = torch.log_softmax(signal.logits.to(dtype) / T, dim=-1)
        if mask is not None:
            t = torch.where(mask.bool()[:, None], t, s)
        dense_soft = plan.divergence.outcome_grad(s, t, **plan.params).mul_((g_soft * T)[:, None])
        del s, t
    elif case == "sampled" and T != 1.0:
        # softmax(z / T) * sum(f): the tempered probabilities are not the T = 1 ones.
        scale = g_soft * T * state["freq"].sum(-1)
        dense_soft = (z / T - state["lse_t"][:, None]).exp_().mul_(scale[:, None])
    elif case == "sampled":
        coef += g_soft * state["freq"].sum(-1)
    elif case == "bucket":
        coef += g_soft * (state["rest_scale"] - state["sigma"])
    ids = None if signal is None else signal.topk_ids
    bucket_ids = case == "bucket"
    kept = state.pop("exp", None)
    if kept is not None:  # softmax(z) = exp(z - max) / total: no matmul, no exp pass
        g = kept.mul_((coef / state["total"])[:, None])  # (C, V) softmax(z) * coef, in place
        p_ids = state["p_ids"] if bucket_ids else None  # (C, k)
    else:
        p_ids = (z.gather(1, ids) - state["lse"][:, None]).exp() if bucket_ids else None  # (C, k)
        g = z.sub_(state["lse"][:, None]).exp_().mul_(coef[:, None])  # (C, V) softmax(z) * coef, in place
    if dense_scale is not None:
        g.addcmul_(dense_soft, dense_scale)
    elif dense_soft is not None:
        g.add_(dense_soft)
    if case == "sampled":
        g.scatter_add_(1, ids, -(g_soft * T)[:, None] * state["freq"])
    elif case == "renorm":
        g.scatter_add_(1, ids, g_soft[:, None] * state["c_ids"])
    elif case == "bucket":  # overwrite the ids' entries (their dense value is not theirs)
        exact = g_hard[:, None] * p_ids + g_soft[:, None] * (state["c_ids"] - p_ids * state["sigma"][:, None])
        g.scatter_(1, ids, exact)
    g.scatter_add_(1, targets.clamp_min(0)[:, None], -g_hard[:, None])
    return g


# ---------------------------------------------------------------------------- generic path


def _generic_losses(logits, signal, targets, mask, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits of any dtype -> (hard (C,), soft (C,)) by the reference functions, in fp32;
    differentiable by autograd (the fallback for divergences without a closed form)."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    hard = hard_ce(logits, targets, ignore_index=plan.ignore_index)
    if signal is None:
        return hard, torch.zeros_like(hard)
    return hard, plan.divergence_value(logits, signal, mask)


# ---------------------------------------------------------------------------- the function


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state) -> contextlib.AbstractContextManager:
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _ChunkedLosses(torch.autograd.Function):
    """rows (N, H) with weight (V, H) [+ bias (V,)], or rows (N, V) logits with weight None
    -> per-token (hard (N,), soft (N,)), never holding more than a chunk's (C, V) buffers."""

    @staticmethod
    def forward(ctx, rows, weight, bias, signal, targets, mask, plan, chunk, backward_to_come):
        spans = _spans(rows.shape[0], chunk)
        vocab = rows.shape[-1] if weight is None else weight.shape[0]
        out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        hard = rows.new_zeros(rows.shape[0], dtype=out_dtype)
        soft = torch.zeros_like(hard)
        states = []
        # The last chunk's exp pass is kept for backward, which starts there: one (C, H) x (H, V)
        # matmul and one exp pass fewer, and still one chunk's buffers at a time.  Not for
        # logits a caller holds (nothing to recompute), nor with no backward to come.
        keeps_last = weight is not None and plan.analytic and backward_to_come and plan.softcap is None
        logits_dtype = rows.dtype
        for i, (s, e) in enumerate(spans):
            logits = _chunk_logits(rows[s:e], weight, bias, plan)  # (C, V)
            logits_dtype = logits.dtype
            sig = _chunk_signal(signal, s, e, vocab, plan.temperature)
            m = None if mask is None else mask[s:e]
            if plan.analytic:
                h, k, state = _analytic_forward(_working_copy(logits, weight is not None), sig, targets[s:e], m,
                                                plan, keep_exp=keeps_last and i == len(spans) - 1)
                states.append(state)
            else:
                h, k = _generic_losses(logits, sig, targets[s:e], m, plan)
            hard[s:e], soft[s:e] = h, k
            del logits
        ctx.save_for_backward(rows, weight, bias, targets, mask)
        ctx.extras = (spans, signal, plan, states, _autocast_state(rows.device.type), logits_dtype)
        return hard, soft

    @staticmethod
    @once_differentiable
    def backward(ctx, g_hard, g_soft):
        rows, weight, bias, targets, mask = ctx.saved_tensors
        spans, signal, plan, states, amp, logits_dtype = ctx.extras
        vocab = rows.shape[-1] if weight is None else weight.shape[0]
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        g_rows = torch.empty_like(rows) if need_rows else None
        g_w = torch.zeros_like(weight) if need_w else None
        g_b = torch.zeros_like(bias) if need_b else None
        # Last chunk first: the one forward kept (freed as it becomes the gradient).
        for i in reversed(range(len(spans))):
            s, e = spans[i]
            chunk = rows[s:e]
            kept = plan.analytic and "exp" in states[i]
            slope = 1.0 if weight is None else plan.logit_scale  # d logits / d lm_head output
            if not kept:
                with _autocast(amp):  # recompute exactly what forward computed (same dtype)
                    logits = _chunk_logits(chunk, weight, bias, plan)  # (C, V)
                if weight is not None:
                    slope = _head_slope(logits, plan)
            sig = _chunk_signal(signal, s, e, vocab, plan.temperature)
            m = None if mask is None else mask[s:e]
            if plan.analytic:
                z = None if kept else _working_copy(logits, weight is not None)
                g_logits = _analytic_backward(z, sig, targets[s:e], m, states[i], g_hard[s:e], g_soft[s:e], plan)
            else:
                logits = logits.detach().requires_grad_(True)
                with torch.enable_grad():
                    h, k = _generic_losses(logits, sig, targets[s:e], m, plan)
                    upstream = (h * g_hard[s:e].to(h.dtype) + k * g_soft[s:e].to(k.dtype)).sum()
                    (g_logits,) = torch.autograd.grad(upstream, logits)
            if weight is None:
                g_rows[s:e] = g_logits
                continue
            if isinstance(slope, torch.Tensor) or slope != 1.0:  # through the head transform
                in_place = g_logits.dtype in (torch.float32, torch.float64)  # the analytic path's own buffer
                g_logits = g_logits.mul_(slope) if in_place else g_logits * slope
            slope = None
            # The matmuls in the logits' dtype, as autograd would run the lm_head's backward.
            g_logits = g_logits.to(logits_dtype)  # (C, V)
            if need_rows:
                g_rows[s:e] = g_logits @ weight.to(logits_dtype)
            if need_w:
                g_w.add_(g_logits.T @ chunk.to(logits_dtype))
            if need_b:
                g_b += g_logits.sum(0)
            logits = g_logits = None
        return g_rows, g_w, g_b, None, None, None, None, None, None


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(n / chunk) chunks whose sizes differ by at most 1, none over
    `chunk`: the last chunk (the one forward keeps) as large as the others, not a remainder."""
    count = -(-n // chunk)
    base, extra = divmod(n, max(count, 1))
    ends = [0]
    for i in range(count):
        ends.append(ends[-1] + base + (i < extra))
    return list(zip(ends[:-1], ends[1:]))


def _run_chunks(rows, weight, bias, signal, targets, mask, plan, chunk_size):
    vocab = rows.shape[-1] if weight is None else weight.shape[0]
    if chunk_size is None:  # a soft cap's backward holds one (C, V) buffer more: its slope
        chunk_size = auto_chunk_size(vocab, rows.device, buffers=_LIVE_BUFFERS + (plan.softcap is not None))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = rows.shape[0]
    sig_shape = None if signal is None else tuple(signal.topk_ids.shape)
    if (sig_shape is not None and sig_shape[0] != n) or targets.shape[0] != n:
        raise ValueError(
            f"token counts differ: {n} rows, signal {sig_shape}, targets {tuple(targets.shape)}"
        )
    # Whether a backward can follow (forward itself runs with grad off: decided out here).
    backward_to_come = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (rows, weight, bias))
    return _ChunkedLosses.apply(rows, weight, bias, signal, targets, mask, plan, chunk_size, backward_to_come)


def _prepare(signal, labels, mask, divergence, temperature, tail, hard_target, ignore_index,
             div_params, logit_scale: float = 1.0, softcap: float | None = None) -> tuple[torch.Tensor, _Plan]:
    targets = hard_labels(hard_target, labels, signal, mask, ignore_index)  # (N,)
    if signal is not None:
        tail = resolve_tail(tail, signal)
        check_estimator(signal, temperature, tail, divergence)
    plan = _Plan(get_divergence(divergence), divergence, temperature, tail, ignore_index, dict(div_params),
                 logit_scale, softcap)
    return targets, plan


def per_token_losses(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    signal: TeacherSignal | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    hard_target: str = "labels",
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    **div_params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token hard CE and soft divergence from final hidden states, chunked over tokens.

    hidden: (N, H) final hidden states (any float dtype).  lm_head_weight: (V, H); bias: (V,)
    or None.  signal: (N, k) teacher signal (top-k or sampled; optionally dense (N, V)), or
    None for CE only (soft is then all zeros).  labels: (N,) int64 with `ignore_index` for
    padding (may be None with hard_target="teacher_argmax").  mask: (N,) bool or None.
    divergence / temperature / tail / **div_params: see `losses.divergences`.
    hard_target: "labels" | "teacher_argmax" (see `losses.hard`).  chunk_size: tokens per
    chunk; None picks it from the vocabulary and the device (`auto_chunk_size`).
    logit_scale, softcap: the model's logits are `head_logits(hidden @ lm_head_weight.T)`
    (Cohere and Granite scale them, Gemma 2/3 soft-cap them).

    Returns `(hard, soft)`, each (N,) fp32, 0 at masked tokens.  Equal to computing
    `hidden @ lm_head_weight.T` at once and applying the same losses; never holds more than a
    chunk's (C, V) buffers.  Under autocast, the logits (forward and recomputed) are in the
    autocast dtype, as an unchunked lm_head would compute them.
    """
    targets, plan = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params, logit_scale, softcap)
    return _run_chunks(hidden, lm_head_weight, bias, signal, targets, mask, plan, chunk_size)


def per_token_losses_from_logits(
    logits: torch.Tensor,
    signal: TeacherSignal | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    hard_target: str = "labels",
    chunk_size: int | None = None,
    ignore_index: int = -100,
    **div_params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `per_token_losses`, from precomputed student logits (N, V) (any float dtype).

    The logits themselves are already in memory; chunking bounds the fp32 upcast and the
    softmax temporaries to a chunk, and backward writes one (N, V) gradient.
    """
    targets, plan = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params)
    return _run_chunks(logits, None, None, signal, targets, mask, plan, chunk_size)
