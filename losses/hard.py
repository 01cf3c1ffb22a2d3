"""Hard-target cross-entropy: against the data's labels or against the teacher's top-1.

Hard distillation (CE against the teacher's argmax) is what each student gets with
`hard_target="teacher_argmax"`; `hard_target="labels"` is plain next-token CE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.signal import TeacherSignal

HARD_TARGETS = ("labels", "teacher_argmax")


def hard_ce(
    student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross-entropy, computed in fp32.

    student_logits: (N, V); labels: (N,) int64, `ignore_index` marks tokens to skip.
    Returns (N,): -log p_s(label), exactly 0 at ignored tokens (gradient 0 there too).
    """
    logits = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")


def teacher_argmax_labels(signal: TeacherSignal) -> torch.Tensor:
    """The teacher's most likely token per position, (..., k) signal -> (...,) int64.

    Uses the dense logits when present; otherwise the top-k entry with the largest log-prob
    (not blindly column 0, so a cache that did not sort its top-k still works).
    """
    if signal.kind == "sampled" and signal.logits is None:
        raise ValueError("hard_target teacher_argmax needs a top-k (or dense) teacher signal: sampled "
                         "tokens do not say which one was the most likely")
    return signal.most_likely()


def hard_labels(
    hard_target: str,
    labels: torch.Tensor | None,
    signal: TeacherSignal | None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The (N,) targets of one student's hard loss (the chunked loss's CE, or `hard_ce`).

    hard_target: "labels" (needs `labels`) or "teacher_argmax" (needs `signal`).
    A token is ignored (set to `ignore_index`) when `mask` is False there, or when the data
    label is `ignore_index` (padding stays padding in both modes).
    """
    if hard_target not in HARD_TARGETS:
        raise ValueError(f"unknown hard_target {hard_target!r}; expected one of {HARD_TARGETS}")
    if hard_target == "labels":
        if labels is None:
            raise ValueError('hard_target="labels" needs labels')
        targets = labels
    else:
        if signal is None:
            raise ValueError('hard_target="teacher_argmax" needs a teacher signal')
        targets = teacher_argmax_labels(signal)
        if labels is not None:
            targets = targets.masked_fill(labels == ignore_index, ignore_index)
    if mask is not None:
        targets = targets.masked_fill(~mask.bool(), ignore_index)
    return targets
