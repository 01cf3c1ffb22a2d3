"""What document-aware packing (data.packing: documents) costs per step and changes in a run.

step:  `Student.train_step` of a dense and a MoE student (as bench/step.py: hard CE +
       forward KL against a synthetic top-k signal, AdamW) on random blocks, each block
       cut into rows of --row tokens on average (random lengths), with the rows' position
       ids (transformers then builds a per-row mask instead of the plain causal one) and
       without (concat); median step time of each, interleaved so a loaded machine slows
       both alike.
demo:  the demo's config (distill/demo.py, --size) with packing documents and concat, each
       in its own out dir, teacher pretraining and student steps cut by --demo-scale; the
       report's held-out figures of each student.  Each run scores its own held-out blocks
       (packed its way), so the val figures compare the two settings as each would report.

Usage: python bench/packing.py step [--quick]
       python bench/packing.py demo --size quick --demo-scale 0.25 --max-train-blocks 1000 [--packing concat]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import StudentConfig  # noqa: E402
from distill.train.engines import TorchEngine  # noqa: E402
from distill.train.student import MicroBatch, Student, make_optimizer  # noqa: E402
from losses import TeacherSignal  # noqa: E402
from students.build import build_model  # noqa: E402
from students.presets import PRESETS  # noqa: E402
from teachers import Batch  # noqa: E402


def row_positions(batch: int, block: int, mean_row: int, g: torch.Generator) -> torch.Tensor:
    """(batch, block) position ids of rows of random lengths (1 .. 2 * mean_row) packed back to back."""
    out = torch.empty(batch, block, dtype=torch.int64)
    for b in range(batch):
        at = 0
        while at < block:
            n = int(torch.randint(1, 2 * mean_row + 1, (1,), generator=g))
            out[b, at:at + n] = torch.arange(min(n, block - at))
            at += n
    return out


def step_cost(preset: str, args) -> dict:
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                 num_kv_heads=max(1, args.heads // 4), head_dim=args.hidden // args.heads)
    if preset == "scout":
        shape |= {"num_experts": args.experts, "intermediate_size": 2 * args.hidden,
                  "intermediate_size_mlp": 4 * args.hidden, "attention_chunk_size": args.seq // 2}
    else:
        shape |= {"intermediate_size": 4 * args.hidden}
    config = PRESETS[preset](**shape)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    positions = row_positions(args.batch, args.seq + 1, args.row, g)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq, args.k), generator=g)
    logprobs = torch.log_softmax(torch.randn(args.batch, args.seq, args.k, generator=g), -1) - 0.3
    valid = torch.ones(args.batch, args.seq, dtype=torch.bool)
    batches = {"concat": Batch.of(blocks, range(args.batch)), "documents": Batch.of(blocks, range(args.batch), positions)}
    students = {}
    for name in batches:
        model = build_model(config, seed=0).to(device)
        sc = StudentConfig(name=preset, model={"preset": preset}, optim={"lr": 1e-4, "warmup_steps": 2})
        opt, sched = make_optimizer(model, sc.optim, args.warmup + args.steps)
        students[name] = Student(sc, TorchEngine(model, opt, sched, sc.optim, device, args.precision),
                                 args.warmup + args.steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in batches}
    for step in range(args.warmup + args.steps):
        for name, batch in batches.items():  # interleaved: load on the machine hits both alike
            mb = MicroBatch(batch, TeacherSignal(ids, logprobs), valid)
            sync()
            t0 = time.perf_counter()
            students[name].train_step(step, [mb])
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"step_s": {k: round(v, 4) for k, v in med.items()},
            "documents_over_concat": round(med["documents"] / med["concat"], 3),
            "rows_per_block": round(float((positions == 0).sum()) / args.batch, 1)}


def demo_effect(args) -> dict:
    from distill.config import check_config, parse_config
    from distill.demo import demo_config
    from distill.stages import run_all

    out = {}
    for packing in args.packing:
        raw = demo_config(Path(args.out) / packing, args.size)
        raw["data"]["packing"] = packing
        if args.max_train_blocks:
            raw["data"]["max_train_blocks"] = args.max_train_blocks
        pre = raw["teacher"]["pretrain"]
        pre["steps"] = max(2, int(pre["steps"] * args.demo_scale))
        pre["optim"]["warmup_steps"] = max(1, pre["steps"] // 10)
        train = raw["train"]
        train["steps"] = max(2, int(train["steps"] * args.demo_scale))
        train["eval_every"] = train["checkpoint_every"] = max(1, train["steps"] // 4)
        cfg = check_config(parse_config(raw, source=f"bench packing {packing}"), "bench")
        t0 = time.perf_counter()
        run_all(cfg, progress=False)
        report = json.loads((cfg.layout.root / "report.json").read_text())
        out[packing] = {"wall_s": round(time.perf_counter() - t0, 1), "teacher_steps": pre["steps"],
                        "student_steps": train["steps"],
                        "teacher_val_ppl": round(report["teacher"].get("val_ppl", float("nan")), 2),
                        "students": {name: {k: round(v, 4) for k, v in s.items()
                                            if k in ("val_ppl", "teacher_top1_agreement", "kl_to_teacher")}
                                     for name, s in report["students"].items()},
                        "val_tokens_scored": report["students"][next(iter(report["students"]))].get("val_tokens")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["step", "demo"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--row", type=int, default=64, help="mean tokens per packed row")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument("--size", default="quick", help="demo size (distill/demo.py SIZES)")
    p.add_argument("--demo-scale", type=float, default=1.0, help="share of the demo's teacher and student steps")
    p.add_argument("--max-train-blocks", type=int, default=None, help="demo: fewer training blocks (a shorter cache pass)")
    p.add_argument("--packing", nargs="+", default=["documents", "concat"], help="demo: which settings to run")
    p.add_argument("--out", default="runs/bench-packing")
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.heads, args.experts = 512, 64, 2, 4, 4
        args.batch, args.seq, args.row, args.k, args.steps, args.warmup = 2, 64, 8, 8, 2, 1
    if args.what == "demo":
        result = {"demo": demo_effect(args), "size": args.size, "demo_scale": args.demo_scale}
    else:
        result = {"device": args.device, "torch": torch.__version__, "precision": args.precision,
                  "shape": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                            "experts": args.experts, "batch": args.batch, "seq": args.seq, "row": args.row},
                  "dense": step_cost("dense", args), "scout": step_cost("scout", args)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
