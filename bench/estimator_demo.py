"""The demo's dense student distilled from a top-64 cache and from a sampled cache (n = 32),
same teacher, data, init and token budget; scored against the *full* teacher distribution.

    python bench/estimator_demo.py --run runs/demo [--size quick] [--out /tmp/estimator-demo]

Needs a finished `distill demo` (its teacher, tokenizer and top-64 cache are reused).  For
each estimator it runs `distill run` on the demo config with one distilled dense student
(plus, for top-k, its CE-only twin), then `distill eval` in online mode with the teacher's
dense logits, so `kl_to_teacher` is the exact KL(teacher || student) at T = 1 on held-out
blocks, not an estimate.  Prints JSON: per estimator, cache bytes/token, held-out perplexity,
exact KL, top-1 agreement, and wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.demo import demo_config  # noqa: E402


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"distill {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")


def config_for(run: Path, out: Path, size: str, estimator: str) -> Path:
    cfg = demo_config(out, size)
    cfg["teacher"] = {"source": "checkpoint", "path": str(run / "teacher")}
    cfg["data"]["tokenizer"] = {"path": str(run / "tokenizer")}
    dense = next(s for s in cfg["students"] if s["name"] == "dense")
    students = [dense]
    if estimator == "topk":
        cfg["cache"]["dir"] = str(run / "cache")  # the demo's own top-64 cache
        students.append(next(s for s in cfg["students"] if s["name"] == "dense-baseline"))
    else:
        cfg["cache"].update(estimator="sampled", samples=32, sample_temperature=1.0)
        dense["loss"] = {**dense["loss"], "tail": "sampled"}
    cfg["students"] = students
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `distill demo` output dir")
    p.add_argument("--size", default="quick", choices=["tiny", "quick", "full"])
    p.add_argument("--out", type=Path, default=Path("/tmp/estimator-demo"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(args.run), "size": args.size}
    for estimator in ("topk", "sampled"):
        out = args.out / estimator
        cfg = config_for(args.run.resolve(), out, args.size, estimator)
        t0 = time.perf_counter()
        _cli("run", "-c", str(cfg), "--quiet")
        wall = time.perf_counter() - t0
        _cli("eval", "-c", str(cfg), "--quiet", "--set", "train.mode=online", "--set", "train.online_dense=true")
        report = json.loads((out / "report.json").read_text())
        cache = args.run / "cache" if estimator == "topk" else out / "cache"
        manifest = json.loads((cache / "manifest.json").read_text())
        size = sum((cache / e["file"]).stat().st_size for s in manifest["splits"].values() for e in s["shards"])
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        for name, r in report["students"].items():
            key = estimator if name == "dense" else "ce_only_twin"
            result[key] = {"val_ppl": round(r["val_ppl"], 2), "kl_to_teacher_exact": round(r["kl_to_teacher"], 4),
                           "teacher_top1_agreement": round(r["teacher_top1_agreement"], 4),
                           "train_tokens": r["train_tokens"]}
            if name == "dense":
                result[key] |= {"cache_bytes_per_token": round(size / tokens, 1), "run_wall_s": round(wall)}
        result["teacher_val_ppl"] = round(report["teacher"]["val_ppl"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
