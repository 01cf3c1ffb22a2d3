"""Model presets: functions that return transformers configs, tiny by default.

Every preset takes sizes as keyword arguments, so the same function describes the toy
model a test builds and the real thing (pass the numbers in `PUBLISHED`).  Extra
keywords are raw config fields and override what the preset derived (e.g.
`moe_layers=[0, 2]`, `rope_parameters=...`); unknown ones raise (transformers' configs
would silently keep a typo as an attribute).

Llama 4 text architecture (transformers' `Llama4TextConfig` / `Llama4ForCausalLM`):
  * MoE blocks: one shared expert on every token plus `num_experts_per_tok` routed
    experts; the router's sigmoid gate scales the routed expert's *input*.
    MoE in every layer (Scout, Behemoth) or every other layer (Maverick, with dense
    SwiGLU of width `intermediate_size_mlp` between).
  * iRoPE: every `no_rope_layer_interval`-th layer (4th) is NoPE with full causal
    attention and inference-time attention-temperature tuning (queries scaled by
    1 + attn_scale * log1p(floor((pos + 1) / floor_scale))); the other layers use
    RoPE, chunked local attention (`attention_chunk_size`) and, if `use_qk_norm`, an
    L2 norm of queries and keys.
  * GQA, RMSNorm, SwiGLU.

Published shapes (Meta, April 2025; Scout and Maverick from their released
config.json files; Behemoth's layer shapes were never released):
  Scout     17B active / 109B total, 16 experts (top-1) in all 48 layers.
  Maverick  17B active / 400B total, 128 experts (top-1) in every other layer.
  Behemoth  288B active / ~2T total, 16 experts.
  All use vocab 202,048.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from transformers import LlamaConfig, Llama4TextConfig, PreTrainedConfig

VOCAB_LLAMA4 = 202_048

# Shapes of the released text towers, as keyword arguments for the presets below.
PUBLISHED: dict[str, dict] = {
    "scout": dict(  # meta-llama/Llama-4-Scout-17B-16E
        vocab_size=VOCAB_LLAMA4, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
        head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_experts=16,
        top_k=1, max_position_embeddings=10_485_760, attention_chunk_size=8192,
    ),
    "maverick": dict(  # meta-llama/Llama-4-Maverick-17B-128E
        vocab_size=VOCAB_LLAMA4, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
        head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_experts=128,
        top_k=1, max_position_embeddings=1_048_576, attention_chunk_size=8192,
    ),
}
# Headline parameter counts (active per token, total), as announced.
PUBLISHED_COUNTS: dict[str, tuple[float, float]] = {
    "scout": (17e9, 109e9),
    "maverick": (17e9, 400e9),
    "behemoth": (288e9, 2e12),
}


def _check_extra(config_cls: type, extra: dict) -> None:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    fields |= {f.name for f in dataclasses.fields(PreTrainedConfig)} | {"attn_implementation"}
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {unknown}")


def _llama4_text(
    *, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
    intermediate_size_mlp, num_experts, top_k, moe_every, max_position_embeddings,
    attention_chunk_size, nope_every, use_qk_norm, rope_theta, attn_temperature_tuning,
    floor_scale, attn_scale, attn_implementation, extra,
) -> Llama4TextConfig:
    _check_extra(Llama4TextConfig, extra)
    moe_layers = [] if moe_every == 0 else list(range(moe_every - 1, num_layers, moe_every))
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, intermediate_size_mlp=intermediate_size_mlp,
        num_local_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers,
        max_position_embeddings=max_position_embeddings, attention_chunk_size=attention_chunk_size,
        no_rope_layer_interval=nope_every, use_qk_norm=use_qk_norm,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attn_temperature_tuning=attn_temperature_tuning, floor_scale=floor_scale,
        attn_scale=attn_scale, attn_implementation=attn_implementation,
    )
    # vLLM reads which layers are MoE from interleave_moe_layer_step alone (transformers from
    # moe_layers): both are written, so an export loads in either (`align_moe_step`).
    fields["interleave_moe_layer_step"] = moe_every
    # Raw config fields win (e.g. an explicit moe_layers, no_rope_layers, rope_parameters).
    config = Llama4TextConfig(**fields | extra)
    align_moe_step(config)
    return config


def align_moe_step(config) -> str | None:
    """Make a Llama 4 config's `interleave_moe_layer_step` name the layers its `moe_layers` do,
    as vLLM reads them (layer i is MoE when step > 0 and (i + 1) % step == 0; transformers reads
    moe_layers).  None when they agree (or the config is no Llama 4); else why no step can: a
    student cut to an irregular set of MoE layers loads in transformers but not in vLLM."""
    moe, n = getattr(config, "moe_layers", None), getattr(config, "num_hidden_layers", 0)
    if moe is None or not hasattr(config, "interleave_moe_layer_step"):
        return None
    moe = sorted(moe)
    for step in range(0, n + 1):
        if moe == ([] if step == 0 else list(range(step - 1, n, step))):
            config.interleave_moe_layer_step = step
            return None
    return (f"its MoE layers {moe} of {n} follow no fixed interval: transformers loads it, but vLLM, which "
            f"takes every interleave_moe_layer_step-th layer as MoE, does not")


def scout(
    *, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
    num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 256,
    intermediate_size_mlp: int = 512, num_experts: int = 16, top_k: int = 1,
    max_position_embeddings: int = 4096, attention_chunk_size: int = 128, nope_every: int = 4,
    use_qk_norm: bool = True, rope_theta: float = 500_000.0, attn_temperature_tuning: bool = True,
    floor_scale: int = 8192, attn_scale: float = 0.1, attn_implementation: str = "sdpa", **extra,
) -> Llama4TextConfig:
    """Scout-style student: `num_experts` coarse experts (width `intermediate_size`) in
    every layer, plus a shared expert of the same width.  `intermediate_size_mlp` is
    unused (no dense layers) but kept for symmetry.  Published: `PUBLISHED["scout"]`."""
    return _llama4_text(**locals() | {"moe_every": 1})


def maverick(
    *, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
    num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 64,
    intermediate_size_mlp: int = 512, num_experts: int = 128, top_k: int = 1,
    max_position_embeddings: int = 4096, attention_chunk_size: int = 128, nope_every: int = 4,
    use_qk_norm: bool = False, rope_theta: float = 500_000.0, attn_temperature_tuning: bool = True,
    floor_scale: int = 8192, attn_scale: float = 0.1, attn_implementation: str = "sdpa", **extra,
) -> Llama4TextConfig:
    """Maverick-style student: `num_experts` fine-grained experts in every other layer
    (layers 1, 3, 5, ...; `interleave_moe_layer_step=2`), dense SwiGLU of width
    `intermediate_size_mlp` in the others.  The released Maverick has no QK-norm
    (`use_qk_norm=False`), so neither does this preset by default.
    Published: `PUBLISHED["maverick"]`."""
    return _llama4_text(**locals() | {"moe_every": 2})


def behemoth(
    *, vocab_size: int = 4096, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 8,
    num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 512,
    intermediate_size_mlp: int = 1024, num_experts: int = 16, top_k: int = 1,
    max_position_embeddings: int = 4096, attention_chunk_size: int = 128, nope_every: int = 4,
    use_qk_norm: bool = True, rope_theta: float = 500_000.0, attn_temperature_tuning: bool = True,
    floor_scale: int = 8192, attn_scale: float = 0.1, attn_implementation: str = "sdpa", **extra,
) -> Llama4TextConfig:
    """Behemoth-style teacher: like Scout (16 experts, MoE in every layer), wider.
    Meta announced 288B active / ~2T total parameters but released no config, so
    there is no `PUBLISHED["behemoth"]` shape, only `PUBLISHED_COUNTS`."""
    return _llama4_text(**locals() | {"moe_every": 1})


def dense_llama4(
    *, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
    num_kv_heads: int = 2, head_dim: int = 32, intermediate_size_mlp: int = 512,
    max_position_embeddings: int = 4096, attention_chunk_size: int = 128, nope_every: int = 4,
    use_qk_norm: bool = True, rope_theta: float = 500_000.0, attn_temperature_tuning: bool = True,
    floor_scale: int = 8192, attn_scale: float = 0.1, attn_implementation: str = "sdpa", **extra,
) -> Llama4TextConfig:
    """Dense Llama 4: iRoPE attention, dense SwiGLU of width `intermediate_size_mlp` in
    every layer (`moe_layers=[]`).  A dense model with the active parameters of an MoE
    one uses intermediate_size_mlp = shared width + top_k * expert width."""
    return _llama4_text(
        **locals() | {"moe_every": 0, "intermediate_size": intermediate_size_mlp, "num_experts": 1, "top_k": 1}
    )


def dense(
    *, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
    num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 512,
    max_position_embeddings: int = 4096, rope_theta: float = 500_000.0,
    tie_word_embeddings: bool = False, attn_implementation: str = "sdpa", **extra,
) -> LlamaConfig:
    """Plain Llama (`LlamaForCausalLM`): RoPE everywhere, full attention, SwiGLU of
    width `intermediate_size`.  The most portable export target."""
    _check_extra(LlamaConfig, extra)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings, attn_implementation=attn_implementation,
    )
    return LlamaConfig(**fields | extra)


def check_preset_args(preset: str, args: dict) -> None:
    """What the config classes accept but no model can run, named by its argument.

    Every integer size of a preset (the keyword arguments whose default is an int:
    hidden_size, num_layers, num_experts, top_k, ...) must be >= 1: `num_experts: 0`
    builds a config and even a model, and fails only at the first forward, after the
    teacher was pretrained.  top_k must not exceed num_experts, and query heads must
    share key/value heads evenly.  Raises ValueError("NAME=VALUE: ...")."""
    import inspect

    sizes = {name for name, p in inspect.signature(PRESETS[preset]).parameters.items()
             if type(p.default) is int}
    for name in sorted(sizes & set(args)):
        value = args[name]
        if type(value) is not int or value < 1:
            raise ValueError(f"{name}={value!r}: must be a whole number >= 1")
    defaults = {n: p.default for n, p in inspect.signature(PRESETS[preset]).parameters.items()}
    get = lambda name: args.get(name, defaults.get(name))  # noqa: E731
    if get("top_k") is not None and get("num_experts") is not None and get("top_k") > get("num_experts"):
        raise ValueError(f"top_k={get('top_k')}: must not exceed num_experts={get('num_experts')}")
    if get("num_heads") % get("num_kv_heads"):
        raise ValueError(f"num_heads={get('num_heads')}: must be a multiple of num_kv_heads={get('num_kv_heads')}")


# The one registry of model presets (name -> config builder).
PRESETS: dict[str, Callable[..., PreTrainedConfig]] = {
    "behemoth": behemoth,
    "scout": scout,
    "maverick": maverick,
    "dense": dense,
    "dense_llama4": dense_llama4,
}


def _attention_params(c) -> int:
    q = c.hidden_size * c.num_attention_heads * c.head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    o = c.num_attention_heads * c.head_dim * c.hidden_size
    bias = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + c.hidden_size
    return q + kv + o + (bias if c.attention_bias else 0)


def param_counts(config: PreTrainedConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts, from the config alone.

    Active counts everything a token touches: embeddings, lm_head, attention, norms,
    dense MLPs, shared experts, routers and `top_k` of the routed experts (the
    convention behind "17B active").  Tied embeddings count once.  (Llama 4 QK-norm is
    an L2 norm without weights.)
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not isinstance(c, (LlamaConfig, Llama4TextConfig)):  # other families: counted on an empty (meta) model
        return _counted_params(c)
    h = c.hidden_size
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    norms = (2 * c.num_hidden_layers + 1) * h
    attention = c.num_hidden_layers * _attention_params(c)
    shared = embed + norms + attention
    if isinstance(c, LlamaConfig):
        mlp = 3 * h * c.intermediate_size + (2 * c.intermediate_size + h if c.mlp_bias else 0)
        total = shared + c.num_hidden_layers * mlp
        return total, total
    num_moe = len(c.moe_layers)
    num_dense = c.num_hidden_layers - num_moe
    expert = 3 * h * c.intermediate_size  # gate + up (H, 2I) and down (I, H); shared expert same width
    router = h * c.num_local_experts
    dense_mlp = 3 * h * c.intermediate_size_mlp
    common = shared + num_dense * dense_mlp + num_moe * (router + expert)
    total = common + num_moe * c.num_local_experts * expert
    active = common + num_moe * c.num_experts_per_tok * expert
    return total, active


def _counted_params(config: PreTrainedConfig) -> tuple[int, int]:
    """Any other architecture (Qwen, Mistral, Mixtral, ...): count a weightless (meta
    device) instance.  Fused expert tensors (E, ...) count top_k / E of their size as active."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    top_k = getattr(config, "num_experts_per_tok", experts) or experts
    total = active = 0
    for name, p in model.named_parameters():  # tied weights appear once
        total += p.numel()
        routed = experts and ".experts." in name and p.shape[0] == experts
        active += p.numel() * top_k // experts if routed else p.numel()
    return total, active
