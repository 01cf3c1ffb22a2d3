"""A student cut from its teacher: the teacher's own config with named fields changed,
and which teacher layers to keep.

`derive_config` starts from every field of the teacher's config (RoPE, norms, head
dims, tie flag, chunk size, ...) so a student written as `from_teacher: {}` is the
teacher's exact function once `init_from_teacher` copies the weights.  Per-layer fields
follow the kept layers: a list with one entry per layer (`layer_types`,
`no_rope_layers`) is indexed by them, and a list of layer *indices* (`moe_layers`,
`mlp_only_layers`) is renumbered, so student layer i keeps the attention kind, RoPE
and MLP kind of teacher layer `layers[i]`.

`choose_layers` picks the layers to keep by measurement (Gromov et al. 2024, "The
Unreasonable Ineffectiveness of the Deeper Layers", sec. 3.2): dropping n layers, drop
the contiguous block l..l+n-1 whose input x_l and output x_{l+n} differ least by
angular distance arccos(cos(x_l, x_{l+n})) / pi, averaged here over every token of a
few calibration blocks (the paper uses the last token only; every token is less noisy
on short blocks).  The last layer is always kept: it maps into the lm_head's space and
is the one whose removal costs most in the paper's figures.
"""
from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig

# Friendly names, as the presets take them -> the config field.
ALIASES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
           "top_k": "num_experts_per_tok"}
# A list of the layers that are something (MoE; dense MLP only): renumbered, not indexed.
LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers")


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def even_layers(num_student: int, num_teacher: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (identity if equal)."""
    if num_student == 1:
        return [num_teacher - 1]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def student_layer_count(teacher_config: PreTrainedConfig, overrides: dict) -> int:
    """How many layers the student has: `num_layers`, else len(`layers`), else the teacher's."""
    layers = overrides.get("layers")
    n = overrides.get("num_layers", overrides.get("num_hidden_layers"))
    if n is None and isinstance(layers, list):
        n = len(layers)
    return int(n) if n is not None else _text_config(teacher_config).num_hidden_layers


def derive_config(teacher_config: PreTrainedConfig, overrides: dict, layers: list[int]) -> PreTrainedConfig:
    """The teacher's text config with `overrides` applied and per-layer fields following `layers`.

    overrides: config fields (or ALIASES, or `num_experts`) -> value; `layers` inside it is ignored
    here (pass the resolved list).  Raises ValueError naming an unknown field or a bad layer list."""
    base = _text_config(teacher_config)
    fields = base.to_dict()
    num_teacher = fields["num_hidden_layers"]
    if len(set(layers)) != len(layers) or not all(0 <= t < num_teacher for t in layers):
        raise ValueError(f"layers must be distinct teacher layer indices in [0, {num_teacher}); got {layers}")
    changes = {}
    for key, value in overrides.items():
        if key == "layers":
            continue
        if key == "num_experts" and "num_experts" not in fields:  # Llama 4 / Mixtral name it num_local_experts
            key = "num_local_experts"
        key = ALIASES.get(key, key)
        if key not in fields:
            raise ValueError(f"the teacher's {type(base).__name__} has no field {key!r}")
        changes[key] = value
    if changes.get("num_hidden_layers", len(layers)) != len(layers):
        raise ValueError(f"num_layers={changes['num_hidden_layers']} but layers names {len(layers)}")
    changes["num_hidden_layers"] = len(layers)
    for key, value in fields.items():
        if key in changes or not isinstance(value, list):
            continue
        if key in LAYER_INDEX_LISTS:
            kept = set(value)
            changes[key] = [i for i, t in enumerate(layers) if t in kept]
        elif len(value) == num_teacher:
            changes[key] = [value[t] for t in layers]
    return type(base).from_dict({**fields, **changes})


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def block_distances(model, batches: list[torch.Tensor], drop: int) -> list[float]:
    """Mean angular distance between the input of layer l and the output of layer
    l + drop - 1, for every l that keeps the last layer: a list indexed by l.

    batches: (B, T) token ids each.  The hidden states are caught with hooks on the
    decoder layers (inputs (B, T, H) before each layer, the output of the last), so the
    final norm (which hidden_states output includes for some models) does not enter."""
    layers = _decoder_layers(model)
    num = len(layers)
    seen: list[torch.Tensor] = []  # x_0 .. x_L, each (B*T, H) fp32

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.reshape(-1, hidden.shape[-1]).float())

    def after(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen.append(hidden.reshape(-1, hidden.shape[-1]).float())

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after, with_kwargs=True))
    starts = range(0, num - drop)  # l + drop <= num - 1: the last layer stays
    sums = [0.0] * len(starts)
    tokens = 0
    device = next(model.parameters()).device
    try:
        for ids in batches:
            seen.clear()
            model.model(input_ids=ids.to(device), use_cache=False)
            for l in starts:
                cos = torch.nn.functional.cosine_similarity(seen[l], seen[l + drop], dim=-1)  # (B*T,)
                sums[l] += float(torch.arccos(cos.clamp(-1.0, 1.0)).sum()) / math.pi
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / max(tokens, 1) for s in sums]


def choose_layers(model, batches: list[torch.Tensor], keep: int) -> tuple[list[int], dict]:
    """The `keep` teacher layers left after dropping the contiguous block that changes
    the hidden states least; plus why, for the report."""
    num = len(_decoder_layers(model))
    if not 1 <= keep <= num:
        raise ValueError(f"cannot keep {keep} of the teacher's {num} layers")
    drop = num - keep
    if drop == 0:
        return list(range(num)), {"method": "all layers kept"}
    if keep == 1:
        return [num - 1], {"method": "only the last layer kept"}
    scores = block_distances(model, batches, drop)
    start = min(range(len(scores)), key=scores.__getitem__)
    kept = [t for t in range(num) if not start <= t < start + drop]
    why = {"method": "angular distance (Gromov et al. 2024)", "dropped": list(range(start, start + drop)),
           "distance_by_first_dropped_layer": {str(l): round(d, 5) for l, d in enumerate(scores)},
           "tokens": sum(int(b.numel()) for b in batches)}
    return kept, why
