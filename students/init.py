"""Initialise a student from a teacher's weights where the shapes allow it.

What is copied (student tensor <- teacher tensor):
  * `model.embed_tokens.weight`, `lm_head.weight`, `model.norm.weight` when the
    shapes match (same vocab and hidden size);
  * for student layer i, teacher layer `layers[i]`: every tensor with the same name
    below `model.layers.<n>.` whose shape matches (attention, norms, dense MLP,
    shared expert);
  * MoE experts (`experts.gate_up_proj` (E, H, 2I), `experts.down_proj` (E, I, H))
    and router rows (`router.weight` (E, H)) when the teacher has E_t >= E_s experts of
    the same width: the first E_s (not a mean of groups: experts are not aligned neuron for
    neuron, so an average of them is no expert).
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


def _first_experts(teacher: torch.Tensor, num_student: int) -> torch.Tensor | str:
    """(E_t, ...) -> (E_s, ...), the first E_s; a str is why not."""
    num_teacher = teacher.shape[0]
    if num_teacher < num_student:
        return f"teacher has {num_teacher} experts, student {num_student}"
    return teacher[:num_student]


@torch.no_grad()
def init_from_teacher(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    layers: list[int] | None = None,
) -> dict[str, dict[str, str]]:
    """Copy teacher weights into `student` in place; report what happened.

    layers:  teacher layer index for each student layer (default: evenly spaced).
    Returns {"copied": {student_name: source}, "skipped": {student_name: reason}},
    covering every student parameter.  `source` is the teacher tensor name, suffixed
    with "[:E]" when the student has fewer experts.
    """
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
            reduced = _first_experts(source, param.shape[0])
            if isinstance(reduced, str):
                report["skipped"][name] = reduced
                continue
            label += f"[:{param.shape[0]}]"
            source = reduced
        if source.shape != param.shape:
            report["skipped"][name] = f"shape {tuple(param.shape)} != teacher {tuple(source.shape)}"
            continue
        param.copy_(source.to(param.dtype))
        report["copied"][name] = label
    return report
