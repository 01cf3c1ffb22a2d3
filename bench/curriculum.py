"""Issue 17's study: which hard/soft schedule and which teacher-judged data selection train
the best dense student on the demo corpus, at one student token budget.

    python bench/curriculum.py --run runs/demo [--steps 360] [--lr 3e-3] [--seeds 0 1 2]
                               [--out /tmp/curriculum] [--eval-blocks 128]

Needs a finished `distill demo` (its teacher and tokenizer are reused; the data is the
demo's).  It writes two caches with the teacher's difficulty statistics (32 sampled tokens
per position, as the demo, and top-64 for the one mode a sampled cache refuses:
adaptive confidence), then per seed three `distill train` runs whose students are all the
demo's dense student with one thing changed (students do not interact, so co-training
them is the same as training each alone, from one cache read per step):
  schedules  CE-only twin; constant 0.75 and 1.0; soft -> hard (cosine 0.9 -> 0.6, the old
             demo); hard -> soft (0.6 -> 0.9); adaptive entropy and disagreement (mean 0.75)
  selection  soft -> hard (the old demo recipe) on: every block; drop the easiest 50% and keep the hardest
             5%, by teacher nll and by teacher entropy (same steps: fewer blocks, more epochs)
  recipe     soft -> hard with the easiest 50% by nll dropped and re-weighted every 30 steps
             by the students' gap (dynamic); constant 0.75 on the same static selection; and
             the CE-only twin on those blocks (does the selection help without a teacher too?)
  topk       constant 0.75 and adaptive confidence on the top-64 cache
Each run is then scored by `distill eval` in online mode with the teacher's dense logits:
held-out perplexity and the exact KL(teacher || student) on the first `--eval-blocks`
validation blocks, which no selection ever reads (selection ranks training blocks only)
and nothing stops early on.  Prints JSON: per row the mean and spread over seeds, and the
share of the CE twin's perplexity gap to the teacher each row closes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.demo import demo_config  # noqa: E402

SCHEDULES = {
    "ce_twin": None,
    "constant_0.75": {"soft_weight": {"kind": "constant", "start": 0.75}},
    "constant_1.0": {"soft_weight": {"kind": "constant", "start": 1.0}},
    "soft_to_hard": {"soft_weight": {"kind": "cosine", "start": 0.9, "end": 0.6}},
    "hard_to_soft": {"soft_weight": {"kind": "cosine", "start": 0.6, "end": 0.9}},
    "adaptive_entropy": {"soft_weight": {"kind": "constant", "start": 0.75}, "adaptive": "entropy"},
    "adaptive_disagreement": {"soft_weight": {"kind": "constant", "start": 0.75}, "adaptive": "disagreement"},
}
SELECTIONS = {
    "select_none": None,
    "drop_easiest_50pc_nll": {"by": "nll", "drop_easiest": 0.5},
    "drop_easiest_50pc_entropy": {"by": "entropy", "drop_easiest": 0.5},
    "keep_hardest_5pc_nll": {"by": "nll", "keep_hardest": 0.05},
    "keep_hardest_5pc_entropy": {"by": "entropy", "keep_hardest": 0.05},
}
DROP_EASY_HALF = {"by": "nll", "drop_easiest": 0.5}
RECIPE = {  # the demo's recipe (soft -> hard, easiest half by nll dropped) re-weighted dynamically, and
    # whether the selection helps without a teacher signal too (the twin the demo compares against)
    "soft_to_hard_drop_easiest_50pc_nll_rescored": (SCHEDULES["soft_to_hard"], {**DROP_EASY_HALF, "rescore_every": 30}),
    "constant_0.75_drop_easiest_50pc_nll": (SCHEDULES["constant_0.75"], DROP_EASY_HALF),
    "ce_twin_drop_easiest_50pc_nll": (None, DROP_EASY_HALF),
}
TOPK = {
    "topk_constant_0.75": {"soft_weight": {"kind": "constant", "start": 0.75}},
    "topk_adaptive_confidence": {"soft_weight": {"kind": "constant", "start": 0.75}, "adaptive": "confidence"},
}


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"distill {' '.join(args)} failed ({r.returncode}): {r.stderr[-3000:]}")


def base_config(run: Path, out: Path, seed: int, steps: int, lr: float, eval_blocks: int, estimator: str,
                cache_dir: Path) -> dict:
    cfg = demo_config(out, "quick")
    cfg["seed"] = seed
    cfg["teacher"] = {"source": "checkpoint", "path": str(run / "teacher")}
    cfg["data"]["tokenizer"] = {"path": str(run / "tokenizer")}
    cfg["cache"] = ({"estimator": "sampled", "samples": 32, "sample_temperature": 1.0, "sample_seed": 0}
                    if estimator == "sampled" else {"estimator": "topk", "k": 64})
    cfg["cache"].update(dir=str(cache_dir), batch_size=16)
    cfg["train"].update(steps=steps, eval_every=0, checkpoint_every=0, eval_blocks=eval_blocks)
    cfg["_dense"] = next(s for s in cfg["students"] if s["name"] == "dense")
    cfg["students"] = []
    return cfg


def student(cfg: dict, name: str, loss_patch: dict | None, lr: float, select: dict | None = None) -> dict:
    s = json.loads(json.dumps(cfg["_dense"]))
    s["name"] = name
    s["optim"] = {"lr": lr}
    if loss_patch is None:
        s["baseline"] = True
        s.pop("loss")
    else:
        s["loss"] = {**s["loss"], **loss_patch}
        if cfg["cache"]["estimator"] == "topk":
            s["loss"]["tail"] = "bucket"
    if select is not None:
        s["select"] = select
    return s


def write(cfg: dict, path: Path, drop_select: bool = False) -> Path:
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if drop_select:  # online evaluation: the selection already shaped the weights
        cfg["students"] = [{k: v for k, v in s.items() if k != "select"} for s in cfg["students"]]
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    return path


def train_and_score(cfg: dict, out: Path) -> dict:
    """distill train + export, then online eval with the dense teacher: per student its
    held-out perplexity and exact KL to the teacher; plus the teacher's own perplexity."""
    done = out.parent / f"{out.name}-result.json"
    if done.exists():  # a rerun (after a crash, say) keeps finished runs
        return json.loads(done.read_text())
    train_cfg = write(cfg, out.parent / f"{out.name}.yaml")
    eval_cfg = write(cfg, out.parent / f"{out.name}-eval.yaml", drop_select=True)
    t0 = time.perf_counter()
    _cli("train", "-c", str(train_cfg), "--quiet")
    wall = time.perf_counter() - t0
    for s in cfg["students"]:
        _cli("export", str(out / "students" / s["name"]), "--out", str(out / "students" / s["name"] / "export"))
    _cli("eval", "-c", str(eval_cfg), "--quiet", "--set", "train.mode=online", "--set", "train.online_dense=true")
    report = json.loads((out / "report.json").read_text())
    rows = {name: {"val_ppl": r["val_ppl"], "kl_to_teacher": r["kl_to_teacher"],
                   "data_kept": r.get("data_kept", 1.0)} for name, r in report["students"].items()}
    result = {"rows": rows, "teacher_val_ppl": report["teacher"]["val_ppl"], "train_wall_s": round(wall, 1)}
    done.write_text(json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `distill demo` output dir")
    p.add_argument("--out", type=Path, default=Path("/tmp/curriculum"))
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-blocks", type=int, default=128)
    p.add_argument("--only", choices=["schedules", "selection", "recipe", "topk"], nargs="+",
                   default=["schedules", "selection", "recipe", "topk"])
    args = p.parse_args()
    run, out = args.run.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    groups = {"schedules": ("sampled", {n: (patch, None) for n, patch in SCHEDULES.items()}),
              "selection": ("sampled", {n: (SCHEDULES["soft_to_hard"], sel) for n, sel in SELECTIONS.items()}),
              "recipe": ("sampled", RECIPE),
              "topk": ("topk", {n: (patch, None) for n, patch in TOPK.items()})}
    per_seed: dict[str, list[dict]] = {}
    teacher_ppl = None
    walls = {}
    for estimator in ("sampled", "topk"):
        if any(groups[g][0] == estimator for g in args.only):  # one teacher pass per cache, shared by every seed
            cfg = base_config(run, out / f"cache-run-{estimator}", 0, args.steps, args.lr, args.eval_blocks,
                              estimator, out / f"cache-{estimator}")
            cfg["students"] = [student(cfg, "probe", {}, args.lr)]
            _cli("cache", "-c", str(write(cfg, out / f"cache-{estimator}.yaml")), "--quiet")
    for seed in args.seeds:
        for group in args.only:
            estimator, rows = groups[group]
            cfg = base_config(run, out / f"{group}-s{seed}", seed, args.steps, args.lr, args.eval_blocks, estimator,
                              out / f"cache-{estimator}")
            cfg["students"] = [student(cfg, name, patch, args.lr, sel) for name, (patch, sel) in rows.items()]
            result = train_and_score(cfg, out / f"{group}-s{seed}")
            teacher_ppl = result["teacher_val_ppl"]
            walls[f"{group}-s{seed}"] = result["train_wall_s"]
            for name, r in result["rows"].items():
                per_seed.setdefault(name, []).append({"seed": seed, **r})
            print(json.dumps({"seed": seed, "group": group, **result}), file=sys.stderr, flush=True)
    twin = {r["seed"]: r["val_ppl"] for r in per_seed.get("ce_twin", [])}
    table = {}
    for name, rs in per_seed.items():
        ppl = [r["val_ppl"] for r in rs]
        kl = [r["kl_to_teacher"] for r in rs]
        closed = [(twin[r["seed"]] - r["val_ppl"]) / (twin[r["seed"]] - teacher_ppl) for r in rs if r["seed"] in twin]
        table[name] = {"val_ppl_mean": round(statistics.mean(ppl), 1),
                       "val_ppl_sd": round(statistics.stdev(ppl), 1) if len(ppl) > 1 else None,
                       "kl_mean": round(statistics.mean(kl), 4),
                       "kl_sd": round(statistics.stdev(kl), 4) if len(kl) > 1 else None,
                       "gap_closed_mean": round(statistics.mean(closed), 3) if closed else None,
                       "data_kept": rs[0]["data_kept"], "seeds": len(rs), "per_seed": rs}
    print(json.dumps({"run": str(run), "steps": args.steps, "lr": args.lr, "batch_size": 8, "seq_len": 128,
                      "student_tokens": args.steps * 8 * 128, "eval_blocks": args.eval_blocks,
                      "teacher_val_ppl": round(teacher_ppl, 1), "train_wall_s": walls, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
