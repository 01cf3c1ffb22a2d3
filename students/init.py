"""Initialise a student from a teacher's weights where the shapes allow it.

What is copied (student tensor <- teacher tensor):
  * `model.embed_tokens.weight`, `lm_head.weight`, `model.norm.weight` when the
    shapes match (same vocab and hidden size);
  * for student layer i, teacher layer `layers[i]`: every tensor with the same name
    below `model.layers.<n>.` whose shape matches (attention, norms, dense MLP,
    shared expert);
  * MoE experts (`experts.gate_up_proj` (E, H, 2I), `experts.down_proj` (E, I, H))
    and router rows (`router.weight` (E, H)) when the teacher has E_t >= E_s experts of
    the same width: `experts="take"` keeps the first E_s, `experts="average"` averages
    consecutive groups of E_t / E_s (E_t must be a multiple of E_s).
Everything else keeps its random init and is listed, with the reason, in the report.

Layer tensors are copied only within one architecture family (Llama <- Llama,
Llama 4 <- Llama 4): Llama rotates (i, i + d/2) pairs while Llama 4 rotates
adjacent (2i, 2i + 1) pairs and L2-normalises Q/K, so equal shapes would not mean
equal functions.  Across families only embeddings, lm_head and the final norm move.

Random init of what is not copied: see `students.build` (Normal(0, 0.02), optional
GPT-2 residual scaling).
"""
from __future__ import annotations

import re

import torch
from transformers import PreTrainedModel

from .derive import even_layers

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors with the expert index first: Llama 4 (E, H, 2I) / (E, I, H) / router (E, H);
# Mixtral and Qwen3-MoE in transformers 5 fuse theirs the same way: (E, 2I, H), (E, H, I), gate (E, H).
_EXPERT_TENSORS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj", "feed_forward.router.weight",
                   "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")


def _reduce_experts(teacher: torch.Tensor, num_student: int, mode: str) -> torch.Tensor | str:
    """(E_t, ...) -> (E_s, ...) by taking the first E_s or averaging groups; a str is why not."""
    num_teacher = teacher.shape[0]
    if num_teacher < num_student:
        return f"teacher has {num_teacher} experts, student {num_student}"
    if mode == "take":
        return teacher[:num_student]
    if num_teacher % num_student:
        return f"cannot average {num_teacher} experts into {num_student} groups"
    # (E_t, ...) -> (E_s, E_t / E_s, ...) -> mean over each group of consecutive experts.
    return teacher.reshape(num_student, num_teacher // num_student, *teacher.shape[1:]).mean(dim=1)


@torch.no_grad()
def init_from_teacher(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
    experts: str = "take",
) -> dict[str, dict[str, str]]:
    """Copy teacher weights into `student` in place; report what happened.

    layers:  teacher layer index for each student layer (default: evenly spaced).
    experts: "take" (first E_s experts / router rows) or "average" (group means).
    Returns {"copied": {student_name: source}, "skipped": {student_name: reason}},
    covering every student parameter.  `source` is the teacher tensor name, suffixed
    with "[:E]" or "[avg groups of g]" when experts were reduced.
    """
    if experts not in ("take", "average"):
        raise ValueError(f"experts must be 'take' or 'average', not {experts!r}")
    num_student = student.config.num_hidden_layers
    num_teacher = teacher.config.num_hidden_layers
    layers = even_layers(num_student, num_teacher) if layers is None else list(layers)
    if len(layers) != num_student or not all(0 <= t < num_teacher for t in layers):
        raise ValueError(f"layers must give {num_student} teacher layer indices in [0, {num_teacher}); got {layers}")
    same_family = type(student.config) is type(teacher.config)

    # remove_duplicate=False keeps tied aliases (lm_head.weight of a tied-embedding teacher).
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    report: dict[str, dict[str, str]] = {"copied": {}, "skipped": {}}
    for name, param in student.named_parameters():
        match = _LAYER.match(name)
        if match:
            if not same_family:
                report["skipped"][name] = "different architecture family (RoPE layout / QK-norm)"
                continue
            rest = match.group(2)
            source_name = f"model.layers.{layers[int(match.group(1))]}.{rest}"
        else:
            rest, source_name = name, name
        source = teacher_params.get(source_name)
        if source is None:
            report["skipped"][name] = f"teacher has no {source_name}"
            continue
        label = source_name
        if source.shape != param.shape and rest.endswith(_EXPERT_TENSORS) and source.shape[1:] == param.shape[1:]:
            reduced = _reduce_experts(source, param.shape[0], experts)
            if isinstance(reduced, str):
                report["skipped"][name] = reduced
                continue
            group = source.shape[0] // param.shape[0]
            label += f"[:{param.shape[0]}]" if experts == "take" else f"[avg groups of {group}]"
            source = reduced
        if source.shape != param.shape:
            report["skipped"][name] = f"shape {tuple(param.shape)} != teacher {tuple(source.shape)}"
            continue
        param.copy_(source.to(param.dtype))
        report["copied"][name] = label
    return report
