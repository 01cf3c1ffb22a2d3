"""Training-step throughput and MFU of a dense and a MoE student through the real step.

Each student runs `Student.train_step` (the project's loss: hard CE + forward KL with the
tail bucket against a synthetic top-k teacher signal, chunked with analytic gradients; the
sparse MoE forward; AdamW with warmup/cosine, grad clipping) on random blocks, under the
given precision, and prints one JSON object:
  tokens_per_s   median over --steps timed steps after --warmup untimed ones
  mfu            6 * active params * tokens/s / peak FLOP/s (--peak-tflops; the usual 6N
                 per token, attention's own FLOPs left out, so a slight underestimate)

With --vs-ce (issue 26: the whole step, not only the loss) it compares, for one student, the
cached distillation step against the same student's CE-only step, alternating the two every
step so load on a shared machine hits both alike:
  ce             `train_step` of a baseline student (hard CE only, no signal)
  kd             reading the step's signal from a real cache on disk (`CachedTeacher`, the
                 default lossless encoding, k=64, on demand) + `train_step` with it
  kd_prefetched  the same with the read done ahead by the prefetch threads, as training runs
  breakdown      kd's phases timed apart: read (decode), copy to the device, forward + loss +
                 backward, optimiser step
Target: kd_prefetched / ce <= 1.15.

Usage: python bench/step.py --device cuda --precision bf16 [--hidden 2048 --layers 16 ...]
       python bench/step.py --quick          # CPU smoke run
       python bench/step.py --vs-ce [--hidden 512 --layers 4 --seq 512 --batch 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import StudentConfig  # noqa: E402
from distill.train.engines import TorchEngine  # noqa: E402
from distill.train.student import MicroBatch, Student, distill_loss, make_optimizer  # noqa: E402
from losses import TeacherSignal  # noqa: E402
from students.build import build_model  # noqa: E402
from students.presets import PRESETS, param_counts  # noqa: E402
from teachers import Batch  # noqa: E402
from teachers.cache.replay import CachedTeacher  # noqa: E402
from teachers.cache.writer import write_cache  # noqa: E402


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
    student = Student(sc, TorchEngine(model, opt, sched, sc.optim, device, args.precision),
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


def make_student(preset: str, args, baseline: bool) -> Student:
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                 num_kv_heads=max(1, args.heads // 4), head_dim=args.hidden // args.heads, intermediate_size=4 * args.hidden)
    model = build_model(PRESETS[preset](**shape), seed=0).to(torch.device(args.device))
    sc = StudentConfig(name=preset, model={"preset": preset}, baseline=baseline,
                       optim={"lr": 1e-4, "warmup_steps": 2})
    opt, sched = make_optimizer(model, sc.optim, 10_000)
    return Student(sc, TorchEngine(model, opt, sched, sc.optim, torch.device(args.device), args.precision), 10_000)


def fake_teacher_topk(x: torch.Tensor, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's top-k for blocks x (B, T): (values, ids), (B, T, k) each, ids distinct per
    position, values sorted descending (what `write_cache` takes instead of full logits)."""
    g = torch.Generator().manual_seed(int(x[:, 0].sum()))
    ids = torch.rand(*x.shape, vocab, generator=g).topk(k, dim=-1).indices
    values = torch.randn(*x.shape, k, generator=g).sort(-1, descending=True).values * 3
    return values, ids


def vs_ce(args) -> dict:
    """The cached distillation step against the CE-only step of the same student (see docstring)."""
    n_blocks = args.batch * (args.warmup + args.steps)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab, (n_blocks, args.seq + 1), generator=g)
    work = Path(tempfile.mkdtemp(prefix="bench-step-"))
    write_cache(work / "cache", lambda x: fake_teacher_topk(x, args.k, args.vocab), {"train": blocks[:, :-1]},
                identity={"teacher": "bench", "vocab_size": str(args.vocab)}, k=args.k, progress=False)
    on_demand = CachedTeacher(work / "cache", "train", workers=0)
    ahead = CachedTeacher(work / "cache", "train", workers=2)
    ce, kd, kd2 = (make_student("dense", args, baseline=b) for b in (True, False, False))
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    valid = torch.ones(args.batch, args.seq, dtype=torch.bool)
    times = {k: [] for k in ("ce", "kd", "kd_prefetched", "read", "copy", "forward_loss_backward", "optimizer")}
    batches = [Batch.of(blocks[i * args.batch:(i + 1) * args.batch], range(i * args.batch, (i + 1) * args.batch))
               for i in range(args.warmup + args.steps)]

    def timed(name, fn, step):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        if step >= args.warmup:
            times[name].append(time.perf_counter() - t0)
        return out

    for step, batch in enumerate(batches):
        if step + 1 < len(batches):
            ahead.prefetch([batches[step + 1]])
        timed("ce", lambda: ce.train_step(step, [MicroBatch(batch, None, valid)]), step)

        def kd_step():
            sig, ok = on_demand.signal(batch)
            return kd.train_step(step, [MicroBatch(batch, sig, ok)])
        timed("kd", kd_step, step)
        if step == 0:
            ahead.prefetch([batch])
        sig_ahead, ok_ahead = ahead.signal(batch)  # read while the steps above ran
        timed("kd_prefetched", lambda: kd2.train_step(step, [MicroBatch(batch, sig_ahead, ok_ahead)]), step)

        # kd's phases, apart, on the same student (a fourth step per round)
        sig, ok = timed("read", lambda: on_demand.signal(batch), step)
        on_dev = timed("copy", lambda: MicroBatch(batch, sig, ok).to(device), step)

        def fwd_bwd():
            kd.model.train()
            totals = kd.step_totals([on_dev], kd.w_soft(step))
            ids, labels, ok_dev, sig_dev, _ = on_dev
            out = kd.engine.run(lambda model: distill_loss(model, ids, labels, sig_dev, ok_dev, kd.cfg.loss,
                                                           kd.w_soft(step), False, totals, 1))
            kd.engine.backward(out.total)
        timed("forward_loss_backward", fwd_bwd, step)
        timed("optimizer", lambda: kd.engine.step(skip=False), step)

    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                      "seq": args.seq, "k": args.k, "encoding": "lossless"},
            "step_s": {k: round(v, 4) for k, v in med.items() if k in ("ce", "kd", "kd_prefetched")},
            "kd_over_ce": round(med["kd"] / med["ce"], 3),
            "kd_prefetched_over_ce": round(med["kd_prefetched"] / med["ce"], 3),
            "breakdown_s": {k: round(med[k], 4) for k in ("read", "copy", "forward_loss_backward", "optimizer")},
            "steps": args.steps}


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
    p.add_argument("--vs-ce", action="store_true", help="the cached distillation step against the CE-only step")
    args = p.parse_args()
    if args.vs_ce:
        if args.quick:
            args.vocab, args.hidden, args.layers, args.heads, args.batch, args.seq, args.k = 512, 64, 2, 4, 2, 32, 8
            args.steps, args.warmup = 2, 1
        print(json.dumps({"device": args.device, "torch": torch.__version__, "precision": args.precision,
                          **vs_ce(args)}, indent=1))
        return
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
