"""Per-token hard and soft losses in bounded memory, chunked over tokens.

Full-vocabulary logits are the memory hog of distillation: at 8192 tokens x 128,256 vocab
one fp32 copy is 4.2 GB, and log-softmax, probabilities and their gradients make several.
Here the lm_head matmul and both losses run `chunk_size` tokens at a time, so at most
chunk_size x V logits (and their fp32 temporaries) are alive, in forward and in backward.

How: a custom `torch.autograd.Function`.  Forward computes each chunk's losses without a graph
and saves only its inputs (hidden, weight, bias).  Backward recomputes one chunk's logits at a
time, gets d(loss)/d(logits) for that chunk from the upstream per-token gradients, and writes
the chunk's share straight into one preallocated gradient per input (`addmm_` into grad W).

Why not `torch.utils.checkpoint` per chunk: autograd would then create a fresh (V, H) grad of W
per chunk and sum them (2x the weight's size at peak, plus an allocation per chunk), and the
gradient of each `rows[s:e]` slice is a zero-padded copy of the whole input - quadratic when
the input is (N, V) logits.  Why not compute the gradients during forward (Liger's fused
linear losses): we return *per-token* losses whose upstream gradients (adaptive per-token
weights, masks, w_hard(t)) only exist at backward time, so that would mean keeping two (N, V)
Jacobian rows.  The price of recomputing is one extra (C, H) x (H, V) matmul per chunk.
Grad W accumulates in W's dtype (like autograd would).  Double backward is not supported.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from losses.divergences import get_divergence
from losses.hard import hard_ce, hard_labels
from losses.signal import TeacherSignal


def _slice(signal: TeacherSignal | None, s: int, e: int) -> TeacherSignal | None:
    if signal is None:  # CE-only (a baseline student, or teacher pretraining)
        return None
    dense = None if signal.logits is None else signal.logits[s:e]
    return TeacherSignal(signal.topk_ids[s:e], signal.topk_logprobs[s:e], dense)


def _chunk_logits(rows, weight, bias) -> torch.Tensor:
    """(C, H) hidden -> (C, V) logits in the model's dtype (as its lm_head would compute
    them); with weight None the rows already are (C, V) logits."""
    return rows if weight is None else F.linear(rows, weight, bias)


def _losses(logits, signal, targets, mask, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits of any dtype -> (hard (C,), soft (C,)), computed in fp32."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # (C, V)
    div, ignore_index, kwargs = opts
    hard = hard_ce(logits, targets, ignore_index)
    if signal is None:
        return hard, torch.zeros_like(hard)
    return hard, div(logits, signal, mask=mask, **kwargs)


class _ChunkedLosses(torch.autograd.Function):
    """rows (N, H) with weight (V, H) [+ bias (V,)], or rows (N, V) logits with weight None
    -> per-token (hard (N,), soft (N,)), never holding more than chunk x V logits."""

    @staticmethod
    def forward(ctx, rows, weight, bias, signal, targets, mask, opts, chunk):
        spans = [(s, min(s + chunk, rows.shape[0])) for s in range(0, rows.shape[0], chunk)]
        out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        hard = rows.new_zeros(rows.shape[0], dtype=out_dtype)
        soft = torch.zeros_like(hard)
        for s, e in spans:
            logits = _chunk_logits(rows[s:e], weight, bias)
            m = None if mask is None else mask[s:e]
            h, k = _losses(logits, _slice(signal, s, e), targets[s:e], m, opts)
            hard[s:e], soft[s:e] = h, k
        ctx.save_for_backward(rows, weight, bias, targets, mask)
        ctx.extras = (spans, signal, opts)
        return hard, soft

    @staticmethod
    @once_differentiable
    def backward(ctx, g_hard, g_soft):
        rows, weight, bias, targets, mask = ctx.saved_tensors
        spans, signal, opts = ctx.extras
        need_rows, need_w, need_b = ctx.needs_input_grad[:3]
        g_rows = torch.empty_like(rows) if need_rows else None
        g_w = torch.zeros_like(weight) if need_w else None
        g_b = torch.zeros_like(bias) if need_b else None
        for s, e in spans:
            chunk = rows[s:e]
            logits = _chunk_logits(chunk, weight, bias).detach().requires_grad_(True)  # (C, V)
            with torch.enable_grad():
                m = None if mask is None else mask[s:e]
                h, k = _losses(logits, _slice(signal, s, e), targets[s:e], m, opts)
                upstream = (h * g_hard[s:e].to(h.dtype) + k * g_soft[s:e].to(k.dtype)).sum()
                (g_logits,) = torch.autograd.grad(upstream, logits)  # (C, V), model dtype
            if weight is None:
                g_rows[s:e] = g_logits
                continue
            if need_rows:
                g_rows[s:e] = g_logits @ weight
            if need_w:
                g_w.addmm_(g_logits.T, chunk)
            if need_b:
                g_b += g_logits.sum(0)
        return g_rows, g_w, g_b, None, None, None, None, None


def _run_chunks(rows, weight, bias, signal, targets, mask, opts, chunk_size):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = rows.shape[0]
    sig_shape = None if signal is None else tuple(signal.topk_ids.shape)
    if (sig_shape is not None and sig_shape[0] != n) or targets.shape[0] != n:
        raise ValueError(
            f"token counts differ: {n} rows, signal {sig_shape}, targets {tuple(targets.shape)}"
        )
    return _ChunkedLosses.apply(rows, weight, bias, signal, targets, mask, opts, chunk_size)


def _prepare(signal, labels, mask, divergence, temperature, tail, hard_target, ignore_index,
             div_params) -> tuple[torch.Tensor, tuple]:
    targets = hard_labels(hard_target, labels, signal, mask, ignore_index)  # (N,)
    kwargs: dict[str, Any] = {"temperature": temperature, "tail": tail, **div_params}
    return targets, (get_divergence(divergence), ignore_index, kwargs)


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
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    **div_params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token hard CE and soft divergence from final hidden states, chunked over tokens.

    hidden: (N, H) final hidden states (any float dtype).  lm_head_weight: (V, H); bias: (V,)
    or None.  signal: (N, k) teacher signal (optionally dense (N, V)), or None for CE only
    (soft is then all zeros).  labels: (N,) int64 with
    `ignore_index` for padding (may be None with hard_target="teacher_argmax").  mask: (N,)
    bool or None.  divergence / temperature / tail / **div_params: see `losses.divergences`.
    hard_target: "labels" | "teacher_argmax" (see `losses.hard`).

    Returns `(hard, soft)`, each (N,) fp32, 0 at masked tokens.  Equal to computing
    `hidden @ lm_head_weight.T` at once and applying the same losses; never holds more than
    chunk_size x V logits.
    """
    targets, opts = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params)
    return _run_chunks(hidden, lm_head_weight, bias, signal, targets, mask, opts, chunk_size)


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
    chunk_size: int = 1024,
    ignore_index: int = -100,
    **div_params: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `per_token_losses`, from precomputed student logits (N, V) (any float dtype).

    The logits themselves are already in memory; chunking bounds the fp32 upcast and the
    softmax temporaries to chunk_size x V, and backward writes one (N, V) gradient.
    """
    targets, opts = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params)
    return _run_chunks(logits, None, None, signal, targets, mask, opts, chunk_size)
