"""One student in training: its model, optimiser, LR schedule, loss recipe and step.

The co-distillation loop (`distill.train.loop`) owns the data and the teacher signal; it
hands the same `TeacherSignal` to every `Student.train_step`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from distill.config import LossConfig, OptimConfig, StudentConfig
from distill.train.engines import Engine
from losses import DIVERGENCES, build_schedule, combine, per_token_losses, soft_weights
from losses.moe import load_balancing_loss, router_z_loss
from losses.signal import TeacherSignal
from students.build import collect_router_logits, expert_load
from students.sparse_moe import expert_biases, set_expert_biases, update_expert_bias
from teachers import IGNORE, Batch



def lr_lambda(optim: OptimConfig, total_steps: int):
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `total_steps`."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and 1-D params (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                            foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))
    return opt, sched


@dataclass
class MicroBatch:
    """One micro-batch as every student sees it: its blocks and the teacher's signal."""

    batch: Batch
    signal: TeacherSignal | None  # (B, T, k); None when training without a teacher
    valid: torch.Tensor  # (B, T) bool: False where the teacher's signal is a placeholder


@dataclass
class LossOutput:
    total: torch.Tensor
    stats: dict = field(default_factory=dict)


def distill_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, signal: TeacherSignal | None,
                 valid: torch.Tensor, loss_cfg: LossConfig, w_soft: float, baseline: bool) -> LossOutput:
    """total = mean over valid tokens of w_hard*hard + w_soft_i*soft (+ MoE balance terms).

    input_ids, labels, valid: (B, T); signal: (B, T, k) or None for a CE-only baseline.
    A label of -100 (chat data: a token outside the assistant's turns; padding) is no
    target: it leaves the one mask that drives the hard and soft terms, the adaptive
    weights and the mean, so neither its label nor its teacher signal reaches a gradient.
    The lm_head is applied chunk by chunk inside `per_token_losses` (bounded memory).
    """
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, H)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    mask = (valid & (labels != IGNORE)).reshape(-1)  # (N,) bool
    use_teacher = signal is not None and not baseline
    flat_signal = signal.flatten() if use_teacher else None  # (N, k)
    # Only the divergence's own parameters (jsd: beta; skew KLs: alpha) are passed on.
    div_params = {p: getattr(loss_cfg, p) for p in DIVERGENCES[loss_cfg.divergence].params}
    hard, soft = per_token_losses(
        flat_hidden, model.lm_head.weight, flat_signal,
        labels.reshape(-1), mask,
        divergence=loss_cfg.divergence, temperature=loss_cfg.temperature, tail=loss_cfg.tail,
        hard_target="labels" if baseline else loss_cfg.hard_target, chunk_size=loss_cfg.chunk_size,
        **div_params,
    )
    if use_teacher:
        mode = "uniform" if loss_cfg.adaptive == "none" else loss_cfg.adaptive
        w_soft_tok = soft_weights(mode, w_soft, mask, signal=flat_signal, soft=soft.detach())
        total, stats = combine(hard, soft, mask, 1.0 - w_soft, w_soft_tok)
    else:
        total, stats = combine(hard, soft, mask, 1.0, 0.0)
    router_logits = collect_router_logits(model)
    if router_logits:
        top_k = getattr(model.config, "num_experts_per_tok", 1)
        lb = load_balancing_loss(router_logits, top_k)
        z = router_z_loss(router_logits)
        total = total + loss_cfg.balance_weight * lb + loss_cfg.z_weight * z
        stats.update(balance_loss=float(lb.detach()), z_loss=float(z.detach()))
    return LossOutput(total, stats)


class Student:
    """A student's model + optimiser + schedule; `train_step` does one optimiser step."""

    def __init__(self, cfg: StudentConfig, model: torch.nn.Module, engine: Engine, total_steps: int):
        self.cfg = cfg
        self.name = cfg.name
        self.engine = engine
        self.total_steps = total_steps
        self.soft_schedule = build_schedule(cfg.loss.soft_weight.as_dict())
        self.nonfinite_steps = 0
        self.tokens_seen = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def w_soft(self, step: int) -> float:
        return 0.0 if self.cfg.baseline else float(self.soft_schedule(step, self.total_steps))

    def train_step(self, step: int, micro_batches: list[MicroBatch]) -> dict:
        """One optimiser step over `micro_batches`."""
        t0 = time.perf_counter()
        self.model.train()
        w_soft = self.w_soft(step)
        stats_acc, finite = {}, True
        for mb in micro_batches:
            input_ids, labels, valid = (x.to(self.device, non_blocking=True)
                                        for x in (mb.batch.input_ids, mb.batch.labels, mb.valid))
            signal = mb.signal.to(self.device) if mb.signal is not None else None
            with self.engine.autocast():
                out = distill_loss(self.model, input_ids, labels, signal, valid, self.cfg.loss, w_soft, self.cfg.baseline)
            finite = self.engine.all_finite(out.total)
            if not finite:
                break
            self.engine.backward(out.total, len(micro_batches))
            for k, v in out.stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + float(v) / len(micro_batches)
        grad_norm = self.engine.step(skip=not finite)
        if not finite or not math.isfinite(grad_norm):
            self.nonfinite_steps += 1
            return {"skipped": True, "nonfinite_steps": self.nonfinite_steps, "lr": self.engine.lr()}
        if self.cfg.loss.bias_update_rate > 0:
            update_expert_bias(self.model, self.cfg.loss.bias_update_rate)
        tokens = sum(int(mb.valid.numel()) for mb in micro_batches) * self.engine.world_size
        self.tokens_seen += tokens
        metrics = {
            **stats_acc, "lr": self.engine.lr(), "grad_norm": grad_norm,  # stats_acc["loss"]: from `combine`
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), "tokens_seen": self.tokens_seen,
        }
        loads = expert_load(self.model)
        if loads:
            # max/mean tokens per expert, per MoE layer: 1.0 is perfectly balanced.
            metrics["expert_imbalance"] = [round(float(l.max() / l.float().mean().clamp(min=1e-9)), 3) for l in loads]
        return metrics

    def state(self) -> dict:
        """Everything a resume needs beyond the weights.  expert_bias: one (E,) tensor per MoE
        layer, a non-persistent buffer (model.safetensors stays stock) that routing depends on."""
        return {"engine": self.engine.state_dict(), "nonfinite_steps": self.nonfinite_steps,
                "tokens_seen": self.tokens_seen, "expert_bias": expert_biases(self.model)}

    def load_state(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.tokens_seen = state["tokens_seen"]
        if "expert_bias" in state:  # checkpoints from before the bias was saved: zeros, as then
            set_expert_biases(self.model, state["expert_bias"])
