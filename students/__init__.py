"""The model family: Llama-4-style MoE (Scout / Maverick / Behemoth presets), dense
Llama students, the sparse MoE forward, and init-from-teacher.

Adding a preset: write a function in `presets.py` returning a transformers config
with tiny keyword defaults, add it to `PRESETS`, and add its name to the parity
parametrisation in `tests/test_models.py`.
"""
from .build import build_model, collect_router_logits, expert_load, load_causal_lm
from .init import init_from_teacher
from .presets import PRESETS, PUBLISHED, PUBLISHED_COUNTS, behemoth, dense, dense_llama4, maverick, param_counts, scout
from .sparse_moe import (SparseLlama4TextMoe, enable_sparse_moe, expert_biases, moe_modules, routing_changes_without_bias,
                         set_expert_biases, update_expert_bias)

__all__ = [
    "PRESETS", "PUBLISHED", "PUBLISHED_COUNTS", "SparseLlama4TextMoe", "behemoth", "build_model",
    "collect_router_logits", "dense", "dense_llama4", "enable_sparse_moe", "expert_biases", "expert_load",
    "init_from_teacher", "load_causal_lm", "maverick", "moe_modules", "param_counts", "routing_changes_without_bias",
    "scout", "set_expert_biases", "update_expert_bias",
]
