"""Engines own a student's parameters, optimiser and LR schedule.

`TorchEngine` is the embedded default (one process, any device).  `DeepSpeedEngine`
wraps one `deepspeed.initialize` per student for ZeRO 1/2/3 across ranks.  The student
and the loop see only the `Engine` protocol below.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from common.errors import UserError
from distill.config import STAGE_0, OptimConfig, TrainConfig, deepspeed_bf16
from distill.runtime import autocast_dtype, is_leader


class Engine(Protocol):
    """What a student's training step and the loop's checkpoints need from an engine.

    A step is, on every rank: for each micro-batch `with accumulating(last): backward(run(fn,
    ...))`, then `step(skip)`.  Every rank runs every micro-batch's backward (a skipped step
    included), so collectives and DeepSpeed's accumulation boundary stay aligned.  The loss
    handed to `backward` is this rank's share, scaled so that the engine's average over ranks,
    summed over micro-batches, is the step's loss (see `Student.train_step`)."""

    module: torch.nn.Module  # the model being trained (unwrapped)
    device: torch.device
    world_size: int  # data-parallel ranks sharing each step

    def run(self, fn, *args):
        """fn(module, *args) under the engine's forward (DDP arms its reducer, autocast)."""

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's run+backward: no gradient sync unless `last`."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, skip: bool) -> float:
        """End the optimiser step; `skip` (agreed by every rank) leaves weights, optimiser
        state and LR schedule untouched.  Returns the pre-clip grad norm, nan when skipped
        (also when the grads themselves were non-finite)."""

    def lr(self) -> float: ...

    def state_dict(self) -> dict:
        """Optimiser and schedule state stored in our own checkpoint ({} if the engine keeps its own)."""

    def load_state_dict(self, state: dict) -> None: ...

    def save_sharded(self, root: Path, tag: str) -> None:
        """Write engine-owned state (DeepSpeed's partitions) under `root`; every rank calls it."""

    def load_sharded(self, root: Path, tag: str) -> None: ...

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (None elsewhere); every rank calls it."""

    def generating(self) -> contextlib.AbstractContextManager:
        """Around `module.generate` on this rank alone (no collective inside): the whole
        model present, as it is outside ZeRO-3."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) `t` over the data-parallel ranks in place; a no-op in one process."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


class LossRunner(torch.nn.Module):
    """What DDP / DeepSpeed wrap: forward(fn, *args) = fn(model, *args).  The student's loss
    reads parts of the model (the decoder, the lm_head through its chunked loss) rather than
    calling model(...); running it as this module's forward lets DDP arm its reducer and
    ZeRO-3 run its top-level hooks, while every parameter stays the model's own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


class TorchEngine:
    """Plain PyTorch: AdamW + warmup/cosine, grad clipping, accumulation, autocast.  Under a
    launcher (WORLD_SIZE > 1) the model runs inside DistributedDataParallel: gradients are
    averaged over ranks in buckets overlapping backward, and only on the last micro-batch
    (`no_sync` before).  DDP rather than FSDP2: every rank keeps the whole model, as the
    torch engine always did, so checkpoints, export and eval stay unchanged; sharding is what
    `engine: deepspeed` (ZeRO-2/3) is for."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, optim: OptimConfig,
                 device: torch.device, precision: str):
        self.module = model.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = optim.grad_clip
        self.device = device
        self._dtype = autocast_dtype(precision, device)
        self.world_size = world_size()
        self._runner = LossRunner(self.module)
        self._ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: the MoE routing counters are per-rank buffers (summed
            # over ranks by `update_expert_bias` itself), rank 0's must not overwrite them.  Its
            # successor, forward_sync_buffers=False, still syncs them at init: torch's
            # deprecation warning says to keep this one until init_sync_buffers exists.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                self._ddp = DistributedDataParallel(self._runner, broadcast_buffers=False,
                                                    device_ids=[device.index] if device.type == "cuda" else None)

    def autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def run(self, fn, *args):
        with self.autocast():
            return (self._ddp or self._runner)(fn, *args)

    def accumulating(self, last: bool):
        return self._ddp.no_sync() if self._ddp is not None and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> float:
        """Clip, step, advance the LR schedule; a skip (or non-finite grads: the same on every
        rank, DDP averaged them) changes nothing but the grads, which are dropped."""
        norm = float("nan")
        if not skip:
            params = [p for p in self.module.parameters() if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()  # like DeepSpeed: the schedule moves with applied steps only
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def generating(self):
        return contextlib.nullcontext()  # every rank holds the whole model (DDP's is the same module)

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
    if cfg.get("fp16", {}).get("enabled"):
        raise UserError(f"{train.deepspeed_config}: fp16 is refused (our non-finite-step rule and loss scaling "
                        f"would fight); use bf16 (or fp32)")
    cfg.setdefault("gradient_clipping", optim.grad_clip)
    if cfg.setdefault("zero_optimization", {}).setdefault("stage", train.zero_stage) == 0:
        where = f"{train.deepspeed_config}: zero_optimization.stage" if train.deepspeed_config else "train.zero_stage:"
        raise UserError(f"{where} 0 is refused: {STAGE_0}")
    if deepspeed_bf16(train):
        cfg.setdefault("bf16", {"enabled": True})
    cfg.setdefault("steps_per_print", 1 << 30)
    return cfg


class DeepSpeedEngine:
    """One `deepspeed.initialize` per student; DeepSpeed does accumulation, clipping, the
    rank average and (ZeRO-2/3) the partitioning.  A skipped step goes through DeepSpeed's own
    overflow path (non-finite grads: no optimiser step, no LR step, grads dropped), so its
    counters and accumulation boundary never drift from ours."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=LossRunner(model), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.module = self.engine.module.model
        self.device = self.engine.device
        self.world_size = world_size()
        self.zero_stage = int(self.engine.zero_optimization_stage())

    def run(self, fn, *args):
        return self.engine(fn, *args)  # DeepSpeed casts the module itself (bf16/fp16 config)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed counts micro-steps itself

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already this rank's share of the step (not / grad_accum); step() follows
        # every backward and only really steps at the accumulation boundary.
        self._skipped_before = self.engine.skipped_steps
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, skip: bool) -> float:
        norm = self.engine.get_global_grad_norm()
        applied = self.engine.skipped_steps == self._skipped_before
        return float(norm) if applied and norm is not None and not skip else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def state_dict(self) -> dict:
        return {}  # DeepSpeed writes its own optimizer/scheduler state (save_sharded)

    def load_state_dict(self, state: dict) -> None:
        pass

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (None elsewhere); every rank must call it.
        Under ZeRO-3 each rank holds 1/N of every weight: DeepSpeed gathers them."""
        if self.zero_stage < 3:
            return self.module.state_dict()
        full = self.engine._zero3_consolidated_16bit_state_dict()  # keys "model.*" (LossRunner)
        return None if full is None else {k.removeprefix("model."): v for k, v in full.items()}

    def generating(self):
        """Under ZeRO-3 each rank holds 1/N of every weight and the module's hooks gather a
        layer per forward, a collective every rank must join: ranks whose samples end at
        other lengths would wait on each other.  DeepSpeed's `unwrap_model_for_generation`
        gathers the whole student once (its full size in memory on every rank for the
        duration) and lifts the hooks, so each rank generates alone; the hooks come back
        and the weights are partitioned again when it ends."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def save_sharded(self, root: Path, tag: str) -> None:
        # Every rank writes its optimizer partition; DeepSpeed's rank 0 the module states.
        self.engine.save_checkpoint(str(root / "deepspeed"), tag=tag)

    def load_sharded(self, root: Path, tag: str) -> None:
        """Every rank loads its partition.  A checkpoint written by another number of ranks (a
        job rescheduled on fewer or more GPUs) is partitioned differently, which DeepSpeed
        refuses to load; its universal form (one file per parameter and optimizer state,
        DeepSpeed's own converter) loads at any number of ranks, to the same training state."""
        saved = root / "deepspeed"
        ranks = saved_ranks(saved / tag)
        if ranks in (0, self.world_size):  # 0: nothing partitioned to count; DeepSpeed says what is missing
            self.engine.load_checkpoint(str(saved), tag=tag, load_module_strict=False)
            return
        universal, leader = saved / f".universal-{tag}", is_leader()
        if leader:
            to_universal(saved / tag, universal / tag, ranks, self.world_size)
        if dist.is_initialized():
            dist.barrier()
        # Two things DeepSpeed 0.19's universal loader gets wrong, put right after it: it gives
        # every param group the first group's hyperparameters (ours differ: no weight decay on
        # norms and biases), and under ZeRO-3 every group's state one shared `step` tensor,
        # which a fused or foreach AdamW then advances once per group per step.
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        kept = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in base.param_groups]
        self.engine._config.load_universal_checkpoint = True  # no public switch: a config key read at load
        try:
            self.engine.load_checkpoint(str(universal), tag=tag, load_module_strict=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, own in zip(base.param_groups, kept):
            group.update(own)
        for state in base.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        if dist.is_initialized():
            dist.barrier()
        if leader:
            shutil.rmtree(universal, ignore_errors=True)


def saved_ranks(tag_dir: Path) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint: one optimizer-state file each
    (`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, every ZeRO stage), checked against the
    count DeepSpeed records (`dp_world_size` in rank 0's model states, read mapped, not loaded):
    a rank's files left on a disk this rank cannot read (node-local) were counted as fewer ranks,
    and the conversion that followed failed."""
    found = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    states = next(iter(sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))), None)
    recorded = None
    if states is not None:
        try:
            recorded = torch.load(states, map_location="cpu", mmap=True, weights_only=False).get("dp_world_size")
        except Exception:  # unreadable here: DeepSpeed's own load says what is wrong
            recorded = None
    if recorded and recorded != len(found):
        have = {int(m.group(1)) for f in found if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
        missing = [r for r in range(recorded) if r not in have]
        raise UserError(f"{tag_dir}: written by {recorded} rank(s), but the optimizer states of rank(s) "
                        f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''} are not there "
                        f"(zero_pp_rank_R_..._optim_states.pt); every rank's checkpoint files must be on a "
                        f"filesystem the first rank reads (copy them there to resume)")
    return len(found)


def to_universal(tag_dir: Path, out: Path, ranks: int, world: int) -> None:
    """DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`) from `tag_dir` into `out`,
    in a process of its own (it forks workers; this process holds the ranks' threads).  Our
    checkpoints carry no Megatron-style universal info, so the converter injects it."""
    shutil.rmtree(out.parent, ignore_errors=True)  # a conversion killed earlier
    print(f"[resume] {tag_dir}: written by {ranks} rank(s), resuming on {world}: converting DeepSpeed's "
          f"partitions to its universal checkpoint", flush=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--inject_missing_state"]  # its own worker counts: each holds a rank's file
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{tag_dir}: written by {ranks} rank(s), and DeepSpeed's universal-checkpoint converter "
                        f"failed on it ({tail[0][:300]}); resume on {ranks} rank(s)")
