"""Training-step throughput and MFU of a dense and a MoE student through the real step.

Each student runs `Student.train_step` (the project's loss: hard CE + forward KL with the
tail bucket against a synthetic top-k teacher signal, chunked with analytic gradients; the
sparse MoE forward; AdamW with warmup/cosine, grad clipping) on random blocks, under the
given precision, and prints one JSON object:
  tokens_per_s   median over --steps timed steps after --warmup untimed ones
  mfu            6 * active params * tokens/s / peak FLOP/s (--peak-tflops; the usual 6N
                 per token, attention's own FLOPs left out, so a slight underestimate)

Usage: python bench/step.py --device cuda --precision bf16 [--hidden 2048 --layers 16 ...]
       python bench/step.py --quick          # CPU smoke run
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
from students.presets import PRESETS, param_counts  # noqa: E402
from teachers import Batch  # noqa: E402


def run(preset: str, args) -> dict:
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                 num_kv_heads=max(1, args.heads // 4), head_dim=args.hidden // args.heads)
    if preset == "scout":
        shape |= {"num_experts": args.experts, "intermediate_size": 2 * args.hidden,
                  "intermediate_size_mlp": 4 * args.hidden}
    else:
        shape |= {"intermediate_size": 4 * args.hidden}
    config = PRESETS[preset](**shape)
    device = torch.device(args.device)
    model = build_model(config, seed=0).to(device)
    sc = StudentConfig(name=preset, model={"preset": preset}, optim={"lr": 1e-4, "warmup_steps": 2})
    opt, sched = make_optimizer(model, sc.optim, args.warmup + args.steps)
    student = Student(sc, model, TorchEngine(model, opt, sched, sc.optim, device, args.precision),
                      args.warmup + args.steps)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq, args.k), generator=g)
    logprobs = torch.log_softmax(torch.randn(args.batch, args.seq, args.k, generator=g), -1) - 0.3
    mb = MicroBatch(Batch.of(blocks, range(args.batch)), TeacherSignal(ids, logprobs),
                    torch.ones(args.batch, args.seq, dtype=torch.bool))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        student.train_step(step, [mb])
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    total, active = param_counts(config)
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    out = {"params_total": total, "params_active": active, "tokens_per_s": round(tokens_per_s, 1),
           "step_s": round(statistics.median(times), 4)}
    if args.peak_tflops:
        out["mfu"] = round(6 * active * tokens_per_s / (args.peak_tflops * 1e12), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one step: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.heads, args.experts = 512, 64, 2, 4, 4
        args.batch, args.seq, args.k, args.steps, args.warmup = 2, 32, 8, 1, 1
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "precision": args.precision,
              "shape": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                        "batch": args.batch, "seq": args.seq, "k": args.k},
              "dense": run("dense", args), "scout": run("scout", args)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
