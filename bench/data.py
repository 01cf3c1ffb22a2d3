"""Data preparation at the size of a real run (issue 23): peak memory and speed.

Makes a corpus from the stdlib's .py sources repeated with edits (every copy renames
identifiers and gets its own header, so documents differ and none is a duplicate) into a
temp dir, then per size, each in a fresh subprocess:
  prepare  `prepare_data` with a given BPE tokenizer (num_proc: auto): wall time,
           tokens/s, peak RSS (ru_maxrss of the process and of its tokenising workers)
  index    open the prepared data and read 200 random training batches of 8 blocks: peak RSS
  baseline the tokenizer's own batch call, `tok(batch)` on the same texts, same cores
           (its Rust thread pool): tokens/s, over the first `--baseline-tokens` tokens
Prints one JSON object.  Targets: prepare's peak RSS at 100M within 1.2x of that at 10M
and under 2 GB; prepare's tokens/s >= 80% of the baseline's.

    python bench/data.py                      # 10M, 30M, 100M tokens
    python bench/data.py --sizes 10,30        # millions of tokens
    python bench/data.py --quick              # ~1M tokens (the smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_LEN = 256
VOCAB = 4096


def stdlib_sources() -> list[Path]:
    from distill.config import DataConfig
    from distill.data import corpus_files

    return [f for f in corpus_files(DataConfig(stdlib=True)) if f.stat().st_size < 400_000]


def make_tokenizer(work: Path) -> Path:
    from distill.config import DataConfig
    from distill.data import load_documents, train_tokenizer

    docs = load_documents(DataConfig(stdlib=True, max_documents=300), cache_dir=work / ".tokdocs")
    train_tokenizer(docs, VOCAB, work / "tokenizer")
    return work / "tokenizer"


def make_corpus(out: Path, tokens: int, tok_dir: Path) -> dict:
    """Copies of the stdlib sources, each edited, until about `tokens` tokens (estimated from
    the bytes per token of a sample)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sources = stdlib_sources()
    texts = [f.read_text(errors="replace") for f in sources[:200]]
    bytes_per_token = sum(map(len, texts)) / sum(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    want_bytes, written, files, copy = tokens * bytes_per_token, 0, 0, 0
    rng = random.Random(0)
    word = re.compile(r"\bself\b")
    while written < want_bytes:
        for f in sources:
            text = f.read_text(errors="replace")
            name = f"v{copy}_{rng.randrange(10**6)}"
            text = f"# copy {copy} of {f.name}\n" + word.sub(f"self_{name}", text)
            path = out / f"c{copy:04d}" / f"{files:07d}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written, files = written + len(text), files + 1
            if written >= want_bytes:
                break
        copy += 1
    return {"files": files, "bytes": written, "bytes_per_token_est": round(bytes_per_token, 3)}


def peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def child_prepare(corpus: Path, out: Path, tok_dir: Path) -> dict:
    from distill.config import DataConfig
    from distill.data import prepare_data

    t0 = time.perf_counter()
    data = prepare_data(DataConfig(paths=[corpus], seq_len=SEQ_LEN, tokenizer={"path": tok_dir}), out)
    wall = time.perf_counter() - t0
    m = data.manifest
    size = sum(p.stat().st_size for p in data.train.root.iterdir() if p.is_file())
    return {"wall_s": round(wall, 1), "documents": m["documents"], "tokens": m["tokens"],
            "tokens_per_s": round(m["tokens"] / wall), "blocks": {k: s["blocks"] for k, s in m["splits"].items()},
            "shards": sum(len(s["shards"]) for s in m["splits"].values()), "disk_bytes": size,
            "disk_bytes_per_token": round(size / m["tokens"], 3),
            "peak_rss_mb": round(peak_mb(resource.RUSAGE_SELF)), "peak_rss_workers_mb": round(peak_mb(resource.RUSAGE_CHILDREN))}


def child_index(corpus: Path, out: Path, tok_dir: Path) -> dict:
    import torch

    from distill.config import DataConfig
    from distill.data import prepare_data

    data = prepare_data(DataConfig(paths=[corpus], seq_len=SEQ_LEN, tokenizer={"path": tok_dir}), out)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(200):
        batch = data.train[torch.randint(0, len(data.train), (8,), generator=g)]
    return {"batch_shape": list(batch.shape), "ms_per_batch": round((time.perf_counter() - t0) / 200 * 1e3, 3),
            "peak_rss_mb": round(peak_mb(resource.RUSAGE_SELF))}


def child_baseline(corpus: Path, tok_dir: Path, max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    files = sorted(corpus.rglob("*.py"))
    tokens, spent, batch = 0, 0.0, []
    for i, f in enumerate(files):
        batch.append(f.read_text())
        if len(batch) == 64 or i == len(files) - 1:
            t0 = time.perf_counter()
            ids = tok(batch, add_special_tokens=False)["input_ids"]
            spent += time.perf_counter() - t0
            tokens, batch = tokens + sum(map(len, ids)), []
            if tokens >= max_tokens:
                break
    return {"tokens": tokens, "tokens_per_s": round(tokens / spent)}


def _child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,30,100", help="Millions of tokens, comma-separated.")
    ap.add_argument("--quick", action="store_true", help="One corpus of ~1M tokens (a smoke test).")
    ap.add_argument("--baseline-tokens", type=float, default=10e6)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        paths = [Path(p) for p in rest]
        out = {"prepare": lambda: child_prepare(*paths[:3]), "index": lambda: child_index(*paths[:3]),
               "baseline": lambda: child_baseline(paths[0], paths[1], int(float(rest[2])))}[kind]()
        print(json.dumps(out))
        return
    sizes = [1.0] if args.quick else [float(s) for s in args.sizes.split(",")]
    result = {"machine": f"{os.cpu_count()} cores", "seq_len": SEQ_LEN, "vocab": VOCAB, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf")  # the children's datasets cache: removed with tmp
        tok_dir = make_tokenizer(work)
        for m in sizes:
            corpus, out = work / f"corpus-{m:g}M", work / f"run-{m:g}M"
            row = {"corpus": make_corpus(corpus, int(m * 1e6), tok_dir)}
            row["prepare"] = _child("prepare", corpus, out, tok_dir)
            row["index"] = _child("index", corpus, out, tok_dir)
            row["baseline"] = _child("baseline", corpus, tok_dir, min(args.baseline_tokens, m * 1e6))
            row["prepare_vs_tokenizer"] = round(row["prepare"]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 3)
            result["sizes"][f"{m:g}M"] = row
            print(json.dumps({f"{m:g}M": row}), file=sys.stderr, flush=True)
            shutil.rmtree(corpus)
            shutil.rmtree(out)
    keys = list(result["sizes"])
    if len(keys) > 1:
        first, last = result["sizes"][keys[0]]["prepare"], result["sizes"][keys[-1]]["prepare"]
        result["peak_rss_ratio_last_to_first"] = round(last["peak_rss_mb"] / first["peak_rss_mb"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
