"""On-policy co-distillation: each student samples completions of the data's prompts and
learns from the teacher's judgement of them, with ONE teacher forward per step for every
student (GKD, https://arxiv.org/abs/2306.13649; TRL and NeMo-RL run one student at a time).

    prompts  = the step's prompts (a seeded permutation per epoch: a resume draws the same)
    for student in the step's on-policy students:
        samples = student.generate(prompts)    # eval mode, no grad, seeded by (seed, step, student, rank)
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

import hashlib
import json
import sys
from dataclasses import dataclass

import torch

from common.errors import UserError
from distill.chat import PLAIN
from distill.config import LossConfig, OnPolicyConfig, RunConfig
from distill.data import _doc_in_val, load_documents, vocab_size_of
from distill.train.loop import LoopConfig
from distill.train.student import MicroBatch, Recipe, Student
from losses import build_schedule
from teachers import Batch, Teacher, untrained


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # (P,) the rendered prompt's token ids, ending where the assistant starts
    reference: str  # the data's own answer (kept for evaluation; not trained on here)


def prompt_of(tok, chat: str) -> Prompt | None:
    """A chat row (the `chat` column's JSON) -> its prompt, or None when it has none."""
    row = json.loads(chat)
    if "prompt" in row:
        return Prompt(tok(row["prompt"], add_special_tokens=False)["input_ids"], row.get("completion", ""))
    messages = row.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
    if last == 0:  # no assistant turn, or nothing before it to answer
        return None
    text = tok.apply_chat_template(messages[:last], tools=row.get("tools"), add_generation_prompt=True,
                                   tokenize=False)
    return Prompt(tok(text, add_special_tokens=False)["input_ids"], str(messages[last].get("content") or ""))


def build_prompts(cfg: RunConfig, tok, log=None) -> list[Prompt]:
    """The training split's prompts, in document order.  A prompt longer than data.seq_len
    tokens is dropped (and counted): it would not fit a training block either."""
    docs = load_documents(cfg.data)
    docs = docs.filter(lambda b: [c != PLAIN and not _doc_in_val(t, cfg.data.val_fraction)
                                  for t, c in zip(b["text"], b["chat"])], batched=True)
    prompts = [p for p in (prompt_of(tok, c) for c in docs["chat"]) if p is not None and p.ids]
    kept = [p for p in prompts if len(p.ids) <= cfg.data.seq_len]
    if log is not None and len(kept) < len(prompts):
        log(f"[on-policy] dropped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than data.seq_len "
            f"({cfg.data.seq_len} tokens)")
    if not kept:
        raise UserError("train.on_policy: the training split has no prompts (chat rows with an assistant turn, or "
                        "prompt/completion rows, whose prompt fits data.seq_len); on-policy steps need them")
    return kept


def _unit(*parts) -> int:
    """A stable 63-bit integer from `parts` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") >> 1


def step_draw(seed: int, step: int) -> float:
    """u in [0, 1) deciding whether `step` is on-policy (see the module docstring)."""
    return _unit("on-policy step", seed, step) / 2.0 ** 63


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
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
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
            g = torch.Generator().manual_seed(_unit("on-policy prompts", self.loop.seed, epoch))
            out.append(int(torch.randperm(n, generator=g)[pos]))
        return out

    def micro_batches(self, step: int, members: list[Student]) -> dict[str, list[MicroBatch]]:
        """Every member samples this rank's prompts; one teacher forward scores all samples."""
        prompts = [self.prompts[i].ids for i in self.prompt_indices(step)[self.loop.rank::self.loop.world_size]]
        width = max(len(p) for p in prompts) + self.op.max_new_tokens  # one width for every student: (B, W)
        blocks = torch.cat([self.sample(s, prompts, step, width) for s in members])  # (S*B, W)
        batch = Batch.of(blocks, range(len(blocks)))  # input_ids, labels: (S*B, W-1)
        signal, valid = self.teacher.signal(batch)  # the step's one teacher forward
        rows, micro = len(prompts), len(prompts) // self.loop.grad_accum
        out = {}
        for i, s in enumerate(members):
            out[s.name] = []
            for lo in range(i * rows, (i + 1) * rows, micro):
                hi = lo + micro
                part = Batch(list(range(lo, hi)), batch.input_ids[lo:hi], batch.labels[lo:hi])
                out[s.name].append(MicroBatch(part, signal.rows(lo, hi), valid[lo:hi]))
        return out

    def sample(self, student: Student, prompts: list[list[int]], step: int, width: int) -> torch.Tensor:
        """(B, width) blocks: each prompt (no target) + the student's sampled completion up to
        and including its EOS (targets) + padding (no target), marked as packed blocks are
        (teachers.protocol.untrained), so `Batch.of` makes the labels."""
        from transformers import GenerationConfig

        model, device = student.model, student.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p)
            mask[r, longest - len(p):] = 1
        extra = model.get_input_embeddings().weight.shape[0]  # padded embedding rows: never sampled
        config = GenerationConfig(do_sample=True, temperature=self.op.temperature, top_p=self.op.top_p, top_k=0,
                                  max_new_tokens=self.op.max_new_tokens, eos_token_id=self.eos,
                                  pad_token_id=self.pad, suppress_tokens=list(range(self.vocab, extra)) or None)
        was_training = model.training
        model.eval()
        # Own RNG stream per (seed, step, student, rank): the global one (training's) is left
        # as it was, and a resumed or solo run of this student draws the same samples.
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_unit("on-policy samples", self.loop.seed, step, student.name, self.loop.rank))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        model.train(was_training)
        new = out[:, longest:].cpu()  # (B, <= max_new_tokens), pad after a row's EOS
        blocks = torch.full((len(prompts), width), int(untrained(torch.tensor(self.pad))), dtype=torch.long)
        for r, p in enumerate(prompts):
            c = new[r].tolist()
            if self.eos in c:
                c = c[: c.index(self.eos) + 1]
            row = torch.cat([untrained(torch.tensor(p)), torch.tensor(c, dtype=torch.long)])
            blocks[r, : len(row)] = row
        return blocks


def on_policy_source(cfg: RunConfig, teacher: Teacher, tokenizer, loop: LoopConfig, log=None) -> OnPolicySource | None:
    """The run's on-policy source, or None when no student ever takes an on-policy step."""
    if not cfg.on_policy_active:
        return None
    shares = {s.name: cfg.on_policy_share(i).as_dict() for i, s in enumerate(cfg.students)
              if cfg.on_policy_share(i) is not None}
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    return OnPolicySource(cfg.train.on_policy, shares, build_prompts(cfg, tokenizer, log), teacher, tokenizer, loop)
