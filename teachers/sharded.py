"""A teacher too large for one device: weights split over ranks with DeepSpeed ZeRO-3.

Why ZeRO-3 and not transformers' `device_map` or tensor-parallel plan:
* `device_map` places whole layers on different GPUs of one process, so only one GPU
  works at a time, and it needs `accelerate`;
* a TP plan needs every architecture (including our sparse MoE block) to declare how
  its weights split, and every rank then sees the same batch;
* ZeRO-3 keeps 1/N of every weight on each rank, gathers one module's weights just
  before it runs and frees them after, so each rank runs the *whole* teacher on its own
  slice of the data: all N devices compute, memory per device is about
  params/N + the largest layer, and it composes with the cache's per-rank slices as is.
  It also runs on CPU (gloo), so it is tested here.

The price: every forward is a collective (each rank must call it equally often; the
cache writer pads with dummy batches, see `write_cache(lockstep=True)`) and weights
cross the interconnect once per forward, which large batches amortise.
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch


def zero3_config(dtype: torch.dtype) -> dict:
    """Inference-only ZeRO-3: no optimizer; every parameter partitioned (no persistence
    threshold, so even small tensors are split and the test can see the 1/N)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
    }


@contextlib.contextmanager
def zero3_teacher(path: Path, dtype: torch.dtype = torch.float32):
    """Load a local Hugging Face dir partitioned over the current process group; yields
    (model, device).  Call the model like any causal LM, on every rank.

    transformers partitions each weight as it loads while an `HfDeepSpeedConfig` with
    stage 3 is alive, so no rank ever holds the whole model.  On exit the engine is
    destroyed and DeepSpeed's global module stack let go, so the teacher's shards do not
    stay on the device while students train in the same process (`distill run`).
    """
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from teachers.live import load_teacher_model

    config = zero3_config(dtype)
    hf_config = HfDeepSpeedConfig(config)  # transformers holds only a weak reference: keep it alive
    try:
        model = load_teacher_model(path, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()  # models loaded later (students) are not partitioned
        del hf_config
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    try:
        yield engine.module, engine.device
    finally:
        engine.destroy()
        stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
        while engine.module in stack:
            stack.remove(engine.module)
        del engine, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def local_parameter_share(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) of a ZeRO-3 model."""
    local = total = 0
    for p in model.parameters():
        shard = getattr(p, "ds_tensor", None)
        total += getattr(p, "ds_numel", p.numel())
        local += shard.numel() if shard is not None else p.numel()
    return local, total
