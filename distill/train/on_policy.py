"""On-policy co-distillation: each student samples completions of the data's prompts and
learns from the teacher's judgement of them, with ONE teacher forward per step for every
student (GKD, https://arxiv.org/abs/2306.13649; TRL and NeMo-RL run one student at a time).

    prompts  = the step's prompts (a seeded permutation per epoch: a resume draws the same)
    for student in the step's on-policy students:
        samples = student.generate(prompts)    # eval mode, no grad; each prompt's sample seeded by
                                               # (seed, step, student, its place in the step): rank-free
    signal  = teacher.signal(every student's prompt + sample, one batch)   # the one forward
    student i learns from rows i*B..(i+1)*B: targets are its sampled tokens only

Where prompts come from: the training split's chat rows (the conversation up to its final
assistant turn, rendered with add_generation_prompt=True) and prompt/completion rows (the
prompt), read once at train start from the same documents `prepare_data` packs (plain-text
documents have no prompt).  The reference answer is kept beside each prompt.

Which steps are on-policy: one seeded draw u(seed, step) in [0, 1), the same on every rank
and for every student; a student takes step t on-policy when u < share(t) (its schedule).
Constant 0 never does (its steps are exactly the off-policy run's), constant 1 always does,
and a linear 0 -> 1 schedule moves from the corpus to the students' own samples.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from common.errors import UserError
from distill.chat import cut_at_stop, stop_ids
from distill.config import LossConfig, OnPolicyConfig, RunConfig
from distill.data import vocab_size_of
from distill.prompts import (Prompt, completion_blocks, left_padded, never_generated, pad_id, split_prompts,
                             stable_seed)
from distill.train.loop_config import LoopConfig
from distill.train.selection import epoch_permutation
from distill.train.student import MicroBatch, Recipe, Student
from losses import build_schedule
from teachers import IGNORE, Batch, Teacher


def build_prompts(cfg: RunConfig, tok, log=None) -> list[Prompt]:
    """The training split's prompts, in document order.  A prompt longer than data.seq_len
    tokens is dropped (and counted): it would not fit a training block either."""
    kept, too_long = split_prompts(cfg, tok, held_out=False)
    if log is not None and too_long:
        log(f"[on-policy] dropped {too_long} of {len(kept) + too_long} prompts longer than data.seq_len "
            f"({cfg.data.seq_len} tokens)")
    if not kept:
        raise UserError("train.on_policy: the training split has no prompts (chat rows with an assistant turn, or "
                        "prompt/completion rows, whose prompt fits data.seq_len); on-policy steps need them")
    return kept


def step_draw(seed: int, step: int) -> float:
    """u in [0, 1) deciding whether `step` is on-policy (see the module docstring)."""
    return stable_seed("on-policy step", seed, step) / 2.0 ** 63


def on_policy_recipe(student: Student, op: OnPolicyConfig) -> Recipe:
    """The loss of an on-policy step: the student's own settings (tail, chunking, MoE terms,
    jsd's beta) with the on-policy divergence at the sampling temperature, soft only (w_soft
    1: no hard loss on the student's own samples), uniform per-token weights."""
    loss: LossConfig = student.cfg.loss.model_copy(update={
        "divergence": op.divergence, "temperature": op.temperature, "hard_target": "labels", "adaptive": "none"})
    return loss, 1.0


class OnPolicySource:
    """A batch source: the students' own samples scored by the teacher.

    `members(step, students)`: who takes this step on-policy;
    `micro_batches(step, members)`: name -> that student's micro-batches of the step, all
    scored by one teacher forward; `recipe(student)`: the loss they are trained with."""

    def __init__(self, op: OnPolicyConfig, shares: dict[str, dict], prompts: list[Prompt], teacher: Teacher,
                 tokenizer, loop: LoopConfig):
        self.op = op
        self.schedules = {name: build_schedule(share) for name, share in shares.items()}
        self.prompts = prompts
        self.teacher = teacher
        self.loop = loop
        self.per_step = op.prompts_per_step or loop.batch_size
        if self.per_step % (loop.grad_accum * loop.world_size):
            raise UserError(f"train.on_policy.prompts_per_step={self.per_step} must be divisible by grad_accum "
                            f"({loop.grad_accum}) x data-parallel ranks ({loop.world_size})")
        self.eos = stop_ids(tokenizer)  # EOS, and a chat template's end of turn
        self.pad = pad_id(tokenizer)
        self.vocab = vocab_size_of(tokenizer)

    def members(self, step: int, students: list[Student]) -> list[Student]:
        u = step_draw(self.loop.seed, step)
        return [s for s in students
                if s.name in self.schedules and u < self.schedules[s.name](step, self.loop.steps)]

    def recipe(self, student: Student) -> Recipe:
        return on_policy_recipe(student, self.op)

    def prompt_indices(self, step: int) -> list[int]:
        """The step's global prompts: positions step*P.. of the epochs' seeded permutations."""
        n, out = len(self.prompts), []
        for j in range(step * self.per_step, (step + 1) * self.per_step):
            epoch, pos = divmod(j, n)
            out.append(int(epoch_permutation(n, stable_seed("on-policy prompts", self.loop.seed, epoch))[pos]))
        return out

    def micro_batches(self, step: int, members: list[Student]) -> dict[str, list[MicroBatch]]:
        """Every member samples this rank's prompts; one teacher forward scores all samples.
        Sets `self.last`: the step's generation figures on this rank (see `figures`)."""
        t0 = time.perf_counter()
        positions = list(range(self.per_step))[self.loop.rank::self.loop.world_size]  # in the step's global prompts
        indices = self.prompt_indices(step)
        prompts = [self.prompts[indices[j]].ids for j in positions]
        # One width for every student and rank, from the step's longest prompt: the blocks'
        # shape (and a MoE student's balance terms, which count every position) is that of one process.
        width = max(len(self.prompts[i].ids) for i in indices) + self.op.max_new_tokens  # W: every sample's block width
        blocks = torch.cat([self.sample(s, prompts, positions, step, width) for s in members])  # (S*B, W)
        batch = Batch.of(blocks, range(len(blocks)))  # input_ids, labels: (S*B, W-1)
        t1 = time.perf_counter()
        signal, valid = self.teacher.signal(batch)  # the step's one teacher forward
        self.last = {"sampled_tokens": int((batch.labels != IGNORE).sum()), "samples": len(blocks),
                     "generate_s": t1 - t0, "teacher_s": time.perf_counter() - t1}
        rows, micro = len(prompts), len(prompts) // self.loop.grad_accum
        out = {}
        for i, s in enumerate(members):
            out[s.name] = []
            for lo in range(i * rows, (i + 1) * rows, micro):
                hi = lo + micro
                part = Batch(list(range(lo, hi)), batch.input_ids[lo:hi], batch.labels[lo:hi])
                out[s.name].append(MicroBatch(part, signal.rows(lo, hi), valid[lo:hi]))
        return out

    def figures(self, device: torch.device) -> dict:
        """The last step's generation figures over every rank: tokens sampled (every member's,
        the teacher's targets) and samples (sums), seconds spent sampling and in the teacher's
        forward (the slowest rank's)."""
        sums = torch.tensor([self.last["sampled_tokens"], self.last["samples"]], dtype=torch.float64)
        secs = torch.tensor([self.last["generate_s"], self.last["teacher_s"]], dtype=torch.float64)
        if self.loop.world_size > 1:
            sums, secs = sums.to(device), secs.to(device)
            dist.all_reduce(sums)
            dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        return {"sampled_tokens": int(sums[0]), "samples": int(sums[1]),
                "generate_s": float(secs[0]), "teacher_s": float(secs[1])}

    def sample(self, student: Student, prompts: list[list[int]], positions: list[int], step: int,
               width: int) -> torch.Tensor:
        """(B, width) blocks: each prompt (no target) + the student's sampled completion up to
        and including its EOS (targets) + padding (no target), marked as packed blocks are
        (teachers.protocol.untrained), so `Batch.of` makes the labels.  positions: each
        prompt's place in the step's global prompts, which (with the seed, step and student)
        seeds its sample alone: see `RowSampler`."""
        from transformers import GenerationConfig, LogitsProcessorList

        model, device = student.model, student.device
        ids, mask = left_padded(prompts, self.pad)  # (B, P)
        seeds = [stable_seed("on-policy samples", self.loop.seed, step, student.name, j) for j in positions]
        was_training = model.training
        model.eval()
        with torch.no_grad(), student.engine.generating():  # ZeRO-3: the whole student, gathered once
            # Greedy over RowSampler's perturbed scores = sampling at the temperature (top-p).
            config = GenerationConfig(do_sample=False, max_new_tokens=self.op.max_new_tokens, eos_token_id=self.eos,
                                      pad_token_id=self.pad, suppress_tokens=never_generated(model, self.vocab))
            sampler = RowSampler(seeds, self.op.temperature, self.op.top_p, device)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 logits_processor=LogitsProcessorList([sampler]), synced_gpus=False)
        model.train(was_training)
        new = out[:, ids.shape[1]:].cpu()  # (B, <= max_new_tokens), pad after a row's EOS
        return completion_blocks(prompts, [cut_at_stop(row, self.eos) for row in new.tolist()], self.pad, width)


class RowSampler:
    """A logits processor that turns greedy decoding into sampling, each row from its own
    seeded stream: the scores at the temperature, top-p filtered, plus Gumbel noise, whose
    argmax is a draw from softmax(scores) (the Gumbel-max trick).  Row r's noise for its j-th
    token is the j-th draw of a generator seeded by seeds[r], so a prompt's sample does not
    depend on the other prompts beside it: the same on 1 or N ranks, alone or batched, and
    the global RNG (training's) is never touched."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature  # (B, V)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)  # outside the nucleus: -inf
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u))  # + Gumbel(0, 1) noise; u = 0 gives -inf, never picked


def on_policy_source(cfg: RunConfig, teacher: Teacher, tokenizer, loop: LoopConfig, log=None) -> OnPolicySource | None:
    """The run's on-policy source, or None when no student ever takes an on-policy step."""
    if not cfg.on_policy_active:
        return None
    shares = {s.name: cfg.on_policy_share(i).as_dict() for i, s in enumerate(cfg.students)
              if cfg.on_policy_share(i) is not None}
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    return OnPolicySource(cfg.train.on_policy, shares, build_prompts(cfg, tokenizer, log), teacher, tokenizer, loop)
