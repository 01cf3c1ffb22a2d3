"""Rendering long conversations: seconds per row with the block given and without (issue 26's
chat-at-scale trial).  Each assistant turn costs whole renderings of the conversation, so
finding every turn of an n-turn row is O(n^2) renderings; with the block, turns past the cut
are not looked for.  A BPE trained on the stdlib sources, a ChatML template with a default
system prompt (Qwen2.5's shape), rows of n turns of 20-word questions and 40-word answers.
Prints one JSON object: per n, the row's tokens and seconds (whole row, block 1,025, 4,097).

    python bench/chat_render.py                 # 50, 200, 400 turns
    python bench/chat_render.py --quick         # 10 turns (the smoke test)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", default="50,200,400", help="Turns per row (user + assistant pairs), comma-separated.")
    ap.add_argument("--quick", action="store_true", help="10 turns (a smoke test).")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from distill.chat import render
    from distill.config import DataConfig
    from distill.data import load_documents, train_tokenizer

    with tempfile.TemporaryDirectory() as work:
        docs = load_documents(DataConfig(stdlib=True, max_documents=100), cache_dir=Path(work) / ".docs")
        train_tokenizer(docs, 2048, Path(work) / "tok")
        tok = AutoTokenizer.from_pretrained(str(Path(work) / "tok"))
        tok.chat_template = TEMPLATE
        words = " ".join(docs[i]["text"] for i in range(20)).split()
    rng = random.Random(0)

    def say(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    for turns in ([10] if args.quick else [int(t) for t in args.turns.split(",")]):
        messages = [m for _ in range(turns) for m in ({"role": "user", "content": say(20)},
                                                      {"role": "assistant", "content": say(40)})]
        row, out = json.dumps({"messages": messages}), {"turns": turns}
        for name, block in (("whole_s", None), ("block_1025_s", 1025), ("block_4097_s", 4097)):
            t0 = time.perf_counter()
            ids, _ = render(tok, row, block)
            out[name] = round(time.perf_counter() - t0, 3)
        out["tokens"] = len(ids)
        rows.append(out)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
