"""Held-out metrics for a teacher or a student.

val_ce, val_ppl        mean next-token CE on validation blocks, and its exp
val_tokens             the positions scored
teacher_top1_agreement share of tokens where the model's argmax equals the teacher's (a
                       sampled signal: its most frequent draw)
kl_to_teacher          mean KL(teacher || model): top-k with the tail bucket at T=1 (exact
                       when the signal is dense); a sampled signal: its unbiased estimate at
                       the draws' temperature
expert_load            MoE models: tokens routed to each expert, per MoE layer, summed
                       over these same held-out blocks
Chat data scores the assistant's (or the completion's) tokens only: every figure above
counts the positions whose label is not -100.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from distill.blocks import Blocks, block_positions
from distill.train.student import positions_arg
from losses import DIVERGENCES
from losses.chunked import auto_chunk_size, head_logits
from students.build import expert_load, head_transform
from teachers import IGNORE, Batch, Teacher


@torch.no_grad()
def evaluate_model(model, blocks: Blocks | torch.Tensor, teacher: Teacher | None = None, batch_size: int = 8,
                   device: torch.device | None = None, chunk_size: int | None = None, bar=None,
                   stop=None, teacher_top1: torch.Tensor | None = None, keep_top1: int | None = None) -> dict | None:
    """blocks: (N, T+1) token ids, rows 0..N-1 of the teacher's split (None: perplexity only):
    prepared `Blocks` (whose rows' position ids go along), or a tensor (one sequence a row).

    Chunked like training: the decoder runs once per batch, then the lm_head goes over
    `chunk_size` tokens at a time (None: `auto_chunk_size`, as for training), so at most
    (chunk_size, V) fp32 logits exist at once,
    never (B, T, V): a vocabulary and batch that trained fine also evaluate.  The model runs in
    its weights' dtype (no autocast: a bf16-trained student is scored in fp32).  bar: a
    `common.progress` bar told the blocks scored.  stop: asked after each batch (training's
    Ctrl-C, agreed by every rank); True cuts the scoring short -> None.

    teacher_top1: (N, T) the teacher model's own argmax ids, which agreement then compares with
    instead of the signal's most likely id (a sampled signal's most frequent draw misses the
    argmax often: 0.59 against an exact 0.77 on one run).  keep_top1: this model's argmax over
    its first `keep_top1` ids is returned as out["top1"] (N, T), to be a teacher_top1."""
    device = device or next(model.parameters()).device
    chunk_size = chunk_size or auto_chunk_size(model.lm_head.weight.shape[0], device)
    was_training = model.training
    model.eval()
    transform = head_transform(model)  # a Gemma 2/3 soft cap, a Cohere scale: the model's own logits
    ce_sum, n_tok, agree, kl_sum, n_sig = 0.0, 0, 0, 0.0, 0
    loads: list[torch.Tensor] = []  # per MoE layer: (E,) tokens per expert
    sampled = False  # whether the KL is a sampled signal's estimate
    top1: list[torch.Tensor] = []  # keep_top1: per batch, (B, T) ids
    for start in range(0, len(blocks), batch_size):
        idx = list(range(start, min(start + batch_size, len(blocks))))
        batch = Batch.of(blocks[idx], idx, block_positions(blocks, idx))  # positions: data.packing documents
        input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        positions = None if batch.position_ids is None else batch.position_ids.to(device)
        hidden = model.model(input_ids=input_ids, **positions_arg(positions)).last_hidden_state  # (B, T, H)
        batch_loads = expert_load(model)  # from this forward
        loads = [a + b.cpu() for a, b in zip(loads, batch_loads)] if loads else [b.cpu() for b in batch_loads]
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, H), (N,)
        targets = labels != IGNORE  # (N,): what is scored (chat data: the assistant's tokens)
        n_tok += int(targets.sum())
        if teacher is not None:
            sig, valid = teacher.signal(batch)
            sig, valid = sig.to(device).flatten(), valid.to(device).reshape(-1) & targets  # (N, k), (N,)
            sampled = sig.kind == "sampled" and sig.logits is None  # KL at the draws' temperature
            n_sig += int(valid.sum())
        reference = None if teacher_top1 is None else teacher_top1[idx].to(device).reshape(-1)  # (N,)
        batch_top1 = []
        for a in range(0, len(labels), chunk_size):
            b = a + chunk_size
            logits = head_logits(model.lm_head(hidden[a:b]), **transform).float()  # (C, V)
            ce_sum += float(torch.nn.functional.cross_entropy(logits, labels[a:b], reduction="sum"))
            if keep_top1 is not None:
                batch_top1.append(logits[:, :keep_top1].argmax(-1).cpu())
            if teacher is not None:
                chunk = sig.rows(a, b)
                best = chunk.most_likely() if reference is None else reference[a:b]
                agree += int(((logits.argmax(-1) == best) & valid[a:b]).sum())
                kl = DIVERGENCES["forward_kl"](logits, chunk, temperature=chunk.temperature if sampled else 1.0,
                                               tail="sampled" if sampled else "bucket")  # (C,)
                kl_sum += float((kl * valid[a:b]).sum())
        if keep_top1 is not None:
            top1.append(torch.cat(batch_top1).reshape(len(idx), -1))
        if bar is not None:
            bar.update(len(idx))
        if stop is not None and idx[-1] + 1 < len(blocks) and stop():  # a finished scoring is kept
            model.train(was_training)
            return None
    model.train(was_training)
    out = {"val_ce": ce_sum / max(n_tok, 1), "val_ppl": math.exp(min(ce_sum / max(n_tok, 1), 50.0)),
           "val_tokens": n_tok}
    if teacher is not None:
        out["teacher_top1_agreement"] = agree / max(n_sig, 1)
        kl_mean = kl_sum / max(n_sig, 1)
        # An exact or bucketed KL is >= 0 but for fp rounding; a sampled estimate is unbiased and
        # noisy, so it is kept as it is (near 0, e.g. the teacher's own row, it can be negative).
        out["kl_to_teacher"] = kl_mean if sampled else max(kl_mean, 0.0)
    if loads:
        out["expert_load"] = [layer.tolist() for layer in loads]
    if keep_top1 is not None:
        out["top1"] = torch.cat(top1)
    return out


@torch.no_grad()
def inference_tokens_per_s(model, vocab_size: int, device: torch.device, batch: int = 4, seq: int = 128,
                           min_seconds: float = 1.0, max_repeats: int = 50) -> float:
    """Forward-pass throughput on random tokens (prefill speed): the median of forwards repeated
    for `min_seconds` (at least 3, at most `max_repeats`).  The best of 3 forwards of a small
    model read 4,358 and 13,390 tokens/s for two students of one architecture on a busy machine."""
    model.eval()
    ids = torch.randint(0, vocab_size, (batch, seq), device=device, generator=None)
    model(input_ids=ids)  # warm-up
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_seconds and len(times) < max_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)
