"""Engines own a student's parameters, optimiser and LR schedule.

`TorchEngine` is the embedded default (one process, any device).  `DeepSpeedEngine`
wraps one `deepspeed.initialize` per student for ZeRO 1/2/3 across ranks.  The student
and the loop see only the `Engine` protocol below.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from distill.config import OptimConfig, TrainConfig
from distill.runtime import autocast_dtype


class Engine(Protocol):
    """What a student's training step and the loop's checkpoints need from an engine."""

    module: torch.nn.Module  # the model being trained (unwrapped)
    device: torch.device
    world_size: int  # data-parallel ranks sharing each step

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when `loss` is finite (on every rank, where ranks must agree)."""

    def backward(self, loss: torch.Tensor, n_micro: int) -> None: ...

    def step(self, skip: bool) -> float:
        """End the optimiser step (skipped if `skip`); returns the pre-clip grad norm or nan."""

    def lr(self) -> float: ...

    def state_dict(self) -> dict:
        """Optimiser and schedule state stored in our own checkpoint ({} if the engine keeps its own)."""

    def load_state_dict(self, state: dict) -> None: ...

    def save_sharded(self, root: Path, tag: str) -> None:
        """Write engine-owned state (DeepSpeed's partitions) under `root`; every rank calls it."""

    def load_sharded(self, root: Path, tag: str) -> None: ...


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class TorchEngine:
    """Plain PyTorch: AdamW + warmup/cosine, grad clipping, accumulation, autocast."""

    world_size = 1

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, optim: OptimConfig,
                 device: torch.device, precision: str):
        self.module = model.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = optim.grad_clip
        self.device = device
        self._dtype = autocast_dtype(precision, device)

    def autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss.detach()).item())

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        (loss / n_micro).backward()

    def step(self, skip: bool) -> float:
        """Clip, step, advance the LR schedule; returns the pre-clip grad norm (nan if skipped)."""
        norm = float("nan")
        if not skip:
            params = [p for p in self.module.parameters() if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if math.isfinite(norm):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_sharded(self, root: Path, tag: str) -> None:
        pass  # everything is in state_dict()

    def load_sharded(self, root: Path, tag: str) -> None:
        pass


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int) -> dict:
    """The user's ds_config JSON (if any) with batch sizes, accumulation and clipping filled in."""
    cfg = json.loads(Path(train.deepspeed_config).read_text()) if train.deepspeed_config else {}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = train.grad_accum
    cfg.pop("train_batch_size", None)
    cfg.setdefault("gradient_clipping", optim.grad_clip)
    cfg.setdefault("zero_optimization", {}).setdefault("stage", train.zero_stage)
    if train.precision == "bf16" or (train.precision == "auto" and torch.cuda.is_available()):
        cfg.setdefault("bf16", {"enabled": True})
    cfg.setdefault("steps_per_print", 1 << 30)
    return cfg


class DeepSpeedEngine:
    """One `deepspeed.initialize` per student; DeepSpeed does accumulation and clipping."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.module = self.engine.module
        self.device = self.engine.device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself (bf16/fp16 config)

    def all_finite(self, loss: torch.Tensor) -> bool:
        return _all_ranks_true(bool(torch.isfinite(loss.detach()).item()), self.device)

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself and only really steps
        # at the accumulation boundary, so step() follows every backward().
        self.engine.backward(loss)
        self.engine.step()

    def step(self, skip: bool) -> float:
        norm = self.engine.get_global_grad_norm()
        return float("nan") if skip or norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_dict(self) -> dict:
        return {}  # DeepSpeed writes its own optimizer/scheduler state (save_sharded)

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_sharded(self, root: Path, tag: str) -> None:
        # Every rank writes its optimizer partition; DeepSpeed's rank 0 the module states.
        self.engine.save_checkpoint(str(root / "deepspeed"), tag=tag)

    def load_sharded(self, root: Path, tag: str) -> None:
        self.engine.load_checkpoint(str(root / "deepspeed"), tag=tag, load_module_strict=False)
