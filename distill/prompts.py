"""Prompts of chat data, and the blocks a model's completions of them make.

Shared by on-policy training (distill/train/on_policy.py: the training split's prompts,
sampled by the students) and the generation evaluation (distill/report/generation.py: the
validation split's, answered greedily and sampled).  A prompt is a chat row up to the last
assistant turn it learns (`learnt_turns`; a conversational prompt/completion row's: up to its
completion's first), rendered with add_generation_prompt=True, or a prompt/completion row's
prompt; plain-text documents have none.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from distill.chat import CONTEXT, PLAIN, content_text, generation_prompt, learnt_turns
from distill.config import RunConfig
from distill.data import doc_in_val, documents_under
from teachers import untrained


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
    answers = learnt_turns(messages, row.get(CONTEXT, 0))
    # the final answer learnt; a prompt/completion conversation's first one, answering its prompt
    last = (answers[0] if CONTEXT in row else answers[-1]) if answers else 0
    if last == 0:  # no assistant turn to learn from, or nothing before it to answer (or a bad row)
        return None
    text = generation_prompt(tok, messages[:last], row.get("tools"))
    return Prompt(tok(text, add_special_tokens=False)["input_ids"], content_text(messages[last].get("content")))


def split_prompts(cfg: RunConfig, tok, held_out: bool, limit: int | None = None) -> tuple[list[Prompt], int]:
    """(the prompts that fit data.seq_len, in document order; how many were longer) of the
    training split, or (held_out) of the validation split: the documents `distill.data` packs
    each split from.  limit: stop once that many fit."""
    kept, too_long = [], 0
    with documents_under(cfg.data, cfg.layout.root / "data") as docs:
        docs = docs.filter(lambda b: [c != PLAIN and doc_in_val(t, cfg.data.val_fraction) == held_out
                                      for t, c in zip(b["text"], b["chat"])], batched=True)
        for chat in docs["chat"]:
            p = prompt_of(tok, chat)
            if p is None or not p.ids:
                continue
            if len(p.ids) > cfg.data.seq_len:  # it would not fit a training block either
                too_long += 1
                continue
            kept.append(p)
            if len(kept) == limit:
                break
        del docs
    return kept, too_long


def stable_seed(*parts) -> int:
    """A stable 63-bit integer from `parts` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") >> 1


def pad_id(tok) -> int:
    """The id that pads generation batches: the tokenizer's pad token, else its EOS."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, P) for the longest prompt's P: prompts end together,
    where generation starts."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, longest - len(p):] = 1
    return ids, mask


def never_generated(model, vocab: int) -> list[int] | None:
    """The embedding rows past the tokenizer's vocabulary (padding): `suppress_tokens`."""
    return list(range(vocab, model.get_input_embeddings().weight.shape[0])) or None


def completion_blocks(prompts: list[list[int]], completions: list[list[int]], pad: int,
                      width: int | None = None) -> torch.Tensor:
    """(B, W) blocks: prompt (no target) + completion (targets) + padding (no target), marked
    as packed blocks are (teachers.protocol.untrained), so `Batch.of` makes the labels.
    width: W (default: the longest row, plus one so an empty completion still has a label slot)."""
    width = width or max(len(p) + len(c) for p, c in zip(prompts, completions)) + 1
    blocks = torch.full((len(prompts), width), int(untrained(torch.tensor(pad))), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        row = torch.cat([untrained(torch.tensor(p, dtype=torch.long)), torch.tensor(c, dtype=torch.long)])
        blocks[r, : len(row)] = row
    return blocks
