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
from distill.train.engines import Engine, all_reduce
from losses import DIVERGENCES, build_schedule, combine, per_token_losses, soft_weights
from losses.moe import load_balancing_loss, routed_slots, router_z_loss
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
    hard_per_block: torch.Tensor | None = None  # (B,) mean hard loss per block over its targets (NaN: none)


class LossHead(torch.nn.Linear):
    """The lm_head with a second entry point: called with `losses=` it returns the chunked
    per-token (hard (N,), soft (N,)) losses of hidden states (N, H) instead of logits, never
    holding (N, V) logits.  Being the lm_head's own forward matters under ZeRO-3, where the
    (V, H) weight is a 1/N partition between uses: DeepSpeed gathers it before this forward
    and again before its backward (whose grad then reduce-scatters into the partition)."""

    def forward(self, x: torch.Tensor, losses: dict | None = None):
        if losses is None:
            return super().forward(x)
        return per_token_losses(x, self.weight, bias=self.bias, **losses)


def loss_head(model) -> LossHead:
    head = model.lm_head
    if type(head) is torch.nn.Linear:
        head.__class__ = LossHead  # only the class: weights, hooks and state dict stay as they are
    return head


def distill_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, signal: TeacherSignal | None,
                 valid: torch.Tensor, loss_cfg: LossConfig, w_soft: float, baseline: bool,
                 denominator: float | None = None, world: int = 1, n_micro: int = 1) -> LossOutput:
    """This rank's share of the step's loss from one micro-batch: the sum over its valid tokens
    of w_hard*hard + w_soft_i*soft, divided by `denominator` (the step's valid tokens over
    every micro-batch and rank; None: this micro-batch's own count), times `world` (the
    engines average gradients over ranks), plus the MoE balance terms / `n_micro`.

    input_ids, labels, valid: (B, T); signal: (B, T, k) or None for a CE-only baseline.
    A label of -100 (chat data: a token outside the assistant's turns; padding) is no
    target: it leaves the one mask that drives the hard and soft terms, the adaptive
    weights and the mean, so neither its label nor its teacher signal reaches a gradient.
    The lm_head is applied chunk by chunk inside `per_token_losses` (bounded memory).
    stats: loss, hard, soft, w_soft as shares (they add up over micro-batches and ranks to
    the step's token means); balance_loss, z_loss / n_micro (add up over micro-batches).
    """
    hidden = model.model(input_ids=input_ids).last_hidden_state  # (B, T, H)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    mask = (valid & (labels != IGNORE)).reshape(-1)  # (N,) bool
    use_teacher = signal is not None and not baseline
    flat_signal = signal.flatten() if use_teacher else None  # (N, k)
    # Only the divergence's own parameters (jsd: beta; skew KLs: alpha) are passed on.
    div_params = {p: getattr(loss_cfg, p) for p in DIVERGENCES[loss_cfg.divergence].params}
    hard, soft = loss_head(model)(flat_hidden, losses=dict(
        signal=flat_signal, labels=labels.reshape(-1), mask=mask,
        divergence=loss_cfg.divergence, temperature=loss_cfg.temperature, tail=loss_cfg.tail,
        hard_target="labels" if baseline else loss_cfg.hard_target, chunk_size=loss_cfg.chunk_size,
        **div_params,
    ))
    if use_teacher:
        mode = "uniform" if loss_cfg.adaptive == "none" else loss_cfg.adaptive
        w_soft_tok = soft_weights(mode, w_soft, mask, signal=flat_signal, soft=soft.detach())
        total, stats = combine(hard, soft, mask, 1.0 - w_soft, w_soft_tok, denominator)
    else:
        total, stats = combine(hard, soft, mask, 1.0, 0.0, denominator)
    total = total * world
    per_block = mask.view(labels.shape)  # (B, T)
    hard_per_block = (hard.detach().view(labels.shape) * per_block).sum(-1) / per_block.sum(-1)  # (B,); 0/0 = NaN
    router_logits = collect_router_logits(model)
    if router_logits:
        top_k = getattr(model.config, "num_experts_per_tok", 1)
        # f_e over the micro-batch as all ranks hold it: (L, E) slot counts summed over ranks.
        slots = all_reduce(routed_slots(router_logits, top_k))
        lb = load_balancing_loss(router_logits, top_k, slots / slots.sum(-1, keepdim=True).clamp_min(1))
        z = router_z_loss(router_logits)
        total = total + (loss_cfg.balance_weight * lb + loss_cfg.z_weight * z) / n_micro
        stats.update(balance_loss=float(lb.detach()) / n_micro, z_loss=float(z.detach()) / n_micro)
    return LossOutput(total, stats, hard_per_block)


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
        self.hard_per_block: torch.Tensor | None = None  # (B_local,) the last step's loss per block, for dynamic selection
        self.data_view_state: dict | None = None  # a dynamic data view's table, checkpointed with the student

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def w_soft(self, step: int) -> float:
        return 0.0 if self.cfg.baseline else float(self.soft_schedule(step, self.total_steps))

    def train_step(self, step: int, micro_batches: list[MicroBatch]) -> dict:
        """One optimiser step over `micro_batches` (this rank's share of the step's batch).

        The loss is one token mean over the whole step: the valid-token count of every
        micro-batch on every rank is summed (one all-reduce) before the first forward, and
        each micro-batch contributes its token sum / that count.  A non-finite micro-batch
        loss is multiplied by NaN before its backward, so the step's (rank-averaged) grads,
        and hence the global grad norm every rank computes, are non-finite: every rank then
        skips the whole optimiser step (weights, optimiser, LR schedule untouched), while every
        micro-batch's backward still runs on every rank (collectives and DeepSpeed's
        accumulation boundary stay aligned)."""
        t0 = time.perf_counter()
        self.model.train()
        w_soft = self.w_soft(step)
        world, n_micro = self.engine.world_size, len(micro_batches)
        n_global = all_reduce(torch.tensor([float(sum(int(mb.valid.sum()) for mb in micro_batches))],
                                           device=self.device))
        denominator = float(n_global.item())
        sums, finite, hard_per_block = {}, True, []
        for i, mb in enumerate(micro_batches):
            input_ids, labels, valid = (x.to(self.device, non_blocking=True)
                                        for x in (mb.batch.input_ids, mb.batch.labels, mb.valid))
            signal = mb.signal.to(self.device) if mb.signal is not None else None
            with self.engine.accumulating(last=i == n_micro - 1):
                out = self.engine.run(lambda model: distill_loss(
                    model, input_ids, labels, signal, valid, self.cfg.loss, w_soft, self.cfg.baseline,
                    denominator, world, n_micro))
                loss = out.total
                if not bool(torch.isfinite(loss.detach())):
                    finite = False
                    loss = loss * float("nan")  # NaN grads for certain: see the docstring
                self.engine.backward(loss)
            for k, v in out.stats.items():
                if k != "w_hard":
                    sums[k] = sums.get(k, 0.0) + float(v)
            hard_per_block.append(out.hard_per_block)
        self.hard_per_block = torch.cat(hard_per_block)
        grad_norm = self.engine.step(skip=not finite)
        if not math.isfinite(grad_norm):  # the same on every rank: the norm is of the reduced grads
            self.hard_per_block = None  # a skipped step measured nothing worth re-weighting by
            self.nonfinite_steps += 1
            return {"skipped": True, "nonfinite_steps": self.nonfinite_steps, "lr": self.engine.lr()}
        if self.cfg.loss.bias_update_rate > 0:
            update_expert_bias(self.model, self.cfg.loss.bias_update_rate)
        tokens = sum(int(mb.valid.numel()) for mb in micro_batches) * world
        self.tokens_seen += tokens
        metrics = self._reduced(sums, world)
        metrics.update({
            "w_hard": out.stats["w_hard"],
            "lr": self.engine.lr(), "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), "tokens_seen": self.tokens_seen,
        })
        return metrics

    def _reduced(self, sums: dict, world: int) -> dict:
        """The step's metrics over every rank, from this rank's sums (one all-reduce): loss,
        hard, soft, w_soft are shares of the global token mean (summed), n_valid a count
        (summed), balance/z losses per-rank means (averaged); expert imbalance from the
        last micro-batch's per-expert token counts summed over ranks."""
        names = sorted(sums)
        loads = expert_load(self.model)  # one (E,) per MoE layer
        flat = torch.tensor([sums[k] for k in names], dtype=torch.float64)
        if loads:
            flat = torch.cat([flat, torch.cat([l.double().cpu() for l in loads])])
        flat = all_reduce(flat.to(self.device)).cpu()
        metrics = {k: float(flat[i]) / (world if k in ("balance_loss", "z_loss") else 1) for i, k in enumerate(names)}
        if "n_valid" in metrics:
            metrics["n_valid"] = int(metrics["n_valid"])
        if loads:
            # max/mean tokens per expert, per MoE layer: 1.0 is perfectly balanced.
            counts = flat[len(names):].split([len(l) for l in loads])
            metrics["expert_imbalance"] = [round(float(c.max() / c.mean().clamp(min=1e-9)), 3) for c in counts]
        return metrics

    def state(self) -> dict:
        """Everything a resume needs beyond the weights.  expert_bias: one (E,) tensor per MoE
        layer, a non-persistent buffer (model.safetensors stays stock) that routing depends on."""
        state = {"engine": self.engine.state_dict(), "nonfinite_steps": self.nonfinite_steps,
                 "tokens_seen": self.tokens_seen, "expert_bias": expert_biases(self.model)}
        if self.data_view_state is not None:
            state["data_view"] = self.data_view_state
        return state

    def load_state(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.tokens_seen = state["tokens_seen"]
        if "expert_bias" in state:  # checkpoints from before the bias was saved: zeros, as then
            set_expert_biases(self.model, state["expert_bias"])
        self.data_view_state = state.get("data_view")
