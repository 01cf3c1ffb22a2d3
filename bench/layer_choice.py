"""Which teacher layers to keep when cutting a student (issue 15): held-out cross-entropy
of a student cut from a trained teacher, before any distillation, per way of choosing.

Trains a small dense Llama teacher with plain CE on the stdlib corpus, then for each
strategy keeps `--keep` of its `--layers` layers (students.derive + students.init) and
prints JSON: {strategy: {"layers": [...], "val_ce": float}, "teacher": val_ce}.

    python bench/layer_choice.py --layers 8 --keep 4 --steps 300
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import DataConfig  # noqa: E402
from distill.data import prepare_data  # noqa: E402
from students.build import build_model  # noqa: E402
from students.derive import choose_layers, derive_config, even_layers  # noqa: E402
from students.init import init_from_teacher  # noqa: E402
from students.presets import dense  # noqa: E402


@torch.no_grad()
def val_ce(model, blocks: torch.Tensor) -> float:
    """Mean next-token CE over blocks (N, T+1), 8 at a time."""
    model.eval()
    total, n = 0.0, 0
    for part in blocks.split(8):
        logits = model(part[:, :-1]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), part[:, 1:].flatten(), reduction="sum"))
        n += part[:, 1:].numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--docs", type=int, default=400)
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    data = prepare_data(DataConfig(stdlib=True, max_documents=args.docs, seq_len=args.seq, val_fraction=0.1,
                                   tokenizer={"vocab_size": 1024}), work)
    teacher = build_model(dense(vocab_size=len(data.tokenizer), hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4,
                                intermediate_size=args.hidden * 2), seed=0)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        batch = data.train[torch.randint(0, len(data.train), (16,), generator=g)]
        loss = teacher(batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = data.val[:32]
    n, k = args.layers, args.keep
    auto, why = choose_layers(teacher, list(data.train[:8, :-1].split(4)), k)
    strategies = {"even": even_layers(k, n), "first": list(range(k)),
                  "first_and_last": list(range(k // 2)) + list(range(n - (k - k // 2), n)), "auto": auto}
    out = {"teacher": round(val_ce(teacher, held_out), 4), "auto_why": why}
    for name, layers in strategies.items():
        student = build_model(derive_config(teacher.config, {}, layers), seed=0)
        init_from_teacher(student, teacher, layers=layers)
        out[name] = {"layers": layers, "val_ce": round(val_ce(student, held_out), 4)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
