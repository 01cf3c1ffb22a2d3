"""Held-out metrics for a teacher or a student.

val_ppl                exp(mean next-token CE) on validation blocks
teacher_top1_agreement share of tokens where the model's argmax equals the teacher's
kl_to_teacher          mean KL(teacher || model), top-k with the tail bucket (exact at T=1
                       when the signal is dense)
Chat data scores the assistant's (or the completion's) tokens only: every figure above
counts the positions whose label is not -100.
expert_load            MoE models: tokens routed to each expert, per MoE layer, summed
                       over these same held-out blocks
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from losses import DIVERGENCES
from students.build import expert_load
from teachers import IGNORE, Batch, Teacher


@torch.no_grad()
def evaluate_model(model, blocks: torch.Tensor, teacher: Teacher | None = None, batch_size: int = 8,
                   device: torch.device | None = None, autocast_dtype=None) -> dict:
    """blocks: (N, T+1) token ids, rows 0..N-1 of the teacher's split (None: perplexity only)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    ce_sum, n_tok, agree, kl_sum, n_sig = 0.0, 0, 0, 0.0, 0
    loads: list[torch.Tensor] = []  # per MoE layer: (E,) tokens per expert
    for start in range(0, len(blocks), batch_size):
        idx = list(range(start, min(start + batch_size, len(blocks))))
        batch = Batch.of(blocks[idx], idx)
        input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=input_ids).logits
        logits = logits.float()  # (B, T, V)
        batch_loads = expert_load(model)  # from this forward
        loads = [a + b.cpu() for a, b in zip(loads, batch_loads)] if loads else [b.cpu() for b in batch_loads]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        ce_sum += float(ce)  # labels -100 (chat data outside the assistant's turns) add 0 here
        targets = labels != IGNORE  # (B, T): what is scored, here and against the teacher
        n_tok += int(targets.sum())
        if teacher is not None:
            sig, valid = teacher.signal(batch)
            sig, valid = sig.to(device), valid.to(device) & targets
            agree += int(((logits.argmax(-1) == sig.topk_ids[..., 0]) & valid).sum())
            kl = DIVERGENCES["forward_kl"](logits.reshape(-1, logits.shape[-1]), sig.flatten(),
                                           temperature=1.0, tail="bucket")
            kl_sum += float((kl * valid.reshape(-1)).sum())
            n_sig += int(valid.sum())
    model.train(was_training)
    out = {"val_ce": ce_sum / max(n_tok, 1), "val_ppl": math.exp(min(ce_sum / max(n_tok, 1), 50.0)),
           "val_tokens": n_tok}
    if teacher is not None:
        out["teacher_top1_agreement"] = agree / max(n_sig, 1)
        out["kl_to_teacher"] = max(kl_sum / max(n_sig, 1), 0.0)  # KL >= 0; fp rounding can dip below
    if loads:
        out["expert_load"] = [layer.tolist() for layer in loads]
    return out


@torch.no_grad()
def inference_tokens_per_s(model, vocab_size: int, device: torch.device, batch: int = 4, seq: int = 128,
                           repeats: int = 3) -> float:
    """Forward-pass throughput on random tokens (prefill speed), best of `repeats`."""
    model.eval()
    ids = torch.randint(0, vocab_size, (batch, seq), device=device, generator=None)
    model(input_ids=ids)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch * seq / best
