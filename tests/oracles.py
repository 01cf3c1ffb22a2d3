"""Packing as preparation did it before blocks were streamed to disk: in memory, simple enough
to read at a glance.  The tests hold the streaming packers (distill/packing.py) to these."""
from __future__ import annotations

import torch

from distill.chat import PackCounts, RowPacker
from teachers.protocol import untrained


def pack(token_lists, eos_id: int, block: int) -> torch.Tensor:
    """Join documents with EOS after each and cut into (N, block) rows; the remainder is dropped."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // block
    return torch.tensor(flat[: n * block], dtype=torch.int64).view(n, block)


def pack_rows(rows, pad_id: int, block: int) -> tuple[torch.Tensor, PackCounts]:
    """Whole chat rows into (N, block) blocks, non-targets marked; and what was cut or dropped."""
    packer = RowPacker(pad_id, block)
    ids_out, tgt_out = packer.add(rows)
    tail_ids, tail_tgt = packer.flush()
    ids_t = torch.tensor(ids_out + tail_ids, dtype=torch.int64).view(-1, block)  # (N, block)
    keep = torch.tensor(tgt_out + tail_tgt, dtype=torch.bool).view(-1, block)
    return torch.where(keep, ids_t, untrained(ids_t)), packer.counts
