"""Chat and instruction rows -> token ids with a training-target mask, packed whole.

Two row shapes are read from jsonl / parquet / saved datasets:
  {"messages": [{"role": ..., "content": ...}, ...]}  rendered with the tokenizer's own
      chat template; only the assistant turns are targets
  {"prompt": str, "completion": str}                  prompt + completion as plain text;
      only the completion is a target
Which tokens belong to an assistant turn is found by rendering the conversation up to
each turn: the characters between render(turns[:i], add_generation_prompt=True) and
render(turns[:i+1]) are turn i's (its text and the template's end-of-turn marker,
so the model learns to stop).  Tokens are matched to those characters by their offsets.
This works for any template that renders a conversation's prefix as a prefix of the
whole (ChatML, Llama 3, Mistral, Qwen); one that does not is refused, naming the row.

Rows are packed whole: a block holds as many complete rows as fit, the rest of it is
padding that is no target.  A row longer than a block is cut to the block (and
counted: the caller logs it), never continued in the next block with its prompt lost.
Targets are marked in the ids' sign (teachers.protocol: `untrained`).
"""
from __future__ import annotations

import json

import torch

from common.errors import UserError
from teachers.protocol import untrained

PLAIN = ""  # the `chat` column of a plain-text document


def table_kind(columns: list[str], text_field: str) -> str | None:
    """"text", "messages", "prompt" (prompt/completion) or None when the table has none of them."""
    if text_field in columns:
        return "text"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt"
    return None


def _flat_text(row: dict) -> str:
    """A chat row's words, for tokenizer training and the validation split's hash."""
    if "messages" in row:
        return "\n".join(str(m.get("content", "")) for m in row["messages"])
    return f"{row['prompt']}{row['completion']}"


def as_documents(table, kind: str, text_field: str):
    """A table -> columns `text` (the words) and `chat` (the row as JSON; PLAIN for text)."""
    if kind == "text":
        table = table.select_columns([text_field])
        if text_field != "text":  # the Hugging Face convention is already `text`
            table = table.rename_column(text_field, "text")
        return table.map(lambda b: {"chat": [PLAIN] * len(b["text"])}, batched=True)
    # One file may mix both shapes: a row's absent fields read as None and are dropped.
    cols = [c for c in ("messages", "prompt", "completion") if c in table.column_names]

    def one(row: dict) -> dict:
        row = {c: row[c] for c in cols if row[c] is not None}
        ok = "messages" in row or ("prompt" in row and "completion" in row)
        return {"text": _flat_text(row) if ok else "", "chat": json.dumps(row)}  # "" text: dropped as empty

    return table.select_columns(cols).map(one, remove_columns=cols)


def _spans(tok, row: dict) -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans that are targets) of one chat row."""
    if "prompt" in row:
        return row["prompt"] + row["completion"], [(len(row["prompt"]), len(row["prompt"]) + len(row["completion"]))]
    if not getattr(tok, "chat_template", None):
        raise UserError("data: the corpus has chat rows (`messages`) but the tokenizer has no chat template; use "
                        "a tokenizer dir whose tokenizer_config.json sets chat_template, or give prompt/completion rows")
    turns = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    full = tok.apply_chat_template(turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = tok.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(turns[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(f"data: the tokenizer's chat template does not render a conversation's start as the "
                            f"start of the whole (row beginning {json.dumps(turns[0])[:80]}); the assistant turns "
                            f"cannot be found, so give prompt/completion rows instead")
        spans.append((len(before), len(upto)))
    return full, spans


def render(tok, chat: str) -> tuple[list[int], list[bool]]:
    """One row (the `chat` column's JSON) -> (token ids, is-target per token)."""
    full, spans = _spans(tok, json.loads(chat))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], targets


class RowPacker:
    """Whole rows into blocks of `block` tokens, streaming: `add` returns the blocks that
    filled up, the block being filled is carried (and can be saved and restored as
    `carry`), `flush` pads and returns it.  A row longer than `block` keeps its first
    `block` tokens (truncated += 1); a row with no target left is dropped (dropped += 1):
    it would teach nothing.  Padding is `pad_id`, no target."""

    def __init__(self, pad_id: int, block: int, carry: dict | None = None):
        self.pad_id, self.block = pad_id, block
        carry = carry or {}
        self.ids: list[int] = list(carry.get("ids", []))  # the block being filled
        self.tgt: list[bool] = [bool(t) for t in carry.get("targets", [])]
        self.truncated = self.dropped = 0

    @property
    def carry(self) -> dict:
        return {"ids": list(self.ids), "targets": [int(t) for t in self.tgt]}

    def add(self, rows) -> tuple[list[list[int]], list[list[bool]]]:
        """rows: (ids, targets) pairs -> the completed blocks' (ids, targets) rows."""
        out_ids, out_tgt = [], []
        for ids, targets in rows:
            ids, targets = list(ids), [bool(t) for t in targets]
            if len(ids) > self.block:
                ids, targets = ids[: self.block], targets[: self.block]
                self.truncated += 1
            if not any(targets[1:]):  # position 0 of a block is never predicted
                self.dropped += 1
                continue
            if len(self.ids) + len(ids) > self.block:
                out_ids.append(self._padded(self.ids, self.pad_id))
                out_tgt.append(self._padded(self.tgt, False))
                self.ids, self.tgt = [], []
            self.ids += ids
            self.tgt += targets
        return out_ids, out_tgt

    def flush(self) -> tuple[list[list[int]], list[list[bool]]]:
        if not self.ids:
            return [], []
        out = [self._padded(self.ids, self.pad_id)], [self._padded(self.tgt, False)]
        self.ids, self.tgt = [], []
        return out

    def _padded(self, row: list, value) -> list:
        return row + [value] * (self.block - len(row))


def pack_rows(rows, pad_id: int, block: int) -> tuple[torch.Tensor, int, int]:
    """Whole rows into (N, block) blocks, non-targets marked; (blocks, truncated, dropped).

    In memory, for small inputs and tests; preparation streams through `RowPacker`."""
    packer = RowPacker(pad_id, block)
    ids_out, tgt_out = packer.add(rows)
    tail_ids, tail_tgt = packer.flush()
    ids_t = torch.tensor(ids_out + tail_ids, dtype=torch.int64).view(-1, block)  # (N, block)
    keep = torch.tensor(tgt_out + tail_tgt, dtype=torch.bool).view(-1, block)
    return torch.where(keep, ids_t, untrained(ids_t)), packer.truncated, packer.dropped
