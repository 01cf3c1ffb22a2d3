"""One student in training: its model, optimiser, LR schedule, loss recipe and step.

The co-distillation loop (`distill.train.loop`) owns the data and the teacher signal; it
hands the same `TeacherSignal` to every `Student.train_step`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from distill.config import LossConfig, OptimConfig, StudentConfig
from distill.train.engines import Engine, all_reduce
from losses import DIVERGENCES, build_schedule, combine, per_token_losses, soft_weights, weight_scores
from losses.moe import load_balancing_loss, routed_slots, router_z_loss
from losses.signal import TeacherSignal
from students.build import collect_router_logits, expert_load, head_transform
from students.sparse_moe import (expert_biases, moe_modules, routing_counts, set_expert_biases, set_routing_counts,
                                 update_expert_bias)
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


def fused_adamw_runs_on(device: torch.device, params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for these parameters on `device`.  Asked here
    because torch itself checks only at the first step (an error then, no fallback)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = _get_fused_kernels_supported_devices()
    except ImportError:  # a torch that moved it: the two devices every release has had it for
        supported = ["cuda", "cpu"]
    return device.type in supported and all(p.is_floating_point() for p in params)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int,
                   device: torch.device | None = None):
    """AdamW, fused (one kernel over all parameters) where torch has it for the parameters on
    `device` (the one the student trains on; default: where its parameters are now), else
    multi-tensor (foreach).  On CPU the fused step is 4.5-5x faster (BENCHMARKS.md): in
    bench/peer.py's 1,000-row job the optimiser took 1.2 s of the students' 25.5 s instead of
    3.5 s of 28.7 s.  A checkpoint's optimiser state carries the flag it was saved with, so a
    run resumed from a foreach one stays foreach."""
    groups, kw = param_groups(model, optim.weight_decay), dict(lr=optim.lr, betas=optim.betas)
    params = [p for g in groups for p in g["params"]]
    device = device if device is not None else (params[0].device if params else torch.device("cpu"))
    if fused_adamw_runs_on(device, params):
        opt = torch.optim.AdamW(groups, fused=True, **kw)
    else:
        opt = torch.optim.AdamW(groups, foreach=True, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))
    return opt, sched


@dataclass
class MicroBatch:
    """One micro-batch as every student sees it: its blocks and the teacher's signal."""

    batch: Batch
    signal: TeacherSignal | None  # (B, T, k); None when training without a teacher
    valid: torch.Tensor  # (B, T) bool: False where the teacher's signal is a placeholder

    def to(self, device) -> "DeviceBatch":
        b = self.batch
        return DeviceBatch(b.input_ids.to(device, non_blocking=True), b.labels.to(device, non_blocking=True),
                           self.valid.to(device, non_blocking=True),
                           None if self.signal is None else self.signal.to(device),
                           None if b.position_ids is None else b.position_ids.to(device))


class DeviceBatch(NamedTuple):
    """A micro-batch on a student's device, as its step reads it."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the next token, IGNORE where it is no target
    valid: torch.Tensor  # (B, T) bool: False where the teacher's signal is a placeholder
    signal: TeacherSignal | None  # (B, T, k)
    positions: torch.Tensor | None  # (B, T) position ids of packed rows; None: one sequence a row


Recipe = tuple  # (LossConfig, w_soft): a step's loss when not the student's own schedule


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

    transform: dict  # the model's logits from this head's output (students.build.head_transform)

    def forward(self, x: torch.Tensor, losses: dict | None = None):
        if losses is None:
            return super().forward(x)
        return per_token_losses(x, self.weight, bias=self.bias, **self.transform, **losses)


def loss_head(model) -> LossHead:
    head = model.lm_head
    if type(head) is torch.nn.Linear:
        head.__class__ = LossHead  # only the class: weights, hooks and state dict stay as they are
        head.transform = head_transform(model)
    return head


@dataclass
class StepTotals:
    """A step's normalisers over every micro-batch on every rank, known before its first
    backward, so that how the step is split (grad_accum, ranks) never changes its update.

    targets:    positions that are training targets (label != -100) with a valid teacher
                signal: the one mask the hard and soft terms sum over, and their mean's
                denominator.
    tokens:     every position: the MoE balance and z terms average over all routed tokens.
    score_mean: adaptive soft weighting's mean score over the targets; None: uniform, or
                (one micro-batch) reduced over the ranks inside the forward.
    slots:      (L, E) routing slots of the whole step, the balance loss's f_e; None: a
                dense student, or (one micro-batch) reduced inside the forward.
    """

    targets: float
    tokens: float
    score_mean: float | None = None
    slots: torch.Tensor | None = None


def student_forward(model, input_ids: torch.Tensor, labels: torch.Tensor, signal: TeacherSignal | None,
                    mask: torch.Tensor, loss_cfg: LossConfig, baseline: bool,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (hard (N,), soft (N,)) losses of one micro-batch, N = B*T; the lm_head is
    applied chunk by chunk inside `per_token_losses` (bounded memory).  A MoE model's router
    logits of this forward are left on its layers (`collect_router_logits`).

    input_ids, labels: (B, T); mask: (N,) bool targets; signal: (B, T, k) or None;
    position_ids: (B, T) restarting per packed row (each row attends within itself) or None.

    Only the targets' hidden states go through the lm_head and the losses: every loss term is
    masked to them, so a chat prompt's or a padding position's (V, H) matmuls, forward and
    backward, would be work thrown away.  Their hard and soft come out 0."""
    hidden = model.model(input_ids=input_ids, **positions_arg(position_ids)).last_hidden_state  # (B, T, H)
    use_teacher = signal is not None and not baseline
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, H), (N,)
    flat_signal = signal.flatten() if use_teacher else None
    rows = None if bool(mask.all()) else mask.nonzero().squeeze(1)  # (M,) flat indices of the targets
    if rows is not None:
        flat_hidden, flat_labels, mask = flat_hidden[rows], flat_labels[rows], mask[rows]
        flat_signal = None if flat_signal is None else flat_signal.apply(lambda x: x[rows.to(x.device)])
    # Only the divergence's own parameters (jsd: beta; skew KLs: alpha) are passed on.
    div_params = {p: getattr(loss_cfg, p) for p in DIVERGENCES[loss_cfg.divergence].params}
    hard, soft = loss_head(model)(flat_hidden, losses=dict(
        signal=flat_signal, labels=flat_labels, mask=mask,
        divergence=loss_cfg.divergence, temperature=loss_cfg.temperature, tail=loss_cfg.tail,
        hard_target="labels" if baseline else loss_cfg.hard_target, chunk_size=loss_cfg.chunk_size,
        **div_params,
    ))
    if rows is None:
        return hard, soft
    n = labels.numel()  # back to (N,): 0 at the positions no loss reads
    return hard.new_zeros(n).index_copy(0, rows, hard), soft.new_zeros(n).index_copy(0, rows, soft)


def positions_arg(position_ids: torch.Tensor | None) -> dict:
    """A decoder forward's keywords for packed rows: position_ids (B, T), given with no
    attention mask and no KV cache, make transformers' masking (masking_utils.
    find_packed_sequence_indices) keep attention within each row.  use_cache=False always:
    with a cache (the config's default, even in training) that detection is skipped, and a
    training or eval forward has no use for one."""
    return {"use_cache": False} | ({} if position_ids is None else {"position_ids": position_ids})


def weighting_mode(loss_cfg: LossConfig, baseline: bool, w_soft: float, has_signal: bool) -> str:
    """The step's per-token soft weighting (losses/weighting.py): the config's `adaptive`
    (its `none` is the losses' `uniform`), uniform where there is no soft term to weight
    (a baseline, w_soft 0, or no teacher signal)."""
    if loss_cfg.adaptive == "none" or baseline or w_soft == 0 or not has_signal:
        return "uniform"
    return loss_cfg.adaptive


def target_mask(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions a step learns from, targets with a valid teacher signal."""
    return valid & (labels != IGNORE)


def distill_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, signal: TeacherSignal | None,
                 valid: torch.Tensor, loss_cfg: LossConfig, w_soft: float, baseline: bool,
                 totals: StepTotals | None = None, world: int = 1,
                 position_ids: torch.Tensor | None = None) -> LossOutput:
    """This rank's share of the step's loss from one micro-batch: the sum over its targets of
    w_hard*hard + w_soft_i*soft, plus the MoE balance terms' sums over its tokens, each
    divided by the step's count (`totals`; None: this micro-batch is the whole step), times
    `world` (the engines average gradients over ranks).

    input_ids, labels, valid: (B, T); signal: (B, T, k) or None for a CE-only baseline;
    position_ids: (B, T) of packed rows (data.packing: documents) or None.
    A label of -100 (chat data: a token outside the assistant's turns; padding) is no
    target: it leaves the one mask that drives the hard and soft terms, the adaptive
    weights and the mean, so neither its label nor its teacher signal reaches a gradient.
    stats: loss (the whole objective: the MoE terms too), hard, soft (absent where no soft
    term is computed), w_soft, balance_loss, z_loss as shares (they add up over micro-batches
    and ranks to the step's means).
    """
    mask = target_mask(labels, valid)  # (B, T)
    if totals is None:
        totals = StepTotals(targets=float(mask.sum()), tokens=float(labels.numel()))
    flat_mask = mask.reshape(-1)  # (N,)
    hard, soft = student_forward(model, input_ids, labels, signal, flat_mask, loss_cfg, baseline, position_ids)
    if signal is not None and not baseline:
        mode = weighting_mode(loss_cfg, baseline, w_soft, has_signal=True)
        score_mean = totals.score_mean
        if mode == "disagreement" and score_mean is None:  # one micro-batch: its scores, over every rank
            score_sum = weight_scores(mode, None, soft.detach(), flat_mask)[flat_mask].double().sum().reshape(1)
            score_mean = float(all_reduce(score_sum).item()) / max(totals.targets, 1.0)
        w_soft_tok = soft_weights(mode, w_soft, flat_mask, signal=signal.flatten(), soft=soft.detach(),
                                  score_mean=score_mean)
        total, stats = combine(hard, soft, flat_mask, 1.0 - w_soft, w_soft_tok, totals.targets)
    else:
        total, stats = combine(hard, soft, flat_mask, 1.0, 0.0, totals.targets)
        del stats["soft"]  # not computed (a CE-only baseline, or no signal): no figure, rather than a 0
    hard_per_block = (hard.detach().view(labels.shape) * mask).sum(-1) / mask.sum(-1)  # (B,); 0/0 = NaN
    router_logits = collect_router_logits(model)
    if router_logits:
        top_k = getattr(model.config, "num_experts_per_tok", 1)
        # f_e over the step as all ranks hold it: (L, E) slot counts summed over ranks.
        slots = totals.slots if totals.slots is not None else all_reduce(routed_slots(router_logits, top_k))
        fractions = slots / slots.sum(-1, keepdim=True).clamp_min(1)
        lb = load_balancing_loss(router_logits, top_k, fractions, n_tokens=totals.tokens)
        z = router_z_loss(router_logits, n_tokens=totals.tokens)
        total = total + loss_cfg.balance_weight * lb + loss_cfg.z_weight * z
        lb_f, z_f = torch.stack([lb.detach(), z.detach()]).float().tolist()  # one host read for both
        # `loss` is the objective minimised, the router's terms included
        stats.update(loss=stats["loss"] + loss_cfg.balance_weight * lb_f + loss_cfg.z_weight * z_f,
                     balance_loss=lb_f, z_loss=z_f)
    return LossOutput(total * world, stats, hard_per_block)


class Student:
    """A student's model + optimiser + schedule; `train_step` does one optimiser step."""

    def __init__(self, cfg: StudentConfig, engine: Engine, total_steps: int):
        self.cfg = cfg
        self.name = cfg.name
        self.engine = engine
        self.total_steps = total_steps
        self.soft_schedule = build_schedule(cfg.loss.soft_weight.as_dict())
        self.nonfinite_steps = 0
        self.tokens_seen = 0  # positions read (prompts and padding too): the throughput's unit
        self.targets_seen: int | None = 0  # training targets learnt from (None: resumed from before it was counted)
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

    def train_step(self, step: int, micro_batches: list[MicroBatch], recipe: Recipe | None = None) -> dict:
        """One optimiser step over `micro_batches` (this rank's share of the step's batch).
        recipe: the step's loss and soft weight when not the student's own (on-policy steps).

        The loss is one token mean over the whole step: its totals (`step_totals`: targets,
        tokens, adaptive scores, MoE routing) are summed over every micro-batch on every
        rank before the first backward, and each micro-batch contributes its sums / those
        totals.  A non-finite micro-batch loss is multiplied by NaN before its backward, so
        the step's (rank-averaged) grads, and hence the global grad norm every rank
        computes, are non-finite: every rank then skips the whole optimiser step (weights,
        optimiser, LR schedule, MoE routing counts untouched), while every micro-batch's
        backward still runs on every rank (collectives and DeepSpeed's accumulation
        boundary stay aligned)."""
        t0 = time.perf_counter()
        self.model.train()
        lr = self.engine.lr()  # the rate this step's update uses (read before the schedule moves on)
        loss_cfg, w_soft = recipe if recipe is not None else (self.cfg.loss, self.w_soft(step))
        world, n_micro = self.engine.world_size, len(micro_batches)
        on_device = [mb.to(self.device) for mb in micro_batches]
        totals = self.step_totals(on_device, w_soft, loss_cfg)
        sums, finite, hard_per_block = {}, True, []
        for i, (input_ids, labels, valid, signal, positions) in enumerate(on_device):
            with self.engine.accumulating(last=i == n_micro - 1):
                out = self.engine.run(lambda model: distill_loss(
                    model, input_ids, labels, signal, valid, loss_cfg, w_soft, self.cfg.baseline, totals, world,
                    positions))
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
            for moe in moe_modules(self.model):  # nor routed anything the expert bias should follow
                moe.counts_since_update.zero_()
            self.nonfinite_steps += 1
            return {"skipped": True, "nonfinite_steps": self.nonfinite_steps, "lr": lr}
        if self.cfg.loss.bias_update_rate > 0:
            update_expert_bias(self.model, self.cfg.loss.bias_update_rate)
        tokens = sum(int(mb.valid.numel()) for mb in micro_batches) * world
        self.tokens_seen += tokens
        if self.targets_seen is not None:
            self.targets_seen += round(totals.targets)  # every rank's: the step's global count
        metrics = self._reduced(sums)
        metrics.update({
            "w_hard": out.stats["w_hard"],
            "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), "tokens_seen": self.tokens_seen,
            "targets_seen": self.targets_seen,
        })
        return metrics

    def step_totals(self, micro_batches: list[DeviceBatch], w_soft: float,
                    loss_cfg: LossConfig | None = None) -> StepTotals:
        """The step's `StepTotals` from this rank's micro-batches, summed over ranks in one all-reduce.  Teacher-scored adaptive weights
        (confidence, entropy) sum their scores from the signal alone.  Scores from the
        student itself (disagreement) and a MoE student's routing are known only after a
        forward: with several micro-batches a no-grad forward of each comes first (about a
        third of a step's compute, only in those configurations); with one, the forward
        itself reduces them (see `distill_loss`)."""
        loss_cfg = loss_cfg or self.cfg.loss
        mode = weighting_mode(loss_cfg, self.cfg.baseline, w_soft,
                              has_signal=all(mb.signal is not None for mb in micro_batches))
        masks = [target_mask(mb.labels, mb.valid).reshape(-1) for mb in micro_batches]  # (N,) each
        moe = bool(moe_modules(self.model)) and loss_cfg.balance_weight > 0
        prepass = len(micro_batches) > 1 and (moe or mode == "disagreement")
        scores, slots = torch.zeros((), dtype=torch.float64), None
        for (input_ids, labels, valid, signal, positions), mask in zip(micro_batches, masks):
            soft = None
            if prepass:
                with torch.no_grad():
                    if mode == "disagreement":
                        _, soft = self.engine.run(lambda model: student_forward(
                            model, input_ids, labels, signal, mask, loss_cfg, self.cfg.baseline, positions))
                    else:  # the routing alone: the decoder, not the lm_head
                        self.engine.run(lambda model: model.model(input_ids=input_ids, **positions_arg(positions)))
                if moe:
                    top_k = getattr(self.model.config, "num_experts_per_tok", 1)
                    mb_slots = routed_slots(collect_router_logits(self.model), top_k).double().cpu()
                    slots = mb_slots if slots is None else slots + mb_slots
            if mode in ("confidence", "entropy") or soft is not None and mode == "disagreement":
                r = weight_scores(mode, signal.flatten() if signal is not None else None, soft, mask)
                scores = scores + r[mask].double().sum().cpu()
        counts = [float(sum(int(m.sum()) for m in masks)), float(sum(mb.labels.numel() for mb in micro_batches)),
                  float(scores)]
        flat = torch.tensor(counts, dtype=torch.float64)
        if slots is not None:
            flat = torch.cat([flat, slots.reshape(-1)])
        flat = all_reduce(flat.to(self.device)).cpu()
        targets, tokens = float(flat[0]), float(flat[1])
        known = mode in ("confidence", "entropy") or (mode == "disagreement" and prepass)
        score_mean = float(flat[2]) / max(targets, 1.0) if known else None
        return StepTotals(targets, tokens, score_mean,
                          flat[3:].view_as(slots).float().to(self.device) if slots is not None else None)

    def _reduced(self, sums: dict) -> dict:
        """The step's metrics over every rank, from this rank's sums (one all-reduce): loss,
        hard, soft, w_soft, balance/z losses are shares of the step's means (summed), n_valid
        a count (summed); expert imbalance from the last micro-batch's per-expert token
        counts summed over ranks."""
        names = sorted(sums)
        loads = expert_load(self.model)  # one (E,) per MoE layer
        flat = torch.tensor([sums[k] for k in names], dtype=torch.float64)
        if loads:
            flat = torch.cat([flat, torch.cat([l.double().cpu() for l in loads])])
        flat = all_reduce(flat.to(self.device)).cpu()
        metrics = {k: float(flat[i]) for i, k in enumerate(names)}
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
                 "tokens_seen": self.tokens_seen, "targets_seen": self.targets_seen,
                 "expert_bias": expert_biases(self.model),
                 "routing_counts": routing_counts(self.model)}
        if self.data_view_state is not None:
            state["data_view"] = self.data_view_state
        return state

    def load_state(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.tokens_seen = state["tokens_seen"]
        self.targets_seen = state.get("targets_seen")  # None in a checkpoint from before it was counted
        if "expert_bias" in state:  # checkpoints from before the bias was saved: zeros, as then
            set_expert_biases(self.model, state["expert_bias"])
        if "routing_counts" in state:  # tokens routed since the last bias update (older checkpoints: none)
            set_routing_counts(self.model, state["routing_counts"])
        self.data_view_state = state.get("data_view")
