"""Generation evaluation: students answer held-out prompts, the teacher judges the answers.

On the validation split's first `train.eval_prompts` prompts (chat rows up to their final
assistant turn, prompt/completion rows' prompt: `distill.prompts`), per model:

    greedy  = model.generate(prompts)                       # stock generate, no sampling
    sampled = model.generate(prompts, sample at T, top_p)   # own RNG stream, seeded by (seed, name)
    for each:  one teacher forward per batch of completions (dense logits) ->
               reverse KL(student || teacher) at T per completion token (EOS included),
               mean completion length (tokens, EOS included),
               exact match of the decoded completion against the data's answer (whitespace
               stripped), when the data has answers
    samples = 3 of: prompt, the student's greedy completion, the teacher's greedy completion

T, top_p and max_new_tokens are `train.on_policy`'s (its defaults when the run has none), so
the figure is the on-policy loss's own measure on held-out prompts.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

from distill.chat import cut_at_stop, stop_ids
from distill.config import OnPolicyConfig, RunConfig
from distill.data import vocab_size_of
from distill.prompts import (Prompt, completion_blocks, left_padded, never_generated, pad_id, split_prompts,
                             stable_seed)
from losses.divergences import kl
from teachers import Batch, Teacher
from teachers.protocol import IGNORE

SAMPLES_SHOWN = 3


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int = 8  # prompts per generate call and per teacher forward

    @classmethod
    def of(cls, cfg: RunConfig) -> "GenSettings":
        op = cfg.train.on_policy or OnPolicyConfig()
        return cls(op.max_new_tokens, op.temperature, op.top_p, cfg.seed)


def held_out_prompts(cfg: RunConfig, tok, n: int) -> list[Prompt]:
    """The validation split's first n prompts that fit data.seq_len, in document order
    (the split `distill.data` packs the held-out blocks from)."""
    return split_prompts(cfg, tok, held_out=True, limit=n)[0] if n > 0 else []


def generate(model, prompts: list[list[int]], tok, s: GenSettings, sample_seed: int | None = None,
             bar=None) -> list[list[int]]:
    """Each prompt's completion ids, cut after its first stop id (EOS, or a chat template's
    end of turn: `stop_ids`; kept).  sample_seed None: greedy; else sampled at s.temperature /
    s.top_p on an RNG stream of its own.  bar: a `common.progress` bar told the prompts answered."""
    from transformers import GenerationConfig

    eos, pad = stop_ids(tok), pad_id(tok)
    device = next(model.parameters()).device
    suppress = never_generated(model, vocab_size_of(tok))
    if sample_seed is None:
        config = GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=pad, suppress_tokens=suppress)
    else:
        config = GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,
                                  max_new_tokens=s.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  suppress_tokens=suppress)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sample_seed is not None:
            torch.manual_seed(sample_seed)
        for lo in range(0, len(prompts), s.batch_size):
            ids, mask = left_padded(prompts[lo: lo + s.batch_size], pad)  # (B, P)
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)[:, ids.shape[1]:].cpu()  # (B, <= max_new_tokens)
            for row in new.tolist():
                out.append(cut_at_stop(row, eos))
            if bar is not None:
                bar.update(len(new))
    model.train(was_training)
    return out


def reverse_kl_sum(model, teacher: Teacher, prompts: list[list[int]], completions: list[list[int]], tok,
                   temperature: float, batch_size: int) -> tuple[float, int]:
    """(sum over completion tokens of KL(student_T || teacher_T), number of tokens scored).
    The teacher's signal must carry dense logits (a LiveTeacher with keep_dense=True): one
    teacher forward per batch.  Tokens whose teacher logits were not finite are left out."""
    pad, vocab = pad_id(tok), vocab_size_of(tok)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for lo in range(0, len(prompts), batch_size):
        hi = lo + batch_size
        batch = Batch.of(completion_blocks(prompts[lo:hi], completions[lo:hi], pad), range(lo, min(hi, len(prompts))))
        sig, valid = teacher.signal(batch)  # the batch's one teacher forward
        if sig.logits is None:
            raise ValueError("reverse KL needs the teacher's dense logits (LiveTeacher(keep_dense=True))")
        with torch.no_grad():
            s_logits = model(input_ids=batch.input_ids.to(device)).logits[..., :vocab].float()  # (B, T, V)
        s = torch.log_softmax(s_logits / temperature, -1)
        t = torch.log_softmax(sig.logits.to(device).float() / temperature, -1)  # (B, T, V)
        scored = (batch.labels != IGNORE) & valid  # (B, T): completion tokens only
        per_token = kl(s, t).cpu()  # (B, T)
        total += float(per_token[scored].sum())
        count += int(scored.sum())
    model.train(was_training)
    return total, count


def text_of(tok, ids: list[int]) -> str:
    """A completion's words: EOS and other special tokens dropped."""
    return tok.decode(ids, skip_special_tokens=True)


def exact_match(texts: list[str], references: list[str]) -> float:
    """Share of completions equal to their reference, surrounding whitespace stripped."""
    return sum(a.strip() == b.strip() for a, b in zip(texts, references)) / max(len(texts), 1)


def has_references(prompts: list[Prompt]) -> bool:
    return any(p.reference.strip() for p in prompts)


def completion_stats(completions: list[list[int]], prompts: list[Prompt], tok) -> dict:
    """Mean length (tokens, EOS included) and, when the data has answers, exact match."""
    out = {"mean_length": sum(map(len, completions)) / max(len(completions), 1)}
    if has_references(prompts):
        out["exact_match"] = exact_match([text_of(tok, c) for c in completions], [p.reference for p in prompts])
    return out


def evaluate_generation(model, name: str, teacher: Teacher, tok, prompts: list[Prompt], s: GenSettings,
                        teacher_greedy: list[list[int]], bar=None) -> dict:
    """One student's generation figures (see the module docstring); teacher_greedy: the
    teacher's greedy completions of the same prompts (shown beside the student's).  bar: told
    the prompts answered, greedy then sampled (2 x prompts)."""
    ids = [p.ids for p in prompts]
    out: dict = {}
    for mode, seed in (("greedy", None), ("sampled", stable_seed("eval samples", s.seed, name))):
        completions = generate(model, ids, tok, s, sample_seed=seed, bar=bar)
        total, count = reverse_kl_sum(model, teacher, ids, completions, tok, s.temperature, s.batch_size)
        out[mode] = {"reverse_kl": max(total / max(count, 1), 0.0), **completion_stats(completions, prompts, tok)}
        if mode == "greedy":
            greedy = completions
    out["samples"] = [{"prompt": tok.decode(p.ids), "student": text_of(tok, g), "teacher": text_of(tok, t),
                       **({"reference": p.reference} if p.reference.strip() else {})}
                      for p, g, t in list(zip(prompts, greedy, teacher_greedy))[:SAMPLES_SHOWN]]
    return out


def markdown(report: dict) -> list[str]:
    """report.md's generation section (empty when the run's data has no prompts)."""
    gen = report.get("generation")
    if not gen:
        return []
    em = "exact_match" in gen.get("teacher", {})
    cols = ["greedy reverse KL", "sampled reverse KL", "greedy length", "sampled length"]
    cols += ["greedy exact match", "sampled exact match"] if em else []
    lines = ["## Generation on held-out prompts", "",
             f"{gen['prompts']} validation prompts; up to {gen['max_new_tokens']} new tokens; sampled at temperature "
             f"{gen['temperature']}, top_p {gen['top_p']}. Reverse KL(student || teacher) per completion token, the "
             f"teacher scoring the student's own completions at that temperature; length in tokens (EOS included)"
             + ("; exact match against the data's answer, whitespace stripped." if em else "."), "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    t = gen.get("teacher", {})
    teacher_em = f" {t['exact_match']:.3g} | - |" if em else ""
    lines.append(f"| teacher | - | - | {t['mean_length']:.3g} | - |" + teacher_em)
    for name, r in report["students"].items():
        g = r.get("generation")
        if not g:
            continue
        cells = [g["greedy"]["reverse_kl"], g["sampled"]["reverse_kl"], g["greedy"]["mean_length"],
                 g["sampled"]["mean_length"]]
        cells += [g["greedy"]["exact_match"], g["sampled"]["exact_match"]] if em else []
        lines.append(f"| {name} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
    lines.append("")
    for name, r in report["students"].items():
        g = r.get("generation")
        if not g:
            continue
        lines += [f"### {name}: sample completions (greedy)", ""]
        for i, smp in enumerate(g["samples"], 1):
            lines += [f"{i}. prompt:", "", "```text", _printable(smp["prompt"]), "```", "",
                      f"   - student: `{_inline(smp['student'])}`", f"   - teacher: `{_inline(smp['teacher'])}`"]
            if "reference" in smp:
                lines.append(f"   - reference: `{_inline(smp['reference'])}`")
            lines.append("")
    return lines


def _printable(text: str, keep: str = "\n\t") -> str:
    """Control characters (a model's byte tokens: NUL, \\x0b, ...) as escapes, so report.md stays
    text; those in `keep` stay as they are."""
    def shown(ch: str) -> str:
        if ch in keep or not (unicodedata.category(ch) in ("Cc", "Cs") or ch in "\u2028\u2029"):
            return ch
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"

    return "".join(map(shown, text))


def _inline(text: str) -> str:
    """One line for a code span: newlines shown as \\n, tabs as \\t, other control characters
    escaped, backticks as '."""
    return _printable(text.replace("\n", "\\n").replace("\t", "\\t").replace("`", "'"), keep="")
