"""Distillation losses: pure functions over (student_logits, TeacherSignal, labels, mask).

Extension points (one registry each):
  DIVERGENCES  name -> `Divergence`: the per-token soft divergence fn(student_logits, teacher,
               *, temperature, tail, mask, **params) -> (N,), its value on outcome
               log-probs, and its closed-form outcome gradient (None: autograd fallback)
  SCHEDULES    kind -> weight-schedule dataclass  (config: {"kind": ..., **fields})

Adding a loss: see divergences.py and the README's checklist (value, closed form if any,
registry entry, reference-parity test in tests/test_losses.py).
"""
from losses.chunked import auto_chunk_size, per_token_losses, per_token_losses_from_logits
from losses.divergences import (
    DIVERGENCES,
    ESTIMATORS,
    TAILS,
    Divergence,
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
from losses.signal import TeacherSignal, sample_signal
from losses.weighting import (
    WEIGHTING_MODES,
    combine,
    soft_weights,
    teacher_confidence,
    teacher_entropy,
    weight_scores,
)

__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "Divergence",
    "auto_chunk_size",
    "sample_signal",
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
    "weight_scores",
]
