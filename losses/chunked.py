"""Per-token hard and soft losses in bounded memory, chunked over tokens.

Full-vocabulary logits are the memory hog of distillation: at 8192 tokens x 128,256 vocab
one fp32 copy is 4.2 GB, and log-softmax, probabilities and their gradients make several.
Here the lm_head matmul and both losses run `chunk_size` tokens at a time, and each chunk is
wrapped in `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: forward keeps only
the chunk's inputs (a view of `hidden`) and its (C,) outputs; backward recomputes that one
chunk's logits, so at most chunk_size x V fp32 logits (and their temporaries) are alive.

Why checkpointing rather than a fused autograd.Function that computes gradients during the
forward (Liger's fused-linear losses): we return *per-token* losses, whose upstream
gradients (adaptive per-token weights, masks, w_hard(t)) only exist at backward time.
Precomputing d loss_i / d logits_i would mean storing two (N, V) Jacobian rows - exactly the
memory we are avoiding.  The price is one extra (C, H) x (H, V) matmul per chunk.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losses.divergences import get_divergence
from losses.hard import hard_ce, hard_labels
from losses.signal import TeacherSignal


def _slice(signal: TeacherSignal, s: int, e: int) -> TeacherSignal:
    dense = None if signal.logits is None else signal.logits[s:e]
    return TeacherSignal(signal.topk_ids[s:e], signal.topk_logprobs[s:e], dense)


def _losses(logits, signal, targets, mask, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) logits of any dtype -> (hard (C,), soft (C,)), computed in fp32."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # (C, V)
    div, ignore_index, kwargs = opts
    return hard_ce(logits, targets, ignore_index), div(logits, signal, mask=mask, **kwargs)


def _head_losses(hidden, weight, bias, signal, targets, mask, opts):
    # Matmul in the model's dtype (as its lm_head would run), then upcast the (C, V) logits.
    return _losses(F.linear(hidden, weight, bias), signal, targets, mask, opts)


def _run_chunks(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    rows: torch.Tensor,
    extra: tuple,
    signal: TeacherSignal,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    opts: tuple,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `fn(rows[s:e], *extra, ...)` to each chunk of tokens and concatenate."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = rows.shape[0]
    if signal.topk_ids.shape[0] != n or targets.shape[0] != n:
        raise ValueError(
            f"token counts differ: {n} rows, signal {tuple(signal.topk_ids.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows, *extra)
    )
    hard, soft = [], []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        args = (rows[s:e], *extra, _slice(signal, s, e), targets[s:e],
                None if mask is None else mask[s:e], opts)
        h, k = checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args)
        hard.append(h)
        soft.append(k)
    if not hard:  # zero tokens
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(hard), torch.cat(soft)


def _prepare(signal, labels, mask, divergence, temperature, tail, hard_target, ignore_index,
             div_params) -> tuple[torch.Tensor, tuple]:
    targets = hard_labels(hard_target, labels, signal, mask, ignore_index)  # (N,)
    kwargs: dict[str, Any] = {"temperature": temperature, "tail": tail, **div_params}
    return targets, (get_divergence(divergence), ignore_index, kwargs)


def per_token_losses(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    signal: TeacherSignal,
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
    or None.  signal: (N, k) teacher signal (optionally dense (N, V)).  labels: (N,) int64 with
    `ignore_index` for padding (may be None with hard_target="teacher_argmax").  mask: (N,)
    bool or None.  divergence / temperature / tail / **div_params: see `losses.divergences`.
    hard_target: "labels" | "teacher_argmax" (see `losses.hard`).

    Returns `(hard, soft)`, each (N,) fp32, 0 at masked tokens.  Equal to computing
    `hidden @ lm_head_weight.T` at once and applying the same losses; never holds more than
    chunk_size x V logits.
    """
    targets, opts = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params)
    return _run_chunks(_head_losses, hidden, (lm_head_weight, bias), signal, targets, mask,
                       opts, chunk_size)


def per_token_losses_from_logits(
    logits: torch.Tensor,
    signal: TeacherSignal,
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

    The logits themselves are already in memory; chunking bounds the fp32 upcast, the
    softmax temporaries and what autograd saves to chunk_size x V.
    """
    targets, opts = _prepare(signal, labels, mask, divergence, temperature, tail, hard_target,
                             ignore_index, div_params)
    return _run_chunks(_losses, logits, (), signal, targets, mask, opts, chunk_size)
