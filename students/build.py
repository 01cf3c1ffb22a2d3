"""Build or load a causal LM of the student family, with the sparse MoE forward on.

`build_model` makes a fresh model from a preset config; `load_causal_lm` loads a
Hugging Face model directory (including a multimodal Llama 4 checkpoint, of which it
keeps the text tower).  Both return stock transformers classes (`LlamaForCausalLM`,
`Llama4ForCausalLM`) whose MoE blocks run `SparseLlama4TextMoe.forward`.

Random init is transformers' `_init_weights`: every Linear / Embedding weight and the
expert tensors ~ Normal(0, initializer_range = 0.02), norms = 1, no biases.  With
`scaled_init=True` the projections that write into the residual stream (attention
`o_proj`, MLP / shared-expert `down_proj`, `experts.down_proj`) are further scaled by
1 / sqrt(2 * num_layers) (GPT-2, Radford et al. 2019 sec. 2.3), so the residual
stream's variance does not grow with depth at init.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4TextConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .sparse_moe import enable_sparse_moe, moe_modules

_RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    # A multimodal Llama 4 config carries the text tower's config inside.
    return config.text_config if isinstance(config, Llama4Config) else config


def causal_lm_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """LlamaConfig -> LlamaForCausalLM; Llama4TextConfig -> Llama4ForCausalLM; any other
    causal-LM config (Mistral, Qwen2/3, Qwen3-MoE, Mixtral) -> the class
    AutoModelForCausalLM maps it to."""
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM
    if isinstance(config, Llama4TextConfig):
        return Llama4ForCausalLM
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"build_model: {type(config).__name__} is not a causal-LM config") from None


def build_on_meta(config: PreTrainedConfig) -> None:
    """Instantiate `config`'s model on the meta device: every module and parameter shape is
    built (and checked by transformers and torch), no memory is allocated and no init runs,
    so a config check costs milliseconds even for a very large model."""
    config = _text_config(config)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        enable_sparse_moe(causal_lm_class(config)(config))


def build_model(
    config: PreTrainedConfig,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    scaled_init: bool = False,
) -> PreTrainedModel:
    """A freshly initialised causal LM for `config`, sparse MoE enabled.

    LlamaConfig -> LlamaForCausalLM; Llama4TextConfig (or a Llama4Config's text_config)
    -> Llama4ForCausalLM; any other causal-LM config (Mistral, Qwen2/3, Qwen3-MoE,
    Mixtral: a student cut from such a teacher) -> its stock AutoModelForCausalLM class.
    `seed` makes init reproducible without touching the global RNG (it runs under
    `torch.random.fork_rng`).  See the module docstring for init.
    """
    config = _text_config(config)
    cls = causal_lm_class(config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
    if scaled_init:
        factor = 1.0 / math.sqrt(2 * config.num_hidden_layers)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(_RESIDUAL_OUTPUTS):
                    param.mul_(factor)
    model.to(dtype)
    enable_sparse_moe(model)
    return model


def model_dir_problems(path: Path) -> list[str]:
    """The usual ways a model directory is broken, one line each (empty: none found): no
    config.json, an index naming missing shards, no weights, a safetensors file whose header
    is unreadable or does not cover the file (a truncated or overlong copy).  A flipped byte
    inside the weights passes: only a recorded hash finds it (an export's, distill/report/export.py)."""
    if not path.is_dir():
        return [f"{path}: not a directory"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"{path}: no config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return problems + [f"{index}: unreadable safetensors index ({err})"]
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            problems.append(f"{path}: index names missing shard(s) {missing}")
        files = [path / s for s in shards if s not in missing]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files and not problems:
        if any(path.glob("pytorch_model*.bin")):
            return []  # legacy torch pickles; from_pretrained reports their problems
        return [f"{path}: no weights (*.safetensors or pytorch_model*.bin)"]
    return problems + [p for p in map(safetensors_problem, files) if p]


def safetensors_problem(file: Path) -> str | None:
    """A safetensors file whose header is unreadable or does not cover the file (truncated or
    overlong), in one line; None when it reads."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        return f"{file}: corrupt safetensors file ({err})"
    return None


def _check_model_dir(path: Path) -> None:
    """`model_dir_problems`' first, as a one-line ValueError."""
    problems = model_dir_problems(path)
    if problems:
        raise ValueError(problems[0])


def _check_causal(path: Path, config) -> None:
    """An encoder (BERT, RoBERTa, ELECTRA, ...) loads as a causal LM without a word, but its
    position t attends to the tokens after t: as a teacher its signal sees the answer, as a
    student it learns to read it.  Such a model is causal only when its config says it is a
    decoder (`is_decoder`, XLM's `causal`); an encoder-decoder's causal LM is its decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    if encoder and not (getattr(config, "is_decoder", False) or getattr(config, "causal", False)):
        raise ValueError(f"{path}: a {config.model_type} model attends to the tokens after each position (an encoder, "
                         f"not a causal LM), so its predictions would see the answer; use a causal LM (a decoder: "
                         f"Llama, Qwen, Mistral, ...), or set is_decoder: true in its config.json if it was trained "
                         f"as one")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local Hugging Face causal-LM directory, sparse MoE enabled.

    A multimodal Llama 4 directory (`model_type == "llama4"`, a
    `Llama4ForConditionalGeneration` checkpoint) yields its text tower: transformers
    maps it to `Llama4ForCausalLM` with the `text_config` and strips the
    `language_model.` key prefix; the vision tower's weights are ignored.
    Any *missing* weight is an error (it would silently stay randomly initialised).
    """
    path = Path(path)
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: unreadable config ({err})") from None
    _check_causal(path, _text_config(config))
    model, info = AutoModelForCausalLM.from_pretrained(
        path, config=_text_config(config), dtype=dtype, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weight(s), e.g. {missing[:3]}")
    unexpected = {k for k in info["unexpected_keys"] if not k.startswith(("vision_model.", "multi_modal_projector."))}
    if unexpected:
        raise ValueError(f"{path}: checkpoint has unexpected weight(s), e.g. {sorted(unexpected)[:3]}")
    enable_sparse_moe(model)
    return model


@torch.no_grad()
def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise ValueError naming the parameters that hold NaN or inf (a damaged or wrongly
    converted checkpoint): every step from them would be non-finite."""
    _check_finite(model.named_parameters())


def check_finite_files(model_dir: Path) -> None:
    """check_finite_weights for a dir's safetensors files, read a tensor at a time (one in
    memory at once), without building the model."""
    def saved():
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    _check_finite(saved())


def _check_finite(named_tensors) -> None:
    bad = []
    for name, tensor in named_tensors:
        if tensor.is_floating_point():
            n = int((~torch.isfinite(tensor)).sum())
            if n:
                bad.append(f"{name}: {n:,} of {tensor.numel():,}")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"its weights hold NaN or inf ({'; '.join(bad[:3])}{more}): a damaged or wrongly converted "
                         f"checkpoint; replace it")


def head_transform(model: PreTrainedModel) -> dict:
    """`losses.per_token_losses`' keywords (logit_scale, softcap) that turn the model's
    lm_head output into its logits, as its own forward does: Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3 soft-cap at
    `final_logit_softcapping`; {} for a plain head (Llama, Qwen, Mistral, ...).
    distill/train/setup.py::check_head proves it on each student."""
    config = model.config.get_text_config()
    out = {}
    if getattr(config, "logit_scale", None) is not None:
        out["logit_scale"] = float(config.logit_scale)
    elif getattr(config, "logits_scaling", None) is not None:
        out["logit_scale"] = 1.0 / float(config.logits_scaling)
    if getattr(config, "final_logit_softcapping", None) is not None:
        out["softcap"] = float(config.final_logit_softcapping)
    return out


def collect_router_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Router logits (N, E) of each MoE layer from the last forward, graph kept."""
    return [m.last_router_logits for m in moe_modules(model) if m.last_router_logits is not None]


def expert_load(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tokens per expert (E,) int64 of each MoE layer from the last forward."""
    return [m.last_expert_counts for m in moe_modules(model) if m.last_expert_counts is not None]
