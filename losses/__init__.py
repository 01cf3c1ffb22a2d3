"""Distillation losses: pure functions over (student_logits, TeacherSignal, labels, mask).

Extension points (one registry each):
  DIVERGENCES  name -> per-token soft divergence  fn(student_logits, teacher, *, temperature,
               tail, mask, **params) -> (N,)
  SCHEDULES    kind -> weight-schedule dataclass  (config: {"kind": ..., **fields})

Adding a loss: write `fn` in divergences.py with that signature, give it a docstring with
shapes (and a paper link), add it to DIVERGENCES, and add it to the reference-parity test in
tests/test_losses.py.
"""
from losses.chunked import per_token_losses, per_token_losses_from_logits
from losses.divergences import (
    DIVERGENCES,
    TAILS,
    forward_kl,
    get_divergence,
    jsd,
    outcome_logprobs,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tv,
)
from losses.hard import HARD_TARGETS, hard_ce, hard_labels, teacher_argmax_labels
from losses.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    StepSchedule,
    WeightSchedule,
    build_schedule,
)
from losses.signal import TeacherSignal
from losses.weighting import (
    WEIGHTING_MODES,
    combine,
    soft_weights,
    teacher_confidence,
    teacher_entropy,
)

__all__ = [
    "DIVERGENCES",
    "HARD_TARGETS",
    "SCHEDULES",
    "TAILS",
    "WEIGHTING_MODES",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "StepSchedule",
    "TeacherSignal",
    "WeightSchedule",
    "build_schedule",
    "combine",
    "forward_kl",
    "get_divergence",
    "hard_ce",
    "hard_labels",
    "jsd",
    "outcome_logprobs",
    "per_token_losses",
    "per_token_losses_from_logits",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_weights",
    "teacher_argmax_labels",
    "teacher_confidence",
    "teacher_entropy",
    "tv",
]
